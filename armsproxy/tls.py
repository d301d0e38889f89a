"""TLS for the SA gate: endpoint strings in, a listening TLS factory out.

Operators write listeners as Twisted endpoint strings (``ssl:443:privateKey=...``). Twisted's
own ``ssl:`` parser cannot express a TLS version policy, and real libarms devices speak only
TLS 1.0 (§2.1), which OpenSSL 3 refuses unless the security level is lowered. So we read the
``ssl:`` string ourselves, build ``CertificateOptions`` with the configured policy, and wrap a
plain ``tcp:`` (or ``unix:``) endpoint with ``TLSMemoryBIOFactory``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

log = Logger()

TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1_0,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

# OpenSSL 3 disables TLS < 1.2 at security level 1 and above; old devices also need old suites.
LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"


class ListenerConfigError(ValueError):
    """A listener description armsproxy cannot use; the message says why."""


@dataclass(slots=True)
class TLSPolicy:
    minimum_version: str = "1.2"
    client_ca_pem: bytes | None = None  # ask SAs for their certificate (never required, §2.1)


@dataclass(slots=True)
class EndpointSpec:
    kind: str
    args: list[str] = field(default_factory=list)
    kwargs: dict[str, str] = field(default_factory=dict)


def split_endpoint(description: str) -> EndpointSpec:
    """Split an endpoint string the way Twisted does (``\\:`` escapes a colon)."""
    parts: list[str] = []
    current = []
    escaped = False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
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
    return endpoint


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


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _read_pems(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ListenerConfigError(f"cannot read {what} {path!r}: {e.strerror}") from None


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_pem_chain(pem: bytes) -> list[crypto.X509]:
    certs = [crypto.load_certificate(crypto.FILETYPE_PEM, m) for m in _PEM_CERT.findall(pem)]
    if not certs:
        raise ListenerConfigError("no PEM certificate found")
    return certs


def certificate_options(
    cert_pem: bytes, key_pem: bytes, chain_pem: bytes | None, policy: TLSPolicy
) -> ssl.CertificateOptions:
    if policy.minimum_version not in TLS_VERSIONS:
        raise ListenerConfigError(
            f"tls_minimum_version {policy.minimum_version!r}: use one of {sorted(TLS_VERSIONS)}"
        )
    try:
        certificate = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
        private_key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        chain = load_pem_chain(chain_pem) if chain_pem else []
    except (crypto.Error, ValueError) as e:
        raise ListenerConfigError(f"unusable certificate or key: {e}") from None
    kwargs: dict[str, object] = {}
    minimum = TLS_VERSIONS[policy.minimum_version]
    legacy = minimum < ssl.TLSVersion.TLSv1_2
    if legacy:
        kwargs["insecurelyLowerMinimumTo"] = minimum
    else:
        kwargs["raiseMinimumTo"] = minimum
    if policy.client_ca_pem:
        cas = load_pem_chain(policy.client_ca_pem)
        # VERIFY_PEER without FAIL_IF_NO_PEER_CERT: a device that has no certificate yet (its
        # first config-solicitation) must still get through (§2.1).
        kwargs.update(verify=True, caCerts=cas, requireCertificate=False)
    options = ssl.CertificateOptions(
        privateKey=private_key, certificate=certificate, extraCertChain=chain, **kwargs
    )
    context = options.getContext()  # created once and cached by CertificateOptions
    if legacy:
        context.set_cipher_list(LEGACY_CIPHERS)
    return options


class RecordPerWriteTLSFactory(TLSMemoryBIOFactory):
    """One transport write, one TLS record.

    Twisted's default TLS transport merges the writes of one reactor turn into one record.
    For the SA gate that would let a tunnel chunk header straddle the SA's 8191-byte reads,
    which makes libarms lose sync (§9.5); answers are single writes anyway.
    """

    protocol = TLSMemoryBIOProtocol


@implementer(IStreamServerEndpoint)
@dataclass(slots=True)
class TLSListener:
    endpoint: IStreamServerEndpoint
    options: ssl.CertificateOptions

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(RecordPerWriteTLSFactory(self.options, False, factory))


def tls_listener(reactor: object, description: str, policy: TLSPolicy) -> TLSListener:
    """``ssl:PORT:privateKey=K:certKey=C[:extraCertChain=X][:interface=I][:backlog=N]``."""
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
    for ignored in ("sslmethod", "method", "dhParameters"):
        if spec.kwargs.pop(ignored, None) is not None:
            log.warn("SA gate listener: {opt}= ignored; TLS versions come from "
                     "tls_minimum_version", opt=ignored)
    options = certificate_options(
        _read_pems(cert_path, "certificate"),
        _read_pems(key_path, "private key"),
        _read_pems(chain_path, "certificate chain") if chain_path else None,
        policy,
    )
    tcp = ":".join(["tcp", port] + [f"{k}={_quote(v)}" for k, v in spec.kwargs.items()])
    endpoint = server_endpoint(reactor, tcp, "SA gate listener", description)
    if TLS_VERSIONS[policy.minimum_version] < ssl.TLSVersion.TLSv1_2:
        log.warn(
            "SA gate accepts TLS {v} (opt-in for real libarms devices, which speak only "
            "TLS 1.0): weaker protocol versions and ciphers are enabled on {d}",
            v=policy.minimum_version, d=tcp,
        )
    return TLSListener(endpoint=endpoint, options=options)
