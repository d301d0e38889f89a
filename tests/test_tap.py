"""The product as an operator runs it: the twistd plugin, the embedded default, etc/ examples.

Devices are played by the SA simulator over real TLS; the RS is the demo RS on real SQLite.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from conftest import http_get
from twisted.internet import reactor, threads
from twisted.python import usage

from armsproxy import pki
from armsproxy.config import Config, ConfigError, load
from armsproxy.demo_rs import cli as demo_cli
from armsproxy.device import SimulatedSA
from armsproxy.tap import Options, build_services

ROOT = Path(__file__).parent.parent
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_twistd_lists_the_plugin_and_its_options():
    out = subprocess.run([*TWISTD, "--help"], env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert "armsproxy" in out.stdout
    out = subprocess.run([*TWISTD, "armsproxy", "--help"], env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--data-dir", "--port", "--rs-port", "--tls-minimum-version"):
        assert option in out.stdout


def test_plugin_module_has_no_package_init():
    assert (ROOT / "twisted" / "plugins" / "armsproxy_plugin.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "__init__.py").exists()


def test_bad_config_is_refused_with_a_clear_message(tmp_path):
    conf = tmp_path / "bad.conf"
    text = (ROOT / "etc" / "armsproxy.conf").read_text()
    conf.write_text(text.replace("https://203.0.113.20/arms", "https://proxy.example.net/arms"))
    out = subprocess.run([*TWISTD, "-n", "--pidfile=", "armsproxy", "--config", str(conf)],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "literal IP address" in out.stdout + out.stderr


def test_a_device_as_logfile_is_refused_before_twistd_can_rotate_it(tmp_path):
    # twistd renames its log file every 1 MB; as root, --logfile=/dev/null once replaced the
    # host's /dev/null with a regular file.
    out = subprocess.run([*TWISTD, "-n", "--pidfile=", "--logfile=/dev/null", "armsproxy",
                          "--data-dir", str(tmp_path / "data")],
                         env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--logfile /dev/null is not a regular file" in out.stdout + out.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_logfile_check_accepts_files_stdout_and_no_logfile(tmp_path):
    existing = tmp_path / "existing.log"
    existing.write_text("old line\n")
    for logfile in (str(tmp_path / "new.log"), str(existing), "-", "", None):
        _options_with_parent(logfile).parseOptions(["--data-dir", str(tmp_path / "data")])
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit, match="not a regular file"):
        _options_with_parent(str(fifo)).parseOptions([])


def test_the_embedded_default_has_a_switch_for_tls_1_0_devices(tmp_path, logs):
    options = _options_with_parent(None)
    options.parseOptions(["--data-dir", str(tmp_path / "modern")])
    assert options["cfg"].tls_minimum_version == "1.2"
    build_services(options["cfg"], reactor)  # built, not started: nothing listens
    assert not logs.find("accepts TLS")
    options = _options_with_parent(None)
    options.parseOptions(["--data-dir", str(tmp_path / "data"), "--tls-minimum-version", "1.0"])
    cfg = options["cfg"]
    assert cfg.tls_minimum_version == "1.0"
    cfg.tunnel_listen = cfg.sa_listen  # a second device listener under the same policy
    build_services(cfg, reactor)
    # One setting, one warning, for the SA gate, the tunnel listener and the push client.
    assert len(logs.find("SA gate accepts TLS 1.0 and the push client offers it",
                         "both directions", level="warn")) == 1
    with pytest.raises(usage.UsageError, match="tls_minimum_version"):
        _options_with_parent(None).parseOptions(
            ["--data-dir", str(tmp_path / "data"), "--tls-minimum-version", "1.4"])
    with pytest.raises(usage.UsageError, match=r"with --config set \[sa_gate\] tls_minimum"):
        _options_with_parent(None).parseOptions(
            ["--config", str(ROOT / "etc" / "armsproxy.conf"), "--tls-minimum-version", "1.0"])


def _options_with_parent(logfile: str | None) -> Options:
    options = Options()
    options.parent = {} if logfile is None else {"logfile": logfile}
    return options


TWIST = [sys.executable, "-c",
         "import sys; from twisted.application.twist._twist import Twist; sys.exit(Twist.main())"]


@pytest.mark.parametrize("runner", ["twistd", "twist"])
@pytest.mark.parametrize("option", ["--port", "--rs-port", "--rs-gate-port", "--management-port"])
def test_a_listener_that_cannot_bind_stops_the_start(tmp_path, option, runner):
    # Not a logged error while armsproxy runs on without that gate (twist did, for the RS
    # gate), nor a traceback: status 1 and one line naming the listener by its option.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": _free_port(), "--rs-port": _free_port(),
                 "--rs-gate-port": _free_port(), "--management-port": _free_port(), option: busy}
        command = [*TWISTD, "-n", "--pidfile="] if runner == "twistd" else TWIST
        out = subprocess.run(
            [*command, "armsproxy", "--data-dir", str(tmp_path / "data"),
             *(str(x) for item in ports.items() for x in item)],
            env=_env(), capture_output=True, text=True, timeout=60)
    kind = "ssl" if option == "--port" else "tcp"
    both = out.stdout + out.stderr
    assert out.returncode == 1, both
    assert both.count(f"armsproxy: {option} {kind}:{busy}:interface=127.0.0.1: cannot listen: "
                      "Address already in use") == 1, both
    assert "Traceback" not in both


def _register(db: Path, pki_dir: Path) -> None:
    assert demo_cli.main(["--db", str(db), "register", DISTID, "--key", KEY,
                          "--module", "1:1.0.0:harness-module"]) == 0
    assert demo_cli.main(["--db", str(db), "issue-cert", DISTID,
                          "--ca-cert", str(pki_dir / "ca.pem"),
                          "--ca-key", str(pki_dir / "ca.key")]) == 0


async def _device_sequence(url: str, ca_pem: bytes, tunnel_url: str | None = None) -> None:
    sa = SimulatedSA(reactor, DISTID, KEY, ca_pem=ca_pem, response_timeout=10.0)
    pull = await sa.config_solicitation(url)
    assert pull.verdict.outcome == "success", pull.verdict.describe()
    assert pull.verdict.rs_pull_server_urls == [url]
    query = await sa.push_method_query(url)
    assert query.verdict.outcome == "success", query.verdict.describe()
    if tunnel_url is None:
        assert query.verdict.push_methods == ["https-simple"]
    else:  # the demo RS prefers https-simple, then https-tunnel
        assert query.verdict.push_methods == ["https-simple", "https-tunnel"]
        assert query.verdict.https_tunnel_urls == [tunnel_url]
    confirm = await sa.push_confirmation_start(url)
    assert confirm.verdict.outcome == "success", confirm.verdict.describe()
    assert confirm.verdict.transaction_id and confirm.verdict.transaction_id > 0
    wrong = SimulatedSA(reactor, DISTID, "wrong-key", ca_pem=ca_pem, response_timeout=10.0)
    refused = await wrong.config_solicitation(url)
    assert refused.status == 401


@pytest_twisted.ensureDeferred
async def test_embedded_default_serves_a_device(tmp_path):
    port, rs_port, gate_port, management_port = (_free_port() for _ in range(4))
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "armsproxy", "--data-dir", str(data),
         "--port", str(port), "--rs-port", str(rs_port), "--rs-gate-port", str(gate_port),
         "--management-port", str(management_port)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        banner = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            banner.append(line)
            if "starting on" in line and str(port) in line:
                break
            assert proc.poll() is None, "".join(banner)
        text = "".join(banner)
        assert f"https://127.0.0.1:{port}/arms" in text
        assert "rs-certificate" in text and str(data / "pki" / "ca.pem") in text
        _register(data / "demo-rs.sqlite", data / "pki")
        await _device_sequence(f"https://127.0.0.1:{port}/arms",
                               (data / "pki" / "ca.pem").read_bytes(),
                               tunnel_url=f"https://127.0.0.1:{port}/arms-tunnel")
        assert f"management (/healthz, /readyz, /metrics):      tcp:{management_port}:" in text
        assert await _http_get(management_port, "/healthz") == "ok\n"
        metrics = await _http_get(management_port, "/metrics")
        assert 'armsproxy_sa_gate_refusals_total{reason="unauthorized"} 1' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    # twistd re-raises the signal after an orderly shutdown.
    assert proc.returncode in (0, -signal.SIGTERM), rest
    assert "Server Shut Down" in rest
    assert "Traceback" not in rest, rest


def test_tunnel_listen_needs_ssl_and_tunnel_urls(tmp_path):
    text = (ROOT / "etc" / "armsproxy.conf").read_text()
    assert "\n# tunnel_listen = ssl:8443:" in text
    conf = tmp_path / "armsproxy.conf"
    conf.write_text(text.replace("# tunnel_listen = ssl:8443:", "tunnel_listen = ssl:8443:"))
    with pytest.raises(ConfigError, match=r"tunnel_listen: set \[push\] tunnel_urls too"):
        load(conf)
    tunnels = "tunnel_urls = https://203.0.113.20:8443/arms-tunnel"
    conf.write_text(text.replace("# tunnel_listen = ssl:8443:", "tunnel_listen = ssl:8443:")
                    .replace("# tunnel_urls = https://203.0.113.20/arms-tunnel", tunnels))
    cfg = load(conf)
    assert cfg.tunnel_listen.startswith("ssl:8443:") and cfg.tunnel_urls
    conf.write_text(text.replace("# tunnel_listen = ssl:8443:", "tunnel_listen = tcp:8443:")
                    .replace("# tunnel_urls = https://203.0.113.20/arms-tunnel", tunnels))
    with pytest.raises(ConfigError, match="tunnel_listen: must be an ssl: endpoint"):
        load(conf)


def test_etc_example_loads():
    cfg = load(ROOT / "etc" / "armsproxy.conf")
    assert cfg.management_listen == "tcp:8781:interface=127.0.0.1"
    assert cfg.sa_listen.startswith("ssl:443:")
    assert cfg.public_urls == ["https://203.0.113.20/arms"]
    assert cfg.tls_minimum_version == "1.2"
    assert cfg.rs_url.startswith("https://")
    assert cfg.sa_paths == frozenset({"/arms"})
    assert (cfg.done_timeout, cfg.interrupted_grace) == (900, 120)
    # The TLS 1.0 opt-in is shown, commented.
    assert re.search(r"^# tls_minimum_version = 1\.0$",
                     (ROOT / "etc" / "armsproxy.conf").read_text(), re.M)


async def _http_get(port: int, path: str) -> str:
    answer = await http_get(port, path)
    assert answer.status == 200, answer
    return answer.body


def _rs_gate_version(socket_path: str) -> str:
    import http.client
    import xmlrpc.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(socket_path)

    class UnixTransport(xmlrpc.client.Transport):
        def make_connection(self, host):
            self.close()  # kept in _connection, as the base class does, so close() closes it
            self._connection = host, UnixConnection("localhost")
            return self._connection[1]

    with xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport()) as proxy:
        return proxy.arms.interface_version()


@pytest_twisted.ensureDeferred
async def test_etc_example_runs_with_real_files(tmp_path):
    """The production example, with its paths and addresses swapped for this machine."""
    ca = pki.make_ca("ARMS Root CA test")
    server = pki.issue_server_cert(ca, ["127.0.0.1"], "armsproxy test")
    for name, text in (("sa-gate.pem", server.cert_pem), ("sa-gate.key", server.key_pem),
                       ("sa-gate-chain.pem", ca.cert_pem), ("ca.pem", ca.cert_pem),
                       ("sa-ca.pem", ca.cert_pem),
                       ("ca.key", ca.key_pem)):
        (tmp_path / name).write_text(text)
    port, rs_port = _free_port(), _free_port()
    text = (ROOT / "etc" / "armsproxy.conf").read_text()
    text = text.replace("/etc/armsproxy/", f"{tmp_path}/").replace("ssl:443:", f"ssl:{port}:")
    text = text.replace("https://203.0.113.20/arms", f"https://127.0.0.1:{port}/arms")
    text = re.sub(r"^url = .*$", f"url = http://127.0.0.1:{rs_port}/RPC2", text, flags=re.M)
    text = re.sub(r"^ca = .*$", "", text, flags=re.M)
    text = text.replace("/var/lib/armsproxy", str(tmp_path / "state"))
    text = text.replace("unix:/run/armsproxy/rs.sock", f"unix:{tmp_path}/rs.sock")
    management_port = _free_port()
    text = text.replace("tcp:8781:", f"tcp:{management_port}:")
    text += (f"\n[demo_rs]\nenabled = yes\nlisten = tcp:{rs_port}:interface=127.0.0.1\n"
             f"db = {tmp_path / 'rs.sqlite'}\n")
    conf = tmp_path / "armsproxy.conf"
    conf.write_text(text)
    conf.write_text(text.replace("interrupted_grace = 120", "interrupted_grace = 7"))
    cfg = load(conf)
    assert isinstance(cfg, Config)
    top = build_services(cfg, reactor)
    assert top.engine.settings.interrupted_grace == 7  # the key reaches the engine
    top.startService()
    try:
        _register(tmp_path / "rs.sqlite", tmp_path)
        await _device_sequence(f"https://127.0.0.1:{port}/arms", ca.cert_pem.encode())
        # The RS gate of the example answers on its unix socket.
        version = await threads.deferToThread(_rs_gate_version, str(tmp_path / "rs.sock"))
        assert version == "1.0"
        # And its management gate reports the device's requests.
        metrics = await _http_get(management_port, "/metrics")
        assert 'armsproxy_sa_gate_requests_total{type="config-solicitation"} 1' in metrics
        assert await _http_get(management_port, "/readyz") == "ready\n"
    finally:
        await top.stopService()
