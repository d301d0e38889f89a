"""Event outbox benchmark: events/s delivered to the demo RS, batched (``arms.events``) against
one event per call (``arms.event``, what an RS without ``arms.events`` gets).

    python bench/events.py [--events 2000] [--batch 100] [--rounds 2]

Per round and mode: a fresh SQLite store under the current directory (the disk armsproxy would
use) with ``--events`` events committed up front, as a backlog after a burst of operations
would be; then the real ``EventOutbox`` and ``RSClient`` deliver them to the demo RS, which
runs in a child process (as an operator's RS would: not on armsproxy's core) on a fresh
database, over loopback. Timed: from the outbox's start to the store's outbox being empty.
Then every event is checked to be in the demo RS, once and in order. The best round of each
mode is printed; the last line is the ratio batched/single.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.internet import defer, reactor, task

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from armsproxy.demo_rs.db import DemoDB  # noqa: E402
from armsproxy.demo_rs.server import event_from_json  # noqa: E402
from armsproxy.push.outbox import EventOutbox, new_event  # noqa: E402
from armsproxy.rs_client import RSClient  # noqa: E402
from armsproxy.store.sqlite import SQLiteStore  # noqa: E402

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, child: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"demo RS exited with {child.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise RuntimeError("demo RS did not start listening")


async def run_once(directory: Path, events: int, batch: int, single: bool) -> float:
    """Events/s of one delivery of ``events`` queued events; checks they all arrived."""
    for leftover in directory.iterdir():
        leftover.unlink()
    rs_db = directory / "rs.sqlite"
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "armsproxy.demo_rs.cli", "--db", str(rs_db), "serve",
         "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = SQLiteStore(directory / "armsproxy.sqlite", reactor=reactor)
    client = RSClient(reactor, f"http://127.0.0.1:{port}/RPC2", timeout=30)
    outbox = EventOutbox(store, client, reactor, poll=0.05, retry_base=0.05, retry_cap=0.5,
                         batch=batch)
    try:
        await store.open()
        await store.add_events([
            new_event("operation.cancelled", DISTID, f"op-{i}", state="cancelled",
                      operation="reboot", request_id=f"r-{i}")
            for i in range(events)])
        await wait_listening(port, child)
        if single:
            outbox.single_until = float("inf")  # as after a fallback: never re-probes here
        started = time.perf_counter()
        outbox.startService()
        while await store.pending_events(1):
            await task.deferLater(reactor, 0.01, lambda: None)
        elapsed = time.perf_counter() - started
        assert outbox.delivered == events and outbox.failures == 0, vars(outbox)
    finally:
        stopping = outbox.stopService()
        if stopping is not None:
            await stopping
        await client.close()
        await store.close()
        child.terminate()
        child.wait(30)
    db = DemoDB(rs_db, reactor=reactor)
    try:
        stored = await db.events(0, events + 1)
    finally:
        db.close()
    got = [event_from_json(e.json)["operation_id"] for e in stored]
    assert got == [f"op-{i}" for i in range(events)], "lost, repeated or out of order"
    return events / elapsed


async def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-events-", dir=Path.cwd()))
    try:
        print(f"event outbox benchmark: {args.events} queued events to the demo RS (child "
              f"process, loopback), best of {args.rounds}")
        best = {False: 0.0, True: 0.0}
        for _ in range(args.rounds):
            for single in (True, False):
                rate = await run_once(directory, args.events, args.batch, single)
                best[single] = max(best[single], rate)
        print(f"  one per call (arms.event)        {best[True]:8.0f} events/s")
        print(f"  batched (arms.events, N={args.batch:<4d})  {best[False]:8.0f} events/s")
        print(f"ratio batched/single: {best[False] / best[True]:.2f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", "--events", type=int, default=2000)
    parser.add_argument("-b", "--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(None)
    task.react(lambda _reactor: defer.ensureDeferred(main(options)))
