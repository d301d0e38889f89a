"""Versioned SQLite schema: ``PRAGMA user_version`` says how many steps a database has had.

Each step moves the schema from version i to i + 1 in its own transaction, so a crash during an
upgrade leaves the database at a whole version. Never edit a released step; append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from armsproxy.store.model import StoreError

Step = Sequence[str] | Callable[[sqlite3.Connection], None]

_STATES_SQL = "'queued','sending','started','succeeded','failed','expired','cancelled'"
FINAL_SQL = "'succeeded','failed','expired','cancelled'"

MIGRATIONS: list[Step] = [
    # 1: operations with their raw ARMS exchanges, the SA registry and the event outbox.
    (
        f"""CREATE TABLE operations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            operation_id TEXT NOT NULL UNIQUE,
            request_id TEXT UNIQUE,
            distribution_id TEXT NOT NULL,
            operation TEXT NOT NULL,
            params TEXT NOT NULL,
            sa_url TEXT,
            method TEXT,
            state TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            not_before REAL NOT NULL,
            expires_at REAL,
            sa_transaction_id INTEGER,
            start_result_code INTEGER,
            transaction_result INTEGER,
            result_code INTEGER,
            last_error TEXT,
            result TEXT,
            forgotten INTEGER NOT NULL DEFAULT 0
        )""",
        # Per-SA queue heads (next_dispatchable) and state scans (in_states).
        "CREATE INDEX operations_state_sa ON operations(state, distribution_id, seq)",
        "CREATE INDEX operations_created ON operations(created_at)",
        "CREATE INDEX operations_sa_created ON operations(distribution_id, created_at)",
        """CREATE INDEX operations_sa_txn ON operations(distribution_id, sa_transaction_id)
            WHERE sa_transaction_id IS NOT NULL""",
        f"""CREATE INDEX operations_purge ON operations(updated_at)
            WHERE forgotten = 0 AND state IN ({FINAL_SQL})""",
        """CREATE TABLE operation_raw (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            op_seq INTEGER NOT NULL REFERENCES operations(seq) ON DELETE CASCADE,
            entry TEXT NOT NULL
        )""",
        "CREATE INDEX operation_raw_op ON operation_raw(op_seq, id)",
        """CREATE TABLE sa_registry (
            distribution_id TEXT PRIMARY KEY,
            push_method TEXT,
            push_endpoint TEXT,
            sa_certificate TEXT,
            last_pull_at REAL,
            last_confirmation_at REAL,
            confirmed INTEGER NOT NULL DEFAULT 0,
            last_peer TEXT,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            operation_id TEXT,
            distribution_id TEXT NOT NULL,
            payload TEXT NOT NULL,
            created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0
        )""",
    ),
    # 2: 2-way done deadlines, orphan done-requests (§7.0.3/§7.0.4), tunnels in the registry.
    (
        "ALTER TABLE operations ADD COLUMN done_deadline REAL",
        "ALTER TABLE sa_registry ADD COLUMN tunnels TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE orphan_dones (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            distribution_id TEXT NOT NULL,
            sa_transaction_id INTEGER NOT NULL,
            type TEXT NOT NULL,
            xml TEXT NOT NULL,
            received_at REAL NOT NULL
        )""",
        "CREATE INDEX orphan_dones_txn ON orphan_dones(distribution_id, sa_transaction_id, seq)",
        "CREATE INDEX orphan_dones_age ON orphan_dones(received_at)",
    ),
    # 3: an orphan's size as received (its XML is not kept past a bound), and an index to
    # trim each SA's orphans to the newest few.
    (
        "ALTER TABLE orphan_dones ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX orphan_dones_sa ON orphan_dones(distribution_id, seq)",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Apply the missing steps up to ``target`` (default: latest); the resulting version.

    ``conn`` must be in autocommit mode (``isolation_level=None``): we open the transactions.
    """
    target = SCHEMA_VERSION if target is None else target
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"no schema version {target}")
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {version} is newer than this armsproxy"
            f" ({SCHEMA_VERSION}); upgrade armsproxy or use another database"
        )
    while version < target:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have upgraded while we waited for the write lock.
            version = schema_version(conn)
            if version < target:
                step = MIGRATIONS[version]
                if callable(step):
                    step(conn)
                else:
                    for sql in step:
                        conn.execute(sql)
                version += 1
                conn.execute(f"PRAGMA user_version = {version:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return version
