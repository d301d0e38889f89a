"""The PostgreSQL store (``[store] backend = postgresql``): one database, several proxies.

Why threads, not psycopg's async API: the async API runs on an asyncio event loop, which under
Twisted means installing the asyncio reactor for the whole process (twistd, every gate, every
test) just for the store. Instead a synchronous :class:`psycopg_pool.ConnectionPool` of
``pool_size`` connections serves a dedicated Twisted :class:`ThreadPool` of as many threads, so a
thread never waits for a connection, and the reactor thread never touches a socket of the
database: each call is ``deferToThreadPool`` of one transaction. The pool is started and
stopped with the store.

Why READ COMMITTED (set on every connection, whatever the database's default): every write
that must not race is one statement that PostgreSQL re-checks against the newest row (the CAS
``UPDATE ... WHERE state IN``, ``INSERT ... ON CONFLICT`` on ``request_id``), or takes row locks
first (the queue-head triggers lock the SA's ``sa_queues`` row, then read with a fresh
snapshot; :meth:`PostgreSQLStore.claim_dispatchable` locks with ``FOR UPDATE SKIP LOCKED``).
Stricter levels would only add serialization failures to retry. A deadlock or serialization
failure (rolled back whole by the server) is retried a few times; nothing else is, since after a
lost connection a COMMIT may have happened.

Why per-key ordering: SQLite's single thread runs calls in call order. Here calls run on
several threads at once, so calls about one operation (or one SA's registry entry, one SA's
orphans, one ``request_id``) wait for the earlier ones on the reactor thread; unrelated calls
run in parallel. Across proxies there is no call order: the database's checks decide.

Several proxies (instances, #12): each registers a lease row it renews (``instances``); a claim
sets ``claimed_by`` and needs the claimer's lease live, holding its row (``FOR KEY SHARE``) so
that a survivor's :meth:`PostgreSQLStore.take_over` (which locks expired rows ``FOR UPDATE SKIP
LOCKED``, deletes them and re-claims their ``sending`` operations in the same commit) sees either
the whole claim or none of it. An SA's orders are claimed only by the instance in its
``tunnel_owner`` when one is set. :meth:`~PostgreSQLStore.announce` NOTIFYs, and a thread of
:meth:`~PostgreSQLStore.listen` LISTENs on a connection of its own; :meth:`~PostgreSQLStore.lead`
holds a session-level advisory lock on another. Leases are compared by the proxies' clocks:
their hosts' clocks must agree to well within a lease.

Durability: a call returns after its COMMIT. A server or session with ``synchronous_commit =
off`` would acknowledge orders a crash can lose, so such sessions are switched to ``on``
(stronger settings, e.g. ``remote_apply``, are kept).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

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
from armsproxy.store.pg_migrations import ACTIVE_SQL, FINAL_SQL, migrate

T = TypeVar("T")
Conn = psycopg.Connection[Any]

_log = Logger()

_DEADLINE_PAGE = 500  # past_deadline's default page
_SA_COLUMNS = ("distribution_id", *sorted(SA_FIELDS))
_RETRIES = 5  # attempts of a call the server rolled back for a deadlock or serialization
_RAW = "ARRAY(SELECT r.entry FROM operation_raw AS r WHERE r.op_seq = {t}.seq ORDER BY r.id)"
# lead(): the advisory lock one instance holds to run the outbox and the purges ("ARMS" + 1;
# the migrations' transaction-scoped lock is "ARMS").
LEADER_LOCK = 0x41524D54


def lead_session_name(instance_id: str) -> str:
    """The ``application_name`` of an instance's leader-lock session: how a survivor finds
    it in ``pg_stat_activity`` once the instance's lease ran out (a digest: PostgreSQL cuts
    names at 63 bytes, and an instance id holds a host name)."""
    return "armsproxy lead " + hashlib.sha256(instance_id.encode()).hexdigest()[:16]


# announce()/listen(): one channel; the payload is "<sender token> <topic>".
CHANNEL = "armsproxy"
_LISTEN_POLL = 0.5  # how often the listening thread looks at its stop flag
_LISTEN_RETRY = 1.0  # after a lost listening connection


def _op_columns(table: str) -> str:
    """An operation's stored columns and its raw entries (one index range of operation_raw,
    evaluated only for the rows returned)."""
    return ", ".join([*(f"{table}.{c}" for c in OPERATION_COLUMNS), _RAW.format(t=table)])


_OP_SELECT = f"SELECT {_op_columns('o')} FROM operations AS o"


def _row_to_op(row: Sequence[Any], extra_raw: Sequence[str] = ()) -> Operation:
    """An operation from its columns and its raw entries' JSON (decoded only if read)."""
    values = dict(zip(OPERATION_COLUMNS, row, strict=False))
    values["params"] = load_json(values["params"])
    values["result"] = load_json(values["result"])
    values["forgotten"] = bool(values["forgotten"])
    raw = RawEntries([*(row[len(OPERATION_COLUMNS)] or ()), *extra_raw])
    return Operation(**values, raw=raw)


def _read_many(conn: Conn, sql: str, args: Sequence[Any]) -> list[Operation]:
    return [_row_to_op(row) for row in conn.execute(sql, args).fetchall()]


def _read_one(conn: Conn, sql: str, args: Sequence[Any]) -> Operation | None:
    row = conn.execute(sql, args).fetchone()
    return None if row is None else _row_to_op(row)


def _event_row(event: dict[str, Any], operation_id: str | None, now: float) -> tuple[Any, ...]:
    try:
        kind = event["kind"]
        distribution_id = event["distribution_id"]
    except KeyError as e:
        raise ValueError(f"event without {e.args[0]}: {event!r}")
    return (
        kind,
        event.get("operation_id", operation_id),
        distribution_id,
        dump_json(event.get("payload", {})),  # may raise: the transaction then rolls back
        event.get("created_at", now),
    )


