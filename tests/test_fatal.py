"""Fatal errors end twistd and twist with status 1 and one line: issue #10 point 3.

systemd restarts armsproxy (Restart=on-failure) only when its exit says it failed; both twistd
and twist used to exit 0 when the store could not open, and a listener that could not bind
was a traceback (twistd) or an error logged while armsproxy ran on without it (twist). Every
case here runs the real programs as the operator does, on real ports and files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_config import RUNNERS, env, free_port, site_config

from armsproxy.store.migrations import SCHEMA_VERSION

AS_ROOT = os.geteuid() == 0
NEWER = SCHEMA_VERSION + 7


def run(runner: str, *args: str, prefix: tuple[str, ...] = (),
        extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``twistd -n``/``twist`` [extra] ``armsproxy`` args, to its end; stdout and stderr."""
    return subprocess.run([*prefix, *RUNNERS[runner], *extra, "armsproxy", *args], env=env(),
                          capture_output=True, text=True, timeout=90)


def embedded_args(data: Path) -> list[str]:
    return ["--data-dir", str(data), "--port", str(free_port()), "--rs-port", str(free_port()),
            "--rs-gate-port", str(free_port()), "--management-port", str(free_port())]


def newer_store(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {NEWER}")
    db.close()


def one_line(out: subprocess.CompletedProcess[str], text: str) -> None:
    """``text`` is said once, and nothing is a traceback."""
    both = out.stdout + out.stderr
    assert both.count(text) == 1, both
    assert "Traceback" not in both and "Unhandled error" not in both, both


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="fatal", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- a store of a newer schema -----------------------------------------------------------------

@pytest.mark.parametrize("runner", RUNNERS)
def test_a_store_of_a_newer_schema_exits_1_naming_the_path_and_versions(tmp_path, runner):
    # The embedded default finds out when the store opens, after the reactor started.
    data = tmp_path / "data"
    newer_store(data / "armsproxy.sqlite")
    out = run(runner, *embedded_args(data))
    assert out.returncode == 1, out.stdout + out.stderr
    one_line(out, f"cannot open the store {data / 'armsproxy.sqlite'} (--data-dir): database "
                  f"schema version {NEWER} is newer than this armsproxy ({SCHEMA_VERSION}); "
                  "upgrade armsproxy or use another database")


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_configured_store_of_a_newer_schema_is_refused_before_the_start(tmp_path, runner):
    conf = site_config(tmp_path)
    store = tmp_path / "state" / "armsproxy.sqlite"
    newer_store(store)
    out = run(runner, "--config", str(conf))
    assert out.returncode == 1
    assert out.stderr == (f"armsproxy: {conf}: [armsproxy] data_dir: {store}: database schema "
                          f"version {NEWER} is newer than this armsproxy ({SCHEMA_VERSION}); "
                          "upgrade armsproxy or use another database\n")


# -- a listener that cannot bind ---------------------------------------------------------------

@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("setting", ["[sa_gate] listen", "[rs_gate] listen",
                                     "[management] listen"])
def test_a_listener_that_cannot_bind_exits_1_naming_it_and_its_setting(tmp_path, runner,
                                                                       setting):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        if setting == "[sa_gate] listen":
            conf = site_config(tmp_path, port=busy)
            shown = f"ssl:{busy}:interface=127.0.0.1"  # the key paths left out
        else:
            shown = f"tcp:{busy}:interface=127.0.0.1"
            conf = site_config(tmp_path, **{setting[1:-8]: shown})
        out = run(runner, "--config", str(conf))
    assert out.returncode == 1, out.stdout + out.stderr
    one_line(out, f"armsproxy: {setting} {shown}: cannot listen: Address already in use")
    assert "store open" not in out.stdout + out.stderr  # every listener binds first


# -- a data directory the process cannot write -------------------------------------------------

@pytest.mark.parametrize("runner", RUNNERS)
def test_a_data_dir_that_cannot_be_created_exits_1_naming_it(tmp_path, runner):
    (tmp_path / "file").write_text("not a directory\n")
    data = tmp_path / "file" / "data"
    out = run(runner, *embedded_args(data))
    assert out.returncode == 1
    assert out.stderr == (f"armsproxy: --data-dir {data}: cannot create it as uid "
                          f"{os.geteuid()} (gid {os.getegid()}): Not a directory\n")


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def test_twistd_u_refuses_a_data_dir_that_user_cannot_write(open_dir):
    """``twistd -u/-g`` binds as root, then opens the store as the user."""
    data = open_dir / "data"
    data.mkdir()
    if AS_ROOT:
        uid, gid = _nobody()
        data.chmod(0o755)  # root's
    else:
        uid, gid = os.geteuid(), os.getegid()
        data.chmod(0o500)
    out = run("twistd", *embedded_args(data), extra=("-u", str(uid), "-g", str(gid)))
    assert out.returncode == 1
    assert out.stderr.startswith(f"armsproxy: --data-dir {data}: not writable by uid {uid} "
                                 f"(gid {gid})"), out.stderr
    st = data.stat()
    assert f"(owner {st.st_uid}:{st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o})" in out.stderr
    assert not (data / "armsproxy.sqlite").exists()


def test_twist_refuses_a_data_dir_its_user_cannot_write(open_dir):
    """As systemd's User= runs it: the directory belongs to someone else."""
    data = open_dir / "data"
    data.mkdir(mode=0o700)
    prefix: tuple[str, ...] = ()
    if AS_ROOT:  # root without the capabilities that override file permissions
        os.chown(data, *_nobody())
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")
    else:
        data.chmod(0o500)
    out = run("twist", *embedded_args(data), prefix=prefix)
    assert out.returncode == 1
    st = data.stat()
    assert out.stderr == (f"armsproxy: --data-dir {data}: not writable by uid {os.geteuid()} "
                          f"(gid {os.getegid()}) (owner {st.st_uid}:{st.st_gid}, mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): give it to that user (chown) or "
                          "configure another path\n")


def test_twistd_u_creates_the_data_dir_for_the_user_it_switches_to(open_dir):
    data = open_dir / "data"
    uid, gid = _nobody() if AS_ROOT else (os.geteuid(), os.getegid())
    proc = subprocess.Popen(
        [*RUNNERS["twistd"], "-u", str(uid), "-g", str(gid), "armsproxy",
         *embedded_args(data)],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any("store open: " in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            lines.append(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), "".join(lines) + rest
    owned = [data, data / "armsproxy.sqlite", data / "demo-rs.sqlite", data / "pki",
             data / "pki" / "ca.key", data / "pki" / "server.key"]
    assert {(p.name, p.stat().st_uid, p.stat().st_gid) for p in owned} == {
        (p.name, uid, gid) for p in owned}
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert "Traceback" not in "".join(lines) + rest
