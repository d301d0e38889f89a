"""End to end over real TLS: a simulated device pulls, negotiates, confirms, then the RS orders
every operation over XML-RPC and fetches the results. armsproxy runs as twistd would build it
(embedded default: demo RS, dev PKI, SQLite)."""

from __future__ import annotations

import socket
import xmlrpc.client
from pathlib import Path

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor, task, threads

from armsproxy.config import embedded
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import (
    UPSTREAM_TLS_VERSION,
    DeviceBehaviour,
    DeviceModule,
    SimulatedDevice,
    SimulatedSA,
)
from armsproxy.tap import build_services

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(condition, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``condition`` (plain or async) on the real reactor until it holds."""
    import inspect

    for _ in range(int(timeout / 0.05)):
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class RS:
    """The RS side: XML-RPC calls to the RS gate (stdlib client, in a thread)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/RPC2"

    async def call(self, method: str, *args):
        def run():
            with xmlrpc.client.ServerProxy(self.url, allow_none=False) as proxy:
                return getattr(proxy, method)(*args)

        return await threads.deferToThread(run)


async def start_proxy(tmp_path: Path, tls_minimum_version: str = "1.2"):
    port, rs_port, gate_port = free_port(), free_port(), free_port()
    cfg = embedded(tmp_path / "data", port=port, rs_port=rs_port, rs_gate_port=gate_port,
                   tls_minimum_version=tls_minimum_version)
    top = build_services(cfg, reactor)
    top.startService()
    url = f"https://127.0.0.1:{port}/arms"
    db = str(cfg.demo_rs_db)
    pki = cfg.data_dir / "pki"
    assert demo_cli.main(["--db", db, "register", DISTID, "--key", KEY,
                          "--module", "1:1.0.0:harness-module",
                          "--push-methods", "https-simple"]) == 0
    assert demo_cli.main(["--db", db, "issue-cert", DISTID, "--ca-cert", str(pki / "ca.pem"),
                          "--ca-key", str(pki / "ca.key")]) == 0
    return top, cfg, url, RS(gate_port)


async def pulled_device(cfg, url: str, behaviour: DeviceBehaviour | None = None,
                        tls_max_version: int | None = None):
    """A device that has pulled (learning its certificate) and negotiated https-simple;
    ``tls_max_version`` caps its TLS both ways (as client and as push listener)."""
    ca = (cfg.data_dir / "pki" / "ca.pem").read_bytes()
    sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca, tls_max_version=tls_max_version)
    pull = await sa.config_solicitation(url)
    assert pull.verdict.outcome == "success", pull.verdict.describe()
    root = etree.fromstring(pull.body_xml)
    cert = root.findtext(".//sa-certificate").encode()
    key = root.findtext(".//sa-private-key").encode()
    query = await sa.push_method_query(url)
    assert query.verdict.push_methods == ["https-simple"]
    if tls_max_version == UPSTREAM_TLS_VERSION:
        assert pull.tls_version == query.tls_version == "TLSv1"
    device = SimulatedDevice(
        reactor, DISTID, KEY, ca_pem=ca, sa_cert_pem=cert, sa_key_pem=key,
        behaviour=behaviour, rs_pull_server_urls=[url],
        modules=[DeviceModule(1, "1.0.0", "harness-module")],
        configs={1: "hostname harness-sa\n"}, tls_max_version=tls_max_version,
    )
    await device.listen()
    exchanges = await device.confirm()
    assert all(e.verdict.outcome == "success" for e in exchanges)
    await until(lambda: device.confirmed, what="push-confirmation-done from armsproxy")
    return device


ORDERS = [
    ("check-transaction", {}),
    ("read-status", {"status_requests": [{"id": 1, "param": "cpu"}]}),
    ("clear-status", {"status_requests": [{"id": 1, "param": "counters"}]}),
    ("ping", {"address": "192.0.2.1", "count": 3, "size": 64}),
    ("traceroute", {"address": "192.0.2.1", "count": 1, "max_hop": 3}),
    ("md-command", {"module_id": 1, "command": "show version"}),
    ("read-module-list", {}),
    ("dump-debug", {}),
    ("read-storage", {"storage": "running"}),
    ("configure", {"modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}],
                   "md_configs": [{"id": 1, "data": "hostname harness-sa-pushed\n"}]}),
    ("pull-config", {"type": "RS"}),
    ("reboot", {}),
]


