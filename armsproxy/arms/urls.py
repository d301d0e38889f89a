"""URLs handed to SAs, checked the way libarms parses them (§2.2).

libarms never resolves names and has fixed buffers, so a URL that would be fine for a browser
can be unusable for a device. We check every URL before it is configured or sent.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HOST = 79
MAX_PORT = 7
MAX_PATH = 79


@dataclass(frozen=True, slots=True)
class SAUrl:
    host: str  # literal IP, without brackets
    port: int
    path: str  # with the leading "/"


def url_problems(url: str) -> list[str]:
    """Reasons a device could not use ``url``; empty if it can.

    Every answer that carries URLs is checked (each config-solicitation answer), and they are
    nearly always the same few configured ones: the verdicts are cached."""
    return list(_url_problems(url))


@functools.lru_cache(maxsize=1024)
def _url_problems(url: str) -> tuple[str, ...]:
    return tuple(_find_url_problems(url))


def _find_url_problems(url: str) -> list[str]:
    problems: list[str] = []
    if any(c.isspace() for c in url):
        return [f"{url!r}: URLs handed to devices must not contain whitespace"]
    if not url.isascii():
        return [f"{url!r}: URLs handed to devices must be ASCII"]
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        problems.append(f"{url!r}: scheme must be https (devices use nothing else)")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        problems.append(f"{url!r}: host must be a literal IP address (devices never resolve names)")
    raw_host = parts.netloc.rsplit("@", 1)[-1]
    if raw_host.startswith("["):
        port_text = raw_host.rsplit("]", 1)[-1].lstrip(":")
    else:
        port_text = raw_host.rsplit(":", 1)[1] if ":" in raw_host else ""
    if len(host) > MAX_HOST:
        problems.append(f"{url!r}: host longer than {MAX_HOST} characters")
    if len(port_text) > MAX_PORT:
        problems.append(f"{url!r}: port longer than {MAX_PORT} characters")
    try:
        _ = parts.port
    except ValueError:
        problems.append(f"{url!r}: port is not a number in range")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    if len(path.lstrip("/")) > MAX_PATH:
        problems.append(f"{url!r}: path longer than {MAX_PATH} characters")
    return problems


def parse_sa_url(url: str) -> SAUrl:
    problems = url_problems(url)
    if problems:
        raise ValueError("; ".join(problems))
    parts = urlsplit(url)
    return SAUrl(
        host=parts.hostname or "",
        port=parts.port or 443,
        path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
    )
