"""``armsproxy-demo-rs``: register SAs in the demo RS database, issue their certificates, serve.

Validation happens here, before anything is stored, against the limits libarms imposes (§6.2,
§11.2), so a registered SA can always be answered in a way the device accepts.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from twisted.logger import Logger

from armsproxy.arms.distid import is_distid
from armsproxy.demo_rs import db as demo_db
from armsproxy.pki import PKIError, issue_sa_cert, load_certkey

PROG = "armsproxy-demo-rs"
DEFAULT_HEARTBEAT = "127.0.0.1:10000:demo:60"
DEFAULT_PUSH_PORT = 10443
MAX_HEARTBEATS = 5  # more and the SA rejects the whole answer (§11.2)
MAX_KEY_LEN = 64  # RS key limit (§11.2)
MAX_XMLRPC_INT = 2**31 - 1

log = Logger()


class UsageError(Exception):
    """Bad command line or invalid registration data: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _ascii_printable(text: str, what: str, *, allow_empty: bool = False) -> str:
    if not text and not allow_empty:
        raise UsageError(f"{what} must not be empty")
    if not all(0x20 <= ord(c) < 0x7F for c in text):
        raise UsageError(f"{what} must be printable ASCII: {text!r}")
    return text


def _int(text: str, what: str, low: int = 1, high: int = MAX_XMLRPC_INT) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"{what} must be an integer: {text!r}")
    if not low <= value <= high:
        raise UsageError(f"{what} must be in {low}..{high}: {value}")
    return value


def check_distid(text: str) -> str:
    if not is_distid(text):
        raise UsageError(
            f"not a distribution id (8 groups of 4 upper-case hex digits joined by '-', "
            f"e.g. 0001-0000-1A2B-0105-0000-0000-00C0-FFEE): {text!r}"
        )
    return text


def parse_module(spec: str, install_order: int) -> demo_db.Module:
    parts = spec.split(":", 2)
    if len(parts) != 3:
        raise UsageError(f"--module wants ID:VERSION:LOCATION, got {spec!r}")
    return demo_db.Module(
        id=_int(parts[0], "module id"),
        version=_ascii_printable(parts[1], "module version"),
        install_order=install_order,
        location=_ascii_printable(parts[2], "module location", allow_empty=True),
    )


def is_text_config(data: bytes) -> bool:
    """Text means bytes that survive XML unchanged: printable ASCII, TAB and LF (no CR)."""
    return all(b in (0x09, 0x0A) or 0x20 <= b < 0x7F for b in data)


def parse_md_config(spec: str, commit_order: int) -> demo_db.MdConfig:
    parts = spec.split(":", 1)
    if len(parts) != 2 or not parts[1]:
        raise UsageError(f"--md-config wants ID:FILE, got {spec!r}")
    try:
        data = Path(parts[1]).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read md-config file {parts[1]!r}: {e.strerror or e}")
    return demo_db.MdConfig(
        id=_int(parts[0], "md-config id"),
        data=data,
        is_binary=not is_text_config(data),
        commit_order=commit_order,
    )