# A modern device, and one like upstream libarms and the devices in the field: TLS 1.0 only,
# as client and as push listener (§1 rule 1), which armsproxy lets in by tls_minimum_version.
DEVICE_TLS = [pytest.param(("1.2", None, None), id="modern-device"),
              pytest.param(("1.0", UPSTREAM_TLS_VERSION, "TLSv1"), id="tls-1.0-device")]


@pytest.mark.parametrize("tls", DEVICE_TLS)
@pytest_twisted.ensureDeferred
async def test_every_operation_end_to_end(tmp_path, tls):
    minimum, device_max, negotiated = tls
    top, cfg, url, rs = await start_proxy(tmp_path, minimum)
    device = None
    try:
        device = await pulled_device(cfg, url, tls_max_version=device_max)
        status = await rs.call("sa.status", DISTID)
        assert status["confirmed"] is True
        assert status["push_endpoint"] == device.push_endpoint
        ids = {}
        for operation, params in ORDERS:
            ids[operation] = await rs.call("push.submit", {
                "distribution_id": DISTID, "operation": operation, "params": params,
                "request_id": f"e2e-{operation}"})
        assert await rs.call("push.submit", {"distribution_id": DISTID, "operation": "reboot",
                                             "params": {}, "request_id": "e2e-reboot"}) \
            == ids["reboot"]

        async def all_final():
            states = [(await rs.call("push.status", i))["state"] for i in ids.values()]
            return all(s in ("succeeded", "failed", "expired", "cancelled") for s in states)

        await until(all_final, timeout=60, what="every operation to finish")
        results = {op: await rs.call("push.result", i) for op, i in ids.items()}
        for op, result in results.items():
            assert result["state"] == "succeeded", (op, result)
        assert results["ping"]["result"]["success"] == 3
        assert [h["hop"] for h in results["traceroute"]["result"]["hops"]] == [1, 2, 3]
        assert results["md-command"]["result"]["results"][0]["data"] == "md_command(id=1): done"
        assert results["read-module-list"]["result"]["modules"][0]["location"] == \
            "harness-module"
        assert "hostname harness-sa" in results["read-storage"]["result"]["md_configs"][0][
            "data"]
        assert results["read-status"]["result"]["status_reports"][0]["result"] == 100
        assert results["configure"]["transaction_result"] == 100
        assert device.configs[1] == b"hostname harness-sa-pushed\n"
        assert device.rebooted
        # The device saw each operation once, in submit order (per-SA FIFO).
        pushed = [r.operation for r in device.received
                  if r.operation != "push-confirmation"]
        assert pushed == [op for op, _ in ORDERS]
        # The configure made the device re-open its listener and confirm again (§7.3), and
        # armsproxy confirmed it again: two confirmations in all.
        assert [r.operation for r in device.received].count("push-confirmation") == 2
        # Every 2-way start carried armsproxy's result-url; every done came back to it.
        assert device.result_url == url
        assert all(d.outcome == "success" for d in device.dones), [
            (d.kind, d.outcome, d.error) for d in device.dones]
        raw = results["ping"]["raw"]
        assert any("ping-start" in (r.get("request") or "") for r in raw)
        assert any("ping-done" in (r.get("request") or "") for r in raw)
        # The RS was told: events reached the demo RS through the outbox.

        async def events_delivered():
            events = await demo_events(cfg)
            done = {e["event"].get("operation_id") for e in events
                    if e["event"]["kind"] == "operation.succeeded"}
            return set(ids.values()) <= done and any(
                e["event"]["kind"] == "sa.confirmed" for e in events)

        await until(events_delivered, timeout=30, what="events at the RS")
        # Every connection, both ways, ran the device's TLS; none failed its handshake.
        if negotiated is not None:
            assert {r.tls_version for r in device.received} == {negotiated}
            exchanges = [*device.confirmation_starts, *(d.exchange for d in device.dones)]
            assert {e.tls_version for e in exchanges if e is not None} == {negotiated}
        assert not any(top.handshake_failures.counts().values())
        # Every done came over https-simple and is counted like the pulls.
        done_types = {f"request.{d.kind}" for d in device.dones}
        assert done_types and all(top.relay.stats[t] >= 1 for t in done_types)
    finally:
        if device is not None:
            await device.close()
        await top.stopService()


