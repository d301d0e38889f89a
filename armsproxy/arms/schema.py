"""XSD validation of ARMS messages against ``schemas/arms.xsd``.

Two validators over one schema file: lxml (libxml2) on the hot path, because it is fast and
the compiled schema can be reused for every message; ``xmlschema`` for operators
(``armsproxyctl check``), because its messages name the element path and the reason in plain
words. Both are compiled once, on first use. The lxml schema is used from the reactor thread
only (an ``XMLSchema`` object keeps its error log of the last run, so it is not for
concurrent use from several threads).

XSD 1.0 cannot tie the body element to the ``type`` attribute, so the naming rule of
§3.2-§3.4 lives in :func:`type_matches_body`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import xmlschema
from lxml import etree

# armsproxy/schemas is a symlink to the top-level schemas/ in the source tree, and the
# installed package carries the file itself (setup.cfg package_data).
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "arms.xsd"

_TYPE_SUFFIXES = ("-start", "-done")
_GENERIC_ERROR = "generic-error"


class SchemaError(ValueError):
    """The message does not conform to the ARMS schema; the text says where and why."""

    def __init__(self, message: str, *, line: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.path = path


def safe_parser(*, events: tuple[str, ...] = (), **options: bool) -> etree.XMLParser:
    """What every parser of untrusted ARMS XML refuses: DTDs, entities, network, huge trees.

    The bytes are always decoded as UTF-8, whatever the document declares or its first bytes
    suggest: libxml2 would otherwise decode UTF-16, UTF-7 or ISO-2022-JP written in 7-bit
    bytes into non-ASCII text. With ``events`` it is a pull parser, fed piecewise so that
    its caller can count what it builds and stop early (``codec``); the wire parser adds its
    own options on top.
    """
    hardened: dict[str, Any] = {
        "resolve_entities": False,
        "no_network": True,
        "load_dtd": False,
        "dtd_validation": False,
        "huge_tree": False,
        "encoding": "utf-8",
    }
    if events:
        return etree.XMLPullParser(events=events, **hardened, **options)
    return etree.XMLParser(**hardened, **options)


@functools.cache
def _lxml_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMA_PATH), safe_parser()))


def _declare_xmlschema_classes() -> None:
    """Keep xmlschema working next to zope.interface.

    Once any ``@implementer`` class derives from a ``collections.abc`` class (Twisted's
    ``twisted.internet.testing`` has one), zope.interface leaves a ``__provides__`` descriptor
    on those ABCs that raises AttributeError when read through a subclass. xmlschema's schema
    classes derive from ``Sequence`` and introspect themselves with ``dir()`` + ``getattr()``,
    so building a schema then fails. ``implementedBy`` gives each of them its own descriptor.
    """
    from xmlschema.validators import XsdValidator
    from zope.interface import implementedBy

    stack: list[type] = [XsdValidator]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        implementedBy(cls)


@functools.cache
def _xmlschema_schema() -> xmlschema.XMLSchema10:
    _declare_xmlschema_classes()
    return xmlschema.XMLSchema10(str(SCHEMA_PATH))


def validate(root: etree._Element) -> None:
    """Raise :class:`SchemaError` unless ``root`` is a schema-valid ``arms-message``."""
    schema = _lxml_schema()
    if schema.validate(root):
        return
    # One copy of the log, its first entry read: the log is as long as the input has
    # errors, which codec's element and attribute limits keep to a few thousand.
    errors = schema.error_log
    if not len(errors):  # pragma: no cover - libxml2 always logs why
        raise SchemaError("invalid ARMS message")
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    # Values quoted in the message may hold CR/LF (an integer with a trailing newline):
    # keep the message on one log line.
    reason = first.message.replace("\r", "\\r").replace("\n", "\\n")
    raise SchemaError(
        f"line {first.line}: {first.path}: {reason}{more}",
        line=first.line,
        path=first.path,
    )


def explain(xml: bytes, *, naming: bool = True) -> list[str]:
    """Every schema problem of ``xml`` as one human line each; ``[]`` when it is valid.

    With ``naming`` (the default) a schema-valid message is also checked against the
    type/body naming rule, which the schema cannot express.
    """
    try:
        root = etree.fromstring(xml, safe_parser())
    except etree.XMLSyntaxError as e:
        return [f"not well-formed XML: {e}"]
    problems = []
    for error in _xmlschema_schema().iter_errors(root):
        where = f"line {error.sourceline}: " if error.sourceline is not None else ""
        problems.append(f"{where}{error.path}: {error.reason}")
    if problems or not naming:
        return problems
    inner = next(child for child in root if isinstance(child.tag, str))  # skip comments
    body = _body_element(inner)
    type_ = inner.get("type", "")
    if not type_matches_body(type_, body, is_request=inner.tag == "arms-request"):
        problems.append(
            f"line {inner.sourceline}: /arms-message/{inner.tag}: body element "
            f"<{body}> does not belong to type {type_!r}"
        )
    return problems


def _body_element(inner: etree._Element) -> str | None:
    """Tag of the body element of a schema-valid arms-request/arms-response, if any."""
    for child in inner:
        tag = child.tag
        if isinstance(tag, str) and tag.endswith(("-request", "-response")):
            return tag
    return None


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _TYPE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def type_matches_body(type_: str, body_tag: str | None, *, is_request: bool) -> bool:
    """Does the body element belong to the message ``type`` (§3.2-§3.4)?

    Request bodies are ``B-request``, ``B-start-request`` or ``B-done-request``; response
    bodies the same with ``-response``; ``generic-error`` answers carry
    ``generic-error-response``. The SA takes ``B``, ``B-start`` and ``B-done`` as synonyms of
    one operation (§3.4), so a suffix on only one side is fine (``reboot-start`` with
    ``reboot-request``, ``ping`` with ``ping-start-request``), but two different suffixes
    (``ping-start`` with ``ping-done-request``) are not. A missing body matches: it may be
    omitted where the receiver reads nothing from it (§3.3, §7.1).
    """
    if not type_:
        return False
    if body_tag is None:
        return True
    role = "-request" if is_request else "-response"
    if not body_tag.endswith(role):
        return False
    body_name = body_tag[: -len(role)]
    if type_ == _GENERIC_ERROR or body_name == _GENERIC_ERROR:
        return not is_request and type_ == body_name
    type_base, type_suffix = _split_suffix(type_)
    body_base, body_suffix = _split_suffix(body_name)
    if type_base != body_base:
        return False
    return not type_suffix or not body_suffix or type_suffix == body_suffix
