"""SAPushClient against a fake SA listener over real TLS on loopback (§2.1, §2.5, §2.6).

The fake SA behaves like libarms' https-simple listener: it reads until ``</arms-message>``
(it ignores Content-Length), answers with the captured HTTP/1.0 bytes (no Content-Length, bare
CR after the declaration) written in several TLS records, then closes. It asks for a client
certificate without requiring one and rejects one from a foreign CA, as the SA does.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from armsproxy.arms.framing import build_push_request, extract_arms_xml
from armsproxy.push import (
    PushAnswer,
    PushError,
    PushNoAnswer,
    PushProtocolError,
    PushTimeout,
    PushTLSError,
    PushUnreachable,
    SAPushClient,
)
from armsproxy.tls import HandshakeFailures

VECTORS = Path(__file__).parent / "vectors"
# The harness device of the captures (base64 of the captured Authorization header).
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
CAPTURED_PORT = b"18450"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def request_body(name: str) -> bytes:
    return vector(name).partition(b"\r\n\r\n")[2]


CHECK_BODY = request_body("simple/07-check-transaction.request.txt")
CHECK_ANSWER = vector("simple/07-check-transaction.response.txt")


# ---------------------------------------------------------------------------------------------
# certificates


def _cert_without_san(ca: trustme.CA, common_name: str) -> tuple[bytes, bytes]:
    """An SA-like certificate as some RSs issue them: CN = distid, no subjectAltName."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class Identity:
    """A certificate and key as PEM bytes."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.cert_pem = cert_pem
        self.key_pem = key_pem

    @classmethod
    def from_leaf(cls, leaf: trustme.LeafCert) -> Identity:
        return cls(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())

    @property
    def pin(self) -> str:
        return self.cert_pem.decode("ascii")

    @property
    def sha256(self) -> str:
        der = x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
            serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest()


class PKI:
    def __init__(self) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        # The RS's SA CA, issuing SA certificates (the SA listener's server certificate).
        self.sa_ca = trustme.CA()
        self.sa = Identity.from_leaf(self.sa_ca.issue_cert("127.0.0.1", common_name=DISTID))
        self.sa_v6 = Identity.from_leaf(self.sa_ca.issue_cert("::1", common_name=DISTID))
        self.sa_other = Identity.from_leaf(self.sa_ca.issue_cert("127.0.0.1"))
        self.sa_wrong_ip = Identity.from_leaf(self.sa_ca.issue_cert("127.0.0.2"))
        self.sa_dns_only = Identity.from_leaf(self.sa_ca.issue_cert("sa.example"))
        self.sa_no_san = Identity(*_cert_without_san(self.sa_ca, DISTID))
        self.sa_expired = Identity.from_leaf(self.sa_ca.issue_cert(
            "127.0.0.1", not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1)))
        self.sa_not_yet_valid = Identity.from_leaf(self.sa_ca.issue_cert(
            "127.0.0.1", not_before=now + datetime.timedelta(days=400),
            not_after=now + datetime.timedelta(days=800)))
        self.sa_rsa = Identity.from_leaf(
            self.sa_ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA))
        # Another CA with a perfectly fine 127.0.0.1 certificate.
        self.foreign_ca = trustme.CA()
        self.foreign_sa = Identity.from_leaf(self.foreign_ca.issue_cert("127.0.0.1"))
        # The rs-certificate CA the devices trust; the proxy's client certificate chains to it.
        self.rs_ca = trustme.CA()
        self.proxy_client = self.rs_ca.issue_cert("proxy.invalid", common_name="armsproxy")
        self.foreign_client = self.foreign_ca.issue_cert("proxy.invalid")

    @property
    def sa_ca_pem(self) -> bytes:
        return self.sa_ca.cert_pem.bytes()


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI()


# ---------------------------------------------------------------------------------------------
# the fake SA listener


def sa_pieces(answer: bytes) -> list[bytes]:
    """Split a captured answer the way the SA writes it: head, envelope, result, closing tags."""
    head, _, body = answer.partition(b"\r\n\r\n")
    pieces = [head + b"\r\n\r\n"]
    cuts = [i for i in (body.find(b"<result-code>"), body.find(b"</description>")) if i > 0]
    start = 0
    for cut in cuts:
        pieces.append(body[start:cut])
        start = cut
    pieces.append(body[start:])
    return [p for p in pieces if p]


@implementer(IHandshakeListener)
class SAConnection(Protocol):
    def __init__(self, sa: FakeSA) -> None:
        self.sa = sa
        self.reads: list[bytes] = []
        self.handshake_done = False
        self.peer_cert: bytes | None = None
        self.answered = False
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.sa.connections.append(self)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        cert = self.transport.getPeerCertificate()
        if cert is not None:
            self.peer_cert = cert.to_cryptography().public_bytes(serialization.Encoding.DER)

    @property
    def data(self) -> bytes:
        return b"".join(self.reads)

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        # Like libarms: the request ends where the XML parser sees </arms-message> (§2.5).
        if self.answered or b"</arms-message>" not in self.data:
            return
        self.answered = True
        action = self.sa.action
        if action == "silent":
            return
        if action == "close":
            self.transport.loseConnection()
            return
        if action == "abort":
            self.transport.abortConnection()
            return
        pieces = sa_pieces(self.sa.answer) if action == "answer" else [self.sa.answer]
        self._write(pieces, close=action != "stall")

    def _write(self, pieces: list[bytes], close: bool) -> None:
        if not self.transport.connected:
            return
        if not pieces:
            if close:
                self.transport.loseConnection()
            return
        self.transport.write(pieces[0])  # one TLS record per write (unbuffered TLS below)
        reactor.callLater(0.002, self._write, pieces[1:], close)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


_OPENSSL_VERSION = {
    ssl.TLSVersion.TLSv1_0: SSL.TLS1_VERSION,
    ssl.TLSVersion.TLSv1_1: SSL.TLS1_1_VERSION,
    ssl.TLSVersion.TLSv1_2: SSL.TLS1_2_VERSION,
    ssl.TLSVersion.TLSv1_3: SSL.TLS1_3_VERSION,
}


class _UnbufferedTLSFactory(TLSMemoryBIOFactory):
    protocol = TLSMemoryBIOProtocol


class FakeSA:
    """libarms' https-simple listener as far as the push client can tell."""

    def __init__(self) -> None:
        self.connections: list[SAConnection] = []
        self.action = "answer"  # answer | raw | stall | silent | close | abort
        self.answer = CHECK_ANSWER
        self.ports: list = []

    def listen(
        self,
        identity: Identity,
        *,
        client_ca: trustme.CA | None = None,
        tls_version: ssl.TLSVersion | None = None,
        interface: str = "127.0.0.1",
    ) -> int:
        kwargs: dict = {}
        if client_ca is not None:
            # VERIFY_PEER without "fail if no peer cert", one CA (§2.1).
            kwargs.update(
                verify=True,
                caCerts=[crypto.load_certificate(crypto.FILETYPE_PEM, client_ca.cert_pem.bytes())],
                requireCertificate=False,
            )
        if tls_version is not None and tls_version < ssl.TLSVersion.TLSv1_2:
            kwargs["insecurelyLowerMinimumTo"] = tls_version
        options = ssl.CertificateOptions(
            privateKey=serialization.load_pem_private_key(identity.key_pem, None),
            certificate=x509.load_pem_x509_certificate(identity.cert_pem),
            **kwargs,
        )
        if tls_version is not None:
            # Not lowerMaximumSecurityTo=: before Twisted 25 it also excluded that very version
            # (twisted#10232).
            context = options.getContext()
            context.set_max_proto_version(_OPENSSL_VERSION[tls_version])
            if tls_version < ssl.TLSVersion.TLSv1_2:
                context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        factory = _UnbufferedTLSFactory(
            options, False, Factory.forProtocol(lambda: SAConnection(self)))
        port = reactor.listenTCP(0, factory, interface=interface)
        self.ports.append(port)
        return port.getHost().port

    @property
    def only(self) -> SAConnection:
        assert len(self.connections) == 1, self.connections
        return self.connections[0]

    async def close(self) -> None:
        for conn in self.connections:
            if conn.transport is not None and conn.transport.connected:
                conn.transport.abortConnection()
        for port in self.ports:
            await port.stopListening()
        for conn in self.connections:
            await conn.closed