def _insert_events(
    conn: Conn, events: Sequence[dict[str, Any]], operation_id: str | None, now: float
) -> None:
    rows = [_event_row(event, operation_id, now) for event in events]
    if rows:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO outbox (kind, operation_id, distribution_id, payload, created_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                rows,
            )


def _row_to_sa(row: Sequence[Any]) -> SARecord:
    values = dict(zip(_SA_COLUMNS, row, strict=True))
    values["confirmed"] = bool(values["confirmed"])
    values["tunnels"] = load_json(values["tunnels"]) or []
    return SARecord(**values)


def safe_dsn(dsn: str) -> str:
    """The DSN for messages and logs: its password (if any) masked."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


class PostgreSQLStore:
    """:class:`~armsproxy.store.interface.Store` on a PostgreSQL database (psycopg 3)."""

    def __init__(
        self,
        dsn: str,
        *,
        reactor: IReactorCore | None = None,
        clock: IReactorTime | None = None,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
        close_on_shutdown: bool = True,
    ) -> None:
        """``dsn``: a libpq connection string or URI. ``pool_size``: connections (and
        threads) of this proxy. ``close_on_shutdown=False`` when a service closes the store
        itself, after the services that use it have stopped."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor  # type: ignore[assignment]
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.dsn = dsn
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._close_on_shutdown = close_on_shutdown
        self._threads: ThreadPool | None = None
        self._pool: ConnectionPool[Any] | None = None
        self._waiting: list[defer.Deferred[None]] | None = None
        self._shutdown_trigger: Any = None
        # Per-key call order: the last call's "finished" Deferred of each busy key.
        self._tails: dict[tuple[str, str], defer.Deferred[None]] = {}
        self._active = 0  # calls started and not finished
        self._idle: list[defer.Deferred[None]] = []  # close() waiting for _active == 0
        # Test hook: called in the DB thread with the method name before each piece of work.
        self.db_hook: Callable[[str], None] | None = None
        # Instances: announce() coalescing, listen()'s thread, lead()'s connection.
        self._token = uuid.uuid4().hex  # tells our own notifications from others'
        self._announcing: set[str] = set()
        self._announce_again: set[str] = set()
        self._listeners: list[Callable[[str], None]] = []
        self._listen_thread: threading.Thread | None = None
        self._listen_stop = threading.Event()
        self._lead_conn: Conn | None = None
        self._leading = False
        self._lead_mutex = threading.Lock()

    shared = True

    @property
    def where(self) -> str:
        """What this store is, for messages: its DSN without password."""
        return safe_dsn(self.dsn)

    # -- plumbing -------------------------------------------------------------------------

    async def _until_opened(self) -> None:
        if self._waiting is not None:
            opened: defer.Deferred[None] = defer.Deferred()
            self._waiting.append(opened)
            await opened

    async def _run(self, name: str, fn: Callable[..., T], *args: Any,
                   key: tuple[str, str] | None = None) -> T:
        """``fn(conn, *args)`` in one transaction on a pool thread; after the earlier calls
        with the same ``key``."""
        if self._pool is None:
            await self._until_opened()
        pool, threads = self._pool, self._threads
        if pool is None or threads is None:
            raise StoreError("store is not open")
        self._active += 1
        finished: defer.Deferred[None] = defer.Deferred()
        previous = None
        if key is not None:
            previous, self._tails[key] = self._tails.get(key), finished
        try:
            if previous is not None:
                await previous  # fired, never failed, when the earlier call finished
            return await deferToThreadPool(
                self._reactor, threads, self._in_thread, pool, name, fn, *args  # type: ignore[arg-type]
            )
        finally:
            if key is not None and self._tails.get(key) is finished:
                del self._tails[key]
            finished.callback(None)
            self._active -= 1
            if not self._active:
                idle, self._idle = self._idle, []
                for d in idle:
                    d.callback(None)

    def _in_thread(self, pool: ConnectionPool[Any], name: str, fn: Callable[..., T],
                   *args: Any) -> T:
        if self.db_hook is not None:
            self.db_hook(name)
        for attempt in range(_RETRIES):
            try:
                with pool.connection() as conn, conn.transaction():
                    return fn(conn, *args)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _configure(self, conn: Conn) -> None:
        """Every pooled connection: READ COMMITTED, durable commits (see the module doc)."""
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        row = conn.execute("SHOW synchronous_commit").fetchone()
        if row is not None and row[0] == "off":
            conn.execute("SET synchronous_commit = on")

    def _connect(self) -> ConnectionPool[Any]:
        """In a pool thread: migrate on one connection, then fill the pool."""
        kwargs: dict[str, Any] = {"autocommit": True}
        params = conninfo_to_dict(self.dsn)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(1, round(self._connect_timeout))
        if "application_name" not in params:
            kwargs["application_name"] = "armsproxy"
        try:
            with psycopg.connect(self.dsn, **kwargs) as conn:
                migrate(conn)
        except psycopg.OperationalError as e:
            raise StoreError(f"cannot connect to PostgreSQL: {str(e).strip()}") from e
        pool: ConnectionPool[Any] = ConnectionPool(
            self.dsn, kwargs=kwargs, min_size=self._pool_size, max_size=self._pool_size,
            open=False, configure=self._configure, name="armsproxy-pg",
        )
        try:
            pool.open(wait=True, timeout=self._connect_timeout)
        except BaseException:
            pool.close()
            raise
        return pool

    async def open(self) -> None:
        if self._pool is not None or self._waiting is not None:
            return
        self._waiting = []
        try:
            await self._open()
        finally:
            waiting, self._waiting = self._waiting, None
            for opened in waiting:
                opened.callback(None)

    async def _open(self) -> None:
        threads = ThreadPool(minthreads=0, maxthreads=self._pool_size, name="armsproxy-pg")
        threads.start()
        try:
            pool = await deferToThreadPool(
                self._reactor, threads, self._connect  # type: ignore[arg-type]
            )
        except BaseException:
            threads.stop()  # idle by now: joins at once
            raise
        self._pool, self._threads = pool, threads
        if self._close_on_shutdown:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", lambda: defer.ensureDeferred(self.close())
            )
        _log.info("store open: PostgreSQL {where}", where=self.where)

    async def close(self) -> None:
        await self._until_opened()  # close what a running open() opens
        pool, threads = self._pool, self._threads
        if pool is None or threads is None:
            return
        self._pool = self._threads = None  # new calls fail; a second close() is a no-op
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        try:
            while self._active:  # calls already made finish first
                idle: defer.Deferred[None] = defer.Deferred()
                self._idle.append(idle)
                await idle
            self._listen_stop.set()
            listening, self._listen_thread = self._listen_thread, None
            self._listeners.clear()
            await deferToThreadPool(self._reactor, threads,  # type: ignore[arg-type]
                                    self._close_in_thread, pool, listening)
        finally:
            threads.stop()  # its threads are idle: joins at once
            if trigger is not None:
                try:
                    self._reactor.removeSystemEventTrigger(trigger)
                except (ValueError, KeyError):  # already fired
                    pass

    def _close_in_thread(self, pool: ConnectionPool[Any],
                         listening: threading.Thread | None) -> None:
        self._drop_lead()
        if listening is not None:
            listening.join()  # it looks at its stop flag every _LISTEN_POLL seconds
        pool.close()

    def _now(self) -> float:
        return float(self._clock.seconds())

    def _direct_connect(self, *, name: str | None = None, **extra: Any) -> Conn:
        """A connection outside the pool (autocommit), for LISTEN and the leader lock;
        ``name``, if given, is its ``application_name`` whatever the DSN says."""
        kwargs: dict[str, Any] = {"autocommit": True}
        params = conninfo_to_dict(self.dsn)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = max(1, round(self._connect_timeout))
        if name is not None:
            kwargs["application_name"] = name
        elif "application_name" not in params:
            kwargs["application_name"] = "armsproxy"
        for key, value in extra.items():
            if key not in params:
                kwargs[key] = value
        return psycopg.connect(self.dsn, **kwargs)

    # -- operations -----------------------------------------------------------------------

    async def submit(self, new: NewOperation) -> tuple[Operation, bool]:
        now = self._now() if new.created_at is None else new.created_at
        key = None if new.request_id is None else ("request", new.request_id)
        return await self._run("submit", _submit, new, new_operation_id(), now, key=key)

    async def get(self, operation_id: str) -> Operation | None:
        return await self._run("get", _read_one, f"{_OP_SELECT} WHERE o.operation_id = %s",
                               (operation_id,), key=("op", operation_id))

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
        sql, args = _list_sql(distribution_id, states, since, until, int(limit), int(offset))
        if not sql:
            return []
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
            "transition", _transition, operation_id, list(expect), state, changes,
            list(events), raw, self._now(), key=("op", operation_id),
        )

    async def update(self, operation_id: str, changes: dict[str, Any]) -> Operation | None:
        changes = dict(changes)
        check_fields(changes, MUTABLE_FIELDS, "operation")
        return await self._run("update", _transition, operation_id, None, None, changes, [],
                               None, self._now(), key=("op", operation_id))

    async def next_dispatchable(self, now: float, limit: int) -> list[Operation]:
        return await self._run("next_dispatchable", _read_many, _HEADS_SQL,
                               {"now": now, "limit": int(limit)})

    async def claim_dispatchable(self, now: float, limit: int, *,
                                 busy: Collection[str] = (),
                                 instance_id: str | None = None) -> list[Operation]:
        """The heads :meth:`next_dispatchable` would give, less SAs in ``busy`` (and, for an
        instance, less SAs whose tunnel another instance owns), moved to ``sending``
        (attempts + 1, updated_at = now, claimed_by) in one commit; as stored after. An
        instance whose lease is not live at ``now`` claims nothing."""
        if limit <= 0:
            return []
        return await self._run("claim_dispatchable", _claim, now, int(limit), sorted(busy),
                               instance_id)

    async def take_over(self, instance_id: str | None, now: float) -> list[Operation]:
        if instance_id is None:
            return await self.in_states({SENDING})
        dead, ops, ended, refused = await self._run("take_over", _take_over, instance_id, now)
        if dead:
            _log.warn("store: instance(s) {dead} stopped renewing their lease: taken over by"
                      " {me} ({n} operation(s) they were sending)", dead=", ".join(dead),
                      me=instance_id, n=len(ops))
        if ended:
            _log.warn("store: ended {n} leader-lock session(s) of the instance(s) whose lease"
                      " ran out (frozen, not dead?): another instance can lead", n=ended)
        for why in refused:
            _log.error("store: cannot end the leader-lock session of an instance whose lease"
                       " ran out ({why}): the event outbox and the purges wait until it"
                       " resumes or its connection dies; give every instance the same"
                       " PostgreSQL role (or pg_signal_backend)", why=why)
        return ops

    async def in_states(self, states: Collection[str]) -> list[Operation]:
        return await self._run("in_states", _read_many,
                               f"{_OP_SELECT} WHERE o.state = ANY(%s) ORDER BY o.seq",
                               (sorted(states),))

    async def past_deadline(self, now: float, limit: int = _DEADLINE_PAGE) -> list[Operation]:
        return await self._run("past_deadline", _past_deadline, now, int(limit))

    async def waiting(self) -> list[Operation]:
        # operations_waiting holds only these: a few per SA, however long the queues.
        sql = (f"{_OP_SELECT} WHERE o.state = '{QUEUED}' AND o.waiting_for IS NOT NULL"
               " ORDER BY o.seq")
        return await self._run("waiting", _read_many, sql, ())

    async def release_waiting(self, distribution_id: str, now: float) -> int:
        return await self._run("release_waiting", _release_waiting, distribution_id, now)

    async def find_by_sa_transaction(
        self, distribution_id: str, sa_transaction_id: int
    ) -> Operation | None:
        return await self._run(
            "find_by_sa_transaction", _read_one,
            f"{_OP_SELECT} WHERE o.distribution_id = %s AND o.sa_transaction_id = %s"
            " ORDER BY o.seq DESC LIMIT 1",
            (distribution_id, int(sa_transaction_id)),
        )

    async def forget(self, operation_id: str) -> bool:
        return await self._run("forget", _forget, operation_id, key=("op", operation_id))

    async def purge_results(self, older_than: float) -> int:
        return await self._run("purge_results", _purge_results, older_than)

    # -- SA registry ----------------------------------------------------------------------

    async def sa_get(self, distribution_id: str) -> SARecord | None:
        return await self._run("sa_get", _sa_get, distribution_id, key=("sa", distribution_id))

    async def sa_update(self, distribution_id: str, *, events: Sequence[dict[str, Any]] = (),
                        release_tunnel: str | None = None, **fields: Any) -> SARecord:
        check_fields(fields, SA_FIELDS, "SA registry")
        now = self._now()
        fields.setdefault("updated_at", now)
        return await self._run("sa_update", _sa_update, distribution_id, fields, list(events),
                               now, release_tunnel, key=("sa", distribution_id))

    async def sa_list(
        self, *, limit: int = 100, offset: int = 0, confirmed: bool | None = None
    ) -> list[SARecord]:
        return await self._run("sa_list", _sa_list, int(limit), int(offset), confirmed)

    # -- event outbox ---------------------------------------------------------------------

    async def add_events(self, events: Sequence[dict[str, Any]]) -> None:
        await self._run("add_events", _insert_events, list(events), None, self._now())

    async def pending_events(self, limit: int) -> list[Event]:
        return await self._run("pending_events", _pending_events, int(limit))

    async def mark_delivered(self, seqs: Sequence[int]) -> None:
        await self._run("mark_delivered", _mark_delivered, [int(s) for s in seqs])

    async def note_event_attempt(self, seq: int) -> None:
        await self._run("note_event_attempt", _note_event_attempt, int(seq))

    async def backlog(self) -> dict[str, int]:
        return await self._run("backlog", _backlog)

    # -- instances ------------------------------------------------------------------------

    async def register_instance(self, instance_id: str, *, host: str, pid: int, now: float,
                                lease_until: float) -> bool:
        return await self._run("register_instance", _register_instance,
                               (instance_id, host, int(pid), now, lease_until),
                               key=("instance", instance_id))

    async def retire_instance(self, instance_id: str) -> None:
        await self._run("retire_instance", _retire_instance, instance_id,
                        key=("instance", instance_id))

    async def lead(self, instance_id: str | None = None) -> bool:
        if self._pool is None:
            await self._until_opened()
        threads = self._threads
        if threads is None:
            raise StoreError("store is not open")
        return await deferToThreadPool(self._reactor, threads,  # type: ignore[arg-type]
                                       self._lead_in_thread, instance_id)

    def _lead_in_thread(self, instance_id: str | None) -> bool:
        """Take the leader lock on a session of our own, or check that session is alive
        (the lock lives as long as it). Any failure: not leading, the session dropped."""
        if self.db_hook is not None:
            self.db_hook("lead")
        with self._lead_mutex:
            try:
                if self._lead_conn is None or self._lead_conn.closed:
                    self._leading = False
                    # A dead peer must not keep us "leading": the kernel gives up on it.
                    self._lead_conn = self._direct_connect(
                        name=None if instance_id is None else lead_session_name(instance_id),
                        keepalives=1, keepalives_idle=5, keepalives_interval=2,
                        keepalives_count=3, tcp_user_timeout=10000)
                if self._leading:
                    self._lead_conn.execute("SELECT 1")
                else:
                    row = self._lead_conn.execute("SELECT pg_try_advisory_lock(%s)",
                                                  (LEADER_LOCK,)).fetchone()
                    self._leading = bool(row and row[0])
                return self._leading
            except psycopg.Error as e:
                self._reactor.callFromThread(
                    _log.warn, "store: leader lock session lost ({e})", e=str(e).strip())
                self._drop_lead_locked()
                return False

    def _drop_lead(self) -> None:
        with self._lead_mutex:
            self._drop_lead_locked()

    def _resign_in_thread(self) -> None:
        if self.db_hook is not None:
            self.db_hook("resign")
        self._drop_lead()

    def _drop_lead_locked(self) -> None:
        conn, leading = self._lead_conn, self._leading
        self._lead_conn, self._leading = None, False
        if conn is not None:
            try:
                if leading and not conn.closed:
                    # Released now: a closed session's locks go only once its backend
                    # has exited, a moment later.
                    conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_LOCK,))
            except psycopg.Error:
                pass
            finally:
                conn.close()  # the session ends: its advisory lock goes with it

    async def resign(self) -> None:
        threads = self._threads
        if threads is not None:
            await deferToThreadPool(self._reactor, threads,  # type: ignore[arg-type]
                                    self._resign_in_thread)

    async def announce(self, topic: str) -> None:
        """NOTIFY, at most one per topic in flight: one made meanwhile goes after it."""
        if topic in self._announcing:
            self._announce_again.add(topic)
            return
        self._announcing.add(topic)
        try:
            while True:
                self._announce_again.discard(topic)
                await self._run("announce", _notify, f"{self._token} {topic}")
                if topic not in self._announce_again:
                    return
        finally:
            self._announcing.discard(topic)

    async def listen(self, callback: Callable[[str], None]) -> None:
        if self._pool is None:
            await self._until_opened()
        if self._pool is None:
            raise StoreError("store is not open")
        self._listeners.append(callback)
        if self._listen_thread is None:
            self._listen_stop.clear()
            thread = threading.Thread(target=self._listen_loop, name="armsproxy-pg-listen",
                                      daemon=True)
            self._listen_thread = thread
            thread.start()

    def _heard(self, topic: str) -> None:
        """On the reactor thread: one announcement for the listeners."""
        for callback in list(self._listeners):
            try:
                callback(topic)
            except Exception:  # pragma: no cover - a listener's bug must not stop the others
                _log.failure("store: announcement listener failed")

    def _listen_loop(self) -> None:
        """The listening thread: LISTEN on a connection of its own; reconnect when lost."""
        stop = self._listen_stop
        first = True
        while not stop.is_set():
            try:
                with self._direct_connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if not first:  # whatever was announced while we were away
                        for topic in ("ops", "events"):
                            self._reactor.callFromThread(self._heard, topic)
                    first = False
                    while not stop.is_set():
                        for notify in conn.notifies(timeout=_LISTEN_POLL):
                            token, _, topic = notify.payload.partition(" ")
                            if token != self._token:
                                self._reactor.callFromThread(self._heard, topic)
            except psycopg.Error as e:
                if not stop.is_set():
                    self._reactor.callFromThread(
                        _log.warn, "store: listening connection lost ({e}); reconnecting",
                        e=str(e).strip())
                    first = False
                    stop.wait(_LISTEN_RETRY)

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
        return await self._run("add_orphan_done", _add_orphan_done, row, keep, drop_before,
                               key=("orphan", distribution_id))

    async def take_orphan_dones(
        self, distribution_id: str, sa_transaction_id: int
    ) -> list[OrphanDone]:
        return await self._run("take_orphan_dones", _take_orphan_dones, distribution_id,
                               int(sa_transaction_id), key=("orphan", distribution_id))

    async def purge_orphan_dones(self, older_than: float) -> int:
        """Drop orphans received before ``older_than`` (their operation never showed up)."""
        return await self._run("purge_orphan_dones", _purge_orphan_dones, older_than)


