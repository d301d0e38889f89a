"""Simulated SA device in https-tunnel push mode: the tunnels a libarms 5.33 SA holds (§8, §9).

listener's SimulatedDevice is the device pushed to over https-simple; this is the same device
(same request reading, same answers, same operations: it *is* a SimulatedDevice) reached through
tunnels it opens itself. It opens one tunnel per https-tunnel-url over TLS like the SA (client's
SAConnectionCreator), writes the SA's bytes (open header, chunk messages in the SA's chunk
splits with header, data and CRLF as separate writes, echo requests), reads the proxy's chunks
as strictly as libarms does (§9.1, §9.5, §9.6) and reacts to failures like the device: drop
the TCP connection without a zero chunk and reconnect after rs-retry-interval (§9.5, §9.8),
around a configure too (§9.9). Like client and listener it shares no code with the proxy.

Everything the proxy did that a real SA would mis-read or reject ends up in `problems`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
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
    RESPONSE_TIMEOUT,
    RETRY,
    ROLLBACK,
    SUCCESS,
    DeviceVerdict,
    basic_authorization,
    infer_kind,
    judge_response,
    negotiated_tls_version,
    parse_url,
)
from .listener import (
    XML_DECLARATION,
    Confirmation,
    DeviceBehaviour,
    DeviceModule,
    DoneRecord,
    SimulatedDevice,
    _Answer,
    _arms_pieces,
    _OpResult,
    _Parsed,
    _Txn,
)

__all__ = [
    "CONFIRMATION_TIMEOUT",
    "ECHO_REQUEST",
    "HEADER_TIMEOUT",
    "ZERO_CHUNK",
    "SimulatedTunnelDevice",
    "TunnelBehaviour",
    "TunnelConfirmation",
    "TunnelConnection",
    "TunnelDone",
    "TunnelPush",
    "TunnelRecord",
    "build_open_request",
]

log = Logger()

#: The SA's keep-alive, written in one piece (§9.3; vectors/tunnel/09-tunnel-echo.request.txt).
ECHO_REQUEST = b"4;echo-request;trail\r\necho\r\n"
#: End of stream: written before an orderly close (§9.3; 34-tunnel-last-chunk.message.txt).
ZERO_CHUNK = b"0\r\n\r\n"
#: The SA reads at most this much at once and fills at most this much into one chunk (§9.3).
SA_TUNNEL_READ = 8191
#: Longest chunk header line the SA accepts (§9.5).
MAX_CHUNK_HEADER = 255
#: Waiting for the proxy's 200 header (§9.1) and for each confirmation step (§9.4).
HEADER_TIMEOUT = 30.0
CONFIRMATION_TIMEOUT = 60.0
#: How long stop() waits for the proxy to see the close before aborting.
STOP_GRACE = 2.0

_STATUS_LINE = re.compile(rb"HTTP/1\.1 +([0-9]+)")
_SIZE = re.compile(rb"[0-9a-fA-F]+")
_DIGITS = re.compile(r"[0-9]+")
_MD_RESULT = re.compile(rb"(<md-result[^>]*>)(.*)(</md-result>)", re.DOTALL)
_PENDING = "pending"


# --------------------------------------------------------------------------------------------
# Configuration and records
# --------------------------------------------------------------------------------------------


@dataclass
class TunnelBehaviour(DeviceBehaviour):
    """DeviceBehaviour plus the tunnel's switches. Mutable between pushes.

    Used from DeviceBehaviour: busy, done_before_start_answer, done_delay, configure_result,
    md_command_fails, drop_without_answer, retry_max. The rs-retry-interval is the device's
    `retry_interval` argument (DeviceBehaviour.retry_interval is not used here).
    """

    #: Ignore the proxy's echo-response chunks: the device drops the tunnel at its second tick.
    ignore_echo_responses: bool = False
    #: Wait this long before writing any answer to a push (start_answer_delay counts as well).
    answer_delay: float = 0.0
    #: Cut every transport write into pieces of 1..split_max bytes (one TLS record each).
    split_writes: bool = False
    split_max: int = 7


@dataclass
class TunnelConnection:
    """One TCP connection of a tunnel: every write and read, and how it ended."""

    url: str
    number: int  # 1 for the first connection to this URL
    started_at: float
    status_line: bytes | None = None  # the proxy's status line
    header_accepted: bool = False
    confirmed: bool = False
    writes: list[bytes] = field(default_factory=list)  # every transport write, in order
    reads: list[bytes] = field(default_factory=list)  # every read (one TLS record each)
    closed_at: float | None = None
    close_reason: str | None = None
    zero_chunk_sent: bool = False
    tls_version: str | None = None  # negotiated ("TLSv1"); None without a handshake

    @property
    def sent(self) -> bytes:
        return b"".join(self.writes)

    @property
    def received(self) -> bytes:
        return b"".join(self.reads)


@dataclass
class TunnelRecord:
    """One https-tunnel-url: its connections and where it stands."""

    url: str
    connections: list[TunnelConnection] = field(default_factory=list)
    connected: bool = False  # a connection whose 200 header was accepted is up
    confirmed: bool = False  # ... and its confirmation finished (ready to push)
    gave_up: bool = False  # rs-retry-max reached before the first confirmation (§9.8)

    @property
    def close_reasons(self) -> list[str]:
        return [c.close_reason for c in self.connections if c.close_reason is not None]

    @property
    def current(self) -> TunnelConnection | None:
        return self.connections[-1] if self.connections else None


@dataclass
class TunnelPush:
    """One message the device took as a new request, and its answer."""

    url: str
    connection: int
    chunk_id: int
    raw: bytes  # the message's chunks as received (framing included)
    data: bytes  # the message itself
    type: str | None
    received_at: float
    operation: str | None = None
    result_code: int | None = None
    transaction_id: int | None = None  # in the answer (2-way)
    answer: bytes = b""  # the answer's chunks as written
    answer_chunks: list[bytes] = field(default_factory=list)
    answered_at: float | None = None


@dataclass
class TunnelConfirmation(Confirmation):
    """One confirmation round on a tunnel (§9.4); `outcome` pending, confirmed or failed: ..."""

    url: str = ""
    connection: int = 0
    start_request: bytes = b""  # the push-confirmation-start message as written
    start_answer: bytes = b""  # the proxy's answer (message data)
    start_verdict: DeviceVerdict | None = None
    done_request: bytes = b""  # the message taken as push-confirmation-done (data)
    done_type: str | None = None
    answer: bytes = b""  # the device's push-confirmation-done answer as written
    outcome: str = _PENDING


@dataclass
class TunnelDone(DoneRecord):
    """One done-request sent on a tunnel; `outcome` stays "pending" until it is judged."""

    connection: int = 0
    chunks: list[bytes] = field(default_factory=list)  # the data of each chunk written


def build_open_request(url: str, distid: str, key: str) -> bytes:
    """The header the SA writes on a fresh tunnel connection, in one write (§9.1)."""
    target = parse_url(url)
    return (
        f"POST {target.request_uri} HTTP/1.1\r\n"
        f"Host: {target.host_header}\r\n"
        "Connection: close\r\n"
        "Content-Type: text/xml\r\n"
        "Transfer-Encoding: chunked\r\n"
        f"Authorization: {basic_authorization(distid, key)}\r\n"
        "\r\n"
    ).encode("ascii")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _unframe(piece: bytes) -> bytes:
    """The data of one `size\\r\\ndata\\r\\n` chunk as the client frames it."""
    head, _, rest = piece.partition(b"\r\n")
    return rest[: int(head.split(b";")[0], 16)]


def _strip_http(pieces: Sequence[bytes]) -> list[bytes]:
    """An SA listener answer without its HTTP head and XML declaration: the tunnel form."""
    body = list(pieces[1:])
    if body and body[0].startswith(XML_DECLARATION):
        body[0] = body[0][len(XML_DECLARATION) :]
    return [p for p in body if p]


def _pull_parser() -> etree.XMLPullParser:
    return etree.XMLPullParser(
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )


def _events(data: bytes) -> tuple[list[tuple[str, Any]], bool]:
    """Parse events of (possibly partial) XML and whether the parser hit an error."""
    parser = _pull_parser()
    error = False
    try:
        parser.feed(data)
    except etree.XMLSyntaxError:
        error = True
    events: list[tuple[str, Any]] = []
    try:
        events.extend(parser.read_events())
    except etree.XMLSyntaxError:
        error = True
    return events, error


def _direct_transaction_id(data: bytes) -> int | None:
    """A `transaction-id` right under arms-request/arms-response in `data` (§9.6 step 3)."""
    path: list[str] = []
    for event, element in _events(data)[0]:
        if event == "start":
            path.append(element.tag if isinstance(element.tag, str) else "")
            continue
        if (
            len(path) == 3
            and path[0] == "arms-message"
            and path[1] in ("arms-request", "arms-response")
            and path[2] == "transaction-id"
        ):
            text = element.text or ""
            if _DIGITS.fullmatch(text):  # only digits count (§7.2)
                return int(text)
        path.pop()
    return None


def _message_state(data: bytes) -> tuple[bool, bytes]:
    """(complete, what follows the root) of an incoming message: complete when its XML
    closes (§9.6) or cannot be parsed any further."""
    end = data.find(b"</arms-message>")
    if end != -1:
        end += len(b"</arms-message>")
        return True, data[end:]
    _, error = _events(data)
    return error, b""


# --------------------------------------------------------------------------------------------
# One TCP connection of a tunnel
# --------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    header: bytes  # the header line without CRLF
    id: int
    echo: bool
    segments: list[bytes] = field(default_factory=list)  # the data, one piece per SA read

    @property
    def data(self) -> bytes:
        return b"".join(self.segments)

    @property
    def raw(self) -> bytes:
        return self.header + b"\r\n" + self.data + b"\r\n"


@dataclass
class _Incoming:
    id: int
    chunks: list[_Chunk] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(c.data for c in self.chunks)

    @property
    def raw(self) -> bytes:
        return b"".join(c.raw for c in self.chunks)


@dataclass
class _TunnelTxn:
    """A 2-way transaction held on one tunnel; `answered` is set while its done waits."""

    txn: _Txn
    answered: defer.Deferred[_Chunk | None] | None = None


@dataclass
class _Slot:
    """One https-tunnel-url and the device's retry state for it."""

    url: str
    record: TunnelRecord
    tunnel: _Tunnel | None = None  # the connection whose header was accepted
    connecting: defer.Deferred[Any] | None = None
    reconnect_call: IDelayedCall | None = None
    attempts: int = 0
    failures: int = 0  # failed attempts before the first confirmation
    ever_confirmed: bool = False
    configure: _Txn | None = None  # a configure waiting to report on the next connection
    open_waiters: list[defer.Deferred[_Tunnel | None]] = field(default_factory=list)
    first_attempt: defer.Deferred[bool] | None = None

    def next_open(self) -> defer.Deferred[_Tunnel | None]:
        d: defer.Deferred[_Tunnel | None] = defer.Deferred()
        self.open_waiters.append(d)
        return d

    def release_waiters(self, tunnel: _Tunnel | None) -> None:
        waiters, self.open_waiters = self.open_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(tunnel)


