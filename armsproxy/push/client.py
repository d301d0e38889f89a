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

No TLS session is resumed, and none is offered: a libarms SA builds a fresh ``SSL_CTX`` for
every connection (§2.1), so it could not resume one; every push pays a full handshake.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

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
_BIO_READ = 65536  # bytes taken out of OpenSSL at a time
_CACHE_ENTRIES = 65536  # per cache of per-SA facts (see SAPushClient.__init__)

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
    """The DER of a certificate pyOpenSSL hands us: one C call (no ``cryptography`` object)."""
    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def _pin_der(pinned_certificate_pem: str) -> bytes:
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


class _LeafFacts:
    """What the checks after the handshake need of one SA certificate, worked out once per
    certificate (an SA presents the same one on every push)."""

    __slots__ = ("_checked", "addresses", "problem", "sha256")

    def __init__(self, sha256: str,
                 addresses: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] | None,
                 problem: str | None = None) -> None:
        self.sha256 = sha256
        #: Its IP SANs; None when it has none (SA certificates may carry none: no check then).
        self.addresses = addresses
        self.problem = problem  # an unreadable subjectAltName
        self._checked: dict[str, str | None] = {}  # host -> ip_problem(host)

    def ip_problem(self, host: str) -> str | None:
        """Check an IP SAN only when the leaf has one (SA certificates may carry none)."""
        if self.problem is not None or self.addresses is None:
            return self.problem
        try:
            return self._checked[host]
        except KeyError:
            pass
        problem = None
        if ipaddress.ip_address(host) not in self.addresses:
            listed = ", ".join(sorted(str(a) for a in self.addresses))
            problem = f"SA certificate IP SAN mismatch: {host} not in [{listed}]"
        if len(self._checked) < 16:  # an SA's address rarely changes
            self._checked[host] = problem
        return problem


def _leaf_facts(der: bytes) -> _LeafFacts:
    sha256 = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return _LeafFacts(sha256, None)
    except ValueError as e:
        return _LeafFacts(sha256, None, f"SA certificate has an unreadable subjectAltName: {e}")
    addresses = san.value.get_values_for_type(x509.IPAddress)
    ips = frozenset(a for a in addresses
                    if isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address))
    return _LeafFacts(sha256, ips or None)


class _BoundedCache(dict[Any, Any]):
    """A dict emptied when full: per-SA facts (pins, certificates, URLs) are reused push after
    push, and a million SAs cost at most ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: Any, value: Any) -> Any:
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


def _verify(connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
            ok: int) -> bool:
    """The context's one verify callback (set once, not per connection: pyOpenSSL builds a
    cffi callback each time); the push it belongs to is the connection's app data."""
    exchange = connection.get_app_data()
    if not isinstance(exchange, _Exchange):
        return False  # not one of ours: verify nothing, refuse everything
    return exchange.verify(cert, errno, depth, ok)


# --------------------------------------------------------------------------------------------
# One push on one connection
# --------------------------------------------------------------------------------------------


class _PushFactory(ClientFactory):
    noisy = False  # one log line per failed push, nothing per connection

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def buildProtocol(self, addr: Any) -> IProtocol:
        return self._exchange

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._exchange.connect_failed(reason)