# -- work done in a pool thread (each function gets the connection first) --------------------
# Each runs inside a transaction of its own that commits when it returns and rolls back when it
# raises; none may commit or roll back itself.


def _submit(conn: Conn, new: NewOperation, operation_id: str,
            now: float) -> tuple[Operation, bool]:
    # The UNIQUE constraint decides, not a prior SELECT: safe against any concurrency (a
    # concurrent insert of the same request_id makes this one wait for its outcome).
    row = conn.execute(
        "INSERT INTO operations AS o (operation_id, request_id, distribution_id, operation,"
        " params, sa_url, method, state, attempts, created_at, updated_at, not_before,"
        " expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0, %s, %s, %s, %s)"
        f" ON CONFLICT (request_id) DO NOTHING RETURNING {_op_columns('o')}",
        (operation_id, new.request_id, new.distribution_id, new.operation,
         dump_json(new.params), new.sa_url, new.method, QUEUED, now, now, now, new.expires_at),
    ).fetchone()
    if row is not None:
        return _row_to_op(row), True
    # A new statement, a new snapshot: the row that won is committed and visible.
    op = _read_one(conn, f"{_OP_SELECT} WHERE o.request_id = %s", (new.request_id,))
    if op is None:  # pragma: no cover - the constraint found it
        raise StoreError("submitted operation vanished")
    return op, False


