"""The protocol room on its own: hardened parsing, device-safe building, distid, codes."""

from __future__ import annotations

import pytest
from lxml import etree

from armsproxy.arms import codes, guard
from armsproxy.arms.codec import (
    MessageError,
    UnsafeMessageError,
    parse_element,
    parse_message,
    serialise,
)
from armsproxy.arms.distid import DistributionId, DistributionIdError, is_distid
from armsproxy.arms.messages import (
    ArmsRequest,
    ArmsResponse,
    ConfigSolicitationResponse,
    ConfigureStartRequest,
    Empty,
    HeartbeatInfo,
    MdCommand,
    MdCommandRequest,
    MdConfig,
    Module,
    PingStartRequest,
    StatusReport,
    StatusReports,
)
from armsproxy.arms.urls import parse_sa_url, url_problems

DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"
LETTERS = "0001-0000-1A2B-0105-0000-0000-00C0-FFEE"


def _request(body: str, type_: str = "config-solicitation") -> bytes:
    return (
        f'<arms-message><arms-request type="{type_}"><distribution-id>{DISTID}'
        f"</distribution-id>{body}</arms-request></arms-message>"
    ).encode()


GOOD = _request(
    "<description>x</description><config-solicitation-request><protocol-version>4.0"
    "</protocol-version><trigger>power on boot</trigger></config-solicitation-request>"
)


def test_good_request_parses():
    message = parse_message(GOOD)
    assert isinstance(message, ArmsRequest)
    assert message.distribution_id == DISTID
    assert message.body.trigger == "power on boot"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "invalid-xml"),
        (b"<arms-message><arms-request", "invalid-xml"),
        (GOOD.replace(b"power", "p\u00f6wer".encode()), "non-ascii"),
        (b'<!DOCTYPE x [<!ENTITY a "aaaa">]>' + GOOD, "forbidden-markup"),
        (b'<!doctype arms-message SYSTEM "file:///etc/passwd">' + GOOD, "forbidden-markup"),
        (
            b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY l0 "ha"><!ENTITY l1 "&l0;&l0;&l0;">'
            b"]>" + GOOD.replace(b"power on boot", b"&l1;"),
            "forbidden-markup",
        ),
        (GOOD.replace(b"power on boot", b"&undefined;"), "invalid-xml"),
        (b"<arms-message>" + b"<a>" * 40 + b"</a>" * 40 + b"</arms-message>", "too-deep"),
        (GOOD.replace(b"x</description>", b"x" * (1024 * 1024 + 1) + b"</description>"),
         "too-large"),
        (GOOD.replace(DISTID.encode(), LETTERS.lower().encode()), "schema"),
        (_request("<result-url>https://1.2.3.4/</result-url><ping-done-request/>", "ping-start"),
         "schema"),
    ],
)
def test_hostile_or_malformed_input_is_refused(data, reason):
    with pytest.raises(MessageError) as err:
        parse_message(data)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'<?xml version="1.0" encoding="UTF-7"?>' + GOOD.replace(b"power", b"+AOk-"),
         "encoding"),
        (b"<?xml version='1.0' encoding = 'iso-2022-jp'?>" + GOOD, "encoding"),
        (GOOD.decode().encode("utf-16-le"), "encoding"),
        (GOOD.replace(b"power", b"p\x00wer"), "encoding"),
        (GOOD.replace(b"<trigger>", b"<trigger" + b"".join(b' a%d="1"' % i for i in range(33))
                      + b">"), "too-many-attributes"),
        (GOOD.replace(b"<trigger>", b"<trigger" + b"".join(b' xmlns:a%d="u"' % i for i in range(33))
                      + b">"), "too-many-attributes"),
        (GOOD.replace(b"<trigger>", b"<trigger>" + b"<a/>" * 4100), "too-many-elements"),
        (GOOD.replace(b"<trigger>", b"<trigger>" + b"<a></a>" * 4100), "too-many-elements"),
    ],
)
def test_other_encodings_and_too_many_nodes_are_refused(data, reason):
    with pytest.raises(MessageError) as err:
        parse_message(data)
    assert err.value.reason == reason


