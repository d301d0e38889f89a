"""The RS client's XML-RPC response reader gives exactly what ``xmlrpc.client.loads`` gives.

It reads the plain shapes with lxml (a quarter of the stdlib's time for a config answer with a
certificate) and leaves everything else to the stdlib; either way the value, or the exception,
must be the stdlib's own.
"""

from __future__ import annotations

import datetime
import random
import xmlrpc.client
from typing import Any

import pytest

from armsproxy.rs_client import unmarshal
from armsproxy.rs_client.client import RSFault, RSProtocolError, _unmarshal


def outcome(fn: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "value", fn(data)
    except Exception as e:  # compared by type and text
        return type(e).__name__, str(e)


def stdlib(data: bytes) -> Any:
    return xmlrpc.client.loads(data, use_builtin_types=True)


def same(data: bytes) -> tuple[str, Any]:
    ours, theirs = outcome(unmarshal.loads, data), outcome(stdlib, data)
    assert repr(ours) == repr(theirs), data  # repr: nan is not equal to itself
    return ours


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "str", "bool", "float", "bytes", "none", "datetime"]
    if depth < 4:
        kinds += ["list", "dict"] * 2
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-2**31, 2**31 - 1)
    if kind == "str":
        alphabet = "ab <>&'\"\n\r\t é€-----BEGIN"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.uniform(-1e9, 1e9)
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 60))
    if kind == "none":
        return None
    if kind == "datetime":
        return datetime.datetime(2026, 12, 4, rng.randint(0, 23), rng.randint(0, 59), 7)
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {f"k{i}{rng.choice('xyz')}": random_value(rng, depth + 1)
            for i in range(rng.randint(0, 5))}


def test_random_answers_read_the_same_and_take_the_fast_path(monkeypatch):
    rng = random.Random(11)
    cases = []
    for _ in range(300):
        value = random_value(rng)
        data = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode()
        cases.append((data, stdlib(data)))
    # Not once to the stdlib: these are the shapes every RS sends.
    monkeypatch.setattr(xmlrpc.client, "loads", lambda *a, **k: pytest.fail("fell back"))
    for data, expected in cases:
        assert unmarshal.loads(data) == expected


def test_a_fault_is_the_stdlibs_fault():
    data = xmlrpc.client.dumps(xmlrpc.client.Fault(404, "unknown distribution id")).encode()
    kind, text = same(data)
    assert kind == "Fault" and "404" in text
    with pytest.raises(RSFault) as raised:
        _unmarshal(data)
    assert raised.value.code == 404 and raised.value.message == "unknown distribution id"


def response(value_xml: str) -> bytes:
    return (f"<?xml version='1.0'?><methodResponse><params><param>{value_xml}</param></params>"
            "</methodResponse>").encode()


@pytest.mark.parametrize("value_xml", [
    "<value>untyped</value>",
    "<value>  </value>",
    "<value/>",
    "<value><string/></string></value>",
    "<value><string></string></value>",
    "<value>  <int> 42 </int>\n</value>",
    "<value>ignored<int>7</int>also ignored</value>",
    "<value><i8>9007199254740993</i8></value>",
    "<value><int>1_000</int></value>",
    "<value><int></int></value>",
    "<value><int>x</int></value>",
    "<value><boolean>1</boolean></value>",
    "<value><boolean>true</boolean></value>",
    "<value><boolean> 1</boolean></value>",
    "<value><double>1e3</double></value>",
    "<value><double>nan</double></value>",
    "<value><base64>aGVsbG8=</base64></value>",
    "<value><base64>!!</base64></value>",
    "<value><dateTime.iso8601>20261204T12:00:07</dateTime.iso8601></value>",
    "<value><dateTime.iso8601>2026-12-04</dateTime.iso8601></value>",
    "<value><nil/></value>",
    "<value><nil>x</nil></value>",
    "<value><ex:nil xmlns:ex='http://ws.apache.org/xmlrpc/namespaces/extensions'/></value>",
    "<value><ex:i8>5</ex:i8></value>",
    "<value><string>a<!-- c -->b</string></value>",
    "<value>a<!-- c -->b</value>",
    "<value><string>a&amp;b&#233;</string></value>",
    "<value><string><![CDATA[<x>]]></string></value>",
    "<value><array><data/></array></value>",
    "<value><array></array></value>",
    "<value><array><data><value>1</value><value><int>2</int></value></data></array></value>",
    "<value><struct/></value>",
    "<value><struct><member><name>a</name><value>1</value></member>"
    "<member><name>a</name><value>2</value></member></struct></value>",
    "<value><struct><member><value>1</value><name>a</name></member></struct></value>",
    "<value><struct><member><name>a</name></member></struct></value>",
    "<value><struct>text<member><name>a</name><value>1</value></member></struct></value>",
    "<value><unknown>1</unknown></value>",
    "<value><int>1</int><int>2</int></value>",
    "<notvalue>1</notvalue>",
])
def test_edge_cases_match_the_stdlib(value_xml):
    same(response(value_xml))


@pytest.mark.parametrize("data", [
    b"",
    b"not xml",
    b"<methodResponse><params><param><value>1</value></param></params>",
    b"<methodResponse><params/></methodResponse>",
    b"<methodResponse/>",
    b"<methodCall><methodName>x</methodName><params/></methodCall>",
    b"<methodResponse><params><param><value>1</value></param><param><value>2</value></param>"
    b"</params></methodResponse>",
    b"<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>1"
    b"</int></value></member></struct></value></fault></methodResponse>",
    b"<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>1"
    b"</int></value></member><member><name>faultString</name><value>x</value></member>"
    b"<member><name>extra</name><value>y</value></member></struct></value></fault>"
    b"</methodResponse>",
    b"<?xml version='1.0'?><!DOCTYPE m [<!ENTITY e 'entity'>]><methodResponse><params><param>"
    b"<value>&e;</value></param></params></methodResponse>",
    b"<?xml version='1.0' encoding='iso-8859-1'?><methodResponse><params><param><value>"
    b"caf\xe9</value></param></params></methodResponse>",
    b"\xef\xbb\xbf<methodResponse><params><param><value>bom</value></param></params>"
    b"</methodResponse>",
    b"<methodResponse><params><param><value>1</value></param></params></methodResponse>junk",
    b"<methodResponse>" + b"<params><param>" + b"<value><array><data>" * 300
    + b"</data></array></value>" * 300 + b"</param></params></methodResponse>",
])
def test_documents_match_the_stdlib(data):
    same(data)


def test_a_malformed_answer_is_still_a_protocol_error():
    with pytest.raises(RSProtocolError, match="malformed XML-RPC response"):
        _unmarshal(b"<methodResponse><params><param><value><int>x</int></value></param>"
                   b"</params></methodResponse>")
