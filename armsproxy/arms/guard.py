"""Device rules for what armsproxy sends (§1, §3.1, §6.2, §6.4, §7).

libarms drops or misreads much that is well-formed XML: an extra attribute, an integer with a
trailing newline, a module listed after an md-config, a config answer without a heartbeat.
Every message armsproxy writes passes through ``problems`` first; a non-empty answer means
"do not send". The same checks back ``armsproxyctl check`` for server-to-SA captures.
"""

from __future__ import annotations

import re

from lxml import etree

from .urls import url_problems

_INT_RE = re.compile(r"-?[0-9]+\Z")

#: Elements with an attribute whitelist (§3.1); ``None`` key = any context.
_WHITELIST: dict[tuple[str, str | None], frozenset[str]] = {
    ("arms-request", None): frozenset({"type"}),
    ("arms-response", None): frozenset({"type"}),
    ("md-config", "config-solicitation-response"): frozenset(
        {"id", "content-type", "commit-order", "encoding"}
    ),
    ("md-config", None): frozenset({"id", "commit-order", "encoding"}),
    ("module", None): frozenset({"id", "version", "install-order"}),
    ("status-request", None): frozenset({"id", "encoding"}),
    ("md-command", None): frozenset({"id", "encoding"}),
}

_INTEGER_ELEMENTS = frozenset({
    "result-code", "transaction-id", "transaction-result", "push-port", "push-timeout", "port",
    "interval", "https-tunnel-echo-interval", "count", "size", "max-hop", "ll-timeout",
    "rs-retry-max", "rs-retry-interval", "lifetime",
})

_URL_ELEMENTS = frozenset({"rs-pull-server-url", "https-tunnel-url", "result-url"})
_MAX_FIVE = ("heartbeat-info", "rs-pull-server-url", "push-method", "https-tunnel-url")
_PUSH_METHODS = frozenset({"https-simple", "https-tunnel"})
MD_COMMAND_LIMIT = 8192


def _allowed(el: etree._Element) -> frozenset[str] | None:
    parent = el.getparent()
    context = parent.tag if parent is not None else None
    return _WHITELIST.get((el.tag, context), _WHITELIST.get((el.tag, None)))


def _modules_first(body: etree._Element, where: str) -> list[str]:
    seen_config = False
    for child in body:
        if child.tag == "md-config":
            seen_config = True
        elif child.tag == "module" and seen_config:
            return [f"{where}: <module> after <md-config> (the device would drop modules)"]
    return []


def problems(root: etree._Element, serialised: bytes | None = None) -> list[str]:
    """Everything in ``root`` that a libarms device would choke on."""
    found: list[str] = []
    if serialised is not None and not serialised.isascii():
        found.append("non-ASCII bytes (the device parses as US-ASCII)")
    if root.tag != "arms-message" or len(root) != 1:
        return [*found, "not an <arms-message> with exactly one child"]
    # Every message armsproxy sends passes here (each pull's answer): one pass, each
    # element's tag and attribute names read once; the attribute rules only for elements
    # that have attributes, the integer and URL rules only for those elements.
    for el in root.iter():
        tag = el.tag
        if type(tag) is not str:  # a comment or processing instruction
            continue
        names = el.keys()
        if names:
            if tag[0] == "{" or any(k.startswith("xmlns") for k in names):
                found.append(f"<{tag}>: namespaces are not understood by the device")
            allowed = _allowed(el)
            if allowed is not None:
                extra = sorted(set(names) - allowed)
                if extra:
                    found.append(
                        f"<{tag}>: attribute(s) {', '.join(extra)} not allowed here "
                        f"(the device drops the element)"
                    )
        elif tag[0] == "{":
            found.append(f"<{tag}>: namespaces are not understood by the device")
        if tag in _INTEGER_ELEMENTS:
            if len(el) == 0 and not _INT_RE.match(el.text or ""):
                found.append(f"<{tag}>: {el.text!r} is not an integer without whitespace")
        elif tag in _URL_ELEMENTS:
            found.extend(url_problems(el.text or ""))
    inner = root[0]
    type_ = inner.get("type", "")
    body = next((c for c in inner if c.tag.endswith(("-request", "-response"))), None)
    counts: dict[str, int] = {}
    for child in (body if body is not None else inner):
        counts[child.tag] = counts.get(child.tag, 0) + 1
    for tag in _MAX_FIVE:
        if counts.get(tag, 0) > 5:
            found.append(f"more than 5 <{tag}> (the device rejects the whole answer)")
    if inner.tag == "arms-response":
        found.extend(_response_problems(inner, type_, body))
    else:
        found.extend(_request_problems(inner, type_, body))
    return found


