"""Several instances on one PostgreSQL database (#12 point 2), in one test process.

Each instance is a store of its own (its own connections, as another process would have) with
its :class:`~armsproxy.instance.InstanceService` and push engine, all on a fake clock: leases,
claims by tunnel owner, the take-over of a dead instance's work by the restart rules, one
leader for the outbox, announcements, and a done-request reaching another instance than the
one reading the start answer. tests/test_kill_pg.py does it with real processes and SIGKILL.
"""

from __future__ import annotations

import psycopg
import pytest
import pytest_twisted
from test_push_engine import (
    DISTID,
    OTHER,
    RESULT_URL,
    Keys,
    ScriptedSA,
    _LiveTunnel,
    answer_from,
    done_from,
    settle,
    until,
)
from twisted.internet import defer, reactor, task

from armsproxy.instance import InstanceService
from armsproxy.push.engine import WAIT_TUNNEL, PushEngine, PushSettings
from armsproxy.push.outbox import EventOutbox
from armsproxy.store.model import NewOperation
from armsproxy.store.postgresql import PostgreSQLStore
from armsproxy.tunnel import TunnelRegistry

THIRD = "0001-0002-0003-0004-0005-0006-0007-000A"
T0 = 1_000_000.0


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(T0)
    return c


@pytest_twisted.async_yield_fixture
async def stores(pg_dsn, clock):
    """``stores(n)``: n stores on this test's database (n processes); closed at the end."""
    made: list[PostgreSQLStore] = []

    async def make(n: int = 1) -> list[PostgreSQLStore]:
        new = [PostgreSQLStore(pg_dsn, reactor=reactor, clock=clock, pool_size=2)
               for _ in range(n)]
        for s in new:
            await s.open()
        made.extend(new)
        return new

    yield make
    for s in made:
        await s.close()


def order(distid: str, operation: str = "read-module-list", **extra) -> NewOperation:
    return NewOperation(distribution_id=distid, operation=operation, expires_at=T0 + 86400,
                        **extra)


# -- the store: claims, leases, take-over ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_instance_claims_nothing_without_a_live_lease(stores):
    (s,) = await stores(1)
    await s.submit(order(DISTID))
    assert await s.claim_dispatchable(T0 + 1, 10, instance_id="a") == []  # no lease row
    assert not await s.register_instance("a", host="h", pid=1, now=T0, lease_until=T0 + 15)
    assert await s.claim_dispatchable(T0 + 16, 10, instance_id="a") == []  # expired
    (op,) = await s.claim_dispatchable(T0 + 1, 10, instance_id="a")
    assert op.claimed_by == "a" and op.state == "sending"
    assert await s.register_instance("a", host="h", pid=1, now=T0, lease_until=T0 + 30)


@pytest_twisted.ensureDeferred
async def test_an_sas_orders_are_claimed_by_the_instance_holding_its_tunnel(stores):
    a, b = await stores(2)
    for name, s in (("a", a), ("b", b)):
        await s.register_instance(name, host="h", pid=1, now=T0, lease_until=T0 + 15)
    await a.sa_update(DISTID, push_method="https-tunnel", tunnel_owner="a")
    await a.sa_update(OTHER, push_method="https-tunnel", tunnel_owner="b")
    tunnel_a, _ = await b.submit(order(DISTID))
    tunnel_b, _ = await b.submit(order(OTHER))
    free, _ = await b.submit(order(THIRD))
    assert {op.operation_id for op in await b.claim_dispatchable(T0 + 1, 10, instance_id="b")} \
        == {tunnel_b.operation_id, free.operation_id}
    (mine,) = await a.claim_dispatchable(T0 + 1, 10, instance_id="a")
    assert mine.operation_id == tunnel_a.operation_id
    # An order that names its URL, or asks for https-simple, is anyone's.
    for s, state in ((a, "succeeded"), (b, "succeeded")):
        for op in await s.in_states(["sending"]):
            await s.transition(op.operation_id, expect=["sending"], state=state)
    direct, _ = await b.submit(order(DISTID, sa_url="https://192.0.2.1:10443/"))
    simple, _ = await b.submit(order(OTHER, method="https-simple"))
    got = await b.claim_dispatchable(T0 + 2, 10, instance_id="b")
    assert {op.operation_id for op in got} == {direct.operation_id, simple.operation_id}


