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
    tunnel_listen: str = ""  # optional listener for https-tunnels only (else: sa_listen)
    tls_minimum_version: str = "1.2"  # with devices, both directions: gate, tunnels, pushes
    client_ca: Path | None = None
    max_body: int = 1024 * 1024
    request_timeout: float = 20.0
    relay_budget: float = 20.0
    # connection caps of listen and tunnel_listen; None: automatic, from the descriptor limit
    max_connections: int | None = None
    tunnel_max_connections: int | None = None
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
    # push engine (https-simple pushes to SAs)
    sa_ca: Path | None = None  # CA that issues SA certificates (verifies SAs' listeners)
    push_client_certificate: Path | None = None  # cert+key PEM presented to SAs, or none
    result_url: str | None = None  # default: the first public URL
    max_attempts: int = 6
    retry_base: float = 5.0
    retry_cap: float = 300.0
    busy_delay: float = 30.0
    done_timeout: float = 900.0
    interrupted_grace: float = 120.0
    default_expires_in: float = 86400.0
    endpoint_from_peer: bool = False
    # done-requests no operation claims (yet): how many per SA, how long, how large kept
    orphan_dones_max_per_sa: int = 32
    orphan_dones_ttl: float = 3600.0
    orphan_done_max_bytes: int = 262144
    # store
    store_path: Path | None = None  # default: data_dir/armsproxy.sqlite
    results_ttl: float = 7 * 86400.0
    # RS gate (XML-RPC for the RS)
    rs_gate_listen: str = "tcp:8780:interface=127.0.0.1"
    rs_gate_client_ca: Path | None = None  # required client certificates for ssl:
    rs_gate_max_connections: int = 64
    rs_gate_request_timeout: float = 60.0
    # management gate (/healthz, /readyz, /metrics); empty: no such listener
    management_listen: str = ""
    management_max_connections: int = 16
    management_request_timeout: float = 10.0  # above /readyz's 5 s store timeout
    # embedded demo RS (the default when no configuration file is given)
    demo_rs: bool = False
    demo_rs_listen: str = "tcp:8790:interface=127.0.0.1"
    demo_rs_db: Path | None = None
    source: str = "embedded default"

    @property
    def effective_result_url(self) -> str:
        return self.result_url or self.public_urls[0]

    @property
    def effective_store_path(self) -> Path:
        return self.store_path or self.data_dir / "armsproxy.sqlite"

    @property
    def tunnel_paths(self) -> frozenset[str]:
        return frozenset((urlsplit(u).path or "/") for u in self.tunnel_urls)

    @property
    def sa_paths(self) -> frozenset[str]:
        """Request paths the SA gate serves: those of the URLs handed to devices."""
        return frozenset((urlsplit(u).path or "/") for u in self.public_urls)


def _list(value: str) -> list[str]:
    return [item for item in value.replace(",", " ").split() if item]


