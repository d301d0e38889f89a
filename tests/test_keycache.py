"""The key cache's memory per SA (every SA with a tunnel has an entry): a slotted entry, and
one time object shared by the fetches of a burst, which never makes an entry last longer."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task

from armsproxy.rs_client.keycache import KeyCache

SAS = [f"0001-0002-0003-0004-0005-0006-0007-{i:04X}" for i in range(3)]


class _RS:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def sa_key(self, distid: str) -> str:
        self.calls.append(distid)
        return "key-" + distid


@pytest_twisted.ensureDeferred
async def test_a_burst_of_fetches_shares_its_time_and_never_lasts_longer():
    clock = task.Clock()
    clock.advance(1000)
    rs = _RS()
    cache = KeyCache(rs, clock, ttl=300.0, negative_ttl=32.0, refetch_min_interval=16.0)
    assert await cache.check(SAS[0], "key-" + SAS[0])
    clock.advance(0.5)  # within a sixteenth of the shortest interval (16 s): shared
    assert await cache.check(SAS[1], "key-" + SAS[1])
    clock.advance(1.0)  # past it: a time of its own
    assert await cache.check(SAS[2], "key-" + SAS[2])
    first, second, third = (cache._entries[d] for d in SAS)
    assert not hasattr(first, "__dict__")
    assert second.fetched_at is first.fetched_at is first.last_fetch == 1000.0
    assert third.fetched_at == 1001.5
    # The second entry expires with the first (0.5 s early), never later than its own ttl.
    clock.advance(300 - 1.5)
    assert not cache.matches_cached(SAS[1], "key-" + SAS[1])
    assert cache.matches_cached(SAS[2], "key-" + SAS[2])
    assert await cache.check(SAS[1], "key-" + SAS[1]) and rs.calls.count(SAS[1]) == 2
