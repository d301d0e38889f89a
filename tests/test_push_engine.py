"""The push engine's life cycle (design.md §5) on a real SQLite store.

The SA side is scripted here with answers taken from the real device captures, so that time
(backoff, deadlines) runs on a ``task.Clock``; the end-to-end tests drive a simulated device
over real TLS instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, task

from armsproxy.arms import framing
from armsproxy.arms.codec import parse_message
from armsproxy.push.client import PushAnswer, PushNoAnswer, PushUnreachable
from armsproxy.push.engine import (
    WAIT_CONFIRMATION,
    WAIT_TUNNEL,
    OrderRejected,
    PushEngine,
    PushSettings,
)
from armsproxy.store.sqlite import SQLiteStore
from armsproxy.tunnel import TunnelAnswer, TunnelRegistry

VECTORS = Path(__file__).parent / "vectors" / "simple"
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
OTHER = "0001-0002-0003-0004-0005-0006-0007-0009"
RESULT_URL = "https://127.0.0.1:8443/arms"


def answer_from(name: str) -> PushAnswer:
    response = framing.parse_sa_push_response((VECTORS / name).read_bytes())
    return PushAnswer(status=response.status, response=response, xml=response.xml,
                      elapsed=0.01, peer_certificate_sha256="")


def done_from(name: str) -> tuple[object, bytes]:
    xml = framing.extract_arms_xml(framing.parse_http_message((VECTORS / name).read_bytes()).body)
    return parse_message(xml), xml


class ScriptedSA:
    """Answers pushes from a script: PushAnswer objects or exceptions, in order."""

    def __init__(self) -> None:
        self.script: list[object] = []
        self.calls: list[dict] = []
        self.gate: defer.Deferred | None = None

    async def push(self, url, *, distribution_id, key, body, pinned_certificate_pem):
        self.calls.append({"url": url, "distid": distribution_id, "key": key, "body": body,
                           "pin": pinned_certificate_pem})
        if self.gate is not None:
            await self.gate
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


class Keys:
    async def sa_key(self, distid):
        return None if distid == "0001-0000-0000-0000-0000-0000-0000-0000" else "harness-rs-key"


@pytest.fixture
def clock():
    return task.Clock()


@pytest_twisted.async_yield_fixture
async def store(tmp_path, clock):
    s = SQLiteStore(tmp_path / "armsproxy.sqlite", clock=clock)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def sa():
    return ScriptedSA()


def make_engine(store, sa, clock, **overrides):
    settings = PushSettings(result_url=RESULT_URL, **overrides)
    return PushEngine(store=store, client=sa, keys=Keys(), clock=clock, settings=settings)


async def until(condition, timeout: float = 5.0) -> None:
    """Wait (on the real reactor: the store works in its own thread) for a condition."""
    from twisted.internet import reactor

    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


async def settle(engine, clock, seconds: float = 0.0, steps: int = 1) -> None:
    """Let the engine run: advance the fake clock, then wait for its work to finish."""
    for _ in range(steps):
        if seconds:
            clock.advance(seconds)
        await engine._pump()
        while engine._in_flight or engine._background:
            await defer.DeferredList(list(engine._in_flight | engine._background),
                                     consumeErrors=True)


async def registered(store, distid=DISTID, endpoint="https://127.0.0.1:18450/"):
    await store.sa_update(distid, push_method="https-simple", push_endpoint=endpoint,
                          confirmed=True, sa_certificate="PEM")


@pytest_twisted.ensureDeferred
async def test_one_way_operation_succeeds_with_decoded_result(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock)
    sa.script.append(answer_from("18-read-module-list.response.txt"))
    op, created = await engine.submit({"distribution_id": DISTID, "operation": "read-module-list"})
    assert created
    await settle(engine, clock)
    done = await store.get(op.operation_id)
    assert done.state == "succeeded"
    assert done.result["modules"][0]["location"] == "harness-module"
    assert sa.calls[0]["url"] == "https://127.0.0.1:18450/" and sa.calls[0]["pin"] == "PEM"
    assert b"<result-url>" not in sa.calls[0]["body"]
    kinds = [e.kind for e in await store.pending_events(10)]
    assert kinds == ["operation.succeeded"]


@pytest_twisted.ensureDeferred
async def test_two_way_started_then_done_commits_result(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock)
    start = answer_from("13-ping-start.response.txt")
    sa.script.append(start)
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "ping",
                                 "params": {"address": "192.0.2.1", "count": 3}})
    await settle(engine, clock)
    started = await store.get(op.operation_id)
    assert started.state == "started" and started.sa_transaction_id == 1511953657
    assert f"<result-url>{RESULT_URL}</result-url>".encode() in sa.calls[0]["body"]
    message, xml = done_from("14-ping-done.request.txt")
    assert await engine.done_request(message, xml, "127.0.0.1:1") == 100
    finished = await store.get(op.operation_id)
    assert finished.state == "succeeded"
    assert finished.result["success"] == 3 and finished.result["failure"] == 0
    assert [e.kind for e in await store.pending_events(10)] == [
        "operation.started", "operation.succeeded"]


@pytest_twisted.ensureDeferred
async def test_done_before_the_start_answer_is_reconciled(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock)
    sa.gate = defer.Deferred()  # the start answer is still "on the wire"
    sa.script.append(answer_from("15-traceroute-start.response.txt"))
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "traceroute",
                                 "params": {"address": "192.0.2.1", "count": 1, "max_hop": 3}})
    pumping = defer.ensureDeferred(settle(engine, clock))
    message, xml = done_from("16-traceroute-done.request.txt")
    assert await engine.done_request(message, xml, "127.0.0.1:1") == 100  # committed first
    assert (await store.get(op.operation_id)).state == "sending"
    sa.gate.callback(None)
    await pumping
    finished = await store.get(op.operation_id)
    assert finished.state == "succeeded"
    assert [h["hop"] for h in finished.result["hops"]] == [1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_per_sa_fifo_and_one_in_flight(store, sa, clock):
    await registered(store)
    await registered(store, OTHER, "https://127.0.0.1:18451/")
    engine = make_engine(store, sa, clock)
    sa.gate = defer.Deferred()
    first, _ = await engine.submit({"distribution_id": DISTID, "operation": "dump-debug"})
    second, _ = await engine.submit({"distribution_id": DISTID, "operation": "reboot"})
    other, _ = await engine.submit({"distribution_id": OTHER, "operation": "dump-debug"})
    sa.script += [answer_from("19-dump-debug.response.txt"),
                  answer_from("19-dump-debug.response.txt"),
                  answer_from("27-reboot.response.txt")]
    await engine._pump()
    await until(lambda: len(sa.calls) == 2)
    # One per SA is being sent; the second order of DISTID waits behind the first.
    assert sorted(c["distid"] for c in sa.calls) == [DISTID, OTHER]
    assert (await store.get(second.operation_id)).state == "queued"
    sa.gate.callback(None)
    sa.gate = None
    await settle(engine, clock)
    assert [c["distid"] for c in sa.calls] == [DISTID, OTHER, DISTID]
    assert b'type="reboot"' in sa.calls[2]["body"]
    for op in (first, second, other):
        assert (await store.get(op.operation_id)).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_unreachable_sa_is_retried_with_backoff_then_fails(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock, max_attempts=3, retry_base=10, retry_cap=100)
    sa.script += [PushUnreachable("connection refused")] * 3
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "check-transaction"})
    await settle(engine, clock)
    queued = await store.get(op.operation_id)
    assert queued.state == "queued" and queued.attempts == 1
    assert 8 <= queued.not_before - clock.seconds() <= 12
    await settle(engine, clock, seconds=5)
    assert len(sa.calls) == 1  # not before the backoff
    await settle(engine, clock, seconds=8)
    assert len(sa.calls) == 2
    await settle(engine, clock, seconds=30)
    failed = await store.get(op.operation_id)
    assert failed.state == "failed" and "gave up after 3 attempts" in failed.last_error
    assert "connection refused" in failed.last_error


@pytest_twisted.ensureDeferred
async def test_sa_busy_goes_back_to_the_queue(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock, busy_delay=30)
    busy = answer_from("17-md-command.response.txt")
    busy_xml = busy.xml.replace(b"<result-code>100<", b"<result-code>302<")
    busy = PushAnswer(status=200, response=busy.response, xml=busy_xml, elapsed=0.0,
                      peer_certificate_sha256="")
    sa.script += [busy, answer_from("17-md-command.response.txt")]
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "md-command",
                                 "params": {"module_id": 1, "command": "show version"}})
    await settle(engine, clock)
    assert (await store.get(op.operation_id)).state == "queued"
    await settle(engine, clock, seconds=31)
    done = await store.get(op.operation_id)
    assert done.state == "succeeded" and len(sa.calls) == 2


@pytest_twisted.ensureDeferred
async def test_side_effects_are_not_resent_when_they_may_have_run(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock)
    sent = PushNoAnswer("closed after the request")
    sent.request_sent = True
    sa.script.append(sent)
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "reboot"})
    await settle(engine, clock)
    failed = await store.get(op.operation_id)
    assert failed.state == "failed" and "may have run" in failed.last_error
    assert len(sa.calls) == 1


@pytest_twisted.ensureDeferred
async def test_deadlines_expire_queued_and_started(store, sa, clock):
    engine = make_engine(store, sa, clock, done_timeout=100, deadline_scan_every=1)
    # No endpoint known: stays queued until its deadline.
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "dump-debug",
                                 "expires_in": 50})
    await settle(engine, clock)
    await registered(store, OTHER)
    sa.script.append(answer_from("11-read-status-start.response.txt"))
    started, _ = await engine.submit({"distribution_id": OTHER, "operation": "read-status",
                                      "params": {"status_requests": [{"id": 1,
                                                                      "param": "cpu"}]}})
    await settle(engine, clock)
    assert (await store.get(started.operation_id)).state == "started"
    await engine._scan_deadlines(clock.seconds() + 60)
    assert (await store.get(op.operation_id)).state == "expired"
    await engine._scan_deadlines(clock.seconds() + 101)
    late = await store.get(started.operation_id)
    assert late.state == "expired" and "no done-request" in late.last_error


@pytest_twisted.ensureDeferred
async def test_one_deadline_scan_pages_through_everything_due(store, sa, clock, monkeypatch):
    """Many deadlines passing at once are read a page at a time (memory stays flat), and one
    scan still expires them all."""
    from armsproxy.push import engine as engine_module

    monkeypatch.setattr(engine_module, "DEADLINE_PAGE", 3)
    engine = make_engine(store, sa, clock)
    pages = []
    past_deadline = store.past_deadline

    async def counted(now, limit=500):
        pages.append(limit)
        return await past_deadline(now, limit=limit)

    monkeypatch.setattr(store, "past_deadline", counted)
    ops = [(await engine.submit({"distribution_id": DISTID, "operation": "dump-debug",
                                 "expires_in": 50}))[0] for _ in range(7)]
    await engine._scan_deadlines(clock.seconds() + 60)
    assert {(await store.get(op.operation_id)).state for op in ops} == {"expired"}
    assert pages == [3, 3, 3]  # 3 + 3 + 1


@pytest_twisted.ensureDeferred
async def test_cancel_only_before_dispatch(store, sa, clock):
    engine = make_engine(store, sa, clock)
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "reboot"})
    calls: list[str] = []
    store.db_hook = calls.append
    assert await engine.cancel(op.operation_id) == (True, "cancelled")
    assert "transition" in calls and "add_events" not in calls  # one commit, event included
    assert await engine.cancel(op.operation_id) == (False, "cancelled")
    assert await engine.cancel("f" * 32) == (False, None)
    (event,) = await store.pending_events(10)
    assert (event.kind, event.distribution_id, event.operation_id) == (
        "operation.cancelled", DISTID, op.operation_id)
    assert event.payload["operation"] == "reboot" and event.payload["state"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_idempotent_submit_and_bad_orders_store_nothing(store, sa, clock):
    engine = make_engine(store, sa, clock)
    order = {"distribution_id": DISTID, "operation": "reboot", "request_id": "rs-1"}
    a, created_a = await engine.submit(order)
    b, created_b = await engine.submit(order)
    assert a.operation_id == b.operation_id and created_a and not created_b
    for bad, field in [
        ({"distribution_id": "0001-0000-1a2b-0105-0000-0000-00c0-ffee", "operation": "reboot"},
         "distribution_id"),
        ({"distribution_id": DISTID, "operation": "explode"}, "operation"),
        ({"distribution_id": DISTID, "operation": "ping", "params": {}}, "address"),
        ({"distribution_id": DISTID, "operation": "configure",
          "params": {"modules": [], "md_configs": []}}, "modules"),
        ({"distribution_id": DISTID, "operation": "reboot", "colour": "red"}, "colour"),
        ({"distribution_id": DISTID, "operation": "reboot", "sa_url": "https://x.example/"},
         "sa_url"),
    ]:
        with pytest.raises(OrderRejected) as err:
            await engine.submit(bad)
        assert field in str(err.value)
    assert len(await store.list_operations()) == 1


@pytest_twisted.ensureDeferred
async def test_restart_resolves_interrupted_operations(store, sa, clock):
    await registered(store)
    await registered(store, OTHER)
    engine = make_engine(store, sa, clock, interrupted_grace=60)

    async def submit(order):  # stored only: no engine runs while "the process is dead"
        return await store.submit(engine.validate_order(order))

    read, _ = await submit({"distribution_id": DISTID, "operation": "read-module-list"})
    boot, _ = await submit({"distribution_id": OTHER, "operation": "reboot"})
    conf, _ = await submit({
        "distribution_id": "0001-0002-0003-0004-0005-0006-0007-000A", "operation": "configure",
        "params": {"modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}],
                   "md_configs": [{"id": 1, "data": "hostname x\n"}]}})
    for op in (read, boot, conf):  # what a killed process leaves behind
        await store.transition(op.operation_id, expect={"queued"}, state="sending")
    fresh = make_engine(store, sa, clock, interrupted_grace=60)
    await fresh.recover()
    assert (await store.get(read.operation_id)).state == "queued"  # read-only: re-sent
    failed = await store.get(boot.operation_id)
    assert failed.state == "failed" and "interrupted" in failed.last_error
    waiting = await store.get(conf.operation_id)
    assert waiting.state == "started" and waiting.sa_transaction_id is None
    # Evidence: the configure-done of that SA shows it ran.
    message, xml = done_from("23-configure-done.request.txt")
    message.distribution_id = "0001-0002-0003-0004-0005-0006-0007-000A"
    assert await fresh.done_request(message, xml, "127.0.0.1:1") == 100
    assert (await store.get(conf.operation_id)).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_configure_rollback_records_both_dones(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock)
    sa.script.append(answer_from("22-configure-start.response.txt"))
    op, _ = await engine.submit({
        "distribution_id": DISTID, "operation": "configure",
        "params": {"modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}],
                   "md_configs": [{"id": 1, "data": "hostname harness-sa-pushed\n"}]}})
    await settle(engine, clock)
    message, xml = done_from("23-configure-done.request.txt")
    message.transaction_result = 100
    await engine.done_request(message, xml, "p")
    message.transaction_result = 414
    await engine.done_request(message, xml, "p")
    final = await store.get(op.operation_id)
    assert final.state == "failed"
    assert [d["transaction_result"] for d in final.result["dones"]] == [100, 414]


@pytest_twisted.ensureDeferred
async def test_unknown_device_fails_without_contacting_it(store, sa, clock):
    distid = "0001-0000-0000-0000-0000-0000-0000-0000"
    await registered(store, distid)
    engine = make_engine(store, sa, clock)
    op, _ = await engine.submit({"distribution_id": distid, "operation": "reboot"})
    await settle(engine, clock)
    assert (await store.get(op.operation_id)).state == "failed"
    assert sa.calls == []


@pytest_twisted.ensureDeferred
async def test_confirmation_done_is_sent_and_retried_within_the_window(store, sa, clock):
    await store.sa_update(DISTID, sa_certificate="PEM")
    engine = make_engine(store, sa, clock, confirmation_retry=3, confirmation_window=55)
    calls: list[str] = []
    store.db_hook = calls.append
    sa.script += [PushUnreachable("listener not open yet"),
                  answer_from("05-push-confirmation-done.response.txt")]
    engine.confirmation_started(DISTID, "https-simple", "https://127.0.0.1:18450/", 5001,
                                "127.0.0.1:5")
    await until(lambda: len(sa.calls) == 1)
    assert b"<transaction-id>5001</transaction-id>" in sa.calls[0]["body"]
    assert sa.calls[0]["pin"] == "PEM"
    clock.advance(3)
    await until(lambda: len(sa.calls) == 2)
    await settle(engine, clock)
    record = await store.sa_get(DISTID)
    assert record.confirmed and record.push_endpoint == "https://127.0.0.1:18450/"
    assert [e.kind for e in await store.pending_events(10)] == ["sa.confirmed"]
    assert "add_events" not in calls  # committed with the registry change


class _Tunnel:
    """What the engine reads of a tunnel (the session's own tests cover the session)."""

    id, peer, path, confirmed = 7, "198.51.100.7:40000", "/arms-tunnel", True
    distid = DISTID

    def info(self) -> dict:
        return {"id": self.id, "distid": self.distid, "peer": self.peer, "path": self.path}


@pytest_twisted.ensureDeferred
async def test_tunnel_up_and_down_commit_registry_and_event_together(store, sa, clock):
    engine = PushEngine(store=store, client=sa, keys=Keys(), clock=clock,
                        settings=PushSettings(result_url=RESULT_URL), tunnels=TunnelRegistry())
    calls: list[str] = []
    store.db_hook = calls.append
    engine.tunnel_up(_Tunnel())
    await settle(engine, clock)
    record = await store.sa_get(DISTID)
    assert record.push_method == "https-tunnel" and record.confirmed
    engine.tunnel_down(_Tunnel(), "zero-size chunk")
    await settle(engine, clock)
    record = await store.sa_get(DISTID)
    assert record.tunnels[-1]["close_reason"] == "zero-size chunk"
    events = await store.pending_events(10)
    assert [(e.kind, e.payload["tunnel_id"]) for e in events] == [
        ("sa.tunnel_up", 7), ("sa.tunnel_down", 7)]
    assert events[1].payload["reason"] == "zero-size chunk"
    assert "add_events" not in calls and calls.count("sa_update") == 2


@pytest_twisted.ensureDeferred
async def test_confirmation_failure_is_reported_after_the_window(store, sa, clock):
    engine = make_engine(store, sa, clock, confirmation_retry=10, confirmation_window=55)
    sa.script += [PushUnreachable("refused")] * 10
    engine.confirmation_started(DISTID, "https-simple", "https://127.0.0.1:18450/", 7,
                                "127.0.0.1:5")
    for attempt in range(1, 7):  # t = 0, 10, ... 50 s; at 60 s the SA has given up
        await until(lambda attempt=attempt: len(sa.calls) == attempt)
        clock.advance(10)
    await until(lambda: not engine._background)
    events = await store.pending_events(10)
    assert [e.kind for e in events] == ["sa.confirmation_failed"]
    assert "refused" in events[0].payload["error"]
    assert not (await store.sa_get(DISTID)).confirmed
    assert len(sa.calls) == 6  # nothing after the SA's 60 s window


# -- orders for an SA that is not reachable wait for it (issue #10) ----------------------

#: Default backoff before the 6th and last attempt: the old code gave up after about this.
OLD_GIVE_UP = 5 + 10 + 20 + 40 + 80
ENDPOINT = "https://127.0.0.1:18450/"


async def running(engine: PushEngine, clock: task.Clock) -> PushEngine:
    """Start the engine as twistd does (recovery, then its tick on the fake clock)."""
    engine.startService()
    await settle(engine, clock)
    return engine


async def long_wait(engine: PushEngine, clock: task.Clock) -> None:
    """Twice the old give-up time, tick by tick."""
    await settle(engine, clock, seconds=10, steps=2 * OLD_GIVE_UP // 10)


def confirms(engine: PushEngine, sa: ScriptedSA, distid: str = DISTID,
             endpoint: str = ENDPOINT) -> None:
    """The SA runs a push confirmation that succeeds (armsproxy's done is answered 100)."""
    sa.script.insert(0, answer_from("05-push-confirmation-done.response.txt"))
    engine.confirmation_started(distid, "https-simple", endpoint, 9, "127.0.0.1:5")


@pytest_twisted.ensureDeferred
async def test_an_order_for_an_unconfirmed_sa_waits_then_goes_when_it_confirms(
        store, sa, clock):
    engine = await running(make_engine(store, sa, clock), clock)
    try:
        op, _ = await engine.submit({"distribution_id": DISTID,
                                     "operation": "read-module-list"})
        await settle(engine, clock)
        calls: list[str] = []
        store.db_hook = calls.append
        await long_wait(engine, clock)
        waiting = await store.get(op.operation_id)
        assert (waiting.state, waiting.attempts, waiting.waiting_for) == (
            "queued", 0, WAIT_CONFIRMATION)
        assert sa.calls == [] and await store.pending_events(10) == []
        # Parked once: the ticks since neither wrote it nor loaded it.
        assert "transition" not in calls and "update" not in calls
        assert await store.next_dispatchable(clock.seconds(), 10) == []
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        confirms(engine, sa)
        await settle(engine, clock)  # at once: the clock does not move
        done = await store.get(op.operation_id)
        assert (done.state, done.attempts, done.waiting_for) == ("succeeded", 1, None)
        assert b'type="read-module-list"' in sa.calls[1]["body"]
        assert sa.calls[1]["url"] == ENDPOINT
    finally:
        await engine.stopService()


@pytest_twisted.ensureDeferred
async def test_an_order_whose_deadline_passes_while_waiting_expires_saying_why(
        store, sa, clock):
    engine = await running(make_engine(store, sa, clock, deadline_scan_every=1), clock)
    try:
        op, _ = await engine.submit({"distribution_id": DISTID, "operation": "reboot",
                                     "expires_in": 3600})
        await settle(engine, clock, seconds=60, steps=59)
        assert (await store.get(op.operation_id)).state == "queued"
        await settle(engine, clock, seconds=60, steps=2)
        expired = await store.get(op.operation_id)
        assert (expired.state, expired.attempts, expired.waiting_for) == ("expired", 0, None)
        assert expired.last_error == ("the SA never became reachable before the order's "
                                      f"deadline (waiting for {WAIT_CONFIRMATION})")
        (event,) = await store.pending_events(10)
        assert event.kind == "operation.expired" and event.payload["error"] == \
            expired.last_error
        assert sa.calls == []
    finally:
        await engine.stopService()


class _LiveTunnel(_Tunnel):
    """A tunnel the engine can send over, answering from captured answers."""

    def __init__(self, *answers: str) -> None:
        self.answers = [answer_from(name).xml for name in answers]
        self.requests: list[bytes] = []
        self.confirmed, self.closed, self.queue_length, self.last_seen = True, False, 0, 0.0

    async def request(self, xml: bytes, *, timeout: float) -> TunnelAnswer:
        self.requests.append(xml)
        body = self.answers.pop(0)
        return TunnelAnswer(body=body, response=parse_message(body), elapsed=0.0)

    def close(self, reason: str) -> None:
        self.closed = True


@pytest_twisted.ensureDeferred
async def test_tunnel_orders_wait_for_a_live_tunnel(store, sa, clock):
    registry = TunnelRegistry()
    engine = await running(PushEngine(
        store=store, client=sa, keys=Keys(), clock=clock,
        settings=PushSettings(result_url=RESULT_URL), tunnels=registry), clock)
    order = {"distribution_id": DISTID, "operation": "read-module-list"}
    try:
        # The SA confirmed over a tunnel before; that tunnel is gone.
        await store.sa_update(DISTID, push_method="https-tunnel", confirmed=True)
        first, _ = await engine.submit(order)
        await long_wait(engine, clock)
        waiting = await store.get(first.operation_id)
        assert (waiting.state, waiting.attempts, waiting.waiting_for) == (
            "queued", 0, WAIT_TUNNEL)
        tunnel = _LiveTunnel(*["18-read-module-list.response.txt"] * 2)
        registry.register(tunnel)
        engine.tunnel_up(tunnel)
        await settle(engine, clock)  # at once
        done = await store.get(first.operation_id)
        assert (done.state, done.attempts) == ("succeeded", 1) and len(tunnel.requests) == 1
        # Re-running its confirmation, the tunnel takes the next order (and sends it when
        # confirmed again, which no hook announces): nothing waits for a tunnel_up.
        tunnel.confirmed = False
        second, _ = await engine.submit(order)
        await settle(engine, clock)
        assert (await store.get(second.operation_id)).state == "succeeded"
        # The tunnel goes down: the next order waits for a new one.
        registry.release(tunnel)
        tunnel.closed = True
        engine.tunnel_down(tunnel, "zero-size chunk")
        third, _ = await engine.submit(order)
        await long_wait(engine, clock)
        waiting = await store.get(third.operation_id)
        assert (waiting.state, waiting.attempts, waiting.waiting_for) == (
            "queued", 0, WAIT_TUNNEL)
        assert sa.calls == [] and len(tunnel.requests) == 2
    finally:
        await engine.stopService()


@pytest_twisted.ensureDeferred
async def test_a_confirmation_releases_the_queue_and_a_failed_one_makes_it_wait(
        store, sa, clock):
    await registered(store)
    engine = await running(make_engine(store, sa, clock), clock)
    order = {"distribution_id": DISTID, "operation": "read-module-list"}
    try:
        # A real try that failed: counted, with its backoff...
        sa.script.append(PushUnreachable("connection refused"))
        first, _ = await engine.submit(order)
        await settle(engine, clock)
        backoff = await store.get(first.operation_id)
        assert (backoff.state, backoff.attempts, backoff.waiting_for) == ("queued", 1, None)
        assert backoff.not_before > clock.seconds()
        # ...cut short when the SA confirms (it listens again): sent at once.
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        confirms(engine, sa)
        await settle(engine, clock)
        assert ((await store.get(first.operation_id)).state,
                (await store.get(first.operation_id)).attempts) == ("succeeded", 2)
        # A confirmation that fails leaves the SA unreachable: orders wait, untried.
        engine.settings.confirmation_window = 0.0
        engine.confirmation_started(DISTID, "https-simple", ENDPOINT, 10, "127.0.0.1:5")
        await settle(engine, clock)
        assert not (await store.sa_get(DISTID)).confirmed
        second, _ = await engine.submit(order)
        await long_wait(engine, clock)
        waiting = await store.get(second.operation_id)
        assert (waiting.state, waiting.attempts, waiting.waiting_for) == (
            "queued", 0, WAIT_CONFIRMATION)
        assert len(sa.calls) == 3
        engine.settings.confirmation_window = 55.0
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        confirms(engine, sa)
        await settle(engine, clock)
        done = await store.get(second.operation_id)
        assert (done.state, done.attempts) == ("succeeded", 1)
        kinds = [e.kind for e in await store.pending_events(10)]
        assert kinds == ["sa.confirmed", "operation.succeeded", "sa.confirmation_failed",
                         "sa.confirmed", "operation.succeeded"]
    finally:
        await engine.stopService()


@pytest_twisted.ensureDeferred
async def test_waiting_orders_survive_a_restart_and_go_when_the_sa_confirms(
        tmp_path, sa, clock):
    path = tmp_path / "restart.sqlite"
    store = SQLiteStore(path, clock=clock)
    await store.open()
    engine = await running(make_engine(store, sa, clock), clock)
    order = {"operation": "read-module-list"}
    mine, _ = await engine.submit({"distribution_id": DISTID, **order})
    other, _ = await engine.submit({"distribution_id": OTHER, **order})
    await settle(engine, clock)
    await engine.stopService()
    await store.close()
    store = SQLiteStore(path, clock=clock)
    await store.open()
    try:
        for op in (mine, other):
            assert (await store.get(op.operation_id)).waiting_for == WAIT_CONFIRMATION
        # OTHER confirmed, but the process stopped before its queue was released: start-up
        # looks at waiting orders again (a stored confirmation counts after a restart).
        await registered(store, OTHER, "https://127.0.0.1:18451/")
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        engine = await running(make_engine(store, sa, clock), clock)
        sent = await store.get(other.operation_id)
        assert (sent.state, sent.attempts) == ("succeeded", 1)
        assert sa.calls[0]["url"] == "https://127.0.0.1:18451/"
        await long_wait(engine, clock)
        waiting = await store.get(mine.operation_id)
        assert (waiting.state, waiting.attempts, waiting.waiting_for) == (
            "queued", 0, WAIT_CONFIRMATION)
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        confirms(engine, sa)
        await settle(engine, clock)
        done = await store.get(mine.operation_id)
        assert (done.state, done.attempts) == ("succeeded", 1)
    finally:
        await engine.stopService()
        await store.close()


# -- the arms.event contract: what real operations emit, against outbox.EVENT_MEMBERS ------


def answered_with(name: str, code: int) -> PushAnswer:
    """A captured answer with its result-code changed."""
    answer = answer_from(name)
    xml = answer.xml.replace(b"<result-code>100<", f"<result-code>{code}<".encode())
    return PushAnswer(status=200, response=answer.response, xml=xml, elapsed=0.0,
                      peer_certificate_sha256="")


@pytest_twisted.ensureDeferred
async def test_emitted_events_have_exactly_the_declared_members(store, sa, clock):
    """Every kind, every conditional member present and absent, from real runs of the
    engine; the README's table is checked against the same declaration (test_docs)."""
    from armsproxy.push.outbox import EVENT_ENVELOPE, EVENT_MEMBERS, event_struct

    await registered(store)
    engine = PushEngine(store=store, client=sa, keys=Keys(), clock=clock,
                        settings=PushSettings(result_url=RESULT_URL, max_attempts=1,
                                              done_timeout=100, deadline_scan_every=1),
                        tunnels=TunnelRegistry())

    async def run(order, *answers):
        sa.script.extend(answers)
        op, _ = await engine.submit({"distribution_id": DISTID, **order})
        await settle(engine, clock)
        return op

    ping = {"operation": "ping", "params": {"address": "192.0.2.1", "count": 3}}
    await run(ping, answer_from("13-ping-start.response.txt"))  # started
    message, xml = done_from("14-ping-done.request.txt")
    await engine.done_request(message, xml, "p")  # succeeded, 2-way
    await run({"operation": "read-module-list"},
              answer_from("18-read-module-list.response.txt"))  # succeeded, 1-way
    unreachable = await run({"operation": "reboot"}, PushUnreachable("refused"))  # failed
    await run({"operation": "md-command", "params": {"module_id": 1, "command": "x"}},
              answered_with("17-md-command.response.txt", 203))  # failed, 1-way answer
    configure = {"operation": "configure", "params": {
        "modules": [{"id": 1, "version": "1.0.1", "location": "harness-module"}]}}
    await run(configure, answer_from("22-configure-start.response.txt"))
    message, xml = done_from("23-configure-done.request.txt")
    message.transaction_result = 100
    await engine.done_request(message, xml, "p")
    message.transaction_result = 414  # rolled back: failed, by a later done
    await engine.done_request(message, xml, "p")
    await run({"operation": "read-status", "params": {"status_requests": [
        {"id": 1, "param": "cpu"}]}}, answer_from("11-read-status-start.response.txt"))
    await engine._scan_deadlines(clock.seconds() + 101)  # expired
    cancelled, _ = await engine.submit({"distribution_id": OTHER, "operation": "reboot"})
    await engine.cancel(cancelled.operation_id)
    sa.script += [answer_from("05-push-confirmation-done.response.txt")]
    engine.confirmation_started(DISTID, "https-simple", "https://127.0.0.1:18450/", 5, "p")
    await until(lambda: not engine._background)
    engine.settings.confirmation_window = 0.0  # the next one fails at once
    engine.confirmation_started(DISTID, "https-simple", "https://127.0.0.1:18450/", 6, "p")
    await until(lambda: not engine._background)
    engine.tunnel_up(_Tunnel())
    engine.tunnel_down(_Tunnel(), "")
    await settle(engine, clock)

    events = [event_struct(e) for e in await store.pending_events(100)]
    seen: dict[str, list[set[str]]] = {}
    for event in events:
        members = EVENT_MEMBERS[event["kind"]]
        have = set(event) - set(EVENT_ENVELOPE)
        assert set(EVENT_ENVELOPE) <= set(event), event
        assert set(members.always) <= have <= set(members.always) | set(members.sometimes), \
            event
        if event["kind"].startswith("operation."):
            assert event["state"] == event["kind"].split(".")[1]
        seen.setdefault(event["kind"], []).append(have)
    assert set(seen) == set(EVENT_MEMBERS)  # every declared kind was emitted
    for kind, members in EVENT_MEMBERS.items():
        for name in members.sometimes:  # each conditional member was seen with and without
            assert any(name in have for have in seen[kind]), (kind, name)
            assert any(name not in have for have in seen[kind]), (kind, name)
    # The device never answered: no result_code (XML-RPC has no nil); the RS reads `error`.
    (never,) = [e for e in events if e.get("operation_id") == unreachable.operation_id]
    assert never["kind"] == "operation.failed" and "result_code" not in never
    later = [e for e in events if e.get("transaction_result") == 414]
    assert [(e["kind"], e["result_code"]) for e in later] == [("operation.failed", 414)]
    assert [e["reason"] for e in events if e["kind"] == "sa.tunnel_down"] == [""]


def test_an_undeclared_event_member_or_kind_is_refused():
    from armsproxy.push.outbox import new_event

    with pytest.raises(ValueError, match="colour"):
        new_event("sa.confirmed", DISTID, method="https-simple", push_endpoint="u", colour=1)
    with pytest.raises(ValueError, match="push_endpoint"):
        new_event("sa.confirmed", DISTID, method="https-simple")
    with pytest.raises(ValueError, match="undeclared event kind"):
        new_event("sa.exploded", DISTID)


# -- orphan done-requests: answered always, stored within bounds -------------------------


async def orphans_of(store, distid=DISTID) -> list[tuple[int, str, int]]:
    rows = await store._run("orphans", lambda c: c.execute(
        "SELECT sa_transaction_id, xml, size FROM orphan_dones WHERE distribution_id = ?"
        " ORDER BY seq", (distid,)).fetchall())
    return [tuple(r) for r in rows]


@pytest_twisted.ensureDeferred
async def test_unclaimed_dones_are_answered_but_only_the_newest_are_kept(store, sa, clock):
    """A device flooding done-requests for transactions nobody started fills no disk; a done
    that overtakes its start answer, the reason orphans exist, is still reconciled."""
    await registered(store)
    engine = make_engine(store, sa, clock, orphan_dones_max_per_sa=4)
    message, xml = done_from("16-traceroute-done.request.txt")
    real_tid = message.transaction_id
    for tid in range(1, 11):
        message.transaction_id = tid
        assert await engine.done_request(message, xml, "p") == 100  # answered, always
    assert [tid for tid, _, _ in await orphans_of(store)] == [7, 8, 9, 10]
    assert engine.stats["done.orphan"] == 10 and engine.stats["done.orphan_dropped"] == 6
    # The race of §7.0.4 after the flood: the newest orphan is the real one, so it stays.
    sa.gate = defer.Deferred()
    sa.script.append(answer_from("15-traceroute-start.response.txt"))
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "traceroute",
                                 "params": {"address": "192.0.2.1", "count": 1, "max_hop": 3}})
    pumping = defer.ensureDeferred(settle(engine, clock))
    message.transaction_id = real_tid
    assert await engine.done_request(message, xml, "p") == 100
    sa.gate.callback(None)
    await pumping
    assert (await store.get(op.operation_id)).state == "succeeded"
    assert [tid for tid, _, _ in await orphans_of(store)] == [8, 9, 10]


