"""The workers' parts without processes: per-worker listeners, inherited sockets, the
supervisor's restarts and stops on a fake clock (tests/test_workers_pg.py runs real ones)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import pytest_twisted
from twisted.internet import error, protocol, reactor, task
from twisted.logger import LogLevel, eventAsJSON, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from armsproxy.workers import (
    LISTEN_FDS_ENV,
    READY_FIELD,
    WORKER_ENV,
    InheritedEndpoint,
    WorkerSupervisor,
    adopting_hook,
    inherited_listeners,
    worker_listen,
)


@pytest.mark.parametrize(("description", "k", "expected"), [
    ("tcp:8781:interface=127.0.0.1", 0, "tcp:8781:interface=127.0.0.1"),
    ("tcp:8781:interface=127.0.0.1", 2, "tcp:8783:interface=127.0.0.1"),
    ("tcp:port=8781", 1, "tcp:port=8782"),
    ("tcp:0:interface=127.0.0.1", 1, "tcp:0:interface=127.0.0.1"),  # any free port
    ("ssl:9443:privateKey=k.pem", 1, "ssl:9444:privateKey=k.pem"),
    ("unix:/run/armsproxy/m.sock:mode=600", 1, "unix:/run/armsproxy/m.sock.1:mode=600"),
    ("unix:address=/run/m.sock", 3, "unix:address=/run/m.sock.3"),
    ("", 1, ""),
])
def test_each_worker_has_its_own_management_listener(description, k, expected):
    assert worker_listen(description, k) == expected


def test_inherited_listeners_come_from_the_environment():
    environ = {LISTEN_FDS_ENV: json.dumps({"tcp:1:interface=127.0.0.1": [3, 2]})}
    assert inherited_listeners(environ) == {"tcp:1:interface=127.0.0.1": (3, 2)}
    assert inherited_listeners({}) == {}


def test_only_inherited_listeners_are_adopted_and_each_once():
    plain = object()
    hook = adopting_hook({"tcp:1": (7, socket.AF_INET)})
    adopted = hook(reactor, "tcp:1", plain)
    assert isinstance(adopted, InheritedEndpoint) and adopted.fd == 7
    assert hook(reactor, "tcp:1", plain) is plain  # a second listener of that description
    assert hook(reactor, "tcp:2", plain) is plain  # its own (management)


@pytest_twisted.ensureDeferred
async def test_a_workers_copy_of_a_unix_socket_leaves_the_parents_path(tmp_path):
    path = tmp_path / "rs.sock"
    parent = socket.socket(socket.AF_UNIX)
    parent.bind(str(path))
    parent.listen(8)
    port = await InheritedEndpoint(reactor, os.dup(parent.fileno()), socket.AF_UNIX).listen(
        protocol.Factory.forProtocol(protocol.Protocol))
    await port.stopListening()
    assert path.exists()  # a worker restarting must not unlink the socket others accept on
    parent.close()


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor:
    def __init__(self) -> None:
        self.spawned: list[tuple] = []

    def spawnProcess(self, proto, executable, args, env, childFDs):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, args, env, childFDs, process))
        proto.makeConnection(process)
        return process


def ended(proto, code: int | None = None, signal: int | None = None) -> None:
    value = error.ProcessTerminated(exitCode=code, signal=signal)
    proto.processEnded(Failure(value))


def ready(proto, k: int) -> None:
    event = {"log_format": "worker-{k} ready", "k": k, "log_level": LogLevel.info,
             "log_namespace": "armsproxy.tap", "log_time": 0.0, READY_FIELD: True}
    proto.childDataReceived(1, b"\x1e" + eventAsJSON(event).encode() + b"\n")


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def supervisor(clock, fatal=None, count=2, **options):
    fake = FakeReactor()
    sup = WorkerSupervisor(fake, ["python", "-m", "twisted"], count,
                           {"tcp:1": (11, socket.AF_INET), "tcp:2": (12, socket.AF_INET)},
                           on_fatal=(fatal or (lambda message: None)), clock=clock, env={},
                           **options)
    return sup, fake


def all_up(clock, **options):
    """A supervisor whose two workers have both said they are ready."""
    sup, fake = supervisor(clock, **options)
    sup.startService()
    for k in (0, 1):
        ready(fake.spawned[k][0], k)
    return sup, fake


def test_workers_get_the_listeners_as_descriptors_from_3_and_a_lifeline():
    sup, fake = supervisor(task.Clock())
    sup.startService()
    assert len(fake.spawned) == 2
    _proto, _args, env, child_fds, _ = fake.spawned[1]
    assert env[WORKER_ENV] == "1"
    assert json.loads(env[LISTEN_FDS_ENV]) == {"tcp:1": [3, socket.AF_INET],
                                               "tcp:2": [4, socket.AF_INET]}
    assert child_fds == {0: "w", 1: "r", 2: "r", 3: 11, 4: 12}


def test_worker_logs_are_relayed_tagged_with_the_worker(logged):
    sup, fake = supervisor(task.Clock())
    sup.startService()
    proto = fake.spawned[1][0]
    ready(proto, 1)
    proto.childDataReceived(1, b"not json")
    proto.childDataReceived(1, b"\n")
    proto.childDataReceived(2, b"armsproxy: something fatal\n")
    systems = [e.get("log_system") for e in logged if e.get(READY_FIELD)]
    assert systems == ["worker-1"]
    assert sup.workers[1].ready and not sup.workers[0].ready
    texts = [e.get("line") for e in logged if e.get("line")]
    assert "not json" in texts and "armsproxy: something fatal" in texts
    assert list(sup.workers[1].stderr) == ["armsproxy: something fatal"]


def test_a_worker_that_dies_is_restarted_backing_off_while_it_keeps_dying(logged):
    clock = task.Clock()
    sup, fake = supervisor(clock, max_crashes=100)
    sup.startService()
    ready(fake.spawned[0][0], 0)
    delays = []
    for _ in range(7):
        clock.advance(2)  # dies 2 s after its start: a crash loop
        ended(fake.spawned[-1][0] if len(fake.spawned) > 2 else fake.spawned[0][0], signal=9)
        delays.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        clock.advance(delays[-1])
        ready(fake.spawned[-1][0], 0)
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    # One that ran a while before dying starts again after the first delay.
    clock.advance(60)
    ended(fake.spawned[-1][0], code=1)
    assert clock.getDelayedCalls()[0].getTime() - clock.seconds() == 1
    assert any("exited (status 1) after 60 s" in formatEvent(e) for e in logged)


def test_a_worker_that_never_got_ready_stops_the_start_with_its_message():
    said: list[str] = []
    sup, fake = supervisor(task.Clock(), fatal=said.append)
    sup.startService()
    proto = fake.spawned[0][0]
    proto.childDataReceived(2, b"armsproxy: cannot open the store x ([store] dsn): no\n")
    ended(proto, code=1)
    assert said == ["worker 0 could not start (status 1): armsproxy: cannot open the store x "
                    "([store] dsn): no"]
    assert len(fake.spawned) == 2  # not restarted


def test_stop_terms_every_worker_and_kills_those_that_hang():
    clock = task.Clock()
    sup, fake = all_up(clock)
    ended(fake.spawned[0][0], signal=9)  # one dead, its restart pending
    assert clock.getDelayedCalls()
    stopped = sup.stopService()
    assert not any(c.active() for c in clock.getDelayedCalls() if c.func == sup._respawn)
    assert fake.spawned[1][4].signals == ["TERM"]
    assert not stopped.called
    clock.advance(20)
    assert fake.spawned[1][4].signals == ["TERM", "KILL"]
    ended(fake.spawned[1][0], signal=9)
    assert stopped.called
    assert len(fake.spawned) == 2  # nothing restarted while stopping


def test_a_restart_that_fails_once_all_were_up_is_retried_not_fatal():
    said: list[str] = []
    clock = task.Clock()
    sup, fake = all_up(clock, fatal=said.append)
    assert sup.started
    ended(fake.spawned[0][0], signal=9)
    clock.advance(1)
    ended(fake.spawned[2][0], code=1)  # its restart could not open the store, say
    assert said == []
    clock.advance(2)
    assert len(fake.spawned) == 4  # tried again, backing off


def test_a_spawn_that_fails_is_tried_again():
    clock = task.Clock()
    _sup, fake = all_up(clock)
    ended(fake.spawned[0][0], signal=9)
    real = fake.spawnProcess
    fake.spawnProcess = lambda *a, **kw: (_ for _ in ()).throw(OSError(24, "Too many files"))
    clock.advance(1)
    fake.spawnProcess = real
    assert len(fake.spawned) == 2
    clock.advance(2)
    assert len(fake.spawned) == 3


def test_odd_log_lines_never_cost_the_pipe_and_the_last_one_is_kept(logged):
    said: list[str] = []
    sup, fake = supervisor(task.Clock(), fatal=said.append)
    sup.startService()
    proto = fake.spawned[0][0]
    for line in (b"42", b"null", b"[1]", b"\x1e{\"broken\": ", b"\xff\xfe"):
        proto.childDataReceived(1, line + b"\n")
    proto.childDataReceived(1, b"x" * 3_000_000)  # a line without end: cut, not hoarded
    assert len(proto.buffers[1]) <= 1024 * 1024
    event = {"log_format": "cannot open the store {where} ([store] dsn): {why}",
             "where": "host=db", "why": "refused", "log_level": LogLevel.critical,
             "log_namespace": "armsproxy.tap", "log_time": 0.0}
    proto.childDataReceived(1, b"\n\x1e" + eventAsJSON(event).encode())  # no final newline
    ended(proto, code=1)
    texts = [formatEvent(e) for e in logged]
    assert any("worker-0: 42" in t for t in texts) and any("worker-0: [1]" in t for t in texts)
    assert said == ["worker 0 could not start (status 1): cannot open the store host=db "
                    "([store] dsn): refused"]


@pytest.mark.parametrize(("text", "expected"), [
    ("max 100000", 64), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
    ("garbage", 64),
])
def test_auto_counts_the_cgroup_cpu_quota(tmp_path, monkeypatch, text, expected):
    from armsproxy import config

    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(64)))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text + "\n")
    assert config.cpu_cores(cpu_max) == expected
    assert config.cpu_cores(tmp_path / "missing") == 64


def test_a_worker_that_keeps_crashing_ends_armsproxy_for_the_service_manager():
    said: list[str] = []
    clock = task.Clock()
    _sup, fake = all_up(clock, fatal=said.append)
    proto = fake.spawned[0][0]
    for crash in range(5):
        clock.advance(50)  # each lived 50 s, well past stable_after: 5 in 250 s all the same
        assert said == []
        ended(proto, signal=11)
        if crash < 4:
            clock.advance(1)
            proto = fake.spawned[-1][0]
            ready(proto, 0)
    assert said == ["worker 0 exited 5 times within 300 s (signal 11): no message"]
    # Crashes spread over more than the window are only restarted.
    said.clear()
    _sup, fake = all_up(clock, fatal=said.append)
    proto = fake.spawned[0][0]
    for _ in range(8):
        clock.advance(100)
        ended(proto, signal=11)
        clock.advance(1)
        proto = fake.spawned[-1][0]
        ready(proto, 0)
    assert said == []
