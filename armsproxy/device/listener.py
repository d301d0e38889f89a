"""Simulated SA device: the https-simple listener of a libarms 5.33 SA and its done-requests.

client's SimulatedSA is the device as a client; this is the half a proxy pushes to. It receives
pushes with every quirk of the SA's listener (§2.1, §2.5, §2.6), reads them the way the SA's
schema walker does (§3.1-§3.4, §7.0), runs the operations (§7.1-§7.14) and sends `*-done`
requests through SimulatedSA, reacting to their answers like the device (§6.5, §10.2). Like
the client it shares no code with the proxy: a proxy that passes against this device but not
against a real one means this file is wrong. Answers are byte-for-byte those of the captures in
tests/vectors/simple*/ (apart from random transaction ids).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree
from OpenSSL import SSL, crypto
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .client import (
    DEFAULT_DESCRIPTION,
    DONE_LOST,
    REBOOT,
    REPULL,
    RESEND,
    ROLLBACK,
    STOP,
    SUCCESS,
    DeviceVerdict,
    SAExchange,
    SimulatedSA,
    escape_text,
    infer_kind,
    negotiated_tls_version,
    parse_url,
)

__all__ = [
    "RESULT_LABELS",
    "XML_DECLARATION",
    "Confirmation",
    "DeviceBehaviour",
    "DeviceModule",
    "DoneRecord",
    "ListenerTLS",
    "ReceivedPush",
    "RejectedConnection",
    "SimulatedDevice",
    "request_body_name",
    "resolve_operation",
    "response_type",
]

log = Logger()

#: Listener limits of the SA (§2.5, §11.1).
HANDSHAKE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0
MAX_HEADER_LINE = 1024
MAX_REQUEST_URI = 80
#: More live transactions than this and a 2-way push is refused with 406 (§2.5, §7.0.5).
MAX_TRANSACTIONS = 10
#: md-command text limit before base64 decoding (§7.9).
MD_COMMAND_LIMIT = 8192

TWO_WAY = frozenset(
    {"configure", "read-status", "read-storage", "clear-status", "ping", "traceroute"}
)
ONE_WAY = frozenset(
    {
        "push-confirmation",
        "md-command",
        "dump-debug",
        "read-module-list",
        "check-transaction",
        "reboot",
        "pull-config",
    }
)
OPERATIONS = TWO_WAY | ONE_WAY

#: result-code labels exactly as libarms writes them into <description> (§10.1, typos included).
RESULT_LABELS: dict[int, str] = {
    100: "Success",
    102: "Command Execute Error",
    201: "Invalid XML",
    202: "Invalid Message type",
    203: "Invalid Parameter",
    301: "Server Busy",
    302: "SA Busy",
    303: "Module syncing",
    400: "Bad Request",
    401: "Server Failure",
    402: "SA Failure",
    403: "Authentication Falure",
    404: "SA Marked as stand-by",
    405: "Not found",
    406: "Too many Transaction",
    407: "Too many Status",
    408: "Invalid Storage",
    409: "Invalid Module ID",
    410: "Validation Failure",
    411: "Commit Failure",
    412: "Transction Failure",
    413: "Resource Exhausted",
    414: "SA Rollbacked",
    415: "System Error",
    416: "System Mismatch",
    417: "Invalid Hardware",
    418: "Invalid Firmware",
    419: "Module Sync needed",
    420: "Distribution ID not found",
    421: "Configuration not found",
    422: "Multiple Request",
    423: "Distribution ID Mismatch",
    501: "Out of Service",
    502: "Push Failed",
    503: "Need Reboot",
    504: "Addresss Mismatch",
    505: "Not Support",
    506: "Server Moved",
    507: "Invalid type",
    508: "Rollback Failure",
}

#: The listener's XML declaration: the builder drops the last byte of its template, so a bare
#: CR follows (§2.6).
XML_DECLARATION = b'<?xml version="1.0" encoding="US-ASCII" ?>\r'
_STATUS_LINES = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Authorization Required",
    500: "500 Internal Server Error",
}
_AUTH_PREFIX = b"Authorization: Basic "
_STORAGES = ("running", "candidate", "backup")

#: Attribute whitelists inside request bodies (§3.1); `arms-request` allows only `type`.
_WHITELISTS: dict[tuple[str, str], frozenset[str]] = {
    ("configure", "module"): frozenset({"id", "version", "install-order"}),
    ("configure", "md-config"): frozenset({"id", "commit-order", "encoding"}),
    ("read-status", "status-request"): frozenset({"id", "encoding"}),
    ("clear-status", "status-request"): frozenset({"id", "encoding"}),
    ("md-command", "md-command"): frozenset({"id", "encoding"}),
}
_REQUEST_ATTRS = frozenset({"type"})

#: A fixed route for traceroute: hops before the target (the target is the last hop, §7.8).
_ROUTE = ("192.168.0.1 0.747 ms", "172.16.0.1 0.806 ms")
_TARGET_RTT = "53.016 ms"

_NON_ASCII = re.compile(rb"[\x80-\xff]")
_STRTOL = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_REQUEST_LINE = re.compile(rb"([A-Za-z]+) (\S+) HTTP/[0-9]+\.[0-9]+")
_RESULT_URL = re.compile(r"(?i:https?)://(\[[^\]/]+\]|[^/:\[\]]+)(?::([0-9]{1,7}))?(?:/(.*))?")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# --------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------


@dataclass
class DeviceBehaviour:
    """Switches that make the device misbehave (or behave like real devices sometimes do).

    Mutable: a test may flip a switch between pushes.
    """

    #: Answer every 2-way start with this result code (302 SA Busy, 406 Too many Transaction).
    busy: int | None = None
    #: Send (and finish) the done-request before writing the start answer (§7.0.4).
    done_before_start_answer: bool = False
    #: Wait this long before writing any answer to a push.
    start_answer_delay: float = 0.0
    #: Execution time of a 2-way operation: from the start answer to its done-request.
    done_delay: float = 0.0
    #: Read the request, then close without any answer (and run nothing).
    drop_without_answer: bool = False
    #: transaction-result of configure-done: 100, 303, 414, 411, 508 (§7.3).
    configure_result: int = 100
    #: The md-command callback fails: 402, answered with the XML declaration only (§7.9).
    md_command_fails: bool = False
    #: Where dones go while no push carried a result-url (the RS URL of the last pull on a real
    #: device); None: the done is lost (§7.0.3).
    fallback_result_url: str | None = None
    #: rs-retry-interval and rs-retry-max for configure-done (§6.5, §11.1).
    retry_interval: float = 1.0
    retry_max: int = 3
    #: After a configure ends well, close and re-open the listener and confirm again (§2.5).
    close_listener_after_configure: bool = True
    #: Gap between closing and re-opening the listener (pushes in the gap are refused).
    reopen_delay: float = 0.0


@dataclass(frozen=True)
class DeviceModule:
    """One module the device holds (§7.3, §7.11)."""

    id: int
    version: str
    location: str


@dataclass
class ReceivedPush:
    """One connection to the listener that got past the TLS handshake."""

    raw: bytes  # every byte received up to the point the device answered (or dropped)
    type: str | None  # the request's `type` attribute as sent
    peer_certificate: bytes | None  # DER of the pusher's client certificate
    received_at: float
    operation: str | None = None  # the base operation the device resolved the type to
    status: int | None = None  # HTTP status answered; None: dropped without answer
    result_code: int | None = None
    transaction_id: int | None = None  # in the answer (2-way)
    answer: bytes = b""  # what the device wrote (empty until written)
    answered_at: float | None = None
    tls_version: str | None = None  # negotiated with the pusher ("TLSv1")


@dataclass
class RejectedConnection:
    """A connection that never got past the TLS handshake (e.g. a foreign client certificate)."""

    reason: str
    at: float


@dataclass
class Confirmation:
    """One push-confirmation-done the device accepted (§7.2)."""

    confirmation_id: int | None
    at: float


@dataclass
class DoneRecord:
    """One done-request attempt: what was sent, what came back, what the device made of it."""

    kind: str  # "<base>-done"
    transaction_id: int
    transaction_result: int
    url: str | None
    attempt: int
    sent_at: float
    outcome: str = DONE_LOST  # client outcome: success, done-lost, rollback, resend, re-pull, ...
    request: bytes = b""
    answer: bytes = b""
    verdict: DeviceVerdict | None = None
    exchange: SAExchange | None = None
    error: str | None = None
    answered_at: float | None = None


# --------------------------------------------------------------------------------------------
# Small helpers (the SA's conversions)
# --------------------------------------------------------------------------------------------


def _strtol(text: str | None) -> int | None:
    """strtol plus libarms' "nothing may follow the digits" rule: else the value is dropped."""
    if text is None or not _STRTOL.fullmatch(text):
        return None
    return int(text)


