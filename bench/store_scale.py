"""Store scale benchmark: the engine's hot store calls at 1k, 100k and 1M queued operations.

    python bench/store_scale.py [--sizes 1000,100000,1000000] [--sas 10000] [--runs 15]
                                [--plans]

Issue #11: a queue that stays fast. For each size N a fresh store (under the current
directory: the disk armsproxy would use) is filled directly through the store's own schema
and migrations (one ``executemany`` transaction, in a child process so that its cache is not
counted) with N queued operations spread round-robin over ``min(N, --sas)`` SAs, shaped like
a backlog that built up: 30% of the SAs unreachable (their head waits for the SA), 20%
backing off (head due in 5 min), 10% with a 2-way operation waiting for its done-request,
20 SAs with one operation being sent; ten queued orders past their deadline and ten done
deadlines passed, whatever N. The stuck SAs hold the oldest heads.

Then, through the public :class:`SQLiteStore` API, each call is timed ``--runs`` times
(median CPU of this process, both threads; wall time beside it), in rounds that alternate the
sizes so that the machine's load weighs on every size alike:

* submit     one new order to a random SA (its COMMIT included);
* dispatch   ``next_dispatchable(now, 200)``: the pick of one dispatch-loop turn;
* deadline   what one deadline scan reads: ``in_states({sending})`` and ``past_deadline(now)``;
* list       ``list_operations(states=queued/sending/started, limit=101)``: push.list's page;
* backlog    ``backlog()``: what each ``/metrics`` scrape reads.

RSS (VmRSS of this process) is printed with every store open, after all the calls, and
as its change over each size's calls. The last line
gives the 1M (largest size) over 1k (smallest size) CPU ratios::

    dispatch_1M_over_1k=<ratio> deadline_1M_over_1k=<ratio> submit_1M_over_1k=<ratio>

``--plans`` prints SQLite's query plan of every statement each call ran, at each size.
The ``armsproxy`` imported is the first on ``sys.path``: ``PYTHONPATH=<other tree>`` measures
another version of the store (the comparison the issue asks for).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: another tree's armsproxy may be measured

from armsproxy.store import NewOperation, SQLiteStore  # noqa: E402
from armsproxy.store.migrations import migrate  # noqa: E402

T0 = 1_700_000_000.0
DUE = 10  # queued orders past expires_at, and started ones past done_deadline, at every size
BUSY = 20  # SAs with an operation being sent, at every size (at most max_in_flight)
DISPATCH_LIMIT = 200  # PushSettings.max_in_flight
LIST_STATES = ["queued", "sending", "started"]
PARAMS = '{"modules":[1,2,3]}'
COLUMNS = ("operation_id", "request_id", "distribution_id", "operation", "params", "state",
           "attempts", "created_at", "updated_at", "not_before", "expires_at",
           "done_deadline", "waiting_for")


def distid(k: int) -> str:
    return f"0001-0000-1A2B-0105-0000-0000-{k >> 16:04X}-{k & 0xFFFF:04X}"


def now_for(n: int) -> float:
    return T0 + n * 0.001 + 10.0


def rows(n: int, sas: int) -> Iterator[tuple[Any, ...]]:
    """N operations; the i-th goes to SA ``i % sas``, so the first ``sas`` are the heads."""
    now = now_for(n)
    rnd = random.Random(n)
    due = set(rnd.sample(range(2 * DUE, n), min(DUE, max(n - 2 * DUE, 0))))
    for i in range(n):
        k = i % sas
        created = T0 + i * 0.001
        state, attempts, not_before, waiting, done_deadline = "queued", 0, created, None, None
        expires = now + 86400.0
        if i < sas:  # the SA's first operation: what makes the SA stuck, busy or waiting
            kind = k % 10
            if kind in (0, 1, 2):
                waiting = "the SA to confirm a push method"
            elif kind in (3, 4):
                attempts, not_before = 1, now + 300.0
            elif kind == 6:
                state, done_deadline = "started", now + 900.0
            if k % max(sas // BUSY, 1) == 5:
                state, attempts = "sending", 1
        if i in due:
            expires = now - 1.0
        elif i < 2 * DUE and state == "queued" and waiting is None:
            state, done_deadline = "started", now - 1.0  # a done deadline passed
        yield (os.urandom(16).hex(), f"rq-{i}", distid(k), "read-module-list", PARAMS, state,
               attempts, created, created, not_before, expires, done_deadline, waiting)


def fill(path: Path, n: int, sas: int) -> None:
    """Create the store's schema (its migrations) and insert N rows in one transaction."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        # Fill-only settings: no journal, a large cache for the random operation_id keys.
        # The store then opens the file with its own (WAL, synchronous=FULL, default cache).
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        migrate(conn)
        conn.execute("BEGIN")
        conn.executemany(
            f"INSERT INTO operations ({', '.join(COLUMNS)})"
            f" VALUES ({', '.join('?' * len(COLUMNS))})", rows(n, sas))
        conn.execute("COMMIT")
    finally:
        conn.close()


