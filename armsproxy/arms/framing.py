"""Wire framing for ARMS: HTTP messages, tunnel chunks and the exact bytes armsproxy writes.

Pure Python, no Twisted, no XML parsing. The rules follow what libarms 5.33 really sends and
accepts (arms-protocol.md §2.3-§2.6, §9), which is not always what RFC 9112 says:

* the SA answers pushes with ``HTTP/1.0``, no ``Content-Length`` and a body that ends at EOF;
* the blank line that ends a header block must be CRLF, header lines themselves may end in LF;
* a request that the SA got chunked is answered with ``Transfer-Encoding: chunked`` over a body
  that is not chunk-framed at all (decoded leniently here, with a note);
* the tunnel is a never-ending chunk stream whose extensions (``id=N``, ``trail``,
  ``echo-request``, ``echo-response``) carry the message boundaries and keep-alives.

Empty input (the SA closed without any HTTP answer, §2.1) is not an HTTP message:
:func:`parse_http_message` raises :class:`EmptyMessageError` (a :class:`FramingError`), while
:func:`parse_sa_push_response` turns it into a result with ``status is None``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_HEADER_LINE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "ECHO_REQUEST",
    "ECHO_RESPONSE",
    "END_OF_STREAM",
    "MAX_CHUNK_HEADER_LINE",
    "TUNNEL_OPEN_RESPONSE",
    "Chunk",
    "ChunkDecoder",
    "EchoRequest",
    "EchoResponse",
    "EmptyMessageError",
    "EndOfStream",
    "FramingError",
    "HttpMessage",
    "MessageAssembler",
    "SAPushResponse",
    "TunnelEvent",
    "TunnelMessage",
    "TunnelReader",
    "build_http_error",
    "build_push_request",
    "build_sa_response",
    "build_tunnel_open_response",
    "encode_chunk",
    "extract_arms_xml",
    "find_header_end",
    "new_chunk_id",
    "parse_http_head",
    "parse_http_message",
    "parse_sa_push_response",
    "parse_tunnel_file",
]

# Limits. The SA's own listener allows 1024-byte header lines (§2.5); what we parse also comes
# from RS-side test servers and proxies, hence the roomier defaults. Callers tighten as needed.
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADER_LINE = 8 * 1024
DEFAULT_MAX_BODY = 4 * 1024 * 1024
#: §11.2: a tunnel chunk header (size and extensions, without its CRLF) is at most 255 bytes.
MAX_CHUNK_HEADER_LINE = 255
#: The SA's chunks carry at most 8191 bytes; ours are one message each.
DEFAULT_MAX_CHUNK_SIZE = 1024 * 1024
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: Messages are never interleaved by the SA, so more than a few open ids means garbage.
DEFAULT_MAX_PENDING_MESSAGES = 8

#: The proxy's keep-alive answer, byte for byte as captured (tunnel/09-tunnel-echo.response.txt).
ECHO_RESPONSE = b"4;echo-response;trail\r\necho\r\n"
#: What the SA sends every echo interval (tunnel/09-tunnel-echo.request.txt).
ECHO_REQUEST = b"4;echo-request;trail\r\necho\r\n"
#: Zero chunk without id: closes the tunnel (tunnel/34-tunnel-last-chunk.message.txt).
END_OF_STREAM = b"0\r\n\r\n"
#: The only tunnel-open answer the SA accepts must begin ``HTTP/1.1 200`` (§9.1); these are the
#: captured bytes of tunnel/04-https-tunnel-open.response.txt.
TUNNEL_OPEN_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
)

_MAX_CHUNK_ID = 2**31 - 1


class FramingError(ValueError):
    """Bytes that cannot be framed as HTTP or as tunnel chunks; the message says where and why."""


class EmptyMessageError(FramingError):
    """No byte at all: the peer closed without any HTTP message (not a syntax problem)."""


# --------------------------------------------------------------------------------------------
# HTTP messages
# --------------------------------------------------------------------------------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") +([\x21-\x7e]+) +HTTP/([0-9])\.([0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) +([0-9]{3})(?: ([\x20-\x7e\x80-\xff]*))?")
_HEADER_NAME = re.compile(_TOKEN)
_HEX = re.compile(rb"[0-9A-Fa-f]+")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _reason(status: int) -> str:
    # A fixed table keeps our bytes stable across Python versions (HTTPStatus phrases change).
    return _REASONS.get(status, "Error" if status >= 400 else "OK")


def _find_value(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _find_all(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


@dataclass(slots=True)
class HttpMessage:
    """One HTTP request or response as found on the wire, with its body decoded.

    ``headers`` keeps order and original spelling (the SA's own matching is case-sensitive, so
    the spelling matters when checking what a peer sent); :meth:`header` looks up ignoring case.
    ``body_framing`` says how the end of the body was found: ``"content-length"``,
    ``"chunked"`` or ``"eof"``. ``framing_notes`` lists every leniency that was applied.
    """

    is_request: bool
    version: str
    method: str | None = None
    target: str | None = None
    status: int | None = None
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    body_framing: str = "eof"
    framing_notes: list[str] = field(default_factory=list)
    header_size: int = 0

    @property
    def start_line(self) -> str:
        if self.is_request:
            return f"{self.method} {self.target} {self.version}"
        if self.reason:
            return f"{self.version} {self.status} {self.reason}"
        return f"{self.version} {self.status}"

    @property
    def declares_chunked(self) -> bool:
        """True when Transfer-Encoding names chunked, whether or not the body really was."""
        return any("chunked" in value.lower() for value in self.header_all("Transfer-Encoding"))

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of ``name`` (case-insensitive), or ``default``."""
        value = _find_value(self.headers, name)
        return default if value is None else value

    def header_all(self, name: str) -> list[str]:
        return _find_all(self.headers, name)

    def has_header(self, name: str) -> bool:
        return _find_value(self.headers, name) is not None


