"""Pushes from armsproxy to SAs (https-simple mode)."""

from __future__ import annotations

from armsproxy.push.client import (
    DEFAULT_MAX_ANSWER_BYTES,
    PushAnswer,
    PushError,
    PushNoAnswer,
    PushProtocolError,
    PushTimeout,
    PushTLSError,
    PushUnreachable,
    SAPushClient,
)

__all__ = [
    "DEFAULT_MAX_ANSWER_BYTES",
    "PushAnswer",
    "PushError",
    "PushNoAnswer",
    "PushProtocolError",
    "PushTLSError",
    "PushTimeout",
    "PushUnreachable",
    "SAPushClient",
]
