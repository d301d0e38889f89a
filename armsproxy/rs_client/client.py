"""XML-RPC client for the operator's RS (design.md §4, armsproxy → RS).

Stdlib ``xmlrpc.client`` does the marshalling; Twisted's ``Agent`` on a persistent
``HTTPConnectionPool`` does the transport, so RS calls never block the reactor and reuse
connections. Every failure becomes one ``RSError`` subclass, so the SA gate can choose an
ARMS answer that makes the SA retry later (the SA gives up after 30 s, arms-protocol §2.4).
"""

from __future__ import annotations

import base64
import re
import xmlrpc.client
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import error, ssl
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from armsproxy import __version__
from armsproxy.metrics import Metrics
from armsproxy.tls import load_pem_chain, load_pem_key

__all__ = [
    "RSClient",
    "RSError",
    "RSFault",
    "RSProtocolError",
    "RSTimeout",
    "RSUnavailable",
]

_log = Logger()

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class RSError(Exception):
    """Base of every failure of an RS call; the SA gate maps it to a retry-later answer."""


class RSFault(RSError):
    """The RS answered with an XML-RPC fault."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"fault {code}: {message}")
        self.code = code
        self.message = message


class RSUnavailable(RSError):
    """The RS could not be reached: refused, DNS, TLS failure, reset, connect timeout."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RSTimeout(RSError):
    """The whole call (connect, send, answer, body) took longer than the deadline."""


class RSProtocolError(RSError):
    """The RS answered, but not with a usable XML-RPC response (status, size, syntax, shape)."""


@implementer(IPolicyForHTTPS)
class _RSTLSPolicy:
    """Verify the RS against our trust root with host name checks; optional client cert.

    One connection creator per (host, port): building it loads the trust store, which is
    too expensive to repeat for every new pooled connection.
    """

    def __init__(self, trust_root: Any, client_cert: dict[str, Any] | None) -> None:
        self._trust_root = trust_root
        self._client_cert = client_cert
        self._creators: dict[tuple[bytes, int], Any] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        key = (hostname, port)
        creator = self._creators.get(key)
        if creator is None:
            creator = ssl.optionsForClientTLS(
                hostname.decode("idna"),
                trustRoot=self._trust_root,
                extraCertificateOptions=dict(self._client_cert or {}),
            )
            self._creators[key] = creator
        return creator


