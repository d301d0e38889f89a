"""The catalogue of push operations: what the RS may order, and how each one travels (§7).

The RS orders pushes over XML-RPC (``push.submit``); this module is the single place that
knows, per operation, which ``params`` are acceptable, how they become the ARMS start (or
1-way) request, how the SA's answer and its later ``*-done`` request read back into plain
structs, and how a done-request is acknowledged. Everything here is pure (no I/O), so the
push engine, the gates and the tests share one definition. Outgoing XML always goes through
:func:`armsproxy.arms.codec.serialise`, i.e. through the device guard.

Order parameters (``params`` of ``push.submit``; XML-RPC types; ``?`` = optional).
Text values may hold any XML 1.0 character (non-ASCII travels as character references);
integers must fit XML-RPC's 32-bit ``int``; unknown keys are refused.

================== ===== ======================================================================
operation          way   params
================== ===== ======================================================================
configure          2     ``modules``: list of ``{id: int >= 0, version: str, location: str,
                         install_order?: int >= 0}``, at least one, ids unique - the complete
                         module set of the device (modules not listed are removed, §7.3);
                         ``md_configs?``: list of ``{id: int, data: str | Binary,
                         commit_order?: int >= 0}``, every id must be one of the listed modules
                         (else the SA answers 415). No ``content_type`` (not allowed here, §3.1).
read-status        2     ``status_requests``: list of ``{id: int >= 0, param: str | Binary}``,
                         at least one (§7.4)
clear-status       2     same as read-status (§7.6)
read-storage       2     ``storage?``: ``"running"`` (default) | ``"candidate"`` | ``"backup"``
ping               2     ``address``: str, non-empty, no whitespace, at most 255 characters;
                         ``count?``: int >= 0; ``size?``: int >= 0 (the SA takes a missing
                         value as 0, §7.7)
traceroute         2     ``address``: as for ping; ``count``: int >= 1 (required by the SA);
                         ``max_hop?``: int 1..256, **default 30** (without it the SA's done
                         lists no hops, §7.8)
md-command         1     ``module_id``: int >= 0; ``command``: str | Binary, not empty, at most
                         8192 bytes as sent (UTF-8 text, or the base64 text of a Binary, i.e.
                         at most 6144 raw bytes), else the SA answers 402 (§7.9)
dump-debug         1     ``{}``
read-module-list   1     ``{}``
check-transaction  1     ``{}``
reboot             1     ``{}``
pull-config        1     ``type?``: ``"LS"`` | ``"RS"`` (§7.14; without it the SA pulls from
                         the RS)
================== ===== ======================================================================

Results (``push.result``, after :func:`to_xmlrpc`; ``Binary`` where the SA sent base64):

* 2-way, from the done-request (``transaction_result`` beside it): read-status, clear-status
  ``{status_reports: [{id, result, data}]}`` (``result`` omitted if the SA gave none);
  read-storage ``{md_configs: [{id, data}]}``; ping ``{success, failure}`` (``{}`` when the
  application failed, transaction_result 502); traceroute ``{hops: [{hop, text}]}``;
  configure ``{}`` (the outcome is the transaction_result: 100 activated, 303 activated and the
  SA reboots to synchronise modules, 414 rolled back, 411, 508).
* 1-way, from the answer (only for result codes 1xx): md-command, dump-debug
  ``{results: [{id, data}]}``; read-module-list ``{modules: [{id, version, location}]}``;
  check-transaction ``{transaction_ids: [...]}`` (the SA's 0 entries for 1-way transactions
  left out, §7.12); reboot, pull-config ``{}``.

Result code 0 (:data:`NO_RESULT_CODE`) in a :class:`StartOutcome` means the SA gave no usable
ARMS answer (HTTP 401/400, nothing parseable, wrong ``type``); ``error`` says why.
"""

from __future__ import annotations

