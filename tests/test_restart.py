"""kill -9 at any point loses no accepted order and no stored result (design.md §5, §6).

A real armsproxy process (twistd) pushes to a simulated device over real TLS while the test
keeps killing it with SIGKILL and starting it again on the same data directory. Orders are
queued, being sent and waiting for their done-request when the kills land.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor, task, threads

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
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
ROUNDS = 5
FINAL = ("succeeded", "failed", "expired", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    def __init__(self, tmp: Path, *, tunnel: bool = False) -> None:
        self.tmp = tmp
        self.port, self.rs_port, self.gate_port = free_port(), free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}/arms"
        self.tunnel_url = f"https://127.0.0.1:{self.port}/arms-tunnel"
        tunnel_line = f"tunnel_urls = {self.tunnel_url}\necho_interval = 2" if tunnel else ""
        self.data = tmp / "data"
        self.pki = pki_mod.ensure_dev_pki(self.data / "pki", ["127.0.0.1"])
        self.conf = tmp / "armsproxy.conf"
        key, cert = self.pki.server_key_path, self.pki.server_cert_path
        self.conf.write_text(f"""
[armsproxy]
data_dir = {self.data}
[sa_gate]
listen = ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={cert}
public_urls = {self.url}
[rs]
url = http://127.0.0.1:{self.rs_port}/RPC2
timeout = 5
[push]
sa_ca = {self.pki.ca_cert_path}
retry_base = 0.5
retry_cap = 2
busy_delay = 1
done_timeout = 6
interrupted_grace = 6
{tunnel_line}
[rs_gate]
listen = tcp:{self.gate_port}:interface=127.0.0.1
[demo_rs]
enabled = yes
listen = tcp:{self.rs_port}:interface=127.0.0.1
db = {self.data / "demo-rs.sqlite"}
""")
        self.proc: subprocess.Popen | None = None
        self.log = open(tmp / "armsproxy.log", "ab")

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "armsproxy", "--config", str(self.conf)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.tmp / "armsproxy.log").read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", self.gate_port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("armsproxy did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def rs(self, method: str, *args):
        with xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.gate_port}/RPC2") as proxy:
            return getattr(proxy, method)(*args)


async def call(proxy: Proxy, method: str, *args):
    return await threads.deferToThread(proxy.rs, method, *args)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def order(i: int) -> dict:
    kinds = [
        ("check-transaction", {}),
        ("read-module-list", {}),
        ("ping", {"address": "192.0.2.1", "count": 1}),
        ("read-status", {"status_requests": [{"id": 1, "param": f"cpu-{i}"}]}),
        ("md-command", {"module_id": 1, "command": f"unique-command-{i}"}),
        ("clear-status", {"status_requests": [{"id": 1, "param": f"counters-{i}"}]}),
    ]
    operation, params = kinds[i % len(kinds)]
    return {"distribution_id": DISTID, "operation": operation, "params": params,
            "request_id": f"restart-{i}"}


@pytest.mark.parametrize("method", ["https-simple", "https-tunnel"])
@pytest_twisted.ensureDeferred
async def test_sigkill_loses_no_order_and_no_result(tmp_path, method):
    rng = random.Random(7)
    tunnel = method == "https-tunnel"
    proxy = Proxy(tmp_path, tunnel=tunnel)
    proxy.start()
    device = None
    try:
        db = str(proxy.data / "demo-rs.sqlite")
        assert demo_cli.main(["--db", db, "register", DISTID, "--key", KEY,
                              "--module", "1:1.0.0:harness-module",
                              "--push-methods", method]) == 0
        assert demo_cli.main(["--db", db, "issue-cert", DISTID,
                              "--ca-cert", str(proxy.pki.ca_cert_path),
                              "--ca-key", str(proxy.pki.ca_key_path)]) == 0
        ca = proxy.pki.ca_cert_path.read_bytes()
        sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca)
        pull = await sa.config_solicitation(proxy.url)
        root = etree.fromstring(pull.body_xml)
        certs = {"sa_cert_pem": root.findtext(".//sa-certificate").encode(),
                 "sa_key_pem": root.findtext(".//sa-private-key").encode()}
        modules = [DeviceModule(1, "1.0.0", "harness-module")]
        await sa.push_method_query(proxy.url, methods=[method])
        if tunnel:
            device = SimulatedTunnelDevice(
                reactor, DISTID, KEY, ca_pem=ca, **certs, tunnel_urls=[proxy.tunnel_url],
                echo_interval=2.0, retry_interval=0.2, modules=modules,
                behaviour=TunnelBehaviour(answer_delay=0.05, done_delay=0.3, retry_max=1000),
            )
            await device.start()
            await device.ready(timeout=15)
        else:
            device = SimulatedDevice(
                reactor, DISTID, KEY, ca_pem=ca, **certs,
                behaviour=DeviceBehaviour(start_answer_delay=0.05, done_delay=0.3),
                rs_pull_server_urls=[proxy.url], modules=modules,
            )
            await device.listen()
            await device.confirm()
            for _ in range(100):
                if device.confirmed:
                    break
                await sleep(0.05)
            assert device.confirmed

        accepted: dict[str, str] = {}  # request_id -> operation_id, acknowledged by the RS gate
        results_seen: dict[str, dict] = {}
        counter = 0
        kills = 0
        for _round in range(ROUNDS):
            for _ in range(12):
                o = order(counter)
                counter += 1
                accepted[o["request_id"]] = await call(proxy, "push.submit", o)
            await sleep(rng.uniform(0.2, 0.8))
            for op_id in list(accepted.values()):
                result = await call(proxy, "push.result", op_id)
                if result["state"] == "succeeded":
                    results_seen[op_id] = result["result"]
            proxy.kill()
            kills += 1
            await sleep(rng.uniform(0.0, 0.5))
            proxy.start()

        async def all_final() -> bool:
            states = [(await call(proxy, "push.status", i))["state"] for i in accepted.values()]
            return all(s in FINAL for s in states)

        for _ in range(300):
            if await all_final():
                break
            await sleep(0.1)
        statuses = {i: await call(proxy, "push.status", i) for i in accepted.values()}
        # No accepted order lost: every acknowledged id is there, with its request_id.
        assert len(statuses) == len(accepted) == ROUNDS * 12
        for request_id, op_id in accepted.items():
            assert statuses[op_id]["request_id"] == request_id
            assert statuses[op_id]["state"] in FINAL, statuses[op_id]
        # No stored result lost or changed by the kills.
        for op_id, result in results_seen.items():
            assert (await call(proxy, "push.result", op_id))["result"] == result
        # Nothing with side effects ran twice on the device.
        commands = [r.raw for r in device.received if r.operation == "md-command"]
        for i in range(counter):
            needle = f"unique-command-{i}<".encode()
            assert sum(needle in raw for raw in commands) <= 1, f"md-command {i} ran twice"
        by_state: dict[str, int] = {}
        for s in statuses.values():
            by_state[s["state"]] = by_state.get(s["state"], 0) + 1
        interrupted = sum("interrupted" in (s.get("last_error") or "")
                          for s in statuses.values())
        print(f"\nrestart test ({method}): {kills} SIGKILLs, {len(accepted)} orders, "
              f"states {by_state}, {interrupted} resolved as interrupted, "
              f"{len(results_seen)} results checked across kills")
        assert by_state.get("succeeded", 0) >= len(accepted) // 2
    finally:
        if device is not None:
            await (device.stop() if tunnel else device.close())
        proxy.stop()
    conn = sqlite3.connect(proxy.data / "armsproxy.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
