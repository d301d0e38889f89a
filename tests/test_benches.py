"""The README's benchmark commands still run: each bench at a tiny size, as a subprocess.

No figure is judged (benchmarks print figures, they are not timed tests); what is checked is
that every bench completes, loses nothing, and prints the figures the README points to.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _bench(name: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(300)
def test_pull_bench():
    out = _bench("pull.py", "--concurrency", "3", "--requests", "12")
    assert re.search(r"^bare\s+12 ok\s+0 failed", out, re.M), out
    assert re.search(r"^proxy\s+12 ok\s+0 failed", out, re.M), out
    assert re.search(r"ratio proxy/bare: \d+\.\d\d", out), out


@pytest.mark.timeout(300)
def test_push_bench():
    out = _bench("push.py", "-k", "3", "-m", "12", "--mix")
    assert re.search(r"^armsproxy\s+12 ok\s+0 failed", out, re.M), out
    assert re.search(r"ratio armsproxy/baseline: \d+\.\d\d", out), out


@pytest.mark.timeout(300)
def test_events_bench():
    out = _bench("events.py", "--events", "60", "--batch", "10", "--rounds", "1")
    assert re.search(r"one per call \(arms\.event\)\s+\d+ events/s", out), out
    assert re.search(r"batched \(arms\.events, N=10\s*\)\s+\d+ events/s", out), out
    assert re.search(r"ratio batched/single: \d+\.\d\d\Z", out.strip()), out


@pytest.mark.timeout(300)
def test_store_bench():
    out = _bench("store.py", "--operations", "40", "--concurrency", "1,5", "--rounds", "1")
    assert re.search(r"C=5\s+group commit\s+\d+ calls/s", out), out
    assert re.search(r"C=5\s+ratio group/baseline: \d+\.\d\d", out), out


@pytest.mark.timeout(300)
def test_store_scale_bench():
    out = _bench("store_scale.py", "--sizes", "1000,3000", "--runs", "2", "--plans")
    assert re.search(r"N=3000 .*\n  submit .*\n  dispatch .*\(200 operation\(s\)\)", out), out
    assert "SEARCH q USING INDEX sa_queues_ready" in out, out
    assert re.search(r"dispatch_1M_over_1k=\d+\.\d\d deadline_1M_over_1k=\d+\.\d\d"
                     r" submit_1M_over_1k=\d+\.\d\d\Z", out.strip()), out


@pytest.mark.timeout(300)
def test_tls_memory_bench():
    out = _bench("tls_memory.py", "-n", "30", "--versions", "1.0,1.3")
    for version, negotiated in (("1.0", "TLSv1"), ("1.3", "TLSv1.3")):
        for impl in ("pyOpenSSL", "stdlib ssl"):
            assert re.search(rf"TLS {re.escape(version)}\s+{impl} .*negotiated "
                             rf"{re.escape(negotiated)}, \d+\.\d KiB per connection", out), out


@pytest.mark.timeout(300)
def test_tunnels_bench():
    out = _bench("tunnels.py", "-n", "10", "-m", "20", "--warm", "2", "--idle", "0",
                 "--clients", "1", "--rate", "50")
    assert "tunnels: 10 confirmed (0 failed)" in out, out
    assert "20 submitted, 20 succeeded" in out, out
    assert "'lost': 0, 'unexpected': 0" in out, out
    assert re.search(r"SUMMARY tunnels=10 rss/tunnel=[\d.]+ KiB .* p99=[\d.]+ ms", out), out
