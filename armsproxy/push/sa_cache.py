"""The push engine's copy of the SA registry: a dispatch reads its SA's record without a store call.

Why: every dispatch needs its SA's record (push method, endpoint, pinned certificate), and a
record changes only when the SA pulls with a new certificate or from elsewhere, confirms a
push method, or opens or closes a tunnel. The engine writes all of those itself
(``config_relayed``, ``confirmation_started``, ``_confirm``, ``_tunnel_changed``), through
this cache, which keeps the whole record each write returns; the store is read only for an
SA not seen yet (or evicted: the cache is a bounded LRU).

What keeps it right:

* in this process nothing else writes the registry (the RS gate and armsproxyctl only read
  it), so the last write's record is the stored one. Other proxies sharing the store (the
  PostgreSQL backend) may write it too: an entry is trusted for ``ttl`` seconds only, and the
  engine reads the store itself (:meth:`SACache.fresh`) before it lets an order wait for an
  SA that its copy says is unreachable;
* the writes and misses of one SA take turns (a per-SA lock), so a record a store call
  returns is never installed over a newer one, whatever order a backend (a connection pool)
  completes concurrent calls in;
* a write that fails drops the SA's entry: the next read asks the store what was committed.

What it costs: every SA with a tunnel has an entry, so an entry is one flat tuple, not the
store's record (JSON-decoded tunnel dicts, fresh copies of every string: ~1.7 KiB). It keeps
the record's fields but its live tunnels, which the tunnel registry holds and routing reads
there: ``tunnels`` of a cached record lists the closed ones only (the history
``_tunnel_changed`` extends). A value the caller wrote is kept as the caller's object (the
distid and peer strings the tunnel session holds already), the few recurring strings
(push method, owner instance) are shared, and :meth:`SACache.get` and :meth:`SACache.peek`
build a fresh :class:`SARecord` from the tuple, so a caller cannot change the cache's copy.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from ..store.model import SARecord

_MISSING = object()
_NOTHING: Mapping[str, Any] = MappingProxyType({})
_FIELDS = tuple(f.name for f in dataclasses.fields(SARecord))
_TUNNELS = _FIELDS.index("tunnels") + 1  # in an entry, after its stamp
#: Fields whose few distinct values recur across SAs: one string each.
_SHARED = frozenset({"push_method", "tunnel_owner"})
#: Key tuples of the closed tunnels' dicts (a handful of layouts): one tuple each.
_LAYOUTS: dict[tuple[str, ...], tuple[str, ...]] = {}
#: (when stored, *SARecord's fields, tunnels as _closed_tunnels gives them); (when stored,)
#: for an SA not in the registry.
_Entry = tuple[Any, ...]


def _closed_tunnels(tunnels: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """The closed tunnels as ``(keys, values)`` pairs; the live ones are the registry's."""
    closed = []
    for tunnel in tunnels:
        if tunnel.get("closed_at"):
            keys = tuple(sys.intern(k) for k in tunnel)
            keys = _LAYOUTS.setdefault(keys, keys)
            closed.append((keys, tuple(tunnel.values())))
    return tuple(closed)


def _compact(record: SARecord, distid: str, written: Mapping[str, Any], stamp: float) -> _Entry:
    """``record`` as an entry, sharing every string it can (see the module doc)."""
    values: list[Any] = [stamp]
    for name in _FIELDS:
        value = getattr(record, name)
        if name == "tunnels":
            value = _closed_tunnels(value)
        elif name == "distribution_id":
            value = distid if value == distid else value
        elif type(value) in (str, float):
            given = written.get(name)
            if type(given) is type(value) and given == value:
                value = given  # the caller's object, not the store's copy of it
            elif name in _SHARED:
                value = sys.intern(value)
        values.append(value)
    return tuple(values)


