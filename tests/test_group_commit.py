"""Group commit: calls that queue share a COMMIT; one failing call loses nobody else's work."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from armsproxy.store.group_commit import BatchLost, GroupCommitWorker, StrayTransactionControl


class Rig:
    """A worker on a real SQLite file, WAL and synchronous=FULL like the store."""

    def __init__(self, path: Path, max_batch: int = 100, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.conn: sqlite3.Connection | None = None
        self.worker = GroupCommitWorker(reactor, lambda: self.conn, name="test-group-commit",
                                        max_batch=max_batch)
        self.worker.start()

    def connect(self) -> None:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                               timeout=self.busy_timeout)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS t (v TEXT, parent INTEGER REFERENCES parent(id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        self.conn = conn

    def insert(self, value: str, parent: int | None = None) -> Callable[[], str]:
        def fn() -> str:
            assert self.conn is not None
            self.conn.execute("INSERT INTO t (v, parent) VALUES (?, ?)", (value, parent))
            return value

        return fn

    def committed(self) -> list[str]:
        """What another connection sees: only committed rows."""
        with closing(sqlite3.connect(str(self.path))) as other:
            return [v for (v,) in other.execute("SELECT v FROM t ORDER BY rowid")]

    def close(self) -> defer.Deferred[Any]:
        def last() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        return self.worker.stop(last)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "gc.sqlite")


async def settle(ds: list[defer.Deferred[Any]]) -> list[tuple[bool, Any]]:
    return await defer.DeferredList(ds, consumeErrors=True)


def hold_worker(worker: GroupCommitWorker, *,
                alone: bool = False) -> tuple[threading.Event, defer.Deferred[Any]]:
    """A call that holds the worker until the test has queued what it wants batched
    (``alone``: outside any transaction, so it holds no lock on the database)."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        assert release.wait(10)

    held = worker.call("hold", hold, alone=alone)
    assert started.wait(10)  # blocks the reactor for a moment: the worker is now busy
    return release, held


async def run_batched(rig: Rig, calls: list[tuple[str, Callable[[], Any]]]
                      ) -> list[tuple[bool, Any]]:
    """Queue ``calls`` behind a held worker, so that it takes them together; settle them."""
    release, held = hold_worker(rig.worker)
    queued = [rig.worker.call(name, fn) for name, fn in calls]
    release.set()
    await held
    return await settle(queued)


