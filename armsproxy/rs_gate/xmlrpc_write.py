"""Writing the RS gate's answers: ``xmlrpc.client.dumps``' bytes, in a fraction of its time.

Every push costs a ``push.submit`` answer and a share of the RS's ``push.list`` polls, whose
answers are arrays of status structs; ``xmlrpc.client``'s marshaller (a method call and a
dispatch look-up per value, a memo per container) was the largest part of the gate's CPU per
push after parsing (bench/push.py). :func:`dumps_response` writes the same text for the
types the gate answers with (dict, list, tuple, str, int, bool, float, ``Binary``) and hands
anything else, whole, to ``xmlrpc.client`` - so what it writes, and what it refuses, never
differs (tests/test_rs_gate.py compares the two).
"""

from __future__ import annotations

import base64
from typing import Any
from xmlrpc import client as xmlrpclib

__all__ = ["dumps_response"]

_HEAD = "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n"
_TAIL = "</param>\n</params>\n</methodResponse>\n"
_MAX_DEPTH = 100  # deeper (or a cycle): xmlrpc.client itself decides


class _Unusual(Exception):
    """A value the fast path does not write: xmlrpc.client writes (or refuses) the answer."""


def _escape(text: str) -> str:
    """xmlrpc.client.escape: &, < and > only."""
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


def _scalar(value: Any) -> str | None:
    """The ``<value>`` line of a str, int, float or bool; None for anything else."""
    kind = type(value)
    if kind is str:
        return f"<value><string>{_escape(value)}</string></value>\n"
    if kind is int:
        if not xmlrpclib.MININT <= value <= xmlrpclib.MAXINT:
            raise _Unusual  # xmlrpc.client raises its OverflowError
        return f"<value><int>{value}</int></value>\n"
    if kind is float:
        return f"<value><double>{value!r}</double></value>\n"
    if kind is bool:
        return ("<value><boolean>1</boolean></value>\n" if value
                else "<value><boolean>0</boolean></value>\n")
    return None


def _dump(value: Any, out: list[str], depth: int) -> None:
    line = _scalar(value)
    if line is not None:
        out.append(line)
        return
    kind = type(value)
    if depth > _MAX_DEPTH:
        raise _Unusual
    if kind is dict:
        out.append("<value><struct>\n")
        _members(value, out, depth)
        out.append("</struct></value>\n")
    elif kind is list or kind is tuple:
        out.append("<value><array><data>\n")
        for item in value:
            _dump(item, out, depth + 1)
        out.append("</data></array></value>\n")
    elif kind is xmlrpclib.Binary:
        out.append("<value><base64>\n")
        out.append(base64.encodebytes(value.data).decode("ascii"))
        out.append("</base64></value>\n")
    else:
        raise _Unusual


def _members(struct: dict[Any, Any], out: list[str], depth: int) -> None:
    """A struct's members; strings and small ints (most of them) written inline, in one
    piece each: a status struct has sixteen, and a poll answers twenty of them."""
    names = _NAMES
    for key, item in struct.items():
        name = names.get(key) if type(key) is str else None
        if name is None:
            if type(key) is not str:
                raise _Unusual
            name = f"<member>\n<name>{_escape(key)}</name>\n"
            if len(names) < _MAX_NAMES:
                names[key] = name
        kind = type(item)
        if kind is str:
            if "&" in item or "<" in item or ">" in item:
                item = _escape(item)
            out.append(f"{name}<value><string>{item}</string></value>\n</member>\n")
        elif kind is int and xmlrpclib.MININT <= item <= xmlrpclib.MAXINT:
            out.append(f"{name}<value><int>{item}</int></value>\n</member>\n")
        else:
            out.append(name)
            _dump(item, out, depth + 1)
            out.append("</member>\n")


#: Member names seen, as written (the gate's structs use a few dozen names, over and over).
_NAMES: dict[str, str] = {}
_MAX_NAMES = 1024


def dumps_response(value: Any) -> str:
    """``xmlrpc.client.dumps((value,), methodresponse=True, allow_none=False)``."""
    out = [_HEAD]
    try:
        _dump(value, out, 0)
    except _Unusual:
        return xmlrpclib.dumps((value,), methodresponse=True, allow_none=False)
    out.append(_TAIL)
    return "".join(out)
