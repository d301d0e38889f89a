"""SQLite storage of the demo RS: registered SAs, their configuration, and received events.

The plain functions take a DB-API cursor so the same code serves the CLI (synchronous, on its
own connection) and the server (inside ``ConnectionPool.runInteraction``, off the reactor).

Why ``adbapi.ConnectionPool(cp_min=1, cp_max=1)``: one thread holding one connection serialises
all of the server's database work (SQLite has a single writer anyway, so more threads would only
wait on each other), and ``runInteraction`` gives commit-on-success / rollback-on-error for free.
The CLI may write while the server runs; WAL plus a busy timeout covers that.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

from armsproxy.pki import fingerprint_sha256

log = Logger()

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
PUSH_METHODS = ("https-simple", "https-tunnel")
DEFAULT_PUSH_METHODS = list(PUSH_METHODS)
DEFAULT_HEARTBEAT_ALGORITHM = "hmac-sha1"

# Each list moves the schema from version i to i + 1; never edit a released step, append one.
_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE sas (
            distid TEXT PRIMARY KEY,
            key TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            push_methods TEXT NOT NULL,
            sa_certificate TEXT,
            sa_private_key TEXT,
            push_port INTEGER,
            push_timeout INTEGER,
            last_pull TEXT,
            last_confirmation TEXT
        )""",
        """CREATE TABLE modules (
            distid TEXT NOT NULL REFERENCES sas(distid) ON DELETE CASCADE,
            id INTEGER NOT NULL,
            version TEXT NOT NULL,
            install_order INTEGER NOT NULL,
            location TEXT NOT NULL,
            PRIMARY KEY (distid, id)
        )""",
        # An md-config without its module makes the SA fail the pull (§6.2): the key enforces it.
        """CREATE TABLE md_configs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            distid TEXT NOT NULL,
            id INTEGER NOT NULL,
            content_type TEXT,
            commit_order INTEGER,
            data BLOB NOT NULL,
            is_binary INTEGER NOT NULL,
            FOREIGN KEY (distid, id) REFERENCES modules(distid, id) ON DELETE CASCADE
        )""",
        "CREATE INDEX md_configs_distid ON md_configs(distid)",
        """CREATE TABLE heartbeats (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            distid TEXT NOT NULL REFERENCES sas(distid) ON DELETE CASCADE,
            host TEXT NOT NULL,
            port INTEGER NOT NULL,
            passphrase TEXT NOT NULL,
            interval INTEGER NOT NULL,
            algorithm TEXT
        )""",
        "CREATE INDEX heartbeats_distid ON heartbeats(distid)",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            received_at TEXT NOT NULL,
            json TEXT NOT NULL
        )""",
    ],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION


class DemoDBError(Exception):
    """The database cannot be used by this version (e.g. a newer schema)."""


class Cursor(Protocol):
    """What we use of a DB-API cursor (``sqlite3.Cursor`` or adbapi's ``Transaction``)."""

    lastrowid: int | None
    rowcount: int

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True)
class Module:
    id: int
    version: str
    install_order: int
    location: str


@dataclass(frozen=True)
class MdConfig:
    id: int
    data: bytes
    is_binary: bool
    content_type: str | None = None
    commit_order: int | None = None


@dataclass(frozen=True)
class Heartbeat:
    host: str
    port: int
    passphrase: str
    interval: int
    algorithm: str | None = DEFAULT_HEARTBEAT_ALGORITHM


@dataclass(frozen=True)
class SARegistration:
    """Everything the operator registers for one SA (the certificate is issued separately)."""

    distid: str
    key: str
    description: str = ""
    push_methods: list[str] = field(default_factory=lambda: list(DEFAULT_PUSH_METHODS))
    push_port: int | None = None
    push_timeout: int | None = None
    modules: list[Module] = field(default_factory=list)
    md_configs: list[MdConfig] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)


@dataclass(frozen=True)
class SAConfig:
    """What a config-solicitation answer is built from."""

    distid: str
    sa_certificate: str | None
    sa_private_key: str | None
    push_port: int | None
    push_timeout: int | None
    modules: list[Module]
    md_configs: list[MdConfig]
    heartbeats: list[Heartbeat]


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    received_at: str
    json: str


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; safe when the CLI and the server start together."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise DemoDBError(
            f"database schema version {version} is newer than this armsproxy ({SCHEMA_VERSION})"
        )
    conn.commit()
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in _MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def prepare_connection(conn: sqlite3.Connection) -> None:
    """Per-connection setup (also adbapi's ``cp_openfun``, so it runs in the pool thread)."""
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000):d}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn)


