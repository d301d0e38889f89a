"""The durable store on real SQLite files: idempotency, CAS transitions with their outbox events,
per-SA FIFO dispatch, results, registry, orphans, migrations, threads, and kill -9 durability."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.python import threadable

import armsproxy
from armsproxy.store import (
    FINAL,
    STATES,
    NewOperation,
    SQLiteStore,
    Store,
    StoreError,
)
from armsproxy.store.migrations import SCHEMA_VERSION, migrate

SA_A = "0001-0000-1A2B-0105-0000-0000-0000-000A"
SA_B = "0001-0000-1A2B-0105-0000-0000-0000-000B"
SA_C = "0001-0000-1A2B-0105-0000-0000-0000-000C"
T0 = 1_000_000.0


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(T0)
    return c


@pytest_twisted.async_yield_fixture
async def store(tmp_path, clock):
    s = SQLiteStore(tmp_path / "store.db", reactor=reactor, clock=clock)
    await s.open()
    yield s
    await s.close()


def new_op(distid=SA_A, operation="read-status", **kw):
    return NewOperation(distribution_id=distid, operation=operation, **kw)


def ev(kind, distid=SA_A, **payload):
    return {"kind": kind, "distribution_id": distid, "payload": payload}


def count(path, sql, *args):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchone()[0]
    finally:
        conn.close()


def test_sqlite_store_satisfies_the_protocol():
    # Every method of the Protocol exists on the backend with the same parameter names.
    import inspect

    for name, member in vars(Store).items():
        if name.startswith("_") or not callable(member):
            continue
        impl = getattr(SQLiteStore, name)
        assert inspect.iscoroutinefunction(impl), name
        want = list(inspect.signature(member).parameters)
        assert list(inspect.signature(impl).parameters) == want, name


# -- submit --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_submit_stores_a_queued_operation(store, clock):
    op, created = await store.submit(new_op(params={"a": 1}, sa_url="https://10.0.0.1/x"))
    assert created
    assert len(op.operation_id) == 32 and int(op.operation_id, 16) >= 0
    assert op.state == "queued" and op.attempts == 0 and not op.forgotten
    assert op.created_at == op.updated_at == op.not_before == T0
    assert op.params == {"a": 1} and op.sa_url == "https://10.0.0.1/x"
    assert op.raw == [] and op.result is None and op.done_deadline is None
    assert await store.get(op.operation_id) == op
    assert await store.get("0" * 32) is None


@pytest_twisted.ensureDeferred
async def test_submit_is_idempotent_by_request_id(store):
    first, created1 = await store.submit(new_op(request_id="rq-1", params={"v": 1}))
    again, created2 = await store.submit(new_op(request_id="rq-1", params={"v": 2}))
    assert created1 and not created2
    assert again.operation_id == first.operation_id and again.params == {"v": 1}
    other, created3 = await store.submit(new_op(request_id="rq-2"))
    assert created3 and other.operation_id != first.operation_id
    # No request_id: every submit is a new order.
    a, _ = await store.submit(new_op())
    b, _ = await store.submit(new_op())
    assert a.operation_id != b.operation_id
    assert count(store.path, "SELECT COUNT(*) FROM operations") == 4


@pytest_twisted.ensureDeferred
async def test_concurrent_submits_of_one_request_id_create_one_row(store, tmp_path, clock):
    # A second store on the same file = a second connection and thread (another process would
    # be the same): only the UNIQUE constraint can keep this to one row.
    other = SQLiteStore(store.path, reactor=reactor, clock=clock)
    await other.open()
    try:
        calls = [
            defer.ensureDeferred(s.submit(new_op(request_id="same", params={"i": i})))
            for i in range(40)
            for s in (store, other)
        ]
        results = await defer.gatherResults(calls)
    finally:
        await other.close()
    assert len({op.operation_id for op, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert count(store.path, "SELECT COUNT(*) FROM operations WHERE request_id = 'same'") == 1


@pytest_twisted.ensureDeferred
async def test_unencodable_params_store_nothing(store):
    with pytest.raises(TypeError):
        await store.submit(new_op(params={"x": object()}))
    assert count(store.path, "SELECT COUNT(*) FROM operations") == 0


@pytest_twisted.ensureDeferred
async def test_backlog_counts_operations_not_final_and_undelivered_events(store):
    assert await store.backlog() == {"queued": 0, "sending": 0, "started": 0, "events": 0}
    ops = [(await store.submit(new_op()))[0] for _ in range(4)]
    await store.transition(ops[0].operation_id, expect=["queued"], state="sending",
                           events=[ev("operation.sending")])
    await store.transition(ops[1].operation_id, expect=["queued"], state="succeeded",
                           events=[ev("operation.succeeded")])
    assert await store.backlog() == {"queued": 2, "sending": 1, "started": 0, "events": 2}
    await store.mark_delivered([e.seq for e in await store.pending_events(10)])
    assert (await store.backlog())["events"] == 0


# -- transition ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_transition_applies_changes_raw_and_events_together(store, clock):
    op, _ = await store.submit(new_op())
    clock.advance(5)
    raw = {"kind": "start-request", "at": T0 + 5, "xml": "<arms-message/>"}
    sent = await store.transition(
        op.operation_id,
        expect=["queued"],
        state="sending",
        changes={"attempts": 1},
        raw=raw,
    )
    assert sent.state == "sending" and sent.attempts == 1 and sent.updated_at == T0 + 5
    assert sent.raw == [raw]
    clock.advance(1)
    answer = {"kind": "start-answer", "at": T0 + 6, "xml": "<arms-message>100</arms-message>"}
    started = await store.transition(
        op.operation_id,
        expect=["sending"],
        state="started",
        changes={"sa_transaction_id": 7, "start_result_code": 100, "done_deadline": T0 + 600},
        events=[ev("operation.started", transaction_id=7)],
        raw=answer,
    )
    assert started.state == "started" and started.sa_transaction_id == 7
    assert started.done_deadline == T0 + 600 and started.raw == [raw, answer]
    (event,) = await store.pending_events(10)
    assert event.kind == "operation.started" and event.operation_id == op.operation_id
    assert event.payload == {"transaction_id": 7} and event.created_at == T0 + 6
    assert await store.get(op.operation_id) == started


@pytest_twisted.ensureDeferred
async def test_transition_is_compare_and_set(store, clock):
    op, _ = await store.submit(new_op())
    clock.advance(3)
    wrong = await store.transition(
        op.operation_id,
        expect=["sending", "started"],
        state="succeeded",
        changes={"result_code": 100, "result": {"x": 1}},
        events=[ev("operation.succeeded")],
        raw={"kind": "done-request", "at": 1.0, "xml": "<x/>"},
    )
    assert wrong is None
    assert await store.get(op.operation_id) == op  # not even updated_at moved
    assert await store.pending_events(10) == []
    missing = await store.transition("f" * 32, expect=["queued"], state="cancelled")
    assert missing is None
    # The winner of two racing transitions is the first; the second finds the state moved on.
    first = defer.ensureDeferred(
        store.transition(op.operation_id, expect=["queued"], state="cancelled")
    )
    second = defer.ensureDeferred(
        store.transition(op.operation_id, expect=["queued"], state="sending")
    )
    won, lost = await defer.gatherResults([first, second])
    assert won.state == "cancelled" and lost is None


@pytest_twisted.ensureDeferred
async def test_transition_and_events_are_atomic(store):
    op, _ = await store.submit(new_op())
    # The UPDATE and the first event are written before the second event fails to encode.
    with pytest.raises(TypeError):
        await store.transition(
            op.operation_id,
            expect=["queued"],
            state="sending",
            changes={"attempts": 1},
            events=[ev("operation.started"), ev("operation.failed", bad=object())],
            raw={"kind": "start-request", "at": 1.0, "xml": "<x/>"},
        )
    # An event without a kind fails the same way.
    with pytest.raises(ValueError, match="kind"):
        await store.transition(
            op.operation_id,
            expect=["queued"],
            state="sending",
            events=[ev("operation.started"), {"distribution_id": SA_A, "payload": {}}],
        )
    assert await store.get(op.operation_id) == op
    assert await store.pending_events(10) == []
    assert count(store.path, "SELECT COUNT(*) FROM outbox") == 0
    assert count(store.path, "SELECT COUNT(*) FROM operation_raw") == 0
    # The store is still usable after the rollbacks.
    assert (await store.transition(op.operation_id, expect=["queued"], state="sending")).state


@pytest_twisted.ensureDeferred
async def test_transition_refuses_unknown_states_and_fields(store):
    op, _ = await store.submit(new_op())
    with pytest.raises(ValueError, match="state"):
        await store.transition(op.operation_id, expect=["queued"], state="done")
    for field in ("operation_id", "request_id", "distribution_id", "state", "raw", "nope"):
        with pytest.raises(ValueError, match=field):
            await store.transition(
                op.operation_id, expect=["queued"], state="sending", changes={field: "x"}
            )
        with pytest.raises(ValueError, match=field):
            await store.update(op.operation_id, {field: "x"})
    assert await store.get(op.operation_id) == op


@pytest_twisted.ensureDeferred
async def test_update_changes_fields_without_state(store, clock):
    op, _ = await store.submit(new_op())
    clock.advance(2)
    changed = await store.update(
        op.operation_id, {"attempts": 3, "not_before": T0 + 60, "last_error": "timeout"}
    )
    assert changed.state == "queued" and changed.attempts == 3
    assert changed.not_before == T0 + 60 and changed.last_error == "timeout"
    assert changed.updated_at == T0 + 2
    assert await store.update("e" * 32, {"attempts": 1}) is None


# -- dispatch order ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_next_dispatchable_is_per_sa_fifo(store, clock):
    ids = {}
    for name in ("a1", "b1", "a2", "a3", "b2"):
        op, _ = await store.submit(new_op(SA_A if name[0] == "a" else SA_B))
        ids[name] = op.operation_id
        clock.advance(1)
    now = clock.seconds()

    async def ready(at=now, limit=10):
        return [op.operation_id for op in await store.next_dispatchable(at, limit)]

    def names(*ns):
        return [ids[n] for n in ns]

    assert await ready() == names("a1", "b1")  # heads only, in submit order
    assert await ready(limit=1) == names("a1")
    await store.transition(ids["a1"], expect=["queued"], state="sending")
    assert await ready() == names("b1")  # a1 being sent blocks SA A
    await store.transition(ids["a1"], expect=["sending"], state="started")
    assert await ready() == names("b1", "a2")  # started (waiting for its done) does not
    # b1 backs off: b2 must not overtake it.
    await store.update(ids["b1"], {"not_before": now + 30})
    assert await ready() == names("a2")
    assert await ready(at=now + 30) == names("a2", "b1")  # the heads due longest first
    # A re-queued operation keeps its place at the head.
    await store.transition(ids["a2"], expect=["queued"], state="sending")
    await store.transition(ids["a2"], expect=["sending"], state="queued")
    assert await ready() == names("a2")
    # Final operations are out of the queue.
    await store.transition(ids["a2"], expect=["queued"], state="cancelled")
    assert await ready() == names("a3")
    await store.transition(ids["a3"], expect=["queued"], state="sending")
    await store.transition(ids["a3"], expect=["sending"], state="succeeded")
    await store.transition(ids["a1"], expect=["started"], state="expired")
    assert await ready() == []
    assert await ready(at=now + 30) == names("b1")


@pytest_twisted.ensureDeferred
async def test_a_waiting_head_holds_its_sa_until_released(store, clock):
    """An order waiting for its SA (unreachable) is not handed out, nor is anything behind
    it; releasing the SA makes its whole queue due at once, and no other SA's."""
    a1, _ = await store.submit(new_op(SA_A))
    a2, _ = await store.submit(new_op(SA_A))
    b1, _ = await store.submit(new_op(SA_B))
    now = clock.seconds()

    async def ready(at=now):
        return [op.operation_id for op in await store.next_dispatchable(at, 10)]

    parked = await store.transition(a1.operation_id, expect=["queued"], state="queued",
                                    changes={"waiting_for": "the SA to confirm"})
    assert parked.waiting_for == "the SA to confirm"
    await store.update(b1.operation_id, {"waiting_for": "a tunnel", "not_before": now + 50})
    assert await ready(now + 1e9) == []  # neither head, nor a2 behind a1
    assert [op.operation_id for op in await store.waiting()] == [a1.operation_id,
                                                                  b1.operation_id]
    await store.update(a2.operation_id, {"not_before": now + 300})  # e.g. a retry delay
    clock.advance(5)
    assert await store.release_waiting(SA_A, clock.seconds()) == 2
    assert await store.release_waiting(SA_A, clock.seconds()) == 0  # nothing left to do
    released = await store.get(a1.operation_id)
    assert released.waiting_for is None and released.not_before == now  # was due already
    assert (await store.get(a2.operation_id)).not_before == clock.seconds()  # cut short
    assert await ready(clock.seconds()) == [a1.operation_id]
    assert (await store.get(b1.operation_id)).waiting_for == "a tunnel"  # other SA untouched
    # Leaving `queued` clears it: only a queued order waits.
    cancelled = await store.transition(b1.operation_id, expect=["queued"], state="cancelled")
    assert cancelled.waiting_for is None
    assert await store.waiting() == []


