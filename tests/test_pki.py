"""Development PKI: certificates libarms and our own TLS clients accept, created once."""

from __future__ import annotations

import datetime
import stat

import pytest
import pytest_twisted
from conftest import tls_server_options
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet import defer, protocol, reactor, ssl

from armsproxy import pki

DISTID = "0001-0000-1A2B-0105-0000-0000-00C0-FFEE"


@pytest.fixture(scope="module")
def ca() -> pki.CertKey:
    return pki.make_ca("ARMS Root CA test")


def _verify_chain(ca: pki.CertKey, leaf: pki.CertKey) -> None:
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, ca.cert_pem.encode()))
    leaf_x509 = crypto.load_certificate(crypto.FILETYPE_PEM, leaf.cert_pem.encode())
    crypto.X509StoreContext(store, leaf_x509).verify_certificate()


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_self_signed_rsa2048_root(ca):
    cert = ca.certificate
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    key = ca.private_key
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert cert.signature_hash_algorithm.name == "sha256"
    assert ca.key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----\n")  # PKCS#1 as captured
    assert ca.key_matches()


def test_validity_backdated_a_day_and_ten_years_long(ca):
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = ca.certificate
    assert now - cert.not_valid_before_utc > datetime.timedelta(hours=23)
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=3640)


def test_server_cert_chains_and_has_ip_san(ca):
    server = pki.issue_server_cert(ca, ["127.0.0.1", "::1"], "proxy")
    _verify_chain(ca, server)
    cert = server.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert server.key_matches()


def test_sa_cert_cn_is_distid_both_usages_and_small(ca):
    sa = pki.issue_sa_cert(ca, DISTID)
    _verify_chain(ca, sa)
    cert = sa.certificate
    assert _cn(cert) == DISTID
    assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert len(sa.cert_pem.encode()) < 5120 and len(sa.key_pem.encode()) < 5120
    assert sa.key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    assert sa.cert_pem.isascii() and sa.key_pem.isascii()


def test_chain_from_another_ca_does_not_verify(ca):
    other = pki.make_ca("other")
    with pytest.raises(crypto.X509StoreContextError):
        _verify_chain(other, pki.issue_sa_cert(ca, DISTID))


@pytest.mark.parametrize("bad", ["0001-0000-1a2b-0105-0000-0000-00c0-ffee", "nope", ""])
def test_sa_cert_refuses_bad_distid(ca, bad):
    with pytest.raises(ValueError):
        pki.issue_sa_cert(ca, bad)


def test_fingerprint_matches_openssl(ca):
    sa = pki.issue_sa_cert(ca, DISTID)
    digest = crypto.load_certificate(crypto.FILETYPE_PEM, sa.cert_pem.encode()).digest("sha256")
    assert sa.fingerprint_sha256() == digest.decode().replace(":", "").lower()
    der = sa.certificate.public_bytes(serialization.Encoding.DER)
    assert pki.fingerprint_sha256(der) == sa.fingerprint_sha256()


def test_ensure_dev_pki_creates_files_with_private_key_modes(tmp_path):
    d = tmp_path / "pki"
    dev = pki.ensure_dev_pki(d, ["127.0.0.1"])
    assert dev.ca_cert_path == d / "ca.pem" and dev.server_key_path == d / "server.key"
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (d / name).is_file()
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "server.key").stat().st_mode) == 0o600
    assert not list(d.glob(".*.tmp"))
    _verify_chain(dev.ca, dev.server)
    assert (d / "ca.pem").read_text() == dev.ca.cert_pem


def test_ensure_dev_pki_is_idempotent(tmp_path):
    first = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert second.ca == first.ca and second.server == first.server


def test_ensure_dev_pki_reissues_server_cert_for_new_ip_but_keeps_ca(tmp_path):
    first = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    second = pki.ensure_dev_pki(tmp_path, ["127.0.0.1", "127.0.0.2"])
    assert second.ca == first.ca
    assert second.server != first.server
    _verify_chain(second.ca, second.server)
    san = second.server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert {str(i) for i in san.value.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "127.0.0.2",
    }


def test_ensure_dev_pki_tightens_loose_key_mode(tmp_path):
    pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    (tmp_path / "ca.key").chmod(0o644)
    pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_ensure_dev_pki_never_replaces_a_ca_whose_key_is_lost(tmp_path):
    pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    (tmp_path / "ca.key").unlink()
    with pytest.raises(pki.PKIError, match=r"ca\.key is missing"):
        pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    assert (tmp_path / "ca.pem").read_bytes() == ca_pem


def test_ensure_dev_pki_recovers_when_only_the_ca_key_was_written(tmp_path):
    first = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    (tmp_path / "ca.pem").unlink()
    second = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    assert second.ca.key_pem == first.ca.key_pem
    assert second.ca.key_matches()
    # The old server certificate is still signed by the same key, so it is kept.
    _verify_chain(second.ca, second.server)


class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Client(protocol.Protocol):
    def __init__(self):
        self.done = defer.Deferred()
        self.received = b""

    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self.received += data
        if self.received == b"ping":
            self.peer_cert = self.transport.getPeerCertificate()
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_real_tls_with_dev_server_cert_and_sa_client_cert(tmp_path):
    """The server cert verifies by IP against the dev CA; the server accepts the SA cert."""
    dev = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    sa = pki.issue_sa_cert(dev.ca, DISTID)
    ca_cert = ssl.Certificate.loadPEM(dev.ca.cert_pem)
    server_opts = tls_server_options((dev.server.cert_pem + dev.server.key_pem).encode(),
                                     client_ca_pem=dev.ca.cert_pem.encode())
    seen_client = []

    class Server(_Echo):
        def dataReceived(self, data):
            seen_client.append(self.transport.getPeerCertificate())
            super().dataReceived(data)

    port = reactor.listenSSL(
        0, protocol.Factory.forProtocol(Server), server_opts, interface="127.0.0.1"
    )
    try:
        client_opts = ssl.optionsForClientTLS(
            "127.0.0.1",
            trustRoot=ca_cert,
            # cryptography objects: clientCertificate= hands pyOpenSSL deprecated ones.
            extraCertificateOptions={"certificate": sa.certificate, "privateKey": sa.private_key},
        )
        client = _Client()
        factory = protocol.ClientFactory.forProtocol(lambda: client)
        reactor.connectSSL("127.0.0.1", port.getHost().port, factory, client_opts)
        assert await client.done == b"ping"
        assert _cn(client.peer_cert.to_cryptography()) == pki.DEV_SERVER_COMMON_NAME
        assert _cn(seen_client[0].to_cryptography()) == DISTID
    finally:
        await port.stopListening()