def _parse_id(text: str | None) -> int | None:
    """Unsigned decimal, else 0x-hex (§3.1)."""
    if text is None:
        return None
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    return None


def _b64decode(text: str) -> bytes | None:
    """The SA's decoder: standard alphabet, '=' only at the end, CR/LF anywhere (§3.5)."""
    compact = text.replace("\r", "").replace("\n", "")
    if not _B64.fullmatch(compact):
        return None
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _result_url_ok(url: str) -> bool:
    """The SA's syntax check of a result-url: http(s), a host, a short port and path (§2.2)."""
    m = _RESULT_URL.fullmatch(url)
    if m is None or any(c.isspace() for c in url):
        return False
    return len(m.group(3) or "") <= 79


def _text_payload(data: bytes) -> tuple[str, str]:
    """(encoding attribute, element text) as the SA writes a config it holds (§3.5, §7.5)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "", escape_text(text)
    return ' encoding="base64"', base64.b64encode(data).decode("ascii")


def _http_head(status: int, chunked: bool = False) -> bytes:
    lines = [f"HTTP/1.0 {_STATUS_LINES.get(status, _STATUS_LINES[500])}"]
    if status in (400, 401):
        lines.append('WWW-Authenticate: Basic realm=""')
    lines += ["Server: armsd", "Connection: close", "Content-Type: text/xml"]
    if chunked:
        # The SA mirrors a chunked request in its answer header, body unchunked (§2.6).
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def response_type(base: str) -> str:
    """The `type` the SA writes in its answer: B (1-way), B-start (2-way) (§3.3, §7.2)."""
    if base == "push-confirmation":
        return "push-confirmation-done"
    return f"{base}-start" if base in TWO_WAY else base


def request_body_name(base: str) -> str:
    """The body element the SA reads parameters from (§3.2)."""
    if base == "push-confirmation":
        return "push-confirmation-done-request"
    return f"{base}-start-request" if base in TWO_WAY else f"{base}-request"


def resolve_operation(msg_type: str | None) -> str | None:
    """B, B-start and B-done name the same operation B (§3.4); None: unknown."""
    if msg_type is None:
        return None
    if msg_type in OPERATIONS:
        return msg_type
    for suffix in ("-start", "-done"):
        if msg_type.endswith(suffix) and msg_type[: -len(suffix)] in OPERATIONS:
            return msg_type[: -len(suffix)]
    return None


# --------------------------------------------------------------------------------------------
# Reading a push the way the SA's listener does
# --------------------------------------------------------------------------------------------


@dataclass
class _HttpRequest:
    raw: bytes
    status: int  # 200: hand the body to the ARMS layer; 400/401: answer that
    chunked: bool
    body: bytes


def _read_http(buf: bytes, distid: str, key: str) -> _HttpRequest | None:
    """The listener's HTTP layer (§2.5); None until enough has arrived to decide."""
    pos = 0
    lines: list[bytes] = []
    while True:
        nl = buf.find(b"\n", pos)
        if nl == -1:
            if len(buf) - pos > MAX_HEADER_LINE:
                return _HttpRequest(buf, 400, False, b"")
            return None
        if nl + 1 - pos > MAX_HEADER_LINE:
            return _HttpRequest(buf, 400, False, b"")
        line = buf[pos:nl].rstrip(b"\r")
        pos = nl + 1
        if not line:
            break
        lines.append(line)
    if not lines:
        return _HttpRequest(buf, 400, False, b"")
    m = _REQUEST_LINE.fullmatch(lines[0])
    headers = lines[1:]
    chunked = any(h.startswith(b"Transfer-Encoding") and b"chunked" in h for h in headers)
    if (
        m is None
        or m.group(1).upper() not in (b"GET", b"POST")
        or len(m.group(2)) > MAX_REQUEST_URI
    ):
        return _HttpRequest(buf, 400, chunked, b"")
    auth = [h for h in headers if h.startswith(_AUTH_PREFIX)]
    authorized = bool(auth) and _credentials_ok(auth[0][len(_AUTH_PREFIX) :], distid, key)
    if chunked and authorized:
        # The chunk-size line is taken for an empty line: 400 at once (§2.5).
        return _HttpRequest(buf, 400, True, b"")
    end = buf.find(b"</arms-message>", pos)
    if end == -1:
        return None  # Content-Length is ignored: the body ends at </arms-message>
    end += len(b"</arms-message>")
    return _HttpRequest(buf, 200 if authorized else 401, chunked, buf[pos:end])


