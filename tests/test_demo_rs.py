"""The demo RS over real HTTP and a real SQLite file: contract shapes, CLI, persistence."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import xmlrpc.client
from io import BytesIO
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, threads
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

import armsproxy
from armsproxy import pki
from armsproxy.demo_rs import cli
from armsproxy.demo_rs.db import SCHEMA_VERSION, DemoDB
from armsproxy.demo_rs.server import make_demo_rs_site

DISTID = "0001-0000-1A2B-0105-0000-0000-00C0-FFEE"
OTHER = "0001-0000-1A2B-0105-0000-0000-0000-0002"
UNKNOWN = "0001-0000-1A2B-0105-0000-0000-DEAD-BEEF"
TEXT_CONFIG = b"hostname edge-router-17\n\tinterface lan0 address 192.168.10.1/24\n"
BINARY_CONFIG = b"\x89CFG\x00\x01\xff\r\n"


@pytest.fixture(scope="module")
def ca_files(tmp_path_factory):
    return pki.ensure_dev_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])


@pytest.fixture(scope="module")
def template_db(tmp_path_factory, ca_files):
    """A database filled through the CLI once (issuing a certificate costs an RSA key)."""
    d = tmp_path_factory.mktemp("template")
    path = d / "rs.db"
    (d / "text.cfg").write_bytes(TEXT_CONFIG)
    (d / "bin.cfg").write_bytes(BINARY_CONFIG)
    argv = ["--db", str(path), "register", DISTID, "--key", "s3cret-key"]
    argv += ["--description", "edge router", "--push-port", "18450", "--push-timeout", "600"]
    argv += ["--module", "10:3.1:https://203.0.113.10/pkg/router-base"]
    argv += ["--module", "11:1.0:vpn", "--md-config", f"10:{d / 'text.cfg'}"]
    argv += ["--md-config", f"11:{d / 'bin.cfg'}", "--push-methods", "https-tunnel,https-simple"]
    assert cli.main(argv) == 0
    assert cli.main(["--db", str(path), "register", OTHER, "--key", "k2"]) == 0
    argv = ["--db", str(path), "issue-cert", DISTID]
    argv += ["--ca-cert", str(ca_files.ca_cert_path), "--ca-key", str(ca_files.ca_key_path)]
    assert cli.main(argv) == 0
    assert not path.with_name("rs.db-wal").exists()  # checkpointed on close: one file to copy
    return path


@pytest.fixture
def db_path(tmp_path, template_db):
    (tmp_path / "text.cfg").write_bytes(TEXT_CONFIG)
    path = tmp_path / "rs.db"
    shutil.copyfile(template_db, path)
    return path


@pytest_twisted.async_yield_fixture
async def rs(db_path):
    """(url, db) of a DemoRS Site listening on 127.0.0.1:0."""
    db = DemoDB(db_path, reactor=reactor)
    site = make_demo_rs_site(db, rs_push_server_addresses=["127.0.0.1"])
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/RPC2".encode(), db
    await port.stopListening()
    db.close()


def count_sas(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM sas").fetchone()[0]
    finally:
        conn.close()


class _Collect(protocol.Protocol):
    def __init__(self, done):
        self.done, self.chunks = done, []

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response) -> defer.Deferred:
    done = defer.Deferred()
    response.deliverBody(_Collect(done))
    return done


async def call(url: bytes, method: str, *params):
    """A tiny XML-RPC client: stdlib marshalling over Twisted's Agent."""
    body = xmlrpc.client.dumps(params, method).encode()
    response = await Agent(reactor).request(
        b"POST", url, Headers({b"content-type": [b"text/xml"]}), FileBodyProducer(BytesIO(body))
    )
    data = await read_body(response)
    assert response.code == 200
    (result,), _ = xmlrpc.client.loads(data, use_builtin_types=False)  # raises Fault
    return result


async def fault_of(url: bytes, method: str, *params) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as info:
        await call(url, method, *params)
    return info.value


PULL_INFO = {
    "trigger": "power on boot",
    "protocol_version": "4.0",
    "firmware_info": "FW 2.4.1",
    "description": "edge-router-17",
    "peer": "127.0.0.1:50000",
}