@pytest_twisted.ensureDeferred
async def test_unclaimed_dones_expire_on_the_engines_clock(store, sa, clock):
    engine = make_engine(store, sa, clock, orphan_dones_ttl=100, orphan_purge_every=10)
    message, xml = done_from("14-ping-done.request.txt")
    message.distribution_id = OTHER  # an SA that sends nothing afterwards
    await engine.done_request(message, xml, "p")
    clock.advance(50)
    await engine._tick_async()
    assert len(await orphans_of(store, OTHER)) == 1
    clock.advance(51)
    await engine._tick_async()
    assert await orphans_of(store, OTHER) == []
    assert engine.stats["done.orphan_expired"] == 1
    # And each new orphan drops its own SA's expired ones at once, without waiting.
    await engine.done_request(message, xml, "p")
    clock.advance(101)
    message.transaction_id += 1
    await engine.done_request(message, xml, "p")
    assert [tid for tid, _, _ in await orphans_of(store, OTHER)] == [message.transaction_id]


@pytest_twisted.ensureDeferred
async def test_an_oversized_early_done_fails_its_operation_instead_of_being_kept(
        store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock, orphan_done_max_bytes=64)
    sa.gate = defer.Deferred()
    sa.script.append(answer_from("15-traceroute-start.response.txt"))
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "traceroute",
                                 "params": {"address": "192.0.2.1", "count": 1, "max_hop": 3}})
    pumping = defer.ensureDeferred(settle(engine, clock))
    message, xml = done_from("16-traceroute-done.request.txt")
    assert await engine.done_request(message, xml, "p") == 100
    assert await orphans_of(store) == [(message.transaction_id, "", len(xml))]
    assert engine.stats["done.orphan_too_large"] == 1
    sa.gate.callback(None)
    await pumping
    failed = await store.get(op.operation_id)
    assert failed.state == "failed" and "orphan_done_max_bytes" in failed.last_error
    assert await orphans_of(store) == []


