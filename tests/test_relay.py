"""PullRelay without sockets: what one pull costs (serialised and guarded once), and what it
counts and logs (per-pull outcomes are counters and debug lines, not info lines).

The end-to-end behaviour (real TLS, a real XML-RPC RS) is in test_sa_gate.py.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task

from armsproxy.arms import codec, guard
from armsproxy.rs_client import KeyCache
from armsproxy.sa_gate import relay as relay_module
from armsproxy.sa_gate.protocol import GateRequest
from armsproxy.sa_gate.relay import PullRelay, RelaySettings

VECTORS = Path(__file__).resolve().parent / "vectors" / "simple"
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
PUBLIC_URL = "https://192.0.2.10:8443/arms"


def body_of(name: str) -> bytes:
    return (VECTORS / name).read_bytes().partition(b"\r\n\r\n")[2]


CONFIG_XML = body_of("02-config-solicitation.request.txt")
METHOD_QUERY_XML = body_of("03-push-method-query.request.txt")
CONFIG_ANSWER: dict[str, Any] = {
    "result_code": 100,
    "sa_certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    "push_port": 10443,
    "heartbeats": [{"host": "192.0.2.1", "port": 18447, "passphrase": "hb", "interval": 60}],
    "modules": [{"id": 1, "version": "1.0.0", "location": "m"}],
}


class FakeRS:
    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {
            "config_solicitation": dict(CONFIG_ANSWER),
            "push_method_query": {"result_code": 100, "methods": ["https-simple"]},
            "push_confirmation": {"result_code": 100},
        }
        self.key_lookups = 0

    async def sa_key(self, distid: str) -> str | None:
        self.key_lookups += 1
        return KEY if distid == DISTID else None

    async def config_solicitation(self, distid: str, info: dict) -> dict:
        return self.answers["config_solicitation"]

    async def push_method_query(self, distid: str, info: dict) -> dict:
        return self.answers["push_method_query"]

    async def push_confirmation(self, distid: str, info: dict) -> dict:
        return self.answers["push_confirmation"]


class Hooks:
    def __init__(self) -> None:
        self.relayed: list[tuple[str, str | None]] = []

    def config_relayed(self, distid: str, sa_certificate: str | None, peer: str) -> None:
        self.relayed.append((distid, sa_certificate))

    def confirmation_started(self, *args: Any) -> None:
        pass

    async def done_request(self, *args: Any) -> int:
        return 100


def make_relay() -> tuple[PullRelay, FakeRS, Hooks, KeyCache]:
    clock = task.Clock()
    rs = FakeRS()
    hooks = Hooks()
    keys = KeyCache(rs, clock)
    relay = PullRelay(rs=rs, keys=keys, settings=RelaySettings(public_urls=[PUBLIC_URL]),
                      clock=clock, hooks=hooks)
    return relay, rs, hooks, keys


def request(xml: bytes) -> GateRequest:
    token = base64.b64encode(f"{DISTID}:{KEY}".encode()).decode()
    return GateRequest(method="POST", target="/arms", version="HTTP/1.0",
                       headers=[("Authorization", f"Basic {token}")], body=xml,
                       peer="192.0.2.9:40000")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often a pull serialises a message and runs the device guard over it."""
    calls = {"serialise": 0, "guard": 0}
    real_serialise, real_problems = codec.serialise, guard.problems

    def serialise(*args: Any, **kwargs: Any) -> bytes:
        calls["serialise"] += 1
        return real_serialise(*args, **kwargs)

    def problems(*args: Any, **kwargs: Any) -> list[str]:
        calls["guard"] += 1
        return real_problems(*args, **kwargs)

    monkeypatch.setattr(relay_module, "serialise", serialise)
    monkeypatch.setattr(guard, "problems", problems)
    return calls


@pytest_twisted.ensureDeferred
async def test_a_config_solicitation_is_serialised_and_guarded_once(counted):
    relay, _, hooks, _ = make_relay()
    answer = await relay.handle(request(CONFIG_XML))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"<rs-pull-server-url>" + PUBLIC_URL.encode() in answer
    assert hooks.relayed == [(DISTID, CONFIG_ANSWER["sa_certificate"])]
    # Once: before the side effect (the hook), and those very bytes are sent.
    assert counted == {"serialise": 1, "guard": 1}


