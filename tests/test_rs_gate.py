"""The RS gate end to end: a stdlib XML-RPC client over real sockets (TCP, unix, TLS with client
certificates) against the gate, the real push engine (not dispatching) and a real SQLite store.

The engine runs with ``max_in_flight=0``: it validates and stores orders but never sends, so
every state the gate reports is one the test put in the store itself.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import stat
import tempfile
import xmlrpc.client
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, reactor, task, threads
from twisted.internet.error import CannotListenError

from armsproxy.push.engine import PushEngine, PushSettings
from armsproxy.rs_gate import (
    INTERFACE_VERSION,
    RSGate,
    rs_gate_service,
)
from armsproxy.rs_gate.server import rs_gate_endpoint
from armsproxy.store import SQLiteStore
from armsproxy.tls import ListenerConfigError, release_own_unix_lock

SA_A = "0001-0000-1A2B-0105-0000-0000-0000-000A"
SA_B = "0001-0000-1A2B-0105-0000-0000-0000-000B"
T0 = 1_700_000_000.0
RESULT_URL = "https://127.0.0.1:8443/arms"
PING = {"distribution_id": SA_A, "operation": "ping", "params": {"address": "192.0.2.1"}}
METHODS = [
    "arms.interface_version",
    "push.cancel",
    "push.forget",
    "push.list",
    "push.result",
    "push.status",
    "push.submit",
    "sa.list",
    "sa.status",
]


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------


class RecordingPushClient:
    """The engine's SA client; with max_in_flight=0 it must never be called."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def push(self, url, *, distribution_id, key, body, pinned_certificate_pem):
        self.calls.append({"url": url, "distid": distribution_id})
        raise AssertionError("the engine sent something")


class Keys:
    async def sa_key(self, distid):
        return "rs-key"


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


@pytest.fixture
def push_client():
    return RecordingPushClient()


@pytest.fixture
def gate(store, clock, push_client):
    engine = PushEngine(
        store=store, client=push_client, keys=Keys(), clock=clock,
        settings=PushSettings(result_url=RESULT_URL, max_in_flight=0),
    )
    return RSGate(engine, store, clock=clock)


async def serve(listen: str, gate: RSGate, **kwargs):
    svc = rs_gate_service(reactor, listen, gate, **kwargs)
    svc.startService()
    port = await svc.when_listening()
    return svc, port


@pytest_twisted.async_yield_fixture
async def url(gate, push_client):
    svc, port = await serve("tcp:0:interface=127.0.0.1", gate)
    yield f"http://127.0.0.1:{port.getHost().port}/RPC2"
    await svc.stopService()
    assert push_client.calls == []


def call_sync(url: str, method: str, *args, **proxy_kwargs):
    with xmlrpc.client.ServerProxy(url, **proxy_kwargs) as proxy:
        return getattr(proxy, method)(*args)


async def call(url: str, method: str, *args, **proxy_kwargs):
    """One XML-RPC call from a thread: the reactor keeps serving meanwhile."""
    return await threads.deferToThread(call_sync, url, method, *args, **proxy_kwargs)


async def fault(url: str, method: str, *args, **proxy_kwargs) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as info:
        await call(url, method, *args, **proxy_kwargs)
    return info.value


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def post(body: bytes, path: bytes = b"/RPC2") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


async def count_operations(store) -> int:
    return len(await store.list_operations(limit=1000))


async def finish(store, operation_id: str, state: str = "succeeded", **changes):
    """Move a queued operation through sending to ``state`` as the engine would."""
    sending = await store.transition(operation_id, expect={"queued"}, state="sending",
                                     changes={"attempts": 1})
    assert sending is not None
    raw = changes.pop("raw", None)
    done = await store.transition(operation_id, expect={"sending"}, state=state,
                                  changes=changes, raw=raw)
    assert done is not None
    return done


# ---------------------------------------------------------------------------------------------
# push.submit
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_submit_returns_the_id_of_the_committed_order(url, store, logs):
    order = dict(PING, request_id="r-1", expires_in=600)
    operation_id = await call(url, "push.submit", order)
    assert isinstance(operation_id, str) and operation_id
    op = await store.get(operation_id)
    assert op is not None
    assert (op.state, op.distribution_id, op.operation, op.request_id) == (
        "queued", SA_A, "ping", "r-1")
    assert op.params == {"address": "192.0.2.1"}
    assert op.expires_at == T0 + 600
    # Per order: at debug level (counted in armsproxy_push_submitted_total instead).
    assert len(logs.find("push.submit: accepted", operation_id, "request_id r-1",
                         level="debug")) == 1
    assert not logs.find(operation_id, level="info")


