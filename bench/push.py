"""Push benchmark: CPU per push of armsproxy against a bare TLS client's per request.

    python bench/push.py [--sas 20] [--operations 1000] [--concurrency K] [--mix] [--runs 1]
                         [--poll 0.005] [--profile FILE]

The RS orders operations through the RS gate and armsproxy pushes them (https-simple) to K
simulated SAs. Processes, so that each one's CPU is its own:

* armsproxy, set up as the embedded default is (dev PKI, SQLite, SA gate certificates), as
  ``twist --log-level=info armsproxy`` (as etc/armsproxy.service runs it: twistd would write
  debug lines too), with the demo RS in a process of its own (bench/cpu.py's
  ``armsproxy_config``, as bench/tunnels.py --rs-process runs it): in production the
  RS is elsewhere, so armsproxy's process holds armsproxy's work only (the demo RS's CPU per
  push, the RS events and key look-ups, is printed apart);
* K simulated SAs (``--devices``, a mode of this file): registers K distids with the demo RS
  CLI, issues their certificates, and has each device pull (learning its SA certificate from
  the config-solicitation answer), negotiate https-simple and confirm its own listener; then
  it only serves pushes (and, for 2-way operations, posts the done-requests);
* this process: the RS (XML-RPC over a persistent Twisted ``Agent`` pool, marshalled with
  ``xmlrpc.client``);
* the baseline client (``--baseline``, a mode of this file), a new process per measured run.

Load is a closed loop of ``--concurrency`` orders (default K): each slot submits an order
(round-robin over the SAs), waits until it is final, submits the next. The 1-way read-only mix
(check-transaction, read-module-list) is the default; ``--mix`` adds 2-way ping and read-status,
whose result needs the SA's done-request (a second TLS connection, SA -> armsproxy).

Baseline, same concurrency, M requests: a bare Twisted TLS client (fresh connection, handshake
without SNI, chain checked against the dev CA, the same push request bytes
``framing.build_push_request`` gives for the same 1-way operations, read to EOF) against the
same simulated SA listeners: what sending one push costs at the least. With ``--mix`` the
baseline still sends the 1-way requests (a bare client has no done-request to wait for), so
the comparison then overstates the cost of armsproxy.

The figure compared is CPU per operation (bench/cpu.py: utime + stime of every thread of the
process, from /proc/PID/stat) of the armsproxy process per successful push and of the baseline
client's process per successful request, over the measured phase only: after a warm-up (every
SA once, both ways), with the readings taken once the processes are quiet, so what the phase
left behind (RS events, store writes) is charged to it. Wall-clock rates on a shared 2-core
machine move by 20% or more with other load; CPU per operation much less, since waiting for a
core costs none. ``--runs R`` repeats the measured phases (baseline, then armsproxy) R times
on the same processes; the summary gives the median CPU per operation of each and the last
line is ``cpu_ratio=<baseline client's CPU per request / armsproxy's CPU per push>``: 1.00
would be armsproxy costing what the bare client does; the aim is at most twice, 0.50.

Also printed, for information: pushes/s and requests/s, p50/p99 latency, the CPU per operation
of every process and how busy each was, and the ratio of the rates. Timing of a push, and why
this way: submit -> result is the final state's ``updated_at`` (armsproxy's clock) minus the
wall-clock time taken just before ``push.submit`` was sent (this process's clock; both are
``time.time()`` on one host). So the figure is exact to the commit of the result and does not
depend on how often this process looks. A slot learns that its order is final from one
``push.list`` of the non-final states per ``--poll`` interval for all slots (never one
``push.status`` per order). Measured at K=20: a poll costs armsproxy about 1 ms and returns in
~20 ms under load, so ~45 polls/s take ~5% of its core; polling late only idles a slot, it does
not stretch the latency figures. Counting ``operation.succeeded`` events at the demo RS was not
used: it would time the outbox's delivery as well. The RS side here (Agent + xmlrpc.client)
uses ~1 ms of CPU per push, polls included: not the bottleneck.

``--profile FILE`` runs armsproxy under twistd's cProfile (reactor thread only, whole life of
the process, and slower: its figures are not comparable) and prints the top functions.

Everything runs on 127.0.0.1, bounded in count and in time (``--timeout``); child processes are
stopped (and die with this process) and the temporary directory is removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xmlrpc.client
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KEY = "bench-rs-key"
MODULE = "1:1.0.0:bench-module"
ONE_WAY_MIX: list[tuple[str, dict[str, Any]]] = [
    ("check-transaction", {}),
    ("read-module-list", {}),
]
TWO_WAY_MIX: list[tuple[str, dict[str, Any]]] = [
    *ONE_WAY_MIX,
    ("ping", {"address": "127.0.0.1", "count": 1, "size": 64}),
    ("read-status", {"status_requests": [{"id": 1, "param": "cpu"}]}),
]
NOT_FINAL = ["queued", "sending", "started"]
PAGE = 1000  # push.list's largest page
RS_NAME = "this process (RS)"
BASELINE_NAME = "baseline client"


def _load_cpu() -> ModuleType:
    """bench/cpu.py, loaded by path (this directory is no package)."""
    spec = importlib.util.spec_from_file_location(
        "_bench_cpu", Path(__file__).resolve().with_name("cpu.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


cpu = sys.modules.get("_bench_cpu") or _load_cpu()


def distid_for(index: int) -> str:
    """Distinct distids: 0001-0002-0003-0004-0005-0006-XXXX-XXXX."""
    n = index + 1
    return f"0001-0002-0003-0004-0005-0006-{n >> 16:04X}-{n & 0xFFFF:04X}"


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process goes, however it goes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: Sequence[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str,
               timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what}: child exited with {proc.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    raise SystemExit(f"{what}: not ready after {timeout:.0f} s:\n{_tail(log)}")


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, every core, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle) / hz, sum(ticks[:8]) / hz


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (threads included); this one if pid is None."""
    return float(cpu.process_cpu("self" if pid is None else pid))


