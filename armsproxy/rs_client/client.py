"""XML-RPC client for the operator's RS (design.md §4, armsproxy → RS).

Stdlib ``xmlrpc.client`` marshals the requests; answers are read by
:mod:`armsproxy.rs_client.unmarshal` (the stdlib's result, faster); a lean HTTP/1.1 client on
persistent connections (:mod:`armsproxy.rs_client.transport`) carries them, so RS calls never
block the reactor, reuse connections and cost a pull little CPU. Every failure becomes one
``RSError`` subclass, so the SA gate can choose an ARMS answer that makes the SA retry later
(the SA gives up after 30 s, arms-protocol §2.4).
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
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from armsproxy import __version__
from armsproxy.metrics import Metrics
from armsproxy.rs_client import unmarshal
from armsproxy.rs_client.transport import (
    BadResponse,
    ConnectionFailed,
    ConnectionPool,
    StaleConnection,
)
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


def _describe(reason: Failure) -> str:
    prefix = "TLS failure: " if reason.check(SSL.Error) or _is_verification(reason) else ""
    return f"{prefix}{reason.type.__name__}: {reason.getErrorMessage()}"


def _is_verification(f: Failure) -> bool:
    # service_identity raises VerificationError on a host name mismatch.
    return f.type.__name__ in ("VerificationError", "CertificateError")


def _contains_cancel(exc: BaseException) -> bool:
    return isinstance(exc, (CancelledError, error.ConnectingCancelledError))


def _classify(exc: BaseException) -> RSError | None:
    """Map a transport-level exception to an RSError; None if we do not know it."""
    if isinstance(exc, RSError):
        return exc
    if isinstance(exc, StaleConnection):
        return RSUnavailable(f"no response: {_describe(exc.reason)}")
    if isinstance(exc, ConnectionFailed):
        where = "response cut short" if exc.answered else "no response"
        return RSUnavailable(f"{where}: {_describe(exc.reason)}")
    if isinstance(exc, BadResponse):
        return RSProtocolError(str(exc))
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
    ``max_persistent_per_host`` idle connections are kept: more than the pulls in flight at
    once, or each pull past it costs a new connection (a TCP, maybe TLS, handshake with the RS).
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
        max_persistent_per_host: int = 64,
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
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Every request is this head, its Content-Length and the body: one write.
        head = [f"POST {target} HTTP/1.1".encode("ascii"), b"Host: " + netloc.encode("ascii"),
                b"Content-Type: text/xml", f"User-Agent: armsproxy/{__version__}".encode("ascii")]
        if parts.username is not None:
            userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            head.append(b"Authorization: Basic " + base64.b64encode(userpass.encode("utf-8")))
        self._head = b"\r\n".join(head) + b"\r\nContent-Length: "

        self._clock: IReactorTime = clock if clock is not None else reactor
        self._metrics = metrics if metrics is not None else Metrics()
        self._ok_series: dict[str, Any] = {}
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes

        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise ValueError(f"RS url: {e}") from None
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port,
                                                           timeout=connect_timeout)
        if parts.scheme == "https":
            client_cert = (
                _load_client_certificate(client_cert_pem) if client_cert_pem is not None else None
            )
            policy = _RSTLSPolicy(_load_trust_root(ca_pem), client_cert)
            endpoint = wrapClientTLS(policy.creatorForNetloc(host.encode("idna"), port),
                                     endpoint)
        self._pool = ConnectionPool(reactor, endpoint, max_idle=max_persistent_per_host,
                                    idle_timeout=idle_timeout)

    @property
    def call_timeout(self) -> float:
        """Every call ends within this many seconds, answered or failed (RSTimeout)."""
        return self._timeout

    def close(self) -> Deferred[Any]:
        """Close the pooled idle connections (in-flight calls finish or hit their deadline)."""
        return self._pool.close()

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
            body = _dumps(params, method)
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
                # The SA left (or its budget ran out): counted (outcome "cancelled"), and
                # logged at debug, as the gate logs and counts the reason itself.
                self._metrics.rs_call(method, CancelledError(), self._clock.seconds() - started)
                _log.debug("RS call {method} cancelled by the caller", method=method)
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
        self._answered(method, self._clock.seconds() - started)
        return answer

    def _answered(self, method: str, seconds: float) -> None:
        """``Metrics.rs_call(method, None, seconds)``, with the histogram's series for each
        method looked up once (``labels()`` takes a lock and checks its arguments; this is
        every pull)."""
        series = self._ok_series.get(method)
        if series is None:
            series = self._ok_series[method] = self._metrics.rs_call_duration.labels(method, "ok")
        series.observe(max(seconds, 0.0))

    async def _exchange(self, body: bytes, repeatable: bool) -> Any:
        """POST, read the bounded body, unmarshal. Runs under the caller's deadline."""
        request = b"%s%d\r\n\r\n%s" % (self._head, len(body), body)
        limit = self._max_response_bytes
        try:
            response = await self._pool.request(request, limit)
        except StaleConnection as e:
            if not repeatable:
                raise
            # An idle pooled connection the RS closed: once more, on a new connection.
            _log.debug("RS connection closed under us ({exc}); retrying once", exc=str(e))
            response = await self._pool.request(request, limit, fresh=True)
        if response.code != 200:
            raise RSProtocolError(f"HTTP status {response.code} {response.phrase!r}")
        return _unmarshal(response.body)