@pytest_twisted.ensureDeferred
async def test_same_request_id_gives_the_same_operation_once(url, store, logs):
    first = await call(url, "push.submit", dict(PING, request_id="again"))
    second = await call(url, "push.submit", dict(PING, request_id="again"))
    assert first == second
    # Concurrent submits of one new request_id race in the store: one row, one id.
    racing = dict(PING, request_id="race", params={"address": "192.0.2.9", "count": 3})
    ids = await defer.gatherResults(
        [defer.ensureDeferred(call(url, "push.submit", racing)) for _ in range(8)])
    assert len(set(ids)) == 1 and ids[0] != first
    assert await count_operations(store) == 2
    assert len(logs.find("repeated request", first)) == 1


@pytest_twisted.ensureDeferred
async def test_request_id_reused_for_another_order_is_a_conflict(url, store):
    operation_id = await call(url, "push.submit", dict(PING, request_id="k"))
    f = await fault(url, "push.submit", dict(PING, request_id="k", params={"address": "x"}))
    assert f.faultCode == 409
    assert "request_id 'k'" in f.faultString and operation_id in f.faultString
    assert "params" in f.faultString
    f = await fault(url, "push.submit", dict(PING, request_id="k", distribution_id=SA_B))
    assert f.faultCode == 409 and "distribution_id" in f.faultString
    assert await count_operations(store) == 1


