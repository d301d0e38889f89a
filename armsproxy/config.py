"""armsproxy configuration: an INI file (see etc/armsproxy.conf), or the embedded default.

Everything a device will be handed (public URLs) is checked at startup against the rules
libarms applies (§2.2), so a bad value stops the process with a clear message instead of
silently stranding devices later. The file itself is checked as strictly: an unknown section
or key (a typo that would silently leave a default in force), a value that is not a number
where one is expected, are errors naming the file, the section and the key. :func:`check`
does what the start does with the files the configuration names, short of binding.
"""

from __future__ import annotations

import configparser
import difflib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .arms.urls import url_problems
from .tls import TLS_VERSIONS, endpoint_fields, quote_endpoint_value

PUSH_METHODS = ("https-simple", "https-tunnel")
T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration cannot be used; the message lists every problem found.

    ``problems`` are ``[section] key: problem`` lines (or just the problem, for a file that
    cannot be read at all), ``source`` the file (or "embedded default").
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}:\n  " + "\n  ".join(self.problems))

    def lines(self) -> list[str]:
        """One ``FILE: [section] key: problem`` line per problem, for a terminal or a log."""
        return [f"{self.source}: {problem}" for problem in self.problems]


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
    rs_event_batch: int = 100  # events per arms.events call (event outbox)
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
    store_backend: str = "sqlite"  # or "postgresql" (store_dsn)
    store_path: Path | None = None  # default: data_dir/armsproxy.sqlite
    store_dsn: str | None = None  # PostgreSQL: libpq connection string or URI
    store_pool_size: int = 4  # PostgreSQL: connections (and threads) of this proxy
    # instances (several proxies on one PostgreSQL store): the lease each renews; another
    # instance takes over what one was sending once its lease expired
    store_lease: float = 15.0
    store_lease_renew: float = 5.0
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
    # processes on this host sharing the listeners (armsproxy/workers.py); more than one needs
    # the PostgreSQL store
    workers: int = 1

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


def _path(value: str | None, base: Path) -> Path | None:
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


# Endpoint-string arguments that name files or directories (Twisted's ssl: and unix:, and
# ours): resolved against the configuration file like every other path.
ENDPOINT_PATH_KEYS = frozenset({"privateKey", "certKey", "extraCertChain", "caCertsDir",
                                "dhParameters", "address", "ecdsaPrivateKey", "ecdsaCertKey"})


def _unescape(raw: str) -> str:
    """One field as written (escapes kept) -> its value: a field holds no unescaped colon."""
    return endpoint_fields(raw)[0]


def resolve_endpoint_paths(description: str, base: Path) -> str:
    """``description`` with its relative file paths (``privateKey=``, ``certKey=``,
    ``extraCertChain=``, ``ecdsaPrivateKey=``, ``ecdsaCertKey=``, ``caCertsDir=``,
    ``dhParameters=``, a ``unix:`` socket) made absolute against ``base``; everything else
    exactly as written."""
    fields = endpoint_fields(description, keep_escapes=True)
    kind = fields[0]
    for i, raw in enumerate(fields[1:], start=1):
        key, sep, value = raw.partition("=")
        if sep and "\\" not in key and key in ENDPOINT_PATH_KEYS:
            if key == "address" and kind != "unix":
                continue
            path = _unescape(value)
            if path and not Path(path).is_absolute():
                fields[i] = f"{key}={quote_endpoint_value(str(base / path))}"
        elif not sep and i == 1 and kind == "unix":
            path = _unescape(raw)
            if path and not Path(path).is_absolute():
                fields[i] = quote_endpoint_value(str(base / path))
    return ":".join(fields)


def endpoint_summary(description: str) -> str:
    """``description`` without its key and certificate paths: the listener as a message
    names it (``ssl:443:interface=203.0.113.20``)."""
    fields = endpoint_fields(description, keep_escapes=True)
    hidden = ENDPOINT_PATH_KEYS - {"address"}
    return ":".join(f for f in fields if f.partition("=")[0] not in hidden)


