"""The SA gate end to end: real TLS on loopback, a real XML-RPC RS, the captured SA bytes.

Client side is a raw stdlib-ssl client in a thread (tests/conftest.py) that records every TLS
read; server side wraps the gate protocol's transport to record every ``write``. Together they
show the "whole answer in one write, Content-Length, then close" rule of §1 rule 5 / §2.4.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import Exchange, GatePKI, LogCapture, sa_exchange, start_gate
from lxml import etree
from OpenSSL import crypto
from twisted.internet import defer, reactor, task, threads
from twisted.web import server, xmlrpc

from armsproxy.arms.codec import parse_message
from armsproxy.rs_client import KeyCache, RSClient
from armsproxy.sa_gate.protocol import GateLimits, GateRequest, SAGateFactory
from armsproxy.sa_gate.relay import PullRelay, RelaySettings
from armsproxy.tls import TLSPolicy

VECTORS = Path(__file__).resolve().parent / "vectors" / "simple"
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
STRANGER = "0001-0002-0003-0004-0005-0006-0007-0009"  # the RS does not know it
GATE_PATH = "/armsproxy/sa"
PUBLIC_URL = "https://192.0.2.10:8443/armsproxy/sa"
TUNNEL_URL = "https://192.0.2.10:8444/armsproxy/tunnel"
CAPTURED_PROXY_URL = "https://127.0.0.1:18446/arms-proxy.cgi"


# ---------------------------------------------------------------------------------------------
# Captured bytes and request builders
# ---------------------------------------------------------------------------------------------


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def retarget(raw: bytes, path: str = GATE_PATH) -> bytes:
    """The captured request, sent to the gate's path instead of the capture's."""
    line, rest = raw.split(b"\r\n", 1)
    method, _, version = line.split(b" ")
    return b" ".join([method, path.encode("ascii"), version]) + b"\r\n" + rest


def captured_answer_body(name: str) -> bytes:
    return vector(name).partition(b"\r\n\r\n")[2]


CONFIG_REQUEST = retarget(vector("02-config-solicitation.request.txt"))
METHOD_QUERY_REQUEST = retarget(vector("03-push-method-query.request.txt"))
CONFIRMATION_REQUEST = retarget(vector("04-push-confirmation-start.request.txt"))
METHOD_QUERY_XML = METHOD_QUERY_REQUEST.partition(b"\r\n\r\n")[2]
CONFIG_XML = CONFIG_REQUEST.partition(b"\r\n\r\n")[2]


def basic(user: str, key: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode("ascii")


_DEFAULT = object()


def form_a(
    xml: bytes,
    *,
    authorization: Any = _DEFAULT,
    method: str = "POST",
    path: str = GATE_PATH,
) -> bytes:
    """A request in the SA's HTTP/1.0 form (§2.3 Form A)."""
    if authorization is _DEFAULT:
        authorization = basic(DISTID, KEY)
    head = [f"{method} {path} HTTP/1.0", "Content-Type: text/xml", f"Content-Length: {len(xml)}"]
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + xml


def chunked_head(path: str = GATE_PATH) -> bytes:
    """The SA's HTTP/1.1 chunked header block (§2.3 Form B), body to follow."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:443\r\nConnection: close\r\n"
        "Content-Type: text/xml\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: {basic(DISTID, KEY)}\r\n\r\n"
    ).encode("ascii")


def arms_xml(answer: Exchange) -> etree._Element:
    body = answer.body
    assert body.startswith(b"<?xml"), body[:80]
    return etree.fromstring(body)


def result_code(answer: Exchange) -> int:
    return int(arms_xml(answer).findtext("arms-response/result-code"))


def structure(root: etree._Element) -> list[tuple[int, str, tuple[str, ...]]]:
    """Element tags, nesting and attribute names in document order (values left out)."""
    out = []

    def walk(el: etree._Element, depth: int) -> None:
        out.append((depth, el.tag, tuple(sorted(el.attrib))))
        for child in el:
            walk(child, depth + 1)

    walk(root, 0)
    return out


def captured_config_answer() -> dict[str, Any]:
    """The RS struct (design.md §4) that yields the captured config-solicitation answer.

    Built from the capture itself; ``proxy_urls`` left out so the gate must fill in its own.
    """
    message = parse_message(
        captured_answer_body("02-config-solicitation.response.txt").split(b"\n", 1)[1]
    )
    body = message.body
    struct: dict[str, Any] = {
        "result_code": 100,
        "sa_certificate": body.sa_certificate,
        "sa_private_key": body.sa_private_key,
        "push_port": body.push_port,
        "push_timeout": body.push_timeout,
        "heartbeats": [
            {f.name: getattr(hb, f.name) for f in fields(hb)} for hb in body.heartbeats
        ],
        "rs_push_server_addresses": list(body.rs_push_server_addresses),
        "modules": [{f.name: getattr(m, f.name) for f in fields(m)} for m in body.modules],
        "md_configs": [
            {k: v for k, v in ((f.name, getattr(c, f.name)) for f in fields(c)) if v is not None}
            for c in body.md_configs
        ],
    }
    assert body.rs_pull_server_urls == [CAPTURED_PROXY_URL]
    return struct


# ---------------------------------------------------------------------------------------------
# The RS (design.md §4), scripted by each test
# ---------------------------------------------------------------------------------------------


class ScriptedRS(xmlrpc.XMLRPC):
    """The operator's RS: answers, faults and delays are set by the test; calls are recorded."""

    METHODS = (
        "arms.sa_key", "arms.config_solicitation", "arms.push_method_query",
        "arms.push_confirmation",
    )

    def __init__(self) -> None:
        super().__init__(allowNone=False, useDateTime=False)
        self.keys: dict[str, str] = {DISTID: KEY}
        self.answers: dict[str, Any] = {
            "arms.config_solicitation": captured_config_answer(),
            "arms.push_method_query": {
                "result_code": 100, "methods": ["https-tunnel", "https-simple"],
            },
            "arms.push_confirmation": {"result_code": 100},
        }
        self.faults: dict[str, tuple[int, str]] = {}
        self.delays: dict[str, float] = {}
        self.calls: list[tuple[str, tuple]] = []
        self._pending: list[tuple[Any, defer.Deferred, Any]] = []

    def called(self, method: str) -> list[tuple]:
        return [args for name, args in self.calls if name == method]

    def relayed(self) -> list[tuple[str, tuple]]:
        return [(name, args) for name, args in self.calls if name != "arms.sa_key"]

    def lookupProcedure(self, procedurePath):
        if procedurePath not in self.METHODS:
            raise xmlrpc.NoSuchFunction(self.NOT_FOUND, f"no such method {procedurePath}")

        def procedure(*args):
            self.calls.append((procedurePath, args))
            if procedurePath in self.faults:
                raise xmlrpc.Fault(*self.faults[procedurePath])
            if procedurePath == "arms.sa_key":
                if args[0] not in self.keys:
                    raise xmlrpc.Fault(404, "unknown distribution id")
                answer = self.keys[args[0]]
            else:
                answer = self.answers[procedurePath]
            delay = self.delays.get(procedurePath)
            if not delay:
                return answer
            d: defer.Deferred = defer.Deferred()
            call = reactor.callLater(delay, d.callback, answer)
            self._pending.append((call, d, answer))
            return d

        return procedure

    def release(self) -> None:
        """Answer every delayed call now (test teardown)."""
        for call, d, answer in self._pending:
            if call.active():
                call.cancel()
                d.callback(answer)
        self._pending.clear()


