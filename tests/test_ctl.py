"""``armsproxyctl ops|sa|backup`` against a real RS gate (TCP, unix socket, TLS with client
certificates) over a real SQLite store, and ``backup`` of a store being written.

The gate's engine runs with ``max_in_flight=0`` (it stores orders, never sends), so every state
the CLI shows is one the test put in the store. The CLI is blocking: it runs in a thread while
the reactor serves the gate.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import stat
import tempfile
import threading
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor, task, threads

from armsproxy.push.engine import PushEngine, PushSettings
from armsproxy.rs_gate import RSGate
from armsproxy.store import SQLiteStore
from armsproxy.store.model import NewOperation
from armsproxy.tools import ctl
from armsproxy.tools.rs_gate_client import GateError, parse_address
from tests import test_rs_gate as base
from tests.test_rs_gate import Keys, serve

SA_A = "0001-0000-1A2B-0105-0000-0000-0000-000A"
SA_B = "0001-0000-1A2B-0105-0000-0000-0000-000B"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
RESULT_URL = "https://127.0.0.1:8443/arms"
PING = {"distribution_id": SA_A, "operation": "ping", "params": {"address": "192.0.2.1"}}
CONFIGURE = {
    "distribution_id": SA_B, "operation": "configure",
    "params": {"modules": [{"id": 1, "version": "1.0", "location": "https://192.0.2.5/m1"}],
               "md_configs": [{"id": 1, "data": xmlrpc.client.Binary(b"\x00conf\xff")}]},
    "sa_url": "https://192.0.2.20:10443/", "method": "https-simple",
}


# ---------------------------------------------------------------------------------------------
# The parts: a gate on a real store, a configuration file, the CLI in a thread
# ---------------------------------------------------------------------------------------------


class NeverSends:
    async def push(self, url, **kwargs):
        raise AssertionError("the engine sent something")


# test_rs_gate's clock and store fixtures, shared (assigned: pytest finds fixtures by name).
clock = base.clock
store = base.store


@pytest.fixture
def gate(store, clock):
    engine = PushEngine(store=store, client=NeverSends(), keys=Keys(), clock=clock,
                        settings=PushSettings(result_url=RESULT_URL, max_in_flight=0))
    return RSGate(engine, store, clock=clock)


def write_config(folder: Path, listen: str, *, client_ca: Path | None = None,
                 store: Path | None = None) -> Path:
    """A configuration as an operator writes it; only [rs_gate] and [store] matter here."""
    ca = folder / "sa-ca.pem"
    ca.write_bytes(trustme.CA().cert_pem.bytes())
    lines = [
        "[armsproxy]", f"data_dir = {folder}",
        "[sa_gate]", "listen = ssl:8443:privateKey=server.key",
        f"public_urls = {RESULT_URL}",
        "[rs]", "url = http://127.0.0.1:8790/RPC2",
        "[push]", f"sa_ca = {ca}",
        "[rs_gate]", f"listen = {listen}",
    ]
    if client_ca is not None:
        lines.append(f"client_ca = {client_ca}")
    if store is not None:
        lines += ["[store]", f"path = {store}"]
    path = folder / "armsproxy.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


@pytest.fixture
def ctl_run(capsys):
    async def run(*argv) -> Ran:
        capsys.readouterr()
        code = await threads.deferToThread(ctl.main, [str(a) for a in argv])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


@pytest_twisted.async_yield_fixture
async def tcp(gate, tmp_path):
    """A gate on loopback TCP and a configuration naming it: (config path, port)."""
    svc, port = await serve("tcp:0:interface=127.0.0.1", gate)
    number = port.getHost().port
    yield write_config(tmp_path, f"tcp:{number}:interface=127.0.0.1"), number
    await svc.stopService()


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="ctl", dir="/tmp")  # AF_UNIX paths are short
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


async def submit(gate: RSGate, order: dict) -> str:
    return await gate.submit(dict(order))


async def finish(store, operation_id: str, state: str, **changes):
    """Move a queued operation through sending to ``state`` as the engine would."""
    assert await store.transition(operation_id, expect={"queued"}, state="sending",
                                  changes={"attempts": 1})
    raws = changes.pop("raws", [])
    for raw in raws[:-1]:
        assert await store.transition(operation_id, expect={"sending"}, state="sending",
                                      raw=raw)
    assert await store.transition(operation_id, expect={"sending"}, state=state,
                                  changes=changes, raw=raws[-1] if raws else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# ops list
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ops_list_is_a_table_filtered_by_state_and_sa(tcp, gate, store, clock, ctl_run):
    config, _ = tcp
    first = await submit(gate, PING)
    clock.advance(60)
    second = await submit(gate, CONFIGURE)
    clock.advance(60)
    third = await submit(gate, dict(PING, params={"address": "192.0.2.2"}))
    clock.advance(5)
    await finish(store, second, "failed", last_error="unreachable")

    ran = await ctl_run("ops", "list", "--config", config)
    assert (ran.code, ran.err) == (0, "")
    assert ran.out == (
        f"ID{' ' * 32}STATE   OPERATION  DISTRIBUTION ID{' ' * 26}ATTEMPTS  UPDATED\n"
        f"{first}  queued  ping       {SA_A}  0         2023-11-14T22:13:20Z\n"
        f"{second}  failed  configure  {SA_B}  1         2023-11-14T22:15:25Z\n"
        f"{third}  queued  ping       {SA_A}  0         2023-11-14T22:15:20Z\n"
    )

    def ids(out: str) -> list[str]:
        return [line.split()[0] for line in out.splitlines()[1:]]

    ran = await ctl_run("ops", "list", "--state", "failed", "--config", config)
    assert ids(ran.out) == [second]
    ran = await ctl_run("ops", "list", "--state", "queued,failed", "--sa", SA_A,
                        "--config", config)
    assert ids(ran.out) == [first, third]
    ran = await ctl_run("ops", "list", "--state", "queued", "--state", "cancelled",
                        "--config", config)
    assert ids(ran.out) == [first, third]
    ran = await ctl_run("ops", "list", "--state", "cancelled", "--config", config)
    assert (ran.code, ran.out) == (0, "no operations\n")
    # --limit: the most recent N, and a note on stderr that there are more.
    ran = await ctl_run("ops", "list", "--limit", "1", "--config", config)
    assert ids(ran.out) == [third]
    assert ran.err == "(the last 1 of 3; --limit 0 shows all)\n"

    ran = await ctl_run("ops", "list", "--json", "--config", config)
    listed = ran.json
    assert [op["operation_id"] for op in listed] == [first, second, third]
    assert listed[1] == {
        "operation_id": second, "distribution_id": SA_B, "operation": "configure",
        "state": "failed", "attempts": 1, "created_at": T0 + 60, "updated_at": T0 + 125,
        "not_before": T0 + 60, "expires_at": T0 + 60 + 86400, "last_error": "unreachable",
        "forgotten": False,
    }


@pytest_twisted.ensureDeferred
async def test_ops_list_pages_through_everything(tcp, gate, ctl_run):
    config, _ = tcp
    ids = [await submit(gate, dict(PING, request_id=f"p{i}")) for i in range(1005)]
    ran = await ctl_run("ops", "list", "--limit", "0", "--json", "--config", config)
    assert [op["operation_id"] for op in ran.json] == ids
    ran = await ctl_run("ops", "list", "--limit", "2", "--json", "--config", config)
    assert [op["operation_id"] for op in ran.json] == ids[-2:]


# ---------------------------------------------------------------------------------------------
# ops show
# ---------------------------------------------------------------------------------------------


START = {"kind": "start", "at": T0 + 1, "status": 200,
         "request": '<arms-message><arms-request type="ping-start"/></arms-message>',
         "answer": '<arms-message><arms-response type="ping-start"><result-code>100'
                   "</result-code></arms-response></arms-message>"}
DONE = {"kind": "done", "at": T0 + 5,
        "request": '<arms-message><arms-request type="ping-done"/></arms-message>'}


@pytest_twisted.ensureDeferred
async def test_ops_show_prints_status_result_and_the_exchanges(tcp, gate, store, clock,
                                                              ctl_run):
    config, _ = tcp
    op = await submit(gate, dict(PING, request_id="show-me"))
    clock.advance(5)
    result = {"success": 3, "failure": 1, "blob": b"\x00\xff", "text": b"plain text",
              "dones": [{"transaction_result": 100, "at": T0 + 5}]}
    await finish(store, op, "succeeded", raws=[START, DONE], sa_transaction_id=7,
                 start_result_code=100, transaction_result=100, result_code=100,
                 result=result)

    sizes = [len(START["request"]), len(START["answer"]), len(DONE["request"])]
    ran = await ctl_run("ops", "show", op, "--config", config)
    assert (ran.code, ran.err) == (0, "")
    assert ran.out == f"""\