@implementer(IBodyProducer)
class _BytesProducer:
    """Write the whole request body at once (FileBodyProducer would use the global cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _LimitedBodyReader(Protocol):
    """Collect a response body, aborting the connection once it passes ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []
        self.finished: Deferred[bytes] = Deferred(lambda _d: self.abort())

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks.clear()
            self.abort()
            self.finished.errback(RSProtocolError(f"response body larger than {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: HTTP/1.0 body ended by close; the XML parser catches truncation.
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def abort(self) -> None:
        """Drop the connection now (not a graceful close), so the RS cannot keep us reading."""
        transport = self.transport
        if transport is None:
            return
        # The response's transport is a TransportProxyProducer without abortConnection;
        # reach the real transport when we can, else stopProducing (stops reading, closes).
        real = getattr(transport, "_producer", None)
        abort = getattr(real, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.stopProducing()


def _reasons(exc: BaseException) -> list[Failure]:
    reasons = getattr(exc, "reasons", None)
    return list(reasons) if isinstance(reasons, list) else []


def _describe_failures(reasons: list[Failure]) -> str:
    parts = []
    for f in reasons:
        prefix = "TLS failure: " if f.check(SSL.Error) or _is_verification(f) else ""
        parts.append(f"{prefix}{f.type.__name__}: {f.getErrorMessage()}")
    return "; ".join(parts)


def _is_verification(f: Failure) -> bool:
    # service_identity raises VerificationError on a host name mismatch.
    return f.type.__name__ in ("VerificationError", "CertificateError")


def _contains_cancel(exc: BaseException) -> bool:
    if isinstance(exc, (CancelledError, error.ConnectingCancelledError)):
        return True
    return any(f.check(CancelledError, error.ConnectingCancelledError) for f in _reasons(exc))


def _is_stale_connection(exc: BaseException) -> bool:
    """Did the connection die before any answer, with no TLS or other error involved?

    That is what a pooled connection closed by the RS while idle looks like; one retry on a
    new connection is then safe for calls that may be repeated.
    """
    if isinstance(exc, RequestNotSent):
        return True
    if isinstance(exc, (ResponseNeverReceived, RequestTransmissionFailed)):
        reasons = _reasons(exc)
        return bool(reasons) and all(
            f.check(error.ConnectionDone, error.ConnectionLost) for f in reasons
        )
    return False


def _classify(exc: BaseException) -> RSError | None:
    """Map a transport-level exception to an RSError; None if we do not know it."""
    if isinstance(exc, RSError):
        return exc
    if isinstance(exc, RequestNotSent):
        return RSUnavailable("connection closed before the request was sent")
    if isinstance(exc, ResponseNeverReceived):
        return RSUnavailable(
            "no response: " + (_describe_failures(_reasons(exc)) or "connection closed")
        )
    if isinstance(exc, RequestTransmissionFailed):
        return RSUnavailable(
            "request not sent: " + (_describe_failures(_reasons(exc)) or "connection closed")
        )
    if isinstance(exc, ResponseFailed):
        return RSUnavailable(
            "response cut short: " + (_describe_failures(_reasons(exc)) or "connection closed")
        )
    if isinstance(exc, error.TimeoutError):
        return RSUnavailable(f"connect timeout: {exc}")
    if isinstance(exc, (error.ConnectError, error.ConnectionLost, error.ConnectionDone, OSError)):
        return RSUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, SSL.Error):
        return RSUnavailable(f"TLS failure: {exc}")
    return None


def _load_trust_root(ca_pem: bytes | None) -> Any:
    if ca_pem is None:
        return ssl.platformTrust()
    pems = _PEM_CERT.findall(ca_pem)
    if not pems:
        raise ValueError("ca_pem holds no PEM certificate")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])


