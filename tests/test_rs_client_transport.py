"""The RS client's own HTTP/1.1 (armsproxy.rs_client.transport), without sockets.

Response framing (Content-Length, chunks, the close, interim 1xx), size limits, which
connections are reused, the idle sweep, and how a lost connection is told apart (stale:
nothing came, safe to retry; failed: an error or a cut answer). test_rs_client.py runs the
same code against a real twisted.web XML-RPC server, over TCP and TLS.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from armsproxy.metrics import Metrics
from armsproxy.rs_client import RSClient
from armsproxy.rs_client.transport import (
    BadResponse,
    ConnectionFailed,
    ConnectionPool,
    Response,
    StaleConnection,
    _Parser,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def parse(*pieces: bytes, limit: int = 1000) -> _Parser:
    parser = _Parser(limit)
    for piece in pieces:
        parser.feed(piece)
    return parser


@pytest.mark.parametrize("pieces", [
    [OK],
    [OK[:3], OK[3:20], OK[20:]],
    [bytes([b]) for b in OK],  # one byte at a time
])
def test_content_length(pieces):
    parser = parse(*pieces)
    assert parser.done and parser.code == 200 and parser.phrase == b"OK"
    assert bytes(parser.body) == b"hello" and parser.keep_alive and not parser.buffer


def test_chunks_with_extensions_and_trailer():
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n")
    for pieces in ([raw], [bytes([b]) for b in raw]):
        parser = parse(*pieces)
        assert parser.done and bytes(parser.body) == b"hello world" and not parser.buffer


def test_bare_line_feeds_are_taken():
    raw = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n5\nhello\n0\n\n"
    parser = parse(raw)
    assert parser.done and bytes(parser.body) == b"hello"


def test_interim_answers_are_skipped():
    parser = parse(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert parser.done and parser.code == 200 and bytes(parser.body) == b"hello"


@pytest.mark.parametrize("head,keep_alive", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0", False),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0", True),
])
def test_which_answers_keep_the_connection(head, keep_alive):
    parser = parse(head + b"\r\n\r\n")
    assert parser.done and parser.keep_alive is keep_alive


def test_a_body_without_length_ends_with_the_connection():
    parser = parse(b"HTTP/1.0 200 OK\r\n\r\nsome", b" body")
    assert not parser.done and parser.state == "close" and not parser.keep_alive
    assert bytes(parser.body) == b"some body"


@pytest.mark.parametrize("raw,message", [
    (b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n", "of 1001 bytes larger than 1000"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3E9\r\n", "larger than 1000"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", "CRLF"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 1001, "larger than 1000 bytes"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "header block over"),
])
def test_answers_refused(raw, message):
    with pytest.raises(BadResponse, match=message):
        parse(raw)


# ---------------------------------------------------------------------------------------------
# The pool, over fake connections
# ---------------------------------------------------------------------------------------------


class Endpoint:
    """Connects at once to a StringTransport; remembers every connection made."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, StringTransport]] = []
        self.refuse = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refuse:
            return defer.fail(error.ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.made.append((protocol, transport))
        return defer.succeed(protocol)


def lose(protocol: Any, why: type[Exception] = error.ConnectionDone) -> None:
    protocol.connectionLost(Failure(why()))


def make_pool(max_idle: int = 2) -> tuple[ConnectionPool, Endpoint, task.Clock]:
    clock = task.Clock()
    endpoint = Endpoint()
    return ConnectionPool(clock, endpoint, max_idle=max_idle, idle_timeout=60.0), endpoint, clock


@pytest_twisted.ensureDeferred
async def test_a_connection_is_reused_and_swept_when_idle():
    pool, endpoint, clock = make_pool()
    d = defer.ensureDeferred(pool.request(b"REQ1", 1000))
    protocol, transport = endpoint.made[0]
    assert transport.value() == b"REQ1"
    protocol.dataReceived(OK)
    assert await d == Response(200, b"OK", b"hello")
    d = defer.ensureDeferred(pool.request(b"REQ2", 1000))
    assert len(endpoint.made) == 1 and transport.value() == b"REQ1REQ2"
    protocol.dataReceived(OK)
    await d
    clock.advance(30)
    assert not transport.disconnecting  # idle 30 s: kept
    clock.advance(30)
    assert transport.disconnecting  # idle 60 s: closed by the sweep
    lose(protocol)
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_fresh_asks_for_a_new_connection_and_max_idle_holds():
    pool, endpoint, _ = make_pool(max_idle=1)
    first = defer.ensureDeferred(pool.request(b"A", 1000))
    second = defer.ensureDeferred(pool.request(b"B", 1000, fresh=True))
    assert len(endpoint.made) == 2
    for protocol, _ in endpoint.made:
        protocol.dataReceived(OK)
    await first
    await second
    kept = [t for _, t in endpoint.made if not t.disconnecting]
    assert len(kept) == 1  # one idle connection at most


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    OK + b"HTTP/1.1 200 OK",  # bytes beyond the answer: nothing else may follow
])
@pytest_twisted.ensureDeferred
async def test_connections_that_cannot_be_reused_are_closed(answer):
    pool, endpoint, _ = make_pool()
    d = defer.ensureDeferred(pool.request(b"A", 1000))
    protocol, transport = endpoint.made[0]
    protocol.dataReceived(answer)
    assert (await d).body == b"hello"
    assert transport.disconnecting
    defer.ensureDeferred(pool.request(b"B", 1000))
    assert len(endpoint.made) == 2


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_before_a_byte_is_stale_after_one_is_failed():
    pool, endpoint, _ = make_pool()
    d = defer.ensureDeferred(pool.request(b"A", 1000))
    lose(endpoint.made[0][0], error.ConnectionLost)
    with pytest.raises(StaleConnection):
        await d
    d = defer.ensureDeferred(pool.request(b"B", 1000))
    protocol = endpoint.made[1][0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhal")
    lose(protocol)
    with pytest.raises(ConnectionFailed) as failed:
        await d
    assert failed.value.answered
    d = defer.ensureDeferred(pool.request(b"C", 1000))
    lose(endpoint.made[2][0], ValueError)  # not a clean close (a TLS error, say)
    with pytest.raises(ConnectionFailed) as failed:
        await d
    assert not failed.value.answered


@pytest_twisted.ensureDeferred
async def test_a_body_ended_by_the_close_is_an_answer():
    pool, endpoint, _ = make_pool()
    d = defer.ensureDeferred(pool.request(b"A", 1000))
    protocol, _ = endpoint.made[0]
    protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nuntil the ")
    protocol.dataReceived(b"end")
    lose(protocol)
    assert (await d).body == b"until the end"


@pytest_twisted.ensureDeferred
async def test_a_bad_answer_or_a_cancel_aborts_the_connection():
    pool, endpoint, _ = make_pool()
    d = defer.ensureDeferred(pool.request(b"A", 1000))
    protocol, transport = endpoint.made[0]
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    with pytest.raises(BadResponse):
        await d
    assert transport.disconnected  # aborted: not a byte of the body is read
    d = defer.ensureDeferred(pool.request(b"B", 1000))
    _, transport = endpoint.made[1]
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert transport.disconnected


@pytest_twisted.ensureDeferred
async def test_close_closes_the_idle_connections_and_waits():
    pool, endpoint, _ = make_pool()
    d = defer.ensureDeferred(pool.request(b"A", 1000))
    protocol, transport = endpoint.made[0]
    protocol.dataReceived(OK)
    await d
    closed = pool.close()
    assert transport.disconnecting and not closed.called
    lose(protocol)
    assert closed.called


@pytest_twisted.ensureDeferred
async def test_a_cancelled_rs_call_is_counted_as_cancelled():
    metrics = Metrics()
    endpoint = Endpoint()
    client = RSClient(reactor, "http://127.0.0.1:1/RPC2", clock=task.Clock(), metrics=metrics)
    client._pool._endpoint = endpoint  # the sockets are not the point here
    d = defer.ensureDeferred(client.call("test.echo"))
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    body, _ = metrics.render()
    assert (b'armsproxy_rs_call_duration_seconds_count{method="test.echo",outcome="cancelled"}'
            b" 1.0") in body
