"""Shared test fixtures: a test PKI, an SA gate on loopback TLS, log capture, a raw TLS client.

The raw client is blocking stdlib ``ssl`` run in a thread (``await sa_exchange(...)``): it sends
exact bytes, can pause between pieces, and records every TLS read separately. Python's
``SSLSocket.recv`` returns the data of at most one TLS record, so ``Exchange.reads`` shows how
the server framed its answer on the wire.
"""

from __future__ import annotations

import http.client
import importlib
import socket
import ssl
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from twisted.internet import reactor, threads
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import formatEvent, globalLogPublisher

from armsproxy.tls import TLSPolicy, load_pem_chain, load_pem_key, tls_listener

# The throwaway PostgreSQL server (pg_cluster, pg_dsn) for the PostgreSQL store's tests.
pytest_plugins = ["pgserver"]

# twisted.web.xmlrpc subclasses the deprecated twisted.web.http.HTTPClient (twisted#12172), so
# importing it warns on Twisted >= 24.7 whatever imports it. Import it once, that warning
# silenced, so ``-W error::DeprecationWarning`` still catches our own.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"twisted\.web\.http\.HTTPClient was deprecated",
                            DeprecationWarning)
    importlib.import_module("twisted.web.xmlrpc")

# ---------------------------------------------------------------------------------------------
# PKI
# ---------------------------------------------------------------------------------------------


@dataclass
class GatePKI:
    """A CA (the ``rs-certificate`` CA of §2.1), the gate's certificate and an SA certificate."""

    ca: trustme.CA
    server: trustme.LeafCert  # for 127.0.0.1
    client: trustme.LeafCert  # an SA certificate from the same CA
    key_path: Path
    cert_path: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def endpoint(self, port: int = 0) -> str:
        """An SA gate listener string as operators write it (``ssl:`` endpoint)."""
        key = str(self.key_path).replace("\\", "\\\\").replace(":", "\\:")
        cert = str(self.cert_path).replace("\\", "\\\\").replace(":", "\\:")
        return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"


@pytest.fixture(scope="session")
def gate_pki(tmp_path_factory) -> GatePKI:
    # RSA: old device OpenSSL builds may lack ECDSA (§2.1), and TLS 1.0 tests need RSA suites.
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    server = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    client = ca.issue_cert("sa.invalid", common_name="test SA", key_type=trustme.KeyType.RSA)
    folder = tmp_path_factory.mktemp("gate-pki")
    key_path = folder / "server.key"
    cert_path = folder / "server.crt"
    key_path.write_bytes(server.private_key_pem.bytes())
    cert_path.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return GatePKI(ca=ca, server=server, client=client, key_path=key_path, cert_path=cert_path)


def tls_server_options(
    pem: bytes, *, client_ca_pem: bytes | None = None, **kwargs: object
) -> twisted_ssl.CertificateOptions:
    """A test listener's options from one PEM (key and certificate chain, any order) via
    ``cryptography`` objects: ``PrivateCertificate.options()`` would hand pyOpenSSL its own,
    deprecated, X509 and PKey. With ``client_ca_pem`` a client certificate is required."""
    certificate, *chain = load_pem_chain(pem)
    if client_ca_pem is not None:
        kwargs["trustRoot"] = twisted_ssl.Certificate.loadPEM(client_ca_pem)
    return twisted_ssl.CertificateOptions(
        privateKey=load_pem_key(pem), certificate=certificate, extraCertChain=chain, **kwargs
    )


async def start_gate(
    factory: Factory, pki: GatePKI, policy: TLSPolicy | None = None
) -> IListeningPort:
    """Listen with ``factory`` behind the SA gate's TLS (armsproxy.tls) on 127.0.0.1:0."""
    listener = tls_listener(reactor, pki.endpoint(0), policy or TLSPolicy())
    return await listener.listen(factory)


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


class LogCapture:
    """Every twisted.logger event while the test runs."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def lines(self, level: str | None = None) -> list[str]:
        out = []
        for event in self.events:
            if level is not None and event.get("log_level") is not None:
                if event["log_level"].name != level:
                    continue
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += "\n" + failure.getTraceback()
            out.append(text)
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def find(self, *needles: str, level: str | None = None) -> list[str]:
        return [line for line in self.lines(level) if all(n in line for n in needles)]


@pytest.fixture
def logs():
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


# ---------------------------------------------------------------------------------------------
# Raw TLS client
# ---------------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """What a raw client saw on one connection."""

    reads: list[bytes] = field(default_factory=list)  # one entry per TLS read (= TLS record)
    eof: bool = False  # the server closed the connection (clean or not)
    error: str | None = None  # the exception that ended the connection, if any
    tls_version: str | None = None
    sent: int = 0  # bytes actually handed to TLS by the client
    elapsed: float = 0.0  # seconds from TCP connect to the end of reading
    peer_cert_der: bytes | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.reads)

    @property
    def head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[0]

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/"):
            return None
        return int(self.data.split(b" ", 2)[1])

    @property
    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("ascii").split("\r\n")[1:]
        return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


Step = bytes | float  # bytes: send them; float: sleep that long


def tls_exchange(
    port: int,
    steps: Sequence[Step],
    *,
    ca_pem: bytes,
    client_cert: trustme.LeafCert | None = None,
    tls_version: ssl.TLSVersion | None = None,
    read: bool = True,
    timeout: float = 10.0,
) -> Exchange:
    """Blocking: connect, run ``steps``, then read until the server closes (or ``timeout``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    if tls_version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = tls_version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client *offer* old versions
    if client_cert is not None:
        client_cert.configure_cert(context)
    result = Exchange()
    started = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn: ssl.SSLSocket | None = None
    try:
        conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
        result.tls_version = conn.version()
        result.peer_cert_der = conn.getpeercert(binary_form=True)
        for step in steps:
            if isinstance(step, float):
                time.sleep(step)
            else:
                conn.sendall(step)
                result.sent += len(step)
        if not read:
            return result
        while True:
            data = conn.recv(65536)
            if not data:
                result.eof = True
                break
            result.reads.append(data)
    except (OSError, ssl.SSLError) as e:
        result.error = f"{type(e).__name__}: {e}"
        result.eof = not isinstance(e, TimeoutError)
    finally:
        result.elapsed = time.monotonic() - started
        (conn or raw).close()
    return result


async def sa_exchange(port: int, steps: Sequence[Step], **kwargs: object) -> Exchange:
    """``tls_exchange`` in a thread, so the reactor keeps serving while the client blocks."""
    return await threads.deferToThread(tls_exchange, port, steps, **kwargs)


# ---------------------------------------------------------------------------------------------
# Plain HTTP client (management gate)
# ---------------------------------------------------------------------------------------------


@dataclass
class HTTPAnswer:
    status: int
    content_type: str
    body: str


def _http_request(port: int, path: str, method: str) -> HTTPAnswer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        body = response.read().decode("utf-8")
        return HTTPAnswer(response.status, response.getheader("content-type") or "", body)
    finally:
        connection.close()


async def http_get(port: int, path: str, method: str = "GET") -> HTTPAnswer:
    """One request over a real TCP connection, from a thread: the reactor keeps serving."""
    return await threads.deferToThread(_http_request, port, path, method)