# -- claim: the dispatch pick and queued -> sending in one commit (issue #11) ---------------


async def _queue(store, clock, *names):
    """Submit one order per name (first letter: SA a/b/c), a second apart; name -> id."""
    sas = {"a": SA_A, "b": SA_B, "c": SA_C}
    ids = {}
    for name in names:
        op, _ = await store.submit(new_op(sas[name[0]]))
        ids[name] = op.operation_id
        clock.advance(1)
    return ids


@pytest_twisted.ensureDeferred
async def test_claim_takes_the_heads_next_dispatchable_picks_and_sends_them(store, clock):
    ids = await _queue(store, clock, "a1", "b1", "a2", "c1")
    await store.update(ids["c1"], {"not_before": clock.seconds() + 30})  # not due yet
    now = clock.seconds()
    picked = [op.operation_id for op in await store.next_dispatchable(now, 10)]
    calls = []
    store.db_hook = calls.append
    claimed = await store.claim_dispatchable(now, 10)
    assert calls == ["claim_dispatchable"]  # one store call, one commit
    assert [op.operation_id for op in claimed] == picked == [ids["a1"], ids["b1"]]
    for op in claimed:
        assert (op.state, op.attempts, op.updated_at, op.waiting_for) == ("sending", 1, now,
                                                                           None)
        assert op.not_before == op.created_at  # unchanged
        assert await store.get(op.operation_id) == op  # as stored
    assert await store.backlog() == {"queued": 2, "sending": 2, "started": 0, "events": 0}
    # Both SAs are sending now: nothing of theirs is picked, and c1 is not due.
    assert await store.claim_dispatchable(now, 10) == []
    assert await store.next_dispatchable(now, 10) == []
    # A claimed order is the claimer's: it cannot be cancelled under it.
    assert await store.transition(ids["a1"], expect=["queued"], state="cancelled") is None
    # Handed back (e.g. its SA is not reachable): attempts restored, the head waits.
    back = await store.transition(ids["a1"], expect=["sending"], state="queued",
                                  changes={"attempts": 0, "waiting_for": "the SA"})
    assert (back.state, back.attempts, back.waiting_for) == ("queued", 0, "the SA")
    # SA A's head waits, SA B is sending: of the rest, only c1 (due by now).
    assert [op.operation_id for op in await store.claim_dispatchable(now + 60, 10)] == [
        ids["c1"]]


