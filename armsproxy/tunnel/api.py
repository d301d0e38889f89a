"""What the tunnel room offers and what it needs, as types (design.md §2).

``push`` sends over a :class:`Tunnel` and receives :class:`TunnelAnswer` or a
:class:`TunnelError`; whoever wires the proxy (tap.py) injects a :class:`TunnelHooks` so that
this room never imports ``armsproxy.push`` or ``armsproxy.sa_gate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..arms.messages import ArmsRequest, ArmsResponse

__all__ = [
    "Tunnel",
    "TunnelAnswer",
    "TunnelBusy",
    "TunnelClosed",
    "TunnelError",
    "TunnelHooks",
    "TunnelTimeout",
]


class TunnelError(Exception):
    """A request that got no answer over a tunnel.

    ``request_sent`` tells the caller whether the request had been written: if so the SA may
    have acted on it, and an operation with side effects must not be sent again blindly.
    """

    def __init__(self, reason: str, *, request_sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_sent = request_sent


class TunnelClosed(TunnelError):
    """The tunnel went away (SA closed it, echo timeout, framing error, close())."""


class TunnelTimeout(TunnelError):
    """The request was written and no answer came in time; the tunnel is closed too, because
    a late answer could otherwise be taken for the answer to the next request (§9.7)."""

    def __init__(self, reason: str, *, request_sent: bool = True) -> None:
        super().__init__(reason, request_sent=request_sent)


class TunnelBusy(TunnelError):
    """Too many requests already wait on this tunnel; nothing was written."""

    def __init__(self, reason: str, *, request_sent: bool = False) -> None:
        super().__init__(reason, request_sent=request_sent)


@dataclass(slots=True, frozen=True)
class TunnelAnswer:
    """The SA's answer to one request.

    ``body`` is the message as the SA sent it (b"" for the zero-length answer ``0;id=N;trail``
    that md-command uses for result 402, §7.9). ``response`` is its parsed form, or ``None`` for
    an empty body or a body the model cannot read (``problem`` then says why; the caller may
    still decode ``body`` leniently).
    """

    body: bytes
    response: ArmsResponse | None
    elapsed: float
    problem: str | None = None

    @property
    def empty(self) -> bool:
        return not self.body


class Tunnel(Protocol):
    """A live https-tunnel to one SA, as the push engine and the registry see it."""

    id: int
    distid: str
    peer: str
    path: str
    opened_at: float
    confirmed_at: float | None
    last_seen: float

    @property
    def confirmed(self) -> bool:
        """Confirmed (§9.4) and open: requests written now go straight to the SA."""
        ...

    @property
    def closed(self) -> bool: ...

    @property
    def queue_length(self) -> int:
        """Requests waiting or outstanding (0 when idle)."""
        ...

    async def request(self, xml: bytes, *, timeout: float) -> TunnelAnswer: ...

    def close(self, reason: str) -> None: ...


class TunnelHooks(Protocol):
    """What a tunnel needs from the rest of the proxy (injected by tap.py)."""

    async def authenticate(self, distid: str, key: str) -> bool:
        """True if ``key`` is the SA's RS key. Raising (RS unreachable) gives a 503."""
        ...

    async def confirmation_start(
        self, distid: str, request: ArmsRequest, peer: str
    ) -> ArmsResponse:
        """Relay push-confirmation-start; a 1xx answer carries the confirmation id as
        ``transaction_id``. Raising closes the tunnel without an answer."""
        ...

    async def done_request(self, request: ArmsRequest, raw: bytes, peer: str) -> int:
        """Commit a ``*-done`` and return the result code to answer. Raising means "not
        stored": nothing is answered and the tunnel is closed, so the SA keeps the
        transaction and sends the done again on its next tunnel (§6.5)."""
        ...

    def tunnel_up(self, tunnel: Tunnel) -> None:
        """The tunnel completed its first confirmation and is registered."""
        ...

    def tunnel_down(self, tunnel: Tunnel, reason: str) -> None:
        """A tunnel announced by ``tunnel_up`` is gone (called once)."""
        ...