import re
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from armsproxy.arms import codes
from armsproxy.arms.codec import MessageError, parse_message, serialise
from armsproxy.arms.distid import is_distid
from armsproxy.arms.framing import extract_arms_xml
from armsproxy.arms.guard import MD_COMMAND_LIMIT
from armsproxy.arms.messages import (
    ArmsMessage,
    ArmsRequest,
    ArmsResponse,
    Body,
    ConfigureStartRequest,
    Empty,
    MdCommand,
    MdCommandRequest,
    MdConfig,
    MdConfigs,
    MdResults,
    Module,
    ModuleList,
    PingDoneRequest,
    PingStartRequest,
    PullConfigRequest,
    ReadStorageStartRequest,
    StatusReports,
    StatusRequest,
    StatusRequests,
    TracerouteDoneRequest,
    TracerouteStartRequest,
    TransactionIds,
)

__all__ = [
    "NO_RESULT_CODE",
    "OPERATIONS",
    "READ_STORAGE_TYPES",
    "TRACEROUTE_DEFAULT_MAX_HOP",
    "DoneError",
    "DoneOutcome",
    "OperationSpec",
    "OrderError",
    "StartOutcome",
    "build_confirmation_done",
    "build_request",
    "decode_done",
    "decode_start_answer",
    "done_answer",
    "done_succeeded",
    "operation_for_done_type",
    "to_xmlrpc",
    "validate_order_params",
]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
#: ``StartOutcome.result_code`` when the SA gave no usable ARMS result code.
NO_RESULT_CODE = 0
TRACEROUTE_DEFAULT_MAX_HOP = 30
TRACEROUTE_MAX_HOP = 256  # §7.8: more ⇒ 203
MAX_ADDRESS_LENGTH = 255  # armsproxy's own sanity limit (a host name has at most 253)
READ_STORAGE_TYPES = ("running", "candidate", "backup")
PULL_CONFIG_TYPES = ("LS", "RS")
#: SA busy: queue again with backoff instead of failing (design §5, §7.0.5).
RETRYABLE_CODES = frozenset({codes.SA_BUSY, codes.TOO_MANY_TRANSACTIONS})


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """How one push operation travels.

    ``side_effects``: after a restart an interrupted operation with side effects must not be
    sent again (design §5); read-only ones may be.
    """

    name: str
    two_way: bool
    side_effects: bool
    request_type: str
    body_tag: str

    @property
    def answer_type(self) -> str:
        """The ``type`` the SA writes in its answer: the request's type (§3.3, §7.1)."""
        return self.request_type

    @property
    def done_type(self) -> str | None:
        return f"{self.name}-done" if self.two_way else None


def _spec(name: str, *, two_way: bool, side_effects: bool) -> OperationSpec:
    request_type = f"{name}-start" if two_way else name
    return OperationSpec(
        name=name,
        two_way=two_way,
        side_effects=side_effects,
        request_type=request_type,
        body_tag=f"{request_type}-request",
    )


OPERATIONS: dict[str, OperationSpec] = {
    spec.name: spec
    for spec in (
        _spec("configure", two_way=True, side_effects=True),
        _spec("read-status", two_way=True, side_effects=False),
        _spec("read-storage", two_way=True, side_effects=False),
        _spec("clear-status", two_way=True, side_effects=True),
        _spec("ping", two_way=True, side_effects=False),
        _spec("traceroute", two_way=True, side_effects=False),
        _spec("md-command", two_way=False, side_effects=True),
        _spec("dump-debug", two_way=False, side_effects=False),
        _spec("read-module-list", two_way=False, side_effects=False),
        _spec("check-transaction", two_way=False, side_effects=False),
        _spec("reboot", two_way=False, side_effects=True),
        _spec("pull-config", two_way=False, side_effects=True),
    )
}

_DONE_TYPES = {spec.done_type: spec for spec in OPERATIONS.values() if spec.done_type}


def operation_for_done_type(done_type: str) -> OperationSpec | None:
    """The 2-way operation a ``*-done`` request type belongs to, if any."""
    return _DONE_TYPES.get(done_type)


