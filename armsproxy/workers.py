"""Worker processes on one host sharing armsproxy's listeners (#12).

One Python process uses one core. With ``--workers N`` (or ``[armsproxy] workers``) the
process twistd starts becomes a *parent* that:

* binds every shared listener once, in ``privilegedStartService`` (before twistd drops
  privileges: port 443 and unix sockets work as they do for one process), and never accepts
  on them itself;
* starts N workers, ``python -m twisted armsproxy --config FILE`` (twist), each handed the
  listening sockets as inherited descriptors. They accept from the same kernel queue, so a
  worker that dies loses no connection waiting there (``SO_REUSEPORT`` would give each its
  own queue, reset with it, and cannot share a unix socket);
* relays their logs (JSON on their stdout) into its own log, tagged ``worker-K``;
* restarts a worker that exits, stops them all on SIGTERM, and exits 1 with a worker's
  message when one cannot start.

The parent opens no store and speaks to no device: each worker is a whole armsproxy, an
instance with its own lease on the shared PostgreSQL store (armsproxy/instance.py), which is
what lets another take over an order a dead worker held. A worker's management listener is its
own (port + K), so that /metrics and /healthz describe one process each.

A worker watches its stdin, a pipe from the parent: when the parent is gone (even SIGKILLed)
it reads end-of-file and stops cleanly.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, tcp, unix
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.logger import Logger, LogLevel, eventFromJSON, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from .tls import endpoint_fields, quote_endpoint_value, split_endpoint

log = Logger()

WORKER_ENV = "ARMSPROXY_WORKER"  # K: this process is worker K of a parent
LISTEN_FDS_ENV = "ARMSPROXY_LISTEN_FDS"  # {description: [fd, family]} it inherited
READY_FIELD = "armsproxy_worker_ready"  # the log event that tells the parent a worker is up
FIRST_FD = 3  # inherited listeners are the worker's descriptors 3, 4, ...


# -- the parent: listeners bound for the workers ------------------------------------------

@implementer(IStreamServerEndpoint)
@dataclass(slots=True)
class BoundForWorkers:
    """Binds like ``endpoint`` (with its errors) but never accepts: the descriptor is
    recorded in ``bound`` for the workers, who accept on it."""

    endpoint: IStreamServerEndpoint
    description: str
    bound: dict[str, tuple[int, int]]

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        d = self.endpoint.listen(_Idle())  # never accepts: no factory of armsproxy's starts
        d.addCallback(self._keep)
        return d

    def _keep(self, port: Any) -> Any:
        port.stopReading()  # the parent accepts nothing: its workers do
        self.bound[self.description] = (port.fileno(), port.socket.family)
        return port


class _Idle(protocol.Factory):
    noisy = False


def binding_hook(bound: dict[str, tuple[int, int]]) -> Callable[..., IStreamServerEndpoint]:
    """For :data:`armsproxy.tls.listener_hook` in the parent."""

    def hook(reactor: Any, description: str,
             endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        return BoundForWorkers(endpoint, description, bound)

    return hook


# -- a worker: listeners adopted from the parent ------------------------------------------

class _SharedUNIXPort(unix.Port):
    """A unix socket the parent owns: closing a worker's copy leaves its path in place."""

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
@dataclass(slots=True)
class InheritedEndpoint:
    """Accepts on a listening socket this worker inherited (descriptor ``fd``)."""

    reactor: Any
    fd: int
    family: int

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        try:
            os.set_blocking(self.fd, False)
            if self.family == socket.AF_UNIX:
                port = _SharedUNIXPort._fromListeningDescriptor(self.reactor, self.fd, factory)
                port.startListening()
            else:
                port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        except Exception:
            return defer.fail()
        finally:
            os.close(self.fd)  # the port holds its own duplicate
        return defer.succeed(port)