def test_orphan_bounds_are_checked():
    for bad in ({"orphan_dones_max_per_sa": 0}, {"orphan_dones_ttl": 0},
                {"orphan_done_max_bytes": -1}):
        with pytest.raises(ValueError, match="orphan"):
            PushSettings(result_url=RESULT_URL, **bad)


def test_the_example_configuration_spells_out_the_orphan_bounds():
    """etc/armsproxy.conf shows the defaults, and config.py reads the keys it documents."""
    from armsproxy.config import load

    cfg = load(Path(__file__).parent.parent / "etc" / "armsproxy.conf")
    defaults = PushSettings(result_url=RESULT_URL)
    assert (cfg.orphan_dones_max_per_sa, cfg.orphan_dones_ttl, cfg.orphan_done_max_bytes) == (
        defaults.orphan_dones_max_per_sa, defaults.orphan_dones_ttl,
        defaults.orphan_done_max_bytes)


# -- CPU per operation (issue #11): store calls, the SA record cache, pulls, log levels -----


def sample(engine: PushEngine, name: str, **labels: str) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest_twisted.ensureDeferred
async def test_an_operation_costs_submit_claim_and_its_answer_and_no_registry_read(
        store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock)
    order = {"distribution_id": DISTID, "operation": "read-module-list"}
    sa.script += [answer_from("18-read-module-list.response.txt")] * 2
    await engine.submit(order)
    await settle(engine, clock)  # the first dispatch reads the SA's record once
    assert engine.sa_records.reads == 1
    calls: list[str] = []
    store.db_hook = calls.append
    op, _ = await engine.submit(order)
    await settle(engine, clock)
    store.db_hook = None
    done = await store.get(op.operation_id)
    assert (done.state, done.attempts) == ("succeeded", 1)
    # Claimed (picked and sent in one call), answered (one transition): no sa_get, no
    # queued -> sending transition of its own, no re-read.
    assert calls.count("submit") == calls.count("transition") == 1, calls
    assert "claim_dispatchable" in calls and "sa_get" not in calls, calls
    assert set(calls) == {"submit", "claim_dispatchable", "transition"}, calls
    assert engine.sa_records.reads == 1 and sa.calls[1]["pin"] == "PEM"


