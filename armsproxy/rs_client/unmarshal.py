"""XML-RPC responses -> Python values, as ``xmlrpc.client.loads(data, use_builtin_types=True)``.

Why not just that: the stdlib unmarshaller runs three Python callbacks per element and one per
line of text through expat, ~120 µs for a config-solicitation answer carrying a certificate
and its key, the largest single cost of a pull after the TLS handshake. libxml2 (lxml) builds
the tree in C and the walk below touches each value once: about a quarter of that.

Only the plain shapes are read here: ``methodResponse`` / ``params`` / ``param`` / ``value``
with the standard types. Anything else (a comment inside a value, a DTD, namespaced extension
types such as ``ex:nil``, a member without its name first, a value that does not parse, a
fault struct with other members) goes to the stdlib, whose answer (or exception) is then the
answer: the result is always exactly what ``xmlrpc.client.loads`` gives.
"""

from __future__ import annotations

import base64
import datetime
import xmlrpc.client
from typing import Any

from lxml import etree

__all__ = ["loads"]

# Nothing from the network, no DTD (a document with one goes to the stdlib), no entities.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=False, collect_ids=False)
_INTEGERS = frozenset({"int", "i4", "i8", "i1", "i2", "biginteger"})
_FAULT_KEYS = frozenset({"faultCode", "faultString"})


class _Unusual(Exception):
    """Not a shape this reader takes: the stdlib decides."""


def loads(data: bytes) -> tuple[tuple[Any, ...], str | None]:
    """``(params, methodname)`` of an XML-RPC response, exactly as
    ``xmlrpc.client.loads(data, use_builtin_types=True)``; raises what it raises
    (``xmlrpc.client.Fault`` for a fault)."""
    try:
        params = _read(data)
    except _Fault as fault:
        raise xmlrpc.client.Fault(**fault.struct) from None
    except Exception:  # _Unusual, a syntax error, a bad number, deep recursion: the stdlib's
        return xmlrpc.client.loads(data, use_builtin_types=True)
    return params, None


class _Fault(Exception):
    def __init__(self, struct: dict[str, Any]) -> None:
        super().__init__()
        self.struct = struct


def _read(data: bytes) -> tuple[Any, ...]:
    root = etree.fromstring(data, _PARSER)
    if root.tag != "methodResponse" or root.getroottree().docinfo.doctype or len(root) != 1:
        raise _Unusual
    node = root[0]
    if node.tag == "params":
        values = []
        for param in node:
            if param.tag != "param" or len(param) != 1:
                raise _Unusual
            values.append(_value(param[0]))
        return tuple(values)
    if node.tag == "fault" and len(node) == 1:
        struct = _value(node[0])
        if isinstance(struct, dict) and struct.keys() == _FAULT_KEYS:
            raise _Fault(struct)
    raise _Unusual


def _text(el: etree._Element) -> str:
    if len(el):  # a comment or an element inside: the stdlib's way of joining text decides
        raise _Unusual
    return el.text or ""


def _value(v: etree._Element) -> Any:
    """One ``<value>``. Text beside elements is ignored, as the stdlib ignores it (it keeps
    only the text of a value without a type, and of the typed element)."""
    if v.tag != "value":
        raise _Unusual
    n = len(v)
    if not n:
        return v.text or ""  # a value without a type is a string
    if n != 1:
        raise _Unusual
    t = v[0]
    tag = t.tag
    if tag == "string":
        if len(t):
            raise _Unusual
        return t.text or ""
    if tag == "struct":
        struct: dict[str, Any] = {}
        for member in t:
            if member.tag != "member" or len(member) != 2:
                raise _Unusual
            name, value = member
            if name.tag != "name" or len(name):
                raise _Unusual
            struct[name.text or ""] = _value(value)
        return struct
    if tag == "array":
        if len(t) != 1 or t[0].tag != "data":
            raise _Unusual
        return [_value(item) for item in t[0]]
    if tag in _INTEGERS:
        return int(_text(t))
    if tag == "boolean":
        flag = _text(t)
        if flag not in ("0", "1"):
            raise _Unusual
        return flag == "1"
    if tag == "double" or tag == "float":
        return float(_text(t))
    if tag == "base64":
        return base64.decodebytes(_text(t).encode("ascii"))
    if tag == "dateTime.iso8601":
        return datetime.datetime.strptime(_text(t), "%Y%m%dT%H:%M:%S")
    if tag == "nil" and not len(t) and not (t.text or ""):
        return None
    raise _Unusual