def parse_heartbeat(spec: str) -> demo_db.Heartbeat:
    """HOST:PORT:PASSPHRASE:INTERVAL; an IPv6 host goes in brackets, the passphrase may hold ':'."""
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]:")
    else:
        host, sep, rest = spec.partition(":")
    port, sep2, rest = rest.partition(":")
    passphrase, sep3, interval = rest.rpartition(":")
    if not (sep and sep2 and sep3):
        raise UsageError(f"--heartbeat wants HOST:PORT:PASSPHRASE:INTERVAL, got {spec!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"heartbeat host must be a numeric IP address (§6.2): {host!r}")
    return demo_db.Heartbeat(
        host=host,
        port=_int(port, "heartbeat port", 1, 65535),
        passphrase=_ascii_printable(passphrase, "heartbeat passphrase"),
        interval=_int(interval, "heartbeat interval"),
    )


def parse_push_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("--push-methods must name at least one method")
    for m in methods:
        if m not in demo_db.PUSH_METHODS:
            raise UsageError(
                f"unknown push method {m!r} (known: {', '.join(demo_db.PUSH_METHODS)})"
            )
    if len(set(methods)) != len(methods):
        raise UsageError(f"--push-methods lists a method twice: {text!r}")
    return methods


def build_registration(args: argparse.Namespace) -> demo_db.SARegistration:
    distid = check_distid(args.distid)
    key = _ascii_printable(args.key, "--key")
    if len(key) > MAX_KEY_LEN or " " in key:
        raise UsageError(f"--key must be 1..{MAX_KEY_LEN} printable ASCII characters, no spaces")
    modules = [parse_module(s, i) for i, s in enumerate(args.module, 1)]
    ids = [m.id for m in modules]
    if len(set(ids)) != len(ids):
        raise UsageError(f"module ids must be unique: {ids}")
    md_configs = [parse_md_config(s, i) for i, s in enumerate(args.md_config, 1)]
    for c in md_configs:
        if c.id not in ids:
            # The SA fails the whole pull on an md-config without its module (§6.2).
            raise UsageError(f"md-config {c.id} has no module {c.id} (add --module {c.id}:...)")
    heartbeats = [parse_heartbeat(s) for s in (args.heartbeat or [DEFAULT_HEARTBEAT])]
    if len(heartbeats) > MAX_HEARTBEATS:
        raise UsageError(f"at most {MAX_HEARTBEATS} heartbeats (the SA rejects more)")
    if len({h.interval for h in heartbeats}) != 1:
        raise UsageError("all heartbeats must use the same interval (the SA uses the first)")
    return demo_db.SARegistration(
        distid=distid,
        key=key,
        description=args.description,
        push_methods=parse_push_methods(args.push_methods),
        push_port=_int(str(args.push_port), "--push-port", 1, 65535),
        push_timeout=(
            None if args.push_timeout is None else _int(str(args.push_timeout), "--push-timeout")
        ),
        modules=modules,
        md_configs=md_configs,
        heartbeats=heartbeats,
    )


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Demo RS for armsproxy: SA registry and XML-RPC.")
    parser.add_argument("--db", required=True, type=Path, help="SQLite database file")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register or replace an SA's definition")
    reg.add_argument("distid")
    reg.add_argument("--key", required=True, help="the SA's RS key (Basic-auth password)")
    reg.add_argument("--description", default="")
    reg.add_argument("--module", action="append", default=[], metavar="ID:VERSION:LOCATION")
    reg.add_argument("--md-config", action="append", default=[], metavar="ID:FILE")
    reg.add_argument(
        "--heartbeat",
        action="append",
        default=[],
        metavar="HOST:PORT:PASSPHRASE:INTERVAL",
        help=f"default: {DEFAULT_HEARTBEAT}",
    )
    reg.add_argument("--push-methods", default=",".join(demo_db.DEFAULT_PUSH_METHODS))
    reg.add_argument("--push-port", default=str(DEFAULT_PUSH_PORT))
    reg.add_argument("--push-timeout", default=None)

    cert = sub.add_parser("issue-cert", help="issue and store the SA's certificate")
    cert.add_argument("distid")
    cert.add_argument("--ca-cert", required=True, type=Path, metavar="PEM")
    cert.add_argument("--ca-key", required=True, type=Path, metavar="PEM")

    sub.add_parser("list", help="list registered SAs")

    events = sub.add_parser("events", help="print received events as JSON lines")
    events.add_argument("--since", default="0", help="only events after this sequence number")

    serve = sub.add_parser("serve", help="serve the demo RS over XML-RPC")
    serve.add_argument(
        "--listen", default="tcp:8790:interface=127.0.0.1", help="Twisted server endpoint"
    )
    return parser


def _cmd_register(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    registration = build_registration(args)
    with conn:
        is_new = demo_db.register_sa(conn.cursor(), registration)
    print(f"{'registered' if is_new else 'updated'} {registration.distid}")
    return 0


def _cmd_issue_cert(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    distid = check_distid(args.distid)
    try:
        ca = load_certkey(args.ca_cert, args.ca_key)
        if not ca.key_matches():
            raise UsageError(f"{args.ca_key} does not match {args.ca_cert}")
    except OSError as e:
        raise UsageError(f"cannot read CA: {e.filename}: {e.strerror or e}")
    except (ValueError, PKIError) as e:
        raise UsageError(f"cannot load CA: {e}")
    issued = issue_sa_cert(ca, distid)
    with conn:
        stored = demo_db.store_sa_certificate(
            conn.cursor(), distid, issued.cert_pem, issued.key_pem
        )
    if not stored:
        raise UsageError(f"unknown distribution id {distid} (register it first)")
    print(f"issued certificate for {distid} sha256={issued.fingerprint_sha256()}")
    return 0


def _cmd_list(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    for sa in demo_db.list_sas(conn.cursor()):
        fields = [
            sa["distid"],
            f"methods={','.join(sa['push_methods'])}",
            f"modules={sa['modules']}",
            f"md_configs={sa['md_configs']}",
            f"heartbeats={sa['heartbeats']}",
            f"cert={sa.get('certificate_sha256', '-')[:16]}",
            f"last_pull={sa.get('last_pull', {}).get('at', '-')}",
            f"confirmed={sa.get('last_confirmation', {}).get('method', '-')}",
        ]
        if sa["description"]:
            fields.append(f"description={sa['description']!r}")
        print(" ".join(fields))
    return 0


def _cmd_events(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    since = _int(args.since, "--since", 0)
    while True:
        batch = demo_db.list_events(conn.cursor(), since)
        for e in batch:
            print(
                json.dumps(
                    {"seq": e.seq, "received_at": e.received_at, "event": json.loads(e.json)}
                )
            )
        if not batch:
            return 0
        since = batch[-1].seq


def _cmd_serve(db_path: Path, listen: str) -> int:
    from twisted.internet import reactor
    from twisted.internet.interfaces import IListeningPort
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from armsproxy.demo_rs.server import make_demo_rs_site
    from armsproxy.tls import ListenerConfigError, server_endpoint

    try:
        endpoint = server_endpoint(reactor, listen, "bad --listen endpoint")
    except ListenerConfigError as e:
        raise UsageError(str(e)) from None
    failed: list[str] = []
    database = demo_db.DemoDB(db_path, reactor=reactor)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])

    def start() -> None:
        d = endpoint.listen(make_demo_rs_site(database))

        def listening(port: IListeningPort) -> None:
            log.info("demo RS listening on {address}", address=port.getHost())

        def cannot_listen(failure: object) -> None:
            failed.append(str(getattr(failure, "value", failure)))
            reactor.stop()

        d.addCallbacks(listening, cannot_listen)

    reactor.callWhenRunning(start)
    reactor.run()
    if failed:
        print(f"{PROG}: error: cannot listen on {listen}: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "serve":
            demo_db.connect(args.db).close()  # create/upgrade the schema, fail fast
            return _cmd_serve(args.db, args.listen)
        conn = demo_db.connect(args.db)
        try:
            command = {
                "register": _cmd_register,
                "issue-cert": _cmd_issue_cert,
                "list": _cmd_list,
                "events": _cmd_events,
            }[args.command]
            return command(conn, args)
        finally:
            conn.close()
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (sqlite3.Error, demo_db.DemoDBError) as e:
        print(f"{PROG}: database error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
