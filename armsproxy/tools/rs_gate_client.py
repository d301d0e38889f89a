"""A blocking XML-RPC client of the RS gate for ``armsproxyctl``: the address comes from the
proxy's own configuration (``[rs_gate] listen``) so the operator types nothing twice.

The gate listens on plain TCP (loopback), a unix socket, or TLS that requires a client
certificate; the standard library speaks the first and the last, and a small transport adds
the unix socket. Failures become one-line ``GateError`` messages that say where the address
came from, because "connection refused" alone does not tell an operator which file to fix.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from .. import config as armsproxy_config
from ..tls import split_endpoint

DEFAULT_CONFIG = Path("/etc/armsproxy/armsproxy.conf")
CONFIG_ENV = "ARMSPROXY_CONFIG"
RPC_PATH = "/RPC2"
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class GateError(Exception):
    """A call could not be made or was refused; the message is one line for the operator."""


class GateFault(GateError):
    """The gate answered with an XML-RPC fault (400 bad call, 404 unknown id, 410 forgotten...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class GateTarget:
    """Where the RS gate is, and where that address came from (for error messages)."""

    url: str  # http(s)://host:port/RPC2; for a unix socket http://localhost/RPC2
    origin: str  # "[rs_gate] listen in /etc/armsproxy/armsproxy.conf", "--rs-gate"
    unix_path: str | None = None

    @property
    def where(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else self.url

    @property
    def tls(self) -> bool:
        return self.url.startswith("https:")


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """Files for a TLS gate: the CA of its certificate and the client certificate it requires."""

    ca: Path | None = None  # None: the system's trusted CAs
    client_cert: Path | None = None  # PEM with the certificate (and the key, unless client_key)
    client_key: Path | None = None


def _host(interface: str) -> str:
    host = _WILDCARDS.get(interface, interface)
    return f"[{host}]" if ":" in host else host


def parse_address(text: str, origin: str) -> GateTarget:
    """An http(s) URL, or a Twisted endpoint string as ``[rs_gate] listen`` holds it."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        parts = urlsplit(text)
        if not parts.hostname:
            raise GateError(f"{origin}: {text!r} has no host")
        path = parts.path if parts.path not in ("", "/") else RPC_PATH
        return GateTarget(url=f"{parts.scheme}://{parts.netloc}{path}", origin=origin)
    spec = split_endpoint(text)
    if spec.kind == "unix":
        path = spec.kwargs.get("address") or (spec.args[0] if spec.args else "")
        if not path:
            raise GateError(f"{origin}: {text!r} names no socket path")
        return GateTarget(url=f"http://localhost{RPC_PATH}", origin=origin, unix_path=path)
    if spec.kind in ("tcp", "ssl"):
        # The listener's form (tcp:PORT:interface=IP) or a client's (tcp:HOST:PORT, host=).
        client_form = len(spec.args) >= 2
        port = spec.kwargs.get("port") or (spec.args[-1] if spec.args else "")
        if not port.isdigit() or int(port) == 0:
            raise GateError(f"{origin}: {text!r} names no port to connect to")
        scheme = "https" if spec.kind == "ssl" else "http"
        host = _host(spec.kwargs.get("host") or (spec.args[0] if client_form else "")
                     or spec.kwargs.get("interface", ""))
        return GateTarget(url=f"{scheme}://{host}:{port}{RPC_PATH}", origin=origin)
    raise GateError(f"{origin}: cannot connect to {text!r}: use tcp:, unix:, ssl: or an "
                    "http(s):// URL")


def resolve_target(*, rs_gate: str | None, config_path: Path) -> GateTarget:
    """``--rs-gate`` if given, else ``[rs_gate] listen`` of the configuration file."""
    if rs_gate:
        return parse_address(rs_gate, "--rs-gate")
    try:
        cfg = armsproxy_config.load(config_path)
    except armsproxy_config.ConfigError as e:
        first, *rest = str(e).splitlines()
        detail = "; ".join(line.strip() for line in rest)
        raise GateError(f"{first} {detail}".strip() + " (pass --config FILE or --rs-gate "
                        "ADDRESS)") from None
    return parse_address(cfg.rs_gate_listen, f"[rs_gate] listen in {config_path}")


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket: the gate's ``unix:`` listener."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _Transport(xmlrpc.client.Transport):
    """Plain HTTP with a timeout (the stdlib transport waits forever)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


class _SafeTransport(xmlrpc.client.SafeTransport):
    """HTTPS with our context (CA, client certificate) and a timeout."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(context=context)
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


class _UnixTransport(xmlrpc.client.Transport):
    """HTTP over the gate's unix socket; kept in ``_connection`` so ``close()`` closes it."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            cached: http.client.HTTPConnection = self._connection[1]
            return cached
        conn = _UnixHTTPConnection(self.path, self.timeout)
        self._connection = host, conn
        return conn


def tls_context(files: ClientTLS) -> ssl.SSLContext:
    """A client context verifying the gate and presenting the client certificate."""
    try:
        context = ssl.create_default_context(
            cafile=str(files.ca) if files.ca is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise GateError(f"--ca {files.ca}: cannot use it: {_reason(e)}") from None
    if files.client_cert is not None:
        try:
            context.load_cert_chain(
                str(files.client_cert),
                str(files.client_key) if files.client_key is not None else None)
        except (OSError, ssl.SSLError) as e:
            raise GateError(f"--client-cert {files.client_cert}: cannot use it: {_reason(e)}"
                            ) from None
    return context


def _reason(e: OSError) -> str:
    if isinstance(e, ssl.SSLError):
        return str(e.reason or e)
    return e.strerror or str(e)


class RSGateClient:
    """One RS gate session (``with RSGateClient(...) as gate: gate.call("push.list", {})``)."""

    def __init__(self, target: GateTarget, *, tls: ClientTLS | None = None,
                 timeout: float = 30.0) -> None:
        self.target = target
        transport: xmlrpc.client.Transport
        if target.unix_path is not None:
            transport = _UnixTransport(target.unix_path, timeout)
        elif target.tls:
            transport = _SafeTransport(tls_context(tls or ClientTLS()), timeout)
        else:
            transport = _Transport(timeout)
        self._tls = tls
        self._proxy = xmlrpc.client.ServerProxy(target.url, transport=transport)

    def __enter__(self) -> RSGateClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._proxy("close")()

    def _hint(self) -> str:
        """A TLS gate that drops us is most often one that wanted a client certificate."""
        if self.target.tls and (self._tls is None or self._tls.client_cert is None):
            return (" (the gate requires a client certificate issued by its [rs_gate] "
                    "client_ca: --client-cert PEM)")
        return ""

    def call(self, method: str, *args: Any) -> Any:
        """Call ``method``; every failure is a GateError with a one-line message."""
        where = f"the RS gate at {self.target.where} (from {self.target.origin})"
        try:
            return getattr(self._proxy, method)(*args)
        except xmlrpc.client.Fault as e:
            raise GateFault(e.faultCode, str(e.faultString)) from None
        except xmlrpc.client.ProtocolError as e:
            raise GateError(f"{where} answered HTTP {e.errcode} {e.errmsg}") from None
        except ssl.SSLCertVerificationError as e:
            raise GateError(f"{where}: its certificate is not trusted: "
                            f"{e.verify_message or _reason(e)} (--ca PEM names the CA that "
                            "issued it)") from None
        except ssl.SSLError as e:
            raise GateError(f"TLS with {where} failed: {_reason(e)}{self._hint()}") from None
        except ConnectionRefusedError:
            raise GateError(f"cannot connect to {where}: connection refused (is armsproxy "
                            "running?)") from None
        except FileNotFoundError:
            raise GateError(f"cannot connect to {where}: no such socket (is armsproxy "
                            "running?)") from None
        except TimeoutError:
            raise GateError(f"{where} did not answer in time") from None
        except (OSError, http.client.HTTPException) as e:
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise GateError(f"cannot talk to {where}: {detail or type(e).__name__}"
                            f"{self._hint()}") from None
        except xmlrpc.client.ResponseError as e:
            raise GateError(f"{where} sent an unreadable answer: {e}") from None


__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "ClientTLS",
    "GateError",
    "GateFault",
    "GateTarget",
    "RSGateClient",
    "parse_address",
    "resolve_target",
    "tls_context",
]