@pytest_twisted.ensureDeferred
async def test_an_expired_head_leaves_sending_untried(store, sa, clock):
    await registered(store)
    engine = make_engine(store, sa, clock, deadline_scan_every=3600)
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "reboot",
                                 "expires_in": 10})
    clock.advance(11)  # no deadline scan ran: the claim finds it late
    await settle(engine, clock)
    expired = await store.get(op.operation_id)
    assert (expired.state, expired.attempts, expired.waiting_for) == ("expired", 0, None)
    assert expired.last_error == "the order's deadline passed before dispatch"
    assert sa.calls == [] and [e.kind for e in await store.pending_events(10)] == [
        "operation.expired"]


@pytest_twisted.ensureDeferred
async def test_registry_changes_reach_the_next_dispatch_without_a_registry_read(
        store, sa, clock):
    """Every registry write goes through the engine's cache: a new endpoint, a confirmation
    that fails, a tunnel, are seen by the next dispatch, which reads no registry."""
    registry = TunnelRegistry()
    engine = await running(PushEngine(
        store=store, client=sa, keys=Keys(), clock=clock,
        settings=PushSettings(result_url=RESULT_URL), tunnels=registry), clock)
    calls: list[str] = []
    store.db_hook = calls.append
    order = {"distribution_id": DISTID, "operation": "read-module-list"}
    try:
        engine.config_relayed(DISTID, "PEM", "192.0.2.7:4000")  # its first pull
        confirms(engine, sa)  # https-simple at ENDPOINT
        await settle(engine, clock)
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        await engine.submit(order)
        await settle(engine, clock)
        assert (sa.calls[-1]["url"], sa.calls[-1]["pin"]) == (ENDPOINT, "PEM")
        # It confirms again, elsewhere: the next order goes there.
        confirms(engine, sa, endpoint="https://127.0.0.1:18451/")
        await settle(engine, clock)
        sa.script.append(answer_from("18-read-module-list.response.txt"))
        await engine.submit(order)
        await settle(engine, clock)
        assert sa.calls[-1]["url"] == "https://127.0.0.1:18451/"
        # A confirmation that fails: the next order waits, untried.
        engine.settings.confirmation_window = 0.0
        engine.confirmation_started(DISTID, "https-simple", ENDPOINT, 11, "192.0.2.7:4001")
        await settle(engine, clock)
        waiting, _ = await engine.submit(order)
        await settle(engine, clock)
        assert (await store.get(waiting.operation_id)).waiting_for == WAIT_CONFIRMATION
        # A tunnel comes up: the waiting order goes over it at once; it goes down: the
        # next order waits for a tunnel (the record now says https-tunnel).
        tunnel = _LiveTunnel("18-read-module-list.response.txt")
        registry.register(tunnel)
        engine.tunnel_up(tunnel)
        await settle(engine, clock)
        assert (await store.get(waiting.operation_id)).state == "succeeded"
        registry.release(tunnel)
        tunnel.closed = True
        engine.tunnel_down(tunnel, "zero-size chunk")
        await settle(engine, clock)
        last, _ = await engine.submit(order)
        await settle(engine, clock)
        assert (await store.get(last.operation_id)).waiting_for == WAIT_TUNNEL
        assert len(sa.calls) == 4 and len(tunnel.requests) == 1  # 2 confirmations, 2 pushes
    finally:
        await engine.stopService()
    # The first write made the record known: the store was read only to confirm, after
    # each of the two parks, that the SA was still unreachable (another proxy sharing the
    # store might have seen it confirm).
    assert calls.count("sa_get") == engine.sa_records.reads == 2, calls


