"""Connection caps, whole-request deadlines and the descriptor budget (armsproxy.limits).

Real sockets on loopback throughout; deadlines run on a ``task.Clock``, so a client that sends
one byte a second for a minute takes a fraction of a second. The descriptor shortage is real:
a proxy in a subprocess whose RLIMIT_NOFILE is 1024, and 1,100 dribbling clients.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from conftest import http_get
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.resource import Resource
from zope.interface import implementedBy, providedBy

from armsproxy import limits
from armsproxy.config import ConfigError, embedded, load
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import SimulatedSA
from armsproxy.limits import (
    DescriptorBudget,
    ListenerLimit,
    RateLimitedLog,
    limited,
    raise_descriptor_limit,
)
from armsproxy.management import ManagementResource, ManagementSite
from armsproxy.metrics import listener_counts
from armsproxy.rs_gate import make_rs_gate_site, rs_gate_service
from armsproxy.tap import build_services
from armsproxy.tls import TLSPolicy, tls_listener

ROOT = Path(__file__).parent.parent
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "limits-test-key"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
CALL = (b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n"
        + b"x" * 100)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


async def _settle(seconds: float = 0.01) -> None:
    """Let the real reactor read what the client sent (loopback delivers at once)."""
    await task.deferLater(reactor, seconds, lambda: None)


async def _until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await _settle(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Client:
    """A non-blocking client socket: what it received, and whether the server closed it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.received = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            pass  # not connected yet (a full accept queue): the next byte goes later
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                self.eof = True

    def closed(self) -> bool:
        """Reads what is there; True once the server closed (or reset) the connection."""
        while not self.eof:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
            self.received += data
        return self.eof

    def close(self) -> None:
        self.sock.close()


