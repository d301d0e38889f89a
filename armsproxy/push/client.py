"""Push client for the SA's https-simple listener (arms-protocol.md §2.5, §2.6, §7.0).

The SA answers one request per TLS connection with an HTTP/1.0 answer that ends at EOF, so
every push is its own connection: TCP connect, TLS handshake (no SNI: the push-endpoint is a
bare IP), the request in one write, then read until the SA closes. ``twisted.web`` is not used:
its client would have to tolerate the SA's non-standard answers and would not let us write the
exact header bytes the SA's case-sensitive parser needs (``framing.build_push_request``).

The request carries the SA's preshared key, so it goes only to a peer that passed every check
while nothing has been written yet: chain to the SA CA (in the handshake), the leaf equal to the
certificate the RS issued to that distid (pin, also in the handshake), and an IP SAN check when
the leaf has IP SANs (right after the handshake, before the write).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_ip_address
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from armsproxy.arms.framing import FramingError, SAPushResponse, parse_sa_push_response
from armsproxy.arms.framing import build_push_request as _build_push_request
from armsproxy.arms.urls import parse_sa_url
from armsproxy.tls import (
    HandshakeFailures,
    TLSPolicy,
    ssl_error_text,
    ssl_failure_reason,
    trust_store_certificates,
)

__all__ = [
    "DEFAULT_MAX_ANSWER_BYTES",
    "PushAnswer",
    "PushError",
    "PushNoAnswer",
    "PushProtocolError",
    "PushTLSError",
    "PushTimeout",
    "PushUnreachable",
    "SAPushClient",
]

log = Logger()

DEFAULT_MAX_ANSWER_BYTES = 1024 * 1024

# X509_V_ERR_* codes. Dates are ignored like libarms does (§2.1): devices often have no clock.
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_IGNORED_VERIFY_ERRORS = frozenset({_CERT_NOT_YET_VALID, _CERT_HAS_EXPIRED})
_VERIFY_ERRORS = {
    2: "issuer certificate not found",
    4: "certificate signature undecodable",
    7: "certificate signature invalid",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "issuer not in the SA CA",
    21: "leaf signature cannot be verified",
    22: "certificate chain too long",
    24: "issuer is not a CA",
    26: "certificate not usable for a TLS server (key usage / purpose)",
}

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.DOTALL
)


# --------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------


class PushError(Exception):
    """A push that produced no usable answer. ``reason`` is short, for logs and the RS."""

    #: Whether trying the same push again later may help (the caller decides when).
    retryable: bool = False
    #: Whether the request had been written when it failed: the SA may have acted on it, so
    #: an operation with side effects must not be sent again blindly.
    request_sent: bool = False
    #: For a failed TLS handshake with the SA: its reason label (tls.HANDSHAKE_FAILURE_REASONS).
    tls_failure: str | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PushUnreachable(PushError):
    """TCP connect refused, unreachable or timed out (e.g. the SA re-opening its listener)."""

    retryable = True


class PushTLSError(PushError):
    """Handshake failed or the SA's certificate did not pass a check; the request was not sent.

    Also raised when the SA ends the TLS session (alert or close) in the handshake, which is
    what it does to a client certificate from a foreign CA (§2.1).
    """


class PushTimeout(PushError):
    """No complete answer within the deadline (handshake or answer phase)."""

    retryable = True


def _handshake_timeout(reason: str) -> PushTimeout:
    error = PushTimeout(reason)
    error.tls_failure = "timeout"
    return error


class PushNoAnswer(PushError):
    """The request was sent and the SA closed without any HTTP answer (simple-errors/08)."""


class PushProtocolError(PushError):
    """The SA answered with bytes that are not a usable HTTP answer, or too many of them."""


@dataclass(slots=True)
class PushAnswer:
    """What the SA answered. 401/400 are answers too (``xml == b""``); the caller decides."""

    status: int | None
    response: SAPushResponse
    xml: bytes
    elapsed: float
    peer_certificate_sha256: str


# --------------------------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------------------------


def _load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """``cryptography`` certificates: what pyOpenSSL's context takes (its own X509 is
    deprecated there); only the trust store converts them."""
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError(f"{what} holds no PEM certificate")
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise ValueError(f"{what}: unreadable certificate: {e}") from None


def _der(cert: crypto.X509) -> bytes:
    """The DER of a certificate pyOpenSSL hands us, read through ``cryptography`` (pyOpenSSL's
    own certificate API is on its way out)."""
    return cert.to_cryptography().public_bytes(serialization.Encoding.DER)


def _pin_der(pinned_certificate_pem: str | None) -> bytes | None:
    if pinned_certificate_pem is None:
        return None
    block = _PEM_CERT.search(pinned_certificate_pem.encode("ascii", "replace"))
    if block is None:
        raise PushTLSError("pinned certificate for this distid is not a PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(block.group(0))
    except ValueError:
        raise PushTLSError("pinned certificate for this distid is unreadable") from None
    return cert.public_bytes(serialization.Encoding.DER)


def _describe_cert(cert: crypto.X509) -> str:
    try:
        return cert.to_cryptography().subject.rfc4514_string() or "empty subject"
    except ValueError:
        return "unreadable subject"


def _tls_error(reason: str, kind: str) -> PushTLSError:
    error = PushTLSError(reason)
    error.tls_failure = kind
    return error


class _Verification:
    """Verification state of one connection, whose own verify callback is ``verify``.

    (Twisted takes the connection's app data for itself, hence the callback per connection on
    the client's one context. No TLS session is ever resumed, as libarms does.)
    """

    def __init__(self, pin: bytes | None) -> None:
        self.pin = pin
        self.failure: str | None = None
        self.failure_kind = "certificate_verify_failed"
        self.connection: SSL.Connection | None = None

    def verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        """Chain to the SA CA ignoring validity dates (libarms ignores them, §2.1), then pin.

        Devices often lack a real-time clock, so an SA certificate that is "not yet valid" or
        "expired" by our clock is accepted; every other chain error fails the handshake.
        """
        if not ok and errno not in _IGNORED_VERIFY_ERRORS:
            if self.failure is None:
                what = _VERIFY_ERRORS.get(errno, f"X509 verify error {errno}")
                self.failure = (
                    f"SA certificate chain not verified against the SA CA: {what} "
                    f"(depth {depth}, {_describe_cert(cert)})"
                )
            return False
        if depth == 0 and self.pin is not None:
            presented = _der(cert)
            if presented != self.pin:
                if self.failure is None:
                    self.failure_kind = "pin_mismatch"
                    self.failure = (
                        "SA certificate pin mismatch: presented sha256 "
                        f"{hashlib.sha256(presented).hexdigest()}, RS issued sha256 "
                        f"{hashlib.sha256(self.pin).hexdigest()}"
                    )
                return False
        return True


def _refuse_unverified(connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                       ok: int) -> bool:
    """The context's own callback, never reached (every connection sets its own): a
    connection that did not would verify nothing, so it refuses everything."""
    return False


@implementer(IOpenSSLClientConnectionCreator)
class _ConnectionCreator:
    """Hands Twisted a connection without SNI (the host is an IP), on the client's context,
    with this push's own verify callback."""

    def __init__(self, context: SSL.Context, verification: _Verification) -> None:
        self._context = context
        self._verification = verification

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_verify(SSL.VERIFY_PEER, self._verification.verify)  # this one's pin
        self._verification.connection = connection
        return connection


def _ip_san_problem(cert: x509.Certificate, host: str) -> str | None:
    """Check an IP SAN only when the leaf has one (SA certificates may carry none)."""
    try:
        san = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:
        return f"SA certificate has an unreadable subjectAltName: {e}"
    addresses = san.value.get_values_for_type(x509.IPAddress)
    if not addresses:
        return None
    try:
        verify_certificate_ip_address(cert, host)
    except (VerificationError, CertificateError):
        listed = ", ".join(str(a) for a in addresses)
        return f"SA certificate IP SAN mismatch: {host} not in [{listed}]"
    return None


# --------------------------------------------------------------------------------------------
# One push on one connection
# --------------------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class _PushProtocol(Protocol):
    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        self._exchange.tls_started(self.transport)

    def handshakeCompleted(self) -> None:
        self._exchange.handshake_completed()

    def dataReceived(self, data: bytes) -> None:
        self._exchange.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._exchange.connection_lost(reason)


class _PushFactory(Factory):
    noisy = False  # one log line per failed push, nothing per connection

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def buildProtocol(self, addr: Any) -> IProtocol:
        return _PushProtocol(self._exchange)


class _Exchange:
    """State machine of one push: connecting → handshake → sent → done."""

    def __init__(
        self,
        client: SAPushClient,
        host: str,
        port: int,
        request: bytes,
        pin: bytes | None,
    ) -> None:
        self._client = client
        self._clock = client._clock
        self._host = host
        self._port = port
        self._request = request
        self._verification = _Verification(pin)
        self._phase = "connecting"
        self._started = 0.0
        self._connecting: Deferred[Any] | None = None
        self._transport: ITransport | None = None
        self._timers: list[IDelayedCall] = []
        self._received: list[bytes] = []
        self._size = 0
        self._peer_sha256 = ""
        self.result: Deferred[PushAnswer] = Deferred(self._cancel)

    # -- start and deadlines ------------------------------------------------------------

    def start(self) -> Deferred[PushAnswer]:
        client = self._client
        self._started = self._clock.seconds()
        self._timers = [
            self._clock.callLater(client._connect_timeout, self._connect_expired),
            self._clock.callLater(client._answer_timeout, self._answer_expired),
        ]
        endpoint_class: Any = (
            TCP6ClientEndpoint
            if isinstance(ipaddress.ip_address(self._host), ipaddress.IPv6Address)
            else TCP4ClientEndpoint
        )
        tcp = endpoint_class(
            client._reactor, self._host, self._port, timeout=client._connect_timeout
        )
        endpoint = wrapClientTLS(_ConnectionCreator(client._context, self._verification), tcp)
        self._connecting = endpoint.connect(_PushFactory(self))
        self._connecting.addCallbacks(self._connected, self._connect_failed)
        return self.result

    def _connect_expired(self) -> None:
        seconds = self._client._connect_timeout
        if self._phase == "connecting":
            self._fail(PushUnreachable(f"TCP connect timed out after {seconds:g} s"))
        elif self._phase == "handshake":
            self._fail(_handshake_timeout(f"TLS handshake not complete after {seconds:g} s"))

    def _answer_expired(self) -> None:
        seconds = self._client._answer_timeout
        what = {
            "connecting": "TCP connect not complete",
            "handshake": "TLS handshake not complete",
            "sent": "no complete answer",
        }.get(self._phase)
        if what is not None:
            message = f"{what} within the {seconds:g} s deadline"
            self._fail(_handshake_timeout(message) if self._phase == "handshake"
                       else PushTimeout(message))

    # -- connection events --------------------------------------------------------------

    def _connected(self, protocol: object) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._phase == "done":
            return
        if failure.check(error.ConnectionRefusedError):
            reason = "connection refused"
        elif failure.check(error.TimeoutError):
            reason = f"TCP connect timed out after {self._client._connect_timeout:g} s"
        else:
            reason = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        self._fail(PushUnreachable(reason))

    def tls_started(self, transport: ITransport) -> None:
        self._transport = transport
        if self._phase == "done":
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._phase = "handshake"

    def handshake_completed(self) -> None:
        if self._phase != "handshake":
            return
        connection = self._verification.connection
        cert = connection.get_peer_certificate() if connection is not None else None
        if connection is None or cert is None:
            self._fail(_tls_error("SA presented no certificate", "no_certificate"))
            return
        der = _der(cert)
        self._peer_sha256 = hashlib.sha256(der).hexdigest()
        pin = self._verification.pin
        problem, kind = self._verification.failure, self._verification.failure_kind
        if problem is None and pin is not None and der != pin:
            problem = "SA certificate pin mismatch after the handshake"  # belt and braces
            kind = "pin_mismatch"
        if problem is None:
            problem, kind = _ip_san_problem(cert.to_cryptography(), self._host), "ip_mismatch"
        if problem is not None:
            self._fail(_tls_error(problem, kind))
            return
        self._phase = "sent"
        assert self._transport is not None
        self._transport.write(self._request)  # one write: the SA reads one request (§2.5)

    def data_received(self, data: bytes) -> None:
        if self._phase != "sent":
            return
        self._size += len(data)
        limit = self._client._max_answer_bytes
        if self._size > limit:
            self._received.clear()
            self._fail(PushProtocolError(f"answer larger than {limit} bytes"))
            return
        self._received.append(data)

    def connection_lost(self, reason: Failure) -> None:
        phase = self._phase
        if phase == "done":
            return
        if phase in ("connecting", "handshake"):
            self._fail(_tls_error(*self._handshake_failure(reason)))
            return
        data = b"".join(self._received)
        if not data:
            if reason.check(SSL.Error):
                # TLS 1.3: the SA refuses our client certificate after our side of the
                # handshake is done; still a failed handshake (§2.1).
                text = ssl_error_text(reason.value)
                self._fail(_tls_error(
                    "SA ended the TLS session after the request without an answer: "
                    f"{text} (client certificate rejected?)", ssl_failure_reason(text)))
            else:
                self._fail(PushNoAnswer("connection closed without any HTTP answer"))
            return
        limit = self._client._max_answer_bytes
        try:
            response = parse_sa_push_response(data, max_body=limit)
        except FramingError as e:
            self._fail(PushProtocolError(f"unusable answer: {e}"))
            return
        if not reason.check(error.ConnectionDone):
            response.framing_notes.append(
                f"connection ended by {type(reason.value).__name__}, not a clean close")
        self._finish()
        self.result.callback(PushAnswer(
            status=response.status,
            response=response,
            xml=response.xml,
            elapsed=self._clock.seconds() - self._started,
            peer_certificate_sha256=self._peer_sha256,
        ))

    def _handshake_failure(self, reason: Failure) -> tuple[str, str]:
        """What ended the handshake, and its reason label."""
        if self._verification.failure is not None:
            return self._verification.failure, self._verification.failure_kind
        if reason.check(SSL.Error):
            text = ssl_error_text(reason.value)
            return f"TLS handshake failed: {text}", ssl_failure_reason(text)
        # A bare close in the handshake: the SA rejecting our client certificate (§2.1), or a
        # listener that does not speak TLS.
        if self._client._client_certs:
            return ("SA closed the connection during the TLS handshake (client certificate?)",
                    "closed")
        return "SA closed the connection during the TLS handshake", "closed"

    # -- endings ------------------------------------------------------------------------

    def _finish(self) -> None:
        self._phase = "done"
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []

    def _drop_connection(self) -> None:
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        if self._transport is not None:
            self._transport.abortConnection()  # type: ignore[attr-defined]

    def _fail(self, exc: PushError) -> None:
        if self._phase == "done":
            return
        exc.request_sent = self._phase == "sent"
        self._finish()
        self._drop_connection()
        self.result.errback(exc)

    def _cancel(self, _result: Deferred[PushAnswer]) -> None:
        # The caller gave up: drop the connection; Deferred then fails with CancelledError.
        if self._phase != "done":
            self._finish()
            self._drop_connection()


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class SAPushClient:
    """Push ARMS requests to SAs in https-simple mode, one fresh TLS connection per push.

    ``sa_ca_pem``: the CA(s) that issue SA certificates (the RS's SA CA); every certificate in
    it is a trust anchor, intermediates included. ``client_cert_pem``: certificate + key PEM
    (extra certificates are sent as chain). It must chain to the CA the devices trust (the
    ``rs-certificate``), or be None: an SA drops a connection with a foreign client
    certificate without answering (§2.1). Validity dates of the SA's chain are not checked
    (libarms ignores them, devices often lack a clock). ``tls_minimum_version`` "1.0" is
    needed for upstream libarms devices, which speak only TLS 1.0 (§1): the SA gate's
    setting, applied by the same :class:`~armsproxy.tls.TLSPolicy`. ``clock`` runs every
    deadline (default ``reactor``), so tests can use ``task.Clock`` over real sockets. Failed
    handshakes go to ``handshake_failures`` (counted, logged once per SA address), by default
    a recorder of the client's own.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        sa_ca_pem: bytes,
        client_cert_pem: bytes | None = None,
        connect_timeout: float = 10.0,
        answer_timeout: float = 30.0,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        tls_minimum_version: str = "1.2",
        clock: IReactorTime | None = None,
        handshake_failures: HandshakeFailures | None = None,
    ) -> None:
        if connect_timeout <= 0 or answer_timeout <= 0 or max_answer_bytes <= 0:
            raise ValueError("timeouts and max_answer_bytes must be positive")
        self._policy = TLSPolicy(minimum_version=tls_minimum_version)  # ValueError if unknown
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._connect_timeout = connect_timeout
        self._answer_timeout = answer_timeout
        self._max_answer_bytes = max_answer_bytes
        self.handshake_failures = (handshake_failures if handshake_failures is not None
                                   else HandshakeFailures(self._clock))
        self._cas = trust_store_certificates(_load_certificates(sa_ca_pem, "sa_ca_pem"))
        self._client_certs: list[x509.Certificate] = []
        self._client_key: Any = None
        if client_cert_pem is not None:
            self._client_certs = _load_certificates(client_cert_pem, "client_cert_pem")
            key_block = _PEM_KEY.search(client_cert_pem)
            if key_block is None:
                raise ValueError("client_cert_pem holds no private key")
            try:
                self._client_key = serialization.load_pem_private_key(key_block.group(0), None)
            except (ValueError, TypeError) as e:
                raise ValueError(f"client_cert_pem: unusable private key: {e}") from None
        # One context for every push (built now: material OpenSSL refuses fails here); each
        # connection brings its own verify callback with its pin.
        self._context = self._new_context()

    def _new_context(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        self._policy.apply(context)  # the SA gate's minimum version and security level
        context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        store = context.get_cert_store()
        assert store is not None
        for ca in self._cas:
            store.add_cert(ca)
        # Trust what was configured even if it is an intermediate, not a self-signed root.
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        context.set_verify(SSL.VERIFY_PEER, _refuse_unverified)  # replaced per connection
        context.set_verify_depth(10)
        if self._client_certs:
            try:
                context.use_certificate(self._client_certs[0])
                context.use_privatekey(self._client_key)
                context.check_privatekey()
                for extra in self._client_certs[1:]:
                    context.add_extra_chain_cert(extra)
            except SSL.Error as e:
                raise ValueError(f"client_cert_pem unusable: {ssl_error_text(e)}") from None
        return context

    async def push(
        self,
        url: str,
        *,
        distribution_id: str,
        key: str,
        body: bytes,
        pinned_certificate_pem: str | None,
    ) -> PushAnswer:
        """Send ``body`` to the SA at ``url`` (its push-endpoint) and return its answer.

        ``pinned_certificate_pem`` is the certificate the RS issued to this distid; None skips
        the pin (chain only). Raises ValueError for an unusable URL or distid/key, and a
        :class:`PushError` subclass for every network, TLS or protocol failure (logged once).
        """
        target = parse_sa_url(url)
        request = _build_push_request(target.host, target.port, distribution_id, key, body)
        try:
            pin = _pin_der(pinned_certificate_pem)
            return await _Exchange(self, target.host, target.port, request, pin).start()
        except PushError as e:
            if e.tls_failure is None:
                log.warn("push to {distid} at {url} failed: {reason}",
                         distid=distribution_id, url=url, reason=e.reason)
            elif not self.handshake_failures.record(
                    "push", target.host, e.tls_failure, e.reason,
                    what=f"push to {distribution_id} at {url}"):
                # Logged once per SA address and reason: a confirmation retries every 3 s.
                log.debug("push to {distid} at {url} failed: {reason}",
                          distid=distribution_id, url=url, reason=e.reason)
            raise
        except CancelledError:
            log.info("push to {distid} at {url} cancelled", distid=distribution_id, url=url)
            raise
