"""A throwaway PostgreSQL server for the tests: a real one, never a mock.

``pg_cluster`` (session): ``initdb`` into a temporary directory, ``pg_ctl start`` listening
only on a Unix socket in that directory (no port to collide with), stopped and removed at the
end. ``pg_dsn`` (each test): a fresh database of that cluster, dropped after the test, so tests
stay independent. The binaries come from PATH or Debian's ``/usr/lib/postgresql/*/bin``; when
there are none the fixture fails (never skips) naming the package to install. initdb and
postgres refuse to run as root: as root they run as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_INSTALL = ("install Debian's `postgresql` package (apt-get install -y postgresql;"
            " .ci/run does it when they are missing)")


def find_pg_bin() -> Path | None:
    """The directory with initdb, pg_ctl and postgres: PATH first, then the newest Debian
    ``/usr/lib/postgresql/<version>/bin``."""
    names = ("initdb", "pg_ctl", "postgres")
    on_path = shutil.which("initdb")
    if on_path:
        folder = Path(os.path.realpath(on_path)).parent  # /usr/local/bin links into Debian's
        if all((folder / name).exists() for name in names):
            return folder

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path))

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all((Path(candidate) / name).exists() for name in names):
            return Path(candidate)
    return None


@dataclass
class PGCluster:
    """A running throwaway cluster: ``dsn(dbname)`` connects to one of its databases."""

    bin: Path
    socket_dir: Path
    port: int
    user: str = "postgres"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname={dbname}"


def _as_owner(argv: list[str], owner: str | None) -> list[str]:
    return argv if owner is None else ["runuser", "-u", owner, "--", *argv]


def _run(argv: list[str], owner: str | None, what: str) -> None:
    done = subprocess.run(_as_owner(argv, owner), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PGCluster]:
    folder = find_pg_bin()
    if folder is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH"
                    f" nor in /usr/lib/postgresql/*/bin: {_INSTALL}", pytrace=False)
    owner = None
    if os.geteuid() == 0:  # initdb and postgres refuse root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no `postgres` user to run the test"
                        f" PostgreSQL server as: {_INSTALL}, or create the user", pytrace=False)
        owner = "postgres"
    # Short path: a Unix socket's path must fit in 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="armsproxy-pg-"))
    data, log = base / "data", base / "server.log"
    if owner is not None:
        shutil.chown(base, owner)
    port = 5432  # only the socket's name: nothing listens on TCP
    started = False
    try:
        _run([str(folder / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "-E", "UTF8", "--locale=C", "--no-sync"], owner, "initdb")
        # Durability is the store's business, not this scratch cluster's: no fsync.
        options = (f"-c listen_addresses='' -c unix_socket_directories='{base}' -p {port}"
                   " -c fsync=off -c full_page_writes=off -c max_connections=200")
        _run([str(folder / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
              "-w", "-t", "60", "start"], owner, "pg_ctl start")
        started = True
        yield PGCluster(bin=folder, socket_dir=base, port=port)
    except RuntimeError as e:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        pytest.fail(f"cannot start the test PostgreSQL server: {e}\n{tail}", pytrace=False)
    finally:
        if started:
            _run([str(folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                 owner, "pg_ctl stop")
        shutil.rmtree(base, ignore_errors=True)


_names = itertools.count(1)


def create_database(cluster: PGCluster) -> str:
    """A new empty database of ``cluster``; its name."""
    import psycopg

    name = f"armsproxy_test_{os.getpid()}_{next(_names)}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(cluster: PGCluster, name: str) -> None:
    import psycopg

    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def db_rows(dsn: str, sql: str, *args: object) -> list[tuple]:
    """Rows of one statement, on a connection of its own (the tests and bench/scale.py look
    into the store armsproxy processes share)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args or None).fetchall()


def live_instances(dsn: str) -> dict[int, str]:
    """pid -> instance id of the live leases (instance ids are host:pid:random)."""
    if db_rows(dsn, "SELECT to_regclass('instances')") == [(None,)]:
        return {}
    rows = db_rows(dsn, "SELECT instance_id FROM instances"
                        " WHERE lease_until > extract(epoch from clock_timestamp())")
    return {int(instance.split(":")[1]): instance for (instance,) in rows}


@pytest.fixture
def pg_dsn(pg_cluster: PGCluster) -> Iterator[str]:
    """The DSN of a fresh, empty database for this test alone."""
    name = create_database(pg_cluster)
    try:
        yield pg_cluster.dsn(name)
    finally:
        drop_database(pg_cluster, name)
