"""An ECDSA server certificate beside the RSA one, on one listener (issue #11 point 3).

An ECDSA P-256 handshake costs the server about half the CPU of an RSA-2048 one, but devices
with an old OpenSSL may lack ECDSA (§2.1). So the SA gate serves both from one OpenSSL context
and OpenSSL picks per client: ECDSA to a client that offers it, RSA to one that offers only
RSA suites (a TLS 1.0 device). Both chain to the one CA devices trust. Real TLS on loopback.
"""

from __future__ import annotations

import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from armsproxy import pki
from armsproxy.config import check, embedded, load
from armsproxy.device.client import SAConnectionCreator
from armsproxy.tap import build_services
from armsproxy.tls import ListenerConfigError, TLSPolicy, tls_listener


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: What upstream libarms devices without ECDSA offer: TLS 1.0, RSA suites only.
RSA_ONLY_TLS10 = b"AES256-SHA:ECDHE-RSA-AES256-SHA:@SECLEVEL=0"
#: A TLS 1.0 client whose OpenSSL has ECDSA: it offers both kinds.
ECDSA_TLS10 = b"ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:AES256-SHA:@SECLEVEL=0"


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPKI:
    return pki.ensure_dev_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])


# ---------------------------------------------------------------------------------------------
# The development PKI
# ---------------------------------------------------------------------------------------------


def test_dev_pki_issues_an_ecdsa_p256_server_certificate_from_the_same_ca(dev):
    cert = dev.server_ecdsa.certificate
    key = dev.server_ecdsa.any_private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert dev.server_ecdsa.key_matches()
    cert.verify_directly_issued_by(dev.ca.certificate)  # the CA devices trust
    assert cert.issuer == dev.server.certificate.issuer
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment  # ECDSA only signs
    assert isinstance(dev.server.any_private_key, rsa.RSAPrivateKey)  # the RSA one stays
    assert dev.server_ecdsa_key_path.name == "server-ecdsa.key"
    assert stat.S_IMODE(dev.server_ecdsa_key_path.stat().st_mode) == 0o600
    assert dev.server_ecdsa.key_pem.startswith("-----BEGIN EC PRIVATE KEY-----\n")


def test_a_data_dir_from_before_gets_its_ecdsa_certificate_and_keeps_the_rest(tmp_path):
    first = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    for name in ("server-ecdsa.pem", "server-ecdsa.key"):
        (tmp_path / name).unlink()
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert second.ca == first.ca and second.server == first.server
    second.server_ecdsa.certificate.verify_directly_issued_by(first.ca.certificate)


def test_an_rsa_key_where_the_ecdsa_one_belongs_is_replaced(tmp_path):
    dev = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    (tmp_path / "server-ecdsa.pem").write_text(dev.server.cert_pem)
    (tmp_path / "server-ecdsa.key").write_text(dev.server.key_pem)
    again = pki.ensure_dev_pki(tmp_path, ["127.0.0.1"])
    assert isinstance(again.server_ecdsa.any_private_key, ec.EllipticCurvePrivateKey)


# ---------------------------------------------------------------------------------------------
# Which certificate which client gets
# ---------------------------------------------------------------------------------------------


class _Answer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


@dataclass
class Seen:
    key: object  # the public key of the certificate the server presented
    cipher: str
    version: str
    answer: bytes


