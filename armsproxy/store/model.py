"""What the store keeps: operations, the SA registry, outbox events and orphan done-requests.

Plain dataclasses, free of any backend, so the engine and the RS gate never see SQL. JSON is
the storage format of every free-form field (params, results, payloads); bytes survive the trip
as ``{"__b64__": "..."}`` because ARMS md-configs and dumps are binary and JSON is not.
"""

from __future__ import annotations

import base64
import json
import os
import xmlrpc.client
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, overload

QUEUED = "queued"
SENDING = "sending"
STARTED = "started"
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"

STATES: frozenset[str] = frozenset(
    {QUEUED, SENDING, STARTED, SUCCEEDED, FAILED, EXPIRED, CANCELLED}
)
FINAL: frozenset[str] = frozenset({SUCCEEDED, FAILED, EXPIRED, CANCELLED})

_B64 = "__b64__"


class StoreError(Exception):
    """The store cannot be used as asked (e.g. a database written by a newer version)."""


def _encode_default(obj: object) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {_B64: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, xmlrpc.client.Binary):
        return {_B64: base64.b64encode(obj.data).decode("ascii")}
    raise TypeError(f"cannot store a value of type {type(obj).__name__} as JSON")


def _decode_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _B64 in obj and isinstance(obj[_B64], str):
        return base64.b64decode(obj[_B64])
    return obj


