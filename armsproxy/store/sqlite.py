"""The embedded default store: one SQLite file, one dedicated thread, one connection.

Why one thread: SQLite has a single writer, so more threads would only queue on its lock;
serialising every call through one worker removes write contention, keeps statement order
equal to call order, and keeps the reactor thread free of disk I/O. WAL with
``synchronous=FULL`` makes every COMMIT durable before the call returns, which is what lets the
RS gate say "accepted" and the SA gate answer a done-request with 100; calls that queue up
while a COMMIT runs share the next one (:mod:`armsproxy.store.group_commit`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger

from armsproxy.store.group_commit import GroupCommitWorker
from armsproxy.store.migrations import FINAL_SQL, migrate
from armsproxy.store.model import (
    FINAL,
    MUTABLE_FIELDS,
    OPERATION_COLUMNS,
    QUEUED,
    SA_FIELDS,
    SENDING,
    STARTED,
    STATES,
    Event,
    NewOperation,
    Operation,
    OrphanDone,
    RawEntries,
    SARecord,
    StoreError,
    check_fields,
    dump_json,
    load_json,
    new_operation_id,
    op_value,
)

T = TypeVar("T")

_log = Logger()

_OP_COLUMNS = OPERATION_COLUMNS
# Hot queries name their index (INDEXED BY): without ANALYZE statistics SQLite's planner
# prefers an index that saves a sort over one that reads only what is due, and a named index
# that stops matching the query is an error at once, not a silent full scan at 1M rows.
_OP_RETURNING = "seq, " + ", ".join(_OP_COLUMNS)  # what _row_to_op reads, after RETURNING too
_OP_SELECT = f"SELECT {_OP_RETURNING} FROM operations"
_DEADLINE_PAGE = 500  # past_deadline's default page
_SA_COLUMNS = ("distribution_id", *sorted(SA_FIELDS))
_CHUNK = 500  # bound on bound parameters per statement


def _chunks(seq: Sequence[T]) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), _CHUNK):
        yield seq[i : i + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


# Positions in a row of _OP_RETURNING (seq first). Operation's fields are _OP_COLUMNS in
# order with ``raw`` just before ``forgotten``: rows become operations positionally.
_PARAMS_AT = 1 + _OP_COLUMNS.index("params")
_RESULT_AT = 1 + _OP_COLUMNS.index("result")
_FORGOTTEN_AT = 1 + _OP_COLUMNS.index("forgotten")
assert [f.name for f in fields(Operation)] == [
    *_OP_COLUMNS[:_FORGOTTEN_AT - 1], "raw", *_OP_COLUMNS[_FORGOTTEN_AT - 1:]]


def _row_to_op(row: sqlite3.Row, raw: Sequence[str]) -> Operation:
    """``row``: seq, then _OP_COLUMNS in order (_OP_RETURNING), read by position."""
    values = list(row)
    if len(values) != len(_OP_COLUMNS) + 1:
        raise StoreError(f"operation row of {len(values)} columns")
    values[_PARAMS_AT] = load_json(values[_PARAMS_AT])
    values[_RESULT_AT] = load_json(values[_RESULT_AT])
    values[_FORGOTTEN_AT] = bool(values[_FORGOTTEN_AT])
    return Operation(*values[1:_FORGOTTEN_AT], RawEntries(raw),  # type: ignore[arg-type]
                     *values[_FORGOTTEN_AT:])


def _load_ops(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[Operation]:
    """Operations of ``rows`` (their ``seq`` first) with their raw entries, still as JSON."""
    raws: dict[int, list[str]] = {row["seq"]: [] for row in rows}
    for part in _chunks(list(raws)):
        cur = conn.execute(
            f"SELECT op_seq, entry FROM operation_raw WHERE op_seq IN ({_marks(len(part))})"
            " ORDER BY id",
            part,
        )
        for op_seq, entry in cur:
            raws[op_seq].append(entry)
    return [_row_to_op(row, raws[row["seq"]]) for row in rows]


def _get_op(conn: sqlite3.Connection, where: str, args: Sequence[Any]) -> Operation | None:
    row = conn.execute(f"{_OP_SELECT} WHERE {where}", args).fetchone()
    return None if row is None else _load_ops(conn, [row])[0]


def _event_row(event: dict[str, Any], operation_id: str | None, now: float) -> tuple[Any, ...]:
    try:
        kind = event["kind"]
        distribution_id = event["distribution_id"]
    except KeyError as e:
        raise ValueError(f"event without {e.args[0]}: {event!r}")
    payload = event.get("payload", {})
    return (
        kind,
        event.get("operation_id", operation_id),
        distribution_id,
        dump_json(payload),  # may raise: the caller's transaction then rolls back
        event.get("created_at", now),
    )


def _insert_events(
    conn: sqlite3.Connection, events: Sequence[dict[str, Any]], operation_id: str | None, now: float
) -> None:
    for event in events:
        conn.execute(
            "INSERT INTO outbox (kind, operation_id, distribution_id, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            _event_row(event, operation_id, now),
        )


def _row_to_sa(row: sqlite3.Row) -> SARecord:
    values = {name: row[name] for name in _SA_COLUMNS}
    values["confirmed"] = bool(values["confirmed"])
    values["tunnels"] = load_json(values["tunnels"]) or []
    return SARecord(**values)


class SQLiteStore:
    """:class:`~armsproxy.store.interface.Store` on a local SQLite file.

    One process uses it: instances are recorded (schema 6 is the same on both backends) but
    every other instance is dead to this one, leadership is always its own and nobody
    listens to announcements."""

    shared = False

    def __init__(
        self,
        path: Path,
        *,
        reactor: IReactorCore | None = None,
        clock: IReactorTime | None = None,
        busy_timeout: float = 10.0,
        close_on_shutdown: bool = True,
        max_batch: int = 100,
        gather: float = 0.002,
    ) -> None:
        """``close_on_shutdown=False`` when a service closes the store itself, after the
        services that use it have stopped (a reactor trigger would close it under them).
        ``max_batch``: most calls per COMMIT (1: a transaction per call, bench/store.py's
        baseline). ``gather``: under load (the last batch held more than one call), seconds
        a batch waits for more calls to share its COMMIT (0: never); a lone call never
        waits."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        self.path = Path(path)
        self._reactor = reactor
        # Timestamps come from the injected clock, read on the reactor thread (Clock-friendly);
        # threads need the real reactor.
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._busy_timeout = busy_timeout
        self._max_batch = max_batch
        self._gather = gather
        self._close_on_shutdown = close_on_shutdown
        self._worker: GroupCommitWorker | None = None
        # While open() runs: callers that arrived early (twistd binds the gates' ports before
        # the store is open), woken when it is.
        self._waiting: list[defer.Deferred[None]] | None = None
        self._conn: sqlite3.Connection | None = None
        self._shutdown_trigger: Any = None
        # Test hook: called in the DB thread with the method name before each piece of work.
        self.db_hook: Callable[[str], None] | None = None

    # -- plumbing -------------------------------------------------------------------------

    async def _until_opened(self) -> None:
        """Wait out an open() in progress (it may fail: callers check the store after)."""
        if self._waiting is not None:
            opened: defer.Deferred[None] = defer.Deferred()
            self._waiting.append(opened)
            await opened

    async def _run(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        if self._worker is None:
            await self._until_opened()
        if self._worker is None or self._conn is None:
            raise StoreError("store is not open")
        return await self._worker.call(name, lambda: self._in_thread(name, fn, *args),
                                       readonly=fn in _READS)

    def _in_thread(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        if self.db_hook is not None:
            self.db_hook(name)
        conn = self._conn
        if conn is None:
            raise StoreError("store is closed")
        return fn(conn, *args)

    def _connect(self) -> sqlite3.Connection:
        self.path.touch(mode=0o600)  # a new store is its owner's only; -wal/-shm follow its mode
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=self._busy_timeout)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000):d}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._worker is not None or self._waiting is not None:
            return
        self._waiting = []
        try:
            await self._open()
        finally:
            waiting, self._waiting = self._waiting, None
            for opened in waiting:
                opened.callback(None)

    async def _open(self) -> None:
        worker = GroupCommitWorker(
            self._reactor, lambda: self._conn, name="armsproxy-store",  # type: ignore[arg-type]
            max_batch=self._max_batch, gather=self._gather,
        )
        worker.start()
        try:
            conn = await worker.call("open", self._connect, alone=True)
        except BaseException:
            await worker.stop(lambda: None)
            raise
        self._worker, self._conn = worker, conn
        if self._close_on_shutdown:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", lambda: defer.ensureDeferred(self.close())
            )
        _log.info("store open: {path}", path=str(self.path))

    async def close(self) -> None:
        await self._until_opened()  # close what a running open() opens
        worker = self._worker
        if worker is None:
            return
        self._worker = None  # a second close() while this one runs is a no-op
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        try:
            # Runs after everything already queued: the worker is one FIFO thread.
            await worker.stop(self._close_conn)
        finally:
            if trigger is not None:
                try:
                    self._reactor.removeSystemEventTrigger(trigger)
                except (ValueError, KeyError):  # already fired
                    pass

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _now(self) -> float:
        return float(self._clock.seconds())

    # -- operations -----------------------------------------------------------------------

    async def submit(self, new: NewOperation) -> tuple[Operation, bool]:
        now = self._now() if new.created_at is None else new.created_at
        return await self._run("submit", _submit, new, new_operation_id(), now)

    async def get(self, operation_id: str) -> Operation | None:
        return await self._run("get", _read_one, "operation_id = ?", (operation_id,))

    async def list_operations(
        self,
        *,
        distribution_id: str | None = None,
        states: Collection[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Operation]:
        sql, args = _list_sql(distribution_id, states, since, until)
        if not sql:
            return []
        args += [int(limit), int(offset)]
        return await self._run("list_operations", _read_many, sql, args)

    async def transition(
        self,
        operation_id: str,
        *,
        expect: Collection[str],
        state: str,
        changes: dict[str, Any] | None = None,
        events: Sequence[dict[str, Any]] = (),
        raw: dict[str, Any] | None = None,
    ) -> Operation | None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        changes = dict(changes or {})
        check_fields(changes, MUTABLE_FIELDS, "operation")
        return await self._run(
            "transition",
            _transition,
            operation_id,
            list(expect),
            state,
            changes,
            list(events),
            raw,
            self._now(),
        )

    async def update(self, operation_id: str, changes: dict[str, Any]) -> Operation | None:
        changes = dict(changes)
        check_fields(changes, MUTABLE_FIELDS, "operation")
        return await self._run(
            "update", _transition, operation_id, None, None, changes, [], None, self._now()
        )

    async def next_dispatchable(self, now: float, limit: int) -> list[Operation]:
        return await self._run("next_dispatchable", _next_dispatchable, now, int(limit))

    async def claim_dispatchable(self, now: float, limit: int, *,
                                 busy: Collection[str] = (),
                                 instance_id: str | None = None) -> list[Operation]:
        if limit <= 0:
            return []
        return await self._run("claim_dispatchable", _claim_dispatchable, now, int(limit),
                               sorted(busy), instance_id)

    async def take_over(self, instance_id: str | None, now: float) -> list[Operation]:
        if instance_id is None:
            return await self.in_states({SENDING})
        return await self._run("take_over", _take_over, instance_id)

    async def in_states(self, states: Collection[str]) -> list[Operation]:
        states = list(states)
        sql = f"{_OP_SELECT} WHERE state IN ({_marks(len(states))}) ORDER BY seq"
        return await self._run("in_states", _read_many, sql, states)

    async def past_deadline(self, now: float, limit: int = _DEADLINE_PAGE) -> list[Operation]:
        return await self._run("past_deadline", _past_deadline, now, int(limit))

    async def waiting(self) -> list[Operation]:
        # operations_waiting holds only these: a few per SA, however long the queues.
        sql = (f"{_OP_SELECT} INDEXED BY operations_waiting"
               f" WHERE state = '{QUEUED}' AND waiting_for IS NOT NULL ORDER BY seq")
        return await self._run("waiting", _read_many, sql, [])

    async def release_waiting(self, distribution_id: str, now: float) -> int:
        return await self._run("release_waiting", _release_waiting, distribution_id, now)

    async def find_by_sa_transaction(
        self, distribution_id: str, sa_transaction_id: int
    ) -> Operation | None:
        return await self._run(
            "find_by_sa_transaction",
            _read_one,
            "distribution_id = ? AND sa_transaction_id = ? ORDER BY seq DESC LIMIT 1",
            (distribution_id, int(sa_transaction_id)),
        )

    async def forget(self, operation_id: str) -> bool:
        return await self._run("forget", _forget, operation_id)

    async def purge_results(self, older_than: float) -> int:
        return await self._run("purge_results", _purge_results, older_than)

    # -- SA registry ----------------------------------------------------------------------

    async def sa_get(self, distribution_id: str) -> SARecord | None:
        return await self._run("sa_get", _sa_get, distribution_id)

    async def sa_update(self, distribution_id: str, *, events: Sequence[dict[str, Any]] = (),
                        release_tunnel: str | None = None, **fields: Any) -> SARecord:
        check_fields(fields, SA_FIELDS, "SA registry")
        now = self._now()
        fields.setdefault("updated_at", now)
        return await self._run("sa_update", _sa_update, distribution_id, fields, list(events),
                               now, release_tunnel)

    async def sa_list(
        self, *, limit: int = 100, offset: int = 0, confirmed: bool | None = None
    ) -> list[SARecord]:
        return await self._run("sa_list", _sa_list, int(limit), int(offset), confirmed)

    # -- event outbox ---------------------------------------------------------------------

    async def add_events(self, events: Sequence[dict[str, Any]]) -> None:
        await self._run("add_events", _add_events, list(events), self._now())

    async def pending_events(self, limit: int) -> list[Event]:
        return await self._run("pending_events", _pending_events, int(limit))

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        await self._run("mark_delivered", _mark_delivered, [int(s) for s in seqs])

    async def note_event_attempt(self, seq: int) -> None:
        await self._run("note_event_attempt", _note_event_attempt, int(seq))

    async def backlog(self) -> dict[str, int]:
        return await self._run("backlog", _backlog)

    # -- instances (one process: see the class doc) ---------------------------------------

    async def register_instance(self, instance_id: str, *, host: str, pid: int, now: float,
                                lease_until: float) -> bool:
        return await self._run("register_instance", _register_instance,
                               (instance_id, host, int(pid), now, lease_until))

    async def retire_instance(self, instance_id: str) -> None:
        await self._run("retire_instance", _retire_instance, instance_id)

    async def lead(self, instance_id: str | None = None) -> bool:
        return True

    async def resign(self) -> None:
        return None

    async def announce(self, topic: str) -> None:
        return None

    async def listen(self, callback: Callable[[str], None]) -> None:
        return None

    # -- orphan done-requests -------------------------------------------------------------

    async def add_orphan_done(
        self,
        distribution_id: str,
        sa_transaction_id: int,
        type: str,
        xml: str,
        received_at: float,
        *,
        size: int | None = None,
        keep: int | None = None,
        drop_before: float | None = None,
    ) -> tuple[int, int]:
        if keep is not None and keep < 1:
            raise ValueError("keep must be at least 1 (the new orphan itself)")
        row = (distribution_id, int(sa_transaction_id), type, xml, received_at,
               len(xml) if size is None else int(size))
        return await self._run("add_orphan_done", _add_orphan_done, row, keep, drop_before)

    async def take_orphan_dones(
        self, distribution_id: str, sa_transaction_id: int
    ) -> list[OrphanDone]:
        return await self._run(
            "take_orphan_dones", _take_orphan_dones, distribution_id, int(sa_transaction_id)
        )

    async def purge_orphan_dones(self, older_than: float) -> int:
        """Drop orphans received before ``older_than`` (their operation never showed up)."""
        return await self._run("purge_orphan_dones", _purge_orphan_dones, older_than)


# -- work done in the DB thread (each function gets the connection first) --------------------
# Each runs inside the worker's batch transaction under a SAVEPOINT of its own, which the
# worker rolls back if the function raises. None may BEGIN, COMMIT or ROLLBACK: the worker
# fails a call that ends the shared transaction.


def _read_one(conn: sqlite3.Connection, where: str, args: Sequence[Any]) -> Operation | None:
    return _get_op(conn, where, args)


def _read_many(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Operation]:
    return _load_ops(conn, conn.execute(sql, args).fetchall())


def _submit(
    conn: sqlite3.Connection, new: NewOperation, operation_id: str, now: float
) -> tuple[Operation, bool]:
    params = dump_json(new.params)
    # The UNIQUE constraint decides, not a prior SELECT: safe against any concurrency.
    # RETURNING gives the stored row in the same statement (nothing when it was a repeat).
    rows = conn.execute(
        "INSERT INTO operations (operation_id, request_id, distribution_id, operation,"
        " params, sa_url, method, state, attempts, created_at, updated_at, not_before,"
        " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)"
        f" ON CONFLICT (request_id) DO NOTHING RETURNING {_OP_RETURNING}",
        (
            operation_id,
            new.request_id,
            new.distribution_id,
            new.operation,
            params,
            new.sa_url,
            new.method,
            QUEUED,
            now,
            now,
            now,
            new.expires_at,
        ),
    ).fetchall()  # a RETURNING statement must run to completion before COMMIT
    if rows:
        return _row_to_op(rows[0], ()), True  # new: no raw entries yet
    op = _get_op(conn, "request_id = ?", (new.request_id,))
    if op is None:  # pragma: no cover - the constraint found it
        raise StoreError("submitted operation vanished")
    return op, False


def _transition(
    conn: sqlite3.Connection,
    operation_id: str,
    expect: list[str] | None,
    state: str | None,
    changes: dict[str, Any],
    events: list[dict[str, Any]],
    raw: dict[str, Any] | None,
    now: float,
) -> Operation | None:
    """CAS state change (``expect``/``state`` None: plain update) with raw and events."""
    changes.setdefault("updated_at", now)
    if state is not None and state != QUEUED:
        changes.setdefault("waiting_for", None)  # only a queued order waits for its SA
    sets = [f"{name} = ?" for name in changes]
    args: list[Any] = [op_value(name, value) for name, value in changes.items()]
    if state is not None:
        sets.append("state = ?")
        args.append(state)
    sql = f"UPDATE operations SET {', '.join(sets)} WHERE operation_id = ?"
    args.append(operation_id)
    if expect is not None:
        sql += f" AND state IN ({_marks(len(expect))})"
        args.extend(expect)
    # The row as changed comes back with the change (one statement, no re-read); fetchall:
    # a RETURNING statement must run to completion before COMMIT.
    rows = conn.execute(f"{sql} RETURNING {_OP_RETURNING}", args).fetchall()
    if not rows:
        return None
    row = rows[0]
    if raw is not None:
        conn.execute(
            "INSERT INTO operation_raw (op_seq, entry) VALUES (?, ?)", (row[0], dump_json(raw))
        )
    _insert_events(conn, events, operation_id, now)
    # The raw entries as JSON (operation_raw_op: one index range), decoded only if used.
    entries = [r[0] for r in conn.execute(
        "SELECT entry FROM operation_raw WHERE op_seq = ? ORDER BY id", (row[0],))]
    return _row_to_op(row, entries)


def _list_sql(distribution_id: str | None, states: Collection[str] | None,
              since: float | None, until: float | None) -> tuple[str, list[Any]]:
    """list_operations' query, to which LIMIT and OFFSET are bound; "" if nothing matches.

    Every plan reads rows already in (created_at, seq) order and stops after the page: one
    index range, or with states one per state merged by SQLite (MERGE (UNION ALL)); never a
    sort of every matching row (with an SA and states: a sort of that SA's rows in them).
    """
    where: list[str] = []
    args: list[Any] = []
    if distribution_id is not None:
        where.append("distribution_id = ?")
        args.append(distribution_id)
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    if until is not None:
        where.append("created_at < ?")
        args.append(until)
    order = " ORDER BY created_at, seq LIMIT ? OFFSET ?"
    if states is None:
        index = "operations_created" if distribution_id is None else "operations_sa_created"
        sql = f"{_OP_SELECT} INDEXED BY {index}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return sql + order, args
    index = "operations_state_created" if distribution_id is None else "operations_state_sa"
    arms: list[str] = []
    arm_args: list[Any] = []
    for state in sorted(set(states)):
        arms.append(f"{_OP_SELECT} INDEXED BY {index} WHERE "
                    + " AND ".join(["state = ?", *where]))
        arm_args += [state, *args]
    return (" UNION ALL ".join(arms) + order if arms else ""), arm_args


def _past_deadline(conn: sqlite3.Connection, now: float, limit: int) -> list[Operation]:
    """At most ``limit`` due operations, earliest deadlines first, returned in submit order;
    each half reads a partial index of only what has a deadline, from the earliest."""
    due = []
    for state, column, index in ((QUEUED, "expires_at", "operations_queued_expires"),
                                 (STARTED, "done_deadline", "operations_started_done")):
        due += [(row[column], row) for row in conn.execute(
            f"{_OP_SELECT} INDEXED BY {index} WHERE state = '{state}' AND {column} <= ?"
            f" ORDER BY {column} LIMIT ?", (now, limit))]
    due.sort(key=lambda pair: (pair[0], pair[1]["seq"]))
    rows = sorted((row for _, row in due[:limit]), key=lambda row: row["seq"])
    return _load_ops(conn, rows)


def _heads_sql(columns: str, busy: bool) -> str:
    """The dispatch pick: args ``now[, busy as a JSON array], limit``.

    The head of an SA's queue is its oldest queued operation (sa_queues, kept by triggers).
    An SA with anything `sending` is skipped whole (one send at a time, nothing overtakes),
    and so is one whose head waits for the SA (release_waiting lets it go) or is not due
    yet; `started` blocks nothing. sa_queues_ready holds only SAs neither busy nor waiting,
    by the head's not_before: the pick reads the `limit` due longest (plus the caller's busy
    ones it skips) and stops. ``busy`` is one bound JSON array, whatever its length.
    """
    skip = " AND q.distribution_id NOT IN (SELECT value FROM json_each(?))" if busy else ""
    return f"""
        SELECT {columns} FROM sa_queues AS q INDEXED BY sa_queues_ready
        CROSS JOIN operations AS op ON op.seq = q.head_seq
        WHERE q.head_seq IS NOT NULL AND q.waiting = 0 AND q.busy = 0 AND q.not_before <= ?
            AND op.state = '{QUEUED}'{skip}
        ORDER BY q.not_before, q.head_seq LIMIT ?"""


def _heads_args(now: float, limit: int, busy: Sequence[str]) -> list[Any]:
    return [now, json.dumps(list(busy)), limit] if busy else [now, limit]


def _next_dispatchable(conn: sqlite3.Connection, now: float, limit: int) -> list[Operation]:
    columns = ", ".join(f"op.{name}" for name in ("seq", *_OP_COLUMNS))
    rows = conn.execute(_heads_sql(columns, False), _heads_args(now, limit, ())).fetchall()
    return _load_ops(conn, rows)


def _claim_dispatchable(conn: sqlite3.Connection, now: float, limit: int,
                        busy: list[str], instance_id: str | None) -> list[Operation]:
    """The pick of _next_dispatchable, moved to `sending` in the same transaction: nobody
    else (another store, another process) can pick or cancel them in between."""
    seqs = [r[0] for r in conn.execute(_heads_sql("op.seq", bool(busy)),
                                       _heads_args(now, limit, busy))]
    rows: list[sqlite3.Row] = []
    for part in _chunks(seqs):
        rows += conn.execute(
            # NOT INDEXED: by rowid; the planner would take the state index (every queued row).
            f"UPDATE operations NOT INDEXED SET state = '{SENDING}', attempts = attempts + 1,"
            f" updated_at = ?, claimed_by = ? WHERE seq IN ({_marks(len(part))})"
            f" AND state = '{QUEUED}' RETURNING {_OP_RETURNING}",
            (now, instance_id, *part),
        ).fetchall()
    place = {seq: i for i, seq in enumerate(seqs)}
    rows.sort(key=lambda row: place[row[0]])  # RETURNING order is unspecified
    return _load_ops(conn, rows)


def _release_waiting(conn: sqlite3.Connection, distribution_id: str, now: float) -> int:
    # operations_state_sa: one index range, the SA's queue.
    return conn.execute(
        "UPDATE operations SET waiting_for = NULL, not_before = MIN(not_before, ?),"
        " updated_at = ? WHERE state = ? AND distribution_id = ?"
        " AND (waiting_for IS NOT NULL OR not_before > ?)",
        (now, now, QUEUED, distribution_id, now),
    ).rowcount


def _forget(conn: sqlite3.Connection, operation_id: str) -> bool:
    rows = conn.execute(
        "UPDATE operations SET forgotten = 1, result = NULL WHERE operation_id = ?"
        " RETURNING seq",
        (operation_id,),
    ).fetchall()
    if not rows:
        return False
    conn.execute("DELETE FROM operation_raw WHERE op_seq = ?", (rows[0][0],))
    return True


def _purge_results(conn: sqlite3.Connection, older_than: float) -> int:
    seqs = [
        r[0]
        for r in conn.execute(
            # operations_purge: the final rows not yet forgotten, oldest first.
            "UPDATE operations INDEXED BY operations_purge SET forgotten = 1, result = NULL"
            f" WHERE forgotten = 0 AND state IN ({FINAL_SQL}) AND updated_at < ?"
            " RETURNING seq",
            (older_than,),
        ).fetchall()
    ]
    for part in _chunks(seqs):
        conn.execute(f"DELETE FROM operation_raw WHERE op_seq IN ({_marks(len(part))})", part)
    return len(seqs)


def _sa_get(conn: sqlite3.Connection, distribution_id: str) -> SARecord | None:
    row = conn.execute(
        f"SELECT {', '.join(_SA_COLUMNS)} FROM sa_registry WHERE distribution_id = ?",
        (distribution_id,),
    ).fetchone()
    return None if row is None else _row_to_sa(row)


def _sa_update(conn: sqlite3.Connection, distribution_id: str, fields: dict[str, Any],
               events: list[dict[str, Any]], now: float,
               release_tunnel: str | None = None) -> SARecord:
    values = dict(fields)
    if "tunnels" in values:
        values["tunnels"] = dump_json(values["tunnels"] or [])
    if "confirmed" in values:
        values["confirmed"] = int(bool(values["confirmed"]))
    names = list(values)
    sets = [f"{n} = excluded.{n}" for n in names]
    args: list[Any] = [distribution_id, *values.values()]
    if release_tunnel is not None and "tunnel_owner" not in values:
        sets.append("tunnel_owner = CASE WHEN sa_registry.tunnel_owner = ? THEN NULL"
                    " ELSE sa_registry.tunnel_owner END")
        args.append(release_tunnel)
    rows = conn.execute(
        f"INSERT INTO sa_registry (distribution_id, {', '.join(names)})"
        f" VALUES (?, {_marks(len(names))})"
        " ON CONFLICT (distribution_id) DO UPDATE SET " + ", ".join(sets)
        + f" RETURNING {', '.join(_SA_COLUMNS)}",  # the record as stored, no re-read
        args,
    ).fetchall()
    _insert_events(conn, events, None, now)
    return _row_to_sa(rows[0])


def _sa_list(
    conn: sqlite3.Connection, limit: int, offset: int, confirmed: bool | None
) -> list[SARecord]:
    sql = f"SELECT {', '.join(_SA_COLUMNS)} FROM sa_registry"
    args: list[Any] = []
    if confirmed is not None:
        sql += " WHERE confirmed = ?"
        args.append(int(confirmed))
    sql += " ORDER BY distribution_id LIMIT ? OFFSET ?"
    return [_row_to_sa(r) for r in conn.execute(sql, [*args, limit, offset])]


def _take_over(conn: sqlite3.Connection, instance_id: str) -> list[Operation]:
    """One process: every other instance is dead, its tunnels released, its `sending`
    operations (and any claimed by none) now ``instance_id``'s."""
    conn.execute("DELETE FROM instances WHERE instance_id <> ?", (instance_id,))
    conn.execute("UPDATE sa_registry INDEXED BY sa_registry_tunnel_owner SET tunnel_owner = NULL"
                 " WHERE tunnel_owner IS NOT NULL AND tunnel_owner <> ?", (instance_id,))
    rows = conn.execute(
        f"UPDATE operations SET claimed_by = ? WHERE state = '{SENDING}'"
        f" AND claimed_by IS NOT ? RETURNING {_OP_RETURNING}",
        (instance_id, instance_id),
    ).fetchall()
    rows.sort(key=lambda row: row["seq"])  # RETURNING order is unspecified
    return _load_ops(conn, rows)


def _register_instance(conn: sqlite3.Connection, row: tuple[Any, ...]) -> bool:
    instance_id, host, pid, now, lease_until = row
    there = conn.execute("SELECT 1 FROM instances WHERE instance_id = ?",
                         (instance_id,)).fetchone() is not None
    conn.execute(
        "INSERT INTO instances (instance_id, host, pid, started_at, lease_until)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (instance_id) DO UPDATE SET"
        " lease_until = excluded.lease_until",
        (instance_id, host, pid, now, lease_until),
    )
    return there


def _retire_instance(conn: sqlite3.Connection, instance_id: str) -> None:
    conn.execute("DELETE FROM instances WHERE instance_id = ?", (instance_id,))
    conn.execute("UPDATE sa_registry SET tunnel_owner = NULL WHERE tunnel_owner = ?",
                 (instance_id,))


def _add_events(conn: sqlite3.Connection, events: list[dict[str, Any]], now: float) -> None:
    _insert_events(conn, events, None, now)


def _backlog(conn: sqlite3.Connection) -> dict[str, int]:
    active = sorted(STATES - FINAL)
    counts = dict.fromkeys(active, 0)
    # Kept by triggers as operations change (schema 5): a few rows, whatever the backlog.
    counts.update(conn.execute("SELECT state, n FROM queue_counts").fetchall())
    counts["events"] = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    return counts


def _pending_events(conn: sqlite3.Connection, limit: int) -> list[Event]:
    rows = conn.execute(
        "SELECT seq, kind, operation_id, distribution_id, payload, created_at, attempts"
        " FROM outbox ORDER BY seq LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        Event(
            seq=r["seq"],
            kind=r["kind"],
            operation_id=r["operation_id"],
            distribution_id=r["distribution_id"],
            payload=load_json(r["payload"]),
            created_at=r["created_at"],
            attempts=r["attempts"],
        )
        for r in rows
    ]