@pytest_twisted.ensureDeferred
async def test_claim_skips_busy_sas_and_counts_only_the_others(store, clock):
    ids = await _queue(store, clock, "a1", "b1", "c1", "a2")
    now = clock.seconds()
    calls = []
    store.db_hook = calls.append
    assert await store.claim_dispatchable(now, 0, busy=[SA_B]) == []
    assert calls == []  # nothing asked, nothing run
    (only,) = await store.claim_dispatchable(now, 1, busy=[SA_A])
    assert only.operation_id == ids["b1"]  # a1 skipped, and the limit counts b1
    assert [op.operation_id for op in await store.claim_dispatchable(
        now, 10, busy={SA_A, SA_B, "not an SA"})] == [ids["c1"]]
    assert (await store.get(ids["a1"])).state == "queued"  # skipped, untouched
    (a1,) = await store.claim_dispatchable(now, 10, busy=())
    assert a1.operation_id == ids["a1"] and a1.attempts == 1


@pytest_twisted.ensureDeferred
async def test_instances_claim_with_their_id_and_take_over_what_the_dead_left(store, clock):
    """#12: a claim records its instance; what an instance whose lease ran out left
    `sending` is claimed by the one taking over, once, and its tunnels are released. (SQLite
    has one process: every other instance is dead to it; here the other's lease ran out, so
    both backends agree.)"""
    now = clock.seconds()
    assert not await store.register_instance("a", host="h", pid=1, now=now,
                                             lease_until=now + 15)  # created
    assert await store.register_instance("a", host="h", pid=1, now=now, lease_until=now + 15)
    await store.register_instance("b", host="h", pid=2, now=now, lease_until=now + 60)
    op, _ = await store.submit(new_op(SA_A))
    behind, _ = await store.submit(new_op(SA_A))
    (claimed,) = await store.claim_dispatchable(now, 10, instance_id="a")
    assert claimed.claimed_by == "a" and (await store.get(op.operation_id)).claimed_by == "a"
    assert (await store.sa_update(SA_A, tunnel_owner="a")).tunnel_owner == "a"
    assert [o.operation_id for o in await store.take_over(None, now)] == [op.operation_id]
    assert (await store.get(op.operation_id)).claimed_by == "a"  # None: nothing changes
    (taken,) = await store.take_over("b", now + 16)
    assert (taken.operation_id, taken.state, taken.claimed_by) == (op.operation_id, "sending",
                                                                   "b")
    assert (await store.get(behind.operation_id)).claimed_by is None  # queued: not taken
    assert await store.take_over("b", now + 16) == []
    assert (await store.sa_get(SA_A)).tunnel_owner is None
    # A tunnel is released only by the instance that holds it.
    await store.sa_update(SA_B, tunnel_owner="b")
    assert (await store.sa_update(SA_B, confirmed=True, release_tunnel="a")).tunnel_owner == "b"
    assert (await store.sa_update(SA_B, release_tunnel="b")).tunnel_owner is None
    await store.sa_update(SA_B, tunnel_owner="b")
    await store.retire_instance("b")
    assert (await store.sa_get(SA_B)).tunnel_owner is None


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_never_return_the_same_operation(store, clock):
    # Two stores on one file (a second process would be the same), each claiming in turns.
    other = SQLiteStore(store.path, reactor=reactor, clock=clock)
    await other.open()
    try:
        sas = [f"0001-0000-1A2B-0105-0000-0000-0001-{i:04X}" for i in range(30)]
        for sa in sas:
            for _ in range(3):
                await store.submit(new_op(sa))
        now = clock.seconds()
        claimed = []
        for _ in range(3):  # each round: every SA's head, once, then it is sent and done
            calls = [defer.ensureDeferred(s.claim_dispatchable(now, 7))
                     for _ in range(6) for s in (store, other)]
            got = [op for ops in await defer.gatherResults(calls) for op in ops]
            ids = [op.operation_id for op in got]
            assert len(ids) == len(set(ids)) == len(sas)
            assert {op.distribution_id for op in got} == set(sas)  # one per SA
            claimed += ids
            for op in got:
                await store.transition(op.operation_id, expect=["sending"], state="succeeded")
    finally:
        await other.close()
    assert len(claimed) == len(set(claimed)) == 90
    assert count(store.path, "SELECT COUNT(*) FROM operations WHERE attempts != 1") == 0


@pytest_twisted.ensureDeferred
async def test_a_waiting_or_late_head_is_not_claimed(store, clock):
    ids = await _queue(store, clock, "a1", "a2", "b1")
    now = clock.seconds()
    await store.update(ids["a1"], {"waiting_for": "the SA to confirm"})
    await store.update(ids["b1"], {"not_before": now + 10})
    assert await store.claim_dispatchable(now, 10) == []  # a2 never overtakes a1
    (b1,) = await store.claim_dispatchable(now + 10, 10)
    assert b1.operation_id == ids["b1"] and b1.not_before == now + 10


# -- changes come back from the statement that made them ------------------------------------


def _statements(store):
    """The SQL statements the store runs from now on (``stop()`` ends the trace)."""
    seen = []

    async def start():
        await store._run("trace", lambda c: c.set_trace_callback(seen.append))

    async def stop():
        await store._run("trace", lambda c: c.set_trace_callback(None))
        return [s for s in seen if not s.lstrip().startswith("--")]  # not trigger bodies

    return start, stop


async def _life(store, clock, operation_id):
    """Claim, start (result, raw with bytes, an event), update, succeed (second raw): each
    call's return value, each followed by nothing (the caller compares or traces)."""
    clock.advance(1)
    (claimed,) = await store.claim_dispatchable(clock.seconds(), 5)
    yield claimed
    clock.advance(1)
    yield await store.transition(
        operation_id, expect=["sending"], state="started",
        changes={"sa_transaction_id": 9, "result": {"x": b"\xff"}, "done_deadline": T0 + 50},
        raw={"kind": "start", "at": 1.5, "request": "<a/>", "bytes": b"\x02"},
        events=[ev("operation.started")])
    yield await store.update(operation_id, {"last_error": "still waiting"})
    clock.advance(1)
    yield await store.transition(operation_id, expect=["started"], state="succeeded",
                                 raw={"kind": "done", "at": 2.5, "request": "<d/>"})


@pytest_twisted.ensureDeferred
async def test_transitions_return_the_row_as_get_gives_it(store, clock):
    op, _ = await store.submit(new_op(params={"b": b"\x00\x01"}, expires_at=T0 + 99))
    assert op == await store.get(op.operation_id)
    states = []
    async for returned in _life(store, clock, op.operation_id):
        assert returned == await store.get(op.operation_id)
        states.append((returned.state, returned.attempts, len(returned.raw)))
    assert states == [("sending", 1, 0), ("started", 1, 1), ("started", 1, 1),
                      ("succeeded", 1, 2)]
    final = await store.get(op.operation_id)
    assert [e["kind"] for e in final.raw] == ["start", "done"]
    assert final.raw[0]["bytes"] == b"\x02" and final.result == {"x": b"\xff"}
    assert final.params == {"b": b"\x00\x01"} and final.last_error == "still waiting"


