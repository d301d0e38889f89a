"""The management gate: /healthz, /readyz, /metrics over real TCP, against a real store.

The exposition is prometheus_client's: assertions parse it (its number and HELP formats are
its own), they do not compare text."""

from __future__ import annotations

import http.client
import socket

import pytest
import pytest_twisted
from conftest import http_get
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from test_push_e2e import KEY, RS, pulled_device, until
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python import usage

from armsproxy import __version__
from armsproxy.config import embedded
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import UPSTREAM_TLS_VERSION, DeviceBehaviour, SimulatedSA
from armsproxy.limits import ListenerLimit
from armsproxy.management import ManagementResource, ManagementSite
from armsproxy.metrics import (
    RESULT_CLASSES,
    LiveCollector,
    Metrics,
    error_outcome,
    listener_counts,
    result_class,
)
from armsproxy.push.client import (
    PushNoAnswer,
    PushProtocolError,
    PushTimeout,
    PushTLSError,
    PushUnreachable,
)
from armsproxy.rs_client import RSFault, RSProtocolError, RSTimeout, RSUnavailable
from armsproxy.tap import build_services
from armsproxy.tls import HandshakeFailures
from armsproxy.tunnel import TunnelBusy, TunnelClosed, TunnelTimeout

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
OTHER = "0001-0002-0003-0004-0005-0006-0007-0009"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value; a sample that appeared twice fails the test."""
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, key
            samples[key] = s.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def _live(**kwargs) -> tuple[Metrics, LiveCollector]:
    metrics = Metrics()
    live = LiveCollector(**{"started_at": 0, "sa_gate": {}, "tunnels": dict, **kwargs})
    metrics.registry.register(live)
    return metrics, live


def _scrape(metrics: Metrics, live: LiveCollector, backlog=None) -> dict:
    body, content_type = live.render(metrics, backlog)
    assert content_type.startswith("text/plain; version=0.0.4")
    return _samples(body.decode())


def test_live_figures_keep_their_names_labels_and_values():
    metrics, live = _live(
        started_at=1700000000.5,
        sa_gate={"request.config-solicitation": 3, "rejected.http_431": 2,
                 'rejected.odd"name\\': 1, "rs.unavailable": 4, "tunnel.opened": 5},
        tunnels=lambda: {"open": 3, "registered": 2, "live": 2, "distids": 1},
    )
    body, _ = live.render(metrics, {"queued": 4, "sending": 0, "started": 1, "events": 7})
    text = body.decode()
    samples = _samples(text)
    requests = "armsproxy_sa_gate_requests_total"
    assert _value(samples, requests, type="config-solicitation") == 3
    assert _value(samples, requests, type="push-method-query") == 0  # from the start
    refusals = "armsproxy_sa_gate_refusals_total"
    assert _value(samples, refusals, reason="http_431") == 2
    assert _value(samples, refusals, reason="unauthorized") == 0
    assert _value(samples, refusals, reason='odd"name\\') == 1  # escaped and back
    assert _value(samples, "armsproxy_sa_gate_events_total", event="rs.unavailable") == 4
    assert _value(samples, "armsproxy_sa_gate_events_total", event="tunnel.opened") == 5
    assert _value(samples, "armsproxy_tunnels", state="live") == 2
    assert _value(samples, "armsproxy_tunnel_sas") == 1
    assert "distids" not in text  # devices are not a tunnel state
    assert _value(samples, "armsproxy_store_up") == 1
    assert _value(samples, "armsproxy_operations", state="queued") == 4
    assert _value(samples, "armsproxy_events_pending") == 7
    assert _value(samples, "armsproxy_start_time_seconds") == 1700000000.5  # every digit
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))  # each family declared once
    assert "# TYPE armsproxy_sa_gate_requests_total counter" in text
    assert live.backlog is None  # one scrape's backlog is not the next one's


def test_failed_tls_handshakes_are_one_family_with_two_labels():
    failures = HandshakeFailures(task.Clock())
    failures.record("push", "192.0.2.7", "pin_mismatch", "x")
    samples = _scrape(*_live(tls_failures=failures.counts))
    name = "armsproxy_tls_handshake_failures_total"
    assert _value(samples, name, direction="push", reason="pin_mismatch") == 1
    for direction in ("sa_gate", "push"):  # the common reasons exist from the start
        for reason in ("protocol_version", "unknown_ca", "not_tls", "other"):
            assert _value(samples, name, direction=direction, reason=reason) == 0
    assert not any(n == name for n, _ in _scrape(*_live()))


def test_metrics_without_the_store_keep_the_in_memory_figures():
    samples = _scrape(*_live(sa_gate={"rs.unavailable": 2}, tunnels=lambda: {"live": 0}))
    assert _value(samples, "armsproxy_store_up") == 0
    assert _value(samples, "armsproxy_sa_gate_events_total", event="rs.unavailable") == 2
    assert not any(n in ("armsproxy_operations", "armsproxy_events_pending")
                   for n, _ in samples)


def test_build_info_and_process_metrics_are_served():
    samples = _scrape(*_live())
    (build,) = [dict(labels) for name, labels in samples if name == "armsproxy_build_info"]
    assert build["version"] == __version__ and build["twisted"] and build["openssl"]
    assert _total(samples, "armsproxy_build_info") == 1
    assert _value(samples, "process_cpu_seconds_total") > 0
    assert _value(samples, "process_resident_memory_bytes") > 0
    assert _value(samples, "process_open_fds") > 0
    assert _value(samples, "process_start_time_seconds") > 0
    assert _total(samples, "python_info") == 1


def test_each_instance_has_its_own_registry_never_the_global_one():
    one, two = Metrics(), Metrics()  # no clash: each registers the same names
    one.push_final("ping", "succeeded", 100)
    one.rs_call("arms.sa_key", None, 0.01)
    first, second = (_samples(m.render()[0].decode()) for m in (one, two))
    ping = {"operation": "ping", "outcome": "succeeded", "result": "1xx"}
    assert _value(first, "armsproxy_push_operations_total", **ping) == 1
    assert _value(second, "armsproxy_push_operations_total", **ping) == 0  # from the start
    assert not _total(second, "armsproxy_rs_call_duration_seconds_count")
    assert REGISTRY.get_sample_value("armsproxy_build_info", {"version": __version__}) is None


def test_labels_stay_bounded():
    assert [result_class(c) for c in (None, 100, 102, 302, 414, 502, 0, 999)] == \
        ["none", "1xx", "1xx", "3xx", "4xx", "5xx", "other", "other"]
    assert {result_class(c) for c in range(-5, 1000)} | {"none"} == set(RESULT_CLASSES)
    errors = {
        PushUnreachable("x"): "unreachable", PushTLSError("x"): "tls_failure",
        PushTimeout("x"): "timeout", PushNoAnswer("x"): "no_answer",
        PushProtocolError("x"): "bad_answer", TunnelTimeout("x"): "timeout",
        TunnelBusy("x"): "tunnel_busy",
        TunnelClosed("x", request_sent=True): "tunnel_closed", RSFault(404, "x"): "fault",
        RSTimeout("x"): "timeout", RSUnavailable("x"): "unavailable",
        RSProtocolError("x"): "bad_answer", ValueError("x"): "error", None: "ok",
    }
    assert {e: error_outcome(e) for e in errors} == errors


def test_listener_refusals_by_listener_and_reason():
    budget_free = type("Budget", (), {"free": lambda self: 0, "reserve": 10, "limit": 100})()
    clock = task.Clock()
    management = ListenerLimit("management", 1, budget=budget_free, keep_reserve=True,
                               clock=clock)
    device = ListenerLimit("sa gate tunnels", 1, clock=clock)
    assert not management.admit(None)  # 0 descriptors free: the reserve
    device.opened()
    assert not device.admit(None) and not device.admit(None)  # over its cap
    site = ManagementSite(ManagementResource(store=None, sa_gate_counts={},
                                             tunnel_counts=dict, clock=clock), clock)
    assert listener_counts([management, device], [site]) == {
        ("management", "max_connections"): 0, ("management", "reserve"): 1,
        ("sa_gate_tunnels", "max_connections"): 2,  # a device listener has no reserve
        ("management", "request_timeout"): 0,
    }


def _get_with_accept(port: int, accept: str) -> tuple[str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics", headers={"Accept": accept})
        response = connection.getresponse()
        return response.getheader("content-type") or "", response.read().decode()
    finally:
        connection.close()


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
        samples = _samples(metrics.body)
        assert _value(samples, "armsproxy_store_up") == 1
        assert _value(samples, "armsproxy_operations", state="queued") == 0
        assert _value(samples, "armsproxy_events_pending") == 0
        assert _value(samples, "armsproxy_tunnels", state="live") == 0
        assert _value(samples, "armsproxy_sa_gate_refusals_total", reason="unauthorized") == 0
        assert _total(samples, "armsproxy_build_info", version=__version__) == 1
        assert _value(samples, "process_open_fds") > 0
        refusals = "armsproxy_listener_refusals_total"
        for listener, reason in (("management", "max_connections"), ("management", "reserve"),
                                 ("management", "request_timeout"), ("rs_gate", "reserve"),
                                 ("rs_gate", "request_timeout"), ("demo_rs", "request_timeout"),
                                 ("sa_gate", "max_connections")):
            assert _value(samples, refusals, listener=listener, reason=reason) == 0
        assert (refusals, frozenset({("listener", "sa_gate"), ("reason", "reserve")})) \
            not in samples  # devices are never kept out of the reserve
        # Scrapers that ask for OpenMetrics (Prometheus does) get it.
        content_type, body = await threads.deferToThread(
            _get_with_accept, management_port, "application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text")
        assert body.endswith("# EOF\n")
        assert any(f.name == "armsproxy_sa_gate_refusals" and f.type == "counter"
                   for f in openmetrics_families(body))
        # An unknown device is refused by the SA gate, and counted; so is the RS call.
        sa = SimulatedSA(reactor, DISTID, "no-such-key",
                         ca_pem=(cfg.data_dir / "pki" / "ca.pem").read_bytes(),
                         response_timeout=10.0)
        assert (await sa.config_solicitation(cfg.public_urls[0])).status == 401
        samples = _samples((await http_get(management_port, "/metrics")).body)
        assert _value(samples, "armsproxy_sa_gate_refusals_total", reason="unauthorized") == 1
        assert _total(samples, "armsproxy_rs_call_duration_seconds_count",
                      method="arms.sa_key") == 1
        # A TLS-1.0-only device at the default (TLS 1.2) gate: its failed handshake shows.
        failed = {"direction": "sa_gate", "reason": "protocol_version"}
        name = "armsproxy_tls_handshake_failures_total"
        assert _value(samples, name, **failed) == 0
        old = SimulatedSA(reactor, DISTID, "no-such-key",
                          ca_pem=(cfg.data_dir / "pki" / "ca.pem").read_bytes(),
                          tls_max_version=UPSTREAM_TLS_VERSION)
        assert "TLS handshake failed" in (await old.config_solicitation(cfg.public_urls[0])).error
        for _ in range(100):
            samples = _samples((await http_get(management_port, "/metrics")).body)
            if _value(samples, name, **failed) == 1:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert _value(samples, name, **failed) == 1
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
        assert metrics.status == 200
        assert _value(_samples(metrics.body), "armsproxy_store_up") == 0
    finally:
        await top.stopService()


@pytest_twisted.ensureDeferred
async def test_pushes_to_a_real_device_fill_outcomes_and_latencies(tmp_path):
    """A device over real TLS: one push that succeeds, one the device fails (configure
    rolled back, 414), one cancelled; the RS calls of its pulls and of the events."""
    port, rs_port, gate_port, management_port = (_free_port() for _ in range(4))
    cfg = embedded(tmp_path / "data", port=port, rs_port=rs_port, rs_gate_port=gate_port,
                   management_port=management_port)
    top = build_services(cfg, reactor)
    top.startService()
    device = None
    try:
        db, pki = str(cfg.demo_rs_db), cfg.data_dir / "pki"
        assert demo_cli.main(["--db", db, "register", DISTID, "--key", KEY, "--module",
                              "1:1.0.0:harness-module", "--push-methods", "https-simple"]) == 0
        assert demo_cli.main(["--db", db, "issue-cert", DISTID, "--ca-cert",
                              str(pki / "ca.pem"), "--ca-key", str(pki / "ca.key")]) == 0
        device = await pulled_device(cfg, cfg.public_urls[0],
                                     DeviceBehaviour(configure_result=414))
        rs = RS(gate_port)

        async def final(op_id: str) -> bool:
            state = (await rs.call("push.status", op_id))["state"]
            return state in ("succeeded", "failed", "expired", "cancelled")

        ok = await rs.call("push.submit", {"distribution_id": DISTID,
                                           "operation": "check-transaction"})
        await until(lambda: final(ok), what="check-transaction to finish")
        rolled_back = await rs.call("push.submit", {
            "distribution_id": DISTID, "operation": "configure",
            "params": {"modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}],
                       "md_configs": [{"id": 1, "data": "hostname broken\n"}]}})
        await until(lambda: final(rolled_back), what="configure to finish")
        assert (await rs.call("push.status", rolled_back))["state"] == "failed"
        # An order for a device that never confirmed stays queued: the RS cancels it.
        waiting = await rs.call("push.submit", {"distribution_id": OTHER,
                                                "operation": "read-module-list"})

        async def cancelled() -> bool:
            return (await rs.call("push.cancel", waiting))["cancelled"] or await final(waiting)

        await until(cancelled, what="the cancel")
        samples = _samples((await http_get(management_port, "/metrics")).body)
        outcomes = "armsproxy_push_operations_total"
        assert _value(samples, outcomes, operation="check-transaction", outcome="succeeded",
                      result="1xx") == 1
        assert _value(samples, outcomes, operation="configure", outcome="failed",
                      result="4xx") == 1
        assert _value(samples, outcomes, operation="read-module-list", outcome="cancelled",
                      result="none") == 1
        assert _total(samples, outcomes) == 3  # each operation once
        # One answered attempt each, timed from the connect to the answer.
        duration = "armsproxy_push_duration_seconds"
        for operation in ("check-transaction", "configure", "push-confirmation-done"):
            labels = {"operation": operation, "method": "https-simple", "outcome": "answered"}
            count = _value(samples, f"{duration}_count", **labels)
            assert count >= 1 and (operation == "push-confirmation-done" or count == 1)
            assert _value(samples, f"{duration}_bucket", le="+Inf", **labels) == count
            assert 0 < _value(samples, f"{duration}_sum", **labels) < 30
        # The RS calls: the pull's key and configuration, and the events to the RS.
        rs_calls = "armsproxy_rs_call_duration_seconds"
        await until(lambda: top.metrics.registry.get_sample_value(
            f"{rs_calls}_count", {"method": "arms.events", "outcome": "ok"}),
            what="an event delivered to the RS")
        samples = _samples((await http_get(management_port, "/metrics")).body)
        for method in ("arms.sa_key", "arms.config_solicitation", "arms.push_method_query",
                       "arms.events"):
            count = _value(samples, f"{rs_calls}_count", method=method, outcome="ok")
            assert count >= 1, method
            assert _value(samples, f"{rs_calls}_bucket", le="+Inf", method=method,
                          outcome="ok") == count
    finally:
        if device is not None:
            await device.close()
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
        assert _value(_samples((await also).body), "armsproxy_store_up") == 0
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