@pytest_twisted.ensureDeferred
async def test_pulls_write_the_registry_only_when_something_changed(store, sa, clock):
    engine = make_engine(store, sa, clock, pull_record_interval=60)
    calls: list[str] = []
    store.db_hook = calls.append

    async def pull(certificate, peer):
        engine.config_relayed(DISTID, certificate, peer)
        await settle(engine, clock)
        return await store.sa_get(DISTID)

    clock.advance(1000)
    record = await pull("PEM-1", "192.0.2.7:4000")
    assert (record.last_pull_at, record.last_peer, record.sa_certificate) == (
        1000, "192.0.2.7:4000", "PEM-1")
    clock.advance(59)  # within the interval: same host (a new port), same or no certificate
    assert await pull("PEM-1", "192.0.2.7:4001") == record
    assert await pull(None, "192.0.2.7:4002") == record
    assert calls.count("sa_update") == 1
    record = await pull("PEM-2", "192.0.2.7:4003")  # a new certificate: at once
    assert (record.last_pull_at, record.sa_certificate) == (1059, "PEM-2")
    record = await pull("PEM-2", "198.51.100.1:5000")  # another host: at once
    assert (record.last_pull_at, record.last_peer) == (1059, "198.51.100.1:5000")
    assert calls.count("sa_update") == 3
    clock.advance(59)
    assert (await pull("PEM-2", "198.51.100.1:5001")).last_pull_at == 1059
    clock.advance(1)  # recorded 60 s ago: written again
    assert (await pull("PEM-2", "198.51.100.1:5002")).last_pull_at == 1119
    assert calls.count("sa_update") == 4
    # A process that has not seen the SA yet writes its first pull.
    fresh = make_engine(store, sa, clock)
    fresh.config_relayed(DISTID, "PEM-2", "198.51.100.1:5003")
    await settle(fresh, clock)
    assert calls.count("sa_update") == 5
    assert engine.sa_records.reads == fresh.sa_records.reads == 0  # pulls read nothing


