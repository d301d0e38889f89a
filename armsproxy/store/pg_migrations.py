"""Versioned PostgreSQL schema, step for step the SQLite one (:mod:`armsproxy.store.migrations`).

Version N means here what it means for SQLite: the same tables, columns and guarantees after
the same N steps, so an operator reads one CHANGELOG for both backends. The version lives in a
one-row ``schema_version`` table. Each step runs in its own transaction (PostgreSQL DDL is
transactional) while the migrating session holds an advisory lock, so proxies starting
together upgrade once, and a crash leaves a whole version. Never edit a released step; append
one, to both backends.

Differences from the SQLite text, each for a reason: ``seq`` columns are identities (never
reused, like AUTOINCREMENT); timestamps are ``double precision`` (SQLite's REAL); flags are
``boolean``; JSON stays ``text`` (``jsonb`` would reorder keys and refuse ``\\u0000``);
``distribution_id`` compares bytewise (``COLLATE "C"``, SQLite's BINARY), so registry pages
come in the same order; indexes that serve ``ORDER BY ..., seq`` name ``seq`` (SQLite has the
rowid in every index for free). Step 5 keeps the per-SA queue heads with PL/pgSQL triggers
that lock the SA's row first (see :data:`_REFRESH_QUEUE`), and has no trigger-kept
``queue_counts``: one counter row per state would serialise every write of every proxy on a
shared database, so ``backlog()`` counts the not-final range of ``operations_state_sa``
instead (index only, never the kept results).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from armsproxy.store.model import StoreError

_STATES_SQL = "'queued','sending','started','succeeded','failed','expired','cancelled'"
FINAL_SQL = "'succeeded','failed','expired','cancelled'"
ACTIVE_SQL = "'queued','sending','started'"

# Any fixed number: the transaction-scoped advisory lock proxies take to migrate one at a time.
_MIGRATION_LOCK = 0x41524D53  # "ARMS"

# Step 5's per-SA queue heads. One row per SA with anything queued or being sent; the head is
# the SA's oldest queued operation. Kept by triggers in the statement that changes operations,
# so no code path can forget it and a rollback undoes both.
#
# Concurrency (READ COMMITTED, several proxies): a refresh first locks the SA's row (creating
# it), and only then reads the SA's queue, in statements whose snapshot is taken after the lock
# was granted. Two transactions changing one SA's queue therefore refresh one after the other,
# the second seeing the first's committed rows: a head is never computed from a stale view.
_REFRESH_QUEUE = """
CREATE FUNCTION armsproxy_refresh_queue(sa TEXT, changed BIGINT) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    current_head BIGINT;
BEGIN
    SELECT head_seq INTO current_head FROM sa_queues WHERE distribution_id = sa FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO sa_queues (distribution_id) VALUES (sa) ON CONFLICT DO NOTHING;
        SELECT head_seq INTO current_head FROM sa_queues WHERE distribution_id = sa FOR UPDATE;
    END IF;
    -- A queued operation behind the head changed (or arrived): the SA's row stays as it is.
    IF changed IS NOT NULL AND current_head < changed THEN
        RETURN;
    END IF;
    -- Two seeks of operations_state_sa, whatever the length of the queue.
    UPDATE sa_queues SET head_seq = head.seq, not_before = head.not_before,
        waiting = COALESCE(head.waiting_for IS NOT NULL, false),
        busy = EXISTS (SELECT 1 FROM operations
                       WHERE state = 'sending' AND distribution_id = sa)
    FROM (SELECT 1) AS one LEFT JOIN (
        SELECT seq, not_before, waiting_for FROM operations
        WHERE state = 'queued' AND distribution_id = sa ORDER BY seq LIMIT 1
    ) AS head ON true
    WHERE sa_queues.distribution_id = sa;
    DELETE FROM sa_queues WHERE distribution_id = sa AND head_seq IS NULL AND NOT busy;
END $$"""

# Row triggers: ``changed`` is the operation's seq when only a queued operation's own fields
# moved (or one arrived), so a change behind the head costs one lock; NULL when a state moved.
_QUEUE_TRIGGER = """
CREATE FUNCTION armsproxy_queue_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM armsproxy_refresh_queue(OLD.distribution_id, NULL);
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.state IS DISTINCT FROM NEW.state THEN
        PERFORM armsproxy_refresh_queue(NEW.distribution_id, NULL);
    ELSIF NEW.state = 'queued' THEN
        PERFORM armsproxy_refresh_queue(NEW.distribution_id, NEW.seq);
    ELSE
        PERFORM armsproxy_refresh_queue(NEW.distribution_id, NULL);
    END IF;
    RETURN NULL;