def inherited_listeners(environ: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """What the parent handed this worker: {listener description: (fd, family)}."""
    raw = (os.environ if environ is None else environ).get(LISTEN_FDS_ENV, "{}")
    return {description: (int(fd), int(family))
            for description, (fd, family) in json.loads(raw).items()}


class AdoptingHook:
    """For :data:`armsproxy.tls.listener_hook` in a worker: the listeners the parent bound are
    adopted (once each); any other (its own management listener) binds as usual. What is
    left once the services are built (:attr:`left`) the worker's configuration no longer
    names: the file changed since the parent read it."""

    def __init__(self, inherited: dict[str, tuple[int, int]]) -> None:
        self.left = dict(inherited)

    def __call__(self, reactor: Any, description: str,
                 endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        if description not in self.left:
            return endpoint
        fd, family = self.left.pop(description)
        return InheritedEndpoint(reactor, fd, family)


def adopting_hook(inherited: dict[str, tuple[int, int]]) -> AdoptingHook:
    return AdoptingHook(inherited)


def worker_listen(description: str, index: int) -> str:
    """Worker ``index``'s own listener for a per-worker setting (management): the port plus
    ``index`` (0 stays 0: any free port), or a unix path with ``.index`` appended."""
    if not description:
        return description
    spec = split_endpoint(description)
    fields = endpoint_fields(description, keep_escapes=True)
    if spec.kind == "unix":
        for i, part in enumerate(fields[1:], 1):
            if part.startswith("address="):
                fields[i] = f"{part}.{index}"
                break
            if "=" not in part:
                fields[i] = f"{part}.{index}"
                break
        return ":".join(fields)
    for i, part in enumerate(fields[1:], 1):
        key, sep, value = part.partition("=")
        if (sep and key == "port") or (not sep and key.isdigit()):
            number = int(value if sep else key)
            shifted = str(number + index if number else 0)
            fields[i] = f"port={quote_endpoint_value(shifted)}" if sep else shifted
            break
    return ":".join(fields)


@implementer(IReadDescriptor)
class Lifeline:
    """The worker's stdin, a pipe from its parent: end-of-file means the parent is gone."""

    def __init__(self, reactor: Any, on_lost: Callable[[], None], fd: int = 0) -> None:
        self.reactor = reactor
        self.on_lost = on_lost
        self.fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 512)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else error.ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:
        self.reactor.removeReader(self)
        log.warn("worker: the parent process is gone (its pipe closed); stopping")
        self.on_lost()

    def logPrefix(self) -> str:
        return "lifeline"


# -- the parent: the workers ---------------------------------------------------------------

@dataclass
class Worker:
    index: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    ready: bool = False
    delay: float = 1.0  # before the next restart
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    pending: bytes = b""
    restart: Any = None  # the delayed call that restarts it
    exits: deque[float] = field(default_factory=deque)  # when it exited, lately


MAX_LINE = 1024 * 1024  # a worker's log line longer than this is cut
_LEVELS = frozenset(LogLevel.iterconstants())


class _WorkerProtocol(protocol.ProcessProtocol):
    """A worker's stdout (its JSON log) and stderr, line by line, into the parent's log."""

    def __init__(self, supervisor: WorkerSupervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self.buffers = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self.buffers:
            return
        pending = self.buffers[fd] + data
        if b"\n" not in data:  # one long line arriving in pieces: no re-split of it all
            self.buffers[fd] = pending if len(pending) <= MAX_LINE else pending[:MAX_LINE]
            return
        *lines, rest = pending.split(b"\n")
        self.buffers[fd] = rest[:MAX_LINE]
        for line in lines:
            self._line(fd, line[:MAX_LINE])

    def _line(self, fd: int, line: bytes) -> None:
        try:
            if fd == 1:
                self.supervisor.relay_log(self.worker, line)
            else:
                self.supervisor.relay_stderr(self.worker, line)
        except Exception:  # one line must never cost the pipe (Twisted closes it on a raise)
            log.failure("worker-{k}: cannot relay a log line", k=self.worker.index)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self.buffers.items():  # a last line without its newline
            if rest:
                self._line(fd, rest)
        self.buffers = {1: b"", 2: b""}
        self.supervisor.ended(self.worker, reason.value)


class WorkerSupervisor(service.Service):
    """Starts, watches, restarts and stops the workers.

    A worker that exits before it said it was ready, before every worker was ready once, stops
    the start: the parent logs its message and ``on_fatal`` (exit 1) ends everything, as a
    single process would have. After that, a worker that exits is restarted after ``delay``
    seconds, doubling up to ``max_delay`` while it keeps dying within ``stable_after`` of its
    start; one that exits ``max_crashes`` times within ``crash_window`` seconds ends armsproxy
    (exit 1), as a single process crashing would, for the service manager to see.
    """

    def __init__(self, reactor: Any, argv: Sequence[str], count: int,
                 listeners: dict[str, tuple[int, int]], *,
                 on_fatal: Callable[[str], None], clock: IReactorTime | None = None,
                 delay: float = 1.0, max_delay: float = 30.0, stable_after: float = 10.0,
                 stop_timeout: float = 20.0, env: dict[str, str] | None = None,
                 max_crashes: int = 5, crash_window: float = 300.0) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.argv = list(argv)
        self.count = count
        self.listeners = listeners
        self.on_fatal = on_fatal
        self.delay, self.max_delay, self.stable_after = delay, max_delay, stable_after
        self.stop_timeout = stop_timeout
        self.max_crashes, self.crash_window = max_crashes, crash_window
        self.env = dict(os.environ if env is None else env)
        self.workers = [Worker(k, delay=delay) for k in range(count)]
        self._stopped: defer.Deferred[None] | None = None
        #: Every worker was ready once: from then on a worker that fails is restarted.
        self.started = False

    # -- start -------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        log.info("{n} workers sharing {listeners}", n=self.count,
                 listeners=", ".join(sorted(self.listeners)) or "no listener")
        for worker in self.workers:
            self.spawn(worker)

    def spawn(self, worker: Worker) -> None:
        worker.restart = None
        worker.ready = False
        worker.pending = b""
        worker.stderr.clear()
        described = sorted(self.listeners.items())
        inherited = {description: [FIRST_FD + i, family]
                     for i, (description, (_fd, family)) in enumerate(described)}
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({FIRST_FD + i: fd for i, (_d, (fd, _f)) in enumerate(described)})
        env = {**self.env, WORKER_ENV: str(worker.index),
               LISTEN_FDS_ENV: json.dumps(inherited)}
        worker.started = self.clock.seconds()
        worker.process = self.reactor.spawnProcess(
            _WorkerProtocol(self, worker), self.argv[0], self.argv, env=env, childFDs=child_fds)
        worker.pid = worker.process.pid
        log.info("worker-{k} started (pid {pid})", k=worker.index, pid=worker.pid)

    def relay_log(self, worker: Worker, line: bytes) -> None:
        """One line of a worker's log (twist's JSON) into this process's log."""
        text = line.lstrip(b"\x1e").decode("utf-8", "replace").strip()
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            log.info("worker-{k}: {line}", k=worker.index, line=text)
            return
        event["log_system"] = f"worker-{worker.index}"
        if event.get(READY_FIELD) and not worker.ready:
            worker.ready = True
            if all(w.ready for w in self.workers):
                self.started = True
        level = event.get("log_level")
        if level not in _LEVELS:
            event["log_level"] = level = LogLevel.info
        if level in (LogLevel.error, LogLevel.critical):  # what fatal() says, among others
            worker.stderr.append(" ".join(formatEvent(event).split())[:2000])
        globalLogPublisher(event)

    def relay_stderr(self, worker: Worker, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            worker.stderr.append(text)
            log.error("worker-{k}: {line}", k=worker.index, line=text)

    # -- a worker's end -----------------------------------------------------------------
    def ended(self, worker: Worker, status: BaseException) -> None:
        worker.process = None
        how = _how_it_ended(status)
        if self._stopped is not None:  # stopping: expected
            log.info("worker-{k} stopped ({how})", k=worker.index, how=how)
            if all(w.process is None for w in self.workers) and not self._stopped.called:
                self._stopped.callback(None)
            return
        if not worker.ready and not self.started:
            # At the first start, the configuration or what it names is wrong: end the
            # start as one process would. Later (every worker was up once), a restart that
            # fails, e.g. while PostgreSQL fails over, is retried with the backoff instead.
            said = "; ".join(worker.stderr) or "no message"
            self.on_fatal(f"worker {worker.index} could not start ({how}): {said}")
            return
        now = self.clock.seconds()
        worker.exits.append(now)
        while worker.exits and worker.exits[0] <= now - self.crash_window:
            worker.exits.popleft()
        if len(worker.exits) >= self.max_crashes:
            # Crash-looping: say so the way one process would, with status 1, and let the
            # service manager (Restart=on-failure) or the operator take it from here.
            said = "; ".join(worker.stderr) or "no message"
            self.on_fatal(f"worker {worker.index} exited {len(worker.exits)} times within "
                          f"{self.crash_window:g} s ({how}): {said}")
            return
        lived = now - worker.started
        if lived >= self.stable_after:  # it ran a while: a fresh start, not a crash loop
            worker.delay = self.delay
        delay, worker.delay = worker.delay, min(worker.delay * 2, self.max_delay)
        log.warn("worker-{k} (pid {pid}) exited ({how}) after {lived:.0f} s; restarting it in "
                 "{delay:g} s (its orders are taken over when its lease expires)",
                 k=worker.index, pid=worker.pid, how=how, lived=lived, delay=delay)
        worker.restart = self.clock.callLater(delay, self._respawn, worker)

    def _respawn(self, worker: Worker) -> None:
        if not self.running or self._stopped is not None:
            return
        try:
            self.spawn(worker)
        except Exception as e:  # EMFILE, EAGAIN, ENOMEM: try again later, never give up
            delay, worker.delay = worker.delay, min(worker.delay * 2, self.max_delay)
            log.error("worker-{k}: cannot start it ({e}); trying again in {delay:g} s",
                      k=worker.index, e=e, delay=delay)
            worker.process = None
            worker.restart = self.clock.callLater(delay, self._respawn, worker)

    # -- stop ----------------------------------------------------------------------------
    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopped = defer.Deferred()
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
        alive = [w for w in self.workers if w.process is not None]
        if not alive:
            self._stopped.callback(None)
            return self._stopped
        for worker in alive:
            _signal(worker.process, "TERM")
        killer = self.clock.callLater(self.stop_timeout, self._kill_stragglers)
        self._stopped.addBoth(lambda r: (killer.active() and killer.cancel(), r)[1])
        return self._stopped

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                log.warn("worker-{k} did not stop within {t:g} s: killed", k=worker.index,
                         t=self.stop_timeout)
                _signal(worker.process, "KILL")


def _signal(process: Any, name: str) -> None:
    try:
        process.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _how_it_ended(status: BaseException) -> str:
    signal = getattr(status, "signal", None)
    if signal:
        return f"signal {signal}"
    return f"status {getattr(status, 'exitCode', None)}"


def worker_argv(config: Path) -> list[str]:
    """A worker's command line: twist, JSON logs on stdout (the parent relays them)."""
    return [sys.executable, "-m", "twisted", "--log-format=json", "--log-file=-",
            "--log-level=info", "armsproxy", "--config", str(config)]
