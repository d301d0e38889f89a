"""What ``/metrics`` serves, through ``prometheus_client`` (README, ``[management]``).

Each armsproxy instance has a :class:`Metrics` with a registry of its own, never the library's
global one: tests run several proxies in one process, and their counts must neither mix nor
clash at registration. Two kinds of figures:

* instruments that the code updates as things happen (push outcomes, push and RS-call
  latencies), plus the library's process and platform collectors and ``armsproxy_build_info``;
* :class:`LiveCollector`: counts that already live elsewhere (the SA gate's Counter, the tunnel
  registry, the TLS handshake recorder, the listeners' limits) and the store's backlog, read at
  scrape time so that there is one source of truth for each.

Labels are bounded by construction: operations and RS methods are the code's own names,
outcomes and result classes fixed sets; no distid, address or free text becomes a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.application.service import IServiceCollection

import twisted

from . import __version__
from .limits import DeadlineSite, ListenerLimit
from .push.operations import OPERATIONS

PUSH_OUTCOMES = ("succeeded", "failed", "expired", "cancelled")
#: push.submit: a new order stored, or a request_id already accepted (nothing new stored).
SUBMIT_OUTCOMES = ("accepted", "repeated")
#: Why an operation went back to its queue instead of finishing: an attempt failed (backoff),
#: the SA answered busy, the SA is not reachable (parked untried), re-sent after a restart.
REQUEUE_REASONS = ("retry", "busy", "waiting", "interrupted")
#: ARMS result codes by hundred (1xx success, 3xx busy...), "none": the device never answered.
RESULT_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none", "other")
#: Per attempt, send to answer: a device on a LAN answers in tens of ms, one behind a slow
#: link in seconds; the push client gives up at 30 s.
PUSH_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
#: An RS call: the SA is waiting for it (it gives up after 30 s; rs.timeout defaults to 15 s).
RS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)

# Outcome of a failed push attempt or RS call, by the error's class (or a base class) name:
# this module imports neither the push client nor the RS client, which import it.
_ERROR_OUTCOMES = {
    "PushUnreachable": "unreachable",
    "PushTLSError": "tls_failure",
    "PushTimeout": "timeout",
    "PushNoAnswer": "no_answer",
    "PushProtocolError": "bad_answer",
    "TunnelTimeout": "timeout",
    "TunnelBusy": "tunnel_busy",
    "TunnelClosed": "tunnel_closed",
    "RSFault": "fault",
    "RSTimeout": "timeout",
    "RSUnavailable": "unavailable",
    "RSProtocolError": "bad_answer",
    "CancelledError": "cancelled",  # the caller gave up (the SA left, its budget ran out)
}
# Series that exist from the start, so that a monitor's rate() sees their first event.
_PULL_TYPES = ("config-solicitation", "push-method-query", "push-confirmation-start")
_COMMON_REFUSALS = ("unauthorized", "distid_mismatch", "http_400", "http_413")
_COMMON_EVENTS = ("rs.unavailable", "done.not_committed")
_FIRST_RESULT = {"succeeded": "1xx", "failed": "none", "expired": "none", "cancelled": "none"}


def result_class(code: int | None) -> str:
    """An ARMS result code as a bounded label: its hundred, or "none" without an answer."""
    if code is None:
        return "none"
    return f"{code // 100}xx" if 100 <= code <= 599 else "other"


def error_outcome(error: BaseException | None) -> str:
    """The outcome label of an attempt that raised ``error`` (None: it was answered)."""
    if error is None:
        return "ok"
    for cls in type(error).__mro__:
        if cls.__name__ in _ERROR_OUTCOMES:
            return _ERROR_OUTCOMES[cls.__name__]
    return "error"


def _openssl_version() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return str(backend.openssl_version_text())
    except Exception:  # a cryptography without the call: the label only goes blank
        return ""


def _child(cache: dict[tuple[str, ...], Any], family: Any, key: tuple[str, ...]) -> Any:
    """``family.labels(*key)``, kept in ``cache``: labels() validates and locks on every
    call, and the hot series are counted per operation (their label tuples are bounded:
    operations x outcomes x classes)."""
    child = cache.get(key)
    if child is None:
        child = cache[key] = family.labels(*key)
    return child


class Metrics:
    """One armsproxy's instruments and registry; :meth:`render` answers a scrape.

    The push engine and the RS client each take one (tap.py hands them the same); built
    without one they make their own, which nobody scrapes.
    """

    def __init__(self, *, version: str = __version__) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, ..._fds...
        PlatformCollector(registry=self.registry)  # python_info
        Info("armsproxy_build", "The armsproxy that serves, and what its TLS runs on.",
             registry=self.registry).info({"version": version, "twisted": twisted.__version__,
                                           "openssl": _openssl_version()})
        self.push_operations = Counter(
            "armsproxy_push_operations",
            "Push operations that reached a final state, by operation, outcome and the class "
            "of the device's result code (none: no answer).",
            ("operation", "outcome", "result"), registry=self.registry)
        for operation in OPERATIONS:
            for outcome in PUSH_OUTCOMES:
                self.push_operations.labels(operation, outcome, _FIRST_RESULT[outcome])
        # What the per-operation info lines counted before they went to debug (issue #11).
        self.push_submitted = Counter(
            "armsproxy_push_submitted",
            "Orders push.submit took, by operation and outcome (accepted: stored; repeated: "
            "its request_id was already accepted, nothing new stored).",
            ("operation", "outcome"), registry=self.registry)
        self.push_requeued = Counter(
            "armsproxy_push_requeued",
            "Operations put back in their queue instead of finishing, by operation and "
            "reason (retry: an attempt failed, backoff; busy: the SA answered busy; waiting: "
            "the SA is not reachable, parked untried; interrupted: re-sent after a restart).",
            ("operation", "reason"), registry=self.registry)
        for operation in OPERATIONS:
            self.push_submitted.labels(operation, "accepted")
            for reason in REQUEUE_REASONS:
                self.push_requeued.labels(operation, reason)
        self.push_duration = Histogram(
            "armsproxy_push_duration_seconds",
            "One push attempt to a device, from sending (connect, for https-simple) to its "
            "answer or failure, by operation, method and outcome.",
            ("operation", "method", "outcome"), buckets=PUSH_BUCKETS, registry=self.registry)
        self.rs_call_duration = Histogram(
            "armsproxy_rs_call_duration_seconds",
            "One XML-RPC call to the RS, whole (connect, send, answer, body), by method and "
            "outcome.", ("method", "outcome"), buckets=RS_BUCKETS, registry=self.registry)
        self._finals: dict[tuple[str, ...], Any] = {}
        self._submits: dict[tuple[str, ...], Any] = {}
        self._attempts: dict[tuple[str, ...], Any] = {}
        self._rs_calls: dict[tuple[str, ...], Any] = {}

    def push_final(self, operation: str, outcome: str, result_code: int | None) -> None:
        """An operation reached ``outcome`` (succeeded, failed, expired, cancelled)."""
        _child(self._finals, self.push_operations,
               (operation, outcome, result_class(result_code))).inc()

    def push_submit(self, operation: str, created: bool) -> None:
        """push.submit took an order: stored (``created``) or a repeat of one."""
        _child(self._submits, self.push_submitted,
               (operation, SUBMIT_OUTCOMES[0 if created else 1])).inc()

    def push_requeue(self, operation: str, reason: str) -> None:
        """An operation went back to its queue (``reason`` one of REQUEUE_REASONS)."""
        self.push_requeued.labels(operation, reason).inc()

    def push_attempt(self, operation: str, method: str, error: BaseException | None,
                     seconds: float) -> None:
        """One push attempt ended: answered (``error`` None) or failed with ``error``."""
        outcome = "answered" if error is None else error_outcome(error)
        _child(self._attempts, self.push_duration, (operation, method, outcome)).observe(
            max(seconds, 0.0))

    def rs_call(self, method: str, error: BaseException | None, seconds: float) -> None:
        """One RS call ended: answered (``error`` None) or failed with ``error``."""
        _child(self._rs_calls, self.rs_call_duration, (method, error_outcome(error))).observe(
            max(seconds, 0.0))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type): OpenMetrics to a scraper that asks for it (Prometheus
        does), else the Prometheus text format 0.0.4, as the library's own server does."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class LiveCollector(Collector):
    """The figures kept elsewhere, read when scraped; the store's backlog is set by the caller
    for one scrape (it is read asynchronously, with a timeout, before rendering)."""

    def __init__(
        self,
        *,
        started_at: float,
        sa_gate: Mapping[str, int],
        tunnels: Callable[[], Mapping[str, int]],
        tls_failures: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        listeners: Callable[[], Mapping[tuple[str, str], int]] | None = None,
    ) -> None:
        self.started_at = started_at
        self.backlog: Mapping[str, int] | None = None
        self._sa_gate = sa_gate
        self._tunnels = tunnels
        self._tls_failures = tls_failures
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        start = GaugeMetricFamily("armsproxy_start_time_seconds",
                                  "When this process started (Unix time).")
        start.add_metric([], self.started_at)
        yield start
        yield from self._sa_gate_families()
        tunnels = self._tunnels()
        states = GaugeMetricFamily(
            "armsproxy_tunnels", "https-tunnels by state: open (past their 200 header) "
            "includes registered (confirmed once), which includes live (confirmed now).",
            labels=["state"])
        for state in ("open", "registered", "live"):
            states.add_metric([state], tunnels.get(state, 0))
        yield states
        yield GaugeMetricFamily("armsproxy_tunnel_sas",
                                "SAs holding at least one registered https-tunnel.",
                                value=tunnels.get("distids", 0))
        if self._tls_failures is not None:
            yield _counter_pairs(
                "armsproxy_tls_handshake_failures",
                "Failed TLS handshakes with devices since start, by direction (sa_gate: a "
                "device connecting to the SA gate or tunnel listener; push: armsproxy "
                "connecting to a device's https-simple listener) and reason.",
                ("direction", "reason"), self._tls_failures())
        if self._listeners is not None:
            yield _counter_pairs(
                "armsproxy_listener_refusals",
                "Connections a listener refused at accept (max_connections; reserve: too few "
                "descriptors free) or closed mid-request (request_timeout), since start.",
                ("listener", "reason"), self._listeners())
        backlog = self.backlog
        yield GaugeMetricFamily("armsproxy_store_up",
                                "1 if the store answered this scrape in time, else 0.",
                                value=0 if backlog is None else 1)
        if backlog is not None:
            operations = GaugeMetricFamily("armsproxy_operations",
                                           "Push operations not yet final, by state.",
                                           labels=["state"])
            for state, n in sorted(backlog.items()):
                if state != "events":
                    operations.add_metric([state], n)
            yield operations
            yield GaugeMetricFamily("armsproxy_events_pending",
                                    "Events not yet delivered to the RS (outbox).",
                                    value=backlog.get("events", 0))

    def _sa_gate_families(self) -> Iterator[Metric]:
        requests = dict.fromkeys(_PULL_TYPES, 0)
        refusals = dict.fromkeys(_COMMON_REFUSALS, 0)
        others = dict.fromkeys(_COMMON_EVENTS, 0)
        for name, count in list(self._sa_gate.items()):
            kind, _, detail = name.partition(".")
            if kind == "request":
                requests[detail] = count
            elif kind == "rejected":
                refusals[detail] = count
            else:
                others[name] = count
        for name, label, help_, counts in (
            ("armsproxy_sa_gate_requests", "type", "SA requests that passed authentication "
             "and parsing, by ARMS type, since start.", requests),
            ("armsproxy_sa_gate_refusals", "reason", "SA requests refused before the RS saw "
             "them, by reason, since start.", refusals),
            ("armsproxy_sa_gate_events", "event", "Other SA gate outcomes (RS unavailable or "
             "answering badly, done-requests refused or not committed, tunnels opened, "
             "answers timed out), since start.", others),
        ):
            family = CounterMetricFamily(name, help_, labels=[label])
            for value, n in sorted(counts.items()):
                family.add_metric([value], n)
            yield family

    def render(self, metrics: Metrics, backlog: Mapping[str, int] | None,
               accept: str = "") -> tuple[bytes, str]:
        """``metrics.render`` with ``backlog`` (None: the store did not answer) for this
        scrape. Synchronous, so no other scrape can see another's backlog."""
        self.backlog = backlog
        try:
            return metrics.render(accept)
        finally:
            self.backlog = None