def _credentials_ok(token: bytes, distid: str, key: str) -> bool:
    try:
        decoded = base64.b64decode(token.strip(b" \t"), validate=True).decode("latin-1")
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(":")
    return bool(sep) and user == distid and password == key


@dataclass
class _Item:
    name: str
    attrs: dict[str, str]
    text: str


@dataclass
class _Parsed:
    type: str | None = None
    operation: str | None = None
    request_seen: bool = False
    error: int | None = None  # the first ARMS-level error, in document order
    result_urls: list[str] = field(default_factory=list)
    confirmation_id: int | None = None
    items: list[_Item] = field(default_factory=list)  # children of the body element

    def all(self, name: str) -> list[_Item]:
        return [item for item in self.items if item.name == name]

    def last(self, name: str) -> _Item | None:
        found = self.all(name)
        return found[-1] if found else None


def _walk_request(body: bytes, distid: str) -> _Parsed:
    """The SA's expat + schema walker over a push request (§3.1, §3.2, §7.0.1).

    Unknown elements vanish with their subtree, whitelisted elements carrying any other
    attribute vanish too, and processing stops at the first error.
    """
    parsed = _Parsed()
    bad = _NON_ASCII.search(body)
    data = body if bad is None else body[: bad.start()]
    parser = etree.XMLPullParser(
        events=("start", "end", "start-ns"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )
    xml_error = bad is not None  # expat runs as US-ASCII: the first byte >= 0x80 ends it
    try:
        parser.feed(data)
        if bad is None:
            parser.close()
    except etree.XMLSyntaxError:
        xml_error = True
    stack: list[tuple[str, bool]] = []  # (name, kept)
    pending_ns: list[tuple[str, str]] = []
    for event, payload in parser.read_events():
        if parsed.error is not None:
            break
        if event == "start-ns":
            pending_ns.append(payload)
            continue
        element = payload
        if event == "start":
            name = element.tag if isinstance(element.tag, str) else ""
            attrs = dict(element.attrib)
            for prefix, uri in pending_ns:
                attrs["xmlns:" + prefix if prefix else "xmlns"] = uri
            pending_ns = []
            kept = _keep(parsed, stack, name, attrs)
            stack.append((name, kept))
            if kept and len(stack) == 2:
                parsed.request_seen = True
                parsed.type = attrs.get("type")
                parsed.operation = resolve_operation(parsed.type)
                if parsed.operation is None:
                    parsed.error = 202
            continue
        name, kept = stack.pop()
        if not kept:
            continue
        text = element.text or ""
        if len(stack) == 2:
            _envelope_child(parsed, name, text, distid)
        elif len(stack) == 3:
            parsed.items.append(_Item(name, dict(element.attrib), text))
    if parsed.error is None and xml_error:
        parsed.error = 201
    if parsed.error is None and not parsed.request_seen:
        parsed.error = 202
    return parsed


def _keep(parsed: _Parsed, stack: list[tuple[str, bool]], name: str, attrs: dict) -> bool:
    """Whether the walker sees this element (its parent seen, known, attributes allowed)."""
    if stack and not stack[-1][1]:
        return False
    depth = len(stack)
    if depth == 0:
        return name == "arms-message"
    if depth == 1:
        return name == "arms-request" and not parsed.request_seen and set(attrs) <= _REQUEST_ATTRS
    op = parsed.operation
    if op is None:
        return False
    if depth == 2:
        return name in ("distribution-id", "description", "result-url", "transaction-id") or (
            name == request_body_name(op)
        )
    if depth == 3:
        allowed = _WHITELISTS.get((op, name))
        return allowed is None or set(attrs) <= allowed
    return False  # deeper markup is not part of any push request


def _envelope_child(parsed: _Parsed, name: str, text: str, distid: str) -> None:
    if name == "distribution-id" and text != distid:
        parsed.error = 423
    elif name == "result-url":
        if _result_url_ok(text):
            parsed.result_urls.append(text)
        else:
            parsed.error = 203
    elif name == "transaction-id" and parsed.operation == "push-confirmation":
        if re.fullmatch(r"[0-9]+", text):  # anything else is ignored (§7.2)
            parsed.confirmation_id = int(text)


# --------------------------------------------------------------------------------------------
# Answers and operations
# --------------------------------------------------------------------------------------------


@dataclass
class _Txn:
    id: int
    operation: str
    params: dict[str, Any]


@dataclass
class _Answer:
    status: int
    pieces: list[bytes]
    type: str | None = None
    operation: str | None = None
    result_code: int | None = None
    transaction_id: int | None = None
    txn: _Txn | None = None  # a 2-way operation to run once answered


@dataclass
class _OpResult:
    code: int
    items: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    empty: bool = False  # 402 from md-command: the declaration only


def _arms_pieces(
    rtype: str, code: int, *, transaction_id: int | None = None, items: Sequence[str] = ()
) -> list[bytes]:
    """An SA answer in the SA's writes: header, envelope, each result, closing tags (§2.6)."""
    envelope = f'<arms-message><arms-response type="{rtype}">'
    if transaction_id is not None:
        envelope += f"<transaction-id>{transaction_id}</transaction-id>"
    label = RESULT_LABELS.get(code, "Unknown result")
    envelope += f"<result-code>{code}</result-code><description>{label}</description>"
    envelope += f"<{rtype}-response>"
    tail = f"</{rtype}-response></arms-response></arms-message>"
    return [
        _http_head(200),
        XML_DECLARATION + envelope.encode("ascii"),
        *(item.encode("ascii") for item in items),
        tail.encode("ascii"),
    ]


# --------------------------------------------------------------------------------------------
# TLS of the listener (§2.1)
# --------------------------------------------------------------------------------------------


def _listener_verify(
    conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    # Dates are ignored like everywhere in libarms (9: not yet valid, 10: expired).
    return bool(ok) or errno in (9, 10)


@implementer(IOpenSSLServerConnectionCreator)
class ListenerTLS:
    """Server TLS like the SA's listener: its sa-certificate; asks for, never requires, a client
    certificate, which must chain to the one trusted CA; no session reuse. A ``tls_max_version``
    of TLS 1.1 or lower (upstream libarms: 1.0) also lowers the security level, as it must."""

    def __init__(
        self,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        tls_min_version: int | None = None,
        tls_max_version: int | None = None,
    ) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        if tls_min_version is not None:
            ctx.set_min_proto_version(tls_min_version)
        if tls_max_version is not None:
            ctx.set_max_proto_version(tls_max_version)
            if tls_max_version <= SSL.TLS1_1_VERSION:
                if tls_min_version is None:
                    ctx.set_min_proto_version(SSL.TLS1_VERSION)
                ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        chain = x509.load_pem_x509_certificates(cert_pem)
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        ctx.use_privatekey(serialization.load_pem_private_key(key_pem, None))
        ctx.check_privatekey()
        # The SA's store holds exactly one certificate: the first of ca_pem (§2.1).
        ctx.get_cert_store().add_cert(
            crypto.X509.from_cryptography(x509.load_pem_x509_certificates(ca_pem)[0])
        )
        ctx.set_verify(SSL.VERIFY_PEER, _listener_verify)  # no FAIL_IF_NO_PEER_CERT
        ctx.set_verify_depth(10)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        self._context = ctx

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        conn.set_accept_state()
        return conn


class _UnbufferedTLSFactory(TLSMemoryBIOFactory):
    """One transport write, one TLS record: the SA's answers come in several records."""

    protocol = TLSMemoryBIOProtocol


@implementer(IHandshakeListener)
class _PushConnection(Protocol):
    """One connection to the listener: one request, one answer, close (§2.5)."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.buffer = b""
        self.handshake_done = False
        self.peer_der: bytes | None = None
        self.tls_version: str | None = None
        self.state = "handshake"  # handshake, reading, answering, answered, closed
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.device._connections.add(self)
        self._timer = self.device.reactor.callLater(self.device.handshake_timeout, self._expired)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.tls_version = negotiated_tls_version(self.transport)
        self._cancel_timer()
        peer = self.transport.getPeerCertificate()
        if peer is not None:
            self.peer_der = peer.to_cryptography().public_bytes(serialization.Encoding.DER)
        self.state = "reading"
        self._timer = self.device.reactor.callLater(self.device.request_timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        log.info("device listener: {state} timed out, closing", state=self.state)
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self.state != "reading":
            return  # one request per connection
        self.buffer += data
        request = _read_http(self.buffer, self.device.distid, self.device.key)
        if request is None:
            return
        self.state = "answering"
        self._cancel_timer()
        self.device._handle(self, request)

    def write_answer(self, pieces: Sequence[bytes]) -> bool:
        if self.state == "closed":
            return False
        for piece in pieces:
            self.transport.write(piece)
        self.state = "answered"
        self.transport.loseConnection()
        return True

    def drop(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self._cancel_timer()
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        self.state = "closed"
        self.device._connections.discard(self)
        if not self.handshake_done:
            text = str(reason.value) if reason is not None else "closed"
            self.device.rejected.append(RejectedConnection(text, self.device.reactor.seconds()))


def _fire(d: defer.Deferred[None] | None) -> None:
    if d is not None and not d.called:
        d.callback(None)


# --------------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------------


ReconfirmHook = Callable[["SimulatedDevice"], "Awaitable[object] | object"]
#: `on_event(kind, what)`, so that a user (``serve``) can show what the device receives as it
#: happens: "push" with the ReceivedPush once answered or dropped, "done" with the DoneRecord
#: once judged, "confirmed" with the Confirmation, "exit" with the reason (reboot, re-pull,
#: stop) where the real SA leaves its event loop. The tunnel device adds its own kinds.
EventHook = Callable[[str, Any], None]


class SimulatedDevice:
    """A libarms 5.33 SA in its https-simple push phase.

    Receives pushes on `listen()`, answers them like the captures, runs 2-way operations and
    posts their dones to the stored result-url. Everything is recorded for assertions:
    `received`, `dones`, `rejected`, `confirmations`, `result_url`, `transactions` (live 2-way
    transaction id -> operation, in creation order), `modules`, `configs`.
    `tls_min_version`/`tls_max_version` hold in both directions, its listener and its client
    (``tls_max_version=UPSTREAM_TLS_VERSION``: a TLS-1.0-only upstream device).
    """

    def __init__(
        self,
        reactor: Any,
        distid: str,
        key: str,
        *,
        ca_pem: bytes,
        sa_cert_pem: bytes,
        sa_key_pem: bytes,
        description: str = DEFAULT_DESCRIPTION,
        behaviour: DeviceBehaviour | None = None,
        modules: Sequence[DeviceModule] = (),
        configs: Mapping[int, str | bytes] | None = None,
        rs_pull_server_urls: Sequence[str] = (),
        tls_min_version: int | None = None,
        tls_max_version: int | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        seed: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.distid = distid
        self.key = key
        self.description = description
        self.behaviour = behaviour if behaviour is not None else DeviceBehaviour()
        self.modules: list[DeviceModule] = list(modules)
        self.configs: dict[int, bytes] = {
            k: v.encode("utf-8") if isinstance(v, str) else bytes(v)
            for k, v in (configs or {}).items()
        }
        self.rs_pull_server_urls = list(rs_pull_server_urls)
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        # The device as a client: done-requests and confirmation rounds, presenting its
        # sa-certificate and trusting the same single CA (§2.1).
        self.sa = SimulatedSA(
            reactor,
            distid,
            key,
            ca_pem=ca_pem,
            client_cert_pem=sa_cert_pem,
            client_key_pem=sa_key_pem,
            description=description,
            tls_min_version=tls_min_version,
            tls_max_version=tls_max_version,
        )
        self._tls = ListenerTLS(
            ca_pem,
            sa_cert_pem,
            sa_key_pem,
            tls_min_version=tls_min_version,
            tls_max_version=tls_max_version,
        )
        self._rng = random.Random(seed)
        self.on_reconfirm: ReconfirmHook | None = None
        self.on_event: EventHook | None = None

        self.received: list[ReceivedPush] = []
        self.rejected: list[RejectedConnection] = []
        self.dones: list[DoneRecord] = []
        self.confirmations: list[Confirmation] = []
        self.confirmation_starts: list[SAExchange] = []
        self.transactions: dict[int, str] = {}
        self.result_url: str | None = None
        self.confirmed = False
        self.confirmation_id: int | None = None
        self.confirmed_at: float | None = None
        self.rebooted = False
        self.exit_reason: str | None = None  # reboot / re-pull / stop, as the event loop would
        self.pull_config_type: str | None = None
        self.rollbacks = 0
        self.listener_restarts = 0
        self.errors: list[Failure] = []  # failures inside the device's own tasks (test bugs)

        self._port: IListeningPort | None = None
        self._port_number: int | None = None
        self._interface = "127.0.0.1"
        self._connections: set[_PushConnection] = set()
        self._pending: set[defer.Deferred[Any]] = set()
        self._closing = False

    # -- listener ----------------------------------------------------------------------------

    async def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        """Open the https-simple listener; returns the port number."""
        self._closing = False
        self._interface = interface
        return self._start_listening(port)

    def _start_listening(self, port: int) -> int:
        factory = _UnbufferedTLSFactory(
            self._tls, False, Factory.forProtocol(lambda: _PushConnection(self))
        )
        self._port = self.reactor.listenTCP(port, factory, interface=self._interface)
        self._port_number = self._port.getHost().port
        return self._port_number

    async def _stop_listening(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)

    @property
    def port(self) -> int | None:
        return self._port_number

    @property
    def listening(self) -> bool:
        return self._port is not None

    @property
    def push_endpoint(self) -> str:
        """The push-endpoint the device announces in push-confirmation-start (§6.4)."""
        host = self._interface if self._interface not in ("", "0.0.0.0") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self._port_number}/"

    async def close(self, grace: float = 0.0) -> None:
        """Stop listening, wait for every pending answer and done-request, drop idle peers.

        `grace`: seconds connections get to end by themselves first, so that an answer just
        written (a reboot's) reaches the pusher before the device goes away.
        """
        self._closing = True
        await self._stop_listening()
        while self._pending:
            await defer.DeferredList(list(self._pending), consumeErrors=True)
        deadline = self.reactor.seconds() + grace
        while self._connections and self.reactor.seconds() < deadline:
            await self._sleep(0.02)
        for conn in list(self._connections):
            conn.abort()

    async def confirm(self, urls: Sequence[str] | None = None) -> list[SAExchange]:
        """A push-confirmation-start round to every URL at once (§6.4); the SA skips bad URLs."""
        targets = []
        for url in self.rs_pull_server_urls if urls is None else urls:
            try:
                parse_url(url)
            except ValueError as exc:
                log.info("device listener: skipping rs-pull-server-url: {exc}", exc=exc)
                continue
            targets.append(url)
        deferreds = [
            defer.ensureDeferred(
                self.sa.push_confirmation_start(url, "https-simple", self.push_endpoint)
            )
            for url in targets
        ]
        exchanges = list(await defer.gatherResults(deferreds, consumeErrors=True))
        self.confirmation_starts.extend(exchanges)
        return exchanges

    # -- one push ----------------------------------------------------------------------------

    def _handle(self, conn: _PushConnection, request: _HttpRequest) -> None:
        record = ReceivedPush(
            raw=request.raw,
            type=infer_kind(request.body or request.raw),
            peer_certificate=conn.peer_der,
            received_at=self.reactor.seconds(),
            tls_version=conn.tls_version,
        )
        self.received.append(record)
        if self.behaviour.drop_without_answer:
            log.info("device listener: dropping {type} without answer", type=record.type)
            conn.drop()
            self._report("push", record)
            return
        if request.status != 200:
            answer = _Answer(request.status, [_http_head(request.status, request.chunked)])
            answer.pieces.append(XML_DECLARATION)
        else:
            answer, parsed_type = self._process(request.body)
            if parsed_type is not None:
                record.type = parsed_type
        record.operation = answer.operation
        record.status = answer.status
        record.result_code = answer.result_code
        record.transaction_id = answer.transaction_id
        log.info(
            "device listener: {type} -> HTTP {status} result {code}",
            type=record.type,
            status=answer.status,
            code=answer.result_code,
        )
        self._track(defer.ensureDeferred(self._respond(conn, record, answer)))

    async def _respond(self, conn: _PushConnection, record: ReceivedPush, answer: _Answer) -> None:
        txn = answer.txn
        if txn is not None and self.behaviour.done_before_start_answer:
            first_done: defer.Deferred[None] = defer.Deferred()
            self._track(defer.ensureDeferred(self._execute(txn, first_done)))
            await first_done
            txn = None
        await self._sleep(self.behaviour.start_answer_delay)
        if conn.write_answer(answer.pieces):
            record.answer = b"".join(answer.pieces)
            record.answered_at = self.reactor.seconds()
        self._report("push", record)
        if txn is not None:
            self._track(defer.ensureDeferred(self._execute(txn, None)))

    def _process(self, body: bytes) -> tuple[_Answer, str | None]:
        parsed = _walk_request(body, self.distid)
        op = parsed.operation
        tid = self._draw_transaction_id() if op in TWO_WAY else None
        for url in parsed.result_urls:  # global, every one overwrites (§7.0.3)
            self.result_url = url
        rtype = response_type(op) if op is not None and parsed.error != 202 else "generic-error"

        def answer(result: _OpResult, txn: _Txn | None = None) -> _Answer:
            if result.empty:
                pieces = [_http_head(200), XML_DECLARATION]
            else:
                pieces = _arms_pieces(rtype, result.code, transaction_id=tid, items=result.items)
            return _Answer(200, pieces, rtype, op, result.code, tid, txn)

        if parsed.error is not None or op is None:
            if parsed.error == 202:
                tid = None
            return answer(_OpResult(parsed.error or 202)), parsed.type
        if op in TWO_WAY:
            refusal = self._refusal(op)
            if refusal is not None:
                return answer(_OpResult(refusal)), parsed.type
        handler: Callable[[_Parsed], _OpResult] = getattr(self, "_op_" + op.replace("-", "_"))
        result = handler(parsed)
        txn = None
        if op in TWO_WAY and result.code == 100 and tid is not None:
            txn = _Txn(tid, op, result.params)
            self.transactions[tid] = op
        return answer(result, txn), parsed.type

    def _refusal(self, op: str) -> int | None:
        if self.behaviour.busy is not None:
            return self.behaviour.busy
        if len(self.transactions) >= MAX_TRANSACTIONS:
            return 406
        if op == "configure" and "configure" in self.transactions.values():
            return 302
        return None

    def _draw_transaction_id(self) -> int:
        while True:
            tid = self._rng.randrange(1, 2**31)
            if tid not in self.transactions:
                return tid

    # -- 1-way operations (§7.2, §7.9-§7.14) -------------------------------------------------

    def _op_push_confirmation(self, parsed: _Parsed) -> _OpResult:
        now = self.reactor.seconds()
        self.confirmed = True
        self.confirmation_id = parsed.confirmation_id
        self.confirmed_at = now
        self.confirmations.append(Confirmation(parsed.confirmation_id, now))
        self._report("confirmed", self.confirmations[-1])
        return _OpResult(100)

    def _op_check_transaction(self, parsed: _Parsed) -> _OpResult:
        ids = [*self.transactions, 0]  # 0: this 1-way transaction itself (§7.12)
        return _OpResult(100, [f"<transaction-id>{tid}</transaction-id>" for tid in ids])

    def _op_md_command(self, parsed: _Parsed) -> _OpResult:
        commands = parsed.all("md-command")
        if not commands:
            return _OpResult(203)
        if len(commands) > 1:
            return _OpResult(422)
        command = commands[0]
        module_id = _parse_id(command.attrs.get("id"))
        if module_id is None:
            return _OpResult(203)
        if len(command.text.encode("utf-8")) > MD_COMMAND_LIMIT:
            return _OpResult(402, empty=True)
        if command.attrs.get("encoding") == "base64" and _b64decode(command.text) is None:
            return _OpResult(402, empty=True)
        if self.behaviour.md_command_fails:
            return _OpResult(402, empty=True)
        text = escape_text(f"md_command(id={module_id}): done")
        return _OpResult(100, [f'<md-result id="{module_id}">{text}</md-result>'])

    def _op_dump_debug(self, parsed: _Parsed) -> _OpResult:
        return _OpResult(100, ['<md-result id="0">dump_debug: done</md-result>'])

    def _op_read_module_list(self, parsed: _Parsed) -> _OpResult:
        return _OpResult(
            100,
            [
                f'<module id="{m.id}" version="{escape_text(m.version)}">'
                f"{escape_text(m.location)}</module>"
                for m in self.modules
            ],
        )

    def _op_reboot(self, parsed: _Parsed) -> _OpResult:
        self._exit(REBOOT)
        return _OpResult(100)

    def _op_pull_config(self, parsed: _Parsed) -> _OpResult:
        item = parsed.last("type")
        value = item.text if item is not None else None
        if value is None:
            kind = "RS"
        elif "LS".startswith(value):
            kind = "LS"
        elif "RS".startswith(value):
            kind = "RS"
        else:
            return _OpResult(203)
        if kind == "LS":
            self.result_url = None  # §7.0.3
        self.pull_config_type = kind
        self._exit(REPULL)
        return _OpResult(100)

    # -- 2-way operations: validation at start (§7.3-§7.8) -----------------------------------

    def _op_configure(self, parsed: _Parsed) -> _OpResult:
        modules: list[DeviceModule] = []
        configs: dict[int, bytes] = {}
        after_config = False
        for item in parsed.items:
            if item.name == "module":
                ident = _parse_id(item.attrs.get("id"))
                if ident is None:
                    continue
                if after_config:
                    # A module after an md-config starts a new module list (§7.3, item 9 §1).
                    modules, after_config = [], False
                modules.append(DeviceModule(ident, item.attrs.get("version", ""), item.text))
            elif item.name == "md-config":
                after_config = True
                if not modules:
                    break  # the (empty) module list is committed here
                ident = _parse_id(item.attrs.get("id"))
                if ident is None or ident not in {m.id for m in modules}:
                    return _OpResult(415)
                if item.attrs.get("encoding") == "base64":
                    data = _b64decode(item.text)
                    if data is None:
                        return _OpResult(402)
                else:
                    data = item.text.encode("utf-8")
                configs[ident] = data
        if not modules:
            # Every module is removed, then the configure fails (§7.3, observed).
            self.modules = []
            self.configs = {}
            return _OpResult(415)
        return _OpResult(100, params={"modules": modules, "configs": configs})

    def _status_requests(self, parsed: _Parsed) -> list[tuple[int, bytes]] | None:
        requests = []
        for item in parsed.all("status-request"):
            ident = _parse_id(item.attrs.get("id"))
            if ident is None:
                continue  # elements without id are ignored (§7.4)
            if item.attrs.get("encoding") == "base64":
                param = _b64decode(item.text)
                if param is None:
                    return None
            else:
                param = item.text.encode("utf-8")
            requests.append((ident, param))
        return requests

    def _op_read_status(self, parsed: _Parsed) -> _OpResult:
        requests = self._status_requests(parsed)
        if requests is None:
            return _OpResult(402)
        return _OpResult(100, params={"requests": requests or [(0, b"")]})

    def _op_clear_status(self, parsed: _Parsed) -> _OpResult:
        requests = self._status_requests(parsed)
        if requests is None:
            return _OpResult(402)
        if not requests:
            return _OpResult(203)
        return _OpResult(100, params={"requests": requests})

    def _op_ping(self, parsed: _Parsed) -> _OpResult:
        address = parsed.last("address")
        if address is None:
            return _OpResult(203)
        count = _strtol(getattr(parsed.last("count"), "text", None)) or 0
        size = _strtol(getattr(parsed.last("size"), "text", None)) or 0
        return _OpResult(100, params={"address": address.text, "count": count, "size": size})

    def _op_traceroute(self, parsed: _Parsed) -> _OpResult:
        address = parsed.last("address")
        count = _strtol(getattr(parsed.last("count"), "text", None))
        max_hop = _strtol(getattr(parsed.last("max-hop"), "text", None))
        if address is None or not count or (max_hop is not None and max_hop > 256):
            return _OpResult(203)
        params = {"address": address.text, "count": count, "max_hop": max(max_hop or 0, 0)}
        return _OpResult(100, params=params)

    def _op_read_storage(self, parsed: _Parsed) -> _OpResult:
        item = parsed.last("storage")
        storage = None
        if item is not None:
            matches = [s for s in _STORAGES if item.text and s.startswith(item.text)]
            if not matches:
                return _OpResult(203)
            storage = matches[0]
        return _OpResult(100, params={"storage": storage})

    # -- 2-way operations: execution and done (§6.5, §7.0.4) ---------------------------------

    async def _execute(self, txn: _Txn, first_done: defer.Deferred[None] | None) -> None:
        try:
            await self._sleep(self.behaviour.done_delay)
            if txn.id not in self.transactions:
                return  # dropped when the listener restarted
            if txn.operation == "configure":
                await self._run_configure(txn, first_done)
                return
            record = await self._send_done(txn, 100, self._done_pieces(txn), 1)
            _fire(first_done)
            if record.outcome in (REPULL, REBOOT, STOP):
                self._exit(record.outcome)
        finally:
            _fire(first_done)
            self.transactions.pop(txn.id, None)

    def _done_pieces(self, txn: _Txn) -> list[str]:
        """The done body as the SA's builder emits it, one piece per chunk (§2.3, §7.4-§7.8)."""
        p = txn.params
        op = txn.operation
        if op == "clear-status":
            return [
                f'<status-report id="{i}" result="100">clear_status(id={i}): done</status-report>'
                for i, _ in p["requests"]
            ]
        if op == "read-status":
            pieces = []
            for i, _ in p["requests"]:
                pieces += [
                    f'<status-report id="{i}" result="100">id={i}: get_status_cb() result',
                    "</status-report>",
                ]
            return pieces
        if op == "ping":
            return [f"<success>{p['count']}</success><failure>0</failure>"]
        if op == "traceroute":
            route = [*_ROUTE, f"{p['address']} {_TARGET_RTT}"]
            return [
                f'<nodeinfo hop="{hop}">{escape_text(text)}</nodeinfo>'
                for hop, text in enumerate(route[: p["max_hop"]], start=1)
            ]
        if op == "read-storage":
            pieces = []
            for module in self.modules:
                encoding, text = _text_payload(self.configs.get(module.id, b""))
                pieces += [f'<md-config id="{module.id}"{encoding}>{text}', "</md-config>"]
            return pieces
        return []

    async def _run_configure(self, txn: _Txn, first_done: defer.Deferred[None] | None) -> None:
        """Activate, report, and follow the configure-done reaction table (§6.5, §7.3)."""
        previous = (list(self.modules), dict(self.configs))
        self._apply(txn.params)
        result = self.behaviour.configure_result
        if result in (411, 414):
            self._restore(previous)  # activation failed, the old config is back
        rolled_back = result == 414
        resends = 0
        attempt = 0
        while True:
            attempt += 1
            record = await self._send_done(txn, result, [], attempt)
            _fire(first_done)
            outcome = record.outcome
            if outcome == SUCCESS:
                self.transactions.pop(txn.id, None)
                await self._restart_push_phase()
                return
            if outcome == RESEND and resends < self.behaviour.retry_max:
                resends += 1
            elif outcome == ROLLBACK or (outcome == RESEND and not rolled_back):
                self._restore(previous)
                self.rollbacks += 1
                rolled_back, result, resends = True, 414, 0
            elif outcome == RESEND:
                self._exit(REPULL)  # rolled back and still not delivered
                return
            else:  # re-pull, stop, or reboot (also a 1xx answer after 303, §6.5)
                self._exit(outcome)
                return
            await self._sleep(self.behaviour.retry_interval)

    def _apply(self, params: dict[str, Any]) -> None:
        modules: list[DeviceModule] = params["modules"]
        kept = {m.id for m in modules}
        configs = {k: v for k, v in self.configs.items() if k in kept}
        configs.update(params["configs"])
        self.modules, self.configs = list(modules), configs

    def _restore(self, previous: tuple[list[DeviceModule], dict[int, bytes]]) -> None:
        self.modules, self.configs = list(previous[0]), dict(previous[1])

    async def _send_done(
        self, txn: _Txn, transaction_result: int, pieces: Sequence[str], attempt: int
    ) -> DoneRecord:
        url = self.result_url or self.behaviour.fallback_result_url
        record = DoneRecord(
            kind=f"{txn.operation}-done",
            transaction_id=txn.id,
            transaction_result=transaction_result,
            url=url,
            attempt=attempt,
            sent_at=self.reactor.seconds(),
        )
        failed = RESEND if txn.operation == "configure" else DONE_LOST
        if url is None:
            record.outcome = failed
            record.error = "no result-url: the done goes nowhere the simulation can reach"
        else:
            try:
                exchange = await self.sa.done_request(
                    url,
                    txn.operation,
                    transaction_id=txn.id,
                    transaction_result=transaction_result,
                    body_pieces=pieces,
                )
            except ValueError as exc:  # the SA cannot use the URL (http, host name, ...)
                record.outcome = failed
                record.error = str(exc)
            else:
                record.exchange = exchange
                record.request = exchange.request
                record.answer = exchange.raw
                record.verdict = exchange.verdict
                record.outcome = exchange.verdict.outcome
                record.error = exchange.error
                record.answered_at = self.reactor.seconds()
        self.dones.append(record)
        self._report("done", record)
        log.info(
            "device listener: {kind} {tid} (result {result}, attempt {attempt}) -> {outcome}",
            kind=record.kind,
            tid=txn.id,
            result=transaction_result,
            attempt=attempt,
            outcome=record.outcome,
        )
        return record

    async def _restart_push_phase(self) -> None:
        """After a good configure the SA restarts its push phase (§2.5, §7.3, §8.4)."""
        if not self.behaviour.close_listener_after_configure or self._closing:
            return
        self.transactions.clear()  # pending transactions are dropped
        port = self._port_number
        await self._stop_listening()
        await self._sleep(self.behaviour.reopen_delay)
        if self._closing or port is None:
            return
        self._start_listening(port)
        self.confirmed = False
        self.listener_restarts += 1
        hook = self.on_reconfirm
        if hook is not None:
            result = hook(self)
            if inspect.isawaitable(result):
                await result
        elif self.rs_pull_server_urls:
            await self.confirm()

    # -- plumbing ----------------------------------------------------------------------------

    def _exit(self, reason: str) -> None:
        """Where the real SA would leave its event loop (it keeps listening here)."""
        self.exit_reason = reason
        if reason == REBOOT:
            self.rebooted = True
        self._report("exit", reason)

    def _report(self, kind: str, what: object) -> None:
        """Tell `on_event`; its failure is the hook's bug, never the device's."""
        hook = self.on_event
        if hook is None:
            return
        try:
            hook(kind, what)
        except Exception:
            log.failure("device: on_event hook failed on {kind}", kind=kind)

    async def _sleep(self, delay: float) -> None:
        if delay > 0:
            await deferLater(self.reactor, delay, lambda: None)

    def _track(self, d: defer.Deferred[Any]) -> None:
        self._pending.add(d)

        def finished(result: object) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure):
                self.errors.append(result)
                log.failure("device listener: task failed", result)

        d.addBoth(finished)