def find_header_end(data: bytes | bytearray, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                    ) -> int | None:
    """Offset just past the header block, or None if it is not complete yet.

    The block ends at the first blank line written as CRLF after a line end (LF or CRLF), as in
    libarms. Raises :class:`FramingError` once ``max_header_bytes`` is exceeded, so a protocol
    buffering incoming bytes can call this on every read.
    """
    index = data.find(b"\n\r\n")
    if index == -1:
        if len(data) > max_header_bytes:
            raise FramingError(
                f"header block exceeds {max_header_bytes} bytes without the CRLF CRLF end")
        return None
    end = index + 3
    if end > max_header_bytes:
        raise FramingError(f"header block of {end} bytes exceeds {max_header_bytes} bytes")
    return end


def parse_http_head(head: bytes, *, max_header_line: int = DEFAULT_MAX_HEADER_LINE,
                    ) -> HttpMessage:
    """Parse a complete header block (start line up to and including the blank CRLF line).

    The body is left empty; :func:`parse_http_message` fills it in. The tunnel endpoint uses this
    on its own, because the tunnel request body never ends.
    """
    if not head.endswith(b"\n\r\n"):
        raise FramingError("header block does not end with a CRLF blank line")
    notes: list[str] = []
    lines = head[:-2].split(b"\n")
    lines.pop()  # the text ended with a line end: the last piece is empty
    bare_lf = False
    cleaned: list[bytes] = []
    for number, raw in enumerate(lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        else:
            bare_lf = True
        if len(raw) > max_header_line:
            raise FramingError(
                f"header line {number} is {len(raw)} bytes, more than {max_header_line}")
        if b"\r" in raw:
            raise FramingError(f"bare CR inside header line {number}")
        cleaned.append(raw)
    if bare_lf:
        notes.append("header lines ending in bare LF")
    if not cleaned or not cleaned[0]:
        raise FramingError("empty start line")

    message = _parse_start_line(cleaned[0])
    headers: list[tuple[str, str]] = []
    for number, raw in enumerate(cleaned[1:], start=2):
        if not raw:
            raise FramingError(f"blank line {number} ends in bare LF inside the header block")
        if raw[:1] in (b" ", b"\t"):
            if not headers:
                raise FramingError("continuation line before the first header field")
            name, value = headers[-1]
            folded = raw.strip(b" \t").decode("latin-1")
            headers[-1] = (name, f"{value} {folded}" if value else folded)
            if "obsolete header line folding" not in notes:
                notes.append("obsolete header line folding")
            continue
        name_bytes, colon, value_bytes = raw.partition(b":")
        if not colon:
            raise FramingError(f"header line {number} has no colon: {raw[:40]!r}")
        if name_bytes.rstrip(b" \t") != name_bytes:
            raise FramingError(f"whitespace before the colon in header line {number}")
        if _HEADER_NAME.fullmatch(name_bytes) is None:
            raise FramingError(f"invalid header name in line {number}: {name_bytes[:40]!r}")
        headers.append((name_bytes.decode("ascii"), value_bytes.strip(b" \t").decode("latin-1")))
    message.headers = headers
    message.framing_notes = notes
    message.header_size = len(head)
    return message


def _parse_start_line(line: bytes) -> HttpMessage:
    match = _STATUS_LINE.fullmatch(line)
    if match is not None:
        return HttpMessage(
            is_request=False,
            version=f"HTTP/{match.group(1).decode()}.{match.group(2).decode()}",
            status=int(match.group(3)),
            reason=(match.group(4) or b"").decode("latin-1").strip(),
        )
    match = _REQUEST_LINE.fullmatch(line)
    if match is not None:
        return HttpMessage(
            is_request=True,
            version=f"HTTP/{match.group(3).decode()}.{match.group(4).decode()}",
            method=match.group(1).decode("ascii"),
            target=match.group(2).decode("ascii"),
        )
    raise FramingError(f"not an HTTP request or status line: {line[:60]!r}")


def parse_http_message(
    data: bytes,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_header_line: int = DEFAULT_MAX_HEADER_LINE,
    max_body: int = DEFAULT_MAX_BODY,
) -> HttpMessage:
    """Parse one complete HTTP message (everything read up to EOF) and decode its body.

    Body end: chunked if Transfer-Encoding says so, else Content-Length, else EOF. Leniency a
    proxy needs with libarms, each recorded in ``framing_notes``: a "chunked" body that is not
    chunk-framed is taken raw (the SA's answer to a chunked push, §2.6); a chunked body cut at a
    chunk boundary without its last-chunk is accepted (the tunnel-open request); bytes after a
    Content-Length body are ignored. Raises :class:`EmptyMessageError` on empty input.
    """
    if not data:
        raise EmptyMessageError("no data: the peer closed without sending an HTTP message")
    end = find_header_end(data, max_header_bytes=max_header_bytes)
    if end is None:
        raise FramingError(
            f"header block not terminated by CRLF CRLF ({len(data)} bytes, no blank line)")
    message = parse_http_head(data[:end], max_header_line=max_header_line)
    rest = data[end:]
    notes = message.framing_notes

    transfer_codings = [
        coding.strip().lower()
        for value in message.header_all("Transfer-Encoding")
        for coding in value.split(",")
        if coding.strip()
    ]
    lengths = message.header_all("Content-Length")
    if transfer_codings:
        if lengths:
            notes.append("Content-Length ignored because Transfer-Encoding is present")
        if transfer_codings[-1] == "chunked":
            body, chunked = _decode_chunked_body(rest, max_body=max_body, notes=notes)
            message.body = body
            message.body_framing = "chunked" if chunked else "eof"
            return message
        notes.append(f"unsupported Transfer-Encoding {transfer_codings!r}: body read to EOF")
    elif lengths:
        length = _content_length(lengths)
        if length > max_body:
            raise FramingError(f"Content-Length {length} exceeds the body limit of {max_body}")
        if len(rest) < length:
            raise FramingError(
                f"body truncated: Content-Length {length} but only {len(rest)} bytes follow")
        if len(rest) > length:
            notes.append(f"{len(rest) - length} bytes after the Content-Length body ignored")
        message.body = rest[:length]
        message.body_framing = "content-length"
        return message
    if len(rest) > max_body:
        raise FramingError(f"body of {len(rest)} bytes exceeds the body limit of {max_body}")
    message.body = rest
    message.body_framing = "eof"
    return message


def _content_length(values: list[str]) -> int:
    found: set[int] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item.isdigit() or not item.isascii() or len(item) > 18:
                raise FramingError(f"invalid Content-Length {value!r}")
            found.add(int(item))
    if len(found) != 1:
        raise FramingError(f"conflicting Content-Length values {values!r}")
    return found.pop()


def _read_line(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """Line at ``pos`` without its LF/CRLF, and the offset after it; None if unterminated."""
    index = data.find(b"\n", pos)
    if index == -1:
        return None
    line = data[pos:index]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, index + 1


def _http_chunk_size(line: bytes) -> int | None:
    size_text = line.split(b";", 1)[0].strip(b" \t")
    if _HEX.fullmatch(size_text) is None or len(size_text) > 16:
        return None
    return int(size_text, 16)


def _decode_chunked_body(data: bytes, *, max_body: int, notes: list[str],
                         ) -> tuple[bytes, bool]:
    """Decode an HTTP chunked body read to EOF; returns (body, really_chunked)."""
    first = _read_line(data, 0)
    if not data or first is None or _http_chunk_size(first[0]) is None:
        if data:
            notes.append("Transfer-Encoding: chunked declared but the body is not chunk-framed;"
                         " body taken raw to EOF")
            if len(data) > max_body:
                raise FramingError(
                    f"body of {len(data)} bytes exceeds the body limit of {max_body}")
            return data, False
        notes.append("no last-chunk (0 CRLF CRLF) before EOF")
        return b"", True

    parts: list[bytes] = []
    total = 0
    pos = 0
    while True:
        if pos == len(data):
            notes.append("no last-chunk (0 CRLF CRLF) before EOF")
            return b"".join(parts), True
        read = _read_line(data, pos)
        if read is None:
            raise FramingError(f"chunk size line at body offset {pos} is not terminated")
        line, pos = read
        size = _http_chunk_size(line)
        if size is None:
            raise FramingError(f"invalid chunk size line at body offset {pos}: {line[:40]!r}")
        if size == 0:
            break
        total += size
        if total > max_body:
            raise FramingError(f"chunked body exceeds the body limit of {max_body}")
        if pos + size > len(data):
            raise FramingError(
                f"chunk of {size} bytes truncated: only {len(data) - pos} bytes before EOF")
        parts.append(data[pos:pos + size])
        pos += size
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
            if "chunk data ended by bare LF" not in notes:
                notes.append("chunk data ended by bare LF")
        else:
            raise FramingError(
                f"missing CRLF after {size} bytes of chunk data: got {data[pos:pos + 2]!r}")

    # Trailer section after the last-chunk, ended by an empty line.
    while True:
        read = _read_line(data, pos)
        if read is None:
            if pos < len(data):
                raise FramingError("unterminated trailer line after the last-chunk")
            notes.append("last-chunk not followed by the final CRLF")
            break
        line, pos = read
        if not line:
            break
        if "trailer fields ignored" not in notes:
            notes.append("trailer fields ignored")
    if pos < len(data):
        notes.append(f"{len(data) - pos} bytes after the chunked body ignored")
    return b"".join(parts), True


# --------------------------------------------------------------------------------------------
# The SA's answers to our pushes
# --------------------------------------------------------------------------------------------


def extract_arms_xml(body: bytes, notes: list[str] | None = None) -> bytes:
    """The ``<arms-message>…</arms-message>`` part of a body, or b"" if there is none.

    Drops the XML declaration and the bare CR the SA puts after it (§2.6). A message without its
    closing tag is returned as is (stripped) and noted, so the XML layer reports the real error.
    """
    start = body.find(b"<arms-message")
    if start == -1:
        return b""
    close = b"</arms-message>"
    end = body.rfind(close)
    if end < start:
        if notes is not None:
            notes.append("arms-message not closed before the end of the body")
        return body[start:].rstrip()
    end += len(close)
    if notes is not None and body[end:].strip():
        notes.append("non-whitespace bytes after </arms-message>")
    return body[start:end]


@dataclass(slots=True)
class SAPushResponse:
    """What the SA's https-simple listener answered (read to EOF).

    ``status is None`` means the SA closed without any HTTP answer (e.g. a client certificate
    from a foreign CA, §2.1). ``xml`` is the ``<arms-message>`` document or b"" (401/400 carry
    only the XML declaration); ``body`` keeps the raw bytes, declaration and bare CR included.
    """

    status: int | None
    reason: str = ""
    version: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    xml: bytes = b""
    framing_notes: list[str] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.status is not None

    def header(self, name: str, default: str | None = None) -> str | None:
        value = _find_value(self.headers, name)
        return default if value is None else value


def parse_sa_push_response(
    data: bytes,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_header_line: int = DEFAULT_MAX_HEADER_LINE,
    max_body: int = DEFAULT_MAX_BODY,
) -> SAPushResponse:
    """Parse everything the SA's listener sent until it closed (§2.6), leniently."""
    if not data:
        return SAPushResponse(
            status=None, framing_notes=["connection closed without an HTTP answer"])
    message = parse_http_message(data, max_header_bytes=max_header_bytes,
                                 max_header_line=max_header_line, max_body=max_body)
    if message.is_request or message.status is None:
        raise FramingError(f"expected an HTTP response, got {message.start_line!r}")
    notes = list(message.framing_notes)
    xml = extract_arms_xml(message.body, notes)
    return SAPushResponse(
        status=message.status,
        reason=message.reason or "",
        version=message.version,
        headers=message.headers,
        body=message.body,
        xml=xml,
        framing_notes=notes,
    )


# --------------------------------------------------------------------------------------------
# What armsproxy writes over HTTP
# --------------------------------------------------------------------------------------------


def _check_header_text(text: str, what: str) -> None:
    if any(ch in text for ch in "\r\n\0") or not text.isascii():
        raise ValueError(f"{what} must be ASCII without CR, LF or NUL: {text!r}")


def build_sa_response(body: bytes, status: int = 200) -> bytes:
    """Answer to an SA request: one bytes object for one transport write (§2.4, rule 5)."""
    if not 100 <= status <= 599:
        raise ValueError(f"invalid HTTP status {status}")
    return (
        f"HTTP/1.1 {status} {_reason(status)}\r\n"
        "Content-Type: text/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii") + body


def build_http_error(
    status: int,
    *,
    extra_headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """An HTTP error without an ARMS body (401, 400, 405, 408, 413, 503, ...).

    For 401 pass ``extra_headers=[("WWW-Authenticate", 'Basic realm="arms"')]``; a short text
    ``body`` gets ``Content-Type: text/plain``.
    """
    if not 400 <= status <= 599:
        raise ValueError(f"not an HTTP error status: {status}")
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    for name, value in extra_headers:
        if _HEADER_NAME.fullmatch(name.encode("latin-1", "replace")) is None:
            raise ValueError(f"invalid header name {name!r}")
        _check_header_text(value, f"value of header {name}")
        lines.append(f"{name}: {value}")
    if body:
        lines.append("Content-Type: text/plain; charset=us-ascii")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _host_header(host: str, port: int) -> str:
    _check_header_text(host, "host")
    if not host or " " in host:
        raise ValueError(f"invalid host {host!r}")
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    is_v6 = False
    if ":" in host:  # only an IPv6 literal can hold one: no address parse for IPv4 (per push)
        try:
            is_v6 = isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            pass
    # The SA ignores Host (§2.5); bracket IPv6 as RFC 9110 wants.
    return f"[{host}]:{port}" if is_v6 else f"{host}:{port}"


def build_push_request(host: str, port: int, distid: str, key: str, body: bytes) -> bytes:
    """A push to the SA's https-simple listener, byte-compatible with the captures (§2.5).

    Never chunked; ``Authorization: Basic`` spelled exactly so (the SA matches the prefix
    case-sensitively); header order as in simple/13-ping-start.request.txt.
    """
    _check_header_text(distid, "distid")
    _check_header_text(key, "key")
    if ":" in distid or not distid:
        raise ValueError(f"invalid distid {distid!r}")
    credentials = base64.b64encode(f"{distid}:{key}".encode("ascii")).decode("ascii")
    return (
        "POST / HTTP/1.1\r\n"
        f"Host: {_host_header(host, port)}\r\n"
        "Content-Type: text/xml\r\n"
        "Connection: close\r\n"
        f"Authorization: Basic {credentials}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode("ascii") + body


def build_tunnel_open_response() -> bytes:
    """The 200 header that opens a tunnel; written in one write, nothing after it (§9.1)."""
    return TUNNEL_OPEN_RESPONSE


# --------------------------------------------------------------------------------------------
# Tunnel chunks (§9.2-§9.6)
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Chunk:
    """One tunnel chunk. ``end_of_stream`` is the bare ``0`` chunk (no id, no echo flag)."""

    size: int
    data: bytes
    id: int | None = None
    trail: bool = False
    echo_request: bool = False
    echo_response: bool = False
    end_of_stream: bool = False
    extensions: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class TunnelMessage:
    """A complete message: the data of all chunks with one id, up to the ``trail`` chunk."""

    chunk_id: int
    body: bytes


@dataclass(slots=True, frozen=True)
class EchoRequest:
    """The SA's keep-alive: answer with :data:`ECHO_RESPONSE` before its next echo tick."""


@dataclass(slots=True, frozen=True)
class EchoResponse:
    """A keep-alive answer (seen when reading the proxy's side of a capture)."""


@dataclass(slots=True, frozen=True)
class EndOfStream:
    """The zero chunk without id: the peer is closing the tunnel."""


TunnelEvent = TunnelMessage | EchoRequest | EchoResponse | EndOfStream

_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")


def _parse_chunk_header(line: bytes, *, max_chunk_size: int) -> Chunk:
    if any(byte < 0x21 or byte > 0x7E for byte in line):
        raise FramingError(f"invalid byte in chunk header {line[:60]!r}")
    size_text, *exts = line.split(b";")
    if _HEX.fullmatch(size_text) is None:
        raise FramingError(f"invalid chunk size {size_text[:40]!r}: expected hex digits")
    if len(size_text) > 16 or int(size_text, 16) > max_chunk_size:
        raise FramingError(
            f"chunk size {size_text.decode()} exceeds the limit of {max_chunk_size} bytes")
    size = int(size_text, 16)
    chunk_id: int | None = None
    trail = echo_request = echo_response = False
    for ext in exts:
        if ext.startswith(b"id="):
            digits = ext[3:]
            if not digits.isdigit() or len(digits) > 19:
                raise FramingError(f"invalid chunk id {ext[:40]!r}: expected decimal digits")
            chunk_id = int(digits)
        elif ext == b"trail":
            trail = True
        elif ext == b"echo-request":
            echo_request = True
        elif ext in (b"echo-response", b"echo"):
            echo_response = True
        # anything else: an unknown extension, ignored like the SA does
    return Chunk(
        size=size,
        data=b"",
        id=chunk_id,
        trail=trail,
        echo_request=echo_request,
        echo_response=echo_response,
        end_of_stream=(size == 0 and chunk_id is None and not echo_request
                       and not echo_response),
        extensions=tuple(ext.decode("ascii") for ext in exts),
    )


_HEADER, _DATA, _DATA_CRLF, _CLOSED = range(4)


class ChunkDecoder:
    """Incremental tunnel chunk parser: any split of the input gives the same chunks.

    The SA writes header, data and CRLF as three writes, so nothing may depend on read
    boundaries. Errors are final: after a :class:`FramingError` the stream is out of sync and
    every later :meth:`feed` raises again. Bytes after the end-of-stream chunk are an error.
    """

    def __init__(
        self,
        *,
        max_header_line: int = MAX_CHUNK_HEADER_LINE,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
    ) -> None:
        self._max_header_line = max_header_line
        self._max_chunk_size = max_chunk_size
        self._buffer = bytearray()
        self._state = _HEADER
        self._header: Chunk | None = None
        self._remaining = 0
        self._parts: list[bytes] = []
        self._error: str | None = None

    @property
    def at_boundary(self) -> bool:
        """True when no chunk is half-received (a clean place for the stream to end)."""
        return self._state in (_HEADER, _CLOSED) and not self._buffer

    @property
    def closed(self) -> bool:
        """True once the end-of-stream chunk has been read."""
        return self._state == _CLOSED

    def feed(self, data: bytes) -> list[Chunk]:
        if self._error is not None:
            raise FramingError(f"chunk stream already failed: {self._error}")
        try:
            return self._feed(data)
        except FramingError as error:
            self._error = str(error)
            raise

    def _feed(self, data: bytes) -> list[Chunk]:
        if self._state == _CLOSED:
            if data:
                raise FramingError(f"{len(data)} bytes after the end-of-stream chunk")
            return []
        buffer = self._buffer
        buffer += data
        chunks: list[Chunk] = []
        pos = 0
        while pos < len(buffer):
            if self._state == _HEADER:
                if buffer[pos] not in _HEXDIGITS:
                    start = bytes(buffer[pos:pos + 20])
                    raise FramingError(f"chunk header must start with a hex digit, got {start!r}")
                newline = buffer.find(b"\n", pos, pos + self._max_header_line + 2)
                if newline == -1:
                    if len(buffer) - pos > self._max_header_line + 1:
                        raise FramingError(
                            f"chunk header line exceeds {self._max_header_line} bytes")
                    break
                if buffer[newline - 1] != 0x0D:
                    raise FramingError("chunk header line ends in bare LF instead of CRLF")
                line = bytes(buffer[pos:newline - 1])
                if len(line) > self._max_header_line:
                    raise FramingError(
                        f"chunk header line exceeds {self._max_header_line} bytes")
                self._header = _parse_chunk_header(line, max_chunk_size=self._max_chunk_size)
                self._remaining = self._header.size
                self._parts = []
                self._state = _DATA
                pos = newline + 1
            elif self._state == _DATA:
                take = min(self._remaining, len(buffer) - pos)
                if take:
                    self._parts.append(bytes(buffer[pos:pos + take]))
                    pos += take
                    self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_CRLF
            elif self._state == _DATA_CRLF:
                have = bytes(buffer[pos:pos + 2])
                if not b"\r\n".startswith(have):
                    raise FramingError(
                        f"missing CRLF after {self._header.size if self._header else 0}"
                        f" bytes of chunk data: got {have!r}")
                if len(have) < 2:
                    break
                pos += 2
                chunk = self._finish_chunk()
                chunks.append(chunk)
                if chunk.end_of_stream:
                    self._state = _CLOSED
                    if pos < len(buffer):
                        raise FramingError(
                            f"{len(buffer) - pos} bytes after the end-of-stream chunk")
                else:
                    self._state = _HEADER
            else:  # pragma: no cover - _CLOSED is handled before the loop
                break
        del buffer[:pos]
        # A zero-size chunk goes from header to CRLF without data: settle the state now so
        # at_boundary and the next feed see it.
        if self._state == _DATA and self._remaining == 0:
            self._state = _DATA_CRLF
        return chunks

    def _finish_chunk(self) -> Chunk:
        header = self._header
        assert header is not None
        data = b"".join(self._parts)
        self._parts = []
        self._header = None
        return Chunk(
            size=header.size,
            data=data,
            id=header.id,
            trail=header.trail,
            echo_request=header.echo_request,
            echo_response=header.echo_response,
            end_of_stream=header.end_of_stream,
            extensions=header.extensions,
        )


class MessageAssembler:
    """Turns chunks into tunnel events: whole messages, echoes, end of stream.

    Chunks are keyed by id (a missing id counts as 0, as on the SA) and concatenated until the
    ``trail`` chunk. A zero-size ``id=N;trail`` chunk ends message N; if nothing was collected
    for N it yields nothing (there is no message to deliver).
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_pending_messages: int = DEFAULT_MAX_PENDING_MESSAGES,
    ) -> None:
        self._max_message_size = max_message_size
        self._max_pending = max_pending_messages
        self._pending: dict[int, list[bytes]] = {}
        self._sizes: dict[int, int] = {}

    @property
    def pending_ids(self) -> list[int]:
        """Ids of messages started but not finished (lost if the stream ends now)."""
        return list(self._pending)

    def feed(self, chunk: Chunk) -> list[TunnelEvent]:
        if chunk.end_of_stream:
            return [EndOfStream()]
        if chunk.echo_request:
            return [EchoRequest()]
        if chunk.echo_response:
            return [EchoResponse()]
        key = chunk.id if chunk.id is not None else 0
        if chunk.data:
            if key not in self._pending and len(self._pending) >= self._max_pending:
                raise FramingError(
                    f"more than {self._max_pending} tunnel messages open at once")
            size = self._sizes.get(key, 0) + len(chunk.data)
            if size > self._max_message_size:
                raise FramingError(
                    f"tunnel message id={key} exceeds {self._max_message_size} bytes")
            self._pending.setdefault(key, []).append(chunk.data)
            self._sizes[key] = size
        if not chunk.trail or key not in self._pending:
            return []
        body = b"".join(self._pending.pop(key))
        del self._sizes[key]
        return [TunnelMessage(chunk_id=key, body=body)]

    def feed_all(self, chunks: Iterable[Chunk]) -> list[TunnelEvent]:
        events: list[TunnelEvent] = []
        for chunk in chunks:
            events.extend(self.feed(chunk))
        return events


class TunnelReader:
    """Decoder and assembler in one: raw tunnel bytes in, events out."""

    def __init__(
        self,
        *,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_pending_messages: int = DEFAULT_MAX_PENDING_MESSAGES,
    ) -> None:
        self.decoder = ChunkDecoder(max_chunk_size=max_chunk_size)
        self.assembler = MessageAssembler(
            max_message_size=max_message_size, max_pending_messages=max_pending_messages)

    def feed(self, data: bytes) -> list[TunnelEvent]:
        return self.assembler.feed_all(self.decoder.feed(data))

    @property
    def idle(self) -> bool:
        """True when neither a chunk nor a message is half-received."""
        return self.decoder.at_boundary and not self.assembler.pending_ids


def parse_tunnel_file(data: bytes) -> list[TunnelEvent]:
    """All events of a captured tunnel byte sequence; it must end on a message boundary."""
    reader = TunnelReader()
    events = reader.feed(data)
    if not reader.decoder.at_boundary:
        raise FramingError("tunnel data ends inside a chunk")
    if reader.assembler.pending_ids:
        raise FramingError(
            f"tunnel data ends inside message id={reader.assembler.pending_ids[0]}")
    return events


def encode_chunk(data: bytes, *, chunk_id: int | None, trail: bool = True) -> bytes:
    """One tunnel chunk as the proxy writes it (§9.5): ``<hex>;id=N;trail CRLF data CRLF``.

    Empty data is refused: a zero-size chunk makes the SA close the tunnel (use
    :data:`END_OF_STREAM` on purpose). Message ids must be non-zero (id 0 breaks continuation).
    """
    if not data:
        raise ValueError("refusing to encode an empty chunk; use END_OF_STREAM to close")
    header = f"{len(data):x}"
    if chunk_id is not None:
        if not 0 < chunk_id <= _MAX_CHUNK_ID:
            raise ValueError(f"chunk id must be in 1..{_MAX_CHUNK_ID}, got {chunk_id}")
        header += f";id={chunk_id}"
    if trail:
        header += ";trail"
    return header.encode("ascii") + b"\r\n" + data + b"\r\n"


def new_chunk_id() -> int:
    """A fresh random non-zero 31-bit chunk id, as the SA and the captured proxy use."""
    return secrets.randbelow(_MAX_CHUNK_ID) + 1
