"""Which https-tunnels are up, per SA, so the push engine can pick one (§9, §14).

A tunnel is registered when its first confirmation completes (§9.4) and leaves when it
closes. An SA opens one tunnel per ``https-tunnel-url`` (at most 5, §11.2), so more than
``max_per_distid`` confirmed tunnels for one distid means some are stale: a half-open TCP
connection the SA gave up on (it reconnects after a missed echo without a zero chunk, §9.5)
that our echo watchdog has not caught yet. The newest tunnel is the one the SA is using, so
registering one over the limit closes the oldest rather than refusing the newcomer, which
would lock the SA out until the watchdog fires.
"""

from __future__ import annotations

import itertools

from twisted.logger import Logger

from .api import Tunnel

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
        self._open: set[Tunnel] = set()
        self._by_distid: dict[str, list[Tunnel]] = {}

    # -- life cycle (called by TunnelSession) --------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids)

    def admit(self, tunnel: Tunnel) -> bool:
        """Count a tunnel whose opening was accepted; False when the process is full."""
        if self.max_tunnels is not None and len(self._open) >= self.max_tunnels:
            return False
        self._open.add(tunnel)
        return True

    def register(self, tunnel: Tunnel) -> list[Tunnel]:
        """Index a newly confirmed tunnel; close and return the ones it pushes over the limit."""
        tunnels = self._by_distid.setdefault(tunnel.distid, [])
        if tunnel in tunnels:
            return []
        self._open.add(tunnel)
        tunnels.append(tunnel)
        evicted = tunnels[: max(0, len(tunnels) - self.max_per_distid)]
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
        self._open.discard(tunnel)
        tunnels = self._by_distid.get(tunnel.distid)
        if tunnels is None:
            return
        try:
            tunnels.remove(tunnel)
        except ValueError:
            return
        if not tunnels:
            del self._by_distid[tunnel.distid]

    # -- queries ------------------------------------------------------------------------------
    def live(self, distid: str) -> list[Tunnel]:
        """Confirmed, open tunnels of ``distid``, oldest first."""
        return [t for t in self._by_distid.get(distid, ()) if t.confirmed]

    def held(self, distid: str) -> list[Tunnel]:
        """Registered, open tunnels of ``distid``, also those re-running a confirmation (a
        request given to one waits until it is confirmed again; no hook says when)."""
        return [t for t in self._by_distid.get(distid, ()) if not t.closed]

    def pick(self, distid: str) -> Tunnel | None:
        """The live tunnel with the shortest queue; on a tie the one heard from last."""
        best: Tunnel | None = None
        for tunnel in self.live(distid):
            if best is None or (tunnel.queue_length, -tunnel.last_seen) < (
                best.queue_length, -best.last_seen
            ):
                best = tunnel
        return best

    def all(self) -> list[Tunnel]:
        """Every registered tunnel (also those re-running a confirmation, see ``confirmed``)."""
        return [t for tunnels in self._by_distid.values() for t in tunnels]

    def distids(self) -> list[str]:
        return list(self._by_distid)

    def count(self, distid: str) -> int:
        return len(self.live(distid))

    def counts(self) -> dict[str, int]:
        """``open``: connections past their 200 header; ``registered``: confirmed at least
        once; ``live``: confirmed now; ``distids``: SAs with a registered tunnel."""
        registered = self.all()
        return {
            "open": len(self._open),
            "registered": len(registered),
            "live": sum(1 for t in registered if t.confirmed),
            "distids": len(self._by_distid),
        }
