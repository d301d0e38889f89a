"""The RS gate's listener: endpoint string in, an HTTP(S) site serving the XML-RPC resource out.

The RS gate can push configurations to every device, so its listener is the trust boundary
(design.md §3): loopback TCP (the default), a unix socket readable only by the owner, or TLS
where the RS must show a client certificate from the configured CA. Anything weaker is allowed
only with a warning in the log. Request bodies are bounded, so a caller cannot make the gate
buffer an unbounded upload; connections are capped and each call must be answered within
``request_timeout`` (armsproxy.limits), so a caller cannot hold the gate's descriptors either.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages, server
from twisted.web.resource import IResource, Resource

from ..limits import DeadlineSite, DescriptorBudget, ListenerLimit, limited
from ..tls import (
    ListenerConfigError,
    TLSListener,
    load_pem_chain,
    load_pem_key,
    server_endpoint,
    split_endpoint,
    ssl_error_text,
    tcp_description,
    trust_store_certificates,
)

log = Logger()

DEFAULT_LISTEN = "tcp:8780:interface=127.0.0.1"
DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 64
# Seconds from a connection's start, or the end of the previous answer, to the end of the next.
DEFAULT_REQUEST_TIMEOUT = 60.0
UNIX_DEFAULT_MODE = "600"  # Twisted's own default (666) would let any local user push
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_TOO_LARGE = (b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n"
              b"Connection: close\r\n\r\n")


class _BoundedRequest(server.Request):
    """A request whose body may not exceed the site's ``max_body`` (declared or chunked)."""

    _over_limit = False
    _body_seen = 0

    def _limit(self) -> int:
        return int(getattr(self.channel.site, "max_body", DEFAULT_MAX_BODY))

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._reject(f"declared body of {length} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._over_limit:
            return
        self._body_seen += len(data)
        if self._body_seen > self._limit():
            self._reject(f"body of more than {self._body_seen} bytes")
            return
        super().handleContentChunk(data)

    def _reject(self, what: str) -> None:
        # The request was not received yet, so the normal response path is not open; answer
        # the way Twisted answers a malformed request: a fixed response, then close.
        self._over_limit = True
        received = getattr(self, "content", None)
        if received is not None:
            received.close()  # a chunked body's is a temporary file: give its descriptor back
        self.content = BytesIO()
        channel = self.channel
        log.warn("rs gate: {peer}: {what} is over the {limit} byte limit; answered 413",
                 peer=str(channel.transport.getPeer()), what=what, limit=self._limit())
        channel.transport.write(_TOO_LARGE)
        channel.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._over_limit:
            return  # already answered 413; the connection is closing
        super().requestReceived(command, path, version)


class RSGateSite(DeadlineSite):
    """The HTTP site of the RS gate; ``max_body`` bounds every request body, ``request_timeout``
    the time to send a call and get its answer (and to sit idle before the next)."""

    requestFactory = _BoundedRequest

    def __init__(self, root: IResource, *, max_body: int = DEFAULT_MAX_BODY,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT, reactor: Any = None) -> None:
        super().__init__(root, request_timeout=request_timeout, listener_name="rs gate",
                         reactor=reactor, parsePOSTFormSubmission=False)
        self.max_body = max_body
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: server.Request) -> None:
        """No access-log line per call: the gate logs orders and faults itself, and a poll
        loop's access lines cost more CPU than the polls (bench/push.py profile)."""


class _Root(Resource):
    def getChild(self, path: bytes, request: server.Request) -> IResource:
        return pages.notFound()  # the default NoResource page is deprecated


def make_rs_gate_site(gate: IResource, *, max_body: int = DEFAULT_MAX_BODY,
                      request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                      reactor: Any = None) -> RSGateSite:
    """The XML-RPC resource at ``/RPC2`` (the conventional path) and at ``/``; else 404."""
    root = _Root()
    root.putChild(b"", gate)
    root.putChild(b"RPC2", gate)
    return RSGateSite(root, max_body=max_body, request_timeout=request_timeout,
                      reactor=reactor)