@pytest.mark.parametrize(
    ("order", "named"),
    [
        ({"distribution_id": SA_A, "operation": "explode"}, "operation"),
        (dict(PING, distribution_id=SA_A.lower()), "distribution_id"),
        (dict(PING, distribution_id="0001-0002"), "distribution_id"),
        ({"distribution_id": SA_A, "operation": "configure", "params": {"modules": []}},
         "params.modules"),
        ({"distribution_id": SA_A, "operation": "configure", "params": {}}, "modules"),
        ({"distribution_id": SA_A, "operation": "ping", "params": {}}, "address"),
        ({"distribution_id": SA_A, "operation": "ping", "params": {"address": "a b"}},
         "params.address"),
        ({"distribution_id": SA_A, "operation": "traceroute",
          "params": {"address": "192.0.2.1", "count": 1, "max_hop": 999}}, "params.max_hop"),
        (dict(PING, colour="red"), "colour"),
        (dict(PING, params={"address": "192.0.2.1", "ttl": 3}), "ttl"),
        (dict(PING, expires_in=-1), "expires_in"),
        (dict(PING, sa_url="http://sa.example/"), "sa_url"),
        (dict(PING, request_id=""), "request_id"),
        ("not a struct", "order must be a struct"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_orders_are_refused_with_the_field_named(url, store, logs, order, named):
    f = await fault(url, "push.submit", order)
    assert f.faultCode == 400
    assert named in f.faultString
    assert await count_operations(store) == 0
    assert logs.find("push.submit: fault 400", named)


@pytest_twisted.ensureDeferred
async def test_binary_params_are_accepted_and_kept(url, store):
    order = {"distribution_id": SA_A, "operation": "configure", "params": {
        "modules": [{"id": 1, "version": "1.0", "location": "https://192.0.2.5/m1"}],
        "md_configs": [{"id": 1, "data": xmlrpc.client.Binary(b"\x00\x01conf\xff")}]}}
    operation_id = await call(url, "push.submit", order)
    op = await store.get(operation_id)
    assert op.params["md_configs"][0]["data"] == b"\x00\x01conf\xff"


# ---------------------------------------------------------------------------------------------
# push.status / push.result / push.forget / push.cancel
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_of_a_queued_operation(url):
    operation_id = await call(url, "push.submit", dict(PING, request_id="s", expires_in=60))
    status = await call(url, "push.status", operation_id)
    assert status == {
        "operation_id": operation_id, "request_id": "s", "distribution_id": SA_A,
        "operation": "ping", "state": "queued", "attempts": 0, "created_at": T0,
        "updated_at": T0, "not_before": T0, "expires_at": T0 + 60, "forgotten": False,
    }


@pytest_twisted.ensureDeferred
async def test_status_faults(url):
    f = await fault(url, "push.status", "0123456789abcdef")
    assert f.faultCode == 404 and "0123456789abcdef" in f.faultString
    f = await fault(url, "push.status", 42)
    assert f.faultCode == 400 and "operation_id" in f.faultString
    f = await fault(url, "push.status")
    assert f.faultCode == 400 and "push.status(operation_id)" in f.faultString
    f = await fault(url, "push.status", "a", "b")
    assert f.faultCode == 400 and "got 2 argument(s)" in f.faultString


@pytest_twisted.ensureDeferred
async def test_result_of_a_finished_operation(url, store, clock):
    operation_id = await call(url, "push.submit", dict(PING))
    clock.advance(5)
    start = {"kind": "start", "at": T0 + 1, "request": "<arms-request type=\"ping-start\"/>",
             "answer": "<arms-response type=\"ping-start\"/>", "status": 200}
    await finish(store, operation_id, "started", raw=start, sa_transaction_id=7,
                 start_result_code=100, done_deadline=T0 + 900)
    done = {"kind": "done", "at": T0 + 5, "request": "<done>\x01odd</done>"}
    result = {"success": 3, "failure": 1, "blob": b"\x00\xff", "dones": [
        {"transaction_result": 100, "at": T0 + 5}], "none": None}
    await store.transition(operation_id, expect={"started"}, state="succeeded", raw=done,
                           changes={"transaction_result": 100, "result_code": 100,
                                    "result": result})
    answer = await call(url, "push.result", operation_id)
    assert answer["state"] == "succeeded"
    assert (answer["sa_transaction_id"], answer["start_result_code"],
            answer["transaction_result"], answer["result_code"]) == (7, 100, 100, 100)
    assert answer["done_deadline"] == T0 + 900 and answer["updated_at"] == T0 + 5
    assert answer["result"] == {"success": 3, "failure": 1,
                                "blob": xmlrpc.client.Binary(b"\x00\xff"),
                                "dones": [{"transaction_result": 100, "at": T0 + 5}]}
    assert answer["raw"][0] == start
    # A text XML cannot carry arrives as the Binary of its UTF-8 bytes, not as broken XML.
    assert answer["raw"][1] == {"kind": "done", "at": T0 + 5,
                                "request": xmlrpc.client.Binary(b"<done>\x01odd</done>")}
    # push.status is the same minus result and raw.
    status = await call(url, "push.status", operation_id)
    assert status == {k: v for k, v in answer.items() if k not in ("result", "raw", "order")}
    assert answer["order"] == {"params": {"address": "192.0.2.1"}}


@pytest_twisted.ensureDeferred
async def test_result_of_an_unfinished_operation_has_no_result_yet(url):
    operation_id = await call(url, "push.submit", dict(PING))
    answer = await call(url, "push.result", operation_id)
    assert answer["state"] == "queued" and answer["raw"] == [] and "result" not in answer
    assert (await fault(url, "push.result", "nope")).faultCode == 404


@pytest_twisted.ensureDeferred
async def test_forget(url, store):
    operation_id = await call(url, "push.submit", dict(PING))
    f = await fault(url, "push.forget", operation_id)
    assert f.faultCode == 409 and "queued" in f.faultString
    await finish(store, operation_id, "failed", last_error="SA said \x07no",
                 result={"x": 1}, raw={"kind": "start", "at": T0, "request": "<r/>"})
    assert await call(url, "push.forget", operation_id) is True
    assert await call(url, "push.forget", operation_id) is True  # twice is fine
    f = await fault(url, "push.result", operation_id)
    assert (f.faultCode, f.faultString) == (410, "forgotten")
    status = await call(url, "push.status", operation_id)
    assert status["forgotten"] is True and status["state"] == "failed"
    assert status["last_error"] == "SA said \ufffdno"
    op = await store.get(operation_id)
    assert op.result is None and op.raw == []
    assert (await fault(url, "push.forget", "nope")).faultCode == 404


@pytest_twisted.ensureDeferred
async def test_cancel(url, store, logs):
    queued = await call(url, "push.submit", dict(PING, request_id="c1"))
    assert await call(url, "push.cancel", queued) == {"cancelled": True, "state": "cancelled"}
    assert (await store.get(queued)).state == "cancelled"
    events = await store.pending_events(10)
    assert [(e.kind, e.operation_id) for e in events] == [("operation.cancelled", queued)]
    # Too late: again, while sending, and after the end.
    assert await call(url, "push.cancel", queued) == {"cancelled": False, "state": "cancelled"}
    sending = await call(url, "push.submit", dict(PING, request_id="c2"))
    await store.transition(sending, expect={"queued"}, state="sending")
    assert await call(url, "push.cancel", sending) == {"cancelled": False, "state": "sending"}
    done = await call(url, "push.submit", dict(PING, request_id="c3"))
    await finish(store, done, "succeeded")
    assert await call(url, "push.cancel", done) == {"cancelled": False, "state": "succeeded"}
    assert (await store.get(done)).state == "succeeded"
    assert (await fault(url, "push.cancel", "nope")).faultCode == 404
    assert logs.find("push.cancel", queued, "cancelled")
    assert logs.find("push.cancel", done, "too late (succeeded)")


# ---------------------------------------------------------------------------------------------
# push.list
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_filters_and_pages(url, store, clock):
    ids = []
    for i, distid in enumerate([SA_A, SA_B, SA_A, SA_B, SA_A]):
        ids.append(await call(url, "push.submit", dict(PING, distribution_id=distid,
                                                        request_id=f"l{i}")))
        clock.advance(10)
    await call(url, "push.cancel", ids[1])

    everything = await call(url, "push.list", {})
    assert [s["operation_id"] for s in everything["operations"]] == ids
    assert "next_offset" not in everything
    assert everything == await call(url, "push.list")  # the filter is optional
    assert everything["operations"][0] == await call(url, "push.status", ids[0])

    seen, offset = [], 0
    while True:
        page = await call(url, "push.list", {"limit": 2, "offset": offset})
        assert len(page["operations"]) <= 2
        seen += [s["operation_id"] for s in page["operations"]]
        if "next_offset" not in page:
            break
        offset = page["next_offset"]
    assert seen == ids

    async def listed(f):
        return [s["operation_id"] for s in (await call(url, "push.list", f))["operations"]]

    assert await listed({"distribution_id": SA_A}) == [ids[0], ids[2], ids[4]]
    assert await listed({"states": ["cancelled"]}) == [ids[1]]
    assert await listed({"states": ["queued"], "distribution_id": SA_B}) == [ids[3]]
    assert await listed({"since": T0 + 10, "until": T0 + 30}) == [ids[1], ids[2]]
    assert await listed({"since": int(T0) + 40}) == [ids[4]]


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"color": "red"}, "color"),
        ({"limit": 0}, "filter.limit"),
        ({"limit": 1001}, "filter.limit"),
        ({"limit": "10"}, "filter.limit"),
        ({"offset": -1}, "filter.offset"),
        ({"states": []}, "filter.states"),
        ({"states": ["done"]}, "filter.states"),
        ({"states": "queued"}, "filter.states"),
        ({"since": "yesterday"}, "filter.since"),
        ({"until": True}, "filter.until"),
        ({"distribution_id": "nope"}, "filter.distribution_id"),
        ("everything", "filter"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_list_refuses_bad_filters(url, bad, named):
    f = await fault(url, "push.list", bad)
    assert f.faultCode == 400 and named in f.faultString


# ---------------------------------------------------------------------------------------------
# sa.status / sa.list
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sa_status_and_list(url, store, clock):
    tunnel = {"url": "https://192.0.2.10:8444/t", "since": T0, "peer": None}
    await store.sa_update(SA_A, push_method="https-simple",
                          push_endpoint="https://192.0.2.20:10443/", confirmed=True,
                          sa_certificate="PEM", last_pull_at=T0 - 5,
                          last_confirmation_at=T0 - 1, last_peer="192.0.2.20:5555")
    await store.sa_update(SA_B, push_method="https-tunnel", tunnels=[tunnel])
    a = await call(url, "sa.status", SA_A)
    assert a == {
        "distribution_id": SA_A, "push_method": "https-simple",
        "push_endpoint": "https://192.0.2.20:10443/", "confirmed": True,
        "last_pull_at": T0 - 5, "last_confirmation_at": T0 - 1,
        "last_peer": "192.0.2.20:5555", "tunnels": [], "has_certificate": True,
        "updated_at": T0,
    }
    b = await call(url, "sa.status", SA_B)
    assert b["confirmed"] is False and b["has_certificate"] is False
    assert b["tunnels"] == [{"url": "https://192.0.2.10:8444/t", "since": T0}]
    assert "push_endpoint" not in b and "last_pull_at" not in b

    unknown = "0001-0000-1A2B-0105-0000-0000-0000-000C"
    f = await fault(url, "sa.status", unknown)
    assert f.faultCode == 404 and unknown in f.faultString
    f = await fault(url, "sa.status", "0001")
    assert f.faultCode == 400 and "distribution_id" in f.faultString

    assert await call(url, "sa.list", {}) == {"sas": [a, b]}
    assert await call(url, "sa.list") == {"sas": [a, b]}
    assert await call(url, "sa.list", {"confirmed": True}) == {"sas": [a]}
    assert await call(url, "sa.list", {"confirmed": False}) == {"sas": [b]}
    assert await call(url, "sa.list", {"limit": 1}) == {"sas": [a], "next_offset": 1}
    assert await call(url, "sa.list", {"limit": 1, "offset": 1}) == {"sas": [b]}
    f = await fault(url, "sa.list", {"distribution_id": SA_A})
    assert f.faultCode == 400 and "distribution_id" in f.faultString
    f = await fault(url, "sa.list", {"confirmed": 1})
    assert f.faultCode == 400 and "filter.confirmed" in f.faultString


# ---------------------------------------------------------------------------------------------
# Introspection, errors, HTTP
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_introspection_documents_every_method(url):
    listed = await call(url, "system.listMethods")
    assert sorted(m for m in listed if not m.startswith("system.")) == METHODS
    assert {"system.listMethods", "system.methodHelp", "system.methodSignature"} <= set(listed)
    for method in METHODS:
        help_text = await call(url, "system.methodHelp", method)
        assert help_text.startswith(method + "("), method
        signature = await call(url, "system.methodSignature", method)
        assert signature and all(isinstance(s, list) for s in signature), method
    assert await call(url, "system.methodSignature", "push.submit") == [["string", "struct"]]
    assert "request_id" in await call(url, "system.methodHelp", "push.submit")
    assert await call(url, "arms.interface_version") == INTERFACE_VERSION == "1.0"


@pytest_twisted.ensureDeferred
async def test_internal_error_is_fault_500_and_the_server_lives_on(url, store, logs):
    operation_id = await call(url, "push.submit", dict(PING))
    await store.close()
    f = await fault(url, "push.status", operation_id)
    assert (f.faultCode, f.faultString) == (500, "internal error")
    f = await fault(url, "push.submit", dict(PING, request_id="while-closed"))
    assert (f.faultCode, f.faultString) == (500, "internal error")
    tracebacks = logs.find("push.status: internal error", "Traceback", "StoreError")
    assert len(tracebacks) == 1
    assert await call(url, "arms.interface_version") == "1.0"
    await store.open()
    assert (await call(url, "push.status", operation_id))["state"] == "queued"
    assert await count_operations(store) == 1


@pytest_twisted.ensureDeferred
async def test_unknown_method_and_unreadable_calls(url, store, logs):
    f = await fault(url, "push.explode", 1)
    assert f.faultCode == -32601 and "push.explode" in f.faultString
    port = port_of(url)
    answer = await threads.deferToThread(raw_http, port, post(b"<methodCall><oops"))
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"<int>400</int>" in answer and b"cannot read the XML-RPC call" in answer
    dtd = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><methodCall>'
           b"<methodName>push.submit</methodName><params/></methodCall>")
    answer = await threads.deferToThread(raw_http, port, post(dtd))
    assert b"<int>400</int>" in answer and b"DTD" in answer
    assert len(logs.find("fault 400", "cannot read the XML-RPC call")) == 2
    assert await count_operations(store) == 0


@pytest_twisted.ensureDeferred
async def test_http_paths_and_methods(url):
    port = port_of(url)
    root = f"http://127.0.0.1:{port}/"
    assert await call(root, "arms.interface_version") == "1.0"
    with pytest.raises(xmlrpc.client.ProtocolError) as info:
        await call(f"http://127.0.0.1:{port}/elsewhere", "arms.interface_version")
    assert info.value.errcode == 404
    answer = await threads.deferToThread(
        raw_http, port, b"GET /RPC2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405")


@pytest_twisted.ensureDeferred
async def test_request_bodies_are_bounded(gate, store, logs):
    svc, port = await serve("tcp:0:interface=127.0.0.1", gate, max_body=2048)
    try:
        number = port.getHost().port
        # Declared too large: refused before the body is read.
        head = (b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
                b"Content-Length: 5000000\r\n\r\n<methodCall>")
        answer = await threads.deferToThread(raw_http, number, head)
        assert answer.startswith(b"HTTP/1.1 413")
        # Chunked, growing past the limit.
        chunk = b"x" * 1000
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
        chunked = (b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + body)
        answer = await threads.deferToThread(raw_http, number, chunked)
        assert answer.startswith(b"HTTP/1.1 413")
        assert len(logs.find("over the 2048 byte limit; answered 413")) == 2
        # Within the limit all is well; over it, the XML-RPC client gets no answer.
        url = f"http://127.0.0.1:{number}/RPC2"
        assert await call(url, "push.submit", dict(PING))
        with pytest.raises((xmlrpc.client.ProtocolError, ConnectionError)) as info:
            await call(url, "push.submit", dict(PING, params={"address": "y" * 3000}))
        if isinstance(info.value, xmlrpc.client.ProtocolError):
            assert info.value.errcode == 413
        assert await count_operations(store) == 1
    finally:
        await svc.stopService()


# ---------------------------------------------------------------------------------------------
# Listeners: unix socket, TLS with client certificates, configuration errors
# ---------------------------------------------------------------------------------------------


class UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def make_connection(self, host):
        self.close()  # kept in _connection, as the base class does, so that close() closes it
        conn = http.client.HTTPConnection("localhost")
        path = self.path

        def connect():
            conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.sock.connect(path)

        conn.connect = connect
        self._connection = host, conn
        return conn


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="rsg", dir="/tmp")  # AF_UNIX paths are short
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_a_stale_lock_naming_this_process_does_not_keep_the_unix_gate_down(
        gate, short_dir, logs):
    # A killed armsproxy left rs.sock.lock -> its PID; the restart got the same PID (PID 1 in
    # a container). Twisted sees a live owner and refuses; armsproxy clears it before listening.
    sock = short_dir / "rs.sock"
    os.symlink(str(os.getpid()), f"{sock}.lock")
    refused = rs_gate_service(reactor, f"unix:{sock}", gate)
    with pytest.raises(CannotListenError):
        refused.startService()  # a gate that cannot bind stops the start
    with pytest.raises(CannotListenError):
        await refused.when_listening()
    await refused.stopService()
    assert release_own_unix_lock(f"unix:{sock}:mode=600")
    assert logs.find("removed a stale lock naming this process")
    svc, _ = await serve(f"unix:{sock}", gate)
    try:
        assert await call("http://localhost/RPC2", "arms.interface_version",
                          transport=UnixTransport(str(sock))) == "1.0"
    finally:
        await svc.stopService()
    other = short_dir / "other.sock"
    os.symlink(str(os.getppid()), f"{other}.lock")  # a live process that is not us: kept
    assert not release_own_unix_lock(f"unix:{other}")
    assert os.path.islink(f"{other}.lock")
    assert not release_own_unix_lock("tcp:8780")


