"""Cache of SA preshared keys for the SA gate's Basic auth (design.md §6: "SA keys cached").

Keys come from the RS (``arms.sa_key``). The cache keeps the RS out of the hot path and
shields it: a wrong key triggers at most one re-fetch per ``refetch_min_interval`` per
distid (the RS may have rotated the key), unknown distids are remembered for
``negative_ttl``, and concurrent lookups of one distid share one RS call. RS errors are
never cached; they propagate so the gate can answer "retry later".
"""

from __future__ import annotations

import hmac
import itertools
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["KeyCache", "SAKeySource"]

_log = Logger()


class SAKeySource(Protocol):
    """What the cache needs from the RS client."""

    async def sa_key(self, distid: str) -> str | None: ...


class _Entry:
    """One distid's key. Slotted, and one float when fresh (``last_fetch`` is the very
    ``fetched_at`` object until a refetch attempt): every SA with a tunnel has one."""

    __slots__ = ("fetched_at", "key", "last_fetch")

    def __init__(self, key: str | None, fetched_at: float) -> None:
        self.key = key  # None: the RS does not know this distid
        self.fetched_at = fetched_at
        #: Time of the last RS fetch attempt, for the refetch rate limit.
        self.last_fetch = fetched_at


def _matches(key: str | None, presented: str) -> bool:
    if not key:  # unknown distid, or an empty key that must never authenticate anyone
        return False
    return hmac.compare_digest(
        key.encode("utf-8", "surrogatepass"), presented.encode("utf-8", "surrogatepass")
    )


class KeyCache:
    """Answer "is this the SA's key?" with as few RS calls as safely possible."""

    def __init__(
        self,
        client: SAKeySource,
        clock: IReactorTime,
        ttl: float = 300.0,
        negative_ttl: float = 30.0,
        refetch_min_interval: float = 5.0,
        max_entries: int = 100_000,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._client = client
        self._clock = clock
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._refetch_min_interval = refetch_min_interval
        self._max_entries = max_entries
        #: Fetches landing this close together share one time object (see _fetch_time).
        self._time_window = min(ttl, negative_ttl, refetch_min_interval) / 16
        self._last_time: float | None = None
        # Oldest first: a plain dict keeps insertion order at a third of an OrderedDict's
        # cost per entry (every SA with a tunnel has one).
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, list[Deferred[_Entry]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def matches_cached(self, distid: str, presented_key: str) -> bool:
        """True if a fresh cached key for ``distid`` is ``presented_key``; False means "ask
        :meth:`check`" (not cached, expired, or no match: maybe a rotated key). Lets the SA
        gate skip a coroutine and a Deferred on every pull of a known SA."""
        entry = self._entries.get(distid)
        return (entry is not None and self._expires(entry) > self._clock.seconds()
                and _matches(entry.key, presented_key))

    def _expires(self, entry: _Entry) -> float:
        return entry.fetched_at + (self._ttl if entry.key is not None else self._negative_ttl)

    async def check(self, distid: str, presented_key: str) -> bool:
        """True if ``presented_key`` is the RS's key for ``distid``; RS errors propagate."""
        now = self._clock.seconds()
        entry = self._entries.get(distid)
        if entry is None or self._expires(entry) <= now:
            entry = await self._fetch(distid)
            return _matches(entry.key, presented_key)
        if _matches(entry.key, presented_key):
            return True
        if entry.key is None:
            # Unknown stays unknown until negative_ttl passes (or invalidate()).
            return False
        if now - entry.last_fetch < self._refetch_min_interval:
            return False
        # Maybe the RS rotated the key: ask again, once, and remember that we asked even
        # if the RS fails, so wrong keys cannot turn into a flood of RS calls.
        entry.last_fetch = now
        entry = await self._fetch(distid)
        return _matches(entry.key, presented_key)

    async def sa_key(self, distid: str) -> str | None:
        """The SA's key (cached), for pushes: armsproxy authenticates to the SA with it."""
        entry = self._entries.get(distid)
        if entry is None or self._expires(entry) <= self._clock.seconds():
            entry = await self._fetch(distid)
        return entry.key

    def invalidate(self, distid: str) -> None:
        """Forget ``distid``; a lookup already under way will not store its answer."""
        self._entries.pop(distid, None)
        self._inflight.pop(distid, None)

    def _fetch(self, distid: str) -> Deferred[_Entry]:
        """One RS call per distid at a time; each caller gets its own Deferred to await.

        Separate Deferreds keep one caller's cancellation from failing the others.
        """
        waiter: Deferred[_Entry] = Deferred()
        waiters = self._inflight.get(distid)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = [waiter]
        self._inflight[distid] = waiters
        lookup = ensureDeferred(self._client.sa_key(distid))
        lookup.addBoth(self._landed, distid, waiters)
        return waiter

    def _landed(
        self, result: str | Failure | None, distid: str, waiters: list[Deferred[_Entry]]
    ) -> None:
        current = self._inflight.get(distid) is waiters
        if current:
            del self._inflight[distid]
        outcome: _Entry | Failure
        if isinstance(result, Failure):
            outcome = result
        else:
            outcome = self._entry_for(result)
            if current:
                self._store(distid, outcome)
        for waiter in waiters:
            if waiter.called:  # cancelled by its caller
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
        return None

    def _entry_for(self, key: Any) -> _Entry:
        return _Entry(key, self._fetch_time())

    def _fetch_time(self) -> float:
        """When a fetch landed. Fetches landing within a sixteenth of the shortest interval
        the cache keeps share the first one's time (an entry then lasts, and holds off a
        re-fetch, up to that much less long, never longer): a float is 24 bytes an SA, and
        SAs come in bursts (the reconnects after a restart)."""
        now = self._clock.seconds()
        last = self._last_time
        if last is None or not 0 <= now - last < self._time_window:
            last = self._last_time = now
        return last

    def _store(self, distid: str, entry: _Entry) -> None:
        self._entries.pop(distid, None)  # in again at the end: the newest
        self._entries[distid] = entry
        excess = len(self._entries) - self._max_entries
        if excess > 0:
            # A sixteenth more than needed: the front of a dict's table fills with the holes
            # of what was dropped or replaced, and each look for the oldest walks them.
            for dropped in list(itertools.islice(self._entries,
                                                 excess + self._max_entries // 16)):
                del self._entries[dropped]
                _log.debug("SA key cache full, dropped {distid}", distid=dropped)