def _transition(
    conn: Conn,
    operation_id: str,
    expect: list[str] | None,
    state: str | None,
    changes: dict[str, Any],
    events: list[dict[str, Any]],
    raw: dict[str, Any] | None,
    now: float,
) -> Operation | None:
    """CAS state change (``expect``/``state`` None: plain update) with raw and events; the
    operation as ``UPDATE ... RETURNING`` gives it, the new raw entry appended."""
    changes.setdefault("updated_at", now)
    if state is not None and state != QUEUED:
        changes.setdefault("waiting_for", None)  # only a queued order waits for its SA
    sets = [f"{name} = %s" for name in changes]
    args: list[Any] = [op_value(name, value) for name, value in changes.items()]
    if state is not None:
        sets.append("state = %s")
        args.append(state)
    sql = f"UPDATE operations AS o SET {', '.join(sets)} WHERE o.operation_id = %s"
    args.append(operation_id)
    if expect is not None:
        sql += " AND o.state = ANY(%s)"
        args.append(expect)
    row = conn.execute(f"{sql} RETURNING {_op_columns('o')}, o.seq", args).fetchone()
    if row is None:
        return None
    entries = []
    if raw is not None:
        entries.append(dump_json(raw))
        conn.execute("INSERT INTO operation_raw (op_seq, entry) VALUES (%s, %s)",
                     (row[-1], entries[0]))
    _insert_events(conn, events, operation_id, now)
    return _row_to_op(row, entries)


