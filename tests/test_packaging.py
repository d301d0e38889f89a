"""Production packaging: what an operator installs must be complete, private and documented.

The systemd unit must start armsproxy with options twist and the plugin accept, at the paths
the example configuration uses; the sdist and the wheel must carry the example configuration
and the unit; the databases holding keys must not be readable by other users; and the README
and the code may only point at files that are in the repository.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import docutils.core
import pytest
import pytest_twisted
from twisted.logger import LogLevel

import armsproxy
from armsproxy import pki, tap
from armsproxy.demo_rs import db as demo_db
from armsproxy.store.sqlite import SQLiteStore

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "etc" / "armsproxy.service"
CONF = ROOT / "etc" / "armsproxy.conf"
README = (ROOT / "README.rst").read_text()
# The repository's own top-level folders: a README path starting with one must exist.
SOURCE_DIRS = ("armsproxy", "bench", "docs", "etc", "schemas", "tests", "twisted")


# -- the systemd unit --------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    """The unit as section -> key -> values; systemd allows a key more than once."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _one(section: str, key: str) -> str:
    values = _unit()[section][key]
    assert len(values) == 1, (key, values)
    return values[0]


def test_unit_runs_armsproxy_as_its_own_user_and_restarts_it():
    service = _unit()["Service"]
    assert _one("Service", "User") == "armsproxy"
    assert _one("Service", "Group") == "armsproxy"
    assert _one("Service", "Restart") == "on-failure"
    assert int(_one("Service", "LimitNOFILE")) >= 65536
    assert _one("Install", "WantedBy") == "multi-user.target"
    # No root: the one capability is binding port 443.
    assert _one("Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert _one("Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert "ExecStartPre" not in service


def test_unit_is_hardened():
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("PrivateDevices", "yes"),
                       ("UMask", "0077"), ("StateDirectoryMode", "0700")]:
        assert _one("Service", key) == value, key
    assert set(_one("Service", "RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX"}
    filters = _unit()["Service"]["SystemCallFilter"]
    assert "@system-service" in filters
    # setrlimit (raising the descriptor limit) lives in @resources: it must not be denied.
    assert not any(f.startswith("~") and "@resources" in f for f in filters)
    # W^X memory breaks pyOpenSSL's cffi verify callbacks, so every push would fail.
    assert "MemoryDenyWriteExecute" not in _unit()["Service"]


def _execstart() -> list[str]:
    return shlex.split(_one("Service", "ExecStart"))


def test_execstart_is_twist_in_the_production_venv():
    argv = _execstart()
    assert argv[0] == "/opt/armsproxy/bin/twist"
    assert argv[argv.index("armsproxy") + 1:] == ["--config", "/etc/armsproxy/armsproxy.conf"]


def test_execstart_parses_with_twist_and_the_plugin(monkeypatch):
    # twist's own option parser, with our plugin as its sub-command: a typo in an option, an
    # option on the wrong side of the plugin name or a plugin twist cannot find fails here.
    from twisted.application.twist._options import TwistOptions

    loaded: list[Path] = []
    monkeypatch.setattr(tap, "load", lambda path: loaded.append(path) or "cfg")
    options = TwistOptions()
    options.parseOptions(_execstart()[1:])
    assert options.subCommand == "armsproxy"
    assert loaded == [Path("/etc/armsproxy/armsproxy.conf")]
    assert options.subOptions["cfg"] == "cfg"
    assert options["logFormat"] == "text"  # journald: JSON records start with a control byte
    assert options["logLevel"] == LogLevel.info


def _conf() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(CONF.read_text())
    return parser


def test_unit_directories_match_the_example_configuration():
    conf = _conf()
    state = "/var/lib/" + _one("Service", "StateDirectory")
    runtime = "/run/" + _one("Service", "RuntimeDirectory")
    logs = "/var/log/" + _one("Service", "LogsDirectory")
    config_dir = str(PurePosixPath(_execstart()[-1]).parent)
    assert conf["armsproxy"]["data_dir"] == state
    assert conf["rs_gate"]["listen"].startswith(f"unix:{runtime}/")
    assert _execstart()[-1] in CONF.read_text()  # its "Start with" line names the same file
    # ProtectSystem=strict: armsproxy may write only where systemd made it a directory, and
    # reads its certificates and keys beside the configuration.
    values = [re.sub(r"\w+://\S+", "", value)  # URLs are not files
              for section in conf.sections() for value in conf[section].values()]
    paths = [p for value in values for p in re.findall(r"(?<![\w/])/[\w./-]+", value)]
    assert paths, "no absolute paths found in the example"
    for path in paths:
        assert path.startswith((config_dir + "/", state + "/", runtime + "/", logs + "/")) \
            or path == state, path
    # Port 443 needs the capability the unit grants.
    port = int(re.match(r"ssl:(\d+):", conf["sa_gate"]["listen"]).group(1))
    assert port < 1024 and "CAP_NET_BIND_SERVICE" in _one("Service", "AmbientCapabilities")


# -- sdist and wheel ----------------------------------------------------------------------


def _copy_source(dest: Path) -> Path:
    """The working tree without build output, caches or the venv: a clean build input."""
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__",
                                    "dropin.cache", "armsproxy-data", ".pytest_cache", "*.pyc")
    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """Built as a packager does: the sdist first, then the wheel from the unpacked sdist."""
    tmp = tmp_path_factory.mktemp("dist")
    source = _copy_source(tmp / "src")
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                          str(tmp / "out"), str(source)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "out"


