"""``armsproxy-sasim serve`` (DeviceServer) against a real armsproxy over real TLS.

The quick start's device: it must pull its certificate, confirm, take pushes and send their
done-requests on its own, say each thing it receives, pull again after a reboot or
pull-config, confirm again after a configure, and end cleanly when stopped. Failures a
newcomer meets (no certificate issued, a busy port, bad options) must end it with a reason.
"""

from __future__ import annotations

import io
import socket
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from armsproxy.config import embedded
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import DeviceServer, ServeSettings
from armsproxy.device import client as device_client
from armsproxy.device.serve import parse_listen
from armsproxy.tap import build_services
from tests.test_push_e2e import DEVICE_TLS, DISTID, KEY, RS, free_port, until

FINAL = ("succeeded", "failed", "expired", "cancelled")


@asynccontextmanager
async def proxy(tmp_path, methods: str = "https-simple", tls_minimum_version: str = "1.2",
                issue_cert: bool = True):
    """The embedded default with the device registered (and its certificate issued)."""
    port, rs_port, gate_port = free_port(), free_port(), free_port()
    cfg = embedded(tmp_path / "data", port=port, rs_port=rs_port, rs_gate_port=gate_port,
                   tls_minimum_version=tls_minimum_version)
    cfg.echo_interval = 1
    top = build_services(cfg, reactor)
    top.startService()
    pki = cfg.data_dir / "pki"
    try:
        assert demo_cli.main(["--db", str(cfg.demo_rs_db), "register", DISTID, "--key", KEY,
                              "--module", "1:1.0.0:harness-module",
                              "--push-methods", methods]) == 0
        if issue_cert:
            assert demo_cli.main(["--db", str(cfg.demo_rs_db), "issue-cert", DISTID,
                                  "--ca-cert", str(pki / "ca.pem"),
                                  "--ca-key", str(pki / "ca.key")]) == 0
        yield cfg, RS(gate_port)
    finally:
        await top.stopService()


class Serving:
    """A DeviceServer running on the test's reactor, its output in a buffer."""

    def __init__(self, cfg: Any, **settings: Any) -> None:
        self.out = io.StringIO()
        settings.setdefault("listen_port", free_port())
        settings.setdefault("retry_interval", 0.2)
        self.server = DeviceServer(reactor, ServeSettings(
            url=cfg.public_urls[0], distid=DISTID, key=KEY,
            ca_pem=(cfg.data_dir / "pki" / "ca.pem").read_bytes(), **settings), self.out)
        self.run: defer.Deferred[int] = defer.ensureDeferred(self.server.run())

    @property
    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def said(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]

    async def wait_said(self, prefix: str, count: int = 1, timeout: float = 20) -> None:
        await until(lambda: len(self.said(prefix)) >= count or self.run.called, timeout,
                    what=f"{count} line(s) {prefix!r}: {self.out.getvalue()}")
        assert len(self.said(prefix)) >= count, self.out.getvalue()

    async def stop(self) -> int:
        await self.server.stop()
        return await self.run


async def order(rs: RS, operation: str, params: dict, request_id: str) -> dict:
    op = await rs.call("push.submit", {"distribution_id": DISTID, "operation": operation,
                                       "params": params, "request_id": request_id})

    async def final() -> bool:
        return (await rs.call("push.status", op))["state"] in FINAL

    await until(final, timeout=30, what=f"{operation} to finish")
    return await rs.call("push.result", op)


@pytest.mark.parametrize("tls", DEVICE_TLS)
@pytest_twisted.ensureDeferred
async def test_https_simple_round_trip_reboot_and_configure(tmp_path, tls):
    minimum, device_max, negotiated = tls
    async with proxy(tmp_path, tls_minimum_version=minimum) as (cfg, rs):
        device = Serving(cfg, tls_max_version=device_max)
        try:
            await device.wait_said("serving: ")
            endpoint = f"https://127.0.0.1:{device.server.settings.listen_port}/"
            assert (await rs.call("sa.status", DISTID))["push_endpoint"] == endpoint
            pull = device.said("pull: ")[0]
            assert pull.startswith("pull: config-solicitation (power on boot) over "
                                   f"{negotiated or 'TLSv1.3'} -> 100 (success), sa-certificate ")
            assert device.said("query: ") == [
                "query: push-method-query (https-simple) -> 100 (success), methods https-simple"]
            assert device.said("confirm: ") == [
                f"confirm: push-confirmation-start (push-endpoint {endpoint}) -> 100 (success)"]
            assert device.said("push: ") == [
                "push: push-confirmation-done -> 100: confirmed, the proxy may push now"]

            result = await order(rs, "read-status", {"status_requests": [{"id": 1,
                                                                          "param": "cpu"}]}, "rs")
            assert result["state"] == "succeeded", result
            tid = result["sa_transaction_id"]
            await device.wait_said("done: ")
            assert device.said("push: ")[-1] == (
                f"push: read-status-start -> 100, transaction-id {tid} (done-request follows)")
            assert device.said("done: ") == [
                f"done: read-status-done {tid} (transaction-result 100) to {cfg.public_urls[0]}"
                " -> 100 (success)"]

            # The modules of the pull answer are the device's.
            modules = await order(rs, "read-module-list", {}, "modules")
            assert modules["result"]["modules"] == [
                {"id": 1, "version": "1.0.0", "location": "harness-module"}]

            # After a configure the listener restarts and the device confirms again (§2.5).
            configure = await order(rs, "configure", {
                "modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}],
                "md_configs": [{"id": 1, "data": "hostname pushed\n"}]}, "configure")
            assert configure["state"] == "succeeded", configure
            await device.wait_said("confirm: ", 2)

            # A reboot: the device answers it, leaves its event loop, pulls again, serves.
            assert (await order(rs, "reboot", {}, "reboot"))["state"] == "succeeded"
            await device.wait_said("serving: ", 2)
            assert device.said("exit: ") == [
                "exit: reboot: the SA leaves its event loop and pulls again in 0.2 s"]
            assert device.said("pull: ")[1].startswith(
                "pull: config-solicitation (Reboot requested by RS) over ")
            again = await order(rs, "ping", {"address": "192.0.2.1", "count": 2}, "ping")
            assert again["result"]["success"] == 2
        finally:
            code = await device.stop()
        assert code == 0
        assert device.lines[-1] == "stopped"
        assert not any(line.startswith("  ") for line in device.lines), device.lines