@pytest_twisted.ensureDeferred
async def test_other_pulls_are_serialised_once_too(counted):
    relay, _, _, _ = make_relay()
    assert (await relay.handle(request(METHOD_QUERY_XML))).startswith(b"HTTP/1.1 200 ")
    assert counted == {"serialise": 1, "guard": 1}


@pytest_twisted.ensureDeferred
async def test_an_unsafe_config_answer_is_refused_before_the_hook(counted):
    relay, rs, hooks, _ = make_relay()
    rs.answers["config_solicitation"] = dict(CONFIG_ANSWER, heartbeats=[])
    answer = await relay.handle(request(CONFIG_XML))
    assert b"<result-code>301</result-code>" in answer
    assert hooks.relayed == []
    assert relay.stats["refused.unsafe_answer"] == 1


@pytest_twisted.ensureDeferred
async def test_a_known_key_is_checked_without_the_rs_and_counted(logs):
    relay, rs, _, keys = make_relay()
    for _ in range(3):
        assert (await relay.handle(request(CONFIG_XML))).startswith(b"HTTP/1.1 200 ")
    assert rs.key_lookups == 1  # fetched once, then matched from the cache
    assert keys.matches_cached(DISTID, KEY) and not keys.matches_cached(DISTID, "wrong")
    assert relay.stats["request.config-solicitation"] == 3
    # A pull that goes well writes no log line above debug.
    assert not [e for e in logs.events if e["log_level"].name not in ("debug",)
                and e.get("log_namespace", "").startswith("armsproxy.")]


@pytest.mark.parametrize("method,xml", [
    ("config_solicitation", CONFIG_XML), ("push_method_query", METHOD_QUERY_XML),
])
@pytest_twisted.ensureDeferred
async def test_a_code_the_rs_chose_is_counted_and_logged_at_debug(logs, method, xml):
    relay, rs, _, _ = make_relay()
    rs.answers[method] = {"result_code": 503}
    answer = await relay.handle(request(xml))
    assert b"<result-code>503</result-code>" in answer
    assert relay.stats["rs.declined"] == 1
    assert logs.find("RS answered", DISTID, "503", level="debug")
    assert not logs.find("RS answered", level="info")


class SlowRS(FakeRS):
    """An RS whose config-solicitation answers when the test says; ``call_timeout`` as
    RSClient offers it (None: an RS that promises nothing)."""

    def __init__(self, call_timeout: float | None) -> None:
        super().__init__()
        if call_timeout is not None:
            self.call_timeout = call_timeout
        self.pending: list[Any] = []

    async def config_solicitation(self, distid: str, info: dict) -> dict:
        from twisted.internet import defer

        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return await d


@pytest.mark.parametrize(("call_timeout", "budget_timer"), [(15.0, False), (20.0, False),
                                                            (25.0, True), (None, True)])
def test_the_budget_timer_only_when_the_rs_may_outlast_it(call_timeout, budget_timer):
    from twisted.internet import defer

    clock = task.Clock()
    rs = SlowRS(call_timeout)
    keys = KeyCache(rs, clock)
    relay = PullRelay(rs=rs, keys=keys, settings=RelaySettings(public_urls=[PUBLIC_URL]),
                      clock=clock, relay_budget=20.0)
    pull = request(CONFIG_XML)
    pull.received_at = clock.seconds()
    keys._store(DISTID, keys._entry_for(KEY))  # a known SA: no key lookup
    d = defer.ensureDeferred(relay.handle(pull))
    assert rs.pending and not d.called
    assert len(clock.getDelayedCalls()) == (1 if budget_timer else 0)
    if budget_timer:
        clock.advance(20.0)  # the budget: the device is told to come back (301)
        assert d.called
        answer = d.result
        assert answer.startswith(b"HTTP/1.1 200 ") and b"<result-code>301<" in answer
    else:
        rs.pending[0].callback(dict(CONFIG_ANSWER))
        assert d.called and b"<result-code>100<" in d.result