@pytest_twisted.ensureDeferred
async def test_calls_queued_behind_a_commit_share_the_next_one(rig: Rig) -> None:
    await rig.worker.call("connect", rig.connect, alone=True)
    results = await run_batched(rig, [(f"insert {i}", rig.insert(f"v{i}")) for i in range(20)])
    assert results == [(True, f"v{i}") for i in range(20)]
    assert rig.worker.batches == 2  # the held call alone, then the twenty together
    assert rig.committed() == [f"v{i}" for i in range(20)]
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_max_batch_bounds_the_calls_per_commit(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "bounded.sqlite", max_batch=3)
    await rig.worker.call("connect", rig.connect, alone=True)
    results = await run_batched(rig, [(f"insert {i}", rig.insert(f"v{i}")) for i in range(7)])
    assert [r for _, r in results] == [f"v{i}" for i in range(7)]
    assert rig.worker.batches == 1 + 3  # the held call, then 3 + 3 + 1
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_failing_call_undoes_only_its_own_work(rig: Rig) -> None:
    await rig.worker.call("connect", rig.connect, alone=True)

    def half_then_fail() -> None:
        assert rig.conn is not None
        rig.conn.execute("INSERT INTO t (v) VALUES ('half')")
        raise ValueError("bad order")

    (ok_a, a), (ok_bad, bad), (ok_b, b) = await run_batched(
        rig, [("a", rig.insert("a")), ("bad", half_then_fail), ("b", rig.insert("b"))])
    assert (ok_a, a, ok_b, b) == (True, "a", True, "b")
    assert not ok_bad and bad.check(ValueError)
    assert rig.committed() == ["a", "b"]  # 'half' rolled back, neighbours kept
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_fails_every_call_of_the_batch(rig: Rig) -> None:
    """A deferred foreign key is checked at COMMIT: nobody in the batch may hear success."""
    await rig.worker.call("connect", rig.connect, alone=True)
    results = await run_batched(rig, [
        ("a", rig.insert("a")),
        ("orphan", rig.insert("orphan", parent=42)),  # no parent 42
        ("b", rig.insert("b")),
    ])
    assert [ok for ok, _ in results] == [False, False, False]
    assert all(f.check(sqlite3.IntegrityError) for _, f in results)
    assert rig.committed() == []
    # The worker goes on: the next call commits on its own.
    assert await rig.worker.call("c", rig.insert("c")) == "c"
    assert rig.committed() == ["c"]
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_call_that_ends_the_transaction_loses_nobody_silently(rig: Rig) -> None:
    """Work committed with others is reported lost if the shared transaction is gone."""
    await rig.worker.call("connect", rig.connect, alone=True)

    def rollback_everything() -> None:
        assert rig.conn is not None
        rig.conn.execute("ROLLBACK")
        raise RuntimeError("misbehaving call")

    (ok_a, a), (ok_r, r), (ok_b, b) = await run_batched(
        rig, [("a", rig.insert("a")), ("rollback", rollback_everything), ("b", rig.insert("b"))])
    assert not ok_a and a.check(BatchLost)
    assert not ok_r and r.check(RuntimeError)
    assert (ok_b, b) == (True, "b")  # ran in a fresh transaction after the loss
    assert rig.committed() == ["b"]
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_locked_database_fails_the_batch_once_not_once_per_call(tmp_path: Path) -> None:
    """Another process holds the write lock past busy_timeout: the queued calls fail together
    after one timeout, and the worker goes on once the lock is gone."""
    rig = Rig(tmp_path / "locked.sqlite", busy_timeout=1.0)
    await rig.worker.call("connect", rig.connect, alone=True)
    release, held = hold_worker(rig.worker, alone=True)
    other = sqlite3.connect(str(rig.path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        calls = [rig.worker.call(f"insert {i}", rig.insert(f"v{i}")) for i in range(5)]
        started = time.monotonic()
        release.set()
        await held
        results = await settle(calls)
        waited = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all(not ok and f.check(sqlite3.OperationalError) for ok, f in results)
    assert 0.9 < waited < 3.0, waited  # one busy timeout for the batch, not five
    assert await rig.worker.call("after", rig.insert("after")) == "after"
    assert rig.committed() == ["after"]
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_stop_runs_after_everything_queued_and_ends_the_thread(rig: Rig) -> None:
    await rig.worker.call("connect", rig.connect, alone=True)
    calls = [rig.worker.call(f"insert {i}", rig.insert(f"v{i}")) for i in range(5)]
    await rig.close()
    assert [r for _, r in await settle(calls)] == [f"v{i}" for i in range(5)]
    assert rig.conn is None
    assert not [t for t in threading.enumerate() if t.name == "test-group-commit"]
    with pytest.raises(RuntimeError, match="stopping"):
        rig.worker.call("late", rig.insert("late"))
    assert rig.committed() == [f"v{i}" for i in range(5)]


@pytest_twisted.ensureDeferred
async def test_a_call_that_commits_by_itself_is_refused_with_a_clear_error(rig: Rig) -> None:
    await rig.worker.call("connect", rig.connect, alone=True)

    def stray_commit() -> None:
        assert rig.conn is not None
        rig.conn.execute("COMMIT")

    with pytest.raises(StrayTransactionControl, match="ended the shared transaction"):
        await rig.worker.call("stray", stray_commit)
    assert await rig.worker.call("next", rig.insert("next")) == "next"
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_transaction_left_open_is_rolled_back_not_committed_by_the_next_batch(
    rig: Rig,
) -> None:
    """Whatever left a transaction open (a failed ROLLBACK), its work must not ride along
    with the next batch's COMMIT: its callers were told it failed."""
    await rig.worker.call("connect", rig.connect, alone=True)

    def leave_open() -> None:
        assert rig.conn is not None
        rig.conn.execute("BEGIN")
        rig.conn.execute("INSERT INTO t (v) VALUES ('orphaned')")

    await rig.worker.call("leave open", leave_open, alone=True)
    assert await rig.worker.call("next", rig.insert("next")) == "next"
    assert rig.committed() == ["next"]
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_reads_alone_take_no_write_lock(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "reads.sqlite", busy_timeout=5.0)
    await rig.worker.call("connect", rig.connect, alone=True)
    await rig.worker.call("seed", rig.insert("seed"))

    def read() -> list[str]:
        assert rig.conn is not None
        return [v for (v,) in rig.conn.execute("SELECT v FROM t")]

    other = sqlite3.connect(str(rig.path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        started = time.monotonic()
        assert await rig.worker.call("read", read, readonly=True) == ["seed"]
        assert time.monotonic() - started < 1.0  # did not wait for the writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_one_bad_deferred_does_not_leave_its_neighbours_unanswered(rig: Rig) -> None:
    await rig.worker.call("connect", rig.connect, alone=True)
    release, held = hold_worker(rig.worker)
    early = rig.worker.call("a", rig.insert("a"))
    neighbour = rig.worker.call("b", rig.insert("b"))
    early.callback("fired by someone else")  # the worker's delivery to it now fails
    release.set()
    await held
    assert await neighbour == "b"
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_a_failing_read_in_a_batch_costs_nobody_else_their_work(rig: Rig) -> None:
    # Reads run without a savepoint (they change nothing): one that fails leaves the writes
    # before and after it in the batch's COMMIT.
    await rig.worker.call("connect", rig.connect, alone=True)
    release, held = hold_worker(rig.worker)

    def bad_read() -> None:
        assert rig.conn is not None
        rig.conn.execute("SELECT * FROM no_such_table")

    before = rig.worker.call("a", rig.insert("a"))
    failing = rig.worker.call("read", bad_read, readonly=True)
    after = rig.worker.call("b", rig.insert("b"))
    release.set()
    await held
    results = await settle([before, failing, after])
    assert results[0] == (True, "a") and results[2] == (True, "b")
    assert not results[1][0] and results[1][1].check(sqlite3.OperationalError)
    assert rig.committed() == ["a", "b"]
    await rig.close()


@pytest_twisted.ensureDeferred
async def test_under_load_a_batch_gathers_calls_and_a_lone_call_does_not_wait(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path / "gather.sqlite")
    rig.worker = GroupCommitWorker(reactor, lambda: rig.conn, name="test-gather", gather=1.0)
    rig.worker.start()
    await rig.worker.call("connect", rig.connect, alone=True)
    # One call at a time: never loaded, so no call waits for company.
    started = time.monotonic()
    for i in range(3):
        assert await rig.worker.call(f"alone {i}", rig.insert(f"alone{i}")) == f"alone{i}"
    assert time.monotonic() - started < 1.0
    # A batch of several (load): the next batch with a write waits `gather` for more calls,
    # and those that arrive meanwhile share its COMMIT.
    await run_batched(rig, [("x", rig.insert("x")), ("y", rig.insert("y"))])
    batches = rig.worker.batches
    first = rig.worker.call("first", rig.insert("first"))
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.1, d.callback, None)
    await d  # the worker is gathering
    second = rig.worker.call("second", rig.insert("second"))
    assert await settle([first, second]) == [(True, "first"), (True, "second")]
    assert rig.worker.batches == batches + 1  # one COMMIT for both
    await rig.close()
