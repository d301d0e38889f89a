"""One https-tunnel connection from an SA, after the gate has read its POST header (§9).

The SA gate reads the request head; for a tunnel path it builds a :class:`TunnelSession`,
awaits :meth:`TunnelSession.open` and forwards every later byte and the connection loss. From
then on this class owns the connection: it answers the 200 header in one write (§9.1), reads
the SA's chunk stream with :class:`~armsproxy.arms.framing.TunnelReader`, answers echoes at
once, runs the confirmation (§9.4), answers done-requests with their transaction-id (§6.5),
and sends the push engine's requests one at a time (§9.7), one chunk per transport write.

Many thousands of these live in one process, mostly idle, so an idle tunnel holds a handful
of slots and nothing else: no reader (one exists only while a chunk or message is half
received), no buffers or queues, no copy of what was written, and no ``DelayedCall`` of its
own. Its one deadline at a time (confirmation step, echo watchdog, the request in flight,
the close grace) is an entry in the registry's :class:`~armsproxy.tunnel.timers.Deadlines`,
which runs every tunnel's deadlines on one timer. Each message is parsed once; routine events
are counted (:class:`~armsproxy.tunnel.registry.TunnelRegistry` ``stats``) rather than
logged.
"""

from __future__ import annotations

import base64
import binascii
import random
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..arms import codes
from ..arms.codec import (
    MAX_MESSAGE_BYTES,
    MessageError,
    UnsafeMessageError,
    parse_element,
    schema_problem,
    serialise,
)
from ..arms.distid import is_distid
from ..arms.framing import (
    ECHO_RESPONSE,
    END_OF_STREAM,
    TUNNEL_OPEN_RESPONSE,
    EchoRequest,
    EchoResponse,
    EndOfStream,
    FramingError,
    TunnelEvent,
    TunnelMessage,
    TunnelReader,
    build_http_error,
)
from ..arms.messages import (
    ArmsMessage,
    ArmsRequest,
    ArmsResponse,
    Empty,
    decode_element,
    is_done_type,
)
from .api import (
    TunnelAnswer,
    TunnelBusy,
    TunnelClosed,
    TunnelHooks,
    TunnelTimeout,
)
from .registry import TunnelRegistry
from .timers import EPSILON, Deadlines, Entry

__all__ = ["TunnelLimits", "TunnelSession", "parse_basic_authorization"]

# States. The 200 header has been written from _OPEN on.
_NEW, _AUTH, _OPEN, _CONFIRMING, _CONFIRM_WAIT, _READY, _REFUSED, _CLOSED = range(8)
_STATE_NAMES = ("new", "authenticating", "open", "confirming", "confirm-wait", "ready",
                "refused", "closed")
_WWW_AUTHENTICATE = (("WWW-Authenticate", 'Basic realm="arms"'),)
#: Chunk ids only tell one message's chunks from another's (§9.3): they need to be fresh, not
#: secret, and the operating system's random source costs a system call per message.
_chunk_ids = random.Random()


@dataclass(slots=True, frozen=True)
class TunnelLimits:
    """Timers and sizes of one tunnel; the defaults follow §9.8 and §11."""

    #: Each confirmation step (first message, relay answer, the SA's confirmation-done
    #: answer) must happen within this; the SA itself waits 60 s per step (§9.4).
    confirmation_timeout: float = 60.0
    #: Echo watchdog: no echo-request for ``2 * echo_interval + echo_slack`` s means the SA is
    #: gone (it sends one per interval, postponed by 1 s while writing, §9.3).
    echo_slack: float = 10.0
    #: The key check must answer well before the SA's 30 s header wait (§9.1).
    auth_timeout: float = 20.0
    #: A done the push engine has not committed within this is treated as not stored.
    done_timeout: float = 25.0
    #: After we close (or refuse), how long the peer may take to finish the TLS close.
    close_grace: float = 10.0
    max_message_size: int = MAX_MESSAGE_BYTES
    #: The SA's chunks carry at most 8191 bytes (§9.3); bigger ones are refused.
    max_chunk_size: int = 64 * 1024
    #: The SA never interleaves messages; several open ids means garbage.
    max_pending_messages: int = 4
    #: Bytes accepted before the 200 header is written (the SA sends none, §9.1).
    max_early_bytes: int = 16 * 1024
    #: Requests waiting on one tunnel behind the outstanding one.
    max_queue: int = 100


