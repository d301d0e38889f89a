"""RSClient against a real XML-RPC server on loopback (plain TCP and TLS), KeyCache with a Clock."""

from __future__ import annotations

import hmac
from xmlrpc.client import dumps as xmlrpc_dumps

import pytest
import pytest_twisted
import trustme
from conftest import tls_server_options
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.web import pages, resource, server, xmlrpc

from armsproxy import __version__
from armsproxy.rs_client import (
    KeyCache,
    RSClient,
    RSError,
    RSFault,
    RSProtocolError,
    RSTimeout,
    RSUnavailable,
)

DISTID = "0001-0000-1A2B-0105-0000-0000-00C0-FFEE"
OTHER = "0001-0000-1A2B-0105-0000-0000-0000-0002"
UNKNOWN = "0001-0000-1A2B-0105-0000-0000-DEAD-BEEF"


# ---------------------------------------------------------------------------------------
# server side


class FakeRS(xmlrpc.XMLRPC):
    """The operator's RS as seen by armsproxy (design.md §4), recording what it got."""

    def __init__(self) -> None:
        super().__init__(allowNone=False, useDateTime=False)
        self.calls: list[tuple[str, tuple]] = []
        self.headers: list[dict[bytes, bytes | None]] = []
        self.abort_second_request_per_connection = False
        self._per_channel: dict[int, int] = {}
        self.methods = {
            "arms.sa_key": self.sa_key,
            "arms.config_solicitation": self.config_solicitation,
            "arms.push_method_query": self.push_method_query,
            "arms.push_confirmation": self.push_confirmation,
            "arms.event": self.event,
            "test.fault": self.fault,
            "test.echo": lambda *a: list(a),
            "test.nothing": lambda: (),
        }

    def render_POST(self, request):
        self.headers.append(
            {
                name: request.getHeader(name)
                for name in (b"content-type", b"user-agent", b"authorization")
            }
        )
        n = self._per_channel.get(id(request.channel), 0) + 1
        self._per_channel[id(request.channel)] = n
        if self.abort_second_request_per_connection and n == 2:
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        return super().render_POST(request)

    def lookupProcedure(self, procedurePath):
        try:
            method = self.methods[procedurePath]
        except KeyError:
            raise xmlrpc.NoSuchFunction(self.NOT_FOUND, f"no such method {procedurePath}")

        def recorded(*args):
            self.calls.append((procedurePath, args))
            return method(*args)

        return recorded

    def sa_key(self, distid):
        if distid == UNKNOWN:
            raise xmlrpc.Fault(404, "unknown distribution id")
        if distid == OTHER:
            return 12345  # wrong type
        return "s3cret-key"

    def config_solicitation(self, distid, info):
        if distid == OTHER:
            return ["not", "a", "struct"]
        return {
            "result_code": 100,
            "push_port": 10443,
            "sa_certificate": "-----BEGIN CERTIFICATE-----\n...",
            "md_configs": [
                {"id": 1, "content_type": "text/plain", "commit_order": 0, "data": b"\x00\xff"}
            ],
            "echo": info,
        }

    def push_method_query(self, distid, info):
        return {"result_code": 100, "methods": ["https-tunnel", "https-simple"]}

    def push_confirmation(self, distid, info):
        return {"result_code": 100, "seen": info["push_endpoint"]}

    def event(self, event):
        return True

    def fault(self, code):
        raise xmlrpc.Fault(code, "the RS says no")


class Hang(resource.Resource):
    """Accepts the request and never answers (optionally after part of the body)."""

    isLeaf = True

    def __init__(self, partial: bytes | None = None, length: int | None = None) -> None:
        super().__init__()
        self.partial = partial
        self.length = length
        self.arrived: defer.Deferred = defer.Deferred()

    def render_POST(self, request):
        if self.length is not None:
            request.setHeader(b"content-length", str(self.length).encode())
        if self.partial is not None:
            request.write(self.partial)
        if not self.arrived.called:
            self.arrived.callback(request)
        return server.NOT_DONE_YET


