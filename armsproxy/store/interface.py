"""The contract between the engine/gates and any durable backend (SQLite now, PostgreSQL later).

Every method is a coroutine: a backend does its I/O off the reactor thread and the caller
awaits it (or wraps it in ``defer.ensureDeferred``). Whatever a method returns has been
committed; an exception means nothing of that call was stored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from armsproxy.store.model import Event, NewOperation, Operation, OrphanDone, SARecord


class Store(Protocol):
    async def open(self) -> None:
        """Connect and bring the schema up to date; nothing else may be called before."""

    async def close(self) -> None:
        """Finish queued work and release the database."""

    # -- operations -----------------------------------------------------------------------

    async def submit(self, new: NewOperation) -> tuple[Operation, bool]:
        """Store a new ``queued`` operation; an existing ``request_id`` gives that one and False."""

    async def get(self, operation_id: str) -> Operation | None: ...

    async def list_operations(
        self,
        *,
        distribution_id: str | None = None,
        states: Collection[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Operation]:
        """Operations by ``created_at`` (since <= created_at < until), then submit order."""

    async def transition(
        self,
        operation_id: str,
        *,
        expect: Collection[str],
        state: str,
        changes: dict[str, Any] | None = None,
        events: Sequence[dict[str, Any]] = (),
        raw: dict[str, Any] | None = None,
    ) -> Operation | None:
        """Compare-and-set the state, apply changes, append raw, queue events: all or nothing.

        None (and nothing changed) when the operation is missing or not in ``expect``.
        Each event is ``{kind, distribution_id, payload[, operation_id][, created_at]}``;
        ``operation_id`` defaults to this operation.
        """

    async def update(self, operation_id: str, changes: dict[str, Any]) -> Operation | None:
        """Change fields without a state change (attempts, not_before, ...)."""

    async def next_dispatchable(self, now: float, limit: int) -> list[Operation]:
        """Per SA the head of its queue (submit order) if due, not waiting for its SA, and
        nothing of the SA is sending; at most ``limit``, the heads due longest first.

        Costs what it returns, not what is queued (a backend keeps per-SA heads)."""

    async def in_states(self, states: Collection[str]) -> list[Operation]: ...

    async def past_deadline(self, now: float, limit: int = 500) -> list[Operation]:
        """``queued`` operations whose ``expires_at``, and ``started`` ones whose
        ``done_deadline``, is at or before ``now``: at most ``limit``, the earliest deadlines
        first, returned in submit order. Reads only what is due (index on each deadline);
        the caller asks again while a full page comes back."""

    async def waiting(self) -> list[Operation]:
        """``queued`` operations waiting for their SA (``waiting_for`` set), in submit order."""

    async def release_waiting(self, distribution_id: str, now: float) -> int:
        """The SA became reachable: its queued operations are due now (``waiting_for``
        cleared, a retry delay cut short); how many changed.

        ``waiting_for`` is set with ``update``/``transition`` on a queued operation, and
        cleared by any transition to another state; a head that waits holds its SA's queue.
        """

    async def find_by_sa_transaction(
        self, distribution_id: str, sa_transaction_id: int
    ) -> Operation | None:
        """The most recently submitted operation that got this SA transaction id."""

    async def forget(self, operation_id: str) -> bool:
        """Drop result and raw XML, keep the row and its state; False if unknown."""

    async def purge_results(self, older_than: float) -> int:
        """Forget final operations last updated before ``older_than``; how many."""

    # -- SA registry ----------------------------------------------------------------------

    async def sa_get(self, distribution_id: str) -> SARecord | None: ...

    async def sa_update(self, distribution_id: str, *, events: Sequence[dict[str, Any]] = (),
                        **fields: Any) -> SARecord:
        """Create or change a registry entry (fields of :class:`SARecord`); ``events`` go to
        the outbox in the same commit."""

    async def sa_list(
        self, *, limit: int = 100, offset: int = 0, confirmed: bool | None = None
    ) -> list[SARecord]: ...

    # -- event outbox ---------------------------------------------------------------------

    async def add_events(self, events: Sequence[dict[str, Any]]) -> None: ...

    async def pending_events(self, limit: int) -> list[Event]:
        """Undelivered events, oldest first (``seq`` order)."""

    async def mark_delivered(self, seqs: Sequence[int]) -> None: ...

    async def note_event_attempt(self, seq: int) -> None: ...

    async def backlog(self) -> dict[str, int]:
        """Operations not yet final, by state (every state present), and undelivered events
        (``"events"``): what the management gate's ``/metrics`` reports. Reads indexes only,
        so it stays cheap however many results are kept."""

    # -- orphan done-requests -------------------------------------------------------------

    async def add_orphan_done(
        self,
        distribution_id: str,
        sa_transaction_id: int,
        type: str,
        xml: str,
        received_at: float,
        *,
        size: int | None = None,
        keep: int | None = None,
        drop_before: float | None = None,
    ) -> tuple[int, int]:
        """Store an orphan; ``(seq, dropped)``. In the same commit, drop this SA's orphans
        received before ``drop_before`` and all but its newest ``keep`` (the new one counts):
        ``dropped`` says how many went. ``size`` defaults to ``len(xml)``."""

    async def take_orphan_dones(
        self, distribution_id: str, sa_transaction_id: int
    ) -> list[OrphanDone]:
        """Return and delete the orphans of this SA transaction, oldest first."""

    async def purge_orphan_dones(self, older_than: float) -> int:
        """Drop orphans received before ``older_than`` (no operation ever claimed them)."""
