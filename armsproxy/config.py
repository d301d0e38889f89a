"""armsproxy configuration: an INI file (see etc/armsproxy.conf), or the embedded default.

Everything a device will be handed (public URLs) is checked at startup against the rules
libarms applies (§2.2), so a bad value stops the process with a clear message instead of
silently stranding devices later.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .arms.urls import url_problems
from .tls import TLS_VERSIONS

PUSH_METHODS = ("https-simple", "https-tunnel")


class ConfigError(ValueError):
    """The configuration cannot be used; the message lists every problem found."""


@dataclass(slots=True)
class Config:
    data_dir: Path
    # SA gate
    sa_listen: str
    public_urls: list[str]
    tls_minimum_version: str = "1.2"
    client_ca: Path | None = None
    max_body: int = 1024 * 1024
    request_timeout: float = 20.0
    relay_budget: float = 20.0
    # RS
    rs_url: str = "http://127.0.0.1:8790/RPC2"
    rs_ca: Path | None = None
    rs_client_certificate: Path | None = None
    rs_timeout: float = 15.0
    key_cache_ttl: float = 300.0
    # push negotiation
    push_methods: list[str] = field(default_factory=lambda: ["https-simple"])
    tunnel_urls: list[str] = field(default_factory=list)
    echo_interval: int = 60
    # embedded demo RS (the default when no configuration file is given)
    demo_rs: bool = False
    demo_rs_listen: str = "tcp:8790:interface=127.0.0.1"
    demo_rs_db: Path | None = None
    source: str = "embedded default"

    @property
    def sa_paths(self) -> frozenset[str]:
        """Request paths the SA gate serves: those of the URLs handed to devices."""
        return frozenset((urlsplit(u).path or "/") for u in self.public_urls)


def _list(value: str) -> list[str]:
    return [item for item in value.replace(",", " ").split() if item]


def _path(value: str | None, base: Path) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def validate(cfg: Config) -> Config:
    problems: list[str] = []
    if not cfg.public_urls:
        problems.append("[sa_gate] public_urls: at least one URL is required")
    if len(cfg.public_urls) > 5:
        problems.append("[sa_gate] public_urls: at most 5 (devices reject more)")
    for url in cfg.public_urls:
        problems.extend(f"[sa_gate] public_urls: {p}" for p in url_problems(url))
    if len(cfg.tunnel_urls) > 5:
        problems.append("[push] tunnel_urls: at most 5 (devices reject more)")
    for url in cfg.tunnel_urls:
        problems.extend(f"[push] tunnel_urls: {p}" for p in url_problems(url))
    for method in cfg.push_methods:
        if method not in PUSH_METHODS:
            problems.append(f"[push] methods: unknown method {method!r} (use {PUSH_METHODS})")
    if cfg.tls_minimum_version not in TLS_VERSIONS:
        problems.append(
            f"[sa_gate] tls_minimum_version: {cfg.tls_minimum_version!r}, use one of "
            f"{sorted(TLS_VERSIONS)}"
        )
    if not cfg.sa_listen.startswith("ssl:"):
        problems.append("[sa_gate] listen: must be an ssl: endpoint (devices speak HTTPS only)")
    if not cfg.rs_url.startswith(("http://", "https://")):
        problems.append(f"[rs] url: {cfg.rs_url!r} is not an http(s) URL")
    if cfg.relay_budget >= 28:
        problems.append("[sa_gate] relay_budget: must stay well under the SA's 30 s limit")
    if not 1 <= cfg.echo_interval <= 3600:
        problems.append("[push] echo_interval: 1..3600 seconds")
    if cfg.max_body < 4096:
        problems.append("[sa_gate] max_body: at least 4096 bytes")
    if problems:
        raise ConfigError(f"{cfg.source}:\n  " + "\n  ".join(problems))
    return cfg


def load(path: Path) -> Config:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: {e}") from None
    base = path.parent
    get = parser.get
    try:
        data_dir = _path(get("armsproxy", "data_dir", fallback="/var/lib/armsproxy"), base)
        assert data_dir is not None
        cfg = Config(
            data_dir=data_dir,
            sa_listen=get("sa_gate", "listen", fallback=""),
            public_urls=_list(get("sa_gate", "public_urls", fallback="")),
            tls_minimum_version=get("sa_gate", "tls_minimum_version", fallback="1.2"),
            client_ca=_path(get("sa_gate", "client_ca", fallback=None), base),
            max_body=parser.getint("sa_gate", "max_body", fallback=1024 * 1024),
            request_timeout=parser.getfloat("sa_gate", "request_timeout", fallback=20.0),
            relay_budget=parser.getfloat("sa_gate", "relay_budget", fallback=20.0),
            rs_url=get("rs", "url", fallback=""),
            rs_ca=_path(get("rs", "ca", fallback=None), base),
            rs_client_certificate=_path(get("rs", "client_certificate", fallback=None), base),
            rs_timeout=parser.getfloat("rs", "timeout", fallback=15.0),
            key_cache_ttl=parser.getfloat("rs", "key_cache_ttl", fallback=300.0),
            push_methods=_list(get("push", "methods", fallback="https-simple")),
            tunnel_urls=_list(get("push", "tunnel_urls", fallback="")),
            echo_interval=parser.getint("push", "echo_interval", fallback=60),
            demo_rs=parser.getboolean("demo_rs", "enabled", fallback=False),
            demo_rs_listen=get("demo_rs", "listen", fallback="tcp:8790:interface=127.0.0.1"),
            demo_rs_db=_path(get("demo_rs", "db", fallback=None), base),
            source=str(path),
        )
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return validate(cfg)


def embedded(data_dir: Path, *, port: int = 8443, rs_port: int = 8790,
             host: str = "127.0.0.1") -> Config:
    """Proxy + demo RS on loopback with a generated dev PKI under ``data_dir``."""
    pki = data_dir / "pki"
    return validate(Config(
        data_dir=data_dir,
        sa_listen=f"ssl:{port}:interface={host}:privateKey={pki / 'server.key'}:"
                  f"certKey={pki / 'server.pem'}",
        public_urls=[f"https://{host}:{port}/arms"],
        rs_url=f"http://127.0.0.1:{rs_port}/RPC2",
        demo_rs=True,
        demo_rs_listen=f"tcp:{rs_port}:interface=127.0.0.1",
        demo_rs_db=data_dir / "demo-rs.sqlite",
    ))
