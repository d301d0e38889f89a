"""The RS client's HTTP/1.1: persistent connections to one RS, one POST at a time on each.

Why not Twisted's ``Agent``: it is general (any URL, any method, streaming bodies, proxies),
and every call pays for it: parsing the URL, building an endpoint, header objects, a body
producer, a line-by-line response parser and a dozen Deferreds. Measured in a pull, an RS call
through it cost ~0.5 ms of armsproxy's CPU, a third of the whole pull. An XML-RPC call needs
much less: one write (head and body, prepared once but for the length), a response read into
one buffer, framed by Content-Length or chunks (or the close), bounded in size.

Errors are left to the caller to name (armsproxy.rs_client.client): :class:`StaleConnection`
(the connection ended cleanly before a byte of the answer: what an idle pooled connection the
RS closed looks like, safe to retry once for repeatable calls), :class:`ConnectionFailed`
(TLS or other failures, or a cut answer), :class:`BadResponse` (not HTTP we take, or too big).
Connect errors (refused, DNS, connect timeout) come from the endpoint as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

__all__ = ["BadResponse", "ConnectionFailed", "ConnectionPool", "Response", "StaleConnection"]

MAX_HEAD_BYTES = 65536  # status line and headers of one response
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?\Z")
_DIGITS = re.compile(rb"[0-9]+\Z")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_HEX = re.compile(rb"[0-9A-Fa-f]+\Z")


class StaleConnection(Exception):
    """The connection ended cleanly before any byte of the answer."""

    def __init__(self, reason: Failure) -> None:
        super().__init__(f"{reason.type.__name__}: {reason.getErrorMessage()}")
        self.reason = reason


class ConnectionFailed(Exception):
    """The connection failed (TLS, reset mid-answer...); ``answered``: part of the answer came."""

    def __init__(self, reason: Failure, answered: bool) -> None:
        super().__init__(f"{reason.type.__name__}: {reason.getErrorMessage()}")
        self.reason = reason
        self.answered = answered


class BadResponse(Exception):
    """An answer that is not HTTP/1.x as framed here, or larger than allowed."""


@dataclass(frozen=True, slots=True)
class Response:
    code: int
    phrase: bytes
    body: bytes


class _Parser:
    """One HTTP/1.x response, fed as it arrives; ``done`` once it is complete."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.state = "head"  # head, length, chunk-size, chunk-data, chunk-end, trailer, close
        self.code = 0
        self.phrase = b""
        self.keep_alive = True
        self.remaining = 0  # bytes of body (length) or of the current chunk still to come
        self.body = bytearray()
        self.done = False
        self.received = False  # any byte at all

    def feed(self, data: bytes) -> None:
        self.received = True
        self.buffer += data
        while not self.done and self._step():
            pass

    def _step(self) -> bool:
        """Consume what the buffer allows in the current state; False: wait for more."""
        buf = self.buffer
        state = self.state
        if state == "head":
            blank = _BLANK_LINE.search(buf)  # CRLF lines; a bare LF is taken too, as by Twisted
            if blank is None:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadResponse(f"response header block over {MAX_HEAD_BYTES} bytes")
                return False
            head = bytes(buf[: blank.start()])
            del buf[: blank.end()]
            self._head(head)
            return True
        if state == "length":
            take = min(self.remaining, len(buf))
            self._body(buf[:take])
            del buf[:take]
            self.remaining -= take
            if not self.remaining:
                self.done = True
            return bool(take) and not self.done
        if state == "close":
            self._body(buf)
            buf.clear()
            return False
        if state in ("chunk-size", "trailer", "chunk-end"):
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadResponse("chunk framing line too long")
                return False
            line = bytes(buf[:end]).removesuffix(b"\r")
            del buf[: end + 1]
            if state == "chunk-end":
                if line:
                    raise BadResponse("chunk not followed by CRLF")
                self.state = "chunk-size"
            elif state == "trailer":
                if not line:
                    self.done = True
            else:
                size = line.split(b";", 1)[0].strip()
                if not _HEX.match(size) or len(size) > 16:
                    raise BadResponse(f"bad chunk size {size[:20]!r}")
                self.remaining = int(size, 16)
                if self.remaining > self.limit - len(self.body):
                    raise BadResponse(f"response body larger than {self.limit} bytes")
                self.state = "chunk-data" if self.remaining else "trailer"
            return True
        # chunk-data
        take = min(self.remaining, len(buf))
        if not take:
            return False
        self._body(buf[:take])
        del buf[:take]
        self.remaining -= take
        if not self.remaining:
            self.state = "chunk-end"
        return True

    def _body(self, data: bytes | bytearray) -> None:
        if len(self.body) + len(data) > self.limit:
            raise BadResponse(f"response body larger than {self.limit} bytes")
        self.body += data

    def _head(self, head: bytes) -> None:
        lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
        status = _STATUS_LINE.match(lines[0])
        if status is None:
            raise BadResponse(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
        minor, code, phrase = status.groups()
        self.code = int(code)
        self.phrase = phrase or b""
        if 100 <= self.code < 200:
            return  # an interim answer (100 Continue): the real one follows
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection: list[bytes] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadResponse(f"malformed header line {line[:60]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name == b"connection":
                connection.extend(c.strip().lower() for c in value.split(b","))
        self.keep_alive = (b"close" not in connection if minor == b"1"
                           else b"keep-alive" in connection)
        if self.code in (204, 304):
            self.done = True
        elif codings:
            if codings != [b"chunked"]:
                raise BadResponse(f"Transfer-Encoding {b', '.join(codings)[:60]!r}")
            self.state = "chunk-size"
        elif lengths:
            if len(set(lengths)) != 1 or not _DIGITS.match(lengths[0]) or len(lengths[0]) > 18:
                raise BadResponse(f"bad Content-Length {b', '.join(lengths)[:60]!r}")
            length = int(lengths[0])
            if length > self.limit:  # announced too big: not a byte of it is read
                raise BadResponse(f"response body of {length} bytes larger than {self.limit}")
            self.remaining = length
            self.state = "length"
            self.done = not length
        else:
            self.state = "close"  # the body ends with the connection
            self.keep_alive = False


class _Connection(Protocol):
    """One connection to the RS: sends a request, answers its Deferred with the response."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self._waiter: Deferred[Response] | None = None
        self._parser: _Parser | None = None
        self.lost = False
        self.on_lost: list[Deferred[None]] = []

    def send(self, request: bytes, limit: int) -> Deferred[Response]:
        self._parser = _Parser(limit)
        waiter: Deferred[Response] = Deferred(self._cancel)
        self._waiter = waiter
        _write_now(self.transport, request)
        return waiter

    def _cancel(self, _: Deferred[Response]) -> None:
        # The caller gave up (deadline, SA gone): the answer may still come, so the
        # connection cannot carry another request.
        self._waiter = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        parser, waiter = self._parser, self._waiter
        if parser is None or waiter is None:
            self.transport.abortConnection()  # bytes nobody asked for: not reusable
            return
        try:
            parser.feed(data)
        except BadResponse as e:
            self._waiter = self._parser = None
            self.transport.abortConnection()
            waiter.errback(e)
            return
        if parser.done:
            self._waiter = self._parser = None
            self.pool._release(self, parser.keep_alive and not parser.buffer)
            waiter.callback(Response(parser.code, parser.phrase, bytes(parser.body)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.pool._forget(self)
        parser, waiter = self._parser, self._waiter
        self._waiter = self._parser = None
        if waiter is not None and parser is not None:
            clean = reason.check(error.ConnectionDone, error.ConnectionLost) is not None
            if parser.state == "close" and clean:
                waiter.callback(Response(parser.code, parser.phrase, bytes(parser.body)))
            elif not parser.received and clean:
                waiter.errback(StaleConnection(reason))
            else:
                waiter.errback(ConnectionFailed(reason, parser.received))
        for d in self.on_lost:
            d.callback(None)
        self.on_lost = []


def _write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once when the transport is a plain TCP
    connection with nothing buffered: a pull's RS request then costs one ``send``, not a
    registration for writability, a reactor turn and an unregistration (two ``epoll_ctl``).
    Whatever the socket does not take now (or an error) goes the usual way, in order."""
    if (isinstance(transport, tcp.Connection) and transport.connected
            and not transport.disconnecting and not transport.producer
            and not getattr(transport, "TLS", True)
            and not getattr(transport, "_tempDataLen", 1)
            and len(getattr(transport, "dataBuffer", b"?")) <= getattr(transport, "offset", -1)):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


class _OneConnection(Factory):
    """The factory of one new connection (``connectProtocol``'s, without its "Starting
    factory" and "Stopping factory" info lines for every connection)."""

    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def buildProtocol(self, addr: object) -> _Connection:
        return self._connection


class ConnectionPool:
    """Connections to one RS: idle ones reused (the most recent first), at most ``max_idle``
    kept, each closed once unused for ``idle_timeout`` seconds (to the next sweep, which runs
    every ``idle_timeout / 2`` while any is idle: no timer set and cancelled per call); any
    number busy at once."""

    def __init__(self, reactor: IReactorTime, endpoint: IStreamClientEndpoint, *,
                 max_idle: int, idle_timeout: float) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []  # the most recently used last
        self._idle_since: dict[_Connection, float] = {}
        self._sweep: IDelayedCall | None = None

    async def request(self, request: bytes, limit: int, *, fresh: bool = False) -> Response:
        """Send ``request`` (a whole HTTP request) and return the response; on a pooled
        connection unless ``fresh``."""
        connection = None if fresh else self._take()
        if connection is None:
            connection = await self._endpoint.connect(_OneConnection(_Connection(self)))
        return await connection.send(request, limit)

    def _take(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            del self._idle_since[connection]
            if not connection.lost:
                return connection
        return None

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and len(self._idle) < self._max_idle:
            self._idle.append(connection)
            self._idle_since[connection] = self._reactor.seconds()
            if self._sweep is None:
                self._sweep = self._reactor.callLater(self._idle_timeout / 2, self._expire)
        else:
            connection.transport.loseConnection()

    def _expire(self) -> None:
        """Close the connections idle for ``idle_timeout`` or more (the oldest come first)."""
        self._sweep = None
        deadline = self._reactor.seconds() - self._idle_timeout
        while self._idle and self._idle_since[self._idle[0]] <= deadline:
            connection = self._idle.pop(0)
            del self._idle_since[connection]
            connection.transport.loseConnection()
        if self._idle:
            self._sweep = self._reactor.callLater(self._idle_timeout / 2, self._expire)

    def _forget(self, connection: _Connection) -> None:
        if connection in self._idle_since:
            self._idle.remove(connection)
            del self._idle_since[connection]
        if not self._idle and self._sweep is not None:
            if self._sweep.active():
                self._sweep.cancel()
            self._sweep = None

    def close(self) -> Deferred[Any]:
        """Close the idle connections; fires once they are closed (busy ones finish)."""
        idle, self._idle = self._idle, []
        self._idle_since.clear()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        waits = []
        for connection in idle:
            if connection.lost:
                continue
            d: Deferred[None] = Deferred()
            connection.on_lost.append(d)
            waits.append(d)
            connection.transport.loseConnection()
        if not waits:
            return succeed(None)
        return DeferredList(waits)
