"""schemas/arms.xsd and armsproxy.arms.schema against real device captures and bad documents.

The capture bodies are cut out of the files by a small local helper (HTTP header block,
chunk framing) so these tests do not depend on the real framing module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from armsproxy.arms import schema
from armsproxy.arms.schema import SchemaError, explain, type_matches_body, validate

VECTORS = Path(__file__).parent / "vectors"
REPO = Path(__file__).resolve().parent.parent
DISTID = "0001-0002-0003-0004-0005-0006-0007-0008"

# Captured messages that must NOT validate, with a fragment of the reason.
#  * 30: a damaged answer (xml:lang on arms-response) the device could not read (§3.1).
#  * 10: the harness probed the SA with an operation that does not exist; the SA answered
#    202 generic-error. An unknown body element is exactly what the schema rejects.
EXPECTED_INVALID = {
    "simple-errors/30-configure-done.response.txt": "lang",
    "simple-errors/10-unknown-operation.request.txt": "no-such-operation-request",
}
# Number of capture files per folder that carry an ARMS XML body (the others are tunnel
# opens, echoes, the last chunk, and SA answers without XML: 400/401/dropped connection).
XML_BODIES_PER_FOLDER = {"simple": 49, "simple-errors": 58, "tunnel": 52}


# ---------------------------------------------------------------------------------------------
# Capture extraction (local, deliberately independent of armsproxy's framing code).


def _dechunk(data: bytes) -> bytes:
    """Strict chunked decoding: ``hex[;ext]\\r\\n`` + exactly that many bytes + ``\\r\\n``."""
    out = bytearray()
    pos = 0
    while pos < len(data):
        eol = data.index(b"\r\n", pos)
        size = int(data[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            break
        out += data[pos : pos + size]
        pos += size
        assert data[pos : pos + 2] == b"\r\n", f"chunk data not followed by CRLF at {pos}"
        pos += 2
    return bytes(out)


def _xml_body(raw: bytes) -> bytes | None:
    """The ARMS XML of one capture file, or None if it carries none."""
    if raw.startswith((b"POST ", b"HTTP/")):
        head, sep, body = raw.partition(b"\r\n\r\n")
        assert sep, "no end of header block"
        if b"<arms-message" not in body:
            return None
        if b"\r\ntransfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return body
    if b"<arms-message" not in raw:
        return None
    return _dechunk(raw)  # a tunnel message: the whole file is chunk framing


def _captures() -> list[tuple[str, bytes]]:
    found = []
    for path in sorted(VECTORS.glob("*/*.txt")):
        body = _xml_body(path.read_bytes())
        if body is not None:
            found.append((f"{path.parent.name}/{path.name}", body))
    return found


CAPTURES = _captures()


def _parse(xml: bytes | str) -> etree._Element:
    if isinstance(xml, str):
        xml = xml.encode("ascii")
    return etree.fromstring(xml)


def _lxml_ok(xml: bytes | str) -> bool:
    try:
        validate(_parse(xml))
    except SchemaError:
        return False
    return True


def _xmlschema_ok(xml: bytes | str) -> bool:
    data = xml.encode("ascii") if isinstance(xml, str) else xml
    return explain(data, naming=False) == []


# ---------------------------------------------------------------------------------------------
# Captures


def test_extraction_found_every_capture_body():
    per_folder: dict[str, int] = {}
    for name, _ in CAPTURES:
        folder = name.split("/")[0]
        per_folder[folder] = per_folder.get(folder, 0) + 1
    assert per_folder == XML_BODIES_PER_FOLDER
    assert set(EXPECTED_INVALID) <= {name for name, _ in CAPTURES}


def test_dechunking_keeps_text_split_across_chunks_exact():
    # The status text is cut between two chunks; framing CRLFs must not leak into it.
    body = dict(CAPTURES)["tunnel/14-read-status-done.request.txt"]
    report = _parse(body).find(".//status-report")
    assert report.text == "id=1: get_status_cb() result"
    body = dict(CAPTURES)["simple/21-read-storage-done.request.txt"]
    config = _parse(body).find(".//md-config")
    assert config.text == "hostname harness-sa\ninterface lan0 address 192.0.2.10/24\n"


@pytest.mark.parametrize(("name", "body"), CAPTURES, ids=[n for n, _ in CAPTURES])
def test_capture_against_schema(name, body):
    root = _parse(body)
    if name in EXPECTED_INVALID:
        with pytest.raises(SchemaError, match=EXPECTED_INVALID[name]) as info:
            validate(root)
        assert info.value.line == 2  # after the XML declaration line
        assert info.value.path.startswith("/arms-message/")
        problems = explain(body)
        assert problems and EXPECTED_INVALID[name] in problems[0]
    else:
        validate(root)
        assert explain(body) == []


@pytest.mark.parametrize(("name", "body"), CAPTURES, ids=[n for n, _ in CAPTURES])
def test_capture_type_names_its_body(name, body):
    inner = _parse(body)[0]
    bodies = [c.tag for c in inner if c.tag.endswith(("-request", "-response"))]
    assert len(bodies) <= 1
    assert type_matches_body(
        inner.get("type"), bodies[0] if bodies else None, is_request=inner.tag == "arms-request"
    )


def test_only_the_expected_captures_are_invalid():
    invalid = [name for name, body in CAPTURES if not _lxml_ok(body)]
    assert sorted(invalid) == sorted(EXPECTED_INVALID)


# ---------------------------------------------------------------------------------------------
# Hand-written documents


def _request(type_: str, body: str, head: str = f"<distribution-id>{DISTID}</distribution-id>",
             attrs: str = "") -> str:
    return (f'<arms-message><arms-request type="{type_}"{attrs}>{head}{body}'
            "</arms-request></arms-message>")


def _response(type_: str, body: str = "",
              head: str = "<result-code>100</result-code><description>OK</description>",
              attrs: str = "") -> str:
    return (f'<arms-message><arms-response type="{type_}"{attrs}>{head}{body}'
            "</arms-response></arms-message>")


def _heartbeat(n: int) -> str:
    return (f"<heartbeat-info><host>192.0.2.{n}</host><port>5000</port>"
            "<passphrase>p</passphrase><interval>60</interval></heartbeat-info>")


# (id, document, fragment the lxml message must contain)
BAD = [
    ("integer-leading-space",
     _response("ping-done", head="<result-code> 100</result-code>"), "result-code"),
    ("integer-trailing-newline",
     _request("configure-done", "<configure-done-request/>",
              head=f"<transaction-result>100</transaction-result>"
                   f"<distribution-id>{DISTID}</distribution-id>"
                   "<transaction-id>5\n</transaction-id>"), "transaction-id"),
    ("integer-in-body-with-space",
     _request("ping-start", "<ping-start-request><address>192.0.2.1</address>"
                            "<count>3 </count></ping-start-request>"), "count"),
    ("integer-empty", _response("reboot", head="<result-code></result-code>"), "result-code"),
    ("lowercase-distid",
     _request("reboot", "<reboot-request/>",
              head=f"<distribution-id>{DISTID.replace('0008', '00af')}</distribution-id>"),
     "distribution-id"),
    ("distid-padded",
     _request("reboot", "<reboot-request/>", head=f"<distribution-id>{DISTID} </distribution-id>"),
     "distribution-id"),
    ("extra-attribute-on-arms-request",
     _request("reboot", "<reboot-request/>", attrs=' foo="bar"'), "foo"),
    ("xml-lang-on-arms-response",
     _response("configure-done", attrs=' xml:lang="en"'), "lang"),
    ("attribute-on-arms-message",
     '<arms-message version="1"><arms-request type="reboot"/></arms-message>', "version"),
    ("xmlns-on-arms-message",
     '<arms-message xmlns="urn:x"><arms-request type="reboot"/></arms-message>', "arms-message"),
    ("module-id-attribute-on-md-command",
     _request("md-command",
              '<md-command-request><md-command module-id="1">show</md-command>'
              "</md-command-request>"),
     "module-id"),
    ("content-type-in-configure-start",
     _request("configure-start",
              '<configure-start-request><module id="1" version="1">m</module>'
              '<md-config id="1" content-type="text/plain">x</md-config>'
              "</configure-start-request>"),
     "content-type"),
    ("module-after-md-config-in-configure-start",
     _request("configure-start",
              '<configure-start-request><module id="1" version="1">m</module>'
              '<md-config id="1">x</md-config><module id="2" version="1">n</module>'
              "</configure-start-request>"), "module"),
    ("module-after-md-config-in-config-solicitation",
     _response("config-solicitation",
               '<config-solicitation-response><md-config id="1">x</md-config>'
               '<module id="1" version="1">m</module></config-solicitation-response>'), "module"),
    ("unknown-body-element",
     _request("no-such-operation", "<no-such-operation-request/>"), "no-such-operation-request"),
    ("six-push-methods",
     _response("push-method-query",
               "<push-method-query-response>"
               + "<push-method>https-simple</push-method>" * 6
               + "</push-method-query-response>"), "push-method"),
    ("six-https-tunnel-urls",
     _response("push-method-query",
               "<push-method-query-response><push-method>https-tunnel</push-method>"
               + "<https-tunnel-url>https://192.0.2.1/t</https-tunnel-url>" * 6
               + "</push-method-query-response>"), "https-tunnel-url"),
    ("six-heartbeat-infos",
     _response("config-solicitation",
               "<config-solicitation-response>"
               + "".join(_heartbeat(i) for i in range(6))
               + "</config-solicitation-response>"), "heartbeat-info"),
    ("six-rs-pull-server-urls",
     _response("config-solicitation",
               "<config-solicitation-response>"
               + "<rs-pull-server-url>https://192.0.2.1/p</rs-pull-server-url>" * 6
               + "</config-solicitation-response>"), "rs-pull-server-url"),
    ("six-rs-infos",
     _response("rs-solicitation",
               "<rs-solicitation-response>"
               + "<rs-info><url>https://192.0.2.1/rs</url></rs-info>" * 6
               + "</rs-solicitation-response>"), "rs-info"),
    ("heartbeat-without-passphrase",
     _response("config-solicitation",
               "<config-solicitation-response><heartbeat-info><host>192.0.2.1</host>"
               "<interval>60</interval></heartbeat-info></config-solicitation-response>"),
     "passphrase"),
    ("missing-result-code",
     _response("reboot", "<reboot-response/>", head="<description>OK</description>"),
     "result-code"),
    ("two-transaction-ids",
     _response("ping-done",
               head="<transaction-id>1</transaction-id><result-code>100</result-code>"
                    "<description>OK</description><transaction-id>1</transaction-id>"),
     "transaction-id"),
    ("two-body-elements",
     _request("reboot", "<reboot-request/><reboot-request/>"), "reboot-request"),
    ("request-body-in-response", _response("reboot", "<reboot-request/>"), "reboot-request"),
    ("two-md-commands",
     _request("md-command",
              '<md-command-request><md-command id="1">a</md-command>'
              '<md-command id="1">b</md-command></md-command-request>'), "md-command"),
    ("unknown-encoding",
     _request("read-status-start",
              '<read-status-start-request><status-request id="1" encoding="base-64">'
              "AA==</status-request></read-status-start-request>"), "encoding"),
    ("text-in-empty-body", _request("reboot", "<reboot-request>now</reboot-request>"),
     "reboot-request"),
    ("child-in-empty-body", _request("reboot", "<reboot-request><x/></reboot-request>"),
     "reboot-request"),
    ("missing-type",
     f"<arms-message><arms-request><distribution-id>{DISTID}</distribution-id>"
     "</arms-request></arms-message>", "type"),
    ("wrong-root", '<arms-request type="reboot"><reboot-request/></arms-request>',
     "arms-request"),
    ("module-id-not-a-number",
     _response("read-module-list",
               '<read-module-list-response><module id="one" version="1">m</module>'
               "</read-module-list-response>"), "id"),
    ("status-report-without-result",
     _request("read-status-done", '<read-status-done-request><status-report id="1">x'
                                  "</status-report></read-status-done-request>"), "result"),
    ("padded-result-url",
     _request("ping-start", "<ping-start-request/>",
              head=f"<distribution-id>{DISTID}</distribution-id>"
                   "<result-url> https://192.0.2.1/r</result-url>"), "result-url"),
    ("envelope-out-of-order",
     _request("reboot", "<reboot-request/>",
              head=f"<description>d</description><distribution-id>{DISTID}</distribution-id>"),
     "distribution-id"),
]

# Valid documents that are not in the captures: the §13 examples (pretty-printed, as the
# spec allows towards the SA) and the less common shapes.
GOOD = [
    ("spec-13.2-config-solicitation-response", """<?xml version="1.0" encoding="US-ASCII"?>
