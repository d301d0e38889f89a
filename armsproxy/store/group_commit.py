"""One thread, one SQLite connection, group commit.

Why: with one transaction per store call, every call paid a COMMIT (an fsync under
``synchronous=FULL``) and a thread round trip of its own, and under load the calls queued
behind each other's fsyncs. The worker takes every call that is waiting (up to
``max_batch``), runs them in call order inside one transaction, each under a SAVEPOINT so
that a failing call undoes only its own work, commits once, and then hands all the outcomes
back to the reactor in one ``callFromThread``. Under load (the last batch held more than one
call) a batch with a write first waits ``gather`` seconds for more calls to join it: a COMMIT
costs far more CPU than the calls it carries (bench/push.py). Durability is unchanged: no
caller hears of success before the COMMIT holding its work has returned, and if that COMMIT
fails every call of the batch fails with it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()


_SAVEPOINT = "armsproxy_call"


class BatchLost(Exception):
    """A call's work was committed with others, and that transaction did not survive."""


class StrayTransactionControl(RuntimeError):
    """A store call ended the shared transaction itself (a programming error)."""


@dataclass(slots=True, eq=False)
class _Call:
    name: str
    fn: Callable[[], Any]
    alone: bool  # outside any transaction: connecting, closing
    readonly: bool = False  # a batch of only these begins DEFERRED: no write lock taken
    deferred: Deferred[Any] = field(default_factory=Deferred)
    outcome: Any = None
    failed: bool = False

    def fail(self, failure: Failure) -> None:
        self.outcome, self.failed = failure, True


