"""``twistd armsproxy``: options and the service tree.

With ``--config`` the proxy runs as the operator configured it. Without, it runs the embedded
default: proxy + demo RS on loopback, a dev PKI and SQLite under ``--data-dir``, so that a
newcomer can point a device (or ``armsproxy-sasim``) at it at once.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pwd
import sqlite3
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from . import __version__, tls
from .config import (
    Config,
    ConfigError,
    check,
    cpu_cores,
    embedded,
    endpoint_summary,
    load,
    store_setting,
    workers_problems,
)
from .instance import InstanceService
from .limits import DescriptorBudget, limited
from .management import ManagementResource, ManagementSite
from .metrics import Metrics, deadline_sites, listener_counts
from .push.client import SAPushClient
from .push.engine import PushEngine, PushSettings
from .push.outbox import EventOutbox
from .rs_client import KeyCache, RSClient
from .rs_gate import RSGate, rs_gate_service
from .sa_gate.protocol import GateLimits, SAGateFactory
from .sa_gate.relay import PullRelay, RelaySettings
from .store.model import StoreError
from .store.sqlite import SQLiteStore
from .tls import (
    HandshakeFailures,
    ListenerConfigError,
    TLSPolicy,
    release_own_unix_lock,
    server_endpoint,
    tls_listener,
)
from .tunnel import TunnelRegistry, TunnelSession, parse_basic_authorization
from .workers import (
    READY_FIELD,
    WORKER_ENV,
    Lifeline,
    WorkerSupervisor,
    adopting_hook,
    binding_hook,
    inherited_listeners,
    worker_argv,
    worker_listen,
)

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE | --data-dir DIR]"
    longdesc = (
        "ARMS Proxy: relays libarms devices (SAs) to an RS over XML-RPC. Without --config it "
        "runs the embedded default: the proxy plus a demo RS on 127.0.0.1, with a generated "
        "development PKI and SQLite under --data-dir."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (see etc/armsproxy.conf)."],
        ["data-dir", "d", "armsproxy-data", "Data directory for the embedded default."],
        ["port", "p", "8443", "SA gate port for the embedded default."],
        ["rs-port", None, "8790", "Demo RS port for the embedded default."],
        ["rs-gate-port", None, "8780", "RS gate (XML-RPC) port for the embedded default."],
        ["management-port", None, "8781",
         "Management gate port (/healthz, /readyz, /metrics) for the embedded default; "
         "0: none."],
        ["tls-minimum-version", None, None,
         "Lowest TLS version with devices, both directions, for the embedded default: 1.2 "
         "(default), 1.3, or 1.1/1.0 (real libarms devices speak only TLS 1.0). With --config: "
         "[sa_gate] tls_minimum_version."],
        ["workers", "w", None,
         "Processes sharing the listeners: a number, or auto (one per CPU core); more than 1 "
         "needs [store] backend = postgresql. With --config: [armsproxy] workers, which this "
         "overrides."],
    ]

    def opt_version(self) -> None:
        print(f"armsproxy {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        _refuse_device_logfile(getattr(self, "parent", None))
        try:
            if self["config"]:
                if self["tls-minimum-version"] is not None:
                    raise usage.UsageError("--tls-minimum-version is for the embedded default; "
                                           "with --config set [sa_gate] tls_minimum_version")
                self["cfg"] = _load_or_exit(Path(self["config"]))
            else:
                self["cfg"] = embedded(
                    Path(self["data-dir"]).absolute(),
                    port=int(self["port"]),
                    rs_port=int(self["rs-port"]),
                    rs_gate_port=int(self["rs-gate-port"]),
                    management_port=int(self["management-port"]),
                    tls_minimum_version=self["tls-minimum-version"] or "1.2",
                )
        except (ConfigError, ValueError) as e:
            raise usage.UsageError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Fatal errors: one line, exit status 1, under twistd and twist alike
# ---------------------------------------------------------------------------------------------

class FatalError(Exception):
    """armsproxy cannot run; the message says what, which setting or path, and why.

    Raised while the service starts (before the reactor runs): twistd and twist let it end
    the process with status 1 (twistd's daemon parent reports it too), and :func:`_excepthook`
    prints it as one line instead of a traceback.
    """


def _exit_with(lines: list[str]) -> NoReturn:
    """End the start before anything runs: the lines on stderr, status 1, no usage text.

    twistd and twist print their whole usage text before an option error (UsageError); a
    configuration file's problems are not about the command line.
    """
    raise SystemExit("\n".join(f"armsproxy: {line}" for line in lines))


def _load_or_exit(path: Path) -> Config:
    """The configuration in ``path``; its problems end the start (:func:`makeService`
    checks the files it names)."""
    try:
        return load(path)
    except ConfigError as e:
        _exit_with(e.lines())


_exit_status = 0


def fatal(message: str) -> None:
    """Once running, armsproxy cannot go on: log ``message``, stop, and exit with status 1.

    twistd and twist both exit 0 after ``reactor.stop()``, so systemd's Restart=on-failure
    would take the stop for a clean one. The status is set at interpreter exit, after twistd
    has shut the services down and removed its PID file. Only in a process that
    :func:`makeService` started: a test or a program embedding the services keeps its reactor.
    """
    global _exit_status
    log.critical("{message}", message=message)
    if not _owns_process:
        return
    if _exit_status == 0:
        atexit.register(_exit_failed)
    _exit_status = 1
    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()  # type: ignore[attr-defined]
    except ReactorNotRunning:
        pass


def _exit_failed() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_exit_status)


_owns_process = False  # makeService ran: armsproxy is the process (twistd or twist)


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """A :class:`FatalError` that ends twistd or twist is one line, not a traceback."""
    if isinstance(value, FatalError):
        print(f"armsproxy: {value}", file=sys.stderr, flush=True)
    else:
        _previous_excepthook(kind, value, tb)


_previous_excepthook = sys.excepthook


class ArmsproxyService(service.MultiService):
    """The whole service tree: binds every listener before anything else starts, under
    twist too (which calls only ``startService``), so that a listener that cannot bind stops
    the start before the store opens or a single device is served."""

    _bound = False

    def privilegedStartService(self) -> None:
        self._bound = True
        super().privilegedStartService()  # every listener binds (a FatalError if one can't)

    def startService(self) -> None:
        if not self._bound:
            self.privilegedStartService()
        super().startService()


@implementer(IStreamServerEndpoint)
class NamedEndpoint:
    """A listener's endpoint that, when it cannot listen, raises a :class:`FatalError`
    naming its setting, what the setting says and why, at once (``listen`` fails
    synchronously for TCP and unix sockets): the listener's service never logs it as an
    error while armsproxy runs on without it."""

    def __init__(self, endpoint: IStreamServerEndpoint, setting: str, description: str) -> None:
        self.endpoint = endpoint
        self.setting = setting
        self.description = description

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        d = self.endpoint.listen(factory)
        failed: list[Failure] = []
        d.addErrback(lambda f: failed.append(f) or f)
        d.addErrback(lambda f: Failure(self._fatal(f)))
        if failed:
            d.addErrback(lambda _: None)  # raised below instead
            raise self._fatal(failed[0]) from None
        return d

    def _fatal(self, failure: Failure) -> FatalError:
        error = failure.value
        if isinstance(error, FatalError):
            return error
        if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
            why = error.socketError.strerror or str(error.socketError)
        else:
            why = " ".join(str(error).split()) or type(error).__name__
        return FatalError(f"{self.setting} {endpoint_summary(self.description)}: cannot "
                          f"listen: {why}")


def _listen_setting(cfg: Config, setting: str, option: str) -> str:
    """The name an operator knows a listener by: its key, or the embedded default's option."""
    return option if cfg.source == "embedded default" else setting


class StoreService(service.MultiService):
    """Opens the store, then starts its children; stops them all, then closes the store.

    Everything that uses the store is a child, because a plain MultiService stops its
    children without waiting for one another.
    """

    def __init__(self, store: Any, setting: str = "[store] path") -> None:
        super().__init__()
        self.store = store
        self.setting = setting  # what names the store's path, for the message if it fails
        self._children_started = False
        self.on_started: list[Callable[[], object]] = []  # once the children have started

    def startService(self) -> None:
        service.Service.startService(self)
        d = defer.ensureDeferred(self.store.open())
        d.addCallbacks(self._opened, self._failed)
        d.addErrback(self._start_failed)

    def _opened(self, _: object) -> None:
        if self.running:
            self._children_started = True
            for child in self:
                child.startService()
            for callback in self.on_started:
                callback()

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, OSError):
            why = f"{error.strerror or error} (as uid {os.geteuid()}, gid {os.getegid()})"
        else:
            why = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, OSError | sqlite3.Error | StoreError):
            log.failure("cannot open the store", failure)  # unexpected: its traceback too
        where = getattr(self.store, "where", None) or self.store.path  # PostgreSQL: its DSN
        fatal(f"cannot open the store {where} ({self.setting}): {why}")

    def _start_failed(self, failure: Failure) -> None:
        log.failure("cannot start", failure)
        fatal(f"cannot start: {failure.getErrorMessage()}")

    def stopService(self) -> defer.Deferred[None]:
        if self._children_started:
            stopped = super().stopService()  # children first, each awaited
        else:  # the store never opened: none of them started, none is stopped
            service.Service.stopService(self)
            stopped = defer.succeed(None)
        stopped.addBoth(lambda _: defer.ensureDeferred(self.store.close()))
        return stopped