@pytest_twisted.ensureDeferred
async def test_unix_socket_is_private_by_default(gate, store, short_dir):
    sock = short_dir / "rs.sock"
    svc, _ = await serve(f"unix:{sock}", gate)
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        transport = UnixTransport(str(sock))
        assert await call("http://localhost/RPC2", "arms.interface_version",
                          transport=transport) == "1.0"
        operation_id = await call("http://localhost/RPC2", "push.submit", dict(PING),
                                  transport=UnixTransport(str(sock)))
        assert (await store.get(operation_id)).state == "queued"
    finally:
        await svc.stopService()
    sock2 = short_dir / "rs2.sock"
    svc, _ = await serve(f"unix:{sock2}:mode=660", gate)
    try:
        assert stat.S_IMODE(os.stat(sock2).st_mode) == 0o660
    finally:
        await svc.stopService()


@pytest.fixture(scope="module")
def rs_pki(tmp_path_factory):
    server_ca = trustme.CA()
    client_ca = trustme.CA()  # the CA that issues the RS's client certificate
    stranger_ca = trustme.CA()
    folder = tmp_path_factory.mktemp("rs-pki")
    server = server_ca.issue_cert("127.0.0.1")
    key, cert = folder / "gate.key", folder / "gate.crt"
    key.write_bytes(server.private_key_pem.bytes())
    cert.write_bytes(b"".join(p.bytes() for p in server.cert_chain_pems))
    other_key = folder / "other.key"
    other_key.write_bytes(server_ca.issue_cert("127.0.0.2").private_key_pem.bytes())
    return {
        "server_ca": server_ca, "client_ca": client_ca, "key": key, "cert": cert,
        "other_key": other_key,
        "rs": client_ca.issue_cert("rs.example", common_name="the RS"),
        "stranger": stranger_ca.issue_cert("rs.example", common_name="a stranger"),
        "listen": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    }


