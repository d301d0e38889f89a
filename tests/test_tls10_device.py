"""Devices limited to TLS 1.0, as upstream libarms and the devices in the field are (§0.2, §2.1).

One TLS policy holds with devices in both directions (issue #9): the simulated device capped at
TLS 1.0 cannot talk to a TLS-1.2-minimum armsproxy either way, and can once the policy allows
1.0. Failed handshakes are counted by direction and reason and logged once per peer. The
end-to-end runs with a TLS 1.0 device are in test_push_e2e.py and test_tunnel_e2e.py.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from conftest import GatePKI, sa_exchange
from twisted.internet import reactor, task, threads
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol

from armsproxy.device import (
    UPSTREAM_TLS_VERSION,
    SimulatedDevice,
    SimulatedSA,
    SimulatedTunnelDevice,
)
from armsproxy.push import PushTLSError, SAPushClient
from armsproxy.tls import (
    HANDSHAKE_FAILURE_REASONS,
    HandshakeFailures,
    TLSPolicy,
    ssl_failure_reason,
    tls_listener,
)

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
KEY = "harness-rs-key"
VECTORS = Path(__file__).parent / "vectors"
CHECK_BODY = (VECTORS / "simple/07-check-transaction.request.txt").read_bytes().partition(
    b"\r\n\r\n")[2]


class _Closing(Protocol):
    """The gate's application side here: it only needs the handshake; drops the request."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()


