"""The contract between the engine/gates and any durable backend (SQLite now, PostgreSQL later).

Every method is a coroutine: a backend does its I/O off the reactor thread and the caller
awaits it (or wraps it in ``defer.ensureDeferred``). Whatever a method returns has been
committed; an exception means nothing of that call was stored.

An :class:`Operation` a method returns is the row as stored when the call committed. Its
``raw`` may be a lazily decoded sequence (:class:`~armsproxy.store.model.RawEntries`): a
backend hands over the stored JSON and nothing decodes it unless it is read. Methods that
change a row return it from the change itself (``UPDATE/INSERT ... RETURNING``), not by
reading it again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from armsproxy.store.model import Event, NewOperation, Operation, OrphanDone, SARecord


class Store(Protocol):
    #: True when other processes may share the store (PostgreSQL): instances matter.
    shared: bool

    async def open(self) -> None:
        """Connect and bring the schema up to date; nothing else may be called before."""

    async def close(self) -> None:
        """Finish queued work and release the database."""

    # -- operations -----------------------------------------------------------------------

    async def submit(self, new: NewOperation) -> tuple[Operation, bool]:
        """Store a new ``queued`` operation; an existing ``request_id`` gives that one and False.

        A new one comes back from its INSERT (``raw`` empty), without a second read."""

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
        ``operation_id`` defaults to this operation. Otherwise the operation as stored after
        the change, equal to what ``get`` then returns (``raw`` included, this call's entry
        last), built from the UPDATE's own RETURNING row.
        """

    async def update(self, operation_id: str, changes: dict[str, Any]) -> Operation | None:
        """Change fields without a state change (attempts, not_before, ...); returns like
        ``transition``."""

    async def next_dispatchable(self, now: float, limit: int) -> list[Operation]:
        """Per SA the head of its queue (submit order) if due, not waiting for its SA, and
        nothing of the SA is sending; at most ``limit``, the heads due longest first.
        Read-only (tools and tests); the engine claims with ``claim_dispatchable``.

        Costs what it returns, not what is queued (a backend keeps per-SA heads)."""

    async def claim_dispatchable(self, now: float, limit: int, *,
                                 busy: Collection[str] = (),
                                 instance_id: str | None = None) -> list[Operation]:
        """Pick and claim what is due, in one commit: the heads ``next_dispatchable(now,
        limit)`` would return, skipping SAs whose ``distribution_id`` is in ``busy`` (the
        caller is still busy with them; ``limit`` counts the others), each moved ``queued``
        -> ``sending`` with ``attempts + 1``, ``updated_at = now`` and ``claimed_by =
        instance_id`` (``not_before`` unchanged, ``waiting_for`` stays NULL: a waiting head
        is never picked). Returned as stored after the claim, in pick order (due longest
        first).

        With an ``instance_id`` on a shared store (PostgreSQL): nothing unless that
        instance's lease (``register_instance``) is live at ``now`` (an instance a survivor
        may be taking over claims nothing), and a head whose SA's ``tunnel_owner`` is
        another instance is left to that one (unless the order names an ``sa_url`` or asks
        for https-simple). A SQLite store has one instance: neither applies.

        Atomic: two claims, from this process or another, never return the same operation,
        and a claimed one cannot be cancelled (cancel expects ``queued``). The caller owns
        what it claimed: it sends it, or hands it back with ``transition`` from ``sending``
        (e.g. to ``queued`` restoring ``attempts`` when it cannot be sent yet). What a crash
        leaves ``sending`` is resolved at the next start (``in_states``). ``limit`` <= 0:
        nothing, and no store call."""

    async def in_states(self, states: Collection[str]) -> list[Operation]: ...

    async def take_over(self, instance_id: str | None, now: float) -> list[Operation]:
        """What dead instances left ``sending``, claimed by ``instance_id`` in one commit
        and returned (submit order) for the caller to resolve (design.md §5's restart rules).

        Dead: an instance whose lease ended before ``now`` (its row is deleted and the SA
        tunnels it owned released, by exactly one caller), one that retired, or none (an
        operation claimed without an instance id). Each operation is returned to one caller
        only. A SQLite store has one process: every instance but ``instance_id`` is dead.
        ``instance_id`` None: the caller is the only process there is; every ``sending``
        operation is returned, nothing else changes (a store used without instances)."""

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
                        release_tunnel: str | None = None, **fields: Any) -> SARecord:
        """Create or change a registry entry (fields of :class:`SARecord`); ``events`` go to
        the outbox in the same commit. Returns the whole entry as stored after the change
        (from the upsert's RETURNING): the push engine caches it as the SA's current record,
        so every registry write must go through the engine (it is the only writer).

        ``release_tunnel``: an instance id that no longer holds a tunnel of the SA;
        ``tunnel_owner`` is cleared in the same statement if it still names that instance
        (another instance the SA reconnected to meanwhile keeps it)."""

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

    # -- instances: several processes on one store (PostgreSQL) ----------------------------

    async def register_instance(self, instance_id: str, *, host: str, pid: int, now: float,
                                lease_until: float) -> bool:
        """Create or renew an instance's lease (``lease_until``); True if its row was there
        (a renewal), False if it was (re)created: a first start, or a survivor found the
        lease expired and took over what the instance was doing."""

    async def retire_instance(self, instance_id: str) -> None:
        """A clean stop: the instance's row and its tunnel ownerships go at once, so that
        the next ``take_over`` of any instance resolves what it left ``sending``."""

    async def lead(self, instance_id: str | None = None) -> bool:
        """Hold (take if free, or check still held) the lock that lets one instance at a
        time run the duties of one (event outbox, purges); whether this process holds it.
        PostgreSQL: a session-level advisory lock on a connection of its own (named after
        ``instance_id``), lost when the process or its session dies, or when a survivor's
        ``take_over`` finds the instance's lease run out and ends that session. SQLite:
        always True (one process)."""

    async def resign(self) -> None:
        """Let go of what :meth:`lead` holds."""

    async def announce(self, topic: str) -> None:
        """Tell the other processes on this store that there is new work (``topic``:
        "ops", orders to claim; "events", events to deliver). Announcements made while one
        is being sent are sent once after it. PostgreSQL: NOTIFY; SQLite: nothing."""

    async def listen(self, callback: Callable[[str], None]) -> None:
        """From now until ``close``, ``callback(topic)`` on the reactor thread for each
        announcement of another process (some may coalesce; after a lost connection,
        every topic once, since some may have been missed). SQLite: never called."""

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
