"""SIGKILL one of several armsproxy instances on one PostgreSQL database (#12 point 4).

Real processes: two or three ``twistd armsproxy`` on one (throwaway) database, the demo RS in
a process of its own, and in this process TCP load balancers in front of the instances' SA
gates (what devices and their done-requests reach, as in production: one for pulls and
done-requests, one for tunnels) and simulated devices: some pushed to over https-simple, some
holding https-tunnels through the balancer (so spread over the instances). Orders of every
kind go to every instance's RS gate; one instance, the one holding the most tunnels, is
killed with SIGKILL while orders are queued, being sent and waiting for their done-request.
Then:

* every accepted order reaches a final state (done by a survivor, or resolved by the restart
  rules: read-only re-sent, side effects never re-sent);
* no order with side effects ran twice on a device;
* every result stored before the kill is unchanged;
* the devices whose tunnel owner died reconnect (through the balancer) to a survivor, which
  owns their tunnels now, and their orders, queued before and after the kill, go there;
* the RS got every operation's events in order (the outbox moved to a survivor).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import xmlrpc.client
from collections import Counter
from pathlib import Path

import pytest
import pytest_twisted
from lxml import etree
from pgserver import db_rows
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from armsproxy import pki as pki_mod
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import (
    DeviceBehaviour,
    DeviceModule,
    SimulatedDevice,
    SimulatedSA,
    SimulatedTunnelDevice,
    TunnelBehaviour,
)

ROOT = Path(__file__).parent.parent
KEY = "harness-rs-key"
FINAL = ("succeeded", "failed", "expired", "cancelled")
SIDE_EFFECTS = ("md-command", "clear-status")

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}: {log.read_text(errors='replace')[-3000:]}")


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


# -- a TCP load balancer: each connection to the next backend that accepts it ----------------


class _Back(Protocol):
    def __init__(self, front: _Front) -> None:
        self.front = front

    def connectionMade(self) -> None:
        self.front.linked(self)

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.front.transport.loseConnection()


class _Front(Protocol):
    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.back: _Back | None = None
        self.pending: list[bytes] = []
        self.gone = False

    def connectionMade(self) -> None:
        defer.ensureDeferred(self.balancer.connect(self)).addErrback(
            lambda _: self.transport.loseConnection())

    def linked(self, back: _Back) -> None:
        self.back = back
        if self.gone:
            back.transport.loseConnection()
            return
        for data in self.pending:
            back.transport.write(data)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.back is None:
            self.pending.append(data)
        else:
            self.back.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.gone = True
        if self.back is not None:
            self.back.transport.loseConnection()


class Balancer:
    """Round robin over ``backends`` (ports on 127.0.0.1); a backend that refuses (dead) is
    skipped. Counts connections per backend."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.turn = 0
        self.connections: Counter[int] = Counter()
        self.port = 0
        self._listening = None

    async def listen(self) -> int:
        self._listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _Front(self)))
        self.port = self._listening.getHost().port
        return self.port

    async def connect(self, front: _Front) -> None:
        for _ in range(len(self.backends)):
            port = self.backends[self.turn % len(self.backends)]
            self.turn += 1
            try:
                await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2).connect(
                    Factory.forProtocol(lambda: _Back(front)))
            except Exception:
                continue
            self.connections[port] += 1
            return
        raise ConnectionRefusedError("no backend")

    async def close(self) -> None:
        if self._listening is not None:
            await self._listening.stopListening()


# -- the processes ---------------------------------------------------------------------------