def _escape(text: str) -> str:
    """``xmlrpc.client.escape``: &, < and > (most strings have none)."""
    if "&" in text or "<" in text or ">" in text:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def _dumps(params: tuple[Any, ...], method: str) -> bytes:
    """``xmlrpc.client.dumps(params, method, allow_none=False).encode("utf-8")``, the very
    same bytes (tests/test_rs_client.py compares them). Every pull's call is a distid and a
    struct of strings: those shapes are written here in a few string operations, not the
    Marshaller's dozens of calls; anything else goes to the stdlib."""
    text = _strings_call(params, method)
    if text is None:
        text = xmlrpc.client.dumps(params, method, allow_none=False)
    return text.encode("utf-8")


def _strings_call(params: tuple[Any, ...], method: str) -> str | None:
    """The methodCall of strings and structs of strings as xmlrpc.client writes it; None for
    any other shape."""
    if type(params) is not tuple or type(method) is not str or not method:
        return None
    out = ["<?xml version='1.0'?>\n<methodCall>\n<methodName>", method,
           "</methodName>\n<params>\n"]
    for param in params:
        kind = type(param)
        if kind is str:
            out.append(f"<param>\n<value><string>{_escape(param)}</string></value>\n</param>\n")
        elif kind is dict:
            out.append("<param>\n<value><struct>\n")
            for key, value in param.items():
                if type(key) is not str or type(value) is not str:
                    return None
                out.append(f"<member>\n<name>{_escape(key)}</name>\n<value><string>"
                           f"{_escape(value)}</string></value>\n</member>\n")
            out.append("</struct></value>\n</param>\n")
        else:
            return None
    out.append("</params>\n</methodCall>\n")
    return "".join(out)


def _unmarshal(data: bytes) -> Any:
    try:
        params, methodname = unmarshal.loads(data)  # xmlrpc.client.loads, in a quarter the time
    except xmlrpc.client.Fault as fault:
        code = fault.faultCode if isinstance(fault.faultCode, int) else -1
        raise RSFault(code, str(fault.faultString))
    except Exception as e:  # expat, ResponseError, bad values: all malformed XML-RPC
        raise RSProtocolError(f"malformed XML-RPC response: {type(e).__name__}: {e}")
    if methodname is not None or len(params) != 1:
        raise RSProtocolError("malformed XML-RPC response: not exactly one return value")
    return params[0]
