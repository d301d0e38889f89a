"""Bytes <-> ARMS messages: hardened parsing in, device-safe serialisation out.

Incoming bytes come from the network (devices, or anyone who can reach port 443), so the
parser refuses DTDs, entities, network access, non-ASCII, oversize and over-deep documents
before lxml builds anything large. Outgoing bytes must survive libarms' expat walker (§3.1),
so serialisation is ASCII with character references and every message passes ``guard``.
"""

from __future__ import annotations

import re

from lxml import etree

from . import guard, schema
from .messages import ArmsMessage, DecodeError, decode_element

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DEPTH = 16
XML_DECLARATION = b'<?xml version="1.0" encoding="US-ASCII"?>\n'

_FORBIDDEN_MARKUP = re.compile(rb"<!(?:DOCTYPE|ENTITY)", re.IGNORECASE)


class MessageError(ValueError):
    """An incoming message armsproxy will not process; ``reason`` is a short category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_PARSER = schema.safe_parser(remove_comments=True, remove_pis=True, collect_ids=False)


def _depth(el: etree._Element, limit: int) -> bool:
    """True if the tree is no deeper than ``limit`` (iterative, no recursion)."""
    stack = [(el, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in node)
    return True


def parse_element(
    data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH
) -> etree._Element:
    """Parse untrusted bytes into an ``arms-message`` element, or raise MessageError."""
    if len(data) > max_bytes:
        raise MessageError("too-large", f"{len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not data.strip():
        raise MessageError("invalid-xml", "empty body")
    if not data.isascii():
        offset = next(i for i, b in enumerate(data) if b > 0x7F)
        raise MessageError("non-ascii", f"byte 0x{data[offset]:02X} at offset {offset}")
    if _FORBIDDEN_MARKUP.search(data):
        raise MessageError("forbidden-markup", "DTDs and entity declarations are not accepted")
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as e:
        raise MessageError("invalid-xml", str(e)) from e
    if root.getroottree().docinfo.doctype:
        raise MessageError("forbidden-markup", "DTDs are not accepted")
    if not _depth(root, max_depth):
        raise MessageError("too-deep", f"nesting deeper than {max_depth} levels")
    if any(isinstance(node, etree._Entity) for node in root.iter()):
        raise MessageError("forbidden-markup", "entity references are not accepted")
    return root


def parse_message(
    data: bytes,
    *,
    validate: bool = True,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_DEPTH,
) -> ArmsMessage:
    """Untrusted bytes -> schema-checked ARMS message model."""
    root = parse_element(data, max_bytes=max_bytes, max_depth=max_depth)
    if validate:
        try:
            schema.validate(root)
        except schema.SchemaError as e:
            raise MessageError("schema", str(e)) from e
        inner = root[0]
        body = next((c for c in inner if c.tag.endswith(("-request", "-response"))
                     and c.tag not in ("arms-request", "arms-response")), None)
        if not schema.type_matches_body(
            inner.get("type", ""), None if body is None else body.tag,
            is_request=inner.tag == "arms-request",
        ):
            raise MessageError(
                "schema",
                f"body <{body.tag if body is not None else ''}> does not match "
                f"type {inner.get('type')!r}",
            )
    try:
        return decode_element(root)
    except DecodeError as e:
        raise MessageError("invalid-value", str(e)) from e


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