def _list_sql(distribution_id: str | None, states: Collection[str] | None,
              since: float | None, until: float | None, limit: int,
              offset: int) -> tuple[str, list[Any]]:
    """list_operations' query; "" if nothing can match.

    Every plan reads rows already in (created_at, seq) order and stops after the page: one
    index range, or with states one per state merged (Merge Append), raw entries read for the
    page only."""
    where: list[str] = []
    args: list[Any] = []
    if distribution_id is not None:
        where.append("distribution_id = %s")
        args.append(distribution_id)
    if since is not None:
        where.append("created_at >= %s")
        args.append(since)
    if until is not None:
        where.append("created_at < %s")
        args.append(until)
    columns = "seq, " + ", ".join(OPERATION_COLUMNS)
    order = " ORDER BY created_at, seq"
    if states is None:
        inner = f"SELECT {columns} FROM operations"
        if where:
            inner += " WHERE " + " AND ".join(where)
        inner += order + " LIMIT %s OFFSET %s"
        inner_args = [*args, limit, offset]
    else:
        arms: list[str] = []
        inner_args = []
        for state in sorted(set(states)):
            arms.append(f"(SELECT {columns} FROM operations WHERE "
                        + " AND ".join(["state = %s", *where]) + order + " LIMIT %s)")
            inner_args += [state, *args, limit + offset]
        if not arms:
            return "", []
        inner = (f"SELECT * FROM ({' UNION ALL '.join(arms)}) AS merged{order}"
                 " LIMIT %s OFFSET %s")
        inner_args += [limit, offset]
    return (f"SELECT {_op_columns('o')} FROM ({inner}) AS o ORDER BY o.created_at, o.seq",
            inner_args)