class GroupCommitWorker:
    """Runs ``fn()`` calls on its own thread against ``connection()``, batched per COMMIT."""

    def __init__(
        self,
        reactor: IReactorFromThreads,
        connection: Callable[[], sqlite3.Connection | None],
        *,
        name: str,
        max_batch: int = 100,
        gather: float = 0.0,
    ) -> None:
        """``gather``: seconds a batch with a write waits for more calls before it begins,
        when the last one held more than a single call (0: never)."""
        self._reactor = reactor
        self._gather = gather
        self._loaded = False
        self._connection = connection
        self._max_batch = max_batch
        self._queue: deque[_Call] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.batches = 0  # committed batches, for tests and benchmarks

    def start(self) -> None:
        self._thread.start()

    def call(self, name: str, fn: Callable[[], Any], *, alone: bool = False,
             readonly: bool = False) -> Deferred[Any]:
        call = _Call(name, fn, alone, readonly)
        with self._cond:
            if self._stopping:
                raise RuntimeError("store worker is stopping")
            self._queue.append(call)
            if len(self._queue) == 1:  # else the worker is not waiting: it has work queued
                self._cond.notify()
        return call.deferred

    def stop(self, last: Callable[[], Any]) -> Deferred[Any]:
        """Run ``last`` (closing the connection) after everything queued, then end the thread."""
        d = self.call("stop", last, alone=True)
        with self._cond:
            self._stopping = True
            self._cond.notify()

        def joined(result: object) -> object:
            self._thread.join(5.0)  # it has nothing left to do but return
            return result

        return d.addBoth(joined)

    # -- the worker thread ----------------------------------------------------------------

    def _take(self) -> list[_Call] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            gather = (self._loaded and not self._stopping and not self._queue[0].alone
                      and len(self._queue) < self._max_batch
                      and not all(call.readonly for call in self._queue))
        if gather:
            # Under load (the last batch held more than one call, so calls are arriving
            # while commits run): let more of them join this COMMIT. A COMMIT costs far more
            # CPU than the wait (WAL frames, checksums, the fsync's system time), and each
            # caller waits at most this long more. Alone (a call at a time), no wait at all.
            time.sleep(self._gather)
        with self._cond:
            if self._queue[0].alone:
                return [self._queue.popleft()]
            batch: list[_Call] = []
            while self._queue and not self._queue[0].alone and len(batch) < self._max_batch:
                batch.append(self._queue.popleft())
            self._loaded = self._gather > 0 and len(batch) > 1
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                if batch[0].alone:
                    self._run_alone(batch[0])
                else:
                    self._run_batch(batch)
            except BaseException:  # never lose a caller, whatever went wrong
                failure = Failure()
                _log.failure("store worker: batch of {n} calls failed", failure, n=len(batch))
                _fail_all([call for call in batch if not call.failed], failure)
            self._reactor.callFromThread(_deliver, batch)

    @staticmethod
    def _run_alone(call: _Call) -> None:
        try:
            call.outcome = call.fn()
        except BaseException:
            call.fail(Failure())

    def _run_batch(self, batch: list[_Call]) -> None:
        conn = self._connection()
        if conn is None:
            from armsproxy.store.model import StoreError

            _fail_all(batch, Failure(StoreError("store is closed")))
            return
        if conn.in_transaction:
            # Left open by a ROLLBACK that failed last time: never let this batch's COMMIT
            # carry work whose callers were told it failed.
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                failure = Failure()
                _log.failure("store: cannot roll back a failed transaction", failure)
                _fail_all(batch, failure)
                return
        held: list[_Call] = []  # succeeded, their work in the open transaction
        for index, call in enumerate(batch):
            if not conn.in_transaction:
                mode = "DEFERRED" if all(c.readonly for c in batch[index:]) else "IMMEDIATE"
                try:
                    conn.execute(f"BEGIN {mode}")
                except sqlite3.Error:
                    # Locked past busy_timeout (another process writing) or worse: the rest
                    # of the batch fails now instead of waiting out the timeout once each.
                    failure = Failure()
                    _log.failure("store: cannot begin a transaction", failure)
                    _fail_all(batch[index:], failure)
                    break
            # A read changes nothing, so it needs no savepoint to undo (two statements fewer
            # per read: push.list polls, the outbox's reads).
            savepoint = not call.readonly
            try:
                if savepoint:
                    conn.execute(f"SAVEPOINT {_SAVEPOINT}")
                call.outcome = call.fn()
                if not conn.in_transaction:
                    raise StrayTransactionControl(
                        f"store call {call.name} ended the shared transaction itself"
                    )
                if savepoint:
                    conn.execute(f"RELEASE {_SAVEPOINT}")
            except BaseException:
                call.fail(Failure())
                if not (self._undo_one(conn) if savepoint else conn.in_transaction):
                    _fail_all(held, Failure(BatchLost(
                        f"the transaction was rolled back when {call.name} failed"
                    )))
                    held.clear()
                continue
            held.append(call)
        if not conn.in_transaction:
            return
        try:
            conn.execute("COMMIT")
        except BaseException:
            failure = Failure()
            _log.failure("store: COMMIT of {n} calls failed", failure, n=len(held))
            _fail_all(held, failure)
            if conn.in_transaction:
                conn.execute("ROLLBACK")  # if this fails too, the next batch tries again
            return
        self.batches += 1

    @staticmethod
    def _undo_one(conn: sqlite3.Connection) -> bool:
        """Roll back to the failed call's savepoint; False if the whole transaction is gone."""
        if not conn.in_transaction:
            return False  # SQLite rolled it back itself (e.g. SQLITE_FULL, SQLITE_IOERR)
        try:
            conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
            conn.execute(f"RELEASE {_SAVEPOINT}")
            return True
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")  # if this fails too, the next batch tries again
            return False


def _fail_all(calls: list[_Call], failure: Failure) -> None:
    for call in calls:
        call.fail(failure)


def _deliver(batch: list[_Call]) -> None:
    for call in batch:
        try:
            if call.failed:
                call.deferred.errback(call.outcome)
            else:
                call.deferred.callback(call.outcome)
        except Exception:  # one bad Deferred must not leave its neighbours unanswered
            _log.failure("store: handing back the result of {name} failed", name=call.name)
