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
_ACTIVE_SQL = "'queued','sending','started'"

# Step 5 (below), spelled out here because its triggers share bodies. Released text like the
# other steps: a change to any of it is a new step (drop and recreate), never an edit.
#
# Per-SA queue heads: one row per SA with anything queued or being sent, kept by the triggers
# below in the same statement as the change, so no code path can forget it and a rollback
# undoes both. The dispatch pick reads the ready ones in one index range.
_SA_QUEUES = """CREATE TABLE sa_queues (
    distribution_id TEXT PRIMARY KEY,
    head_seq INTEGER,    -- the SA's oldest queued operation; NULL when none is queued
    not_before REAL,     -- the head's: not sent before
    waiting INTEGER NOT NULL DEFAULT 0,  -- the head waits for its SA (waiting_for set)
    busy INTEGER NOT NULL DEFAULT 0      -- an operation of the SA is being sent
) WITHOUT ROWID"""


def _refresh_queue(sa: str) -> str:
    """Trigger body: recompute SA ``sa``'s row from two seeks of operations_state_sa."""
    return f"""
        INSERT INTO sa_queues (distribution_id, head_seq, not_before, waiting, busy)
        SELECT {sa}, head.seq, head.not_before, head.waiting_for IS NOT NULL,
            EXISTS (SELECT 1 FROM operations INDEXED BY operations_state_sa
                    WHERE state = 'sending' AND distribution_id = {sa})
        FROM (SELECT 1) LEFT JOIN (
            SELECT seq, not_before, waiting_for FROM operations INDEXED BY operations_state_sa
            WHERE state = 'queued' AND distribution_id = {sa} ORDER BY seq LIMIT 1
        ) AS head
        WHERE true
        ON CONFLICT (distribution_id) DO UPDATE SET head_seq = excluded.head_seq,
            not_before = excluded.not_before, waiting = excluded.waiting, busy = excluded.busy;
        DELETE FROM sa_queues WHERE distribution_id = {sa} AND head_seq IS NULL AND busy = 0;"""


def _count(state: str, delta: str, when: str = "true") -> str:
    """Trigger body: add ``delta`` to the count of ``state`` if ``when``."""
    return f"""
        INSERT INTO queue_counts (state, n) SELECT {state}, 0 {delta} WHERE {when}
        ON CONFLICT (state) DO UPDATE SET n = n {delta};"""


