"""The push engine's SA record cache on a real SQLite store: write-through, bounded, and never
older than the last committed write."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from armsproxy.push.sa_cache import SACache
from armsproxy.store.sqlite import SQLiteStore

SA_A = "0001-0000-1A2B-0105-0000-0000-0000-000A"
SA_B = "0001-0000-1A2B-0105-0000-0000-0000-000B"
SA_C = "0001-0000-1A2B-0105-0000-0000-0000-000C"


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    clock = task.Clock()
    clock.advance(1000)
    s = SQLiteStore(tmp_path / "store.db", reactor=reactor, clock=clock)
    await s.open()
    calls: list[str] = []
    s.db_hook = calls.append
    s.calls = calls  # type: ignore[attr-defined]
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_a_write_is_kept_and_read_without_the_store(store):
    cache = SACache(store)
    written = await cache.update(SA_A, push_method="https-simple", confirmed=True,
                                 push_endpoint="https://192.0.2.1/")
    assert written == await store.sa_get(SA_A)  # the whole record, as stored
    store.calls.clear()
    assert await cache.get(SA_A) == written and cache.peek(SA_A) == written
    assert store.calls == [] and cache.reads == 0
    # An SA never written is read once; "not in the registry" is remembered too.
    assert await cache.get(SA_B) is None and await cache.get(SA_B) is None
    assert store.calls == ["sa_get"] and cache.reads == 1
    assert cache.peek(SA_C) is None and store.calls == ["sa_get"]  # peek never reads


@pytest_twisted.ensureDeferred
async def test_it_is_bounded_least_recently_used_first(store):
    cache = SACache(store, size=2)
    for sa in (SA_A, SA_B):
        await cache.update(sa, last_peer="192.0.2.1:1")
    await cache.get(SA_A)  # A used last: B goes first
    await cache.update(SA_C, last_peer="192.0.2.1:1")
    assert len(cache) == 2 and cache.peek(SA_B) is None and cache.reads == 0
    assert (await cache.get(SA_B)).last_peer == "192.0.2.1:1" and cache.reads == 1
    with pytest.raises(ValueError):
        SACache(store, size=0)


@pytest_twisted.ensureDeferred
async def test_a_read_never_lands_over_a_newer_write(store):
    """Writes and misses of one SA take turns: a miss waiting behind a write takes its
    record, and concurrent writes leave the last one's."""
    cache = SACache(store)
    calls = [defer.ensureDeferred(cache.update(SA_A, last_peer=f"192.0.2.1:{i}"))
             for i in range(5)]
    read = defer.ensureDeferred(cache.get(SA_A))
    written = await defer.gatherResults(calls)
    assert await read == written[-1] == await store.sa_get(SA_A)
    assert cache.peek(SA_A).last_peer == "192.0.2.1:4" and cache.reads == 0
    assert cache._locks == {}  # no lock left once nothing waits


@pytest_twisted.ensureDeferred
async def test_a_failed_write_forgets_the_record(store):
    cache = SACache(store)
    await cache.update(SA_A, last_peer="192.0.2.1:1")
    with pytest.raises(TypeError):  # the event cannot be stored: nothing committed
        await cache.update(SA_A, last_peer="192.0.2.1:2",
                           events=[{"kind": "sa.confirmed", "distribution_id": SA_A,
                                    "payload": {"x": object()}}])
    assert cache.peek(SA_A) is None
    assert (await cache.get(SA_A)).last_peer == "192.0.2.1:1" and cache.reads == 1
    assert cache._locks == {}


@pytest_twisted.ensureDeferred
async def test_an_entry_is_trusted_for_its_ttl_then_read_again(store):
    """Other proxies sharing the store write the registry too: a copy older than the ttl is
    read again; ``fresh`` always reads; ``peek`` (deciding whether to write) takes any age."""
    clock = task.Clock()
    cache = SACache(store, clock=clock, ttl=30)
    first = await cache.update(SA_A, last_peer="192.0.2.1:1")
    await store.sa_update(SA_A, last_peer="198.51.100.1:1")  # "another proxy"
    clock.advance(29)
    assert await cache.get(SA_A) == first and cache.reads == 0
    clock.advance(1)
    assert (await cache.get(SA_A)).last_peer == "198.51.100.1:1" and cache.reads == 1
    await store.sa_update(SA_A, last_peer="203.0.113.1:1")
    assert (await cache.fresh(SA_A)).last_peer == "203.0.113.1:1" and cache.reads == 2
    clock.advance(3600)
    assert cache.peek(SA_A).last_peer == "203.0.113.1:1" and cache.reads == 2
    with pytest.raises(ValueError):
        SACache(store, ttl=30)  # a ttl needs a clock


@pytest_twisted.ensureDeferred
async def test_an_entry_keeps_the_closed_tunnels_and_the_callers_strings(store):
    """An entry costs little: live tunnels are the registry's (not kept), the strings the
    caller wrote are its own objects, and a record read is a copy the caller may change."""
    cache = SACache(store)
    peer = "".join(["192.0.2.1:", "4433"])  # an object of its own, equal to the stored one
    live = {"id": 7, "distid": SA_A, "peer": peer, "path": "/arms-tunnel", "opened_at": 1.0,
            "confirmed_at": 2.0, "confirmed": True, "queue_length": 0, "state": "ready"}
    closed = dict(live, id=6, closed_at=3.0, close_reason="echo timeout")
    written = await cache.update(SA_A, tunnels=[live, closed], push_method="https-tunnel",
                                 confirmed=True, last_peer=peer)
    assert written.tunnels == [live, closed]  # update returns the store's whole record
    copy = await cache.get(SA_A)
    assert copy.tunnels == [closed] and copy.last_peer is peer
    assert copy == dataclasses.replace(written, tunnels=[closed])
    copy.tunnels.clear()
    copy.last_peer = "elsewhere"
    assert cache.peek(SA_A).tunnels == [closed] and cache.peek(SA_A).last_peer is peer
    assert (await cache.fresh(SA_A)).tunnels == [live, closed]  # the store keeps them all


@pytest_twisted.ensureDeferred
async def test_entries_stored_in_a_burst_share_their_stamp_and_never_last_longer(store):
    clock = task.Clock()
    clock.advance(1000)
    cache = SACache(store, clock=clock, ttl=32)
    await cache.update(SA_A, last_peer="192.0.2.1:1")
    clock.advance(1)  # within a sixteenth of the ttl (2 s): the first one's stamp
    await cache.update(SA_B, last_peer="192.0.2.1:2")
    assert cache._records[SA_A][0] is cache._records[SA_B][0] == 1000.0
    clock.advance(31)  # 32 s after A, 31 after B: both read again (B 1 s early)
    assert (await cache.get(SA_B)).last_peer == "192.0.2.1:2" and cache.reads == 1