class RawConnection(Protocol):
    """A TCP listener that never speaks TLS (accepts, reads, says nothing)."""

    def __init__(self, owner: list) -> None:
        self.owner = owner
        self.reads: list[bytes] = []
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.owner.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(None)


@pytest_twisted.async_yield_fixture
async def sa():
    fake = FakeSA()
    yield fake
    await fake.close()


async def until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def warnings_logged():
    events: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_namespace", "").startswith("armsproxy.push"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def client(pki: PKI, **kwargs) -> SAPushClient:
    kwargs.setdefault("sa_ca_pem", pki.sa_ca_pem)
    return SAPushClient(reactor, **kwargs)


async def push(
    c: SAPushClient, port: int, pin: Identity | None, *, host: str = "127.0.0.1",
    body: bytes = CHECK_BODY,
) -> PushAnswer:
    url = f"https://[{host}]:{port}/" if ":" in host else f"https://{host}:{port}/"
    return await c.push(
        url, distribution_id=DISTID, key=KEY, body=body,
        pinned_certificate_pem=pin.pin if pin is not None else None,
    )


async def expect(exc_type: type[PushError], awaitable) -> PushError:
    with pytest.raises(exc_type) as info:
        await awaitable
    return info.value


async def nothing_sent(sa: FakeSA) -> None:
    """The SA got a TCP connection, and not a single request byte before it ended."""
    await until(lambda: len(sa.connections) == 1)
    await sa.only.closed
    assert sa.only.reads == []