def tls_context(pki, client=None, tls_version=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki["server_ca"].cert_pem.bytes().decode())
    if client is not None:
        client.configure_cert(context)
    if tls_version is not None:
        context.maximum_version = tls_version
    return context


def tls_handshake_and_read(port: int, context: ssl.SSLContext) -> str:
    """Handshake, send one call, read: the error text if the server refused us."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(post(xmlrpc.client.dumps((), "arms.interface_version").encode()))
            data = conn.recv(65536)
            return f"answered {data[:12]!r}"
    except (ssl.SSLError, OSError) as e:
        return f"{type(e).__name__}: {e}"


@pytest_twisted.ensureDeferred
async def test_tls_requires_a_client_certificate_from_the_configured_ca(gate, store, rs_pki,
                                                                       logs):
    svc, port = await serve(rs_pki["listen"], gate,
                            tls_client_ca=rs_pki["client_ca"].cert_pem.bytes())
    try:
        number = port.getHost().port
        url = f"https://127.0.0.1:{number}/RPC2"
        good = tls_context(rs_pki, rs_pki["rs"])
        operation_id = await call(url, "push.submit", dict(PING), context=good)
        assert (await store.get(operation_id)).state == "queued"
        assert logs.find("push.submit: accepted", "certificate CN=the RS")

        for context in (tls_context(rs_pki), tls_context(rs_pki, rs_pki["stranger"])):
            with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
                await call(url, "push.submit", dict(PING, request_id="intruder"),
                           context=context)
        # TLS 1.3: the client learns at its first read; TLS 1.2: during the handshake.
        refused = await threads.deferToThread(tls_handshake_and_read, number,
                                              tls_context(rs_pki))
        assert "SSLError" in refused and "certificate required" in refused.lower()
        refused = await threads.deferToThread(
            tls_handshake_and_read, number,
            tls_context(rs_pki, tls_version=ssl.TLSVersion.TLSv1_2))
        assert "SSLError" in refused and "handshake failure" in refused.lower()
        refused = await threads.deferToThread(
            tls_handshake_and_read, number, tls_context(rs_pki, rs_pki["stranger"]))
        assert "SSLError" in refused
        assert await count_operations(store) == 1
    finally:
        await svc.stopService()


def test_tls_without_a_client_ca_is_refused_at_configuration(rs_pki):
    with pytest.raises(ListenerConfigError, match="client certificates"):
        rs_gate_endpoint(reactor, rs_pki["listen"])
    with pytest.raises(ListenerConfigError, match="privateKey"):
        rs_gate_endpoint(reactor, "ssl:0:interface=127.0.0.1",
                         tls_client_ca=rs_pki["client_ca"].cert_pem.bytes())
    with pytest.raises(ListenerConfigError, match="cannot read"):
        rs_gate_endpoint(reactor, "ssl:0:privateKey=/nonexistent/key.pem",
                         tls_client_ca=rs_pki["client_ca"].cert_pem.bytes())
    with pytest.raises(ListenerConfigError, match="key values mismatch"):
        rs_gate_endpoint(reactor, f"ssl:0:privateKey={rs_pki['other_key']}"
                                  f":certKey={rs_pki['cert']}",
                         tls_client_ca=rs_pki["client_ca"].cert_pem.bytes())
    with pytest.raises(ListenerConfigError, match="RS gate listener"):
        rs_gate_endpoint(reactor, "carrier-pigeon:0")


def test_plain_tcp_off_loopback_is_warned_about(logs):
    rs_gate_endpoint(reactor, "tcp:8780:interface=127.0.0.1")  # built, never listened on
    assert not logs.find("plain TCP")
    rs_gate_endpoint(reactor, "tcp:8780")
    assert logs.find("plain TCP on 0.0.0.0", level="warn")
