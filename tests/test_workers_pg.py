"""``twistd armsproxy --workers N`` (#12 point 3): N processes on the parent's listeners.

Real processes on a throwaway PostgreSQL database: the parent binds the SA gate and the RS
gate once and starts the workers, which inherit the listening sockets; the demo RS runs in a
process of its own, a simulated device pulls and is pushed to through the shared ports. The
tests kill a worker (the parent restarts it, the orders still finish), stop the parent
(every worker stops, status 0), kill the parent (the workers see their pipe close and stop),
and make a worker fail to start (the parent exits 1 with the worker's message).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from pgserver import db_rows
from pgserver import live_instances as instances
from test_kill_pg import KEY, ROOT, free_port, start_demo_rs, wait_port
from twisted.internet import reactor, threads

from armsproxy import pki as pki_mod
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import DeviceBehaviour, DeviceModule, SimulatedDevice, SimulatedSA
from armsproxy.store.postgresql import LEADER_LOCK, lead_session_name

pytestmark = pytest.mark.timeout(150)

DISTID = "0001-0002-0003-0004-0005-0006-0003-0001"
FINAL = ("succeeded", "failed", "expired", "cancelled")


def twistd(conf: Path, log_path: Path, *extra: str) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "armsproxy", "--config", str(conf), *extra],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def write_conf(tmp: Path, *, dsn: str, pki: pki_mod.DevPKI, sa_port: int, gate_port: int,
               management_port: int, rs_port: int, backend: str = "postgresql",
               workers: int | None = None) -> Path:
    tls = f"privateKey={pki.server_key_path}:certKey={pki.server_cert_path}"
    store = (f"backend = postgresql\ndsn = {dsn}\npool_size = 2\nlease = 3\nlease_renew = 1"
             if backend == "postgresql" else f"path = {tmp / 'armsproxy.sqlite'}")
    conf = tmp / "armsproxy.conf"
    conf.write_text(f"""
[armsproxy]
data_dir = {tmp}
{f"workers = {workers}" if workers else ""}
[sa_gate]
listen = ssl:{sa_port}:interface=127.0.0.1:{tls}
public_urls = https://127.0.0.1:{sa_port}/arms
[rs]
url = http://127.0.0.1:{rs_port}/RPC2
timeout = 5
[push]
sa_ca = {pki.ca_cert_path}
retry_base = 0.5
retry_cap = 2
interrupted_grace = 4
[store]
{store}
[rs_gate]
listen = tcp:{gate_port}:interface=127.0.0.1
[management]
listen = tcp:{management_port}:interface=127.0.0.1
""")
    return conf


def free_port_pair() -> int:
    """P such that P and P + 1 are free: the management ports of two workers."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status, answer.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await threads.deferToThread(predicate)
        if value:
            return value
        await _sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _sleep(seconds: float):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def setup(tmp_path, pg_dsn):
    pki = pki_mod.ensure_dev_pki(tmp_path / "pki", ["127.0.0.1"])
    rs_db = tmp_path / "demo-rs.sqlite"
    assert demo_cli.main(["--db", str(rs_db), "register", DISTID, "--key", KEY,
                          "--module", "1:1.0.0:harness-module",
                          "--push-methods", "https-simple"]) == 0
    assert demo_cli.main(["--db", str(rs_db), "issue-cert", DISTID,
                          "--ca-cert", str(pki.ca_cert_path),
                          "--ca-key", str(pki.ca_key_path)]) == 0
    rs_proc, rs_port = start_demo_rs(tmp_path, rs_db)
    ports = {"sa_port": free_port(), "gate_port": free_port(),
             "management_port": free_port_pair()}
    conf = write_conf(tmp_path, dsn=pg_dsn, pki=pki, rs_port=rs_port, **ports)
    procs: list[subprocess.Popen] = []
    yield {"tmp": tmp_path, "pki": pki, "conf": conf, "procs": procs, "dsn": pg_dsn,
           "rs_port": rs_port, **ports}
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rs_proc.terminate()
    rs_proc.wait(10)


