"""Development PKI: one self-signed CA, the proxy's server certificate and SA certificates.

The SA trusts exactly one certificate, the ``rs-certificate`` handed out by the LS (§2.1), so the
CA is a self-signed root and every certificate we issue chains directly to it. Keys are RSA 2048
with SHA-256 signatures because old device OpenSSL builds may lack ECDSA (§2.1). The proxy's
server also gets an ECDSA P-256 certificate from the same CA, served beside the RSA one: an
ECDSA handshake costs the server about half the CPU of an RSA-2048 one, and OpenSSL gives it
only to clients that offer ECDSA, so old devices still get RSA. Devices often have no real-time
clock, so certificates start a day in the past and last ten years.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from armsproxy.arms.distid import is_distid
from armsproxy.tls import quote_endpoint_value

log = Logger()

RSA_KEY_SIZE = 2048
VALIDITY = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(days=1)
# libarms keeps 5120-byte copies of sa-certificate and sa-private-key (§5, §11.2).
SA_PEM_LIMIT = 5120
DEV_CA_COMMON_NAME = "ARMS Root CA armsproxy development"
DEV_SERVER_COMMON_NAME = "armsproxy development server"
#: The curve of the ECDSA server certificate: the one every ECDSA-capable TLS client supports.
ECDSA_CURVE = ec.SECP256R1()

LeafKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class PKIError(Exception):
    """The PKI directory is in a state we must not repair silently."""


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key as PEM text (ASCII, ready for XML and XML-RPC).

    An RSA key is PKCS#1 ("BEGIN RSA PRIVATE KEY"), the form libarms accepted in the captured
    config-solicitation answer; the proxy's ECDSA server key is SEC 1 ("BEGIN EC PRIVATE KEY").
    """

    cert_pem: str
    key_pem: str

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem.encode("ascii"))

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """The RSA key (CAs and SA certificates are RSA only: devices may lack ECDSA)."""
        key = self.any_private_key
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PKIError("only RSA keys are supported")
        return key

    @property
    def any_private_key(self) -> LeafKey:
        """The key, RSA or ECDSA (the proxy's server certificates are either)."""
        key = serialization.load_pem_private_key(self.key_pem.encode("ascii"), password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise PKIError("only RSA and ECDSA keys are supported")
        return key

    def fingerprint_sha256(self) -> str:
        """Lower-case hex SHA-256 of the certificate's DER (no separators), for pinning."""
        return fingerprint_sha256(self.cert_pem)

    def key_matches(self) -> bool:
        return _public_bytes(self.certificate.public_key()) == _public_bytes(
            self.any_private_key.public_key()
        )


def fingerprint_sha256(cert: str | bytes | x509.Certificate) -> str:
    """Fingerprint of a PEM (str/bytes starting with ``-----BEGIN``), DER bytes or a certificate."""
    if isinstance(cert, str):
        cert = cert.encode("ascii")
    if isinstance(cert, bytes):
        if cert.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(cert)
        else:
            return hashlib.sha256(cert).hexdigest()
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class DevPKI:
    """The generated development PKI: file paths plus the loaded objects."""

    directory: Path
    ca_cert_path: Path
    ca_key_path: Path
    server_cert_path: Path
    server_key_path: Path
    ca: CertKey
    server: CertKey
    # The ECDSA P-256 server certificate from the same CA, served beside the RSA one.
    server_ecdsa_cert_path: Path
    server_ecdsa_key_path: Path
    server_ecdsa: CertKey

    @property
    def sa_gate_tls_options(self) -> str:
        """The endpoint-string options that serve both server certificates
        (``privateKey=...:certKey=...:ecdsaPrivateKey=...:ecdsaCertKey=...``)."""
        q = quote_endpoint_value
        return (f"privateKey={q(str(self.server_key_path))}:"
                f"certKey={q(str(self.server_cert_path))}:"
                f"ecdsaPrivateKey={q(str(self.server_ecdsa_key_path))}:"
                f"ecdsaCertKey={q(str(self.server_ecdsa_cert_path))}")


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)


def _key_pem(key: LeafKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "armsproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: LeafKey, issuer_key: rsa.RSAPrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )


def _leaf_key_usage(key: LeafKey) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        # RSA key exchange in TLS 1.0 suites of old devices; an ECDSA key only signs.
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(common_name: str, *, key: rsa.RSAPrivateKey | None = None) -> CertKey:
    """A self-signed root CA (``key`` reuses an existing key, e.g. when only the cert was lost)."""
    key = key or _new_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), _key_pem(key))


def _issue(
    ca: CertKey,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    san: list[x509.GeneralName],
    key: LeafKey | None = None,
) -> CertKey:
    ca_cert, ca_key = ca.certificate, ca.private_key
    key = key or _new_key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key, ca_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return CertKey(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), _key_pem(key))


def issue_server_cert(
    ca: CertKey, ips: Sequence[str], common_name: str, *, dns_names: Sequence[str] = (),
    ecdsa: bool = False,
) -> CertKey:
    """The proxy's TLS server certificate; libarms checks no names, but other clients may.

    RSA 2048, or with ``ecdsa`` ECDSA P-256 (signed by the same, RSA, CA: a client that
    verifies the one verifies the other)."""
    san: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    san += [x509.DNSName(name) for name in dns_names]
    key = ec.generate_private_key(ECDSA_CURVE) if ecdsa else None
    return _issue(ca, common_name, [ExtendedKeyUsageOID.SERVER_AUTH], san, key)


