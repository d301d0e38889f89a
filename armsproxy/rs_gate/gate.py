"""The RS gate's XML-RPC methods: ``push.*``, ``sa.*``, introspection (design.md §4).

This is the RS developer's whole view of armsproxy, so every method's docstring is the API
reference (served by ``system.methodHelp``), and every way a call can go wrong ends in a
defined fault, one log line, and a server that keeps answering:

======= ====================================================================================
fault   meaning
======= ====================================================================================
400     bad call: unparsable request (also: a DTD or entity declaration, values nested
        deeper than 64 elements, an integer beyond 64 bits, a double not finite), wrong
        number or type of arguments, rejected order (the message names the field); nothing
        was stored
404     unknown ``operation_id`` or ``distribution_id``
409     conflict: a ``request_id`` reused for a different order; forgetting an unfinished
        operation
410     the result was forgotten (``push.forget`` or ``results.ttl``)
500     internal error (logged with its traceback); the call may be retried
-32601  no such method (the XML-RPC interoperability code, so it cannot be mistaken for 404)
======= ====================================================================================

Fault messages are short: a value they echo is cut to 200 characters, a whole message to 500.

XML-RPC has no nil: a value armsproxy does not have is left out of its struct, never sent as
an empty string or 0. Times are epoch seconds (double).
"""

from __future__ import annotations

import contextvars
import inspect
import re
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from xmlrpc import client as xmlrpclib

from cryptography.x509.oid import NameOID
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.web import server, xmlrpc
from twisted.web.iweb import IRequest

from ..arms.distid import is_distid
from ..push.engine import OrderRejected
from ..push.operations import to_xmlrpc
from ..store.model import FINAL, STATES, Operation, SARecord
from .xmlrpc_parse import MAX_MESSAGE, MAX_SHOWN, CallRefused, bounded, parse_call, shown
from .xmlrpc_write import dumps_response

log = Logger()

INTERFACE_VERSION = "1.0"

BAD_REQUEST = 400
NOT_FOUND = 404
CONFLICT = 409
GONE = 410
INTERNAL_ERROR = 500
NO_SUCH_METHOD = -32601

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
SLOW_CALL = 5.0  # seconds; a call slower than this is logged (usually a slow disk)
MAX_LOGGED_METHOD = 100  # characters of a method name in a log line
# Parsing is Python callbacks under expat, ~90 ms per MiB of small values: a call larger than
# this is parsed in a thread, so the reactor (every device's pull) is never held that long.
PARSE_IN_THREAD = 32 * 1024  # bytes

_INT32_MAX = 2**31 - 1
_INT32_MIN = -(2**31)
_EPOCH_MAX = 1e15  # seconds (some 30 million years); larger is nonsense, not a time
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_STATUS_FIELDS = (
    "operation_id",
    "request_id",
    "distribution_id",
    "operation",
    "state",
    "attempts",
    "created_at",
    "updated_at",
    "not_before",
    "expires_at",
    "done_deadline",
    "last_error",
    "waiting_for",
    "start_result_code",
    "sa_transaction_id",
    "transaction_result",
    "result_code",
)
_LIST_KEYS = frozenset({"distribution_id", "states", "since", "until", "limit", "offset"})
_SA_LIST_KEYS = frozenset({"confirmed", "limit", "offset"})
_ORDER_FIELDS = ("distribution_id", "operation", "params", "sa_url", "method")

# Who is calling, for the log lines of the call being served (set per call in _answer).
_peer: contextvars.ContextVar[str] = contextvars.ContextVar("rs_gate_peer", default="?")

F = TypeVar("F", bound=Callable[..., Any])


def _rpc(name: str, *signatures: list[str]) -> Callable[[F], F]:
    """Publish a method under ``name`` with its introspection signature(s) and help."""

    def mark(func: F) -> F:
        func.rpc_name = name  # type: ignore[attr-defined]
        func.signature = [list(s) for s in signatures]  # type: ignore[attr-defined]
        func.help = inspect.cleandoc(func.__doc__ or "")  # type: ignore[attr-defined]
        return func

    return mark


# -- argument checks --------------------------------------------------------------------------


