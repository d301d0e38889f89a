"""TLS with devices: endpoint strings in, a listening TLS factory out; the one TLS policy.

Operators write listeners as Twisted endpoint strings (``ssl:443:privateKey=...``). Twisted's
own ``ssl:`` parser cannot express a TLS version policy, and real libarms devices speak only
TLS 1.0 (§2.1), which OpenSSL 3 refuses unless the security level is lowered. So we read the
``ssl:`` string ourselves, build ``CertificateOptions`` with the configured policy, and wrap a
plain ``tcp:`` (or ``unix:``) endpoint with ``TLSMemoryBIOFactory``.

A listener may serve an ECDSA certificate beside its RSA one (``ecdsaPrivateKey=``,
``ecdsaCertKey=``), both on one OpenSSL context: OpenSSL picks per client, ECDSA for a client
that offers it (half the server's handshake CPU of RSA-2048), RSA for old devices that offer
only RSA suites (§2.1).

The same :class:`TLSPolicy` governs both directions (§1 rule 1: a device's https-simple
listener speaks TLS 1.0 too): the SA gate and tunnel listener, and the push client's context.
:class:`HandshakeFailures` counts and logs the handshakes with devices that fail, both ways.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1_0,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

# The same versions as OpenSSL protocol numbers (SSL.Context.set_min_proto_version).
OPENSSL_VERSIONS = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}

# OpenSSL 3 disables TLS < 1.2 at security level 1 and above; old devices also need old suites.
LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"


class ListenerConfigError(ValueError):
    """A listener description armsproxy cannot use; the message says why."""


@dataclass(slots=True)
class TLSPolicy:
    """The TLS policy with devices, in both directions: the SA gate and tunnel listener (the
    device connects) and the push client (armsproxy connects to the device's https-simple
    listener). One setting, ``[sa_gate] tls_minimum_version``, because a libarms device speaks
    the same TLS 1.0 either way (§2.1)."""

    minimum_version: str = "1.2"
    client_ca_pem: bytes | None = None  # ask SAs for their certificate (never required, §2.1)
    _warned: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.minimum_version not in TLS_VERSIONS:
            raise ListenerConfigError(
                f"tls_minimum_version {self.minimum_version!r}: use one of "
                f"{sorted(TLS_VERSIONS)}"
            )

    @property
    def legacy(self) -> bool:
        """Below TLS 1.2: OpenSSL needs its security level lowered (``@SECLEVEL=0``)."""
        return TLS_VERSIONS[self.minimum_version] < ssl.TLSVersion.TLSv1_2

    def apply(self, context: SSL.Context) -> None:
        """Put the minimum version (and the security level it needs) on an OpenSSL context,
        a listener's or the push client's: the one place the policy becomes OpenSSL settings."""
        context.set_min_proto_version(OPENSSL_VERSIONS[self.minimum_version])
        if self.legacy:
            context.set_cipher_list(LEGACY_CIPHERS)

    def warn_if_legacy(self) -> None:
        """The startup warning for the TLS < 1.2 opt-in, once per policy however many
        listeners and clients use it."""
        if not self.legacy or self._warned:
            return
        self._warned = True
        log.warn(
            "SA gate accepts TLS {v} and the push client offers it to devices (tls_minimum_"
            "version, an opt-in for real libarms devices, which speak only TLS 1.0): weaker "
            "protocol versions and ciphers (OpenSSL security level 0) are enabled with devices "
            "in both directions", v=self.minimum_version,
        )


@dataclass(slots=True)
class EndpointSpec:
    kind: str
    args: list[str] = field(default_factory=list)
    kwargs: dict[str, str] = field(default_factory=dict)


def endpoint_fields(description: str, *, keep_escapes: bool = False) -> list[str]:
    """An endpoint string's ``:``-separated fields (``\\:`` escapes a colon); with
    ``keep_escapes`` the backslashes stay, so that the fields can be joined back as written."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in description:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
            if not keep_escapes:
                continue
        elif ch == ":":
            fields.append("".join(current))
            current = []
            continue
        current.append(ch)
    fields.append("".join(current))
    return fields