operation_id        {op}
request_id          show-me
distribution_id     {SA_A}
operation           ping
state               succeeded
attempts            1
created_at          2023-11-14T22:13:20Z
updated_at          2023-11-14T22:13:25Z
not_before          2023-11-14T22:13:20Z
expires_at          2023-11-15T22:13:20Z
start_result_code   100
sa_transaction_id   7
transaction_result  100
result_code         100
forgotten           no

result:
  {{
    "success": 3,
    "failure": 1,
    "blob": "<2 bytes, base64 AP8=>",
    "text": "plain text",
    "dones": [
      {{
        "transaction_result": 100,
        "at": "2023-11-14T22:13:25Z"
      }}
    ]
  }}

raw: 2 exchange(s):
  2023-11-14T22:13:21Z  start  ping-start: HTTP 200, result-code 100 (request {sizes[0]} \
bytes, answer {sizes[1]} bytes)
  2023-11-14T22:13:25Z  done   ping-done (request {sizes[2]} bytes)
"""
    ran = await ctl_run("ops", "show", op, "--json", "--config", config)
    shown = ran.json
    assert shown["state"] == "succeeded" and shown["updated_at"] == T0 + 5
    assert shown["result"]["blob"] == "AP8="  # Binary: base64 text
    assert shown["result"]["text"] == "cGxhaW4gdGV4dA=="
    assert shown["raw"] == [START, DONE]
    assert shown["order"] == {"params": {"address": "192.0.2.1"}}


@pytest_twisted.ensureDeferred
async def test_ops_show_of_unfinished_forgotten_and_unknown(tcp, gate, store, ctl_run):
    config, _ = tcp
    queued = await submit(gate, PING)
    ran = await ctl_run("ops", "show", queued, "--config", config)
    assert ran.code == 0
    assert ran.out.endswith("forgotten           no\n\nresult: none yet\n\nraw: 0 exchange(s)\n")

    await finish(store, queued, "failed", last_error="gave up", result={"x": 1})
    await gate.forget(queued)
    ran = await ctl_run("ops", "show", queued, "--config", config)
    assert ran.code == 0 and "last_error          gave up\n" in ran.out
    assert ran.out.endswith("forgotten           yes\n\nresult: forgotten (push.forget, or "
                            "older than [store] results_ttl)\n")
    ran = await ctl_run("ops", "show", queued, "--json", "--config", config)
    assert ran.json["forgotten"] is True and "result" not in ran.json

    ran = await ctl_run("ops", "show", "nope", "--config", config)
    assert (ran.code, ran.out, ran.err) == (1, "", "armsproxyctl: unknown operation_id 'nope'\n")


# ---------------------------------------------------------------------------------------------
# ops cancel / ops retry
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ops_cancel(tcp, gate, store, ctl_run):
    config, _ = tcp
    queued = await submit(gate, PING)
    ran = await ctl_run("ops", "cancel", queued, "--config", config)
    assert (ran.code, ran.out, ran.err) == (0, f"{queued}: cancelled\n", "")
    assert (await store.get(queued)).state == "cancelled"
    ran = await ctl_run("ops", "cancel", queued, "--config", config)
    assert (ran.code, ran.out) == (0, f"{queued}: already cancelled\n")

    done = await submit(gate, dict(PING, request_id="done"))
    await finish(store, done, "succeeded")
    ran = await ctl_run("ops", "cancel", done, "--config", config)
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (f"armsproxyctl: {done} not cancelled: it is succeeded (only a queued "
                       "operation can be cancelled)\n")
    assert (await store.get(done)).state == "succeeded"

    other = await submit(gate, dict(PING, request_id="json"))
    ran = await ctl_run("ops", "cancel", other, "--json", "--config", config)
    assert ran.code == 0
    assert ran.json == {"operation_id": other, "cancelled": True, "state": "cancelled"}


@pytest_twisted.ensureDeferred
async def test_ops_retry_resubmits_a_failed_or_expired_order_as_a_new_one(tcp, gate, store,
                                                                        ctl_run):
    config, _ = tcp
    failed = await submit(gate, dict(CONFIGURE, request_id="first-try"))
    await finish(store, failed, "failed", last_error="SA unreachable")
    ran = await ctl_run("ops", "retry", failed, "--config", config)
    assert (ran.code, ran.err) == (0, "")
    new_id = ran.out.strip()
    assert new_id and new_id != failed
    old, new = await store.get(failed), await store.get(new_id)
    assert new.state == "queued" and old.state == "failed"
    assert (new.distribution_id, new.operation, new.params, new.sa_url, new.method) == (
        old.distribution_id, old.operation, old.params, old.sa_url, old.method)
    assert new.params["md_configs"][0]["data"] == b"\x00conf\xff"  # Binary survives
    assert new.request_id.startswith(f"retry-of-{failed}-")

    # Twice: two new operations (each retry is a fresh request_id).
    ran = await ctl_run("ops", "retry", failed, "--json", "--config", config)
    again = ran.json
    assert again["retry_of"] == failed and again["operation_id"] not in (failed, new_id)
    assert again["request_id"].startswith(f"retry-of-{failed}-")
    assert (await store.get(again["operation_id"])).state == "queued"

    expired = await submit(gate, dict(PING, request_id="late"))
    assert await store.transition(expired, expect={"queued"}, state="expired")
    ran = await ctl_run("ops", "retry", expired, "--config", config)
    assert ran.code == 0
    retried = await store.get(ran.out.strip())
    assert (retried.operation, retried.params, retried.sa_url, retried.method) == (
        "ping", {"address": "192.0.2.1"}, None, None)

    # Refused: not finished, finished well, forgotten, unknown. Nothing new is stored.
    count = len(await store.list_operations(limit=1000))
    ran = await ctl_run("ops", "retry", new_id, "--config", config)
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (f"armsproxyctl: {new_id} is queued: only a failed or expired operation "
                       "is retried\n")
    done = await submit(gate, dict(PING, request_id="fine"))
    await finish(store, done, "succeeded")
    ran = await ctl_run("ops", "retry", done, "--config", config)
    assert ran.code == 1 and "is succeeded" in ran.err
    await gate.forget(failed)
    ran = await ctl_run("ops", "retry", failed, "--config", config)
    assert ran.code == 1 and ran.err == (f"armsproxyctl: cannot retry {failed}: it was "
                                         "forgotten (its order is no longer served)\n")
    ran = await ctl_run("ops", "retry", "nope", "--config", config)
    assert (ran.code, ran.err) == (1, "armsproxyctl: unknown operation_id 'nope'\n")
    assert len(await store.list_operations(limit=1000)) == count + 1  # "fine" only


def test_retry_refuses_an_answer_without_the_order():
    with pytest.raises(GateError, match="too old for ops retry"):
        ctl.retry_order({"operation_id": "x", "distribution_id": SA_A, "operation": "ping",
                         "state": "failed"})


# ---------------------------------------------------------------------------------------------
# sa list / sa show
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sa_list_and_show(tcp, store, ctl_run):
    config, _ = tcp
    tunnel = {"url": "https://192.0.2.10:8444/t", "since": T0, "peer": "192.0.2.30:4000"}
    await store.sa_update(SA_A, push_method="https-simple",
                          push_endpoint="https://192.0.2.20:10443/", confirmed=True,
                          sa_certificate="PEM", last_pull_at=T0 - 5,
                          last_confirmation_at=T0 - 1, last_peer="192.0.2.20:5555")
    await store.sa_update(SA_B, push_method="https-tunnel", tunnels=[tunnel])

    ran = await ctl_run("sa", "list", "--config", config)
    assert (ran.code, ran.err) == (0, "")
    assert ran.out == (
        "DISTRIBUTION ID                          METHOD        CONFIRMED  ENDPOINT"
        "                   LAST PULL             LAST PEER        TUNNELS\n"
        f"{SA_A}  https-simple  yes        https://192.0.2.20:10443/  2023-11-14T22:13:15Z  "
        "192.0.2.20:5555  0\n"
        f"{SA_B}  https-tunnel  no         -                          -                     "
        "-                1\n"
    )
    ran = await ctl_run("sa", "list", "--unconfirmed", "--config", config)
    assert [line.split()[0] for line in ran.out.splitlines()[1:]] == [SA_B]
    ran = await ctl_run("sa", "list", "--confirmed", "--json", "--config", config)
    assert [sa["distribution_id"] for sa in ran.json] == [SA_A]
    assert ran.json[0]["last_pull_at"] == T0 - 5 and ran.json[0]["has_certificate"] is True

    ran = await ctl_run("sa", "show", SA_B, "--config", config)
    assert (ran.code, ran.err) == (0, "")
    assert ran.out == f"""\