# ---------------------------------------------------------------------------------------------
# The gate, with its writes recorded
# ---------------------------------------------------------------------------------------------


class WriteRecorder:
    """Stands between the gate protocol and its TLS transport; records each ``write``."""

    def __init__(self, transport: Any, writes: list[bytes]) -> None:
        self._transport = transport
        self.writes = writes

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self._transport.write(data)

    def writeSequence(self, seq: list[bytes]) -> None:  # would break the one-write rule
        self.writes.append(b"<writeSequence>")
        self._transport.writeSequence(seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class RecordingGateFactory(SAGateFactory):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list[list[bytes]] = []  # per connection: its transport writes

    def buildProtocol(self, addr: object):
        protocol = super().buildProtocol(addr)
        writes: list[bytes] = []
        self.connections.append(writes)
        make = protocol.makeConnection
        protocol.makeConnection = lambda transport: make(WriteRecorder(transport, writes))
        return protocol


@dataclass
class Rig:
    pki: GatePKI
    rs: ScriptedRS
    rs_port: Any
    rs_client: RSClient
    relay: PullRelay
    factory: RecordingGateFactory
    gate_port: Any
    logs: LogCapture
    requests: list[GateRequest] = field(default_factory=list)
    rs_stopped: bool = False

    @property
    def port(self) -> int:
        return self.gate_port.getHost().port

    async def send(self, *steps: bytes | float, **kwargs: Any) -> Exchange:
        kwargs.setdefault("ca_pem", self.pki.ca_pem)
        return await sa_exchange(self.port, list(steps), **kwargs)

    async def rs_down(self) -> None:
        """Stop the RS and drop armsproxy's pooled connections to it: the next call is refused."""
        self.rs_stopped = True
        await self.rs_port.stopListening()
        await self.rs_client.close()

    async def assert_serving(self) -> None:
        """One more good request: the gate is still up and answers properly."""
        answer = await self.send(METHOD_QUERY_REQUEST)
        assert answer.status == 200, answer.data[:200]
        assert result_code(answer) == 100
        assert answer.eof

    def last_writes(self) -> list[bytes]:
        return self.factory.connections[-1]


@pytest_twisted.async_yield_fixture
async def rigs(gate_pki, logs):
    """Build gates on demand; everything they started is stopped after the test."""
    built: list[Rig] = []

    async def build(
        *,
        relay_budget: float = 20.0,
        limits: GateLimits | None = None,
        policy: TLSPolicy | None = None,
        tunnel_urls: list[str] | None = None,
        key_clock: Any = None,
        handler: Any = None,
    ) -> Rig:
        rs = ScriptedRS()
        rs_port = reactor.listenTCP(0, server.Site(rs), interface="127.0.0.1")
        rs_client = RSClient(reactor, f"http://127.0.0.1:{rs_port.getHost().port}/RPC2",
                             timeout=10.0)
        relay = PullRelay(
            rs=rs_client,
            keys=KeyCache(rs_client, key_clock or reactor),
            settings=RelaySettings(public_urls=[PUBLIC_URL], tunnel_urls=tunnel_urls or []),
            clock=reactor,
            relay_budget=relay_budget,
        )
        requests: list[GateRequest] = []

        async def recording_handler(request: GateRequest) -> bytes:
            requests.append(request)
            return await (handler or relay.handle)(request)

        factory = RecordingGateFactory(
            recording_handler, clock=reactor,
            limits=limits or GateLimits(paths=frozenset({GATE_PATH})),
            counter=lambda name: relay.stats.update([name]),  # as tap.py wires it
        )
        gate_port = await start_gate(factory, gate_pki, policy)
        rig = Rig(gate_pki, rs, rs_port, rs_client, relay, factory, gate_port, logs, requests)
        built.append(rig)
        return rig

    yield build

    for rig in built:
        rig.rs.release()
        await rig.gate_port.stopListening()
        if not rig.rs_stopped:
            await rig.rs_port.stopListening()
        await rig.rs_client.close()


@pytest_twisted.async_fixture
async def rig(rigs) -> Rig:
    return await rigs()


def assert_one_write_then_close(rig: Rig, answer: Exchange) -> None:
    """§1 rule 5: status line, headers and body in one transport write; then the close."""
    writes = rig.last_writes()
    assert writes == [answer.data], f"{len(writes)} writes: {[w[:40] for w in writes]}"
    assert answer.eof, answer.error
    content_length = answer.header("Content-Length")
    assert content_length is not None and int(content_length) == len(answer.body)
    assert answer.header("Transfer-Encoding") is None
    if len(answer.data) < 16384:  # one TLS record holds 16 KiB
        assert len(answer.reads) == 1, [len(r) for r in answer.reads]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.01, lambda: None)


