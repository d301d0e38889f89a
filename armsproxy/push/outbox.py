"""Delivers the event outbox to the RS, at least once, in commit order.

Events are committed with the state change they describe (the store's ``transition``), so
delivery can lag, repeat after a crash, or wait out an RS outage without losing anything.
Up to ``batch`` events go in one ``arms.events`` call, oldest first, and are marked delivered
together once it returns: a fault or failure means none of them count as delivered, so the
whole batch goes again (the RS drops repeats by ``seq``). An RS without ``arms.events`` gets
``arms.event``, one event per call, in the same order (as fast as one HTTP round trip per
event allows); it is asked again after ``reprobe`` seconds and at every start. One batch at
a time, never overlapping: that keeps events of an operation in order. An RS that refuses
(fault) or is down is retried with capped backoff; the queue waits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..rs_client import RSError, RSFault, RSProtocolError, RSTimeout
from ..store.model import Event
from .operations import to_xmlrpc

log = Logger()


class EventSink(Protocol):
    async def event(self, event: dict[str, Any]) -> None: ...

    async def events(self, events: list[dict[str, Any]]) -> None: ...


#: Faults that say "no such method": JSON-RPC/XML-RPC's -32601 (the spec for fault codes many
#: servers follow), Twisted's ``xmlrpc.NOT_FOUND`` (8001).
METHOD_NOT_FOUND_FAULTS = frozenset({-32601, 8001})
# ... or a fault message that says so, whatever the code (Python's SimpleXMLRPCServer: fault 1,
# 'method "arms.events" is not supported'; Apache XML-RPC: 'No such handler: arms.events').
_UNKNOWN_METHOD = re.compile(
    r"(method|procedure|handler|function)\b.{0,60}\b(not (found|supported|implemented|"
    r"defined|available|registered)|does not exist)"
    r"|(unknown|unsupported|undefined|no such) (method|procedure|handler|function)",
    re.IGNORECASE,
)


def lacks_method(error: RSError) -> bool:
    """Does ``error`` say the RS has no such method (rather than that this call failed)?

    Erring towards yes only costs speed (one event per call until the next probe); towards no,
    an RS without ``arms.events`` would get nothing at all.
    """
    if isinstance(error, RSFault):
        return error.code in METHOD_NOT_FOUND_FAULTS or bool(_UNKNOWN_METHOD.search(error.message))
    # RSClient's wording for a non-200 answer; 501 Not Implemented is HTTP's "no such method".
    return isinstance(error, RSProtocolError) and str(error).startswith("HTTP status 501")


def _backoff(base: float, cap: float, attempts: int) -> float:
    return min(cap, base * 2 ** min(attempts, 10))


# -- the arms.event contract (README "The RS interface"; tests/test_docs.py compares) -------

#: Members of every ``arms.event`` struct, whatever its kind (added by :func:`event_struct`).
EVENT_ENVELOPE: tuple[str, ...] = ("seq", "kind", "distribution_id", "at")


@dataclass(frozen=True, slots=True)
class EventMembers:
    """The members one kind of event carries besides the envelope.

    ``always`` are in every event of the kind; ``sometimes`` only when they have a value (the
    README says when). XML-RPC has no nil, so a member without a value is left out, never
    sent empty: the RS tells "no value" from "0" by presence.
    """

    always: tuple[str, ...]
    sometimes: tuple[str, ...] = ()


_OPERATION = ("operation_id", "state", "operation", "request_id")

#: Every event kind armsproxy emits, and its members: the one place that says so.
EVENT_MEMBERS: dict[str, EventMembers] = {
    "operation.started": EventMembers((*_OPERATION, "sa_transaction_id")),
    "operation.succeeded": EventMembers((*_OPERATION, "result_code"),
                                        ("transaction_result",)),
    "operation.failed": EventMembers((*_OPERATION, "error"),
                                     ("result_code", "transaction_result")),
    "operation.expired": EventMembers((*_OPERATION, "error")),
    "operation.cancelled": EventMembers(_OPERATION),
    "sa.confirmed": EventMembers(("method", "push_endpoint")),
    "sa.confirmation_failed": EventMembers(("method", "push_endpoint", "error")),
    "sa.tunnel_up": EventMembers(("tunnel_id", "peer", "path", "tunnels")),
    "sa.tunnel_down": EventMembers(("tunnel_id", "peer", "path", "tunnels", "reason")),
}


#: Per kind: the members always present, and every member allowed (checked per event).
_DECLARED: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    kind: (frozenset(m.always), frozenset(m.always) | frozenset(m.sometimes))
    for kind, m in EVENT_MEMBERS.items()
}


def new_event(kind: str, distribution_id: str, operation_id: str | None = None,
              **payload: Any) -> dict[str, Any]:
    """An event for the store's outbox, held to :data:`EVENT_MEMBERS`.

    Members whose value is None are left out. A kind or member the declaration does not
    list, or a missing ``always`` member, raises ValueError: that is a bug here, caught by the
    tests, and the RS contract in the README never silently drifts from what is sent.
    """
    declared = _DECLARED.get(kind)
    if declared is None:
        raise ValueError(f"undeclared event kind {kind!r}")
    always, allowed = declared
    body = {k: v for k, v in payload.items() if v is not None}
    # operation_id travels in the outbox row, not in the payload; event_struct puts it back.
    present = body.keys() | ({"operation_id"} if operation_id is not None else set())
    if not always <= present <= allowed:
        unknown = present - allowed
        missing = always - present
        raise ValueError(f"{kind} event: undeclared member(s) {sorted(unknown)}, "
                         f"missing {sorted(missing)}")
    return {"kind": kind, "distribution_id": distribution_id, "operation_id": operation_id,
            "payload": body}


def event_struct(event: Event) -> dict[str, Any]:
    """What ``arms.event`` receives: the envelope, then the event's own members."""
    struct: dict[str, Any] = {
        "seq": event.seq, "kind": event.kind, "distribution_id": event.distribution_id,
        "at": event.created_at,
    }
    if event.operation_id:
        struct["operation_id"] = event.operation_id
    for key, value in event.payload.items():
        struct.setdefault(key, value)
    return to_xmlrpc(struct)


