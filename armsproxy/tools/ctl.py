"""``armsproxyctl``: operator tools: check captures, operate pushes, back up the store.

``check FILE...`` decodes and validates captured messages. A capture is one HTTP message
(request or response, any of the framings devices use) or one tunnel message (chunk framing).
Every ARMS document in it is parsed with the same hardened parser and schema as the SA gate;
messages that travel towards a device are also held to the device rules
(``armsproxy.arms.guard``). The first invalid file stops the run with exit 1.

``ops ...`` and ``sa ...`` call the RS gate (the XML-RPC interface the RS uses) at the address
the configuration file gives, so an operator sees and steers exactly what the RS does.
``backup DEST`` copies the live SQLite store consistently while armsproxy runs.
``check-config [FILE...]`` checks a configuration as the start does, without starting anything.

Exit status: 0 done, 1 refused or failed (one line on stderr), 2 bad command line.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sqlite3
import sys
import uuid
import xmlrpc.client
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import config as armsproxy_config
from ..arms import framing, guard, schema
from ..arms.codec import MessageError, parse_element, parse_message
from ..arms.messages import ArmsRequest, ArmsResponse
from ..store.model import STATES
from .rs_gate_client import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ClientTLS,
    GateError,
    GateFault,
    RSGateClient,
    resolve_target,
)

_XML_DECLARATION = re.compile(rb"\A\s*<\?xml[^>]*\?>")
SA_INITIATED = frozenset(
    {"rs-solicitation", "config-solicitation", "push-method-query", "push-confirmation-start"}
)


def towards_device(message: ArmsRequest | ArmsResponse) -> bool:
    """Whether a message travels server -> SA (and so must pass the device rules)."""
    initiated_by_sa = message.type in SA_INITIATED or (
        message.type.endswith("-done") and message.type != "push-confirmation-done"
    )
    if isinstance(message, ArmsRequest):
        return not initiated_by_sa
    return initiated_by_sa


@dataclass(slots=True)
class Checked:
    types: list[str]
    notes: list[str]


class CheckFailed(Exception):
    pass


def arms_documents(data: bytes) -> tuple[list[bytes], list[str]]:
    """The ARMS XML documents in one capture, and framing notes."""
    if not data:
        return [], ["empty: the peer closed the connection without sending anything"]
    if data.startswith((b"POST ", b"GET ", b"HTTP/")):
        try:
            message = framing.parse_http_message(data)
        except framing.FramingError as e:
            raise CheckFailed(f"HTTP framing: {e}") from None
        xml = framing.extract_arms_xml(message.body)
        if not xml and _XML_DECLARATION.sub(b"", message.body).strip():
            raise CheckFailed("the body is not a complete <arms-message> document")
        return ([xml] if xml else []), list(message.framing_notes)
    try:
        events = framing.parse_tunnel_file(data)
    except framing.FramingError as e:
        raise CheckFailed(f"tunnel chunk framing: {e}") from None
    docs = [e.body for e in events if isinstance(e, framing.TunnelMessage) and e.body]
    return docs, []


def check_bytes(data: bytes) -> Checked:
    docs, notes = arms_documents(data)
    types = []
    for xml in docs:
        try:
            message = parse_message(xml)
        except MessageError as e:
            detail = e.detail
            if e.reason == "schema":
                details = schema.explain(xml)
                if details:
                    detail = "; ".join(details[:3])
            raise CheckFailed(f"{e.reason}: {detail}") from None
        if towards_device(message):
            problems = guard.problems(parse_element(xml), xml)
            if problems:
                raise CheckFailed(
                    f"{message.type}: a device would not accept this: {'; '.join(problems)}"
                )
        kind = "request" if isinstance(message, ArmsRequest) else "response"
        types.append(f"{kind} {message.type}")
    if not docs:
        notes.append("no ARMS document (HTTP-level message only)")
    return Checked(types=types, notes=notes)


def _check(paths: list[str]) -> int:
    for name in paths:
        path = Path(name)
        try:
            checked = check_bytes(path.read_bytes())
        except OSError as e:
            print(f"{name}: cannot read: {e.strerror}", file=sys.stderr)
            return 1
        except CheckFailed as e:
            print(f"{name}: INVALID: {e}", file=sys.stderr)
            return 1
        summary = ", ".join(checked.types) or "-"
        notes = f" ({'; '.join(checked.notes)})" if checked.notes else ""
        print(f"{name}: ok: {summary}{notes}")
    return 0


# ---------------------------------------------------------------------------------------------
# Output: human tables, or JSON for scripts
# ---------------------------------------------------------------------------------------------

PROG = "armsproxyctl"
RETRYABLE = frozenset({"failed", "expired"})
LIST_PAGE = 1000  # the gate's largest page
STATUS_FIELDS = (
    "operation_id", "request_id", "distribution_id", "operation", "state", "attempts",
    "created_at", "updated_at", "not_before", "expires_at", "done_deadline", "last_error",
    "start_result_code", "sa_transaction_id", "transaction_result", "result_code", "forgotten",
)
SA_FIELDS = (
    "distribution_id", "push_method", "push_endpoint", "confirmed", "has_certificate",
    "last_pull_at", "last_confirmation_at", "last_peer", "updated_at",
)
# Members the gate sends as epoch seconds; humans read them as UTC times.
TIME_KEYS = frozenset({
    "created_at", "updated_at", "not_before", "expires_at", "done_deadline", "last_pull_at",
    "last_confirmation_at", "at", "since",
})
_TYPE = re.compile(r'<arms-(?:request|response)\s+type="([^"]+)"')
_RESULT_CODE = re.compile(r"<result-code>\s*(\d+)\s*</result-code>")


def when(value: Any) -> str:
    """Epoch seconds as UTC ISO 8601 to the second; anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_json(value: Any) -> Any:
    """What ``json`` can write: Binary as its base64 text, XML-RPC dateTime as ISO 8601."""
    if isinstance(value, xmlrpc.client.Binary):
        return base64.b64encode(value.data).decode("ascii")
    if isinstance(value, xmlrpc.client.DateTime):
        return datetime.strptime(value.value, "%Y%m%dT%H:%M:%S").isoformat()
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