# Per SA the head of its queue (sa_queues, kept by triggers): an SA with anything `sending` is
# skipped whole (one send at a time, nothing overtakes), and so is one whose head waits for the
# SA or is not due yet; `started` blocks nothing. sa_queues_ready holds only SAs neither busy
# nor waiting, by the head's not_before: the pick reads the `limit` due longest and stops.
# The head's row is fetched per SA by primary key in a LATERAL subquery that OFFSET 0 keeps
# from being flattened: the planner cannot swap that for a scan of every queued operation
# (a hash join it prefers at a few thousand rows, and would read a million at scale).
def _heads_from(columns: str, lock: str = "", head_filter: str = "") -> str:
    return f"""
    FROM sa_queues AS q CROSS JOIN LATERAL (
        SELECT {columns} FROM operations AS o WHERE o.seq = q.head_seq AND o.state = 'queued'
        {head_filter}OFFSET 0{lock}) AS o
    WHERE q.head_seq IS NOT NULL AND NOT q.waiting AND NOT q.busy
        AND q.not_before <= %(now)s"""


_HEADS_SQL = (f"SELECT {_op_columns('o')} {_heads_from('o.*')}"
              " ORDER BY q.not_before, q.head_seq LIMIT %(limit)s")
# The claim locks each head it picks and the SA's row, skipping rows another transaction holds
# (another proxy claiming, or a change of that SA's queue in flight: the SA waits for the next
# round). Locked rows are re-checked against their newest versions (a head claimed or
# cancelled, or an SA become busy, since this statement's snapshot is not picked); the UPDATE
# that follows, in a snapshot taken with both rows locked, moves only heads that still are.
_CLAIM_SQL = f"""SELECT o.seq {_heads_from('o.seq', ' FOR UPDATE SKIP LOCKED')}
        AND q.distribution_id <> ALL(%(busy)s::text[])
    ORDER BY q.not_before, q.head_seq LIMIT %(limit)s FOR UPDATE OF q SKIP LOCKED"""
# An instance's claim: as above, less the heads of SAs whose tunnel another instance holds
# (one registry seek per head: only the owner can send them), unless the head itself names
# its URL or asks for https-simple (anyone can send those). First (a one-time filter, run
# before any head is read) the instance's own lease row must be live, and is held FOR KEY
# SHARE until the commit: renewals go on, a take-over's delete waits for this claim, so it
# sees the whole claim or none of it.
# The owner filter sits inside the head's locking subquery: rows are locked after their
# filter, so an instance never locks (even for the instant of its claim) a head only another
# one may send, which would make that one's concurrent claim skip it and miss its wake-up.
_OWNED_BY_ME = """AND (o.sa_url IS NOT NULL OR o.method = 'https-simple' OR NOT EXISTS (
            SELECT 1 FROM sa_registry AS r WHERE r.distribution_id = q.distribution_id
            AND r.tunnel_owner IS NOT NULL AND r.tunnel_owner <> %(me)s))
        """
_INSTANCE_CLAIM_SQL = f"""SELECT o.seq {_heads_from(
    'o.seq', ' FOR UPDATE SKIP LOCKED', _OWNED_BY_ME)}
        AND EXISTS (SELECT 1 FROM instances AS i WHERE i.instance_id = %(me)s
                    AND i.lease_until >= %(now)s FOR KEY SHARE OF i)
        AND q.distribution_id <> ALL(%(busy)s::text[])
    ORDER BY q.not_before, q.head_seq LIMIT %(limit)s FOR UPDATE OF q SKIP LOCKED"""


def _claim(conn: Conn, now: float, limit: int, busy: list[str],
           instance_id: str | None) -> list[Operation]:
    """The pick, locked, then queued -> sending. The picked rows are `queued` and locked by
    us (so they stay so): the UPDATE checks only that each is still its SA's head, by primary
    keys (a `state = 'queued'` there would tempt the planner into reading every queued row
    of operations_state_*). An instance without a live lease claims nothing."""
    if instance_id is None:
        sql, args = _CLAIM_SQL, {"now": now, "limit": limit, "busy": busy}
    else:
        sql = _INSTANCE_CLAIM_SQL
        args = {"now": now, "limit": limit, "busy": busy, "me": instance_id}
    seqs = [row[0] for row in conn.execute(sql, args).fetchall()]
    if not seqs:
        return []
    rows = conn.execute(
        f"UPDATE operations AS o SET state = '{SENDING}', attempts = o.attempts + 1,"
        " updated_at = %s, waiting_for = NULL, claimed_by = %s WHERE o.seq = ANY(%s::bigint[])"
        " AND o.seq = (SELECT q.head_seq FROM sa_queues AS q"  # a seek per operation
        " WHERE q.distribution_id = o.distribution_id AND NOT q.busy AND NOT q.waiting)"
        f" RETURNING {_op_columns('o')}, o.seq",
        (now, instance_id, seqs),
    ).fetchall()
    place = {seq: i for i, seq in enumerate(seqs)}
    rows.sort(key=lambda row: place[row[-1]])  # RETURNING order is unspecified
    return [_row_to_op(row) for row in rows]