# -- the simulated SAs (child process) -------------------------------------------------------


def serve_devices(work: Path, count: int, proxy_port: int, deadline: float) -> None:
    """Register, certify, pull, negotiate and confirm ``count`` SAs, then serve pushes."""
    from lxml import etree
    from twisted.internet import defer, reactor, task
    from twisted.logger import globalLogBeginner

    from armsproxy.demo_rs import cli as demo_cli
    from armsproxy.device import DeviceModule, SimulatedDevice, SimulatedSA

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    started = time.monotonic()
    pki = work / "data" / "pki"
    db = str(work / "data" / "demo-rs.sqlite")
    distids = [distid_for(i) for i in range(count)]
    with contextlib.redirect_stdout(sys.stderr):
        for distid in distids:
            if demo_cli.main(["--db", db, "register", distid, "--key", KEY, "--module", MODULE,
                              "--push-methods", "https-simple"]) != 0:
                raise SystemExit(f"cannot register {distid}")
            if demo_cli.main(["--db", db, "issue-cert", distid, "--ca-cert", str(pki / "ca.pem"),
                              "--ca-key", str(pki / "ca.key")]) != 0:
                raise SystemExit(f"cannot issue a certificate for {distid}")
    certified = time.monotonic()
    url = f"https://127.0.0.1:{proxy_port}/arms"
    ca = (pki / "ca.pem").read_bytes()
    devices: list[SimulatedDevice] = []

    async def bring_up(distid: str) -> SimulatedDevice:
        sa = SimulatedSA(reactor, distid, KEY, ca_pem=ca)
        pull = await sa.config_solicitation(url)
        if pull.verdict.outcome != "success":
            raise RuntimeError(f"{distid} pull: {pull.verdict.describe()}")
        root = etree.fromstring(pull.body_xml)
        query = await sa.push_method_query(url)
        if query.verdict.push_methods != ["https-simple"]:
            raise RuntimeError(f"{distid} push-method-query: {query.verdict.describe()}")
        device = SimulatedDevice(
            reactor, distid, KEY, ca_pem=ca,
            sa_cert_pem=root.findtext(".//sa-certificate").encode(),
            sa_key_pem=root.findtext(".//sa-private-key").encode(),
            rs_pull_server_urls=[url], modules=[DeviceModule(1, "1.0.0", "bench-module")],
            configs={1: "hostname bench-sa\n"},
        )
        devices.append(device)
        await device.listen()
        for exchange in await device.confirm():
            if exchange.verdict.outcome != "success":
                raise RuntimeError(f"{distid} confirmation: {exchange.verdict.describe()}")
        return device

    async def main() -> None:
        await defer.gatherResults([defer.ensureDeferred(bring_up(d)) for d in distids],
                                  consumeErrors=True)
        for _ in range(600):
            if all(d.confirmed for d in devices):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        else:
            raise RuntimeError("not every SA got its push-confirmation-done in 30 s")
        ready = {"devices": [{"distid": d.distid, "port": d.port} for d in devices],
                 "setup_seconds": time.monotonic() - started,
                 "certify_seconds": certified - started}
        (work / "devices.tmp").write_text(json.dumps(ready))
        (work / "devices.tmp").rename(work / "devices.json")

    def failed(failure: Any) -> None:
        print(f"devices: setup failed: {failure.getTraceback()}", file=sys.stderr, flush=True)
        reactor.stop()

    def forget_records() -> None:
        # The simulator records every exchange for tests; a long run needs none of it.
        for d in devices:
            d.received.clear()
            d.dones.clear()
            d.confirmations.clear()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addErrback(failed))
    task.LoopingCall(forget_records).start(5.0, now=False)
    reactor.callLater(deadline, reactor.stop)
    reactor.run()


