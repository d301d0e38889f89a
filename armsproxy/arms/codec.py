"""Bytes <-> ARMS messages: hardened parsing in, device-safe serialisation out.

Incoming bytes come from the network (devices, or anyone who can reach port 443), so the
parser refuses DTDs, entities, network access, non-ASCII, encodings other than US-ASCII and
UTF-8, oversize and over-deep documents, and documents with more elements or attributes than
any ARMS message has, before lxml builds anything large: what one request costs the reactor
stays small whatever it holds. Outgoing bytes must survive libarms' expat walker (§3.1), so
serialisation is ASCII with character references and every message passes ``guard``.
"""

from __future__ import annotations

import re
import threading

from lxml import etree

from . import guard, schema
from .messages import ArmsMessage, DecodeError, decode_element

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DEPTH = 16
#: The largest captured message has 20 elements and 6 attributes; a traceroute-done of 255
#: hops or a module list of a thousand modules still fits. Each limit bounds what parsing,
#: the XSD run (and its error log, one entry per stray attribute) and decoding cost.
MAX_ELEMENTS = 4096
MAX_ATTRIBUTES = 4096  # namespace declarations included
#: On one element; ARMS elements carry at most 4. Checked on the bytes, before libxml2 spends
#: tens of milliseconds on one start tag of 1 MiB.
MAX_ELEMENT_ATTRIBUTES = 32
#: Declared encodings that decode 7-bit bytes as themselves (the parser decodes UTF-8 anyway).
ENCODINGS = frozenset({"us-ascii", "ascii", "utf-8"})
XML_DECLARATION = b'<?xml version="1.0" encoding="US-ASCII"?>\n'
MAX_DETAIL = 300  # characters of a MessageError's detail

_FORBIDDEN_MARKUP = re.compile(rb"<!(?:DOCTYPE|ENTITY)", re.IGNORECASE)
_DECLARATION_START = re.compile(rb"<\?xml\s[^>]*")
_NON_ASCII_BYTE = re.compile(rb"[\x80-\xff]")
_NON_ASCII_CHAR = re.compile(r"[^\x00-\x7f]")
_ENCODING = re.compile(rb"""\sencoding\s*=\s*(["'])(.*?)\1""", re.DOTALL)
# A start tag with more than MAX_ELEMENT_ATTRIBUTES name="value" pairs. Outside its quoted
# values a start tag holds no <, >, = or quote, so each repetition is exactly one attribute
# (or xmlns declaration) and the search is linear in the bytes between two "<".
_CROWDED_TAG = re.compile(
    rb"""<[A-Za-z_:][^<>="']*(?:=\s*(?:"[^"]*"|'[^']*')[^<>="']*){%d}"""
    % (MAX_ELEMENT_ATTRIBUTES + 1)
)
#: Bytes handed to the pull parser at a time: how far it may run past a limit.
_FEED_BYTES = 8192
_EVENTS = ("start", "end", "start-ns")


