"""The configuration file is checked, not trusted: issue #10 point 4.

A typo in a key would silently leave its default in force, a relative key path would depend on
the directory the service happens to start in, and a missing certificate used to end in a
traceback after twistd's usage text. Each problem is now one line naming the file, the section
and the key, under twistd and twist alike, and ``armsproxyctl check-config`` finds them all
without starting anything. Real processes, real files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from armsproxy import pki
from armsproxy.config import ConfigError, load, resolve_endpoint_paths
from armsproxy.store.migrations import SCHEMA_VERSION

ROOT = Path(__file__).parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
          "--pidfile="]
TWIST = [sys.executable, "-c",
         "import sys; from twisted.application.twist._twist import Twist; sys.exit(Twist.main())",
         "--log-format=text"]
RUNNERS = {"twistd": TWISTD, "twist": TWIST}
CTL = [sys.executable, "-m", "armsproxy.tools.ctl"]


def env() -> dict[str, str]:
    """The plugin (twisted/plugins in the checkout) and the package on the path."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    return environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_config(folder: Path, *, port: int | None = None, rs_gate: str | None = None,
                management: str | None = None, extra: str = "") -> Path:
    """A production-like configuration with real certificates; every path in it is relative
    to the file (keys/, state/), as an operator keeps them beside it."""
    keys = folder / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("ARMS Root CA test")
    server = pki.issue_server_cert(ca, ["127.0.0.1"], "armsproxy test")
    (keys / "sa-gate.pem").write_text(server.cert_pem)
    (keys / "sa-gate.key").write_text(server.key_pem)
    (keys / "ca.pem").write_text(ca.cert_pem)
    port = port or free_port()
    conf = folder / "armsproxy.conf"
    keys_and_certs = ("privateKey=keys/sa-gate.key:certKey=keys/sa-gate.pem:"
                      "extraCertChain=keys/ca.pem")
    conf.write_text(f"""\
[armsproxy]
data_dir = state

[sa_gate]
listen = ssl:{port}:interface=127.0.0.1:{keys_and_certs}
public_urls = https://127.0.0.1:{port}/arms

[rs]
url = http://127.0.0.1:{free_port()}/RPC2

[push]
sa_ca = keys/ca.pem

[rs_gate]
listen = {rs_gate or f"tcp:{free_port()}:interface=127.0.0.1"}

[management]
listen = {management or f"tcp:{free_port()}:interface=127.0.0.1"}
{extra}""")
    return conf


def edit(conf: Path, old: str, new: str) -> Path:
    text = conf.read_text()
    assert old in text
    conf.write_text(text.replace(old, new))
    return conf


def start(runner: str, conf: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUNNERS[runner], "armsproxy", "--config", str(conf)], env=env(),
                          cwd=cwd, capture_output=True, text=True, timeout=90)


def check_config(*files: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, "check-config", *map(str, files)], env=env(),
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Under /tmp with a short name: unix socket paths are at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="cfg", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- unknown sections and keys, values that are not numbers ------------------------------------

TYPOS = [
    ("public_urls = ", "public_url = ", "[sa_gate] public_url: unknown key (did you mean "
     "public_urls?)"),
    ("[management]", "[managment]", "[managment]: unknown section (did you mean "
     "[management]?)"),
    ("[push]\n", "[push]\ntunnel_listen = ssl:8444\n", "[push] tunnel_listen: unknown key (did "
     "you mean [sa_gate] tunnel_listen?)"),
    ("[rs]\n", "[rs]\nretries = 3\n", "[rs] retries: unknown key"),
    ("[armsproxy]\n", "[DEFAULT]\ntimeout = 5\n[armsproxy]\n",
     "[DEFAULT]: unknown section (not supported: each key goes in its own section)"),
]


def test_unknown_sections_and_keys_are_errors_naming_file_section_and_key(tmp_path):
    conf = site_config(tmp_path)
    for old, new, _ in TYPOS:
        edit(conf, old, new)
    with pytest.raises(ConfigError) as e:
        load(conf)
    # The typo in public_urls leaves none: the values are still checked, all in one go.
    assert sorted(e.value.lines()) == sorted(
        [f"{conf}: {problem}" for _, _, problem in TYPOS]
        + [f"{conf}: [sa_gate] public_urls: at least one URL is required"])