async def start_workers(setup, count: int = 2) -> subprocess.Popen:
    log_path = setup["tmp"] / "armsproxy.log"
    parent = twistd(setup["conf"], log_path, "--workers", str(count))
    setup["procs"].append(parent)
    setup["log"] = log_path
    await threads.deferToThread(wait_port, setup["gate_port"], parent, log_path)
    await until(lambda: parent.poll() is None and len(instances(setup["dsn"])) == count,
                what=f"{count} worker leases")
    return parent


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_listeners_and_one_killed_is_replaced(setup):
    dsn = setup["dsn"]
    parent = await start_workers(setup, 2)
    workers = instances(dsn)
    assert parent.pid not in workers  # the parent holds no lease: it is no instance
    children = {int(p) for p in Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
                .read_text().split()}
    assert set(workers) == children
    text = setup["log"].read_text()
    assert "[worker-0]" in text and "[worker-1]" in text, text[-3000:]
    # Each worker has its own management listener: the configured port + its index.
    for k in (0, 1):
        await threads.deferToThread(wait_port, setup["management_port"] + k, parent,
                                    setup["log"])
        status, _ = await threads.deferToThread(
            get, f"http://127.0.0.1:{setup['management_port'] + k}/healthz")
        assert status == 200

    # Pulls through the shared SA gate; each one counted by the worker that took it.
    ca = setup["pki"].ca_cert_path.read_bytes()
    url = f"https://127.0.0.1:{setup['sa_port']}/arms"
    sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca)
    pulls = 12
    from lxml import etree

    for _ in range(pulls):
        answer = await sa.config_solicitation(url)
        assert answer.status == 200
    root = etree.fromstring(answer.body_xml)
    scraped = [await threads.deferToThread(
        get, f"http://127.0.0.1:{setup['management_port'] + k}/metrics") for k in (0, 1)]
    counted = [metric(body, "armsproxy_sa_gate_requests_total") for _, body in scraped]
    assert sum(counted) >= pulls, counted

    # Pushes through the shared RS gate to a device, before and after a worker is killed.
    await sa.push_method_query(url, methods=["https-simple"])
    device = SimulatedDevice(
        reactor, DISTID, KEY, ca_pem=ca,
        sa_cert_pem=root.findtext(".//sa-certificate").encode(),
        sa_key_pem=root.findtext(".//sa-private-key").encode(),
        behaviour=DeviceBehaviour(), rs_pull_server_urls=[url],
        modules=[DeviceModule(1, "1.0.0", "harness-module")])
    await device.listen()
    try:
        await device.confirm()
        import xmlrpc.client

        def submit(i: int) -> str:
            with xmlrpc.client.ServerProxy(
                    f"http://127.0.0.1:{setup['gate_port']}/RPC2") as proxy:
                return proxy.push.submit({"distribution_id": DISTID,
                                          "operation": "read-module-list", "params": {},
                                          "request_id": f"w-{i}"})

        def states(ids: list[str]) -> list[str]:
            rows = dict(db_rows(dsn, "SELECT operation_id, state FROM operations"))
            return [rows.get(i) for i in ids]

        first = [await threads.deferToThread(submit, i) for i in range(4)]
        await until(lambda: all(s == "succeeded" for s in states(first)),
                    what="the first orders to succeed")
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        # The parent stays, restarts the worker (a new pid, a new lease) ...
        replaced = await until(
            lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(
                instances(dsn)), what="a replacement worker")
        assert parent.poll() is None
        assert set(replaced) - set(workers)
        # ... and orders go on being taken and done.
        second = [await threads.deferToThread(submit, i) for i in range(4, 8)]
        await until(lambda: all(s == "succeeded" for s in states(second)),
                    what="the orders after the kill to succeed")
        text = setup["log"].read_text()
        assert "exited (signal 9)" in text and "restarting it in 1 s" in text, text[-3000:]
    finally:
        await device.close()

    # SIGTERM: every worker stops (each gives its lease back), the parent exits 0.
    pids = list(instances(dsn))
    parent.send_signal(signal.SIGTERM)
    assert await threads.deferToThread(parent.wait, 40) in (0, -signal.SIGTERM)
    assert not any(alive(pid) for pid in pids)
    assert instances(dsn) == {}


