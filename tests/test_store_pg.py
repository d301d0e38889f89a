"""The store suite (tests/test_store.py) on a real PostgreSQL server, plus what only PostgreSQL
has: several proxies on one database (claims with SKIP LOCKED, one request_id, one row), its
query plans, its migrations and its connection settings.

Every test of test_store.py runs here too, with ``store`` a :class:`PostgreSQLStore` on a
fresh database, unless :data:`EXCLUDED` names it with the reason: those open the SQLite file,
build a ``SQLiteStore``, or look at SQLite's query plans, pragmas or single thread; the point of
each that matters has a PostgreSQL test below. A test added to test_store.py runs here at
once; if it is SQLite-specific it fails here until it is excluded.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import pytest_twisted
import test_store as base  # the module pytest collects test_store.py as (prepend import mode)
from pgserver import PGCluster, create_database, drop_database
from psycopg.conninfo import conninfo_to_dict
from twisted.internet import defer, reactor, threads
from twisted.python import threadable

from armsproxy.store import Store, StoreError, pg_migrations
from armsproxy.store import migrations as sqlite_migrations
from armsproxy.store.postgresql import PostgreSQLStore, safe_dsn

SA_A, SA_B, T0 = base.SA_A, base.SA_B, base.T0
new_op, ev = base.new_op, base.ev
clock = base.clock  # the fixture

EXCLUDED = {
    "test_sqlite_store_satisfies_the_protocol":
        "checks SQLiteStore: test_postgresql_store_satisfies_the_protocol",
    "test_concurrent_submits_of_one_request_id_create_one_row":
        "a second SQLiteStore on the file: test_two_stores_submitting_one_request_id_...",
    "test_migration_builds_the_queue_heads_of_an_existing_queue":
        "a SQLite file at version 4: test_pg_migration_builds_the_queue_heads_...",
    "test_hot_queries_read_only_what_they_return":
        "SQLite's trace callback and EXPLAIN QUERY PLAN: test_pg_hot_queries_use_their_indexes",
    "test_bytes_round_trip_in_params_and_results":
        "reopens a SQLiteStore on the file: test_bytes_round_trip_across_a_reopen",
    "test_old_schema_is_migrated_and_keeps_data":
        "a SQLite file at version 1: test_pg_old_schema_is_migrated_and_keeps_data",
    "test_orphans_stored_before_sizes_survive_the_migration":
        "a SQLite file at version 2: test_pg_orphans_stored_before_sizes_survive_...",
    "test_a_newer_schema_is_refused":
        "PRAGMA user_version: test_pg_newer_schema_is_refused",
    "test_calls_made_while_the_store_opens_wait_for_it":
        "builds a SQLiteStore: test_pg_calls_made_while_the_store_opens_wait_for_it",
    "test_close_while_opening_closes_what_open_opens":
        "builds a SQLiteStore: test_pg_close_while_opening_closes_what_open_opens",
    "test_a_store_that_cannot_open_fails_the_waiting_calls":
        "builds a SQLiteStore: test_pg_newer_schema_is_refused",
    "test_connection_settings":
        "SQLite pragmas: test_pg_connection_settings",
    "test_no_store_call_runs_on_the_reactor_thread":
        "asserts SQLite's one thread: test_pg_no_store_call_runs_on_the_reactor_thread",
    "test_calls_after_close_fail_cleanly":
        "builds a SQLiteStore, looks for its -wal file: test_pg_calls_after_close_fail_cleanly",
    "test_states_are_the_life_cycle":
        "no store involved: runs once, in test_store.py",
    "test_kill_9_loses_no_acknowledged_order_or_result":
        "a SQLite file in the child: test_pg_kill_9_loses_no_acknowledged_order_or_result",
    "test_concurrent_claims_never_return_the_same_operation":
        "a second SQLiteStore on the file: test_claims_of_several_proxies_never_take_...",
    "test_changes_are_not_read_back":
        "SQLite's trace callback: test_pg_changes_are_not_read_back",
    "test_submit_returns_the_inserted_row_without_reading_it":
        "SQLite's trace callback: test_pg_submit_returns_the_inserted_row_without_reading_it",
    "test_raw_entries_decode_once_and_compare_as_a_list":
        "no store involved: runs once, in test_store.py",
}

# Every other test of test_store.py, collected here (pytest collects test functions a module
# holds, wherever they were defined); their globals stay test_store's, see the `store` fixture.
globals().update({name: test for name, test in vars(base).items()
                  if name.startswith("test_") and callable(test) and name not in EXCLUDED})


class PGTestStore(PostgreSQLStore):
    """``path`` is what test_store.py's ``count`` gets: here the DSN."""

    @property
    def path(self) -> str:
        return self.dsn


