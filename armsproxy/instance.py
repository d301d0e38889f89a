"""This process as one instance of armsproxy among several sharing one store (#12).

Each process is an *instance*: an id, and a lease row in the store it renews every ``renew``
seconds for ``lease`` seconds ahead. What an instance claimed carries its id
(``operations.claimed_by``), and so does every SA whose tunnel it holds
(``sa_registry.tunnel_owner``). When an instance stops renewing (killed, frozen, cut off),
the first survivor whose push engine looks after the lease has expired takes over what it was
sending and resolves it with the restart rules (design.md §5), and releases its tunnels: the
SA reconnects to any instance and its orders follow it there.

:class:`InstanceService` holds the lease and composes the services around it:

* its children (the push engine) start once the lease is registered, and stop before the
  lease is given back, so nothing is claimed without a lease and nothing claimed is left
  behind by a clean stop unresolved;
* :attr:`InstanceService.leader` holds the services only one instance at a time may run (the
  event outbox, which keeps each operation's events in order, and the purges): they run
  while :meth:`~armsproxy.store.interface.Store.lead` says this instance holds the lock,
  asked again at every renewal, so another takes over within ``renew`` seconds of a death;
* announcements of the other instances (new orders, new events: the store's LISTEN/NOTIFY on
  PostgreSQL) call what :meth:`InstanceService.on` registered; the engine's tick and the
  outbox's poll are the fallback when one is missed.

On SQLite (one process) the same code runs with trivial answers: the lease is recorded, this
instance always leads, and nobody announces anything.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def new_instance_id() -> str:
    """``host:pid:random``: readable in ``instances`` and logs, unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaderServices(service.MultiService):
    """Services run only while their instance leads: started and stopped by the instance,
    never by the service tree (``startService`` only marks them as wanted)."""

    def startService(self) -> None:
        service.Service.startService(self)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return self._stop_children()

    def _start_children(self) -> None:
        for child in self:
            if not child.running:
                child.startService()

    def _stop_children(self) -> defer.Deferred[None]:
        stopping = [defer.maybeDeferred(child.stopService)
                    for child in reversed(list(self)) if child.running]
        return defer.DeferredList(stopping, consumeErrors=True).addCallback(lambda _: None)


class InstanceService(service.MultiService):
    """The lease of this instance, the services that need it (children), and those only one
    instance runs (:attr:`leader`, a child too)."""

    def __init__(self, store: Any, clock: IReactorTime, *, lease: float = 15.0,
                 renew: float = 5.0, instance_id: str | None = None) -> None:
        if not 0 < renew < lease:
            raise ValueError("instance lease: 0 < renew < lease")
        super().__init__()
        self.store = store
        self.clock = clock
        self.lease = lease
        self.renew = renew
        self.id = instance_id or new_instance_id()
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.leader = LeaderServices()
        self.leader.setServiceParent(self)
        #: Whether this instance runs the :attr:`leader` services now.
        self.leading = False
        self.registered = False
        self._ready: list[defer.Deferred[None]] = []
        self._handlers: dict[str, list[Callable[[], None]]] = {}
        self._regained: list[Callable[[], None]] = []
        self._loop: task.LoopingCall | None = None
        self._starting: defer.Deferred[None] | None = None
        self._renewing = False

    # -- wiring ---------------------------------------------------------------------------

    def on(self, topic: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when another instance announces ``topic`` ("ops": orders to
        claim; "events": events to deliver)."""
        self._handlers.setdefault(topic, []).append(callback)

    def on_lease_regained(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when a renewal found the lease gone (a survivor took this
        instance over while it could not renew) and registered it again."""
        self._regained.append(callback)

    async def ready(self) -> None:
        """Returns once the lease is registered (at once if it is)."""
        if not self.registered:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._ready.append(waiter)
            await waiter

    # -- service --------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)  # children once the lease is registered
        self._starting = defer.ensureDeferred(self._start())
        self._starting.addErrback(self._failed, "start")

    async def _start(self) -> None:
        while self.running and not await self._register(first=True):
            await task.deferLater(self.clock, self.renew, lambda: None)
        if not self.running:
            return
        await self.store.listen(self._heard)
        for child in self:
            if child is self.leader:
                child.startService()  # wanted; its children run while leading
            elif not child.running:
                child.startService()
        await self._lead()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.renew, now=False)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        stopping = [defer.maybeDeferred(child.stopService)
                    for child in reversed(list(self)) if child.running]
        await defer.DeferredList(stopping, consumeErrors=True)
        self.leading = False
        if not self.registered:
            return
        try:
            await self.store.resign()
            await self.store.retire_instance(self.id)
            self.registered = False
            log.info("instance {id}: stopped; lease given back", id=self.id)
        except Exception:
            log.failure("instance {id}: could not give the lease back (it expires)",
                        id=self.id)

    def _failed(self, failure: Failure, what: str) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("instance {id}: {what} failed", failure, id=self.id, what=what)

    # -- lease and leadership ------------------------------------------------------------------

    async def _register(self, *, first: bool = False) -> bool:
        now = self.clock.seconds()
        try:
            there = await self.store.register_instance(
                self.id, host=self.host, pid=self.pid, now=now, lease_until=now + self.lease)
        except Exception as e:
            log.warn("instance {id}: cannot renew its lease ({e})", id=self.id, e=str(e))
            return False
        if first:
            log.info("instance {id}: lease registered ({lease:g} s, renewed every {renew:g} s)",
                     id=self.id, lease=self.lease, renew=self.renew)
        elif not there:
            log.warn("instance {id}: its lease had expired and was taken over by another "
                     "instance; registered again", id=self.id)
            for callback in list(self._regained):
                callback()
        self.registered = True
        ready, self._ready = self._ready, []
        for waiter in ready:
            waiter.callback(None)
        return True

    def _tick(self) -> defer.Deferred[None]:
        d = defer.ensureDeferred(self._renew_and_lead())
        d.addErrback(self._failed, "renewal")
        return d

    async def _renew_and_lead(self) -> None:
        if self._renewing:  # a slow store: never two renewals at once
            return
        self._renewing = True
        try:
            await self._register()
            await self._lead()
        finally:
            self._renewing = False

    async def _lead(self) -> None:
        if not self.running:
            return
        try:
            leading = await self.store.lead(self.id)
        except Exception as e:
            log.warn("instance {id}: cannot ask for leadership ({e})", id=self.id, e=str(e))
            leading = False
        if leading and not self.leading and self.running:
            self.leading = True
            log.info("instance {id}: leads (event outbox, purges)", id=self.id)
            self.leader._start_children()
        elif not leading and self.leading:
            self.leading = False
            log.warn("instance {id}: no longer leads; another instance takes over the event "
                     "outbox and the purges", id=self.id)
            await self.leader._stop_children()

    def _heard(self, topic: str) -> None:
        for callback in list(self._handlers.get(topic, ())):
            callback()