distribution_id       {SA_B}
push_method           https-tunnel
confirmed             no
has_certificate       no
updated_at            2023-11-14T22:13:20Z
tunnels               1
  https://192.0.2.10:8444/t since 2023-11-14T22:13:20Z from 192.0.2.30:4000
"""
    ran = await ctl_run("sa", "show", SA_A, "--json", "--config", config)
    assert ran.json["push_endpoint"] == "https://192.0.2.20:10443/"
    assert ran.json["tunnels"] == []

    ran = await ctl_run("sa", "show", "0001", "--config", config)
    assert ran.code == 1
    assert ran.err.startswith("armsproxyctl: distribution_id: 8 groups of 4 upper-case hex")
    assert ran.err.count("\n") == 1
    unknown = "0001-0000-1A2B-0105-0000-0000-0000-000C"
    ran = await ctl_run("sa", "show", unknown, "--config", config)
    assert (ran.code, ran.err) == (1, f"armsproxyctl: unknown distribution_id {unknown}\n")
    ran = await ctl_run("sa", "list", "--config", config)
    assert ran.code == 0


# ---------------------------------------------------------------------------------------------
# Where the gate is: configuration, override, unix socket, TLS, errors
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_gate_over_a_unix_socket_named_by_the_environment(gate, store, short_dir,
                                                                    monkeypatch, ctl_run):
    sock = short_dir / "rs.sock"
    svc, _ = await serve(f"unix:{sock}:mode=600", gate)
    try:
        config = write_config(short_dir, f"unix:{sock}:mode=600")
        monkeypatch.setenv("ARMSPROXY_CONFIG", str(config))
        op = await submit(gate, PING)
        ran = await ctl_run("ops", "list")
        assert ran.code == 0 and op in ran.out
        ran = await ctl_run("ops", "cancel", op, "--json")
        assert ran.json["cancelled"] is True
        ran = await ctl_run("ops", "list", "--rs-gate", f"unix:address={sock}", "--json")
        assert [o["state"] for o in ran.json] == ["cancelled"]
    finally:
        await svc.stopService()
    ran = await ctl_run("ops", "list")
    assert ran.code == 1
    assert ran.err == (f"armsproxyctl: cannot connect to the RS gate at unix:{sock} (from "
                       f"[rs_gate] listen in {config}): no such socket (is armsproxy "
                       "running?)\n")


@pytest.fixture(scope="module")
def rs_pki(tmp_path_factory):
    """The gate's CA and certificate, the CA of RS client certificates, an RS and a stranger."""
    server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    folder = tmp_path_factory.mktemp("ctl-pki")
    server = server_ca.issue_cert("127.0.0.1")
    files = {name: folder / f"{name}.pem" for name in
             ("gate-key", "gate", "server-ca", "client-ca", "rs", "stranger")}
    server.private_key_pem.write_to_path(files["gate-key"])
    server.cert_chain_pems[0].write_to_path(files["gate"])
    server_ca.cert_pem.write_to_path(files["server-ca"])
    client_ca.cert_pem.write_to_path(files["client-ca"])
    client_ca.issue_cert("rs.example", common_name="the RS").private_key_and_cert_chain_pem \
        .write_to_path(files["rs"])
    stranger_ca.issue_cert("rs.example").private_key_and_cert_chain_pem \
        .write_to_path(files["stranger"])
    return files


