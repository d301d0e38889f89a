"""The https-tunnel server (armsproxy.tunnel) driven by the captured SA bytes over real TLS.

Server side: the SA gate's TLS listener (conftest.start_gate) with a small stand-in for the
gate's protocol that reads the POST head and hands the connection to a real TunnelSession,
the way sa_gate will; it wraps the transport to record every ``write`` (one chunk per write
is a rule of §9.5). Client side: a Twisted TLS client that replays tests/vectors/tunnel/,
split in awkward places. Tunnel timers run on a task.Clock; the sockets on the real reactor.
"""

from __future__ import annotations

import base64
import gc
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import GatePKI, start_gate, tls_server_options
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from armsproxy.arms.codec import serialise
from armsproxy.arms.framing import (
    ECHO_RESPONSE,
    END_OF_STREAM,
    TUNNEL_OPEN_RESPONSE,
    find_header_end,
    parse_http_head,
)
from armsproxy.arms.messages import ArmsRequest, ArmsResponse, Empty
from armsproxy.tunnel import (
    TunnelAnswer,
    TunnelBusy,
    TunnelClosed,
    TunnelLimits,
    TunnelRegistry,
    TunnelSession,
    TunnelTimeout,
    parse_basic_authorization,
)

VECTORS = Path(__file__).resolve().parent / "vectors" / "tunnel"
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
OTHER = "0001-0002-0003-0004-0005-0006-0007-0009"
KEY = "harness-rs-key"
ECHO_INTERVAL = 2.0
WATCHDOG = ECHO_INTERVAL * 2 + TunnelLimits().echo_slack


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def body_of(name: str) -> bytes:
    """The XML of a one-chunk captured message (chunk header and trailing CRLF removed)."""
    data = vector(name)
    _, _, rest = data.partition(b"\r\n")
    assert rest.endswith(b"\r\n")
    return rest[:-2]


def open_head(distid: str = DISTID, key: str = KEY, *, auth: bytes | None = None) -> bytes:
    """The captured tunnel-open head (04), with other credentials when asked."""
    head = vector("04-https-tunnel-open.request.txt")
    if auth is None and (distid, key) == (DISTID, KEY):
        return head
    if auth is None:
        auth = b"Basic " + base64.b64encode(f"{distid}:{key}".encode())
    return re.sub(rb"Authorization: [^\r]*", b"Authorization: " + auth, head)


def chunk(body: bytes, chunk_id: int = 77, trail: bool = True) -> bytes:
    ext = f";id={chunk_id}" + (";trail" if trail else "")
    return f"{len(body):x}{ext}\r\n".encode() + body + b"\r\n"


_CHUNK = re.compile(rb"([0-9a-f]+)((?:;[^;\r\n]+)*)\r\n(.*)\r\n\Z", re.DOTALL)


def parse_chunk(write: bytes) -> tuple[list[str], bytes]:
    """A write must be exactly one chunk: returns its extensions and data."""
    match = _CHUNK.fullmatch(write)
    assert match, f"not exactly one chunk: {write[:80]!r}"
    size, exts, data = match.groups()
    assert int(size, 16) == len(data), "size does not match the data"
    return [e for e in exts.decode().split(";") if e], data


def message_id(write: bytes) -> int:
    exts, _ = parse_chunk(write)
    assert exts[-1] == "trail", exts
    ids = [int(e[3:]) for e in exts if e.startswith("id=")]
    assert len(ids) == 1 and ids[0] > 0, exts
    return ids[0]