@implementer(IHandshakeListener)
class _Client(Protocol):
    """Sends a request once the handshake (verified against the dev CA) is done."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.done: defer.Deferred[Seen] = defer.Deferred()
        self.data = b""
        self.seen: Seen | None = None

    def handshakeCompleted(self) -> None:
        conn = self.transport.getHandle()
        cert = self.transport.getPeerCertificate().to_cryptography()
        self.seen = Seen(cert.public_key(), conn.get_cipher_name(),
                         conn.get_protocol_version_name(), b"")
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        if self.seen is None:
            self.done.errback(AssertionError(f"no handshake: {reason}"))
        else:
            self.seen.answer = self.data
            self.done.callback(self.seen)


async def connect(port: int, ca_pem: bytes, *, tls_max: int | None = None,
                  ciphers: bytes | None = None,
                  request: bytes = b"GET / HTTP/1.0\r\n\r\n") -> Seen:
    """One connection as a device makes it (one CA, no SNI), capped and with suites as given."""
    creator = SAConnectionCreator(ca_pem, tls_max_version=tls_max, cipher_list=ciphers)
    client = _Client(request)
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    await connectProtocol(endpoint, client)
    return await client.done


async def listen(dev: pki.DevPKI, minimum: str = "1.0") -> IListeningPort:
    listener = tls_listener(reactor, f"ssl:0:interface=127.0.0.1:{dev.sa_gate_tls_options}",
                            TLSPolicy(minimum_version=minimum))
    return await listener.listen(Factory.forProtocol(_Answer))


@pytest_twisted.ensureDeferred
async def test_a_modern_client_gets_the_ecdsa_certificate(dev):
    port = await listen(dev, "1.2")
    try:
        seen = await connect(port.getHost().port, dev.ca.cert_pem.encode())
        assert isinstance(seen.key, ec.EllipticCurvePublicKey)
        assert seen.version == "TLSv1.3" and seen.answer.startswith(b"HTTP/1.1 200")
        # TLS 1.2 with both kinds of suites: ECDSA too.
        seen = await connect(port.getHost().port, dev.ca.cert_pem.encode(),
                             tls_max=SSL.TLS1_2_VERSION)
        assert isinstance(seen.key, ec.EllipticCurvePublicKey), seen.cipher
        assert seen.version == "TLSv1.2" and "ECDSA" in seen.cipher
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_tls_1_0_client_with_only_rsa_suites_gets_the_rsa_certificate(dev):
    port = await listen(dev)
    try:
        seen = await connect(port.getHost().port, dev.ca.cert_pem.encode(),
                             tls_max=SSL.TLS1_VERSION, ciphers=RSA_ONLY_TLS10)
        assert isinstance(seen.key, rsa.RSAPublicKey)
        assert seen.version == "TLSv1" and seen.cipher in ("AES256-SHA", "ECDHE-RSA-AES256-SHA")
        assert seen.answer.startswith(b"HTTP/1.1 200")
        # A TLS 1.2 client offering RSA only (signature algorithms and suites) too.
        seen = await connect(port.getHost().port, dev.ca.cert_pem.encode(),
                             tls_max=SSL.TLS1_2_VERSION,
                             ciphers=b"ECDHE-RSA-AES128-GCM-SHA256:AES128-SHA")
        assert isinstance(seen.key, rsa.RSAPublicKey) and seen.version == "TLSv1.2"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_tls_1_0_client_offering_ecdsa_suites_completes(dev):
    port = await listen(dev)
    try:
        seen = await connect(port.getHost().port, dev.ca.cert_pem.encode(),
                             tls_max=SSL.TLS1_VERSION, ciphers=ECDSA_TLS10)
        assert seen.version == "TLSv1" and seen.answer.startswith(b"HTTP/1.1 200")
        assert isinstance(seen.key, ec.EllipticCurvePublicKey), seen.cipher
        assert seen.cipher == "ECDHE-ECDSA-AES256-SHA"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_embedded_default_serves_both(tmp_path):
    cfg = embedded(tmp_path / "data", port=free_port(), rs_port=free_port(),
                   rs_gate_port=free_port(), tls_minimum_version="1.0")
    top = build_services(cfg, reactor)
    top.startService()
    try:
        ca = (cfg.data_dir / "pki" / "ca.pem").read_bytes()
        port = int(cfg.public_urls[0].rsplit(":", 1)[1].split("/")[0])
        # An SA gate answer (401: no credentials) after each handshake.
        request = b"POST /arms HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
        modern = await connect(port, ca, request=request)
        assert isinstance(modern.key, ec.EllipticCurvePublicKey)
        assert modern.answer.startswith(b"HTTP/1.1 401")
        device = await connect(port, ca, tls_max=SSL.TLS1_VERSION, ciphers=RSA_ONLY_TLS10,
                               request=request)
        assert isinstance(device.key, rsa.RSAPublicKey) and device.version == "TLSv1"
        assert device.answer.startswith(b"HTTP/1.1 401")
        assert (cfg.data_dir / "pki" / "server-ecdsa.pem").is_file()
    finally:
        await top.stopService()


# ---------------------------------------------------------------------------------------------
# Bad configuration: an error naming the setting and the file
# ---------------------------------------------------------------------------------------------


def _conf(tmp_path: Path, dev: pki.DevPKI, extra: str) -> Path:
    conf = tmp_path / "armsproxy.conf"
    conf.write_text(
        f"[armsproxy]\ndata_dir = {tmp_path / 'data'}\n"
        f"[sa_gate]\nlisten = ssl:8443:interface=127.0.0.1:privateKey={dev.server_key_path}:"
        f"certKey={dev.server_cert_path}{extra}\n"
        "public_urls = https://127.0.0.1:8443/arms\n"
        "[rs]\nurl = http://127.0.0.1:8790/RPC2\n"
        f"[push]\nsa_ca = {dev.ca_cert_path}\n"
        "[rs_gate]\nlisten = tcp:8780:interface=127.0.0.1\n"
    )
    return conf


def _problems(tmp_path: Path, dev: pki.DevPKI, extra: str) -> list[str]:
    return check(load(_conf(tmp_path, dev, extra)), reactor)


def test_a_good_ecdsa_pair_in_a_file_passes(tmp_path, dev):
    extra = (f":ecdsaPrivateKey={dev.server_ecdsa_key_path}"
             f":ecdsaCertKey={dev.server_ecdsa_cert_path}")
    assert _problems(tmp_path, dev, extra) == []


def test_relative_ecdsa_paths_are_relative_to_the_file(tmp_path, dev):
    for name in ("server-ecdsa.pem", "server-ecdsa.key"):
        (tmp_path / name).write_bytes((dev.directory / name).read_bytes())
    cfg = load(_conf(tmp_path, dev, ":ecdsaPrivateKey=server-ecdsa.key"
                                    ":ecdsaCertKey=server-ecdsa.pem"))
    assert f"ecdsaCertKey={tmp_path / 'server-ecdsa.pem'}" in cfg.sa_listen
    assert check(cfg, reactor) == []


def test_an_unreadable_ecdsa_file_names_the_setting_and_the_file(tmp_path, dev):
    missing = tmp_path / "nope.key"
    problems = _problems(tmp_path, dev, f":ecdsaPrivateKey={missing}"
                                        f":ecdsaCertKey={dev.server_ecdsa_cert_path}")
    assert problems == [f"[sa_gate] listen: ecdsaPrivateKey={missing}: cannot read: "
                        "No such file or directory"]


def test_an_rsa_key_as_the_ecdsa_one_is_an_error(tmp_path, dev):
    problems = _problems(tmp_path, dev, f":ecdsaPrivateKey={dev.server_key_path}"
                                        f":ecdsaCertKey={dev.server_cert_path}")
    assert len(problems) == 1
    assert problems[0].startswith(f"[sa_gate] listen: ecdsaPrivateKey={dev.server_key_path}: "
                                  "not an ECDSA key (RSA-2048")


def test_an_ecdsa_key_that_does_not_match_its_certificate_is_an_error(tmp_path, dev):
    other = pki.issue_server_cert(dev.ca, ["127.0.0.1"], "other", ecdsa=True)
    (tmp_path / "other.pem").write_text(other.cert_pem)
    problems = _problems(tmp_path, dev, f":ecdsaPrivateKey={dev.server_ecdsa_key_path}"
                                        f":ecdsaCertKey={tmp_path / 'other.pem'}")
    assert problems == [f"[sa_gate] listen: ecdsaCertKey={tmp_path / 'other.pem'}: the "
                        "certificate does not match the key of "
                        f"ecdsaPrivateKey={dev.server_ecdsa_key_path}"]


def test_an_ecdsa_certificate_from_another_ca_is_an_error(tmp_path, dev):
    other = pki.issue_server_cert(pki.make_ca("ARMS Root CA other"), ["127.0.0.1"], "x",
                                  ecdsa=True)
    (tmp_path / "other.pem").write_text(other.cert_pem + other.key_pem)
    problems = _problems(tmp_path, dev, f":ecdsaPrivateKey={tmp_path / 'other.pem'}")
    assert len(problems) == 1
    assert problems[0].startswith(f"[sa_gate] listen: ecdsaCertKey={tmp_path / 'other.pem'}: "
                                  "issued by ")
    assert "both must chain to the CA devices trust" in problems[0]


def test_an_ecdsa_key_beside_an_ecdsa_privatekey_is_an_error(tmp_path, dev):
    conf = _conf(tmp_path, dev, "")
    conf.write_text(conf.read_text().replace(
        f"privateKey={dev.server_key_path}:certKey={dev.server_cert_path}",
        f"privateKey={dev.server_ecdsa_key_path}:certKey={dev.server_ecdsa_cert_path}:"
        f"ecdsaPrivateKey={dev.server_ecdsa_key_path}:"
        f"ecdsaCertKey={dev.server_ecdsa_cert_path}"))
    problems = check(load(conf), reactor)
    assert len(problems) == 1
    assert problems[0].startswith(f"[sa_gate] listen: privateKey={dev.server_ecdsa_key_path}: "
                                  "not an RSA key (ECDSA secp256r1)")


def test_an_ecdsa_certificate_without_its_key_is_an_error(tmp_path, dev):
    problems = _problems(tmp_path, dev, f":ecdsaCertKey={dev.server_ecdsa_cert_path}")
    assert problems == ["[sa_gate] listen: ecdsaCertKey= needs ecdsaPrivateKey= (the ECDSA "
                        "key)"]


def test_tls_listener_refuses_a_p192_key(tmp_path, dev):
    key = ec.generate_private_key(ec.SECP192R1()) if _has_p192() else None
    if key is None:
        pytest.skip("this OpenSSL has no P-192")
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / "p192.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    with pytest.raises(ListenerConfigError, match=r"curve secp192r1 is not one TLS clients"):
        tls_listener(reactor, f"ssl:0:privateKey={dev.server_key_path}:"
                              f"certKey={dev.server_cert_path}:ecdsaPrivateKey={path}:"
                              f"ecdsaCertKey={dev.server_ecdsa_cert_path}", TLSPolicy())


def _has_p192() -> bool:
    try:
        ec.generate_private_key(ec.SECP192R1())
    except Exception:
        return False
    return True


def test_load_keeps_unknown_listener_options_out_of_the_way(tmp_path, dev):
    """The new options are the listener's own: never handed to the tcp: endpoint below."""
    extra = (f":ecdsaPrivateKey={dev.server_ecdsa_key_path}"
             f":ecdsaCertKey={dev.server_ecdsa_cert_path}")
    cfg = load(_conf(tmp_path, dev, extra))
    listener = tls_listener(reactor, cfg.sa_listen, TLSPolicy())
    assert "ecdsa" not in repr(listener.endpoint)