@pytest_twisted.ensureDeferred
async def test_the_gate_over_tls_with_a_client_certificate(gate, store, rs_pki, tmp_path,
                                                           ctl_run, logs):
    keys = f"privateKey={rs_pki['gate-key']}:certKey={rs_pki['gate']}"
    svc, port = await serve(f"ssl:0:interface=127.0.0.1:{keys}", gate,
                            tls_client_ca=rs_pki["client-ca"].read_bytes())
    try:
        number = port.getHost().port
        config = write_config(tmp_path, f"ssl:{number}:interface=127.0.0.1:{keys}",
                              client_ca=rs_pki["client-ca"])
        op = await submit(gate, PING)
        trusted = ["--config", config, "--ca", rs_pki["server-ca"]]
        ran = await ctl_run("ops", "list", *trusted, "--client-cert", rs_pki["rs"])
        assert (ran.code, ran.err) == (0, "") and op in ran.out
        ran = await ctl_run("ops", "cancel", op, *trusted, "--client-cert", rs_pki["rs"])
        assert ran.code == 0
        assert logs.find("push.cancel", op, "certificate CN=the RS")
        url = f"https://127.0.0.1:{number}/RPC2"
        where = f"the RS gate at {url} (from [rs_gate] listen in {config})"

        ran = await ctl_run("ops", "list", *trusted)  # no client certificate
        assert ran.code == 1 and ran.err.count("\n") == 1
        assert ran.err.startswith(f"armsproxyctl: TLS with {where} failed: ") or \
            ran.err.startswith(f"armsproxyctl: cannot talk to {where}: ")
        assert ran.err.endswith("(the gate requires a client certificate issued by its "
                                "[rs_gate] client_ca: --client-cert PEM)\n")
        ran = await ctl_run("ops", "list", *trusted, "--client-cert", rs_pki["stranger"])
        assert ran.code == 1 and where in ran.err and ran.err.count("\n") == 1
        ran = await ctl_run("ops", "list", "--config", config, "--client-cert", rs_pki["rs"])
        assert ran.code == 1
        assert ran.err.startswith(f"armsproxyctl: {where}: its certificate is not trusted: ")
        assert ran.err.endswith("(--ca PEM names the CA that issued it)\n")
        ran = await ctl_run("ops", "list", *trusted, "--client-cert", tmp_path / "none.pem")
        assert ran.code == 1
        assert ran.err.startswith(f"armsproxyctl: --client-cert {tmp_path / 'none.pem'}: "
                                  "cannot use it: ")
        # The URL form of --rs-gate, with the same files.
        ran = await ctl_run("sa", "list", "--rs-gate", url, "--ca", rs_pki["server-ca"],
                            "--client-cert", rs_pki["rs"])
        assert (ran.code, ran.out) == (0, "no SAs\n")
        assert len(await store.list_operations()) == 1
    finally:
        await svc.stopService()


