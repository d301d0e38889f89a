"""The RS gate's fast XML-RPC paths say exactly what the slow ones say.

``xmlrpc_parse.parse_call`` reads plain calls with lxml and everything else with expat and
xmlrpc.client's unmarshaller; ``xmlrpc_write.dumps_response`` writes answers without
xmlrpc.client's marshaller. Both are checked here against the reference, value for value and
error for error, on generated calls and on bodies cut, spliced and decorated.
"""

from __future__ import annotations

import random
import time
import xmlrpc.client
from typing import Any

import pytest

from armsproxy.rs_gate import xmlrpc_parse
from armsproxy.rs_gate.gate import status_struct
from armsproxy.rs_gate.xmlrpc_parse import MAX_DEPTH, parse_call
from armsproxy.rs_gate.xmlrpc_write import dumps_response
from armsproxy.store.model import Operation

TEXTS = ["", " ", "plain", "a<b>&c", "line\nbreak", "tab\there", "\u00e9t\u00e9 \u65e5\u672c",
         "  padded  ", "0001-0002-0003-0004-0005-0006-0007-0008", "&amp;", "]]>", "\r\n"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "bool", "double", "binary"] + (["struct", "array"] * 2
                                                           if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return rng.choice(TEXTS)
    if kind == "int":
        return rng.choice([0, 1, -1, 42, 2**31 - 1, -(2**31), rng.randint(-1000, 1000)])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "double":
        return rng.choice([0.0, 1.5, -2.25, 1e300])
    if kind == "binary":
        return xmlrpc.client.Binary(bytes(rng.randrange(256) for _ in range(rng.randrange(8))))
    if kind == "struct":
        return {rng.choice([*TEXTS, "k1", "k2", "states"]): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def _outcome(parse: Any, body: bytes) -> Any:
    try:
        return ("ok", parse(body))
    except Exception as e:  # the kind and the words are what the gate turns into a fault
        return ("error", type(e), str(e))


def _same(body: bytes) -> None:
    assert _outcome(parse_call, body) == _outcome(xmlrpc_parse._parse_expat, body), body


def test_generated_calls_read_the_same_both_ways():
    rng = random.Random(11)
    for _ in range(400):
        params = tuple(_value(rng) for _ in range(rng.randrange(3)))
        body = xmlrpc.client.dumps(params, rng.choice(["push.submit", "push.list", "x"]))
        _same(body.encode("utf-8"))
        _same(body.replace("<?xml version='1.0'?>\n", "").encode("utf-8"))


def test_the_orders_of_the_bench_take_the_plain_path(monkeypatch):
    order = {"distribution_id": "0001-0002-0003-0004-0005-0006-0007-0008",
             "operation": "read-status", "request_id": "r-1",
             "params": {"status_requests": [{"id": 1, "param": "cpu"}]}}
    bodies = [xmlrpc.client.dumps((order,), "push.submit").encode(),
              xmlrpc.client.dumps(({"states": ["queued"], "limit": 1000},), "push.list").encode()]
    monkeypatch.setattr(xmlrpc_parse, "_parse_expat", None)  # would fail if reached
    assert parse_call(bodies[0]) == ((order,), "push.submit")
    assert parse_call(bodies[1]) == (({"states": ["queued"], "limit": 1000},), "push.list")


@pytest.mark.parametrize("body", [
    b"",
    b"<methodCall>",
    b"<methodCall><methodName>m</methodName></methodCall>",
    b"<methodCall><methodName>m</methodName><params/></methodCall>",
    b"<methodCall><params><param><value>1</value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><int>1</int><int>2</int>"
    b"</value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><int> 7 </int></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><int>99999999999999999999"
    b"</int></value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><int>1.5</int></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><boolean>2</boolean>"
    b"</value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><struct><member><value>"
    b"<int>1</int></value></member></struct></value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><struct><member><name>a"
    b"</name><value>1</value></member><member><name>a</name><value>2</value></member>"
    b"</struct></value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><array><data><value>x"
    b"</value></data><data/></array></value></param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><nil/></value></param>"
    b"</params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><foo>1</foo></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value>a<?pi x?>b</value></param>"
    b"</params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value>a<!-- c -->b</value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value><![CDATA[<x>]]></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value>&undefined;</value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>m</methodName><params><param><value>&#65;&lt;</value>"
    b"</param></params></methodCall>",
    b"<x:methodCall xmlns:x='u'><methodName>m</methodName></x:methodCall>",
    b"<methodCall xmlns='u'><methodName>m</methodName></methodCall>",
    b"<methodCall><methodName>m</methodName></methodCall><trailing/>",
    b"<?xml version='1.1'?><methodCall><methodName>m</methodName></methodCall>",
    b"<?xml version='1.0' encoding='latin-1'?><methodCall><methodName>\xe9</methodName>"
    b"</methodCall>",
    b"<?xml version='1.0' encoding='UTF-8'?><methodCall><methodName>\xc3\xa9</methodName>"
    b"</methodCall>",
    b"<methodCall><methodName>\xff</methodName></methodCall>",
    b"\xef\xbb\xbf<methodCall><methodName>m</methodName></methodCall>",
    "<methodCall><methodName>m</methodName></methodCall>".encode("utf-16"),
    b"<methodCall><methodName>m</methodName><params><param><value a='1'>x</value></param>"
    b"</params></methodCall>",
    b"<methodCall>\r\n<methodName>m\r\n</methodName><params><param><value>a\rb</value>"
    b"</param></params></methodCall>",
])
def test_unusual_bodies_read_the_same_both_ways(body):
    _same(body)


def test_cut_bodies_read_the_same_both_ways():
    body = xmlrpc.client.dumps(({"a": [1, "x", {"b": True}], "c": "d&e"},), "m").encode()
    for end in range(0, len(body), 3):
        _same(body[:end])


def test_depth_is_left_to_the_unmarshaller_near_the_limit():
    for depth in range(MAX_DEPTH // 3 - 3, MAX_DEPTH // 3 + 2):
        inner = "<value><array><data>" * depth + "</data></array></value>" * depth
        _same(("<methodCall><methodName>m</methodName><params><param>" + inner
               + "</param></params></methodCall>").encode())


def _reference(value: Any) -> Any:
    try:
        return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=False)
    except Exception as e:
        return ("error", type(e), str(e))


def _written(value: Any) -> Any:
    try:
        return dumps_response(value)
    except Exception as e:
        return ("error", type(e), str(e))


def test_answers_are_written_as_xmlrpc_client_writes_them():
    rng = random.Random(12)
    for _ in range(400):
        value = _value(rng)
        assert _written(value) == _reference(value)
    for odd in [None, 2**31, -(2**31) - 1, {"a": None}, {1: 2}, [object()], b"raw",
                xmlrpc.client.DateTime(0), (1, "two"), {"k": (True, 0.5)}]:
        assert _written(odd) == _reference(odd), odd
    nested: list[Any] = []
    for _ in range(150):
        nested = [nested]
    assert _written(nested) == _reference(nested)


def test_a_status_page_is_written_as_xmlrpc_client_writes_it():
    now = time.time()
    ops = [Operation(
        operation_id=f"{i:032x}", request_id=None if i % 2 else f"r<{i}>",
        distribution_id="0001-0002-0003-0004-0005-0006-0007-0008", operation="ping",
        params={}, sa_url=None, method=None, state="failed", attempts=i, created_at=now,
        updated_at=now + i, not_before=now, expires_at=None if i % 3 else now + 60,
        done_deadline=None, sa_transaction_id=2**40 if i == 3 else i, start_result_code=100,
        transaction_result=None, result_code=None, last_error="bad \x00 & <worse>",
        result=None) for i in range(5)]
    page = {"operations": [status_struct(op) for op in ops], "next_offset": 5}
    assert dumps_response(page) == _reference(page)
