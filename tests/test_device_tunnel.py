"""The simulated SA in https-tunnel mode against a small fake proxy answering like the captures.

The fake proxy (a Twisted TLS server written here) answers the tunnel header, confirmations,
echoes and done-requests with the bytes of tests/vectors/tunnel/ and pushes the captured
requests; the device's bytes are compared with the captured ones (chunk ids and transaction
ids masked). Echo tests run on real time with a 0.2 s interval.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from armsproxy.device import client as device_client
from armsproxy.device.listener import DeviceModule
from armsproxy.device.tunnel import (
    ECHO_REQUEST,
    ZERO_CHUNK,
    SimulatedTunnelDevice,
    TunnelBehaviour,
    build_open_request,
)

VECTORS = pathlib.Path(__file__).resolve().parent / "vectors" / "tunnel"
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
CONFIG = "hostname harness-sa\ninterface lan0 address 192.0.2.10/24\n"
PUSHED_CONFIG = "hostname harness-sa-pushed\ninterface lan0 address 192.0.2.11/24\n"
MODULE = DeviceModule(1, "1.0.0", "harness-module")
TID = re.compile(rb"<transaction-id>[0-9]+</transaction-id>")
CONFIRMATIONS = [("05", "06"), ("27", "28"), ("31", "32")]
DONE_ANSWERS = {
    "clear-status-done": "12-clear-status-done.response.txt",
    "read-status-done": "14-read-status-done.response.txt",
    "ping-done": "16-ping-done.response.txt",
    "traceroute-done": "18-traceroute-done.response.txt",
    "read-storage-done": "23-read-storage-done.response.txt",
    "configure-done": "26-configure-done.response.txt",
}
GENERIC_ERROR_202 = (
    b'<arms-message><arms-response type="generic-error"><result-code>202</result-code>'
    b"<description>Invalid Message type</description><generic-error-response>"
    b"</generic-error-response></arms-response></arms-message>"
)


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def mask(data: bytes) -> bytes:
    return TID.sub(b"<transaction-id>N</transaction-id>", data)


def chunks_of(framed: bytes) -> list[tuple[bytes, bytes]]:
    """(header line, data) of each chunk in framed bytes; sizes must add up exactly."""
    out, pos = [], 0
    while pos < len(framed):
        eol = framed.index(b"\r\n", pos)
        line = framed[pos:eol]
        size = int(line.split(b";")[0], 16)
        data = framed[eol + 2 : eol + 2 + size]
        assert len(data) == size and framed[eol + 2 + size : eol + 4 + size] == b"\r\n"
        out.append((line, data))
        pos = eol + 4 + size
    return out


def structure(framed: bytes) -> list[tuple[bytes, bytes]]:
    """Extensions (chunk id masked) and data (transaction ids masked) per chunk."""
    return [
        (re.sub(rb"id=[0-9]+", b"id=N", line.partition(b";")[2]), mask(data))
        for line, data in chunks_of(framed)
    ]


def frame(data: bytes, chunk_id: int) -> bytes:
    return b"%x;id=%d;trail\r\n%s\r\n" % (len(data), chunk_id, data)


def number(tag: str, data: bytes) -> int | None:
    m = re.search(rb"<%s>([0-9]+)</%s>" % (tag.encode(), tag.encode()), data)
    return int(m.group(1)) if m else None


async def until(condition, timeout: float = 5.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01, lambda: None)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


# ---------------------------------------------------------------------------------------------
# PKI and the fake proxy
# ---------------------------------------------------------------------------------------------


@dataclass
class PKI:
    ca: trustme.CA
    sa: trustme.LeafCert
    proxy: trustme.LeafCert

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca = trustme.CA()
    return PKI(
        ca=ca,
        sa=ca.issue_cert("127.0.0.1", common_name="harness SA"),
        proxy=ca.issue_cert("127.0.0.1", common_name="proxy"),
    )


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    def __init__(self, pki: PKI) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        leaf = pki.proxy
        ctx.use_certificate(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
        ctx.use_privatekey(serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None))
        ctx.get_cert_store().add_cert(
            crypto.X509.from_cryptography(x509.load_pem_x509_certificate(pki.ca_pem))
        )
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        self.ctx = ctx

    def serverConnectionForTLS(self, protocol):
        conn = SSL.Connection(self.ctx, None)
        conn.set_accept_state()
        return conn


@dataclass
class Msg:
    """One SA message on a tunnel, as the proxy assembled it."""

    headers: list[bytes] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    at: float = 0.0

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def raw(self) -> bytes:
        return b"".join(
            h + b"\r\n" + c + b"\r\n" for h, c in zip(self.headers, self.chunks, strict=True)
        )

    @property
    def kind(self) -> str | None:
        m = re.search(rb'<arms-(?:request|response) type="([^"]+)"', self.data)
        return m.group(1).decode() if m else None

    @property
    def is_request(self) -> bool:
        return self.data.startswith(b"<arms-message><arms-request")


class ProxyConn(Protocol):
    """The proxy's end of one tunnel connection."""

    def __init__(self, proxy: FakeProxy) -> None:
        self.proxy = proxy
        self.open_request: bytes | None = None
        self.header_at: float | None = None
        self.buf = b""
        self.reads: list[bytes] = []
        self.messages: list[Msg] = []
        self.partial: dict[int, Msg] = {}
        self.echoes: list[float] = []
        self.end_of_stream = False
        self.closed = False
        self.lost_at: float | None = None
        self.peer_der: bytes | None = None

    def connectionMade(self):
        self.proxy.conns.append(self)

    def dataReceived(self, data):
        self.reads.append(data)
        self.buf += data
        if self.open_request is None:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.open_request, self.buf = head + sep, rest
            peer = self.transport.getPeerCertificate()
            self.peer_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer) if peer else None
            header = self.proxy.headers.pop(0) if self.proxy.headers else self.proxy.header
            self.header_at = reactor.seconds()
            self.transport.write(header)
        self.parse()

    def parse(self):
        while True:
            eol = self.buf.find(b"\r\n")
            if eol == -1:
                return
            line = self.buf[:eol]
            size_text, *exts = line.split(b";")
            size = int(size_text, 16)
            end = eol + 2 + size
            if len(self.buf) < end + 2:
                return
            data = self.buf[eol + 2 : end]
            assert self.buf[end : end + 2] == b"\r\n"
            self.buf = self.buf[end + 2 :]
            if size == 0 and not exts:
                self.end_of_stream = True
                continue
            if b"echo-request" in exts:
                self.echoes.append(reactor.seconds())
                if self.proxy.answer_echoes:
                    self.transport.write(vector("09-tunnel-echo.response.txt"))
                continue
            chunk_id = int(next(e[3:] for e in exts if e.startswith(b"id=")))
            msg = self.partial.setdefault(chunk_id, Msg(at=reactor.seconds()))
            msg.headers.append(line)
            msg.chunks.append(data)
            if b"trail" in exts:
                del self.partial[chunk_id]
                self.messages.append(msg)
                self.answer(msg)

    def answer(self, msg: Msg):
        if msg.is_request and msg.kind == "push-confirmation-start":
            start, done = CONFIRMATIONS[self.proxy.confirmations % len(CONFIRMATIONS)]
            self.proxy.confirmations += 1
            self.transport.write(vector(f"{start}-push-confirmation-start.response.txt"))
            self.transport.write(vector(f"{done}-push-confirmation-done.request.txt"))
        elif msg.is_request and msg.kind.endswith("-done") and self.proxy.answer_dones:
            self.transport.write(self.proxy.done_answer(msg))

    def send(self, data: bytes):
        self.transport.write(data)

    async def push(self, name: str) -> Msg:
        """Push a captured request; returns the device's answer (the next arms-response)."""
        await until(self.confirmed)
        seen = len(self.messages)
        self.send(vector(name))
        await until(lambda: any(not m.is_request for m in self.messages[seen:]))
        return next(m for m in self.messages[seen:] if not m.is_request)

    def confirmed(self) -> bool:
        kinds = [m.kind for m in self.messages]
        starts = kinds.count("push-confirmation-start")
        return starts > 0 and kinds.count("push-confirmation-done") == starts

    async def message(self, kind: str, index: int = 0) -> Msg:
        await until(lambda: len([m for m in self.messages if m.kind == kind]) > index)
        return [m for m in self.messages if m.kind == kind][index]

    def connectionLost(self, reason=None):
        self.closed = True
        self.lost_at = reactor.seconds()


