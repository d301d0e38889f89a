"""Pull benchmark: simulated devices doing config-solicitation against armsproxy + demo RS.

    python bench/pull.py [--concurrency 20] [--requests 2000]

Each request uses a new TLS connection, as devices do. In the same run the same load goes to
a bare Twisted TLS server that answers a canned config-solicitation response (what a proxy
costs at the least: accept, handshake, read, one write, close). Both servers run as separate
processes; this process generates the load. Prints requests/s, p50/p99 latency and the
ratio proxy/bare.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
CANNED = ROOT / "tests" / "vectors" / "simple" / "02-config-solicitation.response.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


# -- the bare baseline server (run as a child process) ----------------------------------------

def serve_bare(port: int, cert: str, key: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from armsproxy.tls import TLSPolicy, tls_listener

    canned = CANNED.read_bytes()

    class Bare(Protocol):
        def connectionMade(self) -> None:
            self.buf = b""

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            head, sep, body = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(body) >= length:
                self.transport.write(canned)
                self.transport.loseConnection()

    listener = tls_listener(
        reactor, f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}", TLSPolicy()
    )
    listener.listen(Factory.forProtocol(Bare))
    reactor.run()


# -- load generation ----------------------------------------------------------------------------

def run_load(port: int, path: str, ca_pem: bytes, concurrency: int, requests: int
             ) -> tuple[float, list[float], int, bytes]:
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
    from twisted.internet.protocol import Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    from armsproxy.device import SimulatedSA

    request = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca_pem).build_config_solicitation(
        f"https://127.0.0.1:{port}{path}").data
    ca = Certificate.loadPEM(ca_pem)
    # Devices check no host name (§2.1); the bench certificate carries 127.0.0.1 anyway.
    options = optionsForClientTLS("127.0.0.1", trustRoot=ca)
    latencies: list[float] = []
    failures = 0
    sample = b""

    class One(Protocol):
        def __init__(self, done: defer.Deferred) -> None:
            self.done = done
            self.data = bytearray()

        def connectionMade(self) -> None:
            self.transport.write(request)

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: object = None) -> None:
            self.done.callback(bytes(self.data))

    async def one() -> None:
        nonlocal failures, sample
        start = time.perf_counter()
        done: defer.Deferred = defer.Deferred()
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        try:
            await connectProtocol(endpoint, One(done))
            answer = await done
        except Exception:
            failures += 1
            return
        if not answer.startswith(b"HTTP/1.1 200") or b"<result-code>100<" not in answer:
            failures += 1
            return
        sample = answer
        latencies.append(time.perf_counter() - start)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async def main() -> float:
        await one()  # warm-up: key fetch, TLS caches
        latencies.clear()
        per = [requests // concurrency + (1 if i < requests % concurrency else 0)
               for i in range(concurrency)]
        start = time.perf_counter()
        await defer.gatherResults([defer.ensureDeferred(worker(n)) for n in per])
        return time.perf_counter() - start

    result: list = []

    def go() -> None:
        d = defer.ensureDeferred(main())
        d.addBoth(lambda r: (result.append(r), reactor.stop()))

    reactor.callWhenRunning(go)
    reactor.run()
    if not isinstance(result[0], float):
        raise SystemExit(f"load failed: {result[0]}")
    return result[0], latencies, failures, sample


def summarise(name: str, elapsed: float, latencies: list[float], failures: int) -> float:
    n = len(latencies)
    rate = n / elapsed
    q = statistics.quantiles(latencies, n=100) if n > 1 else [0.0] * 99
    print(f"{name:6s} {n:6d} ok {failures:4d} failed  {rate:8.1f} req/s  "
          f"p50 {q[49] * 1000:7.1f} ms  p99 {q[98] * 1000:7.1f} ms")
    return rate


def child(target: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=target)


def measure(kind: str, args: argparse.Namespace, work: Path) -> tuple:
    """Run one server kind in a child process and load it from a fresh child process."""
    out = subprocess.run(
        [sys.executable, __file__, "--load", kind, "--concurrency", str(args.concurrency),
         "--requests", str(args.requests), "--work", str(work)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, check=True,
    )
    return tuple(out.stdout.strip().splitlines()[-1].split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--serve-bare", nargs=3, metavar=("PORT", "CERT", "KEY"))
    parser.add_argument("--load", choices=("proxy", "bare"))
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.serve_bare:
        port, cert, key = args.serve_bare
        serve_bare(int(port), cert, key)
        return
    if args.load:
        work = Path(args.work)
        port = int((work / f"{args.load}.port").read_text())
        ca = (work / "data" / "pki" / "ca.pem").read_bytes()
        path = "/arms" if args.load == "proxy" else "/"
        elapsed, lat, failed, _sample = run_load(port, path, ca, args.concurrency, args.requests)
        print(f"{elapsed},{failed}," + " ".join(f"{x:.6f}" for x in lat))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        proxy_port, rs_port, bare_port = free_port(), free_port(), free_port()
        proxy = child(tmp, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                      "--pidfile=", f"--logfile={work / 'twistd.log'}", "armsproxy",
                      "--data-dir", str(data), "--port", str(proxy_port), "--rs-port", str(rs_port),
                      "--rs-gate-port", str(free_port()), "--management-port", "0")
        procs = [proxy]
        try:
            wait_port(proxy_port, proxy)
            from armsproxy.demo_rs import cli as demo_cli

            db = str(data / "demo-rs.sqlite")
            demo_cli.main(["--db", db, "register", DISTID, "--key", KEY,
                           "--module", "1:1.0.0:harness-module",
                           "--heartbeat", "127.0.0.1:18447:harness-hb:60"])
            demo_cli.main(["--db", db, "issue-cert", DISTID, "--ca-cert",
                           str(data / "pki" / "ca.pem"), "--ca-key", str(data / "pki" / "ca.key")])
            bare = child(tmp, __file__, "--serve-bare", str(bare_port),
                         str(data / "pki" / "server.pem"), str(data / "pki" / "server.key"))
            procs.append(bare)
            wait_port(bare_port, bare)
            (work / "proxy.port").write_text(str(proxy_port))
            (work / "bare.port").write_text(str(bare_port))
            print(f"config-solicitation, {args.concurrency} concurrent devices, "
                  f"{args.requests} requests, new TLS connection each; servers: 1 process each")
            rates = {}
            for kind in ("bare", "proxy"):
                elapsed, failed, lat = measure(kind, args, work)
                latencies = [float(x) for x in lat.split()]
                rates[kind] = summarise(kind, float(elapsed), latencies, int(failed))
            print(f"ratio proxy/bare: {rates['proxy'] / rates['bare']:.2f}")
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)


if __name__ == "__main__":
    main()