<arms-message>
  <arms-response type="config-solicitation">
    <result-code>100</result-code>
    <description>OK</description>
    <config-solicitation-response>
      <sa-certificate>-----BEGIN CERTIFICATE-----
MIIC...
-----END CERTIFICATE-----
</sa-certificate>
      <sa-private-key>-----BEGIN PRIVATE KEY-----
MIIE...
-----END PRIVATE KEY-----
</sa-private-key>
      <proposal-for-sa>
        <push-timeout>600</push-timeout>
        <push-port>10443</push-port>
      </proposal-for-sa>
      <heartbeat-info>
        <host>203.0.113.30</host>
        <port>5000</port>
        <passphrase>hb-secret-9</passphrase>
        <interval>300</interval>
        <algorithm>hmac-sha1</algorithm>
      </heartbeat-info>
      <rs-push-server-address>203.0.113.20</rs-push-server-address>
      <rs-pull-server-url>https://203.0.113.20:8443/arms/pull</rs-pull-server-url>
      <module id="10" version="3.1" install-order="1">https://203.0.113.10/pkg/router-base</module>
      <module id="11" version="1.0" install-order="2">https://203.0.113.10/pkg/vpn</module>
      <md-config id="10" content-type="text/plain">hostname edge-router-17
interface lan0 address 192.168.10.1/24
</md-config>
      <md-config id="11" encoding="base64">iUNGRwAB</md-config>
    </config-solicitation-response>
  </arms-response>