def test_the_reused_parsers_recover_from_every_refusal():
    """The thread's parsers are made once: a document refused half-way (a limit, bad XML)
    leaves nothing behind for the next one, on either path (small documents parsed whole,
    bigger ones counted)."""
    deep = b"<arms-message>" + b"<a>" * 40 + b"</a>" * 40 + b"</arms-message>"
    many = GOOD.replace(b"<trigger>", b"<trigger>" + b"<a/>" * 4100)
    big_good = _request("<description>" + "x" * 9000 + "</description>"
                        "<config-solicitation-request><protocol-version>4.0</protocol-version>"
                        "<trigger>power on boot</trigger></config-solicitation-request>")
    cut = big_good[:-40]
    for bad, reason in ((deep, "too-deep"), (many, "too-many-elements"),
                        (b"<arms-message><a>", "invalid-xml"), (cut, "invalid-xml"),
                        (GOOD[:-20], "invalid-xml")):
        with pytest.raises(MessageError) as caught:
            parse_message(bad)
        assert caught.value.reason == reason
        for good in (GOOD, big_good):
            assert parse_message(good).body.trigger == "power on boot"
        assert len(parse_element(b"<arms-message>" + b"<a/>" * 30 + b"</arms-message>")) == 30


def test_both_parse_paths_build_the_same_tree():
    from armsproxy.arms import codec

    whole = codec._parse_whole(GOOD)
    counted = codec._parse_counted(GOOD, max_depth=16, max_elements=4096, max_attributes=4096)
    assert etree.tostring(whole) == etree.tostring(counted)
    # A limit below what the counts allow takes the counted path and still refuses.
    with pytest.raises(MessageError, match="too-deep"):
        codec.parse_element(GOOD, max_depth=3)


def test_declared_ascii_and_utf8_are_taken_and_references_kept_unless_asked():
    for encoding in (b"US-ASCII", b"us-ascii", b"ASCII", b"UTF-8", b"utf-8"):
        data = b'<?xml version="1.0" encoding="' + encoding + b'"?>' + GOOD.replace(
            b"<description>x", b"<description>caf&#233;")
        assert parse_message(data).description == "caf\u00e9"
        with pytest.raises(MessageError) as err:
            parse_message(data, ascii_text=True)
        assert err.value.reason == "non-ascii"
        assert "U+00E9" in err.value.detail


def test_a_refusal_quotes_little_of_a_huge_input():
    # libxml2 quotes the whole value: this one was a 64 KB log line.
    with pytest.raises(MessageError) as err:
        parse_message(GOOD.replace(DISTID.encode(), b"A" * 500_000))
    assert err.value.reason == "schema"
    assert len(str(err.value)) < 500


def test_an_integer_python_will_not_convert_is_an_invalid_value():
    data = _request("<transaction-id>" + "1" * 5000 + "</transaction-id>"
                    "<ping-done-request/>", "ping-done")
    with pytest.raises(MessageError) as err:  # was a ValueError: the SA gate answered 500
        parse_message(data)
    assert err.value.reason == "invalid-value"