def split_endpoint(description: str) -> EndpointSpec:
    """Split an endpoint string the way Twisted does (``\\:`` escapes a colon)."""
    parts = endpoint_fields(description)
    spec = EndpointSpec(kind=parts[0])
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            spec.kwargs[key] = value
        else:
            spec.args.append(part)
    return spec


def server_endpoint(reactor: object, description: str, what: str,
                    configured: str | None = None) -> IStreamServerEndpoint:
    """``serverFromString``, a description it cannot use reported as
    ``what 'configured': reason`` (``configured``: what the operator wrote, if it was rewritten)."""
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ListenerConfigError(f"{what} {configured or description!r}: {e}") from None
    if listener_hook is not None:  # worker processes share listeners (armsproxy/workers.py)
        endpoint = listener_hook(reactor, description, endpoint)
    return endpoint


# Every listener's plain endpoint passes through here when set: the workers' parent binds
# them for its workers, a worker adopts the ones it inherited (armsproxy/workers.py).
listener_hook: Callable[[Any, str, IStreamServerEndpoint], IStreamServerEndpoint] | None = None


def release_own_unix_lock(description: str) -> bool:
    """Remove a ``unix:`` listener's stale lock that names this very process.

    Twisted locks ``PATH.lock`` (a symlink to the owner's PID) and clears it when that PID is
    dead. After a SIGKILL, a restart that gets the same PID (PID 1 in a container, with the
    socket on a volume) would find the lock "held" by itself and refuse to listen; before
    listening, no lock can really be ours. True if one was removed.
    """
    spec = split_endpoint(description)
    path = spec.kwargs.get("address") or (spec.args[0] if spec.args else "")
    if spec.kind != "unix" or not path or spec.kwargs.get("lockfile", "1") == "0":
        return False
    lock = f"{path}.lock"
    try:
        if os.readlink(lock) != str(os.getpid()):
            return False
        os.remove(lock)
    except OSError:
        return False
    log.warn("{lock}: removed a stale lock naming this process (restarted with the same PID)",
             lock=lock)
    return True


def quote_endpoint_value(value: str) -> str:
    """A value as an endpoint string field: ``\\``, ``:`` and ``=`` escaped."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def tcp_description(port: str, options: dict[str, str]) -> str:
    """The plain ``tcp:`` endpoint under a TLS listener: the ``ssl:`` string's port and the
    options left once the TLS keys were taken out."""
    return ":".join(["tcp", port] + [f"{k}={quote_endpoint_value(v)}" for k, v in options.items()])


def _read_pems(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ListenerConfigError(f"cannot read {what} {path!r}: {e.strerror}") from None


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.S
)


def load_pem_chain(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM file, in order, as the ``cryptography`` objects pyOpenSSL's
    context takes (passing its own ``X509`` there is deprecated); other blocks are skipped."""
    try:
        certs = [x509.load_pem_x509_certificate(m) for m in _PEM_CERT.findall(pem)]
    except ValueError as e:
        raise ListenerConfigError(f"unreadable certificate: {e}") from None
    if not certs:
        raise ListenerConfigError("no PEM certificate found")
    return certs


def load_pem_key(pem: bytes) -> PrivateKeyTypes:
    """The first unencrypted private key of a PEM file (which may hold certificates too)."""
    block = _PEM_KEY.search(pem)
    if block is None:
        raise ListenerConfigError("no PEM private key found")
    try:
        return serialization.load_pem_private_key(block.group(0), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ListenerConfigError(f"unusable private key: {e}") from None


def trust_store_certificates(certs: list[x509.Certificate]) -> list[crypto.X509]:
    """pyOpenSSL's certificate store (``caCerts``, ``X509Store.add_cert``) takes only its own
    ``X509`` objects, so trusted CAs are converted there and nowhere else."""
    return [crypto.X509.from_cryptography(c) for c in certs]


#: Curves an ECDSA server certificate may use: those TLS clients support (named curves).
ECDSA_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})


