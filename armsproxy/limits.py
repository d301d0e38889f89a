"""Connection caps, whole-request deadlines and the descriptor budget of every listener.

Devices must keep their pulls whatever else connects. Without limits, a client that opens
connections and sends a byte a second keeps each one forever (an idle timer restarts on every
byte) until the process runs out of file descriptors; the SA gate then cannot accept a device
and the RS client cannot reach the RS. So:

* at start the soft ``RLIMIT_NOFILE`` is raised to the hard limit (:func:`raise_descriptor_limit`);
* every listener has a connection cap; a connection over it is closed at accept, before TLS
  (:class:`ListenerLimit`, :func:`limited`);
* the listeners that are not for devices (management, RS gate, demo RS) also refuse while fewer
  than :attr:`DescriptorBudget.reserve` descriptors are free: those stay for the SA gate, the RS
  client and the push client;
* a twisted.web listener answers each request within a deadline counted from the start of the
  connection, or from the end of the previous answer, to the end of this one: bytes that
  trickle in do not extend it (:class:`DeadlineSite`). The SA gate has its own
  (``request_timeout``, ``answer_timeout``).
"""

from __future__ import annotations

import dataclasses
import os
import resource
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource
from zope.interface import implementer

from .tls import RecordPerWriteTLSFactory, TLSListener

log = Logger()

MIN_RESERVE = 256  # descriptors kept from the non-device listeners, at least
FD_SETSIZE = 1024  # select() cannot watch a descriptor numbered this or higher
UNLIMITED_TARGET = 1 << 20  # what "unlimited" is raised to (Linux's default nr_open)
LOG_INTERVAL = 10.0  # seconds between two lines about refused or cut connections
REFRESH = 1.0  # seconds between two counts of the open descriptors


# -- the descriptor budget ------------------------------------------------------------------

def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; (before, after).

    Many systems start services at a soft 1024 under a hard limit hundreds of times higher;
    an unlimited hard limit (macOS) is tried downwards from :data:`UNLIMITED_TARGET`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else UNLIMITED_TARGET
    while target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            target //= 2  # e.g. above macOS's per-process maximum
    return soft, soft