@pytest_twisted.ensureDeferred
async def test_tunnel_round_trip_and_pull_config(tmp_path):
    async with proxy(tmp_path, methods="https-tunnel") as (cfg, rs):
        device = Serving(cfg, tunnel=True)
        try:
            await device.wait_said("serving: ")
            tunnel_url = cfg.tunnel_urls[0]
            assert device.said("serving: ") == [
                f"serving: https-tunnel over {tunnel_url} (Ctrl-C to stop)"]
            assert device.said("tunnel: ") == [f"tunnel: {tunnel_url} #1 open (TLSv1.3)"]
            assert device.said("confirm: ") == [
                f"confirm: push-confirmation-start on {tunnel_url} #1 -> 100 (success), "
                "push-confirmation-done: confirmed"]
            result = await order(rs, "read-status", {"status_requests": [{"id": 1,
                                                                          "param": "cpu"}]}, "rs")
            assert result["state"] == "succeeded", result
            await device.wait_said("done: ")
            assert device.said("done: ")[0].endswith(f"to {tunnel_url} -> 100 (success)")

            assert (await order(rs, "pull-config", {}, "repull"))["state"] == "succeeded"
            await device.wait_said("serving: ", 2)
            assert device.said("exit: ")[0].startswith("exit: re-pull: ")
            assert device.said("pull: ")[1].startswith(
                "pull: config-solicitation (Pull requested by RS) over ")
            assert f"tunnel: {tunnel_url} #1 closed: event loop left: re-pull" in device.lines
        finally:
            code = await device.stop()
        assert code == 0
        assert device.lines[-2:] == [f"tunnel: {tunnel_url} #1 closed: stopped", "stopped"]


@pytest_twisted.ensureDeferred
async def test_no_certificate_issued_gives_up_with_the_reason(tmp_path):
    async with proxy(tmp_path, issue_cert=False) as (cfg, _):
        device = Serving(cfg, retry_max=2)
        assert await device.run == 1
    assert device.said("  the answer carries no sa-certificate") != []
    assert device.said("retrying in 0.2 s") == ["retrying in 0.2 s"]
    assert device.lines[-1] == "giving up after 2 failed rounds"


@pytest_twisted.ensureDeferred
async def test_a_tls_1_0_device_against_a_tls_1_2_proxy_says_why(tmp_path):
    async with proxy(tmp_path) as (cfg, _):
        device = Serving(cfg, tls_max_version=device_client.UPSTREAM_TLS_VERSION, retry_max=1)
        assert await device.run == 1
    assert device.lines[0] == "pull: config-solicitation (power on boot) -> no answer (retry)"
    assert device.lines[1].startswith("  TLS handshake failed: ")


@pytest_twisted.ensureDeferred
async def test_a_busy_push_port_ends_the_device(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        async with proxy(tmp_path) as (cfg, _):
            device = Serving(cfg, listen_port=busy)
            assert await device.run == 1
    assert device.lines[-1].startswith(f"cannot listen on 127.0.0.1:{busy}: ")


def test_bad_options_exit_2(tmp_path, capsys):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    common = ["serve", "--url", "https://127.0.0.1:8443/arms", "--distid", DISTID,
              "--key", KEY, "--ca", str(ca)]
    assert device_client.main([*common, "--listen", "localhost:10443"]) == 2
    assert "literal IP address" in capsys.readouterr().err
    assert device_client.main([*common, "--cert", str(ca)]) == 2
    assert "from the pull answer" in capsys.readouterr().err
    assert device_client.main([*common[:2], "https://example.org/arms", *common[3:]]) == 2
    assert "never resolves" in capsys.readouterr().err


def test_parse_listen():
    assert parse_listen("127.0.0.1:10443") == ("127.0.0.1", 10443)
    assert parse_listen("[::1]:443") == ("::1", 443)
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":443"):
        with pytest.raises(ValueError):
            parse_listen(bad)