@pytest_twisted.ensureDeferred
async def test_per_operation_lines_are_debug_and_counted_failures_warn(
        store, sa, clock, logs):
    await registered(store)
    engine = make_engine(store, sa, clock, max_attempts=2, retry_base=1, retry_cap=1)
    sa.script += [answer_from("18-read-module-list.response.txt"),
                  PushUnreachable("connection refused"), PushUnreachable("connection refused")]
    ok, _ = await engine.submit({"distribution_id": DISTID, "operation": "read-module-list",
                                 "request_id": "r-1"})
    await engine.submit({"distribution_id": DISTID, "operation": "read-module-list",
                         "request_id": "r-1"})  # a repeat
    await settle(engine, clock)
    bad, _ = await engine.submit({"distribution_id": DISTID, "operation": "check-transaction"})
    await settle(engine, clock)
    await settle(engine, clock, seconds=2)
    parked, _ = await engine.submit({"distribution_id": OTHER, "operation": "reboot"})
    await settle(engine, clock)
    assert logs.find("push:", ok.operation_id, "succeeded", level="debug")
    assert logs.find("push:", bad.operation_id, "retry in", level="debug")
    assert logs.find("push:", parked.operation_id, "waits for", level="debug")
    assert logs.find("push:", bad.operation_id, "gave up after 2 attempts", level="warn")
    for op in (ok, bad, parked):  # nothing per operation at info
        assert not logs.find(op.operation_id, level="info"), logs.lines("info")
    # What those lines said, counted.
    assert sample(engine, "armsproxy_push_submitted_total", operation="read-module-list",
                  outcome="accepted") == 1
    assert sample(engine, "armsproxy_push_submitted_total", operation="read-module-list",
                  outcome="repeated") == 1
    assert sample(engine, "armsproxy_push_requeued_total", operation="check-transaction",
                  reason="retry") == 1
    assert sample(engine, "armsproxy_push_requeued_total", operation="reboot",
                  reason="waiting") == 1
    assert sample(engine, "armsproxy_push_operations_total", operation="read-module-list",
                  outcome="succeeded", result="1xx") == 1
    assert sample(engine, "armsproxy_push_operations_total", operation="check-transaction",
                  outcome="failed", result="none") == 1