def _oldest(entries: dict[str, Any], size: int) -> list[str]:
    """The keys to drop when ``entries`` outgrew ``size``: down to it, and a sixteenth more.

    Taking a few at once keeps eviction cheap on a plain dict: the front of its table fills
    with the holes of the entries dropped or moved, and each look for the oldest walks them.
    """
    return list(itertools.islice(entries, len(entries) - size + size // 16))


def _view(entry: _Entry) -> SARecord | None:
    """A fresh record from an entry (its closed tunnels as new dicts); None: not in the
    registry."""
    if len(entry) == 1:
        return None
    values = list(entry[1:])
    closed = entry[_TUNNELS]
    values[_TUNNELS - 1] = [dict(zip(keys, vals, strict=True)) for keys, vals in closed] \
        if closed else []
    return SARecord(*values)


class SACache:
    """Bounded, write-through LRU of :class:`SARecord` by distribution id (None: not in the
    registry), each entry trusted for ``ttl`` seconds of ``clock`` (None: for ever). ``reads``
    counts the store reads it made, for tests and benchmarks. Records read from it list only
    the closed tunnels (module doc)."""

    def __init__(self, store: Any, size: int = 4096, *, clock: IReactorTime | None = None,
                 ttl: float | None = None) -> None:
        if size < 1:
            raise ValueError("sa_cache_size: at least 1")
        if ttl is not None and clock is None:
            raise ValueError("a ttl needs a clock")
        self.store = store
        self.size = size
        self.ttl = ttl
        self.clock = clock
        # distid -> its entry (first item: when stored, by the clock; 0.0 without a ttl), or
        # the time alone (a 1-tuple) for an SA not in the registry. Least recently used
        # first: a plain dict keeps insertion order at a third of an OrderedDict's cost per
        # entry, and an entry used is moved to the end by taking it out and in again.
        self._records: dict[str, _Entry] = {}
        self._locks: dict[str, defer.DeferredLock] = {}
        self.reads = 0
        self._stamp: float | None = None  # see _stamp_now

    def __len__(self) -> int:
        return len(self._records)

    def _fresh_entry(self, distid: str) -> Any:
        """The cached record if there is one still trusted (marking it used), else _MISSING."""
        entry = self._records.get(distid)
        if entry is None:
            return _MISSING
        if self.ttl is not None and not 0 <= self._now() - entry[0] < self.ttl:
            return _MISSING
        if len(self._records) * 2 >= self.size:
            # Now the most recently used. Not while the cache is less than half full: then
            # nothing is evicted before later reads set the order right, and a move leaves
            # a hole in the dict's table (every dispatch reads its SA's entry).
            self._records[distid] = self._records.pop(distid)
        return _view(entry)

    def peek(self, distid: str) -> SARecord | None:
        """The cached record however old, or None if unknown here (not in the registry, or
        not cached): never a store call. Good enough to decide that a write is not needed
        (``config_relayed``), not for routing."""
        entry = self._records.get(distid)
        return None if entry is None else _view(entry)

    async def get(self, distid: str) -> SARecord | None:
        """The SA's current record (None: not in the registry); a store read on a miss."""
        record = self._fresh_entry(distid)
        if record is not _MISSING:
            return record  # type: ignore[no-any-return]
        async with self._turn(distid):
            record = self._fresh_entry(distid)  # a write may have come first
            if record is _MISSING:
                await self._read(distid)
                record = _view(self._records[distid])  # the cache's copy, as on a hit
        return record  # type: ignore[no-any-return]

    async def fresh(self, distid: str) -> SARecord | None:
        """The record as stored now (a store read, kept): for decisions a stale copy would
        make wrong, such as letting an order wait for an SA another proxy saw confirm."""
        async with self._turn(distid):
            return await self._read(distid)

    async def _read(self, distid: str) -> SARecord | None:
        self.reads += 1
        record: SARecord | None = await self.store.sa_get(distid)
        self._install(distid, record)
        return record

    async def update(self, distid: str, *, events: Sequence[dict[str, Any]] = (),
                     release_tunnel: str | None = None, **fields: Any) -> SARecord:
        """``store.sa_update``, keeping the record it returns."""
        async with self._turn(distid):
            try:
                extra = {} if release_tunnel is None else {"release_tunnel": release_tunnel}
                record: SARecord = await self.store.sa_update(distid, events=events, **extra,
                                                              **fields)
            except BaseException:
                self._records.pop(distid, None)  # committed or not: ask the store next time
                raise
            self._install(distid, record, fields)
            return record

    def _now(self) -> float:
        return 0.0 if self.clock is None else float(self.clock.seconds())

    def _stamp_now(self) -> float:
        """When an entry is stored, for its ttl. Entries stored within a sixteenth of the
        ttl share the first one's stamp (trusted up to that much less long, never longer):
        a float is 24 bytes an SA, and SAs come in bursts (the reconnects after a restart)."""
        if self.ttl is None:
            return 0.0
        now = self._now()
        stamp = self._stamp
        if stamp is None or not 0 <= now - stamp < self.ttl / 16:
            stamp = self._stamp = now
        return stamp

    def _install(self, distid: str, record: SARecord | None,
                 written: Mapping[str, Any] = _NOTHING) -> None:
        stamp = self._stamp_now()
        # An SA already here keeps its place (a read moves it to the end): taken out and in
        # again, it would leave a hole in the dict's table that only its next resize clears.
        self._records[distid] = (stamp,) if record is None else _compact(record, distid,
                                                                          written, stamp)
        if len(self._records) > self.size:
            for dropped in _oldest(self._records, self.size):
                del self._records[dropped]

    def _turn(self, distid: str) -> _Turn:
        lock = self._locks.get(distid)
        if lock is None:
            lock = self._locks[distid] = defer.DeferredLock()
        return _Turn(self._locks, distid, lock)


class _Turn:
    """``async with``: one store call of an SA at a time; the lock goes when nobody holds or
    awaits it, so there are only as many locks as SAs being written or read right now."""

    __slots__ = ("_distid", "_lock", "_locks")

    def __init__(self, locks: dict[str, defer.DeferredLock], distid: str,
                 lock: defer.DeferredLock) -> None:
        self._locks, self._distid, self._lock = locks, distid, lock

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        if not self._lock.locked and not self._lock.waiting:
            self._locks.pop(self._distid, None)
