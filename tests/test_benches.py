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
    out = _bench("pull.py", "--concurrency", "3", "--requests", "12", "--runs", "2")
    assert len(re.findall(r"^bare\s+12 ok\s+0 failed", out, re.M)) == 2, out
    assert len(re.findall(r"^proxy\s+12 ok\s+0 failed", out, re.M)) == 2, out
    assert len(re.findall(r"^\s+CPU per request: bare server \d+\.\d{3} ms;", out, re.M)) == 2, out
    assert len(re.findall(r"^\s+CPU per request: armsproxy \d+\.\d{3} ms, demo RS \d+\.\d{3} ms",
                          out, re.M)) == 2, out
    assert re.search(r"ratio proxy/bare \(requests/s\): \d+\.\d\d", out), out
    # Both servers made the same handshake (the same certificates).
    assert re.search(r"^handshake: bare (.+); proxy \1 \(same\)$", out, re.M), out
    assert re.search(r"CPU per request, median of 2 run\(s\): armsproxy \d+\.\d{3} ms, "
                     r"bare server \d+\.\d{3} ms; demo RS \d+\.\d{3} ms", out), out
    assert re.search(r"^cpu_ratio=\d+\.\d\d\Z", out.strip(), re.M), out


@pytest.mark.timeout(300)
def test_push_bench():
    out = _bench("push.py", "-k", "3", "-m", "12", "--mix", "--runs", "2")
    assert len(re.findall(r"^armsproxy\s+12 ok\s+0 failed", out, re.M)) == 2, out
    assert len(re.findall(r"^baseline\s+12 ok\s+0 failed", out, re.M)) == 2, out
    assert len(re.findall(r"^\s+CPU per push: armsproxy \d+\.\d{3} ms, demo RS \d+\.\d{3} ms",
                          out, re.M)) == 2, out
    assert len(re.findall(r"^\s+CPU per request: baseline client \d+\.\d{3} ms", out,
                          re.M)) == 2, out
    assert re.search(r"ratio armsproxy/baseline: \d+\.\d\d", out), out
    assert re.search(r"CPU per operation, median of 2 run\(s\): armsproxy \d+\.\d{3} ms per "
                     r"push, baseline client \d+\.\d{3} ms per request", out), out
    assert re.search(r"^cpu_ratio=\d+\.\d\d\Z", out.strip(), re.M), out


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
                 "--clients", "1", "--rate", "50", "--runs", "2")
    assert "tunnels: 10 confirmed (0 failed)" in out, out
    assert out.count("20 submitted, 20 succeeded") == 2, out
    assert "'lost': 0, 'unexpected': 0" in out, out
    # Every operation's RS event delivered within the measured window.
    assert re.search(r"events delivered to the RS [1-9]\d* \([\d.]+ per operation\)", out), out
    assert re.search(r"per idle tunnel: -?[\d.]+ KiB in all \(VmRSS\) = Python objects "
                     r"[\d.]+ KiB \(tracemalloc\) \+ OpenSSL and the rest -?[\d.]+ KiB", out), out
    assert re.search(r"SUMMARY tunnels=10 rss/tunnel=-?[\d.]+ KiB .* p99=[\d.]+ ms", out), out
    assert re.search(r"\ncpu_ms_per_op=\d+\.\d{3} kib_per_idle_tunnel=-?\d+\.\d\Z",
                     out.strip()), out


@pytest.mark.timeout(300)
def test_scale_bench():
    """bench/scale.py --quick: 1 and 2 workers on a throwaway PostgreSQL cluster."""
    out = _bench("scale.py", "--quick")
    assert len(re.findall(r"^  pulls: 400 ok, 0 failed", out, re.M)) == 2, out
    assert len(re.findall(r"^  tunnels: 200 confirmed", out, re.M)) == 2, out
    assert len(re.findall(r"^  operations: 400 submitted, 400 succeeded", out, re.M)) == 2, out
    # The tunnels spread over the two workers' instances, counted in PostgreSQL.
    spread = re.search(r"held per instance \(sa_registry\.tunnel_owner\): "
                       r"worker-0 (\d+), worker-1 (\d+)$", out, re.M)
    assert spread and int(spread[1]) + int(spread[2]) == 200, out
    assert re.search(r"^    parent: CPU \d+ ms in all", out, re.M), out
    figures = dict(item.split("=", 1) for item in out.strip().splitlines()[-1].split())
    for key in ("pulls_per_s_1", "pulls_per_s_2", "pull_gain", "tunnel_ops_per_s_1",
                "tunnel_ops_per_s_2", "tunnel_gain", "cpu_ms_per_pull_per_worker",
                "cpu_ms_per_tunnel_op_per_worker", "cpu_ms_per_pull_1",
                "cpu_ms_per_tunnel_op_1"):
        assert float(figures.pop(key)) > 0, (key, out)
    assert float(figures.pop("parent_cpu_ms")) >= 0, out  # the parent does ~nothing: maybe 0
    assert not figures, out
