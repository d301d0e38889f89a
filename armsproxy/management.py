"""The management gate: ``/healthz``, ``/readyz`` and ``/metrics`` for the operator's monitoring.

A listener of its own (design.md §3): monitoring needs neither SA credentials nor the RS's
trust, and it keeps answering while either gate is busy or its peer is down. Read-only; no
request here changes anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from .limits import DeadlineSite

log = Logger()

CONTENT_TYPE_METRICS = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
STORE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0  # connection start (or previous answer) to answer; > STORE_TIMEOUT
# Series that exist from the start, so that a monitor's rate() sees their first event.
_PULL_TYPES = ("config-solicitation", "push-method-query", "push-confirmation-start")
_COMMON_REFUSALS = ("unauthorized", "distid_mismatch", "http_400", "http_413")
_COMMON_EVENTS = ("rs.unavailable", "done.not_committed")


class ManagementResource(Resource):
    """``/healthz``: the reactor answers. ``/readyz``: the store answers a read within
    ``store_timeout`` (an SA's done-request or an RS order cannot be taken without it).
    ``/metrics``: counters and gauges; the in-memory ones are served even with the store down."""

    isLeaf = True

    def __init__(
        self,
        *,
        store: Any,
        sa_gate_counts: Mapping[str, int],
        tunnel_counts: Callable[[], Mapping[str, int]],
        clock: IReactorTime,
        tls_failures: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        store_timeout: float = STORE_TIMEOUT,
    ) -> None:
        super().__init__()
        self._store = store
        self._sa_gate_counts = sa_gate_counts
        self._tunnel_counts = tunnel_counts
        self._tls_failures = tls_failures
        self._clock = clock
        self._store_timeout = store_timeout
        self._started_at = clock.seconds()
        self._waiters: list[defer.Deferred[dict[str, int]]] | None = None

    def render(self, request: server.Request) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):  # HEAD: twisted.web drops the body
            request.setHeader(b"allow", b"GET, HEAD")
            return _text(request, 405, b"method not allowed: GET or HEAD\n")
        return self.render_GET(request)

    def render_GET(self, request: server.Request) -> bytes | int:
        if request.path == b"/healthz":
            return _text(request, 200, b"ok\n")
        if request.path in (b"/readyz", b"/metrics"):
            handler = self._readyz if request.path == b"/readyz" else self._metrics
            d = defer.ensureDeferred(handler(request))
            d.addErrback(self._failed, request)
            return server.NOT_DONE_YET
        return _text(request, 404, b"not found: /healthz, /readyz, /metrics\n")

    async def _backlog(self) -> dict[str, int] | None:
        """The store's backlog, or None if it fails or takes longer than ``store_timeout``."""
        try:
            return await self._shared_read().addTimeout(self._store_timeout, self._clock)
        except defer.TimeoutError:
            error = f"no answer in {self._store_timeout:g} s"
        except Exception as e:
            error = str(e) or type(e).__name__
        log.warn("management: store read failed: {error}", error=error)
        return None

    def _shared_read(self) -> defer.Deferred[dict[str, int]]:
        """One store read at a time, whatever the number of probes: a store that hangs must
        not collect a read per scrape on its single worker."""
        waiter: defer.Deferred[dict[str, int]] = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        waiters = self._waiters = [waiter]

        def done(result: object) -> None:
            self._waiters = None
            for w in waiters:
                if not w.called:  # a waiter that timed out has had its answer
                    w.callback(result)  # a Failure goes down the waiter's errback path

        # maybeDeferred: a store that raises at once must not leave a read "in progress"
        defer.maybeDeferred(self._store.backlog).addBoth(done)
        return waiter

    async def _readyz(self, request: server.Request) -> None:
        backlog = await self._backlog()
        if backlog is None:
            _finish(request, 503, b"not ready: the store does not answer\n")
        else:
            _finish(request, 200, b"ready\n")

    async def _metrics(self, request: server.Request) -> None:
        backlog = await self._backlog()
        body = render_metrics(
            started_at=self._started_at, sa_gate=self._sa_gate_counts,
            tunnels=self._tunnel_counts(), backlog=backlog,
            tls_failures=self._tls_failures() if self._tls_failures is not None else None,
        )
        _finish(request, 200, body, CONTENT_TYPE_METRICS)

    def _failed(self, failure: Failure, request: server.Request) -> None:
        log.failure("management: {path} failed", failure, path=request.path)
        _finish(request, 500, b"internal error (logged)\n")


def render_metrics(
    *,
    started_at: float,
    sa_gate: Mapping[str, int],
    tunnels: Mapping[str, int],
    backlog: Mapping[str, int] | None,
    tls_failures: Mapping[tuple[str, str], int] | None = None,
) -> bytes:
    """Prometheus text exposition (format 0.0.4) of what armsproxy knows about itself.

    ``tls_failures``: failed TLS handshakes with devices by (direction, reason), every series
    present (armsproxy.tls.HandshakeFailures.counts); None leaves the family out."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP armsproxy_{name} {help_}")
        lines.append(f"# TYPE armsproxy_{name} {kind}")
        lines.extend(f"armsproxy_{name}{labels} {_number(value)}" for labels, value in samples)

    metric("start_time_seconds", "gauge", "When this process started (Unix time).",
           [("", started_at)])
    requests = dict.fromkeys(_PULL_TYPES, 0)
    refusals = dict.fromkeys(_COMMON_REFUSALS, 0)
    others = dict.fromkeys(_COMMON_EVENTS, 0)
    for name, count in sa_gate.items():
        kind, _, detail = name.partition(".")
        if kind == "request":
            requests[detail] = count
        elif kind == "rejected":
            refusals[detail] = count
        else:
            others[name] = count
    metric("sa_gate_requests_total", "counter",
           "SA requests that passed authentication and parsing, by ARMS type, since start.",
           [(_label("type", t), n) for t, n in sorted(requests.items())])
    metric("sa_gate_refusals_total", "counter",
           "SA requests refused before the RS saw them, by reason, since start.",
           [(_label("reason", r), n) for r, n in sorted(refusals.items())])
    metric("sa_gate_events_total", "counter",
           "Other SA gate outcomes (RS unavailable or answering badly, done-requests refused "
           "or not committed, tunnels opened, answers timed out), since start.",
           [(_label("event", e), n) for e, n in sorted(others.items())])
    metric("tunnels", "gauge",
           "https-tunnels by state: open (past their 200 header) includes registered "
           "(confirmed once), which includes live (confirmed now).",
           [(_label("state", k), tunnels.get(k, 0)) for k in ("open", "registered", "live")])
    metric("tunnel_sas", "gauge", "SAs holding at least one registered https-tunnel.",
           [("", tunnels.get("distids", 0))])
    if tls_failures is not None:
        def pair(direction: str, reason: str) -> str:
            return f"{_label('direction', direction)[:-1]},{_label('reason', reason)[1:]}"

        metric("tls_handshake_failures_total", "counter",
               "Failed TLS handshakes with devices since start, by direction (sa_gate: a "
               "device connecting to the SA gate or tunnel listener; push: armsproxy "
               "connecting to a device's https-simple listener) and reason.",
               [(pair(d, r), n) for (d, r), n in sorted(tls_failures.items())])
    metric("store_up", "gauge", "1 if the store answered this scrape in time, else 0.",
           [("", 0 if backlog is None else 1)])
    if backlog is not None:
        states = {k: v for k, v in backlog.items() if k != "events"}
        metric("operations", "gauge", "Push operations not yet final, by state.",
               [(_label("state", state), n) for state, n in sorted(states.items())])
        metric("events_pending", "gauge", "Events not yet delivered to the RS (outbox).",
               [("", backlog.get("events", 0))])
    return ("\n".join(lines) + "\n").encode("utf-8")


def _number(value: float) -> str:
    """Exact: ``repr`` round-trips a float (``:g`` would cut a Unix time to 6 digits)."""
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return str(int(value)) if value.is_integer() else repr(value)


def _label(name: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{{name}="{escaped}"}}'


def _text(request: server.Request, code: int, body: bytes,
          content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    return body


def _finish(request: server.Request, code: int, body: bytes,
            content_type: bytes = b"text/plain; charset=utf-8") -> None:
    if request.finished or request.channel is None:  # the client went away meanwhile
        return
    request.write(_text(request, code, body, content_type))
    request.finish()


class ManagementSite(DeadlineSite):
    """No access-log line per scrape: a monitor polling every few seconds would drown the log.

    Each request must be answered within ``request_timeout`` (armsproxy.limits): a client that
    trickles its bytes cannot hold a connection, and with it a descriptor devices need.
    """

    def __init__(self, resource: ManagementResource, reactor: Any = None, *,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        super().__init__(resource, request_timeout=request_timeout, listener_name="management",
                         reactor=reactor)
        self.noisy = False
        self.displayTracebacks = False

    def log(self, request: server.Request) -> None:
        pass