#: Shared by every tunnel built without limits of its own (one object, not one per tunnel).
_DEFAULT_LIMITS = TunnelLimits()


def parse_basic_authorization(header: str | None) -> tuple[str | None, str | None]:
    """``Authorization: Basic base64(distid:key)`` -> (distid, key); (None, None) if unusable.

    The scheme is matched case-insensitively (§14); the distid itself is checked by
    :meth:`TunnelSession.open`.
    """
    if not header:
        return None, None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None, None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        return None, None
    user, colon, key = decoded.partition(":")
    if not colon:
        return None, None
    return user, key


class _Pending:
    """One request from the push engine, waiting in the FIFO or outstanding."""

    __slots__ = ("_on_cancel", "abandoned", "deferred", "due", "sent_at", "timeout", "xml")

    def __init__(self, xml: bytes, timeout: float, on_cancel: Callable[[_Pending], None]) -> None:
        self.xml = xml
        self.timeout = timeout
        self.deferred: defer.Deferred[TunnelAnswer] = defer.Deferred(self._cancelled)
        self.sent_at = 0.0
        #: When the SA's answer is late (clock time), once written.
        self.due = 0.0
        self.abandoned = False
        self._on_cancel = on_cancel

    def _cancelled(self, _: defer.Deferred[TunnelAnswer]) -> None:
        self._on_cancel(self)


class _Room:
    """What the tunnels of one gate share: one object and one slot a tunnel, not five."""

    __slots__ = ("__weakref__", "clock", "deadlines", "hooks", "limits", "registry")

    def __init__(self, hooks: TunnelHooks, registry: TunnelRegistry, clock: IReactorTime,
                 limits: TunnelLimits) -> None:
        self.hooks = hooks
        self.registry = registry
        self.clock = clock
        self.limits = limits
        self.deadlines: Deadlines = registry.deadlines(clock)


#: The rooms in use, by the identities of what they hold (which a room keeps alive, so an
#: identity cannot be reused while its room exists); a room goes with its last tunnel.
_rooms: weakref.WeakValueDictionary[tuple[int, int, int, int], _Room] = (
    weakref.WeakValueDictionary())


def _room(hooks: TunnelHooks, registry: TunnelRegistry, clock: IReactorTime,
          limits: TunnelLimits) -> _Room:
    key = (id(hooks), id(registry), id(clock), id(limits))
    room = _rooms.get(key)
    if room is None:
        room = _rooms[key] = _Room(hooks, registry, clock, limits)
    return room


class _Setup:
    """What a tunnel holds only while it opens or confirms (or once it closed): one slot of
    the session's, not six, for the months it stays idle in between."""

    __slots__ = ("close_reason", "confirmation_id", "early", "held", "hook_call", "key")

    def __init__(self) -> None:
        self.close_reason: str | None = None
        self.key: str | None = None
        self.early: bytearray | None = None
        self.held: list[bytes] | None = None
        self.hook_call: defer.Deferred[Any] | None = None
        self.confirmation_id: int | None = None


def _setup_field(name: str) -> Any:
    """A session attribute kept in its :class:`_Setup`, made when a value is first set."""

    def get(self: TunnelSession) -> Any:
        setup = self._setup
        return None if setup is None else getattr(setup, name)

    def set_(self: TunnelSession, value: Any) -> None:
        setup = self._setup
        if setup is None:
            if value is None:
                return
            setup = self._setup = _Setup()
        setattr(setup, name, value)

    return property(get, set_)