async def demo_events(cfg) -> list[dict]:
    url = cfg.rs_url

    def run():
        with xmlrpc.client.ServerProxy(url) as proxy:
            return proxy.demo.events(0)

    return await threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_done_before_start_answer_and_busy_device(tmp_path):
    top, cfg, url, rs = await start_proxy(tmp_path)
    device = None
    try:
        device = await pulled_device(cfg, url, DeviceBehaviour(done_before_start_answer=True))
        first = await rs.call("push.submit", {
            "distribution_id": DISTID, "operation": "ping",
            "params": {"address": "192.0.2.1", "count": 2}})

        async def final(op_id):
            return (await rs.call("push.status", op_id))["state"] in ("succeeded", "failed")

        await until(lambda: final(first), what="ping with an early done")
        result = await rs.call("push.result", first)
        assert result["state"] == "succeeded" and result["result"]["success"] == 2
        device.behaviour.done_before_start_answer = False
        device.behaviour.busy = 302
        busy = await rs.call("push.submit", {
            "distribution_id": DISTID, "operation": "read-status",
            "params": {"status_requests": [{"id": 1, "param": "cpu"}]}})
        await until(lambda: any(r.result_code == 302 for r in device.received),
                    what="the busy answer")
        status = await rs.call("push.status", busy)
        assert status["state"] == "queued" and "302" in status["last_error"]
        assert (await rs.call("push.cancel", busy)) == {"cancelled": True, "state": "cancelled"}
    finally:
        if device is not None:
            await device.close()
        await top.stopService()


@pytest_twisted.ensureDeferred
async def test_rolled_back_configure_and_refused_authentication(tmp_path):
    top, cfg, url, rs = await start_proxy(tmp_path)
    device = None
    try:
        device = await pulled_device(cfg, url, DeviceBehaviour(configure_result=414))

        async def final(op_id):
            state = (await rs.call("push.status", op_id))["state"]
            return state in ("succeeded", "failed", "expired")

        configure = await rs.call("push.submit", {
            "distribution_id": DISTID, "operation": "configure",
            "params": {"modules": [{"id": 1, "version": "1.0.1",
                                    "location": "harness-module"}],
                       "md_configs": [{"id": 1, "data": "hostname broken\n"}]}})
        await until(lambda: final(configure), what="configure to finish")
        result = await rs.call("push.result", configure)
        assert result["state"] == "failed"
        assert result["transaction_result"] == 414
        assert "414" in result["last_error"]
        assert device.configs[1] == b"hostname harness-sa\n"  # rolled back on the device

        async def confirmed_again():
            confirmations = [r for r in device.received if r.operation == "push-confirmation"]
            return len(confirmations) == 2 and (await rs.call("sa.status", DISTID))["confirmed"]

        # The configure made the device confirm again (§7.3): let that finish, or the order
        # below waits for a confirmation the rotated key would refuse, and is never tried.
        await until(confirmed_again, what="the device's confirmation after the configure")
        # The device now holds another key than the RS gave armsproxy: it answers 401.
        device.key = "rotated-on-the-device"
        refused = await rs.call("push.submit", {"distribution_id": DISTID,
                                                "operation": "check-transaction"})
        await until(lambda: final(refused), what="the refused push to finish")
        status = await rs.call("push.status", refused)
        assert status["state"] == "failed" and "401" in status["last_error"]
    finally:
        if device is not None:
            await device.close()
        await top.stopService()


@pytest_twisted.ensureDeferred
async def test_an_order_for_a_device_not_confirmed_yet_waits_for_it(tmp_path):
    """Submitted before the device ever confirmed: queued and untried, saying what it waits
    for; once the device pulls and confirms it goes out at once, as its first attempt."""
    top, cfg, url, rs = await start_proxy(tmp_path)
    device = None
    try:
        await until(lambda: _answers(rs), what="the RS gate to listen")
        op = await rs.call("push.submit", {"distribution_id": DISTID,
                                           "operation": "read-module-list", "params": {}})

        async def status():
            return await rs.call("push.status", op)

        await until(lambda: _has(status(), "waiting_for"), what="the order to wait")
        await task.deferLater(reactor, 1.0, lambda: None)  # a tick or two: still untried
        waiting = await status()
        assert (waiting["state"], waiting["attempts"]) == ("queued", 0), waiting
        assert waiting["waiting_for"] == "the SA to confirm a push method"
        device = await pulled_device(cfg, url)

        async def finished():
            return (await status())["state"] not in ("queued", "sending")

        await until(finished, what="the order to go once the device confirmed")
        done = await status()
        assert (done["state"], done["attempts"]) == ("succeeded", 1), done
        assert "waiting_for" not in done
    finally:
        if device is not None:
            await device.close()
        await top.stopService()


async def _has(struct, member: str) -> bool:
    return member in await struct


async def _answers(rs: RS) -> bool:
    try:
        return await rs.call("arms.interface_version") == "1.0"
    except OSError:
        return False
