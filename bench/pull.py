"""Pull benchmark: CPU per config-solicitation of armsproxy against a bare TLS server.

    python bench/pull.py [--concurrency 20] [--requests 2000] [--runs 1]

``--concurrency`` simulated devices send config-solicitations one after the other, a new TLS
connection per request as devices do, ``--requests`` in all, to two servers in turn:

* armsproxy, as ``twist --log-level=info armsproxy`` (as etc/armsproxy.service runs it: twistd
  would write debug lines too), set up as the embedded default is (dev PKI, SQLite, the same
  SA gate listener and certificates) but with the demo RS in a process of its own
  (bench/cpu.py's ``armsproxy_config``, as bench/tunnels.py --rs-process runs it): in
  production the RS is elsewhere, so armsproxy's process holds armsproxy's work only. The
  demo RS's CPU per request is printed apart, for information;
* the baseline, what answering a pull costs at the least: a bare Twisted TLS server (this
  file, ``--serve-bare``) answering a canned config-solicitation response (accept, handshake,
  read, one write, close), through the same TLS listener code (armsproxy.tls) and policy. It
  serves the certificate and key files armsproxy's SA gate names and, beside them on the same
  OpenSSL context, the ECDSA pair the gate names, or else one the data dir's pki/ holds (a
  file with an EC key and the certificate that matches it), if any: both servers then make
  the same handshake. The load generator prints what each one presented.

The figure compared is the CPU per request of each server process (bench/cpu.py: utime + stime
of every thread, from /proc/PID/stat), over the measured load only: after a warm-up round (one
request per device: key cache, TLS and first-use costs), with the readings taken once the
processes are quiet so that what the load left behind is charged to it. Wall-clock rates on a
shared 2-core machine move by 20% or more with other load; CPU per request much less, since
waiting for a core costs none. Requests/s and p50/p99 latency (seen by the devices) are printed
too, for information only: the load generator, a process of its own (a new one per measured
load, separate from both servers), competes with the server for the two cores.

``--runs R`` repeats the measured loads R times (the bare server, then armsproxy) on the same
servers; the summary gives the median CPU per request of each, and the last line is
``cpu_ratio=<bare server's CPU per request / armsproxy's>``: 1.00 would be armsproxy costing
what the bare server does; the aim is at most twice, 0.50.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
CANNED = ROOT / "tests" / "vectors" / "simple" / "02-config-solicitation.response.txt"


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


# -- the bare baseline server (run as a child process) ----------------------------------------

def ec_pair(pki: Path, skip: Sequence[Path] = ()) -> tuple[Path, Path] | None:
    """(certificate, key) of the first EC private key in ``pki`` (not in ``skip``) that a
    non-CA certificate there matches; None if there is none."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    if not pki.is_dir():
        return None
    skipped = {s.resolve() for s in skip}
    files = [p for p in sorted(pki.iterdir())
             if p.is_file() and p.stat().st_size < 65536 and p.resolve() not in skipped]

    def spki(public_key: Any) -> bytes:
        return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    certs: list[tuple[Path, bytes]] = []
    for path in files:
        data = path.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in data:
            continue
        try:
            cert = x509.load_pem_x509_certificate(data)
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
            is_ca = constraints.value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        except ValueError:
            continue
        if not is_ca:
            certs.append((path, spki(cert.public_key())))
    for path in files:
        data = path.read_bytes()
        if b"PRIVATE KEY-----" not in data:
            continue
        try:
            key = load_pem_private_key(data, None)
        except (ValueError, TypeError):
            continue
        if isinstance(key, ec.EllipticCurvePrivateKey):
            for cert_path, public in certs:
                if public == spki(key.public_key()):
                    return cert_path, path
    return None