# -- the RS side: XML-RPC over a persistent Agent pool -------------------------------------


class _Body:
    """The smallest IBodyProducer: the request is in memory already."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Any:
        from twisted.internet import defer

        consumer.write(self.data)
        return defer.succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class Gate:
    """XML-RPC client of the RS gate (``xmlrpc.client`` marshalling, Twisted transport)."""

    def __init__(self, reactor: Any, url: str, connections: int) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = url.encode("ascii")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections
        self.agent = Agent(reactor, pool=self.pool)

    async def call(self, method: str, *args: Any) -> Any:
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        body = xmlrpc.client.dumps(args, method).encode("utf-8")
        response = await self.agent.request(
            b"POST", self.url, Headers({b"Content-Type": [b"text/xml"]}), _Body(body))
        data = await readBody(response)
        (result,), _ = xmlrpc.client.loads(data)
        return result


@dataclass
class PhaseResult:
    name: str
    elapsed: float  # first submit (or connect) -> last result
    latencies: list[float]  # seconds, successful ones only
    failures: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the phase
    cpu_wall: float = 1.0  # wall seconds over which `cpu` was taken
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0


def quantile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def push_phase(gate: Gate, devices: list[dict[str, Any]], mix: list[tuple[str, dict]],
                     total: int, concurrency: int, poll: float, tag: str) -> PhaseResult:
    """Closed loop of ``concurrency`` orders; latency from armsproxy's own final timestamps."""
    from twisted.internet import defer, reactor, task

    submitted_at: dict[str, float] = {}  # operation_id -> wall clock just before submit
    submit_calls: list[float] = []
    waiting: dict[str, defer.Deferred[None]] = {}
    next_index = 0
    polls = 0
    finished = False

    async def slot() -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            device = devices[i % len(devices)]
            operation, params = mix[(i // len(devices)) % len(mix)]
            start = time.time()
            op_id = await gate.call("push.submit", {
                "distribution_id": device["distid"], "operation": operation, "params": params,
                "request_id": f"{tag}-{i}"})
            submit_calls.append(time.time() - start)
            submitted_at[op_id] = start
            done: defer.Deferred[None] = defer.Deferred()
            waiting[op_id] = done
            await done

    async def poller() -> None:
        nonlocal polls
        while not finished:
            # Only orders whose submit returned before this call can be judged by its answer.
            candidates = list(waiting)
            if candidates:
                answer = await gate.call("push.list", {"states": NOT_FINAL, "limit": PAGE})
                polls += 1
                if "next_offset" in answer:
                    raise RuntimeError("more than a page of unfinished orders")
                pending = {o["operation_id"] for o in answer["operations"]}
                for op_id in candidates:
                    if op_id not in pending:
                        waiting.pop(op_id).callback(None)
            await task.deferLater(reactor, poll, lambda: None)

    t0 = time.time()
    polling = defer.ensureDeferred(poller())
    try:
        await defer.gatherResults(
            [defer.ensureDeferred(slot()) for _ in range(min(concurrency, total))],
            consumeErrors=True)
    finally:
        finished = True
        await polling
    finals: dict[str, dict[str, Any]] = {}
    offset: int | None = 0
    while offset is not None:
        page = await gate.call("push.list", {"since": t0 - 1.0, "limit": PAGE, "offset": offset})
        finals.update((o["operation_id"], o) for o in page["operations"])
        offset = page.get("next_offset")
    latencies, failures, last, states = [], 0, 0.0, {}
    for op_id, start in submitted_at.items():
        op = finals[op_id]
        states[op["state"]] = states.get(op["state"], 0) + 1
        last = max(last, op["updated_at"])
        if op["state"] == "succeeded":
            latencies.append(op["updated_at"] - start)
        else:
            failures += 1
    result = PhaseResult("armsproxy", last - min(submitted_at.values()), latencies, failures)
    result.notes.append(
        f"push.submit call p50 {quantile(submit_calls, 50) * 1000:.1f} ms; "
        f"{polls} push.list polls ({polls / max(result.elapsed, 1e-9):.0f}/s)")
    if failures:
        result.notes.append(f"final states: {states}")
    return result


@implementer(IOpenSSLClientConnectionCreator)
class _BareTLS:
    """Client TLS like a push needs at the least: no SNI, chain to the CA, no session reuse.

    bench/tunnels.py's devices cap the version and release idle buffers so that thousands of
    connections fit in one process.
    """

    def __init__(self, ca_pem: bytes, *, tls_max: str = "1.3",
                 release_buffers: bool = False) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        if tls_max == "1.2":
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
        if release_buffers:
            ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca_pem))
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        self.ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_connect_state()
        return conn


