"""The RS gate: the XML-RPC interface the RS calls (design.md §4, ``push.*`` and ``sa.*``).

``gate`` holds the methods (and their documentation, served by ``system.methodHelp``);
``server`` puts them behind a listener whose trust matches the endpoint (loopback, a
private unix socket, or TLS with required client certificates).
"""

from __future__ import annotations

from armsproxy.rs_gate.gate import (
    BAD_REQUEST,
    CONFLICT,
    GONE,
    INTERFACE_VERSION,
    INTERNAL_ERROR,
    NO_SUCH_METHOD,
    NOT_FOUND,
    RSGate,
)
from armsproxy.rs_gate.server import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY,
    RSGateService,
    make_rs_gate_site,
    rs_gate_service,
)

__all__ = [
    "BAD_REQUEST",
    "CONFLICT",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BODY",
    "GONE",
    "INTERFACE_VERSION",
    "INTERNAL_ERROR",
    "NOT_FOUND",
    "NO_SUCH_METHOD",
    "RSGate",
    "RSGateService",
    "make_rs_gate_site",
    "rs_gate_service",
]