def serve_bare(port: int, cert: str, key: str, ecdsa: tuple[Path, Path] | None,
               pki: Path | None) -> None:
    """The baseline: a bare TLS server answering the canned response, serving ``cert`` and
    ``key`` and, beside them, the ECDSA pair ``ecdsa`` (certificate, key) or else the one
    :func:`ec_pair` finds in ``pki``, if any."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
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
    pair = ecdsa or (ec_pair(pki, [Path(cert), Path(key)]) if pki is not None else None)
    if pair is not None:
        # The second (ECDSA) certificate beside the RSA one, on the same context: OpenSSL
        # picks the one the client's signature algorithms prefer, as armsproxy's would.
        context = listener.options.getContext()
        context.use_certificate(x509.load_pem_x509_certificate(pair[0].read_bytes()))
        context.use_privatekey(load_pem_private_key(pair[1].read_bytes(), None))
        context.check_privatekey()
    print(f"bare server: {Path(cert).name} + {Path(key).name}"
          + (f", ECDSA {pair[0].name} + {pair[1].name}" if pair else ", no ECDSA pair")
          + f" (in {Path(key).parent})", flush=True)
    listener.listen(Factory.forProtocol(Bare))
    reactor.run()


# -- load generation (a child process per measured load) -------------------------------------

def run_load(port: int, path: str, ca_pem: bytes, concurrency: int, requests: int,
             pids: dict[str, int]) -> dict[str, Any]:
    """Warm up, then ``requests`` config-solicitations ``concurrency`` at a time; the servers'
    CPU (``pids``) read, settled, just before and just after."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from twisted.internet import defer, reactor, threads
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
    handshake: list[str] = []

    def describe(transport: Any) -> str:
        public = transport.getPeerCertificate().to_cryptography().public_key()
        if isinstance(public, rsa.RSAPublicKey):
            kind = f"RSA-{public.key_size}"
        elif isinstance(public, ec.EllipticCurvePublicKey):
            kind = f"ECDSA-{public.curve.name}"
        else:
            kind = type(public).__name__
        conn = getattr(transport, "_tlsConnection", None)
        if conn is None:
            return kind
        return f"{conn.get_protocol_version_name()} {conn.get_cipher_name()} {kind}"

    class One(Protocol):
        def __init__(self, done: defer.Deferred[bytes]) -> None:
            self.done = done
            self.data = bytearray()

        def connectionMade(self) -> None:
            self.transport.write(request)

        def dataReceived(self, data: bytes) -> None:
            if not handshake:
                with contextlib.suppress(Exception):
                    handshake.append(describe(self.transport))
            self.data += data

        def connectionLost(self, reason: object = None) -> None:
            self.done.callback(bytes(self.data))

    async def one() -> None:
        nonlocal failures
        start = time.perf_counter()
        done: defer.Deferred[bytes] = defer.Deferred()
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
        latencies.append(time.perf_counter() - start)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    async def main() -> dict[str, Any]:
        nonlocal failures
        # Warm-up, one request per device: key fetch, TLS caches, first-use costs.
        await defer.gatherResults([defer.ensureDeferred(worker(1)) for _ in range(concurrency)])
        if failures:
            raise RuntimeError(f"{failures} of {concurrency} warm-up requests failed")
        latencies.clear()
        per = [requests // concurrency + (1 if i < requests % concurrency else 0)
               for i in range(concurrency)]
        before = await threads.deferToThread(cpu.settled, pids)
        machine, own, wall = cpu.machine_busy(), cpu.process_cpu(), time.monotonic()
        start = time.perf_counter()
        await defer.gatherResults([defer.ensureDeferred(worker(n)) for n in per])
        elapsed = time.perf_counter() - start
        after = await threads.deferToThread(cpu.settled, pids)
        wall = time.monotonic() - wall
        used = {k: after[k] - before[k] for k in pids}
        others = cpu.machine_busy() - machine - sum(used.values()) - (cpu.process_cpu() - own)
        return {"elapsed": elapsed, "failures": failures, "latencies": latencies, "cpu": used,
                "wall": wall, "others": max(others, 0.0), "handshake": handshake[:1]}

    result: list[Any] = []

    def go() -> None:
        d = defer.ensureDeferred(main())
        d.addBoth(lambda r: (result.append(r), reactor.stop()))

    reactor.callWhenRunning(go)
    reactor.run()
    if not isinstance(result[0], dict):
        raise SystemExit(f"load failed: {result[0]}")
    return result[0]


