"""The ARMS message model: envelopes, body types, and their XML form (§3, §6, §7).

One dataclass per body shape; each knows how to read itself from an lxml element and how to
write itself into one. Element order on output follows the captures of a real device
exchange (``tests/vectors``), which is what libarms is known to accept.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from lxml import etree

Element = etree._Element

_INT_RE = re.compile(r"-?[0-9]+\Z")
_B64_JUNK = re.compile(r"[\r\n]")


class DecodeError(ValueError):
    """A structurally valid document whose values cannot be used."""


def _int(text: str | None, where: str) -> int:
    if text is None or not _INT_RE.match(text):
        raise DecodeError(f"{where}: expected an integer without whitespace, got {text!r}")
    return int(text)


# The first child named ``tag`` (what ``el.find(tag)`` gives for a plain name): lxml matches
# the name in C instead of going through ElementPath, half the time; every message armsproxy
# decodes (each pull) looks up a dozen children.
def _child(el: Element, tag: str) -> Element | None:
    return next(el.iterchildren(tag), None)


def _opt_int(el: Element, tag: str) -> int | None:
    child = _child(el, tag)
    return None if child is None else _int(child.text, tag)


def _opt_text(el: Element, tag: str) -> str | None:
    child = _child(el, tag)
    return None if child is None else (child.text or "")


def _texts(el: Element, tag: str) -> list[str]:
    return [c.text or "" for c in el.iterchildren(tag)]


def _attr_int(el: Element, name: str) -> int | None:
    value = el.get(name)
    if value is None:
        return None
    # libarms parses ids as unsigned decimal, or 0x-prefixed hex if decimal fails (§3.1).
    if value.lower().startswith("0x"):
        try:
            return int(value, 16)
        except ValueError as e:
            raise DecodeError(f"{el.tag}/@{name}: bad number {value!r}") from e
    return _int(value, f"{el.tag}/@{name}")


def _payload(el: Element) -> str | bytes:
    """Text, or bytes when the element says ``encoding="base64"`` (§3.5)."""
    text = el.text or ""
    if el.get("encoding") == "base64":
        try:
            return base64.b64decode(_B64_JUNK.sub("", text), validate=True)
        except (binascii.Error, ValueError) as e:
            raise DecodeError(f"{el.tag}: invalid base64 ({e})") from e
    return text


def _set_payload(el: Element, data: str | bytes) -> None:
    if isinstance(data, bytes):
        el.set("encoding", "base64")
        el.text = base64.b64encode(data).decode("ascii")
    else:
        el.text = data


_SubElement = etree.SubElement


# Every answer armsproxy sends is built here, a dozen or more elements each (each pull): the
# SubElement bound once, and str() only for what is not a str already.
def _sub(parent: Element, tag: str, text: str | int | None = None) -> Element:
    child = _SubElement(parent, tag)
    if text is not None:
        child.text = text if type(text) is str else str(text)
    return child


def _opt_sub(parent: Element, tag: str, value: str | int | None) -> None:
    if value is not None:
        child = _SubElement(parent, tag)
        child.text = value if type(value) is str else str(value)


# ---------------------------------------------------------------------------------------------
# Items: elements with attributes and text.


@dataclass(slots=True)
class Module:
    id: int
    version: str
    location: str
    install_order: int | None = None

    @classmethod
    def from_xml(cls, el: Element) -> Module:
        return cls(
            id=_attr_int(el, "id") or 0,
            version=el.get("version") or "",
            location=el.text or "",
            install_order=_attr_int(el, "install-order"),
        )

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "module")
        el.set("id", str(self.id))
        el.set("version", self.version)
        if self.install_order is not None:
            el.set("install-order", str(self.install_order))
        el.text = self.location


@dataclass(slots=True)
class MdConfig:
    """A module's configuration; ``data`` as bytes travels base64-encoded."""

    id: int
    data: str | bytes
    content_type: str | None = None
    commit_order: int | None = None

    @classmethod
    def from_xml(cls, el: Element) -> MdConfig:
        return cls(
            id=_attr_int(el, "id") or 0,
            data=_payload(el),
            content_type=el.get("content-type"),
            commit_order=_attr_int(el, "commit-order"),
        )

    def to_xml(self, parent: Element, *, with_content_type: bool = True) -> None:
        el = _sub(parent, "md-config")
        el.set("id", str(self.id))
        # content-type breaks md-config inside configure-start-request (§3.1 whitelist).
        if with_content_type and self.content_type is not None:
            el.set("content-type", self.content_type)
        if self.commit_order is not None:
            el.set("commit-order", str(self.commit_order))
        _set_payload(el, self.data)


