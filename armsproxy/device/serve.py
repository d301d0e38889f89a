"""``armsproxy-sasim serve``: the simulated device as one long-running process.

It does what a libarms device does after power-on: config-solicitation (keeping the
certificate, key, modules and configs the RS hands it), push-method-query and
push-confirmation-start; then it serves pushes, on its https-simple listener or (``--tunnel``)
over https-tunnels, and sends their done-requests, until SIGINT or SIGTERM. It prints one line
per thing it receives, so that a newcomer sees a whole pull and push round trip against
armsproxy without a real device. A reboot or pull-config (or an answer that makes the SA
re-pull) makes it pull again, as the device's event loop does.

Like the rest of ``armsproxy.device`` it uses nothing of the proxy's.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet import defer
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.task import deferLater

from .client import (
    DEFAULT_DESCRIPTION,
    DEFAULT_FIRMWARE_INFO,
    REBOOT,
    REPULL,
    RESPONSE_TIMEOUT,
    STOP,
    SUCCESS,
    TLS_VERSIONS,
    DeviceVerdict,
    SAExchange,
    SimulatedSA,
    parse_url,
)
from .listener import TWO_WAY, DeviceModule, DoneRecord, ReceivedPush, SimulatedDevice
from .tunnel import (
    CONFIRMATION_TIMEOUT,
    SimulatedTunnelDevice,
    TunnelConfirmation,
    TunnelConnection,
    TunnelPush,
)

__all__ = ["DeviceServer", "ServeSettings", "main_serve", "parse_listen"]

#: How long a device that leaves its event loop lets its last answer reach the proxy.
_CLOSE_GRACE = 2.0
#: Echo interval when the push-method-query answer gives none (libarms' default, §9.3).
DEFAULT_ECHO_INTERVAL = 60


@dataclass
class ServeSettings:
    """What ``serve`` needs: the pull URL, the device's identity and trust, how it is pushed to."""

    url: str
    distid: str
    key: str
    ca_pem: bytes
    listen_host: str = "127.0.0.1"
    listen_port: int = 10443
    tunnel: bool = False
    tls_min_version: int | None = None
    tls_max_version: int | None = None
    description: str = DEFAULT_DESCRIPTION
    firmware_info: str | None = DEFAULT_FIRMWARE_INFO
    trigger: str = "power on boot"
    response_timeout: float = RESPONSE_TIMEOUT
    retry_interval: float = 3.0
    retry_max: int = 5  # failed pull rounds in a row before giving up; 0: never
    confirmation_timeout: float = CONFIRMATION_TIMEOUT

    @property
    def method(self) -> str:
        return "https-tunnel" if self.tunnel else "https-simple"