class Fixed(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body

    def render_POST(self, request):
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/xml")
        return self.body


class Flood(resource.Resource):
    """Streams a body (chunked, no length) far bigger than the client's limit, never ends."""

    isLeaf = True

    def render_POST(self, request):
        chunk = b"<" * 16384
        for _ in range(64):  # 1 MiB queued at once
            request.write(chunk)
        return server.NOT_DONE_YET


class CountingFactory(WrappingFactory):
    """Counts server-side TCP connections opened and lost."""

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.opened = 0
        self.lost = 0

    def registerProtocol(self, p):
        self.opened += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p):
        self.lost += 1
        super().unregisterProtocol(p)


class Slammer(protocol.Protocol):
    """Resets every connection as soon as it is accepted."""

    def connectionMade(self):
        self.transport.abortConnection()


async def until(predicate, timeout: float = 5.0) -> None:
    """Wait on the real reactor until predicate() holds (server-side effects of real sockets)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await task.deferLater(reactor, 0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


class NotFoundRoot(resource.Resource):
    """Unknown paths get ``pages.notFound()``: the default ``NoResource`` is deprecated."""

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return pages.notFound()


class Harness:
    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self.rs = FakeRS()
        self.root = NotFoundRoot()
        self.root.putChild(b"RPC2", self.rs)
        self.ports: list = []
        self.factories: list[CountingFactory] = []
        self.clients: list[RSClient] = []

    def listen(self, tls: ssl.CertificateOptions | None = None, factory=None):
        factory = CountingFactory(factory or server.Site(self.root))
        if tls is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
        self.ports.append(port)
        self.factories.append(factory)
        return port.getHost().port, factory

    def server_tls(self, identity: str = "127.0.0.1", require_client_cert: bool = False):
        pem = self.ca.issue_cert(identity).private_key_and_cert_chain_pem.bytes()
        return tls_server_options(
            pem, client_ca_pem=self.ca.cert_pem.bytes() if require_client_cert else None)

    def client(self, url: str, **kw) -> RSClient:
        c = RSClient(reactor, url, **kw)
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        for f in self.factories:
            for p in list(f.protocols):
                p.transport.abortConnection()
        for port in self.ports:
            await port.stopListening()
        await until(lambda: all(not f.protocols for f in self.factories))


@pytest_twisted.async_yield_fixture
async def h(ca):
    harness = Harness(ca)
    yield harness
    await harness.close()


@pytest.fixture
def failures():
    """Log lines of the RS client, to check each failure is logged once with its method."""
    events: list[dict] = []

    def observer(event):
        if event.get("log_namespace", "").startswith("armsproxy.rs_client"):
            events.append(event)

    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def logged_for(events, method):
    return [e for e in events if e.get("method") == method]


# ---------------------------------------------------------------------------------------
# success, over plain TCP and over TLS


async def _exercise_wrappers(client: RSClient, rs: FakeRS) -> None:
    assert await client.sa_key(DISTID) == "s3cret-key"
    conf = await client.config_solicitation(DISTID, {"trigger": "power-on", "peer": "192.0.2.9"})
    assert conf["result_code"] == 100
    assert conf["md_configs"][0]["data"] == b"\x00\xff"  # Binary arrives as bytes
    assert conf["echo"] == {"trigger": "power-on", "peer": "192.0.2.9"}
    pmq = await client.push_method_query(DISTID, {"methods": ["https-simple"], "peer": "x"})
    assert pmq["methods"] == ["https-tunnel", "https-simple"]
    conf2 = await client.push_confirmation(
        DISTID, {"method": "https-simple", "push_endpoint": "https://192.0.2.9:10443/"}
    )
    assert conf2 == {"result_code": 100, "seen": "https://192.0.2.9:10443/"}
    assert await client.event({"kind": "sa.confirmed", "distribution_id": DISTID}) is None
    assert [c[0] for c in rs.calls] == [
        "arms.sa_key",
        "arms.config_solicitation",
        "arms.push_method_query",
        "arms.push_confirmation",
        "arms.event",
    ]
    assert rs.calls[-1][1] == ({"kind": "sa.confirmed", "distribution_id": DISTID},)


@pytest_twisted.ensureDeferred
async def test_wrappers_over_plain_tcp_share_one_connection(h):
    port, factory = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    await _exercise_wrappers(client, h.rs)
    # Five sequential calls, one TCP connection: the pool keeps it.
    assert factory.opened == 1
    assert all(hd[b"content-type"] == b"text/xml" for hd in h.rs.headers)
    assert all(hd[b"user-agent"] == f"armsproxy/{__version__}".encode() for hd in h.rs.headers)
    assert all(hd[b"authorization"] is None for hd in h.rs.headers)


@pytest_twisted.ensureDeferred
async def test_wrappers_over_tls_share_one_connection(h):
    port, factory = h.listen(tls=h.server_tls())
    client = h.client(f"https://127.0.0.1:{port}/RPC2", ca_pem=h.ca.cert_pem.bytes())
    await _exercise_wrappers(client, h.rs)
    assert factory.opened == 1


@pytest_twisted.ensureDeferred
async def test_close_closes_pooled_connection(h):
    port, factory = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    assert await client.call("test.echo", 1, "a") == [1, "a"]
    assert factory.lost == 0
    await client.close()
    await until(lambda: factory.lost == 1)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_client_certificate(h):
    port, _ = h.listen(tls=h.server_tls(require_client_cert=True))
    url = f"https://127.0.0.1:{port}/RPC2"
    pem = h.ca.issue_cert("armsproxy.example").private_key_and_cert_chain_pem.bytes()
    with_cert = h.client(url, ca_pem=h.ca.cert_pem.bytes(), client_cert_pem=pem)
    assert await with_cert.sa_key(DISTID) == "s3cret-key"
    without = h.client(url, ca_pem=h.ca.cert_pem.bytes())
    with pytest.raises(RSUnavailable):
        await without.sa_key(DISTID)


@pytest_twisted.ensureDeferred
async def test_basic_auth_from_url_userinfo(h):
    port, _ = h.listen()
    client = h.client(f"http://rs%40op:p%3Ass@127.0.0.1:{port}/RPC2")
    assert await client.sa_key(DISTID) == "s3cret-key"
    assert h.rs.headers[0][b"authorization"] == b"Basic cnNAb3A6cDpzcw=="  # rs@op:p:ss


# ---------------------------------------------------------------------------------------
# faults and answers of the wrong shape


@pytest_twisted.ensureDeferred
async def test_fault_becomes_rsfault_and_is_logged_once(h, failures):
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    with pytest.raises(RSFault) as info:
        await client.call("test.fault", 42)
    assert info.value.code == 42
    assert info.value.message == "the RS says no"
    assert len(logged_for(failures, "test.fault")) == 1


@pytest_twisted.ensureDeferred
async def test_sa_key_404_means_unknown_device(h):
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    assert await client.sa_key(UNKNOWN) is None


@pytest_twisted.ensureDeferred
async def test_sa_key_other_fault_propagates(h):
    port, _ = h.listen()
    h.rs.methods["arms.sa_key"] = lambda distid: h.rs.fault(500)
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    with pytest.raises(RSFault) as info:
        await client.sa_key(DISTID)
    assert info.value.code == 500


@pytest_twisted.ensureDeferred
async def test_answers_of_the_wrong_shape(h, failures):
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    with pytest.raises(RSProtocolError):
        await client.sa_key(OTHER)
    with pytest.raises(RSProtocolError):
        await client.config_solicitation(OTHER, {})
    assert len(logged_for(failures, "arms.sa_key")) == 1
    assert len(logged_for(failures, "arms.config_solicitation")) == 1


@pytest_twisted.ensureDeferred
async def test_unmarshallable_params_are_a_typed_error(h):
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    with pytest.raises(RSProtocolError):
        await client.config_solicitation(DISTID, {"peer": None})  # allow_none=False
    assert h.rs.calls == []


# ---------------------------------------------------------------------------------------
# unreachable RS


@pytest_twisted.ensureDeferred
async def test_connection_refused(h, failures):
    port, _ = h.listen(factory=protocol.Factory.forProtocol(protocol.Protocol))
    await h.ports.pop().stopListening()  # nobody listens there any more
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    with pytest.raises(RSUnavailable) as info:
        await client.sa_key(DISTID)
    assert "refused" in info.value.reason.lower()
    assert len(logged_for(failures, "arms.sa_key")) == 1


@pytest_twisted.ensureDeferred
async def test_wrong_ca_is_unavailable(h):
    port, _ = h.listen(tls=h.server_tls())
    other_ca = trustme.CA()
    client = h.client(f"https://127.0.0.1:{port}/RPC2", ca_pem=other_ca.cert_pem.bytes())
    with pytest.raises(RSUnavailable) as info:
        await client.sa_key(DISTID)
    assert "TLS" in info.value.reason
    assert h.rs.calls == []


@pytest_twisted.ensureDeferred
async def test_wrong_host_name_is_unavailable(h):
    port, _ = h.listen(tls=h.server_tls(identity="rs.example"))
    client = h.client(f"https://127.0.0.1:{port}/RPC2", ca_pem=h.ca.cert_pem.bytes())
    with pytest.raises(RSUnavailable):
        await client.sa_key(DISTID)
    assert h.rs.calls == []


@pytest_twisted.ensureDeferred
async def test_reset_connection_is_unavailable(h, failures):
    port, factory = h.listen(factory=protocol.Factory.forProtocol(Slammer))
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    with pytest.raises(RSUnavailable):
        await client.push_confirmation(DISTID, {"method": "https-simple"})
    # Looks like a stale pooled connection: one retry on a fresh one, then give up.
    assert factory.opened == 2
    assert len(logged_for(failures, "arms.push_confirmation")) == 1


@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_is_retried_once_for_wrappers(h):
    port, factory = h.listen()
    h.rs.abort_second_request_per_connection = True
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    assert await client.sa_key(DISTID) == "s3cret-key"
    # The pooled connection dies under the second call; the retry uses a new one.
    assert await client.sa_key(DISTID) == "s3cret-key"
    assert factory.opened == 2
    assert [c[0] for c in h.rs.calls] == ["arms.sa_key", "arms.sa_key"]


@pytest_twisted.ensureDeferred
async def test_generic_call_is_not_retried(h):
    port, factory = h.listen()
    h.rs.abort_second_request_per_connection = True
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    assert await client.call("test.echo", 1) == [1]
    with pytest.raises(RSUnavailable):
        await client.call("test.echo", 2)
    assert factory.opened == 1
    assert len(h.rs.headers) == 2


# ---------------------------------------------------------------------------------------
# deadline


@pytest_twisted.ensureDeferred
async def test_server_never_answers_times_out_on_injected_clock(h, failures):
    hang = Hang()
    h.root.putChild(b"hang", hang)
    port, factory = h.listen()
    clock = task.Clock()
    client = h.client(f"http://127.0.0.1:{port}/hang", timeout=10.0, clock=clock)
    d = defer.ensureDeferred(client.sa_key(DISTID))
    await hang.arrived
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    with pytest.raises(RSTimeout):
        await d
    await until(lambda: factory.lost == 1)  # the request was cancelled, connection dropped
    assert len(logged_for(failures, "arms.sa_key")) == 1


@pytest_twisted.ensureDeferred
async def test_deadline_covers_reading_the_body(h):
    hang = Hang(partial=b"<?xml version='1.0'?><methodResponse>", length=1000)
    h.root.putChild(b"slowbody", hang)
    port, factory = h.listen()
    clock = task.Clock()
    client = h.client(f"http://127.0.0.1:{port}/slowbody", timeout=10.0, clock=clock)
    d = defer.ensureDeferred(client.call("test.echo"))
    await hang.arrived
    await task.deferLater(reactor, 0.05)  # let the headers and partial body reach us
    clock.advance(10.0)
    with pytest.raises(RSTimeout):
        await d
    await until(lambda: factory.lost == 1)


@pytest_twisted.ensureDeferred
async def test_deadline_timer_is_cancelled_after_success(h):
    port, _ = h.listen()
    clock = task.Clock()
    client = h.client(f"http://127.0.0.1:{port}/RPC2", clock=clock)
    assert await client.sa_key(DISTID) == "s3cret-key"
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_real_short_timeout_on_real_reactor(h):
    hang = Hang()
    h.root.putChild(b"hang", hang)
    port, factory = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/hang", timeout=0.3)
    with pytest.raises(RSTimeout):
        await client.event({"kind": "sa.tunnel_up"})
    assert len(h.rs.calls) == 0 and hang.arrived.called
    await until(lambda: factory.lost == 1)


@pytest_twisted.ensureDeferred
async def test_caller_cancellation_propagates(h):
    hang = Hang()
    h.root.putChild(b"hang", hang)
    port, factory = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/hang", clock=task.Clock())
    d = defer.ensureDeferred(client.call("test.echo"))
    await hang.arrived
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await until(lambda: factory.lost == 1)


# ---------------------------------------------------------------------------------------
# bad answers


@pytest_twisted.ensureDeferred
async def test_oversize_streamed_response_aborts_connection(h, failures):
    h.root.putChild(b"flood", Flood())
    port, factory = h.listen()
    client = h.client(
        f"http://127.0.0.1:{port}/flood", max_response_bytes=64 * 1024, clock=task.Clock()
    )
    with pytest.raises(RSProtocolError) as info:
        await client.sa_key(DISTID)
    assert "larger than" in str(info.value)
    # The server never ends its body; only our abort closes the connection.
    await until(lambda: factory.lost == 1)
    assert len(logged_for(failures, "arms.sa_key")) == 1


@pytest_twisted.ensureDeferred
async def test_oversize_announced_length_aborts_at_once(h):
    hang = Hang(partial=b"x" * 10, length=10 * 1024 * 1024)
    h.root.putChild(b"announced", hang)
    port, factory = h.listen()
    client = h.client(
        f"http://127.0.0.1:{port}/announced", max_response_bytes=1024, clock=task.Clock()
    )
    with pytest.raises(RSProtocolError):
        await client.call("test.echo")
    await until(lambda: factory.lost == 1)


@pytest_twisted.ensureDeferred
async def test_response_at_the_limit_is_accepted(h):
    body = xmlrpc_dumps(("y" * 200,), methodresponse=True).encode()
    h.root.putChild(b"exact", Fixed(200, body))
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/exact", max_response_bytes=len(body))
    assert await client.call("test.echo") == "y" * 200


@pytest_twisted.ensureDeferred
async def test_http_500_is_protocol_error(h, failures):
    h.root.putChild(b"err", Fixed(500, b"boom"))
    port, factory = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/err")
    with pytest.raises(RSProtocolError) as info:
        await client.push_method_query(DISTID, {"methods": []})
    assert "500" in str(info.value)
    assert len(logged_for(failures, "arms.push_method_query")) == 1
    # The body was read, so the connection stays usable.
    with pytest.raises(RSProtocolError):
        await client.push_method_query(DISTID, {"methods": []})
    assert factory.opened == 1


@pytest_twisted.ensureDeferred
async def test_http_404_is_protocol_error(h):
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/nowhere")
    with pytest.raises(RSProtocolError):
        await client.sa_key(DISTID)


@pytest.mark.parametrize(
    "body",
    [
        b"hello, not xml",
        b"<?xml version='1.0'?><methodResponse><params>",  # truncated
        b"<?xml version='1.0'?><methodCall><methodName>x</methodName><params/></methodCall>",
        b"<?xml version='1.0'?><methodResponse><params></params></methodResponse>",
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_xmlrpc_is_protocol_error(h, body):
    h.root.putChild(b"bad", Fixed(200, body))
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/bad")
    with pytest.raises(RSProtocolError):
        await client.call("test.echo")


def test_errors_share_a_base():
    for cls in (RSFault, RSUnavailable, RSTimeout, RSProtocolError):
        assert issubclass(cls, RSError)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "127.0.0.1:8080", "http:///RPC2"])
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError):
        RSClient(reactor, url)


# ---------------------------------------------------------------------------------------
# KeyCache


class FakeKeySource:
    """sa_key answers under test control; counts calls; can hold answers back."""

    def __init__(self) -> None:
        self.keys: dict[str, str | None] = {DISTID: "k1"}
        self.calls: list[str] = []
        self.fail: Exception | None = None
        self.hold: defer.Deferred | None = None

    async def sa_key(self, distid: str) -> str | None:
        self.calls.append(distid)
        if self.hold is not None:
            await self.hold
        if self.fail is not None:
            raise self.fail
        return self.keys.get(distid)


def make_cache(**kw):
    src = FakeKeySource()
    clock = task.Clock()
    clock.advance(1000)
    return src, clock, KeyCache(src, clock, **kw)


@pytest_twisted.ensureDeferred
async def test_cache_hit_within_ttl_and_refetch_after():
    src, clock, cache = make_cache(ttl=300.0)
    assert await cache.check(DISTID, "k1") is True
    clock.advance(299)
    assert await cache.check(DISTID, "k1") is True
    assert src.calls == [DISTID]
    clock.advance(1)
    src.keys[DISTID] = "k2"  # rotated; the expired entry must not be used
    assert await cache.check(DISTID, "k1") is False
    assert await cache.check(DISTID, "k2") is True
    assert src.calls == [DISTID, DISTID]


@pytest_twisted.ensureDeferred
async def test_mismatch_refetches_once_and_finds_rotated_key():
    src, clock, cache = make_cache(refetch_min_interval=5.0)
    assert await cache.check(DISTID, "k1") is True
    src.keys[DISTID] = "k2"
    clock.advance(10)
    assert await cache.check(DISTID, "k2") is True  # mismatch → one refetch → match
    assert len(src.calls) == 2
    assert await cache.check(DISTID, "k2") is True  # now cached
    assert await cache.check(DISTID, "k1") is False  # old key: mismatch, but rate-limited
    assert len(src.calls) == 2


@pytest_twisted.ensureDeferred
async def test_wrong_keys_cannot_flood_the_rs():
    src, clock, cache = make_cache(refetch_min_interval=5.0)
    assert await cache.check(DISTID, "k1") is True
    clock.advance(5)
    for _ in range(50):  # one refetch, then nothing for 5 s
        assert await cache.check(DISTID, "wrong") is False
        clock.advance(0.01)
    assert len(src.calls) == 2
    clock.advance(5)
    assert await cache.check(DISTID, "wrong") is False
    assert len(src.calls) == 3
    # Right key still works without any RS call.
    assert await cache.check(DISTID, "k1") is True
    assert len(src.calls) == 3


@pytest_twisted.ensureDeferred
async def test_fresh_entry_is_not_refetched_on_mismatch():
    src, clock, cache = make_cache(refetch_min_interval=5.0)
    assert await cache.check(DISTID, "wrong") is False  # first fetch, no second one
    clock.advance(4.9)
    assert await cache.check(DISTID, "wrong") is False
    assert len(src.calls) == 1


@pytest_twisted.ensureDeferred
async def test_unknown_distid_is_cached_for_negative_ttl():
    src, clock, cache = make_cache(negative_ttl=30.0, refetch_min_interval=5.0)
    assert await cache.check(UNKNOWN, "anything") is False
    clock.advance(29)
    assert await cache.check(UNKNOWN, "anything") is False
    assert src.calls == [UNKNOWN]
    src.keys[UNKNOWN] = "new"  # the operator registers it
    clock.advance(1)
    assert await cache.check(UNKNOWN, "new") is True
    assert src.calls == [UNKNOWN, UNKNOWN]


@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_coalesce():
    src, _clock, cache = make_cache()
    src.hold = defer.Deferred()
    checks = [defer.ensureDeferred(cache.check(DISTID, k)) for k in ("k1", "k1", "bad", "k1")]
    assert src.calls == [DISTID]
    assert not any(d.called for d in checks)
    src.hold.callback(None)
    results = [await d for d in checks]
    assert results == [True, True, False, True]
    assert src.calls == [DISTID]


@pytest_twisted.ensureDeferred
async def test_one_cancelled_waiter_does_not_fail_the_others():
    src, _clock, cache = make_cache()
    src.hold = defer.Deferred()
    first = defer.ensureDeferred(cache.check(DISTID, "k1"))
    second = defer.ensureDeferred(cache.check(DISTID, "k1"))
    first.cancel()
    with pytest.raises(defer.CancelledError):
        await first
    src.hold.callback(None)
    assert await second is True
    assert src.calls == [DISTID]


@pytest_twisted.ensureDeferred
async def test_rs_errors_propagate_to_all_waiters_and_are_not_cached():
    src, _clock, cache = make_cache()
    src.hold = defer.Deferred()
    src.fail = RSUnavailable("down")
    a = defer.ensureDeferred(cache.check(DISTID, "k1"))
    b = defer.ensureDeferred(cache.check(DISTID, "k1"))
    src.hold.callback(None)
    for d in (a, b):
        with pytest.raises(RSUnavailable):
            await d
    src.hold = None
    src.fail = None
    assert await cache.check(DISTID, "k1") is True  # asked again at once
    assert len(src.calls) == 2


@pytest_twisted.ensureDeferred
async def test_failed_refetch_still_counts_for_the_rate_limit():
    src, clock, cache = make_cache(refetch_min_interval=5.0)
    assert await cache.check(DISTID, "k1") is True
    clock.advance(5)
    src.fail = RSTimeout("slow")
    with pytest.raises(RSTimeout):
        await cache.check(DISTID, "wrong")
    assert await cache.check(DISTID, "wrong") is False  # no RS call within the interval
    assert await cache.check(DISTID, "k1") is True  # the cached key survives
    assert len(src.calls) == 2


@pytest_twisted.ensureDeferred
async def test_invalidate_forces_a_new_lookup_and_drops_a_stale_flight():
    src, _clock, cache = make_cache()
    assert await cache.check(DISTID, "k1") is True
    src.keys[DISTID] = "k2"
    cache.invalidate(DISTID)
    assert await cache.check(DISTID, "k2") is True
    assert len(src.calls) == 2

    src.hold = defer.Deferred()
    src.keys[DISTID] = "k3"
    cache.invalidate(DISTID)
    pending = defer.ensureDeferred(cache.check(DISTID, "k3"))
    cache.invalidate(DISTID)  # e.g. the RS rotated the key again meanwhile
    src.hold.callback(None)
    assert await pending is True
    assert len(cache) == 0  # the answer of the detached lookup was not stored


@pytest_twisted.ensureDeferred
async def test_size_bound_drops_oldest():
    src, _clock, cache = make_cache(max_entries=2)
    src.keys.update({OTHER: "o", UNKNOWN: "u"})
    assert await cache.check(DISTID, "k1")
    assert await cache.check(OTHER, "o")
    assert await cache.check(UNKNOWN, "u")
    assert len(cache) == 2
    assert await cache.check(OTHER, "o")  # still cached
    assert len(src.calls) == 3
    assert await cache.check(DISTID, "k1")  # was dropped: fetched again
    assert len(src.calls) == 4


@pytest_twisted.ensureDeferred
async def test_size_bound_counts_age_from_the_last_fetch():
    src, clock, cache = make_cache(max_entries=2, ttl=10.0)
    src.keys.update({OTHER: "o", UNKNOWN: "u"})
    assert await cache.check(DISTID, "k1")
    assert await cache.check(OTHER, "o")
    clock.advance(10)
    assert await cache.check(DISTID, "k1")  # expired, fetched again: now the newest
    assert await cache.check(UNKNOWN, "u")  # pushes out OTHER, not DISTID
    assert src.calls == [DISTID, OTHER, DISTID, UNKNOWN]
    assert await cache.check(DISTID, "k1")
    assert len(src.calls) == 4


@pytest_twisted.ensureDeferred
async def test_empty_key_never_matches():
    src, _clock, cache = make_cache()
    src.keys[DISTID] = ""
    assert await cache.check(DISTID, "") is False


def test_comparison_is_constant_time(monkeypatch):
    used = []
    real = hmac.compare_digest

    def spy(a, b):
        used.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr("armsproxy.rs_client.keycache.hmac.compare_digest", spy)
    _src, _clock, cache = make_cache()
    d = defer.ensureDeferred(cache.check(DISTID, "k1"))
    assert d.result is True
    assert used == [(bytes, bytes)]


@pytest_twisted.ensureDeferred
async def test_keycache_with_real_rsclient(h):
    port, _ = h.listen()
    client = h.client(f"http://127.0.0.1:{port}/RPC2")
    cache = KeyCache(client, task.Clock())
    assert await cache.check(DISTID, "s3cret-key") is True
    assert await cache.check(UNKNOWN, "s3cret-key") is False
    assert await cache.check(DISTID, "s3cret-key") is True
    assert [c[0] for c in h.rs.calls] == ["arms.sa_key", "arms.sa_key"]


@pytest_twisted.ensureDeferred
async def test_sa_key_for_pushes_shares_the_cache():
    src, clock, cache = make_cache(ttl=300.0)
    assert await cache.sa_key(DISTID) == "k1"
    assert await cache.check(DISTID, "k1") is True
    assert src.calls == [DISTID]
    clock.advance(301)
    src.keys[DISTID] = "k2"
    assert await cache.sa_key(DISTID) == "k2"
    assert await cache.sa_key("0001-0002-0003-0004-0005-0006-0007-0009") is None


def test_requests_are_marshalled_byte_for_byte_as_the_stdlib_does():
    """The pulls' own request writer (a distid and a struct of strings) gives the very bytes
    of ``xmlrpc.client.dumps``; any other shape is the stdlib's, errors included."""
    import random

    from armsproxy.rs_client.client import _dumps

    rng = random.Random(11)
    alphabet = "ab<>&'\"\n\r\t é€\x00]]>\ud800"

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    def outcome(fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            return type(e), str(e)

    def stdlib(params, method):
        return xmlrpc_dumps(params, method, allow_none=False).encode("utf-8")

    class Str(str):
        pass

    shapes = [
        lambda: text(), lambda: {text(): text() for _ in range(rng.randint(0, 4))},
        lambda: {text(): 1}, lambda: 7, lambda: None, lambda: [text()], lambda: Str("s"),
        lambda: {Str("k"): "v"}, lambda: {"k": Str("v")}, lambda: True,
    ]
    for _ in range(3000):
        params = tuple(rng.choice(shapes)() for _ in range(rng.randint(0, 3)))
        method = rng.choice(["arms.config_solicitation", "arms.event", "a<b&c", "", "\ud800"])
        ours = outcome(_dumps, params, method)
        theirs = outcome(stdlib, params, method)
        assert ours == theirs, (params, method)
