"""The simulated device as a client: a libarms 5.33 service adapter's (SA's) pulls and dones.

Tests, benchmarks and the quick start drive armsproxy with it, so it deliberately does not
share code with the proxy: it writes the bytes a real SA writes (§2.3, §3.2, §6) over real TLS
the way the SA sets TLS up (§2.1), and judges each answer exactly as strictly as the SA does
(§2.4, §3.1, §10.2). A proxy that passes against this simulator but not against a device means
this file is wrong. ``listener`` is the device's https-simple push side, ``tunnel`` its
https-tunnels, ``serve`` the three together as one long-running device
(``armsproxy-sasim serve``).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree
from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

#: The device gives up on an answer this long after it finished writing its request (§2.4).
RESPONSE_TIMEOUT = 30.0
#: TCP connect and TLS handshake limits of the SA client (§11.1).
CONNECT_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 30.0
#: The SA reads (and single-shot parses) at most this much per read (§2.4).
SA_READ_SIZE = 8192
#: The SA's builder emits chunks of at most this size (§2.3).
SA_CHUNK_SIZE = 8192

DEFAULT_DESCRIPTION = "libarms Test Client"
DEFAULT_FIRMWARE_INFO = "Version 5.33"
PROTOCOL_VERSION = "4.0"

# Outcomes a device can draw from an answer (§10.2).
SUCCESS = "success"
RETRY = "retry"
REPULL = "re-pull"
REBOOT = "reboot"
STOP = "stop"
DONE_LOST = "done-lost"
ROLLBACK = "rollback"
RESEND = "resend"

#: Done-requests whose builder emits the whole message as one chunk (observed); the others
#: emit one chunk per result element (§2.3).
_SINGLE_CHUNK_DONE = frozenset({"ping", "configure"})

_OPENSSL_CERT_NOT_YET_VALID = 9
_OPENSSL_CERT_HAS_EXPIRED = 10
#: The --tls-min/--tls-max choices.
TLS_VERSIONS = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
#: ``tls_max_version`` of a device like upstream libarms (TLSv1_*_method: TLS 1.0 only, §0.2).
UPSTREAM_TLS_VERSION = SSL.TLS1_VERSION


def negotiated_tls_version(transport: Any) -> str | None:
    """The version a completed handshake on a Twisted TLS transport negotiated ("TLSv1")."""
    try:
        return str(transport.getHandle().get_protocol_version_name())
    except Exception:
        return None

# --------------------------------------------------------------------------------------------
# URLs and text as libarms handles them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmsURL:
    """A URL as libarms parses it (§2.2): literal IP, port defaults to 443."""

    host: str
    port: int
    path: str  # without the leading "/"
    ipv6: bool

    @property
    def request_uri(self) -> str:
        return "/" + self.path

    @property
    def host_header(self) -> str:
        # The SA always writes the port and never brackets IPv6 hosts (§2.3).
        return f"{self.host}:{self.port}"


_URL_RE = re.compile(r"(?i:https?)://(\[[^\]/]*\]|[^/:\[\]]*)(?::([^/]*))?(?:/(.*))?", re.DOTALL)


def parse_url(url: str) -> ArmsURL:
    """Parse `url` the way the SA does; ValueError says why the SA would skip it."""
    if any(c.isspace() for c in url):
        raise ValueError(f"URL contains whitespace: {url!r}")
    m = _URL_RE.fullmatch(url)
    if m is None:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if not url.lower().startswith("https://"):
        raise ValueError(f"the SA only uses https URLs: {url!r}")
    host, port_text, path = m.group(1), m.group(2), m.group(3) or ""
    ipv6 = host.startswith("[")
    if ipv6:
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host is not a literal IP address (the SA never resolves): {url!r}")
    if ipv6 != (addr.version == 6):
        raise ValueError(f"IPv6 hosts must be in brackets: {url!r}")
    if len(host) > 79:
        raise ValueError(f"host longer than 79 chars: {url!r}")
    if port_text is None:
        port = 443
    else:
        if len(port_text) > 7 or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port: {url!r}")
        port = int(port_text)
    if len(path) > 79:
        raise ValueError(f"path longer than 79 chars: {url!r}")
    return ArmsURL(host=host, port=port, path=path, ipv6=ipv6)


def escape_text(text: str) -> str:
    """Escape text the way the SA's builder does (§3.5): XML specials, non-ASCII bytes → '?'."""
    raw = text.encode("utf-8")
    ascii_text = bytes(b if b < 0x80 else 0x3F for b in raw).decode("ascii")
    return (
        ascii_text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
    )


def basic_authorization(distid: str, key: str) -> str:
    """`Basic base64(distid:key)` as the SA sends it (§2.3)."""
    token = base64.b64encode(f"{distid}:{key}".encode("ascii")).decode("ascii")
    return f"Basic {token}"


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SARequest:
    """One request as the SA writes it: `pieces` are the separate writes (TLS records)."""

    kind: str
    pieces: tuple[bytes, ...]
    transaction_result: int | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


def _form_a(url: ArmsURL, authorization: str, body: bytes, kind: str) -> SARequest:
    head = (
        f"POST {url.request_uri} HTTP/1.0\r\n"
        "Content-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Authorization: {authorization}\r\n"
        "\r\n"
    ).encode("ascii")
    return SARequest(kind=kind, pieces=(head + body,))


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _form_b(
    url: ArmsURL,
    authorization: str,
    body_chunks: Sequence[bytes],
    kind: str,
    transaction_result: int | None = None,
) -> SARequest:
    head = (
        f"POST {url.request_uri} HTTP/1.1\r\n"
        f"Host: {url.host_header}\r\n"
        "Connection: close\r\n"
        "Content-Type: text/xml\r\n"
        "Transfer-Encoding: chunked\r\n"
        f"Authorization: {authorization}\r\n"
        "\r\n"
    ).encode("ascii")
    pieces = [head]
    for chunk in body_chunks:
        for part in _split(chunk, SA_CHUNK_SIZE):
            if part:
                pieces.append(b"%x\r\n%s\r\n" % (len(part), part))
    pieces.append(b"0\r\n\r\n")
    return SARequest(kind=kind, pieces=tuple(pieces), transaction_result=transaction_result)