def _counter_pairs(name: str, help_: str, labels: tuple[str, str],
                   counts: Mapping[tuple[str, str], int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_, labels=list(labels))
    for pair, n in sorted(counts.items()):
        family.add_metric(list(pair), n)
    return family


# -- listener refusals -----------------------------------------------------------------------

def listener_label(name: str) -> str:
    """``"sa gate tunnels"`` → ``"sa_gate_tunnels"``, like the TLS ``direction`` labels."""
    return name.replace(" ", "_")


def listener_counts(limits: Iterable[ListenerLimit],
                    sites: Iterable[DeadlineSite]) -> dict[tuple[str, str], int]:
    """(listener, reason) → connections refused at accept by each limit, or cut at the
    request deadline by each twisted.web site; every reason a listener can have, from 0."""
    counts: dict[tuple[str, str], int] = {}
    for limit in limits:
        for reason, n in limit.refusals.items():
            if reason != "reserve" or limit.keep_reserve:
                counts[(listener_label(limit.name), reason)] = n
    for site in sites:
        counts[(listener_label(site.listener_name), "request_timeout")] = site.cut.total
    return counts


def deadline_sites(root: Any) -> list[DeadlineSite]:
    """The twisted.web sites with request deadlines under the service tree ``root``: each
    listener service's factory (``site`` for the RS gate's own service)."""
    found: list[DeadlineSite] = []
    for svc in root:
        served = getattr(svc, "factory", None) or getattr(svc, "site", None)
        if isinstance(served, DeadlineSite):
            found.append(served)
        if IServiceCollection.providedBy(svc):
            found.extend(deadline_sites(svc))
    return found