def create_private(path: str | Path) -> None:
    """Make sure the database file exists and only its owner can read it, before SQLite opens it.

    It holds every device's RS key, certificate and private key. SQLite would create it with
    the umask (usually world-readable); its ``-wal`` and ``-shm`` files take the main file's
    mode, so they follow. A file an older armsproxy left readable to others is tightened.
    """
    if str(path) in ("", ":memory:"):
        return
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = stat.S_IMODE(name.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            log.warn("tightening mode of {path} to 0600 (it holds device keys)", path=str(name))
            os.chmod(name, mode & 0o600)


def connect(path: str | Path) -> sqlite3.Connection:
    """A synchronous connection for the CLI (never use on the reactor thread)."""
    create_private(path)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
    try:
        prepare_connection(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# -- queries (cursor in, plain data out) ----------------------------------------------------


def register_sa(cur: Cursor, reg: SARegistration) -> bool:
    """Create or replace an SA's definition; keeps its issued certificate and last contacts.

    Returns True when the SA was new.
    """
    cur.execute("SELECT 1 FROM sas WHERE distid = ?", (reg.distid,))
    is_new = cur.fetchone() is None
    params = (
        reg.key,
        reg.description,
        json.dumps(reg.push_methods),
        reg.push_port,
        reg.push_timeout,
    )
    if is_new:
        cur.execute(
            "INSERT INTO sas (distid, key, description, push_methods, push_port, push_timeout)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (reg.distid, *params),
        )
    else:
        cur.execute(
            "UPDATE sas SET key = ?, description = ?, push_methods = ?, push_port = ?,"
            " push_timeout = ? WHERE distid = ?",
            (*params, reg.distid),
        )
    for table in ("md_configs", "heartbeats", "modules"):
        cur.execute(f"DELETE FROM {table} WHERE distid = ?", (reg.distid,))
    for m in reg.modules:
        cur.execute(
            "INSERT INTO modules (distid, id, version, install_order, location)"
            " VALUES (?, ?, ?, ?, ?)",
            (reg.distid, m.id, m.version, m.install_order, m.location),
        )
    for c in reg.md_configs:
        cur.execute(
            "INSERT INTO md_configs (distid, id, content_type, commit_order, data, is_binary)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (reg.distid, c.id, c.content_type, c.commit_order, c.data, int(c.is_binary)),
        )
    for h in reg.heartbeats:
        cur.execute(
            "INSERT INTO heartbeats (distid, host, port, passphrase, interval, algorithm)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (reg.distid, h.host, h.port, h.passphrase, h.interval, h.algorithm),
        )
    return is_new


def store_sa_certificate(cur: Cursor, distid: str, cert_pem: str, key_pem: str) -> bool:
    """Store the SA's certificate for its next config-solicitation; False if unknown."""
    cur.execute(
        "UPDATE sas SET sa_certificate = ?, sa_private_key = ? WHERE distid = ?",
        (cert_pem, key_pem, distid),
    )
    return cur.rowcount == 1


def get_sa_key(cur: Cursor, distid: str) -> str | None:
    cur.execute("SELECT key FROM sas WHERE distid = ?", (distid,))
    row = cur.fetchone()
    return None if row is None else str(row[0])


def load_sa_config(cur: Cursor, distid: str) -> SAConfig | None:
    cur.execute(
        "SELECT sa_certificate, sa_private_key, push_port, push_timeout FROM sas WHERE distid = ?",
        (distid,),
    )
    sa = cur.fetchone()
    if sa is None:
        return None
    cur.execute(
        "SELECT id, version, install_order, location FROM modules WHERE distid = ?"
        " ORDER BY install_order, id",
        (distid,),
    )
    modules = [Module(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in cur.fetchall()]
    cur.execute(
        "SELECT id, content_type, commit_order, data, is_binary FROM md_configs"
        " WHERE distid = ? ORDER BY commit_order IS NULL, commit_order, seq",
        (distid,),
    )
    md_configs = [
        MdConfig(
            id=int(r[0]),
            content_type=r[1],
            commit_order=r[2],
            data=bytes(r[3]),
            is_binary=bool(r[4]),
        )
        for r in cur.fetchall()
    ]
    cur.execute(
        "SELECT host, port, passphrase, interval, algorithm FROM heartbeats WHERE distid = ?"
        " ORDER BY seq",
        (distid,),
    )
    heartbeats = [
        Heartbeat(str(r[0]), int(r[1]), str(r[2]), int(r[3]), r[4]) for r in cur.fetchall()
    ]
    return SAConfig(
        distid=distid,
        sa_certificate=sa[0],
        sa_private_key=sa[1],
        push_port=sa[2],
        push_timeout=sa[3],
        modules=modules,
        md_configs=md_configs,
        heartbeats=heartbeats,
    )


def get_push_methods(cur: Cursor, distid: str) -> list[str] | None:
    cur.execute("SELECT push_methods FROM sas WHERE distid = ?", (distid,))
    row = cur.fetchone()
    return None if row is None else [str(m) for m in json.loads(row[0])]


def record_contact(cur: Cursor, distid: str, kind: str, record: dict[str, Any]) -> bool:
    """Remember the SA's last pull or confirmation (``kind`` is "pull" or "confirmation")."""
    column = {"pull": "last_pull", "confirmation": "last_confirmation"}[kind]
    cur.execute(f"UPDATE sas SET {column} = ? WHERE distid = ?", (json.dumps(record), distid))
    return cur.rowcount == 1


def add_event(cur: Cursor, received_at: str, event_json: str) -> int:
    cur.execute("INSERT INTO events (received_at, json) VALUES (?, ?)", (received_at, event_json))
    assert cur.lastrowid is not None
    return int(cur.lastrowid)


def list_events(cur: Cursor, since_seq: int = 0, limit: int = 1000) -> list[StoredEvent]:
    cur.execute(
        "SELECT seq, received_at, json FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
        (since_seq, limit),
    )
    return [StoredEvent(int(r[0]), str(r[1]), str(r[2])) for r in cur.fetchall()]


def list_sas(cur: Cursor) -> list[dict[str, Any]]:
    """One summary per SA, without secrets, with no None values (XML-RPC has no nil here)."""
    cur.execute(
        "SELECT distid, description, push_methods, sa_certificate, push_port, push_timeout,"
        " last_pull, last_confirmation,"
        " (SELECT COUNT(*) FROM modules m WHERE m.distid = s.distid),"
        " (SELECT COUNT(*) FROM md_configs c WHERE c.distid = s.distid),"
        " (SELECT COUNT(*) FROM heartbeats h WHERE h.distid = s.distid)"
        " FROM sas s ORDER BY distid"
    )
    out: list[dict[str, Any]] = []
    for r in cur.fetchall():
        item: dict[str, Any] = {
            "distid": r[0],
            "description": r[1],
            "push_methods": json.loads(r[2]),
            "modules": int(r[8]),
            "md_configs": int(r[9]),
            "heartbeats": int(r[10]),
        }
        if r[3]:
            item["certificate_sha256"] = fingerprint_sha256(r[3])
        for name, value in (("push_port", r[4]), ("push_timeout", r[5])):
            if value is not None:
                item[name] = int(value)
        for name, value in (("last_pull", r[6]), ("last_confirmation", r[7])):
            if value is not None:
                item[name] = json.loads(value)
        out.append(item)
    return out


# -- asynchronous access for the server ------------------------------------------------------


class DemoDB:
    """The server's handle: every call runs in the pool's single thread and returns a Deferred."""

    def __init__(self, path: str | Path, reactor: IReactorCore | None = None) -> None:
        self.path = Path(path)
        create_private(self.path)  # before the pool's thread lets SQLite create it
        extra: dict[str, Any] = {} if reactor is None else {"cp_reactor": reactor}
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            str(self.path),
            timeout=BUSY_TIMEOUT_S,
            check_same_thread=False,  # adbapi closes connections from the reactor thread
            cp_min=1,
            cp_max=1,
            cp_openfun=prepare_connection,
            **extra,
        )

    def run(self, interaction: Any, *args: Any) -> Deferred[Any]:
        """Run ``interaction(cursor, *args)`` in one transaction in the DB thread."""
        return self._pool.runInteraction(interaction, *args)

    def sa_key(self, distid: str) -> Deferred[str | None]:
        return self.run(get_sa_key, distid)

    def pull(self, distid: str, record: dict[str, Any]) -> Deferred[SAConfig | None]:
        """Load the SA's configuration and remember this pull, in one transaction."""

        def interaction(cur: Cursor) -> SAConfig | None:
            config = load_sa_config(cur, distid)
            if config is not None:
                record_contact(cur, distid, "pull", record)
            return config

        return self.run(interaction)

    def push_methods(self, distid: str) -> Deferred[list[str] | None]:
        return self.run(get_push_methods, distid)

    def record_confirmation(self, distid: str, record: dict[str, Any]) -> Deferred[bool]:
        return self.run(record_contact, distid, "confirmation", record)

    def add_event(self, received_at: str, event_json: str) -> Deferred[int]:
        return self.run(add_event, received_at, event_json)

    def events(self, since_seq: int = 0, limit: int = 1000) -> Deferred[list[StoredEvent]]:
        return self.run(list_events, since_seq, limit)

    def list_sas(self) -> Deferred[list[dict[str, Any]]]:
        return self.run(list_sas)

    def close(self) -> None:
        """Stop the DB thread (blocks until the current query ends)."""
        self._pool.close()