class FakeProxy:
    """A tunnel endpoint answering like the captures (vectors/tunnel/)."""

    def __init__(self, pki: PKI) -> None:
        self.conns: list[ProxyConn] = []
        self.header = vector("04-https-tunnel-open.response.txt")
        self.headers: list[bytes] = []  # answers for the next connections, then `header`
        self.answer_echoes = True
        self.answer_dones = True
        self.done_tid = True
        self.done_codes: list[int] = []
        self.confirmations = 0
        self.next_id = 1000
        factory = TLSMemoryBIOFactory(
            ServerTLS(pki), False, Factory.forProtocol(lambda: ProxyConn(self))
        )
        factory.protocol = TLSMemoryBIOProtocol
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"https://127.0.0.1:{self.port.getHost().port}/arms-tunnel.cgi"

    def done_answer(self, msg: Msg) -> bytes:
        """The captured answer for this done kind, with its transaction id (§6.5)."""
        data = chunks_of(vector(DONE_ANSWERS[msg.kind]))[0][1]
        tid = b"%d" % number("transaction-id", msg.data)
        data = TID.sub(
            b"<transaction-id>" + tid + b"</transaction-id>" if self.done_tid else b"", data
        )
        if self.done_codes:
            code = b"%d" % self.done_codes.pop(0)
            data = re.sub(rb"<result-code>[0-9]+", b"<result-code>" + code, data)
        self.next_id += 1
        return frame(data, self.next_id)

    @property
    def conn(self) -> ProxyConn:
        return self.conns[-1]


