"""Event outbox: committed with the transitions, delivered at least once and in order, retried
while the RS is down or refusing (real SQLite store, real XML-RPC RS on loopback)."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import server, xmlrpc

from armsproxy.push.engine import PushEngine, PushSettings
from armsproxy.push.outbox import EventOutbox
from armsproxy.rs_client import RSClient
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
