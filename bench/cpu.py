"""CPU per operation of whole processes, from /proc: the figure bench/pull.py and bench/push.py
compare between armsproxy and their baseline.

Why CPU and not rates: on a shared machine (2 cores here, other work on them) a wall-clock rate
moves by 20% or more from one run to the next, because a process waits for a core as much as
it works. The CPU a process spends per operation does not count the waiting, so it moves much
less, and it is what a deployment pays for.

CPU is utime + stime of the whole process (every thread, ended ones included) from
/proc/PID/stat, in clock ticks (``SC_CLK_TCK``, 100 a second on Linux: 10 ms each, so a
measured phase needs a few hundred ticks for a figure in ms per operation to mean much).
Readings are taken once the processes are quiet (:func:`settled`), before and after the
measured load, so that what a load leaves behind (connections closing, RS events going out,
store writes) is charged to it and not to the next one.

Also :func:`armsproxy_config`, the set-up both benches run armsproxy with. Loaded by the
benches by path, as bench/tunnels.py loads bench/push.py (:func:`load` loads the others).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

#: armsproxy is run as etc/armsproxy.service runs it: ``twist`` at ``--log-level=info``.
#: twistd has no level filter and writes every debug line, which production never pays for.
TWIST = "from twisted.application.twist._twist import Twist; Twist.main()"


def twist_args(log_file: Path) -> list[str]:
    """``python`` arguments that start ``twist`` as the systemd unit does; the plugin's
    name and options follow."""
    return ["-c", TWIST, "--log-level=info", f"--log-file={log_file}"]


HZ = os.sysconf("SC_CLK_TCK")
TICK = 1.0 / HZ


def process_cpu(pid: int | str = "self") -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK


def readings(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process."""
    return {name: process_cpu(pid) for name, pid in pids.items()}


def machine_busy() -> float:
    """Busy CPU seconds so far of the whole machine, every core (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) * TICK  # less idle and iowait


def settled(pids: Mapping[str, int], *, window: float = 0.25, limit: float = 3.0
            ) -> dict[str, float]:
    """:func:`readings` once no process of ``pids`` used more than a tick in ``window``
    seconds (at most ``limit`` seconds of waiting: a process busy on its own timers is read
    anyway). Blocking: a reactor calls it through ``deferToThread``."""
    last = readings(pids)
    deadline = time.monotonic() + limit
    while True:
        time.sleep(window)
        now = readings(pids)
        if (all(now[k] - last[k] < 1.5 * TICK for k in now)
                or time.monotonic() >= deadline):
            return now
        last = now


def per_op_ms(seconds: float, operations: int) -> float:
    """CPU seconds over ``operations`` successful operations, as ms per operation."""
    return seconds / operations * 1000.0 if operations > 0 else 0.0


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def ratio_line(baseline_ms: float, armsproxy_ms: float) -> str:
    """The benches' last line: baseline CPU per operation / armsproxy's (0.00 if armsproxy's
    is zero, which only a phase too short for one clock tick gives)."""
    ratio = baseline_ms / armsproxy_ms if armsproxy_ms > 0 else 0.0
    return f"cpu_ratio={ratio:.2f}"


def load(name: str) -> ModuleType:
    """Another bench file of this directory as a module (``_bench_<name>``), loaded once."""
    module_name = f"_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, Path(__file__).resolve().with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def armsproxy_config(work: Path, sa_port: int, rs_port: int, gate_port: int) -> Path:
    """A configuration file for armsproxy set up as the embedded default is (the same SA gate
    listener and certificates, dev PKI, SQLite under ``work``/data), but with the demo RS left
    to a process of its own, as a production RS is and as bench/tunnels.py's
    ``--rs-process`` runs it: armsproxy's CPU then holds no RS work. Built from
    ``armsproxy.config.embedded`` itself, so it follows what the embedded default serves."""
    from armsproxy.config import embedded
    from armsproxy.pki import ensure_dev_pki

    data = work / "data"
    cfg = embedded(data, port=sa_port, rs_port=rs_port, rs_gate_port=gate_port)
    ensure_dev_pki(data / "pki", ["127.0.0.1"])  # what the embedded demo RS would create
    conf = work / "armsproxy.conf"
    conf.write_text(
        f"[armsproxy]\ndata_dir = {data}\n"
        f"[sa_gate]\nlisten = {cfg.sa_listen}\n"
        f"public_urls = {' '.join(cfg.public_urls)}\n"
        f"[rs]\nurl = {cfg.rs_url}\n"
        f"[push]\nsa_ca = {cfg.sa_ca}\n"
        f"tunnel_urls = {' '.join(cfg.tunnel_urls)}\n"
        f"[rs_gate]\nlisten = {cfg.rs_gate_listen}\n"
    )
    return conf