@pytest.fixture
def make_proxy(pki):
    proxies: list[FakeProxy] = []

    def make() -> FakeProxy:
        proxies.append(FakeProxy(pki))
        return proxies[-1]

    yield make
    for proxy in proxies:
        pytest_twisted.blockon(defer.maybeDeferred(proxy.port.stopListening))


@pytest.fixture
def make_device(pki):
    devices: list[SimulatedTunnelDevice] = []

    def make(urls, **kw) -> SimulatedTunnelDevice:
        kw.setdefault("echo_interval", 5.0)
        kw.setdefault("retry_interval", 0.1)
        kw.setdefault("modules", [MODULE])
        kw.setdefault("configs", {1: CONFIG})
        device = SimulatedTunnelDevice(
            reactor,
            DISTID,
            KEY,
            ca_pem=pki.ca_pem,
            sa_cert_pem=pki.sa.cert_chain_pems[0].bytes(),
            sa_key_pem=pki.sa.private_key_pem.bytes(),
            tunnel_urls=urls,
            **kw,
        )
        devices.append(device)
        return device

    yield make
    for device in devices:
        pytest_twisted.blockon(defer.ensureDeferred(device.stop()))
        assert not device.errors, [f.getTraceback() for f in device.errors]


def open_request(proxy: FakeProxy) -> bytes:
    """04-https-tunnel-open.request.txt with the fake proxy's port."""
    port = proxy.port.getHost().port
    return vector("04-https-tunnel-open.request.txt").replace(
        b"127.0.0.1:18446", b"127.0.0.1:%d" % port
    )


