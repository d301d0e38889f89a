"""The deadlines of every tunnel behind one ``IDelayedCall`` (a heap of due times).

Each idle tunnel needs a timer (its echo watchdog) and each request in flight a deadline. A
Twisted ``DelayedCall`` per tunnel costs ~0.4 KiB (the call, its ``__dict__``, two bound
methods of the reactor, a bound method and a kwargs dict of ours), more than the rest of a
tunnel's Python state, and moving one sooner scans the reactor's whole heap (its
``_moveCallLaterSooner`` is linear). Here a tunnel holds one heap entry, a two-slot
:class:`Entry` (56 bytes; a ``(due, seq, owner)`` tuple and its sequence number took 100),
and the process one ``DelayedCall`` for the earliest entry.

Entries are never removed: an owner's *current* entry is the one it holds in
``deadline_entry``; any other entry of it is stale and dropped when it comes due. Moving a
deadline later (the common case: every echo-request) costs nothing at all: the old entry
comes due, the owner finds nothing due yet and is armed again for its real deadline.
"""

from __future__ import annotations

import heapq
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["EPSILON", "Deadlines", "Entry", "TimedOwner"]

#: Float slack when comparing a clock reading with a due time computed another way.
EPSILON = 1e-6


class Entry:
    """One deadline in the heap: when, and whose. Ordered by ``due`` alone (ties in any
    order), so owners need not be comparable."""

    __slots__ = ("due", "owner")

    def __init__(self, due: float, owner: TimedOwner) -> None:
        self.due = due
        self.owner = owner

    def __lt__(self, other: Entry) -> bool:
        return self.due < other.due


class TimedOwner(Protocol):
    """What :class:`Deadlines` calls: an object with one current heap entry."""

    deadline_entry: Entry | None

    def deadline_reached(self, now: float) -> None:
        """Its entry came due: act on what is due, or ``arm`` again for what is not yet."""
        ...


class Deadlines:
    """Many owners' deadlines on one clock, one ``IDelayedCall`` for all of them."""

    __slots__ = ("_call", "_heap", "clock")

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._heap: list[Entry] = []
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        """Heap entries, stale ones included (for tests and diagnostics)."""
        return len(self._heap)

    def arm(self, owner: TimedOwner, due: float) -> None:
        """Call ``owner.deadline_reached`` at ``due`` at the latest (earlier if already armed
        sooner: the owner then re-arms itself)."""
        entry = owner.deadline_entry
        if entry is not None and entry.due <= due:
            return
        entry = Entry(due, owner)
        owner.deadline_entry = entry
        heapq.heappush(self._heap, entry)
        if self._heap[0] is entry:
            self._schedule(due)

    @staticmethod
    def disarm(owner: TimedOwner) -> None:
        """Forget the owner's deadline (its heap entry is dropped when it comes due)."""
        owner.deadline_entry = None

    def _schedule(self, due: float) -> None:
        call = self._call
        delay = max(0.0, due - self.clock.seconds())
        if call is None or not call.active():
            self._call = self.clock.callLater(delay, self._fire)
        elif due < call.getTime():
            call.reset(delay)  # sooner: linear in the reactor's heap, which is small now

    def _fire(self) -> None:
        self._call = None
        heap = self._heap
        now = self.clock.seconds()
        while heap and heap[0].due <= now + EPSILON:
            entry = heapq.heappop(heap)
            owner = entry.owner
            if owner.deadline_entry is not entry:
                continue  # stale: moved or disarmed since
            owner.deadline_entry = None
            try:
                owner.deadline_reached(now)
            except Exception:
                self.log.failure("deadline of {owner!r} failed", owner=owner)
        if heap and (self._call is None or not self._call.active()):
            self._schedule(heap[0].due)