def _mark_delivered(conn: sqlite3.Connection, seqs: list[int]) -> None:
    # Delivered events are deleted: the RS has them, and the outbox stays small.
    for part in _chunks(seqs):
        conn.execute(f"DELETE FROM outbox WHERE seq IN ({_marks(len(part))})", part)


def _note_event_attempt(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = ?", (seq,))


def _add_orphan_done(conn: sqlite3.Connection, row: tuple[Any, ...], keep: int | None,
                     drop_before: float | None) -> tuple[int, int]:
    cur = conn.execute(
        "INSERT INTO orphan_dones (distribution_id, sa_transaction_id, type, xml,"
        " received_at, size) VALUES (?, ?, ?, ?, ?, ?)",
        row,
    )
    seq = cur.lastrowid
    assert seq is not None
    distribution_id = row[0]
    dropped = 0
    if drop_before is not None:
        dropped += conn.execute(
            "DELETE FROM orphan_dones WHERE distribution_id = ? AND received_at < ?"
            " AND seq != ?", (distribution_id, drop_before, seq)).rowcount
    if keep is not None:
        # orphan_dones_sa: the SA's rows newest first; the bound keeps them few.
        dropped += conn.execute(
            "DELETE FROM orphan_dones WHERE distribution_id = ? AND seq < ("
            " SELECT seq FROM orphan_dones WHERE distribution_id = ?"
            " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (distribution_id, distribution_id, keep - 1)).rowcount
    return seq, dropped


def _take_orphan_dones(
    conn: sqlite3.Connection, distribution_id: str, sa_transaction_id: int
) -> list[OrphanDone]:
    rows = conn.execute(
        "DELETE FROM orphan_dones WHERE distribution_id = ? AND sa_transaction_id = ?"
        " RETURNING seq, distribution_id, sa_transaction_id, type, xml, received_at, size",
        (distribution_id, sa_transaction_id),
    ).fetchall()
    orphans = [
        OrphanDone(
            distribution_id=r["distribution_id"],
            sa_transaction_id=r["sa_transaction_id"],
            type=r["type"],
            xml=r["xml"],
            received_at=r["received_at"],
            seq=r["seq"],
            size=r["size"],
        )
        for r in rows
    ]
    return sorted(orphans, key=lambda o: o.seq)  # RETURNING order is unspecified


def _purge_orphan_dones(conn: sqlite3.Connection, older_than: float) -> int:
    return conn.execute(
        "DELETE FROM orphan_dones WHERE received_at < ?", (older_than,)
    ).rowcount


# Calls that only read: a batch of nothing else takes no write lock (BEGIN DEFERRED), so they
# never wait for another process writing the file.
_READS = frozenset({_read_one, _read_many, _next_dispatchable, _past_deadline, _sa_get,
                    _sa_list, _pending_events, _backlog})