def open_descriptors() -> int | None:
    """Descriptors this process has open, or None where the system does not list them."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # minus listdir's own
        except OSError:
            continue
    return None


def default_reserve(limit: int) -> int:
    """A quarter of the limit, at least :data:`MIN_RESERVE`, never more than half of it."""
    return min(max(MIN_RESERVE, limit // 4), limit // 2)


class DescriptorBudget:
    """The process's descriptors: how many are free, what the non-device listeners leave.

    Counting ``/proc/self/fd`` costs about half a millisecond per thousand descriptors, too
    much for every connection of a flood: it is counted at most every ``refresh`` seconds,
    and the connections the listeners opened and closed since are added to that count.
    """

    def __init__(self, limit: int, *, clock: IReactorTime, reserve: int | None = None,
                 count: Callable[[], int | None] = open_descriptors,
                 refresh: float = REFRESH) -> None:
        self.limit = limit
        self.reserve = default_reserve(limit) if reserve is None else reserve
        self.listeners: list[ListenerLimit] = []
        self._clock = clock
        self._count = count
        self._refresh = refresh
        self._tracked = 0  # connections open on the listeners
        self._measured = 0
        self._tracked_then = 0
        self._measured_at: float | None = None

    @classmethod
    def at_start(cls, reactor: Any) -> DescriptorBudget:
        """Raise the soft limit (logged) and budget with what it became."""
        before, after = raise_descriptor_limit()
        limit = UNLIMITED_TARGET if after == resource.RLIM_INFINITY else after
        if _select_based(reactor) and limit > FD_SETSIZE:
            log.warn("the select reactor cannot watch more than {n} descriptors; budgeting "
                     "{n} of {limit}: run twistd with --reactor=epoll or poll",
                     n=FD_SETSIZE, limit=limit)
            limit = FD_SETSIZE
        budget = cls(limit, clock=reactor)
        if after != before:
            log.info("descriptor limit (RLIMIT_NOFILE) raised from {before} to {after}; "
                     "{reserve} kept from the non-device listeners",
                     before=before, after=after, reserve=budget.reserve)
        else:
            log.info("descriptor limit (RLIMIT_NOFILE) {limit} (the hard limit); {reserve} "
                     "kept from the non-device listeners", limit=after, reserve=budget.reserve)
        return budget

    def device_cap(self, *, share: int = 2) -> int:
        """The automatic cap of a device listener: its ``1/share`` of what the reserve leaves.

        A pull holds two descriptors (its own and one to the RS), so the SA gate alone takes
        half; with a tunnel listener (one descriptor per tunnel) each takes a third.
        """
        return max(1, (self.limit - self.reserve) // share)

    def in_use(self) -> int:
        now = self._clock.seconds()
        if self._measured_at is None or now - self._measured_at >= self._refresh:
            counted = self._count()
            self._measured = self._tracked if counted is None else counted
            self._tracked_then = self._tracked
            self._measured_at = now
        return self._measured + self._tracked - self._tracked_then

    def free(self) -> int:
        return self.limit - self.in_use()

    def opened(self) -> None:
        self._tracked += 1

    def closed(self) -> None:
        self._tracked -= 1

    def listener(self, name: str, max_connections: int, *, device: bool = False,
                 counter: Callable[[str], None] | None = None) -> ListenerLimit:
        """The limit of one listener; ``device``: exempt from the reserve (SA gate, tunnels)."""
        limit = ListenerLimit(name, max_connections, budget=self, keep_reserve=not device,
                              clock=self._clock, counter=counter)
        self.listeners.append(limit)
        log.info("{listener}: at most {n} connections{reserve}", listener=name,
                 n=max_connections, reserve="" if device else ", none into the reserve")
        return limit

    def device_listener(self, name: str, max_connections: int | None, *, share: int = 2,
                        counter: Callable[[str], None] | None = None) -> ListenerLimit:
        """A device listener's limit: ``max_connections``, or None for :meth:`device_cap`."""
        automatic = self.device_cap(share=share)
        if max_connections is None:
            max_connections = automatic
        elif max_connections > automatic:
            log.warn("{listener}: max_connections {n} is more than the {auto} that {limit} "
                     "descriptors leave it: devices may run the process out of descriptors "
                     "(raise the hard RLIMIT_NOFILE)", listener=name, n=max_connections,
                     auto=automatic, limit=self.limit)
        return self.listener(name, max_connections, device=True, counter=counter)


def _select_based(reactor: Any) -> bool:
    try:
        from twisted.internet.selectreactor import SelectReactor
    except ImportError:  # pragma: no cover - always there on POSIX
        return False
    return isinstance(reactor, SelectReactor)


# -- rate-limited warnings ------------------------------------------------------------------

