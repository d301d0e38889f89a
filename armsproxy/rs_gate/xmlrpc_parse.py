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

The calls an RS makes all day (``push.submit``, ``push.list``: plain UTF-8 or ASCII, strings,
ints, structs, arrays) are read first by libxml2 (lxml) and a walk over the few elements, a
third of the Python work of expat's callbacks (bench/push.py). That path takes only bodies
with no ``<!`` at all (so no DTD, entity declaration, comment or CDATA), no processing
instruction but a plain XML declaration, and the elements and types above in their canonical
shape; on anything else, and on any error, the body is read again as above, so what is
accepted, refused and said stays exactly what expat and the unmarshaller make of it.
"""

from __future__ import annotations

import math
import re
import reprlib
import threading
from decimal import Decimal
from typing import Any
from xml.parsers import expat
from xmlrpc import client as xmlrpclib

from lxml import etree

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
    if len(body) <= FAST_MAX_BYTES:
        try:
            return _parse_plain(body)
        except _NotPlain:
            pass
    return _parse_expat(body)


def _parse_expat(body: bytes) -> tuple[tuple[Any, ...], str | None]:
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


# -- the plain path ----------------------------------------------------------------------------

#: Bodies up to this size may take the plain path (larger ones are parsed in a thread by the
#: gate, where the expat path keeps its thread-free parser per call).
FAST_MAX_BYTES = 32 * 1024
_PLAIN_DECLARATION = re.compile(
    rb"""<\?xml version=(["'])1\.0\1(?: encoding=(["'])(?i:utf-8|us-ascii)\2)?\s*\?>""")
_PLAIN_START = re.compile(rb"\s*<methodCall>")


class _NotPlain(Exception):
    """Not for the plain path: the expat path reads the body (and says what is wrong)."""


class _Parsers(threading.local):
    """An lxml parser per thread (lxml parsers are not to be shared between threads)."""

    def __init__(self) -> None:
        self.parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                      huge_tree=False, collect_ids=False)


_parsers = _Parsers()


def _parse_plain(body: bytes) -> tuple[tuple[Any, ...], str | None]:
    # What the walk below must never see, refused unread: markup declarations, CDATA and
    # comments ("<!"), processing instructions (but the declaration) and other encodings.
    if b"<!" in body or b"\x00" in body:
        raise _NotPlain
    declaration = _PLAIN_DECLARATION.match(body)
    start = declaration.end() if declaration is not None else 0
    if b"<?" in body[start:] or _PLAIN_START.match(body, start) is None:
        raise _NotPlain
    try:
        root = etree.fromstring(body, _parsers.parser)
    except (etree.XMLSyntaxError, ValueError):
        raise _NotPlain from None
    # <methodCall><methodName>NAME</methodName><params><param><value>...</value></param>...
    # </params></methodCall>; <params> may be missing (no arguments).
    if root.tag != "methodCall" or not 1 <= len(root) <= 2:
        raise _NotPlain
    name_element = root[0]
    if name_element.tag != "methodName" or len(name_element):
        raise _NotPlain
    values: list[Any] = []
    if len(root) == 2:
        params = root[1]
        if params.tag != "params":
            raise _NotPlain
        for param in params:
            if param.tag != "param" or len(param) != 1:
                raise _NotPlain
            values.append(_plain_value(param[0], 4))  # methodCall/params/param/value
    return tuple(values), name_element.text or ""


def _plain_value(element: Any, depth: int) -> Any:
    """One ``<value>`` (the ``depth``-th element down), as the unmarshaller reads it;
    _NotPlain for anything unusual, and for any value whose elements could reach MAX_DEPTH."""
    if element.tag != "value" or depth + 3 > MAX_DEPTH:  # value/struct/member/name
        raise _NotPlain
    count = len(element)
    if count == 0:
        return element.text or ""  # a value without a type is a string
    if count != 1:
        raise _NotPlain
    typed = element[0]
    tag = typed.tag
    if tag == "struct":
        struct: dict[str, Any] = {}
        for member in typed:
            if member.tag != "member" or len(member) != 2:
                raise _NotPlain
            name, value = member[0], member[1]
            if name.tag != "name" or len(name):
                raise _NotPlain
            struct[name.text or ""] = _plain_value(value, depth + 3)
        return struct
    if tag == "array":
        if len(typed) != 1:
            raise _NotPlain
        data = typed[0]
        if data.tag != "data":
            raise _NotPlain
        return [_plain_value(item, depth + 3) for item in data]
    if len(typed):
        raise _NotPlain
    text = typed.text or ""
    if tag == "string":
        return text
    if tag in ("int", "i4"):
        if len(text) > _INT_CHARS:
            raise _NotPlain
        try:
            number = int(text)
        except ValueError:
            raise _NotPlain from None
        if not -_INT_LIMIT <= number < _INT_LIMIT:
            raise _NotPlain
        return number
    if tag == "boolean" and text in ("0", "1"):
        return text == "1"
    raise _NotPlain  # double, base64, dateTime, nil, ...: rare, left to the unmarshaller


__all__ = ["MAX_DEPTH", "CallRefused", "bounded", "parse_call", "shown"]