async def timed(run: Awaitable[PhaseResult], pids: dict[str, int]) -> PhaseResult:
    """Await ``run`` (a coroutine not yet started) with the CPU of ``pids`` read, settled,
    just before and just after (bench/cpu.py); also the machine's busy CPU over that time."""
    from twisted.internet import threads

    before = await threads.deferToThread(cpu.settled, pids)
    machine, start = cpu.machine_busy(), time.monotonic()
    result = await run
    after = await threads.deferToThread(cpu.settled, pids)
    result.cpu_wall = time.monotonic() - start
    result.cpu = {k: after[k] - before[k] for k in pids}
    result.cpu["machine"] = cpu.machine_busy() - machine
    return result


async def baseline_phase(devices: list[dict[str, Any]], ca_pem: bytes, total: int,
                         concurrency: int, warmup: int, pids: dict[str, int] | None = None
                         ) -> PhaseResult:
    """``warmup`` then ``total`` bare push requests over fresh TLS connections,
    ``concurrency`` at a time; the CPU of this process ("baseline client") and of ``pids``
    over the measured requests."""
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
    from twisted.internet.protocol import Protocol

    from armsproxy.arms.framing import build_push_request
    from armsproxy.push import operations as ops

    tls = _BareTLS(ca_pem)
    requests = []
    for d in devices:
        per_op = []
        for operation, params in ONE_WAY_MIX:
            body = ops.build_request(operation, d["distid"],
                                     ops.validate_order_params(operation, params), result_url=None)
            per_op.append(build_push_request("127.0.0.1", d["port"], d["distid"], KEY, body))
        requests.append(per_op)
    latencies: list[float] = []
    failures = 0
    next_index = 0

    class One(Protocol):
        def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
            self.request = request
            self.done = done
            self.data = bytearray()

        def connectionMade(self) -> None:
            self.transport.write(self.request)

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(bytes(self.data))

    async def one(i: int) -> bool:
        device = devices[i % len(devices)]
        request = requests[i % len(devices)][(i // len(devices)) % len(ONE_WAY_MIX)]
        done: defer.Deferred[bytes] = defer.Deferred()
        endpoint = wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", device["port"]))
        try:
            await connectProtocol(endpoint, One(request, done))
            answer = await done
        except Exception:
            return False
        return answer.startswith(b"HTTP/1.0 200") and b"<result-code>100</result-code>" in answer

    async def slot() -> None:
        nonlocal next_index, failures
        while next_index < total:
            i = next_index
            next_index += 1
            start = time.perf_counter()
            if await one(i):
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1

    async def load() -> PhaseResult:
        start = time.perf_counter()
        await defer.gatherResults([defer.ensureDeferred(slot()) for _ in range(concurrency)],
                                  consumeErrors=True)
        return PhaseResult("baseline", time.perf_counter() - start, latencies, failures)

    for i in range(warmup):
        await one(i)
    return await timed(load(), {BASELINE_NAME: os.getpid(), **(pids or {})})


async def baseline_process(args: argparse.Namespace, work: Path, pids: dict[str, int]
                           ) -> PhaseResult:
    """:func:`baseline_phase` in a new process (``--baseline``), so that the bare client's
    CPU is its own and not this process's, which is the RS."""
    from twisted.internet import threads

    command = [sys.executable, str(Path(__file__).resolve()), "--baseline", str(work),
               "--operations", str(args.operations), "--concurrency", str(args.concurrency),
               "--timeout", str(args.timeout),
               "--watch", ",".join(f"{name}={pid}" for name, pid in pids.items())]
    out = await threads.deferToThread(
        subprocess.run, command, cwd=work, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=args.timeout,
        preexec_fn=_die_with_parent)
    if out.returncode != 0:
        raise SystemExit(f"baseline client exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return PhaseResult(**json.loads(out.stdout.strip().splitlines()[-1]))


async def measure(args: argparse.Namespace, gate_url: str, devices: list[dict[str, Any]],
                  work: Path, pids: dict[str, int]) -> list[list[PhaseResult]]:
    """Warm-up, then ``args.runs`` times: the baseline client (its own process), then the
    pushes through armsproxy; the CPU of ``pids`` and of this process over each."""
    from twisted.internet import reactor

    gate = Gate(reactor, gate_url, args.concurrency + 4)
    mix = TWO_WAY_MIX if args.mix else ONE_WAY_MIX
    k = len(devices)
    # Warm-up: every SA once (the key cache, connection pools, first-use imports).
    await push_phase(gate, devices, mix, k * len(mix), args.concurrency, args.poll, "warm")
    watched = {**pids, RS_NAME: os.getpid()}
    runs = []
    for run in range(args.runs):
        baseline = await baseline_process(args, work, {"SAs": pids["SAs"]})
        pushed = await timed(push_phase(gate, devices, mix, args.operations, args.concurrency,
                                        args.poll, f"bench{run}"), watched)
        runs.append([baseline, pushed])
    await gate.pool.closeCachedConnections()
    return runs


def run_reactor(coro_fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``coro_fn()`` on the reactor; SystemExit on Ctrl-C, SIGTERM or ``timeout``."""
    from twisted.internet import defer, reactor
    from twisted.internet.error import ReactorNotRunning

    outcome: list[Any] = []

    def finish(result: object) -> None:
        if not outcome:
            outcome.append(result)
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    def interrupted() -> None:
        # A signal stopped the reactor: whatever the phase was doing is void.
        finish(SystemExit("interrupted"))

    def go() -> None:
        d = defer.ensureDeferred(coro_fn())
        d.addBoth(finish)

    reactor.callWhenRunning(go)
    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    watchdog = reactor.callLater(
        timeout, finish, SystemExit(f"the run took longer than --timeout {timeout:.0f} s"))
    reactor.run()
    if watchdog.active():
        watchdog.cancel()
    first = outcome[0] if outcome else SystemExit("interrupted")
    if isinstance(first, SystemExit):
        raise first
    if hasattr(first, "raiseException"):
        first.raiseException()
    return first


def report(args: argparse.Namespace, k: int, setup: dict[str, float],
           runs: list[list[PhaseResult]]) -> None:
    mix = TWO_WAY_MIX if args.mix else ONE_WAY_MIX
    print(f"push benchmark: {k} simulated SAs (https-simple), {args.operations} operations, "
          f"{args.concurrency} in flight, {len(runs)} run(s); mix {', '.join(op for op, _ in mix)}"
          f"; SA setup {setup['setup_seconds']:.1f} s (of which registering and issuing "
          f"certificates {setup['certify_seconds']:.1f} s); demo RS in its own process")
    per_op: dict[str, list[float]] = {"armsproxy": [], BASELINE_NAME: [], "demo RS": []}
    for n, results in enumerate(runs):
        if len(runs) > 1:
            print(f"run {n + 1} of {len(runs)}")
        for r in results:
            what = "pushes/s" if r.name == "armsproxy" else "req/s   "
            print(f"{r.name:9s} {len(r.latencies):6d} ok {r.failures:4d} failed "
                  f"{r.rate:8.1f} {what} p50 {quantile(r.latencies, 50) * 1000:7.1f} ms  "
                  f"p99 {quantile(r.latencies, 99) * 1000:7.1f} ms")
            ok = len(r.latencies)
            own = {name: v for name, v in r.cpu.items() if name != "machine"}
            for name in per_op:
                if name in own:
                    per_op[name].append(cpu.per_op_ms(own[name], ok))
            others = r.cpu.get("machine", 0.0) - sum(own.values())
            print(f"          CPU per {'push' if r.name == 'armsproxy' else 'request'}: "
                  + ", ".join(f"{name} {cpu.per_op_ms(v, ok):.3f} ms" for name, v in own.items())
                  + "; busy: " + ", ".join(f"{name} {v / r.cpu_wall * 100:.0f}%"
                                           for name, v in own.items())
                  + f", other processes {max(others, 0) / r.cpu_wall * 100:.0f}% "
                  f"(of one core; {os.cpu_count()} cores)")
            for note in r.notes:
                print(f"          {note}")
        by = {r.name: r for r in results}
        ratio = by["armsproxy"].rate / by["baseline"].rate if by["baseline"].rate else 0.0
        print(f"ratio armsproxy/baseline: {ratio:.2f}"
              + ("  (baseline sends 1-way requests only)" if args.mix else ""))
    medians = {name: cpu.median(values) for name, values in per_op.items()}
    print(f"CPU per operation, median of {len(runs)} run(s): armsproxy "
          f"{medians['armsproxy']:.3f} ms per push, baseline client "
          f"{medians[BASELINE_NAME]:.3f} ms per request; demo RS {medians['demo RS']:.3f} ms "
          f"per push (its own process, not in armsproxy's)"
          + ("; baseline sends 1-way requests only" if args.mix else ""))
    print(cpu.ratio_line(medians[BASELINE_NAME], medians["armsproxy"]))


def print_profile(path: Path, out: Path | None) -> None:
    import pstats

    if not path.exists():
        print(f"no profile written to {path}")
        return
    stats = pstats.Stats(str(path))
    if out is not None:
        stats.dump_stats(str(out))
        print(f"\narmsproxy profile (cProfile, reactor thread) saved to {out}")
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sas", "-k", type=int, default=20, help="simulated SAs (K)")
    parser.add_argument("--operations", "-m", type=int, default=1000, help="operations (M)")
    parser.add_argument("--concurrency", "-c", type=int, default=None,
                        help="orders (and baseline connections) in flight; default K")
    parser.add_argument("--mix", action="store_true",
                        help="add 2-way operations (ping, read-status) to the 1-way ones")
    parser.add_argument("--poll", type=float, default=0.005,
                        help="seconds between push.list polls for finished orders")
    parser.add_argument("--profile", type=Path, default=None,
                        help="run armsproxy under cProfile, save the stats here, print the top")
    parser.add_argument("--runs", type=int, default=1,
                        help="measured phases (baseline, then armsproxy) on the same processes; "
                             "the median CPU per operation is compared")
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up (and clean up) after this many seconds; "
                             "default 240 + 60 per run")
    parser.add_argument("--devices", type=Path, help=argparse.SUPPRESS)  # child mode: work dir
    parser.add_argument("--proxy-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)  # child mode: work dir
    parser.add_argument("--watch", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs >= 1")
    args.timeout = args.timeout or 240.0 + 60.0 * args.runs
    if args.devices:
        serve_devices(args.devices, args.sas, args.proxy_port, args.timeout)
        return 0
    if args.baseline:
        devices = json.loads((args.baseline / "devices.json").read_text())["devices"]
        ca_pem = (args.baseline / "data" / "pki" / "ca.pem").read_bytes()
        watch = {name: int(pid) for name, pid in
                 (item.rsplit("=", 1) for item in args.watch.split(",") if item)}
        result = run_reactor(lambda: baseline_phase(
            devices, ca_pem, args.operations, args.concurrency or len(devices),
            warmup=len(devices), pids=watch), args.timeout)
        print(json.dumps(dataclasses.asdict(result)))
        return 0
    if not 1 <= args.sas <= 0xFFFF or args.operations < 1:
        parser.error("--sas 1..65535 and --operations >= 1")
    args.concurrency = args.concurrency or args.sas
    if not 1 <= args.concurrency <= PAGE:
        parser.error(f"--concurrency 1..{PAGE}")
    started = time.monotonic()
    # Agent's pooled transports lack abortConnection; readBody warns about it on every call.
    warnings.filterwarnings("ignore", category=DeprecationWarning, message="Using readBody")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))

    with tempfile.TemporaryDirectory(prefix="armsproxy-bench-push-") as tmp:
        work = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            sa_port, rs_port, gate_port = free_port(), free_port(), free_port()
            # The demo RS in a process of its own, as bench/tunnels.py --rs-process runs it.
            conf = cpu.armsproxy_config(work, sa_port, rs_port, gate_port)
            rs_log = work / "demo-rs.log"
            rs = spawn(["-m", "armsproxy.demo_rs.cli", "--db",
                        str(work / "data" / "demo-rs.sqlite"), "serve", "--listen",
                        f"tcp:{rs_port}:interface=127.0.0.1"], work, rs_log)
            procs.append(rs)
            wait_until(port_open(rs_port), rs, rs_log, "demo RS", 60)
            profile = work / "proxy.prof"
            if args.profile:  # twistd's profiler; it writes debug lines too (no level filter)
                twistd = ["-c", "from twisted.scripts.twistd import run; run()", "-n",
                          "--pidfile=", f"--logfile={work / 'twistd.log'}",
                          f"--profile={profile}", "--profiler=cprofile", "--savestats"]
            else:
                twistd = cpu.twist_args(work / "twist.log")
            twistd += ["armsproxy", "--config", str(conf)]
            proxy_log = work / "proxy.log"
            proxy = spawn(twistd, work, proxy_log)
            procs.append(proxy)
            wait_until(lambda: port_open(sa_port)() and port_open(gate_port)(), proxy,
                       proxy_log, "armsproxy", 60)
            devices_log = work / "devices.log"
            remaining = args.timeout - (time.monotonic() - started)
            devices_proc = spawn([str(Path(__file__).resolve()), "--devices", str(work),
                                  "--sas", str(args.sas), "--proxy-port", str(sa_port),
                                  "--timeout", str(max(remaining, 1.0))], work, devices_log)
            procs.append(devices_proc)
            wait_until((work / "devices.json").exists, devices_proc, devices_log,
                       "simulated SAs", max(remaining, 1.0))
            ready = json.loads((work / "devices.json").read_text())
            results = run_reactor(
                lambda: measure(args, f"http://127.0.0.1:{gate_port}/RPC2", ready["devices"],
                                work, {"armsproxy": proxy.pid, "demo RS": rs.pid,
                                       "SAs": devices_proc.pid}),
                args.timeout - (time.monotonic() - started))
            report(args, len(ready["devices"]), ready, results)
        finally:
            for proc in reversed(procs):
                stop(proc)
        if args.profile:
            print_profile(profile, args.profile)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted")