# Built once: json.dumps/json.loads with any option build a new encoder/decoder per call.
_ENCODER = json.JSONEncoder(
    default=_encode_default, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(object_hook=_decode_hook)
_PLAIN_DECODE = json.JSONDecoder().decode


def dump_json(value: Any) -> str:
    """JSON text for a column; bytes become ``{"__b64__": ...}``; anything else unknown raises."""
    if not value and type(value) is dict:
        return "{}"  # most orders' params
    return _ENCODER.encode(value)


def load_json(text: str | None) -> Any:
    """Inverse of :func:`dump_json` (``None`` stays ``None``)."""
    if text is None:
        return None
    if text == "{}":
        return {}
    # Only a text holding the marker can hold bytes: the rest skips the per-object hook.
    return _DECODER.decode(text) if _B64 in text else _PLAIN_DECODE(text)


_ID_BATCH = 64  # ids per os.urandom call
_id_pool: list[int] = []
os.register_at_fork(after_in_child=_id_pool.clear)  # a child never repeats its parent's ids


def new_operation_id() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` gives, for less:
    random bytes are read for many ids at once and no UUID object is built."""
    try:
        value = _id_pool.pop()  # atomic: two threads never get the same one
    except IndexError:
        data = os.urandom(16 * _ID_BATCH)
        _id_pool.extend(int.from_bytes(data[i:i + 16], "big") for i in range(16, len(data), 16))
        value = int.from_bytes(data[:16], "big")
    # RFC 4122: version 4 in bits 76-79, variant 10 in bits 62-63 (what uuid.UUID(version=4)
    # sets).
    value = (value & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    return f"{value:032x}"


class RawEntries(Sequence[dict[str, Any]]):
    """An operation's raw ARMS exchanges, kept as their stored JSON until first used.

    Why: the engine and ``push.status``/``push.list`` read operations all the time and never
    look at the exchanges; only ``push.result`` does. So a store hands the JSON texts over and
    they are decoded once, on first access. Compares equal to the list of entries.
    """

    __slots__ = ("_entries", "_texts")

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._texts: list[str] | None = list(texts)
        self._entries: list[dict[str, Any]] = []

    def _decoded(self) -> list[dict[str, Any]]:
        if self._texts is not None:
            self._entries = [load_json(text) for text in self._texts]
            self._texts = None
        return self._entries

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self._decoded()[index]

    def __len__(self) -> int:
        return len(self._entries if self._texts is None else self._texts)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._decoded())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RawEntries | list):
            return len(self) == len(other) and self._decoded() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable contents, like a list

    def __repr__(self) -> str:
        return repr(self._decoded())


@dataclass(slots=True)
class Operation:
    """One push order and everything learnt while carrying it out (design §5)."""

    operation_id: str
    request_id: str | None
    distribution_id: str
    operation: str
    params: dict[str, Any]
    sa_url: str | None
    method: str | None
    state: str
    attempts: int
    created_at: float
    updated_at: float
    not_before: float
    expires_at: float | None
    done_deadline: float | None
    sa_transaction_id: int | None
    start_result_code: int | None
    transaction_result: int | None
    result_code: int | None
    last_error: str | None
    result: dict[str, Any] | None
    # The ARMS exchanges, oldest first (a list, or the store's lazily decoded RawEntries).
    raw: Sequence[dict[str, Any]] = field(default_factory=list)
    forgotten: bool = False
    # What a queued order waits for (its SA is not reachable yet), in words; None otherwise.
    # Such an order is not dispatched until its SA becomes reachable (release_waiting).
    waiting_for: str | None = None
    # The instance (armsproxy process) whose claim moved it to ``sending``; kept after, so a
    # survivor knows what an instance that died left behind (``take_over``). None: claimed
    # with no instance id (a store of one process), or never claimed.
    claimed_by: str | None = None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL


@dataclass(slots=True, kw_only=True)
class NewOperation:
    """An accepted order as ``submit`` takes it; the store assigns id, state and timestamps.

    ``created_at`` ``None`` means "now" by the store's clock.
    """

    request_id: str | None = None
    distribution_id: str
    operation: str
    params: dict[str, Any] = field(default_factory=dict)
    sa_url: str | None = None
    method: str | None = None
    expires_at: float | None = None
    created_at: float | None = None


@dataclass(slots=True)
class SARecord:
    """What armsproxy knows of one SA: how to reach it and when it last spoke."""

    distribution_id: str
    push_method: str | None = None
    push_endpoint: str | None = None
    sa_certificate: str | None = None
    last_pull_at: float | None = None
    last_confirmation_at: float | None = None
    confirmed: bool = False
    last_peer: str | None = None
    tunnels: list[dict[str, Any]] = field(default_factory=list)
    updated_at: float = 0.0
    # The instance holding the SA's live tunnel (None: none): only it may claim the SA's
    # orders, since only it can send them (an order naming sa_url or https-simple excepted).
    tunnel_owner: str | None = None


@dataclass(slots=True)
class Event:
    """An ``arms.event`` waiting in the outbox for delivery to the RS."""

    seq: int
    kind: str
    operation_id: str | None
    distribution_id: str
    payload: dict[str, Any]
    created_at: float
    attempts: int


@dataclass(slots=True)
class OrphanDone:
    """A done-request that could not yet be matched to an operation (§7.0.3, §7.0.4).

    ``xml`` is "" when it was too large to keep (bounded storage); ``size`` says how large
    it was (0: stored before sizes were recorded).
    """

    distribution_id: str
    sa_transaction_id: int
    type: str
    xml: str
    received_at: float
    seq: int
    size: int = 0


#: Every stored column of an operation, in the dataclass's order (``raw`` lives apart).
OPERATION_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in fields(Operation) if f.name != "raw"
)
# Fields ``transition``/``update`` may change; ids, state, raw and forgotten have their own paths.
MUTABLE_FIELDS: frozenset[str] = frozenset(OPERATION_COLUMNS) - {
    "operation_id", "request_id", "distribution_id", "state", "forgotten", "claimed_by",
}

SA_FIELDS: frozenset[str] = frozenset(
    {
        "push_method",
        "push_endpoint",
        "sa_certificate",
        "last_pull_at",
        "last_confirmation_at",
        "confirmed",
        "last_peer",
        "tunnels",
        "updated_at",
        "tunnel_owner",
    }
)


def check_fields(changes: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    """Refuse a change to a field the store does not let callers set (both backends)."""
    bad = sorted(set(changes) - allowed)
    if bad:
        raise ValueError(f"cannot change {what} field(s) {', '.join(bad)}")


JSON_OP_FIELDS = frozenset({"params", "result"})


def op_value(name: str, value: Any) -> Any:
    """An operation field as a backend stores it: the JSON fields as text."""
    return dump_json(value) if name in JSON_OP_FIELDS and value is not None else value