def test_xxe_is_never_resolved(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    data = (f'<!DOCTYPE m [<!ENTITY x SYSTEM "file://{secret}">]>').encode() + GOOD.replace(
        b"power on boot", b"&x;"
    )
    with pytest.raises(MessageError) as err:
        parse_message(data)
    assert "TOPSECRET" not in str(err.value)


def test_serialise_is_ascii_with_character_references():
    message = ArmsResponse(
        type="md-command", result_code=100, description="caf\u00e9 \u2603",
        body=Empty(),
    )
    data = serialise(message)
    assert data.isascii()
    assert b"caf&#233; &#9731;" in data
    assert data.startswith(b'<?xml version="1.0" encoding="US-ASCII"?>\n<arms-message>')
    assert parse_message(data).description == "caf\u00e9 \u2603"


def test_integers_are_written_without_whitespace_and_empty_bodies_as_pairs():
    message = ArmsResponse(type="ping-done", result_code=100, description="OK",
                           transaction_id=42, body=Empty())
    data = serialise(message)
    assert b"<result-code>100</result-code>" in data
    assert b"<transaction-id>42</transaction-id>" in data
    assert b"<ping-done-response></ping-done-response>" in data


def _config(**overrides) -> ConfigSolicitationResponse:
    body = ConfigSolicitationResponse(
        heartbeats=[HeartbeatInfo(host="192.0.2.1", passphrase="p", port=1, interval=60)],
        rs_pull_server_urls=["https://192.0.2.2/arms"],
        modules=[Module(id=1, version="1.0", location="m")],
        md_configs=[MdConfig(id=1, data="hostname x\n", content_type="text/plain")],
    )
    for k, v in overrides.items():
        setattr(body, k, v)
    return body


def test_config_answer_puts_modules_before_configs_and_keeps_content_type():
    body = _config(
        modules=[Module(1, "1.0", "a"), Module(2, "2.0", "b", install_order=2)],
        md_configs=[MdConfig(1, "x"), MdConfig(2, b"\x00\x01binary", commit_order=1)],
    )
    data = serialise(ArmsResponse(type="config-solicitation", result_code=100, body=body))
    root = etree.fromstring(data)
    tags = [c.tag for c in root.find("arms-response/config-solicitation-response")]
    assert tags.index("md-config") > max(i for i, t in enumerate(tags) if t == "module")
    assert b'encoding="base64">AAFiaW5hcnk=</md-config>' in data
    assert parse_message(data).body.md_configs[1].data == b"\x00\x01binary"


def test_configure_start_drops_content_type():
    body = ConfigureStartRequest(modules=[Module(1, "1", "m")],
                                 md_configs=[MdConfig(1, "x", content_type="text/plain")])
    data = serialise(ArmsRequest(type="configure-start", distribution_id=DISTID, body=body,
                                 result_url="https://192.0.2.2/arms"))
    assert b"content-type" not in data


SIX_URLS = [f"https://192.0.2.{i}/" for i in range(6)]


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (ArmsResponse(type="config-solicitation", result_code=100, body=_config(heartbeats=[])),
         "heartbeat-info"),
        (ArmsResponse(type="config-solicitation", result_code=100,
                      body=_config(heartbeats=[HeartbeatInfo("192.0.2.1", "p", interval=0)])),
         "interval"),
        (ArmsResponse(type="config-solicitation", result_code=100,
                      body=_config(rs_pull_server_urls=["https://proxy.example/arms"])),
         "literal IP"),
        (ArmsResponse(type="config-solicitation", result_code=100,
                      body=_config(rs_pull_server_urls=SIX_URLS)),
         "more than 5"),
        (ArmsResponse(type="push-confirmation-start", result_code=100, body=Empty()),
         "transaction-id"),
        (ArmsResponse(type="ping-done", result_code=100, body=Empty()), "transaction-id"),
        (ArmsRequest(type="configure-start", distribution_id=DISTID,
                     body=ConfigureStartRequest(md_configs=[MdConfig(1, "x")])), "removes every"),
        (ArmsRequest(type="md-command", distribution_id=DISTID,
                     body=MdCommandRequest([MdCommand(1, "a"), MdCommand(1, "b")])), "exactly one"),
        (ArmsRequest(type="ping-start", distribution_id=DISTID, body=PingStartRequest(count=1)),
         "address"),
        (ArmsRequest(type="ping-start", distribution_id=DISTID, transaction_id=5,
                     body=PingStartRequest(address="192.0.2.9")), "transaction-id"),
    ],
)
def test_device_breaking_messages_are_refused(message, problem):
    with pytest.raises(UnsafeMessageError) as err:
        serialise(message)
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_guard_catches_hand_built_attribute_and_order_faults():
    xml = (
        b'<arms-message><arms-response type="configure-done" xml:lang="en"><result-code>100'
        b"</result-code><transaction-id>7</transaction-id></arms-response></arms-message>"
    )
    assert any("xml:lang" in p or "lang" in p for p in guard.problems(etree.fromstring(xml)))
    xml = (
        b'<arms-message><arms-response type="config-solicitation"><result-code>100</result-code>'
        b"<config-solicitation-response><heartbeat-info><host>192.0.2.1</host><passphrase>p"
        b"</passphrase><interval>60</interval></heartbeat-info><rs-pull-server-url>"
        b'https://192.0.2.2/</rs-pull-server-url><md-config id="1">x</md-config>'
        b'<module id="1" version="1">m</module></config-solicitation-response></arms-response>'
        b"</arms-message>"
    )
    assert any("after" in p for p in guard.problems(etree.fromstring(xml)))
    xml = xml.replace(b"<interval>60</interval>", b"<interval>60\n</interval>")
    assert any("whitespace" in p for p in guard.problems(etree.fromstring(xml)))