@dataclass(frozen=True, slots=True)
class ECDSACertificate:
    """The ECDSA certificate and key a listener serves beside its RSA one, checked."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    where: str = "ecdsaCertKey"  # the option (and file) it came from, for messages


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def ecdsa_certificate(cert_pem: bytes, key_pem: bytes, cert_where: str = "ecdsaCertKey",
                      key_where: str = "ecdsaPrivateKey") -> ECDSACertificate:
    """The ECDSA pair of a listener; anything else (an RSA key, another curve, a key that
    does not match) a :class:`ListenerConfigError` naming ``cert_where``/``key_where`` (the
    option and its file)."""
    try:
        key = load_pem_key(key_pem)
    except ListenerConfigError as e:
        raise ListenerConfigError(f"{key_where}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ListenerConfigError(
            f"{key_where}: not an ECDSA key ({_key_kind(key)}; the RSA key goes in privateKey=)")
    if key.curve.name not in ECDSA_CURVES:
        raise ListenerConfigError(f"{key_where}: curve {key.curve.name} is not one TLS clients "
                                  f"support ({', '.join(sorted(ECDSA_CURVES))})")
    try:
        certificate = load_pem_chain(cert_pem)[0]
    except ListenerConfigError as e:
        raise ListenerConfigError(f"{cert_where}: {e}") from None
    if _spki(certificate.public_key()) != _spki(key.public_key()):
        raise ListenerConfigError(f"{cert_where}: the certificate does not match the key of "
                                  f"{key_where}")
    return ECDSACertificate(certificate, key, cert_where)


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    return type(key).__name__.lstrip("_")


def _check_same_ca(rsa_cert: x509.Certificate, chain: list[x509.Certificate],
                   ecdsa: ECDSACertificate) -> None:
    """Devices trust one CA (§2.1) and the listener sends one ``extraCertChain`` whichever
    certificate OpenSSL picks: the ECDSA certificate must have the RSA one's issuer."""
    cert, where = ecdsa.certificate, ecdsa.where
    if cert.issuer != rsa_cert.issuer:
        raise ListenerConfigError(
            f"{where}: issued by {cert.issuer.rfc4514_string()!r}, the RSA certificate by "
            f"{rsa_cert.issuer.rfc4514_string()!r}: both must chain to the CA devices trust")
    issuer = next((c for c in chain if c.subject == cert.issuer), None)
    if issuer is not None:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise ListenerConfigError(
                f"{where}: not signed by {issuer.subject.rfc4514_string()!r} of "
                "extraCertChain") from None


def certificate_options(
    cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None, policy: TLSPolicy,
    ecdsa: ECDSACertificate | None = None, key_where: str = "privateKey",
) -> ssl.CertificateOptions:
    """The SA gate's server options under ``policy``, with ``ecdsa`` served beside the RSA
    certificate on the same context (OpenSSL picks per client); unusable material is a
    :class:`ListenerConfigError` at startup, not a failed handshake later."""
    try:
        certificate = load_pem_chain(cert_pem)[0]
        private_key = load_pem_key(key_pem)
        chain = load_pem_chain(chain_pem) if chain_pem else []
    except ListenerConfigError as e:
        raise ListenerConfigError(f"unusable certificate or key: {e}") from None
    if ecdsa is not None:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ListenerConfigError(
                f"{key_where}: not an RSA key ({_key_kind(private_key)}); with "
                "ecdsaPrivateKey= it must be the RSA one, for devices without ECDSA")
        _check_same_ca(certificate, chain, ecdsa)
    kwargs: dict[str, object] = {}
    minimum = TLS_VERSIONS[policy.minimum_version]
    if policy.legacy:
        kwargs["insecurelyLowerMinimumTo"] = minimum
    else:
        kwargs["raiseMinimumTo"] = minimum
    if policy.client_ca_pem:
        cas = trust_store_certificates(load_pem_chain(policy.client_ca_pem))
        # VERIFY_PEER without FAIL_IF_NO_PEER_CERT: a device that has no certificate yet (its
        # first config-solicitation) must still get through (§2.1).
        kwargs.update(verify=True, caCerts=cas, requireCertificate=False)
    options = ssl.CertificateOptions(
        privateKey=private_key, certificate=certificate, extraCertChain=chain, **kwargs
    )
    try:
        context = options.getContext()  # created once and cached; checks the key fits
    except SSL.Error as e:
        raise ListenerConfigError(f"unusable certificate or key: {ssl_error_text(e)}") from None
    except TypeError as e:  # a key type OpenSSL contexts do not take
        raise ListenerConfigError(f"unusable certificate or key: {e}") from None
    if ecdsa is not None:
        # A second key type on the same context: OpenSSL keeps one certificate per type and
        # chooses by what the client offers (signature algorithms, cipher suites).
        try:
            context.use_certificate(ecdsa.certificate)
            context.use_privatekey(ecdsa.private_key)
            context.check_privatekey()
        except SSL.Error as e:
            raise ListenerConfigError(
                f"unusable ECDSA certificate or key: {ssl_error_text(e)}") from None
    policy.apply(context)
    return options


class DeviceTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol, reporting a handshake that fails to the factory's
    :class:`HandshakeFailures` (an OpenSSL error ends it silently otherwise).

    A connection that closes before sending a byte (a port probe, a load balancer's check) is
    no handshake and is not reported. Reads Twisted's documented ``_handshakeDone`` and the
    ``_reason`` it keeps for the TLS error that ended the connection.
    """

    _heard = False  # a class default: an instance attribute only once bytes came in

    def makeConnection(self, transport: Any) -> None:
        """Twisted's own steps, less its loop of one ``directlyProvides`` per interface of
        the transport: each call replaces the one before, and ``ProtocolWrapper``'s
        ``makeConnection`` below declares them all at once anyway. The nine zope.interface
        declarations cost ~11 us per accepted connection (about 1% of a pull); what the
        protocol provides is the same (tests/test_limits.py)."""
        if not self._connectWrapped:  # not used here; Twisted's way, unchanged
            super().makeConnection(transport)
            return
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def dataReceived(self, data: bytes) -> None:
        if not self._handshakeDone:
            self._heard = True
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        failures = getattr(self.factory, "handshake_failures", None)
        if failures is not None and not self._handshakeDone and self._heard:
            why = self._reason or reason
            if why is not None and why.check(SSL.Error):
                text = ssl_error_text(why.value)
                kind = ssl_failure_reason(text)
            else:
                text = "the connection ended before the handshake completed"
                kind = "closed"
            failures.record("sa_gate", _peer_host(self.transport), kind, text)
        super().connectionLost(reason)


def _peer_host(transport: Any) -> str:
    try:
        return str(getattr(transport.getPeer(), "host", None) or "unknown peer")
    except Exception:
        return "unknown peer"


class RecordPerWriteTLSFactory(TLSMemoryBIOFactory):
    """One transport write, one TLS record.

    Twisted's default TLS transport merges the writes of one reactor turn into one record.
    For the SA gate that would let a tunnel chunk header straddle the SA's 8191-byte reads,
    which makes libarms lose sync (§9.5); answers are single writes anyway. Failed handshakes
    go to ``handshake_failures`` if given.
    """

    protocol = DeviceTLSProtocol

    def __init__(self, contextFactory: Any, isClient: bool, wrappedFactory: IProtocolFactory,
                 handshake_failures: HandshakeFailures | None = None) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory)
        self.handshake_failures = handshake_failures


@implementer(IStreamServerEndpoint)
@dataclass(slots=True)
class TLSListener:
    endpoint: IStreamServerEndpoint
    options: ssl.CertificateOptions
    handshake_failures: HandshakeFailures | None = None  # devices' failed handshakes go here

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(RecordPerWriteTLSFactory(
            self.options, False, factory, self.handshake_failures))


def tls_listener(reactor: object, description: str, policy: TLSPolicy,
                 handshake_failures: HandshakeFailures | None = None) -> TLSListener:
    """``ssl:PORT:privateKey=K:certKey=C[:extraCertChain=X][:ecdsaPrivateKey=EK:ecdsaCertKey=EC]
    [:interface=I][:backlog=N]``; with the ``ecdsa`` pair both certificates are served."""
    spec = split_endpoint(description)
    if spec.kind != "ssl":
        raise ListenerConfigError(
            f"SA gate listener {description!r}: SAs speak HTTPS only; use an ssl: endpoint"
        )
    if not spec.args and "port" not in spec.kwargs:
        raise ListenerConfigError(f"SA gate listener {description!r}: no port")
    port = spec.kwargs.pop("port", None) or spec.args[0]
    key_path = spec.kwargs.pop("privateKey", None)
    cert_path = spec.kwargs.pop("certKey", None) or key_path
    if not key_path:
        raise ListenerConfigError(f"SA gate listener {description!r}: privateKey= is required")
    chain_path = spec.kwargs.pop("extraCertChain", None)
    ecdsa_key_path = spec.kwargs.pop("ecdsaPrivateKey", None)
    ecdsa_cert_path = spec.kwargs.pop("ecdsaCertKey", None) or ecdsa_key_path
    if ecdsa_cert_path and not ecdsa_key_path:
        raise ListenerConfigError("ecdsaCertKey= needs ecdsaPrivateKey= (the ECDSA key)")
    for ignored in ("sslmethod", "method", "dhParameters"):
        if spec.kwargs.pop(ignored, None) is not None:
            log.warn("SA gate listener: {opt}= ignored; TLS versions come from "
                     "tls_minimum_version", opt=ignored)
    ecdsa = None
    if ecdsa_key_path and ecdsa_cert_path:
        ecdsa = ecdsa_certificate(
            _read_pems(ecdsa_cert_path, "ECDSA certificate (ecdsaCertKey=)"),
            _read_pems(ecdsa_key_path, "ECDSA private key (ecdsaPrivateKey=)"),
            f"ecdsaCertKey={ecdsa_cert_path}", f"ecdsaPrivateKey={ecdsa_key_path}")
    options = certificate_options(
        _read_pems(cert_path, "certificate"),
        _read_pems(key_path, "private key"),
        _read_pems(chain_path, "certificate chain") if chain_path else None,
        policy,
        ecdsa,
        key_where=f"privateKey={key_path}",
    )
    tcp = tcp_description(port, spec.kwargs)
    endpoint = server_endpoint(reactor, tcp, "SA gate listener", description)
    policy.warn_if_legacy()
    return TLSListener(endpoint=endpoint, options=options, handshake_failures=handshake_failures)


# --------------------------------------------------------------------------------------------
# Failed handshakes with devices
# --------------------------------------------------------------------------------------------

# Reasons by direction: a fixed set, so /metrics cannot grow with what peers send. sa_gate: a
# device connecting to the SA gate or tunnel listener; push: armsproxy connecting to a device.
_COMMON_REASONS = ("protocol_version", "no_shared_cipher", "unknown_ca",
                   "certificate_verify_failed", "bad_certificate", "not_tls", "closed")
HANDSHAKE_FAILURE_REASONS: dict[str, tuple[str, ...]] = {
    "sa_gate": (*_COMMON_REASONS, "other"),
    "push": (*_COMMON_REASONS, "pin_mismatch", "ip_mismatch", "no_certificate", "timeout",
             "other"),
}

# OpenSSL reason strings (lower case, first match wins) -> reason label.
_SSL_REASONS = (
    ("protocol version", "protocol_version"),  # the peer's alert
    ("unsupported protocol", "protocol_version"),  # ours
    ("wrong ssl version", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("unknown ca", "unknown_ca"),
    ("certificate verify failed", "certificate_verify_failed"),
    ("no shared cipher", "no_shared_cipher"),
    ("no ciphers available", "no_shared_cipher"),
    ("handshake failure", "no_shared_cipher"),  # the peer's generic alert, mostly that
    ("insufficient security", "no_shared_cipher"),
    ("bad certificate", "bad_certificate"),
    ("certificate unknown", "bad_certificate"),
    ("unsupported certificate", "bad_certificate"),
    ("certificate expired", "bad_certificate"),
    ("certificate revoked", "bad_certificate"),
    ("peer did not return a certificate", "bad_certificate"),
    ("http request", "not_tls"),
    ("https proxy request", "not_tls"),
    ("wrong version number", "not_tls"),
    ("packet length too long", "not_tls"),
    ("unknown protocol", "not_tls"),
    ("unexpected eof", "closed"),
)

_HINTS = {
    "protocol_version": "no TLS version in common (upstream libarms speaks only TLS 1.0, "
                        "allowed by [sa_gate] tls_minimum_version = 1.0)",
    "no_shared_cipher": "no cipher suite in common",
    ("sa_gate", "unknown_ca"): "the device does not trust the SA gate's certificate (it must "
                               "chain to the rs-certificate CA)",
    ("push", "unknown_ca"): "the device refused armsproxy's client certificate ([push] "
                            "client_certificate must chain to the rs-certificate CA)",
    ("sa_gate", "certificate_verify_failed"): "the device's certificate does not chain to "
                                              "[sa_gate] client_ca",
    ("push", "certificate_verify_failed"): "the device's certificate does not chain to "
                                           "[push] sa_ca",
    "pin_mismatch": "the device presented another certificate than the RS issued to it",
}


def ssl_error_text(exc: BaseException) -> str:
    """OpenSSL's reason strings of an ``SSL.Error`` (``'tlsv1 alert protocol version'``)."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item]
        if reasons:
            return ", ".join(reasons)
    return str(exc) or type(exc).__name__


def ssl_failure_reason(text: str) -> str:
    """The reason label of an OpenSSL handshake error text; ``other`` if none fits."""
    lowered = text.lower()
    return next((label for needle, label in _SSL_REASONS if needle in lowered), "other")


class HandshakeFailures:
    """Failed TLS handshakes with devices, both directions, since start.

    Each is counted by direction and reason (``counts()``, every known series present at 0) and
    logged once per peer and reason every ``relog_after`` seconds: a device retrying every few
    seconds makes one line, not thousands. The memory of logged peers is an LRU of
    ``max_peers`` entries, and at most ``max_lines`` new lines are written a minute (the rest
    counted, and summed up in one line), so a flood from many addresses grows neither memory
    nor the log.
    """

    def __init__(self, clock: IReactorTime, *, max_peers: int = 4096,
                 relog_after: float = 3600.0, max_lines: int = 60) -> None:
        self._clock = clock
        self._max_peers = max_peers
        self._relog_after = relog_after
        self._max_lines = max_lines
        self._counts = {(direction, reason): 0
                        for direction, reasons in HANDSHAKE_FAILURE_REASONS.items()
                        for reason in reasons}
        self._logged: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._window_start: float | None = None
        self._window_lines = 0
        self._suppressed = 0

    def counts(self) -> dict[tuple[str, str], int]:
        """(direction, reason) -> failures since start."""
        return dict(self._counts)

    def record(self, direction: str, peer: str, reason: str, detail: str,
               what: str = "") -> bool:
        """Count one failed handshake with ``peer`` (its IP address); log it unless this
        peer's failure for the same reason was logged lately. True if it was logged."""
        if reason not in HANDSHAKE_FAILURE_REASONS[direction]:
            reason = "other"
        self._counts[(direction, reason)] += 1
        now = self._clock.seconds()
        key = (direction, peer, reason)
        last = self._logged.get(key)
        if last is not None and now - last < self._relog_after:
            return False
        if not self._may_log(now):
            return False
        self._logged[key] = now
        self._logged.move_to_end(key)
        while len(self._logged) > self._max_peers:
            self._logged.popitem(last=False)
        hint = _HINTS.get((direction, reason)) or _HINTS.get(reason)
        log.warn(
            "TLS handshake {way} device {peer} failed{what}: {detail} [{reason}]{hint}; the "
            "same failure of this peer is only counted (armsproxy_tls_handshake_failures_"
            "total) for the next {minutes:g} min",
            way="with" if direction == "sa_gate" else "of a push to", peer=peer,
            what=f" ({what})" if what else "", detail=detail, reason=reason,
            hint=f": {hint}" if hint else "", minutes=self._relog_after / 60,
        )
        return True

    def _may_log(self, now: float) -> bool:
        if self._window_start is None or now - self._window_start >= 60:
            if self._suppressed:
                log.warn("{n} more failed TLS handshakes with devices not logged in the last "
                         "minute (too many peers; all counted in /metrics)", n=self._suppressed)
            self._window_start, self._window_lines, self._suppressed = now, 0, 0
        if self._window_lines >= self._max_lines:
            self._suppressed += 1
            return False
        self._window_lines += 1
        return True