@pytest_twisted.ensureDeferred
async def test_rs_gate_override_and_http_errors(tcp, gate, ctl_run):
    _, number = tcp
    op = await submit(gate, PING)
    for address in (f"tcp:{number}:interface=127.0.0.1", f"tcp:{number}",
                    f"http://127.0.0.1:{number}", f"http://127.0.0.1:{number}/RPC2"):
        ran = await ctl_run("ops", "list", "--rs-gate", address, "--json",
                            "--config", "/nonexistent.conf")
        assert (ran.code, [o["operation_id"] for o in ran.json]) == (0, [op]), address
    ran = await ctl_run("ops", "list", "--rs-gate", f"http://127.0.0.1:{number}/other")
    assert ran.code == 1
    assert ran.err.startswith(f"armsproxyctl: the RS gate at http://127.0.0.1:{number}/other "
                              "(from --rs-gate) answered HTTP 404")
    ran = await ctl_run("ops", "list", "--sa", "nope", "--rs-gate", f"tcp:{number}")
    assert ran.code == 1
    assert ran.err.startswith("armsproxyctl: filter.distribution_id: 8 groups of 4")


@pytest_twisted.ensureDeferred
async def test_connection_refused_names_the_endpoint_and_the_config_key(tmp_path, ctl_run):
    number = free_port()
    config = write_config(tmp_path, f"tcp:{number}:interface=127.0.0.1")
    ran = await ctl_run("sa", "list", "--config", config)
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (f"armsproxyctl: cannot connect to the RS gate at http://127.0.0.1:"
                       f"{number}/RPC2 (from [rs_gate] listen in {config}): connection "
                       "refused (is armsproxy running?)\n")
    ran = await ctl_run("sa", "list", "--rs-gate", f"tcp:{number}")
    assert ran.err == (f"armsproxyctl: cannot connect to the RS gate at http://127.0.0.1:"
                       f"{number}/RPC2 (from --rs-gate): connection refused (is armsproxy "
                       "running?)\n")
    missing = tmp_path / "missing.conf"
    ran = await ctl_run("ops", "list", "--config", missing)
    assert ran.code == 1
    assert ran.err == (f"armsproxyctl: {missing}: No such file or directory (pass --config "
                       "FILE or --rs-gate ADDRESS)\n")
    bad = tmp_path / "bad.conf"
    bad.write_text("[sa_gate]\nlisten = tcp:8443\n")
    ran = await ctl_run("ops", "list", "--config", bad)
    assert ran.code == 1 and ran.err.count("\n") == 1
    assert ran.err.startswith(f"armsproxyctl: {bad}: ") and "public_urls" in ran.err