class Instance:
    """One armsproxy process on the shared database."""

    def __init__(self, tmp: Path, n: int, *, dsn: str, pki: pki_mod.DevPKI, lb_port: int,
                 tunnel_lb_port: int, rs_port: int) -> None:
        self.n = n
        self.port, self.gate_port = free_port(), free_port()
        self.dir = tmp / f"instance-{n}"
        self.dir.mkdir()
        self.log_path = self.dir / "armsproxy.log"
        self.conf = self.dir / "armsproxy.conf"
        lb = f"https://127.0.0.1:{lb_port}"
        tls = f"privateKey={pki.server_key_path}:certKey={pki.server_cert_path}"
        self.conf.write_text(f"""
[armsproxy]
data_dir = {self.dir}
[sa_gate]
listen = ssl:{self.port}:interface=127.0.0.1:{tls}
public_urls = {lb}/arms
[rs]
url = http://127.0.0.1:{rs_port}/RPC2
timeout = 5
[push]
sa_ca = {pki.ca_cert_path}
result_url = {lb}/arms
tunnel_urls = https://127.0.0.1:{tunnel_lb_port}/arms-tunnel
echo_interval = 2
retry_base = 0.5
retry_cap = 2
busy_delay = 1
done_timeout = 8
interrupted_grace = 4
[store]
backend = postgresql
dsn = {dsn}
pool_size = 3
lease = 3
lease_renew = 1
[rs_gate]
listen = tcp:{self.gate_port}:interface=127.0.0.1
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "armsproxy", "--config", str(self.conf)],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def ready(self) -> None:
        assert self.proc is not None
        wait_port(self.gate_port, self.proc, self.log_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def call(self, method: str, *args):
        with xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.gate_port}/RPC2") as proxy:
            return getattr(proxy, method)(*args)


def start_demo_rs(tmp: Path, db: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log_path = tmp / "demo-rs.log"
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from armsproxy.demo_rs.cli import main;"
         " sys.exit(main(sys.argv[1:]))", "--db", str(db), "serve", "--listen",
         f"tcp:{port}:interface=127.0.0.1"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_port(port, proc, log_path)
    return proc, port


def order(distid: str, i: int) -> dict:
    """Read-only and side-effect operations, 1-way and 2-way; side effects carry a marker
    that tells each run on the device apart."""
    kinds = [
        ("read-module-list", {}),  # 1-way, read-only
        ("md-command", {"module_id": 1, "command": f"unique-command-{i}"}),  # 1-way, effects
        ("ping", {"address": "192.0.2.1", "count": 1}),  # 2-way, read-only
        ("clear-status", {"status_requests": [{"id": 1, "param": f"counters-{i}"}]}),  # 2-way
        ("check-transaction", {}),
        ("read-status", {"status_requests": [{"id": 1, "param": f"cpu-{i}"}]}),
    ]
    operation, params = kinds[i % len(kinds)]
    return {"distribution_id": distid, "operation": operation, "params": params,
            "request_id": f"kill-{i}"}


def marker(operation: str, params: dict) -> bytes | None:
    if operation == "md-command":
        return f"{params['command']}<".encode()
    if operation == "clear-status":
        return f"{params['status_requests'][0]['param']}<".encode()
    return None


# -- the test --------------------------------------------------------------------------------


@pytest.mark.parametrize("instances", [2, 3])
@pytest_twisted.ensureDeferred
async def test_sigkill_of_an_instance_loses_no_order_and_runs_none_twice(
        tmp_path, pg_dsn, instances):
    started = time.monotonic()
    pki = pki_mod.ensure_dev_pki(tmp_path / "pki", ["127.0.0.1"])
    ca = pki.ca_cert_path.read_bytes()
    rs_db = tmp_path / "demo-rs.sqlite"
    simple_ids = [f"0001-0002-0003-0004-0005-0006-0001-{i:04X}" for i in range(instances + 1)]
    tunnel_ids = [f"0001-0002-0003-0004-0005-0006-0002-{i:04X}" for i in range(2 * instances)]
    for distid in simple_ids + tunnel_ids:
        method = "https-simple" if distid in simple_ids else "https-tunnel"
        assert demo_cli.main(["--db", str(rs_db), "register", distid, "--key", KEY,
                              "--module", "1:1.0.0:harness-module",
                              "--push-methods", method]) == 0
        assert demo_cli.main(["--db", str(rs_db), "issue-cert", distid,
                              "--ca-cert", str(pki.ca_cert_path),
                              "--ca-key", str(pki.ca_key_path)]) == 0
    rs_proc, rs_port = start_demo_rs(tmp_path, rs_db)
    balancer, tunnel_balancer = Balancer([]), Balancer([])
    lb_port, tunnel_lb_port = await balancer.listen(), await tunnel_balancer.listen()
    lb = f"https://127.0.0.1:{lb_port}"
    tunnel_url = f"https://127.0.0.1:{tunnel_lb_port}/arms-tunnel"
    proxies = [Instance(tmp_path, n, dsn=pg_dsn, pki=pki, lb_port=lb_port,
                        tunnel_lb_port=tunnel_lb_port, rs_port=rs_port)
               for n in range(instances)]
    balancer.backends[:] = tunnel_balancer.backends[:] = [p.port for p in proxies]
    devices: list = []
    try:
        for p in proxies:
            p.start()
        for p in proxies:
            await threads.deferToThread(p.ready)
        for _ in range(300):  # each has opened the store and registered its lease
            if await threads.deferToThread(db_rows, pg_dsn, "SELECT to_regclass('instances')") \
                    != [(None,)] and len(await threads.deferToThread(
                        db_rows, pg_dsn, "SELECT instance_id FROM instances")) == instances:
                break
            assert all(p.alive for p in proxies), [p.log_path.read_text()[-2000:]
                                                   for p in proxies if not p.alive]
            await sleep(0.05)
        else:
            raise AssertionError("the instances did not all register")
        modules = [DeviceModule(1, "1.0.0", "harness-module")]

        async def certificates(distid: str, method: str) -> dict:
            sa = SimulatedSA(reactor, distid, KEY, ca_pem=ca)
            root = etree.fromstring((await sa.config_solicitation(f"{lb}/arms")).body_xml)
            await sa.push_method_query(f"{lb}/arms", methods=[method])
            return {"sa_cert_pem": root.findtext(".//sa-certificate").encode(),
                    "sa_key_pem": root.findtext(".//sa-private-key").encode()}

        simple: dict[str, SimulatedDevice] = {}
        for distid in simple_ids:
            device = SimulatedDevice(
                reactor, distid, KEY, ca_pem=ca, **await certificates(distid, "https-simple"),
                behaviour=DeviceBehaviour(start_answer_delay=0.2, done_delay=0.6),
                rs_pull_server_urls=[f"{lb}/arms"], modules=modules)
            devices.append(device)
            await device.listen()
            await device.confirm()
            simple[distid] = device
        tunnel: dict[str, SimulatedTunnelDevice] = {}
        for distid in tunnel_ids:
            device = SimulatedTunnelDevice(
                reactor, distid, KEY, ca_pem=ca, **await certificates(distid, "https-tunnel"),
                tunnel_urls=[tunnel_url], echo_interval=2.0, retry_interval=0.3,
                modules=modules, behaviour=TunnelBehaviour(answer_delay=0.25, done_delay=0.6,
                                                           retry_max=1000))
            devices.append(device)
            await device.start()
            tunnel[distid] = device
        for device in tunnel.values():
            await device.ready(timeout=20)
        for _ in range(200):
            if all(d.confirmed for d in simple.values()):
                break
            await sleep(0.05)
        assert all(d.confirmed for d in simple.values())
        # Every tunnel is owned by the instance it went to (round robin: all of them).
        owners: dict[str, str] = {}
        for _ in range(100):
            owners = dict(db_rows(pg_dsn, "SELECT distribution_id, tunnel_owner FROM"
                                          " sa_registry WHERE tunnel_owner IS NOT NULL"))
            if set(owners) == set(tunnel_ids):
                break
            await sleep(0.05)
        assert set(owners) == set(tunnel_ids), owners
        by_pid = {int(owner.split(":")[1]): owner for owner in set(owners.values())}
        assert len(by_pid) == instances, owners  # every instance holds tunnels

        # Orders for every device, accepted by every instance in turn.
        accepted: dict[str, tuple[str, dict]] = {}  # operation_id -> (request_id, order)
        counter = 0

        async def submit(distids: list[str], per_device: int, gates: list[Instance]) -> None:
            nonlocal counter
            for _ in range(per_device):
                for distid in distids:
                    o = order(distid, counter)
                    gate = gates[counter % len(gates)]
                    counter += 1
                    op_id = await threads.deferToThread(gate.call, "push.submit", o)
                    accepted[op_id] = (o["request_id"], o)

        await submit(simple_ids + tunnel_ids, 8, proxies)
        # The victim: the instance holding the most tunnels, killed once it has orders being
        # sent and waiting for their done-request, while others are still queued.
        held = Counter(owners.values())
        victim_id = max(held, key=lambda owner: held[owner])
        victim = next(p for p in proxies if p.proc.pid == int(victim_id.split(":")[1]))
        survivors = [p for p in proxies if p is not victim]
        orphaned = sorted(d for d, owner in owners.items() if owner == victim_id)
        in_hand: Counter[str] = Counter()
        for _ in range(100):
            in_hand = Counter(state for (state,) in await threads.deferToThread(
                db_rows, pg_dsn, "SELECT state FROM operations WHERE claimed_by = %s"
                " AND state IN ('sending', 'started')", victim_id))
            if in_hand["sending"] and in_hand["started"]:
                break
            await sleep(0.02)
        victim.kill()
        before = Counter(state for (state,) in db_rows(
            pg_dsn, "SELECT state FROM operations"))
        results_seen = {op_id: result for op_id, result in db_rows(
            pg_dsn, "SELECT operation_id, result FROM operations WHERE state = 'succeeded'")}
        at_kill = counter
        killed_at = time.monotonic()
        # Orders for the SAs whose tunnel owner just died: they follow the SA.
        await submit(orphaned, 2, survivors)

        async def all_final() -> bool:
            rows = await threads.deferToThread(
                db_rows, pg_dsn, "SELECT count(*) FROM operations WHERE state NOT IN"
                " ('succeeded', 'failed', 'expired', 'cancelled')")
            return rows[0][0] == 0

        for _ in range(400):
            if await all_final():
                break
            await sleep(0.1)
        settled_after = time.monotonic() - killed_at
        statuses = {op_id: await threads.deferToThread(survivors[0].call, "push.status", op_id)
                    for op_id in accepted}
        # Nothing accepted was lost, and everything reached a final state.
        for op_id, (request_id, _) in accepted.items():
            assert statuses[op_id]["request_id"] == request_id
            assert statuses[op_id]["state"] in FINAL, statuses[op_id]
        # No stored result changed.
        stored = dict(db_rows(pg_dsn, "SELECT operation_id, result FROM operations"))
        for op_id, result in results_seen.items():
            assert stored[op_id] == result, op_id
        # Nothing with side effects ran twice on its device.
        run_twice = 0
        for _, o in accepted.values():
            needle = marker(o["operation"], o["params"])
            if needle is None:
                continue
            device = simple.get(o["distribution_id"]) or tunnel[o["distribution_id"]]
            runs = sum(needle in r.raw for r in device.received
                       if r.operation == o["operation"])
            run_twice += runs > 1
        assert run_twice == 0
        # The SAs whose tunnel owner died reconnected to a survivor, which owns them now, and
        # their orders went there.
        live = {i for (i,) in db_rows(pg_dsn, "SELECT instance_id FROM instances")}
        assert live == set(owners.values()) - {victim_id}  # the victim's row is gone
        now_owned = dict(db_rows(pg_dsn, "SELECT distribution_id, tunnel_owner FROM sa_registry"
                                         " WHERE distribution_id = ANY(%s)", orphaned))
        for distid in orphaned:
            assert now_owned[distid] not in (None, victim_id), (distid, now_owned)
            assert tunnel[distid].reconnects >= 1
        after_kill = [op_id for op_id, (_, o) in accepted.items()
                      if int(o["request_id"].split("-")[1]) >= at_kill]
        moved = dict(db_rows(pg_dsn, "SELECT operation_id, claimed_by FROM operations"
                                     " WHERE operation_id = ANY(%s)", after_kill))
        assert all(statuses[op]["state"] == "succeeded" for op in after_kill), \
            [statuses[op] for op in after_kill]
        assert all(moved[op] == now_owned[accepted[op][1]["distribution_id"]]
                   for op in after_kill)
        # The RS got each operation's events in order (first deliveries), from a survivor too.
        events: dict[str, list[int]] = {}
        seen_seqs: set[int] = set()
        rs = sqlite3.connect(rs_db)
        try:
            for (text,) in rs.execute("SELECT json FROM events ORDER BY seq"):
                event = json.loads(text)
                if event["seq"] in seen_seqs or "operation_id" not in event:
                    continue
                seen_seqs.add(event["seq"])
                events.setdefault(event["operation_id"], []).append(event["seq"])
        finally:
            rs.close()
        assert all(seqs == sorted(seqs) for seqs in events.values())
        finals_told = sum(1 for op_id in accepted if op_id in events)
        by_state = Counter(s["state"] for s in statuses.values())
        interrupted = sum("interrupted" in (s.get("last_error") or "")
                          for s in statuses.values())
        print(f"\nkill test, {instances} instances: {len(accepted)} orders accepted "
              f"({len(after_kill)} after the kill for {len(orphaned)} SAs whose tunnel owner "
              f"died); at the kill: {dict(before)}, the victim holding {dict(in_hand)}; "
              f"final {dict(by_state)}, {interrupted} resolved as interrupted, "
              f"{run_twice} side effects run twice; all final {settled_after:.1f} s after "
              f"the kill; events for {finals_told} operations reached the RS; "
              f"{time.monotonic() - started:.1f} s in all")
        for status in statuses.values():
            if status["state"] != "succeeded":
                print(f"  {status['operation']} for {status['distribution_id']}: "
                      f"{status['state']}: {status.get('last_error')}")
        assert by_state["succeeded"] >= len(accepted) // 2
        assert in_hand["sending"] and in_hand["started"], in_hand
        assert before["queued"], before
    finally:
        for device in devices:
            try:
                await (device.stop() if isinstance(device, SimulatedTunnelDevice)
                       else device.close())
            except Exception:  # pragma: no cover - cleanup
                pass
        for p in proxies:
            p.stop()
        await balancer.close()
        await tunnel_balancer.close()
        rs_proc.terminate()
        rs_proc.wait(timeout=10)