@pytest_twisted.ensureDeferred
async def test_changes_are_not_read_back(store, clock):
    op, _ = await store.submit(new_op())
    start, stop = _statements(store)
    await start()
    async for _ in _life(store, clock, op.operation_id):
        pass
    statements = await stop()
    # Each change is one UPDATE ... RETURNING; only the raw entries are read (as JSON).
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert all("FROM operation_raw" in s or "FROM sa_queues" in s for s in reads), reads
    # (A statement shows once more per trigger it fires: SQLite traces each sub-program.)
    updates = {s for s in statements if s.lstrip().startswith("UPDATE operations")}
    assert len(updates) == 4 and all("RETURNING" in s for s in updates), updates


@pytest_twisted.ensureDeferred
async def test_submit_returns_the_inserted_row_without_reading_it(store):
    start, stop = _statements(store)
    await start()
    op, created = await store.submit(new_op(request_id="r", params={"k": [1, "x"]}))
    again, created_again = await store.submit(new_op(request_id="r"))
    statements = await stop()
    assert created and not created_again and op == again == await store.get(op.operation_id)
    inserts = {s for s in statements if s.lstrip().startswith("INSERT INTO operations")}
    reads = [s for s in statements if s.lstrip().startswith("SELECT")]
    assert len(inserts) == 2 and all("RETURNING" in s for s in inserts)
    from_operations = [s for s in reads if "FROM operations" in s]
    assert len(from_operations) == 1 and "request_id =" in from_operations[0]  # the repeat


def test_raw_entries_decode_once_and_compare_as_a_list():
    from armsproxy.store.model import RawEntries, dump_json

    raw = RawEntries([dump_json({"kind": "start", "b": b"\x01"}), dump_json({"kind": "done"})])
    assert len(raw) == 2 and raw._texts is not None  # nothing decoded yet
    assert raw == [{"kind": "start", "b": b"\x01"}, {"kind": "done"}] == raw
    assert raw[1] == {"kind": "done"} and [e["kind"] for e in raw] == ["start", "done"]
    assert raw._texts is None and raw[0] is raw[0]  # decoded once
    assert RawEntries() == [] and RawEntries() != [{}] and raw != "not a list"
    assert repr(RawEntries([dump_json({"a": 1})])) == "[{'a': 1}]"


@pytest_twisted.ensureDeferred
async def test_past_deadline_returns_only_what_is_due(store, clock):
    now = clock.seconds()
    late, _ = await store.submit(new_op(SA_A, expires_at=now + 10))
    later, _ = await store.submit(new_op(SA_B, expires_at=now + 100))
    await store.submit(new_op(SA_B))  # no deadline
    started, _ = await store.submit(new_op(SA_A, expires_at=now + 1))
    await store.transition(started.operation_id, expect=["queued"], state="started",
                           changes={"done_deadline": now + 20})
    assert await store.past_deadline(now) == []
    due = await store.past_deadline(now + 20)
    assert [op.operation_id for op in due] == [late.operation_id, started.operation_id]
    assert len(await store.past_deadline(now + 100)) == 3
    assert later.operation_id in [op.operation_id for op in await store.past_deadline(now + 100)]


@pytest_twisted.ensureDeferred
async def test_past_deadline_pages_earliest_deadlines_first(store, clock):
    """A page holds the earliest deadlines (queued and started alike), in submit order; the
    engine asks again while pages come back full."""
    now = clock.seconds()
    a, _ = await store.submit(new_op(SA_A, expires_at=now + 4))
    b, _ = await store.submit(new_op(SA_B, expires_at=now + 1))
    c, _ = await store.submit(new_op(SA_B, expires_at=now + 3))
    d, _ = await store.submit(new_op(SA_A, expires_at=now + 50))
    await store.transition(d.operation_id, expect=["queued"], state="started",
                           changes={"done_deadline": now + 2})

    async def due(limit):
        return [op.operation_id for op in await store.past_deadline(now + 10, limit=limit)]

    assert await due(2) == [b.operation_id, d.operation_id]
    assert await due(3) == [b.operation_id, c.operation_id, d.operation_id]
    assert await due(10) == [a.operation_id, b.operation_id, c.operation_id, d.operation_id]


def queue_heads(conn):
    """sa_queues as kept by the triggers, and as rebuilt from scratch (migration 5's way)."""
    kept = conn.execute("SELECT * FROM sa_queues ORDER BY distribution_id").fetchall()
    rebuilt = conn.execute(
        "SELECT q.distribution_id, q.head, op.not_before, COALESCE(op.waiting_for IS NOT NULL,"
        " 0), q.busy FROM (SELECT distribution_id, MIN(seq) FILTER (WHERE state = 'queued')"
        " AS head, MAX(state = 'sending') AS busy FROM operations"
        " WHERE state IN ('queued', 'sending') GROUP BY distribution_id) AS q"
        " LEFT JOIN operations AS op ON op.seq = q.head ORDER BY q.distribution_id").fetchall()
    return [tuple(r) for r in kept], [tuple(r) for r in rebuilt]


@pytest_twisted.ensureDeferred
async def test_queue_heads_follow_every_change(store, clock):
    """Random submits, sends, retries, parks, releases, cancels: after each, the per-SA heads
    the triggers keep equal a rebuild from scratch, backlog() equals a count of every
    operation, and next_dispatchable equals the rule
    computed over every operation (per SA the oldest queued one, unless the SA is sending,
    the head waits or is not due; those due longest first)."""
    rnd = random.Random(11)
    sas = [SA_A, SA_B, "0001-0000-1A2B-0105-0000-0000-0000-000C"]
    moves = {"queued": ["sending", "cancelled", "queued"], "sending": ["queued", "started",
             "failed"], "started": ["succeeded", "expired"]}
    for step in range(160):
        ops = await store.list_operations(limit=1000)
        live = [op for op in ops if op.state in moves]
        action = rnd.random()
        if action < 0.35 or not live:
            await store.submit(new_op(rnd.choice(sas)))
        elif action < 0.45:
            await store.release_waiting(rnd.choice(sas), clock.seconds())
        else:
            op = rnd.choice(live)
            state = rnd.choice(moves[op.state])
            changes = {}
            if state == "queued":
                changes = rnd.choice([{"not_before": clock.seconds() + rnd.choice([0, 30])},
                                      {"waiting_for": "the SA to confirm"}])
            await store.transition(op.operation_id, expect=[op.state], state=state,
                                   changes=changes)
        clock.advance(1)
        kept, rebuilt = await store._run("heads", queue_heads)
        assert kept == rebuilt, step
        backlog = await store.backlog()
        ops = await store.list_operations(limit=1000)
        assert {s: backlog[s] for s in moves} == {
            s: sum(op.state == s for op in ops) for s in moves}, step
        ops = await store.list_operations(limit=1000)  # created_at order = submit order
        for at in (clock.seconds(), clock.seconds() + 30):
            heads = []
            for sa in sas:
                mine = [op for op in ops if op.distribution_id == sa]
                queued = [op for op in mine if op.state == "queued"]
                if queued and not any(op.state == "sending" for op in mine) \
                        and queued[0].waiting_for is None and queued[0].not_before <= at:
                    heads.append(queued[0])
            heads.sort(key=lambda op: (op.not_before, ops.index(op)))
            got = [op.operation_id for op in await store.next_dispatchable(at, 10)]
            assert got == [op.operation_id for op in heads], step