# ---------------------------------------------------------------------------------------------
# The capture, walked in order
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_capture_walk(pki, make_proxy, make_device):
    """tunnel/04..34 (without the echo timeout): same bytes, same chunk splits, same order."""
    proxy = make_proxy()
    device = make_device([proxy.url])
    await device.start()
    await device.ready(5)
    conn = proxy.conn

    # Opening: the captured header, in one write, with the SA's client certificate.
    assert conn.open_request == open_request(proxy)
    assert open_request(proxy) == build_open_request(proxy.url, DISTID, KEY)
    record = device.tunnels[0]
    assert record.connections[0].writes[0] == conn.open_request
    assert record.connections[0].status_line == b"HTTP/1.1 200 OK"
    assert conn.peer_der == x509.load_pem_x509_certificate(
        pki.sa.cert_chain_pems[0].bytes()
    ).public_bytes(serialization.Encoding.DER)

    # Confirmation (§9.4): the start in the tunnel form, the answer echoing 2492 first.
    await conn.message("push-confirmation-done")
    start, done_answer = conn.messages[0], conn.messages[1]
    assert structure(start.raw) == structure(vector("05-push-confirmation-start.request.txt"))
    assert structure(done_answer.raw) == structure(vector("06-push-confirmation-done.response.txt"))
    assert done_answer.data == chunks_of(vector("06-push-confirmation-done.response.txt"))[0][1]
    # Chunk header, data and CRLF are three writes, hence three TLS records (§9.3).
    header, data = chunks_of(start.raw)[0]
    assert conn.reads[1:4] == [header + b"\r\n", data, b"\r\n"]
    confirmation = device.confirmations[0]
    assert confirmation.confirmation_id == 2492 and confirmation.outcome == "confirmed"
    assert confirmation.done_type == "push-confirmation-done"
    assert record.confirmed and record.connected

    async def one_way(name: str) -> Msg:
        answer = await conn.push(f"{name}.request.txt")
        assert structure(answer.raw) == structure(vector(f"{name}.response.txt"))
        return answer

    async def two_way(start: str, done: str, index: int = 0) -> int:
        answer = await one_way(start)
        tid = number("transaction-id", answer.data)
        assert 0 < tid < 2**31
        kind = done.split("-", 1)[1].rsplit(".", 1)[0]
        done_msg = await conn.message(kind, index)
        assert structure(done_msg.raw) == structure(vector(f"{done}.request.txt"))
        assert number("transaction-id", done_msg.data) == tid
        assert done_msg.at >= answer.at  # on the same tunnel, after the start answer
        await device.wait_until(lambda: device.dones[-1].outcome != "pending")
        done_record = device.dones[-1]
        assert done_record.outcome == device_client.SUCCESS and done_record.verdict.ok
        assert done_record.request == done_msg.raw and done_record.transaction_id == tid
        return tid

    check = await one_way("08-check-transaction")
    assert b"<transaction-id>0</transaction-id>" in check.data
    await two_way("11-clear-status-start", "12-clear-status-done")
    await two_way("13-read-status-start", "14-read-status-done")
    await two_way("15-ping-start", "16-ping-done")
    await two_way("17-traceroute-start", "18-traceroute-done")
    md = await one_way("19-md-command")
    assert len(md.chunks) == 3  # envelope, result text, closing tags
    await one_way("20-read-module-list")
    assert len((await one_way("21-dump-debug")).chunks) == 3
    await two_way("22-read-storage-start", "23-read-storage-done")
    assert not device.transactions

    # Configure (§9.9): answer, TCP close without zero chunk, reconnect, configure-done first.
    answer = await conn.push("24-configure-start.request.txt")
    assert structure(answer.raw) == structure(vector("24-configure-start.response.txt"))
    tid = number("transaction-id", answer.data)
    await until(lambda: conn.closed and len(proxy.conns) == 2 and proxy.conn.header_at)
    assert not conn.end_of_stream
    assert b"".join(conn.reads).endswith(answer.raw)  # the answer was the last thing sent
    assert record.connections[0].close_reason.startswith("configure")
    new = proxy.conn
    assert vector("25-https-tunnel-open.request.txt") == vector("04-https-tunnel-open.request.txt")
    assert new.open_request == open_request(proxy)
    gap = record.connections[1].started_at - record.connections[0].closed_at
    assert 0.08 <= gap < 1.0  # rs-retry-interval (0.1 s here, ~1 s in the capture)
    done_msg = await new.message("configure-done")
    assert new.messages[0] is done_msg  # before any confirmation
    assert structure(done_msg.raw) == structure(vector("26-configure-done.request.txt"))
    assert number("transaction-id", done_msg.data) == tid
    await new.message("push-confirmation-done")
    restart = new.messages[1]
    assert structure(restart.raw) == structure(vector("27-push-confirmation-start.request.txt"))
    assert structure(new.messages[2].raw) == structure(
        vector("28-push-confirmation-done.response.txt")
    )
    assert b"<transaction-id>2493</transaction-id>" in new.messages[2].data
    await device.ready(5)
    assert device.dones[-1].kind == "configure-done" and device.dones[-1].outcome == "success"
    assert device.modules == [DeviceModule(1, "1.0.1", "harness-module")]
    assert device.configs == {1: PUSHED_CONFIG.encode()}
    assert device.reconnects == 1 and not device.transactions

    # Reboot: answer 100, then the zero chunk and close (33/34).
    reads_before = len(new.reads)
    answer = await new.push("33-reboot.request.txt")
    assert structure(answer.raw) == structure(vector("33-reboot.response.txt"))
    await until(lambda: new.closed)
    assert new.end_of_stream
    assert b"".join(new.reads[reads_before:]).endswith(
        answer.raw + vector("34-tunnel-last-chunk.message.txt")
    )
    assert device.rebooted and device.exit_reason == device_client.REBOOT
    await sleep(0.3)
    assert len(proxy.conns) == 2  # the device left its event loop: no reconnect
    assert [p.type for p in device.received] == [
        "check-transaction",
        "clear-status-start",
        "read-status-start",
        "ping-start",
        "traceroute-start",
        "md-command",
        "read-module-list",
        "dump-debug",
        "read-storage-start",
        "configure-start",
        "reboot",
    ]
    assert device.problems == []


