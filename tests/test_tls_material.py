"""TLS material into OpenSSL contexts as ``cryptography`` objects (#10 point 8).

pyOpenSSL deprecates its own ``X509``/``PKey`` in ``Context.use_certificate``/``use_privatekey``;
every context armsproxy builds (SA gate, RS gate, push client, RS client) must build without a
DeprecationWarning, and unusable material must still be refused at startup with a clear message.
"""

from __future__ import annotations

import warnings

import pytest
import trustme
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from armsproxy.push import SAPushClient
from armsproxy.rs_client import RSClient
from armsproxy.rs_client.client import _load_client_certificate, _load_trust_root, _RSTLSPolicy
from armsproxy.rs_gate.server import tls_options
from armsproxy.tls import (
    ListenerConfigError,
    TLSPolicy,
    certificate_options,
    load_pem_chain,
    load_pem_key,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1")


@pytest.fixture(scope="module")
def other(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("other.invalid")


def _no_deprecation(build) -> object:
    """Run ``build`` recording every warning: none may be a DeprecationWarning."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = build()
    assert [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)] == []
    return result


def test_every_context_builds_without_deprecation_warnings(ca, leaf):
    cert = leaf.cert_chain_pems[0].bytes()
    key = leaf.private_key_pem.bytes()
    both = leaf.private_key_and_cert_chain_pem.bytes()
    ca_pem = ca.cert_pem.bytes()
    _no_deprecation(lambda: certificate_options(
        cert, key, ca_pem, TLSPolicy(minimum_version="1.0", client_ca_pem=ca_pem)))
    _no_deprecation(lambda: tls_options(cert, key, ca_pem, ca_pem).getContext())
    _no_deprecation(lambda: SAPushClient(reactor, sa_ca_pem=ca_pem, client_cert_pem=both))
    _no_deprecation(lambda: RSClient(reactor, "https://127.0.0.1:1/RPC2", ca_pem=ca_pem,
                                     client_cert_pem=both).close())
    # The RS client's context is built per (host, port) on the first connection.
    policy = _RSTLSPolicy(_load_trust_root(ca_pem), _load_client_certificate(both))
    creator = policy.creatorForNetloc(b"127.0.0.1", 1)
    tls = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
    _no_deprecation(lambda: creator.clientConnectionForTLS(tls))


def test_pem_files_may_mix_keys_and_certificates(leaf):
    both = leaf.private_key_and_cert_chain_pem.bytes()  # the key first
    assert load_pem_chain(both)[0].public_bytes  # a cryptography certificate
    assert load_pem_key(both).public_key() is not None
    certificate_options(both, both, None, TLSPolicy())  # one file for privateKey= and certKey=


def test_a_key_that_does_not_fit_is_refused_at_startup(leaf, other):
    cert = leaf.cert_chain_pems[0].bytes()
    wrong = other.private_key_pem.bytes()
    with pytest.raises(ListenerConfigError, match="unusable certificate or key"):
        certificate_options(cert, wrong, None, TLSPolicy())
    with pytest.raises(ListenerConfigError, match="RS gate listener: unusable certificate or key"):
        tls_options(cert, wrong, None, None, require_client_certificate=False)


@pytest.mark.parametrize(("pem", "message"), [
    (b"", "no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "unreadable certificate"),
])
def test_unreadable_certificates_are_refused(leaf, pem, message):
    with pytest.raises(ListenerConfigError, match=message):
        certificate_options(pem, leaf.private_key_pem.bytes(), None, TLSPolicy())


def test_missing_or_encrypted_keys_are_refused(leaf):
    cert = leaf.cert_chain_pems[0].bytes()
    with pytest.raises(ListenerConfigError, match="no PEM private key"):
        certificate_options(cert, cert, None, TLSPolicy())
    encrypted = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n"
                 b"-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(ListenerConfigError, match="unusable private key"):
        certificate_options(cert, encrypted, None, TLSPolicy())


def test_rs_client_certificate_must_fit_its_key(ca, leaf, other):
    url = "https://127.0.0.1:1/RPC2"
    mismatched = leaf.cert_chain_pems[0].bytes() + other.private_key_pem.bytes()
    with pytest.raises(ValueError, match="client_cert_pem: the private key does not match"):
        RSClient(reactor, url, ca_pem=ca.cert_pem.bytes(), client_cert_pem=mismatched)
    with pytest.raises(ValueError, match="client_cert_pem: no PEM private key"):
        RSClient(reactor, url, ca_pem=ca.cert_pem.bytes(),
                 client_cert_pem=leaf.cert_chain_pems[0].bytes())