def _spec_for(operation: str) -> OperationSpec:
    spec = OPERATIONS.get(operation) if isinstance(operation, str) else None
    if spec is None:
        raise OrderError(
            f"operation: unknown operation {operation!r}; allowed: {', '.join(OPERATIONS)}"
        )
    return spec


# ---------------------------------------------------------------------------------------------
# Order validation


class OrderError(ValueError):
    """An order the RS must fix; the message names the field, the problem and what is allowed."""


# XML 1.0 Char production; lone surrogates are not characters either.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _Checker:
    """Walks one ``params`` struct; every error message starts with ``<operation>: params``."""

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def fail(self, path: str, problem: str) -> OrderError:
        return OrderError(f"{self.operation}: {path}: {problem}")

    def struct(self, value: Any, path: str, required: set[str], optional: set[str]) -> dict:
        if value is None and path == "params":
            value = {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a struct, got {_type_name(value)}")
        unknown = sorted(str(k) for k in value if k not in required | optional)
        if unknown:
            allowed = ", ".join(sorted(required | optional)) or "none"
            raise self.fail(path, f"unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(path, f"missing required key(s) {', '.join(missing)}")
        return value

    def integer(self, value: Any, path: str, low: int = INT32_MIN, high: int = INT32_MAX) -> int:
        if type(value) is not int:
            raise self.fail(path, f"expected an integer, got {_type_name(value)}")
        if not INT32_MIN <= value <= INT32_MAX:
            raise self.fail(path, f"{value} does not fit XML-RPC's 32-bit int")
        if not low <= value <= high:
            if high == INT32_MAX:
                raise self.fail(path, f"must be an integer >= {low}, got {value}")
            raise self.fail(path, f"must be an integer from {low} to {high}, got {value}")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {_type_name(value)}")
        bad = _NOT_XML_CHAR.search(value)
        if bad is not None:
            raise self.fail(
                path,
                f"character U+{ord(bad.group()):04X} at offset {bad.start()} cannot be sent in "
                "XML; send the value as Binary (base64) instead",
            )
        return value

    def payload(self, value: Any, path: str) -> str | bytes:
        """Text or binary data; binary travels base64-encoded (§3.5)."""
        if isinstance(value, xmlrpc.client.Binary):
            return bytes(value.data)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            return self.text(value, path)
        raise self.fail(path, f"expected a string or Binary, got {_type_name(value)}")

    def items(self, value: Any, path: str, *, at_least_one: bool) -> list:
        if not isinstance(value, list):
            raise self.fail(path, f"expected an array, got {_type_name(value)}")
        if at_least_one and not value:
            raise self.fail(path, "must hold at least one entry")
        return value

    def choice(self, value: Any, path: str, allowed: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise self.fail(
                path, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        return value

    def address(self, value: Any, path: str) -> str:
        address = self.text(value, path)
        if not address:
            raise self.fail(path, "must not be empty")
        if any(ch.isspace() for ch in address):
            raise self.fail(path, f"must not contain whitespace, got {address!r}")
        if len(address) > MAX_ADDRESS_LENGTH:
            raise self.fail(path, f"longer than {MAX_ADDRESS_LENGTH} characters")
        return address


def _type_name(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray, xmlrpc.client.Binary)):
        return "Binary"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "struct"
    return type(value).__name__


def _check_configure(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", {"modules"}, {"md_configs"})
    modules: list[dict] = []
    ids: set[int] = set()
    for i, raw in enumerate(c.items(p["modules"], "params.modules", at_least_one=False)):
        where = f"params.modules[{i}]"
        m = c.struct(raw, where, {"id", "version", "location"}, {"install_order"})
        module = {
            "id": c.integer(m["id"], f"{where}.id", low=0),
            "version": c.text(m["version"], f"{where}.version"),
            "location": c.text(m["location"], f"{where}.location"),
        }
        if "install_order" in m:
            module["install_order"] = c.integer(m["install_order"], f"{where}.install_order", 0)
        if module["id"] in ids:
            raise c.fail(f"{where}.id", f"module id {module['id']} is listed twice")
        ids.add(module["id"])
        modules.append(module)
    if not modules:
        raise c.fail(
            "params.modules",
            "must list at least one module: it is the complete module set, and a configure "
            "without modules removes every module on the SA and fails with 415 (§7.3)",
        )
    configs: list[dict] = []
    raw_configs = p.get("md_configs", [])
    for i, raw in enumerate(c.items(raw_configs, "params.md_configs", at_least_one=False)):
        where = f"params.md_configs[{i}]"
        if isinstance(raw, dict) and "content_type" in raw:
            raise c.fail(
                f"{where}.content_type",
                "not allowed in configure: content-type breaks <md-config> in a "
                "configure-start-request (§3.1); remove it",
            )
        m = c.struct(raw, where, {"id", "data"}, {"commit_order"})
        config: dict[str, Any] = {
            "id": c.integer(m["id"], f"{where}.id", low=0),
            "data": c.payload(m["data"], f"{where}.data"),
        }
        if "commit_order" in m:
            config["commit_order"] = c.integer(m["commit_order"], f"{where}.commit_order", 0)
        if config["id"] not in ids:
            listed = ", ".join(str(module["id"]) for module in modules)
            raise c.fail(
                f"{where}.id",
                f"{config['id']} names no module of params.modules (listed: {listed}); "
                "the SA would answer 415",
            )
        configs.append(config)
    return {"modules": modules, "md_configs": configs}


def _check_status_requests(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", {"status_requests"}, set())
    requests = []
    items = c.items(p["status_requests"], "params.status_requests", at_least_one=True)
    for i, raw in enumerate(items):
        where = f"params.status_requests[{i}]"
        r = c.struct(raw, where, {"id", "param"}, set())
        requests.append({
            "id": c.integer(r["id"], f"{where}.id", low=0),
            "param": c.payload(r["param"], f"{where}.param"),
        })
    return {"status_requests": requests}


def _check_read_storage(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", set(), {"storage"})
    return {"storage": c.choice(p.get("storage", "running"), "params.storage",
                                READ_STORAGE_TYPES)}


def _check_ping(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", {"address"}, {"count", "size"})
    out: dict[str, Any] = {"address": c.address(p["address"], "params.address")}
    for key in ("count", "size"):
        if key in p:
            out[key] = c.integer(p[key], f"params.{key}", low=0)
    return out


def _check_traceroute(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", {"address", "count"}, {"max_hop"})
    return {
        "address": c.address(p["address"], "params.address"),
        "count": c.integer(p["count"], "params.count", low=1),
        "max_hop": c.integer(p.get("max_hop", TRACEROUTE_DEFAULT_MAX_HOP), "params.max_hop",
                             low=1, high=TRACEROUTE_MAX_HOP),
    }


def _check_md_command(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", {"module_id", "command"}, set())
    command = c.payload(p["command"], "params.command")
    if not command:
        raise c.fail("params.command", "must not be empty")
    # The SA measures the element text as received: UTF-8, or the base64 text (§7.9).
    sent = len(command.encode("utf-8")) if isinstance(command, str) else (len(command) + 2) // 3 * 4
    if sent > MD_COMMAND_LIMIT:
        limit = (
            f"{MD_COMMAND_LIMIT} bytes of UTF-8 text"
            if isinstance(command, str)
            else f"{MD_COMMAND_LIMIT} bytes of base64 text ({MD_COMMAND_LIMIT // 4 * 3} raw bytes)"
        )
        raise c.fail("params.command", f"{sent} bytes as sent, more than {limit}; the SA "
                     "would answer 402")
    return {"module_id": c.integer(p["module_id"], "params.module_id", low=0),
            "command": command}


def _check_pull_config(c: _Checker, params: Any) -> dict:
    p = c.struct(params, "params", set(), {"type"})
    return {"type": c.choice(p["type"], "params.type", PULL_CONFIG_TYPES)} if "type" in p else {}


def _check_nothing(c: _Checker, params: Any) -> dict:
    c.struct(params, "params", set(), set())
    return {}


_CHECKS: dict[str, Callable[[_Checker, Any], dict]] = {
    "configure": _check_configure,
    "read-status": _check_status_requests,
    "clear-status": _check_status_requests,
    "read-storage": _check_read_storage,
    "ping": _check_ping,
    "traceroute": _check_traceroute,
    "md-command": _check_md_command,
    "dump-debug": _check_nothing,
    "read-module-list": _check_nothing,
    "check-transaction": _check_nothing,
    "reboot": _check_nothing,
    "pull-config": _check_pull_config,
}


def validate_order_params(operation: str, params: Any) -> dict:
    """Check an order's ``params``; return them normalised or raise :class:`OrderError`.

    The normalised form has defaults filled in (read-storage ``storage``, traceroute
    ``max_hop``), ``Binary`` turned into ``bytes`` and nothing else; validating it again gives
    the same dict, so it can be stored and handed to :func:`build_request` later. ``None``
    counts as an empty struct.
    """
    spec = _spec_for(operation)
    return _CHECKS[spec.name](_Checker(spec.name), params)


# ---------------------------------------------------------------------------------------------
# Requests to the SA


def _body(operation: str, p: dict) -> Body:
    if operation == "configure":
        return ConfigureStartRequest(
            modules=[
                Module(id=m["id"], version=m["version"], location=m["location"],
                       install_order=m.get("install_order"))
                for m in p["modules"]
            ],
            md_configs=[
                MdConfig(id=m["id"], data=m["data"], commit_order=m.get("commit_order"))
                for m in p["md_configs"]
            ],
        )
    if operation in ("read-status", "clear-status"):
        return StatusRequests(
            status_requests=[StatusRequest(id=r["id"], param=r["param"])
                             for r in p["status_requests"]]
        )
    if operation == "read-storage":
        return ReadStorageStartRequest(storage=p["storage"])
    if operation == "ping":
        return PingStartRequest(address=p["address"], count=p.get("count"), size=p.get("size"))
    if operation == "traceroute":
        return TracerouteStartRequest(address=p["address"], count=p["count"],
                                      max_hop=p["max_hop"])
    if operation == "md-command":
        return MdCommandRequest(commands=[MdCommand(id=p["module_id"], command=p["command"])])
    if operation == "pull-config" and "type" in p:
        return PullConfigRequest(type=p["type"])
    return Empty()  # written <x-request></x-request>, as in the captures


def build_request(
    operation: str, distid: str, params: dict, *, result_url: str | None
) -> bytes:
    """The start (2-way) or 1-way request for the SA, serialised and guard-checked.

    ``params`` are validated again (:class:`OrderError`). 2-way requests carry
    ``result_url`` - required: in https-simple mode the SA only posts its done-requests to the
    proxy if every start request names it (§7.0.3), and on a tunnel it is harmless (ValueError
    without one). 1-way requests never carry it (``result_url`` is ignored). No request carries
    a ``transaction-id`` (§7.0.2). Raises
    :class:`~armsproxy.arms.codec.UnsafeMessageError` if the device guard refuses the result
    (e.g. a result-url that is not ``https://<literal IP>``).
    """
    plain = params is None or (type(params) is dict and not params)
    if plain:
        cached = _PLAIN_REQUESTS.get((operation, distid, result_url))
        if cached is not None:
            return cached
    spec = _spec_for(operation)
    p = validate_order_params(spec.name, params)
    if not isinstance(distid, str) or not is_distid(distid):
        raise ValueError(f"not a distribution id (8 groups of 4 upper-case hex digits): {distid!r}")
    if spec.two_way and not result_url:
        raise ValueError(
            f"{spec.name} is a 2-way operation: its start request needs a result-url (§7.0.3)"
        )
    message = ArmsRequest(
        type=spec.request_type,
        distribution_id=distid,
        result_url=result_url if spec.two_way else None,
        body=_body(spec.name, p),
        body_tag=spec.body_tag,
    )
    request = serialise(message)
    if plain:
        if len(_PLAIN_REQUESTS) >= _PLAIN_REQUESTS_MAX:
            _PLAIN_REQUESTS.clear()
        _PLAIN_REQUESTS[(operation, distid, result_url)] = request
    return request


#: build_request's answers for orders without params (check-transaction, read-module-list,
#: dump-debug, reboot, ...): the same bytes for every push of one operation to one SA, so
#: built (model, lxml, guard) once per SA instead of per push.
_PLAIN_REQUESTS: dict[tuple[str, str, str | None], bytes] = {}
_PLAIN_REQUESTS_MAX = 65536


def build_confirmation_done(distid: str, confirmation_id: int) -> bytes:
    """armsproxy's own 1-way push-confirmation-done (§7.2), as in simple/05."""
    if not isinstance(distid, str) or not is_distid(distid):
        raise ValueError(f"not a distribution id: {distid!r}")
    if type(confirmation_id) is not int or not 0 < confirmation_id <= INT32_MAX:
        raise ValueError(f"confirmation id must be a positive 31-bit integer: {confirmation_id!r}")
    return serialise(
        ArmsRequest(
            type="push-confirmation-done",
            distribution_id=distid,
            transaction_id=confirmation_id,
            body=Empty(),
            body_tag="push-confirmation-done-request",
        )
    )


# ---------------------------------------------------------------------------------------------
# The SA's answer to a start / 1-way request


@dataclass(slots=True)
class StartOutcome:
    """What the answer to a start or 1-way request means for the operation.

    ``error is None``: accepted - a 2-way start with a ``transaction_id`` whose done will
    follow, or a 1-way operation that succeeded (``result`` holds its data). ``retryable``:
    the SA was busy (302, 406); queue again with backoff instead of failing.
    """

    result_code: int
    transaction_id: int | None = None
    result: dict = field(default_factory=dict)
    retryable: bool = False
    error: str | None = None
    description: str | None = None

    @property
    def accepted(self) -> bool:
        return self.error is None


def _code_text(code: int) -> str:
    return f"{code} {codes.label(code)}"


_CODE_HINTS = {
    codes.INVALID_XML: "the SA could not parse the request",
    codes.INVALID_MESSAGE_TYPE: "the SA does not know this operation",
    codes.INVALID_PARAMETER: "the SA refused a parameter of the request",
    codes.SA_BUSY: "the SA is busy with another configure or md-command; try again later",
    codes.TOO_MANY_TRANSACTIONS: "the SA has too many transactions open; try again later",
    codes.DISTID_MISMATCH: "the device at this endpoint has another distribution id",
    codes.NOT_SUPPORT: "the SA application does not support this operation",
    codes.SA_FAILURE: "the SA application failed",
    codes.COMMAND_EXECUTE_ERROR: "the command ran but reported an error",
}


def _failure(code: int, error: str, **kwargs: Any) -> StartOutcome:
    return StartOutcome(result_code=code, error=error, **kwargs)


def decode_start_answer(operation: str, status: int | None, xml: bytes,
                        parsed: ArmsMessage | None = None) -> StartOutcome:
    """Read the SA's answer to a start or 1-way request, leniently (§2.6, §7.0, §10).

    ``status`` is the HTTP status of an https-simple answer, or ``None`` on a tunnel (no HTTP
    layer); ``xml`` the ``<arms-message>`` document (a leading XML declaration is dropped), or
    b"" when there is none. A connection closed without any answer is a transport failure for
    the caller, not an answer. ``parsed``: ``xml`` already parsed by the tunnel session, which
    then is not parsed twice.
    """
    spec = _spec_for(operation)
    if status is not None and status != 200:
        if status == 401:
            return _failure(NO_RESULT_CODE, "authentication refused by the SA (401)")
        if status == 400:
            return _failure(NO_RESULT_CODE, "the SA refused the HTTP request (400 Bad Request)")
        return _failure(NO_RESULT_CODE, f"HTTP status {status} from the SA")
    xml = xml or b""
    if not xml.lstrip().startswith(b"<arms-message"):
        xml = extract_arms_xml(xml)
    if not xml.strip():
        if spec.name == "md-command":
            # The SA reports an application failure by sending no XML at all (§7.9).
            return _failure(codes.SA_FAILURE,
                            f"md-command failed on the SA ({_code_text(codes.SA_FAILURE)}: "
                            "empty answer)")
        return _failure(NO_RESULT_CODE, "the SA answered without an ARMS message")
    try:
        # Lenient: the device is the authority on what it writes; the hardened parse and the
        # model's value checks still apply, the XSD does not.
        message = parsed if parsed is not None else parse_message(xml, validate=False)
    except MessageError as e:
        return _failure(NO_RESULT_CODE, f"unreadable answer from the SA: {e}")
    if not isinstance(message, ArmsResponse):
        return _failure(NO_RESULT_CODE, f"the SA answered with a request ({message.type!r})")
    code = message.result_code
    common: dict[str, Any] = {"description": message.description}
    if message.type == "generic-error":
        return _failure(code, f"the SA answered generic-error {_code_text(code)}: "
                              f"{_CODE_HINTS.get(code, 'operation not recognised')}", **common)
    if message.type != spec.answer_type:
        return _failure(
            NO_RESULT_CODE,
            f"answer type {message.type!r} does not match the {spec.request_type!r} request "
            f"(result-code {code})",
            **common,
        )
    retryable = code in RETRYABLE_CODES
    hint = _CODE_HINTS.get(code)
    if spec.two_way:
        if code != codes.SUCCESS:
            # No done follows, even if a transaction-id was sent (§7.0.1 step 5).
            return _failure(code, f"{spec.request_type} refused: {_code_text(code)}"
                                  + (f" ({hint})" if hint else "") + "; no done will follow",
                            retryable=retryable, **common)
        if message.transaction_id is None:
            return _failure(code, f"{spec.request_type} answered {_code_text(code)} without a "
                                  "transaction-id", **common)
        return StartOutcome(result_code=code, transaction_id=message.transaction_id, **common)
    result = _one_way_result(spec.name, message) if codes.is_success(code) else {}
    if codes.is_success(code) and code != codes.COMMAND_EXECUTE_ERROR:
        return StartOutcome(result_code=code, result=result, **common)
    return _failure(code, f"{spec.name} failed: {_code_text(code)}"
                          + (f" ({hint})" if hint else ""),
                    result=result, retryable=retryable, **common)


def _one_way_result(operation: str, message: ArmsResponse) -> dict:
    body = message.body
    if operation in ("md-command", "dump-debug"):
        results = body.results if isinstance(body, MdResults) else []
        return {"results": [{"id": r.id, "data": r.data} for r in results]}
    if operation == "read-module-list":
        modules = body.modules if isinstance(body, ModuleList) else []
        return {"modules": [{"id": m.id, "version": m.version, "location": m.location}
                            for m in modules]}
    if operation == "check-transaction":
        ids = body.transaction_ids if isinstance(body, TransactionIds) else []
        # 0 stands for 1-way/pull transactions, the check-transaction itself included (§7.12).
        return {"transaction_ids": [tid for tid in ids if tid != 0]}
    return {}


# ---------------------------------------------------------------------------------------------
# Done-requests from the SA


class DoneError(ValueError):
    """A done-request that cannot be the done of this operation."""


@dataclass(slots=True)
class DoneOutcome:
    """``transaction_result`` is the SA's outcome (§6.5, §10); ``result`` the decoded body.

    configure: a second done for the same transaction may follow with 414 after a rollback
    (when the answer to the first one was not 1xx or could not be read); the later one wins.
    """

    transaction_result: int
    result: dict = field(default_factory=dict)


def decode_done(operation: str, message: ArmsRequest) -> DoneOutcome:
    """Decode the ``*-done`` request of a 2-way operation into its result struct."""
    spec = _spec_for(operation)
    if not spec.two_way:
        raise DoneError(f"{spec.name} is a 1-way operation: it has no done-request")
    if not isinstance(message, ArmsRequest) or message.type != spec.done_type:
        got = getattr(message, "type", type(message).__name__)
        raise DoneError(f"expected a {spec.done_type!r} request, got {got!r}")
    if message.transaction_result is None:
        raise DoneError(f"{spec.done_type} without <transaction-result>")
    body = message.body
    result: dict[str, Any] = {}
    if spec.name in ("read-status", "clear-status"):
        reports = body.status_reports if isinstance(body, StatusReports) else []
        result["status_reports"] = [
            {"id": r.id, "data": r.data} | ({} if r.result is None else {"result": r.result})
            for r in reports
        ]
    elif spec.name == "read-storage":
        configs = body.md_configs if isinstance(body, MdConfigs) else []
        result["md_configs"] = [{"id": m.id, "data": m.data} for m in configs]
    elif spec.name == "ping":
        if isinstance(body, PingDoneRequest):
            if body.success is not None:
                result["success"] = body.success
            if body.failure is not None:
                result["failure"] = body.failure
    elif spec.name == "traceroute":
        nodes = body.nodes if isinstance(body, TracerouteDoneRequest) else []
        result["hops"] = [{"hop": n.hop, "text": n.text} for n in nodes]
    return DoneOutcome(transaction_result=message.transaction_result, result=result)


def done_succeeded(operation: str, transaction_result: int) -> bool:
    """Did the operation succeed on the SA? configure 303 counts: activated, SA reboots."""
    spec = _spec_for(operation)
    if spec.name == "configure" and transaction_result == codes.MODULE_SYNCING:
        return True
    return codes.is_success(transaction_result)


def done_answer(
    done_type: str, transaction_id: int, result_code: int = 100, description: str | None = None
) -> bytes:
    """The answer to a done-request, as captured in simple/14-ping-done.response.txt.

    ``type`` must echo the request's exactly (the SA checks it, §6.5); ``transaction-id`` is
    required on tunnels and harmless otherwise. Description defaults to "OK" for 1xx.
    """
    if not isinstance(done_type, str) or not done_type.endswith("-done") or (
        done_type == "push-confirmation-done"
    ):
        raise ValueError(f"not the type of a done-request: {done_type!r}")
    if type(transaction_id) is not int or not 0 <= transaction_id <= INT32_MAX:
        raise ValueError(f"transaction id must be a 31-bit integer: {transaction_id!r}")
    if description is None:
        description = "OK" if codes.is_success(result_code) else codes.label(result_code)
    return serialise(
        ArmsResponse(
            type=done_type,
            result_code=result_code,
            description=description,
            transaction_id=transaction_id,
            body=Empty(),
            body_tag=f"{done_type}-response",
        )
    )


# ---------------------------------------------------------------------------------------------
# XML-RPC


def to_xmlrpc(value: Any) -> Any:
    """Make a result struct marshallable: bytes -> Binary, None dropped, big ints -> str.

    XML-RPC has no nil (without an extension) and only 32-bit ints; transaction ids are 31-bit
    but anything larger is passed as its decimal text rather than failing the whole result.
    """
    if value is None:
        raise TypeError("XML-RPC cannot carry None")
    if isinstance(value, bool | float | str | xmlrpc.client.Binary):
        return value
    if isinstance(value, int):
        return value if INT32_MIN <= value <= INT32_MAX else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return xmlrpc.client.Binary(bytes(value))
    if isinstance(value, dict):
        return {str(k): to_xmlrpc(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [to_xmlrpc(v) for v in value if v is not None]
    raise TypeError(f"cannot pass {type(value).__name__} over XML-RPC")
