"""The push engine: carries RS orders to SAs and their results back (design.md §5).

Durability lives in the store: every state change and its ``arms.event`` commit together, so
a crash at any point leaves a state this module can resume from. The engine itself keeps only
what can be rebuilt: which SAs are being sent to right now, per-SA locks that serialise
"the start answer was read" against "a done-request arrived" (§7.0.4: the done may overtake
the start answer), and a copy of the SA registry it writes through (:mod:`.sa_cache`).

Store calls per operation, the hot path: ``submit``; one ``claim_dispatchable`` per dispatch
turn for every operation it picks (queued -> sending, the attempt counted); the transition
that records the answer. An SA's record comes from the cache, and a pull writes the registry
only when something changed (``config_relayed``). Per-operation outcomes are counted in
:class:`~armsproxy.metrics.Metrics` and logged at debug level; failures are logged as warnings.

Rules an operator can rely on:

* per SA, operations leave in submit order and one is being sent at a time; an operation
  waiting for its done-request (``started``) does not hold the next one back (over a tunnel,
  a done-request being stored holds it until answered: the answer goes out first);
* an order is tried only when its SA is reachable: the order names an ``sa_url``, or the SA
  holds a live tunnel, or its https-simple push confirmation succeeded. Otherwise it stays
  ``queued`` with ``waiting_for`` set and no attempt counted, holding its SA's queue, until the
  SA confirms or opens a tunnel (its queue then goes at once) or the order's deadline passes
  (``expired``: the SA never became reachable). A confirmation that starts (or fails) makes
  the SA unreachable again until one succeeds;
* unreachable SA, refused TLS, or no answer → queued again with exponential backoff, up to
  ``max_attempts``, then ``failed`` with the reason; SA busy (302/406) → queued again after
  ``busy_delay`` (bounded by the order's deadline, not by attempts);
* a request the SA may have executed (it was sent, no answer came) is re-sent only for
  read-only operations; others fail with the reason rather than run twice;
* at start-up, operations found ``sending`` are resolved: read-only ones are re-sent; 1-way
  operations with side effects fail as ``interrupted``; 2-way ones wait ``interrupted_grace``
  seconds for evidence (a done-request of that type from that SA) before failing.

Several instances on one store (#12, :mod:`armsproxy.instance`): each claims with its id, only
what it can send (an SA's orders go to the instance holding its tunnel); what an instance whose
lease expired left ``sending`` is taken over by a survivor (every ``takeover_every`` seconds)
and resolved by the same restart rules. A started operation needs nothing: its done-request
may reach any instance, which finds it in the store.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..arms import codes
from ..arms.codec import MessageError, UnsafeMessageError, parse_message
from ..arms.messages import ArmsRequest, ArmsResponse, base_type
from ..metrics import Metrics
from ..store.model import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINAL,
    QUEUED,
    SENDING,
    STARTED,
    SUCCEEDED,
    NewOperation,
    Operation,
    SARecord,
)
from ..tunnel import TunnelError
from . import operations as ops
from .client import PushError
from .outbox import new_event
from .sa_cache import SACache

log = Logger()


class KeySource(Protocol):
    async def sa_key(self, distid: str) -> str | None: ...


class PushClient(Protocol):
    async def push(self, url: str, *, distribution_id: str, key: str, body: bytes,
                   pinned_certificate_pem: str | None) -> Any: ...


@dataclass(slots=True)
class PushSettings:
    result_url: str  # this armsproxy's SA-gate URL, put in every 2-way start request (§7.0.3)
    max_attempts: int = 6
    retry_base: float = 5.0
    retry_cap: float = 300.0
    busy_delay: float = 30.0
    done_timeout: float = 900.0  # 2-way: how long to wait for the done-request
    default_expires_in: float = 86400.0  # order deadline when the RS gives none
    max_in_flight: int = 200
    tick: float = 1.0
    deadline_scan_every: float = 5.0
    interrupted_grace: float = 120.0
    confirmation_window: float = 55.0  # the SA waits 60 s for push-confirmation-done (§7.2)
    confirmation_retry: float = 3.0
    endpoint_from_peer: bool = False  # push to the TCP peer address instead (SAs behind NAT)
    tunnel_answer_timeout: float = 30.0  # the SA's answer to a request sent over a tunnel
    # Done-requests no operation claims yet ("orphans"): answered 100 always, kept bounded.
    # A legitimate one waits only until its start answer is read (seconds, §7.0.4).
    orphan_dones_max_per_sa: int = 32  # the newest are kept, older ones dropped
    orphan_dones_ttl: float = 3600.0  # then dropped: its start answer is long overdue
    orphan_done_max_bytes: int = 262144  # a larger one is recorded, its XML not kept
    orphan_purge_every: float = 60.0
    # SA records kept in memory (LRU), so that a dispatch needs no registry read; ~2 KB each.
    sa_cache_size: int = 4096
    # ...each trusted this long (None: for ever): other proxies sharing a PostgreSQL store
    # write the registry too. An SA that looks unreachable is read again before it waits.
    sa_cache_ttl: float | None = 30.0
    # A pull from the same host with the same certificate is recorded (last_pull_at,
    # last_peer) only once the recorded one is this old: no store write per pull.
    pull_record_interval: float = 60.0
    # With an instance: how often to look for instances whose lease expired (their
    # `sending` operations are resolved here); the instance's renewal interval.
    takeover_every: float = 5.0

    def __post_init__(self) -> None:
        if self.orphan_dones_max_per_sa < 1 or self.orphan_dones_ttl <= 0 \
                or self.orphan_done_max_bytes < 0:
            raise ValueError("orphan done bounds: max_per_sa >= 1, ttl > 0, max_bytes >= 0")


#: Operations past their deadline read per store call by the deadline scan.
DEADLINE_PAGE = 500

#: Closed tunnels kept per SA in the registry (with when and why they closed).
TUNNEL_HISTORY = 5

#: What a queued order waits for (``waiting_for`` in push.status) while its SA is unreachable.
WAIT_CONFIRMATION = "the SA to confirm a push method"
WAIT_TUNNEL = "a live tunnel from the SA"


class OrderRejected(ValueError):
    """An order that is not accepted; nothing was stored."""


def _host(peer: str | None) -> str | None:
    """``host:port`` -> host: a device pulls over a new connection (a new port) each time."""
    return None if peer is None else peer.rsplit(":", 1)[0]


def _fire(waiters: list[defer.Deferred[None]]) -> None:
    for waiter in waiters:
        if not waiter.called:  # a cancelled one (the engine stopped) has been
            waiter.callback(None)


def _event(kind: str, op: Operation, **payload: Any) -> dict[str, Any]:
    """An ``operation.*`` event: ``state`` is the kind's second half, ``request_id`` "" when
    the order had none (members: outbox.EVENT_MEMBERS)."""
    return new_event(kind, op.distribution_id, op.operation_id,
                     state=kind.split(".", 1)[1], operation=op.operation,
                     request_id=op.request_id or "", **payload)


class PushEngine(service.Service):
    def __init__(
        self,
        *,
        store: Any,
        client: PushClient,
        keys: KeySource,
        clock: IReactorTime,
        settings: PushSettings,
        on_events: Callable[[], None] | None = None,
        tunnels: Any = None,
        counter: Callable[[str, int], None] | None = None,
        metrics: Metrics | None = None,
        instance: Any = None,
    ) -> None:
        """``counter(name, n)``: where the engine's counts go (tap.py: the management
        gate's ``sa_gate_events_total``); by default :attr:`stats`. ``metrics``: push
        outcomes and attempt latencies for ``/metrics`` (by default its own).
        ``instance``: the :class:`~armsproxy.instance.InstanceService` this engine claims
        for; None: the only process on its store (nothing claimed carries an id)."""
        self.store = store
        self.client = client
        self.keys = keys
        self.clock = clock
        self.settings = settings
        self._on_events = on_events or (lambda: None)
        self.instance = instance
        self.instance_id: str | None = None if instance is None else instance.id
        if instance is not None:
            instance.on("ops", self.wake)
            instance.on_lease_regained(self._lease_regained)
        # Other processes to tell about new orders and events (a shared store, instances).
        self._announcing = instance is not None and bool(getattr(store, "shared", False))
        self.tunnels = tunnels  # armsproxy.tunnel.TunnelRegistry, when tunnels are served
        self._sending: set[str] = set()
        # SAs whose done-request is being stored (not answered yet): no tunnel request to them
        # until a reactor turn after it is (the gate writes the answer in that turn).
        self._answering: Counter[str] = Counter()
        self._answer_waiters: dict[str, list[defer.Deferred[None]]] = {}
        self._in_flight: set[defer.Deferred[None]] = set()
        self._locks: dict[str, defer.DeferredLock] = {}
        self._loop: task.LoopingCall | None = None
        self._pumping = False
        self._pump_again = False
        self._last_scan = 0.0
        self._last_orphan_purge = 0.0
        self._last_takeover = 0.0
        self._background: set[defer.Deferred[Any]] = set()
        self.stats: Counter[str] = Counter()
        #: The SA registry as last written or read: every registry write goes through it.
        self.sa_records = SACache(store, settings.sa_cache_size, clock=clock,
                                  ttl=settings.sa_cache_ttl)
        self._counter = counter or (lambda name, n: self.stats.update({name: n}))
        self.metrics = metrics if metrics is not None else Metrics()

    # -- service ----------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._spawn(self._start())

    async def _start(self) -> None:
        if self.instance is not None:
            await self.instance.ready()  # no claim without a lease
        await self.recover()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.tick, now=True)

    async def _stop(self) -> None:
        """Stop at once: whatever is cut short is resolved by ``recover`` at the next start."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        pending = list(self._in_flight | self._background)
        for d in pending:
            d.cancel()
        if pending:
            await defer.DeferredList(pending, consumeErrors=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    def _spawn(self, coro: Any) -> defer.Deferred[Any]:
        d = defer.ensureDeferred(coro)
        self._background.add(d)

        def done(result: Any) -> Any:
            self._background.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(self._background_failed)
        return d

    def _background_failed(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("push engine: background task failed", failure)

    def _lock(self, distid: str) -> defer.DeferredLock:
        return self._locks.setdefault(distid, defer.DeferredLock())

    def on_events(self) -> None:
        """Events were committed: deliver them (here, or at the instance that leads)."""
        self._on_events()
        if self.instance is not None and not self.instance.leading:
            self._announce("events")

    def _announce(self, topic: str) -> None:
        if self._announcing:
            self._spawn(self._announce_async(topic))

    async def _announce_async(self, topic: str) -> None:
        try:
            await self.store.announce(topic)
        except defer.CancelledError:
            raise
        except Exception as e:  # the others' poll finds the work anyway
            log.debug("push: announcing {topic} failed ({e})", topic=topic, e=str(e))

    # -- orders -----------------------------------------------------------------------------
    async def submit(self, order: dict[str, Any]) -> tuple[Operation, bool]:
        """Validate and store an order; returns only after it is committed."""
        new = self.validate_order(order)
        op, created = await self.store.submit(new)
        self.metrics.push_submit(op.operation, created)
        if created:
            self.wake()
            self._announce("ops")  # the SA's tunnel may be another instance's
        return op, created

    def validate_order(self, order: Any) -> NewOperation:
        from ..arms.distid import is_distid
        from ..arms.urls import url_problems

        if not isinstance(order, dict):
            raise OrderRejected("order must be a struct")
        unknown = set(order) - {"distribution_id", "operation", "params", "sa_url",
                                "request_id", "expires_in", "method"}
        if unknown:
            raise OrderRejected(f"unknown order field(s): {', '.join(sorted(unknown))}")
        distid = order.get("distribution_id")
        if not isinstance(distid, str) or not is_distid(distid):
            raise OrderRejected("distribution_id: 8 groups of 4 upper-case hex digits expected")
        operation = order.get("operation")
        if not isinstance(operation, str) or operation not in ops.OPERATIONS:
            raise OrderRejected(
                f"operation: one of {', '.join(sorted(ops.OPERATIONS))} expected, "
                f"got {operation!r}"
            )
        try:
            params = ops.validate_order_params(operation, order.get("params", {}))
        except ops.OrderError as e:
            raise OrderRejected(str(e)) from None
        sa_url = order.get("sa_url")
        if sa_url is not None:
            if not isinstance(sa_url, str) or url_problems(sa_url):
                raise OrderRejected(f"sa_url: {'; '.join(url_problems(str(sa_url)))}")
        request_id = order.get("request_id")
        if request_id is not None and (not isinstance(request_id, str) or not request_id
                                       or len(request_id) > 200):
            raise OrderRejected("request_id: a non-empty string of at most 200 characters")
        method = order.get("method")
        if method not in (None, "https-simple", "https-tunnel"):
            raise OrderRejected("method: https-simple or https-tunnel")
        expires_in = order.get("expires_in", self.settings.default_expires_in)
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
                or not 0 < expires_in <= 10 * 366 * 86400:  # false for NaN; no float(10**400)
            raise OrderRejected("expires_in: a positive number of seconds, at most 10 years")
        now = self.clock.seconds()
        return NewOperation(
            request_id=request_id, distribution_id=distid, operation=operation, params=params,
            sa_url=sa_url, method=method, expires_at=now + float(expires_in), created_at=now,
        )

    async def cancel(self, operation_id: str) -> tuple[bool, str | None]:
        current = await self.store.get(operation_id)
        if current is None:
            return False, None
        # The event is committed with the transition (outbox rule): built from the order as
        # read, whose distribution_id, operation and request_id never change.
        op = await self.store.transition(
            operation_id, expect={QUEUED}, state=CANCELLED,
            events=[_event("operation.cancelled", current)],
            changes={"last_error": "cancelled by the RS"},
        )
        if op is not None:
            self.on_events()
            self.metrics.push_final(current.operation, CANCELLED, None)
            return True, CANCELLED
        current = await self.store.get(operation_id)
        return False, None if current is None else current.state

    # -- dispatch loop ----------------------------------------------------------------------
    def wake(self) -> None:
        if self._pumping:
            # The running pump claims again before it returns (what _pump itself does when
            # called now): no coroutine and Deferred per submit and per finished dispatch.
            self._pump_again = True
        elif self.running:  # before start-up recovery nothing may be dispatched
            self._spawn(self._pump())

    def _tick(self) -> defer.Deferred[None]:
        return self._spawn(self._tick_async())

    async def _tick_async(self) -> None:
        now = self.clock.seconds()
        if self.instance is not None and now - self._last_takeover >= \
                self.settings.takeover_every:
            self._last_takeover = now
            await self._take_over(now)
        if now - self._last_scan >= self.settings.deadline_scan_every:
            self._last_scan = now
            await self._scan_deadlines(now)
        await self._pump()
        if (self.instance is None or self.instance.leading) \
                and now - self._last_orphan_purge >= self.settings.orphan_purge_every:
            self._last_orphan_purge = now
            await self.purge_orphans(now)

    async def purge_orphans(self, now: float) -> int:
        """Drop orphan done-requests past ``orphan_dones_ttl``, of every SA.

        Each new orphan already trims its own SA's; this catches the SAs that went quiet.
        """
        purged: int = await self.store.purge_orphan_dones(now - self.settings.orphan_dones_ttl)
        if purged:
            self._counter("done.orphan_expired", purged)
            log.info("push: dropped {n} done-request(s) no operation claimed within {ttl:g} s",
                     n=purged, ttl=self.settings.orphan_dones_ttl)
        return purged

    async def _pump(self) -> None:
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                room = self.settings.max_in_flight - len(self._in_flight)
                if room <= 0:
                    return
                now = self.clock.seconds()
                # Picked and moved to `sending` in one store call; the SAs being dispatched
                # to right now are skipped there (one at a time per SA), not fetched and
                # dropped here. What is claimed is ours: _dispatch sends or hands it back.
                busy = tuple(self._sending)
                claimed = await self.store.claim_dispatchable(now, room, busy=busy,
                                                              instance_id=self.instance_id)
                if not self._sending.issuperset(busy):
                    # An SA skipped as busy finished meanwhile: its next order may be due.
                    self._pump_again = True
                for op in claimed:
                    self._sending.add(op.distribution_id)
                    d = defer.ensureDeferred(self._dispatch(op, now))
                    self._in_flight.add(d)
                    d.addBoth(self._dispatched, op, d)
                if not self._pump_again:
                    return
        finally:
            self._pumping = False

    def _dispatched(self, result: Any, op: Operation, d: defer.Deferred[None]) -> None:
        self._in_flight.discard(d)
        self._sending.discard(op.distribution_id)
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("push: dispatch of {op} crashed", result, op=op.operation_id)
        self.wake()

    def _route(self, op: Operation, record: SARecord | None) -> tuple[Any, str | None,
                                                                       str | None]:
        """``(tunnel, None, None)`` or ``(None, url, None)`` to send ``op`` now; else
        ``(None, None, what it waits for)``: the SA is not reachable, so nothing is tried.

        Reachable: the order names its ``sa_url`` (the RS knows where); the SA holds a live
        tunnel (unless the order asks for https-simple); or the SA's https-simple push
        confirmation succeeded (``confirmed`` with an endpoint, and no confirmation since).
        """
        if op.sa_url:
            return None, op.sa_url, None
        if self.tunnels is not None and op.method != "https-simple":
            # A tunnel re-running its confirmation takes the request and sends it once
            # confirmed: parked instead, the order would wait for a tunnel_up that never comes.
            tunnel = self.tunnels.pick(op.distribution_id) or next(
                iter(self.tunnels.held(op.distribution_id)), None)
            if tunnel is not None:
                return tunnel, None, None
        if (op.method or (record.push_method if record else None)) == "https-tunnel":
            return None, None, WAIT_TUNNEL
        if record is not None and record.push_method == "https-simple" and record.confirmed \
                and record.push_endpoint:
            return None, record.push_endpoint, None
        return None, None, WAIT_CONFIRMATION

    async def _wait(self, op: Operation, waiting_for: str) -> None:
        """Hand a claimed head back, parked: its SA is not reachable, so nothing was tried
        (``attempts`` as before the claim). It is not claimed again (the store skips an SA
        whose head waits) until :meth:`_reachable` releases it, or it expires."""
        parked = await self.store.transition(
            op.operation_id, expect={SENDING}, state=QUEUED,
            changes={"waiting_for": waiting_for, "attempts": op.attempts - 1})
        if parked is None:
            return  # resolved meanwhile (a restart's recovery in another process)
        self.metrics.push_requeue(op.operation, "waiting")
        log.debug("push: {op} for {distid} waits for {what}", op=op.operation_id,
                  distid=op.distribution_id, what=waiting_for)
        # The SA may have become reachable between the look (a cached copy) and the park
        # (its release then found nothing to release): look again in the store, now that the
        # park is committed; a registry write after this read releases after the park. (A
        # read per park: parks are rare, and another proxy may have seen the SA confirm.)
        # A tunnel another instance holds counts: released, the order is that one's to claim.
        record = await self.sa_records.fresh(op.distribution_id)
        elsewhere = record is not None and record.tunnel_owner is not None \
            and record.tunnel_owner != self.instance_id
        if elsewhere or self._route(parked, record)[2] is None:
            await self._reachable(op.distribution_id)
            if elsewhere:
                self._announce("ops")

    async def _reachable(self, distid: str) -> None:
        """The SA confirmed or opened a tunnel: its queue is due now (waiting orders
        released, a retry delay cut short), without scanning any other SA's orders."""
        released = await self.store.release_waiting(distid, self.clock.seconds())
        if released:
            log.info("push: {distid} is reachable; {n} queued order(s) due now",
                     distid=distid, n=released)
        self.wake()

    async def _dispatch(self, op: Operation, claimed_at: float) -> None:
        """Carry out one claimed operation: ``sending``, this attempt already counted.

        An order whose deadline passed, or whose SA is not reachable, was never tried: it
        leaves ``sending`` with ``attempts`` as before the claim (expired, or parked)."""
        try:
            ready = await self._prepare(op, claimed_at)
        except defer.CancelledError:
            # Stopped before anything was sent: back to its queue, untried, rather than left
            # `sending` for the next start to resolve as interrupted (failed if not read-only).
            await self.store.transition(op.operation_id, expect={SENDING}, state=QUEUED,
                                        changes={"attempts": op.attempts - 1})
            raise
        if ready is not None:
            await self._send(op, *ready)

    async def _prepare(self, op: Operation, claimed_at: float) -> tuple[
            ops.OperationSpec, bytes, Any, str | None, str | None, SARecord | None] | None:
        """Everything before the request goes out: ``(spec, body, tunnel, url, key, record)``
        to send it now, or None when the operation was finished or parked instead. Nothing
        is sent here, so a stop in between may hand the claim back."""
        if op.expires_at is not None and op.expires_at <= claimed_at:
            await self._finish(op, {SENDING}, EXPIRED,
                               "the order's deadline passed before dispatch",
                               changes={"attempts": op.attempts - 1})
            return None
        record = await self.sa_records.get(op.distribution_id)  # no store call if known
        tunnel, url, waiting_for = self._route(op, record)
        if waiting_for is not None:  # not a try
            await self._wait(op, waiting_for)
            return None
        spec = ops.OPERATIONS[op.operation]
        try:
            # result-url travels in every 2-way start, over a tunnel too: harmless there, and
            # it keeps the SA's (global) value pointing at us (§7.0.3).
            body = ops.build_request(op.operation, op.distribution_id, op.params,
                                     result_url=self.settings.result_url if spec.two_way
                                     else None)
        except (UnsafeMessageError, ops.OrderError) as e:
            await self._finish(op, {SENDING}, FAILED, f"cannot build the request: {e}")
            return None
        key = None
        if tunnel is None:
            key = await self.keys.sa_key(op.distribution_id)
            if key is None:
                await self._finish(op, {SENDING}, FAILED, "the RS does not know this device")
                return None
        else:
            # Last, so that nothing comes between this and the request: see done_request.
            while op.distribution_id in self._answering:
                await self._answered(op.distribution_id)
        return spec, body, tunnel, url, key, record

    async def _send(self, op: Operation, spec: ops.OperationSpec, body: bytes, tunnel: Any,
                    url: str | None, key: str | None, record: SARecord | None) -> None:
        """One attempt: the request goes out (no await before it), the answer is recorded."""
        now = self.clock.seconds()
        try:
            if tunnel is not None:
                answer = await self._attempt(op.operation, "https-tunnel", tunnel.request(
                    body, timeout=self.settings.tunnel_answer_timeout))
                status, xml, via = None, answer.body, f"tunnel {tunnel.id}"
                parsed = answer.response
            else:
                assert url is not None and key is not None
                pushed = await self._attempt(op.operation, "https-simple", self.client.push(
                    url, distribution_id=op.distribution_id, key=key, body=body,
                    pinned_certificate_pem=record.sa_certificate if record else None,
                ))
                status, xml, via = pushed.status, pushed.xml, url
                parsed = None
        except (PushError, TunnelError) as e:
            if e.request_sent and spec.side_effects:
                await self._finish(op, {SENDING}, FAILED,
                                   f"{e.reason}; the request was sent, so it may have run: "
                                   "not re-sent")
            else:
                await self._retry(op, e.reason)
            return
        raw_start = {"kind": "start", "at": now, "via": via, "request": body.decode("ascii"),
                     "answer": xml.decode("ascii", "replace")}
        if status is not None:
            raw_start["status"] = status
        outcome = ops.decode_start_answer(op.operation, status, xml, parsed)
        await self._start_answered(op, spec, outcome, raw_start)

    def _answered(self, distid: str) -> defer.Deferred[None]:
        """Fires a reactor turn after the SA's done-request in progress was answered."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._answer_waiters.setdefault(distid, []).append(waiter)
        return waiter

    async def _start_answered(self, op: Operation, spec: ops.OperationSpec,
                              outcome: ops.StartOutcome, raw_start: dict[str, Any]) -> None:
        if outcome.retryable:
            if await self.store.transition(
                op.operation_id, expect={SENDING}, state=QUEUED, raw=raw_start,
                changes={"not_before": self.clock.seconds() + self.settings.busy_delay,
                         "last_error": outcome.error or f"SA busy ({outcome.result_code})",
                         "start_result_code": outcome.result_code},
            ) is not None:
                self.metrics.push_requeue(op.operation, "busy")
            return
        if not spec.two_way or not outcome.accepted or outcome.transaction_id is None:
            ok = outcome.accepted and codes.is_success(outcome.result_code)
            await self._finish(
                op, {SENDING}, SUCCEEDED if ok else FAILED, outcome.error, raw=raw_start,
                changes={"start_result_code": outcome.result_code,
                         "result_code": outcome.result_code, "result": outcome.result},
            )
            return
        async with self._lock(op.distribution_id):
            started = await self.store.transition(
                op.operation_id, expect={SENDING}, state=STARTED, raw=raw_start,
                changes={"sa_transaction_id": outcome.transaction_id,
                         "start_result_code": outcome.result_code,
                         "done_deadline": self.clock.seconds() + self.settings.done_timeout},
                events=[_event("operation.started", op,
                               sa_transaction_id=outcome.transaction_id)],
            )
            self.on_events()
            if started is None:
                return
            await self._apply_orphans(started, outcome.transaction_id)

    async def _apply_orphans(self, started: Operation, tid: int) -> None:
        """Apply the done-requests of ``started``'s SA transaction that came first."""
        for orphan in await self.store.take_orphan_dones(started.distribution_id, tid):
            if orphan.xml:
                await self._apply_orphan(started, orphan.xml)
            else:  # answered 100, so the SA will not send it again: the result is lost
                await self._finish(
                    started, {STARTED}, FAILED,
                    f"the {orphan.type} ({orphan.size} bytes) came before the start "
                    f"answer and was larger than orphan_done_max_bytes "
                    f"({self.settings.orphan_done_max_bytes}): answered, not kept")
            started = await self.store.get(started.operation_id) or started

    # -- tunnels ----------------------------------------------------------------------------
    def tunnel_up(self, tunnel: Any) -> None:
        self._spawn(self._tunnel_changed(tunnel, "sa.tunnel_up", None))

    def tunnel_down(self, tunnel: Any, reason: str) -> None:
        self._spawn(self._tunnel_changed(tunnel, "sa.tunnel_down", reason))

    async def _tunnel_changed(self, tunnel: Any, kind: str, reason: str | None) -> None:
        """Registry and RS learn which tunnels an SA holds; queued orders may now go.

        The SA record keeps the live tunnels and the last few closed ones (when and why),
        which is what ``sa.status`` shows. With an instance, the record also says which
        instance holds the SA's tunnel (``tunnel_owner``: only it claims the SA's orders):
        this one while it holds any, released (unless another instance has taken it
        meanwhile) when its last one closes.
        """
        distid = tunnel.distid
        now = self.clock.seconds()
        live = [t.info() for t in self.tunnels.live(distid)] if self.tunnels else []
        record = await self.sa_records.get(distid)
        closed = [t for t in (record.tunnels if record else []) if t.get("closed_at")]
        if kind == "sa.tunnel_down":
            closed.append({**tunnel.info(), "closed_at": now, "close_reason": reason or ""})
        fields: dict[str, Any] = {"tunnels": live + closed[-TUNNEL_HISTORY:]}
        if kind == "sa.tunnel_up":
            fields.update(push_method="https-tunnel", confirmed=True,
                          last_confirmation_at=now, last_peer=tunnel.peer)
        release = None
        if self.instance_id is not None:
            if kind == "sa.tunnel_up" or live:
                fields["tunnel_owner"] = self.instance_id
            else:
                release = self.instance_id
        # sa.tunnel_down always says why ("" if nobody said); sa.tunnel_up has no reason.
        event = new_event(kind, distid, tunnel_id=tunnel.id, peer=tunnel.peer,
                          path=tunnel.path, tunnels=len(live),
                          reason=(reason or "") if kind == "sa.tunnel_down" else None)
        await self.sa_records.update(distid, **fields, events=[event], release_tunnel=release)
        self.on_events()
        if kind == "sa.tunnel_up":
            await self._reachable(distid)

    async def _retry(self, op: Operation, reason: str) -> None:
        if op.attempts >= self.settings.max_attempts:
            await self._finish(op, {SENDING}, FAILED,
                               f"gave up after {op.attempts} attempts: {reason}")
            return
        delay = min(self.settings.retry_cap,
                    self.settings.retry_base * 2 ** max(op.attempts - 1, 0))
        delay *= 0.8 + 0.4 * random.random()  # spread retries of many SAs
        log.debug("push: {op} to {distid} not delivered ({reason}); retry in {d:.0f} s",
                  op=op.operation_id, distid=op.distribution_id, reason=reason, d=delay)
        if await self.store.transition(
            op.operation_id, expect={SENDING}, state=QUEUED,
            changes={"not_before": self.clock.seconds() + delay, "last_error": reason},
        ) is not None:
            self.metrics.push_requeue(op.operation, "retry")

    async def _attempt(self, operation: str, method: str, sending: Awaitable[Any]) -> Any:
        """Await one push attempt, timed into ``armsproxy_push_duration_seconds``: the
        device's latency (the key lookup before it is the RS's, timed apart)."""
        started = self.clock.seconds()
        try:
            answer = await sending
        except (PushError, TunnelError) as e:
            self.metrics.push_attempt(operation, method, e, self.clock.seconds() - started)
            raise
        self.metrics.push_attempt(operation, method, None, self.clock.seconds() - started)
        return answer

    async def _finish(self, op: Operation, expect: set[str], state: str, error: str | None,
                      *, raw: dict[str, Any] | None = None,
                      changes: dict[str, Any] | None = None) -> Operation | None:
        all_changes = dict(changes or {})
        if error is None and state in (FAILED, EXPIRED):  # the RS is always told why
            code = all_changes.get("result_code")
            error = "no reason recorded" if code is None else f"result code {code}"
        if error is not None:
            all_changes["last_error"] = error
        done = await self.store.transition(
            op.operation_id, expect=expect, state=state, changes=all_changes, raw=raw,
            events=[_event(f"operation.{state}", op, error=error,
                           result_code=all_changes.get("result_code"),
                           transaction_result=all_changes.get("transaction_result"))],
        )
        if done is not None:
            self.on_events()
            self.metrics.push_final(op.operation, state, all_changes.get("result_code"))
            # A success is counted (armsproxy_push_operations_total), not logged above debug;
            # a failure, expiry or give-up is what an operator must see.
            (log.debug if state == SUCCEEDED else log.warn)(
                "push: {op} {operation} for {distid} {state}{why}", op=op.operation_id,
                operation=op.operation, distid=op.distribution_id, state=state,
                why=f": {error}" if error else "")
        return done

    # -- deadlines and restart ----------------------------------------------------------------
    async def _scan_deadlines(self, now: float) -> None:
        for op in await self.store.in_states({SENDING}):
            if op.claimed_by is not None and op.claimed_by != self.instance_id:
                continue  # another instance's: its own scan, or a take-over if it died
            # A dispatch that crashed (e.g. the store failed mid-way) leaves "sending" behind;
            # resolve it like an interrupted one once it is clearly not in flight any more.
            if op.distribution_id not in self._sending and now - op.updated_at > 60:
                await self._resolve_interrupted(op, now)
        # A page at a time (memory stays flat when many deadlines pass at once): each due
        # operation leaves its due state here, so the next page holds the next ones. A page
        # that changes nothing (all changed meanwhile) ends the scan rather than repeat it.
        while True:
            due = await self.store.past_deadline(now, limit=DEADLINE_PAGE)
            finished = [await self._past_deadline(op) for op in due]
            if len(due) < DEADLINE_PAGE or not any(finished):
                return

    async def _past_deadline(self, op: Operation) -> Operation | None:
        """Finish one operation found past its deadline, saying why; None if it changed
        state meanwhile (the scan then knows the page made no progress)."""
        if op.state == QUEUED and op.waiting_for is not None:
            return await self._finish(op, {QUEUED}, EXPIRED, (
                "the SA never became reachable" if op.attempts == 0 else
                f"the SA did not become reachable again after {op.attempts} "
                "attempt(s)") + f" before the order's deadline (waiting for "
                f"{op.waiting_for})")
        if op.state == QUEUED:
            return await self._finish(op, {QUEUED}, EXPIRED,
                                      "the order's deadline passed before dispatch")
        if op.sa_transaction_id is None:  # started
            return await self._finish(op, {STARTED}, FAILED,
                                      "interrupted: armsproxy stopped while sending, and no "
                                      "done-request showed the operation running")
        return await self._finish(op, {STARTED}, EXPIRED,
                                  "no done-request from the SA before the deadline")

    async def recover(self) -> None:
        """Resolve operations a previous process left ``sending`` (design.md §5).

        Orders left waiting stay waiting (the stored confirmation counts across a restart;
        tunnels do not survive one), unless their SA is reachable now: a process stopped
        between a confirmation and its release leaves such a one behind.

        With an instance on a shared store, "a previous process" is any instance whose
        lease expired or that retired; the same take-over runs every ``takeover_every``
        seconds after (:meth:`_take_over`).
        """
        now = self.clock.seconds()
        self._last_takeover = now
        await self._take_over(now)
        for op in await self.store.waiting():
            if self._route(op, await self.sa_records.get(op.distribution_id))[2] is None:
                await self.store.release_waiting(op.distribution_id, now)

    async def _take_over(self, now: float) -> None:
        """Resolve what dead instances left ``sending`` (claimed by this one first, so no
        other survivor resolves it too); at start-up, what the previous process left."""
        for op in await self.store.take_over(self.instance_id, now):
            await self._resolve_interrupted(op, now)

    def _lease_regained(self) -> None:
        """The lease had expired (a survivor took this instance over and released its
        tunnels): the tunnels it still holds are its own again, their SAs' orders due."""
        if self.tunnels is None or self.instance_id is None:
            return
        for distid in self.tunnels.distids():
            self._spawn(self._own_tunnel(distid))

    async def _own_tunnel(self, distid: str) -> None:
        if self.tunnels is not None and self.tunnels.live(distid):
            await self.sa_records.update(distid, tunnel_owner=self.instance_id)
            await self._reachable(distid)

    async def _resolve_interrupted(self, op: Operation, now: float) -> None:
        spec = ops.OPERATIONS[op.operation]
        if not spec.side_effects:
            await self.store.transition(
                op.operation_id, expect={SENDING}, state=QUEUED,
                changes={"not_before": now, "last_error": "interrupted; re-sent"},
            )
            self.metrics.push_requeue(op.operation, "interrupted")
            log.info("push: {op} interrupted; re-sending (read-only)", op=op.operation_id)
        elif spec.two_way:
            await self.store.transition(
                op.operation_id, expect={SENDING}, state=STARTED,
                changes={"done_deadline": now + self.settings.interrupted_grace,
                         "last_error": "interrupted; waiting for a done-request as "
                                       "evidence that it ran"},
            )
        else:
            await self._finish(op, {SENDING}, FAILED,
                               "interrupted: armsproxy stopped while sending; it may or "
                               "may not have run, so it is not re-sent")

    # -- hooks from the SA gate ---------------------------------------------------------------
    def config_relayed(self, distid: str, sa_certificate: str | None, peer: str) -> None:
        """A pull was answered: record when, from where, and the SA's certificate.

        Written at once when the certificate (pushes pin it) or the peer's host changed, or
        when the recorded ``last_pull_at`` is ``pull_record_interval`` (60 s) old or more;
        otherwise not at all, so that frequent pulls cost no store write. ``sa.status`` then
        shows a ``last_pull_at`` (and the peer's port) at most that stale. An SA the engine
        has no record of in memory (first pull, or evicted) is always written.
        """
        now = self.clock.seconds()
        known = self.sa_records.peek(distid)
        if known is not None and known.last_pull_at is not None \
                and 0 <= now - known.last_pull_at < self.settings.pull_record_interval \
                and _host(known.last_peer) == _host(peer) \
                and (not sa_certificate or sa_certificate == known.sa_certificate):
            return
        fields: dict[str, Any] = {"last_pull_at": now, "last_peer": peer}
        if sa_certificate:
            fields["sa_certificate"] = sa_certificate
        self._spawn(self.sa_records.update(distid, **fields))

    def confirmation_started(self, distid: str, method: str, push_endpoint: str | None,
                             confirmation_id: int, peer: str) -> None:
        if method != "https-simple" or not push_endpoint:
            self._spawn(self.sa_records.update(distid, push_method=method, last_peer=peer))
            return
        url = push_endpoint
        if self.settings.endpoint_from_peer:
            from urllib.parse import urlsplit

            host = peer.rsplit(":", 1)[0]
            port = urlsplit(push_endpoint).port or 10443
            url = f"https://{f'[{host}]' if ':' in host else host}:{port}/"
        self._spawn(self._confirm(distid, url, confirmation_id, peer))

    async def _confirm(self, distid: str, url: str, confirmation_id: int, peer: str) -> None:
        """Send push-confirmation-done within the SA's 60 s window (§7.2), retrying."""
        started = self.clock.seconds()
        await self.sa_records.update(distid, push_method="https-simple", push_endpoint=url,
                                     last_peer=peer, confirmed=False)
        body = ops.build_confirmation_done(distid, confirmation_id)
        last = "not tried"
        while self.clock.seconds() - started < self.settings.confirmation_window:
            key = await self.keys.sa_key(distid)
            record = await self.sa_records.get(distid)
            if key is None:
                last = "the RS does not know this device"
                break
            try:
                pushing = self.client.push(
                    url, distribution_id=distid, key=key, body=body,
                    pinned_certificate_pem=record.sa_certificate if record else None)
                answer = await self._attempt("push-confirmation-done", "https-simple", pushing)
                message = parse_message(answer.xml) if answer.xml else None
            except (PushError, MessageError) as e:
                last = getattr(e, "reason", str(e))
            else:
                if isinstance(message, ArmsResponse) and codes.is_success(message.result_code):
                    now = self.clock.seconds()
                    await self.sa_records.update(
                        distid, confirmed=True, last_confirmation_at=now, events=[new_event(
                            "sa.confirmed", distid, method="https-simple",
                            push_endpoint=url)])
                    self.on_events()
                    log.info("push: {distid} confirmed https-simple at {url}", distid=distid,
                             url=url)
                    await self._reachable(distid)
                    return
                last = (f"SA answered {message.result_code}"
                        if isinstance(message, ArmsResponse)
                        else f"unusable answer (HTTP {answer.status})")
            await task.deferLater(self.clock, self.settings.confirmation_retry, lambda: None)
        log.warn("push: push-confirmation-done to {distid} at {url} failed: {why}",
                 distid=distid, url=url, why=last)
        await self.store.add_events([new_event(
            "sa.confirmation_failed", distid, method="https-simple", push_endpoint=url,
            error=last)])
        self.on_events()

    async def done_request(self, request: ArmsRequest, raw: bytes, peer: str) -> int:
        """Commit a ``*-done`` request, then let the gate answer 100 (design.md §5).

        Raises if it cannot be committed: the gate then does not answer, and the SA keeps
        the transaction (a configure-done is re-sent; an error code would roll it back).

        Until it returns (and the gate writes the answer, in the same callback), nothing new
        is sent to its SA over a tunnel: a request written meanwhile would overtake the
        answer on the tunnel, and one such as configure makes the SA drop the tunnel, the
        answer unread. (https-simple pushes use connections of their own.)
        """
        distid = request.distribution_id or ""
        self._answering[distid] += 1
        try:
            return await self._done_request(distid, request, raw)
        finally:
            self._answering[distid] -= 1
            if not self._answering[distid]:
                del self._answering[distid]
                waiters = self._answer_waiters.pop(distid, None)
                if waiters:  # after the gate's answer, written when this returns
                    self.clock.callLater(0, _fire, waiters)

    async def _done_request(self, distid: str, request: ArmsRequest, raw: bytes) -> int:
        tid = request.transaction_id
        xml = raw.decode("ascii", "replace")
        if tid is None:
            log.error("push: {type} from {distid} without transaction-id; stored as orphan",
                      type=request.type, distid=distid)
            await self._keep_orphan(distid, -1, request.type, raw)
            return codes.SUCCESS
        async with self._lock(distid):
            op = await self.store.find_by_sa_transaction(distid, tid)
            if op is None:
                op = await self._adoptable(distid, base_type(request.type))
            if op is None:
                await self._keep_orphan(distid, tid, request.type, raw)
                # Routine for 2-way operations (the done overtakes the start answer);
                # counted in done.orphan.
                log.debug("push: {type} {tid} from {distid} before its start answer (or "
                          "for an operation not started here); kept for reconciliation",
                          type=request.type, tid=tid, distid=distid)
                if getattr(self.store, "shared", False):
                    # Another instance may have recorded the start answer after our look and
                    # taken the orphans before ours was committed (the lock above is this
                    # process's only): look again, now that it is.
                    op = await self.store.find_by_sa_transaction(distid, tid)
                    if op is not None:
                        await self._apply_orphans(op, tid)
                return codes.SUCCESS
            await self._apply_done(op, request, xml)
            return codes.SUCCESS

    async def _keep_orphan(self, distid: str, tid: int, type_: str, raw: bytes) -> None:
        """Store a done-request nothing claims yet, within the per-SA bounds.

        It is answered 100 whatever happens here (else the SA re-sends it for ever), so the
        bounds decide only what is kept: the newest ``orphan_dones_max_per_sa`` of the SA,
        none older than ``orphan_dones_ttl``, and of one larger than ``orphan_done_max_bytes``
        only that it came (its operation then fails saying so, instead of expiring).
        """
        s = self.settings
        now = self.clock.seconds()
        xml = raw.decode("ascii", "replace")
        if len(raw) > s.orphan_done_max_bytes:
            self._counter("done.orphan_too_large", 1)
            log.warn("push: {type} {tid} from {distid} ({n} bytes) claimed by no operation "
                     "yet and over orphan_done_max_bytes ({max}): recorded, XML not kept",
                     type=type_, tid=tid, distid=distid, n=len(raw), max=s.orphan_done_max_bytes)
            xml = ""
        _, dropped = await self.store.add_orphan_done(
            distid, tid, type_, xml, now, size=len(raw), keep=s.orphan_dones_max_per_sa,
            drop_before=now - s.orphan_dones_ttl)
        self._counter("done.orphan", 1)
        if dropped:
            self._counter("done.orphan_dropped", dropped)
            log.warn("push: {distid} has more than {max} unclaimed done-requests (or ones "
                     "older than {ttl:g} s): dropped the {n} oldest", distid=distid,
                     max=s.orphan_dones_max_per_sa, ttl=s.orphan_dones_ttl, n=dropped)

    async def _adoptable(self, distid: str, base: str) -> Operation | None:
        for op in await self.store.list_operations(distribution_id=distid, states=[STARTED]):
            if op.sa_transaction_id is None and op.operation == base:
                return op
        return None

    async def _apply_orphan(self, op: Operation, xml: str) -> None:
        try:
            message = parse_message(xml.encode("ascii", "replace"))
        except MessageError as e:
            log.error("push: stored done for {op} unreadable: {e}", op=op.operation_id, e=e)
            return
        if isinstance(message, ArmsRequest):
            await self._apply_done(op, message, xml)

    async def _apply_done(self, op: Operation, message: ArmsRequest, xml: str) -> None:
        now = self.clock.seconds()
        raw = {"kind": "done", "at": now, "request": xml}
        try:
            outcome = ops.decode_done(op.operation, message)
        except ops.DoneError as e:
            await self._finish(op, {STARTED, EXPIRED}, FAILED, f"unreadable done: {e}",
                               raw=raw)
            return
        result = dict(outcome.result)
        dones = list((op.result or {}).get("dones", []))
        dones.append({"transaction_result": outcome.transaction_result, "at": now})
        result["dones"] = dones
        if op.state in (STARTED, EXPIRED):
            ok = ops.done_succeeded(op.operation, outcome.transaction_result)
            await self._finish(
                op, {STARTED, EXPIRED}, SUCCEEDED if ok else FAILED,
                None if ok else f"transaction-result {outcome.transaction_result} "
                                f"({codes.label(outcome.transaction_result)})",
                raw=raw,
                changes={"transaction_result": outcome.transaction_result,
                         "result_code": outcome.transaction_result, "result": result,
                         "sa_transaction_id": message.transaction_id},
            )
        elif op.state in FINAL:
            # A second done for a finished transaction (e.g. configure rolled back: 414).
            ok = ops.done_succeeded(op.operation, outcome.transaction_result)
            state = op.state if ok or op.state == FAILED else FAILED
            changes: dict[str, Any] = {"transaction_result": outcome.transaction_result,
                                       "result": result}
            if state != op.state:  # now failed: result_code is the failing done's, as above
                changes["result_code"] = outcome.transaction_result
            await self.store.transition(
                op.operation_id, expect={op.state}, state=state, raw=raw, changes=changes,
                events=[] if state == op.state else [_event(
                    "operation.failed", op, transaction_result=outcome.transaction_result,
                    result_code=outcome.transaction_result,
                    error="a later done-request reported a failure")],
            )
            self.on_events()
