"""The demo RS: the armsproxy→RS XML-RPC contract (design §4) backed by the demo SQLite DB.

It is both a working RS for trying armsproxy without a backend and the reference for the
shapes an operator's RS must return. Every method awaits the DB thread; nothing blocks the
reactor.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any, cast
from xmlrpc.client import Binary, DateTime

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server, xmlrpc

from armsproxy.arms.distid import is_distid
from armsproxy.demo_rs.db import Cursor, DemoDB, SAConfig, add_event
from armsproxy.limits import DeadlineSite

log = Logger()

RESULT_OK = 100
FAULT_BAD_PARAMS = 400
FAULT_UNKNOWN_DISTID = 404
DEFAULT_PUSH_PORT = 10443  # libarms' listener default (§2.5)
EVENTS_PAGE = 1000
# Seconds per call and idle gap; above the RS client's 60 s pool idle timeout, so that the
# client, not this server, closes an idle pooled connection.
REQUEST_TIMEOUT = 120.0
_PULL_FIELDS = ("trigger", "protocol_version", "firmware_info", "description", "peer")


def _unknown() -> xmlrpc.Fault:
    return xmlrpc.Fault(FAULT_UNKNOWN_DISTID, "unknown distribution id")


def _check_distid(distid: object) -> str:
    if not isinstance(distid, str):
        raise xmlrpc.Fault(FAULT_BAD_PARAMS, "distribution id must be a string")
    if not is_distid(distid):
        raise _unknown()  # a spelling the SA would never send cannot be registered either
    return distid


def _check_struct(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise xmlrpc.Fault(FAULT_BAD_PARAMS, f"{name} must be a struct")
    return value


def _json_default(value: object) -> object:
    if isinstance(value, Binary):
        return {"$binary": base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, DateTime):
        return {"$datetime": value.value}
    raise TypeError(f"cannot store {type(value).__name__} in an event")


def _json_hook(obj: dict[str, Any]) -> object:
    if obj.keys() == {"$binary"}:
        return Binary(base64.b64decode(obj["$binary"]))
    if obj.keys() == {"$datetime"}:
        return DateTime(obj["$datetime"])
    return obj


def event_to_json(event: dict[str, Any]) -> str:
    """Events keep XML-RPC Binary/DateTime values across the JSON column."""
    return json.dumps(event, default=_json_default, sort_keys=True)


def event_from_json(text: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(text, object_hook=_json_hook)
    return result


def config_answer(config: SAConfig, rs_push_server_addresses: Sequence[str] = ()) -> dict[str, Any]:
    """The ``arms.config_solicitation`` struct for one SA (no proxy_urls: armsproxy adds them)."""
    answer: dict[str, Any] = {"result_code": RESULT_OK}
    if config.sa_certificate and config.sa_private_key:
        answer["sa_certificate"] = config.sa_certificate
        answer["sa_private_key"] = config.sa_private_key
    answer["push_port"] = config.push_port if config.push_port is not None else DEFAULT_PUSH_PORT
    if config.push_timeout is not None:
        answer["push_timeout"] = config.push_timeout
    answer["heartbeats"] = [
        {
            "host": h.host,
            "port": h.port,
            "passphrase": h.passphrase,
            "interval": h.interval,
            "algorithms": [h.algorithm] if h.algorithm else [],
        }
        for h in config.heartbeats
    ]
    if rs_push_server_addresses:
        answer["rs_push_server_addresses"] = list(rs_push_server_addresses)
    answer["modules"] = [
        {"id": m.id, "version": m.version, "install_order": m.install_order, "location": m.location}
        for m in config.modules
    ]
    md_configs = []
    for c in config.md_configs:
        item: dict[str, Any] = {"id": c.id}
        if c.content_type is not None:
            item["content_type"] = c.content_type
        if c.commit_order is not None:
            item["commit_order"] = c.commit_order
        item["data"] = Binary(c.data) if c.is_binary else c.data.decode("ascii")
        md_configs.append(item)
    answer["md_configs"] = md_configs
    return answer


class DemoRS(xmlrpc.XMLRPC):
    """XML-RPC resource: ``arms.*`` (the RS side of our contract) and ``demo.*`` helpers."""

    def __init__(
        self,
        db: DemoDB,
        *,
        clock: IReactorTime | None = None,
        rs_push_server_addresses: Sequence[str] = (),
    ) -> None:
        super().__init__(allowNone=False, useDateTime=False)
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.db = db
        self.clock = clock
        self.rs_push_server_addresses = list(rs_push_server_addresses)
        self._procedures: dict[str, Callable[..., Any]] = {
            "arms.sa_key": self._wrap(self.sa_key),
            "arms.config_solicitation": self._wrap(self.config_solicitation),
            "arms.push_method_query": self._wrap(self.push_method_query),
            "arms.push_confirmation": self._wrap(self.push_confirmation),
            "arms.event": self._wrap(self.event),
            "arms.events": self._wrap(self.events_batch),
            "demo.events": self._wrap(self.events),
            "demo.list_sas": self._wrap(self.list_sas),
        }
        xmlrpc.addIntrospection(self)

    @staticmethod
    def _wrap(method: Callable[..., Any]) -> Callable[..., defer.Deferred[Any]]:
        def call(*args: Any) -> defer.Deferred[Any]:
            return defer.ensureDeferred(method(*args))

        return call

    def lookupProcedure(self, procedurePath: str) -> Callable[..., Any]:
        found = self._procedures.get(procedurePath)
        if found is not None:
            return found
        return super().lookupProcedure(procedurePath)  # system.* (introspection)

    def listProcedures(self) -> list[str]:
        return sorted(self._procedures)

    def _now(self) -> str:
        moment = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        return moment.isoformat(timespec="milliseconds")

    # -- arms.* --------------------------------------------------------------------------------

    async def sa_key(self, distid: object) -> str:
        key = await self.db.sa_key(_check_distid(distid))
        if key is None:
            raise _unknown()
        return key

    async def config_solicitation(self, distid: object, info: object) -> dict[str, Any]:
        distid = _check_distid(distid)
        info = _check_struct(info, "info")
        record = {"at": self._now()}
        record.update({k: info[k] for k in _PULL_FIELDS if isinstance(info.get(k), str)})
        config = await self.db.pull(distid, record)
        if config is None:
            raise _unknown()
        log.info(
            "config_solicitation {distid} trigger={trigger!r}",
            distid=distid,
            trigger=record.get("trigger"),
        )
        return config_answer(config, self.rs_push_server_addresses)

    async def push_method_query(self, distid: object, info: object) -> dict[str, Any]:
        distid = _check_distid(distid)
        offered = _check_struct(info, "info").get("methods")
        if not isinstance(offered, list) or not all(isinstance(m, str) for m in offered):
            raise xmlrpc.Fault(FAULT_BAD_PARAMS, "info.methods must be an array of strings")
        preference = await self.db.push_methods(distid)
        if preference is None:
            raise _unknown()
        # §6.3: answer only methods the SA offered, in the operator's order of preference.
        return {"result_code": RESULT_OK, "methods": [m for m in preference if m in offered]}

    async def push_confirmation(self, distid: object, info: object) -> dict[str, Any]:
        distid = _check_distid(distid)
        info = _check_struct(info, "info")
        if not isinstance(info.get("method"), str):
            raise xmlrpc.Fault(FAULT_BAD_PARAMS, "info.method must be a string")
        record = {"at": self._now()}
        record.update(
            {
                k: info[k]
                for k in ("method", "push_endpoint", "peer")
                if isinstance(info.get(k), str)
            }
        )
        if not await self.db.record_confirmation(distid, record):
            raise _unknown()
        log.info(
            "push_confirmation {distid} {method} {endpoint}",
            distid=distid,
            method=record["method"],
            endpoint=record.get("push_endpoint", "-"),
        )
        return {"result_code": RESULT_OK}

    async def event(self, event: object) -> bool:
        event = _check_struct(event, "event")
        try:
            text = event_to_json(event)
        except TypeError as e:
            raise xmlrpc.Fault(FAULT_BAD_PARAMS, str(e))
        seq = await self.db.add_event(self._now(), text)
        log.info("event #{seq} {kind}", seq=seq, kind=event.get("kind", event.get("type", "?")))
        return True

    async def events_batch(self, events: object) -> bool:
        """``arms.events``: several events, in order, stored in one transaction (all or none:
        a fault means armsproxy delivers them all again)."""
        if not isinstance(events, list):
            raise xmlrpc.Fault(FAULT_BAD_PARAMS, "events must be an array of structs")
        texts = []
        for i, event in enumerate(events):
            try:
                texts.append(event_to_json(_check_struct(event, f"events[{i}]")))
            except TypeError as e:
                raise xmlrpc.Fault(FAULT_BAD_PARAMS, f"events[{i}]: {e}")
        if not texts:
            return True
        now = self._now()

        def store_all(cur: Cursor) -> list[int]:
            return [add_event(cur, now, text) for text in texts]

        seqs = await self.db.run(store_all)
        log.info("events #{first}..#{last} ({n})", first=seqs[0], last=seqs[-1], n=len(seqs))
        return True

    # -- demo.* --------------------------------------------------------------------------------

    async def events(self, since_seq: object = 0) -> list[dict[str, Any]]:
        """Events after ``since_seq``, oldest first, at most EVENTS_PAGE per call."""
        if not isinstance(since_seq, int) or isinstance(since_seq, bool):
            raise xmlrpc.Fault(FAULT_BAD_PARAMS, "since_seq must be an int")
        stored = await self.db.events(since_seq, EVENTS_PAGE)
        return [
            {"seq": e.seq, "received_at": e.received_at, "event": event_from_json(e.json)}
            for e in stored
        ]

    async def list_sas(self) -> list[dict[str, Any]]:
        return await self.db.list_sas()


def make_demo_rs_site(
    db: DemoDB,
    *,
    clock: IReactorTime | None = None,
    rs_push_server_addresses: Sequence[str] = (),
    request_timeout: float = REQUEST_TIMEOUT,
) -> server.Site:
    """A Site serving the demo RS on every path (e.g. ``http://127.0.0.1:8790/RPC2``)."""
    resource = DemoRS(db, clock=clock, rs_push_server_addresses=rs_push_server_addresses)
    return _QuietSite(resource, request_timeout=request_timeout, listener_name="demo rs")


class _QuietSite(DeadlineSite):
    """The demo RS logs each call itself; no extra access-log line per XML-RPC request.

    A whole-request deadline (armsproxy.limits): the embedded default runs it in the proxy's
    process, whose descriptors devices need."""

    noisy = False

    def log(self, request: server.Request) -> None:
        pass