@pytest_twisted.ensureDeferred
async def test_a_tunnel_released_late_keeps_the_owner_the_sa_moved_to(stores):
    (s,) = await stores(1)
    await s.sa_update(DISTID, tunnel_owner="a")
    await s.sa_update(DISTID, tunnel_owner="b")  # the SA reconnected to b
    assert (await s.sa_update(DISTID, confirmed=True, release_tunnel="a")).tunnel_owner == "b"
    assert (await s.sa_update(DISTID, release_tunnel="b")).tunnel_owner is None
    assert (await s.sa_update(OTHER, release_tunnel="b")).tunnel_owner is None  # new entry


@pytest_twisted.ensureDeferred
async def test_a_dead_instances_sending_operations_go_to_exactly_one_survivor(stores, pg_dsn):
    a, b, c = await stores(3)
    for name, s in (("a", a), ("b", b), ("c", c)):
        await s.register_instance(name, host="h", pid=1, now=T0, lease_until=T0 + 15)
    sas = [f"{i:04X}-0002-0003-0004-0005-0006-0007-0008" for i in range(30)]
    for distid in sas:
        await a.submit(order(distid))
    claimed_a = await a.claim_dispatchable(T0 + 1, 20, instance_id="a")
    claimed_b = await b.claim_dispatchable(T0 + 1, 5, instance_id="b")
    await a.sa_update(sas[0], tunnel_owner="a")
    await a.sa_update(sas[1], tunnel_owner="b")
    await a.submit(order(sas[0]))  # queued behind: not the dead one's to resolve
    # b and c renew; a does not. Before its lease ends, nothing is taken.
    for name, s in (("b", b), ("c", c)):
        assert await s.register_instance(name, host="h", pid=1, now=T0 + 10,
                                         lease_until=T0 + 25)
    assert await b.take_over("b", T0 + 14) == []
    results = await defer.gatherResults([
        defer.ensureDeferred(s.take_over(name, T0 + 16)) for name, s in (("b", b), ("c", c))
        for _ in range(3)])
    taken = [op for ops in results for op in ops]
    assert sorted(op.operation_id for op in taken) == \
        sorted(op.operation_id for op in claimed_a)  # each once, b's own untouched
    assert all(op.state == "sending" and op.claimed_by in ("b", "c") for op in taken)
    stored = {op.operation_id: op.claimed_by for op in await a.in_states(["sending"])}
    assert all(stored[op.operation_id] == "b" for op in claimed_b)
    assert (await a.sa_get(sas[0])).tunnel_owner is None  # a's tunnel released
    assert (await a.sa_get(sas[1])).tunnel_owner == "b"
    # a comes back (it was only frozen): its lease is new, and it knows it was lost.
    assert not await a.register_instance("a", host="h", pid=1, now=T0 + 17,
                                         lease_until=T0 + 32)


@pytest_twisted.ensureDeferred
async def test_a_retired_instances_leftovers_are_taken_at_once(stores):
    a, b = await stores(2)
    for name, s in (("a", a), ("b", b)):
        await s.register_instance(name, host="h", pid=1, now=T0, lease_until=T0 + 15)
    await a.submit(order(DISTID))
    (op,) = await a.claim_dispatchable(T0 + 1, 10, instance_id="a")
    await a.sa_update(DISTID, tunnel_owner="a")
    await a.retire_instance("a")
    assert (await b.sa_get(DISTID)).tunnel_owner is None
    (taken,) = await b.take_over("b", T0 + 2)  # the lease has not run out: no row is enough
    assert taken.operation_id == op.operation_id and taken.claimed_by == "b"


@pytest_twisted.ensureDeferred
async def test_one_leader_at_a_time_and_another_when_it_goes(stores):
    a, b = await stores(2)
    assert await a.lead() and await a.lead()
    assert not await b.lead()
    await a.close()  # its session ends: the lock goes with it
    assert await b.lead()
    (c,) = await stores(1)
    assert not await c.lead()
    await b.resign()
    assert await c.lead()


async def _leads_soon(store, instance_id: str) -> None:
    """The ended session's backend lets its lock go a moment after the signal."""
    for _ in range(500):
        if await store.lead(instance_id):
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"{instance_id} never got the leader lock")