class _Closing(service.Service):
    """Closes the RS client's connection pool when the application stops."""

    def __init__(self, rs: RSClient) -> None:
        self.rs = rs

    def stopService(self) -> Any:
        super().stopService()
        return self.rs.close()


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def build_services(cfg: Config, reactor: Any = None, *,
                   worker: int | None = None) -> service.MultiService:
    """armsproxy's service tree; as worker ``worker`` of a parent (armsproxy/workers.py),
    with its own management listener and no banner."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if worker is not None:
        cfg = dataclasses.replace(
            cfg, management_listen=worker_listen(cfg.management_listen, worker))
    budget = DescriptorBudget.at_start(reactor)  # raises the soft RLIMIT_NOFILE first
    top = ArmsproxyService()
    for listen in (cfg.rs_gate_listen, cfg.management_listen,
                   cfg.demo_rs_listen if cfg.demo_rs else ""):
        release_own_unix_lock(listen)
    if cfg.demo_rs:
        _add_demo_rs(cfg, top, reactor, budget, banner=worker is None)
    metrics = Metrics()  # this instance's registry, for /metrics (never the global one)
    rs = RSClient(
        reactor, cfg.rs_url, ca_pem=_read(cfg.rs_ca),
        client_cert_pem=_read(cfg.rs_client_certificate), timeout=cfg.rs_timeout,
        metrics=metrics,
    )
    _Closing(rs).setServiceParent(top)
    keys = KeyCache(rs, reactor, ttl=cfg.key_cache_ttl)
    store: Any
    if cfg.store_backend == "postgresql":
        assert cfg.store_dsn is not None  # config.value_problems
        try:
            from .store.postgresql import PostgreSQLStore
        except ImportError as e:
            raise FatalError(f"[store] backend = postgresql needs psycopg 3 and psycopg_pool "
                             f"({e}): pip install 'armsproxy[postgresql]'") from None
        store = PostgreSQLStore(cfg.store_dsn, reactor=reactor, pool_size=cfg.store_pool_size,
                                close_on_shutdown=False)
    else:
        cfg.effective_store_path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(cfg.effective_store_path, reactor=reactor, close_on_shutdown=False)
    push_side = StoreService(store, store_setting(cfg))
    push_side.setServiceParent(top)
    top.push_side = push_side  # type: ignore[attr-defined]
    # This process as one instance on the store (several share a PostgreSQL one): its lease,
    # the engine under it, the outbox and purges only while it leads (armsproxy/instance.py).
    instance = InstanceService(store, reactor, lease=cfg.store_lease,
                               renew=cfg.store_lease_renew)
    instance.setServiceParent(push_side)
    outbox = EventOutbox(store, rs, reactor, batch=cfg.rs_event_batch)
    tunnels = TunnelRegistry()
    assert cfg.sa_ca is not None
    # One TLS policy with devices, both directions (§1 rule 1): SA gate, tunnels and pushes.
    try:
        policy = TLSPolicy(minimum_version=cfg.tls_minimum_version,
                           client_ca_pem=_read(cfg.client_ca))
    except ListenerConfigError as e:
        raise usage.UsageError(str(e)) from None
    policy.warn_if_legacy()
    handshake_failures = HandshakeFailures(reactor)
    engine = PushEngine(
        store=store,
        client=SAPushClient(reactor, sa_ca_pem=cfg.sa_ca.read_bytes(),
                            client_cert_pem=_read(cfg.push_client_certificate),
                            tls_minimum_version=policy.minimum_version,
                            handshake_failures=handshake_failures),
        keys=keys,
        clock=reactor,
        settings=PushSettings(
            result_url=cfg.effective_result_url, max_attempts=cfg.max_attempts,
            retry_base=cfg.retry_base, retry_cap=cfg.retry_cap, busy_delay=cfg.busy_delay,
            done_timeout=cfg.done_timeout, interrupted_grace=cfg.interrupted_grace,
            default_expires_in=cfg.default_expires_in,
            endpoint_from_peer=cfg.endpoint_from_peer,
            orphan_dones_max_per_sa=cfg.orphan_dones_max_per_sa,
            orphan_dones_ttl=cfg.orphan_dones_ttl,
            orphan_done_max_bytes=cfg.orphan_done_max_bytes,
            takeover_every=cfg.store_lease_renew,
        ),
        on_events=outbox.kick,
        tunnels=tunnels,
        # Counted with the SA gate's outcomes (/metrics); `relay` is built below, before
        # anything can be counted.
        counter=lambda name, n: relay.stats.update({name: n}),
        metrics=metrics,
        instance=instance,
    )
    engine.setServiceParent(instance)
    outbox.setServiceParent(instance.leader)
    instance.on("events", outbox.kick)
    TimerService(3600, _purge, store, reactor, cfg.results_ttl).setServiceParent(
        instance.leader)
    try:
        rs_gate = rs_gate_service(
            reactor, cfg.rs_gate_listen, RSGate(engine, store, clock=reactor),
            tls_client_ca=_read(cfg.rs_gate_client_ca),
            max_connections=cfg.rs_gate_max_connections,
            request_timeout=cfg.rs_gate_request_timeout, budget=budget,
        )
    except ListenerConfigError as e:
        raise usage.UsageError(str(e)) from None
    rs_gate.endpoint = NamedEndpoint(
        rs_gate.endpoint, _listen_setting(cfg, "[rs_gate] listen", "--rs-gate-port"),
        cfg.rs_gate_listen)
    rs_gate.setName("rs-gate")
    rs_gate.setServiceParent(push_side)
    relay = PullRelay(
        rs=rs,
        keys=keys,
        hooks=engine,
        settings=RelaySettings(
            public_urls=cfg.public_urls, default_methods=cfg.push_methods,
            tunnel_urls=cfg.tunnel_urls, echo_interval=cfg.echo_interval,
        ),
        clock=reactor,
        relay_budget=cfg.relay_budget,
        max_body=cfg.max_body,
    )
    hooks = _TunnelHooks(keys, relay, engine)

    def open_tunnel(transport: Any, headers: list[tuple[str, str]], peer: str,
                    path: str) -> TunnelSession:
        authorization = next((v for k, v in headers if k.lower() == "authorization"), None)
        distid, key = parse_basic_authorization(authorization)
        return TunnelSession(
            transport, distid=distid, key=key, peer=peer, path=path, hooks=hooks,
            registry=tunnels, clock=reactor, echo_interval=relay.echo_interval_for(distid),
        )

    factory = SAGateFactory(
        relay.handle,
        clock=reactor,
        limits=GateLimits(
            max_body=cfg.max_body, request_timeout=cfg.request_timeout,
            answer_timeout=min(cfg.relay_budget + 5.0, 28.0), paths=cfg.sa_paths,
            tunnel_paths=cfg.tunnel_paths,
        ),
        counter=lambda name: relay.stats.update([name]),
        tunnel_opener=open_tunnel if cfg.tunnel_urls else None,
    )
    try:
        listener = tls_listener(reactor, cfg.sa_listen, policy, handshake_failures)
        tunnel_listener = (tls_listener(reactor, cfg.tunnel_listen, policy, handshake_failures)
                           if cfg.tunnel_listen else None)
    except ListenerConfigError as e:
        raise usage.UsageError(str(e)) from None
    # A pull holds two descriptors (its own, one to the RS); tunnels one: the automatic caps
    # share what the reserve leaves between the device listeners.
    share = 3 if tunnel_listener is not None else 2
    sa_gate = _listener(limited(listener, budget.device_listener(
        "sa gate", cfg.max_connections, share=share, counter=factory.count)), factory,
        _listen_setting(cfg, "[sa_gate] listen", "--port"), cfg.sa_listen)
    sa_gate.setName("sa-gate")
    sa_gate.setServiceParent(top)
    if tunnel_listener is not None:
        # Same gate, same TLS policy, tunnels only: an operator can firewall or balance the
        # long-lived tunnels apart from the short pulls (the SA gate's port serves both still).
        tunnel_factory = SAGateFactory(
            relay.handle, clock=reactor,
            limits=dataclasses.replace(factory.limits, tunnels_only=True),
            counter=factory.count, tunnel_opener=open_tunnel,
        )
        tunnel_gate = _listener(limited(tunnel_listener, budget.device_listener(
            "sa gate tunnels", cfg.tunnel_max_connections, share=share,
            counter=factory.count)), tunnel_factory, "[sa_gate] tunnel_listen",
            cfg.tunnel_listen)
        tunnel_gate.setName("sa-gate-tunnels")
        tunnel_gate.setServiceParent(top)
    if cfg.management_listen:
        _add_management(cfg, top, reactor, store, relay, tunnels, budget, handshake_failures,
                        metrics)
    top.relay = relay  # type: ignore[attr-defined]  # for tests and the management view
    top.engine = engine  # type: ignore[attr-defined]
    top.tunnels = tunnels  # type: ignore[attr-defined]
    top.store = store  # type: ignore[attr-defined]
    top.instance = instance  # type: ignore[attr-defined]
    top.budget = budget  # type: ignore[attr-defined]  # the listeners' limits, for tests
    top.handshake_failures = handshake_failures  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    return top


def _listener(endpoint: Any, factory: Any, setting: str,
              description: str) -> StreamServerEndpointService:
    """A listener that cannot bind stops the start (twistd and twist exit 1 with one line
    naming ``setting`` and its ``description``) instead of being logged while armsproxy runs
    on without it, e.g. with its port taken."""
    listener = StreamServerEndpointService(NamedEndpoint(endpoint, setting, description),
                                           factory)
    listener._raiseSynchronously = True  # Twisted's switch for exactly this (strports uses it)
    return listener


def _add_management(cfg: Config, top: service.MultiService, reactor: Any, store: SQLiteStore,
                    relay: PullRelay, tunnels: TunnelRegistry,
                    budget: DescriptorBudget, handshake_failures: HandshakeFailures,
                    metrics: Metrics) -> None:
    try:
        endpoint = limited(
            server_endpoint(reactor, cfg.management_listen, "[management] listen"),
            budget.listener("management", cfg.management_max_connections))
    except ListenerConfigError as e:
        raise usage.UsageError(str(e)) from None
    resource = ManagementResource(store=store, sa_gate_counts=relay.stats,
                                  tunnel_counts=tunnels.counts, clock=reactor,
                                  tls_failures=handshake_failures.counts, metrics=metrics,
                                  # read when scraped: the service tree is complete by then
                                  listener_counts=lambda: listener_counts(
                                      budget.listeners, deadline_sites(top)))
    site = ManagementSite(resource, reactor, request_timeout=cfg.management_request_timeout)
    management = _listener(endpoint, site, _listen_setting(cfg, "[management] listen",
                                                           "--management-port"),
                           cfg.management_listen)
    management.setName("management")
    management.setServiceParent(top)


class _TunnelHooks:
    """What a tunnel needs from the rest of armsproxy, without importing it (design.md §2)."""

    def __init__(self, keys: KeyCache, relay: PullRelay, engine: PushEngine) -> None:
        self.keys = keys
        self.relay = relay
        self.engine = engine

    async def authenticate(self, distid: str, key: str) -> bool:
        return await self.keys.check(distid, key)

    async def confirmation_start(self, distid: str, request: Any, peer: str) -> Any:
        return await self.relay.confirmation_start(distid, request, peer)

    async def done_request(self, request: Any, raw: bytes, peer: str) -> int:
        # Counted like a done over https-simple (the relay counts those, and a tunnel's
        # push-confirmation-start), in armsproxy_sa_gate_requests_total.
        self.relay.stats[f"request.{request.type}"] += 1
        return await self.engine.done_request(request, raw, peer)

    def tunnel_up(self, tunnel: Any) -> None:
        self.engine.tunnel_up(tunnel)

    def tunnel_down(self, tunnel: Any, reason: str) -> None:
        self.engine.tunnel_down(tunnel, reason)


def _purge(store: SQLiteStore, clock: Any, ttl: float) -> defer.Deferred[int]:
    """Results older than results.ttl go (push.forget does it earlier on the RS's word)."""
    return defer.ensureDeferred(store.purge_results(clock.seconds() - ttl))


def _add_demo_rs(cfg: Config, top: service.MultiService, reactor: Any,
                 budget: DescriptorBudget, *, banner: bool = True) -> None:
    from .demo_rs.db import DemoDB
    from .demo_rs.server import make_demo_rs_site
    from .pki import ensure_dev_pki

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    hosts = sorted({u.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
                    for u in cfg.public_urls})
    pki = ensure_dev_pki(cfg.data_dir / "pki", hosts)
    assert cfg.demo_rs_db is not None
    db = DemoDB(cfg.demo_rs_db)
    site = make_demo_rs_site(db)
    try:
        # Its connections are the RS client's, one per pull: part of the devices' path, so
        # capped like the SA gate and not kept out of the reserve.
        endpoint = limited(server_endpoint(reactor, cfg.demo_rs_listen, "[demo_rs] listen"),
                           budget.listener("demo rs", budget.device_cap(), device=True))
    except ListenerConfigError as e:
        raise usage.UsageError(str(e)) from None
    demo = _listener(endpoint, site, _listen_setting(cfg, "[demo_rs] listen", "--rs-port"),
                     cfg.demo_rs_listen)
    demo.setName("demo-rs")
    demo.setServiceParent(top)
    if not banner:
        return
    print(
        "armsproxy embedded default\n"
        f"  SA gate URL (give it to the LS as rs-info/url): {', '.join(cfg.public_urls)}\n"
        f"  CA to hand out as rs-certificate:             {pki.ca_cert_path}\n"
        f"  CA key (issues SA certificates):               {pki.ca_key_path}\n"
        f"  demo RS (XML-RPC):                             {cfg.rs_url}\n"
        f"  RS gate (XML-RPC, push.submit...):             {cfg.rs_gate_listen}\n"
        f"  management (/healthz, /readyz, /metrics):      {cfg.management_listen or 'off'}\n"
        f"  register a device: armsproxy-demo-rs --db {cfg.demo_rs_db} register "
        "DISTID --key KEY\n",
        flush=True,
    )


def _workers(options: Options, cfg: Config) -> int:
    """How many processes: ``--workers``, else ``[armsproxy] workers``; a count their store
    cannot serve ends the start, naming the setting."""
    raw = options["workers"]
    setting = "--workers" if raw is not None else "[armsproxy] workers"
    if raw is None:
        count = cfg.workers
    elif raw.strip().lower() == "auto":
        count = cpu_cores()
    else:
        try:
            count = int(raw)
        except ValueError:
            _exit_with([f"--workers {raw!r}: not a whole number or auto"])
    problems = workers_problems(cfg, count, setting)
    if problems:
        _exit_with(problems)
    return count


SHARED_LISTENERS = ("sa-gate", "sa-gate-tunnels", "rs-gate", "demo-rs")


def _listener_services(top: service.MultiService) -> list[service.Service]:
    """The listeners the workers share: the device-facing ones, the RS gate, the demo RS
    (every one but management, which is per worker)."""
    found: list[service.Service] = []
    for child in top:
        if child.name in SHARED_LISTENERS:
            found.append(child)
        elif isinstance(child, service.MultiService):
            found.extend(_listener_services(child))
    return found


def _as_parent(cfg: Config, config: Path, count: int) -> service.MultiService:
    """The parent of ``count`` workers: binds the shared listeners (the same code as one
    process builds them, through :data:`armsproxy.tls.listener_hook`) and runs the workers
    on them; nothing else of the tree it builds is started."""
    from twisted.internet import reactor

    bound: dict[str, tuple[int, int]] = {}
    tls.listener_hook = binding_hook(bound)
    try:
        whole = build_services(cfg)
    finally:
        tls.listener_hook = None
    parent = _WorkersParent()
    for listener in _listener_services(whole):
        listener.disownServiceParent()
        listener.setServiceParent(parent)
    supervisor = WorkerSupervisor(reactor, worker_argv(config), count, bound, on_fatal=fatal)
    supervisor.setName("workers")
    supervisor.setServiceParent(parent)
    parent.supervisor = supervisor
    return parent


class _WorkersParent(ArmsproxyService):
    """The shared listeners and the workers: the workers stop first, then the listeners
    close (a unix socket's path is removed only once no worker accepts on it)."""

    supervisor: WorkerSupervisor

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        d = defer.maybeDeferred(self.supervisor.stopService)
        d.addBoth(lambda _: defer.DeferredList(
            [defer.maybeDeferred(child.stopService) for child in reversed(list(self))
             if child is not self.supervisor], consumeErrors=True))
        d.addCallback(lambda _: None)
        return d


def _as_worker(cfg: Config, index: int) -> service.MultiService:
    """Worker ``index``: the whole of armsproxy on the listeners its parent bound, stopping
    when the parent is gone, and saying (in its log, which the parent reads) when it is up."""
    from twisted.internet import reactor

    hook = adopting_hook(inherited_listeners())
    tls.listener_hook = hook
    try:
        top = build_services(cfg, worker=index)
    finally:
        tls.listener_hook = None
    if hook.left:  # the parent bound listeners this configuration does not name any more
        for fd, _family in hook.left.values():
            os.close(fd)
        raise FatalError(
            f"{cfg.source} changed since armsproxy started (its listeners "
            f"{', '.join(sorted(hook.left))} are not in it now): a worker reads the file at "
            "its own start; restart armsproxy to apply the change")

    def ready() -> None:
        log.info("worker-{k} ready: instance {instance}", k=index,
                 instance=top.instance.id, **{READY_FIELD: True})  # type: ignore[attr-defined]

    top.push_side.on_started.append(ready)  # type: ignore[attr-defined]
    reactor.addReader(Lifeline(reactor, on_lost=_stop_reactor))
    return top


def _stop_reactor() -> None:
    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()  # type: ignore[attr-defined]
    except ReactorNotRunning:
        pass


def _refuse_device_logfile(twistd_options: Any) -> None:
    """twistd rotates its ``--logfile`` every 1 MB by renaming it and creating a new file.

    Given a device (``/dev/null``) or a pipe, a root twistd renames the device itself and leaves
    a regular file in its place, breaking every program on the host; refuse before that.
    """
    name = twistd_options.get("logfile") if twistd_options is not None else None
    if not name or name == "-":
        return
    try:
        mode = os.stat(name).st_mode
    except OSError:
        return  # twistd creates it: a regular file
    if not stat.S_ISREG(mode):
        # SystemExit, not UsageError: twistd before 26.10 exits 0 after a UsageError.
        _exit_with([
            f"--logfile {name} is not a regular file: twistd rotates its log file by renaming "
            "it, which would move the device or pipe itself. To drop or redirect the log, run "
            "with -n --logfile=- and redirect standard output, or use --syslog."])


def _privilege_drop(twistd_options: Any) -> tuple[int, int] | None:
    """The uid and gid twistd switches to after binding (``-u``/``-g``), if it will switch
    from root to another user; None otherwise (twist never switches: systemd's User= does)."""
    if twistd_options is None or os.geteuid() != 0:
        return None
    uid, gid = twistd_options.get("uid"), twistd_options.get("gid")
    if uid is None or uid == 0:
        return None
    return uid, gid if gid is not None else pwd.getpwuid(uid).pw_gid


def _writable(path: Path, ids: tuple[int, int] | None) -> bool:
    """Whether this process, or ``ids`` (uid, gid) if it will switch to them, can create
    files in directory ``path`` (or write file ``path``); by mode bits, as for the switch."""
    if ids is None:
        return os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0))
    uid, gid = ids
    st = path.stat()
    try:
        groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = {gid}
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
    need = 0o3 if path.is_dir() else 0o2  # write (and search, for a directory)
    return (st.st_mode >> shift) & need == need