def _load_client_certificate(pem: bytes) -> dict[str, Any]:
    """Certificate (its chain after it) and key as ``CertificateOptions`` arguments, in the
    ``cryptography`` objects pyOpenSSL takes: Twisted's ``clientCertificate=`` would hand
    pyOpenSSL its own, deprecated, X509 and PKey."""
    try:
        certificate, *chain = load_pem_chain(pem)
        key = load_pem_key(pem)
    except ValueError as e:
        raise ValueError(f"client_cert_pem: {e}") from None
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise ValueError("client_cert_pem: the private key does not match the certificate")
    return {"certificate": certificate, "privateKey": key, "extraCertChain": chain}


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class RSClient:
    """Call the RS's XML-RPC methods (design.md §4) with typed errors and a hard deadline.

    ``reactor`` must provide IReactorTCP and IReactorTime (the real reactor in production).
    ``clock`` (default: ``reactor``) runs the per-call deadline, so tests can drive it with
    ``task.Clock`` while the sockets stay real. Credentials in the URL's userinfo part are
    sent as HTTP Basic auth and never logged. ``idle_timeout`` closes pooled connections the
    RS left idle, keeping it below the RS's own keep-alive timeout avoids stale connections.
    Every call is timed into ``metrics`` (``armsproxy_rs_call_duration_seconds``).
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        ca_pem: bytes | None = None,
        client_cert_pem: bytes | None = None,
        timeout: float = 15.0,
        connect_timeout: float = 5.0,
        max_response_bytes: int = 4 * 1024 * 1024,
        max_persistent_per_host: int = 8,
        idle_timeout: float = 60.0,
        clock: IReactorTime | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("RS url must be http:// or https:// with a host")
        if timeout <= 0 or connect_timeout <= 0 or max_response_bytes <= 0:
            raise ValueError("timeouts and max_response_bytes must be positive")
        netloc = parts.netloc.rpartition("@")[2]
        path = parts.path or "/"
        query = f"?{parts.query}" if parts.query else ""
        self._url = f"{parts.scheme}://{netloc}{path}{query}".encode("ascii")
        self._headers: dict[bytes, list[bytes]] = {
            b"Content-Type": [b"text/xml"],
            b"User-Agent": [f"armsproxy/{__version__}".encode("ascii")],
        }
        if parts.username is not None:
            userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(userpass.encode("utf-8"))
            self._headers[b"Authorization"] = [b"Basic " + token]

        self._clock: IReactorTime = clock if clock is not None else reactor
        self._metrics = metrics if metrics is not None else Metrics()
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes

        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_persistent_per_host
        self._pool.cachedConnectionTimeout = idle_timeout
        self._pool.retryAutomatically = False  # POSTs are never retried by Twisted anyway

        if parts.scheme == "https":
            client_cert = (
                _load_client_certificate(client_cert_pem) if client_cert_pem is not None else None
            )
            policy: Any = _RSTLSPolicy(_load_trust_root(ca_pem), client_cert)
            self._agent = Agent(
                reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=self._pool
            )
        else:
            self._agent = Agent(reactor, connectTimeout=connect_timeout, pool=self._pool)

    def close(self) -> Deferred[None]:
        """Close the pooled idle connections (in-flight calls finish or hit their deadline)."""
        return self._pool.closeCachedConnections()

    # -- typed wrappers for design.md §4 (all safe to repeat: retried once on a stale
    # -- pooled connection) ---------------------------------------------------------------

    async def sa_key(self, distid: str) -> str | None:
        """The SA's preshared key; None when the RS does not know the device (fault 404)."""
        try:
            key = await self._call(
                "arms.sa_key", (distid,), repeatable=True, expected_faults=frozenset({404})
            )
        except RSFault as fault:
            if fault.code == 404:
                return None
            raise
        if not isinstance(key, str):
            raise self._bad_shape("arms.sa_key", "a string", key)
        return key

    async def config_solicitation(self, distid: str, info: dict[str, Any]) -> dict[str, Any]:
        return await self._struct_call("arms.config_solicitation", distid, info)

    async def push_method_query(self, distid: str, info: dict[str, Any]) -> dict[str, Any]:
        return await self._struct_call("arms.push_method_query", distid, info)

    async def push_confirmation(self, distid: str, info: dict[str, Any]) -> dict[str, Any]:
        return await self._struct_call("arms.push_confirmation", distid, info)

    async def event(self, event: dict[str, Any]) -> None:
        """Deliver one event; the RS's return value carries no meaning (design.md §4)."""
        await self._call("arms.event", (event,), repeatable=True)

    async def events(self, events: list[dict[str, Any]]) -> None:
        """Deliver several events in one call (``arms.events``), in order. A method-not-found
        fault (-32601; Twisted's 8001) is expected from an RS without it: logged at debug,
        the event outbox falls back to ``arms.event`` and says so itself."""
        await self._call(
            "arms.events", (events,), repeatable=True, expected_faults=frozenset({-32601, 8001})
        )

    async def _struct_call(self, method: str, distid: str, info: dict[str, Any]) -> dict[str, Any]:
        answer = await self._call(method, (distid, info), repeatable=True)
        if not isinstance(answer, dict):
            raise self._bad_shape(method, "a struct", answer)
        return answer

    @staticmethod
    def _bad_shape(method: str, wanted: str, got: Any) -> RSProtocolError:
        err = RSProtocolError(f"answer is {type(got).__name__}, not {wanted}")
        _log.warn("RS call {method} failed: {reason}", method=method, reason=str(err))
        return err

    # -- generic call -------------------------------------------------------------------

    async def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` once; raise an RSError subclass on any failure (logged once)."""
        return await self._call(method, params, repeatable=False)

    async def _call(
        self,
        method: str,
        params: tuple[Any, ...],
        *,
        repeatable: bool,
        expected_faults: frozenset[int] = frozenset(),
    ) -> Any:
        try:
            body = xmlrpc.client.dumps(params, method, allow_none=False).encode("utf-8")
        except (TypeError, ValueError, OverflowError) as e:
            err = RSProtocolError(f"cannot marshal request: {e}")
            _log.warn("RS call {method} failed: {reason}", method=method, reason=str(err))
            raise err from e

        timed_out = False
        exchange = Deferred.fromCoroutine(self._exchange(body, repeatable))

        def on_deadline() -> None:
            nonlocal timed_out
            timed_out = True
            exchange.cancel()

        timer = self._clock.callLater(self._timeout, on_deadline)
        started = self._clock.seconds()
        try:
            answer = await exchange
        except Exception as e:
            if timed_out:
                err: RSError = RSTimeout(f"no complete answer within {self._timeout:g} s")
            elif _contains_cancel(e):
                _log.info("RS call {method} cancelled by the caller", method=method)
                raise CancelledError() from e
            else:
                classified = _classify(e)
                if classified is None:
                    _log.failure(
                        "RS call {method} failed: unexpected {etype}",
                        Failure(e),
                        method=method,
                        etype=type(e).__name__,
                    )
                    raise RSUnavailable(f"unexpected {type(e).__name__}: {e}") from e
                err = classified
            self._metrics.rs_call(method, err, self._clock.seconds() - started)
            if isinstance(err, RSFault) and err.code in expected_faults:
                _log.debug("RS call {method}: {reason}", method=method, reason=str(err))
            elif isinstance(err, RSFault):
                _log.info("RS call {method} failed: {reason}", method=method, reason=str(err))
            else:
                _log.warn("RS call {method} failed: {reason}", method=method, reason=str(err))
            if err is e:
                raise
            raise err from e
        finally:
            if timer.active():
                timer.cancel()
        self._metrics.rs_call(method, None, self._clock.seconds() - started)
        return answer

    async def _exchange(self, body: bytes, repeatable: bool) -> Any:
        """POST, read the bounded body, unmarshal. Runs under the caller's deadline."""
        headers = Headers(self._headers)
        try:
            response: IResponse = await self._agent.request(
                b"POST", self._url, headers, _BytesProducer(body)
            )
        except Exception as e:
            if not (repeatable and _is_stale_connection(e)):
                raise
            _log.debug("RS connection closed under us ({exc}); retrying once", exc=repr(e))
            response = await self._agent.request(b"POST", self._url, headers, _BytesProducer(body))

        limit = self._max_response_bytes
        reader = _LimitedBodyReader(limit)
        response.deliverBody(reader)
        length = response.length
        if isinstance(length, int) and length > limit:
            # Announced too big: do not read a byte of it.
            reader.finished.addErrback(lambda _f: None)
            reader.abort()
            raise RSProtocolError(f"response body of {length} bytes larger than {limit}")
        data = await reader.finished

        if response.code != 200:
            raise RSProtocolError(f"HTTP status {response.code} {response.phrase!r}")
        return _unmarshal(data)


def _unmarshal(data: bytes) -> Any:
    try:
        params, methodname = xmlrpc.client.loads(data, use_builtin_types=True)
    except xmlrpc.client.Fault as fault:
        code = fault.faultCode if isinstance(fault.faultCode, int) else -1
        raise RSFault(code, str(fault.faultString))
    except Exception as e:  # expat, ResponseError, bad values: all malformed XML-RPC
        raise RSProtocolError(f"malformed XML-RPC response: {type(e).__name__}: {e}")
    if methodname is not None or len(params) != 1:
        raise RSProtocolError("malformed XML-RPC response: not exactly one return value")
    return params[0]
