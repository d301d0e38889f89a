"""Which https-tunnels are up, per SA, so the push engine can pick one (§9, §14).

A tunnel is registered when its first confirmation completes (§9.4) and leaves when it
closes. An SA opens one tunnel per ``https-tunnel-url`` (at most 5, §11.2), so more than
``max_per_distid`` confirmed tunnels for one distid means some are stale: a half-open TCP
connection the SA gave up on (it reconnects after a missed echo without a zero chunk, §9.5)
that our echo watchdog has not caught yet. The newest tunnel is the one the SA is using, so
registering one over the limit closes the oldest rather than refusing the newcomer, which
would lock the SA out until the watchdog fires.

Most SAs hold one tunnel: the index keeps that tunnel itself, a tuple only from the second
on (a list per SA would cost ~120 bytes per idle tunnel). The registry also owns the one
:class:`~armsproxy.tunnel.timers.Deadlines` its tunnels share, and ``stats``: counters of
routine tunnel events (echoes answered...), counted rather than logged.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .api import Tunnel
from .timers import Deadlines

__all__ = ["MAX_TUNNELS_PER_SA", "TunnelRegistry"]

#: libarms opens one tunnel per https-tunnel-url and accepts at most 5 of them (§11.2).
MAX_TUNNELS_PER_SA = 5


class TunnelRegistry:
    """All tunnel connections of this process; the confirmed ones indexed by distid."""

    log = Logger()

    def __init__(
        self, *, max_per_distid: int = MAX_TUNNELS_PER_SA, max_tunnels: int | None = None
    ) -> None:
        if max_per_distid < 1:
            raise ValueError("max_per_distid must be at least 1")
        self.max_per_distid = max_per_distid
        #: Cap on open tunnel connections (confirmed or not); None: no cap.
        self.max_tunnels = max_tunnels
        self._ids = itertools.count(1)
        # Admitted and not registered (yet); the registered ones are only counted here, their
        # index is _by_distid: an idle tunnel is in one container, not two.
        self._unconfirmed: set[Tunnel] = set()
        self._registered = 0
        # distid -> its one tunnel, or a tuple of them (oldest first) when it holds several
        self._by_distid: dict[str, Any] = {}
        self._deadlines: dict[IReactorTime, Deadlines] = {}
        #: Routine tunnel events, counted rather than logged (``echo``...).
        self.stats: Counter[str] = Counter()

    def deadlines(self, clock: IReactorTime) -> Deadlines:
        """The deadlines every tunnel on ``clock`` shares (one per clock, made on first use)."""
        found = self._deadlines.get(clock)
        if found is None:
            found = self._deadlines[clock] = Deadlines(clock)
        return found

    def _of(self, distid: str) -> tuple[Tunnel, ...]:
        held = self._by_distid.get(distid)
        if held is None:
            return ()
        return held if type(held) is tuple else (held,)

    def _set(self, distid: str, tunnels: tuple[Tunnel, ...]) -> None:
        if not tunnels:
            self._by_distid.pop(distid, None)
        else:
            self._by_distid[distid] = tunnels if len(tunnels) > 1 else tunnels[0]

    # -- life cycle (called by TunnelSession) --------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids)

    def admit(self, tunnel: Tunnel) -> bool:
        """Count a tunnel whose opening was accepted; False when the process is full."""
        if self.max_tunnels is not None and self.open_count >= self.max_tunnels:
            return False
        self._unconfirmed.add(tunnel)
        return True

    def register(self, tunnel: Tunnel) -> list[Tunnel]:
        """Index a newly confirmed tunnel; close and return the ones it pushes over the limit."""
        tunnels = self._of(tunnel.distid)
        if tunnel in tunnels:
            return []
        self._unconfirmed.discard(tunnel)
        self._registered += 1
        tunnels += (tunnel,)
        self._set(tunnel.distid, tunnels)
        evicted = list(tunnels[: max(0, len(tunnels) - self.max_per_distid)])
        for old in evicted:
            self.log.warn(
                "tunnel {new} of {distid}: more than {limit} tunnels, closing the oldest ({old})",
                new=tunnel.id, distid=tunnel.distid, limit=self.max_per_distid, old=old.id,
            )
            self.release(old)
            old.close(f"replaced by tunnel {tunnel.id} (more than {self.max_per_distid})")
        return evicted

    def release(self, tunnel: Tunnel) -> None:
        """Forget a tunnel (idempotent); called when it closes."""
        self._unconfirmed.discard(tunnel)
        tunnels = self._of(tunnel.distid)
        if tunnel in tunnels:
            self._registered -= 1
            self._set(tunnel.distid, tuple(t for t in tunnels if t is not tunnel))

    # -- queries ------------------------------------------------------------------------------
    @property
    def open_count(self) -> int:
        """Tunnel connections past their 200 header, confirmed or not."""
        return len(self._unconfirmed) + self._registered

    def live(self, distid: str) -> list[Tunnel]:
        """Confirmed, open tunnels of ``distid``, oldest first."""
        return [t for t in self._of(distid) if t.confirmed]

    def held(self, distid: str) -> list[Tunnel]:
        """Registered, open tunnels of ``distid``, also those re-running a confirmation (a
        request given to one waits until it is confirmed again; no hook says when)."""
        return [t for t in self._of(distid) if not t.closed]

    def pick(self, distid: str) -> Tunnel | None:
        """The live tunnel with the shortest queue; on a tie the one heard from last."""
        held = self._by_distid.get(distid)
        if held is None or type(held) is not tuple:  # none, or the usual one: no list built
            return held if held is not None and held.confirmed else None
        best: Tunnel | None = None
        for tunnel in self.live(distid):
            if best is None or (tunnel.queue_length, -tunnel.last_seen) < (
                best.queue_length, -best.last_seen
            ):
                best = tunnel
        return best

    def all(self) -> list[Tunnel]:
        """Every registered tunnel (also those re-running a confirmation, see ``confirmed``)."""
        return [t for distid in self._by_distid for t in self._of(distid)]

    def distids(self) -> list[str]:
        return list(self._by_distid)

    def count(self, distid: str) -> int:
        return len(self.live(distid))

    def counts(self) -> dict[str, int]:
        """``open``: connections past their 200 header; ``registered``: confirmed at least
        once; ``live``: confirmed now; ``distids``: SAs with a registered tunnel."""
        registered = self.all()
        return {
            "open": self.open_count,
            "registered": len(registered),
            "live": sum(1 for t in registered if t.confirmed),
            "distids": len(self._by_distid),
        }
