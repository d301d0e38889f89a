"""Store benchmark: group commit against a transaction per call, same process, same file system.

    python bench/store.py [--operations 3000] [--concurrency 1,20,100] [--rounds 2]

Each simulated operation makes the store calls a 1-way push makes on its way: ``submit``,
``sa_get``, ``transition`` queued -> sending with an event, ``transition`` sending ->
succeeded with its result and event, ``mark_delivered``. ``C`` operations run concurrently
(each awaiting its own calls in order), as the RS gate, the engine and the outbox do under
load. The baseline is the same store with ``max_batch=1``: one BEGIN ... COMMIT (one fsync
under ``synchronous=FULL``) per call, which is how the store worked before group commit.
Stores of both kinds alternate for ``--rounds`` rounds on fresh files in a temporary
directory under the current directory (the disk armsproxy would use, not tmpfs).

Printed per concurrency: calls/s, CPU per call (this process, both threads), COMMITs per
call, and the ratio group/baseline of calls/s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.internet import defer, task

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from armsproxy.store import NewOperation, SQLiteStore  # noqa: E402

CALLS_PER_OPERATION = 5
RESULT = {"modules": [{"id": 1, "version": "1.0.0", "name": "bench-module"}]}


async def one_operation(store: SQLiteStore, sa: str, request_id: str) -> None:
    op, _ = await store.submit(NewOperation(distribution_id=sa, operation="read-module-list",
                                            request_id=request_id))
    await store.sa_get(sa)
    await store.transition(op.operation_id, expect=["queued"], state="sending",
                           events=[{"kind": "operation.started", "distribution_id": sa}])
    await store.transition(op.operation_id, expect=["sending"], state="succeeded",
                           changes={"result": RESULT},
                           events=[{"kind": "operation.succeeded", "distribution_id": sa}])
    (event, *_) = await store.pending_events(1)
    await store.mark_delivered([event.seq])


async def run_once(directory: Path, max_batch: int, operations: int,
                   concurrency: int) -> tuple[float, float, float]:
    """(calls/s, CPU seconds per call, COMMITs per call)."""
    from twisted.internet import reactor

    store = SQLiteStore(Path(tempfile.mkdtemp(dir=directory)) / "bench.sqlite",
                        reactor=reactor, max_batch=max_batch)
    await store.open()
    try:
        per_slot = operations // concurrency

        async def slot(k: int) -> None:
            for i in range(per_slot):
                await one_operation(store, f"SA-{k}", f"{k}-{i}")

        assert store._worker is not None
        batches0, wall0, cpu0 = store._worker.batches, time.perf_counter(), time.process_time()
        await defer.gatherResults([defer.ensureDeferred(slot(k)) for k in range(concurrency)])
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        calls = per_slot * concurrency * (CALLS_PER_OPERATION + 1)  # +1: pending_events
        return calls / wall, cpu / calls, (store._worker.batches - batches0) / calls
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-store-", dir=Path.cwd()))
    try:
        print(f"store benchmark: {args.operations} operations x {CALLS_PER_OPERATION + 1} "
              f"store calls, SQLite WAL synchronous=FULL under {directory.parent}")
        for concurrency in args.concurrency:
            figures: dict[int, list[tuple[float, float, float]]] = {1: [], 100: []}
            for _ in range(args.rounds):
                for max_batch in (1, 100):
                    figures[max_batch].append(
                        await run_once(directory, max_batch, args.operations, concurrency))
            best = {k: max(v) for k, v in figures.items()}
            for max_batch, label in ((1, "a transaction per call"), (100, "group commit")):
                rate, cpu, commits = best[max_batch]
                print(f"  C={concurrency:<4d} {label:24s} {rate:8.0f} calls/s  "
                      f"CPU {cpu * 1e6:5.0f} us/call  {commits:.2f} COMMITs/call")
            print(f"  C={concurrency:<4d} ratio group/baseline: {best[100][0] / best[1][0]:.2f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-m", "--operations", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", default="1,20,100",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse(None)
    task.react(lambda reactor: defer.ensureDeferred(main(options)))