@dataclass(slots=True)
class StatusRequest:
    id: int
    param: str | bytes

    @classmethod
    def from_xml(cls, el: Element) -> StatusRequest:
        return cls(id=_attr_int(el, "id") or 0, param=_payload(el))

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "status-request")
        el.set("id", str(self.id))
        _set_payload(el, self.param)


@dataclass(slots=True)
class StatusReport:
    id: int
    result: int | None
    data: str | bytes

    @classmethod
    def from_xml(cls, el: Element) -> StatusReport:
        return cls(id=_attr_int(el, "id") or 0, result=_attr_int(el, "result"), data=_payload(el))

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "status-report")
        el.set("id", str(self.id))
        if isinstance(self.data, bytes):
            el.set("encoding", "base64")
        if self.result is not None:
            el.set("result", str(self.result))
        el.text = (
            base64.b64encode(self.data).decode("ascii")
            if isinstance(self.data, bytes)
            else self.data
        )


@dataclass(slots=True)
class MdCommand:
    id: int
    command: str | bytes

    @classmethod
    def from_xml(cls, el: Element) -> MdCommand:
        return cls(id=_attr_int(el, "id") or 0, command=_payload(el))

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "md-command")
        el.set("id", str(self.id))
        _set_payload(el, self.command)


@dataclass(slots=True)
class MdResult:
    id: int
    data: str | bytes

    @classmethod
    def from_xml(cls, el: Element) -> MdResult:
        return cls(id=_attr_int(el, "id") or 0, data=_payload(el))

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "md-result")
        el.set("id", str(self.id))
        _set_payload(el, self.data)


@dataclass(slots=True)
class NodeInfo:
    hop: int
    text: str

    @classmethod
    def from_xml(cls, el: Element) -> NodeInfo:
        return cls(hop=_attr_int(el, "hop") or 0, text=el.text or "")

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "nodeinfo", self.text)
        el.set("hop", str(self.hop))


@dataclass(slots=True)
class HeartbeatInfo:
    host: str
    passphrase: str
    port: int | None = None
    interval: int | None = None
    algorithms: list[str] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> HeartbeatInfo:
        return cls(
            host=_opt_text(el, "host") or "",
            passphrase=_opt_text(el, "passphrase") or "",
            port=_opt_int(el, "port"),
            interval=_opt_int(el, "interval"),
            algorithms=_texts(el, "algorithm"),
        )

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "heartbeat-info")
        _sub(el, "host", self.host)
        _opt_sub(el, "port", self.port)
        _sub(el, "passphrase", self.passphrase)
        _opt_sub(el, "interval", self.interval)
        for algorithm in self.algorithms:
            _sub(el, "algorithm", algorithm)


@dataclass(slots=True)
class RsInfo:
    url: str
    md_config: str | None = None

    @classmethod
    def from_xml(cls, el: Element) -> RsInfo:
        return cls(url=_opt_text(el, "url") or "", md_config=_opt_text(el, "md-config"))

    def to_xml(self, parent: Element) -> None:
        el = _sub(parent, "rs-info")
        _sub(el, "url", self.url)
        _opt_sub(el, "md-config", self.md_config)


# ---------------------------------------------------------------------------------------------
# Bodies. ``TAGS`` lists the body element names a class reads.

B = TypeVar("B", bound="Body")


class Body:
    TAGS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_xml(cls: type[B], el: Element) -> B:
        raise NotImplementedError

    def fill(self, el: Element) -> None:
        raise NotImplementedError


@dataclass(slots=True)
class Empty(Body):
    """A body the SA reads nothing from (or that carries nothing)."""

    TAGS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_xml(cls, el: Element) -> Empty:
        return cls()

    def fill(self, el: Element) -> None:
        el.text = ""  # written as <x></x>, as in the captures


@dataclass(slots=True)
class RsSolicitationRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("rs-solicitation-request",)
    trigger: str = ""

    @classmethod
    def from_xml(cls, el: Element) -> RsSolicitationRequest:
        return cls(trigger=_opt_text(el, "trigger") or "")

    def fill(self, el: Element) -> None:
        _sub(el, "trigger", self.trigger)


