"""The https-tunnel server room (§9): tunnel sessions, their registry, the injected hooks.

Talks to ``arms`` only; ``push`` sends through :class:`Tunnel` objects found in the
:class:`TunnelRegistry`, and receives done-requests and confirmations through the
:class:`TunnelHooks` that tap.py injects (design.md §2).
"""

from __future__ import annotations

from .api import (
    Tunnel,
    TunnelAnswer,
    TunnelBusy,
    TunnelClosed,
    TunnelError,
    TunnelHooks,
    TunnelTimeout,
)
from .registry import MAX_TUNNELS_PER_SA, TunnelRegistry
from .session import TunnelLimits, TunnelSession, parse_basic_authorization

__all__ = [
    "MAX_TUNNELS_PER_SA",
    "Tunnel",
    "TunnelAnswer",
    "TunnelBusy",
    "TunnelClosed",
    "TunnelError",
    "TunnelHooks",
    "TunnelLimits",
    "TunnelRegistry",
    "TunnelSession",
    "TunnelTimeout",
    "parse_basic_authorization",
]