def test_a_value_that_is_not_a_number_names_its_key(tmp_path):
    conf = edit(site_config(tmp_path), "[push]\n",
                "[push]\nmax_attempts = six\nretry_cap = nan\nendpoint_from_peer = maybe\n")
    conf.write_text(conf.read_text() + "max_connections = plenty\n")  # in [management]
    with pytest.raises(ConfigError) as e:
        load(conf)
    assert e.value.lines() == [
        f"{conf}: [push] max_attempts: 'six' is not a whole number",
        f"{conf}: [push] retry_cap: 'nan' is not a (finite) number",
        f"{conf}: [push] endpoint_from_peer: 'maybe' is not yes or no",
        f"{conf}: [management] max_connections: 'plenty' is not a whole number",
    ]
    edit(conf, "max_connections = plenty", "max_connections = 4")
    conf.write_text(conf.read_text().replace(
        "[sa_gate]\n", "[sa_gate]\nmax_connections = many\n"))
    with pytest.raises(ConfigError, match=r"\[sa_gate\] max_connections: 'many' is not auto "
                                          r"or a whole number"):
        load(conf)


# -- paths inside endpoint strings -------------------------------------------------------------

def test_relative_paths_inside_endpoint_strings_resolve_against_the_file(tmp_path):
    conf = site_config(tmp_path, rs_gate="unix:run/rs.sock:mode=600",
                       management="ssl:0:privateKey=keys/m.key:extraCertChain=/abs/chain.pem:"
                                  "interface=\\:\\:1")
    cfg = load(conf)
    keys = tmp_path / "keys"
    assert cfg.sa_listen == (f"ssl:{cfg.sa_listen.split(':')[1]}:interface=127.0.0.1:"
                             f"privateKey={keys / 'sa-gate.key'}:certKey={keys / 'sa-gate.pem'}:"
                             f"extraCertChain={keys / 'ca.pem'}")
    assert cfg.rs_gate_listen == f"unix:{tmp_path / 'run' / 'rs.sock'}:mode=600"
    # Absolute paths and escaped colons stay as written.
    assert cfg.management_listen == (f"ssl:0:privateKey={keys / 'm.key'}:"
                                     "extraCertChain=/abs/chain.pem:interface=\\:\\:1")
    base = Path("/etc/armsproxy")
    assert resolve_endpoint_paths("unix:address=rs.sock", base) == \
        "unix:address=/etc/armsproxy/rs.sock"
    assert resolve_endpoint_paths("ssl:443:privateKey=a\\:b.key", base) == \
        "ssl:443:privateKey=/etc/armsproxy/a\\:b.key"
    assert resolve_endpoint_paths("tcp:8780:interface=127.0.0.1", base) == \
        "tcp:8780:interface=127.0.0.1"