# ---------------------------------------------------------------------------------------------
# Echoes (§9.5)
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_echo_cadence(make_proxy, make_device):
    proxy = make_proxy()
    device = make_device([proxy.url], echo_interval=0.2)
    await device.start()
    await device.ready(5)
    conn = proxy.conn
    await until(lambda: len(conn.echoes) >= 5)
    first = conn.echoes[0] - conn.header_at
    assert 0.15 <= first <= 0.4  # one interval after the 200 header
    gaps = [b - a for a, b in zip(conn.echoes, conn.echoes[1:], strict=False)]
    assert all(0.15 <= gap <= 0.35 for gap in gaps), gaps
    assert vector("09-tunnel-echo.request.txt") == ECHO_REQUEST
    assert conn.reads.count(ECHO_REQUEST) == len(conn.echoes)  # one write each
    await device.wait_until(lambda: device.echoes_answered == len(conn.echoes))
    assert device.echoes_sent == len(conn.echoes)
    assert device.reconnects == 0 and not conn.closed and device.problems == []


@pytest.mark.parametrize("who", ["proxy-silent", "device-ignores"])
@pytest_twisted.ensureDeferred
async def test_unanswered_echo_drops_and_reconnects(make_proxy, make_device, who):
    """29-32: no echo answer before the next tick ⇒ TCP close, reconnect, confirm again."""
    proxy = make_proxy()
    behaviour = TunnelBehaviour(ignore_echo_responses=who == "device-ignores")
    proxy.answer_echoes = who == "device-ignores"
    device = make_device([proxy.url], echo_interval=0.2, retry_interval=0.3, behaviour=behaviour)
    await device.start()
    await device.ready(5)
    first = proxy.conn
    await until(lambda: first.closed)
    # Stop provoking: the next connection gets its echoes answered.
    proxy.answer_echoes = True
    behaviour.ignore_echo_responses = False
    assert len(first.echoes) == 1 and not first.end_of_stream
    assert 0.3 <= first.lost_at - first.header_at <= 0.6  # dropped at the second tick
    assert "echo" in device.tunnels[0].connections[0].close_reason
    assert device.echoes_answered == 0
    await until(lambda: len(proxy.conns) == 2 and proxy.conn.header_at is not None)
    second = proxy.conn
    assert second.header_at - first.lost_at >= 0.25  # after rs-retry-interval
    await device.wait_until(lambda: device.tunnels[0].confirmed and len(device.confirmations) == 2)
    assert second.open_request == first.open_request
    assert structure(second.messages[0].raw) == structure(
        vector("31-push-confirmation-start.request.txt")
    )
    assert (await second.message("push-confirmation-done")) is second.messages[1]
    assert device.reconnects == 1 and device.problems == []
    await until(lambda: len(second.echoes) >= 2)
    await device.wait_until(lambda: device.echoes_answered >= 1)
    assert not second.closed