def quantile(values: list[float], q: int) -> float:
    import statistics

    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- orchestration -------------------------------------------------------------------------------

def measure(kind: str, port: int, path: str, args: argparse.Namespace, work: Path,
            pids: dict[str, int]) -> dict[str, Any]:
    """One measured load against one server, from a fresh load-generator process."""
    out = subprocess.run(
        [sys.executable, __file__, "--load", "--port", str(port), "--path", path,
         "--ca", str(work / "data" / "pki" / "ca.pem"), "--concurrency", str(args.concurrency),
         "--requests", str(args.requests),
         "--pids", ",".join(f"{name}={pid}" for name, pid in pids.items())],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=args.timeout,
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind}: load generator exited with {out.returncode}:\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(name: str, server: str, result: dict[str, Any]) -> dict[str, float]:
    """Print one measured load; CPU ms per successful request, by process."""
    lat = result["latencies"]
    n = len(lat)
    print(f"{name:6s} {n:6d} ok {result['failures']:4d} failed  "
          f"{n / result['elapsed']:8.1f} req/s  p50 {quantile(lat, 50) * 1000:7.1f} ms  "
          f"p99 {quantile(lat, 99) * 1000:7.1f} ms")
    per_op = {k: cpu.per_op_ms(v, n) for k, v in result["cpu"].items()}
    wall = max(result["wall"], 1e-9)
    print(f"       CPU per request: {server} {per_op[server]:.3f} ms"
          + "".join(f", {k} {v:.3f} ms (its own process, not in {server}'s)"
                    for k, v in per_op.items() if k != server)
          + "; busy: " + ", ".join(f"{k} {v / wall * 100:.0f}%" for k, v in result["cpu"].items())
          + f", other processes {result['others'] / wall * 100:.0f}% "
          f"(of one core; {os.cpu_count()} cores)")
    return per_op


