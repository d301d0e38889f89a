"""The simulated SA device answers pushes like the real SA's listener and sends its dones.

Pushes are the captured requests of tests/vectors/simple*/ sent over real TLS on loopback; the
result-url points at a small done server run here, answering like
simple/14-ping-done.response.txt. Answers are compared byte for byte with the captures where
nothing random is in them, and with transaction ids masked otherwise.
"""

from __future__ import annotations

import base64
import pathlib
import re
from dataclasses import dataclass

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from armsproxy.device import client as device_client
from armsproxy.device.client import SAConnectionCreator
from armsproxy.device.listener import DeviceBehaviour, DeviceModule, SimulatedDevice

VECTORS = pathlib.Path(__file__).resolve().parent / "vectors"
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
CONFIG = "hostname harness-sa\ninterface lan0 address 192.0.2.10/24\n"
PUSHED_CONFIG = "hostname harness-sa-pushed\ninterface lan0 address 192.0.2.11/24\n"
MODULE = DeviceModule(1, "1.0.0", "harness-module")
TID = re.compile(rb"<transaction-id>[0-9]+</transaction-id>")


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def mask(data: bytes) -> bytes:
    return TID.sub(b"<transaction-id>N</transaction-id>", data)


def with_result_url(request: bytes, url: str | None) -> bytes:
    """A captured push with its result-url replaced (None: removed), Content-Length fixed."""
    head, _, body = request.partition(b"\r\n\r\n")
    new = b"" if url is None else b"<result-url>" + url.encode() + b"</result-url>"
    body = re.sub(rb"<result-url>[^<]*</result-url>", new, body)
    head = re.sub(rb"Content-Length: [0-9]+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def push_bytes(xml: str | bytes, *, auth: bytes | None = None, header: bytes = b"") -> bytes:
    body = xml.encode() if isinstance(xml, str) else xml
    return (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1:18450\r\nContent-Type: text/xml\r\n"
        b"Connection: close\r\n"
        + header
        + b"Authorization: "
        + (auth or basic(DISTID, KEY))
        + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


def envelope(msg_type: str, body_name: str, inner: str = "", extra: str = "") -> str:
    return (
        f'<arms-message><arms-request type="{msg_type}"><distribution-id>{DISTID}'
        f"</distribution-id>{extra}<{body_name}>{inner}</{body_name}></arms-request>"
        "</arms-message>"
    )


def arms_answer(raw: bytes) -> tuple[str, int, int | None, str]:
    """(type, result-code, transaction-id, body element XML) of a device answer."""
    xml = raw.decode("ascii").split("\r\n\r\n", 1)[1].split("\r", 1)[1]
    rtype = re.search(r'<arms-response type="([^"]+)">', xml).group(1)
    code = int(re.search(r"<result-code>([0-9]+)</result-code>", xml).group(1))
    tid = re.search(r"^<arms-message><arms-response [^>]*><transaction-id>([0-9]+)<", xml)
    body = re.search(rf"<{rtype}-response>.*</{rtype}-response>", xml).group(0)
    return rtype, code, int(tid.group(1)) if tid else None, body


def dechunk(body: bytes) -> tuple[list[bytes], bool]:
    chunks, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol == -1:
            return chunks, False
        size = int(body[pos:eol], 16)
        if size == 0:
            return chunks, body[eol + 2 :].startswith(b"\r\n")
        start = eol + 2
        if len(body) < start + size + 2:
            return chunks, False
        chunks.append(body[start : start + size])
        pos = start + size + 2


def done_structure(raw: bytes) -> tuple[list[bytes], list[bytes]]:
    """Header lines (path and Host masked) and chunks (transaction id masked) of a done."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    lines[0] = re.sub(rb"^POST \S+ ", b"POST /PATH ", lines[0])
    lines = [b"Host: HOST" if line.startswith(b"Host: ") else line for line in lines]
    chunks, complete = dechunk(body)
    assert complete
    return lines, [mask(c) for c in chunks]


# ---------------------------------------------------------------------------------------------
# PKI
# ---------------------------------------------------------------------------------------------


@dataclass
class PKI:
    ca: trustme.CA
    sa: trustme.LeafCert  # the device's sa-certificate (listener and client)
    proxy: trustme.LeafCert  # the pusher's client certificate and the done server's
    foreign: trustme.LeafCert  # from another CA

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()


def der(leaf: trustme.LeafCert) -> bytes:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> PKI:
    ca = trustme.CA()
    return PKI(
        ca=ca,
        sa=ca.issue_cert("127.0.0.1", common_name="harness SA"),
        proxy=ca.issue_cert("127.0.0.1", common_name="proxy"),
        foreign=trustme.CA().issue_cert("127.0.0.1", common_name="intruder"),
    )


# ---------------------------------------------------------------------------------------------
# The pusher (the proxy's side of a push) and the done server (the proxy's result-url)
# ---------------------------------------------------------------------------------------------


@dataclass
class Pushed:
    reads: list[bytes]
    reason: object

    @property
    def data(self) -> bytes:
        return b"".join(self.reads)


@implementer(IHandshakeListener)
class PusherProtocol(Protocol):
    def __init__(self, data: bytes, events: list) -> None:
        self.data, self.events = data, events
        self.reads: list[bytes] = []
        self.finished: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        if not self.reads:
            self.events.append("start-answer")
        self.reads.append(data)

    def connectionLost(self, reason=None):
        self.finished.callback(Pushed(self.reads, reason))


async def push(pki: PKI, port: int, data: bytes, *, cert="proxy", events=None) -> Pushed:
    leaf = {"proxy": pki.proxy, "foreign": pki.foreign, None: None}[cert]
    creator = SAConnectionCreator(
        pki.ca_pem,
        leaf.cert_chain_pems[0].bytes() if leaf else None,
        leaf.private_key_pem.bytes() if leaf else None,
    )
    proto = PusherProtocol(data, events if events is not None else [])
    factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: proto))
    factory.protocol = TLSMemoryBIOProtocol
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(factory)
    return await proto.finished


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    def __init__(self, leaf: trustme.LeafCert, ca: trustme.CA) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
        ctx.use_privatekey(serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None))
        ctx.get_cert_store().add_cert(
            crypto.X509.from_cryptography(x509.load_pem_x509_certificate(ca.cert_pem.bytes()))
        )
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        self.ctx = ctx

    def serverConnectionForTLS(self, protocol):
        conn = SSL.Connection(self.ctx, None)
        conn.set_accept_state()
        return conn


@dataclass
class DoneSeen:
    raw: bytes
    body: bytes
    kind: str
    transaction_id: int | None
    transaction_result: int | None
    peer_der: bytes | None
    at: float


def done_answer(kind: str, tid: int | None, code: int = 100, attrs: str = "") -> bytes:
    """An answer in the form of simple/14-ping-done.response.txt."""
    body = (
        '<?xml version="1.0" encoding="US-ASCII"?>\n'
        f'<arms-message><arms-response type="{kind}"{attrs}><result-code>{code}</result-code>'
        f"<description>OK</description><transaction-id>{tid}</transaction-id>"
        f"<{kind}-response></{kind}-response></arms-response></arms-message>"
    ).encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class DoneProtocol(Protocol):
    def __init__(self, server: DoneServer) -> None:
        self.server = server
        self.buf = b""

    def dataReceived(self, data):
        self.buf += data
        _head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        chunks, complete = dechunk(body)
        if not complete:
            return
        text = b"".join(chunks).decode("ascii")

        def number(tag):
            m = re.search(rf"<{tag}>([0-9]+)</{tag}>", text)
            return int(m.group(1)) if m else None

        peer = self.transport.getPeerCertificate()
        seen = DoneSeen(
            raw=self.buf,
            body=b"".join(chunks),
            kind=re.search(r'<arms-request type="([^"]+)"', text).group(1),
            transaction_id=number("transaction-id"),
            transaction_result=number("transaction-result"),
            peer_der=crypto.dump_certificate(crypto.FILETYPE_ASN1, peer) if peer else None,
            at=reactor.seconds(),
        )
        self.server.requests.append(seen)
        self.server.events.append("done")
        self.transport.write(self.server.answer(seen))
        self.transport.loseConnection()


class DoneServer:
    """The proxy's result-url: answers dones (and confirmation starts) like the captures."""

    def __init__(self, pki: PKI) -> None:
        self.requests: list[DoneSeen] = []
        self.events: list[str] = []
        self.codes: list[int] = []  # result-codes for the next done answers, in order
        self.attrs = ""  # extra attributes on arms-response (unreadable answers)
        factory = TLSMemoryBIOFactory(
            ServerTLS(pki.proxy, pki.ca), False, Factory.forProtocol(lambda: DoneProtocol(self))
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"https://127.0.0.1:{self.port.getHost().port}/arms-proxy.cgi"

    def answer(self, seen: DoneSeen) -> bytes:
        if seen.kind == "push-confirmation-start":
            return vector("simple/24-push-confirmation-start.response.txt")
        code = self.codes.pop(0) if self.codes else 100
        return done_answer(seen.kind, seen.transaction_id, code, self.attrs)

    async def wait(self, count: int) -> list[DoneSeen]:
        await until(lambda: len(self.requests) >= count)
        return self.requests


async def until(condition, timeout: float = 5.0) -> None:
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01, lambda: None)


@pytest.fixture
def done_server(pki):
    server = DoneServer(pki)
    yield server
    pytest_twisted.blockon(defer.maybeDeferred(server.port.stopListening))


@pytest.fixture
def make_device(pki):
    devices = []

    async def make(**kw) -> tuple[SimulatedDevice, int]:
        behaviour = kw.pop("behaviour", DeviceBehaviour(retry_interval=0.05))
        kw.setdefault("modules", [MODULE])
        kw.setdefault("configs", {1: CONFIG})
        device = SimulatedDevice(
            reactor,
            DISTID,
            KEY,
            ca_pem=pki.ca_pem,
            sa_cert_pem=pki.sa.cert_chain_pems[0].bytes(),
            sa_key_pem=pki.sa.private_key_pem.bytes(),
            behaviour=behaviour,
            **kw,
        )
        devices.append(device)
        return device, await device.listen()

    yield make
    for device in devices:
        pytest_twisted.blockon(defer.ensureDeferred(device.close()))
        assert not device.errors, [f.getTraceback() for f in device.errors]


# ---------------------------------------------------------------------------------------------
# The capture, walked in order
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_capture_walk(pki, make_device, done_server):
    """simple/05..27 against the device: the same answers, the same dones, in the same order."""
    assert done_answer("ping-done", 1511953657) == vector("simple/14-ping-done.response.txt")
    behaviour = DeviceBehaviour(fallback_result_url=done_server.url, retry_interval=0.05)
    device, port = await make_device(behaviour=behaviour)
    reconfirmed: defer.Deferred = defer.Deferred()
    device.on_reconfirm = lambda dev: reconfirmed.callback(dev.port)

    async def exact(name):
        answer = await push(pki, port, vector(f"simple/{name}.request.txt"))
        assert answer.data == vector(f"simple/{name}.response.txt")
        assert len(answer.reads) >= 3  # header, envelope, ..., closing tags: several writes
        assert answer.reason.check(ConnectionDone)
        return answer

    async def two_way(start, done, url, ndone):
        request = vector(f"simple/{start}.request.txt")
        if b"<result-url>" in request:
            request = with_result_url(request, url)
        answer = await push(pki, port, request)
        assert mask(answer.data) == mask(vector(f"simple/{start}.response.txt"))
        tid = arms_answer(answer.data)[2]
        assert 0 < tid < 2**31
        seen = (await done_server.wait(ndone))[ndone - 1]
        assert seen.transaction_id == tid
        assert done_structure(seen.raw) == done_structure(vector(f"simple/{done}.request.txt"))
        assert seen.peer_der == der(pki.sa)  # the done presents the sa-certificate
        await until(lambda: len(device.dones) == ndone)  # the device has judged the answer
        record = device.dones[ndone - 1]
        assert record.outcome == device_client.SUCCESS and record.verdict.ok
        assert record.request == seen.raw
        return tid

    await exact("05-push-confirmation-done")
    assert device.confirmed and device.confirmation_id == 5001
    await exact("07-check-transaction")

    # No push carried a result-url yet: the done goes to the fallback (the RS URL, §7.0.3).
    await two_way("09-clear-status-start", "10-clear-status-done", None, 1)
    assert device.result_url is None and device.dones[0].url == done_server.url
    await two_way("11-read-status-start", "12-read-status-done", done_server.url, 2)
    assert device.result_url == done_server.url
    await two_way("13-ping-start", "14-ping-done", done_server.url, 3)
    await two_way("15-traceroute-start", "16-traceroute-done", done_server.url, 4)
    await exact("17-md-command")
    await exact("18-read-module-list")
    await exact("19-dump-debug")
    # read-storage carries no result-url: the stored one is used.
    await two_way("20-read-storage-start", "21-read-storage-done", None, 5)

    tid = await two_way("22-configure-start", "23-configure-done", done_server.url, 6)
    assert await reconfirmed == port  # closed and re-opened on the same port
    assert device.listener_restarts == 1 and not device.confirmed
    assert device.modules == [DeviceModule(1, "1.0.1", "harness-module")]
    assert device.configs == {1: PUSHED_CONFIG.encode()}
    assert tid not in device.transactions

    await exact("25-push-confirmation-done")
    assert device.confirmation_id == 5002 and len(device.confirmations) == 2
    await exact("27-reboot")
    assert device.rebooted

    types = [r.type for r in device.received]
    assert types == [
        "push-confirmation-done",
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
        "push-confirmation-done",
        "reboot",
    ]
    assert all(r.peer_certificate == der(pki.proxy) for r in device.received)
    assert all(r.status == 200 and r.result_code == 100 for r in device.received)
    assert device.transactions == {}


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

CHECK = vector("simple/07-check-transaction.request.txt")
CHECK_XML = CHECK.partition(b"\r\n\r\n")[2]
BAD_AUTH = vector("simple-errors/07-check-transaction-bad-auth.response.txt")


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        pytest.param(
            vector("simple-errors/07-check-transaction-bad-auth.request.txt"), BAD_AUTH, id="key"
        ),
        pytest.param(CHECK.replace(b"Authorization:", b"authorization:"), BAD_AUTH, id="case"),
        pytest.param(
            push_bytes(CHECK_XML, auth=basic("0001-0002-0003-0004-0005-0006-0007-0009", KEY)),
            BAD_AUTH,
            id="user",
        ),
        pytest.param(push_bytes(CHECK_XML, auth=b"Basic !!!"), BAD_AUTH, id="base64"),
        pytest.param(
            vector("simple/08-md-command-chunked-probe.request.txt"),
            vector("simple/08-md-command-chunked-probe.response.txt"),
            id="chunked",
        ),
        pytest.param(
            push_bytes(CHECK_XML, header=b"X-Padding: " + b"x" * 1020 + b"\r\n"),
            BAD_AUTH.replace(b"401 Authorization Required", b"400 Bad Request"),
            id="header-line-over-1024",
        ),
        pytest.param(
            vector("simple-errors/09-check-transaction-wrong-distid.request.txt"),
            vector("simple-errors/09-check-transaction-wrong-distid.response.txt"),
            id="distid",
        ),
        pytest.param(
            vector("simple-errors/10-unknown-operation.request.txt"),
            vector("simple-errors/10-unknown-operation.response.txt"),
            id="unknown-type",
        ),
        pytest.param(
            # A non-whitelisted attribute hides arms-request and all inside it (§3.1).
            push_bytes(CHECK_XML.replace(b'type="check', b'foo="bar" type="check')),
            vector("simple-errors/10-unknown-operation.response.txt"),
            id="attribute",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_answers_match_captures(pki, make_device, request_bytes, answer):
    device, port = await make_device()
    pushed = await push(pki, port, request_bytes)
    assert pushed.data == answer
    assert device.received[0].status == int(answer.split(b" ")[1])


@pytest_twisted.ensureDeferred
async def test_ping_without_address_is_203_with_an_id_and_no_done(pki, make_device, done_server):
    device, port = await make_device()
    request = vector("simple-errors/11-ping-start-missing-address.request.txt")
    pushed = await push(pki, port, with_result_url(request, done_server.url))
    expected = vector("simple-errors/11-ping-start-missing-address.response.txt")
    assert mask(pushed.data) == mask(expected)
    assert arms_answer(pushed.data)[2] is not None
    assert device.result_url == done_server.url  # stored although the push failed
    await device.close()
    assert device.dones == [] and done_server.requests == [] and device.transactions == {}


@pytest_twisted.ensureDeferred
async def test_foreign_client_certificate_gets_no_answer(pki, make_device):
    device, port = await make_device()
    pushed = await push(pki, port, CHECK, cert="foreign")
    assert pushed.data == b""
    assert device.received == [] and len(device.rejected) == 1
    # Without a certificate the push is fine (asked for, not required).
    pushed = await push(pki, port, CHECK, cert=None)
    assert pushed.data == vector("simple/07-check-transaction.response.txt")
    assert device.received[0].peer_certificate is None


def op_xml(msg_type: str, inner: str = "", extra: str = "") -> bytes:
    base = re.sub(r"-(start|done)$", "", msg_type)
    two_way = base in ("configure", "read-status", "read-storage", "clear-status", "ping")
    two_way = two_way or base == "traceroute"
    body = f"{base}-start-request" if two_way else f"{base}-request"
    return push_bytes(envelope(msg_type, body, inner, extra))


PING = "<address>192.0.2.1</address><count>3</count>"


@pytest.mark.parametrize(
    ("request_bytes", "rtype", "code", "has_tid"),
    [
        pytest.param(op_xml("ping", PING), "ping-start", 100, True, id="ping-synonym"),
        pytest.param(op_xml("ping-done", PING), "ping-start", 100, True, id="ping-done-synonym"),
        pytest.param(op_xml("reboot-start"), "reboot", 100, False, id="reboot-start-synonym"),
        pytest.param(
            op_xml("check-transaction").replace(
                b"<distribution-id>",
                "<description>caf\u00e9 </description><distribution-id>".encode(),
            ),
            "check-transaction",
            201,
            False,
            id="non-ascii",
        ),
        pytest.param(
            op_xml("ping-start", PING).replace(b"</ping-start-request>", b""),
            "ping-start",
            201,
            True,
            id="malformed",
        ),
        pytest.param(
            op_xml("ping-start", PING, "<result-url>ftp://127.0.0.1/x</result-url>"),
            "ping-start",
            203,
            True,
            id="result-url-scheme",
        ),
        pytest.param(op_xml("md-command"), "md-command", 203, False, id="md-command-none"),
        pytest.param(
            op_xml(
                "md-command", '<md-command id="1">a</md-command><md-command id="1">b</md-command>'
            ),
            "md-command",
            422,
            False,
            id="md-command-two",
        ),
        pytest.param(
            op_xml("md-command", '<md-command id="1" module-id="1">a</md-command>'),
            "md-command",
            203,
            False,
            id="md-command-attribute",
        ),
        pytest.param(
            op_xml(
                "traceroute-start",
                "<address>192.0.2.1</address><count>1</count><max-hop>257</max-hop>",
            ),
            "traceroute-start",
            203,
            True,
            id="max-hop",
        ),
        pytest.param(
            op_xml("traceroute-start", "<address>192.0.2.1</address><max-hop>3</max-hop>"),
            "traceroute-start",
            203,
            True,
            id="traceroute-count",
        ),
        pytest.param(
            op_xml("ping-start", "<address>192.0.2.1</address><count>3 </count>"),
            "ping-start",
            100,
            True,
            id="integer-whitespace-dropped",
        ),
        pytest.param(
            op_xml("read-storage-start", "<storage>flash</storage>"),
            "read-storage-start",
            203,
            True,
            id="storage",
        ),
        pytest.param(
            op_xml("read-storage-start", "<storage>run</storage>"),
            "read-storage-start",
            100,
            True,
            id="storage-prefix",
        ),
        pytest.param(op_xml("clear-status-start"), "clear-status-start", 203, True, id="clear"),
        pytest.param(
            op_xml(
                "configure-start",
                '<module id="1" version="2">m</module><md-config id="2">x</md-config>',
            ),
            "configure-start",
            415,
            True,
            id="md-config-unknown-module",
        ),
        pytest.param(
            # Content-Length is ignored; the body ends at </arms-message> (§2.5).
            CHECK.replace(b"Content-Length: 254", b"Content-Length: 9999"),
            "check-transaction",
            100,
            False,
            id="content-length-ignored",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_arms_level_answers(pki, make_device, request_bytes, rtype, code, has_tid):
    device, port = await make_device()
    pushed = await push(pki, port, request_bytes)
    head = pushed.data.partition(b"\r\n\r\n")[0]
    assert (
        head == b"HTTP/1.0 200 OK\r\nServer: armsd\r\nConnection: close\r\nContent-Type: text/xml"
    )
    got_type, got_code, tid, _ = arms_answer(pushed.data)
    assert (got_type, got_code, tid is not None) == (rtype, code, has_tid)
    assert device.received[0].result_code == code
    if code != 100:
        assert device.transactions == {}


@pytest_twisted.ensureDeferred
async def test_configure_without_modules_removes_them_all(pki, make_device):
    device, port = await make_device()
    pushed = await push(pki, port, op_xml("configure-start", '<md-config id="1">x</md-config>'))
    assert arms_answer(pushed.data)[:2] == ("configure-start", 415)
    assert device.modules == [] and device.configs == {}


@pytest_twisted.ensureDeferred
async def test_md_command_failure_is_the_declaration_only(pki, make_device):
    device, port = await make_device(behaviour=DeviceBehaviour(md_command_fails=True))
    pushed = await push(pki, port, vector("simple/17-md-command.request.txt"))
    assert pushed.data == (
        b"HTTP/1.0 200 OK\r\nServer: armsd\r\nConnection: close\r\nContent-Type: text/xml\r\n\r\n"
        b'<?xml version="1.0" encoding="US-ASCII" ?>\r'
    )
    assert device.received[0].result_code == 402


# ---------------------------------------------------------------------------------------------
# Timing and behaviour switches
# ---------------------------------------------------------------------------------------------


PING_START = vector("simple/13-ping-start.request.txt")


@pytest.mark.parametrize("first", [True, False])
@pytest_twisted.ensureDeferred
async def test_done_before_start_answer(pki, make_device, done_server, first):
    behaviour = DeviceBehaviour(done_before_start_answer=first, done_delay=0 if first else 0.2)
    device, port = await make_device(behaviour=behaviour)
    events = done_server.events  # the done server and the pusher write to the same list
    pushed = await push(pki, port, with_result_url(PING_START, done_server.url), events=events)
    await done_server.wait(1)
    assert events == (["done", "start-answer"] if first else ["start-answer", "done"])
    assert done_server.requests[0].transaction_id == arms_answer(pushed.data)[2]
    await until(lambda: device.dones)
    assert device.dones[0].outcome == device_client.SUCCESS


@pytest.mark.parametrize("code", [302, 406])
@pytest_twisted.ensureDeferred
async def test_busy_device_refuses_starts(pki, make_device, done_server, code):
    device, port = await make_device(behaviour=DeviceBehaviour(busy=code))
    pushed = await push(pki, port, with_result_url(PING_START, done_server.url))
    rtype, got, tid, _ = arms_answer(pushed.data)
    assert (rtype, got) == ("ping-start", code) and tid is not None
    # 1-way pushes still run
    pushed = await push(pki, port, CHECK)
    assert pushed.data == vector("simple/07-check-transaction.response.txt")
    await device.close()
    assert done_server.requests == [] and device.dones == []


@pytest_twisted.ensureDeferred
async def test_check_transaction_lists_live_transactions(pki, make_device, done_server):
    device, port = await make_device(behaviour=DeviceBehaviour(done_delay=0.3))
    pushed = await push(pki, port, with_result_url(PING_START, done_server.url))
    tid = arms_answer(pushed.data)[2]
    assert list(device.transactions) == [tid]
    pushed = await push(pki, port, CHECK)
    assert arms_answer(pushed.data)[3] == (
        "<check-transaction-response>"
        f"<transaction-id>{tid}</transaction-id><transaction-id>0</transaction-id>"
        "</check-transaction-response>"
    )
    await device.close()  # waits for the pending done
    assert len(device.dones) == 1 and len(done_server.requests) == 1
    assert device.transactions == {}


@pytest_twisted.ensureDeferred
async def test_done_without_any_result_url_is_lost(pki, make_device, done_server):
    device, port = await make_device()
    pushed = await push(pki, port, vector("simple/09-clear-status-start.request.txt"))
    assert arms_answer(pushed.data)[1] == 100
    await device.close()
    [record] = device.dones
    assert record.url is None and record.outcome == device_client.DONE_LOST
    assert record.request == b""
    assert done_server.requests == []


@pytest_twisted.ensureDeferred
async def test_drop_and_delay(pki, make_device, done_server):
    device, port = await make_device(behaviour=DeviceBehaviour(drop_without_answer=True))
    pushed = await push(pki, port, with_result_url(PING_START, done_server.url))
    assert pushed.data == b""
    assert device.received[0].status is None and device.transactions == {}

    device.behaviour = DeviceBehaviour(start_answer_delay=0.2)
    pushed = await push(pki, port, CHECK)
    record = device.received[1]
    assert pushed.data == vector("simple/07-check-transaction.response.txt")
    assert record.answered_at - record.received_at >= 0.2
    assert record.raw == CHECK and record.answer == pushed.data
    assert done_server.requests == []


# ---------------------------------------------------------------------------------------------
# configure-done reactions (§6.5)
# ---------------------------------------------------------------------------------------------

CONFIGURE = vector("simple/22-configure-start.request.txt")


@pytest_twisted.ensureDeferred
async def test_rejected_configure_done_rolls_back_and_reports_414(pki, make_device, done_server):
    device, port = await make_device(behaviour=DeviceBehaviour(retry_interval=0.2))
    reconfirmed: defer.Deferred = defer.Deferred()
    device.on_reconfirm = lambda dev: reconfirmed.callback(None)
    done_server.codes = [412]  # like simple-errors/13-configure-done.response.txt
    await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    first, second = await done_server.wait(2)
    assert (first.transaction_result, second.transaction_result) == (100, 414)
    assert first.transaction_id == second.transaction_id
    assert second.at - first.at >= 0.2  # after rs-retry-interval
    assert done_structure(first.raw) == done_structure(
        vector("simple-errors/13-configure-done.request.txt")
    )
    assert done_structure(second.raw) == done_structure(
        vector("simple-errors/14-configure-done.request.txt")
    )
    await reconfirmed  # a 1xx answer to the 414 done ends it: confirm again
    assert [d.outcome for d in device.dones] == [device_client.ROLLBACK, device_client.SUCCESS]
    assert device.modules == [MODULE] and device.configs == {1: CONFIG.encode()}
    assert device.rollbacks == 1


@pytest_twisted.ensureDeferred
async def test_unreadable_configure_done_answer_sends_the_same_done(pki, make_device, done_server):
    device, port = await make_device()
    reconfirmed: defer.Deferred = defer.Deferred()
    device.on_reconfirm = lambda dev: reconfirmed.callback(None)
    done_server.attrs = ' xml:lang="en"'  # simple-errors/30: the result-code is not seen
    await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    await done_server.wait(1)
    done_server.attrs = ""
    first, second = await done_server.wait(2)
    assert first.raw == second.raw  # the same done, unchanged
    await reconfirmed
    assert [d.outcome for d in device.dones] == [device_client.RESEND, device_client.SUCCESS]
    assert device.modules == [DeviceModule(1, "1.0.1", "harness-module")]


@pytest_twisted.ensureDeferred
async def test_configure_done_never_readable_ends_in_re_pull(pki, make_device, done_server):
    device, port = await make_device(behaviour=DeviceBehaviour(retry_interval=0.02, retry_max=1))
    done_server.attrs = ' xml:lang="en"'
    await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    await device.close()
    assert [d.transaction_result for d in device.dones] == [100, 100, 414, 414]
    assert [d.outcome for d in device.dones] == [device_client.RESEND] * 4
    assert device.exit_reason == device_client.REPULL and device.modules == [MODULE]


@pytest_twisted.ensureDeferred
async def test_listener_really_closes_and_confirms_again(pki, make_device, done_server):
    behaviour = DeviceBehaviour(reopen_delay=0.5)
    device, port = await make_device(behaviour=behaviour, rs_pull_server_urls=[done_server.url])
    await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    await done_server.wait(1)
    await deferLater(reactor, 0.15, lambda: None)
    with pytest.raises(ConnectionRefusedError):
        await push(pki, port, CHECK)  # the gap: refused at TCP level
    confirm = (await done_server.wait(2))[1]
    assert confirm.kind == "push-confirmation-start"
    assert f"<push-endpoint>https://127.0.0.1:{port}/</push-endpoint>".encode() in confirm.body
    await until(lambda: device.confirmation_starts)
    assert device.confirmation_starts[0].verdict.ok
    pushed = await push(pki, port, vector("simple/25-push-confirmation-done.request.txt"))
    assert pushed.data == vector("simple/25-push-confirmation-done.response.txt")
    assert device.confirmed and device.confirmation_id == 5002


@pytest.mark.parametrize(
    ("result", "modules", "reconfirms", "rebooted"),
    [
        (414, [MODULE], 1, False),  # activation failed, old config restored, reported
        (303, [DeviceModule(1, "1.0.1", "harness-module")], 0, True),  # reboots once acked
    ],
)
@pytest_twisted.ensureDeferred
async def test_configure_results(
    pki, make_device, done_server, result, modules, reconfirms, rebooted
):
    device, port = await make_device(behaviour=DeviceBehaviour(configure_result=result))
    await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    await done_server.wait(1)
    await device.close()
    assert [d.transaction_result for d in device.dones] == [result]
    assert device.dones[0].outcome == (device_client.REBOOT if rebooted else device_client.SUCCESS)
    assert device.modules == modules
    assert (device.listener_restarts, device.rebooted) == (reconfirms, rebooted)


@pytest_twisted.ensureDeferred
async def test_transaction_limits(pki, make_device, done_server):
    behaviour = DeviceBehaviour(done_delay=1.0, close_listener_after_configure=False)
    device, port = await make_device(behaviour=behaviour)
    ping = with_result_url(PING_START, done_server.url)
    await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    pushed = await push(pki, port, with_result_url(CONFIGURE, done_server.url))
    assert arms_answer(pushed.data)[:2] == ("configure-start", 302)  # one configure at a time
    for _ in range(9):
        pushed = await push(pki, port, ping)
        assert arms_answer(pushed.data)[1] == 100
    pushed = await push(pki, port, ping)
    assert arms_answer(pushed.data)[:2] == ("ping-start", 406)  # more than 10 live
    assert len(device.transactions) == 10
    pushed = await push(pki, port, CHECK)
    assert arms_answer(pushed.data)[1] == 100  # 1-way still runs
    assert len(arms_answer(pushed.data)[3].split("<transaction-id>")) == 12  # 10 ids and 0
    await device.close()
    assert len(done_server.requests) == 10 and device.listener_restarts == 0


@pytest_twisted.ensureDeferred
async def test_pull_config_ls_forgets_the_result_url(pki, make_device, done_server):
    device, port = await make_device()
    extra = f"<result-url>{done_server.url}</result-url>"
    await push(pki, port, op_xml("pull-config", "<type>RS</type>", extra))
    assert (device.result_url, device.pull_config_type) == (done_server.url, "RS")
    pushed = await push(pki, port, op_xml("pull-config", "<type>LS</type>"))
    assert arms_answer(pushed.data) == (
        "pull-config",
        100,
        None,
        "<pull-config-response></pull-config-response>",
    )
    assert device.result_url is None and device.exit_reason == device_client.REPULL