def test_a_relative_configuration_serves_from_any_working_directory(short_dir):
    """twist started from / finds the keys and makes the socket and store beside the file."""
    port = free_port()
    conf = site_config(short_dir, port=port, rs_gate="unix:rs.sock")
    proc = subprocess.Popen([*TWIST, "armsproxy", "--config", str(conf)], env=env(), cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        store = short_dir / "state" / "armsproxy.sqlite"  # opened after the listeners bind
        while not (short_dir / "rs.sock").exists() or not _listening(port) \
                or not store.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        assert (short_dir / "state").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
    assert (short_dir / "state" / "armsproxy.sqlite").is_file()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# -- the start: one line per problem, status 1, no usage text, no traceback ---------------------

@pytest.mark.parametrize("runner", RUNNERS)
def test_configuration_errors_stop_the_start_with_one_line_each(tmp_path, runner):
    conf = site_config(tmp_path)
    for old, new, _ in TYPOS[:3]:
        edit(conf, old, new)
    edit(conf, "[push]\n", "[push]\nmax_attempts = six\n")
    out = start(runner, conf)
    assert out.returncode == 1
    assert sorted(out.stderr.splitlines()) == sorted(
        [f"armsproxy: {conf}: {problem}" for _, _, problem in TYPOS[:3]]
        + [f"armsproxy: {conf}: [sa_gate] public_urls: at least one URL is required",
           f"armsproxy: {conf}: [push] max_attempts: 'six' is not a whole number"])
    assert "Usage:" not in out.stdout + out.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_missing_certificate_names_its_key_and_path(tmp_path, runner):
    conf = site_config(tmp_path)
    (tmp_path / "keys" / "sa-gate.key").unlink()
    edit(conf, "sa_ca = keys/ca.pem", "sa_ca = keys/sa-ca.pem")
    out = start(runner, conf)
    assert out.returncode == 1
    keys = tmp_path / "keys"
    assert out.stderr.splitlines() == [
        f"armsproxy: {conf}: [push] sa_ca: {keys / 'sa-ca.pem'}: cannot read: No such file or "
        "directory",
        f"armsproxy: {conf}: [sa_gate] listen: privateKey={keys / 'sa-gate.key'}: cannot read: "
        "No such file or directory",
    ]
    assert "Traceback" not in out.stdout + out.stderr
    assert "Usage:" not in out.stdout + out.stderr


# -- armsproxyctl check-config -----------------------------------------------------------------

def test_check_config_passes_a_good_file_without_starting_anything(tmp_path):
    conf = site_config(tmp_path)
    out = check_config(conf)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"{conf}: ok\n", "")
    assert not (tmp_path / "state").exists()


def test_check_config_reports_every_problem_the_start_would_meet(tmp_path):
    conf = site_config(tmp_path)
    keys = tmp_path / "keys"
    other = pki.issue_server_cert(pki.make_ca("Another CA"), ["127.0.0.1"], "other")
    (keys / "other.key").write_text(other.key_pem)
    (keys / "no-key.pem").write_text(other.cert_pem)
    (keys / "not-pem.pem").write_text("hello\n")
    edit(conf, "privateKey=keys/sa-gate.key", "privateKey=keys/other.key")
    edit(conf, "[rs]\n", "[rs]\nca = keys/not-pem.pem\n")
    edit(conf, "[push]\n", "[push]\nclient_certificate = keys/no-key.pem\n")
    edit(conf, "[management]\nlisten = tcp:", "[management]\nlisten = tcpp:")
    (tmp_path / "state").mkdir()
    db = sqlite3.connect(tmp_path / "state" / "armsproxy.sqlite")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    out = check_config(conf)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    store = tmp_path / "state" / "armsproxy.sqlite"
    expected = [
        f"{conf}: [rs] ca: {keys / 'not-pem.pem'}: no PEM certificate in it",
        f"{conf}: [push] client_certificate: {keys / 'no-key.pem'}: no PEM private key in it "
        "(a client certificate file holds both)",
        f"{conf}: [armsproxy] data_dir: {store}: database schema version {SCHEMA_VERSION + 1} "
        f"is newer than this armsproxy ({SCHEMA_VERSION}); upgrade armsproxy or use another "
        "database",
    ]
    for line in expected:
        assert line in lines
    assert any(line.startswith(f"{conf}: [sa_gate] listen: ") for line in lines), lines
    assert any(line.startswith(f"{conf}: [management] listen: 'tcpp:") for line in lines), lines
    assert len(lines) == 5, lines
    # Nothing was touched: no -wal or -shm beside the store (a check run as root would leave
    # them unwritable to armsproxy's user).
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["armsproxy.sqlite"]


def test_check_config_names_the_file_of_a_file_level_problem(tmp_path):
    conf = edit(site_config(tmp_path), "public_urls = ", "public_url = ")
    missing = tmp_path / "nope.conf"
    out = check_config(conf, missing)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"{conf}: [sa_gate] public_url: unknown key (did you mean public_urls?)",
        f"{conf}: [sa_gate] public_urls: at least one URL is required",
        f"{missing}: No such file or directory",
    ]