def _past_deadline(conn: Conn, now: float, limit: int) -> list[Operation]:
    """At most ``limit`` due operations, earliest deadlines first, returned in submit order;
    each half reads a partial index of only what has a deadline, from the earliest."""
    due: list[tuple[float, int, Operation]] = []
    for state, column in ((QUEUED, "expires_at"), (STARTED, "done_deadline")):
        for row in conn.execute(
            f"SELECT {_op_columns('o')}, o.seq FROM operations AS o"
            f" WHERE o.state = '{state}' AND o.{column} IS NOT NULL AND o.{column} <= %s"
            f" ORDER BY o.{column}, o.seq LIMIT %s", (now, limit),
        ):
            op = _row_to_op(row)
            due.append((getattr(op, column), row[-1], op))
    due.sort(key=lambda item: (item[0], item[1]))
    return [op for _, _, op in sorted(due[:limit], key=lambda item: item[1])]


def _release_waiting(conn: Conn, distribution_id: str, now: float) -> int:
    # operations_state_sa: one index range, the SA's queue.
    return conn.execute(
        "UPDATE operations SET waiting_for = NULL, not_before = LEAST(not_before, %s),"
        " updated_at = %s WHERE state = %s AND distribution_id = %s"
        " AND (waiting_for IS NOT NULL OR not_before > %s)",
        (now, now, QUEUED, distribution_id, now),
    ).rowcount


def _forget(conn: Conn, operation_id: str) -> bool:
    row = conn.execute(
        "WITH f AS (UPDATE operations SET forgotten = true, result = NULL"
        " WHERE operation_id = %s RETURNING seq),"
        " d AS (DELETE FROM operation_raw WHERE op_seq IN (SELECT seq FROM f))"
        " SELECT count(*) FROM f",
        (operation_id,),
    ).fetchone()
    return bool(row and row[0])


def _purge_results(conn: Conn, older_than: float) -> int:
    # operations_purge: the final rows not yet forgotten, oldest first.
    row = conn.execute(
        "WITH f AS (UPDATE operations SET forgotten = true, result = NULL"
        f" WHERE NOT forgotten AND state IN ({FINAL_SQL}) AND updated_at < %s RETURNING seq),"
        " d AS (DELETE FROM operation_raw WHERE op_seq IN (SELECT seq FROM f))"
        " SELECT count(*) FROM f",
        (older_than,),
    ).fetchone()
    return int(row[0]) if row else 0


def _sa_get(conn: Conn, distribution_id: str) -> SARecord | None:
    row = conn.execute(
        f"SELECT {', '.join(_SA_COLUMNS)} FROM sa_registry WHERE distribution_id = %s",
        (distribution_id,),
    ).fetchone()
    return None if row is None else _row_to_sa(row)


def _sa_update(conn: Conn, distribution_id: str, fields: dict[str, Any],
               events: list[dict[str, Any]], now: float,
               release_tunnel: str | None = None) -> SARecord:
    values = dict(fields)
    if "tunnels" in values:
        values["tunnels"] = dump_json(values["tunnels"] or [])
    if "confirmed" in values:
        values["confirmed"] = bool(values["confirmed"])
    names = list(values)
    sets = [f"{n} = excluded.{n}" for n in names]
    args: list[Any] = [distribution_id, *values.values()]
    if release_tunnel is not None and "tunnel_owner" not in values:
        # Decided on the row as locked by this upsert: an owner set meanwhile stays.
        sets.append("tunnel_owner = CASE WHEN sa_registry.tunnel_owner = %s THEN NULL"
                    " ELSE sa_registry.tunnel_owner END")
        args.append(release_tunnel)
    row = conn.execute(
        f"INSERT INTO sa_registry (distribution_id, {', '.join(names)})"
        f" VALUES (%s, {', '.join(['%s'] * len(names))})"
        " ON CONFLICT (distribution_id) DO UPDATE SET " + ", ".join(sets)
        + f" RETURNING {', '.join(_SA_COLUMNS)}",
        args,
    ).fetchone()
    assert row is not None
    _insert_events(conn, events, None, now)
    return _row_to_sa(row)


def _sa_list(conn: Conn, limit: int, offset: int, confirmed: bool | None) -> list[SARecord]:
    sql = f"SELECT {', '.join(_SA_COLUMNS)} FROM sa_registry"
    args: list[Any] = []
    if confirmed is not None:
        sql += " WHERE confirmed = %s"
        args.append(bool(confirmed))
    sql += " ORDER BY distribution_id LIMIT %s OFFSET %s"
    return [_row_to_sa(r) for r in conn.execute(sql, [*args, limit, offset])]


def _take_over(conn: Conn, instance_id: str,
               now: float) -> tuple[list[str], list[Operation], int, list[str]]:
    """Expired instances (rows another take-over or a claim holds are skipped: next time)
    are deleted and their tunnels released; then every `sending` operation whose claimer
    has no row (expired just now, retired, or claimed by none) becomes ours. Under READ
    COMMITTED a concurrent take-over that re-claimed one first makes the row's re-check
    (claimed_by now names a live instance) leave it to that one.

    The expired instances' leader-lock sessions are ended too: a process that froze (stopped,
    hung, its VM paused) keeps its session, and with it the leader lock, for as long as its
    host's kernel answers; the outbox and the purges would wait for it."""
    dead = [row[0] for row in conn.execute(
        "SELECT instance_id FROM instances WHERE lease_until < %s AND instance_id <> %s"
        " FOR UPDATE SKIP LOCKED", (now, instance_id)).fetchall()]
    ended, refused = 0, []
    if dead:
        conn.execute("DELETE FROM instances WHERE instance_id = ANY(%s)", (dead,))
        conn.execute("UPDATE sa_registry SET tunnel_owner = NULL"
                     " WHERE tunnel_owner = ANY(%s)", (dead,))
        ended, refused = _end_lead_sessions(conn, dead)
    # operations_state_sa: the `sending` range only (a few per SA being sent to).
    rows = conn.execute(
        f"UPDATE operations AS o SET claimed_by = %s WHERE o.state = '{SENDING}'"
        " AND (o.claimed_by IS NULL OR o.claimed_by = ANY(%s) OR NOT EXISTS ("
        " SELECT 1 FROM instances AS i WHERE i.instance_id = o.claimed_by))"
        f" RETURNING {_op_columns('o')}, o.seq",
        (instance_id, dead),
    ).fetchall()
    rows.sort(key=lambda row: row[-1])  # RETURNING order is unspecified
    return dead, [_row_to_op(row) for row in rows], ended, refused


