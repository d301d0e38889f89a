"""https-tunnel end to end over real TLS: a device behind NAT pulls, negotiates the tunnel,
opens it on the SA gate's one port, confirms, and the RS orders every operation through it.
Also: the tunnel lost while an operation is in flight, and the device reconnecting."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from lxml import etree
from twisted.internet import reactor

from armsproxy.config import Config, embedded
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import DeviceModule, SimulatedSA, SimulatedTunnelDevice, TunnelBehaviour
from armsproxy.tap import build_services
from tests.test_push_e2e import (
    DEVICE_TLS,
    DISTID,
    KEY,
    ORDERS,
    RS,
    demo_events,
    free_port,
    until,
)

FINAL = ("succeeded", "failed", "expired", "cancelled")


@dataclass
class TunnelRig:
    cfg: Config
    url: str  # the SA gate's (pull) URL
    rs: RS
    new_device: Callable[..., Awaitable[SimulatedTunnelDevice]]
    top: Any  # the service tree (relay, engine, handshake_failures...)


@asynccontextmanager
async def tunnel_proxy(tmp_path, tunnel_port: int | None = None,
                       tls_minimum_version: str = "1.2"):
    """The embedded default with the harness SA registered; the devices made with
    ``new_device`` are stopped, then the proxy. With ``tunnel_port``, tunnels get a listener
    of their own."""
    port, rs_port, gate_port = free_port(), free_port(), free_port()
    cfg = embedded(tmp_path / "data", port=port, rs_port=rs_port, rs_gate_port=gate_port,
                   tls_minimum_version=tls_minimum_version)
    cfg.echo_interval = 1
    pki = cfg.data_dir / "pki"
    if tunnel_port is not None:
        cfg.tunnel_listen = (f"ssl:{tunnel_port}:interface=127.0.0.1:"
                             f"privateKey={pki / 'server.key'}:certKey={pki / 'server.pem'}")
        cfg.tunnel_urls = [f"https://127.0.0.1:{tunnel_port}/arms-tunnel"]
    top = build_services(cfg, reactor)
    top.startService()
    url = cfg.public_urls[0]
    devices: list[SimulatedTunnelDevice] = []

    async def new_device(behaviour: TunnelBehaviour | None = None,
                         tls_max_version: int | None = None) -> SimulatedTunnelDevice:
        devices.append(await tunnel_device(cfg, url, behaviour, tls_max_version))
        return devices[-1]

    try:
        assert demo_cli.main(["--db", str(cfg.demo_rs_db), "register", DISTID, "--key", KEY,
                              "--module", "1:1.0.0:harness-module",
                              "--push-methods", "https-tunnel"]) == 0
        assert demo_cli.main(["--db", str(cfg.demo_rs_db), "issue-cert", DISTID,
                              "--ca-cert", str(pki / "ca.pem"),
                              "--ca-key", str(pki / "ca.key")]) == 0
        yield TunnelRig(cfg, url, RS(gate_port), new_device, top)
    finally:
        for device in devices:
            await device.stop()
        await top.stopService()


async def tunnel_device(cfg, url, behaviour=None, tls_max_version=None) -> SimulatedTunnelDevice:
    ca = (cfg.data_dir / "pki" / "ca.pem").read_bytes()
    sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca, tls_max_version=tls_max_version)
    pull = await sa.config_solicitation(url)
    assert pull.verdict.outcome == "success", pull.verdict.describe()
    root = etree.fromstring(pull.body_xml)
    query = await sa.push_method_query(url, methods=["https-tunnel"])
    assert query.verdict.outcome == "success", query.verdict.describe()
    assert query.verdict.push_methods == ["https-tunnel"]
    assert query.verdict.https_tunnel_urls == cfg.tunnel_urls
    if tls_max_version is not None:
        assert pull.tls_version == query.tls_version == "TLSv1"
    device = SimulatedTunnelDevice(
        reactor, DISTID, KEY, ca_pem=ca,
        sa_cert_pem=root.findtext(".//sa-certificate").encode(),
        sa_key_pem=root.findtext(".//sa-private-key").encode(),
        tunnel_urls=query.verdict.https_tunnel_urls, echo_interval=1.0, retry_interval=0.3,
        behaviour=behaviour, modules=[DeviceModule(1, "1.0.0", "harness-module")],
        configs={1: "hostname harness-sa\n"}, tls_max_version=tls_max_version,
    )
    await device.start()
    await device.ready(timeout=15)
    return device


async def wait_final(rs: RS, ids, timeout: float = 60.0) -> None:
    ids = list(ids)

    async def all_final():
        states = [(await rs.call("push.status", i))["state"] for i in ids]
        return all(state in FINAL for state in states)

    await until(all_final, timeout=timeout, what="operations to finish")


@pytest.mark.parametrize("tls", DEVICE_TLS)
@pytest_twisted.ensureDeferred
async def test_every_operation_through_a_tunnel(tmp_path, tls):
    minimum, device_max, negotiated = tls
    async with tunnel_proxy(tmp_path, tls_minimum_version=minimum) as rig:
        device = await rig.new_device(tls_max_version=device_max)
        async def registered():
            status = await rig.rs.call("sa.status", DISTID)
            live = [t for t in status.get("tunnels", []) if not t.get("closed_at")]
            return status.get("push_method") == "https-tunnel" and len(live) == 1

        await until(registered, what="the tunnel in the SA registry")
        # Before the orders: they leave as soon as each tunnel is up, so the run may end (with
        # the reboot closing the tunnel) within one echo interval.
        await until(lambda: device.echoes_answered >= 1, timeout=10, what="an echo answered")
        ids = {}
        # pull-config makes a device leave its event loop and re-pull (§7.14), closing its
        # tunnel for good; the https-simple end-to-end test covers it.
        for operation, params in [o for o in ORDERS if o[0] != "pull-config"]:
            ids[operation] = await rig.rs.call("push.submit", {
                "distribution_id": DISTID, "operation": operation, "params": params})
        await wait_final(rig.rs, ids.values())
        results = {op: await rig.rs.call("push.result", i) for op, i in ids.items()}
        for op, result in results.items():
            assert result["state"] == "succeeded", (op, result)
            assert "tunnel" in result["raw"][0]["via"]
        assert results["ping"]["result"]["success"] == 3
        assert [h["hop"] for h in results["traceroute"]["result"]["hops"]] == [1, 2, 3]
        assert results["md-command"]["result"]["results"][0]["data"] == "md_command(id=1): done"
        assert results["configure"]["transaction_result"] == 100
        assert device.configs[1] == b"hostname harness-sa-pushed\n"
        assert device.rebooted
        # Every done travelled on the tunnel and was acknowledged with its transaction-id.
        assert device.dones and all(d.outcome == "success" for d in device.dones), [
            (d.kind, d.outcome) for d in device.dones]
        # configure: the device dropped the tunnel, reconnected, sent configure-done first
        # and confirmed again; reboot: the zero chunk closed it.
        assert device.reconnects >= 1

        async def events():
            kinds = [e["event"]["kind"] for e in await demo_events(rig.cfg)]
            return kinds.count("sa.tunnel_up") >= 2 and "sa.tunnel_down" in kinds

        await until(events, timeout=20, what="tunnel events at the RS")
        tunnels = (await rig.rs.call("sa.status", DISTID))["tunnels"]
        assert tunnels and all(t.get("closed_at") for t in tunnels)  # none live after reboot
        assert any("zero" in t["close_reason"] or "closed by the SA" in t["close_reason"]
                   for t in tunnels), tunnels
        # Every tunnel connection ran the device's TLS; no handshake failed.
        connections = [c for record in device.tunnels for c in record.connections]
        if negotiated is not None:
            assert connections and {c.tls_version for c in connections} == {negotiated}
        assert not any(rig.top.handshake_failures.counts().values())
        # Dones on a tunnel are counted like those over https-simple (issue #9 point 3).
        dones = Counter(f"request.{d.kind}" for d in device.dones)
        # (Each kind at least once, never more often than the device sent it.)
        assert dones and all(1 <= rig.top.relay.stats[t] <= n for t, n in dones.items()), (
            dones, rig.top.relay.stats)


@pytest_twisted.ensureDeferred
async def test_tunnel_lost_while_operations_are_in_flight(tmp_path):
    async with tunnel_proxy(tmp_path) as rig:
        device = await rig.new_device(TunnelBehaviour(answer_delay=0.5))
        command = await rig.rs.call("push.submit", {
            "distribution_id": DISTID, "operation": "md-command",
            "params": {"module_id": 1, "command": "show version"}})
        await until(lambda: any(p.operation == "md-command" for p in device.received),
                    what="the md-command on the device")
        # Cut the tunnel under the waiting request (no zero chunk, like a NAT timeout).
        for tunnel in list(device._live):
            tunnel.kill()
        await wait_final(rig.rs, [command])
        status = await rig.rs.call("push.status", command)
        assert status["state"] == "failed" and "may have run" in status["last_error"]
        # The device reconnects and confirms again; read-only work goes through.
        await device.ready(timeout=15)
        listing = await rig.rs.call("push.submit", {"distribution_id": DISTID,
                                                    "operation": "read-module-list"})
        await wait_final(rig.rs, [listing])
        assert (await rig.rs.call("push.status", listing))["state"] == "succeeded"
        assert device.reconnects >= 1


@pytest_twisted.ensureDeferred
async def test_a_live_tunnel_keeps_no_copy_of_its_credentials(tmp_path):
    """A tunnel lives for months: neither the gate's connection nor the session may hold the
    Authorization header (it carries the SA's key) once the tunnel is open."""
    import base64
    import gc

    from armsproxy.sa_gate.protocol import SAGateProtocol
    from armsproxy.tunnel.session import TunnelSession

    async with tunnel_proxy(tmp_path) as rig:
        await rig.new_device()
        credentials = base64.b64encode(f"{DISTID}:{KEY}".encode()).decode()
        gc.collect()
        # The gate's protocol hands the TLS connection to the session and goes away.
        gates = [o for o in gc.get_objects()
                 if isinstance(o, SAGateProtocol) and o._tunnel is not None]
        sessions = [o for o in gc.get_objects() if isinstance(o, TunnelSession)]
        assert sessions and not gates
        # An idle tunnel keeps no opening state either (key, early bytes, hook call...).
        assert all(s._setup is None for s in sessions if s.confirmed)
        for holder in gates + sessions:
            names = [*getattr(holder, "__dict__", ()), *getattr(type(holder), "__slots__", ())]
            held = repr([getattr(holder, name, None) for name in names])
            assert credentials not in held and KEY not in held, holder


@pytest_twisted.ensureDeferred
async def test_tunnels_on_a_listener_of_their_own(tmp_path):
    tunnel_port = free_port()
    async with tunnel_proxy(tmp_path, tunnel_port) as rig:
        device = await rig.new_device()  # pulls on the SA gate, tunnels on its own port
        assert device.tunnel_urls == [f"https://127.0.0.1:{tunnel_port}/arms-tunnel"]
        op = await rig.rs.call("push.submit", {"distribution_id": DISTID,
                                               "operation": "check-transaction", "params": {}})
        await wait_final(rig.rs, [op])
        result = await rig.rs.call("push.result", op)
        assert result["state"] == "succeeded" and "tunnel" in result["raw"][0]["via"]
        # The tunnel listener serves tunnels only.
        sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=(rig.cfg.data_dir / "pki" / "ca.pem")
                         .read_bytes())
        refused = await sa.config_solicitation(f"https://127.0.0.1:{tunnel_port}/arms")
        assert refused.status == 404
        assert (await sa.config_solicitation(rig.url)).verdict.outcome == "success"