def fill_apart(path: Path, n: int, sas: int) -> float:
    """``fill`` in a child process, so that its cache is not in this one's RSS; seconds."""
    started = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=fill, args=(path, n, sas))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"filling {path} failed (exit code {child.exitcode})")
    return time.perf_counter() - started


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def plans(store: SQLiteStore, call: Callable[[], Awaitable[Any]]) -> list[str]:
    """The plan of each statement ``call`` makes the store run (parameters inlined)."""
    statements: list[str] = []

    def trace(sql: str) -> None:
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        # A trigger's statements are traced as their outer statement again: shown once.
        if head not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "--", "PRAGMA") \
                and sql not in statements[-1:]:
            statements.append(sql)

    await store._run("trace", lambda c: c.set_trace_callback(trace))
    try:
        await call()
    finally:
        await store._run("trace", lambda c: c.set_trace_callback(None))
    conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)
    try:
        out = []
        for sql in statements:
            if sql.lstrip().startswith("--"):
                continue
            steps = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            out.append(" ".join(sql.split())[:160])
            out += [f"      {'  ' * (1 if r[1] else 0)}{r[3]}" for r in steps]
        return out
    finally:
        conn.close()


class Size:
    """One filled, open store of N operations and the calls timed on it."""

    def __init__(self, n: int, sas: int, path: Path, store: SQLiteStore) -> None:
        self.n, self.sas, self.path, self.store = n, sas, path, store
        self.now = now_for(n)
        rnd = random.Random(1)

        async def submit() -> Any:
            return await store.submit(NewOperation(
                distribution_id=distid(rnd.randrange(sas)), operation="read-module-list",
                params={"modules": [1]}, request_id=os.urandom(8).hex(),
                expires_at=self.now + 86400.0))

        async def dispatch() -> Any:
            return await store.next_dispatchable(self.now, DISPATCH_LIMIT)

        async def deadline() -> Any:
            return [*await store.in_states({"sending"}), *await store.past_deadline(self.now)]

        async def listing() -> Any:
            return await store.list_operations(states=LIST_STATES, limit=101)

        self.calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "submit": submit, "dispatch": dispatch, "deadline": deadline, "list": listing,
            "backlog": store.backlog}
        self.cpu: dict[str, list[float]] = {name: [] for name in self.calls}
        self.wall: dict[str, list[float]] = {name: [] for name in self.calls}
        self.got: dict[str, str] = {}
        self.rss_growth = 0.0

    async def run_once(self, record: bool) -> None:
        """Each call once; ``record`` False: a warm-up (pages read from disk the first time)."""
        rss0 = rss_mib()
        for name, call in self.calls.items():
            c0, w0 = time.process_time(), time.perf_counter()
            result = await call()
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            if record:
                self.cpu[name].append(cpu)
                self.wall[name].append(wall)
            self.got[name] = (f"{len(result)} counts" if isinstance(result, dict) else
                              f"{len(result) if isinstance(result, list) else 1} operation(s)")
        if record:
            self.rss_growth += rss_mib() - rss0

    def median_cpu(self, name: str) -> float:
        return statistics.median(self.cpu[name])


async def open_size(directory: Path, n: int, sas: int) -> Size:
    from twisted.internet import reactor

    path = directory / f"scale-{n}.sqlite"
    fill_s = fill_apart(path, n, sas)
    clock = task.Clock()
    clock.advance(now_for(n))
    store = SQLiteStore(path, reactor=reactor, clock=clock)
    await store.open()
    print(f"N={n:<8d} SAs={sas:<6d} filled in {fill_s:6.1f} s"
          f" ({os.path.getsize(path) / 2**20:.0f} MiB)")
    return Size(n, sas, path, store)


async def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-store-scale-", dir=Path.cwd()))
    import armsproxy

    sizes: list[Size] = []
    try:
        print(f"store scale benchmark: sizes {args.sizes}, at most {args.sas} SAs, median of"
              f" {args.runs} runs, armsproxy from {Path(armsproxy.__file__).parent}")
        for n in args.sizes:
            sizes.append(await open_size(directory, n, min(args.sas, n)))
        # Rounds alternate the sizes, so that the machine's load weighs on all alike (the
        # ratios are what is judged); round 0 is a warm-up.
        rss0 = rss_mib()
        for round_ in range(args.runs + 1):
            for size in sizes:
                await size.run_once(record=round_ > 0)
        rss1 = rss_mib()
        for size in sizes:
            print(f"N={size.n:<8d} SAs={size.sas}")
            for name in size.calls:
                print(f"  {name:9s} CPU {size.median_cpu(name) * 1e3:9.3f} ms"
                      f"  wall {statistics.median(size.wall[name]) * 1e3:9.3f} ms"
                      f"  ({size.got[name]})")
            print(f"  RSS change over its {args.runs} rounds of calls: "
                  f"{size.rss_growth:+.1f} MiB")
        print(f"RSS {rss0:.1f} MiB with every store filled and open, {rss1:.1f} MiB after"
              " all the calls")
        if args.plans:
            for size in sizes:
                print(f"plans at N={size.n}:")
                for name, call in size.calls.items():
                    print(f"  {name}:")
                    for line in await plans(size.store, call):
                        print(f"    {line}")
    finally:
        for size in sizes:
            await size.store.close()
        shutil.rmtree(directory, ignore_errors=True)
    small, large = sizes[0], sizes[-1]

    def ratio(name: str) -> str:
        base = small.median_cpu(name)
        return f"{large.median_cpu(name) / base:.2f}" if base > 0 else "inf"

    print(f"list_1M_over_1k={ratio('list')} backlog_1M_over_1k={ratio('backlog')}"
          f" rss_growth_1M={large.rss_growth:.1f}MiB")
    print(f"dispatch_1M_over_1k={ratio('dispatch')} deadline_1M_over_1k={ratio('deadline')}"
          f" submit_1M_over_1k={ratio('submit')}")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=[1000, 100_000, 1_000_000],
                        type=lambda s: sorted(int(x) for x in s.split(",")))
    parser.add_argument("--sas", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--plans", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(None)
    task.react(lambda reactor: defer.ensureDeferred(main(options)))