class _Reader:
    """Reads typed values from the parsed file, recording every key it was asked for (so
    the keys nobody asked for are the unknown ones) and every value it could not use."""

    _BOOLEANS = {"1": True, "yes": True, "true": True, "on": True,
                 "0": False, "no": False, "false": False, "off": False}

    def __init__(self, parser: configparser.ConfigParser, base: Path) -> None:
        self.parser = parser
        self.base = base
        self.known: dict[str, list[str]] = {}
        self.problems: list[str] = []

    def _raw(self, section: str, key: str) -> str | None:
        self.known.setdefault(section, []).append(key)
        return self.parser.get(section, key, fallback=None)

    def _typed(self, section: str, key: str, default: T, convert: Callable[[str], T],
               expected: str) -> T:
        raw = self._raw(section, key)
        if raw is None:
            return default
        try:
            return convert(raw.strip())
        except ValueError:
            self.problems.append(f"[{section}] {key}: {raw!r} is not {expected}")
            return default

    def str(self, section: str, key: str, default: str) -> str:
        raw = self._raw(section, key)
        return default if raw is None else raw

    def optional(self, section: str, key: str) -> str | None:
        return self._raw(section, key) or None

    def int(self, section: str, key: str, default: int) -> int:
        return self._typed(section, key, default, int, "a whole number")

    def float(self, section: str, key: str, default: float) -> float:
        def finite(text: str) -> float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        return self._typed(section, key, default, finite, "a (finite) number")

    def bool(self, section: str, key: str, default: bool) -> bool:
        def boolean(text: str) -> bool:
            try:
                return self._BOOLEANS[text.lower()]
            except KeyError:
                raise ValueError(text) from None
        return self._typed(section, key, default, boolean, "yes or no")

    def cap(self, section: str, key: str) -> int | None:
        """A connection cap: a number, or ``auto`` (None) for one derived from the
        descriptors."""
        return self._typed(section, key, None,
                           lambda text: None if text.lower() == "auto" else int(text),
                           "auto or a whole number")

    def workers(self, section: str, key: str) -> int:
        """A process count: a number, or ``auto`` for one per CPU core this process may use."""
        return self._typed(section, key, 1,
                           lambda text: cpu_cores() if text.lower() == "auto" else int(text),
                           "auto or a whole number")

    def path(self, section: str, key: str, default: str | None = None) -> Path | None:
        return _path(self.str(section, key, default or "") or None, self.base)

    def endpoint(self, section: str, key: str, default: str) -> str:
        return resolve_endpoint_paths(self.str(section, key, default), self.base)

    def unknown(self) -> list[str]:
        """Every section and key of the file that armsproxy does not read, with the
        nearest one it does."""
        problems = []
        all_keys = {(s, k) for s, keys in self.known.items() for k in keys}
        for section in self.parser.sections():
            if section not in self.known:
                near = difflib.get_close_matches(section, list(self.known), n=1)
                if section.upper() == "DEFAULT":
                    hint = " (not supported: each key goes in its own section)"
                elif near:
                    hint = f" (did you mean [{near[0]}]?)"
                else:
                    hint = f" (sections: {', '.join(f'[{s}]' for s in self.known)})"
                problems.append(f"[{section}]: unknown section{hint}")
                continue
            for key in self.parser.options(section):
                if (section, key) in all_keys:
                    continue
                problems.append(f"[{section}] {key}: unknown key{self._hint(section, key)}")
        return problems

    def _hint(self, section: str, key: str) -> str:
        elsewhere = [s for s, keys in self.known.items() if key in keys]
        if elsewhere:
            return f" (did you mean [{elsewhere[0]}] {key}?)"
        near = difflib.get_close_matches(key, self.known[section], n=1)
        if near:
            return f" (did you mean {near[0]}?)"
        everywhere = {f"[{s}] {k}": k for s, keys in self.known.items() for k in keys}
        near = difflib.get_close_matches(key, list(everywhere.values()), n=1)
        if near:
            where = next(name for name, k in everywhere.items() if k == near[0])
            return f" (did you mean {where}?)"
        return ""