def test_addresses():
    assert parse_address("tcp:8780:interface=127.0.0.1", "x").url == "http://127.0.0.1:8780/RPC2"
    assert parse_address("tcp:8780", "x").url == "http://127.0.0.1:8780/RPC2"
    assert parse_address("tcp:port=8780:interface=0.0.0.0", "x").url == \
        "http://127.0.0.1:8780/RPC2"
    assert parse_address("tcp:8780:interface=\\:\\:", "x").url == "http://[::1]:8780/RPC2"
    ssl_target = parse_address("ssl:8780:interface=192.0.2.1:privateKey=k:certKey=c", "x")
    assert (ssl_target.url, ssl_target.tls) == ("https://192.0.2.1:8780/RPC2", True)
    unix = parse_address("unix:/run/armsproxy/rs.sock:mode=600", "y")
    assert (unix.unix_path, unix.where, unix.origin) == (
        "/run/armsproxy/rs.sock", "unix:/run/armsproxy/rs.sock", "y")
    assert parse_address("https://gate.example:8780/", "x").url == \
        "https://gate.example:8780/RPC2"
    # A client endpoint's form, as an operator may type it, names the host it connects to.
    assert parse_address("tcp:127.0.0.2:8780", "x").url == "http://127.0.0.2:8780/RPC2"
    assert parse_address("tcp:host=192.0.2.7:port=8780", "x").url == \
        "http://192.0.2.7:8780/RPC2"
    for bad, message in (("tcp:0", "names no port"), ("unix:", "names no socket path"),
                         ("carrier-pigeon:1", "use tcp:, unix:, ssl:"),
                         ("http://", "has no host")):
        with pytest.raises(GateError, match=message):
            parse_address(bad, "--rs-gate")