# ---------------------------------------------------------------------------------------------
# Happy path: the three pulls with the captured request bytes
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_config_solicitation_answers_like_the_capture_in_one_write(rig):
    answer = await rig.send(CONFIG_REQUEST)

    assert answer.status == 200
    assert answer.header("Content-Type") == "text/xml"
    assert_one_write_then_close(rig, answer)
    # Byte for byte the captured answer, with the gate's public URL as rs-pull-server-url.
    expected = captured_answer_body("02-config-solicitation.response.txt").replace(
        CAPTURED_PROXY_URL.encode(), PUBLIC_URL.encode()
    )
    assert answer.body == expected
    assert structure(arms_xml(answer)) == structure(etree.fromstring(expected))
    (args,) = rig.rs.called("arms.config_solicitation")
    distid, info = args
    assert distid == DISTID
    assert info["trigger"] == "power on boot"
    assert info["protocol_version"] == "4.0"
    assert info["firmware_info"] == "Version 5.33"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", info["peer"])


@pytest_twisted.ensureDeferred
async def test_config_solicitation_keeps_the_rs_proxy_urls(rig):
    other = "https://198.51.100.7/other-proxy"
    rig.rs.answers["arms.config_solicitation"]["proxy_urls"] = [other, PUBLIC_URL]

    answer = await rig.send(CONFIG_REQUEST)

    urls = arms_xml(answer).findall(".//rs-pull-server-url")
    assert [u.text for u in urls] == [other, PUBLIC_URL]


@pytest_twisted.ensureDeferred
async def test_push_method_query_drops_the_tunnel_without_a_tunnel_url(rig):
    # The RS prefers https-tunnel, but the gate has no tunnel URL to hand out.
    answer = await rig.send(METHOD_QUERY_REQUEST)

    assert answer.status == 200
    assert_one_write_then_close(rig, answer)
    assert answer.body == captured_answer_body("03-push-method-query.response.txt")
    assert rig.rs.called("arms.push_method_query")[0][1]["methods"] == [
        "https-simple", "https-tunnel",
    ]
    assert rig.logs.find("https-tunnel preferred", "no tunnel URL")


@pytest_twisted.ensureDeferred
async def test_push_method_query_follows_the_rs_order_with_a_tunnel_url(rigs):
    rig = await rigs(tunnel_urls=[TUNNEL_URL])

    answer = await rig.send(METHOD_QUERY_REQUEST)

    body = arms_xml(answer).find("arms-response/push-method-query-response")
    assert [m.text for m in body.findall("push-method")] == ["https-tunnel", "https-simple"]
    assert [u.text for u in body.findall("https-tunnel-url")] == [TUNNEL_URL]
    assert body.findtext("https-tunnel-echo-interval") == "60"


@pytest_twisted.ensureDeferred
async def test_push_method_query_answers_only_methods_the_sa_offered(rigs):
    rig = await rigs(tunnel_urls=[TUNNEL_URL])
    rig.rs.answers["arms.push_method_query"] = {
        "result_code": 100, "methods": ["https-tunnel", "https-simple", "https-tunnel"],
    }
    simple_only = METHOD_QUERY_XML.replace(b"<push-method>https-tunnel</push-method>", b"")

    answer = await rig.send(form_a(simple_only))

    body = arms_xml(answer).find("arms-response/push-method-query-response")
    assert [m.text for m in body.findall("push-method")] == ["https-simple"]
    assert body.find("https-tunnel-url") is None
    assert body.find("https-tunnel-echo-interval") is None


@pytest_twisted.ensureDeferred
async def test_push_confirmation_start_has_a_transaction_id(rig):
    answer = await rig.send(CONFIRMATION_REQUEST)

    assert answer.status == 200
    assert_one_write_then_close(rig, answer)
    root = arms_xml(answer)
    captured = etree.fromstring(captured_answer_body("04-push-confirmation-start.response.txt"))
    assert structure(root) == structure(captured)
    tid = root.find("arms-response/transaction-id")
    assert tid is not None and re.fullmatch(r"[1-9][0-9]*", tid.text)
    assert 0 < int(tid.text) < 2**31
    assert root.findtext("arms-response/result-code") == "100"
    (args,) = rig.rs.called("arms.push_confirmation")
    assert args[0] == DISTID
    assert args[1]["method"] == "https-simple"
    assert args[1]["push_endpoint"] == "https://127.0.0.1:18450/"


