"""What the SA gate does with one authenticated request: relay pulls to the RS, answer the SA.

Every answer armsproxy writes is chosen with the device's reaction in mind (§10.2): when
armsproxy itself cannot answer properly (RS down, slow, faulting, or answering nonsense) it
sends 301 "Server Busy", which makes the device retry later — never a code that makes it
reboot or re-pull. Only codes the RS chose are relayed as they are.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..arms import codes
from ..arms.codec import MessageError, UnsafeMessageError, parse_message, serialise
from ..arms.distid import is_distid
from ..arms.framing import build_http_error, build_sa_response
from ..arms.messages import (
    ArmsRequest,
    ArmsResponse,
    ConfigSolicitationRequest,
    Empty,
    PushConfirmationStartRequest,
    PushMethodQueryRequest,
    PushMethodQueryResponse,
    is_done_type,
)
from ..rs_client import RSError
from .protocol import GateRequest, NoAnswer
from .rs_structs import (
    RSAnswerError,
    config_solicitation_body,
    push_method_answer,
    result_code,
)

PUSH_METHODS = ("https-simple", "https-tunnel")


class KeyChecker(Protocol):
    """What the gate needs to authenticate an SA. A checker may also offer
    ``matches_cached(distid, key) -> bool`` (KeyCache does): a synchronous "cached and
    matching" that spares the hot path a coroutine; ``False`` falls back to ``check``."""

    async def check(self, distid: str, presented_key: str) -> bool: ...


class RS(Protocol):
    """What the gate relays pulls to. An RS may also offer ``call_timeout`` (RSClient does):
    the seconds within which each of its calls ends, answered or failed; a pull's relay
    (one call) then needs no budget timer of its own while the budget left is longer."""

    async def config_solicitation(self, distid: str, info: dict) -> dict: ...
    async def push_method_query(self, distid: str, info: dict) -> dict: ...
    async def push_confirmation(self, distid: str, info: dict) -> dict: ...


class PushHooks(Protocol):
    """What the gate hands to the push engine (injected by tap.py; see design.md §2)."""

    def config_relayed(self, distid: str, sa_certificate: str | None, peer: str) -> None: ...

    def confirmation_started(
        self, distid: str, method: str, push_endpoint: str | None, confirmation_id: int,
        peer: str,
    ) -> None: ...

    async def done_request(self, request: ArmsRequest, raw: bytes, peer: str) -> int:
        """Commit the done and return the result code to answer, or raise to not answer."""
        ...


class NoPushEngine:
    """Stand-in until a push engine is wired: pulls work, done-requests are refused."""

    def config_relayed(self, distid: str, sa_certificate: str | None, peer: str) -> None:
        pass

    def confirmation_started(
        self, distid: str, method: str, push_endpoint: str | None, confirmation_id: int,
        peer: str,
    ) -> None:
        pass

    async def done_request(self, request: ArmsRequest, raw: bytes, peer: str) -> int:
        raise NotImplementedError("no push engine is configured to take done-requests")


@dataclass(slots=True)
class RelaySettings:
    public_urls: list[str]  # our SA-gate URLs, handed out as rs-pull-server-url
    default_methods: list[str] = field(default_factory=lambda: ["https-simple"])
    tunnel_urls: list[str] = field(default_factory=list)
    echo_interval: int = 60


class Unauthorized(Exception):
    pass