def _end_lead_sessions(conn: Conn, dead: list[str]) -> tuple[int, list[str]]:
    """End the leader-lock sessions of ``dead`` instances (by their ``application_name``);
    the count ended and why others could not be (each in a savepoint: a refusal, another
    role's session, must not undo the take-over)."""
    pids = [row[0] for row in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = ANY(%s) AND pid <> pg_backend_pid()",
        ([lead_session_name(i) for i in dead],)).fetchall()]
    ended, refused = 0, []
    for pid in pids:
        try:
            with conn.transaction():
                row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            ended += bool(row and row[0])
        except psycopg.Error as e:
            refused.append(str(e).strip())
    return ended, refused


def _register_instance(conn: Conn, row: tuple[Any, ...]) -> bool:
    # xmax = 0: the row was inserted by this statement, not updated.
    done = conn.execute(
        "INSERT INTO instances AS i (instance_id, host, pid, started_at, lease_until)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (instance_id) DO UPDATE SET"
        " lease_until = excluded.lease_until RETURNING (i.xmax <> 0)",
        row,
    ).fetchone()
    return bool(done and done[0])


def _retire_instance(conn: Conn, instance_id: str) -> None:
    conn.execute("DELETE FROM instances WHERE instance_id = %s", (instance_id,))
    conn.execute("UPDATE sa_registry SET tunnel_owner = NULL WHERE tunnel_owner = %s",
                 (instance_id,))


def _notify(conn: Conn, payload: str) -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def _backlog(conn: Conn) -> dict[str, int]:
    counts = dict.fromkeys(sorted(STATES - FINAL), 0)
    # The not-final ranges of operations_state_sa, never the kept results (see
    # pg_migrations: a trigger-kept counter row would serialise every write).
    counts.update(conn.execute(
        f"SELECT state, count(*) FROM operations WHERE state IN ({ACTIVE_SQL}) GROUP BY state"
    ).fetchall())
    row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    counts["events"] = int(row[0]) if row else 0
    return counts


def _pending_events(conn: Conn, limit: int) -> list[Event]:
    rows = conn.execute(
        "SELECT seq, kind, operation_id, distribution_id, payload, created_at, attempts"
        " FROM outbox ORDER BY seq LIMIT %s",
        (limit,),
    ).fetchall()
    return [
        Event(seq=r[0], kind=r[1], operation_id=r[2], distribution_id=r[3],
              payload=load_json(r[4]), created_at=r[5], attempts=r[6])
        for r in rows
    ]


def _mark_delivered(conn: Conn, seqs: list[int]) -> None:
    # Delivered events are deleted: the RS has them, and the outbox stays small.
    if seqs:
        conn.execute("DELETE FROM outbox WHERE seq = ANY(%s)", (seqs,))


def _note_event_attempt(conn: Conn, seq: int) -> None:
    conn.execute("UPDATE outbox SET attempts = attempts + 1 WHERE seq = %s", (seq,))


def _add_orphan_done(conn: Conn, row: tuple[Any, ...], keep: int | None,
                     drop_before: float | None) -> tuple[int, int]:
    inserted = conn.execute(
        "INSERT INTO orphan_dones (distribution_id, sa_transaction_id, type, xml,"
        " received_at, size) VALUES (%s, %s, %s, %s, %s, %s) RETURNING seq",
        row,
    ).fetchone()
    assert inserted is not None
    seq = int(inserted[0])
    distribution_id = row[0]
    dropped = 0
    if drop_before is not None:
        dropped += conn.execute(
            "DELETE FROM orphan_dones WHERE distribution_id = %s AND received_at < %s"
            " AND seq <> %s", (distribution_id, drop_before, seq)).rowcount
    if keep is not None:
        # orphan_dones_sa: the SA's rows newest first; the bound keeps them few.
        dropped += conn.execute(
            "DELETE FROM orphan_dones WHERE distribution_id = %s AND seq < ("
            " SELECT seq FROM orphan_dones WHERE distribution_id = %s"
            " ORDER BY seq DESC LIMIT 1 OFFSET %s)",
            (distribution_id, distribution_id, keep - 1)).rowcount
    return seq, dropped


def _take_orphan_dones(conn: Conn, distribution_id: str,
                       sa_transaction_id: int) -> list[OrphanDone]:
    rows = conn.execute(
        "DELETE FROM orphan_dones WHERE distribution_id = %s AND sa_transaction_id = %s"
        " RETURNING seq, distribution_id, sa_transaction_id, type, xml, received_at, size",
        (distribution_id, sa_transaction_id),
    ).fetchall()
    orphans = [
        OrphanDone(seq=r[0], distribution_id=r[1], sa_transaction_id=r[2], type=r[3],
                   xml=r[4], received_at=r[5], size=r[6])
        for r in rows
    ]
    return sorted(orphans, key=lambda o: o.seq)  # RETURNING order is unspecified


def _purge_orphan_dones(conn: Conn, older_than: float) -> int:
    return conn.execute(
        "DELETE FROM orphan_dones WHERE received_at < %s", (older_than,)
    ).rowcount
