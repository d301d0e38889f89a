"""XML-RPC client to the operator's RS and the SA key cache in front of it."""

from __future__ import annotations

from armsproxy.rs_client.client import (
    RSClient,
    RSError,
    RSFault,
    RSProtocolError,
    RSTimeout,
    RSUnavailable,
)
from armsproxy.rs_client.keycache import KeyCache, SAKeySource

__all__ = [
    "KeyCache",
    "RSClient",
    "RSError",
    "RSFault",
    "RSProtocolError",
    "RSTimeout",
    "RSUnavailable",
    "SAKeySource",
]
