"""Delivers the event outbox to the RS (``arms.event``), at least once, in commit order.

Events are committed with the state change they describe (the store's ``transition``), so
delivery can lag, repeat after a crash, or wait out an RS outage without losing anything.
One event at a time, in sequence order: that keeps events of an operation in order. An RS
that refuses an event (fault) or is down is retried with capped backoff; the queue waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..rs_client import RSError
from ..store.model import Event
from .operations import to_xmlrpc

log = Logger()


class EventSink(Protocol):
    async def event(self, event: dict[str, Any]) -> None: ...


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


def new_event(kind: str, distribution_id: str, operation_id: str | None = None,
              **payload: Any) -> dict[str, Any]:
    """An event for the store's outbox, held to :data:`EVENT_MEMBERS`.

    Members whose value is None are left out. A kind or member the declaration does not
    list, or a missing ``always`` member, raises ValueError: that is a bug here, caught by the
    tests, and the RS contract in the README never silently drifts from what is sent.
    """
    members = EVENT_MEMBERS.get(kind)
    if members is None:
        raise ValueError(f"undeclared event kind {kind!r}")
    body = {k: v for k, v in payload.items() if v is not None}
    # operation_id travels in the outbox row, not in the payload; event_struct puts it back.
    present = set(body) | ({"operation_id"} if operation_id is not None else set())
    unknown = present - set(members.always) - set(members.sometimes)
    missing = set(members.always) - present
    if unknown or missing:
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
    def __init__(self, store: Any, rs: EventSink, clock: IReactorTime, *,
                 poll: float = 5.0, retry_base: float = 1.0, retry_cap: float = 60.0,
                 batch: int = 100) -> None:
        self.store = store
        self.rs = rs
        self.clock = clock
        self.poll = poll
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.batch = batch
        self.delivered = 0
        self.failures = 0
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

    async def _deliver(self) -> float | None:
        """Deliver what is pending; return a retry delay after a failure, else None."""
        while self.running:
            events = await self.store.pending_events(self.batch)
            if not events:
                return None
            # Marked delivered once per batch, not per event: a crash in between only means
            # those events are delivered again, which at-least-once allows.
            delivered: list[int] = []
            try:
                for event in events:
                    try:
                        await self.rs.event(event_struct(event))
                    except RSError as e:
                        self.failures += 1
                        await self.store.note_event_attempt(event.seq)
                        delay = min(self.retry_cap,
                                    self.retry_base * 2 ** min(event.attempts, 10))
                        log.warn("event outbox: {kind} #{seq} not delivered ({e!r}); retry in "
                                 "{d:.0f} s", kind=event.kind, seq=event.seq, e=e, d=delay)
                        return delay
                    delivered.append(event.seq)
                    self.delivered += 1
            finally:
                if delivered:
                    await self.store.mark_delivered(delivered)
        return None