def split_awkwardly(data: bytes) -> list[bytes]:
    """Pieces cut inside the chunk header, inside an extension, inside the data and the CRLF."""
    cuts = sorted({1, 3, 7, len(data) // 3, len(data) // 2, len(data) - 3, len(data) - 1})
    cuts = [c for c in cuts if 0 < c < len(data)]
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    return pieces


def confirmation_answer(code: int = 100, tid: int | None = 2492) -> ArmsResponse:
    return ArmsResponse(type="push-confirmation-start", result_code=code,
                        description="OK" if code < 200 else "Server Busy",
                        transaction_id=tid if code < 200 else None, body=Empty())


# ---------------------------------------------------------------------------------------------
# Fakes for what the rest of the proxy injects
# ---------------------------------------------------------------------------------------------


class FakeHooks:
    """Records every call; knobs make the RS refuse or the push engine fail."""

    def __init__(self) -> None:
        self.keys = {DISTID: KEY, OTHER: KEY}
        self.auth_calls: list[tuple[str, str]] = []
        self.auth_error: Exception | None = None
        self.auth_gate: defer.Deferred[None] | None = None
        self.confirmations: list[tuple[str, ArmsRequest, str]] = []
        self.confirmation_code = 100
        self.confirmation_ids = iter(range(2492, 3000))
        self.dones: list[tuple[ArmsRequest, bytes, str]] = []
        self.done_code = 100
        self.done_error: Exception | None = None
        self.ups: list[Any] = []
        self.downs: list[tuple[Any, str]] = []

    async def authenticate(self, distid: str, key: str) -> bool:
        self.auth_calls.append((distid, key))
        if self.auth_gate is not None:
            await self.auth_gate
        if self.auth_error is not None:
            raise self.auth_error
        return self.keys.get(distid) == key

    async def confirmation_start(self, distid: str, request: ArmsRequest,
                                 peer: str) -> ArmsResponse:
        self.confirmations.append((distid, request, peer))
        if self.confirmation_code >= 200:
            return confirmation_answer(self.confirmation_code)
        return confirmation_answer(tid=next(self.confirmation_ids))

    async def done_request(self, request: ArmsRequest, raw: bytes, peer: str) -> int:
        self.dones.append((request, raw, peer))
        if self.done_error is not None:
            raise self.done_error
        return self.done_code

    def tunnel_up(self, tunnel: Any) -> None:
        self.ups.append(tunnel)

    def tunnel_down(self, tunnel: Any, reason: str) -> None:
        self.downs.append((tunnel, reason))


class RecordingTransport:
    """The real TLS transport, with every write recorded (write boundaries matter, §9.5)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.writes.append(b"<writeSequence>")
        self._transport.writeSequence(seq)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GateStandIn(Protocol):
    """What sa_gate will do: read the head, hand the connection to a TunnelSession."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.buffer = bytearray()
        self.session: TunnelSession | None = None
        self.recorder: RecordingTransport | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:
            self.session.data_received(data)
            return
        self.buffer += data
        end = find_header_end(self.buffer)
        if end is None:
            return
        head = parse_http_head(bytes(self.buffer[:end]))
        rest = bytes(self.buffer[end:])
        distid, key = parse_basic_authorization(head.header("Authorization"))
        peer = self.transport.getPeer()
        self.recorder = RecordingTransport(self.transport)
        self.session = TunnelSession(
            self.recorder, distid=distid, key=key, peer=f"{peer.host}:{peer.port}",
            path=head.target or "", hooks=self.env.hooks, registry=self.env.registry,
            clock=self.env.clock, echo_interval=ECHO_INTERVAL, limits=self.env.limits,
        )
        self.env.servers.append(self)
        self.env.opened.append(defer.ensureDeferred(self.session.open()))
        if rest:
            self.session.data_received(rest)

    def connectionLost(self, reason: Any = None) -> None:
        if self.session is not None:
            self.session.connection_lost(reason)

    @property
    def writes(self) -> list[bytes]:
        return self.recorder.writes if self.recorder is not None else []


class SAClient(Protocol):
    """The device side: sends exact bytes, collects what the proxy sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.records: list[bytes] = []  # one per TLS read: one TLS record each
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.records.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.transport.write(piece)

    def drop_tcp(self) -> None:
        """Close the TCP connection under TLS: no zero chunk, no close_notify (§9.3)."""
        self.transport.transport.loseConnection()


class Env:
    def __init__(self, pki: GatePKI, limits: TunnelLimits | None = None,
                 registry: TunnelRegistry | None = None) -> None:
        self.pki = pki
        self.hooks = FakeHooks()
        self.registry = registry if registry is not None else TunnelRegistry()
        self.clock = task.Clock()
        self.limits = limits or TunnelLimits()
        self.servers: list[GateStandIn] = []
        self.opened: list[defer.Deferred[bool]] = []
        self.port: Any = None
        self.clients: list[SAClient] = []

    async def start(self, *, unbuffered: bool = False) -> Env:
        factory = Factory.forProtocol(lambda: GateStandIn(self))
        if unbuffered:
            pem = self.pki.server.private_key_and_cert_chain_pem.bytes()
            options = tls_server_options(pem)
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
            self.port = await endpoint.listen(UnbufferedTLS(options, False, factory))
        else:
            self.port = await start_gate(factory, self.pki)
        return self

    async def stop(self) -> None:
        for client in self.clients:
            if not client.lost.called:
                client.transport.abortConnection()
                await client.lost
        await self.port.stopListening()

    async def connect(self) -> SAClient:
        client = await sa_connect(self.port.getHost().port, self.pki)
        self.clients.append(client)
        return client

    async def open(self, *pieces: bytes) -> tuple[SAClient, GateStandIn]:
        """Connect and send the open head (or ``pieces``); wait for the 200 header."""
        client = await self.connect()
        count = len(self.servers)
        client.send(*(pieces or (open_head(),)))
        await until(lambda: len(self.servers) > count and self.opened[count].called)
        return client, self.servers[count]

    async def confirmed(self, *, start: bytes | None = None) -> tuple[SAClient, GateStandIn]:
        """Open a tunnel and run the captured confirmation (05, 06)."""
        client, server = await self.open()
        await confirm(client, server, start=start)
        return client, server


class UnbufferedTLS(TLSMemoryBIOFactory):
    """One transport write, one TLS record (Twisted's default aggregates small writes)."""

    protocol = TLSMemoryBIOProtocol


async def sa_connect(port: int, pki: GatePKI) -> SAClient:
    """A TLS client that, like the SA, puts every write in its own TLS record."""
    client = SAClient()
    options = optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(pki.ca_pem))
    factory = UnbufferedTLS(options, True, Factory.forProtocol(lambda: client))
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return client


async def until(condition: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("condition not reached in time")


async def settle() -> None:
    """Give the loopback a few reactor turns (to show that something did *not* happen)."""
    for _ in range(10):
        await task.deferLater(reactor, 0.005, lambda: None)


async def confirm(client: SAClient, server: GateStandIn, *, start: bytes | None = None) -> None:
    before = len(server.writes)
    client.send(start or vector("05-push-confirmation-start.request.txt"))
    await until(lambda: len(server.writes) >= before + 2)
    tid = _tid(server.writes[before + 1])
    answer = body_of("06-push-confirmation-done.response.txt").replace(
        b"2492", str(tid).encode())
    client.send(chunk(answer, 704073962))
    await until(lambda: server.session.confirmed)


def _tid(write: bytes) -> int:
    _, data = parse_chunk(write)
    return int(re.search(rb"<transaction-id>(\d+)<", data).group(1))


@pytest.fixture
def env_factory(gate_pki):
    envs: list[Env] = []

    async def make(*, unbuffered: bool = False, **kwargs: Any) -> Env:
        env = await Env(gate_pki, **kwargs).start(unbuffered=unbuffered)
        envs.append(env)
        return env

    yield make
    for env in envs:
        pytest_twisted.blockon(defer.ensureDeferred(env.stop()))


# ---------------------------------------------------------------------------------------------
# Opening and confirmation
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_captured_session_over_tls(env_factory, logs):
    """04 open, 05/06 confirmation, 09 echo, 08 check-transaction, 12 done, 19 md-command, 34."""
    env = await env_factory()
    client, server = await env.open()
    session = server.session
    assert server.writes == [TUNNEL_OPEN_RESPONSE]
    assert env.hooks.auth_calls == [(DISTID, KEY)]
    await settle()
    assert bytes(client.received) == TUNNEL_OPEN_RESPONSE  # nothing before the first chunk
    assert session.path == "/arms-tunnel.cgi" and not session.confirmed

    # 05: push-confirmation-start, cut inside "id=", inside the data and inside the CRLF.
    client.send(*split_awkwardly(vector("05-push-confirmation-start.request.txt")))
    await until(lambda: len(server.writes) == 3)
    distid, request, _peer = env.hooks.confirmations[0]
    assert distid == DISTID and request.type == "push-confirmation-start"
    answer_write, done_write = server.writes[1:]
    assert parse_chunk(answer_write)[1] == serialise(confirmation_answer())
    # The confirmation-done is the very next message, byte for byte the captured one.
    assert parse_chunk(done_write)[1] == body_of("06-push-confirmation-done.request.txt")
    assert message_id(answer_write) != message_id(done_write)
    assert not session.confirmed and env.hooks.ups == []
    assert env.registry.live(DISTID) == []

    client.send(*split_awkwardly(vector("06-push-confirmation-done.response.txt")))
    await until(lambda: session.confirmed)
    assert env.hooks.ups == [session]
    assert env.registry.live(DISTID) == [session] and env.registry.pick(DISTID) is session
    assert session.confirmed_at is not None
    assert logs.find("tunnel", "up:", DISTID)

    # 09: echo, answered at once with the captured bytes.
    client.send(vector("09-tunnel-echo.request.txt"))
    await until(lambda: len(server.writes) == 4)
    assert server.writes[3] == ECHO_RESPONSE == vector("09-tunnel-echo.response.txt")

    # 08: check-transaction from armsproxy, answered by the captured response.
    xml = body_of("08-check-transaction.request.txt")
    pending = defer.ensureDeferred(session.request(xml, timeout=30))
    await until(lambda: len(server.writes) == 5)
    assert parse_chunk(server.writes[4])[1] == xml
    message_id(server.writes[4])
    assert session.queue_length == 1
    client.send(*split_awkwardly(vector("08-check-transaction.response.txt")))
    answer = await pending
    assert isinstance(answer, TunnelAnswer)
    assert answer.body == body_of("08-check-transaction.response.txt")
    assert answer.response.type == "check-transaction"
    assert answer.response.body.transaction_ids == [0]
    assert session.queue_length == 0

    # 12: a done-request in three chunks, split again; answered in ONE chunk with its id.
    client.send(*split_awkwardly(vector("12-clear-status-done.request.txt")))
    await until(lambda: len(server.writes) == 6)
    done, raw, _ = env.hooks.dones[0]
    assert done.type == "clear-status-done" and done.transaction_id == 30241866
    assert b"<status-report" in raw
    assert parse_chunk(server.writes[5])[1] == body_of("12-clear-status-done.response.txt")
    message_id(server.writes[5])

    # 19: md-command whose answer comes in three chunks.
    xml = body_of("19-md-command.request.txt")
    pending = defer.ensureDeferred(session.request(xml, timeout=30))
    await until(lambda: len(server.writes) == 7)
    client.send(vector("19-md-command.response.txt"))
    answer = await pending
    assert answer.response.type == "md-command"
    assert answer.response.body.results[0].data == "md_command(id=1): done"

    # 34: the SA's zero chunk closes the tunnel.
    client.send(vector("34-tunnel-last-chunk.message.txt"))
    await client.lost
    await until(lambda: session.closed)
    assert env.hooks.downs == [(session, "closed by the SA")]
    assert env.registry.live(DISTID) == [] and env.registry.counts()["open"] == 0
    assert len(server.writes) == 7  # no zero chunk of our own in answer to the SA's
    # Everything we wrote reached the SA, in order, one chunk per write.
    assert bytes(client.received) == b"".join(server.writes)
    assert logs.find("tunnel", "down:", "closed by the SA")


@pytest_twisted.ensureDeferred
async def test_each_chunk_its_own_tls_record_when_tls_does_not_aggregate(env_factory):
    """Over a TLS transport that does not merge writes (Twisted's default TLSMemoryBIOFactory
    does, within one reactor turn), every chunk starts a TLS record, hence an SA read (§9.5)."""
    env = await env_factory(unbuffered=True)
    client, server = await env.confirmed()
    client.send(vector("09-tunnel-echo.request.txt"), vector("12-clear-status-done.request.txt"))
    await until(lambda: len(client.records) == 5)
    assert client.records == server.writes
    assert client.records[0] == TUNNEL_OPEN_RESPONSE
    assert client.records[3] == ECHO_RESPONSE
    assert parse_chunk(client.records[4])[1] == body_of("12-clear-status-done.response.txt")


@pytest_twisted.ensureDeferred
async def test_every_byte_in_its_own_write(env_factory):
    """The SA's bytes, one byte per TLS write: head, confirmation, echo, done, answer."""
    env = await env_factory()
    client = await env.connect()
    for byte in open_head():
        client.send(bytes([byte]))
    await until(lambda: env.servers and env.servers[0].writes)
    server = env.servers[0]
    assert server.writes == [TUNNEL_OPEN_RESPONSE]
    for name in ("05-push-confirmation-start.request.txt",):
        for byte in vector(name):
            client.send(bytes([byte]))
    await until(lambda: len(server.writes) == 3)
    for byte in vector("06-push-confirmation-done.response.txt"):
        client.send(bytes([byte]))
    await until(lambda: server.session.confirmed)
    stream = vector("09-tunnel-echo.request.txt") + vector("12-clear-status-done.request.txt")
    for byte in stream:
        client.send(bytes([byte]))
    await until(lambda: len(server.writes) == 5)
    assert server.writes[3] == ECHO_RESPONSE
    assert parse_chunk(server.writes[4])[1] == body_of("12-clear-status-done.response.txt")
    pending = defer.ensureDeferred(
        server.session.request(body_of("19-md-command.request.txt"), timeout=10))
    await until(lambda: len(server.writes) == 6)
    for byte in vector("19-md-command.response.txt"):
        client.send(bytes([byte]))
    answer = await pending
    assert answer.body.endswith(b"</arms-message>") and answer.response.result_code == 100


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("case", ["wrong key", "unknown distid", "not a distid", "no header",
                                  "not basic", "bad base64"])
async def test_bad_credentials_get_401(env_factory, case):
    env = await env_factory()
    head = {
        "wrong key": open_head(key="not-the-key"),
        "unknown distid": open_head(distid="0001-0002-0003-0004-0005-0006-0007-00FF"),
        "not a distid": open_head(distid="0001-0002-0003-0004-0005-0006-0007-000a"),
        "no header": re.sub(rb"Authorization: [^\r]*\r\n", b"", open_head()),
        "not basic": open_head(auth=b"Bearer abc"),
        "bad base64": open_head(auth=b"Basic !!!"),
    }[case]
    client, server = await env.open(head)
    await client.lost
    assert len(server.writes) == 1
    response = server.writes[0]
    assert response.startswith(b"HTTP/1.1 401 ")
    assert b"\r\nWWW-Authenticate: Basic realm=" in response
    assert server.session.closed and env.hooks.ups == [] and env.hooks.downs == []
    assert (await env.opened[0]) is False
    # Only a well-formed distid is looked up at all.
    expected_lookups = 1 if case in ("wrong key", "unknown distid") else 0
    assert len(env.hooks.auth_calls) == expected_lookups


@pytest_twisted.ensureDeferred
async def test_key_check_failure_gives_503(env_factory):
    env = await env_factory()
    env.hooks.auth_error = ConnectionRefusedError("RS down")
    client, server = await env.open()
    await client.lost
    assert server.writes[0].startswith(b"HTTP/1.1 503 ")
    assert len(server.writes) == 1


@pytest_twisted.ensureDeferred
async def test_key_check_timeout_gives_503(env_factory):
    env = await env_factory()
    env.hooks.auth_gate = defer.Deferred()  # never answers
    client = await env.connect()
    client.send(open_head())
    await until(lambda: env.hooks.auth_calls)
    env.clock.advance(env.limits.auth_timeout)
    await client.lost
    assert env.servers[0].writes[0].startswith(b"HTTP/1.1 503 ")


@pytest_twisted.ensureDeferred
async def test_first_chunk_with_the_head_waits_for_the_key_check(env_factory):
    """Bytes that arrived with the head are kept until the 200 header has been written."""
    env = await env_factory()
    env.hooks.auth_gate = gate = defer.Deferred()
    client = await env.connect()
    client.send(open_head() + vector("05-push-confirmation-start.request.txt"))
    await until(lambda: env.hooks.auth_calls)
    await settle()
    server = env.servers[0]
    assert server.writes == [] and env.hooks.confirmations == []
    gate.callback(None)
    await until(lambda: len(server.writes) == 3)
    assert server.writes[0] == TUNNEL_OPEN_RESPONSE
    assert b"push-confirmation-start" in parse_chunk(server.writes[1])[1]
    assert b"push-confirmation-done" in parse_chunk(server.writes[2])[1]


@pytest_twisted.ensureDeferred
async def test_connection_lost_during_key_check(env_factory):
    env = await env_factory()
    env.hooks.auth_gate = gate = defer.Deferred()
    client = await env.connect()
    client.send(open_head())
    await until(lambda: env.hooks.auth_calls)
    client.transport.abortConnection()
    assert (await env.opened[0]) is False
    gate.callback(None)
    assert env.servers[0].writes == [] and env.servers[0].session.closed


@pytest_twisted.ensureDeferred
async def test_confirmation_refused_by_the_rs(env_factory):
    env = await env_factory()
    env.hooks.confirmation_code = 301
    client, server = await env.open()
    client.send(vector("05-push-confirmation-start.request.txt"))
    await until(lambda: len(server.writes) == 2)
    await settle()
    assert len(server.writes) == 2  # the answer, and no confirmation-done after it
    _, data = parse_chunk(server.writes[1])
    assert b"<result-code>301</result-code>" in data
    assert not server.session.closed  # the SA gets time to read the code
    env.clock.advance(env.limits.close_grace)
    await client.lost
    assert server.session.closed and env.hooks.ups == [] and env.hooks.downs == []
    assert env.registry.counts() == {"open": 0, "registered": 0, "live": 0, "distids": 0}


@pytest_twisted.ensureDeferred
async def test_confirmation_timeouts(env_factory):
    env = await env_factory()
    # No first message at all.
    client, server = await env.open()
    env.clock.advance(env.limits.confirmation_timeout - 1)
    assert not server.session.closed
    env.clock.advance(1)
    await client.lost
    assert server.writes[-1] == END_OF_STREAM
    # The SA never answers our push-confirmation-done.
    client, server = await env.open()
    client.send(vector("05-push-confirmation-start.request.txt"))
    await until(lambda: len(server.writes) == 3)
    env.clock.advance(env.limits.confirmation_timeout)
    await client.lost
    assert "confirmation timeout" in server.session.close_reason
    # The SA answers it with an error.
    client, server = await env.open()
    client.send(vector("05-push-confirmation-start.request.txt"))
    await until(lambda: len(server.writes) == 3)
    refused = body_of("06-push-confirmation-done.response.txt").replace(
        b"<result-code>100<", b"<result-code>203<")
    client.send(chunk(refused))
    await client.lost
    assert env.hooks.ups == [] and env.hooks.downs == []


@pytest_twisted.ensureDeferred
async def test_confirmation_relay_without_id_closes(env_factory):
    env = await env_factory()

    async def no_id(distid, request, peer):
        return confirmation_answer(tid=None)

    env.hooks.confirmation_start = no_id
    client, server = await env.open()
    client.send(vector("05-push-confirmation-start.request.txt"))
    await client.lost
    assert server.writes[1:] == [END_OF_STREAM]  # never a 1xx answer without an id


# ---------------------------------------------------------------------------------------------
# Echo watchdog
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_echo_watchdog(env_factory, logs):
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    for _ in range(3):  # every echo moves the deadline
        env.clock.advance(WATCHDOG - 0.5)
        client.send(*split_awkwardly(vector("10-tunnel-echo.request.txt")))
        writes = len(server.writes)
        await until(lambda w=writes: len(server.writes) == w + 1 or session.closed)
        assert server.writes[-1] == ECHO_RESPONSE
    assert session.confirmed
    # Traffic other than echoes does not count (§9.5).
    client.send(vector("12-clear-status-done.request.txt"))
    await until(lambda: env.hooks.dones)
    env.clock.advance(WATCHDOG - 0.5)
    assert session.confirmed
    env.clock.advance(0.5)
    await client.lost
    assert server.writes[-1] == END_OF_STREAM
    assert env.hooks.downs == [(session, env.hooks.downs[0][1])]
    assert env.hooks.downs[0][1].startswith("echo timeout")
    assert env.registry.live(DISTID) == []
    assert logs.find("echo timeout", level="error")


@pytest_twisted.ensureDeferred
async def test_no_watchdog_during_confirmation_and_echoes_always_answered(env_factory):
    env = await env_factory()
    client, server = await env.open()
    client.send(vector("09-tunnel-echo.request.txt"))  # before any message: still answered
    await until(lambda: len(server.writes) == 2)
    assert server.writes[1] == ECHO_RESPONSE
    env.clock.advance(WATCHDOG + 1)  # echo watchdog not armed before confirmation
    assert not server.session.closed
    await confirm(client, server)
    assert server.session.confirmed


# ---------------------------------------------------------------------------------------------
# Requests from armsproxy
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requests_fifo_one_outstanding(env_factory):
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    base = len(server.writes)
    check = body_of("08-check-transaction.request.txt")
    md = body_of("19-md-command.request.txt")
    reboot = body_of("33-reboot.request.txt")
    first = defer.ensureDeferred(session.request(check, timeout=30))
    second = defer.ensureDeferred(session.request(md, timeout=30))
    third = defer.ensureDeferred(session.request(reboot, timeout=30))
    await until(lambda: len(server.writes) == base + 1)
    await settle()
    assert len(server.writes) == base + 1  # the second is not written before the answer
    assert session.queue_length == 3
    assert parse_chunk(server.writes[base])[1] == check
    # A done-request in between is answered, and is not taken as the answer.
    client.send(vector("12-clear-status-done.request.txt"))
    await until(lambda: len(server.writes) == base + 2)
    assert not first.called
    client.send(vector("08-check-transaction.response.txt"))
    answer = await first
    assert answer.response.type == "check-transaction"
    await until(lambda: len(server.writes) == base + 3)
    assert parse_chunk(server.writes[base + 2])[1] == md
    assert not second.called
    client.send(vector("19-md-command.response.txt"))
    assert (await second).response.type == "md-command"
    await until(lambda: len(server.writes) == base + 4)
    assert parse_chunk(server.writes[base + 3])[1] == reboot
    client.send(vector("33-reboot.response.txt"), vector("34-tunnel-last-chunk.message.txt"))
    assert (await third).response.type == "reboot"
    await client.lost
    ids = [message_id(w) for w in server.writes[base:base + 4]]
    assert len(set(ids)) == 4


@pytest_twisted.ensureDeferred
async def test_empty_md_command_answer(env_factory):
    """``0;id=N;trail`` alone is a zero-length answer (md-command 402, §7.9)."""
    env = await env_factory()
    client, server = await env.confirmed()
    pending = defer.ensureDeferred(
        server.session.request(body_of("19-md-command.request.txt"), timeout=30))
    await until(lambda: len(server.writes) == 4)
    client.send(b"0;id=1234;trail\r\n", b"\r\n")
    answer = await pending
    assert answer.body == b"" and answer.empty and answer.response is None
    assert not server.session.closed


@pytest_twisted.ensureDeferred
async def test_requests_wait_for_confirmation(env_factory):
    env = await env_factory()
    client, server = await env.open()
    xml = body_of("08-check-transaction.request.txt")
    pending = defer.ensureDeferred(server.session.request(xml, timeout=30))
    await confirm(client, server)
    await until(lambda: len(server.writes) == 4)
    assert parse_chunk(server.writes[3])[1] == xml  # only after the confirmation
    client.send(vector("08-check-transaction.response.txt"))
    assert (await pending).response.result_code == 100


@pytest_twisted.ensureDeferred
async def test_tunnel_closed_tells_whether_the_request_was_sent(env_factory):
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    sent = defer.ensureDeferred(session.request(body_of("33-reboot.request.txt"), timeout=30))
    queued = defer.ensureDeferred(
        session.request(body_of("08-check-transaction.request.txt"), timeout=30))
    await until(lambda: session.queue_length == 2)
    client.drop_tcp()
    with pytest.raises(TunnelClosed) as sent_error:
        await sent
    with pytest.raises(TunnelClosed) as queued_error:
        await queued
    assert sent_error.value.request_sent is True
    assert queued_error.value.request_sent is False
    assert "connection lost" in sent_error.value.reason
    with pytest.raises(TunnelClosed) as late:
        await session.request(b"<arms-message/>", timeout=1)
    assert late.value.request_sent is False
    assert env.hooks.downs[0][1].startswith("connection lost")


@pytest_twisted.ensureDeferred
async def test_request_timeout_closes_the_tunnel(env_factory):
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    first = defer.ensureDeferred(session.request(body_of("33-reboot.request.txt"), timeout=5))
    queued = defer.ensureDeferred(
        session.request(body_of("08-check-transaction.request.txt"), timeout=5))
    await until(lambda: session.queue_length == 2)
    env.clock.advance(4.9)
    assert not first.called
    env.clock.advance(0.1)
    with pytest.raises(TunnelTimeout) as timeout:
        await first
    assert timeout.value.request_sent is True
    with pytest.raises(TunnelClosed) as closed:
        await queued
    assert closed.value.request_sent is False
    await client.lost
    assert server.writes[-1] == END_OF_STREAM
    assert "request timeout" in env.hooks.downs[0][1]


@pytest_twisted.ensureDeferred
async def test_answered_request_deadline_and_echo_watchdog_share_one_timer(env_factory):
    """The request's deadline and the echo watchdog are one deadline entry of the tunnel: an
    answered request's deadline passes harmlessly, the watchdog still counts from the last
    echo-request, and a request in flight times out even when the watchdog is later."""
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    base = len(server.writes)
    pending = defer.ensureDeferred(
        session.request(body_of("08-check-transaction.request.txt"), timeout=5))
    await until(lambda: len(server.writes) == base + 1)
    client.send(vector("08-check-transaction.response.txt"))
    assert (await pending).response.result_code == 100
    env.clock.advance(6)  # past the answered request's deadline
    assert session.confirmed
    client.send(vector("09-tunnel-echo.request.txt"))
    await until(lambda: server.writes[-1] == ECHO_RESPONSE)
    env.clock.advance(WATCHDOG - 0.5)
    assert session.confirmed
    late = defer.ensureDeferred(
        session.request(body_of("08-check-transaction.request.txt"), timeout=0.25))
    env.clock.advance(0.25)  # its own deadline, before the watchdog's
    with pytest.raises(TunnelTimeout):
        await late
    assert "request timeout" in session.close_reason
    assert len(env.clock.getDelayedCalls()) == 1  # every tunnel of the registry: one timer


@pytest_twisted.ensureDeferred
async def test_schema_invalid_answer_is_parsed_once(env_factory, monkeypatch):
    """An answer outside the schema that the model reads is taken, with the problem said, from
    one parse (it used to be parsed strictly, then again leniently)."""
    from armsproxy.tunnel import session as session_module

    env = await env_factory()
    client, server = await env.confirmed()
    parses = []
    real = session_module.parse_element
    monkeypatch.setattr(session_module, "parse_element",
                        lambda *a, **k: parses.append(1) or real(*a, **k))
    pending = defer.ensureDeferred(
        server.session.request(body_of("08-check-transaction.request.txt"), timeout=30))
    await until(lambda: len(server.writes) == 4)
    odd = body_of("08-check-transaction.response.txt").replace(
        b"</result-code>", b"</result-code><bogus>1</bogus>")
    client.send(chunk(odd))
    answer = await pending
    assert answer.response.result_code == 100 and answer.body == odd
    assert answer.problem.startswith("schema: ") and "bogus" in answer.problem
    assert parses == [1]


@pytest.mark.parametrize("case", ["valid", "unknown element", "missing body", "bad integer",
                                  "wrong body for type", "request"])
def test_one_parse_reads_as_strict_then_lenient_did(case):
    """session._decode on one parsed tree == codec.parse_message strict, then lenient on a
    schema failure (what the session did before, parsing twice)."""
    from armsproxy.arms.codec import MessageError, parse_element, parse_message
    from armsproxy.tunnel.session import _decode

    answer = body_of("20-read-module-list.response.txt")
    body = {
        "valid": answer,
        "unknown element": answer.replace(b"</result-code>", b"</result-code><x/>"),
        "missing body": re.sub(rb"<read-module-list-response>.*</read-module-list-response>",
                               b"", answer, flags=re.S),
        "bad integer": answer.replace(b"<result-code>100<", b"<result-code>1x0<"),
        "wrong body for type": answer.replace(b'type="read-module-list"',
                                              b'type="check-transaction"'),
        "request": body_of("16-ping-done.request.txt"),
    }[case]

    def twice() -> tuple[object, str | None]:
        try:
            return parse_message(body, ascii_text=True), None
        except MessageError as e:
            problem = str(e)
        try:
            return parse_message(body, validate=False, ascii_text=True), problem
        except MessageError as e:
            return None, str(e)

    assert _decode(parse_element(body, ascii_text=True)) == twice()


def test_close_grace_aborts_a_peer_that_never_completes_the_close(monkeypatch):
    """After our zero chunk, a peer that never finishes the TLS close is aborted after
    ``close_grace``: on the tunnel's one deadline entry, no timer of its own."""
    monkeypatch.setattr(TunnelSession, "log", Logger(observer=lambda event: None))
    clock = task.Clock()
    transport = StringTransport()
    registry = TunnelRegistry()
    session = TunnelSession(transport, distid=DISTID, key=KEY, peer="127.0.0.1:40000",
                            path="/arms-tunnel.cgi", hooks=LeanHooks(), registry=registry,
                            clock=clock, echo_interval=60)
    assert defer.ensureDeferred(session.open()).result is True
    session.data_received(vector("05-push-confirmation-start.request.txt"))
    session.data_received(vector("06-push-confirmation-done.response.txt"))
    assert session.confirmed
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    session.close("test")
    assert transport.value().endswith(END_OF_STREAM) and transport.disconnecting
    clock.advance(session.limits.close_grace - 0.5)
    assert aborted == []
    clock.advance(0.5)
    assert aborted == [True]
    clock.advance(200)  # the entries left behind come due and are dropped; nothing else runs
    assert aborted == [True]
    assert len(registry.deadlines(clock)) == 0 and clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_cancelled_requests(env_factory):
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    base = len(server.writes)
    first = defer.ensureDeferred(
        session.request(body_of("08-check-transaction.request.txt"), timeout=30))
    queued = defer.ensureDeferred(session.request(body_of("33-reboot.request.txt"), timeout=30))
    third = defer.ensureDeferred(session.request(body_of("19-md-command.request.txt"), timeout=30))
    await until(lambda: len(server.writes) == base + 1)
    queued.cancel()  # never written
    first.cancel()  # written: its answer must still be consumed, not given to the next
    with pytest.raises(defer.CancelledError):
        await queued
    with pytest.raises(defer.CancelledError):
        await first
    await settle()
    assert len(server.writes) == base + 1
    client.send(vector("08-check-transaction.response.txt"))
    await until(lambda: len(server.writes) == base + 2)
    assert b"md-command" in parse_chunk(server.writes[base + 1])[1]
    client.send(vector("19-md-command.response.txt"))
    assert (await third).response.type == "md-command"


@pytest_twisted.ensureDeferred
async def test_queue_limit(env_factory):
    env = await env_factory(limits=TunnelLimits(max_queue=1))
    _, server = await env.confirmed()
    session = server.session
    xml = body_of("08-check-transaction.request.txt")
    outstanding = defer.ensureDeferred(session.request(xml, timeout=30))
    waiting = defer.ensureDeferred(session.request(xml, timeout=30))
    with pytest.raises(TunnelBusy) as busy:
        await session.request(xml, timeout=30)
    assert busy.value.request_sent is False
    session.close("test over")
    for d in (outstanding, waiting):
        with pytest.raises(TunnelClosed):
            await d


# ---------------------------------------------------------------------------------------------
# Done-requests and configure over a tunnel
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_done_not_stored_is_not_answered(env_factory, logs):
    env = await env_factory()
    client, server = await env.confirmed()
    env.hooks.done_error = OSError("disk full")
    base = len(server.writes)
    client.send(vector("12-clear-status-done.request.txt"))
    await client.lost
    assert server.writes[base:] == [END_OF_STREAM]  # no answer, only the zero chunk
    assert len(env.hooks.dones) == 1
    assert "could not be stored" in env.hooks.downs[0][1]
    assert logs.find("clear-status-done", "not stored", level="error")


@pytest_twisted.ensureDeferred
async def test_done_answer_carries_the_engines_code(env_factory):
    env = await env_factory()
    client, server = await env.confirmed()
    env.hooks.done_code = 301
    client.send(vector("16-ping-done.request.txt"))
    await until(lambda: len(server.writes) == 4)
    _, data = parse_chunk(server.writes[3])
    assert data == serialise(ArmsResponse(
        type="ping-done", result_code=301, description="Server Busy",
        transaction_id=496273029, body=Empty()))


@pytest_twisted.ensureDeferred
async def test_configure_reconnect(env_factory):
    """§9.9: the answer arrives, the SA drops TCP; the new tunnel starts with configure-done."""
    env = await env_factory()
    client, server = await env.confirmed()
    old = server.session
    configure = defer.ensureDeferred(
        old.request(body_of("24-configure-start.request.txt"), timeout=30))
    await until(lambda: old.queue_length == 1 and len(server.writes) == 4)
    client.send(vector("24-configure-start.response.txt"))
    client.drop_tcp()  # no zero chunk (§9.3 forced close)
    answer = await configure
    assert answer.response.type == "configure-start"
    assert answer.response.transaction_id == 577170977
    await until(lambda: old.closed)
    assert env.hooks.downs == [(old, env.hooks.downs[0][1])]
    assert env.hooks.downs[0][1].startswith("connection lost")
    assert env.registry.live(DISTID) == []

    client, server = await env.open(vector("25-https-tunnel-open.request.txt"))
    new = server.session
    client.send(*split_awkwardly(vector("26-configure-done.request.txt")))
    await until(lambda: len(server.writes) == 2)
    done, _, _ = env.hooks.dones[0]
    assert done.type == "configure-done" and done.transaction_id == 577170977
    assert parse_chunk(server.writes[1])[1] == body_of("26-configure-done.response.txt")
    assert not new.confirmed
    client.send(vector("27-push-confirmation-start.request.txt"))
    await until(lambda: len(server.writes) == 4)
    confirmation_done = parse_chunk(server.writes[3])[1]
    assert confirmation_done == body_of("28-push-confirmation-done.request.txt").replace(
        b"2493", str(_tid(server.writes[3])).encode())
    client.send(vector("28-push-confirmation-done.response.txt"))
    await until(lambda: new.confirmed)
    assert env.hooks.ups == [old, new]
    assert env.registry.live(DISTID) == [new]


@pytest_twisted.ensureDeferred
async def test_reconfirmation_on_a_live_tunnel(env_factory):
    """After a configure elsewhere the SA confirms again on every tunnel (§6.5)."""
    env = await env_factory()
    client, server = await env.confirmed()
    session = server.session
    client.send(vector("27-push-confirmation-start.request.txt"))
    await until(lambda: len(server.writes) == 5)
    assert not session.confirmed and env.registry.live(DISTID) == []
    xml = body_of("08-check-transaction.request.txt")
    pending = defer.ensureDeferred(session.request(xml, timeout=30))
    client.send(vector("12-clear-status-done.request.txt"))  # answer held back until confirmed
    await until(lambda: env.hooks.dones)
    await settle()
    assert len(server.writes) == 5
    tid = _tid(server.writes[4])
    client.send(chunk(body_of("28-push-confirmation-done.response.txt").replace(
        b"2493", str(tid).encode())))
    await until(lambda: len(server.writes) == 7)
    assert session.confirmed and env.hooks.ups == [session]  # announced once
    assert b"clear-status-done" in parse_chunk(server.writes[5])[1]
    assert parse_chunk(server.writes[6])[1] == xml
    client.send(vector("08-check-transaction.response.txt"))
    assert (await pending).response.type == "check-transaction"


# ---------------------------------------------------------------------------------------------
# Closing and bad input
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_close_sends_the_zero_chunk(env_factory):
    env = await env_factory()
    client, server = await env.confirmed()
    server.session.close("operator request")
    server.session.close("again")  # idempotent
    await client.lost
    assert bytes(client.received).endswith(b"\r\n" + END_OF_STREAM)
    assert server.writes[-1] == END_OF_STREAM
    assert env.hooks.downs == [(server.session, "operator request")]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("case", ["framing", "hostile xml", "not xml", "oversize",
                                  "other distid", "unknown request", "done without id",
                                  "non-ascii text", "utf-16"])
async def test_bad_input_closes_without_answer(env_factory, logs, case):
    env = await env_factory(limits=TunnelLimits(max_message_size=2048))
    client, server = await env.confirmed()
    base = len(server.writes)
    done = body_of("16-ping-done.request.txt")
    data = {
        "framing": b"zz;id=1\r\nabc\r\n",
        "hostile xml": chunk(b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]>'
                             b"<arms-message>&x;</arms-message>"),
        "not xml": chunk(b"<arms-message><arms-request"),
        "oversize": chunk(b"<arms-message>" + b" " * 1500, trail=False)
        + chunk(b" " * 1500 + b"</arms-message>"),
        "other distid": chunk(done.replace(DISTID.encode(), OTHER.encode())),
        "unknown request": chunk(body_of("33-reboot.request.txt").replace(
            b'<?xml version="1.0" encoding="US-ASCII"?>\n', b"")),
        "done without id": chunk(re.sub(rb"<transaction-id>\d+</transaction-id>", b"", done)),
        # ASCII bytes, non-ASCII text: the SA gate's ASCII rule holds on tunnels too.
        "non-ascii text": chunk(done.replace(b"</transaction-id>",
                                             b"</transaction-id><description>caf&#233;</description>")),
        "utf-16": chunk(done.decode("ascii").encode("utf-16")),
    }[case]
    client.send(data)
    await client.lost
    assert server.writes[base:] == [END_OF_STREAM]
    assert env.hooks.dones == []
    assert len(env.hooks.downs) == 1
    assert logs.find("tunnel", "closing", level="error")


@pytest_twisted.ensureDeferred
async def test_unsolicited_answer_is_dropped(env_factory, logs):
    env = await env_factory()
    client, server = await env.confirmed()
    client.send(vector("08-check-transaction.response.txt"))
    await until(lambda: logs.find("without a request"))
    assert not server.session.closed


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_registry_keeps_five_per_sa_and_closes_the_oldest(env_factory):
    env = await env_factory()
    pairs = [await env.confirmed() for _ in range(5)]
    sessions = [server.session for _, server in pairs]
    assert env.registry.live(DISTID) == sessions
    assert env.registry.count(DISTID) == 5
    other_client, other_server = await env.open(open_head(distid=OTHER))
    await confirm(other_client, other_server,
                  start=chunk(body_of("05-push-confirmation-start.request.txt").replace(
                      DISTID.encode(), OTHER.encode())))
    assert env.registry.live(OTHER) == [other_server.session]

    _, server6 = await env.confirmed()
    await pairs[0][0].lost
    assert sessions[0].closed and "replaced by tunnel" in sessions[0].close_reason
    assert pairs[0][1].writes[-1] == END_OF_STREAM
    assert env.registry.live(DISTID) == [*sessions[1:], server6.session]
    assert env.hooks.downs == [(sessions[0], sessions[0].close_reason)]
    assert env.registry.counts() == {"open": 6, "registered": 6, "live": 6, "distids": 2}
    assert len(env.registry.all()) == 6 and set(env.registry.distids()) == {DISTID, OTHER}

    # pick: the shortest queue; on a tie the one heard from last.
    env.clock.advance(1)
    pairs[3][0].send(vector("09-tunnel-echo.request.txt"))
    await until(lambda: pairs[3][1].writes[-1] == ECHO_RESPONSE)
    assert env.registry.pick(DISTID) is sessions[3]
    busy = defer.ensureDeferred(
        sessions[3].request(body_of("08-check-transaction.request.txt"), timeout=30))
    assert env.registry.pick(DISTID) is not sessions[3]
    pairs[3][0].send(vector("08-check-transaction.response.txt"))
    await busy
    assert env.registry.pick(OTHER) is other_server.session
    assert env.registry.pick("0001-0002-0003-0004-0005-0006-0007-00AA") is None


@pytest_twisted.ensureDeferred
async def test_registry_process_cap(env_factory):
    env = await env_factory(registry=TunnelRegistry(max_tunnels=1))
    await env.confirmed()
    client, server = await env.open()
    await client.lost
    assert server.writes[0].startswith(b"HTTP/1.1 503 ")


def test_basic_authorization_parsing():
    token = base64.b64encode(f"{DISTID}:{KEY}".encode()).decode()
    assert parse_basic_authorization(f"Basic {token}") == (DISTID, KEY)
    assert parse_basic_authorization(f"basic {token}") == (DISTID, KEY)
    assert parse_basic_authorization(None) == (None, None)
    assert parse_basic_authorization("Basic " + base64.b64encode(b"nocolon").decode()) == (
        None, None)
    assert parse_basic_authorization(
        "Basic " + base64.b64encode(f"{DISTID}:a:b".encode()).decode()) == (DISTID, "a:b")


# ---------------------------------------------------------------------------------------------
# Memory per idle tunnel
# ---------------------------------------------------------------------------------------------


class LeanHooks:
    """Hooks that keep nothing, so only the tunnel's own memory is measured."""

    async def authenticate(self, distid: str, key: str) -> bool:
        return key == KEY

    async def confirmation_start(self, distid, request, peer) -> ArmsResponse:
        return confirmation_answer()

    async def done_request(self, request, raw, peer) -> int:
        return 100

    def tunnel_up(self, tunnel) -> None:
        pass

    def tunnel_down(self, tunnel, reason) -> None:
        pass


def test_idle_tunnel_state_is_small(monkeypatch):
    """The room's own state per confirmed, idle tunnel (TLS buffers are OpenSSL's, not ours)."""
    # Before twistd starts logging, Twisted keeps every event; a running proxy does not.
    monkeypatch.setattr(TunnelSession, "log", Logger(observer=lambda event: None))
    hooks = LeanHooks()
    registry = TunnelRegistry()
    clock = task.Clock()
    transport = StringTransport()  # shared: what was written is the socket's business
    start = vector("05-push-confirmation-start.request.txt")
    confirmed = vector("06-push-confirmation-done.response.txt")
    echo = vector("09-tunnel-echo.request.txt")
    count = 500
    distids = [f"0001-0002-0003-0004-0005-0006-{n >> 16:04X}-{n & 0xFFFF:04X}"
               for n in range(count)]
    starts = [start.replace(DISTID.encode(), d.encode()) for d in distids]
    sessions = []

    def make(distid: str, start: bytes) -> TunnelSession:
        session = TunnelSession(
            transport, distid=distid, key=KEY, peer="127.0.0.1:40000", path="/arms-tunnel.cgi",
            hooks=hooks, registry=registry, clock=clock, echo_interval=60,
        )
        opened = defer.ensureDeferred(session.open())
        assert opened.result is True
        session.data_received(start)
        session.data_received(confirmed)
        session.data_received(echo)
        assert session.confirmed
        transport.clear()
        return session

    make(DISTID, start)  # warm caches (lxml, schema, parsers)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for distid, data in zip(distids, starts, strict=True):
        sessions.append(make(distid, data))
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_tunnel = grown / count
    assert registry.counts()["live"] == count + 1
    # No DelayedCall per tunnel: one for all, and one deadline entry per tunnel.
    assert len(clock.getDelayedCalls()) == 1
    assert len(registry.deadlines(clock)) == count + 1
    assert all(s.queue_length == 0 for s in sessions)
    print(f"{per_tunnel:.0f} bytes of tunnel state per idle tunnel")
    assert per_tunnel < 4 * 1024, f"{per_tunnel:.0f} bytes per idle tunnel"