@pytest_twisted.ensureDeferred
async def test_migration_builds_the_queue_heads_of_an_existing_queue(tmp_path, clock):
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=4) == 4
    now = clock.seconds()
    rows = [  # (SA, state, not_before, waiting_for)
        (SA_A, "queued", now, "the SA to confirm"), (SA_A, "queued", now, None),
        (SA_B, "sending", now, None), (SA_B, "queued", now, None),
        ("C", "started", now, None), ("C", "queued", now + 60, None),
        ("D", "succeeded", now, None), ("D", "queued", now - 5, None), ("D", "queued", now, None),
    ]
    for i, (sa, state, not_before, waiting_for) in enumerate(rows):
        conn.execute(
            "INSERT INTO operations (operation_id, distribution_id, operation, params, state,"
            " created_at, updated_at, not_before, waiting_for)"
            " VALUES (?, ?, 'read-status', '{}', ?, ?, ?, ?, ?)",
            (f"op{i}", sa, state, T0 + i, T0 + i, not_before, waiting_for))
    conn.close()
    s = SQLiteStore(path, reactor=reactor, clock=clock)
    await s.open()
    try:
        kept, rebuilt = await s._run("heads", queue_heads)
        assert kept == rebuilt and [r[0] for r in kept] == [SA_A, SA_B, "C", "D"]
        assert await s.backlog() == {"queued": 6, "sending": 1, "started": 1, "events": 0}

        async def ready(at=now):
            return [op.operation_id for op in await s.next_dispatchable(at, 10)]

        assert await ready() == ["op7"]  # A waits, B is sending, C not due
        assert await ready(now + 60) == ["op7", "op5"]
        assert [op.operation_id for op in await s.waiting()] == ["op0"]
        assert await s.release_waiting(SA_A, now) == 1
        assert await ready() == ["op7", "op0"]  # D's head has been due longer than A's
    finally:
        await s.close()


async def _plans(store, call):
    """(statement, plan) of each statement ``call`` makes the store run, parameters inlined
    (every plan checked below names its index, or seeks by equality: inlining changes none)."""
    statements = []
    await store._run("trace", lambda c: c.set_trace_callback(statements.append))
    try:
        await call()
    finally:
        await store._run("trace", lambda c: c.set_trace_callback(None))

    def explain(conn):
        return [(sql, " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql)))
                for sql in statements
                if sql.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "INSERT", "DELETE")]

    return await store._run("explain", explain)


@pytest_twisted.ensureDeferred
async def test_hot_queries_read_only_what_they_return(store, clock):
    """Issue #11: dispatch, deadline scan, listings, waiting orders and purges each read one
    index range that starts at what they return (no full scan, no sort of all matches);
    a plan that changes fails here, not as a slow queue at a million rows."""
    now = clock.seconds()
    for i in range(6):
        op, _ = await store.submit(new_op(SA_A if i % 2 else SA_B, expires_at=now + 60))
    await store.transition(op.operation_id, expect=["queued"], state="started",
                           changes={"done_deadline": now + 30, "sa_transaction_id": 3})

    async def plans(call):
        found = await _plans(store, call)
        assert found
        for sql, plan in found:
            # A SCAN only of an index, in the order asked for (LIMIT stops it): no table scan.
            assert all("INDEX" in step for step in plan.split(" | ")
                       if step.startswith("SCAN")), (sql, plan)
            if "operation_raw" not in sql:
                assert "TEMP B-TREE" not in plan or "INDEXED BY operations_state_sa" in sql, \
                    (sql, plan)
        return " || ".join(plan for _, plan in found)

    dispatch = await plans(lambda: store.next_dispatchable(now, 200))
    assert "SEARCH q USING INDEX sa_queues_ready (not_before<?)" in dispatch
    assert "SEARCH op USING INTEGER PRIMARY KEY (rowid=?)" in dispatch
    # The claim: the same pick (busy SAs looked up in a list built once), then the claimed
    # rows by primary key.
    claim = await plans(lambda: store.claim_dispatchable(now, 200, busy=[SA_C]))
    assert "SEARCH q USING INDEX sa_queues_ready (not_before<?)" in claim
    assert "SEARCH operations USING INTEGER PRIMARY KEY (rowid=?)" in claim, claim
    assert "operations_state" not in claim, claim  # never every queued row
    # A transition: the operation by its id, whatever the states expected.
    change = await plans(lambda: store.transition(op.operation_id, expect=["started", "queued"],
                                                  state="started", changes={"attempts": 2}))
    assert "sqlite_autoindex_operations_1 (operation_id=?)" in change, change
    assert "operations_state" not in change, change
    due = await plans(lambda: store.past_deadline(now))
    assert "USING INDEX operations_queued_expires (expires_at<?)" in due
    assert "USING INDEX operations_started_done (done_deadline<?)" in due
    assert "USING INDEX operations_waiting" in await plans(store.waiting)
    states = ["queued", "sending", "started"]
    listing = await plans(lambda: store.list_operations(states=states))
    assert "MERGE (UNION ALL)" in listing
    assert listing.count("USING INDEX operations_state_created (state=?)") == 3
    ranged = await plans(lambda: store.list_operations(states=["queued"], since=1, until=2))
    assert "operations_state_created (state=? AND created_at>? AND created_at<?)" in ranged
    assert "operations_created" in await plans(store.list_operations)
    assert "operations_sa_created (distribution_id=?)" in await plans(
        lambda: store.list_operations(distribution_id=SA_A))
    assert "operations_state_sa (state=? AND distribution_id=?)" in await plans(
        lambda: store.list_operations(distribution_id=SA_A, states=["started"]))
    assert "operations_state_sa (state=? AND distribution_id=?)" in await plans(
        lambda: store.release_waiting(SA_A, now))
    assert "operations_purge (updated_at<?)" in await plans(lambda: store.purge_results(now))
    txn = await plans(lambda: store.find_by_sa_transaction(SA_A, 3))
    assert "USING INDEX operations_sa_txn (distribution_id=? AND sa_transaction_id=?)" in txn

    # The triggers' statements: two seeks and an upsert by primary key, whatever the SA.
    def trigger_plans(conn):
        from armsproxy.store.migrations import _refresh_queue

        return [" | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
                for sql in _refresh_queue(repr(SA_A)).split(";") if sql.strip()]

    upsert, delete = await store._run("plans", trigger_plans)
    assert upsert.count("operations_state_sa (state=? AND distribution_id=?)") == 2, upsert
    assert "SCAN operations" not in upsert
    assert "SEARCH sa_queues USING PRIMARY KEY (distribution_id=?)" in delete


# -- results, lookups, lists ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bytes_round_trip_in_params_and_results(store, tmp_path, clock):
    params = {
        "md_configs": [{"id": 10, "data": b"\x00\x89CFG\xff\r\n"}],
        "nested": {"blob": b"", "text": "é"},
        "binary": xmlrpc.client.Binary(b"\x01\x02"),
    }
    op, _ = await store.submit(new_op(operation="configure", params=params))
    result = {"status": [{"id": 10, "data": b"\xde\xad\xbe\xef"}], "count": 3}
    await store.transition(op.operation_id, expect=["queued"], state="sending")
    await store.transition(
        op.operation_id, expect=["sending"], state="succeeded", changes={"result": result}
    )
    await store.add_events([ev("operation.succeeded", data=b"\x00")])
    await store.close()
    reopened = SQLiteStore(tmp_path / "store.db", reactor=reactor, clock=clock)
    await reopened.open()
    try:
        got = await reopened.get(op.operation_id)
        (event,) = await reopened.pending_events(5)
    finally:
        await reopened.close()
    assert got.params == {**params, "binary": b"\x01\x02"}
    assert got.params["md_configs"][0]["data"] == b"\x00\x89CFG\xff\r\n"
    assert got.result == result and event.payload == {"data": b"\x00"}
    await store.open()  # the fixture closes it again