def basic_credentials(header: str | None) -> tuple[str, str]:
    """``Authorization: Basic`` -> (distid, key). Scheme matched case-insensitively (§14)."""
    if not header:
        raise Unauthorized("missing Authorization header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        raise Unauthorized("Authorization is not Basic")
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Unauthorized("malformed Basic credentials") from None
    user, sep, key = decoded.partition(":")
    if not sep:
        raise Unauthorized("Basic credentials without ':'")
    if not is_distid(user):
        raise Unauthorized("Basic user is not a distribution id")
    return user, key


class PullRelay:
    log = Logger()

    def __init__(
        self,
        *,
        rs: RS,
        keys: KeyChecker,
        settings: RelaySettings,
        clock: IReactorTime,
        hooks: PushHooks | None = None,
        relay_budget: float = 20.0,
        max_body: int = 1024 * 1024,
    ) -> None:
        self.rs = rs
        self.keys = keys
        self.settings = settings
        self.clock = clock
        self.hooks: PushHooks = hooks or NoPushEngine()
        self.relay_budget = relay_budget
        self.max_body = max_body
        self.stats: Counter[str] = Counter()
        # The echo interval each SA was told (the RS may choose it per SA): its tunnels'
        # watchdogs must use the same one.
        self.echo_intervals: dict[str, int] = {}

    # -- entry ------------------------------------------------------------------------------
    async def handle(self, request: GateRequest) -> bytes:
        try:
            distid, key = basic_credentials(request.header("Authorization"))
        except Unauthorized as e:
            return self._unauthorized(request, str(e))
        cached = getattr(self.keys, "matches_cached", None)
        try:
            known = (cached is not None and cached(distid, key)) or \
                await self._within_budget(self.keys.check(distid, key), request)
        except (RSError, defer.TimeoutError) as e:
            self.stats["rs.unavailable"] += 1
            self.log.error("SA gate: cannot check the key of {distid}: RS unavailable ({e})",
                           distid=distid, e=e)
            return build_http_error(503, extra_headers=(("Retry-After", "60"),))
        if not known:
            return self._unauthorized(request, f"unknown distribution id or wrong key for {distid}")
        try:
            message = parse_message(request.body, max_bytes=self.max_body, ascii_text=True)
        except MessageError as e:
            self.stats[f"rejected.{e.reason}"] += 1
            self.log.warn("SA gate: 400 to {distid} at {peer}: {e}",
                          distid=distid, peer=request.peer, e=e)
            return build_http_error(400)
        if not isinstance(message, ArmsRequest):
            self.stats["rejected.not_a_request"] += 1
            self.log.warn("SA gate: 400 to {distid}: an arms-response is not a request",
                          distid=distid)
            return build_http_error(400)
        if message.distribution_id != distid:
            self.stats["rejected.distid_mismatch"] += 1
            self.log.warn(
                "SA gate: 403 to {peer}: authenticated as {distid} but the message is for "
                "{other!r}", peer=request.peer, distid=distid, other=message.distribution_id,
            )
            return build_http_error(403)
        return await self._dispatch(distid, message, request)

    def _unauthorized(self, request: GateRequest, reason: str) -> bytes:
        self.stats["rejected.unauthorized"] += 1
        self.log.warn("SA gate: 401 to {peer}: {reason}", peer=request.peer, reason=reason)
        return build_http_error(401, extra_headers=(("WWW-Authenticate", 'Basic realm="arms"'),))

    async def _dispatch(self, distid: str, message: ArmsRequest, request: GateRequest) -> bytes:
        type_ = message.type
        self.stats[f"request.{type_}"] += 1
        if type_ == "config-solicitation":
            return await self._relayed(distid, message, request, self._config_solicitation)
        if type_ == "push-method-query":
            return await self._relayed(distid, message, request, self._push_method_query)
        if type_ == "push-confirmation-start":
            return await self._relayed(distid, message, request, self._push_confirmation_start)
        if is_done_type(type_):
            return await self._done_request(distid, message, request)
        self.stats["rejected.unknown_type"] += 1
        self.log.warn("SA gate: 400 to {distid}: type {type!r} is not served here",
                      distid=distid, type=type_)
        return build_http_error(400)

    async def _within_budget(self, awaitable: object, request: GateRequest) -> object:
        d = defer.ensureDeferred(awaitable)  # type: ignore[arg-type]
        if d.called:  # done at once (a cached key): no timer to set and cancel
            return await d
        remaining = self.relay_budget - (self.clock.seconds() - request.received_at)
        d.addTimeout(max(remaining, 0.0), self.clock)
        return await d

    async def _relayed(self, distid: str, message: ArmsRequest, request: GateRequest,
                       relay: object) -> bytes:
        """Run one RS relay; any failure of armsproxy's side becomes 301 (retry later).

        A relay returns its answer as a message, or already serialised (and guarded) when it
        had to serialise before a side effect: each answer is serialised once."""
        try:
            work = relay(distid, message, request)  # type: ignore[operator]
            limit = getattr(self.rs, "call_timeout", None)
            if type(limit) in (int, float) and \
                    limit <= self.relay_budget - (self.clock.seconds() - request.received_at):
                # Each relay makes one RS call, over by ``limit`` whatever the RS does,
                # before the budget would be: the budget's own timer could never fire.
                response = await work
            else:
                response = await self._within_budget(work, request)
            body = response if isinstance(response, bytes) else serialise(response)
            return build_sa_response(body)
        except (RSError, defer.TimeoutError) as e:
            self.stats["rs.unavailable"] += 1
            self.log.error("SA gate: RS failed for {type} of {distid}: {e!r}; answering 301",
                           type=message.type, distid=distid, e=e)
        except RSAnswerError as e:
            self.stats["rs.bad_answer"] += 1
            self.log.error("SA gate: unusable RS answer for {type} of {distid}: {e}; "
                           "answering 301", type=message.type, distid=distid, e=e)
        except UnsafeMessageError as e:
            self.stats["refused.unsafe_answer"] += 1
            self.log.error(
                "SA gate: refusing to send {type} answer to {distid}, it would break the "
                "device: {problems}; answering 301",
                type=message.type, distid=distid, problems="; ".join(e.problems),
            )
        return build_sa_response(serialise(self._busy(message)))

    def _busy(self, message: ArmsRequest) -> ArmsResponse:
        return ArmsResponse(type=message.type, result_code=codes.SERVER_BUSY,
                            description=codes.label(codes.SERVER_BUSY), body=Empty())

    # -- the three pulls --------------------------------------------------------------------
    async def _config_solicitation(self, distid: str, message: ArmsRequest,
                                   request: GateRequest) -> ArmsResponse | bytes:
        body = message.body if isinstance(message.body, ConfigSolicitationRequest) else None
        info = {
            "trigger": body.trigger if body else "",
            "protocol_version": body.protocol_version if body else "",
            "firmware_info": (body.firmware_info or "") if body else "",
            "description": message.description or "",
            "peer": request.peer,
        }
        answer = await self.rs.config_solicitation(distid, info)
        code = result_code(answer, "arms.config_solicitation answer")
        if not codes.is_success(code):
            return self._declined(distid, message, code)
        response_body = config_solicitation_body(answer, self.settings.public_urls)
        response = ArmsResponse(type=message.type, result_code=code, description="OK",
                                body=response_body)
        # Serialised (and guarded) here, once: UnsafeMessageError comes before the side
        # effect below, and _relayed sends these very bytes.
        serialised = serialise(response)
        self.hooks.config_relayed(distid, response_body.sa_certificate, request.peer)
        return serialised

    def _declined(self, distid: str, message: ArmsRequest, code: int) -> ArmsResponse:
        """The RS's own non-success code for a pull, relayed as it is; counted
        (``rs.declined``), logged at debug only: it is the RS's decision, not a failure."""
        self.stats["rs.declined"] += 1
        self.log.debug("SA gate: RS answered {type} of {distid} with {code}",
                       type=message.type, distid=distid, code=code)
        return ArmsResponse(type=message.type, result_code=code,
                            description=codes.label(code), body=Empty())

    async def _push_method_query(self, distid: str, message: ArmsRequest,
                                 request: GateRequest) -> ArmsResponse:
        offered = message.body.methods if isinstance(message.body, PushMethodQueryRequest) else []
        answer = await self.rs.push_method_query(
            distid, {"methods": list(offered), "peer": request.peer}
        )
        code = result_code(answer, "arms.push_method_query answer")
        if not codes.is_success(code):
            return self._declined(distid, message, code)
        rs_answer = push_method_answer(answer)
        preferred = rs_answer.methods or self.settings.default_methods
        tunnel_urls = rs_answer.tunnel_urls or list(self.settings.tunnel_urls)
        methods: list[str] = []
        for m in preferred:  # the RS's order, only what the SA offered, each once
            if m in offered and m in PUSH_METHODS and m not in methods:
                methods.append(m)
        if "https-tunnel" in methods and not tunnel_urls:
            methods.remove("https-tunnel")
            self.log.warn("SA gate: https-tunnel preferred for {distid} but no tunnel URL is "
                          "configured; not offered", distid=distid)
        if not methods:
            raise RSAnswerError(
                f"no push method in common: the SA offers {offered}, preference is {preferred}"
            )
        echo = None
        if "https-tunnel" in methods:
            echo = rs_answer.echo_interval or self.settings.echo_interval
            self.echo_intervals[distid] = echo
        return ArmsResponse(
            type=message.type, result_code=code, description="OK",
            body=PushMethodQueryResponse(
                methods=methods,
                tunnel_urls=tunnel_urls if "https-tunnel" in methods else [],
                echo_interval=echo,
            ),
        )

    async def _push_confirmation_start(self, distid: str, message: ArmsRequest,
                                       request: GateRequest) -> ArmsResponse:
        body = message.body if isinstance(message.body, PushConfirmationStartRequest) else None
        method = body.push_method if body else ""
        endpoint = body.push_endpoint if body else None
        answer = await self.rs.push_confirmation(
            distid, {"method": method, "push_endpoint": endpoint or "", "peer": request.peer}
        )
        code = result_code(answer, "arms.push_confirmation answer")
        if not codes.is_success(code):
            return self._declined(distid, message, code)
        confirmation_id = secrets.randbelow(2**31 - 1) + 1
        response = ArmsResponse(type=message.type, result_code=code, description="OK",
                                transaction_id=confirmation_id, body=Empty())
        self.hooks.confirmation_started(distid, method, endpoint, confirmation_id, request.peer)
        return response

    def echo_interval_for(self, distid: str | None) -> int:
        return self.echo_intervals.get(distid or "", self.settings.echo_interval)

    async def confirmation_start(self, distid: str, message: ArmsRequest,
                                 peer: str) -> ArmsResponse:
        """push-confirmation-start arriving on a tunnel: relayed like the https-simple one."""
        request = GateRequest(method="POST", target="", version="HTTP/1.1", headers=[],
                              body=b"", peer=peer, received_at=self.clock.seconds())
        self.stats[f"request.{message.type}"] += 1
        try:
            response = await self._within_budget(
                self._push_confirmation_start(distid, message, request), request)
        except (RSError, defer.TimeoutError, RSAnswerError) as e:
            self.stats["rs.unavailable"] += 1
            self.log.error("SA gate: RS failed for tunnel confirmation of {distid}: {e!r}; "
                           "answering 301", distid=distid, e=e)
            return self._busy(message)
        assert isinstance(response, ArmsResponse)
        return response

    # -- done-requests (second half of 2-way pushes) ------------------------------------------
    async def _done_request(self, distid: str, message: ArmsRequest,
                            request: GateRequest) -> bytes:
        try:
            code = await self.hooks.done_request(message, request.body, request.peer)
        except NotImplementedError as e:
            self.stats["done.refused"] += 1
            self.log.error("SA gate: {type} from {distid} not taken: {e}",
                           type=message.type, distid=distid, e=e)
            return build_http_error(503)
        except defer.CancelledError:
            raise
        except Exception as e:
            self.stats["done.not_committed"] += 1
            self.log.error(
                "SA gate: {type} {tid} from {distid} could not be committed ({e!r}); not "
                "answering, so the SA keeps the transaction", type=message.type,
                tid=message.transaction_id, distid=distid, e=e)
            raise NoAnswer() from e
        response = ArmsResponse(type=message.type, result_code=code, description="OK",
                                transaction_id=message.transaction_id, body=Empty())
        return build_sa_response(serialise(response))