class _Exchange(Protocol):
    """One push: connecting → handshake → sent → done, TLS included.

    The protocol drives OpenSSL over memory BIOs itself instead of stacking Twisted's
    ``TLSMemoryBIOProtocol`` under an endpoint's wrapper: one connection, one request, one
    answer needs none of their generality, and they cost more CPU per push than the rest of
    the client (bench/push.py).
    """

    def __init__(self, client: SAPushClient, host: str, port: int, request: bytes,
                 pin: bytes | None) -> None:
        self._client = client
        self._clock = client._clock
        self._host = host
        self._port = port
        self._request = request
        self._pin = pin
        self._phase = "connecting"
        self._started = 0.0
        self._connector: Any = None
        self._tls: SSL.Connection | None = None
        self._tls_closed = False  # the SA's close_notify arrived
        self._timers: list[IDelayedCall] = []
        self._received: list[bytes] = []
        self._size = 0
        self._peer_der: bytes | None = None
        self._peer_sha256 = ""
        self._failure: str | None = None  # why verification refused the SA's certificate
        self._failure_kind = "certificate_verify_failed"
        self.result: Deferred[PushAnswer] = Deferred(self._cancel)

    # -- start and deadlines ------------------------------------------------------------

    def start(self) -> Deferred[PushAnswer]:
        client = self._client
        self._started = self._clock.seconds()
        self._timers = [
            self._clock.callLater(client._connect_timeout, self._connect_expired),
            self._clock.callLater(client._answer_timeout, self._answer_expired),
        ]
        self._connector = client._reactor.connectTCP(
            self._host, self._port, _PushFactory(self), timeout=client._connect_timeout)
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

    # -- TCP ------------------------------------------------------------------------------

    def connect_failed(self, failure: Failure) -> None:
        if self._phase == "done":
            return
        if failure.check(error.ConnectionRefusedError):
            reason = "connection refused"
        elif failure.check(error.TimeoutError):
            reason = f"TCP connect timed out after {self._client._connect_timeout:g} s"
        else:
            reason = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        self._fail(PushUnreachable(reason))

    def connectionMade(self) -> None:
        if self._phase == "done":
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._phase = "handshake"
        tls = SSL.Connection(self._client._context, None)  # no SNI: the host is an IP
        tls.set_app_data(self)  # for _verify
        tls.set_connect_state()
        self._tls = tls
        self._handshake()

    def dataReceived(self, data: bytes) -> None:
        tls = self._tls
        if tls is None or self._phase == "done":
            return
        tls.bio_write(data)
        if self._phase == "handshake":
            self._handshake()
            if self._phase != "sent":
                return
        self._read()
        if self._phase == "sent":
            self._flush()  # what reading made OpenSSL say (a renegotiation, a key update)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        phase = self._phase
        if phase == "done":
            return
        if phase in ("connecting", "handshake"):
            # A bare close in the handshake: the SA rejecting our client certificate (§2.1),
            # or a listener that does not speak TLS.
            if self._failure is not None:
                self._fail(_tls_error(self._failure, self._failure_kind))
            elif self._client._client_certs:
                self._fail(_tls_error("SA closed the connection during the TLS handshake "
                                      "(client certificate?)", "closed"))
            else:
                self._fail(_tls_error("SA closed the connection during the TLS handshake",
                                      "closed"))
            return
        ended: BaseException = reason.value
        if not self._tls_closed and self._tls is not None:
            # TCP ended without the SA's close_notify: let OpenSSL read what is left, and say
            # how the TLS session ended (an alert, or a bare EOF: a lost connection).
            self._tls.bio_shutdown()
            ended = self._read(at_eof=True) or ended
        self._answered(ended)

    # -- TLS ------------------------------------------------------------------------------

    def verify(self, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        """Chain to the SA CA ignoring validity dates (libarms ignores them, §2.1), then pin.

        Devices often lack a real-time clock, so an SA certificate that is "not yet valid" or
        "expired" by our clock is accepted; every other chain error fails the handshake.
        """
        if not ok and errno not in _IGNORED_VERIFY_ERRORS:
            if self._failure is None:
                what = _VERIFY_ERRORS.get(errno, f"X509 verify error {errno}")
                self._failure = (
                    f"SA certificate chain not verified against the SA CA: {what} "
                    f"(depth {depth}, {_describe_cert(cert)})"
                )
            return False
        if depth == 0:
            presented = self._peer_der = _der(cert)
            if self._pin is not None and presented != self._pin:
                if self._failure is None:
                    self._failure_kind = "pin_mismatch"
                    self._failure = self._pin_mismatch(presented)
                return False
        return True

    def _pin_mismatch(self, presented: bytes) -> str:
        assert self._pin is not None
        return ("SA certificate pin mismatch: presented sha256 "
                f"{hashlib.sha256(presented).hexdigest()}, RS issued sha256 "
                f"{hashlib.sha256(self._pin).hexdigest()}")

    def _flush(self) -> None:
        """What OpenSSL has for the SA, in one transport write."""
        assert self._tls is not None and self.transport is not None
        pieces = []
        while True:
            try:
                pieces.append(self._tls.bio_read(_BIO_READ))
            except SSL.WantReadError:
                break
        if pieces:
            self.transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as e:
            self._flush()  # the alert telling the SA why
            if self._failure is not None:
                self._fail(_tls_error(self._failure, self._failure_kind), graceful=True)
            else:
                text = ssl_error_text(e)
                self._fail(_tls_error(f"TLS handshake failed: {text}", ssl_failure_reason(text)),
                           graceful=True)
            return
        self._handshake_completed()

    def _handshake_completed(self) -> None:
        """Last checks before the key leaves: pin (again) and IP SAN; then the request."""
        assert self._tls is not None
        der = self._peer_der
        if der is None:
            cert = self._tls.get_peer_certificate()
            if cert is None:
                self._fail(_tls_error("SA presented no certificate", "no_certificate"))
                return
            der = self._peer_der = _der(cert)
        if self._pin is not None and der != self._pin:  # belt and braces: verify() did it
            self._fail(_tls_error(self._pin_mismatch(der), "pin_mismatch"))
            return
        facts = self._client._leaf_facts(der)
        problem = facts.ip_problem(self._host)
        if problem is not None:
            self._fail(_tls_error(problem, "ip_mismatch"))
            return
        self._peer_sha256 = facts.sha256
        self._phase = "sent"
        self._tls.sendall(self._request)
        self._request = b""
        self._flush()  # one write: the SA reads one request (§2.5)

    def _read(self, *, at_eof: bool = False) -> BaseException | None:
        """Take the answer's plaintext out of OpenSSL. Returns how the TLS session ended when
        it did with an error (an alert, or at EOF a missing close_notify), else None."""
        tls = self._tls
        assert tls is not None
        while self._phase == "sent":
            try:
                data = tls.recv(_BIO_READ)
            except SSL.WantReadError:
                return None
            except SSL.ZeroReturnError:  # close_notify: the answer is complete (EOF, §2.6)
                self._tls_closed = True
                if not at_eof:
                    self._answered(error.ConnectionDone())
                return None
            except SSL.Error as e:
                ended = error.ConnectionLost() if _represents_eof(e) else e
                if not at_eof:
                    self._answered(ended)
                return ended
            self._data_received(data)
        return None

    def _data_received(self, data: bytes) -> None:
        self._size += len(data)
        limit = self._client._max_answer_bytes
        if self._size > limit:
            self._received.clear()
            self._fail(PushProtocolError(f"answer larger than {limit} bytes"))
            return
        self._received.append(data)

    def _answered(self, reason: BaseException) -> None:
        """The SA ended the session (``reason`` says how): whatever it sent is the answer.
        (An exception, not a Failure: a Failure per push costs more than this whole method.)"""
        if self._phase != "sent":
            return
        data = b"".join(self._received)
        if not data:
            if isinstance(reason, SSL.Error):
                # TLS 1.3: the SA refuses our client certificate after our side of the
                # handshake is done; still a failed handshake (§2.1).
                text = ssl_error_text(reason)
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
        if not isinstance(reason, error.ConnectionDone):
            response.framing_notes.append(
                f"connection ended by {type(reason).__name__}, not a clean close")
        self._finish()
        if self.transport is not None:
            self.transport.loseConnection()  # if the SA has not closed yet
        self.result.callback(PushAnswer(
            status=response.status,
            response=response,
            xml=response.xml,
            elapsed=self._clock.seconds() - self._started,
            peer_certificate_sha256=self._peer_sha256,
        ))

    # -- endings ------------------------------------------------------------------------

    def _finish(self) -> None:
        self._phase = "done"
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        if self._tls is not None:
            self._tls.set_app_data(None)  # no cycle left behind

    def _drop_connection(self, graceful: bool = False) -> None:
        if self.transport is not None:
            if graceful:
                self.transport.loseConnection()  # after the alert just written
            else:
                self.transport.abortConnection()  # type: ignore[attr-defined]
        elif self._connector is not None:
            with contextlib.suppress(error.NotConnectingError):
                self._connector.stopConnecting()

    def _fail(self, exc: PushError, *, graceful: bool = False) -> None:
        if self._phase == "done":
            return
        exc.request_sent = self._phase == "sent"
        self._finish()
        self._drop_connection(graceful)
        self.result.errback(exc)

    def _cancel(self, _result: Deferred[PushAnswer]) -> None:
        # The caller gave up: drop the connection; Deferred then fails with CancelledError.
        if self._phase != "done":
            self._finish()
            self._drop_connection()


def _represents_eof(e: SSL.Error) -> bool:
    """An EOF in violation of TLS (no close_notify), as Twisted's TLS layer tells it apart:
    reported as a lost connection, not as an alert from the SA."""
    if isinstance(e, SSL.SysCallError):
        text = str(e.args[1]) if len(e.args) > 1 else ""
    else:
        queue = e.args[0] if e.args else None
        if not queue:
            return True  # OpenSSL 4 reports an EOF with an empty error queue
        text = str(queue[-1][-1]) if isinstance(queue, list) else str(queue)
    return text.casefold().startswith("unexpected eof")


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
        # One context for every push (built now: material OpenSSL refuses fails here), with
        # one verify callback that finds each connection's push (and pin) itself.
        self._context = self._new_context()
        # Worked out once per SA, not per push: a pin's DER (by its PEM), a presented
        # certificate's fingerprint and IP SANs (by its DER), a push URL's host and port.
        self._pins = _BoundedCache(_CACHE_ENTRIES)
        self._leaves = _BoundedCache(_CACHE_ENTRIES)
        self._targets = _BoundedCache(_CACHE_ENTRIES)

    def _leaf_facts(self, der: bytes) -> _LeafFacts:
        facts = self._leaves.get(der)
        return facts if facts is not None else self._leaves.put(der, _leaf_facts(der))

    def _pin(self, pem: str | None) -> bytes | None:
        if pem is None:
            return None
        der = self._pins.get(pem)
        return der if der is not None else self._pins.put(pem, _pin_der(pem))

    def _target(self, url: str) -> tuple[str, int]:
        target = self._targets.get(url)
        if target is None:
            parsed = parse_sa_url(url)  # ValueError for an unusable URL: not remembered
            target = self._targets.put(url, (parsed.host, parsed.port))
        return target

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
        context.set_verify(SSL.VERIFY_PEER, _verify)
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
        host, port = self._target(url)
        request = _build_push_request(host, port, distribution_id, key, body)
        try:
            pin = self._pin(pinned_certificate_pem)
            return await _Exchange(self, host, port, request, pin).start()
        except PushError as e:
            if e.tls_failure is None:
                log.warn("push to {distid} at {url} failed: {reason}",
                         distid=distribution_id, url=url, reason=e.reason)
            elif not self.handshake_failures.record(
                    "push", host, e.tls_failure, e.reason,
                    what=f"push to {distribution_id} at {url}"):
                # Logged once per SA address and reason: a confirmation retries every 3 s.
                log.debug("push to {distid} at {url} failed: {reason}",
                          distid=distribution_id, url=url, reason=e.reason)
            raise
        except CancelledError:
            log.info("push to {distid} at {url} cancelled", distid=distribution_id, url=url)
            raise