class RSGateService(service.Service):
    """Listens while running; :meth:`when_listening` gives the port (tests listen on 0)."""

    def __init__(self, endpoint: IStreamServerEndpoint, site: server.Site,
                 description: str) -> None:
        self.endpoint = endpoint
        self.site = site
        self.description = description
        self.port: IListeningPort | None = None
        self._failure: Failure | None = None
        self._listening: defer.Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()  # privileged: a unix socket under /run or a port below 1024

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        self._failure = None
        d = self.endpoint.listen(self.site)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            log.info("rs gate: listening on {listen}", listen=self.description)
            return port

        def failed(reason: Failure) -> None:
            log.failure("rs gate: cannot listen on {listen}", reason,
                        listen=self.description)
            self._failure = reason

        d.addCallbacks(listening, failed)
        self._listening = d  # when_listening() reports the failure; stopService copes
        if self._failure is not None:  # could not bind: stop the start, as the other gates do
            self._failure.raiseException()

    def when_listening(self) -> defer.Deferred[IListeningPort]:
        """Fires with the listening port (fails if listening failed); start the service first."""
        if self._listening is None:
            raise RuntimeError("the RS gate service is not started")
        result: defer.Deferred[IListeningPort] = defer.Deferred()

        def relay(port: IListeningPort | None) -> IListeningPort | None:
            # A copy for the caller: the service's own Deferred keeps the port for stopService.
            if port is None:
                result.errback(self._failure or Failure(RuntimeError("not listening")))
            else:
                result.callback(port)
            return port

        self._listening.addCallback(relay)
        return result

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d, self._listening, self.port = self._listening, None, None
        if d is None:
            return defer.succeed(None)
        d.addCallback(lambda port: None if port is None else port.stopListening())
        return d


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ListenerConfigError(f"RS gate listener: cannot read {what} {path!r}: "
                                  f"{e.strerror}") from None


def tls_options(cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None,
                client_ca_pem: bytes | None, *,
                require_client_certificate: bool = True) -> ssl.CertificateOptions:
    """TLS 1.2+ server options; with a client CA, callers' certificates are verified.

    ``armsproxy.tls.TLSPolicy`` only *requests* a certificate (SAs may have none, §2.1); the
    RS has no such excuse, so here it is required unless explicitly turned off.
    """
    if require_client_certificate and not client_ca_pem:
        raise ListenerConfigError(
            "RS gate over TLS requires client certificates: configure the CA that issues "
            "the RS's client certificate"
        )
    try:
        # A certificate file may hold its chain after it, and a key file its certificate.
        certificate, *chain = load_pem_chain(cert_pem)
        chain += load_pem_chain(chain_pem) if chain_pem else []
        private_key = load_pem_key(key_pem)
        client_cas = trust_store_certificates(load_pem_chain(client_ca_pem)) \
            if client_ca_pem else []
        kwargs: dict[str, Any] = {}
        if client_cas:
            kwargs.update(verify=True, caCerts=client_cas,
                          requireCertificate=require_client_certificate)
        options = ssl.CertificateOptions(
            privateKey=private_key, certificate=certificate, extraCertChain=chain,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **kwargs,
        )
        options.getContext()  # build it now: a key that does not fit fails at startup
    except SSL.Error as e:
        raise ListenerConfigError(
            f"RS gate listener: unusable certificate or key: {ssl_error_text(e)}") from None
    except (ValueError, TypeError) as e:  # ListenerConfigError included; TypeError: key type
        raise ListenerConfigError(f"RS gate listener: unusable certificate or key: {e}") \
            from None
    return options