def _fault(code: int, message: str) -> xmlrpclib.Fault:
    """A fault whose message is short, whatever a client sent: every fault is built here."""
    return xmlrpclib.Fault(code, _text(bounded(message, MAX_MESSAGE)))


def _bad(message: str) -> xmlrpclib.Fault:
    return _fault(BAD_REQUEST, message)


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "double", str: "string", list: "array",
             dict: "struct", xmlrpclib.Binary: "Binary", type(None): "nil"}
    return names.get(type(value), type(value).__name__)


def _operation_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise _bad(f"operation_id: the string push.submit returned expected, got {_kind(value)}")
    return value


def _distid(value: object, key: str = "distribution_id") -> str:
    if not isinstance(value, str) or not is_distid(value):
        raise _bad(f"{key}: 8 groups of 4 upper-case hex digits expected, got {shown(value)}")
    return value


def _integer(value: object, key: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{key}: an integer from {low} to {high} expected, got {shown(value)}")
    return value


def _seconds(value: object, key: str) -> float:
    # A comparison, not math.isfinite: that raises OverflowError on a huge int (fault 500).
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not -_EPOCH_MAX <= value <= _EPOCH_MAX:
        raise _bad(f"{key}: epoch seconds (int or double) expected, got {shown(value)}")
    return float(value)


def _filter(value: object, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"filter: a struct expected, got {_kind(value)}")
    unknown = sorted(bounded(str(k), MAX_SHOWN) for k in value if k not in allowed)
    if unknown:
        raise _bad(f"filter: unknown key(s) {bounded(', '.join(unknown), MAX_SHOWN)}; "
                   f"allowed: {', '.join(sorted(allowed))}")
    return value


def _paging(f: dict[str, Any]) -> tuple[int, int]:
    limit = _integer(f.get("limit", DEFAULT_LIMIT), "filter.limit", 1, MAX_LIMIT)
    offset = _integer(f.get("offset", 0), "filter.offset", 0, _INT32_MAX)
    return limit, offset


def _page(items: list[Any], limit: int, offset: int) -> tuple[list[Any], int | None]:
    """``items`` was fetched with ``limit + 1``: the extra one says whether a next page exists."""
    if len(items) > limit:
        return items[:limit], offset + limit
    return items, None


# -- structs ----------------------------------------------------------------------------------


def _text(value: str) -> str:
    """Text XML can carry: characters XML 1.0 forbids become U+FFFD."""
    return _NOT_XML_CHAR.sub("\ufffd", value)


def _xml_copy(value: Any) -> Any:
    """A stored ARMS exchange text as sent: a string, or Binary if XML could not carry it."""
    if isinstance(value, str) and _NOT_XML_CHAR.search(value):
        return xmlrpclib.Binary(value.encode("utf-8"))
    return value


def status_struct(op: Operation) -> dict[str, Any]:
    """``push.status`` of one operation (absent values left out: XML-RPC has no nil).

    ``to_xmlrpc`` of the fields, with the plain values (all of them, in practice) taken as
    they are: every ``push.list`` poll builds one per unfinished order."""
    struct: dict[str, Any] = {}
    for name in _STATUS_FIELDS:
        value = getattr(op, name)
        kind = type(value)
        if value is None:
            continue
        if kind is str:
            struct[name] = _text(value) if name == "last_error" else value
        elif (kind is int and _INT32_MIN <= value <= _INT32_MAX) or kind is float:
            struct[name] = value
        else:
            struct[name] = to_xmlrpc(value)
    struct["forgotten"] = to_xmlrpc(op.forgotten)
    return struct


def result_struct(op: Operation) -> dict[str, Any]:
    """``push.result``: the status plus the decoded result and the raw ARMS exchanges."""
    struct = status_struct(op)
    if op.result is not None:
        struct["result"] = to_xmlrpc(op.result)
    raw = []
    for entry in op.raw:
        item = to_xmlrpc(entry)
        raw.append({k: v if k == "kind" else _xml_copy(v) for k, v in item.items()})
    struct["raw"] = raw
    # The order as accepted, so a failed one can be submitted again (armsproxyctl ops retry).
    struct["order"] = to_xmlrpc({"params": op.params, "sa_url": op.sa_url, "method": op.method})
    return struct


def sa_struct(record: SARecord) -> dict[str, Any]:
    """``sa.status`` of one SA registry entry."""
    struct: dict[str, Any] = to_xmlrpc({
        "distribution_id": record.distribution_id,
        "push_method": record.push_method,
        "push_endpoint": record.push_endpoint,
        "confirmed": record.confirmed,
        "last_pull_at": record.last_pull_at,
        "last_confirmation_at": record.last_confirmation_at,
        "last_peer": record.last_peer,
        "tunnels": record.tunnels or [],
        "has_certificate": bool(record.sa_certificate),
        "updated_at": record.updated_at,
    })
    return struct


# A persistent connection's peer (and certificate) never changes: described once per channel.
_PEERS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _describe_peer(request: IRequest) -> str:
    channel = getattr(request, "channel", None)
    try:
        return _PEERS[channel]
    except (KeyError, TypeError):  # new, or no channel to key on
        pass
    peer = _peer_of(request)
    try:
        _PEERS[channel] = peer
    except TypeError:
        pass
    return peer


def _peer_of(request: IRequest) -> str:
    address = request.getClientAddress()
    if isinstance(address, IPv4Address | IPv6Address):
        peer = f"{address.host}:{address.port}"
    elif isinstance(address, UNIXAddress):
        peer = "unix socket"
    else:
        peer = str(address)
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None and ISSLTransport.providedBy(transport):
        try:
            certificate = transport.getPeerCertificate()
        except Exception:  # only for the log line
            certificate = None
        if certificate is not None:
            names = certificate.to_cryptography().subject.get_attributes_for_oid(
                NameOID.COMMON_NAME)
            peer += f" (certificate CN={names[0].value if names else '?'})"
    return peer


def _arity(signature: inspect.Signature | None) -> tuple[int, int] | None:
    """(fewest, most) positional arguments ``signature.bind(*args)`` accepts, when that is
    all there is to it (positional parameters only); None when bind() must decide."""
    if signature is None:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not all(p.kind in positional for p in signature.parameters.values()):
        return None
    required = sum(1 for p in signature.parameters.values() if p.default is p.empty)
    return required, len(signature.parameters)


# -- the resource -----------------------------------------------------------------------------


class RSGate(xmlrpc.XMLRPC):
    """XML-RPC resource for the RS: orders in (via the push engine), state and results out."""

    NOT_FOUND = NO_SUCH_METHOD
    FAILURE = INTERNAL_ERROR

    def __init__(self, engine: Any, store: Any, *, clock: IReactorTime) -> None:
        super().__init__(allowNone=False, useDateTime=False)
        self.engine = engine
        self.store = store
        self.clock = clock
        self._procedures: dict[str, Callable[..., Any]] = {}
        self._signatures: dict[str, tuple[inspect.Signature | None,
                                          tuple[int, int] | None]] = {}
        for klass in reversed(type(self).__mro__):  # a subclass may override a method
            for attr, value in vars(klass).items():
                name = getattr(value, "rpc_name", None)
                if isinstance(name, str):
                    self._procedures[name] = getattr(self, attr)
        xmlrpc.addIntrospection(self)

    # -- dispatch -------------------------------------------------------------------------------

    def lookupProcedure(self, procedurePath: str) -> Callable[..., Any]:
        found = self._procedures.get(procedurePath)
        if found is not None:
            return found
        try:
            return super().lookupProcedure(procedurePath)  # system.* (introspection)
        except xmlrpc.NoSuchFunction:
            raise xmlrpc.NoSuchFunction(
                NO_SUCH_METHOD, f"no such method {shown(procedurePath)}; see system.listMethods"
            ) from None

    def listProcedures(self) -> list[str]:
        return sorted(self._procedures)

    def render(self, request: server.Request) -> Any:
        if request.method != b"POST":
            # Answered here: Twisted's own 405 page is deprecated (unescaped HTML).
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"XML-RPC: POST calls only (see system.listMethods)\n"
        return super().render(request)

    def render_POST(self, request: server.Request) -> int:
        request.content.seek(0, 0)
        body = request.content.read()
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)
        d = defer.ensureDeferred(self._answer(body, _describe_peer(request)))
        d.addCallback(self._write, request, gone)
        d.addErrback(lambda f: log.failure("rs gate: cannot write the answer", f))
        return server.NOT_DONE_YET

    def _write(self, content: bytes, request: server.Request, gone: list[object]) -> None:
        if gone:
            return  # the client went away; nothing to write to
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(content))
        request.write(content)
        request.finish()

    async def _answer(self, body: bytes, peer: str) -> bytes:
        """One call, start to end; whatever happens, the answer is a marshalled response."""
        _peer.set(peer)
        method = "?"
        started = self.clock.seconds()
        try:
            args, name = await self._read_call(body)
            method = bounded(name, MAX_LOGGED_METHOD)  # for log lines
            function = self.lookupProcedure(name)
            self._check_arguments(name, method, function, args)
            result = function(*args)
            if inspect.isawaitable(result):
                result = await result
            content = dumps_response(result)  # xmlrpc.client's text, faster (xmlrpc_write)
        except xmlrpclib.Fault as fault:
            # Bounded again here: a fault raised elsewhere (the engine's order checks, Twisted)
            # may echo a value of any size.
            fault = _fault(fault.faultCode, str(fault.faultString))
            log.info("rs gate: {peer} {method}: fault {code}: {message}", peer=peer,
                     method=method, code=fault.faultCode, message=fault.faultString)
            content = xmlrpclib.dumps(fault, methodresponse=True, allow_none=False)
        except Exception:  # a bug becomes fault 500 and a traceback, never a dead server
            log.failure("rs gate: {peer} {method}: internal error", peer=peer, method=method)
            content = xmlrpclib.dumps(xmlrpclib.Fault(INTERNAL_ERROR, "internal error"),
                                      methodresponse=True, allow_none=False)
        elapsed = self.clock.seconds() - started
        if elapsed > SLOW_CALL:
            log.warn("rs gate: {peer} {method} took {elapsed:.1f} s", peer=peer, method=method,
                     elapsed=elapsed)
        return content.encode("utf-8")

    async def _read_call(self, body: bytes) -> tuple[tuple[Any, ...], str]:
        """A small call is parsed at once; a large one in a thread (the GIL is handed back to
        the reactor every few milliseconds), so that bounded reactor work per call holds for
        every body the size limit lets through."""
        if len(body) <= PARSE_IN_THREAD:
            return self._parse(body)
        parsed: tuple[tuple[Any, ...], str] = await threads.deferToThread(self._parse, body)
        return parsed

    @staticmethod
    def _parse(body: bytes) -> tuple[tuple[Any, ...], str]:
        # parse_call refuses DTDs and entities (before any expansion, in any encoding), deep
        # nesting and out-of-range numbers; see xmlrpc_parse.
        try:
            args, method = parse_call(body)
        except CallRefused as e:
            raise _bad(f"cannot read the XML-RPC call: {e}") from None
        except Exception as e:  # expat and the unmarshaller raise many kinds
            why = bounded(str(e) or type(e).__name__, MAX_SHOWN)
            raise _bad(f"cannot read the XML-RPC call: {why}") from None
        if not isinstance(method, str) or not method:
            raise _bad("cannot read the XML-RPC call: no methodName")
        return args, method

    def _check_arguments(self, name: str, method: str, function: Callable[..., Any],
                         args: tuple[Any, ...]) -> None:
        # Signatures per method name, computed once: inspect.signature costs more than the
        # rest of a push.submit's checks (a name not found never gets here); for the usual
        # positional parameters, just the bounds on their count (bind() costs microseconds).
        try:
            parameters, bounds = self._signatures[name]
        except KeyError:
            try:
                parameters = inspect.signature(function)
            except (TypeError, ValueError):
                parameters = None
            bounds = _arity(parameters)
            self._signatures[name] = parameters, bounds
        if parameters is None:
            return
        if bounds is not None:
            if bounds[0] <= len(args) <= bounds[1]:
                return
        else:
            try:
                parameters.bind(*args)
                return
            except TypeError:
                pass
        names = ", ".join(parameters.parameters)
        raise _bad(f"{method}({names}): got {len(args)} argument(s)")

    # -- arms.* ---------------------------------------------------------------------------------

    @_rpc("arms.interface_version", ["string"])
    def interface_version(self) -> str:
        """arms.interface_version() -> string

        The version of this interface, "MAJOR.MINOR" (now "1.0"). MINOR grows when methods,
        struct members or filter keys are added (old clients keep working: ignore members you
        do not know); MAJOR grows when something is removed or changes meaning.
        """
        return INTERFACE_VERSION

    # -- push.* ---------------------------------------------------------------------------------

    @_rpc("push.submit", ["string", "struct"])
    async def submit(self, order: object) -> str:
        """push.submit(order) -> string operation_id

        Accept a push order for one SA. Returns only after the order is durably stored;
        the push engine then carries it out (see push.status).

        order (struct):
          distribution_id  string, required: the SA ("0001-0000-...", 8 groups of 4
                           upper-case hex digits)
          operation        string, required: configure, read-status, read-storage,
                           clear-status, ping, traceroute, md-command, dump-debug,
                           read-module-list, check-transaction, reboot, pull-config
          params           struct, per operation (? = optional; unknown keys are refused;
                           default {}):
            configure            modules: [{id: int, version: string, location: string,
                                 install_order?: int}], at least one: the complete module
                                 set of the device; md_configs?: [{id: int (one of the
                                 modules), data: string | Binary, commit_order?: int}]
            read-status,         status_requests: [{id: int, param: string | Binary}], at
            clear-status         least one
            read-storage         storage?: "running" (default) | "candidate" | "backup"
            ping                 address: string; count?: int; size?: int
            traceroute           address: string; count: int >= 1; max_hop?: int 1..256
                                 (default 30)
            md-command           module_id: int; command: string | Binary, at most 8192
                                 bytes as sent
            pull-config          type?: "LS" | "RS"
            dump-debug, read-module-list, check-transaction, reboot: no params
          request_id       string, optional, at most 200 characters: your idempotency key.
                           The same request_id again returns the first operation_id and
                           stores nothing new (safe to retry after a timeout).
          sa_url           string, optional: https:// URL with a literal IP to push to,
                           instead of the endpoint the SA registered
          method           string, optional: "https-simple" or "https-tunnel"
          expires_in       int or double, optional: seconds until the order expires if it
                           could not be delivered (default: the configured one; at most
                           10 years)

        Faults: 400 the order is rejected (the message names the field and what is
        allowed; nothing was stored); 409 request_id already used for a different order.
        """
        try:
            op, created = await self.engine.submit(order)
        except OrderRejected as e:
            raise _bad(str(e)) from None
        if not created:
            self._check_same_order(order, op)
        # Per order, so debug: armsproxy_push_submitted_total counts them (the engine).
        log.debug("rs gate: {peer} push.submit: {how} {op} ({operation} for {distid}, "
                  "request_id {rid})", peer=_peer.get(),
                  how="accepted" if created else "repeated request, already accepted as",
                  op=op.operation_id, operation=op.operation, distid=op.distribution_id,
                  rid=op.request_id or "-")
        return op.operation_id

    def _check_same_order(self, order: Any, op: Operation) -> None:
        new = self.engine.validate_order(order)
        differs = [name for name in _ORDER_FIELDS if getattr(new, name) != getattr(op, name)]
        if differs:
            raise _fault(
                CONFLICT,
                f"request_id {op.request_id!r} was already used for operation "
                f"{op.operation_id} with a different {', '.join(differs)}",
            )

    async def _operation(self, operation_id: object) -> Operation:
        op: Operation | None = await self.store.get(_operation_id(operation_id))
        if op is None:
            raise _fault(NOT_FOUND, f"unknown operation_id {shown(operation_id)}")
        return op

    @_rpc("push.status", ["struct", "string"])
    async def status(self, operation_id: object) -> dict[str, Any]:
        """push.status(operation_id) -> struct

        Where an operation stands. Members (absent when there is no value yet):
          operation_id, request_id, distribution_id, operation   strings
          state          queued | sending | started | succeeded | failed | expired |
                         cancelled (the last four are final)
          attempts       int: deliveries tried (waiting for an unreachable SA is none)
          created_at, updated_at, not_before (next try), expires_at, done_deadline
                         (2-way: the done-request is awaited until then)   doubles
          last_error     string: why the last attempt or the operation failed
          waiting_for    string, queued only: the SA is not reachable yet, so the order
                         is not tried until this happens ("the SA to confirm a push
                         method", "a live tunnel from the SA") or expires_at passes
          start_result_code   int: the SA's result-code for the (start) request
          sa_transaction_id   int: the SA's transaction id (2-way operations)
          transaction_result  int: from the SA's done-request
          result_code    int: the final ARMS result code (1xx is success)
          forgotten      boolean: the result was deleted (push.forget or results.ttl)

        Faults: 404 unknown operation_id.
        """
        return status_struct(await self._operation(operation_id))

    @_rpc("push.result", ["struct", "string"])
    async def result(self, operation_id: object) -> dict[str, Any]:
        """push.result(operation_id) -> struct

        Everything push.status returns, plus:
          result   struct: the operation's data decoded (absent until there is some):
                   read-status/clear-status {status_reports: [{id, result?, data}]},
                   read-storage {md_configs: [{id, data}]}, ping {success, failure},
                   traceroute {hops: [{hop, text}]}, md-command/dump-debug {results:
                   [{id, data}]}, read-module-list {modules: [{id, version, location}]},
                   check-transaction {transaction_ids: [int]}, configure/reboot/
                   pull-config {}; 2-way results also hold dones: [{transaction_result,
                   at}]. data is a string, or Binary where the SA sent base64.
          raw      array of the ARMS exchanges as they were on the wire, oldest first:
                   {kind: "start" (request and its answer) | "done" (the SA's
                   done-request), at: double, request: string, answer?: string,
                   status?: int (HTTP status of the answer)}; a text XML cannot carry
                   is sent as Binary of its UTF-8 bytes.
          order    struct: the order as accepted, {params, sa_url?, method?}, so that a
                   failed or expired operation can be submitted again as a new one.

        Faults: 404 unknown operation_id; 410 forgotten (the result was deleted).
        """
        op = await self._operation(operation_id)
        if op.forgotten:
            raise _fault(GONE, "forgotten")
        return result_struct(op)

    @_rpc("push.cancel", ["struct", "string"])
    async def cancel(self, operation_id: object) -> dict[str, Any]:
        """push.cancel(operation_id) -> struct {cancelled: boolean, state: string}

        Cancel an operation that has not been sent yet (state queued). cancelled is true
        and state "cancelled" if it was; otherwise cancelled is false and state says where
        the operation is (too late: it is being sent, running on the SA, or finished).

        Faults: 404 unknown operation_id.
        """
        cancelled, state = await self.engine.cancel(_operation_id(operation_id))
        if state is None:
            raise _fault(NOT_FOUND, f"unknown operation_id {shown(operation_id)}")
        log.info("rs gate: {peer} push.cancel {op}: {outcome}", peer=_peer.get(),
                 op=operation_id, outcome="cancelled" if cancelled else f"too late ({state})")
        return {"cancelled": cancelled, "state": state}

    @_rpc("push.list", ["struct", "struct"], ["struct"])
    async def list_operations(self, filter: object = None) -> dict[str, Any]:
        """push.list(filter?) -> struct {operations: [status struct], next_offset?: int}

        Operations in submit order (by created_at), each as push.status returns it.
        filter (struct, every key optional; no filter = everything, first page):
          distribution_id  string: only this SA
          states           array of strings: only these states
          since, until     epoch seconds: since <= created_at < until
          limit            int 1..1000, default 100
          offset           int >= 0, default 0
        next_offset is present when more operations follow: pass it as offset.

        Faults: 400 unknown filter key or bad value.
        """
        f = _filter({} if filter is None else filter, _LIST_KEYS)
        query: dict[str, Any] = {}
        if "distribution_id" in f:
            query["distribution_id"] = _distid(f["distribution_id"], "filter.distribution_id")
        if "states" in f:
            states = f["states"]
            if not isinstance(states, list) or not states \
                    or not all(isinstance(s, str) and s in STATES for s in states):
                raise _bad("filter.states: a non-empty array of states expected, each one of "
                           f"{', '.join(sorted(STATES))}; got {shown(states)}")
            query["states"] = states
        for key in ("since", "until"):
            if key in f:
                query[key] = _seconds(f[key], f"filter.{key}")
        limit, offset = _paging(f)
        ops = await self.store.list_operations(**query, limit=limit + 1, offset=offset)
        page, next_offset = _page(ops, limit, offset)
        answer: dict[str, Any] = {"operations": [status_struct(op) for op in page]}
        if next_offset is not None:
            answer["next_offset"] = next_offset
        return answer

    @_rpc("push.forget", ["boolean", "string"])
    async def forget(self, operation_id: object) -> bool:
        """push.forget(operation_id) -> boolean true

        You have what you need: delete the operation's result and raw XML now instead of
        after results.ttl. The operation itself stays visible to push.status (forgotten
        true); push.result then faults 410. Forgetting twice is fine.

        Faults: 404 unknown operation_id; 409 the operation has not finished yet (wait
        for a final state, or push.cancel it).
        """
        op = await self._operation(operation_id)
        if op.state not in FINAL:
            raise _fault(CONFLICT, f"operation {op.operation_id} is still {op.state}; "
                                "forget it once it has finished")
        forgotten: bool = await self.store.forget(op.operation_id)
        log.info("rs gate: {peer} push.forget {op}", peer=_peer.get(), op=op.operation_id)
        return forgotten

    # -- sa.* -----------------------------------------------------------------------------------

    @_rpc("sa.status", ["struct", "string"])
    async def sa_status(self, distribution_id: object) -> dict[str, Any]:
        """sa.status(distribution_id) -> struct

        What armsproxy knows of one SA (absent members: not known):
          distribution_id  string
          push_method      string: https-simple | https-tunnel (from its confirmation)
          push_endpoint    string: URL pushes go to (https-simple)
          confirmed        boolean: push-confirmation succeeded
          last_pull_at, last_confirmation_at   doubles (epoch seconds); pulls are
                           recorded at most once a minute per SA (at once when its
                           address or certificate changes), so last_pull_at may be up
                           to 60 s older than the latest pull
          last_peer        string: the address the SA last connected from (its port
                           as of last_pull_at)
          tunnels          array of structs: live https-tunnel connections
          has_certificate  boolean: its certificate is known (pushes verify it)
          updated_at       double

        Faults: 400 not a distribution id; 404 not in the registry (it never pulled
        through armsproxy).
        """
        distid = _distid(distribution_id)
        record = await self.store.sa_get(distid)
        if record is None:
            raise _fault(NOT_FOUND, f"unknown distribution_id {distid}")
        return sa_struct(record)

    @_rpc("sa.list", ["struct", "struct"], ["struct"])
    async def sa_list(self, filter: object = None) -> dict[str, Any]:
        """sa.list(filter?) -> struct {sas: [sa.status struct], next_offset?: int}

        The SA registry by distribution_id. filter (struct, every key optional):
          confirmed  boolean: only confirmed (true) or unconfirmed (false) SAs
          limit      int 1..1000, default 100
          offset     int >= 0, default 0
        next_offset is present when more SAs follow: pass it as offset.

        Faults: 400 unknown filter key or bad value.
        """
        f = _filter({} if filter is None else filter, _SA_LIST_KEYS)
        confirmed = f.get("confirmed")
        if confirmed is not None and not isinstance(confirmed, bool):
            raise _bad(f"filter.confirmed: a boolean expected, got {shown(confirmed)}")
        limit, offset = _paging(f)
        records = await self.store.sa_list(limit=limit + 1, offset=offset, confirmed=confirmed)
        page, next_offset = _page(records, limit, offset)
        answer: dict[str, Any] = {"sas": [sa_struct(r) for r in page]}
        if next_offset is not None:
            answer["next_offset"] = next_offset
        return answer


__all__ = [
    "BAD_REQUEST",
    "CONFLICT",
    "GONE",
    "INTERFACE_VERSION",
    "INTERNAL_ERROR",
    "NOT_FOUND",
    "NO_SUCH_METHOD",
    "RSGate",
    "result_struct",
    "sa_struct",
    "status_struct",
]