def pg_count(dsn: str, sql: str, *args: Any) -> Any:
    """test_store.count on PostgreSQL (a connection of its own, like the SQLite one)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql.replace("?", "%s"), args).fetchone()
        assert row is not None
        return row[0]


def pg_queue_heads(conn: psycopg.Connection) -> tuple[list[tuple], list[tuple]]:
    """test_store.queue_heads on PostgreSQL: sa_queues as the triggers keep it, and rebuilt
    from scratch (migration 5's way)."""
    kept = conn.execute("SELECT distribution_id, head_seq, not_before, waiting, busy"
                        " FROM sa_queues ORDER BY distribution_id").fetchall()
    rebuilt = conn.execute(
        "SELECT q.distribution_id, q.head, op.not_before,"
        " COALESCE(op.waiting_for IS NOT NULL, false), q.busy"
        " FROM (SELECT distribution_id, MIN(seq) FILTER (WHERE state = 'queued') AS head,"
        " bool_or(state = 'sending') AS busy FROM operations"
        " WHERE state IN ('queued', 'sending') GROUP BY distribution_id) AS q"
        " LEFT JOIN operations AS op ON op.seq = q.head ORDER BY q.distribution_id").fetchall()
    return [tuple(r) for r in kept], [tuple(r) for r in rebuilt]


@pytest_twisted.async_yield_fixture
async def store(pg_dsn, clock, monkeypatch):
    # test_store.py's helpers that read the database directly, pointed at PostgreSQL.
    monkeypatch.setattr(base, "count", pg_count)
    monkeypatch.setattr(base, "queue_heads", pg_queue_heads)
    s = PGTestStore(pg_dsn, reactor=reactor, clock=clock)
    await s.open()
    yield s
    await s.close()


@pytest_twisted.async_yield_fixture
async def make_store(pg_dsn, clock):
    """Stores on this test's database (several: several proxies); closed at the end."""
    made: list[PostgreSQLStore] = []

    def make(dsn: str = pg_dsn, **kwargs: Any) -> PostgreSQLStore:
        kwargs.setdefault("clock", clock)
        made.append(PostgreSQLStore(dsn, reactor=reactor, **kwargs))
        return made[-1]

    yield make
    for s in made:
        await s.close()


def sql(dsn: str, statement: str, *args: Any) -> list[tuple]:
    """Run one statement on its own connection (autocommit); its rows, if any."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, args or None)
        return cur.fetchall() if cur.description else []


class Trace:
    """The statements store calls send (psycopg's Connection.execute), between start/stop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real_execute = psycopg.Connection.execute
        self.statements: list[tuple[str, Any]] = []
        self.on = False

        def tracing(conn, query, params=None, **kwargs):
            if self.on:
                self.statements.append((query, params))
            return self.real_execute(conn, query, params, **kwargs)

        monkeypatch.setattr(psycopg.Connection, "execute", tracing)

    def start(self) -> None:
        self.statements.clear()
        self.on = True

    def stop(self) -> list[tuple[str, Any]]:
        self.on = False
        return list(self.statements)


@pytest.fixture
def trace(monkeypatch):
    return Trace(monkeypatch)


def first_word(query: str) -> str:
    return query.lstrip().split(None, 1)[0].upper()


def pg_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "armsproxy-pg" in t.name]


def test_every_store_test_runs_here_or_is_excluded_with_a_reason():
    tests = {name for name in vars(base) if name.startswith("test_")}
    assert set(EXCLUDED) <= tests, sorted(set(EXCLUDED) - tests)  # no stale exclusions
    assert all(reason for reason in EXCLUDED.values())
    assert {name for name in tests - set(EXCLUDED)} <= set(globals())


def test_postgresql_store_satisfies_the_protocol():
    for name, member in vars(Store).items():
        if name.startswith("_") or not callable(member):
            continue
        impl = getattr(PostgreSQLStore, name)
        assert inspect.iscoroutinefunction(impl), name
        want = list(inspect.signature(member).parameters)
        assert list(inspect.signature(impl).parameters) == want, name


def test_schema_versions_are_numbered_as_sqlite_s():
    # Version N is the same schema on both backends: a step added to one needs the other.
    assert pg_migrations.SCHEMA_VERSION == sqlite_migrations.SCHEMA_VERSION == 6


def test_the_dsn_in_messages_hides_the_password():
    shown = safe_dsn("host=db.example port=5433 user=arms password=s3cret dbname=arms")
    assert "s3cret" not in shown and "***" in shown and "db.example" in shown
    assert "s3cret" not in safe_dsn("postgresql://arms:s3cret@db.example/arms")


# -- several proxies on one database -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_stores_submitting_one_request_id_create_one_row(make_store, pg_dsn):
    # Two stores = two proxies: only the UNIQUE constraint can keep this to one row.
    stores = [make_store(), make_store()]
    for s in stores:
        await s.open()
    results = await defer.gatherResults([
        defer.ensureDeferred(s.submit(new_op(request_id="same", params={"i": i})))
        for i in range(40) for s in stores])
    assert len({op.operation_id for op, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert sql(pg_dsn, "SELECT count(*) FROM operations WHERE request_id = 'same'") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_claims_of_several_proxies_never_take_one_operation_twice(make_store, pg_dsn):
    """Three stores (three proxies) claim at once, several calls each: every operation is
    claimed exactly once, an SA never has two operations sending, and each SA's operations
    are claimed in submit order (FOR UPDATE SKIP LOCKED on the heads and their SAs' rows)."""
    stores = [make_store(pool_size=3) for _ in range(3)]
    for s in stores:
        await s.open()
    sas = [f"SA-{i:03d}" for i in range(60)]
    submitted = {sa: [] for sa in sas}
    for rnd in range(4):
        for sa in sas:
            op, _ = await stores[rnd % 3].submit(new_op(sa))
            submitted[sa].append(op.operation_id)
    claimed: list[Any] = []
    now = T0 + 10
    while len(claimed) < 4 * len(sas):
        rounds = await defer.gatherResults([
            defer.ensureDeferred(s.claim_dispatchable(now, 7)) for s in stores for _ in range(3)])
        got = [op for ops in rounds for op in ops]
        assert got, "nothing claimable, yet not everything claimed"
        ids = [op.operation_id for op in got]
        assert len(ids) == len(set(ids)), "one operation claimed twice"
        assert len({op.distribution_id for op in got}) == len(got), "an SA sending twice"
        assert sql(pg_dsn, "SELECT count(*) FROM (SELECT distribution_id FROM operations"
                   " WHERE state = 'sending' GROUP BY distribution_id"
                   " HAVING count(*) > 1) AS x") == [(0,)]
        claimed += got
        await defer.gatherResults([
            defer.ensureDeferred(stores[i % 3].transition(
                op.operation_id, expect=["sending"], state="succeeded"))
            for i, op in enumerate(got)])
    assert len({op.operation_id for op in claimed}) == len(claimed) == 4 * len(sas)
    for sa in sas:
        assert [op.operation_id for op in claimed if op.distribution_id == sa] == submitted[sa]


@pytest_twisted.ensureDeferred
async def test_calls_about_one_operation_keep_their_order_others_run_beside(store):
    """Several threads: a call waits only for earlier calls about the same operation."""
    a, _ = await store.submit(new_op(SA_A))
    b, _ = await store.submit(new_op(SA_B))
    held, release = threading.Event(), threading.Event()

    def hook(name: str) -> None:
        if name == "update" and not held.is_set():
            held.set()
            release.wait(10)

    store.db_hook = hook
    stuck = defer.ensureDeferred(store.update(a.operation_id, {"attempts": 5}))
    await threads.deferToThread(held.wait, 10)
    after = defer.ensureDeferred(store.transition(a.operation_id, expect=["queued"],
                                                  state="sending"))
    other = await store.transition(b.operation_id, expect=["queued"], state="sending")
    assert other.state == "sending" and not stuck.called and not after.called
    release.set()
    assert (await stuck).attempts == 5
    assert (await after).attempts == 5  # ran after the update, in call order


# -- changes come back from the statement that made them ----------------------------------


@pytest_twisted.ensureDeferred
async def test_pg_changes_are_not_read_back(store, clock, trace):
    op, _ = await store.submit(new_op())
    trace.start()
    async for _ in base._life(store, clock, op.operation_id):
        pass
    statements = [q for q, _ in trace.stop()]
    # Each change is one UPDATE ... RETURNING, raw entries included: nothing is read after.
    reads = [q for q in statements if first_word(q) == "SELECT"]
    assert len(reads) == 1 and "SKIP LOCKED" in reads[0], reads  # only the claim's pick
    updates = [q for q in statements if first_word(q) == "UPDATE"]
    assert len(updates) == 4 and all("RETURNING" in q for q in updates), updates


@pytest_twisted.ensureDeferred
async def test_pg_submit_returns_the_inserted_row_without_reading_it(store, trace):
    trace.start()
    op, created = await store.submit(new_op(request_id="r", params={"k": [1, "x"]}))
    again, created_again = await store.submit(new_op(request_id="r"))
    statements = [q for q, _ in trace.stop()]
    assert created and not created_again and op == again == await store.get(op.operation_id)
    inserts = [q for q in statements if first_word(q) == "INSERT"]
    assert len(inserts) == 2 and all("RETURNING" in q for q in inserts)
    reads = [q for q in statements if first_word(q) == "SELECT"]
    assert len(reads) == 1 and "request_id =" in reads[0]  # the repeat


# -- plans ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pg_hot_queries_use_their_indexes(store, clock, trace):
    """Issue #11 on PostgreSQL: at a few thousand operations (analyzed), dispatch, claims, the
    deadline scan, listings, waiting orders, purges and the queue-head triggers' reads each
    read an index range, never a sequential scan of operations."""
    now = clock.seconds()
    # Kept results (8000, final) and a queue of 2000 operations of 2000 SAs: mostly queued,
    # a third of them due, some sending or started (with deadlines).
    rows = []
    for i in range(10_000):
        final = i < 8000
        state = ["succeeded", "failed", "expired"][i % 3] if final else (
            ["queued"] * 6 + ["sending", "started"])[i % 8]
        sa = f"SA-{i % 2000:04d}"
        rows.append((f"op{i:05d}", sa, state, T0 + i, now - 5 + i % 15,
                     now + i % 100 if state == "queued" else None,
                     now + i % 50 if state == "started" else None, i % 700 if i % 3 else None))
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO operations (operation_id, distribution_id, operation, params,"
                " state, created_at, updated_at, not_before, expires_at, done_deadline,"
                " sa_transaction_id) VALUES (%s, %s, 'read-status', '{}', %s, %s, %s, %s, %s,"
                " %s, %s)", [(o, sa, st, c, c, nb, ex, dd, txn)
                              for o, sa, st, c, nb, ex, dd, txn in rows])
        conn.execute("VACUUM ANALYZE")  # as autovacuum keeps a busy table

    async def plans(call: Callable[[], Any]) -> str:
        trace.start()
        try:
            await call()
        finally:
            found = [(q, p) for q, p in trace.stop()
                     if first_word(q) in ("SELECT", "UPDATE", "DELETE", "WITH")]
        assert found

        def explain(conn):
            return [" | ".join(r[0].strip() for r in trace.real_execute(conn, "EXPLAIN " + q, p))
                    for q, p in found]

        text = " || ".join(await store._run("explain", explain))
        assert "Seq Scan on operations" not in text, text
        assert "Seq Scan on sa_queues" not in text, text
        return text

    dispatch = await plans(lambda: store.next_dispatchable(now, 200))
    assert "sa_queues_ready" in dispatch and "operations_pkey" in dispatch, dispatch
    claim = await plans(lambda: store.claim_dispatchable(now, 50, busy=["SA-0001"]))
    assert "sa_queues_ready" in claim and "LockRows" in claim, claim
    assert "operations_state" not in claim and "sa_queues_pkey" in claim, claim
    # An instance's claim: its lease checked once (a one-time filter, before any head is
    # read), the heads as above; a take-over reads the `sending` range only.
    await store.register_instance("me", host="h", pid=1, now=now, lease_until=now + 60)
    mine = await plans(lambda: store.claim_dispatchable(now, 50, instance_id="me"))
    assert "sa_queues_ready" in mine and "One-Time Filter" in mine, mine
    assert "operations_state" not in mine, mine
    taken = await plans(lambda: store.take_over("me", now))
    assert "Index Cond: (state = 'sending'::text)" in taken, taken
    # A transition: the operation by its id, whatever the states expected.
    op = (await store.in_states(["started"]))[0]
    change = await plans(lambda: store.transition(op.operation_id, expect=["started", "queued"],
                                                  state="started", changes={"attempts": 2}))
    assert "operations_operation_id_key" in change and "operations_state" not in change, change
    due = await plans(lambda: store.past_deadline(now + 100))
    assert "operations_queued_expires" in due and "operations_started_done" in due, due
    assert "operations_waiting" in await plans(store.waiting)
    listing = await plans(lambda: store.list_operations(states=["queued", "started"]))
    assert "Merge Append" in listing and listing.count("operations_state_created") == 2
    assert "operations_created" in await plans(store.list_operations)
    assert "operations_sa_created" in await plans(
        lambda: store.list_operations(distribution_id="SA-0007"))
    assert "operations_state_sa" in await plans(lambda: store.release_waiting("SA-0007", now))
    assert "operations_purge" in await plans(lambda: store.purge_results(T0 - 1))
    assert "operations_sa_txn" in await plans(lambda: store.find_by_sa_transaction("SA-0007", 7))
    # The backlog: the not-final states' ranges of an index on state, no row read.
    assert "Index Only Scan using operations_state_" in await plans(store.backlog)

    # The triggers' reads of one SA's queue: two seeks of operations_state_sa.
    def trigger_plans(conn):
        body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname ="
                            " 'armsproxy_refresh_queue'").fetchone()[0]
        assert "WHERE state = 'queued' AND distribution_id = sa ORDER BY seq LIMIT 1" in body
        return [" | ".join(r[0] for r in conn.execute("EXPLAIN " + q)) for q in (
            "SELECT seq, not_before, waiting_for FROM operations WHERE state = 'queued'"
            " AND distribution_id = 'SA-0007' ORDER BY seq LIMIT 1",
            "SELECT EXISTS (SELECT 1 FROM operations WHERE state = 'sending'"
            " AND distribution_id = 'SA-0007')")]

    for plan in await store._run("plans", trigger_plans):
        assert "operations_state_sa" in plan and "Seq Scan" not in plan, plan


# -- results survive a reopen --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bytes_round_trip_across_a_reopen(store, clock):
    params = {"md_configs": [{"id": 10, "data": b"\x00\x89CFG\xff\r\n"}],
              "nested": {"blob": b"", "text": "é"}}
    op, _ = await store.submit(new_op(operation="configure", params=params))
    result = {"status": [{"id": 10, "data": b"\xde\xad\xbe\xef"}], "count": 3}
    await store.transition(op.operation_id, expect=["queued"], state="succeeded",
                           changes={"result": result})
    await store.add_events([ev("operation.succeeded", data=b"\x00")])
    await store.close()
    reopened = PostgreSQLStore(store.dsn, reactor=reactor, clock=clock)
    await reopened.open()
    try:
        got = await reopened.get(op.operation_id)
        (event,) = await reopened.pending_events(5)
    finally:
        await reopened.close()
    assert got.params == params and got.result == result and event.payload == {"data": b"\x00"}
    await store.open()  # the fixture closes it again


# -- schema --------------------------------------------------------------------------------


def migrated(dsn: str, target: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert pg_migrations.migrate(conn, target=target) == target


@pytest_twisted.ensureDeferred
async def test_pg_old_schema_is_migrated_and_keeps_data(make_store, pg_dsn):
    migrated(pg_dsn, 1)
    sql(pg_dsn, "INSERT INTO operations (operation_id, request_id, distribution_id, operation,"
        " params, state, attempts, created_at, updated_at, not_before, sa_transaction_id)"
        " VALUES ('a1', 'old-rq', %s, 'ping', '{\"n\":1}', 'started', 2, 1.0, 2.0, 1.0, 5)",
        SA_A)
    sql(pg_dsn, "INSERT INTO sa_registry (distribution_id, push_method, confirmed, updated_at)"
        " VALUES (%s, 'https-simple', true, 3.0)", SA_A)
    s = make_store()
    await s.open()
    (op,) = await s.in_states(["started"])
    assert op.request_id == "old-rq" and op.params == {"n": 1} and op.attempts == 2
    assert op.done_deadline is None and op.sa_transaction_id == 5 and op.waiting_for is None
    again, created = await s.submit(new_op(request_id="old-rq"))
    assert not created and again.operation_id == op.operation_id
    rec = await s.sa_get(SA_A)
    assert rec.push_method == "https-simple" and rec.confirmed and rec.tunnels == []
    assert (await s.update(op.operation_id, {"done_deadline": 99.0})).done_deadline == 99.0
    assert (await s.add_orphan_done(SA_A, 5, "ping-done", "<x/>", 1.0))[0] > 0
    await s.close()
    assert sql(pg_dsn, "SELECT version FROM schema_version") == [(6,)]
    columns = {r[0] for r in sql(pg_dsn, "SELECT column_name FROM information_schema.columns"
                                 " WHERE table_name = 'operations'")}
    assert {"done_deadline", "waiting_for", "claimed_by"} <= columns
    assert op.claimed_by is None and rec.tunnel_owner is None


@pytest_twisted.ensureDeferred
async def test_pg_orphans_stored_before_sizes_survive_the_migration(make_store, pg_dsn):
    migrated(pg_dsn, 2)
    sql(pg_dsn, "INSERT INTO orphan_dones (distribution_id, sa_transaction_id, type, xml,"
        " received_at) VALUES (%s, 4, 'ping-done', '<old/>', 1.0)", SA_A)
    s = make_store()
    await s.open()
    (old,) = await s.take_orphan_dones(SA_A, 4)
    assert (old.xml, old.size) == ("<old/>", 0)


@pytest_twisted.ensureDeferred
async def test_pg_migration_builds_the_queue_heads_of_an_existing_queue(make_store, pg_dsn,
                                                                        clock):
    migrated(pg_dsn, 4)
    now = clock.seconds()
    rows = [  # (SA, state, not_before, waiting_for)
        (SA_A, "queued", now, "the SA to confirm"), (SA_A, "queued", now, None),
        (SA_B, "sending", now, None), (SA_B, "queued", now, None),
        ("C", "started", now, None), ("C", "queued", now + 60, None),
        ("D", "succeeded", now, None), ("D", "queued", now - 5, None), ("D", "queued", now, None),
    ]
    for i, (sa, state, not_before, waiting_for) in enumerate(rows):
        sql(pg_dsn, "INSERT INTO operations (operation_id, distribution_id, operation, params,"
            " state, created_at, updated_at, not_before, waiting_for)"
            " VALUES (%s, %s, 'read-status', '{}', %s, %s, %s, %s, %s)",
            f"op{i}", sa, state, T0 + i, T0 + i, not_before, waiting_for)
    s = make_store()
    await s.open()
    kept, rebuilt = await s._run("heads", pg_queue_heads)
    assert kept == rebuilt and [r[0] for r in kept] == [SA_A, SA_B, "C", "D"]
    assert await s.backlog() == {"queued": 6, "sending": 1, "started": 1, "events": 0}

    async def ready(at=now):
        return [op.operation_id for op in await s.next_dispatchable(at, 10)]

    assert await ready() == ["op7"]  # A waits, B is sending, C not due
    assert await ready(now + 60) == ["op7", "op5"]
    assert [op.operation_id for op in await s.waiting()] == ["op0"]
    assert await s.release_waiting(SA_A, now) == 1
    assert await ready() == ["op7", "op0"]


@pytest_twisted.ensureDeferred
async def test_proxies_starting_together_on_an_empty_database_migrate_once(pg_cluster):
    """Three proxies open one new database at once (a cluster of instances started
    together): one migrates, the others wait and find it done; none fails."""
    for _ in range(5):
        name = create_database(pg_cluster)
        stores = [PostgreSQLStore(pg_cluster.dsn(name), reactor=reactor, pool_size=1)
                  for _ in range(3)]
        try:
            opened = await defer.DeferredList(
                [defer.ensureDeferred(s.open()) for s in stores], consumeErrors=True)
            assert [ok for ok, _ in opened] == [True] * 3, [r for ok, r in opened if not ok]
            assert sql(pg_cluster.dsn(name), "SELECT version FROM schema_version") == [
                (pg_migrations.SCHEMA_VERSION,)]
        finally:
            for s in stores:
                await s.close()
            drop_database(pg_cluster, name)


@pytest_twisted.ensureDeferred
async def test_pg_newer_schema_is_refused(make_store, pg_dsn):
    sql(pg_dsn, "CREATE TABLE schema_version (version INTEGER NOT NULL)")
    sql(pg_dsn, "INSERT INTO schema_version VALUES (99)")
    s = make_store()
    with pytest.raises(StoreError, match=r"^database schema version 99 is newer than this"
                       r" armsproxy \(6\); upgrade armsproxy or use another database$"):
        await s.open()
    assert not pg_threads()  # its threads stopped
    with pytest.raises(StoreError, match="not open"):
        await s.get("x")
    # Calls made while it was opening fail the same way.
    s = make_store()
    opening = defer.ensureDeferred(s.open())
    early = defer.ensureDeferred(s.get("x"))
    with pytest.raises(StoreError, match="newer"):
        await opening
    with pytest.raises(StoreError, match="not open"):
        await early
    assert sql(pg_dsn, "SELECT count(*) FROM information_schema.tables"
               " WHERE table_name = 'operations'") == [(0,)]  # nothing migrated


@pytest_twisted.ensureDeferred
async def test_a_server_that_cannot_be_reached_is_a_store_error(make_store, pg_cluster,
                                                                  tmp_path):
    dsn = f"host={tmp_path} port={pg_cluster.port} user=postgres dbname=x password=s3cret"
    s = make_store(dsn, connect_timeout=2)
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL") as info:
        await s.open()
    assert "s3cret" not in str(info.value)
    assert not pg_threads()


# -- opening, closing, threads, settings ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pg_calls_made_while_the_store_opens_wait_for_it(make_store):
    s = make_store()
    opening = defer.ensureDeferred(s.open())
    early = defer.ensureDeferred(s.submit(new_op(request_id="early")))
    assert not early.called
    await opening
    op, created = await early
    assert created and (await s.get(op.operation_id)).request_id == "early"


@pytest_twisted.ensureDeferred
async def test_pg_close_while_opening_closes_what_open_opens(make_store):
    s = make_store()
    opening = defer.ensureDeferred(s.open())
    closing = defer.ensureDeferred(s.close())
    await opening
    await closing
    assert not pg_threads()
    with pytest.raises(StoreError, match="not open"):
        await s.get("x")


@pytest_twisted.ensureDeferred
async def test_pg_calls_after_close_fail_cleanly_and_close_waits_for_calls(make_store, pg_dsn):
    s = make_store()
    await s.open()
    await s.open()  # idempotent
    pending = [defer.ensureDeferred(s.submit(new_op())) for _ in range(20)]
    await s.close()  # after the calls already made
    assert all(d.called for d in pending)
    await s.close()
    assert not pg_threads()
    with pytest.raises(StoreError):
        await s.submit(new_op())
    assert sql(pg_dsn, "SELECT count(*) FROM operations") == [(20,)]
    # No connection of the store is left on the server.
    assert sql(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
               " 'armsproxy'") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_pg_connection_settings(make_store, pg_dsn):
    # A database whose sessions would acknowledge commits before they are durable.
    dbname = conninfo_to_dict(pg_dsn)["dbname"]
    sql(pg_dsn, f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    sql(pg_dsn, f'ALTER DATABASE "{dbname}" SET default_transaction_isolation = serializable')
    s = make_store(pool_size=2)
    await s.open()

    def settings(conn):
        return [conn.execute(f"SHOW {name}").fetchone()[0] for name in (
            "transaction_isolation", "synchronous_commit", "application_name")]

    for _ in range(4):  # whichever pooled connection
        assert await s._run("settings", settings) == ["read committed", "on", "armsproxy"]


@pytest_twisted.ensureDeferred
async def test_pg_no_store_call_runs_on_the_reactor_thread(store):
    seen = []
    store.db_hook = lambda name: seen.append(
        (name, threading.current_thread().name, threadable.isInIOThread()))
    assert threadable.isInIOThread()
    op, _ = await store.submit(new_op(request_id="t"))
    await store.get(op.operation_id)
    await store.list_operations()
    await store.transition(op.operation_id, expect=["queued"], state="sending")
    await store.update(op.operation_id, {"attempts": 1})
    await store.next_dispatchable(T0, 10)
    await store.claim_dispatchable(T0, 10, busy=[SA_B])
    await store.in_states(["sending"])
    await store.past_deadline(T0)
    await store.waiting()
    await store.release_waiting(SA_A, T0)
    await store.find_by_sa_transaction(SA_A, 1)
    await store.forget(op.operation_id)
    await store.purge_results(T0)
    await store.sa_update(SA_A, push_method="https-simple")
    await store.sa_get(SA_A)
    await store.sa_list()
    await store.add_events([ev("sa.confirmed")])
    (event,) = await store.pending_events(1)
    await store.note_event_attempt(event.seq)
    await store.mark_delivered([event.seq])
    await store.backlog()
    await store.add_orphan_done(SA_A, 1, "ping-done", "<x/>", T0)
    await store.take_orphan_dones(SA_A, 1)
    await store.purge_orphan_dones(T0)
    await store.register_instance("i1", host="h", pid=1, now=T0, lease_until=T0 + 15)
    await store.claim_dispatchable(T0, 10, instance_id="i1")
    await store.take_over("i1", T0)
    await store.retire_instance("i1")
    assert await store.lead()
    await store.resign()
    await store.announce("ops")
    await store.listen(lambda topic: None)  # a thread of its own, named armsproxy-pg-listen
    methods = {n for n, m in vars(Store).items() if callable(m) and not n.startswith("_")}
    assert {name for name, _, _ in seen} == methods - {"open", "close", "listen"}
    assert not any(in_io for _, _, in_io in seen)
    assert all("armsproxy-pg" in thread for _, thread, _ in seen)


# -- durability ----------------------------------------------------------------------------

CHILD_PG = r"""
import os
import sys
from twisted.internet import defer, task
from armsproxy.store import NewOperation
from armsproxy.store.postgresql import PostgreSQLStore

async def main(reactor, dsn, rnd):
    store = PostgreSQLStore(dsn, reactor=reactor)
    await store.open()
    os.write(1, b"OPEN\n")
    i = 0
    while True:
        params = {"round": rnd, "i": i, "blob": bytes([i % 256, rnd]) * 50}
        op, created = await store.submit(NewOperation(
            request_id=f"r{rnd}-{i}", distribution_id=f"sa-{i % 3}",
            operation="read-status", params=params))
        os.write(1, f"S {op.operation_id} {rnd} {i}\n".encode())  # one write: whole line
        if i % 2 == 0:
            await store.transition(
                op.operation_id, expect=["queued"], state="succeeded",
                changes={"result": {"i": i, "data": bytes([i % 256]) * 40}},
                events=[{"kind": "operation.succeeded", "distribution_id": f"sa-{i % 3}",
                         "payload": {"i": i}}],
                raw={"kind": "start-answer", "at": 0.0, "xml": f"<r i='{i}'/>"})
            os.write(1, f"R {op.operation_id} {rnd} {i}\n".encode())
        i += 1

task.react(lambda r: defer.ensureDeferred(main(r, sys.argv[1], int(sys.argv[2]))))
"""


@pytest_twisted.ensureDeferred
async def test_pg_kill_9_loses_no_acknowledged_order_or_result(make_store, pg_dsn, monkeypatch):
    """SIGKILL the proxy mid-stream, five times: every acknowledged order and result is
    there, each success with its event (committed together)."""
    monkeypatch.setattr(base, "CHILD", CHILD_PG)  # test_store's driver, our child
    acked = await threads.deferToThread(base._kill_rounds, pg_dsn, 5)
    submitted = [(op_id, int(rnd), int(i)) for kind, op_id, rnd, i in acked if kind == "S"]
    finished = {op_id for kind, op_id, _, _ in acked if kind == "R"}
    assert len(submitted) >= 15 and finished
    s = make_store()
    await s.open()
    for op_id, rnd, i in submitted:
        op = await s.get(op_id)
        assert op is not None, f"acknowledged order {op_id} lost"
        assert op.request_id == f"r{rnd}-{i}"
        assert op.params == {"round": rnd, "i": i, "blob": bytes([i % 256, rnd]) * 50}
        if op_id in finished:
            assert op.state == "succeeded" and op.result == {"i": i, "data": bytes([i % 256]) * 40}
            assert op.raw == [{"kind": "start-answer", "at": 0.0, "xml": f"<r i='{i}'/>"}]
    events = {e.operation_id for e in await s.pending_events(10_000)}
    assert finished <= events
    assert {op.operation_id for op in await s.in_states(["succeeded"])} == events


def test_the_fixture_gives_each_test_its_own_database(pg_cluster: PGCluster):
    a, b = create_database(pg_cluster), create_database(pg_cluster)
    try:
        assert a != b
        names = {r[0] for r in sql(pg_cluster.dsn(), "SELECT datname FROM pg_database")}
        assert {a, b} <= names
    finally:
        drop_database(pg_cluster, a)
        drop_database(pg_cluster, b)
    assert os.path.isdir(pg_cluster.socket_dir)
