"""The management gate: /healthz, /readyz, /metrics over real TCP, against a real store."""

from __future__ import annotations

import re
import socket

import pytest
import pytest_twisted
from conftest import http_get
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python import usage

from armsproxy.config import embedded
from armsproxy.management import ManagementResource, ManagementSite, render_metrics
from armsproxy.tap import build_services
from armsproxy.tls import HandshakeFailures
from armsproxy.tools.sasim import UPSTREAM_TLS_VERSION, SimulatedSA

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_prometheus_text_with_escaped_labels():
    text = render_metrics(
        started_at=1700000000.5,
        sa_gate={"request.config-solicitation": 3, "rejected.http_431": 2,
                 'rejected.odd"name\\': 1, "rs.unavailable": 4, "tunnel.opened": 5},
        tunnels={"open": 3, "registered": 2, "live": 2, "distids": 1},
        backlog={"queued": 4, "sending": 0, "started": 1, "events": 7},
    ).decode()
    assert text.endswith("\n")
    assert "# TYPE armsproxy_sa_gate_requests_total counter" in text
    assert 'armsproxy_sa_gate_requests_total{type="config-solicitation"} 3' in text
    assert 'armsproxy_sa_gate_requests_total{type="push-method-query"} 0' in text  # from start
    assert 'armsproxy_sa_gate_refusals_total{reason="http_431"} 2' in text
    assert 'armsproxy_sa_gate_refusals_total{reason="unauthorized"} 0' in text
    assert 'armsproxy_sa_gate_refusals_total{reason="odd\\"name\\\\"} 1' in text
    assert 'armsproxy_sa_gate_events_total{event="rs.unavailable"} 4' in text
    assert 'armsproxy_sa_gate_events_total{event="tunnel.opened"} 5' in text
    assert 'armsproxy_tunnels{state="live"} 2' in text
    assert "armsproxy_tunnel_sas 1" in text
    assert "distids" not in text  # devices are not a tunnel state
    assert "armsproxy_store_up 1" in text
    assert 'armsproxy_operations{state="queued"} 4' in text
    assert "armsproxy_events_pending 7" in text
    assert "armsproxy_start_time_seconds 1700000000.5\n" in text  # every digit kept
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(families) == len(set(families))  # each family declared once
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("# ") or re.fullmatch(r"armsproxy_\w+(\{.*\})? \S+", line), line


def test_failed_tls_handshakes_are_one_family_with_two_labels():
    failures = HandshakeFailures(task.Clock())
    failures.record("push", "192.0.2.7", "pin_mismatch", "x")
    text = render_metrics(started_at=0, sa_gate={}, tunnels={}, backlog=None,
                          tls_failures=failures.counts()).decode()
    assert "# TYPE armsproxy_tls_handshake_failures_total counter" in text
    assert ('armsproxy_tls_handshake_failures_total{direction="push",reason="pin_mismatch"} 1'
            in text)
    for direction in ("sa_gate", "push"):  # the common reasons exist from the start
        for reason in ("protocol_version", "unknown_ca", "not_tls", "other"):
            assert (f'armsproxy_tls_handshake_failures_total{{direction="{direction}",'
                    f'reason="{reason}"}} 0') in text
    assert "tls_handshake" not in render_metrics(started_at=0, sa_gate={}, tunnels={},
                                                 backlog=None).decode()


def test_metrics_without_the_store_keep_the_in_memory_figures():
    text = render_metrics(started_at=0, sa_gate={"rs.unavailable": 2}, tunnels={"live": 0},
                          backlog=None).decode()
    assert "armsproxy_store_up 0" in text
    assert 'armsproxy_sa_gate_events_total{event="rs.unavailable"} 2' in text
    assert "armsproxy_operations" not in text and "armsproxy_events_pending" not in text


@pytest_twisted.ensureDeferred
async def test_embedded_default_serves_health_readiness_and_metrics(tmp_path):
    port, rs_port, gate_port, management_port = (_free_port() for _ in range(4))
    cfg = embedded(tmp_path / "data", port=port, rs_port=rs_port, rs_gate_port=gate_port,
                   management_port=management_port)
    top = build_services(cfg, reactor)
    top.startService()
    try:
        health = await http_get(management_port, "/healthz")
        assert (health.status, health.body) == (200, "ok\n")
        ready = await http_get(management_port, "/readyz")
        assert (ready.status, ready.body) == (200, "ready\n")
        metrics = await http_get(management_port, "/metrics")
        assert metrics.status == 200
        assert metrics.content_type.startswith("text/plain; version=0.0.4")
        assert "armsproxy_store_up 1" in metrics.body
        assert 'armsproxy_operations{state="queued"} 0' in metrics.body
        assert "armsproxy_events_pending 0" in metrics.body
        assert 'armsproxy_tunnels{state="live"} 0' in metrics.body
        assert 'armsproxy_sa_gate_refusals_total{reason="unauthorized"} 0' in metrics.body
        # An unknown device is refused by the SA gate, and counted.
        sa = SimulatedSA(reactor, DISTID, "no-such-key",
                         ca_pem=(cfg.data_dir / "pki" / "ca.pem").read_bytes(),
                         response_timeout=10.0)
        assert (await sa.config_solicitation(cfg.public_urls[0])).status == 401
        metrics = await http_get(management_port, "/metrics")
        assert 'armsproxy_sa_gate_refusals_total{reason="unauthorized"} 1' in metrics.body
        # A TLS-1.0-only device at the default (TLS 1.2) gate: its failed handshake shows.
        failed = 'armsproxy_tls_handshake_failures_total{direction="sa_gate",' \
                 'reason="protocol_version"} '
        assert failed + "0" in metrics.body
        old = SimulatedSA(reactor, DISTID, "no-such-key",
                          ca_pem=(cfg.data_dir / "pki" / "ca.pem").read_bytes(),
                          tls_max_version=UPSTREAM_TLS_VERSION)
        assert "TLS handshake failed" in (await old.config_solicitation(cfg.public_urls[0])).error
        for _ in range(100):
            metrics = await http_get(management_port, "/metrics")
            if failed + "1" in metrics.body:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert failed + "1" in metrics.body
        assert (await http_get(management_port, "/other")).status == 404
        assert (await http_get(management_port, "/metrics", "POST")).status == 405
        head = await http_get(management_port, "/healthz", "HEAD")
        assert (head.status, head.body) == (200, "")
        # With the store closed, the process is alive but not ready.
        await top.store.close()
        assert (await http_get(management_port, "/healthz")).status == 200
        ready = await http_get(management_port, "/readyz")
        assert (ready.status, ready.body) == (503, "not ready: the store does not answer\n")
        metrics = await http_get(management_port, "/metrics")
        assert metrics.status == 200 and "armsproxy_store_up 0" in metrics.body
    finally:
        await top.stopService()