@pytest_twisted.ensureDeferred
async def test_find_by_sa_transaction_gives_the_most_recent(store):
    old, _ = await store.submit(new_op())
    new, _ = await store.submit(new_op())
    other, _ = await store.submit(new_op(SA_B))
    for op in (old, new, other):
        await store.update(op.operation_id, {"sa_transaction_id": 42})
    assert (await store.find_by_sa_transaction(SA_A, 42)).operation_id == new.operation_id
    assert (await store.find_by_sa_transaction(SA_B, 42)).operation_id == other.operation_id
    assert await store.find_by_sa_transaction(SA_A, 43) is None


@pytest_twisted.ensureDeferred
async def test_list_operations_and_in_states(store, clock):
    ops = []
    for i in range(6):
        op, _ = await store.submit(new_op(SA_A if i % 2 else SA_B, params={"i": i}))
        ops.append(op)
        clock.advance(10)
    await store.transition(ops[1].operation_id, expect=["queued"], state="sending")
    await store.transition(ops[4].operation_id, expect=["queued"], state="cancelled")

    def ids(lst):
        return [o.operation_id for o in lst]

    assert ids(await store.list_operations()) == ids(ops)
    assert ids(await store.list_operations(limit=2, offset=1)) == ids(ops[1:3])
    assert ids(await store.list_operations(distribution_id=SA_A)) == ids(ops[1::2])
    assert ids(await store.list_operations(states=["sending", "cancelled"])) == ids(
        [ops[1], ops[4]]
    )
    assert ids(await store.list_operations(since=T0 + 20, until=T0 + 40)) == ids(ops[2:4])
    assert await store.list_operations(states=[]) == []
    assert ids(await store.in_states(["queued"])) == ids([ops[0], ops[2], ops[3], ops[5]])
    assert ids(await store.in_states(FINAL)) == ids([ops[4]])
    assert await store.in_states([]) == []


@pytest_twisted.ensureDeferred
async def test_list_operations_pages_match_a_full_sort(store):
    """Listings read per-state index ranges merged in (created_at, submit) order: any filter
    and page equals sorting every operation, also when created_at disagrees with submit
    order (a clock stepped back) and ties."""
    rnd = random.Random(5)
    sas = [SA_A, SA_B]
    ops = []
    for _ in range(60):
        op, _ = await store.submit(new_op(rnd.choice(sas), created_at=T0 + rnd.randrange(20)))
        state = rnd.choice(["queued", "sending", "started", "succeeded", "cancelled"])
        if state != "queued":
            op = await store.transition(op.operation_id, expect=["queued"], state=state)
        ops.append(op)
    for _ in range(40):
        query = {"states": rnd.sample(["queued", "sending", "started", "succeeded"],
                                      rnd.randint(1, 4)) if rnd.random() < 0.8 else None,
                 "distribution_id": rnd.choice([None, *sas]),
                 "since": rnd.choice([None, T0 + 5]), "until": rnd.choice([None, T0 + 15])}
        limit, offset = rnd.randint(1, 30), rnd.randint(0, 20)
        want = [i for i, op in enumerate(ops)
                if (query["states"] is None or op.state in query["states"])
                and query["distribution_id"] in (None, op.distribution_id)
                and (query["since"] is None or op.created_at >= query["since"])
                and (query["until"] is None or op.created_at < query["until"])]
        want.sort(key=lambda i: (ops[i].created_at, i))
        got = await store.list_operations(**query, limit=limit, offset=offset)
        assert [op.operation_id for op in got] == [
            ops[i].operation_id for i in want[offset:offset + limit]], query


@pytest_twisted.ensureDeferred
async def test_forget_and_purge_results(store, clock):
    async def finish(state):
        op, _ = await store.submit(new_op())
        return await store.transition(
            op.operation_id,
            expect=["queued"],
            state=state,
            changes={"result": {"x": b"1"}, "result_code": 100},
            raw={"kind": "start-answer", "at": 0.0, "xml": "<x/>"},
        )

    done = await finish("succeeded")
    assert await store.forget(done.operation_id)
    forgotten = await store.get(done.operation_id)
    assert forgotten.forgotten and forgotten.result is None and forgotten.raw == []
    assert forgotten.state == "succeeded" and forgotten.result_code == 100
    assert not await store.forget("d" * 32)

    old_ok, old_failed = await finish("succeeded"), await finish("failed")
    old_active, _ = await store.submit(new_op())
    clock.advance(100)
    recent = await finish("expired")
    assert await store.purge_results(older_than=T0 + 50) == 2
    for op in (old_ok, old_failed):
        got = await store.get(op.operation_id)
        assert got.forgotten and got.result is None and got.raw == []
    assert not (await store.get(old_active.operation_id)).forgotten
    kept = await store.get(recent.operation_id)
    assert not kept.forgotten and kept.result == {"x": b"1"} and len(kept.raw) == 1
    assert await store.purge_results(older_than=T0 + 50) == 0
    assert count(store.path, "SELECT COUNT(*) FROM operation_raw") == 1


# -- registry, outbox, orphans -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sa_registry_upserts_and_lists(store, clock):
    assert await store.sa_get(SA_A) is None
    rec = await store.sa_update(SA_A, push_method="https-simple", last_pull_at=T0 - 5)
    assert rec.distribution_id == SA_A and rec.push_method == "https-simple"
    assert rec.confirmed is False and rec.tunnels == [] and rec.updated_at == T0
    clock.advance(1)
    tunnels = [{"url": "https://10.0.0.1/t", "up": True}]
    rec = await store.sa_update(
        SA_A,
        push_endpoint="https://10.0.0.9:10443/",
        sa_certificate="-----BEGIN CERTIFICATE-----\n...",
        confirmed=True,
        last_confirmation_at=T0 + 1,
        last_peer="10.0.0.9:5000",
        tunnels=tunnels,
    )
    assert rec.push_method == "https-simple" and rec.last_pull_at == T0 - 5  # kept
    assert rec.confirmed is True and rec.tunnels == tunnels and rec.updated_at == T0 + 1
    assert await store.sa_get(SA_A) == rec
    await store.sa_update(SA_B, push_method="https-tunnel")
    assert [r.distribution_id for r in await store.sa_list()] == [SA_A, SA_B]
    assert [r.distribution_id for r in await store.sa_list(confirmed=True)] == [SA_A]
    assert [r.distribution_id for r in await store.sa_list(confirmed=False)] == [SA_B]
    assert [r.distribution_id for r in await store.sa_list(limit=1, offset=1)] == [SA_B]
    with pytest.raises(ValueError, match="bogus"):
        await store.sa_update(SA_A, bogus=1)


@pytest_twisted.ensureDeferred
async def test_sa_update_commits_its_events_with_it_or_neither(store):
    rec = await store.sa_update(SA_A, confirmed=True, events=[ev("sa.confirmed", method="x")])
    assert rec.confirmed
    (event,) = await store.pending_events(10)
    assert (event.kind, event.distribution_id, event.operation_id, event.payload) == (
        "sa.confirmed", SA_A, None, {"method": "x"})
    with pytest.raises(ValueError, match="distribution_id"):  # a broken event: nothing stays
        await store.sa_update(SA_B, confirmed=True, events=[{"kind": "sa.confirmed"}])
    assert await store.sa_get(SA_B) is None
    assert len(await store.pending_events(10)) == 1