# ---------------------------------------------------------------------------------------------
# Configure rollback, done answers, opening failures
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_configure_done_refused_rolls_back_with_414(make_proxy, make_device):
    """412 to the configure-done ⇒ rollback, new connection, configure-done 414 first (§6.5)."""
    proxy = make_proxy()
    proxy.done_codes = [412]
    device = make_device([proxy.url])
    await device.start()
    await device.ready(5)
    answer = await proxy.conn.push("24-configure-start.request.txt")
    tid = number("transaction-id", answer.data)
    await until(lambda: len(proxy.conns) == 3)
    second, third = proxy.conns[1], proxy.conns[2]
    await until(lambda: second.closed)
    assert not second.end_of_stream and len(second.messages) == 1
    assert number("transaction-result", second.messages[0].data) == 100
    done = await third.message("configure-done")
    assert third.messages[0] is done
    assert number("transaction-result", done.data) == 414
    assert number("transaction-id", done.data) == tid
    await device.ready(5)
    assert [d.outcome for d in device.dones] == [device_client.ROLLBACK, device_client.SUCCESS]
    assert device.rollbacks == 1
    assert device.modules == [MODULE] and device.configs == {1: CONFIG.encode()}
    assert device.reconnects == 2 and device.problems == []


@pytest_twisted.ensureDeferred
async def test_done_answer_without_transaction_id_is_a_new_request(make_proxy, make_device):
    """The SA routes done answers by transaction-id: without it ⇒ 202 generic-error (§6.5)."""
    proxy = make_proxy()
    proxy.done_tid = False
    device = make_device([proxy.url])
    await device.start()
    await device.ready(5)
    conn = proxy.conn
    await conn.push("15-ping-start.request.txt")
    done = await conn.message("ping-done")
    error = await conn.message("generic-error")
    assert error.data == GENERIC_ERROR_202 and error.at >= done.at
    assert device.received[-1].result_code == 202
    assert device.dones[-1].outcome == "pending"  # the real done stays open
    # A proper answer still finishes it.
    proxy.done_tid = True
    conn.send(proxy.done_answer(done))
    await device.wait_until(lambda: device.dones[-1].outcome != "pending")
    assert device.dones[-1].outcome == device_client.SUCCESS
    assert not device.transactions and not conn.closed


@pytest_twisted.ensureDeferred
async def test_http10_header_is_a_failed_attempt(make_proxy, make_device):
    proxy = make_proxy()
    proxy.headers = [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
    ]
    device = make_device([proxy.url])
    await device.start()
    await device.ready(5)
    first, second = proxy.conns
    assert first.messages == [] and first.closed and not first.end_of_stream
    assert "HTTP/1.0 200" in device.tunnels[0].connections[0].close_reason
    assert second.messages[0].kind == "push-confirmation-start"
    assert device.reconnects == 1