# ---------------------------------------------------------------------------------------------
# Key cache
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_key_is_fetched_once_for_several_requests(rig):
    for request in (CONFIG_REQUEST, METHOD_QUERY_REQUEST, CONFIRMATION_REQUEST,
                    METHOD_QUERY_REQUEST):
        answer = await rig.send(request)
        assert answer.status == 200

    assert rig.rs.called("arms.sa_key") == [(DISTID,)]
    assert len(rig.rs.relayed()) == 4


@pytest_twisted.ensureDeferred
async def test_a_wrong_key_gets_401_and_nothing_is_relayed(rig):
    answer = await rig.send(form_a(METHOD_QUERY_XML, authorization=basic(DISTID, "not-the-key")))

    assert answer.status == 401
    assert answer.header("WWW-Authenticate") == 'Basic realm="arms"'
    assert_one_write_then_close(rig, answer)
    assert rig.rs.relayed() == []
    assert rig.logs.find("401", "wrong key", DISTID)
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_a_rotated_key_is_picked_up_with_one_refetch(rigs):
    key_clock = task.Clock()
    rig = await rigs(key_clock=key_clock)
    assert (await rig.send(METHOD_QUERY_REQUEST)).status == 200
    rig.rs.keys[DISTID] = "rotated-key"
    rotated = form_a(METHOD_QUERY_XML, authorization=basic(DISTID, "rotated-key"))

    # Right after a fetch, a mismatch does not reach the RS again (rate limit).
    assert (await rig.send(rotated)).status == 401
    assert len(rig.rs.called("arms.sa_key")) == 1

    key_clock.advance(6)
    assert (await rig.send(rotated)).status == 200
    assert len(rig.rs.called("arms.sa_key")) == 2
    # The old key is now wrong, and asking again so soon costs no RS call.
    assert (await rig.send(METHOD_QUERY_REQUEST)).status == 401
    assert (await rig.send(rotated)).status == 200
    assert len(rig.rs.called("arms.sa_key")) == 2


# ---------------------------------------------------------------------------------------------
# Bad input: each gets its defined answer and a log line, and the gate keeps serving
# ---------------------------------------------------------------------------------------------

BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n<!ENTITY lol "lol">\n'
    + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode()
        for i in range(1, 10)
    )
    + b"]>\n"
    + METHOD_QUERY_XML.replace(b"libarms Test Client", b"&lol9;")
)