@pytest_twisted.ensureDeferred
async def test_outbox_order_attempts_and_delivery(store, clock):
    op, _ = await store.submit(new_op())
    await store.add_events([ev("sa.confirmed", n=1), ev("sa.tunnel_up", SA_B, n=2)])
    await store.transition(
        op.operation_id,
        expect=["queued"],
        state="sending",
        events=[ev("operation.started", n=3), ev("x", n=4, operation_id=None)],
    )
    await store.add_events([{**ev("operation.failed", n=5), "operation_id": "other"}])
    pending = await store.pending_events(10)
    assert [e.payload["n"] for e in pending] == [1, 2, 3, 4, 5]
    assert pending == sorted(pending, key=lambda e: e.seq)
    mine = op.operation_id
    assert [e.operation_id for e in pending] == [None, None, mine, mine, "other"]
    assert pending[1].distribution_id == SA_B
    assert [e.payload["n"] for e in await store.pending_events(2)] == [1, 2]
    await store.note_event_attempt(pending[0].seq)
    await store.note_event_attempt(pending[0].seq)
    await store.mark_delivered([pending[1].seq, pending[3].seq])
    rest = await store.pending_events(10)
    assert [e.payload["n"] for e in rest] == [1, 3, 5]
    assert [e.attempts for e in rest] == [2, 0, 0]
    await store.mark_delivered([])
    await store.mark_delivered([e.seq for e in rest])
    assert await store.pending_events(10) == []
    # seq never goes back, even after the outbox emptied.
    await store.add_events([ev("sa.tunnel_down")])
    (later,) = await store.pending_events(10)
    assert later.seq > pending[-1].seq


@pytest_twisted.ensureDeferred
async def test_orphan_dones_are_taken_once(store):
    s1, _ = await store.add_orphan_done(SA_A, 9, "configure-done", "<a/>", T0)
    s2, _ = await store.add_orphan_done(SA_A, 9, "configure-done", "<b/>", T0 + 1)
    await store.add_orphan_done(SA_A, 10, "read-status-done", "<c/>", T0 + 2)
    await store.add_orphan_done(SA_B, 9, "ping-done", "<d/>", T0 + 3)
    assert s2 > s1
    taken = await store.take_orphan_dones(SA_A, 9)
    assert [(o.seq, o.xml, o.type, o.received_at) for o in taken] == [
        (s1, "<a/>", "configure-done", T0),
        (s2, "<b/>", "configure-done", T0 + 1),
    ]
    assert all(o.distribution_id == SA_A and o.sa_transaction_id == 9 for o in taken)
    assert await store.take_orphan_dones(SA_A, 9) == []
    assert await store.purge_orphan_dones(T0 + 3) == 1
    assert await store.take_orphan_dones(SA_A, 10) == []
    assert [o.xml for o in await store.take_orphan_dones(SA_B, 9)] == ["<d/>"]


@pytest_twisted.ensureDeferred
async def test_orphan_dones_are_bounded_per_sa_in_the_same_commit(store):
    """One device key must not fill the disk: each new orphan trims its own SA's to the
    newest ``keep`` and drops those older than ``drop_before``; other SAs are untouched."""
    calls: list[str] = []
    for i in range(5):
        await store.add_orphan_done(SA_A, i, "ping-done", f"<a{i}/>", T0 + i)
    await store.add_orphan_done(SA_B, 1, "ping-done", "<b/>", T0)
    store.db_hook = calls.append
    _, dropped = await store.add_orphan_done(SA_A, 5, "ping-done", "<a5/>", T0 + 5, keep=3)
    assert dropped == 3 and calls == ["add_orphan_done"]  # one call, one commit
    kept = [tid for tid in range(6) if await store.take_orphan_dones(SA_A, tid)]
    assert kept == [3, 4, 5]
    for i in range(3):
        await store.add_orphan_done(SA_A, 10 + i, "ping-done", "<x/>", T0 + 10 + i)
    _, dropped = await store.add_orphan_done(SA_A, 20, "ping-done", "<y/>", T0 + 20,
                                             keep=10, drop_before=T0 + 12)
    assert dropped == 2  # received at T0+10 and T0+11; the new one is never dropped
    assert [len(await store.take_orphan_dones(SA_A, t)) for t in (10, 11, 12, 20)] == [
        0, 0, 1, 1]
    _, dropped = await store.add_orphan_done(SA_A, 30, "ping-done", "<z/>", T0, keep=1,
                                             drop_before=T0 + 99)
    assert dropped == 0 and len(await store.take_orphan_dones(SA_A, 30)) == 1
    assert [o.xml for o in await store.take_orphan_dones(SA_B, 1)] == ["<b/>"]
    with pytest.raises(ValueError, match="keep"):
        await store.add_orphan_done(SA_A, 1, "ping-done", "<x/>", T0, keep=0)


@pytest_twisted.ensureDeferred
async def test_an_orphan_kept_without_its_xml_keeps_its_size(store):
    await store.add_orphan_done(SA_A, 7, "read-storage-done", "", T0, size=300000)
    await store.add_orphan_done(SA_A, 8, "ping-done", "<p/>", T0)
    (big,) = await store.take_orphan_dones(SA_A, 7)
    assert (big.xml, big.size, big.type) == ("", 300000, "read-storage-done")
    (small,) = await store.take_orphan_dones(SA_A, 8)
    assert small.size == 4  # len(xml) by default


# -- schema, connection, threads -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_old_schema_is_migrated_and_keeps_data(tmp_path, clock):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=1) == 1
    conn.execute(
        "INSERT INTO operations (operation_id, request_id, distribution_id, operation, params,"
        " state, attempts, created_at, updated_at, not_before, sa_transaction_id)"
        " VALUES ('a' || hex(randomblob(15)), 'old-rq', ?, 'ping', '{\"n\":1}', 'started', 2,"
        " 1.0, 2.0, 1.0, 5)",
        (SA_A,),
    )
    conn.execute(
        "INSERT INTO sa_registry (distribution_id, push_method, confirmed, updated_at)"
        " VALUES (?, 'https-simple', 1, 3.0)",
        (SA_A,),
    )
    columns = {r[1] for r in conn.execute("PRAGMA table_info(operations)")}
    assert "done_deadline" not in columns
    conn.close()

    s = SQLiteStore(path, reactor=reactor, clock=clock)
    await s.open()
    try:
        (op,) = await s.in_states(["started"])
        assert op.request_id == "old-rq" and op.params == {"n": 1} and op.attempts == 2
        assert op.done_deadline is None and op.sa_transaction_id == 5
        assert op.waiting_for is None
        again, created = await s.submit(new_op(request_id="old-rq"))
        assert not created and again.operation_id == op.operation_id
        rec = await s.sa_get(SA_A)
        assert rec.push_method == "https-simple" and rec.confirmed and rec.tunnels == []
        moved = await s.update(op.operation_id, {"done_deadline": 99.0})
        assert moved.done_deadline == 99.0
        assert (await s.add_orphan_done(SA_A, 5, "ping-done", "<x/>", 1.0))[0] > 0
    finally:
        await s.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        columns = {r[1] for r in conn.execute("PRAGMA table_info(operations)")}
        assert {"done_deadline", "waiting_for", "claimed_by"} <= columns
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_orphans_stored_before_sizes_survive_the_migration(tmp_path, clock):
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=2) == 2
    conn.execute("INSERT INTO orphan_dones (distribution_id, sa_transaction_id, type, xml,"
                 " received_at) VALUES (?, 4, 'ping-done', '<old/>', 1.0)", (SA_A,))
    conn.close()
    s = SQLiteStore(path, reactor=reactor, clock=clock)
    await s.open()
    try:
        (old,) = await s.take_orphan_dones(SA_A, 4)
        assert (old.xml, old.size) == ("<old/>", 0)
    finally:
        await s.close()