def test_bad_command_lines(capsys):
    for argv in (["ops", "list", "--state", "done"], ["ops", "show"], ["sa", "list",
                 "--confirmed", "--unconfirmed"], ["ops"], ["backup"]):
        with pytest.raises(SystemExit) as exit_info:
            ctl.main(argv)
        assert exit_info.value.code == 2, argv
    assert "states are cancelled, expired, failed, queued, sending, started, succeeded" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# backup
# ---------------------------------------------------------------------------------------------


def count(path: Path, table: str) -> int:
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
        n = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    conn.close()
    return n


def insert_sa(conn: sqlite3.Connection, n: int) -> None:
    conn.execute("INSERT INTO sa_registry (distribution_id, updated_at) VALUES (?, ?)",
                 (f"0001-0000-0000-0000-0000-0000-0000-{n:04X}", float(n)))


@pytest_twisted.async_yield_fixture
async def live_store(tmp_path):
    """A store armsproxy has open (WAL, not checkpointed) with 50 operations in it."""
    path = tmp_path / "data" / "armsproxy.sqlite"
    path.parent.mkdir()
    s = SQLiteStore(path, reactor=reactor)
    await s.open()
    for i in range(50):
        await s.submit(NewOperation(distribution_id=SA_A, operation="ping",
                                    params={"address": "192.0.2.1", "blob": b"\x00" * i},
                                    request_id=f"b{i}"))
    yield s
    await s.close()