def test_status_reports_round_trip_binary():
    body = StatusReports([StatusReport(1, 100, "text"), StatusReport(2, 402, b"\xff\x00")])
    data = serialise(ArmsRequest(type="read-status-done", distribution_id=DISTID,
                                 transaction_id=1, transaction_result=100, body=body),
                     check=False)
    assert parse_message(data).body == body


# -- distid -----------------------------------------------------------------------------------


def test_distid_text_and_bytes():
    d = DistributionId.from_text("0001-0000-1A2B-0105-0000-0000-00C0-FFEE")
    assert (d.version, d.vendor, d.sa_type, d.code) == (1, 0x1A2B, 0x0105, 0xC0FFEE)
    assert d.text == "0001-0000-1A2B-0105-0000-0000-00C0-FFEE"
    assert DistributionId.from_bytes(d.to_bytes()) == d
    assert DistributionId.from_text(DISTID).reserved_fields()  # SA type 0x0004: reserved range


@pytest.mark.parametrize(
    "text",
    [LETTERS.lower(), DISTID + " ", DISTID.replace("-", ""), "0001-0002", "", "G001" + DISTID[4:]],
)
def test_distid_rejects_other_spellings(text):
    assert not is_distid(text)
    with pytest.raises(DistributionIdError):
        DistributionId.from_text(text)


# -- codes and URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code", "reaction"),
    [
        ("config-solicitation", 100, codes.Reaction.SUCCESS),
        ("config-solicitation", 201, codes.Reaction.REBOOT),
        ("config-solicitation", 301, codes.Reaction.RETRY),
        ("config-solicitation", 502, codes.Reaction.REPULL),
        ("config-solicitation", 501, codes.Reaction.STOP),
        ("push-method-query", 301, codes.Reaction.RETRY),
        ("push-method-query", 507, codes.Reaction.REPULL),
        ("push-confirmation-start", 301, codes.Reaction.DROP_SERVER),
        ("push-confirmation-start", 503, codes.Reaction.REBOOT),
        ("configure-done", 412, codes.Reaction.ROLLBACK),
        ("configure-done", 508, codes.Reaction.REPULL),
        ("ping-done", 412, codes.Reaction.FINISHED),
        ("ping-done", 201, codes.Reaction.REPULL),
    ],
)
def test_sa_reactions(message, code, reaction):
    assert codes.sa_reaction(message, code) == reaction


def test_our_own_retry_code_is_safe_for_every_pull():
    for message in ("config-solicitation", "push-method-query", "push-confirmation-start"):
        assert codes.sa_reaction(message, codes.SERVER_BUSY) in codes.SAFE_REACTIONS
    assert codes.label(423) == "Distribution ID Mismatch"
    assert codes.label(999) == "Unknown result"


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://192.0.2.1/arms", True),
        ("https://[2001:db8::1]:8443/arms", True),
        ("https://proxy.example.net/arms", False),
        ("http://192.0.2.1/arms", False),
        ("https://192.0.2.1/" + "p" * 80, False),
        ("https://192.0.2.1/a b", False),
    ],
)
def test_sa_urls(url, ok):
    assert (url_problems(url) == []) is ok


def test_parse_sa_url_defaults_port():
    assert parse_sa_url("https://192.0.2.1/arms").port == 443