def parse_listen(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (ip, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen wants IP:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--listen wants a literal IP address (devices never resolve): {host!r}")
    return host, int(port)


class _GaveUp(Exception):
    """The device cannot go on (exit 1): said on the output already."""


class DeviceServer:
    """Runs the simulated device: pull rounds, then the push phase, again after each exit."""

    def __init__(self, reactor: Any, settings: ServeSettings, out: TextIO = sys.stdout) -> None:
        self.reactor = reactor
        self.settings = settings
        self.out = out
        self.device: SimulatedDevice | None = None
        self.serving = False  # confirmed and taking pushes
        self._stopping = False
        self._wake: defer.Deferred[str | None] | None = None
        self._confirmed: defer.Deferred[bool] | None = None
        self._last_push: str | None = None
        # Lines of pushes that overtake the confirmation answer: said after it, in order.
        self._held: list[str] | None = None

    # -- output ------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        """One line of output, flushed at once (a pipe would otherwise hold it)."""
        print(line, file=self.out, flush=True)

    # -- life cycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Pull, confirm and serve until stop() (0) or until the device cannot go on (1)."""
        trigger = self.settings.trigger
        try:
            while not self._stopping:
                await self._bring_up(trigger)
                if self._stopping:
                    break
                reason = await self._wait()
                if self._stopping or reason is None:
                    break
                trigger = self._trigger_for(reason)
                await self._close_device()
                if reason == STOP:
                    self._say_stop()
                    return 1
                self.say(
                    f"exit: {reason}: the SA leaves its event loop and pulls again in "
                    f"{self.settings.retry_interval:g} s"
                )
                await self._sleep(self.settings.retry_interval)
        except _GaveUp:
            await self._close_device()
            return 0 if self._stopping else 1
        await self._close_device()  # one that came up while stop() ran
        return 0

    async def stop(self) -> None:
        """End serving: close the listener or the tunnels (zero chunk), let run() return 0."""
        self._stopping = True
        self._fire_wake(None)
        self._fire_confirmed(False)
        await self._close_device()
        self.say("stopped")

    async def _bring_up(self, trigger: str) -> None:
        failures = 0
        while not self._stopping:
            device = await self._pull_round(trigger)
            if device is not None:
                return
            failures += 1
            limit = self.settings.retry_max
            if limit and failures >= limit:
                self.say(f"giving up after {failures} failed rounds")
                raise _GaveUp()
            self.say(f"retrying in {self.settings.retry_interval:g} s")
            await self._sleep(self.settings.retry_interval)

    async def _pull_round(self, trigger: str) -> SimulatedDevice | None:
        """config-solicitation, push-method-query, confirmation; the device, or None to retry."""
        s = self.settings
        sa = self._client()
        pull = await sa.config_solicitation(s.url, trigger)
        v = pull.verdict
        self.say(f"pull: config-solicitation ({trigger}){_over(pull)} -> {_answer(pull)}"
                 f"{_pull_summary(v)}")
        if not self._usable(pull):
            return None
        if v.sa_certificate is None or v.sa_private_key is None:
            self.say(
                "  the answer carries no sa-certificate: the device cannot serve pushes "
                "(with the demo RS: armsproxy-demo-rs issue-cert)"
            )
            return None
        urls = [u for u in v.rs_pull_server_urls[:5] if _usable_url(u)]
        if not urls:
            self.say("  no usable rs-pull-server-url")
            return None
        sa = self._client(v.sa_certificate, v.sa_private_key)
        query = None
        for url in urls:
            query = await sa.push_method_query(url, [s.method])
            methods = ",".join(query.verdict.push_methods) or "none"
            self.say(f"query: push-method-query ({s.method}) -> {_answer(query)}, "
                     f"methods {methods}")
            if query.verdict.outcome == SUCCESS:
                break
        assert query is not None
        if not self._usable(query):
            return None
        if s.method not in query.verdict.push_methods:
            self.say(f"  {s.method} not offered: the RS allows this device "
                     f"{','.join(query.verdict.push_methods) or 'no method'}")
            return None
        if s.tunnel:
            return await self._start_tunnels(v, query.verdict, urls)
        return await self._start_listener(v, urls)

    async def _start_listener(
        self, pulled: DeviceVerdict, urls: Sequence[str]
    ) -> SimulatedDevice | None:
        s = self.settings
        device = SimulatedDevice(
            self.reactor, s.distid, s.key, ca_pem=s.ca_pem,
            sa_cert_pem=pulled.sa_certificate or b"", sa_key_pem=pulled.sa_private_key or b"",
            description=s.description, modules=[DeviceModule(*m) for m in pulled.modules],
            configs=dict(pulled.md_configs), rs_pull_server_urls=urls,
            tls_min_version=s.tls_min_version, tls_max_version=s.tls_max_version,
        )
        self._adopt(device)
        device.on_reconfirm = self._reconfirm
        try:
            await device.listen(s.listen_port, s.listen_host)
        except CannotListenError as exc:
            self.say(f"cannot listen on {s.listen_host}:{s.listen_port}: {exc.socketError}")
            self.device = None
            raise _GaveUp() from None
        self._confirmed = defer.Deferred()
        if not await self._confirm(device):
            await self._close_device()
            return None
        if not await self._until_confirmed(self._confirmed):
            self.say(f"  no push-confirmation-done within {s.confirmation_timeout:g} s: the "
                     f"proxy cannot reach {device.push_endpoint}")
            await self._close_device()
            return None
        self._serving(f"https-simple on {device.push_endpoint}")
        return device

    async def _start_tunnels(
        self, pulled: DeviceVerdict, queried: DeviceVerdict, urls: Sequence[str]
    ) -> SimulatedDevice | None:
        s = self.settings
        device = SimulatedTunnelDevice(
            self.reactor, s.distid, s.key, ca_pem=s.ca_pem,
            sa_cert_pem=pulled.sa_certificate or b"", sa_key_pem=pulled.sa_private_key or b"",
            tunnel_urls=queried.https_tunnel_urls,
            echo_interval=queried.https_tunnel_echo_interval or DEFAULT_ECHO_INTERVAL,
            retry_interval=s.retry_interval, description=s.description,
            modules=[DeviceModule(*m) for m in pulled.modules], configs=dict(pulled.md_configs),
            tls_min_version=s.tls_min_version, tls_max_version=s.tls_max_version,
            response_timeout=s.response_timeout, confirmation_timeout=s.confirmation_timeout,
        )
        self._adopt(device)
        await device.start()
        try:
            await device.ready(timeout=s.confirmation_timeout)
        except (RuntimeError, TimeoutError) as exc:
            self.say(f"  tunnels not confirmed: {exc}")
            await self._close_device()
            return None
        self._serving(f"https-tunnel over {', '.join(device.tunnel_urls)}")
        return device

    async def _confirm(self, device: SimulatedDevice) -> bool:
        """push-confirmation-start to every rs-pull-server-url; also after a configure (§8.4)."""
        self._held = []
        try:
            exchanges = await device.confirm()
        finally:
            held, self._held = self._held, None
        for exchange in exchanges:
            self.say(f"confirm: push-confirmation-start (push-endpoint {device.push_endpoint}) "
                     f"-> {_answer(exchange, transaction_id=False)}")
        for line in held:
            self.say(line)
        if any(e.verdict.outcome == SUCCESS for e in exchanges):
            return True
        for exchange in exchanges:
            self._usable(exchange)
        return False

    async def _reconfirm(self, device: SimulatedDevice) -> None:
        """After a good configure the listener restarts and confirms again (§2.5, §8.4)."""
        try:
            confirmed = await self._confirm(device)
        except _GaveUp:
            self._fire_wake(STOP)
            return
        if not confirmed:
            self._fire_wake(REPULL)

    def _serving(self, how: str) -> None:
        self.serving = True
        self.say(f"serving: {how} (Ctrl-C to stop)")

    # -- what the device receives ------------------------------------------------------------

    def _adopt(self, device: SimulatedDevice) -> None:
        if self._stopping:
            raise _GaveUp()  # stop() came during the pull round: no new device
        self.device = device
        self.serving = False
        self._wake = defer.Deferred()
        device.on_event = lambda kind, what: self._event(device, kind, what)

    def _event(self, device: SimulatedDevice, kind: str, what: Any) -> None:
        if device is not self.device:
            return  # a device already replaced
        if kind == "push":
            if self._held is not None:
                self._held.append(_push_line(what))
            else:
                self.say(_push_line(what))
        elif kind == "done":
            self.say(_done_line(what))
        elif kind == "confirmed":
            if isinstance(what, TunnelConfirmation):
                self.say(f"confirm: push-confirmation-start on {what.url} #{what.connection} -> "
                         f"{_verdict_text(what.start_verdict)}, push-confirmation-done: "
                         "confirmed")
            else:
                self._fire_confirmed(True)
        elif kind == "tunnel-open":
            self.say(f"tunnel: {_conn_name(what)} open ({what.tls_version})")
        elif kind == "tunnel-closed":
            self.say(f"tunnel: {_conn_name(what)} closed: {what.close_reason}")
        elif kind == "exit":
            # From inside the device's handling of a push: let it write its answer first.
            self.reactor.callLater(0, self._exited, device, what)

    def _exited(self, device: SimulatedDevice, reason: str) -> None:
        if device is self.device:
            self._last_push = device.received[-1].operation if device.received else None
            self._fire_wake(reason)

    def _trigger_for(self, reason: str) -> str:
        """The trigger the SA writes in its next config-solicitation (§6.1)."""
        if self._last_push == "reboot":
            return "Reboot requested by RS"
        if self._last_push == "pull-config":
            return "Pull requested by RS"
        return "received 503 Need reboot" if reason == REBOOT else "received 502 Push failed"

    # -- plumbing ----------------------------------------------------------------------------

    def _client(self, cert: bytes | None = None, key: bytes | None = None) -> SimulatedSA:
        s = self.settings
        return SimulatedSA(
            self.reactor, s.distid, s.key, ca_pem=s.ca_pem, client_cert_pem=cert,
            client_key_pem=key, description=s.description, firmware_info=s.firmware_info,
            tls_min_version=s.tls_min_version, tls_max_version=s.tls_max_version,
            response_timeout=s.response_timeout,
        )

    def _usable(self, exchange: SAExchange) -> bool:
        """Say why an answer is not a success; a 501 stops the device like the SA."""
        verdict = exchange.verdict
        if verdict.outcome == SUCCESS:
            return True
        if exchange.error:
            self.say(f"  {exchange.error}")
        for problem in verdict.problems:
            self.say(f"  problem: {problem}")
        if verdict.outcome == STOP:
            self._say_stop()
            raise _GaveUp()
        return False

    def _say_stop(self) -> None:
        self.say("exit: stop: the SA stops (501 Out of service)")

    async def _until_confirmed(self, confirmed: defer.Deferred[bool]) -> bool:
        """True once the push-confirmation-done came; False at the timeout or stop()."""
        if self._stopping:
            return False
        timer = self.reactor.callLater(self.settings.confirmation_timeout,
                                       self._fire_confirmed, False)
        try:
            return await confirmed
        finally:
            if timer.active():
                timer.cancel()

    def _fire_confirmed(self, value: bool) -> None:
        confirmed = self._confirmed
        if confirmed is not None and not confirmed.called:
            confirmed.callback(value)

    async def _wait(self) -> str | None:
        """Until the device leaves its event loop (the reason) or stop() (None)."""
        wake = self._wake
        if wake is None:
            return None
        return await wake

    def _fire_wake(self, value: str | None) -> None:
        wake = self._wake
        if wake is not None and not wake.called:
            wake.callback(value)

    async def _close_device(self) -> None:
        device = self.device
        self.serving = False
        if device is None:
            return
        await device.close(grace=_CLOSE_GRACE)  # what it still receives is said too
        if self.device is device:
            self.device = None

    async def _sleep(self, delay: float) -> None:
        if self._stopping or delay <= 0:
            return
        sleep = deferLater(self.reactor, delay, lambda: None)
        wake: defer.Deferred[str | None] = defer.Deferred()
        self._wake = wake  # stop() ends the sleep
        await defer.DeferredList([sleep, wake], fireOnOneCallback=True, consumeErrors=True)
        if not sleep.called:
            sleep.cancel()


# --------------------------------------------------------------------------------------------
# One line per thing received
# --------------------------------------------------------------------------------------------


def _verdict_text(verdict: DeviceVerdict | None) -> str:
    if verdict is None:
        return "no answer"
    code = "no ARMS code" if verdict.result_code is None else str(verdict.result_code)
    text = f"{code} ({verdict.outcome})"
    if verdict.problems:
        text += f", {len(verdict.problems)} problem(s): {verdict.problems[0]}"
    return text


def _over(exchange: SAExchange) -> str:
    return f" over {exchange.tls_version}" if exchange.tls_version else ""


def _answer(exchange: SAExchange, *, transaction_id: bool = True) -> str:
    if exchange.error and exchange.status is None:
        return f"no answer ({exchange.verdict.outcome})"
    if exchange.status != 200:
        return f"HTTP {exchange.status} ({exchange.verdict.outcome})"
    text = _verdict_text(exchange.verdict)
    if transaction_id and exchange.verdict.transaction_id is not None:
        text += f", transaction-id {exchange.verdict.transaction_id}"
    return text


def _pull_summary(v: DeviceVerdict) -> str:
    if v.outcome != SUCCESS:
        return ""
    if v.sa_certificate is None:
        return ", no sa-certificate"
    cert = x509.load_pem_x509_certificate(v.sa_certificate)
    return f", sa-certificate {cert.fingerprint(hashes.SHA256()).hex()[:16]}"


def _push_line(record: ReceivedPush | TunnelPush) -> str:
    via = f" on {record.url} #{record.connection}" if isinstance(record, TunnelPush) else ""
    what = record.type or "unreadable request"
    if isinstance(record, ReceivedPush) and record.status is None:
        return f"push: {what}{via} -> dropped without answer"
    if isinstance(record, ReceivedPush) and record.status != 200:
        return f"push: {what}{via} -> HTTP {record.status}"
    if record.answered_at is None:
        return f"push: {what}{via} -> not answered (tunnel gone)"
    text = f"push: {what}{via} -> {record.result_code}"
    if record.operation == "push-confirmation" and record.result_code == 100:
        text += ": confirmed, the proxy may push now"
    if record.transaction_id is not None:
        text += f", transaction-id {record.transaction_id}"
        if record.operation in TWO_WAY and record.result_code == 100:
            text += " (done-request follows)"
    return text


def _done_line(record: DoneRecord) -> str:
    where = record.url or "nowhere (no result-url)"
    text = (f"done: {record.kind} {record.transaction_id} (transaction-result "
            f"{record.transaction_result}) to {where} -> ")
    verdict = record.verdict
    if record.error and (verdict is None or verdict.result_code is None):
        return text + f"{record.outcome} ({record.error})"
    return text + _verdict_text(verdict)


def _conn_name(conn: TunnelConnection) -> str:
    return f"{conn.url} #{conn.number}"


def _usable_url(url: str) -> bool:
    try:
        parse_url(url)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings from the ``armsproxy-sasim`` options; ValueError for a bad value."""
    host, port = parse_listen(args.listen)
    with open(args.ca, "rb") as fh:
        ca_pem = fh.read()
    return ServeSettings(
        url=args.url, distid=args.distid, key=args.key, ca_pem=ca_pem, listen_host=host,
        listen_port=port, tunnel=args.tunnel,
        tls_min_version=TLS_VERSIONS.get(args.tls_min or ""),
        tls_max_version=TLS_VERSIONS.get(args.tls_max or ""),
        description=args.description, firmware_info=args.firmware_info or None,
        trigger=args.trigger, response_timeout=args.timeout,
        retry_interval=args.retry_interval, retry_max=args.retry_max,
    )


def main_serve(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``armsproxy-sasim serve``: exit 0 on SIGINT/SIGTERM, 1 if the device cannot go on."""
    if args.cert or args.cert_key:
        print("armsproxy-sasim: serve takes its certificate from the pull answer, not --cert",
              file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        parse_url(settings.url)
    except (OSError, ValueError) as exc:
        print(f"armsproxy-sasim: {exc}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    server = DeviceServer(reactor, settings, out)
    code: list[int] = []

    async def run() -> None:
        code.append(await server.run())
        _stop(reactor)

    def start() -> None:
        # SIGINT/SIGTERM stop the reactor; the device ends its tunnels (zero chunk) first.
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.ensureDeferred(server.stop())
        )
        defer.ensureDeferred(run()).addErrback(_crashed, code, reactor)

    reactor.callWhenRunning(start)
    reactor.run()
    return code[0] if code else 0


def _crashed(failure: Any, code: list[int], reactor: Any) -> None:
    print(f"armsproxy-sasim: {failure.getTraceback()}", file=sys.stderr)
    code.append(1)
    _stop(reactor)


def _stop(reactor: Any) -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping: SIGINT/SIGTERM