def _prepare_directories(cfg: Config, drop: tuple[int, int] | None) -> None:
    """Create the directories armsproxy writes in, owned by the user it runs as.

    twistd binds as root and switches to ``-u``/``-g`` before the store opens: a directory it
    created as root would leave the store unopenable. So a missing one is created (0700) for
    that user, and an existing one that user cannot write stops the start, naming it.
    """
    who = (f"uid {drop[0]} (gid {drop[1]}), which twistd -u/-g switches to" if drop
           else f"uid {os.geteuid()} (gid {os.getegid()})")
    embedded_default = cfg.source == "embedded default"
    places = []
    if cfg.store_backend == "sqlite":  # PostgreSQL keeps nothing in a directory of ours
        places.append((cfg.effective_store_path.parent, store_setting(cfg)))
    if cfg.demo_rs:
        places.append((cfg.data_dir, "--data-dir" if embedded_default
                       else "[armsproxy] data_dir"))
        if cfg.demo_rs_db is not None:
            places.append((cfg.demo_rs_db.parent, "[demo_rs] db"))
    for directory, setting in places:
        try:
            if not directory.exists():
                directory.mkdir(mode=0o700, parents=True)
                if drop:
                    os.chown(directory, *drop)
            elif not directory.is_dir():
                raise FatalError(f"{setting} {directory}: not a directory")
        except OSError as e:
            raise FatalError(f"{setting} {directory}: cannot create it as {who}: "
                             f"{e.strerror}") from None
        store = cfg.effective_store_path
        for path in [directory, *([store] if store.parent == directory else [])]:
            if path.exists() and not _writable(path, drop):
                st = path.stat()
                raise FatalError(
                    f"{setting} {path}: not writable by {who} (owner {st.st_uid}:{st.st_gid}, "
                    f"mode {stat.S_IMODE(st.st_mode):04o}): give it to that user "
                    "(chown) or configure another path")


