"""The management gate: ``/healthz``, ``/readyz`` and ``/metrics`` for the operator's monitoring.

A listener of its own (design.md §3): monitoring needs neither SA credentials nor the RS's
trust, and it keeps answering while either gate is busy or its peer is down. Read-only; no
request here changes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from .limits import DeadlineSite
from .metrics import LiveCollector, Metrics

log = Logger()

STORE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0  # connection start (or previous answer) to answer; > STORE_TIMEOUT


class ManagementResource(Resource):
    """``/healthz``: the reactor answers. ``/readyz``: the store answers a read within
    ``store_timeout`` (an SA's done-request or an RS order cannot be taken without it).
    ``/metrics``: ``metrics`` (armsproxy.metrics) with the live figures given here; the
    in-memory ones are served even with the store down."""

    isLeaf = True

    def __init__(
        self,
        *,
        store: Any,
        sa_gate_counts: Mapping[str, int],
        tunnel_counts: Callable[[], Mapping[str, int]],
        clock: IReactorTime,
        tls_failures: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        listener_counts: Callable[[], Mapping[tuple[str, str], int]] | None = None,
        metrics: Metrics | None = None,
        store_timeout: float = STORE_TIMEOUT,
    ) -> None:
        """``listener_counts``: (listener, reason) -> refusals (armsproxy.metrics.
        listener_counts). ``metrics``: the instance's, shared with the push engine and the RS
        client; by default one of its own."""
        super().__init__()
        self._store = store
        self._clock = clock
        self._store_timeout = store_timeout
        self._waiters: list[defer.Deferred[dict[str, int]]] | None = None
        self.metrics = metrics if metrics is not None else Metrics()
        self._live = LiveCollector(started_at=clock.seconds(), sa_gate=sa_gate_counts,
                                   tunnels=tunnel_counts, tls_failures=tls_failures,
                                   listeners=listener_counts)
        self.metrics.registry.register(self._live)

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
        backlog = await self._backlog()  # before rendering: the store read is asynchronous
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self._live.render(self.metrics, backlog, accept)
        _finish(request, 200, body, content_type.encode("ascii"))

    def _failed(self, failure: Failure, request: server.Request) -> None:
        log.failure("management: {path} failed", failure, path=request.path)
        _finish(request, 500, b"internal error (logged)\n")


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