def _binary_text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return text
    return f"<{len(data)} bytes, base64 {base64.b64encode(data).decode('ascii')}>"


def as_text(value: Any, key: str = "") -> Any:
    """``as_json`` for people: times as UTC, Binary as its text when it is printable."""
    if isinstance(value, xmlrpc.client.Binary):
        return _binary_text(value.data)
    if key in TIME_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
        return when(value)
    if isinstance(value, dict):
        return {str(k): as_text(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_text(v) for v in value]
    return as_json(value)


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    shown = as_text(value, key)
    return shown if isinstance(shown, str) else json.dumps(shown, ensure_ascii=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def fields(struct: dict[str, Any], order: Sequence[str]) -> str:
    """``key  value`` lines: the known members in order, then any others the gate sent.

    The width is that of every known key, present or not, so two operations line up alike.
    """
    keys = [k for k in order if k in struct] + [k for k in struct if k not in order]
    width = max((len(k) for k in (*order, *keys)), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(struct[k], k)}" for k in keys)


def _print_json(value: Any) -> None:
    print(json.dumps(as_json(value), indent=2, ensure_ascii=False))


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def _raw_text(value: Any) -> str:
    if isinstance(value, xmlrpc.client.Binary):
        return value.data.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def raw_summary(entry: dict[str, Any]) -> str:
    """One line per ARMS exchange: when, kind, message type, HTTP status, result code, sizes."""
    request, answer = _raw_text(entry.get("request")), _raw_text(entry.get("answer"))
    found = _TYPE.search(request)
    parts = [when(entry.get("at")), str(entry.get("kind", "?")).ljust(5),
             found.group(1) if found else "?"]
    outcome = []
    if "status" in entry:
        outcome.append(f"HTTP {entry['status']}")
    code = _RESULT_CODE.search(answer)
    if code:
        outcome.append(f"result-code {code.group(1)}")
    sizes = [f"request {len(request.encode())} bytes"]
    if "answer" in entry:
        sizes.append(f"answer {len(answer.encode())} bytes")
    detail = f": {', '.join(outcome)}" if outcome else ""
    return f"{'  '.join(parts)}{detail} ({', '.join(sizes)})"


# ---------------------------------------------------------------------------------------------
# ops / sa: calls to the RS gate
# ---------------------------------------------------------------------------------------------


def _all_pages(gate: RSGateClient, method: str, key: str, filter: dict[str, Any],
               keep: int | None) -> tuple[list[dict[str, Any]], int]:
    """Every page of a ``*.list`` call; the last ``keep`` items (None: all) and the total."""
    items: deque[dict[str, Any]] = deque(maxlen=keep)
    total, offset = 0, 0
    while True:
        page = gate.call(method, dict(filter, limit=LIST_PAGE, offset=offset))
        items.extend(page[key])
        total += len(page[key])
        if "next_offset" not in page:
            return list(items), total
        offset = page["next_offset"]


def _ops_list(gate: RSGateClient, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.sa:
        query["distribution_id"] = args.sa
    if args.states:
        query["states"] = args.states
    ops, total = _all_pages(gate, "push.list", "operations", query, args.limit or None)
    if args.json:
        _print_json(ops)
        return 0
    if not ops:
        print("no operations")
        return 0
    rows = [[op["operation_id"], op["state"], op["operation"], op["distribution_id"],
             str(op.get("attempts", 0)), when(op.get("updated_at"))] for op in ops]
    print(table(["ID", "STATE", "OPERATION", "DISTRIBUTION ID", "ATTEMPTS", "UPDATED"], rows))
    if total > len(ops):
        print(f"(the last {len(ops)} of {total}; --limit 0 shows all)", file=sys.stderr)
    return 0


def _ops_show(gate: RSGateClient, args: argparse.Namespace) -> int:
    try:
        answer = gate.call("push.result", args.id)
        gone = False
    except GateFault as e:
        if e.code != 410:
            raise
        answer, gone = gate.call("push.status", args.id), True
    if args.json:
        _print_json(answer)
        return 0
    print(fields({k: v for k, v in answer.items() if k not in ("result", "raw", "order")},
                 STATUS_FIELDS))
    if gone:
        print("\nresult: forgotten (push.forget, or older than [store] results_ttl)")
        return 0
    if "result" in answer:
        pretty = json.dumps(as_text(answer["result"]), indent=2, ensure_ascii=False)
        print("\nresult:\n" + "\n".join(f"  {line}" for line in pretty.splitlines()))
    else:
        print("\nresult: none yet")
    raw = answer.get("raw") or []
    print(f"\nraw: {len(raw)} exchange(s)" + (":" if raw else ""))
    for entry in raw:
        print(f"  {raw_summary(entry)}")
    return 0


def _ops_cancel(gate: RSGateClient, args: argparse.Namespace) -> int:
    answer = gate.call("push.cancel", args.id)
    done = answer["cancelled"] or answer["state"] == "cancelled"
    if args.json:
        _print_json({"operation_id": args.id, **answer})
    elif answer["cancelled"]:
        print(f"{args.id}: cancelled")
    elif done:
        print(f"{args.id}: already cancelled")
    if not done:
        return _fail(f"{args.id} not cancelled: it is {answer['state']} (only a queued "
                     "operation can be cancelled)")
    return 0


def retry_order(answer: dict[str, Any]) -> dict[str, Any]:
    """The order of a finished operation again, under a fresh request_id (a new operation)."""
    order = answer.get("order")
    if not isinstance(order, dict):
        raise GateError("the RS gate did not send the operation's order (push.result has no "
                        "'order'): this armsproxy is too old for ops retry")
    new: dict[str, Any] = {
        "distribution_id": answer["distribution_id"],
        "operation": answer["operation"],
        "params": order.get("params", {}),
        "request_id": f"retry-of-{answer['operation_id']}-{uuid.uuid4().hex}",
    }
    for key in ("sa_url", "method"):
        if key in order:
            new[key] = order[key]
    return new


def _ops_retry(gate: RSGateClient, args: argparse.Namespace) -> int:
    try:
        answer = gate.call("push.result", args.id)
    except GateFault as e:
        if e.code != 410:
            raise
        return _fail(f"cannot retry {args.id}: it was forgotten (its order is no longer "
                     "served)")
    if answer["state"] not in RETRYABLE:
        return _fail(f"{args.id} is {answer['state']}: only a failed or expired operation "
                     "is retried")
    order = retry_order(answer)
    new_id = gate.call("push.submit", order)
    if args.json:
        _print_json({"operation_id": new_id, "retry_of": args.id,
                     "request_id": order["request_id"]})
    else:
        print(new_id)
    return 0


def _sa_list(gate: RSGateClient, args: argparse.Namespace) -> int:
    query = {} if args.confirmed is None else {"confirmed": args.confirmed}
    sas, _ = _all_pages(gate, "sa.list", "sas", query, None)
    if args.json:
        _print_json(sas)
        return 0
    if not sas:
        print("no SAs")
        return 0
    rows = [[sa["distribution_id"], sa.get("push_method", "-"), _cell(sa.get("confirmed")),
             sa.get("push_endpoint", "-"), _cell(sa.get("last_pull_at"), "last_pull_at"),
             sa.get("last_peer", "-"), str(len(sa.get("tunnels", [])))] for sa in sas]
    print(table(["DISTRIBUTION ID", "METHOD", "CONFIRMED", "ENDPOINT", "LAST PULL",
                 "LAST PEER", "TUNNELS"], rows))
    return 0


def _sa_show(gate: RSGateClient, args: argparse.Namespace) -> int:
    sa = gate.call("sa.status", args.distid)
    if args.json:
        _print_json(sa)
        return 0
    tunnels = sa.get("tunnels", [])
    print(fields(dict(sa, tunnels=len(tunnels)), (*SA_FIELDS, "tunnels")))
    for tunnel in tunnels:
        print(f"  {tunnel.get('url', '?')} since {when(tunnel.get('since'))}"
              f"{' from ' + tunnel['peer'] if tunnel.get('peer') else ''}")
    return 0


# ---------------------------------------------------------------------------------------------
# backup
# ---------------------------------------------------------------------------------------------


class BackupError(Exception):
    """The backup was not made; DEST is untouched."""


@dataclass(slots=True)
class BackupInfo:
    source: Path
    dest: Path
    size: int


def backup_store(source: Path, dest: Path, *, force: bool = False) -> BackupInfo:
    """Copy a live WAL store consistently into a new private file at ``dest``.

    ``sqlite3.Connection.backup`` in one step reads one snapshot (the main file plus the
    committed WAL, which a file copy would miss or tear) without blocking armsproxy's
    writers. The copy is built beside ``dest`` with mode 0600 (it holds SA certificates and
    pushed configurations), checked, switched to a single-file journal mode and renamed into
    place, so ``dest`` is never a half-written database.
    """
    if not source.is_file():
        raise BackupError(f"{source}: no such store (see [store] path / [armsproxy] data_dir)")
    if dest.exists() and not force:
        raise BackupError(f"{dest}: exists (--force replaces it)")
    temporary = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise BackupError(f"{dest}: cannot create: {e.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.close(fd)
        # Read-only: the backup can never change the live store.
        with closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)) as src, \
                closing(sqlite3.connect(temporary, isolation_level=None)) as dst:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"{source}: the copy fails its check: {check}")
        os.replace(temporary, dest)
    except sqlite3.Error as e:
        raise BackupError(f"{source}: cannot back up: {e}") from None
    finally:
        for leftover in (temporary, Path(f"{temporary}-journal")):
            leftover.unlink(missing_ok=True)
    _sync_directory(dest.parent)
    return BackupInfo(source=source, dest=dest, size=dest.stat().st_size)


def _sync_directory(path: Path) -> None:
    """Make the rename durable (a backup that vanishes in a power cut is no backup)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _backup(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        cfg = armsproxy_config.load(path)
        if cfg.store_backend != "sqlite":
            return _fail(f"{path}: [store] backend = {cfg.store_backend}: back it up with "
                         "PostgreSQL's own tools (pg_dump, or a base backup with WAL "
                         "archiving); backup copies SQLite stores only")
        info = backup_store(cfg.effective_store_path, Path(args.dest), force=args.force)
    except armsproxy_config.ConfigError as e:
        return _fail(" ".join(line.strip() for line in str(e).splitlines()))
    except BackupError as e:
        return _fail(str(e))
    print(f"backed up {info.source} to {info.dest} ({info.size} bytes)")
    return 0


def check_config(path: Path) -> list[str]:
    """Every problem armsproxy's start would refuse ``path`` for, short of binding, as
    ``FILE: [section] key: problem`` lines; none: the start would get as far as listening."""
    try:
        cfg = armsproxy_config.load(path)
    except armsproxy_config.ConfigError as e:
        return e.lines()
    return [f"{path}: {problem}" for problem in armsproxy_config.check(cfg)]


def _check_config(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files or [str(config_path(None))]:
        problems = check_config(Path(name))
        for line in problems:
            print(line, file=sys.stderr)
        if not problems:
            print(f"{name}: ok")
        failed = failed or bool(problems)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def config_path(option: str | None) -> Path:
    """``--config``, else ``$ARMSPROXY_CONFIG``, else /etc/armsproxy/armsproxy.conf."""
    return Path(option or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _states(value: str) -> list[str]:
    states = [s for s in value.replace(",", " ").split() if s]
    unknown = [s for s in states if s not in STATES]
    if unknown or not states:
        raise argparse.ArgumentTypeError(
            f"{value!r}: states are {', '.join(sorted(STATES))}")
    return states


def _gate_options() -> argparse.ArgumentParser:
    """Options of every command that calls the RS gate (after the command, like --json)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("RS gate")
    group.add_argument("--config", metavar="FILE",
                       help=f"armsproxy configuration whose [rs_gate] listen is used "
                            f"(default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    group.add_argument("--rs-gate", metavar="ADDRESS",
                       help="instead of the configuration: an endpoint as [rs_gate] listen "
                            "takes it (tcp:8780:interface=127.0.0.1, unix:/run/armsproxy/"
                            "rs.sock, ssl:8780:interface=HOST) or a URL (https://HOST:8780/RPC2)")
    group.add_argument("--ca", metavar="PEM", type=Path,
                       help="ssl: the CA of the gate's certificate (default: the system's)")
    group.add_argument("--client-cert", metavar="PEM", type=Path,
                       help="ssl: the client certificate (with its key) the gate requires, "
                            "issued by its [rs_gate] client_ca")
    group.add_argument("--client-key", metavar="PEM", type=Path,
                       help="ssl: the key, if not in --client-cert")
    group.add_argument("--timeout", metavar="SECONDS", type=float, default=30.0,
                       help="per call (default 30)")
    group.add_argument("--json", action="store_true",
                       help="machine-readable JSON (Binary as base64, times as epoch seconds)")
    return options


Handler = Callable[[RSGateClient, argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="decode and validate captured ARMS messages")
    check.add_argument("files", nargs="+", metavar="FILE")

    gate = _gate_options()
    ops = sub.add_parser("ops", help="push operations (through the RS gate)")
    ops_sub = ops.add_subparsers(dest="action", required=True)
    listing = ops_sub.add_parser("list", parents=[gate], help="operations, oldest first")
    listing.add_argument("--state", dest="states", action="extend", type=_states,
                         metavar="STATE[,STATE]", help="only these states (repeatable)")
    listing.add_argument("--sa", metavar="DISTID", help="only this SA's operations")
    listing.add_argument("--limit", type=int, default=100, metavar="N",
                         help="the last N (default 100; 0: all)")
    listing.set_defaults(handler=_ops_list)
    for name, handler, text in (
        ("show", _ops_show, "status, result and a summary of the ARMS exchanges"),
        ("cancel", _ops_cancel, "cancel an operation not sent yet"),
        ("retry", _ops_retry, "submit a failed or expired operation again as a new one"),
    ):
        command = ops_sub.add_parser(name, parents=[gate], help=text)
        command.add_argument("id", metavar="ID", help="operation id")
        command.set_defaults(handler=handler)

    sa = sub.add_parser("sa", help="the SA registry (through the RS gate)")
    sa_sub = sa.add_subparsers(dest="action", required=True)
    sa_listing = sa_sub.add_parser("list", parents=[gate], help="every SA armsproxy knows")
    confirmed = sa_listing.add_mutually_exclusive_group()
    confirmed.add_argument("--confirmed", dest="confirmed", action="store_const", const=True,
                           help="only SAs whose push confirmation succeeded")
    confirmed.add_argument("--unconfirmed", dest="confirmed", action="store_const",
                           const=False, help="only the others")
    sa_listing.set_defaults(handler=_sa_list, confirmed=None)
    sa_show = sa_sub.add_parser("show", parents=[gate], help="one SA")
    sa_show.add_argument("distid", metavar="DISTID", help="distribution id")
    sa_show.set_defaults(handler=_sa_show)

    backup = sub.add_parser("backup", help="copy the live store consistently (WAL-safe)")
    backup.add_argument("--config", metavar="FILE",
                        help=f"armsproxy configuration naming the store (default: "
                             f"${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")
    backup.add_argument("dest", metavar="DEST", help="the new file (mode 0600)")

    check_conf = sub.add_parser(
        "check-config", help="check a configuration file as the start does, without starting")
    check_conf.add_argument("files", nargs="*", metavar="FILE",
                            help=f"default: ${CONFIG_ENV}, else {DEFAULT_CONFIG}")
    return parser


def _run_on_gate(handler: Handler, args: argparse.Namespace) -> int:
    tls = ClientTLS(ca=args.ca, client_cert=args.client_cert, client_key=args.client_key)
    try:
        target = resolve_target(rs_gate=args.rs_gate, config_path=config_path(args.config))
        with RSGateClient(target, tls=tls, timeout=args.timeout) as gate:
            return handler(gate, args)
    except GateError as e:
        return _fail(str(e))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.files)
    if args.command == "backup":
        return _backup(args)
    if args.command == "check-config":
        return _check_config(args)
    return _run_on_gate(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
