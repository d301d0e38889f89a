"""The RS gate against hostile XML-RPC: DTDs and entities, numbers XML-RPC cannot mean, deep
nesting and huge values (issue #9). Real sockets, the real engine and a real SQLite store, as in
test_rs_gate (whose fixtures these tests share).

Each case must end in fault 400 with a short message and one log line, store nothing, and
leave the reactor free: none may be a fault 500, a stored order, or seconds of parsing.
"""

from __future__ import annotations

import math
import resource
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from armsproxy.push.engine import OrderRejected
from armsproxy.rs_gate.xmlrpc_parse import MAX_DEPTH
from tests import test_rs_gate as base
from tests.test_rs_gate import PING, count_operations, port_of, post, raw_http

# test_rs_gate's fixtures, shared (assigned, not imported: pytest finds them by name).
clock = base.clock
store = base.store
push_client = base.push_client
gate = base.gate
url = base.url

MAX_FAULT = 500  # characters: the gate's bound on a fault message
MAX_LOG_LINE = 1000  # characters: a fault's log line is the message plus peer and method


def laughs(refs: int, prolog: bytes = b"", encoding: str | None = None) -> bytes:
    """A push.submit whose distribution_id is one 256-character entity referenced ``refs``
    times: 3 bytes of body become 256 characters of text for each reference."""
    declaration = b'<?xml version="1.0"?>' if encoding is None else \
        b'<?xml version="1.0" encoding="%s"?>' % encoding.encode()
    body = (declaration + prolog + b'<!DOCTYPE m [<!ENTITY a "' + b"A" * 256 + b'">]>'
            b"<methodCall><methodName>push.submit</methodName><params><param><value>"
            b"<struct><member><name>distribution_id</name><value>" + b"&a;" * refs +
            b"</value></member></struct></value></param></params></methodCall>")
    return body if encoding is None else body.decode("ascii").encode(encoding)


def submit_with_expires_in(value: str) -> bytes:
    """A valid ping order whose ``expires_in`` is the XML ``value`` (xmlrpc.client would not
    write nan or a 400-digit int, so it is spliced in)."""
    body = xmlrpc.client.dumps((dict(PING, expires_in=1.5),), "push.submit")
    return body.replace("<double>1.5</double>", value).encode()


def list_with_states(value: str) -> bytes:
    """push.list({states: value}) with ``value`` as raw XML."""
    return ("<methodCall><methodName>push.list</methodName><params><param><value><struct>"
            f"<member><name>states</name>{value}</member></struct></value></param></params>"
            "</methodCall>").encode()


def nested_arrays(depth: int) -> str:
    return "<value><array><data>" * depth + "</data></array></value>" * depth


async def raw_fault(url: str, body: bytes) -> xmlrpc.client.Fault:
    """POST ``body`` as is; the answer must be HTTP 200 carrying a fault."""
    answer = await threads.deferToThread(raw_http, port_of(url), post(body))
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    with pytest.raises(xmlrpc.client.Fault) as info:
        xmlrpc.client.loads(content)
    return info.value