def future_schema_db(tmp_path):
    """A database written by a newer armsproxy (schema version 99)."""
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    return path


@pytest_twisted.ensureDeferred
async def test_a_newer_schema_is_refused(tmp_path, clock):
    s = SQLiteStore(future_schema_db(tmp_path), reactor=reactor, clock=clock)
    with pytest.raises(StoreError, match="newer"):
        await s.open()
    assert not [t for t in threading.enumerate() if "armsproxy-store" in t.name]  # stopped
    with pytest.raises(StoreError, match="not open"):
        await s.get("x")


@pytest_twisted.ensureDeferred
async def test_calls_made_while_the_store_opens_wait_for_it(tmp_path, clock):
    """twistd binds the gates' ports before the store is open: an early order must wait,
    not fail (seen as a 500 on push.submit right after a restart)."""
    s = SQLiteStore(tmp_path / "early.db", reactor=reactor, clock=clock)
    opening = defer.ensureDeferred(s.open())
    early = defer.ensureDeferred(s.submit(new_op(request_id="early")))
    assert not early.called
    await opening
    op, created = await early
    assert created and (await s.get(op.operation_id)).request_id == "early"
    await s.close()


@pytest_twisted.ensureDeferred
async def test_close_while_opening_closes_what_open_opens(tmp_path, clock):
    s = SQLiteStore(tmp_path / "brief.db", reactor=reactor, clock=clock)
    opening = defer.ensureDeferred(s.open())
    closing = defer.ensureDeferred(s.close())
    await opening
    await closing
    assert not [t for t in threading.enumerate() if t.name == "armsproxy-store"]
    with pytest.raises(StoreError, match="not open"):
        await s.get("x")


@pytest_twisted.ensureDeferred
async def test_a_store_that_cannot_open_fails_the_waiting_calls(tmp_path, clock):
    s = SQLiteStore(future_schema_db(tmp_path), reactor=reactor, clock=clock)
    opening = defer.ensureDeferred(s.open())
    early = defer.ensureDeferred(s.get("x"))
    with pytest.raises(StoreError, match="newer"):
        await opening
    with pytest.raises(StoreError, match="not open"):
        await early


@pytest_twisted.ensureDeferred
async def test_connection_settings(store):
    async def pragma(name):
        return await store._run("pragma", lambda c: c.execute(f"PRAGMA {name}").fetchone()[0])

    assert await pragma("journal_mode") == "wal"
    assert await pragma("synchronous") == 2  # FULL
    assert await pragma("foreign_keys") == 1
    assert await pragma("busy_timeout") == 10000


@pytest_twisted.ensureDeferred
async def test_no_store_call_runs_on_the_reactor_thread(store):
    seen = []
    store.db_hook = lambda name: seen.append(
        (name, threading.get_ident(), threadable.isInIOThread())
    )
    assert threadable.isInIOThread()  # the test itself runs on the reactor thread
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
    await store.claim_dispatchable(T0, 10, instance_id="i1")
    await store.register_instance("i1", host="h", pid=1, now=T0, lease_until=T0 + 15)
    await store.take_over("i1", T0)
    await store.retire_instance("i1")
    # One process: these have nothing to do in the database.
    assert await store.lead()
    await store.resign()
    await store.announce("ops")
    await store.listen(lambda topic: None)
    methods = {n for n, m in vars(Store).items() if callable(m) and not n.startswith("_")}
    public = methods - {"open", "close", "lead", "resign", "announce", "listen"}
    assert {name for name, _, _ in seen} == public
    assert not any(in_io for _, _, in_io in seen)
    idents = {ident for _, ident, _ in seen}
    assert len(idents) == 1 and threading.get_ident() not in idents


@pytest_twisted.ensureDeferred
async def test_calls_after_close_fail_cleanly(tmp_path, clock):
    s = SQLiteStore(tmp_path / "c.db", reactor=reactor, clock=clock)
    await s.open()
    await s.open()  # idempotent
    await s.close()
    await s.close()
    with pytest.raises(StoreError):
        await s.submit(new_op())
    assert not Path(str(tmp_path / "c.db") + "-wal").exists()  # checkpointed on close


def test_states_are_the_life_cycle():
    assert STATES == {
        "queued",
        "sending",
        "started",
        "succeeded",
        "failed",
        "expired",
        "cancelled",
    }
    assert FINAL == {"succeeded", "failed", "expired", "cancelled"}


# -- durability ----------------------------------------------------------------------------

CHILD = r"""
import os
import sys
from pathlib import Path
from twisted.internet import defer, task
from armsproxy.store import NewOperation, SQLiteStore

async def main(reactor, path, rnd):
    store = SQLiteStore(Path(path), reactor=reactor)
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


def _kill_rounds(path: Path, rounds: int) -> list[list[str]]:
    """Run the child ``rounds`` times, SIGKILL it mid-stream, return every acknowledged line."""
    env = dict(os.environ, PYTHONPATH=str(Path(armsproxy.__file__).parent.parent))
    rng = random.Random(1234)
    acked: list[list[str]] = []
    for rnd in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(rnd)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline().strip() == "OPEN", proc.stderr.read()
            want = rng.randrange(3, 40)
            for _ in range(want):
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
                acked.append(line.split())
            time.sleep(rng.random() * 0.02)  # land the kill anywhere in the next write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        # Lines written before the kill are acknowledged too.
        acked.extend(
            line.split()
            for line in proc.stdout.read().splitlines(keepends=True)
            if line.endswith("\n")
        )
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
    return acked


@pytest_twisted.ensureDeferred
async def test_kill_9_loses_no_acknowledged_order_or_result(tmp_path):
    path = tmp_path / "durable.db"
    acked = await threads.deferToThread(_kill_rounds, path, 5)
    submitted = [(op_id, int(rnd), int(i)) for kind, op_id, rnd, i in acked if kind == "S"]
    finished = {op_id for kind, op_id, _, _ in acked if kind == "R"}
    assert len(submitted) >= 15 and finished

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    s = SQLiteStore(path, reactor=reactor)
    await s.open()
    try:
        for op_id, rnd, i in submitted:
            op = await s.get(op_id)
            assert op is not None, f"acknowledged order {op_id} lost"
            assert op.request_id == f"r{rnd}-{i}"
            assert op.params == {"round": rnd, "i": i, "blob": bytes([i % 256, rnd]) * 50}
            if op_id in finished:
                assert op.state == "succeeded"
                assert op.result == {"i": i, "data": bytes([i % 256]) * 40}
                assert op.raw == [{"kind": "start-answer", "at": 0.0, "xml": f"<r i='{i}'/>"}]
        events = {e.operation_id for e in await s.pending_events(10_000)}
        assert finished <= events
        # Every stored success has its event and vice versa: they were committed together.
        succeeded = {op.operation_id for op in await s.in_states(["succeeded"])}
        assert succeeded == events
    finally:
        await s.close()


def test_operation_ids_are_version_4_uuids_without_repeats() -> None:
    import uuid

    from armsproxy.store.model import new_operation_id

    ids = [new_operation_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert parsed.hex == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
