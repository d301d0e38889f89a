"""Python memory per idle https-tunnel, the whole server side over real TLS on loopback.

The SA gate's TLS listener (armsproxy.tls), its protocol (sa_gate) and a TunnelSession, as
tap.py wires them; the SAs are a child process (stdlib ``ssl``) so that none of their memory
is traced here. tracemalloc measures what a second batch of confirmed, idle tunnels adds
after a first one warmed every cache: the Python objects each tunnel holds (OpenSSL's own
buffers are C allocations tracemalloc does not see; bench/tunnels.py reports both). Twice:
the tunnel room alone (hooks that keep nothing), and as in the process, where each SA is
also known to the key cache and the push engine's SA cache and the listener has its
connection cap (bench/tunnels.py's "Python objects" figure, without a store).
"""

from __future__ import annotations

import gc
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import start_gate
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import Logger

from armsproxy.arms.messages import ArmsResponse, Empty
from armsproxy.limits import ListenerLimit, limited
from armsproxy.push.sa_cache import SACache
from armsproxy.rs_client.keycache import KeyCache
from armsproxy.sa_gate.protocol import GateLimits, SAGateFactory, SAGateProtocol
from armsproxy.store.model import SARecord
from armsproxy.tls import TLSPolicy, tls_listener
from armsproxy.tunnel import TunnelRegistry, TunnelSession, parse_basic_authorization
from armsproxy.tunnel.registry import TunnelRegistry as _Registry

VECTORS = Path(__file__).resolve().parent / "vectors" / "tunnel"
KEY = "harness-rs-key"
BATCH = 50
LIMIT = 3 * 1024  # bytes of Python objects per idle tunnel

# The SA side: ``count`` tunnels per line read on stdin, each opened, confirmed and
# echoed once (the echo-response proves armsproxy registered it), then held; "ok N" after
# each batch; exits at EOF. Messages are the captures (04, 05, 06, 09) with other distids.
_CLIENT = r'''
import base64, re, socket, ssl, sys
port, ca, vectors = int(sys.argv[1]), sys.argv[2], sys.argv[3]
capture = b"0001-0002-0003-0004-0005-0006-0007-0008"

def body(name):
    data = open(f"{vectors}/{name}", "rb").read()
    return data.partition(b"\r\n")[2][:-2]

def chunk(data, cid):
    return b"%x;id=%d;trail\r\n" % (len(data), cid) + data + b"\r\n"

head = open(f"{vectors}/04-https-tunnel-open.request.txt", "rb").read()
start, done = body("05-push-confirmation-start.request.txt"), body(
    "06-push-confirmation-done.response.txt")
echo = open(f"{vectors}/09-tunnel-echo.request.txt", "rb").read()
ctx = ssl.create_default_context(cafile=ca)
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
held, n = [], 0

def read_chunk(f):
    line = f.readline()
    size = int(line.split(b";")[0], 16)
    data = f.read(size + 2)[:-2]
    return line, data

for line in sys.stdin:
    for _ in range(int(line)):
        n += 1
        distid = b"0001-0002-0003-0004-0005-0006-%04X-%04X" % (n >> 16, n & 0xFFFF)
        auth = base64.b64encode(distid + b":" + sys.argv[4].encode())
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                               server_hostname="127.0.0.1")
        f = sock.makefile("rb")
        sock.sendall(re.sub(rb"Authorization: Basic [^\r]*", b"Authorization: Basic " + auth,
                            head))
        while f.readline() not in (b"\r\n", b""):
            pass
        sock.sendall(chunk(start.replace(capture, distid), 1000 + n))
        read_chunk(f)  # the confirmation answer
        _, request = read_chunk(f)  # push-confirmation-done
        tid = re.search(rb"<transaction-id>\d+</transaction-id>", request).group(0)
        sock.sendall(chunk(re.sub(rb"<transaction-id>\d+</transaction-id>", tid, done),
                           2000 + n))
        sock.sendall(echo)
        header, _ = read_chunk(f)
        assert b"echo-response" in header, header
        held.append((sock, f))
    print("ok", n, flush=True)
'''


class _LeanHooks:
    """The proxy's hooks minus the proxy: accept the key, confirm, keep nothing."""

    def __init__(self) -> None:
        self.tid = 5000

    async def authenticate(self, distid: str, key: str) -> bool:
        return key == KEY

    async def confirmation_start(self, distid: str, request: Any, peer: str) -> ArmsResponse:
        self.tid += 1
        return ArmsResponse(type="push-confirmation-start", result_code=100,
                            description="OK", transaction_id=self.tid, body=Empty())

    async def done_request(self, request: Any, raw: bytes, peer: str) -> int:
        return 100

    def tunnel_up(self, tunnel: Any) -> None:
        pass

    def tunnel_down(self, tunnel: Any, reason: str) -> None:
        pass


class _SAs(protocol.ProcessProtocol):
    """The SA child: asks it for a batch, waits for its "ok"."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    async def batch(self, count: int, total: int) -> None:
        self.transport.write(b"%d\n" % count)
        want = b"ok %d\n" % total
        for _ in range(6000):
            if want in self.out:
                return
            if self.ended.called:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"SA child: {bytes(self.out)!r} {bytes(self.err[-2000:])!r}")


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


class _ProcessHooks(_LeanHooks):
    """What tap.py's hooks keep per SA: its key in the key cache (checked through it, the RS
    asked once), its record in the push engine's SA cache (written when the tunnel comes up,
    with the fields the engine writes)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = KeyCache(_RS(), reactor)
        self.records = SACache(_JSONStore(), 100_000, clock=reactor, ttl=30.0)
        self.written = 0

    async def authenticate(self, distid: str, key: str) -> bool:
        return await self.keys.check(distid, key)

    def tunnel_up(self, tunnel: Any) -> None:
        now = reactor.seconds()
        d = defer.ensureDeferred(self.records.update(
            tunnel.distid, tunnels=[tunnel.info()], push_method="https-tunnel", confirmed=True,
            last_confirmation_at=now, last_peer=tunnel.peer, tunnel_owner="instance-1"))
        d.addCallback(lambda _: setattr(self, "written", self.written + 1))