END $$"""

_FAST_QUEUE: tuple[str, ...] = (
    """CREATE TABLE sa_queues (
        distribution_id TEXT COLLATE "C" PRIMARY KEY,
        head_seq BIGINT,     -- the SA's oldest queued operation; NULL when none is queued
        not_before DOUBLE PRECISION,  -- the head's: not sent before
        waiting BOOLEAN NOT NULL DEFAULT false,  -- the head waits for its SA (waiting_for set)
        busy BOOLEAN NOT NULL DEFAULT false      -- an operation of the SA is being sent
    )""",
    # The dispatch pick: only SAs neither busy nor waiting, by the head's not_before.
    """CREATE INDEX sa_queues_ready ON sa_queues (not_before, head_seq)
        WHERE head_seq IS NOT NULL AND NOT waiting AND NOT busy""",
    _REFRESH_QUEUE,
    _QUEUE_TRIGGER,
    """CREATE TRIGGER operations_queue_insert AFTER INSERT ON operations FOR EACH ROW
        WHEN (NEW.state IN ('queued', 'sending'))
        EXECUTE FUNCTION armsproxy_queue_trigger()""",
    # A state change into or out of queued/sending, or a queued operation's not_before or
    # waiting_for; distribution_id never changes (not a mutable field).
    """CREATE TRIGGER operations_queue_update
        AFTER UPDATE OF state, not_before, waiting_for ON operations FOR EACH ROW
        WHEN ((OLD.state IS DISTINCT FROM NEW.state
               AND (OLD.state IN ('queued', 'sending') OR NEW.state IN ('queued', 'sending')))
              OR (NEW.state = 'queued' AND (OLD.not_before IS DISTINCT FROM NEW.not_before
                  OR OLD.waiting_for IS DISTINCT FROM NEW.waiting_for)))
        EXECUTE FUNCTION armsproxy_queue_trigger()""",
    """CREATE TRIGGER operations_queue_delete AFTER DELETE ON operations FOR EACH ROW
        WHEN (OLD.state IN ('queued', 'sending'))
        EXECUTE FUNCTION armsproxy_queue_trigger()""",
    # The queue as it is (the step runs under the migration lock, no proxy is dispatching).
    """INSERT INTO sa_queues (distribution_id, head_seq, busy)
        SELECT distribution_id, MIN(seq) FILTER (WHERE state = 'queued'),
            bool_or(state = 'sending')
        FROM operations WHERE state IN ('queued', 'sending') GROUP BY distribution_id""",
    """UPDATE sa_queues AS q SET not_before = op.not_before,
            waiting = op.waiting_for IS NOT NULL
        FROM operations AS op WHERE op.seq = q.head_seq""",
    # The deadline scan: only what has a deadline, earliest first (ties in submit order).
    """CREATE INDEX operations_queued_expires ON operations (expires_at, seq)
        WHERE state = 'queued' AND expires_at IS NOT NULL""",
    """CREATE INDEX operations_started_done ON operations (done_deadline, seq)
        WHERE state = 'started' AND done_deadline IS NOT NULL""",
    # Orders waiting for their SA (a few per SA at most), read at start-up.
    """CREATE INDEX operations_waiting ON operations (seq)
        WHERE state = 'queued' AND waiting_for IS NOT NULL""",
    # push.list by state: each state's range in (created_at, seq) order, merged.
    "CREATE INDEX operations_state_created ON operations (state, created_at, seq)",
)

MIGRATIONS: list[Sequence[str]] = [
    # 1: operations with their raw ARMS exchanges, the SA registry and the event outbox.
    (
        f"""CREATE TABLE operations (
            seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            operation_id TEXT NOT NULL UNIQUE,
            request_id TEXT UNIQUE,
            distribution_id TEXT COLLATE "C" NOT NULL,
            operation TEXT NOT NULL,
            params TEXT NOT NULL,
            sa_url TEXT,
            method TEXT,
            state TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
            attempts BIGINT NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            not_before DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            sa_transaction_id BIGINT,
            start_result_code BIGINT,
            transaction_result BIGINT,
            result_code BIGINT,
            last_error TEXT,
            result TEXT,
            forgotten BOOLEAN NOT NULL DEFAULT false
        )""",
        # Per-SA queue heads and state scans (in_states), and the backlog count.
        "CREATE INDEX operations_state_sa ON operations (state, distribution_id, seq)",
        "CREATE INDEX operations_created ON operations (created_at, seq)",
        "CREATE INDEX operations_sa_created ON operations (distribution_id, created_at, seq)",
        """CREATE INDEX operations_sa_txn ON operations (distribution_id, sa_transaction_id, seq)
            WHERE sa_transaction_id IS NOT NULL""",
        f"""CREATE INDEX operations_purge ON operations (updated_at)
            WHERE NOT forgotten AND state IN ({FINAL_SQL})""",
        """CREATE TABLE operation_raw (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            op_seq BIGINT NOT NULL REFERENCES operations (seq) ON DELETE CASCADE,
            entry TEXT NOT NULL
        )""",
        "CREATE INDEX operation_raw_op ON operation_raw (op_seq, id)",
        """CREATE TABLE sa_registry (
            distribution_id TEXT COLLATE "C" PRIMARY KEY,
            push_method TEXT,
            push_endpoint TEXT,
            sa_certificate TEXT,
            last_pull_at DOUBLE PRECISION,
            last_confirmation_at DOUBLE PRECISION,
            confirmed BOOLEAN NOT NULL DEFAULT false,
            last_peer TEXT,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE outbox (
            seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            kind TEXT NOT NULL,
            operation_id TEXT,
            distribution_id TEXT COLLATE "C" NOT NULL,
            payload TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0
        )""",
    ),
    # 2: 2-way done deadlines, orphan done-requests (§7.0.3/§7.0.4), tunnels in the registry.
    (
        "ALTER TABLE operations ADD COLUMN done_deadline DOUBLE PRECISION",
        "ALTER TABLE sa_registry ADD COLUMN tunnels TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE orphan_dones (
            seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            distribution_id TEXT COLLATE "C" NOT NULL,
            sa_transaction_id BIGINT NOT NULL,
            type TEXT NOT NULL,
            xml TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE INDEX orphan_dones_txn
            ON orphan_dones (distribution_id, sa_transaction_id, seq)""",
        "CREATE INDEX orphan_dones_age ON orphan_dones (received_at)",
    ),
    # 3: an orphan's size as received, and an index to trim each SA's orphans to the newest few.
    (
        "ALTER TABLE orphan_dones ADD COLUMN size BIGINT NOT NULL DEFAULT 0",
        "CREATE INDEX orphan_dones_sa ON orphan_dones (distribution_id, seq)",
    ),
    # 4: a queued order waiting for its SA to become reachable says what for.
    (
        "ALTER TABLE operations ADD COLUMN waiting_for TEXT",
    ),
    # 5: a queue that stays fast at a million operations (#11): per-SA queue heads kept by
    # triggers, partial indexes of what has a deadline, listings by state in order, an index
    # of orders waiting for their SA.
    _FAST_QUEUE,
    # 6: instances (#12): proxies sharing the database, each with a lease it renews; which
    # instance claimed an operation, which one holds an SA's tunnel.
    (
        """CREATE TABLE instances (
            instance_id TEXT COLLATE "C" PRIMARY KEY,
            host TEXT NOT NULL,
            pid BIGINT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL
        )""",
        "ALTER TABLE operations ADD COLUMN claimed_by TEXT COLLATE \"C\"",
        "ALTER TABLE sa_registry ADD COLUMN tunnel_owner TEXT COLLATE \"C\"",
        # A dead instance's tunnels are released in one index range, not a registry scan.
        """CREATE INDEX sa_registry_tunnel_owner ON sa_registry (tunnel_owner)
            WHERE tunnel_owner IS NOT NULL""",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


def _has_version_table(conn: Any) -> bool:
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    return bool(row[0])


def schema_version(conn: Any) -> int:
    """The database's version; 0 for an empty one (no ``schema_version`` table yet)."""
    if not _has_version_table(conn):
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def _refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"database schema version {version} is newer than this armsproxy"
            f" ({SCHEMA_VERSION}); upgrade armsproxy or use another database"
        )


def migrate(conn: Any, target: int | None = None) -> int:
    """Apply the missing steps up to ``target`` (default: latest); the resulting version.

    ``conn`` is a psycopg connection in autocommit mode: each step is a transaction of ours.
    """
    target = SCHEMA_VERSION if target is None else target
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"no schema version {target}")
    version = schema_version(conn)
    _refuse_newer(version)
    if version >= target:
        return version
    # A session-level lock, taken before the steps' transactions: each starts after it was
    # granted, so it sees the tables another proxy created meanwhile (a transaction that
    # waited for a lock inside itself may keep an older view of the catalog: a proxy starting
    # beside another on an empty database would create schema_version twice).
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        while True:
            with conn.transaction():
                # Another proxy may have upgraded while we waited for the lock: read again.
                if not _has_version_table(conn):
                    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                    conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = schema_version(conn)
                _refuse_newer(version)
                if version >= target:
                    return version
                for sql in MIGRATIONS[version]:
                    conn.execute(sql)
                conn.execute("UPDATE schema_version SET version = %s", (version + 1,))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