def issue_sa_cert(ca: CertKey, distid: str) -> CertKey:
    """An SA certificate: its listener's server cert and its client cert, so both usages."""
    if not is_distid(distid):
        raise ValueError(f"not a distribution id (8 groups of 4 upper-case hex digits): {distid!r}")
    issued = _issue(
        ca, distid, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], []
    )
    for label, pem in (("certificate", issued.cert_pem), ("private key", issued.key_pem)):
        if len(pem.encode("ascii")) >= SA_PEM_LIMIT:  # pragma: no cover - RSA 2048 is ~1.7 KB
            raise PKIError(f"SA {label} PEM is {len(pem)} bytes; libarms keeps < {SA_PEM_LIMIT}")
    return issued


def load_certkey(cert_path: Path, key_path: Path) -> CertKey:
    return CertKey(cert_path.read_text("ascii"), key_path.read_text("ascii"))


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically with the final mode from the start, so a key is never world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _covers(cert: x509.Certificate, ips: Sequence[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return not ips
    present = set(san.get_values_for_type(x509.IPAddress))
    return {ipaddress.ip_address(ip) for ip in ips} <= present


def _issued_by(cert: x509.Certificate, ca: CertKey) -> bool:
    try:
        cert.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ensure_ca(ca_cert_path: Path, ca_key_path: Path) -> CertKey:
    have_cert, have_key = ca_cert_path.exists(), ca_key_path.exists()
    if have_cert and not have_key:
        raise PKIError(
            f"{ca_cert_path} exists but {ca_key_path} is missing; devices may already trust this "
            "CA, so it is not replaced. Restore the key or remove both files."
        )
    if have_cert:
        ca = load_certkey(ca_cert_path, ca_key_path)
        if not ca.key_matches():
            raise PKIError(f"{ca_key_path} does not match {ca_cert_path}")
        return ca
    if have_key:
        # Interrupted first start (key written, cert not): the cert was never handed out.
        key = CertKey("", ca_key_path.read_text("ascii")).private_key
        ca = make_ca(DEV_CA_COMMON_NAME, key=key)
    else:
        ca = make_ca(DEV_CA_COMMON_NAME)
        _write(ca_key_path, ca.key_pem, 0o600)
    _write(ca_cert_path, ca.cert_pem, 0o644)
    log.info("created development CA {path}", path=str(ca_cert_path))
    return ca


#: The files of the development PKI, in a data directory's ``pki/``.
DEV_PKI_FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "server-ecdsa.pem",
                 "server-ecdsa.key")


def _ensure_server(ca: CertKey, cert_path: Path, key_path: Path, ips: Sequence[str],
                   *, ecdsa: bool) -> CertKey:
    """The server certificate in ``cert_path``/``key_path`` if usable (its key matches, the
    CA issued it, it names every IP, its key is of the wanted type), else a new one there."""
    server: CertKey | None = None
    if cert_path.exists() and key_path.exists():
        try:
            server = load_certkey(cert_path, key_path)
            cert = server.certificate
            kind = ec.EllipticCurvePrivateKey if ecdsa else rsa.RSAPrivateKey
            if not (isinstance(server.any_private_key, kind) and server.key_matches()
                    and _issued_by(cert, ca) and _covers(cert, ips)):
                server = None
        except (ValueError, PKIError):
            server = None
    if server is None:
        server = issue_server_cert(ca, ips, DEV_SERVER_COMMON_NAME, ecdsa=ecdsa)
        _write(key_path, server.key_pem, 0o600)
        _write(cert_path, server.cert_pem, 0o644)
        log.info("issued development {kind} server certificate for {ips}",
                 kind="ECDSA" if ecdsa else "RSA", ips=list(ips))
    return server


def ensure_dev_pki(directory: Path, ips: Sequence[str]) -> DevPKI:
    """Create the dev CA and server certificates once; reuse them on later starts.

    The CA is never replaced once written (devices trust it). Each server certificate (RSA
    ``server.pem``, ECDSA ``server-ecdsa.pem``) is re-issued from the same CA when it is
    missing (a data directory from before the ECDSA one gets it on its next start), broken or
    lacks one of ``ips``.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = {name: directory / name for name in DEV_PKI_FILES}
    ca = _ensure_ca(paths["ca.pem"], paths["ca.key"])
    for key_path in (paths["ca.key"], paths["server.key"], paths["server-ecdsa.key"]):
        if key_path.exists() and (key_path.stat().st_mode & 0o077):
            log.warn("tightening mode of {path} to 0600", path=str(key_path))
            os.chmod(key_path, 0o600)
    server = _ensure_server(ca, paths["server.pem"], paths["server.key"], ips, ecdsa=False)
    server_ecdsa = _ensure_server(ca, paths["server-ecdsa.pem"], paths["server-ecdsa.key"], ips,
                                  ecdsa=True)
    return DevPKI(
        directory=directory,
        ca_cert_path=paths["ca.pem"],
        ca_key_path=paths["ca.key"],
        server_cert_path=paths["server.pem"],
        server_key_path=paths["server.key"],
        ca=ca,
        server=server,
        server_ecdsa_cert_path=paths["server-ecdsa.pem"],
        server_ecdsa_key_path=paths["server-ecdsa.key"],
        server_ecdsa=server_ecdsa,
    )