def validate(cfg: Config) -> Config:
    """``cfg`` if it can be used, else :class:`ConfigError` with every problem."""
    problems = value_problems(cfg)
    if problems:
        raise ConfigError(cfg.source, problems)
    return cfg


def cpu_cores(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPU cores this process may use: its affinity, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def workers_problems(cfg: Config, workers: int, setting: str) -> list[str]:
    """Why ``workers`` processes cannot share ``cfg``'s store, if they cannot."""
    if workers < 1:
        return [f"{setting}: at least 1 (or auto: one per CPU core)"]
    if workers > 1 and cfg.store_backend != "postgresql":
        return [f"{setting} = {workers}: several worker processes need [store] backend = "
                f"postgresql (a SQLite store is one process's)"]
    return []


def value_problems(cfg: Config) -> list[str]:
    """What is wrong with the values themselves (URLs per libarms, ranges, combinations)."""
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
    if not 1 <= cfg.rs_event_batch <= 1000:
        problems.append("[rs] event_batch: 1..1000 events per arms.events call")
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
    if cfg.store_backend not in ("sqlite", "postgresql"):
        problems.append(f"[store] backend: {cfg.store_backend!r}, use sqlite or postgresql")
    elif cfg.store_backend == "postgresql":
        if not cfg.store_dsn:
            problems.append("[store] dsn: required with backend = postgresql")
        if cfg.store_path is not None:
            problems.append("[store] path: only with backend = sqlite (PostgreSQL: dsn)")
    elif cfg.store_dsn:
        problems.append("[store] dsn: only with backend = postgresql")
    if not 0 < cfg.store_lease_renew < cfg.store_lease:
        problems.append("[store] lease_renew, lease: 0 < lease_renew < lease (seconds)")
    if cfg.store_pool_size < 1:
        problems.append("[store] pool_size: at least 1")
    if cfg.management_request_timeout <= 5:
        problems.append("[management] request_timeout: more than 5 seconds (/readyz waits up "
                        "to 5 s for the store)")
    return problems


def load(path: Path) -> Config:
    """The configuration in ``path``; :class:`ConfigError` lists every problem of the file
    and its values (not those of the files it names: see :func:`check`)."""
    # No DEFAULT section: its keys would be copied into every section, unknown everywhere.
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"),
                                       default_section="\0no default section")
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(str(path), [str(e.strerror)]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text: {e.reason} at byte {e.start}"]) \
            from None
    except configparser.Error as e:
        raise ConfigError(str(path), [" ".join(str(e).split())]) from None
    r = _Reader(parser, path.parent)
    data_dir = r.path("armsproxy", "data_dir", "/var/lib/armsproxy")
    assert data_dir is not None
    cfg = Config(
        data_dir=data_dir,
        sa_listen=r.endpoint("sa_gate", "listen", ""),
        tunnel_listen=r.endpoint("sa_gate", "tunnel_listen", ""),
        public_urls=_list(r.str("sa_gate", "public_urls", "")),
        tls_minimum_version=r.str("sa_gate", "tls_minimum_version", "1.2").strip(),
        client_ca=r.path("sa_gate", "client_ca"),
        max_body=r.int("sa_gate", "max_body", 1024 * 1024),
        request_timeout=r.float("sa_gate", "request_timeout", 20.0),
        relay_budget=r.float("sa_gate", "relay_budget", 20.0),
        max_connections=r.cap("sa_gate", "max_connections"),
        tunnel_max_connections=r.cap("sa_gate", "tunnel_max_connections"),
        rs_url=r.str("rs", "url", "").strip(),
        rs_ca=r.path("rs", "ca"),
        rs_client_certificate=r.path("rs", "client_certificate"),
        rs_timeout=r.float("rs", "timeout", 15.0),
        key_cache_ttl=r.float("rs", "key_cache_ttl", 300.0),
        rs_event_batch=r.int("rs", "event_batch", 100),
        push_methods=_list(r.str("push", "methods", "https-simple")),
        tunnel_urls=_list(r.str("push", "tunnel_urls", "")),
        echo_interval=r.int("push", "echo_interval", 60),
        sa_ca=r.path("push", "sa_ca"),
        push_client_certificate=r.path("push", "client_certificate"),
        result_url=r.optional("push", "result_url"),
        max_attempts=r.int("push", "max_attempts", 6),
        retry_base=r.float("push", "retry_base", 5.0),
        retry_cap=r.float("push", "retry_cap", 300.0),
        busy_delay=r.float("push", "busy_delay", 30.0),
        done_timeout=r.float("push", "done_timeout", 900.0),
        interrupted_grace=r.float("push", "interrupted_grace", 120.0),
        default_expires_in=r.float("push", "default_expires_in", 86400.0),
        endpoint_from_peer=r.bool("push", "endpoint_from_peer", False),
        orphan_dones_max_per_sa=r.int("push", "orphan_dones_max_per_sa", 32),
        orphan_dones_ttl=r.float("push", "orphan_dones_ttl", 3600.0),
        orphan_done_max_bytes=r.int("push", "orphan_done_max_bytes", 262144),
        store_backend=r.str("store", "backend", "sqlite").strip().lower(),
        store_path=r.path("store", "path"),
        store_dsn=r.optional("store", "dsn"),
        store_pool_size=r.int("store", "pool_size", 4),
        store_lease=r.float("store", "lease", 15.0),
        store_lease_renew=r.float("store", "lease_renew", 5.0),
        results_ttl=r.float("store", "results_ttl", 7 * 86400.0),
        rs_gate_listen=r.endpoint("rs_gate", "listen", "tcp:8780:interface=127.0.0.1"),
        rs_gate_client_ca=r.path("rs_gate", "client_ca"),
        rs_gate_max_connections=r.int("rs_gate", "max_connections", 64),
        rs_gate_request_timeout=r.float("rs_gate", "request_timeout", 60.0),
        workers=r.workers("armsproxy", "workers"),
        management_listen=r.endpoint("management", "listen", ""),
        management_max_connections=r.int("management", "max_connections", 16),
        management_request_timeout=r.float("management", "request_timeout", 10.0),
        demo_rs=r.bool("demo_rs", "enabled", False),
        demo_rs_listen=r.endpoint("demo_rs", "listen", "tcp:8790:interface=127.0.0.1"),
        demo_rs_db=r.path("demo_rs", "db"),
        source=str(path),
    )
    # Unusable values fell back to their defaults, so the rest is still checked.
    problems = r.unknown() + r.problems + value_problems(cfg)
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def embedded(data_dir: Path, *, port: int = 8443, rs_port: int = 8790,
             rs_gate_port: int = 8780, management_port: int | None = None,
             host: str = "127.0.0.1", tls_minimum_version: str = "1.2") -> Config:
    """Proxy + demo RS on loopback with a generated dev PKI under ``data_dir``; the management
    gate too if ``management_port`` is given (``twistd armsproxy`` gives 8781).
    ``tls_minimum_version`` "1.0" lets real (TLS 1.0) libarms devices in, both directions."""
    pki = data_dir / "pki"
    return validate(Config(
        data_dir=data_dir,
        # Both certificates of the dev PKI: ECDSA to clients that offer it, RSA to the rest.
        sa_listen=f"ssl:{port}:interface={host}:privateKey={pki / 'server.key'}:"
                  f"certKey={pki / 'server.pem'}:ecdsaPrivateKey={pki / 'server-ecdsa.key'}:"
                  f"ecdsaCertKey={pki / 'server-ecdsa.pem'}",
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


# ---------------------------------------------------------------------------------------------
# What the start does with the files the configuration names, short of binding
# ---------------------------------------------------------------------------------------------

def check(cfg: Config, reactor: Any = None) -> list[str]:
    """Every problem the start would meet with ``cfg`` before listening, as
    ``[section] key: problem`` lines: files unreadable, PEMs that do not parse, keys that do
    not match their certificate, listeners that cannot be built, a store of a newer schema.

    Run by the start (twistd and twist) and by ``armsproxyctl check-config``, so that these
    are one line naming the key and the path, never a traceback.
    """
    from cryptography import x509
    from OpenSSL import SSL, crypto

    from .push.client import SAPushClient
    from .rs_client import RSClient
    from .rs_gate.server import rs_gate_endpoint
    from .tls import TLSPolicy, server_endpoint, split_endpoint, tls_listener

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    unusable = (ValueError, TypeError, SSL.Error, crypto.Error)
    problems: list[str] = []
    pems: dict[str, bytes | None] = {}
    # Here, not in value_problems: twistd's --workers overrides it (tap.makeService).
    problems.extend(workers_problems(cfg, cfg.workers, "[armsproxy] workers"))

    def pem(setting: str, path: Path | None, *, with_key: bool = False) -> None:
        """Read and parse one PEM file setting; ``pems[setting]``: its bytes if usable."""
        pems[setting] = None
        if path is None:
            return
        problem = _pem_problem(path, with_key=with_key, x509=x509)
        if problem:
            problems.append(f"{setting}: {path}: {problem}")
        else:
            pems[setting] = path.read_bytes()

    pem("[sa_gate] client_ca", cfg.client_ca)
    pem("[rs] ca", cfg.rs_ca)
    pem("[rs] client_certificate", cfg.rs_client_certificate, with_key=True)
    pem("[push] sa_ca", cfg.sa_ca)
    pem("[push] client_certificate", cfg.push_client_certificate, with_key=True)
    pem("[rs_gate] client_ca", cfg.rs_gate_client_ca)

    def listener(setting: str, description: str, build: Callable[[], object]) -> None:
        if not description:
            return
        spec = split_endpoint(description)
        missing = False
        for key in ("privateKey", "certKey", "extraCertChain", "ecdsaPrivateKey",
                    "ecdsaCertKey"):
            name = spec.kwargs.get(key)
            if name:
                try:
                    Path(name).read_bytes()
                except OSError as e:
                    problems.append(f"{setting}: {key}={name}: cannot read: {e.strerror}")
                    missing = True
        if missing:
            return
        try:
            build()
        except unusable as e:
            problems.append(f"{setting}: {_reason(e)}")

    try:
        policy = TLSPolicy(minimum_version=cfg.tls_minimum_version,
                           client_ca_pem=pems["[sa_gate] client_ca"])
    except unusable as e:
        problems.append(f"[sa_gate] tls_minimum_version: {_reason(e)}")
        policy = TLSPolicy(client_ca_pem=pems["[sa_gate] client_ca"])
    policy._warned = True  # the start warns about TLS < 1.2 once, when it builds the listeners
    if cfg.source != "embedded default":  # its dev PKI is made at the start
        listener("[sa_gate] listen", cfg.sa_listen,
                 lambda: tls_listener(reactor, cfg.sa_listen, policy))
    listener("[sa_gate] tunnel_listen", cfg.tunnel_listen,
             lambda: tls_listener(reactor, cfg.tunnel_listen, policy))
    if cfg.rs_gate_listen.startswith("ssl:"):
        if "[rs_gate] client_ca" not in _failed(problems):
            listener("[rs_gate] listen", cfg.rs_gate_listen,
                     lambda: rs_gate_endpoint(reactor, cfg.rs_gate_listen,
                                              tls_client_ca=pems["[rs_gate] client_ca"]))
    else:  # parsed only: the start warns about a plain listener, once
        listener("[rs_gate] listen", cfg.rs_gate_listen,
                 lambda: server_endpoint(reactor, cfg.rs_gate_listen, ""))
    listener("[management] listen", cfg.management_listen,
             lambda: server_endpoint(reactor, cfg.management_listen, ""))
    if cfg.demo_rs:
        listener("[demo_rs] listen", cfg.demo_rs_listen,
                 lambda: server_endpoint(reactor, cfg.demo_rs_listen, ""))

    failed = _failed(problems)
    if not {"[rs] ca", "[rs] client_certificate"} & failed:
        try:
            RSClient(reactor, cfg.rs_url, ca_pem=pems["[rs] ca"],
                     client_cert_pem=pems["[rs] client_certificate"], timeout=cfg.rs_timeout)
        except unusable as e:
            problems.append(f"[rs]: {_reason(e)}")
    if cfg.sa_ca is not None and not {"[push] sa_ca", "[push] client_certificate"} & failed:
        try:
            SAPushClient(reactor, sa_ca_pem=pems["[push] sa_ca"] or b"",
                         client_cert_pem=pems["[push] client_certificate"],
                         tls_minimum_version=cfg.tls_minimum_version)
        except unusable as e:
            problems.append(f"[push]: {_reason(e)}")
    problems.extend(store_problems(cfg))
    return problems


def store_setting(cfg: Config) -> str:
    """The setting that names the store's path, for messages."""
    if cfg.store_backend == "postgresql":
        return "[store] dsn"
    if cfg.store_path is not None:
        return "[store] path"
    return "--data-dir" if cfg.source == "embedded default" else "[armsproxy] data_dir"


def store_problems(cfg: Config) -> list[str]:
    """A store (or its directory) the start could not use: not a directory, or a database
    written by a newer armsproxy. Unreadable to whoever checks: not judged (the service's
    own user may read it)."""
    from .store.migrations import SCHEMA_VERSION

    if cfg.store_backend == "postgresql":
        # Not connected to here: the schema version is checked when the store opens.
        try:
            import armsproxy.store.postgresql  # noqa: F401
        except ImportError as e:
            return [f"[store] backend: postgresql needs psycopg 3 and psycopg_pool ({e}): "
                    "pip install 'armsproxy[postgresql]'"]
        return []
    path = cfg.effective_store_path
    setting = store_setting(cfg)
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                return [f"{setting}: {parent}: not a directory"]
            break
    if not path.exists():
        return []
    if not path.is_file():
        return [f"{setting}: {path}: not a regular file"]
    # The header, not a connection: even a read-only one creates -wal and -shm files, which a
    # check run as root would leave unwritable to armsproxy's user. (A newer armsproxy's
    # migration still in an uncheckpointed WAL is only seen when the store opens.)
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except OSError:
        return []
    if not header:
        return []  # empty: SQLite makes it a new database
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return [f"{setting}: {path}: not an SQLite database"]
    version = int.from_bytes(header[60:64], "big", signed=True)  # PRAGMA user_version
    if version > SCHEMA_VERSION:
        return [f"{setting}: {path}: database schema version {version} is newer than this "
                f"armsproxy ({SCHEMA_VERSION}); upgrade armsproxy or use another database"]
    return []


def _failed(problems: list[str]) -> set[str]:
    """The settings (``[section] key``) a problem was reported for."""
    return {p.split(":", 1)[0] for p in problems}


def _reason(e: BaseException) -> str:
    if isinstance(e, Exception) and type(e).__name__ == "Error" and e.args:
        # OpenSSL's errors: a list of (library, function, reason) tuples
        reasons = [str(r[-1]) for r in e.args[0] if isinstance(r, tuple)] \
            if isinstance(e.args[0], list) else []
        if reasons:
            return "; ".join(reasons)
    return " ".join(str(e).split()) or type(e).__name__


_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----",
                      re.S)


def _pem_problem(path: Path, *, with_key: bool, x509: Any) -> str | None:
    """Why ``path`` is no usable PEM certificate file (with the matching key if
    ``with_key``); None if it is one."""
    from cryptography.hazmat.primitives import serialization

    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read: {e.strerror}"
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        return "no PEM certificate in it"
    if not with_key:
        return None
    block = _PEM_KEY.search(data)
    if block is None:
        return "no PEM private key in it (a client certificate file holds both)"
    try:
        key = serialization.load_pem_private_key(block.group(0), password=None)
    except (ValueError, TypeError) as e:
        return f"unusable private key: {_reason(e)}"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if (key.public_key().public_bytes(der, spki)
            != certificates[0].public_key().public_bytes(der, spki)):
        return "the private key does not match the certificate"
    return None