def _sdist_names(dist: Path) -> set[str]:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_carries_etc_docs_schemas_and_changelog(dist):
    names = _sdist_names(dist)
    for path in ["etc/armsproxy.conf", "etc/armsproxy.service", "CHANGELOG.rst",
                 "MANIFEST.in", "docs/arms-protocol.md", "docs/design.md", "docs/gates.svg",
                 "docs/gates.py", "schemas/arms.xsd", "twisted/plugins/armsproxy_plugin.py",
                 "tests/vectors/simple/index.json", "bench/pull.py"]:
        assert path in names, path
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_installs_the_example_config_and_the_unit(dist):
    (wheel,) = dist.glob("*.whl")
    data = f"armsproxy-{armsproxy.__version__}.data/data/"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        for path in ["armsproxy/schemas/arms.xsd", "twisted/plugins/armsproxy_plugin.py",
                     data + "share/doc/armsproxy/CHANGELOG.rst",
                     data + "share/doc/armsproxy/arms-protocol.md"]:
            assert path in names, path
        # Byte for byte what the repository ships (the wheel was built from the sdist).
        assert whl.read(data + "share/armsproxy/armsproxy.conf") == CONF.read_bytes()
        assert whl.read(data + "share/armsproxy/armsproxy.service") == UNIT.read_bytes()
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/"))]


# -- databases and keys are private --------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that leaves files world-readable, as many hosts have: modes must not rely on it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private(path: Path) -> None:
    assert _mode(path) == 0o600, f"{path}: {oct(_mode(path))}"


@pytest_twisted.ensureDeferred
async def test_store_database_and_its_wal_are_created_0600(tmp_path, open_umask):
    path = tmp_path / "armsproxy.sqlite"
    store = SQLiteStore(path)
    await store.open()
    try:
        for name in ("armsproxy.sqlite", "armsproxy.sqlite-wal", "armsproxy.sqlite-shm"):
            _private(tmp_path / name)
    finally:
        await store.close()


def test_demo_rs_database_and_its_wal_are_created_0600(tmp_path, open_umask):
    path = tmp_path / "demo-rs.sqlite"
    conn = demo_db.connect(path)
    try:
        demo_db.add_event(conn.cursor(), "now", "{}")
        conn.commit()
        for name in ("demo-rs.sqlite", "demo-rs.sqlite-wal", "demo-rs.sqlite-shm"):
            _private(tmp_path / name)
    finally:
        conn.close()


def test_demo_rs_server_database_is_0600_before_its_first_query(tmp_path, open_umask):
    # The server's pool connects in its own thread later; the file must not appear 0644 then.
    db = demo_db.DemoDB(tmp_path / "demo-rs.sqlite")
    try:
        _private(tmp_path / "demo-rs.sqlite")
    finally:
        db.close()


def test_demo_rs_database_left_readable_is_tightened(tmp_path, open_umask):
    path = tmp_path / "demo-rs.sqlite"
    demo_db.connect(path).close()
    os.chmod(path, 0o644)
    demo_db.connect(path).close()
    _private(path)


def test_dev_pki_keys_are_0600_in_a_0700_directory(tmp_path, open_umask):
    dev = pki.ensure_dev_pki(tmp_path / "pki", ["127.0.0.1"])
    assert _mode(dev.directory) == 0o700
    _private(dev.ca_key_path)
    _private(dev.server_key_path)
    assert _mode(dev.ca_cert_path) == 0o644  # handed out to devices


# -- documents -----------------------------------------------------------------------------


def _readme_paths() -> set[str]:
    """Repository paths the README names (``/etc/...`` and other absolute paths are not)."""
    dirs = "|".join(SOURCE_DIRS)
    found = set(re.findall(rf"(?<![\w/.-])((?:{dirs})/[\w./*-]*)", README))
    found |= set(re.findall(r"(?<![\w/.-])([A-Z]+\.(?:rst|in)|setup\.cfg|pyproject\.toml)\b",
                            README))
    return {p.rstrip(".") for p in found}


def test_every_path_the_readme_names_is_in_the_repository():
    paths = _readme_paths()
    assert {"docs/gates.svg", "docs/arms-protocol.md", "etc/armsproxy.service",
            "CHANGELOG.rst"} <= paths
    missing = [p for p in sorted(paths) if not list(ROOT.glob(p.rstrip("/")))]
    assert not missing


def test_documents_the_code_cites_are_in_docs():
    # "§N" and "design.md §N" must lead somewhere a reader of this repository can open.
    cited: dict[str, set[str]] = {}
    for folder in ("armsproxy", "tests", "bench", "schemas", "etc"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".xsd", ".conf", ".service"):
                for name in re.findall(r"\b([\w-]+\.md)\b", path.read_text(errors="replace")):
                    cited.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "design.md" in cited and "arms-protocol.md" in cited
    assert not {name: where for name, where in cited.items() if not (ROOT / "docs" / name).exists()}
    assert "docs/arms-protocol.md" in README and "§N" in README


def _gates_module() -> object:
    spec = importlib.util.spec_from_file_location("gates", ROOT / "docs" / "gates.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gates_picture_is_current_parses_and_is_in_the_readme():
    svg = (ROOT / "docs" / "gates.svg").read_text()
    assert svg == _gates_module().svg(), "run python docs/gates.py"
    root = ElementTree.fromstring(svg.encode())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = " ".join(root.itertext())
    for label in ("SA gate :443", "RS gate :8780", "management :8781", "https-tunnel"):
        assert label in text, label
    assert ".. image:: docs/gates.svg" in README


def test_changelog_renders_and_names_the_current_version():
    text = (ROOT / "CHANGELOG.rst").read_text()
    docutils.core.publish_doctree(text, settings_overrides={"halt_level": 2, "report_level": 2})
    titles = re.findall(r"^(.+)\n=+$", text, re.M)
    assert titles[:3] == ["Changelog", "Unreleased", armsproxy.__version__]