class MessageError(ValueError):
    """An incoming message armsproxy will not process; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str) -> None:
        if len(detail) > MAX_DETAIL:  # it quotes the input, which may be 1 MiB: one log line
            detail = detail[:MAX_DETAIL] + f"... ({len(detail)} characters)"
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_WIRE_OPTIONS = {"remove_comments": True, "remove_pis": True, "collect_ids": False}


def _offset(match: re.Match | None) -> int:
    """Where a search known to succeed matched (a regex: no Python loop over 1 MiB)."""
    assert match is not None
    return match.start()


def _check_encoding(data: bytes) -> None:
    """Refuse what libxml2 could decode into other text than the 7-bit bytes say."""
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise MessageError("encoding", f"NUL byte at offset {offset} (UTF-16 or UCS-4?)")
    declaration = _DECLARATION_START.match(data)
    if declaration is None:
        return
    declared = _ENCODING.search(declaration.group())
    if declared is not None and declared.group(2).lower().decode("ascii") not in ENCODINGS:
        raise MessageError(
            "encoding", f"declared encoding {declared.group(2).decode('ascii')[:40]!r}: only "
            "US-ASCII and UTF-8 are accepted"
        )


class _Parsers(threading.local):
    """This thread's wire parsers, made once: a parser costs more to build than a small
    message to parse, and an lxml parser is for one thread at a time."""

    def __init__(self) -> None:
        self.whole: etree.XMLParser = schema.safe_parser(**_WIRE_OPTIONS)
        self.pull: etree.XMLPullParser | None = None


_parsers = _Parsers()


def _parse_whole(data: bytes) -> etree._Element:
    """Parse a document that cannot exceed any limit (see :func:`parse_element`)."""
    try:
        return etree.fromstring(data, _parsers.whole)
    except etree.XMLSyntaxError as e:
        raise MessageError("invalid-xml", str(e)) from e


def _parse_counted(
    data: bytes, *, max_depth: int, max_elements: int, max_attributes: int
) -> etree._Element:
    """Parse piecewise, counting elements, attributes and depth; stop at the first excess.

    The pull parser builds the same tree as ``etree.fromstring``, but a document over a
    limit costs the pieces read up to it, not a tree of a million nodes and a walk over it.
    The thread's pull parser is reused after a document it read to the end; one left in the
    middle of a document (an error) is dropped.
    """
    parser = _parsers.pull
    _parsers.pull = None  # taken: back only once it has read a document to its end
    if parser is None:
        parser = schema.safe_parser(events=_EVENTS, **_WIRE_OPTIONS)
    elements = attributes = depth = 0
    try:
        for offset in range(0, len(data), _FEED_BYTES):
            parser.feed(data[offset : offset + _FEED_BYTES])
            for event, item in parser.read_events():
                if event == "end":
                    depth -= 1
                    continue
                if event == "start":
                    elements += 1
                    depth += 1
                    attributes += len(item.attrib)
                    if depth > max_depth:
                        raise MessageError("too-deep", f"nesting deeper than {max_depth} levels")
                    if elements > max_elements:
                        raise MessageError("too-many-elements", f"more than {max_elements}")
                else:  # start-ns: a namespace declaration, an attribute in the bytes
                    attributes += 1
                if attributes > max_attributes:
                    raise MessageError(
                        "too-many-attributes",
                        f"more than {max_attributes} (namespace declarations included)",
                    )
        root: etree._Element = parser.close()
    except etree.XMLSyntaxError as e:
        raise MessageError("invalid-xml", str(e)) from e
    for _ in parser.read_events():  # none expected after close(); none for the next one
        pass
    _parsers.pull = parser
    return root


def parse_element(
    data: bytes,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_DEPTH,
    max_elements: int = MAX_ELEMENTS,
    max_attributes: int = MAX_ATTRIBUTES,
    ascii_text: bool = False,
) -> etree._Element:
    """Parse untrusted bytes into an ``arms-message`` element, or raise MessageError.

    The bytes must be 7-bit ASCII. With ``ascii_text`` the decoded text must be too: a
    device replaces every non-ASCII character by ``?`` (§3.5), so a character reference
    beyond ASCII in what claims to come from one is refused.
    """
    if len(data) > max_bytes:
        raise MessageError("too-large", f"{len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not data.strip():
        raise MessageError("invalid-xml", "empty body")
    if not data.isascii():
        offset = _offset(_NON_ASCII_BYTE.search(data))
        raise MessageError("non-ascii", f"byte 0x{data[offset]:02X} at offset {offset}")
    _check_encoding(data)
    # Every element costs at least one "<" (two unless empty): a bound before any parsing,
    # and on the places the regular expressions below try (comments, PIs and CDATA count too;
    # no device writes them).
    markup = data.count(b"<")
    if markup > 2 * max_elements + 8:
        raise MessageError(
            "too-many-elements", f"{markup} markup '<' for at most {max_elements} elements"
        )
    if _FORBIDDEN_MARKUP.search(data):
        raise MessageError("forbidden-markup", "DTDs and entity declarations are not accepted")
    # Each attribute (namespace declarations too) costs an "=": the regular expression runs
    # only where a start tag can hold too many.
    equals = data.count(b"=")
    if equals > MAX_ELEMENT_ATTRIBUTES and _CROWDED_TAG.search(data):
        raise MessageError(
            "too-many-attributes",
            f"an element with more than {MAX_ELEMENT_ATTRIBUTES} attributes or namespace "
            "declarations",
        )
    # Elements and depth are at most the start tags, each a "<" that no "</" begins; a
    # document within every limit by these counts (most messages) is parsed whole, with
    # nothing to count.
    opening = markup - data.count(b"</")
    if opening <= min(max_depth, max_elements) and equals <= max_attributes:
        root = _parse_whole(data)
    else:
        root = _parse_counted(
            data, max_depth=max_depth, max_elements=max_elements, max_attributes=max_attributes
        )
    if root.getroottree().docinfo.doctype:
        raise MessageError("forbidden-markup", "DTDs are not accepted")
    if next(root.iter(etree.Entity), None) is not None:
        raise MessageError("forbidden-markup", "entity references are not accepted")
    # The bytes are ASCII, decoded as UTF-8, with no entity but the five predefined ones: only
    # a character reference ("&#") can have put anything else into the decoded text.
    if ascii_text and b"&#" in data:
        text = etree.tostring(root, encoding="unicode")
        if not text.isascii():
            char = text[_offset(_NON_ASCII_CHAR.search(text))]
            raise MessageError(
                "non-ascii", f"decoded text holds U+{ord(char):04X} (a character reference)"
            )
    return root


def parse_message(
    data: bytes,
    *,
    validate: bool = True,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_DEPTH,
    ascii_text: bool = False,
) -> ArmsMessage:
    """Untrusted bytes -> schema-checked ARMS message model (``ascii_text``: see parse_element)."""
    root = parse_element(data, max_bytes=max_bytes, max_depth=max_depth, ascii_text=ascii_text)
    if validate:
        problem = schema_problem(root)
        if problem is not None:
            raise problem
    try:
        return decode_element(root)
    except (DecodeError, ValueError) as e:  # ValueError: int() of more than 4300 digits
        raise MessageError("invalid-value", str(e)) from e


def schema_problem(root: etree._Element) -> MessageError | None:
    """Why :func:`parse_message` refuses a parsed tree ("schema": XSD or the type/body naming
    rule), or None if it is valid. For callers that parse once and then decide what to do
    with a message outside the schema (the tunnel takes a device's answer leniently)."""
    try:
        schema.validate(root)
    except schema.SchemaError as e:
        return MessageError("schema", str(e))
    inner = root[0]
    body = next((c for c in inner if c.tag.endswith(("-request", "-response"))
                 and c.tag not in ("arms-request", "arms-response")), None)
    if schema.type_matches_body(inner.get("type", ""), None if body is None else body.tag,
                                is_request=inner.tag == "arms-request"):
        return None
    return MessageError("schema", f"body <{body.tag if body is not None else ''}> does not "
                                  f"match type {inner.get('type')!r}")


class UnsafeMessageError(ValueError):
    """armsproxy was about to send something that would break or mislead a device."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def serialise(message: ArmsMessage, *, declaration: bool = True, check: bool = True) -> bytes:
    """Model -> bytes a device accepts; refuses (UnsafeMessageError) what it would not."""
    root = message.to_element()
    try:
        body = etree.tostring(root, encoding="US-ASCII", xml_declaration=False)
    except (ValueError, etree.SerialisationError) as e:
        raise UnsafeMessageError([f"cannot serialise: {e}"]) from e
    if check:
        problems = guard.problems(root, body)
        if problems:
            raise UnsafeMessageError(problems)
    return (XML_DECLARATION + body) if declaration else body