# ---------------------------------------------------------------------------------------------
# success


@pytest_twisted.ensureDeferred
async def test_request_bytes_arrive_in_one_piece_as_build_push_request_makes_them(pki, sa):
    port = sa.listen(pki.sa)
    await push(client(pki), port, pki.sa)
    expected = build_push_request("127.0.0.1", port, DISTID, KEY, CHECK_BODY)
    # Exactly the bytes the real SA accepted in the capture, apart from the port.
    captured = vector("simple/07-check-transaction.request.txt")
    assert expected == captured.replace(CAPTURED_PORT, str(port).encode(), 1)
    assert sa.only.reads == [expected]  # one TLS record, complete before the SA answered


@pytest.mark.parametrize(
    ("answer_file", "code"),
    [
        ("simple/05-push-confirmation-done.response.txt", b"100"),
        ("simple/07-check-transaction.response.txt", b"100"),
        ("simple/13-ping-start.response.txt", b"100"),
        ("simple/27-reboot.response.txt", b"100"),
        ("simple-errors/09-check-transaction-wrong-distid.response.txt", b"423"),
        ("simple-errors/10-unknown-operation.response.txt", b"202"),
        ("simple-errors/11-ping-start-missing-address.response.txt", b"203"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_captured_answers_are_returned_parsed(pki, sa, answer_file, code):
    sa.answer = vector(answer_file)
    port = sa.listen(pki.sa)
    answer = await push(client(pki), port, pki.sa)
    assert answer.status == 200
    assert answer.response.version == "HTTP/1.0"
    assert answer.response.header("Content-Length") is None
    assert answer.response.body == sa.answer.partition(b"\r\n\r\n")[2]
    assert answer.xml == extract_arms_xml(answer.response.body)
    assert answer.xml.startswith(b"<arms-message>") and answer.xml.endswith(b"</arms-message>")
    assert f"<result-code>{code.decode()}</result-code>".encode() in answer.xml
    assert answer.peer_certificate_sha256 == pki.sa.sha256
    assert answer.elapsed >= 0


@pytest_twisted.ensureDeferred
async def test_answer_401_without_xml_is_an_answer_not_an_error(pki, sa):
    sa.answer = vector("simple-errors/07-check-transaction-bad-auth.response.txt")
    port = sa.listen(pki.sa)
    answer = await push(client(pki), port, pki.sa)
    assert answer.status == 401
    assert answer.xml == b""
    assert answer.response.header("WWW-Authenticate") == 'Basic realm=""'


@pytest.mark.parametrize("which", ["sa_no_san", "sa_dns_only"])
@pytest_twisted.ensureDeferred
async def test_certificate_without_ip_san_is_accepted_when_pinned(pki, sa, which):
    identity = getattr(pki, which)
    port = sa.listen(identity)
    answer = await push(client(pki), port, identity)
    assert answer.status == 200
    assert answer.peer_certificate_sha256 == identity.sha256


@pytest.mark.parametrize("which", ["sa_expired", "sa_not_yet_valid"])
@pytest_twisted.ensureDeferred
async def test_validity_dates_are_ignored(pki, sa, which):
    identity = getattr(pki, which)
    port = sa.listen(identity)
    answer = await push(client(pki), port, identity)
    assert answer.status == 200


@pytest_twisted.ensureDeferred
async def test_without_a_pin_only_the_chain_is_checked(pki, sa):
    port = sa.listen(pki.sa_other)
    answer = await push(client(pki), port, None)
    assert answer.status == 200
    assert answer.peer_certificate_sha256 == pki.sa_other.sha256


@pytest_twisted.ensureDeferred
async def test_concurrent_pushes_on_one_client_each_check_their_own_pin(pki, sa):
    # The client's one TLS context is shared; the pin travels with each connection.
    c = client(pki)
    port_sa, port_other = sa.listen(pki.sa), sa.listen(pki.sa_other)
    results = await defer.DeferredList([
        defer.ensureDeferred(push(c, port, pin))
        for port, pin in [(port_sa, pki.sa), (port_other, pki.sa), (port_other, pki.sa_other),
                          (port_sa, pki.sa_other), (port_sa, pki.sa)]
    ], consumeErrors=True)
    outcomes = [r.peer_certificate_sha256 if ok else r.value.reason for ok, r in results]
    assert outcomes[0] == pki.sa.sha256 and outcomes[4] == pki.sa.sha256
    assert outcomes[2] == pki.sa_other.sha256
    assert "pin mismatch" in outcomes[1] and "pin mismatch" in outcomes[3]


@pytest_twisted.ensureDeferred
async def test_ipv6_push_endpoint(pki, sa):
    port = sa.listen(pki.sa_v6, interface="::1")
    answer = await push(client(pki), port, pki.sa_v6, host="::1")
    assert answer.status == 200
    assert sa.only.reads == [build_push_request("::1", port, DISTID, KEY, CHECK_BODY)]


@pytest_twisted.ensureDeferred
async def test_tls_1_0_device_needs_the_opt_in(pki, sa):
    port = sa.listen(pki.sa_rsa, tls_version=ssl.TLSVersion.TLSv1_0)
    error = await expect(PushTLSError, push(client(pki), port, pki.sa_rsa))
    assert "handshake" in error.reason
    answer = await push(client(pki, tls_minimum_version="1.0"), port, pki.sa_rsa)
    assert answer.status == 200


# ---------------------------------------------------------------------------------------------
# client certificate


@pytest_twisted.ensureDeferred
async def test_client_certificate_is_presented_when_configured(pki, sa):
    port = sa.listen(pki.sa, client_ca=pki.rs_ca)
    c = client(pki, client_cert_pem=pki.proxy_client.private_key_and_cert_chain_pem.bytes())
    answer = await push(c, port, pki.sa)
    assert answer.status == 200
    expected = x509.load_pem_x509_certificate(pki.proxy_client.cert_chain_pems[0].bytes())
    assert sa.only.peer_cert == expected.public_bytes(serialization.Encoding.DER)


@pytest_twisted.ensureDeferred
async def test_no_client_certificate_is_accepted_by_the_sa(pki, sa):
    port = sa.listen(pki.sa, client_ca=pki.rs_ca)
    answer = await push(client(pki), port, pki.sa)
    assert answer.status == 200
    assert sa.only.handshake_done and sa.only.peer_cert is None


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest_twisted.ensureDeferred
async def test_foreign_client_certificate_makes_the_sa_drop_the_connection(pki, sa, version):
    port = sa.listen(pki.sa, client_ca=pki.rs_ca, tls_version=version)
    c = client(pki, client_cert_pem=pki.foreign_client.private_key_and_cert_chain_pem.bytes())
    error = await expect(PushTLSError, push(c, port, pki.sa))
    assert "unknown ca" in error.reason
    await until(lambda: len(sa.connections) == 1)
    await sa.only.closed
    # The SA never completed the handshake, so it never read the request (with TLS 1.3 the
    # client had already sent it, §2.1).
    assert not sa.only.handshake_done and sa.only.reads == []


def test_client_certificate_without_key_is_refused(pki):
    with pytest.raises(ValueError, match="private key"):
        client(pki, client_cert_pem=pki.proxy_client.cert_chain_pems[0].bytes())


# ---------------------------------------------------------------------------------------------
# verification failures: nothing is sent


@pytest_twisted.ensureDeferred
async def test_pin_mismatch_fails_before_anything_is_sent(pki, sa):
    port = sa.listen(pki.sa_other)  # same CA, not the certificate the RS issued to the distid
    error = await expect(PushTLSError, push(client(pki), port, pki.sa))
    assert "pin mismatch" in error.reason
    assert pki.sa_other.sha256 in error.reason and pki.sa.sha256 in error.reason
    await nothing_sent(sa)


@pytest_twisted.ensureDeferred
async def test_wrong_ca_fails_before_anything_is_sent(pki, sa):
    port = sa.listen(pki.foreign_sa)
    # Pinned to the foreign certificate itself: the chain check alone must refuse it.
    error = await expect(PushTLSError, push(client(pki), port, pki.foreign_sa))
    assert not error.request_sent
    assert "chain not verified against the SA CA" in error.reason
    await nothing_sent(sa)


@pytest_twisted.ensureDeferred
async def test_ip_san_for_another_address_fails_before_anything_is_sent(pki, sa):
    port = sa.listen(pki.sa_wrong_ip)
    error = await expect(PushTLSError, push(client(pki), port, pki.sa_wrong_ip))
    assert "IP SAN mismatch" in error.reason and "127.0.0.2" in error.reason
    await nothing_sent(sa)


@pytest_twisted.ensureDeferred
async def test_unreadable_pin_fails_without_connecting(pki, sa):
    port = sa.listen(pki.sa)
    c = client(pki)
    with pytest.raises(PushTLSError, match="pinned certificate"):
        await c.push(f"https://127.0.0.1:{port}/", distribution_id=DISTID, key=KEY,
                     body=CHECK_BODY, pinned_certificate_pem="not a certificate")
    await task.deferLater(reactor, 0.05)
    assert sa.connections == []


def test_sa_ca_must_hold_a_certificate():
    with pytest.raises(ValueError, match="sa_ca_pem"):
        SAPushClient(reactor, sa_ca_pem=b"nothing here")


@pytest_twisted.ensureDeferred
async def test_url_must_be_https_with_a_literal_ip(pki):
    with pytest.raises(ValueError, match="literal IP"):
        await client(pki).push("https://sa.example:10443/", distribution_id=DISTID, key=KEY,
                               body=CHECK_BODY, pinned_certificate_pem=None)


# ---------------------------------------------------------------------------------------------
# network failures


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_unreachable_and_retryable(pki, warnings_logged):
    listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    port = listening.getHost().port
    await listening.stopListening()
    error = await expect(PushUnreachable, push(client(pki), port, pki.sa))
    assert not error.request_sent
    assert error.retryable and "refused" in error.reason
    assert len(warnings_logged) == 1
    event = warnings_logged[0]
    assert event["distid"] == DISTID
    assert event["url"] == f"https://127.0.0.1:{port}/"
    assert event["reason"] == error.reason


@pytest_twisted.ensureDeferred
async def test_tcp_connect_timeout_is_unreachable(pki):
    # A SYN black hole cannot be made on loopback: MemoryReactorClock never connects.
    fake = MemoryReactorClock()
    c = SAPushClient(fake, sa_ca_pem=pki.sa_ca_pem, connect_timeout=3.0, answer_timeout=30.0)
    result = defer.ensureDeferred(push(c, 10443, pki.sa, host="192.0.2.7"))
    host, port, *_ = fake.tcpClients[0]
    assert (host, port) == ("192.0.2.7", 10443)
    fake.advance(2.9)
    assert not result.called
    fake.advance(0.1)
    error = await expect(PushUnreachable, result)
    assert error.retryable and "TCP connect timed out after 3 s" in error.reason
    assert fake.connectors[0].stoppedConnecting


@pytest_twisted.ensureDeferred
async def test_tls_never_completing_times_out(pki):
    conns: list[RawConnection] = []
    listening = reactor.listenTCP(
        0, Factory.forProtocol(lambda: RawConnection(conns)), interface="127.0.0.1")
    try:
        clock = task.Clock()
        c = client(pki, connect_timeout=5.0, answer_timeout=30.0, clock=clock)
        result = defer.ensureDeferred(push(c, listening.getHost().port, pki.sa))
        await until(lambda: conns and conns[0].reads)  # the ClientHello arrived
        clock.advance(4.9)
        assert not result.called
        clock.advance(0.1)
        error = await expect(PushTimeout, result)
        assert error.retryable and "handshake" in error.reason
        assert error.tls_failure == "timeout"  # a failed handshake, counted as such
        await conns[0].closed  # the connection was dropped
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_sa_never_answering_times_out_at_the_absolute_deadline(pki, sa):
    sa.action = "silent"
    port = sa.listen(pki.sa)
    clock = task.Clock()
    c = client(pki, connect_timeout=5.0, answer_timeout=30.0, clock=clock)
    result = defer.ensureDeferred(push(c, port, pki.sa))
    await until(lambda: sa.connections and sa.only.answered)  # the request is complete
    clock.advance(29.9)
    assert not result.called
    clock.advance(0.1)
    error = await expect(PushTimeout, result)
    assert error.retryable and "no complete answer" in error.reason
    await sa.only.closed


@pytest_twisted.ensureDeferred
async def test_partial_answer_does_not_extend_the_deadline(pki, sa):
    sa.action = "stall"
    sa.answer = CHECK_ANSWER[:60]  # then nothing, and no close
    port = sa.listen(pki.sa)
    clock = task.Clock()
    c = client(pki, answer_timeout=30.0, clock=clock)
    result = defer.ensureDeferred(push(c, port, pki.sa))
    await until(lambda: sa.connections and sa.only.answered)
    await task.deferLater(reactor, 0.05)  # the piece reaches the client
    assert not result.called
    clock.advance(30.0)
    error = await expect(PushTimeout, result)
    assert "no complete answer" in error.reason


@pytest_twisted.ensureDeferred
async def test_cancelling_a_push_drops_the_connection(pki, sa):
    sa.action = "silent"
    port = sa.listen(pki.sa)
    result = defer.ensureDeferred(push(client(pki), port, pki.sa))
    await until(lambda: sa.connections and sa.only.answered)
    result.cancel()
    with pytest.raises(defer.CancelledError):
        await result
    await sa.only.closed


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest_twisted.ensureDeferred
async def test_close_without_answer_is_no_answer(pki, sa, how):
    sa.action = how
    port = sa.listen(pki.sa)
    error = await expect(PushNoAnswer, push(client(pki), port, pki.sa))
    assert error.request_sent  # the SA may have acted on it
    assert not error.retryable
    assert sa.only.data == build_push_request("127.0.0.1", port, DISTID, KEY, CHECK_BODY)


@pytest_twisted.ensureDeferred
async def test_answer_larger_than_the_limit_is_a_protocol_error(pki, sa):
    sa.action = "raw"
    sa.answer = (b"HTTP/1.0 200 OK\r\nServer: armsd\r\n\r\n<?xml version=\"1.0\" ?>\r"
                 + b"<arms-message>" + b"x" * 10_000 + b"</arms-message>")
    port = sa.listen(pki.sa)
    error = await expect(PushProtocolError, push(client(pki, max_answer_bytes=4096), port, pki.sa))
    assert "4096" in error.reason
    await sa.only.closed


@pytest_twisted.ensureDeferred
async def test_garbage_answer_is_a_protocol_error(pki, sa):
    sa.action = "raw"
    sa.answer = b"SSH-2.0-OpenSSH_9.6\r\n"
    port = sa.listen(pki.sa)
    error = await expect(PushProtocolError, push(client(pki), port, pki.sa))
    assert error.reason.startswith("unusable answer")


@pytest_twisted.ensureDeferred
async def test_non_tls_listener_is_a_tls_error(pki):
    conns: list[RawConnection] = []

    class ClosingRaw(RawConnection):
        def dataReceived(self, data: bytes) -> None:
            self.reads.append(data)
            self.transport.loseConnection()

    listening = reactor.listenTCP(
        0, Factory.forProtocol(lambda: ClosingRaw(conns)), interface="127.0.0.1")
    try:
        error = await expect(PushTLSError, push(client(pki), listening.getHost().port, pki.sa))
        assert "during the TLS handshake" in error.reason
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_failed_handshakes_are_counted_by_reason(pki, sa):
    failures = HandshakeFailures(task.Clock())
    c = client(pki, handshake_failures=failures)
    foreign_cert = client(pki, handshake_failures=failures,
                          client_cert_pem=pki.foreign_client.private_key_and_cert_chain_pem
                          .bytes())
    conns: list[RawConnection] = []

    class ClosingRaw(RawConnection):
        def dataReceived(self, data: bytes) -> None:
            self.transport.loseConnection()

    raw = reactor.listenTCP(0, Factory.forProtocol(lambda: ClosingRaw(conns)),
                            interface="127.0.0.1")
    cases = [
        (c, sa.listen(pki.sa_rsa, tls_version=ssl.TLSVersion.TLSv1_0), pki.sa_rsa,
         "protocol_version"),
        (c, sa.listen(pki.sa_other), pki.sa, "pin_mismatch"),
        (c, sa.listen(pki.foreign_sa), pki.foreign_sa, "certificate_verify_failed"),
        (c, sa.listen(pki.sa_wrong_ip), pki.sa_wrong_ip, "ip_mismatch"),
        (foreign_cert, sa.listen(pki.sa, client_ca=pki.rs_ca), pki.sa, "unknown_ca"),
        (c, raw.getHost().port, pki.sa, "closed"),
    ]
    try:
        for pusher, port, pin, reason in cases:
            error = await expect(PushTLSError, push(pusher, port, pin))
            assert error.tls_failure == reason, (reason, error.reason)
    finally:
        await raw.stopListening()
    assert {r: n for (d, r), n in failures.counts().items() if n} == {
        reason: 1 for *_, reason in cases}
    assert all(d == "push" for (d, _), n in failures.counts().items() if n)
    # Not a handshake: an unreadable pin fails before any connection.
    with pytest.raises(PushTLSError) as info:
        await c.push("https://127.0.0.1:9/", distribution_id=DISTID, key=KEY, body=CHECK_BODY,
                     pinned_certificate_pem="not a certificate")
    assert info.value.tls_failure is None


def test_tls_versions_are_checked():
    with pytest.raises(ValueError, match="tls_minimum_version"):
        SAPushClient(reactor, sa_ca_pem=b"", tls_minimum_version="1.4")