@pytest_twisted.ensureDeferred
async def test_a_done_being_stored_is_answered_before_the_next_tunnel_request(
        store, sa, clock):
    """The SA's done-request and armsproxy's next request share the tunnel: the answer to
    the done goes first (a configure would otherwise drop the tunnel with it unread)."""
    registry = TunnelRegistry()
    engine = PushEngine(store=store, client=sa, keys=Keys(), clock=clock,
                        settings=PushSettings(result_url=RESULT_URL), tunnels=registry)
    tunnel = _LiveTunnel("18-read-module-list.response.txt")
    answered: list[int] = []
    seen_at_request: list[list[int]] = []
    request = tunnel.request

    async def recording(xml, *, timeout):
        seen_at_request.append(list(answered))
        return await request(xml, timeout=timeout)

    tunnel.request = recording
    registry.register(tunnel)
    engine.tunnel_up(tunnel)  # the SA's record is known: dispatch makes no store read
    await settle(engine, clock)
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "read-module-list"})
    message, xml = done_from("14-ping-done.request.txt")  # for a transaction not started here
    message.distribution_id = DISTID
    done = defer.ensureDeferred(engine.done_request(message, xml, "p"))
    done.addCallback(answered.append)  # the gate writes the answer here
    pumping = defer.ensureDeferred(engine._pump())  # claims while the done is being stored
    from twisted.internet import reactor

    for _ in range(500):
        if seen_at_request:
            break
        clock.advance(0)  # the engine's reactor turn after the answer
        await task.deferLater(reactor, 0.005, lambda: None)
    await pumping
    await settle(engine, clock)
    assert seen_at_request == [[100]]  # the request saw the answer already written
    assert (await store.get(op.operation_id)).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_a_stop_before_the_request_went_out_gives_the_claim_back(store, sa, clock):
    """Claimed, not sent yet (here: the RS is slow to give the key): stopping puts it back in
    its queue untried, instead of leaving it `sending` for the next start to fail."""
    await registered(store)

    class SlowKeys:
        asked = 0

        async def sa_key(self, distid):
            SlowKeys.asked += 1
            await defer.Deferred()  # never answers: cancelled by the stop

    engine = PushEngine(store=store, client=sa, keys=SlowKeys(), clock=clock,
                        settings=PushSettings(result_url=RESULT_URL))
    engine.startService()
    op, _ = await engine.submit({"distribution_id": DISTID, "operation": "reboot"})
    await until(lambda: SlowKeys.asked == 1)
    assert (await store.get(op.operation_id)).state == "sending"
    await engine.stopService()
    back = await store.get(op.operation_id)
    assert (back.state, back.attempts, back.waiting_for) == ("queued", 0, None)
    assert sa.calls == [] and await store.pending_events(10) == []


@pytest_twisted.ensureDeferred
async def test_a_confirmation_seen_by_another_proxy_releases_the_order_here(store, sa, clock):
    """Two engines on one store (proxies sharing a database): B sees the SA confirm and
    releases its waiting order; A, whose copy of the record still says unconfirmed, claims
    it, reads the store before letting it wait again, and sends it."""
    here = make_engine(store, sa, clock)
    there = make_engine(store, sa, clock)
    op, _ = await here.submit({"distribution_id": DISTID, "operation": "read-module-list"})
    await settle(here, clock)
    assert (await store.get(op.operation_id)).waiting_for == WAIT_CONFIRMATION
    confirms(there, sa)
    await settle(there, clock)
    assert (await store.get(op.operation_id)).waiting_for is None  # released by B
    sa.script.append(answer_from("18-read-module-list.response.txt"))
    await settle(here, clock, steps=3)  # parked again on its stale copy, then re-read
    done = await store.get(op.operation_id)
    assert (done.state, done.attempts) == ("succeeded", 1)
    assert sa.calls[-1]["url"] == ENDPOINT