async def until(condition, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in time")


async def gate(pki: GatePKI, policy: TLSPolicy, failures: HandshakeFailures) -> IListeningPort:
    listener = tls_listener(reactor, pki.endpoint(0), policy, failures)
    return await listener.listen(Factory.forProtocol(_Closing))


def sa_gate_failures(failures: HandshakeFailures) -> dict[str, int]:
    return {r: n for (d, r), n in failures.counts().items() if d == "sa_gate" and n}


def push_failures(failures: HandshakeFailures) -> dict[str, int]:
    return {r: n for (d, r), n in failures.counts().items() if d == "push" and n}


# ---------------------------------------------------------------------------------------------
# The cap holds, both directions
# ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_tls_1_0_device_as_client_needs_the_policy_at_1_0(gate_pki, logs):
    failures = HandshakeFailures(reactor)
    device = SimulatedSA(reactor, DISTID, KEY, ca_pem=gate_pki.ca_pem,
                         tls_max_version=UPSTREAM_TLS_VERSION)
    strict = await gate(gate_pki, TLSPolicy(), failures)
    try:
        url = f"https://127.0.0.1:{strict.getHost().port}/arms"
        refused = await device.config_solicitation(url)
        assert refused.tls_version is None and "TLS handshake failed" in refused.error
        await until(lambda: sa_gate_failures(failures))
        assert sa_gate_failures(failures) == {"protocol_version": 1}
        assert len(logs.find("TLS handshake with device 127.0.0.1 failed", "[protocol_version]",
                             "tls_minimum_version = 1.0", level="warn")) == 1
    finally:
        await strict.stopListening()
    legacy = await gate(gate_pki, TLSPolicy(minimum_version="1.0"), failures)
    try:
        answered = await device.config_solicitation(
            f"https://127.0.0.1:{legacy.getHost().port}/arms")
        assert answered.tls_version == "TLSv1", answered.error
        # A modern client still gets a modern version from the same policy.
        modern = await SimulatedSA(reactor, DISTID, KEY, ca_pem=gate_pki.ca_pem
                                   ).config_solicitation(
            f"https://127.0.0.1:{legacy.getHost().port}/arms")
        assert modern.tls_version == "TLSv1.3"
    finally:
        await legacy.stopListening()
    assert sa_gate_failures(failures) == {"protocol_version": 1}


@pytest_twisted.ensureDeferred
async def test_a_tls_1_0_device_opens_no_tunnel_to_a_tls_1_2_gate(gate_pki):
    failures = HandshakeFailures(reactor)
    port = await gate(gate_pki, TLSPolicy(), failures)
    device = SimulatedTunnelDevice(
        reactor, DISTID, KEY, ca_pem=gate_pki.ca_pem,
        sa_cert_pem=gate_pki.client.cert_chain_pems[0].bytes(),
        sa_key_pem=gate_pki.client.private_key_pem.bytes(),
        tunnel_urls=[f"https://127.0.0.1:{port.getHost().port}/arms-tunnel"],
        echo_interval=60.0, retry_interval=30.0, tls_max_version=UPSTREAM_TLS_VERSION,
    )
    try:
        await device.start()
        connections = device.tunnels[0].connections
        await until(lambda: connections and connections[0].close_reason)
        assert connections[0].close_reason.startswith("TLS handshake failed"), connections
        assert connections[0].tls_version is None and not device.tunnels[0].connected
        await until(lambda: sa_gate_failures(failures))
        assert sa_gate_failures(failures) == {"protocol_version": 1}
    finally:
        await device.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_tls_1_0_device_listener_takes_only_a_push_client_at_1_0(gate_pki, logs):
    device = SimulatedDevice(
        reactor, DISTID, KEY, ca_pem=gate_pki.ca_pem,
        sa_cert_pem=gate_pki.client.cert_chain_pems[0].bytes(),
        sa_key_pem=gate_pki.client.private_key_pem.bytes(),
        tls_max_version=UPSTREAM_TLS_VERSION,
    )
    port = await device.listen()
    url = f"https://127.0.0.1:{port}/"
    failures = HandshakeFailures(reactor)
    try:
        strict = SAPushClient(reactor, sa_ca_pem=gate_pki.ca_pem, handshake_failures=failures)
        for _ in range(3):  # a confirmation retries every 3 s: one log line, three counts
            with pytest.raises(PushTLSError, match="protocol version") as info:
                await strict.push(url, distribution_id=DISTID, key=KEY, body=CHECK_BODY,
                                  pinned_certificate_pem=None)
            assert info.value.tls_failure == "protocol_version"
        assert push_failures(failures) == {"protocol_version": 3}
        assert len(logs.find("TLS handshake of a push to device 127.0.0.1 failed",
                             f"push to {DISTID} at {url}", "[protocol_version]",
                             level="warn")) == 1
        assert not logs.find(f"push to {DISTID} at {url} failed", level="warn")  # per push
        await until(lambda: len(device.rejected) == 3)
        assert device.received == []
        legacy = SAPushClient(reactor, sa_ca_pem=gate_pki.ca_pem, tls_minimum_version="1.0",
                              handshake_failures=failures)
        answer = await legacy.push(url, distribution_id=DISTID, key=KEY, body=CHECK_BODY,
                                   pinned_certificate_pem=None)
        assert answer.status == 200
        assert [r.tls_version for r in device.received] == ["TLSv1"]
    finally:
        await device.close()


# ---------------------------------------------------------------------------------------------
# Failed handshakes at the SA gate, by reason
# ---------------------------------------------------------------------------------------------


def _raw(port: int, data: bytes) -> None:
    """Blocking: TCP connect, send ``data`` (maybe nothing), read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if data:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass


@pytest_twisted.ensureDeferred
async def test_failed_handshakes_at_the_sa_gate_are_counted_by_reason(gate_pki, logs):
    clock = task.Clock()
    failures = HandshakeFailures(clock)
    port = await gate(gate_pki, TLSPolicy(), failures)
    number = port.getHost().port
    try:
        async def expect(reason: str, count: int) -> None:
            await until(lambda: sa_gate_failures(failures).get(reason) == count)

        old = await sa_exchange(number, [b"x"], ca_pem=gate_pki.ca_pem,
                                tls_version=ssl.TLSVersion.TLSv1)
        assert old.tls_version is None
        await expect("protocol_version", 1)
        foreign = trustme.CA()
        await sa_exchange(number, [b"x"], ca_pem=foreign.cert_pem.bytes())
        await expect("unknown_ca", 1)
        await threads.deferToThread(_raw, number, b"POST /arms HTTP/1.0\r\n\r\n")
        await expect("not_tls", 1)
        await threads.deferToThread(_raw, number, b"\x16\x03\x01\x02")  # half a record
        await expect("closed", 1)
        # A TCP check that says nothing is no handshake; a good client is none either.
        await threads.deferToThread(_raw, number, b"")
        good = await sa_exchange(number, [b"x"], ca_pem=gate_pki.ca_pem)
        assert good.tls_version == "TLSv1.3"
        await sa_exchange(number, [b"x"], ca_pem=gate_pki.ca_pem,
                          tls_version=ssl.TLSVersion.TLSv1)
        await expect("protocol_version", 2)
        assert sa_gate_failures(failures) == {
            "protocol_version": 2, "unknown_ca": 1, "not_tls": 1, "closed": 1}
        # One line per peer and reason: the second TLS 1.0 attempt was only counted...
        assert len(logs.find("[protocol_version]", level="warn")) == 1
        assert len(logs.find("TLS handshake with device 127.0.0.1", level="warn")) == 4
        assert logs.find("does not trust the SA gate's certificate", "[unknown_ca]")
        # ... until an hour has passed.
        clock.advance(3600)
        await sa_exchange(number, [b"x"], ca_pem=gate_pki.ca_pem,
                          tls_version=ssl.TLSVersion.TLSv1)
        await expect("protocol_version", 3)
        assert len(logs.find("[protocol_version]", level="warn")) == 2
    finally:
        await port.stopListening()


# ---------------------------------------------------------------------------------------------
# The recorder: fixed reasons, bounded memory, bounded log
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), [
    ("unsupported protocol", "protocol_version"),
    ("tlsv1 alert protocol version", "protocol_version"),
    ("tlsv1 alert unknown ca", "unknown_ca"),
    ("certificate verify failed", "certificate_verify_failed"),
    ("no shared cipher", "no_shared_cipher"),
    ("tls alert handshake failure", "no_shared_cipher"),
    ("sslv3 alert bad certificate", "bad_certificate"),
    ("http request", "not_tls"),
    ("wrong version number", "not_tls"),
    ("unexpected eof while reading", "closed"),
    ("something new in OpenSSL 4", "other"),
])
def test_openssl_reasons_map_to_a_fixed_set(text, reason):
    assert ssl_failure_reason(text) == reason


def test_every_series_exists_from_the_start_and_labels_stay_bounded():
    failures = HandshakeFailures(task.Clock())
    counts = failures.counts()
    assert set(counts) == {(d, r) for d, rs in HANDSHAKE_FAILURE_REASONS.items() for r in rs}
    assert not any(counts.values())
    failures.record("sa_gate", "192.0.2.1", "pin_mismatch", "x")  # not a gate reason
    failures.record("push", "192.0.2.1", "a peer-chosen string", "x")
    assert set(failures.counts()) == set(counts)
    assert failures.counts()[("sa_gate", "other")] == 1
    assert failures.counts()[("push", "other")] == 1


def test_the_memory_of_logged_peers_is_bounded(logs):
    clock = task.Clock()
    failures = HandshakeFailures(clock, max_peers=3, max_lines=100)
    for i in range(10):
        assert failures.record("sa_gate", f"192.0.2.{i}", "protocol_version", "x")
    assert len(failures._logged) == 3
    assert not failures.record("sa_gate", "192.0.2.9", "protocol_version", "x")  # remembered
    assert failures.record("sa_gate", "192.0.2.0", "protocol_version", "x")  # forgotten: again
    assert failures.counts()[("sa_gate", "protocol_version")] == 12


def test_a_flood_from_many_peers_is_logged_at_a_bounded_rate(logs):
    clock = task.Clock()
    failures = HandshakeFailures(clock, max_lines=2)
    logged = [failures.record("sa_gate", f"198.51.100.{i}", "not_tls", "x") for i in range(5)]
    assert logged == [True, True, False, False, False]
    clock.advance(60)
    assert failures.record("sa_gate", "198.51.100.3", "not_tls", "x")
    assert logs.find("3 more failed TLS handshakes with devices not logged", level="warn")
    assert failures.counts()[("sa_gate", "not_tls")] == 6