@pytest_twisted.ensureDeferred
async def test_backup_copies_a_live_store_while_another_connection_writes(live_store,
                                                                          tmp_path, ctl_run):
    source = live_store.path
    config = write_config(tmp_path, "tcp:8780:interface=127.0.0.1", store=source)
    wal = Path(f"{source}-wal")
    assert wal.stat().st_size > 0  # committed operations a plain file copy would miss

    # A writer in the middle of a transaction: the backup neither waits for it nor sees it.
    writer = sqlite3.connect(source, isolation_level=None, timeout=10)
    try:
        writer.execute("BEGIN IMMEDIATE")
        insert_sa(writer, 0)
        dest = tmp_path / "backups" / "one.sqlite"
        dest.parent.mkdir()
        ran = await ctl_run("backup", "--config", config, dest)
        assert (ran.code, ran.err) == (0, "")
        assert ran.out == f"backed up {source} to {dest} ({dest.stat().st_size} bytes)\n"
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert count(dest, "operations") == 50 and count(dest, "sa_registry") == 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["one.sqlite"]  # one file

    # Writers committing all along: the copy is one consistent moment between two counts.
    stop = threading.Event()
    written = [0]

    def write_continuously() -> None:
        conn = sqlite3.connect(source, isolation_level=None, timeout=10)
        try:
            while not stop.is_set():
                insert_sa(conn, written[0] + 1)
                written[0] += 1
        finally:
            conn.close()

    thread = threading.Thread(target=write_continuously)
    thread.start()
    try:
        while written[0] < 20:
            await task.deferLater(reactor, 0.01, lambda: None)
        before = written[0]
        more = [await live_store.submit(NewOperation(distribution_id=SA_B, operation="reboot",
                                                     request_id=f"m{i}")) for i in range(3)]
        second = tmp_path / "backups" / "two.sqlite"
        ran = await ctl_run("backup", "--config", config, second)
        after = written[0]
    finally:
        stop.set()
        await threads.deferToThread(thread.join)
    assert ran.code == 0, ran.err
    assert before <= count(second, "sa_registry") <= after
    assert count(second, "operations") == 50 + len(more)
    with sqlite3.connect(second) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()

    # The copy is a store armsproxy opens as it is.
    restored = SQLiteStore(second, reactor=reactor)
    await restored.open()
    try:
        op = (await restored.list_operations(limit=1000))[49]
        assert op.request_id == "b49" and op.params["blob"] == b"\x00" * 49
    finally:
        await restored.close()
    assert live_store.path.exists() and count(source, "operations") == 53


@pytest_twisted.ensureDeferred
async def test_backup_refusals(live_store, tmp_path, ctl_run):
    config = write_config(tmp_path, "tcp:8780:interface=127.0.0.1", store=live_store.path)
    dest = tmp_path / "backup.sqlite"
    dest.write_text("precious")
    ran = await ctl_run("backup", "--config", config, dest)
    assert (ran.code, ran.err) == (1, f"armsproxyctl: {dest}: exists (--force replaces it)\n")
    assert dest.read_text() == "precious"
    ran = await ctl_run("backup", "--config", config, "--force", dest)
    assert ran.code == 0 and count(dest, "operations") == 50
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600

    nowhere = tmp_path / "no-such-dir" / "b.sqlite"
    ran = await ctl_run("backup", "--config", config, nowhere)
    assert (ran.code, ran.err) == (1, f"armsproxyctl: {nowhere}: cannot create: No such file "
                                      "or directory\n")
    missing = tmp_path / "gone.sqlite"
    other = write_config(tmp_path / "data", "tcp:8780", store=missing)
    ran = await ctl_run("backup", "--config", other, tmp_path / "c.sqlite")
    assert ran.err == (f"armsproxyctl: {missing}: no such store (see [store] path / "
                       "[armsproxy] data_dir)\n")
    assert not (tmp_path / "c.sqlite").exists()
    ran = await ctl_run("backup", "--config", tmp_path / "nope.conf", tmp_path / "d.sqlite")
    assert (ran.code, ran.err) == (1, f"armsproxyctl: {tmp_path / 'nope.conf'}: No such file "
                                      "or directory\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    postgresql = tmp_path / "pg"
    postgresql.mkdir()
    pg_config = write_config(postgresql, "tcp:8780")
    pg_config.write_text(pg_config.read_text() + "[store]\nbackend = postgresql\n"
                         "dsn = host=/nowhere dbname=armsproxy\n")
    ran = await ctl_run("backup", "--config", pg_config, tmp_path / "e.sqlite")
    assert (ran.code, ran.err) == (1, f"armsproxyctl: {pg_config}: [store] backend = "
                                      "postgresql: back it up with PostgreSQL's own tools "
                                      "(pg_dump, or a base backup with WAL archiving); backup "
                                      "copies SQLite stores only\n")
    assert not (tmp_path / "e.sqlite").exists()
