"""``armsproxyctl``: operator tools. ``check FILE...`` decodes and validates captured messages.

A capture is one HTTP message (request or response, any of the framings devices use) or one
tunnel message (chunk framing). Every ARMS document in it is parsed with the same hardened
parser and schema as the SA gate; messages that travel towards a device are also held to the
device rules (``armsproxy.arms.guard``). The first invalid file stops the run with exit 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..arms import framing, guard, schema
from ..arms.codec import MessageError, parse_element, parse_message
from ..arms.messages import ArmsRequest, ArmsResponse

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armsproxyctl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="decode and validate captured ARMS messages")
    check.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.files)
    return 2


if __name__ == "__main__":
    sys.exit(main())