class _RS:
    """``arms.sa_key``: a fresh string per answer, as XML-RPC gives."""

    async def sa_key(self, distid: str) -> str:
        return "".join(KEY)


class _JSONStore:
    """``sa_update`` returning the record as a store does, every value a fresh copy (the
    tunnels through JSON); it keeps nothing (a real one keeps it on disk)."""

    async def sa_update(self, distid: str, *, events: Any = (), **fields: Any) -> SARecord:
        row = dict(fields, distribution_id=distid, updated_at=reactor.seconds())
        return SARecord(**json.loads(json.dumps(row)))

    async def sa_get(self, distid: str) -> SARecord | None:
        raise AssertionError("the cache was written through: no read")


async def _per_idle_tunnel(gate_pki: Any, tmp_path: Path, monkeypatch: Any, hooks: Any, *,
                           capped: bool) -> tuple[float, str]:
    """Bytes of Python objects a confirmed, idle tunnel adds, and the biggest sources."""
    quiet = Logger(observer=lambda event: None)
    # Outside twistd, Twisted keeps every log event until logging starts: not the tunnels'.
    for cls in (TunnelSession, SAGateProtocol, _Registry):
        monkeypatch.setattr(cls, "log", quiet)
    registry = TunnelRegistry()

    def open_tunnel(transport: Any, headers: list[tuple[str, str]], peer: str,
                    path: str) -> TunnelSession:
        authorization = next((v for k, v in headers if k.lower() == "authorization"), None)
        distid, key = parse_basic_authorization(authorization)
        return TunnelSession(transport, distid=distid, key=key, peer=peer, path=path,
                             hooks=hooks, registry=registry, clock=reactor, echo_interval=60)

    async def handler(request: Any) -> bytes:
        raise AssertionError("no pulls here")

    factory = SAGateFactory(handler, clock=reactor, tunnel_opener=open_tunnel,
                            limits=GateLimits(tunnel_paths=frozenset({"/arms-tunnel.cgi"}),
                                              request_timeout=1.0))
    if capped:
        limit = ListenerLimit("sa gate", 10_000, clock=reactor)
        listener = limited(tls_listener(reactor, gate_pki.endpoint(0), TLSPolicy()), limit)
        port = await listener.listen(factory)
    else:
        port = await start_gate(factory, gate_pki)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(gate_pki.ca_pem)
    sas = _SAs()
    reactor.spawnProcess(sas, sys.executable, [
        sys.executable, "-c", _CLIENT, str(port.getHost().port), str(ca), str(VECTORS), KEY,
    ], env=None)
    tracing = False
    try:
        await sas.batch(BATCH, BATCH)  # warm-up: caches, free lists, the first of everything
        tracemalloc.start(1)
        tracing = True
        before = _traced()
        snap_before = tracemalloc.take_snapshot()
        await sas.batch(BATCH, 2 * BATCH)
        await task.deferLater(reactor, 1.5, lambda: None)
        per_tunnel = (_traced() - before) / BATCH
        top = tracemalloc.take_snapshot().compare_to(snap_before, "lineno")[:40]
        assert registry.counts()["live"] == 2 * BATCH
        if capped:
            assert limit.open == 2 * BATCH
        detail = "\n".join(f"{s.size_diff / BATCH:7.0f} B {s.count_diff / BATCH:5.2f} x "
                           f"{s.traceback}" for s in top)
        print(f"{per_tunnel:.0f} bytes of Python objects per idle tunnel:\n{detail}")
        return per_tunnel, detail
    finally:
        if tracing:
            tracemalloc.stop()
        sas.transport.closeStdin()
        await sas.ended
        for tunnel in registry.all():
            tunnel.close("test over")
        await port.stopListening()
        for _ in range(20):
            await task.deferLater(reactor, 0.01, lambda: None)


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_idle_tunnel_python_memory_over_tls(gate_pki, tmp_path, monkeypatch):
    """A confirmed, idle tunnel holds under 3 KiB of Python objects, whole server side."""
    per_tunnel, detail = await _per_idle_tunnel(gate_pki, tmp_path, monkeypatch, _LeanHooks(),
                                                capped=False)
    assert per_tunnel < LIMIT, f"{per_tunnel:.0f} B per idle tunnel:\n{detail}"


@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_idle_tunnel_python_memory_with_its_sa_known(gate_pki, tmp_path, monkeypatch):
    """Under 3 KiB too with what the process keeps per SA besides the tunnel: its key, its
    SA record, and the listener's connection count (no wrapper per connection)."""
    hooks = _ProcessHooks()
    per_tunnel, detail = await _per_idle_tunnel(gate_pki, tmp_path, monkeypatch, hooks,
                                                capped=True)
    assert len(hooks.keys) == len(hooks.records) == hooks.written == 2 * BATCH
    record = hooks.records.peek(next(iter(hooks.records._records)))
    assert record is not None and record.push_method == "https-tunnel" and record.confirmed
    assert record.tunnels == []  # the live tunnel is the registry's, not the cache's
    assert per_tunnel < LIMIT, f"{per_tunnel:.0f} B per idle tunnel:\n{detail}"