</arms-message>"""),
    ("spec-13.3-push-method-query-response", """<arms-message>
  <arms-response type="push-method-query">
    <result-code>100</result-code>
    <description>OK</description>
    <push-method-query-response>
      <push-method>https-tunnel</push-method>
      <push-method>https-simple</push-method>
      <https-tunnel-url>https://203.0.113.20:8444/arms/tunnel</https-tunnel-url>
      <https-tunnel-echo-interval>60</https-tunnel-echo-interval>
    </push-method-query-response>
  </arms-response>
</arms-message>"""),
    ("spec-13.4-push-confirmation-start-response-without-body", """<arms-message>
  <arms-response type="push-confirmation-start">
    <result-code>100</result-code>
    <description>OK</description>
    <transaction-id>5501</transaction-id>
  </arms-response>
</arms-message>"""),
    ("spec-13.5-push-confirmation-done-request-self-closing", f"""<arms-message>
  <arms-request type="push-confirmation-done">
    <distribution-id>{DISTID}</distribution-id>
    <transaction-id>5501</transaction-id>
    <push-confirmation-done-request/>
  </arms-request>
</arms-message>"""),
    ("spec-13.6-done-response-transaction-id-first", """<arms-message>
  <arms-response type="configure-done">
    <transaction-id>918273645</transaction-id>
    <result-code>100</result-code>
    <description>OK</description>
  </arms-response>
