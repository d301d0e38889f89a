"""Durable state: operations and results, the SA registry, the RS event outbox.

The engine and the gates depend on :class:`Store` only; :class:`SQLiteStore` is the embedded
default, and another backend (PostgreSQL) is one more class with the same methods.
"""

from __future__ import annotations

from armsproxy.store.interface import Store
from armsproxy.store.model import (
    CANCELLED,
    EXPIRED,
    FAILED,
    FINAL,
    QUEUED,
    SENDING,
    STARTED,
    STATES,
    SUCCEEDED,
    Event,
    NewOperation,
    Operation,
    OrphanDone,
    SARecord,
    StoreError,
)
from armsproxy.store.sqlite import SQLiteStore

__all__ = [
    "CANCELLED",
    "EXPIRED",
    "FAILED",
    "FINAL",
    "QUEUED",
    "SENDING",
    "STARTED",
    "STATES",
    "SUCCEEDED",
    "Event",
    "NewOperation",
    "Operation",
    "OrphanDone",
    "SARecord",
    "SQLiteStore",
    "Store",
    "StoreError",
]