BAD_BODIES = {
    "malformed": (METHOD_QUERY_XML[:-20], "invalid-xml"),
    "non-ascii": (METHOD_QUERY_XML.replace(b"Test Client", "Test Cliént".encode()), "non-ascii"),
    "dtd": (b'<!DOCTYPE arms-message SYSTEM "arms.dtd">\n' + METHOD_QUERY_XML, "forbidden-markup"),
    "billion-laughs": (BILLION_LAUGHS, "forbidden-markup"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
@pytest_twisted.ensureDeferred
async def test_bad_xml_gets_400(rig, case):
    body, reason = BAD_BODIES[case]
    started = time.monotonic()

    answer = await rig.send(form_a(body))

    assert answer.status == 400
    assert time.monotonic() - started < 3
    assert_one_write_then_close(rig, answer)
    assert rig.rs.relayed() == []
    assert rig.logs.find("SA gate: 400", DISTID, reason), rig.logs.lines()
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_external_entity_is_never_resolved(rig):
    secret = Path("/etc/passwd").read_text().splitlines()[0]
    assert secret  # something that would show if the file were read
    xxe = (
        b'<?xml version="1.0"?>\n<!DOCTYPE arms-message [\n'
        b'<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        + METHOD_QUERY_XML.replace(b"libarms Test Client", b"&xxe;")
    )

    answer = await rig.send(form_a(xxe))

    assert answer.status == 400
    assert rig.logs.find("SA gate: 400", "forbidden-markup")
    assert secret.encode() not in answer.data
    assert secret not in rig.logs.text()
    assert secret not in repr(rig.rs.calls)
    assert rig.rs.relayed() == []
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_content_length_over_the_limit_is_refused_before_the_body(rig):
    head = (
        f"POST {GATE_PATH} HTTP/1.0\r\nContent-Type: text/xml\r\n"
        f"Content-Length: {2 * 1024 * 1024}\r\nAuthorization: {basic(DISTID, KEY)}\r\n\r\n"
    ).encode()

    # The client sends the header block only and then waits: the answer must come anyway.
    answer = await rig.send(head, timeout=5.0)

    assert answer.sent == len(head)
    assert answer.status == 413, answer.error
    assert_one_write_then_close(rig, answer)
    assert rig.requests == []  # the handler never saw it
    assert rig.logs.find("SA gate: 413", "over the 1048576 limit")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_gets_413(rig):
    piece = b"<" * (768 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    answer = await rig.send(chunked_head() + chunk + chunk)

    assert answer.status == 413, answer.error
    assert_one_write_then_close(rig, answer)
    assert rig.requests == []
    assert rig.logs.find("SA gate: 413", "chunked body over the 1048576 limit")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_a_chunk_declared_over_the_limit_gets_413_before_its_data(rig):
    answer = await rig.send(chunked_head() + f"{2 * 1024 * 1024:x}\r\n".encode(), timeout=5.0)

    assert answer.status == 413, answer.error
    assert rig.logs.find("SA gate: 413", "chunked body over")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_a_slow_client_is_dropped_at_the_request_deadline(rigs):
    rig = await rigs(limits=GateLimits(paths=frozenset({GATE_PATH}), request_timeout=0.5))
    head, _, body = METHOD_QUERY_REQUEST.partition(b"\r\n\r\n")

    # Header block and half the body, then nothing more.
    answer = await rig.send(head + b"\r\n\r\n" + body[:100], timeout=5.0)

    assert answer.status == 408, answer.error
    assert answer.eof
    assert 0.4 < answer.elapsed < 3.0
    assert rig.requests == []
    assert rig.logs.find("not complete within 0.5 s")
    await rig.assert_serving()


def _silent_tcp_client(port: int) -> tuple[float, bytes]:
    """Connect without ever starting TLS; return when the server drops the connection."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=8.0)
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            received += data
            if not data:
                break
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return time.monotonic() - started, received


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_starts_tls_is_dropped(rigs):
    limits = GateLimits(paths=frozenset({GATE_PATH}), request_timeout=0.3, close_grace=0.3)
    rig = await rigs(limits=limits)

    elapsed, received = await threads.deferToThread(_silent_tcp_client, rig.port)

    # TLS has no place for our 408 before the handshake: the connection is aborted instead.
    assert 0.25 < elapsed < 3.0
    assert b"HTTP" not in received
    # Per connection and the peer's doing: a debug line and a counter, not an info line.
    assert rig.logs.find("did not close after its answer", level="debug")
    assert rig.relay.stats["answer.close_aborted"] == 1
    await rig.assert_serving()


UNAUTHORIZED = {
    "missing": (None, "missing Authorization header"),
    "not-basic": ("Bearer abc", "Authorization is not Basic"),
    "not-base64": ("Basic !!!not-base64!!!", "malformed Basic credentials"),
    "no-colon": ("Basic " + base64.b64encode(DISTID.encode()).decode(), "without ':'"),
    "not-a-distid": (basic("sa-number-one", KEY), "not a distribution id"),
    "lower-case-distid": (basic("0001-0002-0003-0004-0005-0006-00ab-cdef", KEY),
                          "not a distribution id"),
    "unknown-distid": (basic(STRANGER, KEY),
                       f"unknown distribution id or wrong key for {STRANGER}"),
    "wrong-key": (basic(DISTID, KEY + "x"), f"unknown distribution id or wrong key for {DISTID}"),
}


@pytest.mark.parametrize("case", sorted(UNAUTHORIZED))
@pytest_twisted.ensureDeferred
async def test_unauthorized_requests_get_401(rig, case):
    authorization, reason = UNAUTHORIZED[case]

    answer = await rig.send(form_a(METHOD_QUERY_XML, authorization=authorization))

    assert answer.status == 401
    assert answer.header("WWW-Authenticate") == 'Basic realm="arms"'
    assert_one_write_then_close(rig, answer)
    assert rig.rs.relayed() == []
    assert rig.logs.find("SA gate: 401", reason), rig.logs.lines()
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_a_message_for_another_distid_gets_403(rig):
    other = METHOD_QUERY_XML.replace(DISTID.encode(), STRANGER.encode())

    answer = await rig.send(form_a(other))

    assert answer.status == 403
    assert_one_write_then_close(rig, answer)
    assert rig.rs.relayed() == []
    assert rig.logs.find("SA gate: 403", f"authenticated as {DISTID}", STRANGER)
    await rig.assert_serving()


@pytest.mark.parametrize("type_", ["bogus-type", "rs-solicitation"])
@pytest_twisted.ensureDeferred
async def test_a_type_not_served_here_gets_400(rig, type_):
    xml = (
        f'<arms-message><arms-request type="{type_}"><distribution-id>{DISTID}'
        "</distribution-id></arms-request></arms-message>"
    ).encode()

    answer = await rig.send(form_a(xml))

    assert answer.status == 400
    assert rig.rs.relayed() == []
    assert rig.logs.find("SA gate: 400", f"type {type_!r} is not served here")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_get_gets_405_with_allow(rig):
    answer = await rig.send(f"GET {GATE_PATH} HTTP/1.0\r\n\r\n".encode())

    assert answer.status == 405
    assert answer.header("Allow") == "POST"
    assert_one_write_then_close(rig, answer)
    assert rig.logs.find("SA gate: 405", "'GET' not allowed")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_an_unknown_path_gets_404(rig):
    # The captured request as it was: sent to the capture's proxy path, not this gate's.
    answer = await rig.send(vector("03-push-method-query.request.txt"))

    assert answer.status == 404
    assert_one_write_then_close(rig, answer)
    assert rig.requests == []
    assert rig.logs.find("SA gate: 404", "/arms-proxy.cgi")
    await rig.assert_serving()


HTTP_FRAMING = {
    "no-length": (f"POST {GATE_PATH} HTTP/1.0\r\n\r\n".encode(), 411),
    "bad-length": (f"POST {GATE_PATH} HTTP/1.0\r\nContent-Length: ten\r\n\r\n".encode(), 400),
    "request-line": (b"POST\r\n\r\n", 400),
    "non-ascii-header": (f"POST {GATE_PATH} HTTP/1.0\r\nX: \xe9\r\n\r\n".encode("latin-1"), 400),
    "header-too-large": (f"POST {GATE_PATH} HTTP/1.0\r\nX: ".encode() + b"a" * 9000, 431),
    "bad-chunk": (chunked_head() + b"zz\r\n", 400),
}


@pytest.mark.parametrize("case", sorted(HTTP_FRAMING))
@pytest_twisted.ensureDeferred
async def test_broken_http_gets_its_status(rig, case):
    raw, status = HTTP_FRAMING[case]

    answer = await rig.send(raw, timeout=5.0)

    assert answer.status == status, answer.data[:100] or answer.error
    assert_one_write_then_close(rig, answer)
    assert rig.requests == []
    assert rig.logs.find(f"SA gate: {status}")
    await rig.assert_serving()


# ---------------------------------------------------------------------------------------------
# The RS fails: armsproxy's own answers must only make the SA retry (§10.2)
# ---------------------------------------------------------------------------------------------


def assert_server_busy(answer: Exchange, type_: str) -> None:
    assert answer.status == 200
    root = arms_xml(answer)
    assert root.find("arms-response").get("type") == type_
    assert root.findtext("arms-response/result-code") == "301"
    assert root.findtext("arms-response/description") == "Server Busy"


@pytest_twisted.ensureDeferred
async def test_rs_down_after_the_key_was_cached_gets_301(rig):
    assert (await rig.send(METHOD_QUERY_REQUEST)).status == 200
    await rig.rs_down()

    for request, type_ in ((CONFIG_REQUEST, "config-solicitation"),
                           (METHOD_QUERY_REQUEST, "push-method-query"),
                           (CONFIRMATION_REQUEST, "push-confirmation-start")):
        answer = await rig.send(request)
        assert_server_busy(answer, type_)
        assert_one_write_then_close(rig, answer)
        assert rig.logs.find("SA gate: RS failed for", type_, DISTID, "answering 301")


@pytest_twisted.ensureDeferred
async def test_rs_down_before_the_key_is_known_gets_503(rig):
    await rig.rs_down()

    answer = await rig.send(METHOD_QUERY_REQUEST)

    assert answer.status == 503
    assert answer.header("Retry-After") == "60"
    assert_one_write_then_close(rig, answer)
    assert rig.logs.find("cannot check the key of", DISTID, "RS unavailable", level="error")


@pytest_twisted.ensureDeferred
async def test_a_slow_rs_gets_301_within_the_budget(rigs):
    rig = await rigs(relay_budget=0.5)
    assert (await rig.send(METHOD_QUERY_REQUEST)).status == 200  # key cached
    rig.rs.delays["arms.config_solicitation"] = 5.0

    answer = await rig.send(CONFIG_REQUEST)

    assert_server_busy(answer, "config-solicitation")
    assert answer.elapsed < 2.5
    assert rig.logs.find("RS failed for", "config-solicitation", "answering 301")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_a_slow_key_lookup_gets_503_within_the_budget(rigs):
    rig = await rigs(relay_budget=0.5)
    rig.rs.delays["arms.sa_key"] = 5.0

    answer = await rig.send(METHOD_QUERY_REQUEST)

    assert answer.status == 503
    assert answer.elapsed < 2.5
    assert rig.logs.find("cannot check the key of", DISTID)


PULLS = {  # ARMS type -> (RS method, captured request)
    "config-solicitation": ("arms.config_solicitation", CONFIG_REQUEST),
    "push-method-query": ("arms.push_method_query", METHOD_QUERY_REQUEST),
    "push-confirmation-start": ("arms.push_confirmation", CONFIRMATION_REQUEST),
}


@pytest.mark.parametrize("type_", sorted(PULLS))
@pytest_twisted.ensureDeferred
async def test_an_rs_fault_gets_301(rig, type_):
    method, request_bytes = PULLS[type_]
    rig.rs.faults[method] = (500, "database unavailable")

    answer = await rig.send(request_bytes)

    assert_server_busy(answer, type_)
    assert rig.logs.find("RS failed for", type_, "database unavailable", level="error")


NO_USABLE_HEARTBEAT = {
    "none": [],
    "interval-zero": [{"host": "127.0.0.1", "passphrase": "hb", "port": 18447, "interval": 0}],
    "no-interval": [{"host": "127.0.0.1", "passphrase": "hb", "port": 18447}],
}


@pytest.mark.parametrize("case", sorted(NO_USABLE_HEARTBEAT))
@pytest_twisted.ensureDeferred
async def test_a_config_the_device_would_busy_loop_on_is_refused_with_301(rig, case):
    rig.rs.answers["arms.config_solicitation"]["heartbeats"] = NO_USABLE_HEARTBEAT[case]

    answer = await rig.send(CONFIG_REQUEST)

    assert_server_busy(answer, "config-solicitation")
    assert b"md-config" not in answer.body
    assert rig.logs.find("would break the device", "heartbeat-info", "6.2", level="error")


WRONG_SHAPES = {
    "heartbeat-without-passphrase": (
        "config-solicitation", {"heartbeats": [{"host": "127.0.0.1", "interval": 60}]}),
    "push-port-as-text": ("config-solicitation", {"push_port": "18450"}),
    "md-config-without-data": ("config-solicitation", {"md_configs": [{"id": 1}]}),
    "methods-not-a-list": ("push-method-query", {"methods": "https-simple"}),
    "echo-interval-as-text": ("push-method-query", {
        "methods": ["https-tunnel"], "tunnel_urls": [TUNNEL_URL], "echo_interval": "often"}),
    "echo-interval-zero": ("push-method-query", {
        "methods": ["https-tunnel"], "tunnel_urls": [TUNNEL_URL], "echo_interval": 0}),
    "no-method-in-common": ("push-method-query", {"methods": ["carrier-pigeon"]}),
}


@pytest.mark.parametrize("case", sorted(WRONG_SHAPES))
@pytest_twisted.ensureDeferred
async def test_an_rs_answer_of_the_wrong_shape_gets_301(rig, case):
    type_, bad = WRONG_SHAPES[case]
    method, request_bytes = PULLS[type_]
    rig.rs.answers[method] = {**rig.rs.answers[method], **bad}

    answer = await rig.send(request_bytes)

    assert_server_busy(answer, type_)
    assert rig.logs.find("unusable RS answer for", type_, level="error"), rig.logs.lines()


@pytest.mark.parametrize("type_,code", [
    ("config-solicitation", 503), ("push-method-query", 502), ("push-confirmation-start", 406),
])
@pytest_twisted.ensureDeferred
async def test_a_result_code_chosen_by_the_rs_is_relayed(rig, type_, code):
    method, request_bytes = PULLS[type_]
    rig.rs.answers[method] = {"result_code": code}

    answer = await rig.send(request_bytes)

    assert answer.status == 200
    assert_one_write_then_close(rig, answer)
    root = arms_xml(answer)
    assert root.find("arms-response").get("type") == type_
    assert root.findtext("arms-response/result-code") == str(code)
    assert root.find("arms-response/transaction-id") is None


# ---------------------------------------------------------------------------------------------
# The protocol around a handler: hard limit, failures, SAs that leave early
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_handler_over_the_hard_limit_gets_503(rigs):
    async def never(request: GateRequest) -> bytes:
        await defer.Deferred()
        raise AssertionError("not reached")

    limits = GateLimits(paths=frozenset({GATE_PATH}), answer_timeout=0.3)
    rig = await rigs(limits=limits, handler=never)

    answer = await rig.send(METHOD_QUERY_REQUEST)

    assert answer.status == 503
    assert_one_write_then_close(rig, answer)
    assert rig.logs.find("no answer within the hard limit", level="error")


@pytest.mark.parametrize("answer_timeout", [25.0, 3.0])
def test_one_timer_per_pull_the_request_deadline_moved_to_the_answer(answer_timeout):
    """The request's deadline becomes the answer's (moved, not a second timer); an answer
    limit sooner than what is left of the request's still holds, at its own time."""
    from twisted.internet.testing import StringTransport

    clock = task.Clock()
    pending: list[defer.Deferred] = []

    async def waits(request: GateRequest) -> bytes:
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        return await d

    limits = GateLimits(paths=frozenset({GATE_PATH}), request_timeout=20.0,
                        answer_timeout=answer_timeout)
    protocol = SAGateFactory(waits, clock=clock, limits=limits).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5.0)
    protocol.dataReceived(METHOD_QUERY_REQUEST)
    assert pending and len(clock.getDelayedCalls()) == 1
    [timer] = clock.getDelayedCalls()
    assert timer.getTime() == 5.0 + answer_timeout
    clock.advance(answer_timeout - 0.5)
    assert transport.value() == b""
    clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 503 ") or \
        transport.value().startswith(b"HTTP/1.0 503 ")
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


def test_an_answer_in_time_leaves_no_deadline_behind():
    from twisted.internet.testing import StringTransport

    clock = task.Clock()
    answer: defer.Deferred = defer.Deferred()

    async def later(request: GateRequest) -> bytes:
        return await answer

    limits = GateLimits(paths=frozenset({GATE_PATH}))
    protocol = SAGateFactory(later, clock=clock, limits=limits).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(METHOD_QUERY_REQUEST)
    clock.advance(limits.request_timeout + 1)  # past the request's own limit: moved
    assert transport.value() == b""
    answer.callback(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    [reaper] = clock.getDelayedCalls()  # only the close grace is left
    assert reaper.getTime() == clock.seconds() + limits.close_grace
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_failing_handler_gets_500_and_a_logged_failure(rigs):
    async def broken(request: GateRequest) -> bytes:
        raise RuntimeError("boom in the handler")

    rig = await rigs(handler=broken)

    answer = await rig.send(METHOD_QUERY_REQUEST)

    assert answer.status == 500
    assert_one_write_then_close(rig, answer)
    assert rig.logs.find("handler failed", "boom in the handler", level="critical")


@pytest_twisted.ensureDeferred
async def test_an_sa_that_leaves_before_its_answer_cancels_the_handler(rigs):
    waiting: list[defer.Deferred] = []
    cancelled: list[bool] = []

    async def slow(request: GateRequest) -> bytes:
        d: defer.Deferred = defer.Deferred(lambda _d: cancelled.append(True))
        waiting.append(d)
        return await d

    rig = await rigs(handler=slow)

    answer = await rig.send(METHOD_QUERY_REQUEST, read=False)  # send, then close at once
    await until(lambda: cancelled)

    assert answer.error is None
    assert rig.last_writes() == []
    assert rig.logs.find("closed the connection before its answer", level="debug")
    assert rig.relay.stats["answer.peer_closed"] == 1
    assert not rig.logs.find("handler failed")
    assert not rig.logs.find("hard limit")


@pytest_twisted.ensureDeferred
async def test_the_relay_stops_its_rs_call_when_the_sa_leaves(rig):
    assert (await rig.send(METHOD_QUERY_REQUEST)).status == 200  # key cached
    rig.rs.delays["arms.config_solicitation"] = 5.0

    await rig.send(CONFIG_REQUEST, read=False)
    await until(lambda: rig.logs.find("closed the connection before its answer"))
    await until(lambda: rig.logs.find("cancelled by the caller", level="debug"))
    assert rig.relay.stats["answer.peer_closed"] == 1

    assert rig.last_writes() == []
    assert not rig.logs.find("handler failed")
    assert not rig.logs.find("answering 301")


# ---------------------------------------------------------------------------------------------
# TLS policy (§2.1)
# ---------------------------------------------------------------------------------------------


def _tls(version: str) -> ssl.TLSVersion:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
                "1.2": ssl.TLSVersion.TLSv1_2}[version]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest_twisted.ensureDeferred
async def test_the_default_policy_refuses_old_tls(rig, version):
    answer = await rig.send(METHOD_QUERY_REQUEST, tls_version=_tls(version))

    assert answer.error is not None and "SSL" in answer.error, answer
    assert answer.data == b""
    assert rig.requests == []
    assert not rig.logs.find("accepts TLS")
    await rig.assert_serving()


@pytest_twisted.ensureDeferred
async def test_tls_1_0_by_opt_in_with_a_startup_warning(rigs):
    rig = await rigs(policy=TLSPolicy(minimum_version="1.0"))

    assert rig.logs.find("SA gate accepts TLS 1.0", level="warn")
    for version, name in (("1.0", "TLSv1"), ("1.1", "TLSv1.1"), ("1.2", "TLSv1.2")):
        answer = await rig.send(METHOD_QUERY_REQUEST, tls_version=_tls(version))
        assert answer.tls_version == name, (
            f"TLS {version} handshake failed ({answer.error}); the local OpenSSL "
            f"({ssl.OPENSSL_VERSION}) cannot do TLS {version} even at SECLEVEL 0?"
        )
        assert answer.status == 200
        assert_one_write_then_close(rig, answer)


def _der(leaf: trustme.LeafCert) -> bytes:
    pem = leaf.cert_chain_pems[0].bytes()
    return crypto.dump_certificate(crypto.FILETYPE_ASN1,
                                   crypto.load_certificate(crypto.FILETYPE_PEM, pem))


@pytest_twisted.ensureDeferred
async def test_client_certificates_are_asked_for_but_not_required(rigs, gate_pki):
    rig = await rigs(policy=TLSPolicy(client_ca_pem=gate_pki.ca_pem))

    without = await rig.send(CONFIG_REQUEST)  # a fresh SA has no certificate yet (§2.1)
    with_cert = await rig.send(METHOD_QUERY_REQUEST, client_cert=gate_pki.client)

    assert without.status == 200 and result_code(without) == 100
    assert with_cert.status == 200 and result_code(with_cert) == 100
    assert [r.client_certificate for r in rig.requests] == [None, _der(gate_pki.client)]


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_from_another_ca_is_refused(rigs, gate_pki):
    rig = await rigs(policy=TLSPolicy(client_ca_pem=gate_pki.ca_pem))
    stranger = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert(
        "sa.invalid", key_type=trustme.KeyType.RSA
    )

    answer = await rig.send(METHOD_QUERY_REQUEST, client_cert=stranger, timeout=5.0)

    assert answer.status is None, answer.data[:100]
    assert answer.error is not None
    assert rig.requests == []
    with_cert = await rig.send(METHOD_QUERY_REQUEST, client_cert=gate_pki.client)
    assert with_cert.status == 200


# ---------------------------------------------------------------------------------------------
# done-requests: answered only once committed; not answered at all when they cannot be
# ---------------------------------------------------------------------------------------------


class DoneSink:
    """The push engine's side of done-requests, with a switch to make the commit fail."""

    def __init__(self) -> None:
        self.fail = False
        self.seen: list[tuple[str, int | None]] = []

    def config_relayed(self, *args: Any) -> None:
        pass

    def confirmation_started(self, *args: Any) -> None:
        pass

    async def done_request(self, request, raw, peer) -> int:
        if self.fail:
            raise OSError("disk full")
        self.seen.append((request.type, request.transaction_id))
        return 100


def _captured_done(name: str) -> bytes:
    return (VECTORS / name).read_bytes().replace(
        b"/arms-proxy.cgi", GATE_PATH.encode())


@pytest_twisted.ensureDeferred
async def test_done_request_is_answered_after_commit_in_one_write(rigs):
    rig = await rigs()
    sink = DoneSink()
    rig.relay.hooks = sink
    exchange = await sa_exchange(rig.port, [_captured_done("14-ping-done.request.txt")],
                                 ca_pem=rig.pki.ca_pem)
    assert sink.seen == [("ping-done", 1511953657)]
    assert exchange.status == 200
    body = exchange.body
    assert b"<result-code>100</result-code>" in body
    assert b"<transaction-id>1511953657</transaction-id>" in body
    assert b'type="ping-done"' in body
    assert len(rig.factory.connections[-1]) == 1


@pytest_twisted.ensureDeferred
async def test_done_request_that_cannot_be_committed_gets_no_answer(rigs):
    rig = await rigs()
    sink = DoneSink()
    sink.fail = True
    rig.relay.hooks = sink
    exchange = await sa_exchange(rig.port, [_captured_done("23-configure-done.request.txt")],
                                 ca_pem=rig.pki.ca_pem)
    assert exchange.data == b""  # no answer at all: the SA keeps (and resends) its done
    assert rig.factory.connections[-1] == []
    assert rig.logs.find("could not be committed", "not answering")
    sink.fail = False
    again = await sa_exchange(rig.port, [_captured_done("23-configure-done.request.txt")],
                              ca_pem=rig.pki.ca_pem)
    assert again.status == 200 and sink.seen == [("configure-done", 1992329462)]