def _give_away(cfg: Config, drop: tuple[int, int]) -> None:
    """Files the embedded demo RS made as root before twistd switched users (its dev PKI and
    database) go to that user, who opens them after the switch."""
    if not cfg.demo_rs:
        return
    from .pki import DEV_PKI_FILES

    pki = cfg.data_dir / "pki"
    paths = [pki, *(pki / name for name in DEV_PKI_FILES)]
    if cfg.demo_rs_db is not None:
        paths += [Path(f"{cfg.demo_rs_db}{suffix}") for suffix in ("", "-wal", "-shm")]
    for path in paths:
        try:
            if path.lstat().st_uid == 0:
                os.chown(path, *drop, follow_symlinks=False)
        except FileNotFoundError:
            pass


def makeService(options: Options) -> service.IService:
    """The service twistd or twist runs. What stops the start before anything runs is one
    ``armsproxy: ...`` line on stderr and exit status 1; so is, from here on, a fatal error
    (a listener that cannot bind, a store that cannot open)."""
    global _owns_process
    _owns_process = True
    sys.excepthook = _excepthook
    cfg: Config = options["cfg"]
    if cfg.source != "embedded default":  # as armsproxyctl check-config does
        problems = check(cfg)
        if options["workers"] is not None:  # --workers overrides the file's count
            problems = [p for p in problems if not p.startswith("[armsproxy] workers")]
        if problems:
            _exit_with([f"{cfg.source}: {problem}" for problem in problems])
    drop = _privilege_drop(getattr(options, "parent", None))
    workers = _workers(options, cfg)
    try:
        _prepare_directories(cfg, drop)
        if os.environ.get(WORKER_ENV) is not None:
            top = _as_worker(cfg, int(os.environ[WORKER_ENV]))
        elif workers > 1:
            top = _as_parent(cfg, Path(options["config"]).absolute(), workers)
        else:
            top = build_services(cfg)
    except FatalError as e:
        _exit_with([str(e)])
    except (usage.UsageError, ListenerConfigError) as e:
        _exit_with([" ".join(str(e).split())])
    except OSError as e:
        _exit_with([f"{e.filename or cfg.source}: {e.strerror or e}"])
    if drop:
        _give_away(cfg, drop)
    return top