class _TLSFactory(TLSMemoryBIOFactory):
    """One transport write, one TLS record, like the SA's separate SSL_write calls."""

    protocol = TLSMemoryBIOProtocol


_CONFIRMING = ("confirm-start", "confirm-done")


@implementer(IHandshakeListener)
class _Tunnel(Protocol):
    """The SA's side of one tunnel connection: header, chunk parser, echoes, confirmation."""

    def __init__(self, device: SimulatedTunnelDevice, slot: _Slot, conn: TunnelConnection) -> None:
        self.device = device
        self.slot = slot
        self.conn = conn
        self.reactor = device.reactor
        # handshake, header, opened, configure (configure-done first), confirm-start,
        # confirm-done, ready
        self.phase = "handshake"
        self.closing: str | None = None
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.txns: dict[int, _TunnelTxn] = {}
        self.echo_outstanding = False
        self.confirmation: TunnelConfirmation | None = None
        self._head = b""
        self._parse = "header"  # chunk parser: header, data, crlf
        self._chunk: _Chunk | None = None
        self._remaining = 0
        self._crlf_left = b""
        self._incoming: dict[int, _Incoming] = {}
        self._timer: IDelayedCall | None = None
        self._timer_reason = ""
        self._timer_delay = 0.0
        self._echo_call: IDelayedCall | None = None

    # -- life cycle --------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Header accepted and not closing: messages can be written."""
        return self.conn.header_accepted and self.closing is None and not self.closed

    def connectionMade(self) -> None:
        self.device._live.add(self)
        self._arm(self.device.handshake_timeout, "TLS handshake timed out")

    def handshakeCompleted(self) -> None:
        self.conn.tls_version = negotiated_tls_version(self.transport)
        self.phase = "header"
        self._write(self.device.open_request(self.slot.url))
        self._arm(self.device.header_timeout, "no response header from the proxy")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self._disarm()
        if self._echo_call is not None and self._echo_call.active():
            self._echo_call.cancel()
        self._echo_call = None
        conn = self.conn
        conn.closed_at = self.reactor.seconds()
        if conn.close_reason is None:
            text = reason.getErrorMessage() if reason is not None else "closed"
            if self.phase == "handshake":
                conn.close_reason = f"TLS handshake failed: {text}"
            else:
                conn.close_reason = f"closed by the proxy: {text}"
        self.device._live.discard(self)
        self.device._tunnel_lost(self)
        self.lost.callback(None)

    def abort(self, reason: str) -> None:
        """Forced close: TCP close, no zero chunk, no TLS close_notify (§9.3)."""
        if self.closing is not None or self.closed:
            return
        self.closing = self.conn.close_reason = reason
        self._disarm()
        log.info(
            "device tunnel: {url}#{n} dropped: {reason}",
            url=self.slot.url,
            n=self.conn.number,
            reason=reason,
        )
        tcp = getattr(self.transport, "transport", None)
        (tcp if tcp is not None else self.transport).loseConnection()

    def finish(self, reason: str) -> None:
        """Orderly close: the zero chunk, then TLS shutdown (§9.3; capture 33/34)."""
        if self.closing is not None or self.closed:
            return
        self._write(ZERO_CHUNK)
        self.conn.zero_chunk_sent = True
        self.closing = self.conn.close_reason = reason
        self._disarm()
        self.transport.loseConnection()

    def kill(self) -> None:
        if not self.closed:
            self.transport.abortConnection()

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, delay: float, reason: str) -> None:
        self._disarm()
        self._timer_reason, self._timer_delay = reason, delay
        self._timer = self.reactor.callLater(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.phase == "handshake":
            self.closing = self.conn.close_reason = self._timer_reason
            self.transport.abortConnection()
        else:
            self.abort(self._timer_reason)

    def start_echoes(self) -> None:
        self._echo_call = self.reactor.callLater(self.device.echo_interval, self._echo_tick)

    def _echo_tick(self) -> None:
        """Every interval: check the last echo was answered, then send the next (§9.5)."""
        self._echo_call = self.reactor.callLater(self.device.echo_interval, self._echo_tick)
        if not self.open or self.phase in _CONFIRMING:
            return  # no echoes during confirmation (§9.4)
        if self.echo_outstanding:
            self.abort("echo-request not answered before the next echo tick")
            return
        self._write(ECHO_REQUEST)
        self.echo_outstanding = True
        self.device.echoes_sent += 1
        self.device._notify()

    def _echo_answered(self) -> None:
        if self.device.behaviour.ignore_echo_responses:
            return
        if self.echo_outstanding:
            self.echo_outstanding = False
            self.device.echoes_answered += 1
            self.device._notify()

    # -- writing -----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        behaviour = self.device.behaviour
        if behaviour.split_writes:
            pos = 0
            while pos < len(data):
                n = self.device._rng.randint(1, max(1, behaviour.split_max))
                piece = data[pos : pos + n]
                self.transport.write(piece)
                self.conn.writes.append(piece)
                pos += n
            return
        self.transport.write(data)
        self.conn.writes.append(data)

    def write_message(self, chunks: Sequence[bytes]) -> bytes:
        """One message under a fresh id: header, data and CRLF as three writes per chunk."""
        mid = self.device._rng.randrange(1, 2**31)
        framed = []
        chunks = list(chunks) or [b""]
        for i, data in enumerate(chunks):
            trail = b";trail" if i == len(chunks) - 1 else b""
            head = b"%x;id=%d%s\r\n" % (len(data), mid, trail)
            self._write(head)
            if data:
                self._write(data)
            self._write(b"\r\n")
            framed.append(head + data + b"\r\n")
        return b"".join(framed)

    # -- reading -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing is not None or self.closed:
            return
        self.conn.reads.append(data)
        if self.phase in _CONFIRMING and self._timer is not None:
            self._arm(self._timer_delay, self._timer_reason)  # inactivity timers (§9.4)
        for piece in _cut(data, SA_TUNNEL_READ):
            if self.closing is not None or self.closed:
                return
            if self.phase == "header":
                self._header_read(piece)
            else:
                self._read(piece)

    def _header_read(self, piece: bytes) -> None:
        """Only the status line counts; the rest of that read is discarded (§9.1 step 3)."""
        self._head += piece
        eol = self._head.find(b"\r\n")
        if eol == -1:
            if len(self._head) > SA_TUNNEL_READ:
                self.abort("no status line in the proxy's response header")
            return
        head, self._head = self._head, b""
        line = head[:eol]
        self.conn.status_line = line
        m = _STATUS_LINE.match(line)
        if m is None or int(m.group(1)) != 200:
            self.abort(f"response header not accepted (only 'HTTP/1.1 200' is): {line!r}")
            return
        end = head.find(b"\r\n\r\n")
        if end == -1:
            self.device._problem(
                self,
                "response header not written in one piece: the SA parses the rest of "
                "it as chunk data",
            )
        elif head[end + 4 :]:
            self.device._problem(
                self,
                f"{len(head) - end - 4} bytes arrived with the response header: the SA "
                "discards them",
            )
        self._disarm()
        self.conn.header_accepted = True
        self.phase = "opened"
        self.device._tunnel_open(self)

    def _lose_sync(self, reason: str) -> None:
        self.device._problem(self, reason)
        self.abort(f"lost chunk sync: {reason}")

    def _read(self, piece: bytes) -> None:
        """The SA's chunk parser over one read (§9.2, §9.5)."""
        pos, n = 0, len(piece)
        while pos < n and self.closing is None and not self.closed:
            if self._parse == "crlf":
                take = piece[pos : pos + len(self._crlf_left)]
                if not self._crlf_left.startswith(take):
                    self._lose_sync(f"chunk data not followed by CRLF: {piece[pos : pos + 16]!r}")
                    return
                pos += len(take)
                self._crlf_left = self._crlf_left[len(take) :]
                if not self._crlf_left:
                    self._parse = "header"
            elif self._parse == "data":
                assert self._chunk is not None
                take = min(self._remaining, n - pos)
                self._chunk.segments.append(piece[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    chunk, self._chunk = self._chunk, None
                    self._parse, self._crlf_left = "crlf", b"\r\n"
                    self._chunk_done(chunk)
            else:
                eol = piece.find(b"\n", pos)
                if eol == -1:
                    self._lose_sync(f"chunk header cut at the end of a read: {piece[pos:]!r}")
                    return
                line = piece[pos:eol].rstrip(b"\r")
                pos = eol + 1
                self._chunk_header(line)

    def _chunk_header(self, line: bytes) -> None:
        if len(line) + 2 > MAX_CHUNK_HEADER:
            self._lose_sync(f"chunk header longer than {MAX_CHUNK_HEADER} bytes")
            return
        size_text, *exts = line.split(b";")
        if not _SIZE.fullmatch(size_text):
            self._lose_sync(f"not a chunk header: {line[:40]!r}")
            return
        size = int(size_text, 16)
        chunk_id = 0
        for ext in exts:
            if ext.startswith(b"id=") and ext[3:].isdigit():
                chunk_id = int(ext[3:])
        if size == 0:
            if line != b"0":
                self.device._problem(self, f"zero-size chunk {line!r}: the SA closes the tunnel")
            self.abort("zero chunk from the proxy")
            return
        echo = b"echo" in exts or b"echo-response" in exts
        self._chunk = _Chunk(line, chunk_id, echo)
        self._parse, self._remaining = "data", size

    def _chunk_done(self, chunk: _Chunk) -> None:
        """Demultiplex one chunk (§9.6)."""
        if chunk.echo:
            self._echo_answered()
            return
        pending = self._incoming.get(chunk.id) if chunk.id else None
        if pending is not None:
            pending.chunks.append(chunk)
            self._check_complete(pending)
            return
        if self.phase not in _CONFIRMING:
            tid = _direct_transaction_id(chunk.segments[0])
            if tid is not None and tid in self.txns:
                self.device._done_answer(self, self.txns[tid], chunk)
                return
        if chunk.id == 0:
            self.device._problem(self, f"message chunk without a non-zero id: {chunk.header!r}")
        message = _Incoming(chunk.id, [chunk])
        if chunk.id:
            self._incoming[chunk.id] = message
        self._check_complete(message)

    def _check_complete(self, message: _Incoming) -> None:
        complete, after = _message_state(message.data)
        if not complete and message.id:
            return
        self._incoming.pop(message.id, None)
        if after.strip():
            self.device._problem(self, f"data after </arms-message> in one message: {after[:40]!r}")
        if self.phase == "confirm-start":
            self._confirmation_answer(message)
        elif self.phase == "confirm-done":
            self._confirmation_done(message)
        else:
            self.device._request(self, message)

    # -- confirmation (§9.4) -----------------------------------------------------------------

    def start_confirmation(self) -> None:
        self.phase = "confirm-start"
        self.slot.record.confirmed = False
        self.conn.confirmed = False
        framed = self.write_message([self.device._confirmation_start_body(self.slot.url)])
        self.confirmation = TunnelConfirmation(
            confirmation_id=None,
            at=self.reactor.seconds(),
            url=self.slot.url,
            connection=self.conn.number,
            start_request=framed,
        )
        self.device.confirmations.append(self.confirmation)
        self._arm(self.device.confirmation_timeout, "no push-confirmation-start answer")
        self.device._notify()

    def _confirmation_answer(self, message: _Incoming) -> None:
        confirmation = self.confirmation
        assert confirmation is not None
        verdict = self.device._judge("push-confirmation-start", [message.data])
        confirmation.start_answer = message.data
        confirmation.start_verdict = verdict
        if verdict.outcome == SUCCESS:
            confirmation.confirmation_id = verdict.transaction_id
            self.phase = "confirm-done"
            self._arm(self.device.confirmation_timeout, "no push-confirmation-done")
        elif verdict.outcome == RETRY:
            confirmation.outcome = f"failed: {verdict.describe()}"
            self.abort("push-confirmation-start refused or unreadable")
        else:
            confirmation.outcome = f"failed: {verdict.outcome}"
            self.device._exit(verdict.outcome)
            self.device._shutdown()
        self.device._notify()

    def _confirmation_done(self, message: _Incoming) -> None:
        """Whatever comes next is taken as push-confirmation-done (§9.4)."""
        confirmation = self.confirmation
        assert confirmation is not None
        data = message.data
        kind = infer_kind(data)
        if kind != "push-confirmation-done":
            self.device._problem(
                self,
                f"the message after the confirmation answer is {kind!r}, not "
                "push-confirmation-done: the SA takes it as one anyway",
            )
        echoed = _direct_transaction_id(data)
        if echoed is None:
            echoed = confirmation.confirmation_id
        confirmation.done_request = data
        confirmation.done_type = kind
        confirmation.answer = self.write_message([self.device._confirmation_done_answer(echoed)])
        confirmation.outcome = "confirmed"
        confirmation.at = self.reactor.seconds()
        self._disarm()
        self.phase = "ready"
        self.conn.confirmed = True
        slot = self.slot
        slot.record.confirmed = True
        slot.ever_confirmed = True
        slot.failures = 0
        log.info("device tunnel: {url}#{n} confirmed", url=slot.url, n=self.conn.number)
        self.device._report("confirmed", confirmation)
        self.device._notify()


# --------------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------------


class SimulatedTunnelDevice(SimulatedDevice):
    """A libarms 5.33 SA in its https-tunnel push phase.

    `await start()` opens one tunnel per URL, `await ready()` waits until each is confirmed,
    `await stop()` ends every tunnel with the zero chunk. Records for assertions: `tunnels`
    (per URL, with every connection's writes and reads), `confirmations`, `received` (messages
    taken as requests), `dones`, `problems` (what the proxy did that the SA would not take),
    `errors` (failures inside the device's own tasks), `echoes_sent`, `echoes_answered`,
    `reconnects`, `rebooted`, `exit_reason`, and SimulatedDevice's `transactions`, `modules`,
    `configs`, `rollbacks`.
    """

    behaviour: TunnelBehaviour

    def __init__(
        self,
        reactor: Any,
        distid: str,
        key: str,
        *,
        ca_pem: bytes,
        sa_cert_pem: bytes,
        sa_key_pem: bytes,
        tunnel_urls: Sequence[str],
        echo_interval: float,
        retry_interval: float = 1.0,
        behaviour: TunnelBehaviour | None = None,
        description: str = DEFAULT_DESCRIPTION,
        modules: Sequence[DeviceModule] = (),
        configs: Mapping[int, str | bytes] | None = None,
        tls_min_version: int | None = None,
        tls_max_version: int | None = None,
        response_timeout: float = RESPONSE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        confirmation_timeout: float = CONFIRMATION_TIMEOUT,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            reactor,
            distid,
            key,
            ca_pem=ca_pem,
            sa_cert_pem=sa_cert_pem,
            sa_key_pem=sa_key_pem,
            description=description,
            behaviour=behaviour if behaviour is not None else TunnelBehaviour(),
            modules=modules,
            configs=configs,
            tls_min_version=tls_min_version,
            tls_max_version=tls_max_version,
            seed=seed,
        )
        if not tunnel_urls:
            raise ValueError("no https-tunnel-url: the SA skips https-tunnel")
        if len(tunnel_urls) > 5:
            raise ValueError("more than 5 https-tunnel-url: the SA rejects the answer (§11.2)")
        for url in tunnel_urls:
            parse_url(url)  # the SA cannot use it otherwise (§2.2)
        if echo_interval <= 0:
            raise ValueError("echo_interval must be > 0")
        self.tunnel_urls = list(tunnel_urls)
        self.echo_interval = echo_interval
        self.retry_interval = retry_interval
        self.response_timeout = response_timeout
        self.header_timeout = header_timeout
        self.confirmation_timeout = confirmation_timeout

        self.tunnels = [TunnelRecord(url) for url in self.tunnel_urls]
        self.received: list[TunnelPush] = []
        self.dones: list[TunnelDone] = []
        self.confirmations: list[TunnelConfirmation] = []
        self.problems: list[str] = []
        self.echoes_sent = 0
        self.echoes_answered = 0
        self.reconnects = 0

        self._slots = [
            _Slot(url, record) for url, record in zip(self.tunnel_urls, self.tunnels, strict=True)
        ]
        self._live: set[_Tunnel] = set()
        self._waiters: list[defer.Deferred[None]] = []
        self._notify_call: IDelayedCall | None = None
        self._started = False
        self._stopping = False
        self._exited = False
        self._confirmation_echo: int | None = None
        self._exit_pending = False

    # -- public ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open a tunnel to every URL; returns once each first attempt got its header or
        failed (confirmation goes on in the background: see ready())."""
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        firsts = []
        for slot in self._slots:
            slot.first_attempt = defer.Deferred()
            firsts.append(slot.first_attempt)
            self._connect(slot)
        await defer.gatherResults(firsts)

    async def ready(self, timeout: float = 10.0) -> None:
        """Wait until every tunnel is confirmed (§9.4)."""

        def confirmed() -> bool:
            gave_up = [r.url for r in self.tunnels if r.gave_up]
            if gave_up:
                raise RuntimeError(f"the device gave up on {gave_up}: {self.describe()}")
            if self._exited:
                raise RuntimeError(f"the device left its event loop ({self.exit_reason})")
            return all(r.confirmed for r in self.tunnels)

        await self.wait_until(confirmed, timeout)

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait (on the device's reactor) until `condition()` holds; TimeoutError otherwise."""
        deadline = self.reactor.seconds() + timeout
        while not condition():
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise TimeoutError(f"not reached within {timeout:g} s: {self.describe()}")
            d: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(d)
            timer = self.reactor.callLater(remaining, lambda d=d: d.called or d.callback(None))
            try:
                await d
            finally:
                if timer.active():
                    timer.cancel()

    async def stop(self) -> None:
        """End every tunnel with the zero chunk and wait until all connections are gone."""
        self._stopping = True
        for slot in self._slots:
            self._quiet(slot)
        live = list(self._live)
        for tunnel in live:
            if tunnel.open:
                tunnel.finish("stopped")
            else:
                tunnel.abort("stopped")
        for d in list(self._pending):
            d.cancel()
        killer = self.reactor.callLater(STOP_GRACE, lambda: [t.kill() for t in live])
        await defer.DeferredList([t.lost for t in live], consumeErrors=True)
        if killer.active():
            killer.cancel()
        while self._pending:
            await defer.DeferredList(list(self._pending), consumeErrors=True)
        if self._notify_call is not None and self._notify_call.active():
            self._notify_call.cancel()
        self._flush_waiters()

    async def close(self, grace: float = 0.0) -> None:
        """stop(), which already waits for the proxy to see each tunnel end."""
        await self.stop()

    async def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        raise NotImplementedError("an https-tunnel device has no listener: use start()")

    async def confirm(self, urls: Sequence[str] | None = None) -> list[Any]:
        raise NotImplementedError("tunnel confirmation runs on each tunnel by itself")

    def open_request(self, url: str) -> bytes:
        return build_open_request(url, self.distid, self.key)

    def describe(self) -> str:
        parts = []
        for record in self.tunnels:
            conn = record.current
            parts.append(
                f"{record.url}: connections={len(record.connections)} "
                f"connected={record.connected} confirmed={record.confirmed} "
                f"gave_up={record.gave_up} last_close={conn.close_reason if conn else None!r}"
            )
        return "; ".join(parts) + f"; problems={self.problems}"

    # -- connections -------------------------------------------------------------------------

    def _connect(self, slot: _Slot) -> None:
        slot.reconnect_call = None
        if self._stopping or self._exited:
            return
        if slot.attempts:
            self.reconnects += 1
        slot.attempts += 1
        conn = TunnelConnection(slot.url, slot.attempts, self.reactor.seconds())
        slot.record.connections.append(conn)
        target = parse_url(slot.url)
        endpoint_type = TCP6ClientEndpoint if target.ipv6 else TCP4ClientEndpoint
        endpoint = endpoint_type(
            self.reactor, target.host, target.port, timeout=self.sa.connect_timeout
        )
        tunnel = _Tunnel(self, slot, conn)
        factory = _TLSFactory(self.sa.tls, True, Factory.forProtocol(lambda: tunnel))
        d = endpoint.connect(factory)
        slot.connecting = d

        def connected(_: object) -> None:
            slot.connecting = None

        def failed(failure: Failure) -> None:
            slot.connecting = None
            conn.closed_at = self.reactor.seconds()
            if failure.check(defer.CancelledError):
                conn.close_reason = "stopped while connecting"
            else:
                conn.close_reason = f"connect failed: {failure.getErrorMessage()}"
            self._after_close(slot)

        d.addCallbacks(connected, failed)
        self._notify()

    def _tunnel_open(self, tunnel: _Tunnel) -> None:
        slot = tunnel.slot
        slot.tunnel = tunnel
        slot.record.connected = True
        _fire(slot.first_attempt, True)
        tunnel.start_echoes()
        self._report("tunnel-open", tunnel.conn)
        if slot.configure is not None and slot.open_waiters:
            tunnel.phase = "configure"  # configure-done first, before any confirmation (§9.1)
            slot.release_waiters(tunnel)
        else:
            tunnel.start_confirmation()
        self._notify()

    def _tunnel_lost(self, tunnel: _Tunnel) -> None:
        slot = tunnel.slot
        self._report("tunnel-closed", tunnel.conn)
        if slot.tunnel is tunnel:
            slot.tunnel = None
            slot.record.connected = slot.record.confirmed = False
        if tunnel.confirmation is not None and tunnel.confirmation.outcome == _PENDING:
            tunnel.confirmation.outcome = f"failed: {tunnel.conn.close_reason}"
        for tid, held in list(tunnel.txns.items()):
            tunnel.txns.pop(tid, None)
            if held.answered is not None:
                _fire(held.answered, None)
            elif held.txn.operation != "configure":
                # All non-configure transactions on a dropped tunnel are discarded (§6.5).
                self.transactions.pop(tid, None)
                log.info(
                    "device tunnel: {op} {tid} discarded with its tunnel",
                    op=held.txn.operation,
                    tid=tid,
                )
        self._after_close(slot)

    def _after_close(self, slot: _Slot) -> None:
        """Reconnect after rs-retry-interval; only rs-retry-max times before the first
        confirmation (§9.8)."""
        _fire(slot.first_attempt, False)
        self._notify()
        if self._stopping or self._exited:
            return
        if not slot.ever_confirmed:
            slot.failures += 1
            if slot.failures > self.behaviour.retry_max:
                slot.record.gave_up = True
                log.info("device tunnel: giving up on {url}", url=slot.url)
                return
        slot.reconnect_call = self.reactor.callLater(self.retry_interval, self._connect, slot)

    def _quiet(self, slot: _Slot) -> None:
        """No more reconnects or connection attempts for this slot."""
        if slot.reconnect_call is not None and slot.reconnect_call.active():
            slot.reconnect_call.cancel()
        slot.reconnect_call = None
        if slot.connecting is not None:
            slot.connecting.cancel()
        slot.release_waiters(None)

    def _shutdown(self) -> None:
        """The SA leaves its event loop (reboot, re-pull, stop): every tunnel ends (§7.13)."""
        if not self._exited:
            self._report("exit", self.exit_reason)
        self._exited = True
        self._exit_pending = False
        for slot in self._slots:
            self._quiet(slot)
        for tunnel in list(self._live):
            if tunnel.open:
                tunnel.finish(f"event loop left: {self.exit_reason}")
            else:
                tunnel.abort(f"event loop left: {self.exit_reason}")
        self._notify()

    def _exit(self, reason: str) -> None:
        # Reported by _shutdown, once the answer is written and the tunnels end.
        self.exit_reason = reason
        if reason == REBOOT:
            self.rebooted = True
        self._exit_pending = True

    # -- messages ----------------------------------------------------------------------------

    def _request(self, tunnel: _Tunnel, message: _Incoming) -> None:
        """A new request (§9.6 step 4): processed like the https-simple listener does."""
        self._exit_pending = False
        self._confirmation_echo = None
        answer, parsed_type = self._process(message.data)
        record = TunnelPush(
            url=tunnel.slot.url,
            connection=tunnel.conn.number,
            chunk_id=message.id,
            raw=message.raw,
            data=message.data,
            type=parsed_type or infer_kind(message.data),
            received_at=self.reactor.seconds(),
            operation=answer.operation,
            result_code=answer.result_code,
            transaction_id=answer.transaction_id,
        )
        self.received.append(record)
        log.info(
            "device tunnel: {type} -> result {code}", type=record.type, code=answer.result_code
        )
        txn = answer.txn
        if txn is not None:
            tunnel.txns[txn.id] = _TunnelTxn(txn)
        if self.behaviour.drop_without_answer:
            if txn is not None:
                tunnel.txns.pop(txn.id, None)
                self.transactions.pop(txn.id, None)
            self._report("push", record)
            self._notify()
            return
        chunks = self._answer_chunks(answer)
        exiting = self._exit_pending
        self._track(defer.ensureDeferred(self._respond(tunnel, record, answer, chunks, exiting)))
        self._notify()

    def _op_push_confirmation(self, parsed: _Parsed) -> _OpResult:
        # Outside a confirmation round: a 1-way request; the tunnel answer echoes the id (§7.2).
        self._confirmation_echo = parsed.confirmation_id
        return _OpResult(100)

    def _answer_chunks(self, answer: _Answer) -> list[bytes]:
        """The listener's answer in the tunnel's chunk splits (§9.3; captures 19 and 21)."""
        pieces = _strip_http(answer.pieces)
        if not pieces:
            return [b""]  # md-command 402: the zero-length final chunk `0;id=N;trail`
        if (
            answer.operation == "push-confirmation"
            and answer.result_code == 100
            and self._confirmation_echo is not None
        ):
            start = b'<arms-response type="push-confirmation-done">'
            pieces[0] = pieces[0].replace(
                start, start + b"<transaction-id>%d</transaction-id>" % self._confirmation_echo
            )
        chunks = [b"".join(pieces)]
        if answer.operation in ("md-command", "dump-debug") and len(pieces) == 3:
            m = _MD_RESULT.fullmatch(pieces[1])
            if m is not None:
                chunks = [pieces[0] + m.group(1), m.group(2), m.group(3) + pieces[2]]
        return [part for chunk in chunks if chunk for part in _cut(chunk, SA_TUNNEL_READ)]

    async def _respond(
        self,
        tunnel: _Tunnel,
        record: TunnelPush,
        answer: _Answer,
        chunks: list[bytes],
        exiting: bool,
    ) -> None:
        txn = answer.txn
        early = (
            txn is not None
            and txn.operation != "configure"
            and self.behaviour.done_before_start_answer
        )
        if early and txn is not None:
            # The done goes out before the start answer (§7.0.4); its answer comes later.
            self._track(defer.ensureDeferred(self._run_done(tunnel, txn, early=True)))
        behaviour = self.behaviour
        await self._sleep(max(behaviour.answer_delay, behaviour.start_answer_delay))
        if not tunnel.open:
            log.info("device tunnel: tunnel gone before the {type} answer", type=record.type)
            self._report("push", record)
            if txn is not None and not early:
                tunnel.txns.pop(txn.id, None)
                self.transactions.pop(txn.id, None)
            if exiting:
                self._shutdown()
            return
        record.answer = tunnel.write_message(chunks)
        record.answer_chunks = list(chunks)
        record.answered_at = self.reactor.seconds()
        self._report("push", record)
        self._notify()
        if exiting:
            self._shutdown()
            return
        if txn is None or early:
            return
        if txn.operation == "configure":
            self._track(defer.ensureDeferred(self._configure(tunnel, txn)))
        else:
            self._track(defer.ensureDeferred(self._run_done(tunnel, txn)))

    def _done_answer(self, tunnel: _Tunnel, held: _TunnelTxn, chunk: _Chunk) -> None:
        if held.answered is None:
            self._problem(
                tunnel,
                f"a message for transaction {held.txn.id} before its done was sent: "
                "the SA feeds it to that transaction",
            )
            return
        _fire(held.answered, chunk)

    # -- dones -------------------------------------------------------------------------------

    async def _run_done(self, tunnel: _Tunnel, txn: _Txn, *, early: bool = False) -> None:
        try:
            if not early:
                await self._sleep(self.behaviour.done_delay)
            held = tunnel.txns.get(txn.id)
            if held is None or not tunnel.open:
                return  # discarded with its tunnel
            record = await self._deliver_done(tunnel, held, 100, self._done_pieces(txn), attempt=1)
            if record.outcome == DONE_LOST:
                tunnel.abort(f"{record.kind} answer unusable: tunnel closed and reconnected")
            elif record.outcome != SUCCESS:
                self._exit(record.outcome)
                self._shutdown()
        finally:
            tunnel.txns.pop(txn.id, None)
            self.transactions.pop(txn.id, None)

    def _done_chunks(self, url: str, txn: _Txn, result: int, pieces: Sequence[str]) -> list[bytes]:
        """The client's done-request in its chunk splits (§2.3), as tunnel chunks (§9.3)."""
        request = self.sa.build_done_request(
            url,
            txn.operation,
            transaction_id=txn.id,
            transaction_result=result,
            body_pieces=pieces,
        )
        chunks = [_unframe(p) for p in request.pieces[1:-1]]
        return [part for chunk in chunks for part in _cut(chunk, SA_TUNNEL_READ)]

    async def _deliver_done(
        self, tunnel: _Tunnel, held: _TunnelTxn, result: int, pieces: Sequence[str], attempt: int
    ) -> TunnelDone:
        """Write a done on `tunnel` and judge what comes back for its transaction id."""
        txn = held.txn
        kind = f"{txn.operation}-done"
        chunks = self._done_chunks(tunnel.slot.url, txn, result, pieces)
        record = TunnelDone(
            kind=kind,
            transaction_id=txn.id,
            transaction_result=result,
            url=tunnel.slot.url,
            attempt=attempt,
            sent_at=self.reactor.seconds(),
            outcome=_PENDING,
            connection=tunnel.conn.number,
            chunks=chunks,
        )
        self.dones.append(record)
        answered: defer.Deferred[_Chunk | None] = defer.Deferred()
        held.answered = answered
        tunnel.txns[txn.id] = held
        record.request = tunnel.write_message(chunks)
        self._notify()
        timer = self.reactor.callLater(self.response_timeout, _fire, answered, None)
        try:
            chunk = await answered
        finally:
            held.answered = None
            if timer.active():
                timer.cancel()
        if chunk is None:
            if tunnel.closing is not None or tunnel.closed:
                reason = f"tunnel closed before the answer: {tunnel.conn.close_reason}"
            else:
                reason = f"no answer within {self.response_timeout:g} s"
            failed = RESEND if txn.operation == "configure" else DONE_LOST
            record.verdict = DeviceVerdict(kind=kind, outcome=failed, problems=[reason])
            record.error = reason
        else:
            record.answer = chunk.data
            record.answered_at = self.reactor.seconds()
            record.verdict = self._judge(kind, chunk.segments, result)
        record.outcome = record.verdict.outcome
        self._report("done", record)
        log.info(
            "device tunnel: {kind} {tid} (result {result}, attempt {attempt}) -> {outcome}",
            kind=kind,
            tid=txn.id,
            result=result,
            attempt=attempt,
            outcome=record.outcome,
        )
        self._notify()
        return record

    async def _configure(self, tunnel: _Tunnel, txn: _Txn) -> None:
        """Drop the tunnel, activate, report on the next connection first (§9.9, §6.5)."""
        slot = tunnel.slot
        tunnel.txns.pop(txn.id, None)
        previous = (list(self.modules), dict(self.configs))
        self._apply(txn.params)
        result = self.behaviour.configure_result
        if result in (411, 414):
            self._restore(previous)  # activation failed, the old config is back
        rolled_back = result == 414
        resends = attempt = 0
        slot.configure = txn
        reason = "configure: the SA drops the tunnel to activate"
        current: _Tunnel | None = tunnel
        try:
            while True:
                waiter = slot.next_open()
                assert current is not None
                current.abort(reason)
                current = await waiter
                if current is None:
                    return  # stopped or left the event loop
                attempt += 1
                record = await self._deliver_done(current, _TunnelTxn(txn), result, [], attempt)
                current.txns.pop(txn.id, None)
                outcome = record.outcome
                if outcome == SUCCESS:
                    slot.configure = None
                    self.transactions.pop(txn.id, None)
                    self._reconfirm(current)
                    return
                if outcome == RESEND and resends < self.behaviour.retry_max:
                    resends += 1
                    reason = "configure-done not delivered: sent again on a new connection"
                elif outcome == ROLLBACK or (outcome == RESEND and not rolled_back):
                    self._restore(previous)
                    self.rollbacks += 1
                    rolled_back, result, resends = True, 414, 0
                    reason = "configure rolled back: configure-done 414 on a new connection"
                elif outcome == RESEND:
                    self._exit(REPULL)  # rolled back and still not delivered
                    self._shutdown()
                    return
                else:  # re-pull, stop, reboot (also a 1xx answer after 303)
                    self._exit(outcome)
                    self._shutdown()
                    return
        finally:
            if slot.configure is txn and (self._stopping or self._exited):
                slot.configure = None
                self.transactions.pop(txn.id, None)

    def _reconfirm(self, tunnel: _Tunnel) -> None:
        """After a good configure: confirmation on this tunnel and every other (§8.4)."""
        tunnel.start_confirmation()
        for slot in self._slots:
            other = slot.tunnel
            if other is not None and other is not tunnel and other.open:
                other.start_confirmation()

    # -- building and judging ----------------------------------------------------------------

    def _confirmation_start_body(self, url: str) -> bytes:
        request = self.sa.build_push_confirmation_start(url, "https-tunnel", None)
        return _unframe(request.pieces[1])

    @staticmethod
    def _confirmation_done_answer(confirmation_id: int | None) -> bytes:
        """Captured form: transaction-id echoed first (06-push-confirmation-done.response)."""
        pieces = _arms_pieces("push-confirmation-done", 100, transaction_id=confirmation_id)
        return b"".join(_strip_http(pieces))

    @staticmethod
    def _judge(
        kind: str, segments: Sequence[bytes], transaction_result: int | None = None
    ) -> DeviceVerdict:
        """The client's judgement of an answer that came as chunk data instead of an HTTP body;
        `segments` are the SA's reads of it (single-shot parsers see the first only)."""
        data = b"".join(segments)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(
            data
        )
        reads = [head, *segments] if len(segments) > 1 else None
        verdict = judge_response(
            kind, head + data, reads=reads, transaction_result=transaction_result
        )
        verdict.notes = [n for n in verdict.notes if not n.startswith("answer arrived in")]
        return verdict

    # -- plumbing ----------------------------------------------------------------------------

    def _problem(self, tunnel: _Tunnel, text: str) -> None:
        entry = f"{tunnel.slot.url}#{tunnel.conn.number}: {text}"
        self.problems.append(entry)
        log.warn("device tunnel: {entry}", entry=entry)

    def _notify(self) -> None:
        """Wake wait_until() callers, from a fresh reactor turn (never inside a callback)."""
        if self._notify_call is None or not self._notify_call.active():
            self._notify_call = self.reactor.callLater(0, self._flush_waiters)

    def _flush_waiters(self) -> None:
        self._notify_call = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def _track(self, d: defer.Deferred[Any]) -> None:
        self._pending.add(d)

        def finished(result: object) -> None:
            self._pending.discard(d)
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self.errors.append(result)
                log.failure("device tunnel: task failed", result)

        d.addBoth(finished)


def _fire(d: defer.Deferred[Any] | None, value: object) -> None:
    if d is not None and not d.called:
        d.callback(value)