def test_a_bad_management_listener_is_refused_with_a_clear_message(tmp_path):
    cfg = embedded(tmp_path / "data", port=_free_port(), rs_port=_free_port(),
                   rs_gate_port=_free_port())
    cfg.management_listen = "tcpp:8781"
    with pytest.raises(usage.UsageError, match=r"\[management\] listen 'tcpp:8781'"):
        build_services(cfg, reactor)


class _HungStore:
    """A store whose disk stopped answering (not reproducible with a real file here)."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[dict[str, int]]] = []

    def backlog(self) -> defer.Deferred[dict[str, int]]:
        d: defer.Deferred[dict[str, int]] = defer.Deferred()
        self.pending.append(d)
        return d


class _Recording(ManagementResource):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.requests: list = []

    def render_GET(self, request):
        self.requests.append(request)
        return super().render_GET(request)


async def _serve(resource: ManagementResource):
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        ManagementSite(resource, reactor))
    return port, port.getHost().port


async def _until(condition, what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_a_store_that_does_not_answer_makes_readyz_503_after_the_timeout(logs):
    clock, store = task.Clock(), _HungStore()
    listening, port = await _serve(ManagementResource(
        store=store, sa_gate_counts={}, tunnel_counts=dict, clock=clock, store_timeout=5.0))
    try:
        answer = defer.ensureDeferred(http_get(port, "/readyz"))
        await _until(lambda: store.pending, "the store read")
        clock.advance(4.9)
        await task.deferLater(reactor, 0.3, lambda: None)  # time for an answer to come back
        assert not answer.called
        also = defer.ensureDeferred(http_get(port, "/metrics"))  # joins the read in progress
        await task.deferLater(reactor, 0.3, lambda: None)
        assert len(store.pending) == 1  # a hung store gets one read, not one per probe
        clock.advance(0.2)
        ready = await answer
        assert (ready.status, ready.body) == (503, "not ready: the store does not answer\n")
        assert not also.called  # its own 5 s have not passed
        clock.advance(5)
        assert "armsproxy_store_up 0" in (await also).body
        assert logs.find("management: store read failed", "no answer in 5 s")
        store.pending[0].callback({"events": 0})  # the late answer changes nothing
        assert (await http_get(port, "/healthz")).status == 200
        ready = defer.ensureDeferred(http_get(port, "/readyz"))  # a new read once that ended
        await _until(lambda: len(store.pending) == 2, "a second store read")
        store.pending[1].callback({"events": 0})
        assert (await ready).status == 200
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_before_the_answer_costs_nothing(logs):
    clock, store = task.Clock(), _HungStore()
    resource = _Recording(store=store, sa_gate_counts={}, tunnel_counts=dict, clock=clock)
    listening, port = await _serve(resource)
    try:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await _until(lambda: store.pending, "the store read")
        (request,) = resource.requests
        await _until(lambda: request.channel is None, "the server to see the client leave")
        store.pending[0].callback({"queued": 1, "events": 0})
        await task.deferLater(reactor, 0.05, lambda: None)
        assert not logs.find("failed")
        assert (await http_get(port, "/healthz")).status == 200
    finally:
        await listening.stopListening()


class _BrokenThenFixedStore:
    """A store whose backlog() raises before it returns anything, until it is fixed."""

    broken = True

    def backlog(self):
        if self.broken:
            raise RuntimeError("database is locked")
        return defer.succeed({"queued": 0, "sending": 0, "started": 0, "events": 0})


@pytest_twisted.ensureDeferred
async def test_a_store_that_raises_at_once_does_not_wedge_readiness(logs):
    store = _BrokenThenFixedStore()
    listening, port = await _serve(ManagementResource(
        store=store, sa_gate_counts={}, tunnel_counts=dict, clock=task.Clock()))
    try:
        assert (await http_get(port, "/readyz")).status == 503
        assert logs.find("management: store read failed", "database is locked")
        store.broken = False
        assert (await http_get(port, "/readyz")).status == 200
    finally:
        await listening.stopListening()
