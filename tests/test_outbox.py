"""Event outbox: committed with the transitions, delivered at least once and in order, in
batches (``arms.events``) or one per call to an RS without it, retried while the RS is down or
refusing (real SQLite store, real XML-RPC RS on loopback, the outbox on an injected clock)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server, xmlrpc

from armsproxy.config import ConfigError, load
from armsproxy.demo_rs.db import DemoDB
from armsproxy.demo_rs.server import event_from_json, make_demo_rs_site
from armsproxy.push.engine import PushEngine, PushSettings
from armsproxy.push.outbox import EventOutbox, new_event
from armsproxy.rs_client import RSClient, RSFault
from armsproxy.store.sqlite import SQLiteStore

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"


class RS(xmlrpc.XMLRPC):
    def __init__(self) -> None:
        super().__init__(allowNone=False)
        self.events: list[dict] = []
        self.refuse = 0

    def xmlrpc_event(self, event):  # registered as arms.event below
        if self.refuse:
            self.refuse -= 1
            raise xmlrpc.Fault(500, "RS not ready")
        self.events.append(event)
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(condition, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out")


@pytest_twisted.ensureDeferred
async def test_events_wait_out_an_rs_outage_and_arrive_in_order(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite")
    await store.open()
    port = free_port()
    rs_client = RSClient(reactor, f"http://127.0.0.1:{port}/RPC2", timeout=2)
    outbox = EventOutbox(store, rs_client, reactor, poll=0.2, retry_base=0.1, retry_cap=0.3)
    engine = PushEngine(store=store, client=None, keys=None, clock=reactor,
                        settings=PushSettings(result_url="https://127.0.0.1/arms"),
                        on_events=outbox.kick)
    listening = None
    try:
        outbox.startService()
        # The RS is down: orders are cancelled, their events committed, nothing delivered.
        ops = [(await engine.submit({"distribution_id": DISTID, "operation": "reboot"}))[0]
               for _ in range(5)]
        for op in ops:
            assert (await engine.cancel(op.operation_id))[0]
        await until(lambda: outbox.failures >= 2)
        assert outbox.delivered == 0
        assert len(await store.pending_events(100)) == 5
        # The RS comes up, but refuses the first two calls: still retried, still in order.
        rs = RS()
        rs.putSubHandler("arms", _ArmsNamespace(rs))
        listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(
            server.Site(_Root(rs)))
        rs.refuse = 2
        await until(lambda: len(rs.events) == 5)
        assert [e["operation_id"] for e in rs.events] == [op.operation_id for op in ops]
        assert [e["kind"] for e in rs.events] == ["operation.cancelled"] * 5
        assert all(e["distribution_id"] == DISTID and e["state"] == "cancelled"
                   for e in rs.events)
        seqs = [e["seq"] for e in rs.events]
        assert seqs == sorted(seqs)
        assert await store.pending_events(100) == []
    finally:
        outbox.stopService()
        if listening is not None:
            await listening.stopListening()
        await rs_client.close()
        await store.close()


class _ArmsNamespace(xmlrpc.XMLRPC):
    def __init__(self, rs: RS) -> None:
        super().__init__(allowNone=False)
        self.rs = rs

    def xmlrpc_event(self, event):
        return self.rs.xmlrpc_event(event)


def _Root(rs: RS):
    from twisted.web.resource import Resource

    root = Resource()
    root.putChild(b"RPC2", rs)
    return root


# -- arms.events: batches, faults, the fallback for an RS without it --------------------------


class BatchRS(xmlrpc.XMLRPC):
    """An RS with ``arms.event`` and, while ``batches``, ``arms.events``; without it, it says
    so the way ``lacks`` names: ``twisted`` (fault 8001), ``spec`` (-32601), ``python`` (what
    SimpleXMLRPCServer answers: fault 1 and a message) or ``http501``."""

    def __init__(self, *, batches: bool = True, lacks: str = "twisted") -> None:
        super().__init__(allowNone=False)
        self.batches = batches
        self.lacks = lacks
        self.calls: list[tuple[str, list[int]]] = []  # (method, seqs), refused calls included
        self.events: list[dict] = []  # taken, in arrival order
        self.refuse = 0  # fault the next calls, after keeping their events (a partial failure)
        self.slow_above: int | None = None  # batches larger than this never get an answer
        self.hold: defer.Deferred | None = None  # the next arms.events waits for it
        self.in_flight = 0
        self.max_in_flight = 0

    def lookupProcedure(self, procedurePath: str) -> Any:
        if procedurePath == "arms.event":
            return self._one
        if procedurePath == "arms.events":
            self.calls.append(("arms.events?", []))  # probes count, found or not
            if self.batches:
                return self._many
            if self.lacks == "spec":
                raise xmlrpc.NoSuchFunction(-32601, "Method not found")
            if self.lacks == "python":
                raise xmlrpc.NoSuchFunction(
                    1, """<class 'Exception'>:method "arms.events" is not supported""")
        return super().lookupProcedure(procedurePath)  # Twisted's fault 8001

    def render_POST(self, request: server.Request) -> Any:
        if (not self.batches and self.lacks == "http501"
                and b"<methodName>arms.events</methodName>" in request.content.getvalue()):
            self.calls.append(("arms.events?", []))
            request.setResponseCode(501)
            return b"unknown method"
        return super().render_POST(request)

    def _one(self, event: dict) -> bool:
        self.calls.append(("arms.event", [event["seq"]]))
        if self.refuse:
            self.refuse -= 1
            raise xmlrpc.Fault(500, "RS not ready")
        self.events.append(event)
        return True

    async def _many(self, events: list[dict]) -> bool:
        self.calls.append(("arms.events", [e["seq"] for e in events]))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.slow_above is not None and len(events) > self.slow_above:
                await defer.Deferred()  # the client gives up first
            if self.hold is not None:
                hold, self.hold = self.hold, None
                await hold
            self.events.extend(events)  # processed in order, then perhaps a fault
            if self.refuse:
                self.refuse -= 1
                raise xmlrpc.Fault(500, "RS not ready")
            return True
        finally:
            self.in_flight -= 1

    def taken(self, method: str) -> list[list[int]]:
        return [seqs for m, seqs in self.calls if m == method]


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    store = SQLiteStore(tmp_path / "s.sqlite")
    await store.open()
    yield store
    await store.close()


@pytest_twisted.async_yield_fixture
async def serve():
    """``await serve(resource)``: its URL on 127.0.0.1, and an RSClient for it."""
    ports, clients = [], []

    async def start(resource: Any, timeout: float = 5.0) -> RSClient:
        port = reactor.listenTCP(0, server.Site(resource), interface="127.0.0.1")
        ports.append(port)
        client = RSClient(reactor, f"http://127.0.0.1:{port.getHost().port}/RPC2",
                          timeout=timeout)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
    for port in ports:
        await port.stopListening()


async def queue(store: SQLiteStore, count: int, first: int = 0) -> list[str]:
    """Commit ``count`` events (one operation each); their operation ids, in commit order."""
    ids = [f"op-{i}" for i in range(first, first + count)]
    await store.add_events([new_event("operation.cancelled", DISTID, op, state="cancelled",
                                      operation="reboot", request_id="") for op in ids])
    return ids


def outbox_for(store: SQLiteStore, rs: RSClient, clock: task.Clock, **kw: Any) -> EventOutbox:
    outbox = EventOutbox(store, rs, clock, poll=5, retry_base=1, retry_cap=8, **kw)
    outbox.startService()
    return outbox


async def stop(outbox: EventOutbox) -> None:
    running = outbox.stopService()
    if running is not None:
        await running


async def drained(store: SQLiteStore, outbox: EventOutbox) -> None:
    await until(lambda: outbox._running_pass is None)
    assert await store.pending_events(1000) == []


@pytest_twisted.ensureDeferred
async def test_batches_of_at_most_n_in_commit_order_one_at_a_time(store, serve):
    rs = BatchRS()
    client = await serve(rs)
    ids = await queue(store, 25)
    hold = rs.hold = defer.Deferred()  # the first batch waits at the RS...
    outbox = outbox_for(store, client, task.Clock(), batch=10)
    try:
        await until(lambda: rs.taken("arms.events"))
        later = await queue(store, 7, first=25)  # ...while more events are committed
        outbox.kick()
        hold.callback(None)
        await until(lambda: len(rs.events) == 32)
        await drained(store, outbox)
    finally:
        await stop(outbox)
    batches = rs.taken("arms.events")
    assert [len(b) for b in batches] == [10, 10, 10, 2]
    seqs = [seq for batch in batches for seq in batch]
    assert seqs == sorted(seqs) and len(set(seqs)) == 32
    assert [e["operation_id"] for e in rs.events] == ids + later
    assert rs.taken("arms.event") == [] and rs.max_in_flight == 1
    assert (outbox.delivered, outbox.calls, outbox.failures) == (32, 4, 0)


@pytest_twisted.ensureDeferred
async def test_a_fault_redelivers_the_whole_batch_later_in_order(store, serve):
    rs = BatchRS()
    rs.refuse = 2  # the RS keeps the batch, then faults: twice
    client = await serve(rs)
    ids = await queue(store, 15)
    clock = task.Clock()
    outbox = outbox_for(store, client, clock, batch=10)
    try:
        for failures in (1, 2):
            await until(lambda n=failures: outbox.failures == n
                        and outbox._running_pass is None)
            assert await store.pending_events(100) != []  # nothing counted as delivered
            assert outbox.delivered == 0
            clock.advance(8)  # the backoff, on the outbox's clock
        await until(lambda: outbox.delivered == 15)
        await drained(store, outbox)
    finally:
        await stop(outbox)
    first, *again, rest = rs.taken("arms.events")
    assert again == [first, first] and len(first) == 10 and len(rest) == 5
    assert first + rest == sorted(first + rest)
    # At least once: the refused batch arrived three times, every time whole and in order.
    got = [e["operation_id"] for e in rs.events]
    assert got == ids[:10] * 3 + ids[10:]
    assert list(dict.fromkeys(e["seq"] for e in rs.events)) == sorted({e["seq"]
                                                                       for e in rs.events})
    assert rs.taken("arms.event") == []  # a fault is not "no such method"


@pytest.mark.parametrize("lacks", ["twisted", "spec", "python", "http501"])
@pytest_twisted.ensureDeferred
async def test_an_rs_without_arms_events_gets_one_per_call_in_order(store, serve, logs, lacks):
    rs = BatchRS(batches=False, lacks=lacks)
    client = await serve(rs)
    ids = await queue(store, 25)
    clock = task.Clock()
    outbox = outbox_for(store, client, clock, batch=10, reprobe=3600)
    try:
        await until(lambda: len(rs.events) == 25)
        await drained(store, outbox)
        # Probed once, then one event per call: no probe for every batch.
        assert [m for m, _ in rs.calls].count("arms.events?") == 1
        assert rs.taken("arms.event") == [[e["seq"]] for e in rs.events]
        assert [e["operation_id"] for e in rs.events] == ids
        # Within the hour: still one per call, and not logged again.
        clock.advance(3599)
        more = await queue(store, 3, first=25)
        outbox.kick()
        await until(lambda: len(rs.events) == 28)
        assert [m for m, _ in rs.calls].count("arms.events?") == 1
        # After it: asked again; still missing, still one per call, still logged once.
        clock.advance(1)
        more += await queue(store, 3, first=28)
        outbox.kick()
        await until(lambda: len(rs.events) == 31)
        await drained(store, outbox)
        assert [m for m, _ in rs.calls].count("arms.events?") == 2
    finally:
        await stop(outbox)
    assert [e["operation_id"] for e in rs.events] == ids + more
    assert outbox.failures == 0 and outbox.delivered == 31
    (line,) = logs.find("has no arms.events")
    assert "one event per arms.event call" in line


@pytest_twisted.ensureDeferred
async def test_an_rs_that_gains_arms_events_gets_batches_after_the_reprobe(store, serve, logs):
    rs = BatchRS(batches=False)
    client = await serve(rs)
    await queue(store, 4)
    clock = task.Clock()
    outbox = outbox_for(store, client, clock, batch=10, reprobe=600)
    try:
        await until(lambda: len(rs.events) == 4)
        await drained(store, outbox)
        rs.batches = True  # the RS is upgraded
        clock.advance(600)
        await queue(store, 6, first=4)
        outbox.kick()
        await until(lambda: len(rs.events) == 10)
        await drained(store, outbox)
    finally:
        await stop(outbox)
    assert len(rs.taken("arms.event")) == 4
    assert rs.taken("arms.events") == [[e["seq"] for e in rs.events[4:]]]
    assert logs.find("now takes arms.events")


@pytest_twisted.ensureDeferred
async def test_a_batch_that_times_out_is_retried_smaller(store, serve):
    rs = BatchRS()
    rs.slow_above = 5  # too slow for 6 or more events within the client's timeout
    client = await serve(rs, timeout=1.0)
    ids = await queue(store, 20)
    clock = task.Clock()
    outbox = outbox_for(store, client, clock, batch=10)
    try:
        await until(lambda: outbox.failures == 1 and outbox._running_pass is None)
        clock.advance(8)
        await until(lambda: outbox.failures == 2 and outbox._running_pass is None)
        assert outbox.delivered == 5  # 5 went through, then 6 (grown by one) timed out
        clock.advance(8)
        await until(lambda: outbox.delivered == 20)
        await drained(store, outbox)
    finally:
        await stop(outbox)
    assert [len(b) for b in rs.taken("arms.events")] == [10, 5, 6, 3, 4, 5, 3]
    assert [e["operation_id"] for e in rs.events] == ids


@pytest_twisted.ensureDeferred
async def test_the_demo_rs_stores_a_batch_in_one_transaction(store, serve, tmp_path):
    db = DemoDB(tmp_path / "rs.sqlite", reactor=reactor)
    try:
        client = await serve(make_demo_rs_site(db).resource)
        # Through the outbox, in batches: all stored, in order.
        ids = await queue(store, 23)
        outbox = outbox_for(store, client, task.Clock(), batch=10)
        try:
            await until(lambda: outbox.delivered == 23)
            await drained(store, outbox)
        finally:
            await stop(outbox)
        assert outbox.calls == 3
        stored = [event_from_json(e.json) for e in await db.events(0)]
        assert [e["operation_id"] for e in stored] == ids
        assert [e["seq"] for e in stored] == sorted(e["seq"] for e in stored)
        # All or none: a batch with one bad member is refused whole (fault 400).
        with pytest.raises(RSFault) as refused:
            await client.call("arms.events", [{"kind": "sa.confirmed"}, "not a struct"])
        assert refused.value.code == 400 and "events[1]" in refused.value.message
        with pytest.raises(RSFault):
            await client.call("arms.events", "not a list")
        assert await client.call("arms.events", []) is True
        assert len(await db.events(0)) == 23
        assert "arms.events" in await client.call("system.listMethods")
    finally:
        db.close()


@pytest.mark.parametrize(("line", "batch", "problem"), [
    ("", 100, None),
    ("event_batch = 1000", 1000, None),
    ("event_batch = 1", 1, None),
    ("event_batch = 0", None, "[rs] event_batch: 1..1000"),
    ("event_batch = 1001", None, "[rs] event_batch: 1..1000"),
    ("event_batch = many", None, "[rs] event_batch: 'many' is not a whole number"),
])
def test_rs_event_batch_is_configured_and_bounded(tmp_path, line, batch, problem):
    conf = tmp_path / "armsproxy.conf"
    conf.write_text(f"""\
[sa_gate]
listen = ssl:8443
public_urls = https://127.0.0.1:8443/arms

[push]
sa_ca = ca.pem

[rs]
url = http://127.0.0.1:8790/RPC2
{line}
""")
    if problem is None:
        assert load(conf).rs_event_batch == batch
    else:
        with pytest.raises(ConfigError) as error:
            load(conf)
        assert any(p.startswith(problem) for p in error.value.problems), error.value.problems