@contextmanager
def reactor_watch() -> Iterator[dict[str, float]]:
    """The longest the reactor went without running a 10 ms heartbeat, and the growth of this
    process's peak resident memory (MiB), while the block runs."""
    seen = {"gap": 0.0, "peak_mib": 0.0}
    last = [reactor.seconds()]

    def beat() -> None:
        now = reactor.seconds()
        seen["gap"] = max(seen["gap"], now - last[0])
        last[0] = now

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    heartbeat = task.LoopingCall(beat)
    heartbeat.start(0.01)
    try:
        yield seen
    finally:
        heartbeat.stop()
        beat()
        seen["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024


def assert_refused(f: xmlrpc.client.Fault, *needles: str, code: int = 400) -> None:
    assert f.faultCode == code, f.faultString[:300]
    assert len(f.faultString) <= MAX_FAULT
    for needle in needles:
        assert needle in f.faultString


def fault_lines(logs) -> list[str]:
    lines = logs.find("rs gate:", ": fault ")
    assert all(len(line) <= MAX_LOG_LINE for line in lines), max(map(len, lines))
    return lines


# ---------------------------------------------------------------------------------------------
# DTDs and entities
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_dtd_is_refused_whatever_hides_it_and_before_any_expansion(url, store, logs):
    bodies = [
        laughs(3),
        laughs(3, prolog=b"<!-- <methodCall> -->"),  # the old check looked before this only
        laughs(3, prolog=b'<?pi <methodCall?><!-- a comment -->'),
        laughs(3, encoding="utf-16"),  # with BOM: no b"<!DOCTYPE" in the bytes
        laughs(3, encoding="utf-16")[2:],  # no BOM: expat reads the encoding from "<\0?\0"
        b"<!DOCTYPE m SYSTEM 'file:///etc/passwd'><methodCall><methodName>&x;</methodName>"
        b"</methodCall>",
    ]
    for body in bodies:
        assert_refused(await raw_fault(url, body), "cannot read the XML-RPC call",
                       "a DTD is not allowed")
    assert len(fault_lines(logs)) == len(bodies)
    assert await count_operations(store) == 0


@pytest_twisted.ensureDeferred
async def test_billion_laughs_neither_blocks_the_reactor_nor_grows_memory(url, store, logs):
    # The call: 3.9 MiB, one entity referenced 1.35M times; it took 5.7 s of reactor
    # and 1.1 GiB when expanded. Refused at <!DOCTYPE, it takes well under a millisecond.
    body = laughs(1_350_000, prolog=b"<!-- <methodCall> -->")
    assert len(body) > 3.8 * 2**20
    with reactor_watch() as seen:
        f = await raw_fault(url, body)
    assert_refused(f, "a DTD is not allowed")
    assert seen["gap"] < 1.0, seen
    assert seen["peak_mib"] < 200, seen
    utf16 = laughs(600_000, encoding="utf-16")  # 3.4 MiB
    with reactor_watch() as seen:
        f = await raw_fault(url, utf16)
    assert_refused(f, "a DTD is not allowed")
    assert seen["gap"] < 1.0 and seen["peak_mib"] < 200, seen
    assert len(fault_lines(logs)) == 2
    assert await count_operations(store) == 0


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("<double>nan</double>", "a double must be finite, got 'nan'"),
        ("<double>NaN</double>", "a double must be finite"),
        ("<double>Infinity</double>", "a double must be finite"),
        ("<double>-inf</double>", "a double must be finite"),
        ("<double>1e400</double>", "a double must be finite, got '1e400'"),  # float(): inf
        ("<bigdecimal>NaN</bigdecimal>", "a bigdecimal must be finite"),
        ("<int>1" + "0" * 400 + "</int>", "integer out of range (64 bits at most)"),
        ("<i8>-1" + "0" * 5000 + "</i8>", "integer out of range"),  # past int()'s 4300 digits
        ("<int>9223372036854775808</int>", "integer out of range"),  # 2**63
        ("<i8>1000000000000000000</i8>", "expires_in"),  # 64-bit, but past 10 years
    ],
)
@pytest_twisted.ensureDeferred
async def test_expires_in_that_is_no_number_of_seconds_is_refused(url, store, logs, value,
                                                                   named):
    assert_refused(await raw_fault(url, submit_with_expires_in(value)), named)
    assert len(fault_lines(logs)) == 1
    assert await count_operations(store) == 0


async def xmlrpc_call_raw(url: str, body: bytes) -> object:
    """POST ``body`` as is; the answer's one value."""
    answer = await threads.deferToThread(raw_http, port_of(url), post(body))
    return xmlrpc.client.loads(answer.partition(b"\r\n\r\n")[2])[0][0]


def list_since(value: str) -> bytes:
    """push.list({since: value}) with ``value`` as raw XML."""
    return xmlrpc.client.dumps(({"since": 0},), "push.list").replace(
        "<int>0</int>", value).encode()