@dataclass(slots=True)
class RsSolicitationResponse(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("rs-solicitation-response",)
    rs_preshared_key: str | None = None
    ll_timeout: int | None = None
    rs_retry_max: int | None = None
    rs_retry_interval: int | None = None
    lifetime: int | None = None
    rs_infos: list[RsInfo] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> RsSolicitationResponse:
        return cls(
            rs_preshared_key=_opt_text(el, "rs-preshared-key"),
            ll_timeout=_opt_int(el, "ll-timeout"),
            rs_retry_max=_opt_int(el, "rs-retry-max"),
            rs_retry_interval=_opt_int(el, "rs-retry-interval"),
            lifetime=_opt_int(el, "lifetime"),
            rs_infos=[RsInfo.from_xml(c) for c in el.findall("rs-info")],
        )

    def fill(self, el: Element) -> None:
        _opt_sub(el, "rs-preshared-key", self.rs_preshared_key)
        _opt_sub(el, "ll-timeout", self.ll_timeout)
        _opt_sub(el, "rs-retry-max", self.rs_retry_max)
        _opt_sub(el, "rs-retry-interval", self.rs_retry_interval)
        _opt_sub(el, "lifetime", self.lifetime)
        for info in self.rs_infos:
            info.to_xml(el)


@dataclass(slots=True)
class ConfigSolicitationRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("config-solicitation-request",)
    protocol_version: str = "4.0"
    trigger: str = ""
    firmware_info: str | None = None

    @classmethod
    def from_xml(cls, el: Element) -> ConfigSolicitationRequest:
        return cls(
            protocol_version=_opt_text(el, "protocol-version") or "",
            trigger=_opt_text(el, "trigger") or "",
            firmware_info=_opt_text(el, "firmware-info"),
        )

    def fill(self, el: Element) -> None:
        _sub(el, "protocol-version", self.protocol_version)
        _sub(el, "trigger", self.trigger)
        _opt_sub(el, "firmware-info", self.firmware_info)


@dataclass(slots=True)
class ConfigSolicitationResponse(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("config-solicitation-response",)
    sa_certificate: str | None = None
    sa_private_key: str | None = None
    push_port: int | None = None
    push_timeout: int | None = None
    heartbeats: list[HeartbeatInfo] = field(default_factory=list)
    rs_push_server_addresses: list[str] = field(default_factory=list)
    rs_pull_server_urls: list[str] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)
    md_configs: list[MdConfig] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> ConfigSolicitationResponse:
        proposal = el.find("proposal-for-sa")
        return cls(
            sa_certificate=_opt_text(el, "sa-certificate"),
            sa_private_key=_opt_text(el, "sa-private-key"),
            push_port=None if proposal is None else _opt_int(proposal, "push-port"),
            push_timeout=None if proposal is None else _opt_int(proposal, "push-timeout"),
            heartbeats=[HeartbeatInfo.from_xml(c) for c in el.findall("heartbeat-info")],
            rs_push_server_addresses=_texts(el, "rs-push-server-address"),
            rs_pull_server_urls=_texts(el, "rs-pull-server-url"),
            modules=[Module.from_xml(c) for c in el.findall("module")],
            md_configs=[MdConfig.from_xml(c) for c in el.findall("md-config")],
        )

    def fill(self, el: Element) -> None:
        _opt_sub(el, "sa-certificate", self.sa_certificate)
        _opt_sub(el, "sa-private-key", self.sa_private_key)
        if self.push_port is not None or self.push_timeout is not None:
            proposal = _sub(el, "proposal-for-sa")
            _opt_sub(proposal, "push-port", self.push_port)
            _opt_sub(proposal, "push-timeout", self.push_timeout)
        for heartbeat in self.heartbeats:
            heartbeat.to_xml(el)
        for address in self.rs_push_server_addresses:
            _sub(el, "rs-push-server-address", address)
        for url in self.rs_pull_server_urls:
            _sub(el, "rs-pull-server-url", url)
        # All modules before the first md-config, or the device removes modules (§6.2).
        for module in self.modules:
            module.to_xml(el)
        for config in self.md_configs:
            config.to_xml(el)


@dataclass(slots=True)
class PushMethodQueryRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("push-method-query-request",)
    methods: list[str] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> PushMethodQueryRequest:
        return cls(methods=_texts(el, "push-method"))

    def fill(self, el: Element) -> None:
        for method in self.methods:
            _sub(el, "push-method", method)


@dataclass(slots=True)
class PushMethodQueryResponse(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("push-method-query-response",)
    methods: list[str] = field(default_factory=list)
    tunnel_urls: list[str] = field(default_factory=list)
    echo_interval: int | None = None

    @classmethod
    def from_xml(cls, el: Element) -> PushMethodQueryResponse:
        return cls(
            methods=_texts(el, "push-method"),
            tunnel_urls=_texts(el, "https-tunnel-url"),
            echo_interval=_opt_int(el, "https-tunnel-echo-interval"),
        )

    def fill(self, el: Element) -> None:
        for method in self.methods:
            _sub(el, "push-method", method)
        for url in self.tunnel_urls:
            _sub(el, "https-tunnel-url", url)
        _opt_sub(el, "https-tunnel-echo-interval", self.echo_interval)


@dataclass(slots=True)
class PushConfirmationStartRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("push-confirmation-start-request",)
    push_method: str = ""
    push_endpoint: str | None = None

    @classmethod
    def from_xml(cls, el: Element) -> PushConfirmationStartRequest:
        return cls(
            push_method=_opt_text(el, "push-method") or "",
            push_endpoint=_opt_text(el, "push-endpoint"),
        )

    def fill(self, el: Element) -> None:
        _sub(el, "push-method", self.push_method)
        _opt_sub(el, "push-endpoint", self.push_endpoint)


@dataclass(slots=True)
class ConfigureStartRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("configure-start-request",)
    modules: list[Module] = field(default_factory=list)
    md_configs: list[MdConfig] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> ConfigureStartRequest:
        return cls(
            modules=[Module.from_xml(c) for c in el.findall("module")],
            md_configs=[MdConfig.from_xml(c) for c in el.findall("md-config")],
        )

    def fill(self, el: Element) -> None:
        for module in self.modules:
            module.to_xml(el)
        for config in self.md_configs:
            config.to_xml(el, with_content_type=False)


@dataclass(slots=True)
class StatusRequests(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("read-status-start-request", "clear-status-start-request")
    status_requests: list[StatusRequest] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> StatusRequests:
        items = el.findall("status-request")
        return cls(status_requests=[StatusRequest.from_xml(c) for c in items])

    def fill(self, el: Element) -> None:
        for item in self.status_requests:
            item.to_xml(el)


@dataclass(slots=True)
class StatusReports(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("read-status-done-request", "clear-status-done-request")
    status_reports: list[StatusReport] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> StatusReports:
        return cls(status_reports=[StatusReport.from_xml(c) for c in el.findall("status-report")])

    def fill(self, el: Element) -> None:
        for item in self.status_reports:
            item.to_xml(el)


@dataclass(slots=True)
class ReadStorageStartRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("read-storage-start-request",)
    storage: str | None = None

    @classmethod
    def from_xml(cls, el: Element) -> ReadStorageStartRequest:
        return cls(storage=_opt_text(el, "storage"))

    def fill(self, el: Element) -> None:
        _opt_sub(el, "storage", self.storage)


@dataclass(slots=True)
class MdConfigs(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("read-storage-done-request",)
    md_configs: list[MdConfig] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> MdConfigs:
        return cls(md_configs=[MdConfig.from_xml(c) for c in el.findall("md-config")])

    def fill(self, el: Element) -> None:
        for config in self.md_configs:
            config.to_xml(el, with_content_type=False)


@dataclass(slots=True)
class PingStartRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("ping-start-request",)
    address: str | None = None
    count: int | None = None
    size: int | None = None

    @classmethod
    def from_xml(cls, el: Element) -> PingStartRequest:
        return cls(
            address=_opt_text(el, "address"),
            count=_opt_int(el, "count"),
            size=_opt_int(el, "size"),
        )

    def fill(self, el: Element) -> None:
        _opt_sub(el, "address", self.address)
        _opt_sub(el, "count", self.count)
        _opt_sub(el, "size", self.size)


@dataclass(slots=True)
class PingDoneRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("ping-done-request",)
    success: int | None = None
    failure: int | None = None

    @classmethod
    def from_xml(cls, el: Element) -> PingDoneRequest:
        return cls(success=_opt_int(el, "success"), failure=_opt_int(el, "failure"))

    def fill(self, el: Element) -> None:
        _opt_sub(el, "success", self.success)
        _opt_sub(el, "failure", self.failure)


@dataclass(slots=True)
class TracerouteStartRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("traceroute-start-request",)
    address: str | None = None
    count: int | None = None
    max_hop: int | None = None

    @classmethod
    def from_xml(cls, el: Element) -> TracerouteStartRequest:
        return cls(
            address=_opt_text(el, "address"),
            count=_opt_int(el, "count"),
            max_hop=_opt_int(el, "max-hop"),
        )

    def fill(self, el: Element) -> None:
        _opt_sub(el, "address", self.address)
        _opt_sub(el, "count", self.count)
        _opt_sub(el, "max-hop", self.max_hop)


@dataclass(slots=True)
class TracerouteDoneRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("traceroute-done-request",)
    nodes: list[NodeInfo] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> TracerouteDoneRequest:
        return cls(nodes=[NodeInfo.from_xml(c) for c in el.findall("nodeinfo")])

    def fill(self, el: Element) -> None:
        for node in self.nodes:
            node.to_xml(el)


@dataclass(slots=True)
class MdCommandRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("md-command-request",)
    commands: list[MdCommand] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> MdCommandRequest:
        return cls(commands=[MdCommand.from_xml(c) for c in el.findall("md-command")])

    def fill(self, el: Element) -> None:
        for command in self.commands:
            command.to_xml(el)


@dataclass(slots=True)
class MdResults(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("md-command-response", "dump-debug-response")
    results: list[MdResult] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> MdResults:
        return cls(results=[MdResult.from_xml(c) for c in el.findall("md-result")])

    def fill(self, el: Element) -> None:
        for result in self.results:
            result.to_xml(el)


@dataclass(slots=True)
class ModuleList(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("read-module-list-response",)
    modules: list[Module] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> ModuleList:
        return cls(modules=[Module.from_xml(c) for c in el.findall("module")])

    def fill(self, el: Element) -> None:
        for module in self.modules:
            module.to_xml(el)


@dataclass(slots=True)
class TransactionIds(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("check-transaction-response",)
    transaction_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_xml(cls, el: Element) -> TransactionIds:
        return cls(
            transaction_ids=[_int(c.text, "transaction-id") for c in el.findall("transaction-id")]
        )

    def fill(self, el: Element) -> None:
        for tid in self.transaction_ids:
            _sub(el, "transaction-id", tid)


@dataclass(slots=True)
class PullConfigRequest(Body):
    TAGS: ClassVar[tuple[str, ...]] = ("pull-config-request",)
    type: str | None = None

    @classmethod
    def from_xml(cls, el: Element) -> PullConfigRequest:
        return cls(type=_opt_text(el, "type"))

    def fill(self, el: Element) -> None:
        _opt_sub(el, "type", self.type)


@dataclass(slots=True)
class PushReadyRequest(Body):
    """Obsolete (§6.6): never sent by libarms 5.33; parsed for completeness."""

    TAGS: ClassVar[tuple[str, ...]] = ("push-ready-request",)
    push_endpoint: str | None = None

    @classmethod
    def from_xml(cls, el: Element) -> PushReadyRequest:
        return cls(push_endpoint=_opt_text(el, "push-endpoint"))

    def fill(self, el: Element) -> None:
        _opt_sub(el, "push-endpoint", self.push_endpoint)


BODY_CLASSES: dict[str, type[Body]] = {
    tag: cls
    for cls in (
        RsSolicitationRequest,
        RsSolicitationResponse,
        ConfigSolicitationRequest,
        ConfigSolicitationResponse,
        PushMethodQueryRequest,
        PushMethodQueryResponse,
        PushConfirmationStartRequest,
        ConfigureStartRequest,
        StatusRequests,
        StatusReports,
        ReadStorageStartRequest,
        MdConfigs,
        PingStartRequest,
        PingDoneRequest,
        TracerouteStartRequest,
        TracerouteDoneRequest,
        MdCommandRequest,
        MdResults,
        ModuleList,
        TransactionIds,
        PullConfigRequest,
        PushReadyRequest,
    )
    for tag in cls.TAGS
}


def decode_body(el: Element | None) -> Body | None:
    if el is None:
        return None
    cls = BODY_CLASSES.get(el.tag, Empty)
    return cls.from_xml(el)


# ---------------------------------------------------------------------------------------------
# Envelopes.


def base_type(type_: str) -> str:
    """``read-status-start`` -> ``read-status``; the SA treats the suffixes as synonyms (§3.4)."""
    for suffix in ("-start", "-done"):
        if type_.endswith(suffix):
            return type_[: -len(suffix)]
    return type_


def is_done_type(type_: str) -> bool:
    return type_.endswith("-done") and type_ != "push-confirmation-done"


@dataclass(slots=True)
class ArmsRequest:
    type: str
    distribution_id: str | None = None
    body: Body | None = None
    body_tag: str | None = None
    transaction_id: int | None = None
    transaction_result: int | None = None
    result_url: str | None = None
    description: str | None = None

    def to_element(self) -> Element:
        root = etree.Element("arms-message")
        req = _sub(root, "arms-request")
        req.set("type", self.type)
        _opt_sub(req, "transaction-result", self.transaction_result)
        _opt_sub(req, "distribution-id", self.distribution_id)
        _opt_sub(req, "transaction-id", self.transaction_id)
        _opt_sub(req, "result-url", self.result_url)
        _opt_sub(req, "description", self.description)
        if self.body is not None:
            tag = self.body_tag or f"{self.type}-request"
            self.body.fill(_sub(req, tag))
        return root


@dataclass(slots=True)
class ArmsResponse:
    type: str
    result_code: int
    body: Body | None = None
    body_tag: str | None = None
    description: str | None = None
    transaction_id: int | None = None

    def to_element(self) -> Element:
        # Order of the captured server answers: result-code, description, transaction-id, body.
        root = etree.Element("arms-message")
        resp = _sub(root, "arms-response")
        resp.set("type", self.type)
        _sub(resp, "result-code", self.result_code)
        _opt_sub(resp, "description", self.description)
        _opt_sub(resp, "transaction-id", self.transaction_id)
        if self.body is not None:
            tag = self.body_tag or f"{self.type}-response"
            self.body.fill(_sub(resp, tag))
        return root


ArmsMessage = ArmsRequest | ArmsResponse

_REQUEST_HEAD = {"transaction-result", "distribution-id", "transaction-id", "result-url",
                 "description"}
_RESPONSE_HEAD = {"transaction-id", "result-code", "description", "result-description",
                  "error-reason"}


def _body_element(parent: Element, head: set[str]) -> Element | None:
    for child in parent:
        if isinstance(child.tag, str) and child.tag not in head:
            return child
    return None


def decode_element(root: Element) -> ArmsMessage:
    """Turn a parsed (and schema-valid) ``arms-message`` into the model."""
    if root.tag != "arms-message" or len(root) != 1:
        raise DecodeError("expected <arms-message> holding one arms-request or arms-response")
    inner = root[0]
    type_ = inner.get("type")
    if not type_:
        raise DecodeError(f"<{inner.tag}> without a type attribute")
    if inner.tag == "arms-request":
        body_el = _body_element(inner, _REQUEST_HEAD)
        return ArmsRequest(
            type=type_,
            distribution_id=_opt_text(inner, "distribution-id"),
            body=decode_body(body_el),
            body_tag=None if body_el is None else body_el.tag,
            transaction_id=_opt_int(inner, "transaction-id"),
            transaction_result=_opt_int(inner, "transaction-result"),
            result_url=_opt_text(inner, "result-url"),
            description=_opt_text(inner, "description"),
        )
    if inner.tag == "arms-response":
        body_el = _body_element(inner, _RESPONSE_HEAD)
        code = _opt_int(inner, "result-code")
        if code is None:
            raise DecodeError("<arms-response> without result-code")
        return ArmsResponse(
            type=type_,
            result_code=code,
            body=decode_body(body_el),
            body_tag=None if body_el is None else body_el.tag,
            description=_opt_text(inner, "description"),
            transaction_id=_opt_int(inner, "transaction-id"),
        )
    raise DecodeError(f"unexpected <{inner.tag}> inside <arms-message>")