def _cap(value: str) -> int | None:
    """A connection cap: a number, or ``auto`` (None) for one derived from the descriptors."""
    return None if value.strip().lower() == "auto" else int(value)


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
    if cfg.tunnel_paths & cfg.sa_paths:
        problems.append("[push] tunnel_urls: their paths must differ from the public_urls' "
                        "paths (both are served on the SA gate's one listener)")
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
    if cfg.tunnel_listen and not cfg.tunnel_listen.startswith("ssl:"):
        problems.append("[sa_gate] tunnel_listen: must be an ssl: endpoint (devices speak "
                        "HTTPS only)")
    if cfg.tunnel_listen and not cfg.tunnel_urls:
        problems.append("[sa_gate] tunnel_listen: set [push] tunnel_urls too (the URLs the "
                        "devices are told to open their tunnels at)")
    if not cfg.rs_url.startswith(("http://", "https://")):
        problems.append(f"[rs] url: {cfg.rs_url!r} is not an http(s) URL")
    if cfg.relay_budget >= 28:
        problems.append("[sa_gate] relay_budget: must stay well under the SA's 30 s limit")
    if not 1 <= cfg.echo_interval <= 3600:
        problems.append("[push] echo_interval: 1..3600 seconds")
    if cfg.result_url is not None:
        problems.extend(f"[push] result_url: {p}" for p in url_problems(cfg.result_url))
        if cfg.result_url not in cfg.public_urls:
            problems.append("[push] result_url: must be one of [sa_gate] public_urls (the "
                            "gate only serves those paths)")
    if cfg.sa_ca is None:
        problems.append("[push] sa_ca: required: the CA that issues SA certificates (armsproxy "
                        "verifies every SA it pushes to against it)")
    if cfg.max_attempts < 1:
        problems.append("[push] max_attempts: at least 1")
    if cfg.orphan_dones_max_per_sa < 1:
        problems.append("[push] orphan_dones_max_per_sa: at least 1")
    if cfg.orphan_dones_ttl < 60:  # it must outlive the wait for a start answer (30 s)
        problems.append("[push] orphan_dones_ttl: at least 60 seconds")
    if cfg.orphan_done_max_bytes < 0:
        problems.append("[push] orphan_done_max_bytes: 0 or more")
    if cfg.rs_gate_listen.startswith("ssl:") and cfg.rs_gate_client_ca is None:
        problems.append("[rs_gate] listen: an ssl: RS gate needs client_ca (the RS must "
                        "present a client certificate)")
    if cfg.max_body < 4096:
        problems.append("[sa_gate] max_body: at least 4096 bytes")
    for name, cap in (("[sa_gate] max_connections", cfg.max_connections),
                      ("[sa_gate] tunnel_max_connections", cfg.tunnel_max_connections),
                      ("[rs_gate] max_connections", cfg.rs_gate_max_connections),
                      ("[management] max_connections", cfg.management_max_connections)):
        if cap is not None and cap < 1:
            problems.append(f"{name}: at least 1 (or auto where allowed)")
    if cfg.rs_gate_request_timeout <= 0:
        problems.append("[rs_gate] request_timeout: more than 0 seconds")
    if cfg.management_request_timeout <= 5:
        problems.append("[management] request_timeout: more than 5 seconds (/readyz waits up "
                        "to 5 s for the store)")
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
            tunnel_listen=get("sa_gate", "tunnel_listen", fallback=""),
            public_urls=_list(get("sa_gate", "public_urls", fallback="")),
            tls_minimum_version=get("sa_gate", "tls_minimum_version", fallback="1.2"),
            client_ca=_path(get("sa_gate", "client_ca", fallback=None), base),
            max_body=parser.getint("sa_gate", "max_body", fallback=1024 * 1024),
            request_timeout=parser.getfloat("sa_gate", "request_timeout", fallback=20.0),
            relay_budget=parser.getfloat("sa_gate", "relay_budget", fallback=20.0),
            max_connections=_cap(get("sa_gate", "max_connections", fallback="auto")),
            tunnel_max_connections=_cap(get("sa_gate", "tunnel_max_connections",
                                            fallback="auto")),
            rs_url=get("rs", "url", fallback=""),
            rs_ca=_path(get("rs", "ca", fallback=None), base),
            rs_client_certificate=_path(get("rs", "client_certificate", fallback=None), base),
            rs_timeout=parser.getfloat("rs", "timeout", fallback=15.0),
            key_cache_ttl=parser.getfloat("rs", "key_cache_ttl", fallback=300.0),
            push_methods=_list(get("push", "methods", fallback="https-simple")),
            tunnel_urls=_list(get("push", "tunnel_urls", fallback="")),
            echo_interval=parser.getint("push", "echo_interval", fallback=60),
            sa_ca=_path(get("push", "sa_ca", fallback=None), base),
            push_client_certificate=_path(get("push", "client_certificate", fallback=None),
                                          base),
            result_url=get("push", "result_url", fallback=None),
            max_attempts=parser.getint("push", "max_attempts", fallback=6),
            retry_base=parser.getfloat("push", "retry_base", fallback=5.0),
            retry_cap=parser.getfloat("push", "retry_cap", fallback=300.0),
            busy_delay=parser.getfloat("push", "busy_delay", fallback=30.0),
            done_timeout=parser.getfloat("push", "done_timeout", fallback=900.0),
            interrupted_grace=parser.getfloat("push", "interrupted_grace", fallback=120.0),
            default_expires_in=parser.getfloat("push", "default_expires_in",
                                               fallback=86400.0),
            endpoint_from_peer=parser.getboolean("push", "endpoint_from_peer",
                                                 fallback=False),
            orphan_dones_max_per_sa=parser.getint("push", "orphan_dones_max_per_sa",
                                                  fallback=32),
            orphan_dones_ttl=parser.getfloat("push", "orphan_dones_ttl", fallback=3600.0),
            orphan_done_max_bytes=parser.getint("push", "orphan_done_max_bytes",
                                                fallback=262144),
            store_path=_path(get("store", "path", fallback=None), base),
            results_ttl=parser.getfloat("store", "results_ttl", fallback=7 * 86400.0),
            rs_gate_listen=get("rs_gate", "listen", fallback="tcp:8780:interface=127.0.0.1"),
            rs_gate_client_ca=_path(get("rs_gate", "client_ca", fallback=None), base),
            rs_gate_max_connections=parser.getint("rs_gate", "max_connections", fallback=64),
            rs_gate_request_timeout=parser.getfloat("rs_gate", "request_timeout",
                                                    fallback=60.0),
            management_listen=get("management", "listen", fallback=""),
            management_max_connections=parser.getint("management", "max_connections",
                                                     fallback=16),
            management_request_timeout=parser.getfloat("management", "request_timeout",
                                                       fallback=10.0),
            demo_rs=parser.getboolean("demo_rs", "enabled", fallback=False),
            demo_rs_listen=get("demo_rs", "listen", fallback="tcp:8790:interface=127.0.0.1"),
            demo_rs_db=_path(get("demo_rs", "db", fallback=None), base),
            source=str(path),
        )
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return validate(cfg)


def embedded(data_dir: Path, *, port: int = 8443, rs_port: int = 8790,
             rs_gate_port: int = 8780, management_port: int | None = None,
             host: str = "127.0.0.1", tls_minimum_version: str = "1.2") -> Config:
    """Proxy + demo RS on loopback with a generated dev PKI under ``data_dir``; the management
    gate too if ``management_port`` is given (``twistd armsproxy`` gives 8781).
    ``tls_minimum_version`` "1.0" lets real (TLS 1.0) libarms devices in, both directions."""
    pki = data_dir / "pki"
    return validate(Config(
        data_dir=data_dir,
        sa_listen=f"ssl:{port}:interface={host}:privateKey={pki / 'server.key'}:"
                  f"certKey={pki / 'server.pem'}",
        public_urls=[f"https://{host}:{port}/arms"],
        tls_minimum_version=tls_minimum_version,
        rs_url=f"http://127.0.0.1:{rs_port}/RPC2",
        demo_rs=True,
        demo_rs_listen=f"tcp:{rs_port}:interface=127.0.0.1",
        demo_rs_db=data_dir / "demo-rs.sqlite",
        sa_ca=pki / "ca.pem",  # the dev CA issues both the gate's and the SAs' certificates
        tunnel_urls=[f"https://{host}:{port}/arms-tunnel"],
        rs_gate_listen=f"tcp:{rs_gate_port}:interface=127.0.0.1",
        management_listen=(f"tcp:{management_port}:interface=127.0.0.1"
                           if management_port else ""),
    ))
