"""Reading an XML-RPC call from an untrusted RS: ``xmlrpc.client.loads`` with the holes closed.

``xmlrpc.client.loads`` trusts its input. Its expat parser expands entities declared in a DTD
(a few MiB of ``&a;`` become GiBs of text and seconds of a blocked reactor), its unmarshaller
takes any ``<int>`` Python can convert and any ``<double>`` including ``nan`` and ``inf``, and
it nests values as deep as the body goes (and whatever walks the value later recurses). So the
gate reads calls with the same unmarshaller on an expat parser built here (as defusedxml
does):

* any DTD or entity declaration is refused when expat meets it, whatever the document's
  encoding (UTF-16, behind comments or processing instructions), before any expansion;
* elements nest at most :data:`MAX_DEPTH` deep (refused in the start-element handler);
* integers are 64-bit at most (checked before conversion: no 4300-digit ``int()``), doubles
  finite.

A refusal is a :class:`CallRefused` with a short message; :func:`shown` and :func:`bounded`
keep every value echoed in a fault or a log line short.
"""

from __future__ import annotations

import math
import reprlib
from decimal import Decimal
from typing import Any
from xml.parsers import expat
from xmlrpc import client as xmlrpclib

MAX_DEPTH = 64  # elements; a call needs ~17 (an order's params), each nested value adds 3
MAX_SHOWN = 200  # characters of a value echoed in a fault or a log line
MAX_MESSAGE = 500  # characters of a whole fault message
_INT_LIMIT = 2**63  # <int>/<i8> values in [-2**63, 2**63)
_INT_CHARS = 24  # sign, 19 digits and some leading zeros or blanks; longer is refused unread

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = MAX_SHOWN
_repr.maxother = MAX_SHOWN
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


class CallRefused(ValueError):
    """The body is not a call the gate will read; the message (short) says why."""


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """A repr of ``value`` for a message: bounded in length and in the work to build it."""
    try:
        text = _repr.repr(value)
    except Exception:  # a repr that fails must not turn a fault 400 into a 500
        text = f"<{type(value).__name__}>"
    return bounded(text, limit)


class _Unmarshaller(xmlrpclib.Unmarshaller):
    """xmlrpc.client's unmarshaller with nesting and numbers bounded."""

    dispatch = dict(xmlrpclib.Unmarshaller.dispatch)

    def __init__(self) -> None:
        super().__init__(use_datetime=False, use_builtin_types=False)
        self._depth = 0

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise CallRefused(f"values nested more than {MAX_DEPTH} elements deep")
        super().start(tag, attrs)

    def end(self, tag: str) -> None:
        self._depth -= 1
        super().end(tag)

    def end_int(self, data: str) -> None:
        if len(data) > _INT_CHARS:  # int() of thousands of digits is slow, then refused
            raise CallRefused(f"integer out of range (64 bits at most): {shown(data)}")
        value = int(data)
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise CallRefused(f"integer out of range (64 bits at most): {shown(data)}")
        self.append(value)
        self._value = False

    for _tag in ("i1", "i2", "i4", "i8", "int", "biginteger"):
        dispatch[_tag] = end_int

    def end_double(self, data: str) -> None:
        value = float(data)
        if not math.isfinite(value):  # nan, inf, and 1e400 (which float() makes inf)
            raise CallRefused(f"a double must be finite, got {shown(data)}")
        self.append(value)
        self._value = False

    dispatch["double"] = dispatch["float"] = end_double

    def end_bigdecimal(self, data: str) -> None:
        value = Decimal(data)
        if not value.is_finite():
            raise CallRefused(f"a bigdecimal must be finite, got {shown(data)}")
        self.append(value)
        self._value = False

    dispatch["bigdecimal"] = end_bigdecimal
    del _tag


def _refuse_dtd(*_: object) -> None:
    raise CallRefused("a DTD is not allowed")


def _refuse_entity(*_: object) -> None:
    raise CallRefused("an entity declaration is not allowed")


def parse_call(body: bytes) -> tuple[tuple[Any, ...], str | None]:
    """``(params, methodName)`` of an XML-RPC call, as ``xmlrpc.client.loads`` returns them.

    Raises :class:`CallRefused` for what is refused on purpose, and expat's or the
    unmarshaller's own exceptions (many kinds) for a body that is not XML-RPC.
    """
    target = _Unmarshaller()
    parser = expat.ParserCreate(None, None)
    # Set before the first byte is parsed: a DTD is refused where it starts, so none of its
    # declarations is read and no entity is ever expanded.
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_entity
    parser.UnparsedEntityDeclHandler = _refuse_entity
    parser.ExternalEntityRefHandler = _refuse_entity
    parser.StartElementHandler = target.start
    parser.EndElementHandler = target.end
    parser.CharacterDataHandler = target.data
    target.xml(None, None)  # as xmlrpc.client.ExpatParser: expat already gives str
    parser.Parse(body, True)
    return target.close(), target.getmethodname()


__all__ = ["MAX_DEPTH", "CallRefused", "bounded", "parse_call", "shown"]