def sa_gate_files(conf: Path) -> list[str]:
    """The certificate and key files the SA gate of config ``conf`` serves, as --serve-bare
    arguments: CERT KEY [--ecdsa CERT KEY]."""
    import configparser

    from armsproxy.tls import split_endpoint

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(conf)
    spec = split_endpoint(parser["sa_gate"]["listen"])
    key = spec.kwargs["privateKey"]
    files = [spec.kwargs.get("certKey") or key, key]
    ecdsa_key = spec.kwargs.get("ecdsaPrivateKey")
    if ecdsa_key:
        files += ["--ecdsa", spec.kwargs.get("ecdsaCertKey") or ecdsa_key, ecdsa_key]
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=20, help="devices at a time")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measured load")
    parser.add_argument("--runs", type=int, default=1,
                        help="measured loads per server; the median CPU per request is compared")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="give up on one measured load after this many seconds")
    parser.add_argument("--serve-bare", nargs=3, metavar=("PORT", "CERT", "KEY"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--ecdsa", nargs=2, type=Path, metavar=("CERT", "KEY"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        port, cert, key = args.serve_bare
        serve_bare(int(port), cert, key, tuple(args.ecdsa) if args.ecdsa else None, args.pki)
        return 0
    if args.load:
        pids = {name: int(pid) for name, pid in
                (item.rsplit("=", 1) for item in args.pids.split(","))}
        result = run_load(args.port, args.path, args.ca.read_bytes(), args.concurrency,
                          args.requests, pids)
        print(json.dumps(result))
        return 0
    if args.concurrency < 1 or args.requests < args.concurrency or args.runs < 1:
        parser.error("--concurrency >= 1, --requests >= --concurrency, --runs >= 1")

    push = cpu.load("push")  # bench/push.py: process helpers
    with tempfile.TemporaryDirectory(prefix="armsproxy-bench-pull-") as tmp:
        work = Path(tmp)
        data = work / "data"
        sa_port, rs_port, gate_port, bare_port = (push.free_port() for _ in range(4))
        conf = cpu.armsproxy_config(work, sa_port, rs_port, gate_port)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            rs_log = work / "demo-rs.log"
            rs = push.spawn(["-m", "armsproxy.demo_rs.cli", "--db", str(data / "demo-rs.sqlite"),
                             "serve", "--listen", f"tcp:{rs_port}:interface=127.0.0.1"],
                            work, rs_log)
            procs.append(rs)
            push.wait_until(push.port_open(rs_port), rs, rs_log, "demo RS", 60)
            proxy_log = work / "proxy.log"
            proxy = push.spawn([*cpu.twist_args(work / "twist.log"), "armsproxy",
                                "--config", str(conf)], work, proxy_log)
            procs.append(proxy)
            bare_log = work / "bare.log"
            bare = push.spawn([str(Path(__file__).resolve()), "--serve-bare", str(bare_port),
                               *sa_gate_files(conf), "--pki", str(data / "pki")], work, bare_log)
            procs.append(bare)
            push.wait_until(lambda: push.port_open(sa_port)() and push.port_open(gate_port)(),
                            proxy, proxy_log, "armsproxy", 60)
            push.wait_until(push.port_open(bare_port), bare, bare_log, "bare server", 60)
            from armsproxy.demo_rs import cli as demo_cli

            db = str(data / "demo-rs.sqlite")
            with contextlib.redirect_stdout(sys.stderr):
                demo_cli.main(["--db", db, "register", DISTID, "--key", KEY,
                               "--module", "1:1.0.0:harness-module",
                               "--heartbeat", "127.0.0.1:18447:harness-hb:60"])
                demo_cli.main(["--db", db, "issue-cert", DISTID, "--ca-cert",
                               str(data / "pki" / "ca.pem"), "--ca-key",
                               str(data / "pki" / "ca.key")])
            print(f"config-solicitation, {args.concurrency} concurrent devices, "
                  f"{args.requests} requests per load, new TLS connection each, {args.runs} "
                  f"run(s); servers and load generator: 1 process each, demo RS in its own")
            print(bare_log.read_text().strip().splitlines()[-1])
            servers = {"bare": (bare_port, "/", {"bare server": bare.pid}),
                       "proxy": (sa_port, "/arms", {"armsproxy": proxy.pid, "demo RS": rs.pid})}
            per_run: dict[str, list[float]] = {"bare server": [], "armsproxy": [], "demo RS": []}
            for run in range(args.runs):
                if args.runs > 1:
                    print(f"run {run + 1} of {args.runs}")
                rates: dict[str, float] = {}
                seen: dict[str, str] = {}
                for kind, (port, path, pids) in servers.items():
                    result = measure(kind, port, path, args, work, pids)
                    server = next(iter(pids))
                    for name, value in summarise(kind, server, result).items():
                        per_run[name].append(value)
                    rates[kind] = len(result["latencies"]) / result["elapsed"]
                    seen[kind] = (result["handshake"] or ["?"])[0]
                print(f"ratio proxy/bare (requests/s): {rates['proxy'] / rates['bare']:.2f}")
                if run == 0:
                    same = "same" if seen["bare"] == seen["proxy"] else \
                        "DIFFERENT: the CPU figures compare different handshakes"
                    print(f"handshake: bare {seen['bare']}; proxy {seen['proxy']} ({same})")
            medians = {name: cpu.median(values) for name, values in per_run.items()}
            print(f"CPU per request, median of {args.runs} run(s): armsproxy "
                  f"{medians['armsproxy']:.3f} ms, bare server {medians['bare server']:.3f} ms; "
                  f"demo RS {medians['demo RS']:.3f} ms (its own process, not in armsproxy's)")
            print(cpu.ratio_line(medians["bare server"], medians["armsproxy"]))
        finally:
            for proc in reversed(procs):
                push.stop(proc)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted")