def _ascii(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("ascii")


# --------------------------------------------------------------------------------------------
# Judging answers (§2.4, §3.1, §10.2)
# --------------------------------------------------------------------------------------------


@dataclass
class DeviceVerdict:
    """What the device makes of an answer: its `outcome` and every defect found.

    `problems` are things that change what the device does or that harm it (a busy loop, lost
    modules); `notes` are observations the device tolerates.
    """

    kind: str
    outcome: str
    status: int | None = None
    result_code: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunked: bool = False
    transaction_id: int | None = None
    push_methods: list[str] = field(default_factory=list)
    https_tunnel_urls: list[str] = field(default_factory=list)
    https_tunnel_echo_interval: int | None = None
    rs_pull_server_urls: list[str] = field(default_factory=list)
    # What a config-solicitation answer handed the device (the last of each, as the SA keeps):
    sa_certificate: bytes | None = None  # PEM
    sa_private_key: bytes | None = None  # PEM
    modules: list[tuple[int, str, str]] = field(default_factory=list)  # (id, version, location)
    md_configs: list[tuple[int, bytes]] = field(default_factory=list)  # (module id, data)

    @property
    def ok(self) -> bool:
        return self.outcome == SUCCESS and not self.problems

    def describe(self) -> str:
        lines = [
            f"{self.kind}: outcome={self.outcome} status={self.status} "
            f"result-code={self.result_code}" + (" OK" if self.ok else " NOT OK")
        ]
        if self.transaction_id is not None:
            lines.append(f"  transaction-id={self.transaction_id}")
        if self.push_methods:
            lines.append(f"  push-methods={','.join(self.push_methods)}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


_KNOWN_PULLS = (
    "rs-solicitation",
    "config-solicitation",
    "push-method-query",
    "push-confirmation-start",
)
_STREAMING = frozenset(_KNOWN_PULLS)


def _family(kind: str) -> str:
    if kind in _STREAMING:
        return kind
    if kind == "configure-done":
        return "configure-done"
    if kind.endswith("-done") and len(kind) > len("-done"):
        return "done"
    raise ValueError(f"unknown answer kind {kind!r}")


def _failure_outcome(family: str) -> str:
    """What the SA does when it cannot use the answer at all (HTTP ≥ 400, TLS, XML, timeout)."""
    return {"done": DONE_LOST, "configure-done": RESEND}.get(family, RETRY)


def outcome_for_code(kind: str, code: int, transaction_result: int | None = None) -> str:
    """The §10.2 table: the device's reaction to `code` in an answer of `kind`."""
    fam = _family(kind)
    if code == 501:
        return STOP
    if fam in ("rs-solicitation", "config-solicitation"):
        if 100 <= code <= 199:
            return SUCCESS
        if code < 100 or 300 <= code <= 499:
            return RETRY
        if code == 502:
            return REPULL
        return REBOOT  # 2xx, 503, 507, 508, other >= 500
    if fam in ("push-method-query", "push-confirmation-start"):
        if code <= 199:
            return SUCCESS
        if 200 <= code <= 299 or code in (502, 507, 508):
            return REPULL
        if 300 <= code <= 499:
            return RETRY
        return REBOOT
    if fam == "done":
        if code <= 199 or 300 <= code <= 499:
            return SUCCESS  # 3xx/4xx: "accepted, transaction ends"
        if 200 <= code <= 299 or code in (502, 508):
            return REPULL
        return REBOOT
    # configure-done: after a rollback the SA reports transaction-result 414 (§6.5).
    rolled_back = transaction_result == 414
    if 100 <= code <= 199:
        return REBOOT if transaction_result == 303 else SUCCESS
    if code < 100 or 200 <= code <= 299:
        return REPULL if rolled_back else ROLLBACK
    if 300 <= code <= 499:
        return RESEND if rolled_back else ROLLBACK
    if code in (502, 508):
        return REPULL
    return REBOOT


_XML_NS = "http://www.w3.org/XML/1998/namespace"
_AM = ("arms-message",)
_AR = (*_AM, "arms-response")
_CSR = (*_AR, "config-solicitation-response")
_PMR = (*_AR, "push-method-query-response")

_WHITELISTS: dict[tuple[str, ...], frozenset[str]] = {
    _AR: frozenset({"type"}),
    (*_CSR, "md-config"): frozenset({"id", "content-type", "commit-order", "encoding"}),
    (*_CSR, "module"): frozenset({"id", "version", "install-order"}),
}


@dataclass
class _Elem:
    path: tuple[str, ...]
    attrs: dict[str, str]
    order: int
    text: str = ""
    closed: bool = False


@dataclass
class _Walk:
    elems: list[_Elem]
    error: str | None
    root_closed: bool
    problems: list[str]

    def find(self, path: tuple[str, ...]) -> list[_Elem]:
        return [e for e in self.elems if e.path == path]

    def closed(self, path: tuple[str, ...]) -> list[_Elem]:
        return [e for e in self.elems if e.path == path and e.closed]


def _qname(name: str, element: Any, is_attr: bool) -> str:
    """The name as expat without namespace processing (libarms) reports it."""
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    if uri == _XML_NS:
        return "xml:" + local
    if not is_attr and element.prefix:
        return f"{element.prefix}:{local}"
    for prefix, ns in element.nsmap.items():
        if ns == uri and prefix:
            return f"{prefix}:{local}"
    return local


def _hardened_pull_parser() -> etree.XMLPullParser:
    return etree.XMLPullParser(
        events=("start", "end", "start-ns"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )


_NON_ASCII = re.compile(rb"[\x80-\xff]")


def _walk(data: bytes, *, final: bool) -> _Walk:
    """Walk `data` like libarms' schema walker: unknown subtrees and whitelist losses vanish."""
    problems: list[str] = []
    error: str | None = None
    match = _NON_ASCII.search(data)
    bad = match.start() if match else None
    if bad is not None:
        problems.append(f"body byte {bad} is not 7-bit ASCII (the SA's parser stops there)")
        data = data[:bad]
    parser = _hardened_pull_parser()
    try:
        parser.feed(data)
        if final and bad is None:
            parser.close()
    except etree.XMLSyntaxError as exc:
        error = str(exc)
    if bad is not None:
        error = error or "non-ASCII byte"
    elems: list[_Elem] = []
    stack: list[tuple[_Elem | None, tuple[str, ...]]] = []
    pending_ns: list[tuple[str, str]] = []
    root_closed = False
    for event, payload in parser.read_events():
        if event == "start-ns":
            pending_ns.append(payload)
            continue
        element = payload
        if event == "start":
            name = _qname(element.tag, element, is_attr=False)
            parent_path = stack[-1][1] if stack else ()
            path = (*parent_path, name)
            attrs = {_qname(k, element, is_attr=True): v for k, v in element.attrib.items()}
            for prefix, uri in pending_ns:
                attrs["xmlns:" + prefix if prefix else "xmlns"] = uri
            pending_ns = []
            lost = bool(stack) and stack[-1][0] is None
            allowed = _WHITELISTS.get(path)
            if not lost and allowed is not None and not set(attrs) <= allowed:
                extra = sorted(set(attrs) - allowed)
                problems.append(
                    f"<{name}> carries attribute(s) {', '.join(extra)} outside the SA's "
                    "whitelist: the SA drops the element and everything inside it"
                )
                lost = True
            if lost:
                stack.append((None, path))
            else:
                elem = _Elem(path=path, attrs=attrs, order=len(elems))
                elems.append(elem)
                stack.append((elem, path))
        else:  # end
            elem, path = stack.pop()
            if elem is not None:
                elem.text = element.text or ""
                elem.closed = True
            if not stack and path == _AM:
                root_closed = True
    if root_closed:
        error = None  # the SA stops reading at </arms-message>; what follows is never parsed
    return _Walk(elems=elems, error=error, root_closed=root_closed, problems=problems)


_STRTOL_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


def _integer(text: str, what: str, problems: list[str]) -> int | None:
    """strtol plus libarms' "nothing may follow the digits" check (§3.1)."""
    if text != text.strip():
        problems.append(f"{what} {text!r} contains whitespace")
    if _STRTOL_RE.fullmatch(text):
        return int(text)
    problems.append(f"{what} {text!r} is not a plain integer: the SA silently drops it")
    return None


def _parse_id(text: str) -> int | None:
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    return None


_B64_OK = re.compile(r"[A-Za-z0-9+/\r\n]*=?=?[\r\n]*")


@dataclass
class _Http:
    status: int | None
    header_end: int | None  # offset of the body in raw
    headers: list[tuple[str, str]]
    chunked: bool
    problems: list[str]
    notes: list[str]


_STATUS_RE = re.compile(rb"HTTP/([0-9]+)\.([0-9]+)[ ]+([0-9]+)")


def _parse_http_head(raw: bytes) -> _Http:
    """The SA's client-side header parsing (§2.4)."""
    problems: list[str] = []
    notes: list[str] = []
    m = _STATUS_RE.match(raw)
    if m is None:
        if raw:
            problems.append(f"status line not of the form 'HTTP/x.y NNN': {raw[:40]!r}")
        return _Http(None, None, [], False, problems, notes)
    status = int(m.group(3))
    crlf_blank = raw.find(b"\n\r\n")
    lf_blank = raw.find(b"\n\n")
    if lf_blank != -1 and (crlf_blank == -1 or lf_blank < crlf_blank):
        problems.append("the blank line ending the headers is a bare LF; the SA needs CRLF")
        return _Http(status, None, [], False, problems, notes)
    if crlf_blank == -1:
        return _Http(status, None, [], False, problems, notes)
    header_end = crlf_blank + 3
    headers: list[tuple[str, str]] = []
    chunked = False
    for line in raw[:crlf_blank].split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        if line.startswith(b"Transfer-Encoding") and b"chunked" in line:
            chunked = True
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return _Http(status, header_end, headers, chunked, problems, notes)


def _dechunk(data: bytes) -> tuple[bytes, int, str | None]:
    """libarms' chunked decoding with its limits (§2.4): body, data-chunk count, error."""
    body = bytearray()
    count = 0
    pos = 0
    while True:
        eol = data.find(b"\n", pos)
        if eol == -1:
            return bytes(body), count, "chunked body ends without the last chunk"
        line = data[pos:eol].rstrip(b"\r")
        size_text = line.split(b";", 1)[0]
        if size_text == b"0":
            return bytes(body), count, None
        if not re.fullmatch(rb"[1-9a-f][0-9a-fA-F]*", size_text):
            return bytes(body), count, f"chunk size line {line!r} not readable by the SA"
        size = int(size_text, 16)
        start = eol + 1
        body += data[start : start + size]
        count += 1
        if len(data) < start + size:
            return bytes(body), count, "chunk shorter than its size"
        pos = start + size
        if data[pos : pos + 2] == b"\r\n":
            pos += 2
        elif data[pos : pos + 1] == b"\n":
            pos += 1


def _first_body_piece(raw: bytes, reads: Sequence[bytes], header_end: int) -> bytes:
    """The body part of the first SA read holding body bytes (single-shot parsers, §2.4)."""
    offset = 0
    for read in reads:
        for piece in _split(read, SA_READ_SIZE):
            start, end = offset, offset + len(piece)
            offset = end
            if end > header_end:
                return raw[max(start, header_end) : end]
    return b""


def judge_response(
    kind: str,
    raw: bytes,
    *,
    reads: Sequence[bytes] | None = None,
    transaction_result: int | None = None,
) -> DeviceVerdict:
    """Judge a server's answer to an SA request of type `kind` the way libarms 5.33 does.

    `reads` are the pieces the answer arrived in (TLS records); without them the answer is
    taken as one write. `transaction_result` is what the SA reported in a configure-done
    (303 and 414 change the SA's reaction).
    """
    return _judge(kind, raw, reads=reads, transaction_result=transaction_result)


def _judge(
    kind: str,
    raw: bytes,
    *,
    reads: Sequence[bytes] | None,
    transaction_result: int | None,
    failure: str | None = None,
) -> DeviceVerdict:
    fam = _family(kind)
    if reads is None:
        reads = [raw]
    elif b"".join(reads) != raw:
        raise ValueError("reads do not add up to raw")
    fail = _failure_outcome(fam)
    http = _parse_http_head(raw)
    v = DeviceVerdict(kind=kind, outcome=fail, status=http.status, chunked=http.chunked)
    v.problems.extend(http.problems)
    v.notes.extend(http.notes)
    if failure is not None:
        v.problems.append(failure)
    if http.status is None:
        if not raw and failure is None:
            v.problems.append("no answer")
        return v
    if http.status >= 400:
        v.problems.append(f"HTTP status {http.status} >= 400: the SA counts a failed attempt")
        return v
    if http.header_end is None:
        if not http.problems:
            v.problems.append("the answer ends inside the header block")
        return v
    if http.status != 200:
        v.notes.append(f"HTTP status {http.status} (the SA treats every code < 400 alike)")
    if len(reads) > 1:
        v.notes.append(f"answer arrived in {len(reads)} reads, not one write")
    body = raw[http.header_end :]
    if not http.chunked:
        # libarms ignores Content-Length, but every other client needs it (§2.4 recommends it).
        lengths = [value for name, value in http.headers if name.lower() == "content-length"]
        if not lengths:
            v.notes.append("no Content-Length header")
        elif lengths[0] != str(len(body)):
            v.notes.append(f"Content-Length {lengths[0]} but the body has {len(body)} bytes")
    if http.chunked:
        v.problems.append(
            "answer is chunked: libarms mis-parses chunked bodies; use Content-Length"
        )
        body, nchunks, err = _dechunk(body)
        if err is not None:
            v.problems.append(err)
        if nchunks > 1:
            v.problems.append(
                f"chunked body in {nchunks} chunks: the SA loses its place between chunks"
            )
            return v
    if b"<!DOCTYPE" in body:
        v.problems.append("answer carries a DOCTYPE")
    end = body.find(b"</arms-message>")
    if end == -1:
        if failure is None:
            v.problems.append("answer ends before </arms-message>: the SA waits for it")
        return v
    if failure is not None:
        return v
    body = body[: end + len(b"</arms-message>")]

    if fam in _STREAMING:
        walk = _walk(body, final=True)
        v.problems.extend(walk.problems)
        if walk.error is not None:
            v.problems.append(f"XML error: {walk.error}")
            return v
    else:
        piece = body if http.chunked else _first_body_piece(raw, reads, http.header_end)
        walk = _walk(piece, final=False)
        v.problems.extend(walk.problems)
        if walk.error is not None:
            # Strict where libarms is unclear: a piece the parser rejects is not trusted.
            v.problems.append(f"XML error in the first body piece: {walk.error}")
            return v

    responses = walk.find(_AR)
    codes = walk.closed((*_AR, "result-code"))
    if len(codes) > 1:
        v.problems.append(f"{len(codes)} result-code elements (the SA keeps the last)")
    code = None
    for elem in codes:
        code = _integer(elem.text, "result-code", v.problems)
    v.result_code = code

    if fam == "done" and responses:
        got = responses[0].attrs.get("type")
        if got != kind:
            v.problems.append(f"type {got!r} is not {kind!r}: the SA drops the done")
            return v
    elif fam in _STREAMING and responses and responses[0].attrs.get("type") != kind:
        v.notes.append(f"type {responses[0].attrs.get('type')!r} differs from {kind!r}")

    if code is None:
        if not codes:
            where = "in the first body piece the SA reads" if fam not in _STREAMING else ""
            v.problems.append(f"no readable result-code {where}".rstrip())
        if fam == "rs-solicitation":
            v.outcome = REBOOT  # recorded as 200 by libarms (§10.2)
        return v

    v.outcome = outcome_for_code(kind, code, transaction_result)
    if v.outcome != SUCCESS:
        return v  # the SA reads the rest of the body only from a successful answer
    fatal: list[str] = []
    if fam == "config-solicitation":
        _check_config_solicitation(walk, v, fatal)
    elif fam == "push-method-query":
        _check_push_method_query(walk, v, fatal)
    elif fam == "push-confirmation-start":
        _check_push_confirmation_start(walk, v, fatal)
    v.problems.extend(fatal)
    if fatal:
        v.outcome = fail
    return v


def _check_url(url: str, what: str, problems: list[str]) -> None:
    try:
        parse_url(url)
    except ValueError as exc:
        problems.append(f"{what}: {exc}")


def _check_config_solicitation(walk: _Walk, v: DeviceVerdict, fatal: list[str]) -> None:
    p = v.problems
    heartbeats = walk.find((*_CSR, "heartbeat-info"))
    if len(heartbeats) > 5:
        fatal.append(f"{len(heartbeats)} heartbeat-info (> 5): the SA rejects the answer")
    if not heartbeats:
        p.append("no heartbeat-info: busy-loop hazard (the SA's heartbeat timer runs at 0 s)")
    intervals: list[int | None] = []
    bounds = [hb.order for hb in heartbeats[1:]] + [len(walk.elems)]
    for hb, limit in zip(heartbeats, bounds, strict=False):

        def child(name: str, hb: _Elem = hb, limit: int = limit) -> _Elem | None:
            found = [e for e in walk.closed((*hb.path, name)) if hb.order < e.order < limit]
            return found[0] if found else None

        for required in ("host", "passphrase"):
            if child(required) is None:
                fatal.append(f"heartbeat-info without {required}: the SA rejects the answer")
        host = child("host")
        if host is not None:
            try:
                ipaddress.ip_address(host.text)
            except ValueError:
                p.append(f"heartbeat-info host {host.text!r} is not a numeric IP")
        if child("port") is None:
            p.append("heartbeat-info without port")
        interval = child("interval")
        value = None if interval is None else _integer(interval.text, "heartbeat interval", p)
        intervals.append(value)
    if heartbeats and (intervals[0] is None or intervals[0] <= 0):
        p.append("first heartbeat-info has no interval > 0: busy-loop hazard")
    if len({i for i in intervals}) > 1:
        p.append(f"heartbeat intervals differ {intervals}: the SA uses the first only")

    current: list[int | None] = []
    committed = False
    items = sorted(
        walk.find((*_CSR, "module")) + walk.find((*_CSR, "md-config")), key=lambda e: e.order
    )
    for elem in items:
        ident = _parse_id(elem.attrs.get("id", ""))
        name = elem.path[-1]
        if name == "module":
            if committed:
                p.append(
                    f"<module id={elem.attrs.get('id')!r}> after an md-config starts a new "
                    "module list: the SA removes the modules listed before"
                )
                current, committed = [], False
            if ident is None:
                p.append(f"module id {elem.attrs.get('id')!r} is not a number")
            current.append(ident)
        else:
            committed = True
            if ident is None or ident not in current:
                fatal.append(
                    f"md-config id {elem.attrs.get('id')!r} names no listed module "
                    "(415): the SA rejects the answer"
                )
            if elem.attrs.get("encoding") == "base64" and not _B64_OK.fullmatch(elem.text):
                fatal.append(f"md-config id {elem.attrs.get('id')!r}: invalid base64")

    cert = walk.closed((*_CSR, "sa-certificate"))
    key = walk.closed((*_CSR, "sa-private-key"))
    cert_obj = key_obj = None
    if cert:
        try:
            cert_obj = x509.load_pem_x509_certificate(cert[-1].text.encode("ascii"))
        except ValueError as exc:
            fatal.append(f"sa-certificate unreadable: {exc}")
    if key:
        try:
            key_obj = serialization.load_pem_private_key(key[-1].text.encode("ascii"), None)
        except (ValueError, TypeError) as exc:
            fatal.append(f"sa-private-key unreadable: {exc}")
    if bool(cert) != bool(key):
        p.append("sa-certificate and sa-private-key must come together")
    if cert_obj is not None and key_obj is not None:
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert_obj.public_key().public_bytes(der, pub) != key_obj.public_key().public_bytes(
            der, pub
        ):
            p.append("sa-private-key does not match sa-certificate")

    if cert_obj is not None and key_obj is not None:
        v.sa_certificate = cert[-1].text.encode("ascii")
        v.sa_private_key = key[-1].text.encode("ascii")
    after_config = False
    for elem in items:
        ident = _parse_id(elem.attrs.get("id", ""))
        if ident is None:
            continue
        if elem.path[-1] == "module":
            if after_config:  # a module after an md-config starts a new module list
                v.modules, v.md_configs, after_config = [], [], False
            v.modules.append((ident, elem.attrs.get("version", ""), elem.text))
            continue
        after_config = True
        if elem.attrs.get("encoding") == "base64":
            try:
                v.md_configs.append((ident, base64.b64decode(elem.text)))
            except ValueError:
                pass  # already a fatal problem above
        else:
            v.md_configs.append((ident, elem.text.encode("utf-8")))

    v.rs_pull_server_urls = [e.text for e in walk.closed((*_CSR, "rs-pull-server-url"))]
    if not v.rs_pull_server_urls:
        p.append("no rs-pull-server-url: the SA cannot run push-method-query")
    for url in v.rs_pull_server_urls[:5]:
        _check_url(url, "rs-pull-server-url", p)


def _check_push_method_query(walk: _Walk, v: DeviceVerdict, fatal: list[str]) -> None:
    methods = [e.text for e in walk.closed((*_PMR, "push-method"))]
    urls = [e.text for e in walk.closed((*_PMR, "https-tunnel-url"))]
    v.push_methods, v.https_tunnel_urls = methods, urls
    if len(methods) > 5:
        fatal.append(f"{len(methods)} push-method (> 5): the SA rejects the answer")
    if len(urls) > 5:
        fatal.append(f"{len(urls)} https-tunnel-url (> 5): the SA rejects the answer")
    for url in urls:
        _check_url(url, "https-tunnel-url", v.problems)
    usable = [m for m in methods if m == "https-simple" or (m == "https-tunnel" and urls)]
    if "https-tunnel" in methods and not urls:
        v.problems.append("https-tunnel offered without https-tunnel-url: the SA skips it")
    if v.result_code is not None and v.result_code <= 199 and not usable:
        v.problems.append("no usable push-method: the SA's event loop returns re-pull")
    for echo in walk.closed((*_PMR, "https-tunnel-echo-interval")):
        v.https_tunnel_echo_interval = _integer(echo.text, "https-tunnel-echo-interval", v.problems)


def _check_push_confirmation_start(walk: _Walk, v: DeviceVerdict, fatal: list[str]) -> None:
    ids = walk.closed((*_AR, "transaction-id"))
    if not ids:
        nested = [e for e in walk.elems if e.path[-1] == "transaction-id"]
        where = " (only nested deeper, where the SA does not look)" if nested else ""
        fatal.append(f"no transaction-id directly under arms-response{where}")
        return
    value = _integer(ids[-1].text, "transaction-id", v.problems)
    if value is None:
        fatal.append("transaction-id unreadable")
        return
    if not 0 < value < 2**31:
        v.problems.append(f"transaction-id {value} is not a positive 31-bit integer")
    v.transaction_id = value


def infer_kind(request: bytes) -> str | None:
    """The `type` of the arms-request inside a raw request, if any."""
    m = re.search(rb'<arms-request[^>]*\stype="([A-Za-z0-9-]+)"', request)
    return m.group(1).decode("ascii") if m else None


# --------------------------------------------------------------------------------------------
# TLS as the SA sets it up (§2.1)
# --------------------------------------------------------------------------------------------


def _first_pem(pem: bytes, marker: bytes) -> bytes:
    m = re.search(
        rb"-----BEGIN " + marker + rb"-----.*?-----END " + marker + rb"-----", pem, re.DOTALL
    )
    if m is None:
        raise ValueError(f"no {marker.decode()} in PEM")
    return m.group(0)


def _first_key_pem(pem: bytes) -> bytes:
    m = re.search(
        rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", pem, re.DOTALL
    )
    if m is None:
        raise ValueError("no private key in PEM")
    return m.group(0)


def _sa_verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    # libarms ignores validity dates; everything else must chain to the one trust anchor.
    return bool(ok) or errno in (_OPENSSL_CERT_NOT_YET_VALID, _OPENSSL_CERT_HAS_EXPIRED)


@implementer(IOpenSSLClientConnectionCreator)
class SAConnectionCreator:
    """Client TLS like libarms: one CA, no SNI, no name check, fresh context per connection.

    ``tls_max_version=UPSTREAM_TLS_VERSION`` makes it upstream libarms: TLS 1.0 only (offered
    at OpenSSL security level 0, which this OpenSSL needs for it)."""

    def __init__(
        self,
        ca_pem: bytes,
        client_cert_pem: bytes | None = None,
        client_key_pem: bytes | None = None,
        *,
        tls_min_version: int | None = None,
        tls_max_version: int | None = None,
        cipher_list: bytes | None = None,
    ) -> None:
        # Only the first certificate counts: the SA's store holds exactly one (§2.1).
        self._ca = crypto.load_certificate(crypto.FILETYPE_PEM, _first_pem(ca_pem, b"CERTIFICATE"))
        self._cert: x509.Certificate | None = None
        self._key: Any = None
        if client_cert_pem is not None:
            self._cert = x509.load_pem_x509_certificate(_first_pem(client_cert_pem, b"CERTIFICATE"))
            self._key = serialization.load_pem_private_key(
                _first_key_pem(client_key_pem or client_cert_pem), None
            )
        self._min = tls_min_version
        self._max = tls_max_version
        legacy = (tls_max_version or SSL.TLS1_3_VERSION) <= SSL.TLS1_1_VERSION
        self._ciphers = cipher_list or (b"DEFAULT:@SECLEVEL=0" if legacy else None)
        self._context()  # fail early on bad material

    def _context(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        if self._min is not None:
            ctx.set_min_proto_version(self._min)
        elif self._max is not None and self._max <= SSL.TLS1_1_VERSION:
            ctx.set_min_proto_version(SSL.TLS1_VERSION)
        if self._max is not None:
            ctx.set_max_proto_version(self._max)
        if self._ciphers is not None:
            ctx.set_cipher_list(self._ciphers)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.get_cert_store().add_cert(self._ca)
        ctx.set_verify(SSL.VERIFY_PEER, _sa_verify)
        ctx.set_verify_depth(10)
        if self._cert is not None:
            ctx.use_certificate(self._cert)
            ctx.use_privatekey(self._key)
            ctx.check_privatekey()
        return ctx

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._context(), None)
        conn.set_connect_state()  # and no set_tlsext_host_name(): the SA sends no SNI
        return conn


class _UnbufferedTLSFactory(TLSMemoryBIOFactory):
    """Plain TLSMemoryBIOProtocol: one write, one TLS record, like the SA's SSL_write calls."""

    protocol = TLSMemoryBIOProtocol


# --------------------------------------------------------------------------------------------
# One exchange on one fresh connection
# --------------------------------------------------------------------------------------------


@dataclass
class SAExchange:
    """A request the SA sent and the answer it got, as the SA saw it."""

    status: int | None
    headers: list[tuple[str, str]]
    raw: bytes
    reads: list[bytes]
    body_xml: bytes
    elapsed: float
    verdict: DeviceVerdict
    error: str | None = None
    request: bytes = b""
    tls_version: str | None = None  # negotiated ("TLSv1"); None without a handshake


@implementer(IHandshakeListener)
class _ExchangeProtocol(Protocol):
    def __init__(
        self,
        clock: Any,
        pieces: Sequence[bytes],
        *,
        write_delay: float,
        response_timeout: float,
        handshake_timeout: float,
    ) -> None:
        self._clock = clock
        self._pieces = list(pieces)
        self._write_delay = write_delay
        self._response_timeout = response_timeout
        self._handshake_timeout = handshake_timeout
        self.reads: list[bytes] = []
        self.handshake_done = False
        self.tls_version: str | None = None
        self.written_at: float | None = None
        self.timed_out = False
        self.finished: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self._timer: IDelayedCall | None = None
        self._write_call: IDelayedCall | None = None
        self._buffer = b""
        self._done = False

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._handshake_timeout, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._timer = None
        self.timed_out = True
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.tls_version = negotiated_tls_version(self.transport)
        self._cancel_timer()
        self._write_next()

    def _write_next(self) -> None:
        self._write_call = None
        if self._done:
            return
        self.transport.write(self._pieces.pop(0))
        if self._pieces:
            if self._write_delay > 0:
                self._write_call = self._clock.callLater(self._write_delay, self._write_next)
            else:
                self._write_next()
            return
        self.written_at = self._clock.seconds()
        self._timer = self._clock.callLater(self._response_timeout, self._response_expired)

    def _response_expired(self) -> None:
        self._timer = None
        self.timed_out = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self._buffer += data
        if self._answer_complete():
            # The SA stops reading at </arms-message> and closes (§2.4).
            self._cancel_timer()
            self.transport.loseConnection()

    def _answer_complete(self) -> bool:
        head = _parse_http_head(self._buffer)
        if head.header_end is None:
            return False
        body = self._buffer[head.header_end :]
        if head.chunked:
            body = _dechunk(body)[0]
        return b"</arms-message>" in body

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._done = True
        self._cancel_timer()
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        self.reason = reason
        self.finished.callback(None)


class SimulatedSA:
    """One simulated device: builds its requests and runs them over fresh TLS connections."""

    def __init__(
        self,
        reactor: Any,
        distid: str,
        key: str,
        *,
        ca_pem: bytes,
        client_cert_pem: bytes | None = None,
        client_key_pem: bytes | None = None,
        description: str = DEFAULT_DESCRIPTION,
        firmware_info: str | None = DEFAULT_FIRMWARE_INFO,
        tls_min_version: int | None = None,
        tls_max_version: int | None = None,
        cipher_list: bytes | None = None,
        response_timeout: float = RESPONSE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        if len(description) > 32:
            raise ValueError("the SA's description is at most 32 characters")
        if firmware_info is not None and len(firmware_info) > 32:
            raise ValueError("the SA's firmware-info is at most 32 characters")
        self.reactor = reactor
        self.distid = distid
        self.key = key
        self.description = description
        self.firmware_info = firmware_info
        self.response_timeout = response_timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.tls = SAConnectionCreator(
            ca_pem,
            client_cert_pem,
            client_key_pem,
            tls_min_version=tls_min_version,
            tls_max_version=tls_max_version,
            cipher_list=cipher_list,
        )

    # -- envelope ----------------------------------------------------------------------------

    @property
    def authorization(self) -> str:
        return basic_authorization(self.distid, self.key)

    def _envelope_start(
        self,
        msg_type: str,
        *,
        transaction_result: int | None = None,
        transaction_id: int | None = None,
    ) -> str:
        parts = ["<arms-message>", f'<arms-request type="{msg_type}">']
        if transaction_result is not None:
            parts.append(f"<transaction-result>{transaction_result}</transaction-result>")
        parts.append(f"<distribution-id>{self.distid}</distribution-id>")
        if transaction_id is not None:
            parts.append(f"<transaction-id>{transaction_id}</transaction-id>")
        parts.append(f"<description>{escape_text(self.description)}</description>")
        return "".join(parts)

    @staticmethod
    def _envelope_end() -> str:
        return "</arms-request></arms-message>"

    def _frame(self, url: str, kind: str, body: bytes, form: str) -> SARequest:
        target = parse_url(url)
        if form == "A":
            return _form_a(target, self.authorization, body, kind)
        if form == "B":
            return _form_b(target, self.authorization, [body], kind)
        raise ValueError(f"form must be 'A' or 'B', not {form!r}")

    # -- builders ----------------------------------------------------------------------------

    def build_config_solicitation(
        self, url: str, trigger: str = "power on boot", *, form: str = "A"
    ) -> SARequest:
        inner = (
            f"<protocol-version>{PROTOCOL_VERSION}</protocol-version><trigger>{trigger}</trigger>"
        )
        if self.firmware_info is not None:
            inner += f"<firmware-info>{escape_text(self.firmware_info)}</firmware-info>"
        body = (
            self._envelope_start("config-solicitation")
            + f"<config-solicitation-request>{inner}</config-solicitation-request>"
            + self._envelope_end()
        )
        return self._frame(url, "config-solicitation", body.encode("ascii"), form)

    def build_push_method_query(
        self,
        url: str,
        methods: Sequence[str] = ("https-simple", "https-tunnel"),
        *,
        form: str = "A",
    ) -> SARequest:
        inner = "".join(f"<push-method>{m}</push-method>" for m in methods)
        body = (
            self._envelope_start("push-method-query")
            + f"<push-method-query-request>{inner}</push-method-query-request>"
            + self._envelope_end()
        )
        return self._frame(url, "push-method-query", body.encode("ascii"), form)

    def build_push_confirmation_start(
        self,
        url: str,
        method: str = "https-simple",
        push_endpoint: str | None = "https://127.0.0.1:10443/",
        *,
        form: str = "B",
    ) -> SARequest:
        inner = f"<push-method>{method}</push-method>"
        if push_endpoint is not None and method == "https-simple":
            inner += f"<push-endpoint>{push_endpoint}</push-endpoint>"
        body = (
            self._envelope_start("push-confirmation-start")
            + f"<push-confirmation-start-request>{inner}</push-confirmation-start-request>"
            + self._envelope_end()
        )
        return self._frame(url, "push-confirmation-start", body.encode("ascii"), form)

    def build_done_request(
        self,
        url: str,
        base: str,
        *,
        transaction_id: int,
        transaction_result: int = 100,
        body_pieces: Sequence[str | bytes] = (),
        split: bool | None = None,
        form: str = "B",
    ) -> SARequest:
        """A `<base>-done` request; each of `body_pieces` is one builder piece (one chunk).

        The SA sends the envelope up to the body start tag, each result piece and the closing
        tags as separate chunks, except for ping and configure, whose done is one chunk
        (`split` overrides). E.g. read-status: ['<status-report id="1" result="100">text',
        '</status-report>'].
        """
        kind = f"{base}-done"
        head = (
            self._envelope_start(
                kind, transaction_result=transaction_result, transaction_id=transaction_id
            )
            + f"<{kind}-request>"
        )
        tail = f"</{kind}-request>" + self._envelope_end()
        pieces = [_ascii(head), *(_ascii(p) for p in body_pieces), _ascii(tail)]
        if split is None:
            split = base not in _SINGLE_CHUNK_DONE
        target = parse_url(url)
        if form == "A":
            return SARequest(
                kind=kind,
                pieces=_form_a(target, self.authorization, b"".join(pieces), kind).pieces,
                transaction_result=transaction_result,
            )
        if form != "B":
            raise ValueError(f"form must be 'A' or 'B', not {form!r}")
        chunks = pieces if split else [b"".join(pieces)]
        return _form_b(target, self.authorization, chunks, kind, transaction_result)

    # -- exchanges ---------------------------------------------------------------------------

    async def config_solicitation(
        self, url: str, trigger: str = "power on boot", *, form: str = "A"
    ) -> SAExchange:
        return await self.send(url, self.build_config_solicitation(url, trigger, form=form))

    async def push_method_query(
        self,
        url: str,
        methods: Sequence[str] = ("https-simple", "https-tunnel"),
        *,
        form: str = "A",
    ) -> SAExchange:
        return await self.send(url, self.build_push_method_query(url, methods, form=form))

    async def push_confirmation_start(
        self,
        url: str,
        method: str = "https-simple",
        push_endpoint: str | None = "https://127.0.0.1:10443/",
        *,
        form: str = "B",
    ) -> SAExchange:
        request = self.build_push_confirmation_start(url, method, push_endpoint, form=form)
        return await self.send(url, request)

    async def done_request(
        self,
        url: str,
        base: str,
        *,
        transaction_id: int,
        transaction_result: int = 100,
        body_pieces: Sequence[str | bytes] = (),
        split: bool | None = None,
        form: str = "B",
    ) -> SAExchange:
        request = self.build_done_request(
            url,
            base,
            transaction_id=transaction_id,
            transaction_result=transaction_result,
            body_pieces=body_pieces,
            split=split,
            form=form,
        )
        return await self.send(url, request)

    async def post_raw(
        self,
        url: str,
        raw_bytes: bytes,
        *,
        write_delay: float = 0,
        piece_size: int | None = None,
        kind: str | None = None,
        transaction_result: int | None = None,
    ) -> SAExchange:
        """Send arbitrary bytes (malformed, slow) and judge the answer as `kind` would be.

        `kind` defaults to the request's own `type`; unknown types are judged like a
        config-solicitation answer.
        """
        if kind is None:
            kind = infer_kind(raw_bytes) or "config-solicitation"
        try:
            _family(kind)
        except ValueError:
            kind = "config-solicitation"
        pieces = tuple(_split(raw_bytes, piece_size)) if piece_size else (raw_bytes,)
        request = SARequest(kind=kind, pieces=pieces, transaction_result=transaction_result)
        return await self.send(url, request, write_delay=write_delay)

    async def send(self, url: str, request: SARequest, *, write_delay: float = 0) -> SAExchange:
        """Run `request` on a fresh TLS connection to `url` (the SA never reuses one)."""
        target = parse_url(url)
        clock = self.reactor
        started = clock.seconds()
        endpoint_type = TCP6ClientEndpoint if target.ipv6 else TCP4ClientEndpoint
        endpoint = endpoint_type(clock, target.host, target.port, timeout=self.connect_timeout)
        proto = _ExchangeProtocol(
            clock,
            request.pieces,
            write_delay=write_delay,
            response_timeout=self.response_timeout,
            handshake_timeout=self.handshake_timeout,
        )
        factory = _UnbufferedTLSFactory(self.tls, True, Factory.forProtocol(lambda: proto))
        try:
            await endpoint.connect(factory)
        except Exception as exc:
            error = f"connection failed: {exc}"
            verdict = _judge(
                request.kind,
                b"",
                reads=None,
                transaction_result=request.transaction_result,
                failure=error,
            )
            return SAExchange(
                None, [], b"", [], b"", clock.seconds() - started, verdict, error, request.data
            )
        await proto.finished
        reason = proto.reason
        raw = b"".join(proto.reads)
        error = None
        if proto.timed_out and not proto.handshake_done:
            error = f"TLS handshake not done within {self.handshake_timeout:g} s"
        elif proto.timed_out:
            error = f"no complete answer within {self.response_timeout:g} s of the request"
        elif not proto.handshake_done:
            error = f"TLS handshake failed: {_reason_text(reason)}"
        elif not raw and reason is not None and not _is_clean_close(reason):
            error = f"connection lost without answer: {_reason_text(reason)}"
        verdict = _judge(
            request.kind,
            raw,
            reads=proto.reads or None,
            transaction_result=request.transaction_result,
            failure=error,
        )
        http = _parse_http_head(raw)
        body = b""
        if http.header_end is not None:
            body = raw[http.header_end :]
            if http.chunked:
                body = _dechunk(body)[0]
        elapsed = clock.seconds() - started
        log.debug(
            "device client: {kind} -> {outcome} in {elapsed:.3f}s",
            kind=request.kind,
            outcome=verdict.outcome,
            elapsed=elapsed,
        )
        return SAExchange(
            status=http.status,
            headers=http.headers,
            raw=raw,
            reads=list(proto.reads),
            body_xml=body,
            elapsed=elapsed,
            verdict=verdict,
            error=error,
            request=request.data,
            tls_version=proto.tls_version,
        )


def _reason_text(reason: Failure | None) -> str:
    if reason is None:
        return "closed"
    value = reason.value
    if isinstance(value, SSL.Error) and value.args:
        return str(value.args[0])
    return str(value) or type(value).__name__


def _is_clean_close(reason: Failure) -> bool:
    from twisted.internet.error import ConnectionDone

    return reason.check(ConnectionDone) is not None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


COMMANDS = ("pull", "query", "confirm", "sequence", "serve")


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armsproxy-sasim",
        description=(
            "Simulated libarms 5.33 SA. pull, query, confirm, sequence: send pull-type requests "
            "and judge the answers (exit 0 only if every answer was good). serve: pull, "
            "confirm, then serve pushes (https-simple listener, or --tunnel) and send "
            "done-requests until SIGINT/SIGTERM, one line per thing received."
        ),
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--url", required=True, help="the pull URL: https://IP[:port]/path")
    parser.add_argument("--distid", required=True)
    parser.add_argument("--key", required=True, help="the RS pre-shared key")
    parser.add_argument("--ca", required=True, metavar="FILE", help="the one trusted CA (PEM)")
    parser.add_argument("--cert", metavar="FILE", help="client certificate and key (PEM)")
    parser.add_argument("--cert-key", metavar="FILE", help="client key if not in --cert")
    parser.add_argument("--description", default=DEFAULT_DESCRIPTION)
    parser.add_argument("--firmware-info", default=DEFAULT_FIRMWARE_INFO)
    parser.add_argument("--trigger", default="power on boot")
    parser.add_argument("--methods", default="https-simple,https-tunnel")
    parser.add_argument("--method", default="https-simple")
    parser.add_argument("--push-endpoint", default="https://127.0.0.1:10443/")
    parser.add_argument("--timeout", type=float, default=RESPONSE_TIMEOUT)
    parser.add_argument("--tls-min", choices=sorted(TLS_VERSIONS))
    parser.add_argument("--tls-max", choices=sorted(TLS_VERSIONS))
    parser.add_argument("-v", "--verbose", action="store_true", help="print the raw answers")
    serve = parser.add_argument_group("serve")
    serve.add_argument(
        "--listen",
        default="127.0.0.1:10443",
        metavar="IP:PORT",
        help="https-simple: where the device listens for pushes, reported to the proxy as its "
        "push-endpoint https://IP:PORT/ (default 127.0.0.1:10443; [IPv6]:PORT)",
    )
    serve.add_argument(
        "--tunnel", action="store_true", help="https-tunnel instead of an https-simple listener"
    )
    serve.add_argument(
        "--retry-interval",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="between failed pulls, and before pulling again after a reboot or pull-config",
    )
    serve.add_argument(
        "--retry-max",
        type=int,
        default=5,
        metavar="N",
        help="failed pull rounds in a row before giving up with exit 1 (0: never)",
    )
    return parser


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()


async def _run_cli(reactor: Any, args: argparse.Namespace, out: Any) -> int:
    sa = SimulatedSA(
        reactor,
        args.distid,
        args.key,
        ca_pem=_read(args.ca) or b"",
        client_cert_pem=_read(args.cert),
        client_key_pem=_read(args.cert_key),
        description=args.description,
        firmware_info=args.firmware_info or None,
        tls_min_version=TLS_VERSIONS.get(args.tls_min or ""),
        tls_max_version=TLS_VERSIONS.get(args.tls_max or ""),
        response_timeout=args.timeout,
    )
    methods = [m for m in args.methods.split(",") if m]

    def show(exchange: SAExchange) -> bool:
        print(exchange.verdict.describe(), file=out)
        print(f"  elapsed={exchange.elapsed:.3f}s", file=out)
        if args.verbose:
            print(exchange.raw.decode("latin-1"), file=out)
        return exchange.verdict.ok

    if args.command == "pull":
        return 0 if show(await sa.config_solicitation(args.url, args.trigger)) else 1
    if args.command == "query":
        return 0 if show(await sa.push_method_query(args.url, methods)) else 1
    if args.command == "confirm":
        exchange = await sa.push_confirmation_start(args.url, args.method, args.push_endpoint)
        return 0 if show(exchange) else 1
    if not show(await sa.config_solicitation(args.url, args.trigger)):
        return 1
    query = await sa.push_method_query(args.url, methods)
    if not show(query):
        return 1
    if args.method not in query.verdict.push_methods:
        print(f"sequence: {args.method} not offered by the push-method-query answer", file=out)
        return 1
    confirm = await sa.push_confirmation_start(args.url, args.method, args.push_endpoint)
    return 0 if show(confirm) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `armsproxy-sasim`.

    pull, query, confirm, sequence: exit 0 only if every answer was good. serve: runs until
    SIGINT/SIGTERM (exit 0) or until it cannot get the device confirmed (exit 1).
    """
    args = _arg_parser().parse_args(argv)
    if args.command == "serve":
        from .serve import main_serve  # the device's three faces together

        return main_serve(args)
    from twisted.internet import task

    code: list[int] = []

    async def run(reactor: Any) -> None:
        code.append(await _run_cli(reactor, args, sys.stdout))

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return code[0] if code else 1


if __name__ == "__main__":
    sys.exit(main())