@pytest_twisted.ensureDeferred
async def test_proxy_framing_rules(make_proxy, make_device):
    """Chunk data may be split over reads; a split chunk header or a zero chunk is not (§9.5)."""
    proxy = make_proxy()
    device = make_device([proxy.url])
    await device.start()
    await device.ready(5)
    conn = proxy.conn
    request = vector("08-check-transaction.request.txt")
    header, _, rest = request.partition(b"\r\n")
    await until(conn.confirmed)
    seen = len(conn.messages)
    conn.send(header + b"\r\n" + rest[:50])
    await sleep(0.05)
    conn.send(rest[50:])
    await until(lambda: len(conn.messages) > seen)
    assert conn.messages[-1].kind == "check-transaction" and device.problems == []

    conn.send(header[:5])
    await sleep(0.05)
    conn.send(header[5:] + b"\r\n" + rest)
    await until(lambda: conn.closed and len(proxy.conns) == 2)
    assert "chunk header cut" in device.problems[0]
    assert device.tunnels[0].connections[0].close_reason.startswith("lost chunk sync")
    await device.ready(5)

    proxy.conn.send(ZERO_CHUNK)
    await until(lambda: len(proxy.conns) == 3)
    await device.ready(5)
    assert device.tunnels[0].connections[1].close_reason == "zero chunk from the proxy"
    assert device.reconnects == 2 and len(device.problems) == 1


@pytest_twisted.ensureDeferred
async def test_split_writes(make_proxy, make_device):
    """Byte-level splitting changes the records, not the bytes or the chunk structure."""
    proxy = make_proxy()
    device = make_device([proxy.url], behaviour=TunnelBehaviour(split_writes=True, split_max=5))
    await device.start()
    await device.ready(5)
    conn = proxy.conn
    assert conn.open_request == open_request(proxy)
    answer = await conn.push("11-clear-status-start.request.txt")
    assert structure(answer.raw) == structure(vector("11-clear-status-start.response.txt"))
    done = await conn.message("clear-status-done")
    assert structure(done.raw) == structure(vector("12-clear-status-done.request.txt"))
    await device.wait_until(lambda: device.dones and device.dones[-1].outcome == "success")
    assert max(len(r) for r in conn.reads) <= 5 and len(conn.reads) > 300


@pytest_twisted.ensureDeferred
async def test_two_tunnels_dones_on_their_own_tunnel(make_proxy, make_device):
    """One tunnel per URL; a done travels on its start's tunnel (§6.5), here before the start
    answer (§7.0.4); busy refuses 2-way starts; stop() ends each tunnel with the zero chunk."""
    first, second = make_proxy(), make_proxy()
    behaviour = TunnelBehaviour(done_before_start_answer=True)
    device = make_device([first.url, second.url], behaviour=behaviour)
    await device.start()
    await device.ready(5)
    assert all(r.confirmed for r in device.tunnels)
    a, b = first.conn, second.conn
    answer = await b.push("15-ping-start.request.txt")
    done = await b.message("ping-done")
    assert done.at <= answer.at and b.messages.index(done) < b.messages.index(answer)
    assert number("transaction-id", done.data) == number("transaction-id", answer.data)
    await device.wait_until(lambda: device.dones[-1].outcome == "success")
    assert [m.kind for m in a.messages] == ["push-confirmation-start", "push-confirmation-done"]

    behaviour.busy = 302
    answer = await a.push("11-clear-status-start.request.txt")
    assert number("result-code", answer.data) == 302 and number("transaction-id", answer.data)
    await sleep(0.1)
    assert a.messages[-1] is answer and len(device.dones) == 1

    await device.stop()
    await until(lambda: a.closed and b.closed)
    assert a.end_of_stream and b.end_of_stream
    assert all(c.zero_chunk_sent for r in device.tunnels for c in r.connections)


@pytest_twisted.ensureDeferred
async def test_md_command_failure_is_an_empty_message(make_proxy, make_device):
    """md-command 402: no XML at all, only the zero-length final chunk `0;id=N;trail` (§7.9)."""
    proxy = make_proxy()
    device = make_device([proxy.url], behaviour=TunnelBehaviour(md_command_fails=True))
    await device.start()
    await device.ready(5)
    answer = await proxy.conn.push("19-md-command.request.txt")
    assert re.fullmatch(rb"0;id=[1-9][0-9]*;trail", answer.headers[0])
    assert answer.chunks == [b""] and answer.raw.endswith(b";trail\r\n\r\n")
    assert device.received[-1].result_code == 402
    assert not proxy.conn.end_of_stream and not proxy.conn.closed  # end of message, not stream