class EventOutbox(service.Service):
    """Delivers the store's outbox to ``rs``: ``batch`` events per call (1..1000), polling
    every ``poll`` seconds and woken by :meth:`kick` when new events are committed."""

    def __init__(self, store: Any, rs: EventSink, clock: IReactorTime, *,
                 poll: float = 5.0, retry_base: float = 1.0, retry_cap: float = 60.0,
                 batch: int = 100, reprobe: float = 3600.0) -> None:
        if not 1 <= batch <= 1000:
            raise ValueError("batch: 1..1000 events")
        self.store = store
        self.rs = rs
        self.clock = clock
        self.poll = poll
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.batch = batch
        self.reprobe = reprobe
        self.delivered = 0
        self.failures = 0
        #: RS calls that delivered events (one per batch, or one per event without arms.events)
        self.calls = 0
        #: While set, the RS lacks ``arms.events``: one event per call until this clock time.
        self.single_until: float | None = None
        self._fallback_logged = False
        # Halved after a batch timed out or was too large for the RS (413), so that a slow RS
        # still drains the queue; grown back towards ``batch`` by a tenth per delivered batch.
        self._limit = batch
        self._timer: IDelayedCall | None = None
        self._running_pass: defer.Deferred[None] | None = None
        self._kicked = False

    def startService(self) -> None:
        super().startService()
        self.kick()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return self._running_pass

    def kick(self) -> None:
        """New events were committed: deliver soon."""
        if not self.running:
            return
        if self._running_pass is not None:
            self._kicked = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = defer.ensureDeferred(self._deliver())
        self._running_pass = d
        d.addErrback(lambda f: log.failure("event outbox: delivery pass failed", f))
        d.addBoth(self._pass_done)

    def _pass_done(self, delay: float | None) -> None:
        self._running_pass = None
        if not self.running:
            return
        if self._kicked and delay is None:
            self._kicked = False
            self.kick()
            return
        self._kicked = False
        self._timer = self.clock.callLater(self.poll if delay is None else delay, self.kick)

    def _batched(self) -> bool:
        """Try ``arms.events`` now? Not while the RS is known to lack it, until the re-probe."""
        if self.single_until is None:
            return True
        if self.clock.seconds() < self.single_until:
            return False
        self.single_until = None
        return True

    async def _deliver(self) -> float | None:
        """Deliver what is pending; return a retry delay after a failure, else None."""
        while self.running:
            events = await self.store.pending_events(self._limit if self._batched()
                                                     else self.batch)
            if not events:
                return None
            if self.single_until is None:
                try:
                    await self.rs.events([event_struct(event) for event in events])
                except RSError as e:
                    if not lacks_method(e):
                        return await self._failed(events[0], e, len(events))
                    self._fall_back(e)  # and deliver this very batch one by one, below
                else:
                    self.calls += 1
                    # Marked delivered once per batch: a crash in between only means the
                    # batch is delivered again, which at-least-once allows.
                    await self.store.mark_delivered([event.seq for event in events])
                    self.delivered += len(events)
                    self._limit = min(self.batch, self._limit + max(1, self._limit // 10))
                    if self._fallback_logged:
                        log.info("event outbox: the RS now takes arms.events; batches again")
                        self._fallback_logged = False
                    continue
            delay = await self._deliver_singly(events)
            if delay is not None:
                return delay
        return None

    async def _deliver_singly(self, events: list[Event]) -> float | None:
        """``arms.event`` per event, in order, for an RS without ``arms.events``."""
        delivered: list[int] = []
        try:
            for event in events:
                try:
                    await self.rs.event(event_struct(event))
                except RSError as e:
                    return await self._failed(event, e, 1)
                self.calls += 1
                delivered.append(event.seq)
                self.delivered += 1
        finally:
            if delivered:
                await self.store.mark_delivered(delivered)
        return None

    def _fall_back(self, error: RSError) -> None:
        self.single_until = self.clock.seconds() + self.reprobe
        if self._fallback_logged:  # once per process and RS, not once per re-probe
            return
        self._fallback_logged = True
        log.warn("event outbox: the RS has no arms.events ({e}); delivering one event per "
                 "arms.event call (slower), asking again every {s:.0f} s", e=str(error),
                 s=self.reprobe)

    async def _failed(self, head: Event, error: RSError, count: int) -> float:
        """A call failed: nothing of it is delivered; the queue waits, then tries again."""
        self.failures += 1
        await self.store.note_event_attempt(head.seq)
        if count > 1 and (isinstance(error, RSTimeout) or
                          str(error).startswith("HTTP status 413")):
            self._limit = max(1, count // 2)
        delay = _backoff(self.retry_base, self.retry_cap, head.attempts)
        log.warn("event outbox: {n} event(s) from {kind} #{seq} not delivered ({e!r}); retry "
                 "in {d:.0f} s", n=count, kind=head.kind, seq=head.seq, e=error, d=delay)
        return delay