_FAST_QUEUE: tuple[str, ...] = (
    _SA_QUEUES,
    """CREATE INDEX sa_queues_ready ON sa_queues(not_before, head_seq)
        WHERE head_seq IS NOT NULL AND waiting = 0 AND busy = 0""",
    # A new queued operation has the highest seq: it is a head only if its SA had none.
    f"""CREATE TRIGGER operations_queue_insert AFTER INSERT ON operations
        WHEN NEW.state = 'sending' OR (NEW.state = 'queued' AND NOT EXISTS (
            SELECT 1 FROM sa_queues WHERE distribution_id = NEW.distribution_id
            AND head_seq < NEW.seq))
        BEGIN {_refresh_queue("NEW.distribution_id")} END""",
    # A state change into or out of queued/sending, or a change to the head itself
    # (not_before, waiting_for); distribution_id never changes (not a mutable field).
    f"""CREATE TRIGGER operations_queue_update
        AFTER UPDATE OF state, not_before, waiting_for ON operations
        WHEN (OLD.state IS NOT NEW.state
              AND (OLD.state IN ('queued', 'sending') OR NEW.state IN ('queued', 'sending')))
          OR (NEW.state = 'queued' AND NEW.seq = (
              SELECT head_seq FROM sa_queues WHERE distribution_id = NEW.distribution_id))
        BEGIN {_refresh_queue("NEW.distribution_id")} END""",
    f"""CREATE TRIGGER operations_queue_delete AFTER DELETE ON operations
        WHEN OLD.state IN ('queued', 'sending')
        BEGIN {_refresh_queue("OLD.distribution_id")} END""",
    """INSERT INTO sa_queues (distribution_id, head_seq, busy)
        SELECT distribution_id, MIN(seq) FILTER (WHERE state = 'queued'), MAX(state = 'sending')
        FROM operations WHERE state IN ('queued', 'sending') GROUP BY distribution_id""",
    """UPDATE sa_queues SET (not_before, waiting) = (
            SELECT not_before, waiting_for IS NOT NULL FROM operations WHERE seq = head_seq)
        WHERE head_seq IS NOT NULL""",
    # backlog() (every /metrics scrape): operations not final, counted as they change, not
    # by counting a million index entries each time.
    """CREATE TABLE queue_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID""",
    f"""CREATE TRIGGER operations_count_insert AFTER INSERT ON operations
        WHEN NEW.state IN ({_ACTIVE_SQL})
        BEGIN {_count("NEW.state", "+ 1")} END""",
    f"""CREATE TRIGGER operations_count_update AFTER UPDATE OF state ON operations
        WHEN OLD.state IS NOT NEW.state
            AND (OLD.state IN ({_ACTIVE_SQL}) OR NEW.state IN ({_ACTIVE_SQL}))
        BEGIN {_count("OLD.state", "- 1", f"OLD.state IN ({_ACTIVE_SQL})")}
              {_count("NEW.state", "+ 1", f"NEW.state IN ({_ACTIVE_SQL})")} END""",
    f"""CREATE TRIGGER operations_count_delete AFTER DELETE ON operations
        WHEN OLD.state IN ({_ACTIVE_SQL})
        BEGIN {_count("OLD.state", "- 1")} END""",
    f"""INSERT INTO queue_counts (state, n) SELECT state, COUNT(*) FROM operations
        WHERE state IN ({_ACTIVE_SQL}) GROUP BY state""",
    # The deadline scan: only what has a deadline, earliest first (state literals: a partial
    # index serves a query only if its WHERE says the same).
    """CREATE INDEX operations_queued_expires ON operations(expires_at)
        WHERE state = 'queued' AND expires_at IS NOT NULL""",
    """CREATE INDEX operations_started_done ON operations(done_deadline)
        WHERE state = 'started' AND done_deadline IS NOT NULL""",
    # Orders waiting for their SA (a few per SA at most), read at start-up.
    """CREATE INDEX operations_waiting ON operations(seq)
        WHERE state = 'queued' AND waiting_for IS NOT NULL""",
    # push.list by state: each state's range in created_at order (seq: the rowid, last).
    "CREATE INDEX operations_state_created ON operations(state, created_at)",
)

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
    # 4: a queued order waiting for its SA to become reachable says what for; it is not
    # dispatched (nor counted as an attempt) until the SA confirms or its deadline passes.
    (
        "ALTER TABLE operations ADD COLUMN waiting_for TEXT",
    ),
    # 5: a queue that stays fast at a million operations (#11): every hot read walks only
    # what it returns. Dispatch reads per-SA queue heads that triggers keep (sa_queues); the
    # deadline scan reads partial indexes of what has a deadline; listings by state read
    # (state, created_at) in order; orders waiting for their SA have an index of their own;
    # the backlog is counted as it changes.
    _FAST_QUEUE,
    # 6: instances (#12): processes sharing one store, each with a lease it renews; which
    # instance claimed an operation, which one holds an SA's tunnel. A SQLite store has one
    # process: the tables are here so that version 6 means the same on both backends.
    (
        """CREATE TABLE instances (
            instance_id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            lease_until REAL NOT NULL
        )""",
        "ALTER TABLE operations ADD COLUMN claimed_by TEXT",
        "ALTER TABLE sa_registry ADD COLUMN tunnel_owner TEXT",
        # A dead instance's tunnels are released in one index range, not a registry scan.
        """CREATE INDEX sa_registry_tunnel_owner ON sa_registry(tunnel_owner)
            WHERE tunnel_owner IS NOT NULL""",
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