class RateLimitedLog:
    """At most one warning per ``interval`` for a kind of event, with the count since the last
    line: a flood of refused connections must not become a flood of log lines too. What a
    window held back is logged when it ends, so the counts add up."""

    def __init__(self, clock: IReactorTime, interval: float = LOG_INTERVAL) -> None:
        self.total = 0
        self._clock = clock
        self._interval = interval
        self._pending = 0
        self._message = ""
        self._fields: dict[str, object] = {}
        self._last: float | None = None
        self._flush: IDelayedCall | None = None

    def note(self, message: str, **fields: object) -> None:
        self.total += 1
        self._pending += 1
        self._message, self._fields = message, fields
        now = self._clock.seconds()
        if self._last is None or now - self._last >= self._interval:
            self._emit()
        elif self._flush is None:
            self._flush = self._clock.callLater(self._last + self._interval - now, self._emit)

    def _emit(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        if self._pending:
            log.warn(self._message + " ({count} in {interval:g} s)", count=self._pending,
                     interval=self._interval, **self._fields)
        self._pending = 0
        self._last = self._clock.seconds()


# -- connection caps ------------------------------------------------------------------------

class ListenerLimit:
    """Admits a listener's connections: under its cap and, unless a device listener, while
    more than the budget's reserve of descriptors is free."""

    def __init__(self, name: str, max_connections: int, *,
                 budget: DescriptorBudget | None = None, keep_reserve: bool = False,
                 clock: IReactorTime, counter: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.max_connections = max_connections
        self.budget = budget
        self.keep_reserve = keep_reserve and budget is not None
        self.open = 0
        self._counter = counter
        self._over_cap = RateLimitedLog(clock)
        self._scarce = RateLimitedLog(clock)

    @property
    def refused(self) -> int:
        return self._over_cap.total + self._scarce.total

    @property
    def refusals(self) -> dict[str, int]:
        """Refused since start by reason (``armsproxy_listener_refusals_total``): over
        ``max_connections``, or too few descriptors free (``reserve``)."""
        return {"max_connections": self._over_cap.total, "reserve": self._scarce.total}

    def admit(self, addr: IAddress | None) -> bool:
        if self.open >= self.max_connections:
            self._refuse()
            self._over_cap.note(
                "{listener}: connections refused: {open} open, its max_connections",
                listener=self.name, open=self.open)
            return False
        if self.keep_reserve:
            assert self.budget is not None
            free = self.budget.free()
            if free <= self.budget.reserve:
                self._refuse()
                self._scarce.note(
                    "{listener}: connections refused: {free} of {limit} descriptors free, "
                    "{reserve} are kept for devices and the RS",
                    listener=self.name, free=free, limit=self.budget.limit,
                    reserve=self.budget.reserve)
                return False
        return True

    def _refuse(self) -> None:
        if self._counter is not None:
            self._counter("rejected.connection_limit")

    def opened(self) -> None:
        self.open += 1
        if self.budget is not None:
            self.budget.opened()

    def closed(self) -> None:
        self.open -= 1
        if self.budget is not None:
            self.budget.closed()


class LimitedFactory(WrappingFactory):
    """Wraps a listener's factory: a connection the limit does not admit gets no protocol, so
    the port closes it at once (before any HTTP work). For plain listeners (RS gate,
    management, demo RS); a TLS listener counts in its TLS factory instead
    (:class:`LimitedTLSFactory`), with no wrapper per connection."""

    def __init__(self, wrapped: IProtocolFactory, limit: ListenerLimit) -> None:
        super().__init__(wrapped)
        self.limit = limit

    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper | None:  # type: ignore[override]
        if not self.limit.admit(addr):
            return None
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)

    def registerProtocol(self, p: IProtocol) -> None:
        super().registerProtocol(p)
        self.limit.opened()

    def unregisterProtocol(self, p: IProtocol) -> None:
        super().unregisterProtocol(p)
        self.limit.closed()


class LimitedTLSFactory(RecordPerWriteTLSFactory):
    """A TLS listener's factory with its limit applied at accept: a connection the limit does
    not admit gets no protocol, so the port closes it before any TLS work.

    Why not :class:`LimitedFactory` under the TLS: its wrapper costs ~0.3 KiB per
    connection, and the SA gate holds thousands of idle tunnels. A TLS factory already hears
    of each connection's start and end (``registerProtocol``, ``unregisterProtocol``) and
    keeps the set of them, so it counts at no cost per connection.
    """

    def __init__(self, contextFactory: Any, wrappedFactory: IProtocolFactory,
                 limit: ListenerLimit, handshake_failures: Any = None) -> None:
        super().__init__(contextFactory, False, wrappedFactory, handshake_failures)
        self.limit = limit

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if not self.limit.admit(addr):
            return None
        return super().buildProtocol(addr)

    def registerProtocol(self, p: IProtocol) -> None:
        # Twisted's TLS protocol registers itself twice (its own makeConnection and
        # ProtocolWrapper's): count the first only.
        if p not in self.protocols:
            self.limit.opened()
            _share_write_buffer_keys(getattr(p, "transport", None))
        super().registerProtocol(p)

    def unregisterProtocol(self, p: IProtocol) -> None:
        if p in self.protocols:
            self.limit.closed()
        super().unregisterProtocol(p)


def _share_write_buffer_keys(transport: Any) -> None:
    """Give a TCP transport its write-buffer attributes from the start.

    CPython (3.11+) keeps the attributes of a class's instances in one shared key table
    that stops growing once some thirty instances exist; an instance that later sets a name
    the table lacks gets a dict of its own (~0.8 KiB instead of 8 bytes a value). Twisted's
    transports set ``dataBuffer`` and ``offset`` (class defaults until then) on their first
    buffered write: in a process that accepted many connections before any such write
    (RS gate, warm-up), every later tunnel paid that dict. Set here to the values they
    already read as, they are in the table from the first connections on.
    """
    if isinstance(transport, FileDescriptor):
        transport.dataBuffer = transport.dataBuffer
        transport.offset = transport.offset


@implementer(IStreamServerEndpoint)
@dataclasses.dataclass(slots=True)
class LimitedEndpoint:
    endpoint: IStreamServerEndpoint
    limit: ListenerLimit

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(LimitedFactory(factory, self.limit))


@implementer(IStreamServerEndpoint)
@dataclasses.dataclass(slots=True)
class LimitedTLSEndpoint:
    """A :class:`~armsproxy.tls.TLSListener` whose TLS factory applies ``limit``."""

    tls: TLSListener
    limit: ListenerLimit

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.tls.endpoint.listen(LimitedTLSFactory(
            self.tls.options, factory, self.limit, self.tls.handshake_failures))


def limited(endpoint: IStreamServerEndpoint, limit: ListenerLimit) -> IStreamServerEndpoint:
    """``endpoint`` with ``limit`` applied at accept; for a TLS listener, before its TLS, so
    that a refused connection costs no handshake."""
    if isinstance(endpoint, TLSListener):
        return LimitedTLSEndpoint(endpoint, limit)
    return LimitedEndpoint(endpoint, limit)


# -- whole-request deadlines for twisted.web --------------------------------------------------

class DeadlineChannel(http.HTTPChannel):
    """An HTTP/1.1 channel whose requests must each be answered within the site's
    ``request_timeout``, counted from the connection's start or the end of the previous answer.

    Twisted's own timeout is an idle timer that every received byte restarts, so a client
    sending one byte a second held a connection forever. Past the deadline the connection is
    closed, and aborted ``abortTimeout`` seconds later if the peer does not let it go.
    """

    site: DeadlineSite
    _deadline: IDelayedCall | None = None
    _request_started = False  # bytes of a request arrived since the last answer

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self._request_started = True
        super().dataReceived(data)

    def requestDone(self, request: server.Request) -> None:
        super().requestDone(request)
        self._request_started = bool(self.requests)  # a pipelined one already started
        self._arm()  # the next request's deadline (or a closing connection's)

    def connectionLost(self, reason: Failure) -> None:
        self._disarm()
        super().connectionLost(reason)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.callLater(self.site.request_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._request_started:  # an idle keep-alive connection just ends, unlogged
            self.site.cut.note(
                "{listener}: connections closed: no answer within the {timeout:g} s "
                "request_timeout", listener=self.site.listener_name,
                timeout=self.site.request_timeout)
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()


class DeadlineSite(server.Site):
    """A Site served by :class:`DeadlineChannel`: ``request_timeout`` replaces Twisted's idle
    timeout; ``cut`` counts (and logs, rate-limited) the connections it closed mid-request."""

    protocol = DeadlineChannel  # type: ignore[assignment]  # HTTP/1.1 only: we offer no h2

    def __init__(self, resource: IResource, *, request_timeout: float, listener_name: str,
                 reactor: Any = None, **kwargs: Any) -> None:
        super().__init__(resource, timeout=None, reactor=reactor, **kwargs)
        self.request_timeout = request_timeout
        self.listener_name = listener_name
        self.cut = RateLimitedLog(self.reactor)
