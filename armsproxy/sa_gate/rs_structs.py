"""RS XML-RPC structs (design.md §4) -> ARMS bodies.

The RS is trusted but not infallible: a struct of the wrong shape must become a clear error in
the log, never a half-built answer that would damage a device's configuration.
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..arms.messages import ConfigSolicitationResponse, HeartbeatInfo, MdConfig, Module


class RSAnswerError(ValueError):
    """The RS answered with a struct armsproxy cannot turn into a safe ARMS answer."""


def _get(struct: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         *, required: bool = False, default: Any = None) -> Any:
    if key not in struct:
        if required:
            raise RSAnswerError(f"{where}: missing {key!r}")
        return default
    value = struct[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RSAnswerError(f"{where}: {key!r} must be {_kind_name(kind)}, got {value!r:.60}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _list(struct: Mapping[str, Any], key: str, where: str) -> list[Any]:
    return list(_get(struct, key, (list, tuple), where, default=[]))


def _str_list(struct: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = _list(struct, key, where)
    for value in values:
        if not isinstance(value, str):
            raise RSAnswerError(f"{where}: {key!r} must hold strings, got {value!r:.60}")
    return values


def result_code(struct: Mapping[str, Any], where: str) -> int:
    return int(_get(struct, "result_code", int, where, default=100))


@dataclass(slots=True)
class PushMethodAnswer:
    methods: list[str]  # RS preference order; empty: the configured default
    tunnel_urls: list[str]  # empty: the configured tunnel URLs
    echo_interval: int | None  # None: the configured echo interval


def push_method_answer(struct: Mapping[str, Any]) -> PushMethodAnswer:
    where = "arms.push_method_query answer"
    echo = _get(struct, "echo_interval", int, where)
    if echo is not None and echo <= 0:
        raise RSAnswerError(f"{where}: 'echo_interval' must be positive, got {echo}")
    return PushMethodAnswer(
        methods=_str_list(struct, "methods", where),
        tunnel_urls=_str_list(struct, "tunnel_urls", where),
        echo_interval=echo,
    )


#: Every member of the ``arms.config_solicitation`` answer that armsproxy reads, and whether
#: it is required (missing: the device gets 301 and the reason is logged) or optional.
#: ``name[].member`` is a member of each struct in the list ``name``. "Required" includes the
#: device rules (armsproxy.arms.guard): at least one heartbeat, each with an interval > 0.
#: Other members are ignored. tests/test_docs.py checks this against the reader below (what
#: it reads, what it refuses without) and against the README's table.
CONFIG_SOLICITATION_MEMBERS: dict[str, bool] = {
    "result_code": False,  # default 100; outside 100-199 relayed as is, nothing else read
    "sa_certificate": False,
    "sa_private_key": False,
    "push_port": False,
    "push_timeout": False,
    "heartbeats": True,
    "heartbeats[].host": True,
    "heartbeats[].port": False,
    "heartbeats[].passphrase": True,
    "heartbeats[].interval": True,
    "heartbeats[].algorithms": False,
    "rs_push_server_addresses": False,
    "modules": False,
    "modules[].id": True,
    "modules[].version": False,
    "modules[].install_order": False,
    "modules[].location": False,
    "md_configs": False,
    "md_configs[].id": True,
    "md_configs[].content_type": False,
    "md_configs[].commit_order": False,
    "md_configs[].data": True,
    "proxy_urls": False,  # default: [sa_gate] public_urls
}


def config_solicitation_body(
    struct: Mapping[str, Any], default_proxy_urls: list[str]
) -> ConfigSolicitationResponse:
    where = "arms.config_solicitation answer"
    heartbeats = []
    for i, hb in enumerate(_list(struct, "heartbeats", where)):
        at = f"{where}: heartbeats[{i}]"
        if not isinstance(hb, Mapping):
            raise RSAnswerError(f"{at} must be a struct")
        heartbeats.append(HeartbeatInfo(
            host=_get(hb, "host", str, at, required=True),
            passphrase=_get(hb, "passphrase", str, at, required=True),
            port=_get(hb, "port", int, at),
            interval=_get(hb, "interval", int, at),
            algorithms=_str_list(hb, "algorithms", at),
        ))
    modules = []
    for i, mod in enumerate(_list(struct, "modules", where)):
        at = f"{where}: modules[{i}]"
        if not isinstance(mod, Mapping):
            raise RSAnswerError(f"{at} must be a struct")
        modules.append(Module(
            id=_get(mod, "id", int, at, required=True),
            version=_get(mod, "version", str, at, default=""),
            location=_get(mod, "location", str, at, default=""),
            install_order=_get(mod, "install_order", int, at),
        ))
    configs = [md_config(cfg, f"{where}: md_configs[{i}]")
               for i, cfg in enumerate(_list(struct, "md_configs", where))]
    proxy_urls = _str_list(struct, "proxy_urls", where) or list(default_proxy_urls)
    return ConfigSolicitationResponse(
        sa_certificate=_get(struct, "sa_certificate", str, where),
        sa_private_key=_get(struct, "sa_private_key", str, where),
        push_port=_get(struct, "push_port", int, where),
        push_timeout=_get(struct, "push_timeout", int, where),
        heartbeats=heartbeats,
        rs_push_server_addresses=_str_list(struct, "rs_push_server_addresses", where),
        rs_pull_server_urls=proxy_urls,
        modules=modules,
        md_configs=configs,
    )


def md_config(cfg: Any, at: str) -> MdConfig:
    if not isinstance(cfg, Mapping):
        raise RSAnswerError(f"{at} must be a struct")
    data = _get(cfg, "data", (str, bytes, xmlrpc.client.Binary), at, required=True)
    if isinstance(data, xmlrpc.client.Binary):
        data = data.data
    return MdConfig(
        id=_get(cfg, "id", int, at, required=True),
        data=data,
        content_type=_get(cfg, "content_type", str, at),
        commit_order=_get(cfg, "commit_order", int, at),
    )