class _Hello(Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        return b"ok"


# -- whole-request deadlines ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_dribbling_management_client_is_cut_at_the_request_deadline(logs):
    clock = task.Clock()
    resource = ManagementResource(store=None, sa_gate_counts={}, tunnel_counts=dict,
                                  clock=clock)
    site = ManagementSite(resource, clock)  # the default request_timeout: 10 s
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    dribbler, idle = Client(port.getHost().port), Client(port.getHost().port)
    try:
        await _settle()
        for i in range(9):  # one byte a second: an idle timer would never fire
            dribbler.send(HEALTHZ[i:i + 1])
            await _settle()
            clock.advance(1)
        idle.send(HEALTHZ)  # a whole request at 9 s: answered, kept alive
        await _until(lambda: b"ok\n" in idle.received or idle.closed(), "the answer")
        assert not dribbler.closed() and not idle.closed()
        dribbler.send(HEALTHZ[9:10])
        await _settle()
        clock.advance(1)  # 10 s after the connection started, 9 bytes of its request sent
        await _until(dribbler.closed, "the dribbler to be cut")
        assert dribbler.received == b""
        assert not idle.closed()  # its deadline restarted when its answer was done, at 9 s
        clock.advance(8.9)
        await _settle()
        assert not idle.closed()
        clock.advance(0.1)
        await _until(idle.closed, "the idle keep-alive connection to end")
        assert site.cut.total == 1  # the idle one is not counted as cut, nor logged
        assert listener_counts([], [site]) == {("management", "request_timeout"): 1}
        assert len(logs.find("management: connections closed", "10 s request_timeout")) == 1
    finally:
        dribbler.close()
        idle.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_dribbling_rs_gate_client_is_cut_at_the_request_deadline():
    clock = task.Clock()
    site = make_rs_gate_site(_Hello(), reactor=clock)  # the default request_timeout: 60 s
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    dribbler = Client(port.getHost().port)
    try:
        await _settle()
        for i in range(59):
            dribbler.send(CALL[i:i + 1])
            await _settle(0.005)
            clock.advance(1)
        assert not dribbler.closed()
        dribbler.send(CALL[59:60])
        await _settle(0.005)
        clock.advance(1)
        await _until(dribbler.closed, "the dribbler to be cut")
        assert site.cut.total == 1
    finally:
        dribbler.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_slow_answer_counts_against_the_deadline_too():
    """The deadline runs to the end of the answer: a handler that never finishes is cut."""
    clock = task.Clock()

    class Hung(Resource):
        isLeaf = True

        def render(self, request) -> object:
            from twisted.web.server import NOT_DONE_YET
            return NOT_DONE_YET

    site = make_rs_gate_site(Hung(), reactor=clock, request_timeout=5)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    client = Client(port.getHost().port)
    try:
        await _settle()
        client.send(CALL)
        await _settle()
        clock.advance(4.9)
        await _settle()
        assert not client.closed()
        clock.advance(0.1)
        await _until(client.closed, "the unanswered call to be cut")
    finally:
        client.close()
        await port.stopListening()


# -- connection caps -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_rs_gate_connections_over_its_cap_are_refused_at_accept(logs):
    svc = rs_gate_service(reactor, "tcp:0:interface=127.0.0.1", _Hello(), max_connections=2)
    svc.startService()
    port = (await svc.when_listening()).getHost().port
    held = [Client(port), Client(port)]
    extra: list[Client] = []
    try:
        await _until(lambda: svc.endpoint.limit.open == 2, "two connections")
        extra = [Client(port) for _ in range(5)]
        await _until(lambda: all(c.closed() for c in extra), "the refusals")
        assert all(c.received == b"" for c in extra)
        assert svc.endpoint.limit.refused == 5
        assert len(logs.find("rs gate: connections refused", "2 open")) == 1  # rate-limited
        held[0].close()
        await _until(lambda: svc.endpoint.limit.open == 1, "the slot to free")
        late = Client(port)
        extra.append(late)
        late.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await _until(late.closed, "the answer")
        assert late.received.startswith(b"HTTP/1.1 200") and late.received.endswith(b"ok")
    finally:
        for c in held + extra:
            c.close()
        await svc.stopService()


class _Echo(Protocol):
    """Answers each read with "ok" (the handshake is done once it has)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"ok")


@pytest_twisted.ensureDeferred
async def test_a_tls_listener_counts_in_its_tls_factory_without_a_wrapper(gate_pki, tmp_path):
    """The SA gate's listeners hold thousands of idle tunnels: the cap is counted by the TLS
    factory (no ProtocolWrapper per connection), refused connections get no handshake, and
    closed ones are counted down."""
    limit = ListenerLimit("sa gate", 2, clock=reactor)
    endpoint = limited(tls_listener(reactor, gate_pki.endpoint(0), TLSPolicy()), limit)
    port = await endpoint.listen(Factory.forProtocol(_Echo))
    ctx = ssl.create_default_context(cafile=None)
    ctx.load_verify_locations(cadata=gate_pki.ca_pem.decode())

    def talk() -> ssl.SSLSocket:
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port.getHost().port)),
                               server_hostname="127.0.0.1")
        sock.sendall(b"hi")
        assert sock.recv(2) == b"ok"
        return sock

    held: list[ssl.SSLSocket] = []
    try:
        held = [await threads.deferToThread(talk) for _ in range(2)]
        assert limit.open == 2
        servers = [o for o in port.factory.protocols]
        assert all(type(p.wrappedProtocol) is _Echo for p in servers)  # no wrapper between
        for p in servers:  # DeviceTLSProtocol.makeConnection declares what Twisted's does
            assert set(providedBy(p)) == set(providedBy(p.transport)) | set(
                implementedBy(TLSMemoryBIOProtocol))
            assert ITCPTransport.providedBy(p.wrappedProtocol.transport)
        refused = Client(port.getHost().port)
        await _until(refused.closed, "the refusal")
        assert refused.received == b"" and limit.refusals["max_connections"] == 1
        refused.close()
        held.pop().close()
        await _until(lambda: limit.open == 1, "the close to be counted")
    finally:
        for sock in held:
            sock.close()
        await port.stopListening()
    await _until(lambda: limit.open == 0, "every close to be counted")


def _register(db: Path, pki_dir: Path) -> None:
    assert demo_cli.main(["--db", str(db), "register", DISTID, "--key", KEY,
                          "--module", "1:1.0.0:limits-module"]) == 0
    assert demo_cli.main(["--db", str(db), "issue-cert", DISTID,
                          "--ca-cert", str(pki_dir / "ca.pem"),
                          "--ca-key", str(pki_dir / "ca.key")]) == 0


async def _pull(url: str, ca_pem: bytes) -> str:
    sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca_pem, response_timeout=10.0)
    pull = await sa.config_solicitation(url)
    return pull.verdict.outcome if pull.error is None else f"error: {pull.error}"


@pytest_twisted.ensureDeferred
async def test_over_cap_connections_are_refused_while_a_device_pulls(tmp_path, logs):
    port, rs_port, gate_port, management_port = (_free_port() for _ in range(4))
    cfg = embedded(tmp_path / "data", port=port, rs_port=rs_port, rs_gate_port=gate_port,
                   management_port=management_port)
    cfg.management_max_connections = 4
    cfg.max_connections = 3
    top = build_services(cfg, reactor)
    top.startService()
    caps = {limit.name: limit for limit in top.budget.listeners}
    management = [Client(management_port) for _ in range(20)]
    devices: list[Client] = []
    try:
        _register(cfg.data_dir / "demo-rs.sqlite", cfg.data_dir / "pki")
        ca_pem = (cfg.data_dir / "pki" / "ca.pem").read_bytes()
        for c in management:
            c.send(HEALTHZ[:5])  # and never the rest
        await _until(lambda: sum(c.closed() for c in management) == 16, "16 refusals")
        assert caps["management"].open == 4
        # The management gate is full; a device does not notice.
        assert await _pull(cfg.public_urls[0], ca_pem) == "success"
        # The SA gate's own cap: three TCP connections that never start TLS hold it; a fourth
        # is closed at accept, before any TLS (no ServerHello: nothing at all).
        await _until(lambda: caps["sa gate"].open == 0, "the pull's connection to close")
        devices = [Client(port) for _ in range(3)]
        await _until(lambda: caps["sa gate"].open == 3, "three device connections")
        refused = Client(port)
        devices.append(refused)
        await _until(refused.closed, "the over-cap device connection to be refused")
        assert refused.received == b""
        for c in devices[:3]:
            c.close()
        await _until(lambda: caps["sa gate"].open == 0, "the device slots to free")
        assert await _pull(cfg.public_urls[0], ca_pem) == "success"
        for c in management:
            c.close()
        await _until(lambda: caps["management"].open == 0, "the management slots to free")
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(
                       (await http_get(management_port, "/metrics")).body)
                   for s in f.samples}
        assert metrics[("armsproxy_sa_gate_refusals_total",
                        (("reason", "connection_limit"),))] == 1
        # The same refusals by listener and reason: 16 management, 1 device connection.
        refusals = "armsproxy_listener_refusals_total"
        assert metrics[(refusals, (("listener", "management"),
                                   ("reason", "max_connections")))] == 16
        assert metrics[(refusals, (("listener", "management"), ("reason", "reserve")))] == 0
        assert metrics[(refusals, (("listener", "sa_gate"),
                                   ("reason", "max_connections")))] == 1
        assert len(logs.find("management: connections refused")) == 1  # 16, one line
    finally:
        for c in management + devices:
            c.close()
        await top.stopService()


# -- the descriptor budget -----------------------------------------------------------------------

def test_the_reserve_refuses_non_device_connections_but_not_devices():
    clock = task.Clock()
    in_use = [100]
    budget = DescriptorBudget(1024, clock=clock, count=lambda: in_use[0])
    assert budget.reserve == 256
    management = budget.listener("management", 10_000)
    sa_gate = budget.device_listener("sa gate", None)
    assert sa_gate.max_connections == (1024 - 256) // 2  # a pull also holds one to the RS
    assert budget.device_cap(share=3) == 256  # with a tunnel listener
    assert management.admit(None) and sa_gate.admit(None)
    in_use[0] = 1024 - 256
    clock.advance(1)  # counted again at most once a second
    assert not management.admit(None)
    assert sa_gate.admit(None)
    assert management.refused == 1
    # Between two counts, the listeners' own connections are added to the last count.
    in_use[0] = 100
    clock.advance(1)
    assert budget.free() == 924
    for _ in range(668):
        management.opened()
    assert budget.free() == 256 and not management.admit(None)
    management.closed()
    assert management.admit(None)


def test_refusals_are_logged_once_per_window_with_their_count(logs):
    clock = task.Clock()
    refused = RateLimitedLog(clock)
    for _ in range(5):
        refused.note("x: connections refused")
    assert logs.find("x: connections refused") == ["x: connections refused (1 in 10 s)"]
    clock.advance(9.9)
    assert len(logs.find("x: connections refused")) == 1
    clock.advance(0.1)  # the window's end says what it held back
    assert logs.find("x: connections refused")[1] == "x: connections refused (4 in 10 s)"
    clock.advance(60)
    assert len(logs.find("x: connections refused")) == 2 and refused.total == 5


def test_reserve_sizes():
    clock = task.Clock()
    assert DescriptorBudget(1024, clock=clock).reserve == 256
    assert DescriptorBudget(20000, clock=clock).reserve == 5000
    assert DescriptorBudget(256, clock=clock).reserve == 128  # never more than half


def test_a_listener_without_a_budget_has_its_cap_only():
    limit = ListenerLimit("x", 1, clock=task.Clock())
    assert limit.admit(None)
    limit.opened()
    assert not limit.admit(None)


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    script = ("import resource; from armsproxy.limits import raise_descriptor_limit; "
              f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard})); "
              "print(*raise_descriptor_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["256", str(hard), str(hard), str(hard)]


def test_an_unlimited_hard_limit_is_tried_downwards(monkeypatch):
    calls = []

    def setrlimit(which, limits_):
        calls.append(limits_[0])
        if limits_[0] > 10240:  # macOS's per-process maximum
            raise ValueError("not allowed")

    monkeypatch.setattr(limits.resource, "getrlimit",
                        lambda which: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(limits.resource, "setrlimit", setrlimit)
    assert raise_descriptor_limit() == (1024, 8192)
    assert calls[0] == limits.UNLIMITED_TARGET


# -- configuration -------------------------------------------------------------------------------

def test_config_keys_defaults_and_validation(tmp_path):
    cfg = load(ROOT / "etc" / "armsproxy.conf")
    assert (cfg.max_connections, cfg.tunnel_max_connections) == (None, None)  # auto
    assert (cfg.rs_gate_max_connections, cfg.rs_gate_request_timeout) == (64, 60)
    assert (cfg.management_max_connections, cfg.management_request_timeout) == (16, 10)
    text = (ROOT / "etc" / "armsproxy.conf").read_text()
    conf = tmp_path / "armsproxy.conf"
    assert re.search(r"^max_connections = auto$", text, re.M)
    assert re.search(r"^tunnel_max_connections = auto$", text, re.M)
    conf.write_text(re.sub(r"^tunnel_max_connections = auto$", "tunnel_max_connections = 2000",
                           re.sub(r"^max_connections = auto$", "max_connections = 500", text,
                                  flags=re.M), flags=re.M))
    cfg = load(conf)
    assert (cfg.max_connections, cfg.tunnel_max_connections) == (500, 2000)
    bad = (re.sub(r"^max_connections = (auto|16)$", "max_connections = 0", text, flags=re.M)
           .replace("request_timeout = 10", "request_timeout = 5"))
    conf.write_text(bad)
    with pytest.raises(ConfigError) as e:
        load(conf)
    for problem in ("[sa_gate] max_connections: at least 1",
                    "[management] max_connections: at least 1",
                    "[management] request_timeout: more than 5 seconds"):
        assert problem in str(e.value)


# -- 1,100 dribbling management connections at 1024 descriptors ---------------------------------

PROXY = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))  # a soft 512 under a hard 1024

import sys
from pathlib import Path
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from armsproxy.config import embedded
from armsproxy.tap import build_services

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
data, port, rs_port, gate_port, management_port, cap = sys.argv[1:]
cfg = embedded(Path(data), port=int(port), rs_port=int(rs_port), rs_gate_port=int(gate_port),
               management_port=int(management_port))
cfg.management_max_connections = int(cap)  # so large that only the reserve protects
top = build_services(cfg, reactor)
reactor.callWhenRunning(top.startService)
reactor.callWhenRunning(print, "PROXY READY", flush=True)
reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
reactor.run()
"""


class Dribblers:
    """``n`` clients of the management gate, each sending one more byte every second."""

    def __init__(self, port: int, n: int) -> None:
        self.clients = []
        for i in range(n):
            self.clients.append(Client(port))
            if i % 25 == 24:  # a burst would overflow the accept queue: SYNs dropped, retried
                time.sleep(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sent = 0
        while not self._stop.wait(1.0):
            for c in self.clients:
                if not c.closed():
                    c.send(HEALTHZ[sent % 10:sent % 10 + 1])
            sent += 1

    def open(self) -> int:
        return sum(not c.eof for c in self.clients)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for c in self.clients:
            c.close()


@pytest_twisted.ensureDeferred
async def test_1100_dribbling_management_connections_do_not_stop_a_pull(tmp_path):
    raise_descriptor_limit()  # this process holds the 1,100 client sockets
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1500, "needs 1,500 descriptors"
    data = tmp_path / "data"
    port, rs_port, gate_port, management_port = (_free_port() for _ in range(4))
    log_path = tmp_path / "proxy.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROXY, str(data), str(port), str(rs_port), str(gate_port),
             str(management_port), "100000"],
            env=_env(), stdout=out, stderr=subprocess.STDOUT)
    dribblers = None
    try:
        await _until(lambda: "PROXY READY" in log_path.read_text() or proc.poll() is not None,
                     "the proxy", timeout=60)
        assert proc.poll() is None, log_path.read_text()
        _register(data / "demo-rs.sqlite", data / "pki")
        dribblers = Dribblers(management_port, 1100)
        await _settle(3.0)  # every connection accepted or refused, three bytes in
        held = dribblers.open()
        assert 500 < held <= 1024 - 256, held
        started = time.monotonic()
        outcome = await _pull(f"https://127.0.0.1:{port}/arms",
                              (data / "pki" / "ca.pem").read_bytes())
        assert outcome == "success", (outcome, log_path.read_text()[-3000:])
        assert time.monotonic() - started < 5
        assert dribblers.open() == held  # still dribbling: cut only at 10 s
    finally:
        if dribblers is not None:
            dribblers.stop()
        proc.terminate()
        proc.wait(timeout=30)
    text = log_path.read_text()
    assert "descriptor limit (RLIMIT_NOFILE) raised from 512 to 1024" in text
    assert "management: connections refused" in text and "256 are kept" in text
    assert "Traceback" not in text, text
