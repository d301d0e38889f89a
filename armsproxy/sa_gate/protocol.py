"""The SA gate's HTTP/1.x server protocol.

Not twisted.web: devices need the whole answer (status line, headers, body) in one transport
write with Content-Length and then a close (§1 rule 5), and the https-tunnel (§9) is a POST
whose body never ends, served on the same port. A small protocol that reads one request,
enforces size and time limits while reading, and writes one answer does both plainly.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as Interface

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure

from ..arms.framing import ChunkDecoder, FramingError, build_http_error

MAX_HEAD_BYTES = 8192
MAX_HEADER_LINE = 4096

_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2 token
_DIGITS = re.compile(r"[0-9]+\Z")
_UNSAFE_IN_FIELD = re.compile(r"[\r\n\x00]")  # a bare CR or LF, or a NUL (RFC 9110 §5.5)


@dataclass(slots=True)
class GateRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: str  # "ip:port" as seen on the socket
    client_certificate: bytes | None = None  # DER of the SA's certificate, if it sent one
    received_at: float = 0.0

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


Handler = Callable[[GateRequest], Awaitable[bytes]]


class TunnelConnection(Interface):
    """What the gate hands a tunnel connection to (armsproxy.tunnel.TunnelSession).

    One that also has ``dataReceived`` and ``connectionLost`` (the same two, by Twisted's
    names) becomes the TLS layer's protocol itself (:meth:`SAGateProtocol._hand_over`).
    """

    async def open(self) -> bool: ...

    def data_received(self, data: bytes) -> None: ...

    def connection_lost(self, reason: Failure | None = None) -> None: ...


def _tunnel_open_failed(failure: Failure) -> None:
    # A function of its own: a lambda would keep the gate's protocol alive (see _hand_over).
    SAGateProtocol.log.failure("SA gate: tunnel open failed", failure)


TunnelOpener = Callable[[Any, list[tuple[str, str]], str, str], TunnelConnection]


@dataclass(slots=True)
class GateLimits:
    max_body: int = 1024 * 1024
    request_timeout: float = 20.0  # whole request must arrive within this (slow clients)
    answer_timeout: float = 25.0  # hard stop for the handler (the SA gives up at 30 s)
    # After the answer: how long a peer may keep the connection (TLS close_notify unanswered,
    # handshake never finished) before it is aborted.
    close_grace: float = 10.0
    paths: frozenset[str] = field(default_factory=frozenset)  # empty: any path
    tunnel_paths: frozenset[str] = field(default_factory=frozenset)  # https-tunnel URLs' paths
    tunnels_only: bool = False  # a listener of the tunnels' own: any other request is a 404


class NoAnswer(Exception):
    """The handler decided the SA must get no answer at all (the connection is dropped).

    For a done-request that could not be committed: any answer would end (or, for a
    configure, roll back) the SA's transaction, while silence keeps it (design.md §5).
    """


class RequestRejected(Exception):
    def __init__(
        self, status: int, reason: str, extra_headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.extra_headers = extra_headers


def body_length(headers: list[tuple[str, str]]) -> int | None:
    """How the request body is framed: its Content-Length, or None for chunked (RFC 9112 §6.3).

    Devices send either one ``Content-Length`` (HTTP/1.0) or ``Transfer-Encoding: chunked``
    (HTTP/1.1), never both and never a header twice (§2.3). Anything else is refused rather
    than guessed at, since a front end that guessed otherwise would see another body: both
    headers, a coding other than exactly ``chunked`` (``xchunked``, ``gzip, chunked``,
    ``chunked`` twice), a length that is not plain digits (a sign, spaces, a list), and two
    ``Content-Length`` headers, even with the same value (RFC 9110 §8.6 allows folding them;
    no device needs it).
    """
    lengths = [value for name, value in headers if name.lower() == "content-length"]
    codings = [value for name, value in headers if name.lower() == "transfer-encoding"]
    if lengths and codings:
        raise RequestRejected(400, "both Content-Length and Transfer-Encoding")
    if codings:
        if len(codings) > 1 or codings[0].lower() != "chunked":
            raise RequestRejected(
                400, f"Transfer-Encoding {', '.join(codings)[:80]!r}: only 'chunked' is accepted"
            )
        return None
    if not lengths:
        raise RequestRejected(411, "POST without Content-Length or chunked body")
    if len(lengths) > 1:
        raise RequestRejected(400, f"{len(lengths)} Content-Length headers")
    if not _DIGITS.match(lengths[0]):
        raise RequestRejected(400, f"malformed Content-Length {lengths[0][:40]!r}")
    return int(lengths[0])  # at most MAX_HEADER_LINE digits: within int()'s 4300


class SAGateProtocol(Protocol):
    """One SA connection: a pull, or the head of an https-tunnel it then hands over.

    Slotted (``transport`` and ``connected`` too, which Twisted sets): a tunnel keeps this
    object for its whole life, and thousands are idle at once, so no ``__dict__``.
    """

    __slots__ = (
        "_answered",
        "_body",
        "_buffer",
        "_chunks",
        "_content_length",
        "_deadline",
        "_handling",
        "_head",
        "_lost",
        "_peer",
        "_reaper",
        "_tunnel",
        "connected",
        "factory",
        "transport",
    )

    log = Logger()

    def __init__(self, factory: SAGateFactory) -> None:
        self.factory = factory
        self.transport: Any = None
        self.connected = 0
        #: Request head, then body; both None once a tunnel has the connection.
        self._buffer: bytearray | None = bytearray()
        self._head: tuple[str, str, str, list[tuple[str, str]]] | None = None
        self._content_length: int | None = None
        self._chunks: ChunkDecoder | None = None
        self._body: bytearray | None = bytearray()
        self._deadline: IDelayedCall | None = None
        self._reaper: IDelayedCall | None = None
        self._answered = False
        self._lost = False
        self._handling: defer.Deferred[bytes] | None = None
        self._peer = ""
        self._tunnel: TunnelConnection | None = None

    # -- connection life ------------------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self._deadline = self.factory.clock.callLater(
            self.factory.limits.request_timeout, self._deadline_passed
        )

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # Our own flag: a wrapped (TLS) transport need not offer a usable ``connected``.
        self._lost = True
        self._cancel_deadline()
        if self._tunnel is not None:
            self._tunnel.connection_lost(reason)
        if self._reaper is not None and self._reaper.active():
            self._reaper.cancel()
        self._reaper = None
        if self._handling is not None and not self._answered:
            # Per request, and the device's doing: counted, logged at debug only.
            self.factory.count("answer.peer_closed")
            self.log.debug("SA {peer} closed the connection before its answer", peer=self._peer)
            self._handling.cancel()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        """The connection's one timer: the whole request within ``request_timeout``, then
        (the same timer, moved) the handler's answer within ``answer_timeout``."""
        self._deadline = None
        if self._handling is None:
            self._request_too_slow()
        elif not self._answered:
            # As Deferred.addTimeout would: the handler is cancelled, and _handler_failed
            # answers 503 (a timeout and a cancellation are one case there).
            self._handling.cancel()

    def _arm_answer_deadline(self) -> None:
        """Move the request's deadline to the answer's: later, as it nearly always is, that
        is an attribute set (a timer moved sooner would cost a search of the reactor's heap);
        else a new timer. Either way, one timer where there were two and a Deferred's."""
        limits = self.factory.limits
        clock = self.factory.clock
        timer = self._deadline
        if timer is not None and timer.active():
            if timer.getTime() <= clock.seconds() + limits.answer_timeout:
                timer.reset(limits.answer_timeout)
                return
            timer.cancel()
        self._deadline = clock.callLater(limits.answer_timeout, self._deadline_passed)

    def _request_too_slow(self) -> None:
        self.factory.count("rejected.slow_request")
        self.log.warn(
            "SA gate: request from {peer} not complete within {t} s; dropped",
            peer=self._peer, t=self.factory.limits.request_timeout,
        )
        self._write_once(build_http_error(408))

    # -- reading --------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.data_received(data)
            return
        if self._answered or self._handling is not None:
            return  # one request per connection; ignore anything after it
        try:
            self._consume(data)
        except RequestRejected as e:
            self._reject(e)
        except FramingError as e:
            self._reject(RequestRejected(400, f"bad HTTP framing: {e}"))

    def _consume(self, data: bytes) -> None:
        if self._head is None:
            buffer = self._buffer
            assert buffer is not None  # None only once a tunnel has the connection
            buffer += data
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise RequestRejected(431, "request header block too large")
                return
            head = bytes(buffer[:end])
            rest = bytes(buffer[end + 4 :])
            buffer.clear()
            self._start(head)
            if self._tunnel is not None:
                if rest:
                    self._tunnel.data_received(rest)
                return
            data = rest
        self._feed_body(data)

    def _start(self, head: bytes) -> None:
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            raise RequestRejected(400, "non-ASCII bytes in the request header") from None
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise RequestRejected(400, f"malformed request line {lines[0][:80]!r}")
        method, target, version = parts
        if _UNSAFE_IN_FIELD.search(lines[0]):
            raise RequestRejected(400, "bare CR or LF, or NUL, in the request line")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if len(line) > MAX_HEADER_LINE or ":" not in line:
                raise RequestRejected(400, "malformed or oversized header line")
            name, value = line.split(":", 1)
            # RFC 9112 §5.1/§5.2: no space before the colon, no folded lines; a proxy that
            # read "Content-Length :" or a bare LF differently would see another body.
            if not _FIELD_NAME.match(name):
                raise RequestRejected(400, f"malformed header name {name[:40]!r}")
            if _UNSAFE_IN_FIELD.search(value):
                raise RequestRejected(400, f"bare CR or LF, or NUL, in header {name[:40]!r}")
            headers.append((name, value.strip()))
        self._head = (method, target, version, headers)
        limits = self.factory.limits
        path = target.split("?", 1)[0]
        if path in limits.tunnel_paths and self.factory.tunnel_opener is not None:
            self._open_tunnel(method, path, headers)
            return
        if limits.tunnels_only or (limits.paths and path not in limits.paths):
            raise RequestRejected(404, f"unknown path {path[:80]!r}")
        if method != "POST":
            raise RequestRejected(405, f"method {method[:16]!r} not allowed", (("Allow", "POST"),))
        length = body_length(headers)
        if length is None:
            self._chunks = ChunkDecoder(max_chunk_size=limits.max_body)
        elif length > limits.max_body:
            # Refused from the header alone: the body is never read.
            raise RequestRejected(413, f"body of {length} bytes over the {limits.max_body} limit")
        else:
            self._content_length = length

    def _open_tunnel(self, method: str, path: str, headers: list[tuple[str, str]]) -> None:
        """Hand the connection to the https-tunnel: its body never ends (§9.1)."""
        if method != "POST":
            raise RequestRejected(400, "a tunnel is opened with a chunked POST")
        try:
            chunked = body_length(headers) is None
        except RequestRejected as e:  # a 411 or 413 here is as much a bad tunnel open
            raise RequestRejected(400, f"tunnel open: {e.reason}") from None
        if not chunked:
            raise RequestRejected(400, "a tunnel is opened with a chunked POST")
        assert self.factory.tunnel_opener is not None
        self._cancel_deadline()  # the session keeps its own timers from here on
        # The tunnel may live for months: keep neither the header block (its Authorization
        # carries the SA's key) nor the request buffers.
        self._head = None
        self._buffer = self._body = None
        tunnel = self._tunnel = self.factory.tunnel_opener(self.transport, headers, self._peer,
                                                           path)
        self.factory.count("tunnel.opened")
        self._hand_over(tunnel)
        d = defer.ensureDeferred(tunnel.open())
        d.addErrback(_tunnel_open_failed)

    def _hand_over(self, tunnel: TunnelConnection) -> None:
        """Make ``tunnel`` the protocol of the TLS layer below, if it can be one.

        Thousands of tunnels stay open for months; once the TLS layer calls the tunnel
        straight, nothing refers to this object any more and its ~0.2 KiB go. Other
        transports (a test's) keep it, forwarding to the tunnel.
        """
        transport = self.transport
        if (isinstance(transport, ProtocolWrapper) and transport.wrappedProtocol is self
                and callable(getattr(tunnel, "dataReceived", None))
                and callable(getattr(tunnel, "connectionLost", None))):
            transport.wrappedProtocol = tunnel

    def _feed_body(self, data: bytes) -> None:
        limits = self.factory.limits
        body = self._body
        assert body is not None  # None only once a tunnel has the connection
        if self._chunks is not None:
            try:
                chunks = self._chunks.feed(data)
            except FramingError as e:
                # A chunk declared bigger than the whole body may be: too large, not malformed.
                # (framing.py has no dedicated exception for it; its message is matched.)
                if "exceeds the limit" in str(e) and str(e).startswith("chunk size"):
                    raise RequestRejected(
                        413, f"chunked body over the {limits.max_body} limit: {e}"
                    ) from None
                raise
            for chunk in chunks:
                if chunk.end_of_stream:
                    self._dispatch()
                    return
                body += chunk.data
                if len(body) > limits.max_body:
                    raise RequestRejected(413, f"chunked body over the {limits.max_body} limit")
            return
        assert self._content_length is not None
        body += data
        if len(body) >= self._content_length:
            del body[self._content_length :]
            self._dispatch()

    # -- answering ------------------------------------------------------------------------
    def _dispatch(self) -> None:
        assert self._head is not None
        method, target, version, headers = self._head
        assert self._body is not None
        request = GateRequest(
            method=method, target=target, version=version, headers=headers,
            body=bytes(self._body), peer=self._peer,
            client_certificate=self._peer_certificate(),
            received_at=self.factory.clock.seconds(),
        )
        self._body.clear()
        self._arm_answer_deadline()  # before the handler, which may answer at once
        d = defer.ensureDeferred(self.factory.handler(request))
        self._handling = d
        d.addCallbacks(self._write_once, self._handler_failed)

    def _handler_failed(self, failure: Failure) -> None:
        if failure.check(NoAnswer):
            self.factory.count("answer.withheld")
            self._answered = True
            self._cancel_deadline()
            self.transport.abortConnection()
            return
        if failure.check(defer.CancelledError, defer.TimeoutError):
            if not self._answered and not self._lost:
                self.log.error("SA gate: no answer within the hard limit for {peer}",
                               peer=self._peer)
                self.factory.count("answer.timeout")
                self._write_once(build_http_error(503))
            return
        self.factory.count("answer.internal_error")
        self.log.failure("SA gate: handler failed for {peer}", failure, peer=self._peer)
        self._write_once(build_http_error(500))

    def _reject(self, e: RequestRejected) -> None:
        self.factory.count(f"rejected.http_{e.status}")
        self.log.warn("SA gate: {status} to {peer}: {reason}",
                      status=e.status, peer=self._peer, reason=e.reason)
        self._write_once(build_http_error(e.status, extra_headers=e.extra_headers))

    def _write_once(self, response: bytes) -> None:
        """The whole answer in one transport write, then close (§1 rule 5)."""
        if self._answered:
            return
        self._answered = True
        self._cancel_deadline()
        if self._lost:
            return
        self.transport.write(response)
        self.transport.loseConnection()
        # A TLS close waits for the peer's close_notify (or, mid-handshake, for the handshake
        # to finish); a peer that never sends either must not hold the connection forever.
        self._reaper = self.factory.clock.callLater(
            self.factory.limits.close_grace, self._abort_after_answer
        )

    def _abort_after_answer(self) -> None:
        self._reaper = None
        if not self._lost:
            self.factory.count("answer.close_aborted")
            self.log.debug("SA gate: {peer} did not close after its answer; aborting",
                           peer=self._peer)
            self.transport.abortConnection()

    def _peer_certificate(self) -> bytes | None:
        getter = getattr(self.transport, "getPeerCertificate", None)
        if getter is None:
            return None
        try:
            cert = getter()
        except Exception:
            return None
        if cert is None:
            return None
        from OpenSSL import crypto

        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


class SAGateFactory(Factory):
    def __init__(
        self,
        handler: Handler,
        *,
        clock: IReactorTime,
        limits: GateLimits | None = None,
        counter: Callable[[str], None] | None = None,
        tunnel_opener: TunnelOpener | None = None,
    ) -> None:
        self.handler = handler
        self.tunnel_opener = tunnel_opener
        self.clock = clock
        self.limits = limits or GateLimits()
        self._counter = counter

    def count(self, name: str) -> None:
        if self._counter is not None:
            self._counter(name)

    def buildProtocol(self, addr: object) -> SAGateProtocol:
        return SAGateProtocol(self)