def _findtext(el: etree._Element, tag: str) -> str | None:
    """``el.findtext(tag)`` for a plain name, matched by lxml in C (not ElementPath)."""
    child = next(el.iterchildren(tag), None)
    return None if child is None else (child.text or "")


def _result_code(inner: etree._Element) -> int | None:
    text = _findtext(inner, "result-code")
    return int(text) if text is not None and _INT_RE.match(text) else None


def _response_problems(
    inner: etree._Element, type_: str, body: etree._Element | None
) -> list[str]:
    found: list[str] = []
    code = _result_code(inner)
    if code is None:
        found.append("<arms-response> without an integer <result-code>")
    ok = code is not None and 100 <= code <= 199
    if type_ == "config-solicitation" and ok:
        if body is None:
            return [*found, "config-solicitation answer without <config-solicitation-response>"]
        heartbeats = list(body.iterchildren("heartbeat-info"))
        if not heartbeats:
            found.append(
                "config-solicitation answer without <heartbeat-info>: the device would "
                "busy-loop its heartbeat timer (§6.2)"
            )
        for hb in heartbeats:
            interval = _findtext(hb, "interval")
            if interval is None or not _INT_RE.match(interval) or int(interval) <= 0:
                found.append("<heartbeat-info> needs an <interval> greater than 0 (§6.2)")
            if not _findtext(hb, "host") or _findtext(hb, "passphrase") is None:
                found.append("<heartbeat-info> needs <host> and <passphrase>")
        if _findtext(body, "rs-pull-server-url") is None:
            found.append("config-solicitation answer without <rs-pull-server-url>: no push")
        found.extend(_modules_first(body, "config-solicitation-response"))
    if type_ == "push-confirmation-start" and ok:
        tid = inner.find("transaction-id")
        if tid is None or not _INT_RE.match(tid.text or "") or int(tid.text or "0") <= 0:
            found.append(
                "push-confirmation-start answer needs a positive <transaction-id> directly "
                "under <arms-response> (§6.4)"
            )
    if type_ == "push-method-query" and ok and body is not None:
        methods = [m.text for m in body.findall("push-method")]
        unknown = [m for m in methods if m not in _PUSH_METHODS]
        if unknown:
            found.append(f"unknown push-method(s) {unknown}")
        if "https-tunnel" in methods and not body.findall("https-tunnel-url"):
            found.append("https-tunnel offered without an <https-tunnel-url>")
    if type_.endswith("-done") and type_ != "push-confirmation-done":
        if inner.find("transaction-id") is None:
            found.append(f"{type_} answer without <transaction-id> (required on tunnels)")
    return found


def _request_problems(
    inner: etree._Element, type_: str, body: etree._Element | None
) -> list[str]:
    found: list[str] = []
    if inner.find("transaction-id") is not None and type_ != "push-confirmation-done":
        found.append(
            f"{type_}: a <transaction-id> in a start request is routed by the device to an "
            "existing transaction (§7.0.2)"
        )
    if type_ in ("configure-start", "configure"):
        if body is None or not body.findall("module"):
            found.append("configure without <module>: the device removes every module (§7.3)")
        elif body is not None:
            found.extend(_modules_first(body, "configure-start-request"))
            ids = {m.get("id") for m in body.findall("module")}
            for cfg in body.findall("md-config"):
                if cfg.get("id") not in ids:
                    found.append(f"<md-config id={cfg.get('id')}> has no <module> (415)")
    if type_ in ("md-command",):
        commands = [] if body is None else body.findall("md-command")
        if len(commands) != 1:
            found.append(f"md-command needs exactly one <md-command>, got {len(commands)}")
        for cmd in commands:
            if len((cmd.text or "").encode()) > MD_COMMAND_LIMIT:
                found.append(f"md-command text over {MD_COMMAND_LIMIT} bytes (402)")
    if type_ in ("read-status-start", "clear-status-start", "read-status", "clear-status"):
        if body is None or not body.findall("status-request"):
            found.append(f"{type_} without <status-request>")
    if type_ in ("ping-start", "traceroute-start", "ping", "traceroute"):
        if body is None or not (body.findtext("address") or ""):
            found.append(f"{type_} without <address> (203)")
    return found