def leader_lock_holders(dsn: str) -> list[str]:
    """application_name of the sessions holding the leader lock (one, or none meanwhile)."""
    return [name for (name,) in db_rows(
        dsn, "SELECT a.application_name FROM pg_locks AS l JOIN pg_stat_activity AS a"
             " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
             " AND l.objsubid = 1 AND l.objid = %s", LEADER_LOCK)]


@pytest_twisted.ensureDeferred
async def test_a_frozen_leader_loses_the_lead_to_a_live_worker(setup):
    """SIGSTOP of the worker that leads (outbox, purges): its session would hold the lock
    for as long as the host answers; the other worker takes its expired lease over, ends
    that session and leads. Thawed, the frozen one finds out and stops leading."""
    dsn = setup["dsn"]
    parent = await start_workers(setup, 2)
    workers = instances(dsn)
    names = {lead_session_name(instance): pid for pid, instance in workers.items()}
    holders = await until(lambda: leader_lock_holders(dsn), what="a leader")
    frozen = names[holders[0]]
    (other,) = set(workers) - {frozen}
    os.kill(frozen, signal.SIGSTOP)
    try:
        # lease 3 s, renewed and taken over every 1 s: the other leads within seconds.
        await until(lambda: leader_lock_holders(dsn) == [lead_session_name(workers[other])],
                    what="the live worker to lead")
        text = setup["log"].read_text()
        assert "ended 1 leader-lock session" in text, text[-3000:]
    finally:
        os.kill(frozen, signal.SIGCONT)
    await until(lambda: "no longer leads" in setup["log"].read_text(),
                what="the thawed worker to stop leading")
    assert leader_lock_holders(dsn) == [lead_session_name(workers[other])]
    assert parent.poll() is None and alive(frozen)
    parent.send_signal(signal.SIGTERM)
    assert await threads.deferToThread(parent.wait, 40) in (0, -signal.SIGTERM)


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_their_parent_is_killed(setup):
    parent = await start_workers(setup, 2)
    pids = list(instances(setup["dsn"]))
    parent.kill()
    parent.wait(10)
    await until(lambda: not any(alive(pid) for pid in pids), timeout=30,
                what="the workers to stop")


def test_a_worker_that_cannot_start_stops_the_parent_with_its_message(setup, tmp_path):
    conf = setup["conf"]
    conf.write_text(conf.read_text().replace(f"dsn = {setup['dsn']}",
                                             f"dsn = {setup['dsn']}_missing"))
    log_path = tmp_path / "failed.log"
    parent = twistd(conf, log_path, "--workers", "2")
    setup["procs"].append(parent)
    assert parent.wait(60) == 1
    text = log_path.read_text()
    assert "worker 0 could not start" in text or "worker 1 could not start" in text, text[-3000:]
    assert "[store] dsn" in text or "_missing" in text, text[-3000:]


@pytest.mark.parametrize("how", ["option", "file"])
def test_several_workers_on_sqlite_are_refused_naming_the_setting(tmp_path, how):
    pki = pki_mod.ensure_dev_pki(tmp_path / "pki", ["127.0.0.1"])
    conf = write_conf(tmp_path, dsn="", pki=pki, sa_port=free_port(), gate_port=free_port(),
                      management_port=free_port(), rs_port=free_port(), backend="sqlite",
                      workers=2 if how == "file" else None)
    log_path = tmp_path / "armsproxy.log"
    parent = twistd(conf, log_path, *(["--workers", "2"] if how == "option" else []))
    assert parent.wait(60) == 1
    text = log_path.read_text()
    setting = "--workers" if how == "option" else "[armsproxy] workers"
    assert f"{setting} = 2: several worker processes need [store] backend = postgresql" \
        in text, text


def test_workers_1_on_the_command_line_overrides_the_files_count(tmp_path):
    pki = pki_mod.ensure_dev_pki(tmp_path / "pki", ["127.0.0.1"])
    gate_port = free_port()
    conf = write_conf(tmp_path, dsn="", pki=pki, sa_port=free_port(), gate_port=gate_port,
                      management_port=free_port(), rs_port=free_port(), backend="sqlite",
                      workers=2)
    log_path = tmp_path / "armsproxy.log"
    proxy = twistd(conf, log_path, "--workers", "1")
    try:
        wait_port(gate_port, proxy, log_path)  # one process, as the option says
    finally:
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) in (0, -signal.SIGTERM)
