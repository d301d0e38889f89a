"""Tunnel benchmark: N idle https-tunnels from simulated SAs to one armsproxy, then pushes.

    python bench/tunnels.py [-n 1000] [-m 2000] [--runs 1] [--rate 1000 | --concurrency C]
                            [--clients 2] [--echo-interval 60] [--steps 2]
                            [--no-rs-process] [--profile FILE] [--diagnose]
                            [--tracemalloc FRAMES]

Its last line is ``cpu_ms_per_op=<x.xxx> kib_per_idle_tunnel=<y.y>``: armsproxy's CPU per
tunnel operation, the delivery of the operation's RS events included (median of ``--runs``),
and its memory per idle tunnel. One run at the defaults takes about 1.5 minutes here.

What runs, and why this way:

* armsproxy (dev PKI, SQLite, the embedded default's settings), as
  ``twist --log-level=info armsproxy`` (as etc/armsproxy.service runs it: twistd would write
  debug lines too) in a child process, started through a few lines of bench code that add a
  SIGUSR2 hook (run ``gc.collect()`` and ``malloc_trim(0)`` and report VmRSS; start, read and stop
  tracemalloc; with ``--diagnose`` also object counts by type and ``mallinfo2``), with its
  management gate on (the bench reads ``armsproxy_events_pending`` there). armsproxy itself
  is not changed. The demo RS runs in a process of its own (as a production RS does), so
  that neither its CPU nor its memory is charged to armsproxy; ``--no-rs-process`` runs it
  inside armsproxy (the embedded default) instead.
* SAs are registered straight into the demo RS SQLite with ``armsproxy.demo_rs.db``
  (``register_sa`` for all in one transaction: 0.4 s for 10,000; the CLI costs 3.4 ms per SA
  called in-process, one commit each, and 0.4 s per SA as a command), with
  ``--push-methods https-tunnel``, one shared RS key and **no SA certificate**:
  the SA gate asks for no client certificate and a tunnel is authenticated by its Basic
  credentials alone, so issuing 10,000 RSA certificates would only cost time. The SAs do no
  config-solicitation and no push-method-query: armsproxy needs neither to accept a tunnel
  (it checks the key through its key cache: one ``arms.sa_key`` call to the demo RS per SA on
  the first open) and, without a query, watches each tunnel with its configured echo interval
  (60 s in the embedded default: a tunnel dies after 2 x 60 + 10 s without an echo-request).
* ``--clients`` SA processes (a mode of this file), each holding its share of the tunnels with
  a minimal tunnel client. ``SimulatedTunnelDevice`` (records every exchange, parses with lxml,
  a TLS context per device) measured 85 ms of CPU and 137 KiB per device to come up, i.e.
  14 minutes of CPU and 1.3 GiB for 10,000; this client takes ~2 ms and ~50 KiB per tunnel.
  Each tunnel is one TLS connection (TLS 1.2 or 1.3, ``--tls-max``; chain checked against the
  dev CA, no SNI, no session reuse) carrying exactly what a device
  sends, taken from the captures in tests/vectors/tunnel: the open header (04), the
  push-confirmation-start chunk message (05), the push-confirmation-done answer echoing the
  transaction-id (06), ``echo-request`` chunks (09) every ``--echo-interval`` seconds spread
  over the interval, and the answers to pushes (08 check-transaction, 20 read-module-list).
  Unlike libarms, a message goes out as one write (one TLS record) instead of header, data
  and CRLF as three: the bytes are the same, armsproxy reassembles any split. Right after
  answering push-confirmation-done a tunnel sends one echo-request: its echo-response proves
  that armsproxy has read the answer and registered the tunnel (they are handled in order),
  so the count of confirmed tunnels needs no RS call. Opening is paced (``--open-concurrency``
  connections being set up at a time across all clients) so the accept backlog never
  overflows.
* this process: orchestration, RSS readings, and the RS for the operations phase (XML-RPC over
  a pool of persistent raw HTTP/1.1 connections, marshalled with ``xmlrpc.client``: ~0.3 ms of
  CPU per operation, where bench/push.py's Agent-based client measured ~1 ms, which at
  1,000 calls/s would take this process's whole core).

Memory: armsproxy's VmRSS (/proc/PID/status) once it is quiet (its CPU under 15% of a core for
3 s: TLS handshakes, relays, store writes and RS events all drained). The baseline is taken
with ``--warm`` tunnels (default 20) already open, confirmed and pushed to, so that one-time
costs (imports, caches, first XML-RPC connections) are not charged to the tunnels, after
``gc.collect()`` and ``malloc_trim(0)``. The N tunnels are then opened in ``--steps`` equal
steps with a reading after each step: the first figure is the average (RSS_N - RSS_0)/N, the
step figures are the marginal cost, which is what a bigger N would add (bounded caches and
SQLite page caches stop growing). After ``--idle`` more seconds of echo traffic the reading
is repeated, then after ``gc.collect()`` and after ``malloc_trim(0)``. Then tracemalloc starts
(``--tracemalloc`` frames, default 1; 0: off) and ``--trace-tunnels`` more tunnels (K,
default N) open: what it saw allocated and still live once they are idle, / K, is their
Python part (the biggest sources are listed; from N to 2N tunnels, the process's dicts and
sets of connections grow as they did for the first N, so their share is in it); it is
stopped before the operations (it slows every allocation) and runs after the VmRSS readings
because its own bookkeeping (~6 KiB per tunnel in VmRSS, more than
``get_tracemalloc_memory()`` says) would inflate them. Per idle
tunnel: **in all** = (VmRSS after gc and trim - the baseline) / N, the figure of the last
line; **Python objects** from the traced K; **OpenSSL and the rest** = the difference:
OpenSSL's buffers and SSL objects (``bench/tls_memory.py`` measures those alone), glibc's
per-allocation overhead and fragmentation, SQLite.

Operations: M 1-way operations (check-transaction and read-module-list alternating,
round-robin over the N tunnels) through the RS gate's ``push.submit``; open loop at ``--rate``
(default 1,000/s; the submit of operation i is due at t0 + i/rate, whatever happened to the
others) or closed loop with ``--concurrency`` orders in flight (bench/push.py's push_phase).
Latency is submit -> final state: the final ``updated_at`` (armsproxy's clock) minus the wall
clock just before the submit was written (this process's clock; one host), so how often this
process looks does not change it; the open loop reads the results once, after all are final.
Achieved ops/s = successful operations / (last final - first submit). If the offered rate is
above what armsproxy can do, the queue grows during the run and the latencies measure it.
``--runs R`` runs R such phases over the same tunnels, one after the other.

CPU per operation: utime + stime of the whole armsproxy process (every thread) from
/proc/PID/stat, read just before the first submit and again once every operation is final
**and** armsproxy's event outbox is empty (``armsproxy_events_pending`` 0 on /metrics: the RS
has taken every event; the outbox sends them in ``arms.events`` batches), divided by the
operations submitted; so the delivery of each operation's events is charged to it, and the
bench's own reading of the results (after the window) is not. The window also holds what the
bench itself asks (a ``push.list`` poll every 0.2 s, a /metrics read every 0.1 s while events
are pending) and the idle tunnels' echoes (N/``--echo-interval`` a second).

``--profile FILE`` samples armsproxy with py-spy (raw format, 250 Hz, non-blocking, per thread)
during the operations phase and prints, for the reactor thread and the store's SQLite thread,
how busy they were, the share of each part of armsproxy, and the top lines. The CPU figures
per operation (whole process, and its reactor thread alone, from /proc) are always printed.

Measured here (2 cores, virtio disk, TLS 1.3 unless said), 1,000 and 10,000 tunnels:

* defaults (1,000 tunnels, 2,000 operations at 1,000/s offered, demo RS in its own process),
  3 runs each, a busy shared machine: before the tunnel room's diet (e1319b0)
  ``cpu_ms_per_op`` 1.540 / 2.340 / 1.550, ``kib_per_idle_tunnel`` 40.2 / 40.2 / 40.1, of
  which Python objects 6.0-6.2 KiB; after it (that commit + armsproxy/tunnel only) 1.585 /
  1.590 / 1.590 and 38.8 / 38.5 / 39.0 KiB, Python 4.2-4.3 KiB (the tunnel room's own share
  ~0.5 KiB: the session's slots, its distid, its deadline entry; the rest is Twisted's TCP
  and TLS objects, the SA gate's protocol and wrapper, the key cache). The tunnel room takes
  ~80 us of an operation's ~1.5 ms (most of it the XSD parse of the answer); the rest is the
  RS gate, the store, the engine and TLS.

* after issue #11's memory work (defaults, 3 runs, 2026-12): ``cpu_ms_per_op`` 1.285 / 1.235 /
  1.195, ``kib_per_idle_tunnel`` 36.5 / 36.9 / 36.9, of which Python objects 2.94 / 2.92 /
  2.91 KiB (was ~5.7) and OpenSSL and the rest 33.5-34.0. Gone per tunnel: the SA gate's
  protocol (the session becomes the TLS layer's protocol), the limit's ProtocolWrapper (the
  TLS factory counts), the SA cache's JSON-decoded record (~1.7 KiB; now a flat tuple of
  shared strings), the key cache entry's dict, and the 0.8 KiB dict Twisted's transport got
  once CPython's shared key table of ``tcp.Server`` was full (limits.py). Left: ~1.6 KiB
  Twisted and pyOpenSSL objects (transport, TLS protocol, SSL.Connection, socket, log
  strings), ~1.3 KiB armsproxy (session slots, distid and peer, deadline entry, the two
  cache entries). The reactor thread takes ~0.8 ms of an operation, the store's ~0.45.
* memory: 42.1 KiB per idle tunnel at 1,000 and 41.1 at 10,000 (marginal 40.6); with
  ``--tls-max 1.2`` 31.9 KiB. gc.collect() and malloc_trim() change nothing: it is live. Of
  it, OpenSSL (cryptography's bundled 4.0) ~33.5 KiB per TLS 1.3 connection (~24.6 for 1.2),
  16 KiB of which an SSL object takes before any byte (``bench/tls_memory.py``); Python
  objects ~8 KiB.
* setup: ~7-8 ms of armsproxy CPU per tunnel, 135-150 tunnels/s; 10,000 in 74 s.
* operations, before group commit: 350-430 ops/s at most (1,000 offered), armsproxy then at
  one full core (2.5-2.8 ms CPU per operation: ~1.5 reactor thread, ~1 SQLite thread, one GIL)
  with its store's SQLite thread spending about half its time in COMMIT (synchronous=FULL);
  with the data on tmpfs 506 ops/s. Below saturation: 200/s p99 9 ms, 250/s p99 26 ms,
  300/s p99 59 ms.
* operations with group commit (2026-12-02, a busier machine: the same old code measured
  p50 78 ms, p99 545 ms at 200/s that day): 200 tunnels 491-503 ops/s at most, 1,000
  tunnels 390 (embedded demo RS) and 435 (``--rs-process``), 10,000 tunnels 395 (318
  before), ~2.2-2.9 ms CPU per operation at saturation; 39.7 KiB per idle tunnel at
  10,000; at 200/s p50 9-48 ms, p99 232-366 ms; 300/s p50 121 ms; 400/s p50 244 ms.

Everything runs on 127.0.0.1, bounded in count and time (``--timeout``); the file-descriptor
limit of this process (inherited by the children) is raised to its hard limit; children die
with this process and are stopped, the temporary directory removed, on failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import xmlrpc.client
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.internet.protocol import Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VECTORS = ROOT / "tests" / "vectors" / "tunnel"
KEY = "bench-rs-key"
MODULE = "1:1.0.0:bench-module"
CAPTURE_DISTID = b"0001-0002-0003-0004-0005-0006-0007-0008"
CAPTURE_CONFIRMATION_ID = b"<transaction-id>2492</transaction-id>"
ECHO_REQUEST = b"4;echo-request;trail\r\necho\r\n"  # 09-tunnel-echo.request.txt
NOT_FINAL = ["queued", "sending", "started"]
PAGE = 1000  # push.list's largest page
KIB = 1024.0


def _load_push_bench() -> ModuleType:
    """bench/push.py's process and RS helpers, reused rather than copied."""
    spec = importlib.util.spec_from_file_location("_bench_push", ROOT / "bench" / "push.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


push = _load_push_bench()


# -- captured device bytes -------------------------------------------------------------------


def _capture(name: str) -> bytes:
    from armsproxy.arms.framing import TunnelMessage, parse_tunnel_file

    (event,) = parse_tunnel_file((VECTORS / name).read_bytes())
    assert isinstance(event, TunnelMessage)
    return event.body


@dataclass(frozen=True)
class DeviceBytes:
    """The messages a device writes, from the captures (message data, without chunk framing)."""

    confirmation_start: bytes  # 05, with the capture's distid
    confirmation_done_answer: bytes  # 06, with the capture's confirmation id
    answers: dict[bytes, bytes]  # request type -> answer (08, 20)

    @classmethod
    def load(cls) -> DeviceBytes:
        start = _capture("05-push-confirmation-start.request.txt")
        done = _capture("06-push-confirmation-done.response.txt")
        assert CAPTURE_DISTID in start and CAPTURE_CONFIRMATION_ID in done
        return cls(start, done, {
            b"check-transaction": _capture("08-check-transaction.response.txt"),
            b"read-module-list": _capture("20-read-module-list.response.txt"),
        })


OPERATIONS = ("check-transaction", "read-module-list")


# -- the SA side (child processes) -----------------------------------------------------------


# Tunnel phases, device side.
_HEADER, _CONFIRM_START, _CONFIRM_DONE, _PROBE, _READY, _GONE = range(6)
_TYPE = re.compile(rb'<arms-(request|response) type="([a-z-]+)"')
_RESULT = re.compile(rb"<result-code>([0-9]+)</result-code>")
_TRANSACTION = re.compile(rb"<transaction-id>([0-9]+)</transaction-id>")


class SATunnel(Protocol):
    """One device's tunnel: open, confirm, echo, answer pushes. Small on purpose."""

    def __init__(self, fleet: Fleet, index: int, distid: str) -> None:
        self.fleet = fleet
        self.index = index
        self.distid = distid
        self.phase = _HEADER
        self.buffer = bytearray()
        self.parts: list[bytes] | None = None  # a message spread over several chunks
        self.deadline: Any = None

    def connectionMade(self) -> None:
        self.deadline = self.fleet.reactor.callLater(
            self.fleet.confirm_timeout, self.fail, "not confirmed in time")
        self.transport.write(self.fleet.open_request(self.distid))

    def write_message(self, data: bytes) -> None:
        self.transport.write(self.fleet.chunk(data))

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.phase == _HEADER:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 4096:
                    self.fail("no end of the tunnel-open answer header")
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if not status.startswith(b"HTTP/1.1 200"):
                self.fail(f"tunnel refused: {status.decode('latin-1')}")
                return
            self.phase = _CONFIRM_START
            start = self.fleet.device.confirmation_start.replace(
                CAPTURE_DISTID, self.distid.encode("ascii"))
            self.write_message(start)
        pos = 0
        while self.phase != _GONE:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                break
            header = bytes(buffer[pos:line_end])
            try:
                size = int(header.split(b";", 1)[0], 16)
            except ValueError:
                self.fail(f"bad chunk header {header[:40]!r}")
                return
            end = line_end + 2 + size
            if len(buffer) < end + 2:
                break
            chunk = bytes(buffer[line_end + 2 : end])
            pos = end + 2
            self.chunk(header.split(b";")[1:], chunk)
        del buffer[:pos]

    def chunk(self, extensions: list[bytes], data: bytes) -> None:
        fleet = self.fleet
        if b"echo-response" in extensions:
            if self.phase == _PROBE:
                self.ready()
            else:
                fleet.counts["echo_answered"] += 1
            return
        if not extensions and not data:
            self.fail("armsproxy closed the tunnel (zero chunk)")
            return
        if b"trail" not in extensions:
            self.parts = [*(self.parts or []), data]
            return
        if self.parts is not None:
            data, self.parts = b"".join([*self.parts, data]), None
        self.message(data)

    def message(self, data: bytes) -> None:
        fleet = self.fleet
        found = _TYPE.search(data)
        kind, type_ = (found.group(1), found.group(2)) if found else (b"", b"")
        if self.phase == _CONFIRM_START:
            code = _RESULT.search(data)
            if type_ != b"push-confirmation-start" or not code or int(code.group(1)) >= 200:
                self.fail(f"confirmation refused: {data[:200]!r}")
                return
            self.phase = _CONFIRM_DONE
        elif self.phase == _CONFIRM_DONE:
            tid = _TRANSACTION.search(data)
            if type_ != b"push-confirmation-done" or kind != b"request" or not tid:
                self.fail(f"expected push-confirmation-done, got {data[:200]!r}")
                return
            self.write_message(fleet.device.confirmation_done_answer.replace(
                CAPTURE_CONFIRMATION_ID, tid.group(0)))
            self.phase = _PROBE
            self.transport.write(ECHO_REQUEST)
        elif self.phase in (_PROBE, _READY):
            answer = fleet.device.answers.get(type_)
            if answer is None:
                fleet.counts["unexpected"] += 1
                fleet.note(f"unexpected message {data[:120]!r}")
                return
            self.write_message(answer)
            fleet.counts["answered"] += 1

    def ready(self) -> None:
        self.phase = _READY
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        self.fleet.confirmed(self)

    def fail(self, reason: str) -> None:
        if self.phase == _GONE:
            return
        was = self.phase
        self.phase = _GONE
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None
        self.fleet.failed(self, was, reason)
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.phase != _GONE and not self.fleet.stopping:
            self.fail(f"connection lost: {reason.getErrorMessage() if reason else '?'}")
        self.phase = _GONE


class Fleet:
    """All tunnels of one SA process, opened step by step as the go-files appear."""

    def __init__(self, reactor: Any, work: Path, name: str, port: int, plan: dict[str, Any],
                 echo_interval: int, concurrency: int, tls_max: str) -> None:
        self.reactor = reactor
        self.work = work
        self.name = name
        self.port = port
        self.steps: list[dict[str, Any]] = plan["steps"]
        self.echo_interval = echo_interval
        self.concurrency = concurrency
        self.confirm_timeout = 120.0
        self.device = DeviceBytes.load()
        self.tls = push._BareTLS((work / "data" / "pki" / "ca.pem").read_bytes(), tls_max=tls_max,
                                 release_buffers=True)
        self.counts: Counter[str] = Counter()
        self.notes: list[str] = []
        self.todo: list[int] = []  # indices of the current step not started yet
        self.step = 0
        self.opening = 0
        self.buckets: list[list[SATunnel]] = [[] for _ in range(echo_interval)]
        self.tick = 0
        self.stopping = False

    @staticmethod
    def chunk(data: bytes) -> bytes:
        """One message as one chunk with a random id, as the SA frames it (§9.3)."""
        from armsproxy.arms.framing import encode_chunk, new_chunk_id

        return encode_chunk(data, chunk_id=new_chunk_id())

    def open_request(self, distid: str) -> bytes:
        """The header a device writes on a fresh tunnel (04-https-tunnel-open.request.txt)."""
        from armsproxy.device import build_open_request

        return build_open_request(f"https://127.0.0.1:{self.port}/arms-tunnel", distid, KEY)

    def note(self, text: str) -> None:
        if len(self.notes) < 10:
            self.notes.append(text)

    # -- opening ---------------------------------------------------------------------------
    def poll_go(self) -> None:
        if self.todo or self.opening or self.step >= len(self.steps):
            return
        step = self.steps[self.step]
        if not (self.work / step["go"]).exists():
            return
        self.step += 1
        self.todo = list(range(step["first"] + step["count"] - 1, step["first"] - 1, -1))
        for _ in range(self.concurrency):
            self.open_next()

    def open_next(self) -> None:
        if not self.todo or self.stopping:
            return
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        index = self.todo.pop()
        tunnel = SATunnel(self, index, push.distid_for(index))
        self.opening += 1
        endpoint = wrapClientTLS(self.tls, TCP4ClientEndpoint(self.reactor, "127.0.0.1",
                                                              self.port, timeout=30))
        d = connectProtocol(endpoint, tunnel)
        d.addErrback(lambda f: tunnel.fail(f"connect failed: {f.getErrorMessage()}"))

    def confirmed(self, tunnel: SATunnel) -> None:
        self.counts["confirmed"] += 1
        self.buckets[tunnel.index % self.echo_interval].append(tunnel)
        self.opening -= 1
        self.open_next()

    def failed(self, tunnel: SATunnel, phase: int, reason: str) -> None:
        if phase == _READY:
            self.counts["lost"] += 1
            bucket = self.buckets[tunnel.index % self.echo_interval]
            with contextlib.suppress(ValueError):
                bucket.remove(tunnel)
        else:
            self.counts["failed"] += 1
            self.opening -= 1
            self.open_next()
        self.note(f"{tunnel.distid}: {reason}")

    # -- keep-alive and reporting ------------------------------------------------------------
    def echo_tick(self) -> None:
        """Each tunnel sends an echo-request once per interval, spread over the interval."""
        bucket = self.buckets[self.tick % self.echo_interval]
        self.tick += 1
        for tunnel in bucket:
            if tunnel.phase == _READY:
                tunnel.transport.write(ECHO_REQUEST)
                self.counts["echo_sent"] += 1

    def write_status(self) -> None:
        status = dict(self.counts, step=self.step, opening=self.opening, todo=len(self.todo),
                      notes=self.notes, pid=os.getpid())
        tmp = self.work / f"status-{self.name}.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.work / f"status-{self.name}.json")


def serve_tunnels(args: argparse.Namespace) -> None:
    """Child mode: hold the tunnels of one plan until SIGTERM or the deadline."""
    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    work = args.sa_client
    plan = json.loads((work / f"plan-{args.name}.json").read_text())
    fleet = Fleet(reactor, work, args.name, args.proxy_port, plan, args.echo_interval,
                  args.open_concurrency, args.tls_max)

    def stopping() -> None:
        fleet.stopping = True

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    task.LoopingCall(fleet.poll_go).start(0.05)
    task.LoopingCall(fleet.echo_tick).start(1.0, now=False)
    task.LoopingCall(fleet.write_status).start(0.25)
    reactor.callLater(args.timeout, reactor.stop)
    reactor.run()


# -- armsproxy in a child process, with a measuring hook ----------------------------------------

# Runs in armsproxy's process before twistd. On SIGUSR2 it reads hook.request and writes
# hook-TAG.json: VmRSS before and after gc.collect() and malloc_trim(0), optionally object
# counts by type and mallinfo2; "trace_start": N starts tracemalloc (N frames) after the
# gc.collect() and malloc_trim(0), "trace": true reads what it traced since (total, its own
# bookkeeping, the biggest sources), "trace_stop": true stops it after the readings (so that
# it does not slow the operations).
_PROXY_BOOT = r"""
import gc, json, os, signal, sys, tracemalloc
_dir = os.environ["BENCH_HOOK_DIR"]

def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out

def _mallinfo():
    import ctypes
    class M(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = M
    m = libc.mallinfo2()
    return {"in_use": m.uordblks + m.hblkhd, "free": m.fordblks}

def _hook(signum, frame):
    try:
        with open(os.path.join(_dir, "hook.request")) as f:
            request = json.load(f)
        tag = request["tag"]
        out = {"before": _status()}
        gc.collect()
        out["after_gc"] = _status()
        if request.get("objects"):
            out["malloc"] = _mallinfo()
            out["blocks"] = sys.getallocatedblocks()
            counts, sizes = {}, {}
            for o in gc.get_objects():
                t = type(o)
                module = t.__dict__.get("__module__")
                name = f"{module if isinstance(module, str) else '?'}.{t.__qualname__}"
                counts[name] = counts.get(name, 0) + 1
                sizes[name] = sizes.get(name, 0) + sys.getsizeof(o)
            out["objects"] = counts
            out["sizes"] = sizes
        if request.get("trace") and tracemalloc.is_tracing():
            out["traced"] = tracemalloc.get_traced_memory()[0]
            out["tracemalloc_overhead"] = tracemalloc.get_tracemalloc_memory()
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            out["trace_top"] = [
                ["; ".join(f"{fr.filename.rsplit('site-packages/', 1)[-1]}:{fr.lineno}"
                           for fr in s.traceback), s.size, s.count]
                for s in snap.statistics("traceback")[:40]]
            snap = None
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
        out["after_trim"] = _status()
        if request.get("trace_stop"):
            tracemalloc.stop()
        if request.get("trace_start"):
            gc.collect()
            tracemalloc.start(int(request["trace_start"]))
    except Exception as e:
        out = {"error": repr(e)}
        tag = "error"
    tmp = os.path.join(_dir, f"hook-{tag}.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, os.path.join(_dir, f"hook-{tag}.json"))

signal.signal(signal.SIGUSR2, _hook)
from twisted.application.twist._twist import Twist
Twist.main()
"""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def hook(pid: int, work: Path, tag: str, *, objects: bool = False, trace: bool = False,
         trace_start: int = 0, trace_stop: bool = False,
         timeout: float = 120.0) -> dict[str, Any]:
    """Ask armsproxy's hook for a reading (and to start or stop tracemalloc); wait for it."""
    (work / "hook.request").write_text(json.dumps({
        "tag": tag, "objects": objects, "trace": trace, "trace_start": trace_start,
        "trace_stop": trace_stop}))
    os.kill(pid, signal.SIGUSR2)
    target = work / f"hook-{tag}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.exists():
            return dict(json.loads(target.read_text()))
        if (work / "hook-error.json").exists():
            raise SystemExit(f"armsproxy hook failed: {(work / 'hook-error.json').read_text()}")
        time.sleep(0.05)
    raise SystemExit(f"armsproxy hook: no answer for {tag} in {timeout:.0f} s")


def wait_quiet(pid: int, *, limit: float, threshold: float = 0.15, window: float = 1.0,
               windows: int = 3) -> float:
    """Wait until the process uses < threshold of a core over ``windows`` windows in a row;
    return the seconds waited (``limit`` at most)."""
    start = time.monotonic()
    calm = 0
    before = cpu_seconds(pid)
    while time.monotonic() - start < limit:
        time.sleep(window)
        now = cpu_seconds(pid)
        calm = calm + 1 if (now - before) / window < threshold else 0
        before = now
        if calm >= windows:
            break
    return time.monotonic() - start


# -- orchestration helpers ----------------------------------------------------------------------


@dataclass
class Clients:
    """The SA processes and their status files."""

    work: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, plan: dict[str, Any], args: argparse.Namespace, port: int,
              concurrency: int, remaining: float) -> None:
        (self.work / f"plan-{name}.json").write_text(json.dumps(plan))
        self.procs[name] = push.spawn(
            [str(Path(__file__).resolve()), "--sa-client", str(self.work), "--name", name,
             "--proxy-port", str(port), "--echo-interval", str(args.echo_interval),
             "--open-concurrency", str(concurrency), "--tls-max", args.tls_max,
             "--timeout", str(max(remaining, 1.0))],
            self.work, self.work / f"client-{name}.log")

    def status(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.procs:
            path = self.work / f"status-{name}.json"
            with contextlib.suppress(OSError, ValueError):
                out[name] = json.loads(path.read_text())
        return out

    def total(self, key: str) -> int:
        return sum(int(s.get(key, 0)) for s in self.status().values())

    def notes(self) -> list[str]:
        return [n for s in self.status().values() for n in s.get("notes", [])]

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.work / f"client-{name}.log"
                raise SystemExit(f"SA process {name} exited with {proc.returncode}:\n"
                                 f"{push._tail(log)}")

    def wait_confirmed(self, expected: int, proxy: subprocess.Popen[bytes], limit: float,
                       what: str) -> tuple[float, int]:
        """Until confirmed + failed reaches ``expected``; (seconds, failed)."""
        start = time.monotonic()
        last_report = start
        while time.monotonic() - start < limit:
            self.check_alive()
            if proxy.poll() is not None:
                raise SystemExit(f"armsproxy exited with {proxy.returncode}")
            confirmed, failed = self.total("confirmed"), self.total("failed")
            if confirmed + failed >= expected:
                return time.monotonic() - start, failed
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                print(f"  ... {what}: {confirmed} of {expected} confirmed, {failed} failed",
                      flush=True)
            time.sleep(0.1)
        raise SystemExit(f"{what}: only {self.total('confirmed')} of {expected} tunnels "
                         f"confirmed after {limit:.0f} s; notes: {self.notes()[:5]}")

    def pids(self) -> dict[str, int]:
        return {f"SA process {name}": p.pid for name, p in self.procs.items()}


def register_sas(db_path: Path, count: int) -> float:
    """All bench SAs in the demo RS database, in one transaction; the seconds it took."""
    from armsproxy.demo_rs import db as demo_db

    started = time.monotonic()
    module_id, version, location = MODULE.split(":", 2)
    module = demo_db.Module(int(module_id), version, 1, location)
    conn = demo_db.connect(db_path)
    try:
        cur = conn.cursor()
        for i in range(count):
            demo_db.register_sa(cur, demo_db.SARegistration(
                distid=push.distid_for(i), key=KEY, push_methods=["https-tunnel"],
                modules=[module]))
        conn.commit()
    finally:
        conn.close()
    return time.monotonic() - started


def gate_proxy(port: int) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/RPC2", allow_none=False)


def push_and_wait(gate: xmlrpc.client.ServerProxy, distids: Sequence[str], tag: str,
                  timeout: float = 120.0) -> Counter[str]:
    """Synchronously: every operation kind to every SA, then wait until all are final."""
    t0 = time.time()
    orders = [(d, op) for d in distids for op in OPERATIONS]
    wanted = {gate.push.submit({"distribution_id": d, "operation": op,
                                "request_id": f"{tag}-{i}"})
              for i, (d, op) in enumerate(orders)}
    deadline = time.monotonic() + timeout
    while gate.push.list({"states": NOT_FINAL, "limit": 1})["operations"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"{tag}: operations not final after {timeout:.0f} s")
        time.sleep(0.1)
    states: Counter[str] = Counter()
    offset: int | None = 0
    while offset is not None:
        page = gate.push.list({"since": t0 - 1.0, "limit": PAGE, "offset": offset})
        for op in page["operations"]:
            if op["operation_id"] in wanted:
                states[op["state"]] += 1
        offset = page.get("next_offset")
    return states


def count_live_tunnels(gate: xmlrpc.client.ServerProxy) -> int:
    """SAs with at least one live tunnel according to armsproxy (sa.list)."""
    live, offset = 0, 0
    while True:
        page = gate.sa.list({"confirmed": True, "limit": PAGE, "offset": offset})
        live += sum(1 for sa in page["sas"] if sa.get("tunnels"))
        if "next_offset" not in page:
            return live
        offset = page["next_offset"]


# -- the RS side of the operations phase ----------------------------------------------------


class _RPCConnection(Protocol):
    """One persistent HTTP/1.1 connection to the RS gate, one call at a time."""

    def __init__(self, pool: RPCPool) -> None:
        self.pool = pool
        self.buffer = bytearray()
        self.waiting: Any = None  # Deferred[tuple[float, bytes]]
        self.sent_at = 0.0

    def connectionMade(self) -> None:
        self.pool.idle.append(self)
        self.pool.pump()

    def send(self, body: bytes, d: Any) -> None:
        self.waiting = d
        self.sent_at = time.time()
        self.transport.write(
            b"POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        found = re.search(rb"\r\ncontent-length: *([0-9]+)", head)
        if found is None or not head.startswith(b"http/1.1 200"):
            self.transport.loseConnection()
            self._fail(RuntimeError(f"RS gate answered {head[:200]!r}"))
            return
        total = end + 4 + int(found.group(1))
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        d, self.waiting = self.waiting, None
        self.pool.idle.append(self)
        self.pool.pump()
        if d is not None:
            d.callback((self.sent_at, body))

    def _fail(self, error: Exception) -> None:
        d, self.waiting = self.waiting, None
        if d is not None:
            d.errback(error)

    def connectionLost(self, reason: Any = None) -> None:
        with contextlib.suppress(ValueError):
            self.pool.idle.remove(self)
        self.pool.connections.discard(self)
        self._fail(RuntimeError(f"RS gate connection lost: {reason.getErrorMessage()}"))


class RPCPool:
    """XML-RPC over ``size`` persistent connections; calls queue for a free one."""

    def __init__(self, reactor: Any, port: int, size: int) -> None:
        self.reactor = reactor
        self.port = port
        self.size = size
        self.idle: list[_RPCConnection] = []
        self.connections: set[_RPCConnection] = set()
        self.queue: list[tuple[bytes, Any]] = []

    async def start(self) -> None:
        from twisted.internet import defer
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        protocols = [_RPCConnection(self) for _ in range(self.size)]
        await defer.gatherResults([connectProtocol(endpoint, p) for p in protocols],
                                  consumeErrors=True)
        self.connections.update(protocols)

    def pump(self) -> None:
        while self.queue and self.idle:
            body, d = self.queue.pop(0)
            self.idle.pop().send(body, d)

    def call_raw(self, body: bytes) -> Any:
        """Deferred[(wall clock when written, response body)]."""
        from twisted.internet import defer

        d: defer.Deferred[tuple[float, bytes]] = defer.Deferred()
        if not self.connections:
            d.errback(RuntimeError("no connection to the RS gate left"))
            return d
        self.queue.append((body, d))
        self.pump()
        return d

    async def call(self, method: str, *args: Any) -> Any:
        _, data = await self.call_raw(xmlrpc.client.dumps(args, method).encode("utf-8"))
        (result,), _ = xmlrpc.client.loads(data)
        return result

    def close(self) -> None:
        for conn in list(self.connections):
            conn.transport.loseConnection()


@dataclass
class OpsResult:
    mode: str
    submitted: int
    latencies: list[float]
    states: Counter[str]
    elapsed: float  # first submit -> last final
    submit_span: float  # first -> last submit written
    lag_p99: float = 0.0  # open loop: how late submits were written vs their schedule
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_wall: float = 1.0
    drain: float = 0.0  # seconds from "all final" to "no event left to deliver"
    events: int = 0  # events the demo RS received in the window
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_ms_per_op(self) -> float:
        """armsproxy's whole CPU (every thread) over the window, per operation submitted."""
        return self.cpu.get("armsproxy", 0.0) / max(self.submitted, 1) * 1000


class Window:
    """The measured window of one operations phase: CPU readings before the first submit and
    once every operation is final **and** armsproxy's event outbox is empty (its
    ``armsproxy_events_pending`` gauge at 0: the RS has acknowledged every event), so that
    the delivery of an operation's events (``arms.events`` batches) is charged to it. The
    results are read after the window: that reading is the bench's, not an operation's."""

    def __init__(self, pids: dict[str, int], metrics_port: int, rs_db: Path) -> None:
        self.pids = pids
        self.metrics_port = metrics_port
        self.rs_db = rs_db
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.started = 0.0
        self.seconds = 0.0
        self.drain = 0.0
        self.events_before = 0
        self.events = 0

    def cpu_now(self) -> dict[str, float]:
        proxy_pid = self.pids["armsproxy"]
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        # The reactor thread is the one whose id is the process id; SQLite and adbapi pools
        # are the others.
        now["armsproxy reactor thread"] = _thread_cpu(proxy_pid, proxy_pid)
        now["this process (bench RS client)"] = cpu_seconds()
        now["machine"] = machine_busy()
        return now

    def open(self) -> None:
        self.events_before = demo_rs_events(self.rs_db)
        self.before, self.started = self.cpu_now(), time.monotonic()

    async def close(self, timeout: float = 300.0) -> None:
        """Wait until no event is left to deliver, then read the CPU."""
        from twisted.internet import reactor, task

        final_at = time.monotonic()
        deadline = final_at + timeout
        while (pending := events_pending(self.metrics_port)) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pending} events still undelivered after {timeout:.0f} s")
            await task.deferLater(reactor, 0.1, lambda: None)
        self.after = self.cpu_now()
        now = time.monotonic()
        self.seconds, self.drain = now - self.started, now - final_at
        self.events = demo_rs_events(self.rs_db) - self.events_before

    def fill(self, result: OpsResult) -> OpsResult:
        result.cpu = {k: self.after[k] - self.before[k] for k in self.before}
        result.cpu_wall, result.drain, result.events = self.seconds, self.drain, self.events
        return result


def events_pending(port: int) -> int | None:
    """armsproxy's undelivered events (``armsproxy_events_pending`` on /metrics); None if the
    store did not answer. A blocking GET: at that point this process has nothing else to do."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode("utf-8", "replace")
    found = re.search(r"^armsproxy_events_pending ([0-9.e+]+)$", text, re.M)
    return None if found is None else int(float(found.group(1)))


def demo_rs_events(db: Path) -> int:
    """Events the demo RS has stored so far (read-only, straight from its SQLite file)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


async def open_loop(pool: RPCPool, distids: Sequence[str], total: int, rate: float,
                    tag: str, window: Window) -> OpsResult:
    """Submit operation i at t0 + i/rate; wait for all to be final and delivered; read them."""
    from twisted.internet import defer, reactor, task

    sent: dict[str, float] = {}
    lags: list[float] = []
    errors: list[str] = []

    def submitted(answer: tuple[float, bytes], due: float) -> None:
        at, data = answer
        try:
            (op_id,), _ = xmlrpc.client.loads(data)
        except xmlrpc.client.Fault as e:
            errors.append(e.faultString)
            return
        sent[op_id] = at
        lags.append(at - due)

    def refused(failure: Any) -> None:
        errors.append(failure.getErrorMessage())

    calls = []
    window.open()
    wall0 = time.time()
    t0 = time.monotonic()
    i = 0
    while i < total:
        due_now = min(total, int((time.monotonic() - t0) * rate) + 1)
        while i < due_now:
            order = {"distribution_id": distids[i % len(distids)],
                     "operation": OPERATIONS[(i // len(distids)) % len(OPERATIONS)],
                     "request_id": f"{tag}-{i}"}
            d = pool.call_raw(xmlrpc.client.dumps((order,), "push.submit").encode("utf-8"))
            d.addCallbacks(submitted, refused, callbackArgs=(wall0 + i / rate,))
            calls.append(d)
            i += 1
        delay = t0 + i / rate - time.monotonic()
        await task.deferLater(reactor, max(delay, 0.0), lambda: None)
    await defer.gatherResults(calls, consumeErrors=True)
    await _wait_final(pool, len(sent))
    await window.close()
    finals = await _read_finals(pool, wall0)
    result = window.fill(_collect("open loop", sent, finals))
    result.lag_p99 = push.quantile(lags, 99)
    if errors:
        result.notes.append(f"{len(errors)} submits refused, e.g. {errors[0]}")
    return result


async def _wait_final(pool: RPCPool, count: int, timeout: float = 600.0) -> None:
    from twisted.internet import reactor, task

    deadline = time.monotonic() + timeout
    while (await pool.call("push.list", {"states": NOT_FINAL, "limit": 1}))["operations"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} operations not final after {timeout:.0f} s")
        await task.deferLater(reactor, 0.2, lambda: None)


async def _read_finals(pool: RPCPool, since: float) -> dict[str, dict[str, Any]]:
    finals: dict[str, dict[str, Any]] = {}
    offset: int | None = 0
    while offset is not None:
        page = await pool.call("push.list", {"since": since - 1.0, "limit": PAGE,
                                             "offset": offset})
        finals.update((o["operation_id"], o) for o in page["operations"])
        offset = page.get("next_offset")
    return finals


def _collect(mode: str, sent: dict[str, float], finals: dict[str, dict[str, Any]]) -> OpsResult:
    latencies: list[float] = []
    states: Counter[str] = Counter()
    last = 0.0
    errors: Counter[str] = Counter()
    for op_id, at in sent.items():
        op = finals[op_id]
        states[op["state"]] += 1
        last = max(last, op["updated_at"])
        if op["state"] == "succeeded":
            latencies.append(op["updated_at"] - at)
        else:
            errors[op.get("last_error", "?")] += 1
    first = min(sent.values()) if sent else 0.0
    result = OpsResult(mode, len(sent), latencies, states, last - first,
                       max(sent.values()) - first if sent else 0.0)
    for error, n in errors.most_common(3):
        result.notes.append(f"{n} x {error}")
    return result


async def closed_loop(pool: RPCPool, distids: Sequence[str], total: int, concurrency: int,
                      poll: float, tag: str, window: Window) -> OpsResult:
    """bench/push.py's closed loop (latency from the same updated_at)."""
    mix = [(op, {}) for op in OPERATIONS]
    window.open()
    phase = await push.push_phase(pool, [{"distid": d} for d in distids], mix, total,
                                  concurrency, poll, tag)
    await window.close()
    result = OpsResult(f"closed loop, {concurrency} in flight", len(phase.latencies)
                       + phase.failures, phase.latencies,
                       Counter(succeeded=len(phase.latencies), other=phase.failures),
                       phase.elapsed, phase.elapsed)
    result.notes.extend(phase.notes)
    return window.fill(result)


async def operations(args: argparse.Namespace, gate_port: int, distids: Sequence[str],
                     window: Window) -> list[OpsResult]:
    """``--runs`` operations phases over the same tunnels, one after the other."""
    from twisted.internet import reactor, task

    pool = RPCPool(reactor, gate_port, args.connections)
    await pool.start()
    results: list[OpsResult] = []
    try:
        for run in range(args.runs):
            tag = f"bench{run}"
            if args.concurrency:
                results.append(await closed_loop(pool, distids, args.operations,
                                                 args.concurrency, args.poll, tag, window))
            else:
                results.append(await open_loop(pool, distids, args.operations, args.rate, tag,
                                               window))
            print(f"  run {run + 1}: armsproxy CPU {results[-1].cpu_ms_per_op:.3f} ms per "
                  f"operation", flush=True)
            await task.deferLater(reactor, 1.0, lambda: None)  # the result reads settle
    finally:
        pool.close()
    return results


def _stat_cpu(path: str) -> float:
    """utime + stime, in seconds, from a /proc stat file (the command name, field 2, may hold
    spaces and parentheses: split after the last ")")."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """CPU of a whole process (every thread, ended ones included); this one if None."""
    return _stat_cpu(f"/proc/{'self' if pid is None else pid}/stat")


def _thread_cpu(pid: int, tid: int) -> float:
    return _stat_cpu(f"/proc/{pid}/task/{tid}/stat")


def machine_busy() -> float:
    """Busy CPU seconds so far of the whole machine, every core (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# -- py-spy ------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(.*) \((.*?)(:\d+)?\)$")
# Leaf frames of a thread waiting for work: the reactor in epoll, a pool thread for a task.
_IDLE = re.compile(r"^(EPollReactor\.doPoll|Condition\.wait|Queue\.get|_wait_for_tstate_lock|"
                   r"Event\.wait|select|poll) ")


def _frame_name(frame: str, *, line: bool = False) -> str:
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    function, path, lineno = found.groups()
    path = path.rsplit("site-packages/", 1)[-1].split("/work/main/", 1)[-1]
    return f"{function} ({path}{(lineno or '') if line else ''})"


def summarise_profile(raw: Path, seconds: float, rate: int) -> list[str]:
    """Per thread: how busy, and where (self time by line, inclusive by function).

    py-spy without --idle samples threads that are running; samples whose leaf is the
    reactor's epoll wait are counted apart (kernel time of the wait, or a stale frame: with
    --nonblocking the stack is read while the thread runs on).
    """
    if not raw.exists():
        return [f"py-spy wrote nothing to {raw}"]
    components: Counter[str] = Counter()  # reactor thread: busy samples under each part
    samples: dict[str, Counter[str]] = {}  # thread -> self time by line
    inclusive: dict[str, Counter[str]] = {}
    areas: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    idle: Counter[str] = Counter()
    for text in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(":", 1)[-1].strip() or frames[0]
        totals[thread] += count
        names = frames[1:]
        if not names or _IDLE.match(names[-1].strip()):
            idle[thread] += count
            continue
        leaf = _frame_name(names[-1], line=True)
        samples.setdefault(thread, Counter())[leaf] += count
        areas.setdefault(thread, Counter())[_area(leaf)] += count
        inc = inclusive.setdefault(thread, Counter())
        for name in {_frame_name(f) for f in names}:
            inc[name] += count
        if "MainThread" in thread:
            for part, marker in _COMPONENTS:
                if any(marker in f for f in names):
                    components[part] += count
    if not totals:
        return ["py-spy: no samples"]
    expected = seconds * rate
    lines = [f"py-spy (on-CPU samples), {seconds:.1f} s at {rate} Hz; share of the time each "
             "thread was sampled running (in epoll_wait / other): " + ", ".join(
                 f"{t} {n / expected * 100:.0f}% ({idle[t] / expected * 100:.0f}% / "
                 f"{(n - idle[t]) / expected * 100:.0f}%)" for t, n in totals.most_common(3))]
    main_busy = sum(n for t, c in samples.items() if "MainThread" in t for n in c.values())
    if main_busy:
        lines.append("  MainThread: share of its busy samples under (overlapping): " + ", ".join(
            f"{part} {n / main_busy * 100:.0f}%" for part, n in components.most_common()))
    busiest = sorted(samples, key=lambda t: -sum(samples[t].values()))[:2]
    for thread in busiest:
        busy = sum(samples[thread].values())
        lines.append(f"  {thread}: by area (leaf frame) " + ", ".join(
            f"{a} {n / busy * 100:.0f}%" for a, n in areas[thread].most_common(8)))
        lines.append(f"  {thread}: self time by line (% of its busy samples)")
        lines.extend(f"    {n / busy * 100:5.1f}%  {name}"
                     for name, n in samples[thread].most_common(12))
        lines.append(f"  {thread}: inclusive, armsproxy functions")
        shown = [(name, n) for name, n in inclusive[thread].most_common()
                 if "armsproxy/" in name][:15]
        lines.extend(f"    {n / busy * 100:5.1f}%  {name}" for name, n in shown)
    return lines


_COMPONENTS = (
    ("push engine", "armsproxy/push/engine.py"), ("tunnel session", "armsproxy/tunnel/"),
    ("TLS (twisted + pyOpenSSL)", "twisted/protocols/tls.py"),
    ("RS gate", "armsproxy/rs_gate/"), ("twisted.web", "twisted/web/"),
    ("store calls (reactor side)", "armsproxy/store/"), ("ARMS codec", "armsproxy/arms/codec"),
    ("logging", "twisted/logger/"), ("event outbox", "armsproxy/push/outbox"),
    ("RS client", "armsproxy/rs_client/"), ("demo RS", "armsproxy/demo_rs/"),
)


def _area(path: str) -> str:
    for prefix, area in (("armsproxy/store", "armsproxy.store"), ("armsproxy/", "armsproxy"),
                         ("twisted/web", "twisted.web"),
                         ("twisted/protocols/tls", "twisted TLS"), ("OpenSSL", "pyOpenSSL"),
                         ("cryptography", "cryptography"), ("twisted/logger", "twisted.logger"),
                         ("twisted/internet", "twisted.internet"),
                         ("twisted/enterprise", "adbapi"), ("twisted/python", "twisted.python"),
                         ("xmlschema", "xmlschema"), ("lxml", "lxml"), ("xmlrpc", "xmlrpc"),
                         ("elementpath", "elementpath"), ("sqlite3", "sqlite3"),
                         ("twisted", "twisted other")):
        if prefix in path:
            return area
    return path.rsplit("(", 1)[-1].rstrip(")").rsplit("/", 1)[-1] or "?"


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Memory:
    """armsproxy VmRSS readings (KiB) and what they mean per tunnel."""

    start: int = 0
    baseline: int = 0
    steps: list[tuple[int, int]] = field(default_factory=list)  # (tunnels, VmRSS)
    idle: int = 0
    after_gc: int = 0
    after_trim: int = 0
    after_ops: int = 0
    traced: float = 0.0  # KiB of Python objects per tunnel of the traced sample
    # (tunnels, VmRSS, CPU seconds so far) per SA process
    sa_side: list[tuple[int, int, float]] = field(default_factory=list)

    def per_tunnel(self, rss: int, n: int) -> float:
        return (rss - self.baseline) / n if n else 0.0

    def total_per_tunnel(self, n: int) -> float:
        """KiB of VmRSS per idle tunnel, both readings after gc.collect() and malloc_trim(0)
        (no tracemalloc running)."""
        return self.per_tunnel(self.after_trim, n)


def time_left(timeout: float) -> Callable[[], float]:
    """Seconds left of a run's ``--timeout`` from now, each call; past it, the run ends."""
    started = time.monotonic()

    def remaining() -> float:
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            raise SystemExit(f"the run took longer than --timeout {timeout:.0f} s")
        return left

    return remaining


def raise_fd_limit(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def diagnose_lines(base: dict[str, Any], full: dict[str, Any], trace: dict[str, Any],
                   n: int) -> list[str]:
    lines = []
    if "malloc" in base and "malloc" in full:
        in_use = (full["malloc"]["in_use"] - base["malloc"]["in_use"]) / n / KIB
        free = (full["malloc"]["free"] - base["malloc"]["free"]) / n / KIB
        blocks = (full["blocks"] - base["blocks"]) / n
        lines.append(f"  malloc in use +{in_use:.1f} KiB/tunnel (OpenSSL, SQLite, Python objects "
                     f"> 512 B), malloc free +{free:.1f} KiB/tunnel; Python blocks "
                     f"+{blocks:.0f}/tunnel")
    if "objects" in base and "objects" in full:
        diff = Counter(full["objects"])
        diff.subtract(base["objects"])
        sizes = Counter(full["sizes"])
        sizes.subtract(base["sizes"])
        top = [(t, c) for t, c in diff.most_common(22) if c / n >= 0.5]
        total = sum(v for v in sizes.values() if v > 0) / n
        lines.append(f"  GC-tracked objects per tunnel (shallow sizes, {total / KIB:.1f} KiB "
                     "in all; bytes/str/int are not tracked):")
        lines.extend(f"    {c / n:6.2f} x {t} ({sizes[t] / n:.0f} B)" for t, c in top)
    if "trace_top" in trace:
        k = trace["tunnels"]
        lines.append(f"  tracemalloc, the biggest sources of what the {k} traced tunnels hold "
                     "(per tunnel; --tracemalloc N for N frames of each):")
        for where, size, count in trace["trace_top"][:25]:
            lines.append(f"    {size / k:7.0f} B {count / k:5.2f} x  {where}")
    return lines


def run(args: argparse.Namespace) -> int:
    remaining = time_left(args.timeout)

    limits = raise_fd_limit(2 * args.tunnels + args.warm + 1000)
    if limits[0] < 2 * args.tunnels + args.warm + 200:
        raise SystemExit(f"file-descriptor limit {limits[0]} too low for {args.tunnels} tunnels")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    n, w = args.tunnels, args.warm
    with tempfile.TemporaryDirectory(prefix="armsproxy-bench-tunnels-",
                                     dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        clients = Clients(work)
        proxy: subprocess.Popen[bytes] | None = None
        profiler: subprocess.Popen[bytes] | None = None
        rs_proc: subprocess.Popen[bytes] | None = None
        try:
            sa_port, rs_port, gate_port = push.free_port(), push.free_port(), push.free_port()
            metrics_port = push.free_port()
            proxy_log = work / "proxy.log"
            env_extra = {"BENCH_HOOK_DIR": str(work)}
            if args.rs_process:
                where = ["--config", str(external_rs_config(work, sa_port, rs_port, gate_port,
                                                            metrics_port))]
                rs_log = work / "demo-rs.log"
                rs_proc = push.spawn(
                    ["-m", "armsproxy.demo_rs.cli", "--db", str(work / "data" / "demo-rs.sqlite"),
                     "serve", "--listen", f"tcp:{rs_port}:interface=127.0.0.1"], work, rs_log)
                push.wait_until(push.port_open(rs_port), rs_proc, rs_log, "demo RS", 30)
            else:
                where = ["--data-dir", str(work / "data"), "--port", str(sa_port), "--rs-port",
                         str(rs_port), "--rs-gate-port", str(gate_port), "--management-port",
                         str(metrics_port)]
            with _environ(env_extra):
                proxy = push.spawn(
                    ["-c", _PROXY_BOOT, "--log-level=info", f"--log-file={work / 'twist.log'}",
                     "armsproxy", *where], work, proxy_log)
            push.wait_until(lambda: push.port_open(sa_port)() and push.port_open(gate_port)()
                            and push.port_open(rs_port)() and push.port_open(metrics_port)(),
                            proxy, proxy_log, "armsproxy", 60)
            import armsproxy

            print(f"armsproxy from {Path(armsproxy.__file__).parent}", flush=True)
            k = args.trace_tunnels if args.tracemalloc else 0
            reg_seconds = register_sas(work / "data" / "demo-rs.sqlite", w + n + k)
            print(f"tunnel benchmark: armsproxy pid {proxy.pid}, {n} tunnels (+{w} warm-up) "
                  f"from {args.clients} SA processes, echo every {args.echo_interval} s, "
                  f"fd limit {limits[0]}; registered {w + n} SAs in the demo RS database in "
                  f"{reg_seconds:.2f} s", flush=True)
            wait_quiet(proxy.pid, limit=20)
            memory = Memory(start=proc_status(proxy.pid)["VmRSS"])
            gate = gate_proxy(gate_port)

            # Warm-up tunnels, pushed to once each: one-time costs before the baseline.
            per_client = max(args.open_concurrency // args.clients, 1)
            clients.start("warm", {"steps": [{"go": "go-warm", "first": 0, "count": w}]},
                          args, sa_port, per_client, remaining())
            (work / "go-warm").touch()
            clients.wait_confirmed(w, proxy, min(remaining(), 120), "warm-up tunnels")
            states = push_and_wait(gate, [push.distid_for(i) for i in range(w)], "warm")
            if set(states) != {"succeeded"}:
                raise SystemExit(f"warm-up operations did not all succeed: {dict(states)}; "
                                 f"notes: {clients.notes()[:5]}")
            wait_quiet(proxy.pid, limit=min(remaining(), 60))
            base_hook = hook(proxy.pid, work, "base", objects=args.diagnose)
            memory.baseline = base_hook["after_trim"]["VmRSS"]
            wait_quiet(proxy.pid, limit=min(remaining(), 30))

            # The measured tunnels, in steps, spread over the SA processes.
            plans: list[list[dict[str, Any]]] = [[] for _ in range(args.clients)]
            first = w
            for step in range(args.steps):
                size = n * (step + 1) // args.steps - n * step // args.steps
                for c in range(args.clients):
                    share = size * (c + 1) // args.clients - size * c // args.clients
                    plans[c].append({"go": f"go-{step}", "first": first, "count": share})
                    first += share
            for c in range(args.clients):  # the traced sample, after the readings
                share = k * (c + 1) // args.clients - k * c // args.clients
                plans[c].append({"go": "go-trace", "first": first, "count": share})
                first += share
            for c, plan in enumerate(plans):
                clients.start(f"sa{c}", {"steps": plan}, args, sa_port, per_client, remaining())
            failed_total, open_seconds = 0, 0.0
            for step in range(args.steps):
                target = w + n * (step + 1) // args.steps
                cpu_before = cpu_seconds(proxy.pid)
                (work / f"go-{step}").touch()
                seconds, failed = clients.wait_confirmed(target, proxy, remaining(),
                                                         f"step {step + 1}")
                open_seconds += seconds
                failed_total = failed
                quiet = wait_quiet(proxy.pid, limit=min(remaining(), 120))
                rss = proc_status(proxy.pid)["VmRSS"]
                opened = clients.total("confirmed") - w - (memory.steps[-1][0]
                                                            if memory.steps else 0)
                setup_cpu = (cpu_seconds(proxy.pid) - cpu_before) / max(opened, 1)
                memory.steps.append((clients.total("confirmed") - w, rss))
                print(f"  step {step + 1}: {memory.steps[-1][0]} tunnels confirmed in "
                      f"{seconds:.1f} s ({failed} failed), armsproxy quiet after {quiet:.1f} s "
                      f"(CPU {setup_cpu * 1000:.1f} ms per tunnel set up: TLS handshake, key "
                      f"check, confirmation relay, store, RS event), VmRSS {rss / KIB:.1f} MiB",
                      flush=True)
            confirmed_n = clients.total("confirmed") - w
            time.sleep(min(args.idle, remaining()))
            memory.idle = proc_status(proxy.pid)["VmRSS"]
            full_hook = hook(proxy.pid, work, "full", objects=args.diagnose,
                             trace_start=args.tracemalloc)
            memory.after_gc = full_hook["after_gc"]["VmRSS"]
            memory.after_trim = full_hook["after_trim"]["VmRSS"]
            trace_hook: dict[str, Any] = {}
            if k:
                # The Python part: k more tunnels opened under tracemalloc (started by the
                # hook above, after the readings: its bookkeeping would inflate VmRSS), warm.
                (work / "go-trace").touch()
                clients.wait_confirmed(w + n + k, proxy, remaining(), "traced tunnels")
                wait_quiet(proxy.pid, limit=min(remaining(), 60))
                trace_hook = hook(proxy.pid, work, "trace", trace=True, trace_stop=True)
                trace_hook["tunnels"] = k
                memory.traced = trace_hook.get("traced", 0) / KIB / k
                print(f"  {k} more tunnels opened under tracemalloc: "
                      f"{memory.traced:.2f} KiB of Python objects each", flush=True)
            for name, status in clients.status().items():
                if name != "warm":
                    pid = int(status["pid"])
                    memory.sa_side.append((int(status.get("confirmed", 0)),
                                           proc_status(pid)["VmRSS"], cpu_seconds(pid)))
            live = count_live_tunnels(gate)

            # Operations over the measured tunnels.
            distids = [push.distid_for(i) for i in range(w, w + n)]
            pids = {"armsproxy": proxy.pid, **clients.pids()}
            if rs_proc is not None:
                pids["demo RS process"] = rs_proc.pid
            window = Window(pids, metrics_port, work / "data" / "demo-rs.sqlite")
            wait_quiet(proxy.pid, limit=min(remaining(), 30))
            raw = work / "profile.raw"
            if args.profile:
                py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                profiler = subprocess.Popen(
                    [py_spy, "record", "--pid", str(proxy.pid), "--rate", "250",
                     "--format", "raw", "--output", str(raw), "--nonblocking", "--threads"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches
            profile_start = time.monotonic()
            results = push.run_reactor(lambda: operations(args, gate_port, distids, window),
                                       remaining())
            profile_lines: list[str] = []
            if profiler is not None:
                profile_seconds = time.monotonic() - profile_start
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=30)
                profiler = None
                profile_lines = summarise_profile(raw, profile_seconds, 250)
                with contextlib.suppress(OSError):
                    args.profile.write_bytes(raw.read_bytes())
            memory.after_ops = proc_status(proxy.pid)["VmRSS"]
            time.sleep(0.6)  # the SA processes' status files are rewritten every 0.25 s
            report(args, memory, confirmed_n, failed_total, open_seconds, live, results,
                   clients, base_hook, full_hook, trace_hook, profile_lines)
        finally:
            if profiler is not None and profiler.poll() is None:
                profiler.kill()
            if proxy is not None:
                push.stop(proxy)
            for proc in clients.procs.values():
                push.stop(proc)
            if rs_proc is not None:
                push.stop(rs_proc)
    return 0


def external_rs_config(work: Path, sa_port: int, rs_port: int, gate_port: int,
                       metrics_port: int) -> Path:
    """The embedded default's set-up, with the demo RS left to a process of its own (as a
    production RS is): armsproxy's figures then hold no RS work."""
    from armsproxy.pki import ensure_dev_pki

    data = work / "data"
    pki = ensure_dev_pki(data / "pki", ["127.0.0.1"])
    conf = work / "armsproxy.conf"
    conf.write_text(
        f"[armsproxy]\ndata_dir = {data}\n"
        f"[sa_gate]\nlisten = ssl:{sa_port}:interface=127.0.0.1:"
        f"privateKey={pki.server_key_path}:certKey={pki.server_cert_path}\n"
        f"public_urls = https://127.0.0.1:{sa_port}/arms\n"
        f"[rs]\nurl = http://127.0.0.1:{rs_port}/RPC2\n"
        f"[push]\nsa_ca = {pki.ca_cert_path}\n"
        f"tunnel_urls = https://127.0.0.1:{sa_port}/arms-tunnel\n"
        f"[rs_gate]\nlisten = tcp:{gate_port}:interface=127.0.0.1\n"
        f"[management]\nlisten = tcp:{metrics_port}:interface=127.0.0.1\n"
    )
    return conf


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Any:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def report(args: argparse.Namespace, memory: Memory, n: int, failed: int, open_seconds: float,
           live: int, results: list[OpsResult], clients: Clients, base_hook: dict[str, Any],
           full_hook: dict[str, Any], trace_hook: dict[str, Any],
           profile_lines: list[str]) -> None:
    mib = KIB
    print(f"\ntunnels: {n} confirmed ({failed} failed) in {open_seconds:.1f} s "
          f"({n / max(open_seconds, 1e-9):.0f}/s); armsproxy lists {live} SAs with a live "
          f"tunnel (incl. {args.warm} warm-up and "
          f"{args.trace_tunnels if args.tracemalloc else 0} traced)")
    print(f"armsproxy VmRSS: start {memory.start / mib:.1f} MiB, baseline with {args.warm} "
          f"warm tunnels {memory.baseline / mib:.1f} MiB (after gc.collect, malloc_trim)")
    previous = (0, memory.baseline)
    for tunnels, rss in memory.steps:
        print(f"  {tunnels:6d} tunnels: {rss / mib:7.1f} MiB  average "
              f"{memory.per_tunnel(rss, tunnels):5.1f} KiB/tunnel, this step "
              f"{(rss - previous[1]) / max(tunnels - previous[0], 1):5.1f} KiB/tunnel")
        previous = (tunnels, rss)
    print(f"  after {args.idle:.0f} s more idle: {memory.idle / mib:.1f} MiB -> "
          f"{memory.per_tunnel(memory.idle, n):.1f} KiB/tunnel; after gc.collect(): "
          f"{memory.per_tunnel(memory.after_gc, n):.1f}; after malloc_trim(0): "
          f"{memory.per_tunnel(memory.after_trim, n):.1f} KiB/tunnel")
    total = memory.total_per_tunnel(n)
    python = memory.traced
    if args.tracemalloc:
        print(f"  per idle tunnel: {total:.1f} KiB in all (VmRSS) = Python objects "
              f"{python:.2f} KiB (tracemalloc) + OpenSSL and the rest {total - python:.1f} KiB")
    else:
        print(f"  per idle tunnel: {total:.1f} KiB in all (VmRSS; --tracemalloc 0: no split)")
    for line in diagnose_lines(base_hook, full_hook, trace_hook, n):
        print(line)
    for tunnels, rss, cpu in memory.sa_side:
        print(f"  SA process: {tunnels} tunnels, VmRSS {rss / mib:.1f} MiB "
              f"({rss / max(tunnels, 1):.1f} KiB/tunnel including the interpreter), CPU "
              f"{cpu / max(tunnels, 1) * 1000:.1f} ms/tunnel so far (start-up included)")
    print(f"  after the operations: {memory.after_ops / mib:.1f} MiB")

    for run, result in enumerate(results, 1):
        _report_run(args, run, result)
    counts = {k: clients.total(k) for k in ("answered", "echo_sent", "echo_answered", "lost",
                                            "unexpected")}
    print(f"  SA side (tunnels lost after confirmation, answers, echoes): {counts}")
    if counts["lost"] or counts["unexpected"]:
        print(f"  SA notes: {clients.notes()[:5]}")
    for line in profile_lines:
        print(line)

    middle = sorted(results, key=lambda r: r.cpu_ms_per_op)[len(results) // 2]
    cpu_ms = statistics.median(r.cpu_ms_per_op for r in results)
    p50 = push.quantile(middle.latencies, 50) * 1000
    p99 = push.quantile(middle.latencies, 99) * 1000
    rss_ok = total <= 20.0
    rate_ok = middle.rate >= 0.98 * 1000
    p99_ok = p99 <= 20.0 and rate_ok
    python_part = (f"python/tunnel={python:.2f} KiB (< 3 KiB: "
                   f"{'met' if python < 3.0 else 'NOT met'}) " if args.tracemalloc else "")
    print(f"\nSUMMARY tunnels={n} rss/tunnel={total:.1f} KiB "
          f"(<= 20 KiB: {'met' if rss_ok else 'NOT met'}) {python_part}ops/s={middle.rate:.0f} "
          f"(1000: {'met' if rate_ok else 'NOT met'}) p50={p50:.1f} ms p99={p99:.1f} ms "
          f"(<= 20 ms at 1000 ops/s: {'met' if p99_ok else 'NOT met'}); CPU per operation "
          f"(median of {len(results)} run(s)) {cpu_ms:.3f} ms (<= 0.6 ms: "
          f"{'met' if cpu_ms <= 0.6 else 'NOT met'})")
    print(f"cpu_ms_per_op={cpu_ms:.3f} kib_per_idle_tunnel={total:.1f}")


def _report_run(args: argparse.Namespace, run: int, result: OpsResult) -> None:
    ok = len(result.latencies)
    p50 = push.quantile(result.latencies, 50) * 1000
    p99 = push.quantile(result.latencies, 99) * 1000
    offered = (f"offered {args.rate:.0f}/s, submits written at "
               f"{result.submitted / max(result.submit_span, 1e-9):.0f}/s (p99 "
               f"{result.lag_p99 * 1000:.0f} ms behind schedule)" if not args.concurrency
               else "")
    print(f"\noperations, run {run} ({result.mode}): {result.submitted} submitted, {ok} "
          f"succeeded, {dict(result.states)}; {offered}")
    print(f"  achieved {result.rate:.0f} ops/s over {result.elapsed:.2f} s; submit -> final "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max "
          f"{max(result.latencies, default=0) * 1000:.0f} ms; events delivered to the RS "
          f"{result.events} ({result.events / max(result.submitted, 1):.2f} per operation), "
          f"outbox empty {result.drain:.2f} s after the last operation was final")
    busy = {k: v for k, v in result.cpu.items() if k != "machine"}
    ops = max(result.submitted, 1)
    print(f"  CPU per operation over {result.cpu_wall:.1f} s (first submit to the outbox "
          "empty): " + ", ".join(
              f"{k} {v / ops * 1000:.3f} ms" for k, v in busy.items()
              if v / result.cpu_wall > 0.02 or k == "armsproxy")
          + "; busy: " + ", ".join(f"{k} {v / result.cpu_wall * 100:.0f}%"
                                   for k, v in busy.items() if v / result.cpu_wall > 0.02)
          + f"; machine {result.cpu.get('machine', 0) / result.cpu_wall * 100:.0f}% of one "
          f"core ({os.cpu_count()} cores)")
    for note in result.notes:
        print(f"  {note}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", "--tunnels", type=int, default=1000, help="idle tunnels (N)")
    parser.add_argument("-m", "--operations", type=int, default=2000, help="operations (M)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="open loop: operations submitted per second (default 1000)")
    parser.add_argument("-c", "--concurrency", type=int, default=None,
                        help="closed loop instead: orders in flight")
    parser.add_argument("--poll", type=float, default=0.005,
                        help="closed loop: seconds between push.list polls")
    parser.add_argument("--connections", type=int, default=48,
                        help="persistent connections to the RS gate (open loop); keep them "
                        "under its max_connections (64 by default) with room for the bench's "
                        "other calls")
    parser.add_argument("--clients", type=int, default=2, help="SA-side processes")
    parser.add_argument("--echo-interval", type=int, default=60,
                        help="seconds between a tunnel's echo-requests (armsproxy's embedded "
                             "default expects one at least every 130 s)")
    parser.add_argument("--open-concurrency", type=int, default=32,
                        help="tunnels being set up at a time, all SA processes together")
    parser.add_argument("--tls-max", choices=("1.2", "1.3"), default="1.3",
                        help="highest TLS version the SAs offer (libarms devices speak 1.0 "
                             "only; the embedded default accepts 1.2 and up)")
    parser.add_argument("--tmp-dir", type=Path, default=None,
                        help="where the temporary directory (armsproxy's data: SQLite) goes; "
                             "e.g. /dev/shm to take fsync out of the picture")
    parser.add_argument("--warm", type=int, default=20,
                        help="warm-up tunnels open before the baseline reading")
    parser.add_argument("--steps", type=int, default=2,
                        help="open the N tunnels in this many steps, RSS after each")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds of idle tunnels before the last reading")
    parser.add_argument("--rs-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the demo RS as a process of its own (the default: its CPU "
                             "and memory are then not charged to armsproxy) or, with "
                             "--no-rs-process, inside armsproxy (the embedded default)")
    parser.add_argument("--diagnose", action="store_true",
                        help="object counts by type and malloc figures per tunnel")
    parser.add_argument("--tracemalloc", type=int, default=1, metavar="FRAMES",
                        help="trace armsproxy's Python allocations while --trace-tunnels more "
                             "tunnels open, this many frames each (default 1; 0: off, no split "
                             "of the memory per tunnel)")
    parser.add_argument("--trace-tunnels", type=int, default=None, metavar="K",
                        help="tunnels opened under tracemalloc after the memory readings, for "
                             "the Python part per tunnel (default N: from N to 2N tunnels, "
                             "every container of the process grows as it does with N)")
    parser.add_argument("--runs", type=int, default=1,
                        help="operations phases (M operations each) over the same tunnels; "
                             "the CPU per operation printed last is their median")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy armsproxy during the operations; raw samples saved here")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="give up (and clean up) after this many seconds")
    parser.add_argument("--sa-client", type=Path, help=argparse.SUPPRESS)  # child: work dir
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--proxy-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sa_client:
        serve_tunnels(args)
        return 0
    if not 1 <= args.tunnels <= 60000 or args.operations < 1 or not 1 <= args.warm <= 1000:
        parser.error("--tunnels 1..60000, --operations >= 1, --warm 1..1000")
    if not 1 <= args.echo_interval <= 120:
        parser.error("--echo-interval 1..120 (armsproxy closes a tunnel after 130 s without "
                     "an echo-request)")
    if (args.clients < 1 or args.steps < 1 or args.rate <= 0 or args.open_concurrency < 1
            or args.runs < 1 or not 0 <= args.tracemalloc <= 100
            or (args.trace_tunnels is not None and args.trace_tunnels < 1)):
        parser.error("--clients, --steps, --open-concurrency, --runs, --trace-tunnels >= 1, "
                     "--rate > 0, --tracemalloc 0..100")
    if args.concurrency is not None and not 1 <= args.concurrency <= PAGE:
        parser.error(f"--concurrency 1..{PAGE}")
    if args.trace_tunnels is None:
        args.trace_tunnels = args.tunnels
    return run(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted")