class TunnelSession:
    """The server side of one tunnel; also the :class:`~armsproxy.tunnel.api.Tunnel` the push
    engine sends through once it is confirmed."""

    __slots__ = (
        "_current",
        "_due",
        "_lost",
        "_queue",
        "_reader",
        "_room",
        "_setup",
        "_state",
        "confirmed_at",
        "deadline_entry",
        "distid",
        "echo_interval",
        "id",
        "last_seen",
        "opened_at",
        "path",
        "peer",
        "transport",
    )

    log = Logger()

    def __init__(
        self,
        transport: ITransport,
        *,
        distid: str | None,
        key: str | None,
        peer: str,
        path: str,
        hooks: TunnelHooks,
        registry: TunnelRegistry,
        clock: IReactorTime,
        echo_interval: float,
        limits: TunnelLimits | None = None,
    ) -> None:
        self.transport = transport
        self.distid = distid or ""
        #: The opening's and confirmation's state (see _Setup); None once confirmed.
        self._setup: _Setup | None = None
        self._key = key
        self.peer = peer
        self.path = sys.intern(path)  # a handful of tunnel URLs: one string each
        self._room = _room(hooks, registry, clock, limits or _DEFAULT_LIMITS)
        self.echo_interval = echo_interval
        self.id = registry.next_id()
        self.opened_at = clock.seconds()
        self.confirmed_at: float | None = None
        self.last_seen = self.opened_at
        self._state = _NEW
        self._reader: TunnelReader | None = None
        #: The current state's deadline (confirmation step, echo watchdog, close grace).
        self._due: float | None = None
        #: Our entry in ``_deadlines`` (see :class:`~armsproxy.tunnel.timers.Deadlines`).
        self.deadline_entry: Entry | None = None
        self._queue: list[_Pending] | None = None
        self._current: _Pending | None = None
        self._lost = False

    # Kept in self._setup, which exists only while one of them is set.
    _key: str | None = _setup_field("key")  # type: ignore[assignment]
    #: Bytes that came before the 200 header was written.
    _early: bytearray | None = _setup_field("early")  # type: ignore[assignment]
    #: Answers to done-requests waiting for the confirmation to end.
    _held: list[bytes] | None = _setup_field("held")  # type: ignore[assignment]
    #: The key check or confirmation relay under way.
    _hook_call: defer.Deferred[Any] | None = _setup_field("hook_call")  # type: ignore[assignment]
    _confirmation_id: int | None = _setup_field("confirmation_id")  # type: ignore[assignment]
    #: Why the tunnel closed (or the confirmation was refused); None while it is up.
    close_reason: str | None = _setup_field("close_reason")  # type: ignore[assignment]

    def _drop_setup(self) -> None:
        """Forget the opening's state once none of it is left (an idle tunnel has none)."""
        setup = self._setup
        if setup is not None and setup.key is setup.early is setup.held is setup.hook_call \
                is setup.confirmation_id is setup.close_reason is None:
            self._setup = None

    def __repr__(self) -> str:
        return (f"<TunnelSession {self.id} {self.distid or '?'} from {self.peer} "
                f"{self.state}>")

    # -- what the push engine and the registry read ------------------------------------------
    @property
    def hooks(self) -> TunnelHooks:
        return self._room.hooks

    @property
    def registry(self) -> TunnelRegistry:
        return self._room.registry

    @property
    def clock(self) -> IReactorTime:
        return self._room.clock

    @property
    def limits(self) -> TunnelLimits:
        return self._room.limits

    @property
    def _deadlines(self) -> Deadlines:
        return self._room.deadlines

    @property
    def state(self) -> str:
        return _STATE_NAMES[self._state]

    @property
    def confirmed(self) -> bool:
        return self._state == _READY

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def queue_length(self) -> int:
        return len(self._queue or ()) + (self._current is not None)

    def info(self) -> dict[str, Any]:
        """A plain struct for status calls (no None values, XML-RPC friendly)."""
        return {
            "id": self.id,
            "distid": self.distid,
            "peer": self.peer,
            "path": self.path,
            "opened_at": self.opened_at,
            "confirmed_at": self.confirmed_at or 0.0,
            "confirmed": self.confirmed,
            "queue_length": self.queue_length,
            "state": self.state,
        }

    # -- opening (§9.1) -----------------------------------------------------------------------
    async def open(self) -> bool:
        """Check the credentials and answer the header; True if the tunnel is open.

        On failure the answer (401, or 503 when the key cannot be checked) has been written
        and the connection is closing.
        """
        if self._state == _CLOSED:
            return False  # the connection went away before the gate called open()
        if self._state != _NEW:
            raise RuntimeError(f"open() on a tunnel in state {self.state}")
        distid, key = self.distid, self._key
        self._key = None  # no secret kept for the life of the tunnel
        if not distid or key is None or not is_distid(distid):
            self._refuse(401, f"missing, malformed or non-distid Basic credentials "
                              f"(user {distid[:40]!r})")
            return False
        self._state = _AUTH
        call = defer.ensureDeferred(self.hooks.authenticate(distid, key))
        call.addTimeout(self.limits.auth_timeout, self.clock)
        self._hook_call = call
        try:
            known = await call
        except defer.CancelledError:
            return False  # the connection went away meanwhile
        except defer.TimeoutError:
            if self._state != _CLOSED:
                self._refuse(503, f"key check did not answer within {self.limits.auth_timeout} s")
            return False
        except Exception as e:
            if self._state != _CLOSED:
                self._refuse(503, f"key check failed: {e}")
            return False
        finally:
            self._hook_call = None
        if self._state != _AUTH:
            return False
        if not known:
            self._refuse(401, "unknown distribution id or wrong key")
            return False
        if not self.registry.admit(self):
            self._refuse(503, f"this process already holds {self.registry.max_tunnels} tunnels")
            return False
        self._state = _OPEN
        # One write, nothing else until the SA's first chunk (§9.1 step 3).
        self.transport.write(TUNNEL_OPEN_RESPONSE)
        self._set_due(self.limits.confirmation_timeout)
        self.log.debug("tunnel {id}: opened by {distid} from {peer}",
                       id=self.id, distid=self.distid, peer=self.peer)
        early, self._early = self._early, None
        self._drop_setup()
        if early:
            self._receive(bytes(early))
        return True

    def _refuse(self, status: int, reason: str) -> None:
        self.log.warn("tunnel {id}: {status} to {peer}: {reason}",
                      id=self.id, status=status, peer=self.peer, reason=reason)
        self._state = _CLOSED
        self.close_reason = reason
        self._early = None
        self._due = None
        Deadlines.disarm(self)
        self._cancel_hook_call()
        if not self._lost:
            extra = _WWW_AUTHENTICATE if status == 401 else ()
            self.transport.write(build_http_error(status, extra_headers=extra))
            self._lose_connection()

    # -- bytes in ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._lost or self._state == _CLOSED or not data:
            return
        self.last_seen = self.clock.seconds()
        if self._state in (_NEW, _AUTH):
            if self._early is None:
                self._early = bytearray()
            self._early += data
            if len(self._early) > self.limits.max_early_bytes:
                self._refuse(400, f"more than {self.limits.max_early_bytes} bytes sent before "
                                  "the tunnel was opened")
            return
        self._receive(data)

    def connection_lost(self, reason: Failure | None = None) -> None:
        self._lost = True
        if self._state == _CLOSED:
            self._due = None  # no close grace to watch any more
            Deadlines.disarm(self)
        else:
            detail = reason.getErrorMessage() if reason is not None else "no reason"
            self._shutdown(f"connection lost ({detail})", send_end=False)

    # By Twisted's names too: the SA gate makes the session the TLS layer's protocol.
    dataReceived = data_received
    connectionLost = connection_lost

    def _receive(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:  # made for this read, kept only while a chunk or message is open
            limits = self.limits
            reader = self._reader = TunnelReader(
                max_chunk_size=limits.max_chunk_size,
                max_message_size=limits.max_message_size,
                max_pending_messages=limits.max_pending_messages,
            )
        try:
            chunks = reader.decoder.feed(data)
        except FramingError as e:
            self._fail(f"chunk framing error: {e}")
            return
        for chunk in chunks:
            if self._state == _CLOSED:
                return
            events: list[TunnelEvent]
            try:
                if (chunk.size == 0 and chunk.trail and chunk.id is not None
                        and not (chunk.echo_request or chunk.echo_response)
                        and chunk.id not in reader.assembler.pending_ids):
                    # ``0;id=N;trail`` with nothing before it: an empty message, the SA's way
                    # of answering md-command with 402 (§7.9, §9.3). The assembler drops it.
                    events = [TunnelMessage(chunk_id=chunk.id, body=b"")]
                else:
                    events = reader.assembler.feed(chunk)
            except FramingError as e:
                self._fail(f"tunnel message error: {e}")
                return
            for event in events:
                if self._state == _CLOSED:
                    return
                self._event(event)
        if self._reader is reader and reader.idle:
            self._reader = None  # on a chunk boundary, no message open: nothing to keep

    def _event(self, event: TunnelEvent) -> None:
        if isinstance(event, EchoRequest):
            # At once, ahead of anything else (§9.5); only echoes keep the SA's watchdog happy.
            self.transport.write(ECHO_RESPONSE)
            self.registry.stats["echo"] += 1
            if self._state == _READY:
                # Later only: the deadline entry already in the heap re-arms itself when due.
                self._due = self.last_seen + self._echo_deadline()
        elif isinstance(event, EndOfStream):
            self._shutdown("closed by the SA", send_end=False)
        elif isinstance(event, EchoResponse):
            self.registry.stats["echo_response_ignored"] += 1
        else:
            self._message(event.body)

    def _message(self, body: bytes) -> None:
        if self._state == _OPEN:
            self._set_due(self.limits.confirmation_timeout)
        elif self._state == _REFUSED:
            return  # the SA is about to drop this tunnel; nothing more to do here
        if not body:
            self._answer(b"", None, None)
            return
        try:
            root = parse_element(body, max_bytes=self.limits.max_message_size,
                                 ascii_text=True)
        except MessageError as e:
            self._fail(f"refused message ({e.reason}): {e.detail}")
            return
        message, problem = _decode(root)
        if message is None:
            if len(root) == 1 and root[0].tag == "arms-response":
                self._answer(body, None, problem)
            else:
                self._fail(f"unreadable request: {problem}")
            return
        if problem is not None:
            self.log.warn("tunnel {id}: {type} from {distid} taken leniently: {problem}",
                          id=self.id, type=message.type, distid=self.distid, problem=problem)
        if isinstance(message, ArmsResponse):
            if message.type == "push-confirmation-done":
                self._confirmation_done(message)
            else:
                self._answer(body, message, problem)
            return
        if message.distribution_id != self.distid:
            self._fail(f"{message.type} for distribution-id {message.distribution_id!r} on a "
                       "tunnel authenticated as another SA")
        elif message.type == "push-confirmation-start":
            self._confirmation_start(message)
        elif is_done_type(message.type):
            self._done(message, body)
        else:
            self._fail(f"unexpected request type {message.type!r} from the SA")

    # -- confirmation (§9.4) --------------------------------------------------------------------
    def _confirmation_start(self, request: ArmsRequest) -> None:
        if self._state not in (_OPEN, _READY):
            self._fail(f"push-confirmation-start while in state {self.state}")
            return
        if self._state == _READY:
            self.log.info("tunnel {id}: {distid} confirms again", id=self.id, distid=self.distid)
        self._state = _CONFIRMING
        self._set_due(self.limits.confirmation_timeout)
        call = defer.ensureDeferred(self.hooks.confirmation_start(self.distid, request, self.peer))
        self._hook_call = call
        call.addCallbacks(self._confirmation_answered, self._confirmation_failed)

    def _confirmation_answered(self, response: ArmsResponse) -> None:
        self._hook_call = None
        if self._state != _CONFIRMING:
            return
        if not isinstance(response, ArmsResponse):
            self._fail(f"confirmation relay returned {type(response).__name__}")
            return
        # The SA takes anything below 200 as success and then waits for the done (§6.4).
        accepted = response.result_code < 200
        if accepted and not response.transaction_id:
            self._fail("confirmation relay accepted without a confirmation id (transaction-id)")
            return
        try:
            answer = serialise(response)
            done = serialise(ArmsRequest(
                type="push-confirmation-done", distribution_id=self.distid,
                transaction_id=response.transaction_id, body=Empty(),
            )) if accepted else b""
        except UnsafeMessageError as e:
            self._fail(f"confirmation answer cannot be sent: {e}")
            return
        self._write_message(answer)
        if not accepted:
            # Let the SA read the code (it decides: retry, re-pull, ...) and drop the tunnel.
            self.log.warn("tunnel {id}: confirmation of {distid} refused with {code}",
                          id=self.id, distid=self.distid, code=response.result_code)
            self._state = _REFUSED
            self.close_reason = f"confirmation refused ({response.result_code})"
            self._set_due(self.limits.close_grace)
            return
        # Must be the very next message the SA gets after the answer (§7.2, §9.4).
        self._write_message(done)
        self._confirmation_id = response.transaction_id
        self._state = _CONFIRM_WAIT
        self._set_due(self.limits.confirmation_timeout)

    def _confirmation_failed(self, failure: Failure) -> None:
        self._hook_call = None
        if self._state != _CONFIRMING:
            return
        self._fail(f"confirmation relay failed: {failure.getErrorMessage()}")

    def _confirmation_done(self, response: ArmsResponse) -> None:
        if self._state != _CONFIRM_WAIT:
            self.log.warn("tunnel {id}: unexpected push-confirmation-done answer in state "
                          "{state}; ignored", id=self.id, state=self.state)
            return
        if response.transaction_id is not None and response.transaction_id != (
            self._confirmation_id
        ):
            self.log.warn("tunnel {id}: confirmation-done answer echoes {got}, sent {sent}",
                          id=self.id, got=response.transaction_id, sent=self._confirmation_id)
        if not codes.is_success(response.result_code):
            self._fail(f"the SA answered push-confirmation-done with {response.result_code}")
            return
        self._confirmation_id = None
        first = self.confirmed_at is None
        self.confirmed_at = self.clock.seconds()
        self._state = _READY
        self._set_due(self._echo_deadline())
        if first:
            self.registry.register(self)
            self.log.info("tunnel {id} up: {distid} from {peer} ({path})",
                          id=self.id, distid=self.distid, peer=self.peer, path=self.path)
            try:
                self.hooks.tunnel_up(self)
            except Exception:
                self.log.failure("tunnel {id}: tunnel_up hook failed", id=self.id)
        else:
            self.log.info("tunnel {id}: {distid} confirmed again", id=self.id,
                          distid=self.distid)
        if self._state != _READY:
            return
        held, self._held = self._held, None
        self._drop_setup()
        for data in held or ():
            self._write_message(data)
        self._send_next()

    # -- done-requests (§6.5, §9.3) ----------------------------------------------------------
    def _done(self, request: ArmsRequest, raw: bytes) -> None:
        if request.transaction_id is None:
            # The answer must carry it (§9.5); without one there is nothing to route to.
            self._fail(f"{request.type} without transaction-id")
            return
        call = defer.ensureDeferred(self.hooks.done_request(request, raw, self.peer))
        call.addTimeout(self.limits.done_timeout, self.clock)
        call.addCallbacks(self._done_stored, self._done_not_stored,
                          callbackArgs=(request,), errbackArgs=(request,))

    def _done_stored(self, code: int, request: ArmsRequest) -> None:
        if type(code) is not int:
            self._done_not_stored(Failure(TypeError(f"result code {code!r} is not an int")),
                                  request)
            return
        if self._state == _CLOSED:
            self.log.warn("tunnel {id}: {type} {tid} stored, but the tunnel closed before the "
                          "answer (the SA sends it again)", id=self.id, type=request.type,
                          tid=request.transaction_id)
            return
        try:
            answer = serialise(ArmsResponse(
                type=request.type, result_code=code,
                description="OK" if codes.is_success(code) else codes.label(code),
                transaction_id=request.transaction_id, body=Empty(),
            ))
        except UnsafeMessageError as e:
            self._fail(f"answer to {request.type} cannot be sent: {e}")
            return
        if self._state in (_CONFIRMING, _CONFIRM_WAIT):
            # Nothing may come between the confirmation answer and push-confirmation-done.
            if self._held is None:
                self._held = []
            self._held.append(answer)
        else:
            self._write_message(answer)

    def _done_not_stored(self, failure: Failure, request: ArmsRequest) -> None:
        # No answer: an error code would roll back a configure (§6.5). Closing makes the SA
        # reconnect and send the done again.
        self.log.error(
            "tunnel {id}: {type} {tid} from {distid} not stored ({why}); not answered",
            id=self.id, type=request.type, tid=request.transaction_id, distid=self.distid,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        self.close(f"{request.type} {request.transaction_id} could not be stored")

    # -- requests from armsproxy (§9.7) -------------------------------------------------------
    async def request(self, xml: bytes, *, timeout: float) -> TunnelAnswer:
        """Send one request and wait for the SA's answer.

        At most one request is outstanding per tunnel; later ones wait in a FIFO (also while
        the tunnel confirms). The answer is the next arms-response that is not a
        push-confirmation-done. Raises TunnelClosed, TunnelTimeout (``timeout`` counts from
        the write; the tunnel is closed) or TunnelBusy.
        """
        if not xml:
            raise ValueError("empty request")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if self._state == _CLOSED or self._state < _OPEN:
            raise TunnelClosed(f"tunnel {self.id} is {self.close_reason or self.state}",
                               request_sent=False)
        if len(self._queue or ()) >= self.limits.max_queue:
            raise TunnelBusy(f"tunnel {self.id}: {self.limits.max_queue} requests already wait")
        pending = _Pending(bytes(xml), timeout, self._request_cancelled)
        if self._queue is None:
            self._queue = []
        self._queue.append(pending)
        self._send_next()
        return await pending.deferred

    def _send_next(self) -> None:
        if self._state != _READY or self._current is not None or not self._queue:
            return
        pending = self._queue.pop(0)
        if not self._queue:
            self._queue = None
        self._current = pending
        pending.sent_at = self.clock.seconds()
        pending.due = pending.sent_at + pending.timeout
        self._deadlines.arm(self, pending.due)
        self._write_message(pending.xml)

    def _request_cancelled(self, pending: _Pending) -> None:
        if pending is self._current:
            # Already written: its answer will still come and must not be taken for the
            # next request's, so keep the slot until then (or until its timeout).
            pending.abandoned = True
        elif self._queue is not None and pending in self._queue:
            self._queue.remove(pending)
            if not self._queue:
                self._queue = None

    def _answer(self, body: bytes, response: ArmsResponse | None, problem: str | None) -> None:
        pending = self._current
        if pending is None:
            self.log.warn("tunnel {id}: answer {type} from {distid} without a request; dropped",
                          id=self.id, type=response.type if response else "(empty)",
                          distid=self.distid)
            return
        self._current = None  # its deadline entry comes due in vain, re-arming the next one
        if not pending.abandoned:
            pending.deferred.callback(TunnelAnswer(
                body=body, response=response,
                elapsed=self.clock.seconds() - pending.sent_at, problem=problem,
            ))
        self._send_next()

    def _request_timed_out(self, pending: _Pending) -> None:
        self._current = None
        reason = f"no answer within {pending.timeout:g} s"
        # Close first: a late answer must not meet a next request on this tunnel.
        self._fail(f"request timeout ({reason})")
        if not pending.abandoned:
            pending.deferred.errback(TunnelTimeout(f"tunnel {self.id}: {reason}"))

    # -- bytes out -----------------------------------------------------------------------------
    def _write_message(self, xml: bytes) -> None:
        """One message = one ``size;id=N;trail`` chunk = one transport write (§9.5)."""
        if self._lost or self._state == _CLOSED:
            return
        # Header, data and CRLF in one bytes object: one copy of the message, not two.
        self.transport.write(b"%x;id=%d;trail\r\n%s\r\n" % (
            len(xml), _chunk_ids.getrandbits(31) or 1, xml))

    # -- timers ------------------------------------------------------------------------------
    def _echo_deadline(self) -> float:
        return self.echo_interval * 2 + self.limits.echo_slack

    def _set_due(self, delay: float) -> None:
        """The current state's deadline is ``delay`` s from now (replacing the last one)."""
        self._due = self.clock.seconds() + delay
        self._arm()

    def _arm(self) -> None:
        """Be called back at the earliest of the state's deadline and the request's."""
        due = self._due
        current = self._current
        if current is not None and (due is None or current.due < due):
            due = current.due
        if due is not None:
            self._deadlines.arm(self, due)

    def deadline_reached(self, now: float) -> None:
        """Our deadline entry came due: act on what is due now, re-arm for the rest."""
        current = self._current
        if current is not None and now + EPSILON >= current.due:
            self._request_timed_out(current)
            return
        due = self._due
        if due is None or now + EPSILON < due:
            self._arm()  # moved later since (an echo-request, the answer came): not yet
            return
        self._due = None
        state = self._state
        if state == _READY:
            self._fail(f"echo timeout (no echo-request for {self._echo_deadline():g} s)")
        elif state in (_OPEN, _CONFIRMING, _CONFIRM_WAIT):
            self._fail(f"confirmation timeout ({self.state} for "
                       f"{self.limits.confirmation_timeout:g} s)")
        elif state == _REFUSED:
            self.close(self.close_reason or "confirmation refused")
        elif state == _CLOSED and not self._lost:
            # A TLS close waits for the peer's close_notify; a peer that never sends one must
            # not hold the connection forever.
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    # -- closing -------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Send the zero chunk (the SA reconnects, §9.5) and close; idempotent."""
        self._shutdown(reason, send_end=True)

    def _fail(self, reason: str) -> None:
        self.log.error("tunnel {id} ({distid} from {peer}): {reason}; closing",
                       id=self.id, distid=self.distid or "?", peer=self.peer, reason=reason)
        self._shutdown(reason, send_end=True)

    def _shutdown(self, reason: str, *, send_end: bool) -> None:
        state = self._state
        if state == _CLOSED:
            return
        self._state = _CLOSED
        self.close_reason = reason
        self._due = None
        Deadlines.disarm(self)
        self._cancel_hook_call()
        self._reader = None
        self._early = None
        self._held = None
        self._confirmation_id = None
        self._drop_setup()
        self.registry.release(self)
        if not self._lost:
            if send_end and state >= _OPEN:
                self.transport.write(END_OF_STREAM)
            self._lose_connection()
        if self.confirmed_at is not None:  # announced by tunnel_up
            self.log.info("tunnel {id} down: {distid} from {peer}: {reason}",
                          id=self.id, distid=self.distid, peer=self.peer, reason=reason)
            try:
                self.hooks.tunnel_down(self, reason)
            except Exception:
                self.log.failure("tunnel {id}: tunnel_down hook failed", id=self.id)
        elif state >= _OPEN:
            self.log.info("tunnel {id} of {distid} from {peer} closed before confirmation: "
                          "{reason}", id=self.id, distid=self.distid, peer=self.peer,
                          reason=reason)
        current, self._current = self._current, None
        queue, self._queue = self._queue, None
        if current is not None:
            if not current.abandoned:
                current.deferred.errback(TunnelClosed(
                    f"tunnel {self.id} closed: {reason}", request_sent=True))
        for pending in queue or ():
            pending.deferred.errback(TunnelClosed(
                f"tunnel {self.id} closed: {reason}", request_sent=False))

    def _cancel_hook_call(self) -> None:
        call, self._hook_call = self._hook_call, None
        if call is not None and not call.called:
            call.cancel()

    def _lose_connection(self) -> None:
        """Close; abort after ``close_grace`` if the peer never completes the TLS close."""
        self.transport.loseConnection()
        if self._due is None:
            self._set_due(self.limits.close_grace)


def _decode(root: Any) -> tuple[ArmsMessage | None, str | None]:
    """The message of a parsed ``arms-message``, read once: strict (XSD) when it can be; a
    device message outside the schema is still taken when the model can read it, since the
    device is the authority on what it writes (``problem`` then says what was wrong).
    ``(None, problem)`` when the model cannot read it."""
    found = schema_problem(root)  # codec's own check, on the tree already parsed
    problem = None if found is None else str(found)
    try:
        return decode_element(root), problem
    except ValueError as e:  # DecodeError, or int() of more than 4300 digits
        return None, str(MessageError("invalid-value", str(e)))