@pytest_twisted.ensureDeferred
async def test_sa_key_and_unknown_distid(rs):
    url, _ = rs
    assert await call(url, "arms.sa_key", DISTID) == "s3cret-key"
    assert await call(url, "arms.sa_key", OTHER) == "k2"
    for bad in (UNKNOWN, DISTID.lower()):
        fault = await fault_of(url, "arms.sa_key", bad)
        assert (fault.faultCode, fault.faultString) == (404, "unknown distribution id")


@pytest_twisted.ensureDeferred
async def test_config_solicitation_shape(rs, ca_files):
    url, _ = rs
    answer = await call(url, "arms.config_solicitation", DISTID, PULL_INFO)
    assert set(answer) == {
        "result_code", "sa_certificate", "sa_private_key", "push_port", "push_timeout",
        "heartbeats", "rs_push_server_addresses", "modules", "md_configs",
    }  # fmt: skip
    assert answer["result_code"] == 100
    cert = x509.load_pem_x509_certificate(answer["sa_certificate"].encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DISTID
    cert.verify_directly_issued_by(ca_files.ca.certificate)
    assert answer["sa_private_key"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert pki.CertKey(answer["sa_certificate"], answer["sa_private_key"]).key_matches()
    assert (answer["push_port"], answer["push_timeout"]) == (18450, 600)
    assert answer["heartbeats"] == [
        {
            "host": "127.0.0.1",
            "port": 10000,
            "passphrase": "demo",
            "interval": 60,
            "algorithms": ["hmac-sha1"],
        }
    ]
    assert answer["rs_push_server_addresses"] == ["127.0.0.1"]
    assert answer["modules"] == [
        {"id": 10, "version": "3.1", "install_order": 1,
         "location": "https://203.0.113.10/pkg/router-base"},
        {"id": 11, "version": "1.0", "install_order": 2, "location": "vpn"},
    ]  # fmt: skip
    text, binary = answer["md_configs"]
    assert text == {"id": 10, "commit_order": 1, "data": TEXT_CONFIG.decode()}
    assert set(binary) == {"id", "commit_order", "data"} and binary["id"] == 11
    assert isinstance(binary["data"], xmlrpc.client.Binary)
    assert binary["data"].data == BINARY_CONFIG


@pytest_twisted.ensureDeferred
async def test_config_solicitation_without_certificate_or_timeout(rs):
    url, _ = rs
    answer = await call(url, "arms.config_solicitation", OTHER, PULL_INFO)
    for absent in ("sa_certificate", "sa_private_key", "push_timeout", "proxy_urls"):
        assert absent not in answer
    assert answer["push_port"] == 10443
    assert answer["modules"] == [] and answer["md_configs"] == []
    assert len(answer["heartbeats"]) == 1  # the CLI default: never none (§6.2)
    fault = await fault_of(url, "arms.config_solicitation", UNKNOWN, PULL_INFO)
    assert fault.faultCode == 404


@pytest_twisted.ensureDeferred
async def test_config_solicitation_records_the_pull(rs):
    url, _ = rs
    await call(url, "arms.config_solicitation", DISTID, PULL_INFO)
    (sa,) = [s for s in await call(url, "demo.list_sas") if s["distid"] == DISTID]
    assert sa["last_pull"]["trigger"] == "power on boot"
    assert sa["last_pull"]["firmware_info"] == "FW 2.4.1"
    assert sa["last_pull"]["peer"] == "127.0.0.1:50000"


@pytest_twisted.ensureDeferred
async def test_push_method_query_filters_registered_preference(rs):
    url, _ = rs
    both = {"methods": ["https-simple", "https-tunnel"], "peer": "127.0.0.1:1"}
    answer = await call(url, "arms.push_method_query", DISTID, both)
    assert answer == {"result_code": 100, "methods": ["https-tunnel", "https-simple"]}
    simple_only = {"methods": ["https-simple"], "peer": "127.0.0.1:1"}
    answer = await call(url, "arms.push_method_query", DISTID, simple_only)
    assert answer == {"result_code": 100, "methods": ["https-simple"]}
    answer = await call(url, "arms.push_method_query", OTHER, both)
    assert answer["methods"] == ["https-simple", "https-tunnel"]  # default order
    assert (await fault_of(url, "arms.push_method_query", UNKNOWN, both)).faultCode == 404
    bad = {"methods": "https-simple"}
    assert (await fault_of(url, "arms.push_method_query", DISTID, bad)).faultCode == 400


@pytest_twisted.ensureDeferred
async def test_push_confirmation_is_recorded(rs):
    url, _ = rs
    info = {
        "method": "https-simple",
        "push_endpoint": "https://127.0.0.1:18450/",
        "peer": "127.0.0.1:40000",
    }
    assert await call(url, "arms.push_confirmation", DISTID, info) == {"result_code": 100}
    (sa,) = [s for s in await call(url, "demo.list_sas") if s["distid"] == DISTID]
    assert sa["last_confirmation"]["method"] == "https-simple"
    assert sa["last_confirmation"]["push_endpoint"] == "https://127.0.0.1:18450/"
    assert "certificate_sha256" in sa and "sa_private_key" not in sa
    assert (await fault_of(url, "arms.push_confirmation", UNKNOWN, info)).faultCode == 404


@pytest_twisted.ensureDeferred
async def test_events_are_stored_in_order_and_listed(rs):
    url, _ = rs
    first = {"kind": "operation.started", "operation_id": "op-1", "distribution_id": DISTID}
    second = {
        "kind": "operation.succeeded",
        "operation_id": "op-1",
        "raw": xmlrpc.client.Binary(b"<arms-message/>\x00"),
    }
    assert await call(url, "arms.event", first) is True
    assert await call(url, "arms.event", second) is True
    events = await call(url, "demo.events", 0)
    assert [e["event"]["kind"] for e in events] == ["operation.started", "operation.succeeded"]
    assert events[0]["event"] == first
    assert events[1]["event"]["raw"].data == b"<arms-message/>\x00"
    assert events[0]["seq"] < events[1]["seq"]
    assert events[0]["received_at"].endswith("+00:00")
    later = await call(url, "demo.events", events[0]["seq"])
    assert [e["seq"] for e in later] == [events[1]["seq"]]
    assert await call(url, "demo.events", events[1]["seq"]) == []
    assert (await fault_of(url, "arms.event", "not a struct")).faultCode == 400


@pytest_twisted.ensureDeferred
async def test_events_survive_a_restart(db_path):
    db = DemoDB(db_path, reactor=reactor)
    await db.add_event("2026-01-01T00:00:00.000+00:00", '{"kind": "sa.tunnel_up"}')
    db.close()
    db = DemoDB(db_path, reactor=reactor)
    try:
        (stored,) = await db.events(0)
        assert stored.json == '{"kind": "sa.tunnel_up"}'
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_database_work_runs_off_the_reactor_thread(rs):
    _, db = rs
    ident = await db.run(lambda cur: threading.get_ident())
    assert ident != threading.get_ident()


@pytest_twisted.ensureDeferred
async def test_introspection_lists_the_contract(rs):
    url, _ = rs
    methods = await call(url, "system.listMethods")
    for name in (
        "arms.sa_key",
        "arms.config_solicitation",
        "arms.push_method_query",
        "arms.push_confirmation",
        "arms.event",
        "demo.events",
        "demo.list_sas",
    ):
        assert name in methods
    assert (await fault_of(url, "arms.nope")).faultCode == 8001


def test_schema_is_versioned_and_wal(db_path):
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"sas", "modules", "md_configs", "heartbeats", "events"} <= tables
    finally:
        conn.close()


def test_register_again_replaces_definition_but_keeps_certificate(db_path, capsys):
    assert cli.main(["--db", str(db_path), "register", DISTID, "--key", "new-key"]) == 0
    conn = sqlite3.connect(db_path)
    try:
        key, cert = conn.execute(
            "SELECT key, sa_certificate FROM sas WHERE distid = ?", (DISTID,)
        ).fetchone()
        modules = conn.execute("SELECT COUNT(*) FROM modules WHERE distid = ?", (DISTID,))
        assert key == "new-key" and cert.startswith("-----BEGIN CERTIFICATE-----")
        assert modules.fetchone()[0] == 0
    finally:
        conn.close()
    capsys.readouterr()
    assert cli.main(["--db", str(db_path), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    (line,) = [line for line in out if line.startswith(DISTID)]
    assert len(out) == 2 and "modules=0" in line and "cert=-" not in line


@pytest.mark.parametrize(
    "extra",
    [
        ["register", "0001-0000-1a2b-0105-0000-0000-00c0-ffee", "--key", "k"],
        ["register", "0001-0000-1A2B-0105-0000-0000-00C0", "--key", "k"],
        ["register", UNKNOWN],  # --key missing
        ["register", UNKNOWN, "--key", "k" * 65],
        ["register", UNKNOWN, "--key", "k", "--module", "x:1.0:loc"],
        ["register", UNKNOWN, "--key", "k", "--module", "1:1.0"],
        ["register", UNKNOWN, "--key", "k", "--module", "1:1:a", "--module", "1:2:b"],
        ["register", UNKNOWN, "--key", "k", "--md-config", "1:{text}"],  # no module 1
        ["register", UNKNOWN, "--key", "k", "--module", "1:1:a", "--md-config", "1:/nonexistent"],
        ["register", UNKNOWN, "--key", "k", "--heartbeat", "host.example:1:p:60"],
        ["register", UNKNOWN, "--key", "k", "--heartbeat", "127.0.0.1:1:p:0"],
        ["register", UNKNOWN, "--key", "k", "--heartbeat", "127.0.0.1:1:p"],
        ["register", UNKNOWN, "--key", "k"] + ["--heartbeat", "127.0.0.1:1:p:60"] * 6,
        ["register", UNKNOWN, "--key", "k", "--heartbeat", "127.0.0.1:1:p:60",
         "--heartbeat", "127.0.0.2:1:p:30"],
        ["register", UNKNOWN, "--key", "k", "--push-methods", "https-simple,carrier-pigeon"],
        ["register", UNKNOWN, "--key", "k", "--push-methods", ""],
        ["register", UNKNOWN, "--key", "k", "--push-port", "70000"],
        ["issue-cert", UNKNOWN, "--ca-cert", "{ca_cert}", "--ca-key", "{ca_key}"],
        ["issue-cert", DISTID, "--ca-cert", "/nonexistent.pem", "--ca-key", "{ca_key}"],
        ["issue-cert", DISTID, "--ca-cert", "{ca_cert}", "--ca-key", "{text}"],
        ["serve", "--listen", "bogus:1"],
        ["no-such-command"],
        [],
    ],
)  # fmt: skip
def test_cli_validation_errors_exit_2_with_one_line(extra, db_path, ca_files, tmp_path, capsys):
    subst = {
        "text": str(tmp_path / "text.cfg"),
        "ca_cert": str(ca_files.ca_cert_path),
        "ca_key": str(ca_files.ca_key_path),
    }
    argv = ["--db", str(db_path)] + [a.format(**subst) for a in extra]
    before = count_sas(db_path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("armsproxy-demo-rs: error: ") and err.count("\n") == 1
    assert count_sas(db_path) == before


def test_cli_requires_db(capsys):
    assert cli.main(["list"]) == 2
    assert "--db" in capsys.readouterr().err


def test_cli_binary_detection():
    assert cli.is_text_config(b"a\tb\nc ~")
    for raw in (b"\r\n", b"\x00", "é".encode(), b"\x7f"):
        assert not cli.is_text_config(raw)


def _serve(db_path):
    """Run ``serve`` in a child process and return (process, port) once it listens."""
    env = dict(os.environ, PYTHONPATH=str(Path(armsproxy.__file__).parent.parent))
    args = [sys.executable, "-m", "armsproxy.demo_rs.cli", "--db", str(db_path)]
    args += ["serve", "--listen", "tcp:0:interface=127.0.0.1"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"demo RS listening on .*port=(\d+)", line)
        if found:
            return proc, int(found.group(1))
    raise AssertionError(f"serve exited with {proc.wait()} before listening")


@pytest_twisted.ensureDeferred
async def test_cli_serve_answers_and_stops_on_sigterm(db_path):
    proc, port = await threads.deferToThread(_serve, db_path)
    try:
        url = f"http://127.0.0.1:{port}/RPC2".encode()
        assert await call(url, "arms.sa_key", DISTID) == "s3cret-key"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await threads.deferToThread(proc.wait, 10)
        proc.stderr.close()
    assert code == 0