@pytest_twisted.ensureDeferred
async def test_filter_times_must_be_plausible_epoch_seconds(url, store, logs):
    # 10**400 was a fault 500 (OverflowError in math.isfinite); the others were queried.
    assert_refused(await raw_fault(url, list_since("<int>1" + "0" * 400 + "</int>")),
                   "integer out of range")
    for value in ("<i8>9223372036854775807</i8>", "<double>1e300</double>"):
        assert_refused(await raw_fault(url, list_since(value)), "filter.since: epoch seconds")
    assert len(fault_lines(logs)) == 3
    # Numbers within range still pass, as <i8> too.
    operation_id = await xmlrpc_call_raw(url, submit_with_expires_in("<i8>3600</i8>"))
    assert (await store.get(operation_id)).expires_at == 1_700_000_000.0 + 3600
    answer = await xmlrpc_call_raw(url, list_since("<i8>-1000000000000000</i8>"))
    assert [op["operation_id"] for op in answer["operations"]] == [operation_id]


def test_the_engine_refuses_non_finite_and_huge_expires_in(gate):
    # Behind the gate too: NaN was stored as NULL (never expires), 10**400 was a fault 500.
    for value in (math.nan, math.inf, 10**400, 1e18):
        with pytest.raises(OrderRejected, match="expires_in"):
            gate.engine.validate_order(dict(PING, expires_in=value))


# ---------------------------------------------------------------------------------------------
# Nesting and sizes
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_deep_nesting_is_refused_while_parsing(url, logs):
    # 60k deep was a RecursionError (fault 500, its message in the log line).
    with reactor_watch() as seen:
        f = await raw_fault(url, list_with_states(nested_arrays(60_000)))
    assert_refused(f, f"values nested more than {MAX_DEPTH} elements deep")
    assert seen["gap"] < 1.0, seen
    # Just past the bound: refused; well within it: read, then refused by push.list itself.
    f = await raw_fault(url, list_with_states(nested_arrays(21)))
    assert_refused(f, "nested more than")
    f = await raw_fault(url, list_with_states(nested_arrays(15)))
    assert_refused(f, "filter.states: a non-empty array of states expected", "[[[")
    assert len(fault_lines(logs)) == 3
    assert not logs.find("internal error")


@pytest.mark.parametrize(
    ("method", "args", "named", "code"),
    [
        ("push.list", ({"states": ["x" * 3_000_000]},), "filter.states", 400),
        ("push.list", ({"k" * 3_000_000: 1},), "filter: unknown key(s) kkk", 400),
        ("sa.list", ({"confirmed": "y" * 3_000_000},), "filter.confirmed", 400),
        ("sa.status", ("z" * 3_000_000,), "distribution_id", 400),
        ("push.submit", (dict(PING, operation="o" * 3_000_000),), "operation: one of", 400),
        ("m" * 3_000_000, (), "no such method 'mmm", -32601),
    ],
)
@pytest_twisted.ensureDeferred
async def test_fault_messages_and_log_lines_are_bounded(url, store, logs, method, args, named,
                                                        code):
    # A 3 MiB value came back as a 3 MiB fault and a 3 MiB log line.
    body = xmlrpc.client.dumps(args, method).encode()
    f = await raw_fault(url, body)
    assert_refused(f, named, code=code)
    assert "\u2026" in f.faultString or "..." in f.faultString  # the cut is marked
    assert len(fault_lines(logs)) == 1
    assert await count_operations(store) == 0


# ---------------------------------------------------------------------------------------------
# Large but valid calls
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_large_valid_call_is_parsed_off_the_reactor(url, logs):
    # 3.9 MiB of 104k small values: some 350 ms of expat callbacks, which used to run on the
    # reactor thread and hold every device's pull behind them.
    states = "".join("<value><string>queued</string></value>" for _ in range(104_000))
    body = ("<?xml version='1.0'?><methodCall><methodName>push.list</methodName><params>"
            "<param><value><struct><member><name>states</name><value><array><data>"
            f"{states}</data></array></value></member></struct></value></param></params>"
            "</methodCall>").encode()
    assert len(body) > 3.7 * 2**20
    with reactor_watch() as seen:
        answer = await threads.deferToThread(raw_http, port_of(url), post(body))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"<name>operations</name>" in answer  # parsed and answered, not refused
    # The heartbeat runs every 10 ms; a parse on the reactor thread stops it for ~350 ms.
    assert seen["gap"] < 0.1, seen