def rs_gate_endpoint(reactor: Any, listen: str, *, tls_client_ca: bytes | None = None,
                     require_client_certificate: bool = True) -> IStreamServerEndpoint:
    """The listening endpoint for an RS gate endpoint string (see :func:`rs_gate_service`)."""
    spec = split_endpoint(listen)
    if spec.kind == "ssl":
        if not spec.args and "port" not in spec.kwargs:
            raise ListenerConfigError(f"RS gate listener {listen!r}: no port")
        port = spec.kwargs.pop("port", None) or spec.args[0]
        key_path = spec.kwargs.pop("privateKey", None)
        if not key_path:
            raise ListenerConfigError(f"RS gate listener {listen!r}: privateKey= is required")
        cert_path = spec.kwargs.pop("certKey", None) or key_path
        chain_path = spec.kwargs.pop("extraCertChain", None)
        options = tls_options(
            _read(cert_path, "certificate"), _read(key_path, "private key"),
            _read(chain_path, "certificate chain") if chain_path else None,
            tls_client_ca, require_client_certificate=require_client_certificate,
        )
        if not require_client_certificate:
            log.warn("rs gate: TLS on {listen} without required client certificates: anyone "
                     "who can connect can push to every device", listen=listen)
        tcp = tcp_description(port, spec.kwargs)
        return TLSListener(endpoint=server_endpoint(reactor, tcp, "RS gate listener", listen),
                           options=options)
    if tls_client_ca is not None:
        log.warn("rs gate: a client CA is configured but {listen} is not an ssl: listener; "
                 "it is not used", listen=listen)
    if spec.kind in ("tcp", "tcp6"):
        interface = spec.kwargs.get("interface", "0.0.0.0")
        if interface not in _LOOPBACK and not interface.startswith("127."):
            log.warn("rs gate: plain TCP on {interface} without TLS or authentication: anyone "
                     "who can connect can push to every device; use a loopback interface, a "
                     "unix socket or ssl: with client certificates", interface=interface)
    if spec.kind == "unix" and "mode" not in spec.kwargs:
        listen += f":mode={UNIX_DEFAULT_MODE}"
    return server_endpoint(reactor, listen, "RS gate listener")


def rs_gate_service(
    reactor: Any,
    listen: str,
    resource: IResource,
    *,
    tls_client_ca: bytes | None = None,
    require_client_certificate: bool = True,
    max_body: int = DEFAULT_MAX_BODY,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    budget: DescriptorBudget | None = None,
) -> RSGateService:
    """The RS gate as a service: ``resource`` (an :class:`RSGate`) at ``/RPC2`` and ``/``.

    ``listen`` is a Twisted endpoint string:

    * ``tcp:8780:interface=127.0.0.1`` (the default; a non-loopback interface is warned about);
    * ``unix:/run/armsproxy/rs.sock[:mode=600]`` (mode defaults to 600, not Twisted's 666);
    * ``ssl:PORT:privateKey=K[:certKey=C][:extraCertChain=X][:interface=I]``: TLS 1.2+, and
      the caller must present a certificate issued by ``tls_client_ca`` (PEM), refused at the
      handshake otherwise; ``require_client_certificate=False`` drops that (with a warning).

    At most ``max_connections`` connections are open at once; with a ``budget``, none is
    accepted while fewer than its reserve of descriptors is free (they are for the devices).
    Each call must be answered within ``request_timeout`` of the connection's start or of the
    previous answer, however its bytes trickle in.

    Raises :class:`~armsproxy.tls.ListenerConfigError` for a description it cannot use.
    """
    endpoint = rs_gate_endpoint(reactor, listen, tls_client_ca=tls_client_ca,
                                require_client_certificate=require_client_certificate)
    limit = (budget.listener("rs gate", max_connections) if budget is not None
             else ListenerLimit("rs gate", max_connections, clock=reactor))
    site = make_rs_gate_site(resource, max_body=max_body, request_timeout=request_timeout,
                             reactor=reactor)
    return RSGateService(limited(endpoint, limit), site, listen)