</arms-message>"""),
    ("spec-13.7-read-status-start-base64", f"""<arms-message>
  <arms-request type="read-status-start">
    <distribution-id>{DISTID}</distribution-id>
    <result-url>https://203.0.113.20:8443/arms/pull</result-url>
    <read-status-start-request>
      <status-request id="10">interfaces</status-request>
      <status-request id="11" encoding="base64">AQJiaW4=</status-request>
    </read-status-start-request>
  </arms-request>
</arms-message>"""),
    ("spec-13.7-read-status-done-base64",
     _request("read-status-done",
              '<read-status-done-request>'
              '<status-report id="10" result="100">lan0 up</status-report>'
              '<status-report id="11" encoding="base64" result="100">dXB0aW1lCg==</status-report>'
              "</read-status-done-request>",
              head=f"<transaction-result>100</transaction-result>"
                   f"<distribution-id>{DISTID}</distribution-id>"
                   "<transaction-id>918273645</transaction-id><description>d</description>")),
    ("spec-13.10-ping-done-failure-empty-body",
     _request("ping-done", "<ping-done-request></ping-done-request>",
              head=f"<transaction-result>502</transaction-result>"
                   f"<distribution-id>{DISTID}</distribution-id>"
                   "<transaction-id>1</transaction-id>")),
    ("spec-13.16-pull-config", _request("pull-config", "<pull-config-request><type>LS</type>"
                                                      "</pull-config-request>")),
    ("spec-13.17-error-answer-with-transaction-id",
     _response("ping-start", "<ping-start-response></ping-start-response>",
               head="<transaction-id>1187001</transaction-id><result-code>423</result-code>"
                    "<description>Distribution ID Mismatch</description>")),
    ("ping-start-children-in-any-order",
     _request("ping-start", "<ping-start-request><size>56</size><address>192.0.2.53</address>"
                            "<count>4</count></ping-start-request>")),
    ("hex-module-id-and-empty-version",
     _response("read-module-list",
               '<read-module-list-response><module id="0x1A" version="">m</module>'
               "</read-module-list-response>")),
    ("ls-answer-with-result-description-and-error-reason",
     _response("rs-solicitation", "<rs-solicitation-response/>",
               head="<result-code>301</result-code><description>busy</description>"
                    "<result-description>later</result-description>"
                    "<error-reason>maintenance</error-reason>")),
    ("negative-result-code", _response("reboot", head="<result-code>-1</result-code>")),
    ("empty-body-with-whitespace", _request("reboot", "<reboot-request>\n  </reboot-request>")),
    ("request-without-body", _request("check-transaction", "")),
    ("comments-and-processing-instructions",
     "<arms-message><!-- c --><?pi x?><arms-request type=\"reboot\"><!-- d -->"
     "<reboot-request/></arms-request></arms-message>"),
    ("five-of-each",
     _response("push-method-query",
               "<push-method-query-response>"
               + "<push-method>https-simple</push-method>" * 5
               + "<https-tunnel-url>https://192.0.2.1/t</https-tunnel-url>" * 5
               + "</push-method-query-response>")),
    ("five-heartbeats",
     _response("config-solicitation",
               "<config-solicitation-response>"
               + "".join(_heartbeat(i) for i in range(5))
               + "</config-solicitation-response>")),
    ("generic-error", _response("generic-error", "<generic-error-response/>",
                                head="<result-code>202</result-code>"
                                     "<description>Invalid Message type</description>")),
]


@pytest.mark.parametrize(("doc", "fragment"), [(d, f) for _, d, f in BAD],
                         ids=[i for i, _, _ in BAD])
def test_bad_document_is_rejected_by_both_validators(doc, fragment):
    with pytest.raises(SchemaError) as info:
        validate(_parse(doc))
    message = str(info.value)
    assert message.startswith(f"line {info.value.line}: /")
    assert fragment in message
    assert "\n" not in message  # one log line, even when the bad value holds a newline
    problems = explain(doc.encode("ascii"))
    assert problems, "xmlschema accepted a document lxml rejects"
    assert all(p.startswith("line ") for p in problems)


@pytest.mark.parametrize("doc", [d for _, d in GOOD], ids=[i for i, _ in GOOD])
def test_good_document_is_accepted_by_both_validators(doc):
    validate(_parse(doc))
    assert explain(doc.encode("ascii")) == []


def test_validators_agree_on_everything():
    docs = [body for _, body in CAPTURES] + [d for _, d, _ in BAD] + [d for _, d in GOOD]
    disagreements = [d for d in docs if _lxml_ok(d) != _xmlschema_ok(d)]
    assert disagreements == []


def test_content_type_is_allowed_only_in_config_solicitation_response():
    config = '<md-config id="1" content-type="text/plain">x</md-config>'
    module = '<module id="1" version="1">m</module>'
    assert _lxml_ok(_response("config-solicitation",
                              f"<config-solicitation-response>{module}{config}"
                              "</config-solicitation-response>"))
    assert not _lxml_ok(_request("configure-start",
                                 f"<configure-start-request>{module}{config}"
                                 "</configure-start-request>"))
    assert not _lxml_ok(_request("read-storage-done",
                                 f"<read-storage-done-request>{config}"
                                 "</read-storage-done-request>"))


# ---------------------------------------------------------------------------------------------
# explain() extras


def test_explain_reports_a_naming_mismatch_the_schema_cannot_see():
    doc = _request("ping-start", "<traceroute-start-request/>").encode("ascii")
    validate(_parse(doc))  # structurally fine
    problems = explain(doc)
    assert len(problems) == 1
    assert "traceroute-start-request" in problems[0] and "'ping-start'" in problems[0]
    assert explain(doc, naming=False) == []


def test_explain_reports_malformed_xml():
    problems = explain(b"<arms-message><arms-request type='reboot'></arms-message>")
    assert len(problems) == 1 and problems[0].startswith("not well-formed XML")


def test_explain_does_not_resolve_external_entities():
    doc = (b'<!DOCTYPE arms-message [<!ENTITY e SYSTEM "file:///etc/passwd">]><arms-message>'
           b'<arms-response type="reboot"><result-code>100</result-code><description>&e;'
           b"</description></arms-response></arms-message>")
    problems = explain(doc)
    assert problems
    assert not any("root:" in p for p in problems)


def test_explain_names_path_and_line():
    doc = _response("ping-done", head="<result-code>\n100</result-code>").replace(
        "<arms-response", "\n<arms-response").encode("ascii")
    (problem,) = explain(doc)
    assert problem.startswith("line 2: /arms-message/arms-response/result-code: ")


# ---------------------------------------------------------------------------------------------
# type_matches_body (§3.2 - §3.4)

MATCHES = [
    ("configure-start", "configure-start-request", True),
    ("configure-done", "configure-done-request", True),
    ("push-confirmation-start", "push-confirmation-start-request", True),
    ("push-confirmation-done", "push-confirmation-done-request", True),
    ("reboot", "reboot-request", True),
    ("reboot-start", "reboot-request", True),
    ("ping", "ping-start-request", True),
    ("check-transaction", None, True),
    ("ping-start", "ping-done-request", False),
    ("push-confirmation-start", "push-confirmation-done-request", False),
    ("ping-start", "traceroute-start-request", False),
    ("ping-start", "ping-start-response", False),
    ("generic-error", "generic-error-request", False),
    ("", "reboot-request", False),
    ("", None, False),
]
RESPONSE_MATCHES = [
    ("ping-start", "ping-start-response", True),
    ("ping-done", "ping-done-response", True),
    ("generic-error", "generic-error-response", True),
    ("generic-error", None, True),
    ("configure", "configure-start-response", True),
    ("read-status-start", "read-status-start-request", False),
    ("reboot", "generic-error-response", False),
    ("generic-error", "reboot-response", False),
    ("read-status-done", "read-storage-done-response", False),
]


@pytest.mark.parametrize(("type_", "body", "expected"), MATCHES)
def test_type_matches_request_body(type_, body, expected):
    assert type_matches_body(type_, body, is_request=True) is expected


@pytest.mark.parametrize(("type_", "body", "expected"), RESPONSE_MATCHES)
def test_type_matches_response_body(type_, body, expected):
    assert type_matches_body(type_, body, is_request=False) is expected


# ---------------------------------------------------------------------------------------------
# Packaging and compile-once


def test_schema_path_is_the_top_level_schema_file():
    assert schema.SCHEMA_PATH.is_file()
    assert schema.SCHEMA_PATH.samefile(REPO / "schemas" / "arms.xsd")


def test_schemas_are_compiled_once_and_reused(monkeypatch):
    compiled = {"lxml": 0, "xmlschema": 0}
    real_lxml, real_xmlschema = schema.etree.XMLSchema, schema.xmlschema.XMLSchema10

    def count_lxml(*args, **kwargs):
        compiled["lxml"] += 1
        return real_lxml(*args, **kwargs)

    def count_xmlschema(*args, **kwargs):
        compiled["xmlschema"] += 1
        return real_xmlschema(*args, **kwargs)

    monkeypatch.setattr(schema.etree, "XMLSchema", count_lxml)
    monkeypatch.setattr(schema.xmlschema, "XMLSchema10", count_xmlschema)
    schema._lxml_schema.cache_clear()
    schema._xmlschema_schema.cache_clear()
    try:
        for _, body in CAPTURES[:5]:
            validate(_parse(body))
            assert explain(body) == []
        assert compiled == {"lxml": 1, "xmlschema": 1}
    finally:
        schema._lxml_schema.cache_clear()
        schema._xmlschema_schema.cache_clear()