@pytest_twisted.ensureDeferred
async def test_a_frozen_leaders_session_is_ended_when_its_lease_runs_out(stores, logs):
    """A leader that froze keeps its session, and the lock with it, for as long as its
    host answers: the survivor that takes over its expired lease ends that session."""
    a, b, c = await stores(3)
    for store, name, until_ in ((a, "a", T0 + 3), (b, "b", T0 + 100), (c, "c", T0 + 2)):
        await store.register_instance(name, host="h", pid=1, now=T0, lease_until=until_)
    assert await a.lead("a") and not await b.lead("b")
    await b.take_over("b", T0 + 2.5)  # c is gone (it never led): a's lease is still live
    assert await a.lead("a") and not await b.lead("b")
    assert not logs.find("leader-lock session")
    await b.take_over("b", T0 + 5)  # a froze: it renewed nothing
    await _leads_soon(b, "b")
    assert logs.find("ended 1 leader-lock session", level="warn")
    assert not await a.lead("a")  # thawed: its session is gone, and the lock is b's
    assert logs.find("leader lock session lost", level="warn")
    assert await b.lead("b")


@pytest_twisted.ensureDeferred
async def test_a_session_that_cannot_be_ended_is_reported_and_the_take_over_holds(
        stores, pg_dsn, logs):
    """Another role's session (here a superuser's) cannot be ended: an error line that says
    what to do, and the rest of the take-over is done all the same."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE other LOGIN")
        conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO other")
        conn.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO other")
    (a,) = await stores(1)  # the schema exists now: grant again for what it created
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO other")
        conn.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO other")
    b = PostgreSQLStore(pg_dsn.replace("user=postgres", "user=other"), reactor=reactor,
                        clock=a._clock, pool_size=2)
    await b.open()
    try:
        await a.register_instance("a", host="h", pid=1, now=T0, lease_until=T0 + 3)
        await b.register_instance("b", host="h", pid=2, now=T0, lease_until=T0 + 100)
        assert await a.lead("a")
        op, _ = await a.submit(order(DISTID))
        assert len(await a.claim_dispatchable(T0 + 1, 10, instance_id="a")) == 1
        (taken,) = await b.take_over("b", T0 + 5)
        assert taken.operation_id == op.operation_id and taken.claimed_by == "b"
        assert logs.find("cannot end the leader-lock session", "pg_signal_backend",
                         level="error")
        assert await a.lead("a") and not await b.lead("b")  # the lock stays where it was
    finally:
        await b.close()


@pytest_twisted.ensureDeferred
async def test_announcements_reach_the_other_stores_only(stores):
    a, b = await stores(2)
    heard_a: list[str] = []
    heard_b: list[str] = []
    await a.listen(heard_a.append)
    await b.listen(heard_b.append)
    await task.deferLater(reactor, 0.3, lambda: None)  # both LISTENing
    await defer.gatherResults([defer.ensureDeferred(a.announce("ops")) for _ in range(20)])
    await a.announce("events")
    await until(lambda: "events" in heard_b)
    assert heard_a == [] and set(heard_b) == {"ops", "events"}
    assert 2 <= len(heard_b) <= 4  # twenty announcements made at once coalesce


# -- engines: instances on a fake clock -----------------------------------------------------


class Proxy:
    """One instance as tap.py composes it: the engine under the instance's lease, the outbox
    among the services only the leader runs."""

    def __init__(self, store, clock, name: str, *, tunnels=None, lease=15.0, renew=5.0):
        self.store, self.clock = store, clock
        self.sa = ScriptedSA()
        self.rs = RecordingRS()
        self.instance = InstanceService(store, clock, lease=lease, renew=renew,
                                        instance_id=name)
        self.outbox = EventOutbox(store, self.rs, clock, poll=1.0)
        self.engine = PushEngine(
            store=store, client=self.sa, keys=Keys(), clock=clock, tunnels=tunnels,
            settings=PushSettings(result_url=RESULT_URL, takeover_every=renew,
                                  interrupted_grace=60),
            on_events=self.outbox.kick, instance=self.instance)
        self.engine.setServiceParent(self.instance)
        self.outbox.setServiceParent(self.instance.leader)
        self.instance.on("events", self.outbox.kick)

    async def start(self) -> Proxy:
        self.instance.startService()
        await until(lambda: self.engine.running and self.engine._loop is not None
                    and self.instance._loop is not None)
        await self.settle()
        return self

    async def settle(self, seconds: float = 0.0, steps: int = 1) -> None:
        await settle(self.engine, self.clock, seconds, steps)

    def freeze(self) -> None:
        """As if SIGKILLed: no more renewals, ticks or claims (nothing given back)."""
        self.instance._loop.stop()
        self.engine._loop.stop()
        self.engine.running = False
        self.instance.running = False


class RecordingRS:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def events(self, events):
        self.seen.extend(events)

    async def event(self, event):
        self.seen.append(event)


@pytest_twisted.ensureDeferred
async def test_a_survivor_resolves_a_dead_instances_work_by_the_restart_rules(stores, clock):
    a_store, b_store = await stores(2)
    for distid in (DISTID, OTHER, THIRD):
        await a_store.sa_update(distid, push_method="https-simple", confirmed=True,
                                push_endpoint="https://127.0.0.1:18450/")
    await a_store.register_instance("a", host="h", pid=1, now=T0, lease_until=T0 + 15)
    read_only, _ = await a_store.submit(order(DISTID, "read-module-list"))
    one_way, _ = await a_store.submit(order(OTHER, "md-command",
                                            params={"module_id": 1, "command": "x"}))
    two_way, _ = await a_store.submit(order(THIRD, "configure", params={
        "modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}],
        "md_configs": [{"id": 1, "data": "hostname x\n"}]}))
    claimed = await a_store.claim_dispatchable(T0 + 1, 10, instance_id="a")
    assert len(claimed) == 3  # a "sends" them, then dies

    b = await Proxy(b_store, clock, "b").start()
    try:
        assert b.instance.leading
        for op in (read_only, one_way, two_way):  # a's lease has not run out yet
            assert (await b_store.get(op.operation_id)).state == "sending"
        b.sa.script.append(answer_from("18-read-module-list.response.txt"))
        await b.settle(seconds=5, steps=4)  # T0 + 20: a's lease (T0 + 15) is over
        done = await b_store.get(read_only.operation_id)
        assert (done.state, done.attempts, done.claimed_by) == ("succeeded", 2, "b")
        failed = await b_store.get(one_way.operation_id)
        assert failed.state == "failed" and "interrupted" in failed.last_error
        waiting = await b_store.get(two_way.operation_id)
        assert waiting.state == "started" and waiting.sa_transaction_id is None
        assert len(b.sa.calls) == 1  # only the read-only one went again
        assert await b_store.take_over("b", clock.seconds()) == []  # nothing left
        await until(lambda: any(e.get("state") == "failed" for e in b.rs.seen))
    finally:
        await b.instance.stopService()


@pytest_twisted.ensureDeferred
async def test_a_tunnels_orders_go_to_its_owner_and_follow_the_sa_when_it_dies(stores, clock):
    a_store, b_store = await stores(2)
    tunnels_a, tunnels_b = TunnelRegistry(), TunnelRegistry()
    a = await Proxy(a_store, clock, "a", tunnels=tunnels_a).start()
    b = await Proxy(b_store, clock, "b", tunnels=tunnels_b).start()
    try:
        tunnel = _LiveTunnel(*["18-read-module-list.response.txt"] * 3)
        tunnels_a.register(tunnel)
        a.engine.tunnel_up(tunnel)
        await a.settle()
        assert (await b_store.sa_get(DISTID)).tunnel_owner == "a"
        # Accepted by b, sent by a (b's claim leaves it; its announcement wakes a).
        op, _ = await b.engine.submit({"distribution_id": DISTID,
                                       "operation": "read-module-list"})
        await until(lambda: len(tunnel.requests) == 1)
        await a.settle()
        assert (await b_store.get(op.operation_id)).claimed_by == "a"
        # a dies with its tunnel; the SA's next order waits, then follows the SA to b.
        a.freeze()
        tunnels_a.release(tunnel)
        second, _ = await b.engine.submit({"distribution_id": DISTID,
                                           "operation": "read-module-list"})
        await b.settle(seconds=5, steps=4)  # a's lease runs out: its tunnel is released
        parked = await b_store.get(second.operation_id)
        assert (parked.state, parked.waiting_for) == ("queued", WAIT_TUNNEL)
        assert (await b_store.sa_get(DISTID)).tunnel_owner is None
        moved = _LiveTunnel("18-read-module-list.response.txt")
        tunnels_b.register(moved)
        b.engine.tunnel_up(moved)
        await b.settle()
        assert (await b_store.get(second.operation_id)).state == "succeeded"
        assert len(moved.requests) == 1 and len(tunnel.requests) == 1
        assert (await b_store.sa_get(DISTID)).tunnel_owner == "b"
    finally:
        await b.instance.stopService()


@pytest_twisted.ensureDeferred
async def test_the_outbox_runs_on_one_instance_and_moves_when_it_dies(stores, clock):
    a_store, b_store = await stores(2)
    a = await Proxy(a_store, clock, "a").start()
    b = await Proxy(b_store, clock, "b").start()
    try:
        assert a.instance.leading and not b.instance.leading
        assert a.outbox.running and not b.outbox.running
        await b_store.add_events([{"kind": "sa.confirmed", "distribution_id": DISTID,
                                   "payload": {"method": "https-simple",
                                               "push_endpoint": "x"}}])
        b.engine.on_events()  # b announces; a delivers
        await until(lambda: len(a.rs.seen) == 1)
        assert b.rs.seen == []
        await a.instance.stopService()  # gives the lock back
        await b.settle(seconds=5)
        await until(lambda: b.instance.leading and b.outbox.running)
    finally:
        await b.instance.stopService()


@pytest_twisted.ensureDeferred
async def test_a_done_stored_as_orphan_while_another_instance_reads_the_start_answer(
        stores, clock):
    """The SA's done reaches instance a (through the load balancer) while b reads the start
    answer: a looks, finds nothing started yet, and before a's orphan is committed b records
    the start and finds no orphan. a looks again after its commit and applies it."""
    a_store, b_store = await stores(2)
    a = await Proxy(a_store, clock, "a").start()
    try:
        await a_store.register_instance("b", host="h", pid=1, now=T0, lease_until=T0 + 99)
        op, _ = await a_store.submit(order(DISTID, "ping",
                                           params={"address": "192.0.2.1", "count": 1}))
        (claimed,) = await b_store.claim_dispatchable(T0, 1, instance_id="b")
        request, raw = done_from("14-ping-done.request.txt")
        tid = request.transaction_id
        real_keep = a.engine._keep_orphan

        async def keep_after_b_started(*args):
            # b: the start answer is recorded, and no orphan is there to take (yet).
            await b_store.transition(claimed.operation_id, expect=["sending"], state="started",
                                     changes={"sa_transaction_id": tid})
            assert await b_store.take_orphan_dones(DISTID, tid) == []
            await real_keep(*args)

        a.engine._keep_orphan = keep_after_b_started
        assert await a.engine.done_request(request, raw, "127.0.0.1:5") == 100
        done = await a_store.get(op.operation_id)
        assert done.state == "succeeded" and done.result["success"] == 3
        assert await a_store.take_orphan_dones(DISTID, tid) == []
    finally:
        await a.instance.stopService()


@pytest_twisted.ensureDeferred
async def test_an_instance_that_lost_its_lease_owns_its_live_tunnels_again(stores, clock):
    """a cannot renew for longer than its lease (a frozen process, a cut-off database): b
    takes it over and releases its tunnels. When a renews again it learns the lease was
    lost, and claims back the tunnels it still holds: their orders go to it again."""
    a_store, b_store = await stores(2)
    tunnels_a = TunnelRegistry()
    a = await Proxy(a_store, clock, "a", tunnels=tunnels_a).start()
    b = await Proxy(b_store, clock, "b").start()
    try:
        tunnel = _LiveTunnel("18-read-module-list.response.txt")
        tunnels_a.register(tunnel)
        a.engine.tunnel_up(tunnel)
        await a.settle()
        a.instance._loop.stop()  # a stops renewing, and goes on otherwise
        await b.settle(seconds=5, steps=4)
        for _ in range(6):  # b's take-over runs on its tick; one may still be in its thread
            if (await b_store.sa_get(DISTID)).tunnel_owner is None:
                break
            await b.settle(seconds=5)
        assert (await b_store.sa_get(DISTID)).tunnel_owner is None
        assert [i for (i,) in await b_store._run(
            "rows", lambda c: c.execute("SELECT instance_id FROM instances").fetchall())] \
            == ["b"]
        assert await a_store.claim_dispatchable(clock.seconds(), 1, instance_id="a") == []
        await a.instance._tick()  # renewed again: the lease was lost
        await until(lambda: not a.engine._background)
        assert (await b_store.sa_get(DISTID)).tunnel_owner == "a"
        op, _ = await b.engine.submit({"distribution_id": DISTID,
                                       "operation": "read-module-list"})
        await until(lambda: len(tunnel.requests) == 1)
        await a.settle()
        assert (await a_store.get(op.operation_id)).state == "succeeded"
    finally:
        a.instance._loop = None
        await a.instance.stopService()
        await b.instance.stopService()
