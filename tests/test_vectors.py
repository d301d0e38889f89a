"""Real device traffic is the test: every captured message goes through the whole codec.

framing (HTTP or tunnel chunks) -> hardened parse -> XSD -> model -> our serialiser -> the
same element structure as the captured bytes. Messages travelling towards the device must
also pass the device rules. The deliberately damaged probes of simple-errors/ are pinned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from armsproxy.arms import framing, guard
from armsproxy.arms.codec import MessageError, parse_element, parse_message, serialise
from armsproxy.tools import ctl

VECTORS = Path(__file__).parent / "vectors"
FOLDERS = ("simple", "simple-errors", "tunnel")

# Probes the capture bench sent on purpose to see the device fail (see the vectors' README).
SCHEMA_INVALID = {
    "simple-errors/10-unknown-operation.request.txt": "no-such-operation-request",
    "simple-errors/30-configure-done.response.txt": "lang",
}
DEVICE_REJECTS = {"simple-errors/11-ping-start-missing-address.request.txt": "address"}


def _index() -> dict[str, dict]:
    entries = {}
    for folder in FOLDERS:
        for entry in json.loads((VECTORS / folder / "index.json").read_text()):
            entries[f"{folder}/{entry['file']}"] = entry
    return entries


INDEX = _index()
MESSAGE_FILES = sorted(k for k in INDEX if k.endswith(".txt"))


def test_every_captured_file_is_indexed_and_copied():
    on_disk = {f"{p.parent.name}/{p.name}" for f in FOLDERS for p in (VECTORS / f).iterdir()
               if p.name != "index.json"}
    assert on_disk == set(INDEX)
    assert len(MESSAGE_FILES) > 150


def _documents(name: str) -> list[bytes]:
    docs, _notes = ctl.arms_documents((VECTORS / name).read_bytes())
    return docs


def _shape(el: etree._Element) -> list[tuple]:
    """Tags, attribute names and text of every element, in document order."""
    return [
        (node.tag, tuple(sorted(node.attrib)), (node.text or "").strip() if len(node) == 0 else "")
        for node in el.iter()
        if isinstance(node.tag, str)
    ]


@pytest.mark.parametrize("name", MESSAGE_FILES)
def test_capture_parses_validates_and_rebuilds(name):
    entry = INDEX[name]
    docs = _documents(name)
    expected_type = entry["summary"].get("type")
    if expected_type is None:
        # HTTP-level answers without ARMS body (401, 400), tunnel open/echo/close, no answer.
        assert docs == []
        return
    assert len(docs) == 1, f"{name}: expected one ARMS document"
    xml = docs[0]
    if name in SCHEMA_INVALID:
        with pytest.raises(MessageError) as err:
            parse_message(xml)
        assert err.value.reason == "schema"
        assert SCHEMA_INVALID[name] in str(err.value)
        return
    message = parse_message(xml)
    assert message.type == expected_type
    if entry["summary"].get("result_code") is not None:
        assert message.result_code == entry["summary"]["result_code"]
    tid = entry["summary"].get("transaction_id")
    if tid is not None:
        # The capture's summary takes the first transaction-id, envelope or body.
        in_body = getattr(message.body, "transaction_ids", [])
        assert message.transaction_id == tid or tid in in_body
    rebuilt = serialise(message, check=False)
    assert rebuilt.isascii()
    if entry["direction"] == "server->SA":
        # What armsproxy sends: the same elements in the same order as the accepted capture.
        assert _shape(parse_element(rebuilt)) == _shape(parse_element(xml))
    else:
        # The SA orders its header elements its own way; same content is what matters.
        assert sorted(_shape(parse_element(rebuilt))) == sorted(_shape(parse_element(xml)))
    assert parse_message(rebuilt) == message


TO_DEVICE = [n for n in MESSAGE_FILES if INDEX[n]["direction"] == "server->SA"]


@pytest.mark.parametrize("name", TO_DEVICE)
def test_what_we_send_passes_the_device_rules(name):
    for xml in _documents(name):
        if name in SCHEMA_INVALID:
            continue
        problems = guard.problems(parse_element(xml), xml)
        if name in DEVICE_REJECTS:
            assert any(DEVICE_REJECTS[name] in p for p in problems), problems
        else:
            assert problems == [], f"{name}: {problems}"


def test_tunnel_files_survive_any_split():
    for name in MESSAGE_FILES:
        if not name.startswith("tunnel/") or "https-tunnel-open" in name:
            continue
        data = (VECTORS / name).read_bytes()
        if data.startswith((b"POST ", b"HTTP/")):
            continue  # the pulls before the tunnel opened
        whole = framing.parse_tunnel_file(data)
        decoder = framing.ChunkDecoder()
        pieces = [c for i in range(len(data)) for c in decoder.feed(data[i : i + 1])]
        assert [c.data for c in pieces] == [c.data for c in framing.ChunkDecoder().feed(data)]
        assert whole


def test_ctl_check_accepts_every_real_capture(capsys):
    names = [n for n in MESSAGE_FILES if n not in SCHEMA_INVALID and n not in DEVICE_REJECTS]
    assert ctl.main(["check", *[str(VECTORS / n) for n in names]]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(names)


@pytest.mark.parametrize("name", sorted({**SCHEMA_INVALID, **DEVICE_REJECTS}))
def test_ctl_check_stops_at_the_first_invalid_one(name, capsys):
    good = str(VECTORS / "simple/02-config-solicitation.request.txt")
    later = str(VECTORS / "simple/03-push-method-query.request.txt")
    assert ctl.main(["check", good, str(VECTORS / name), later]) == 1
    captured = capsys.readouterr()
    assert "02-config-solicitation" in captured.out
    assert "03-push-method-query" not in captured.out
    assert name.split("/")[1] in captured.err and "INVALID" in captured.err


def test_ctl_check_garbage_file(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"POST / HTTP/1.0\r\nContent-Length: 9\r\n\r\n<arms-mes")
    assert ctl.main(["check", str(bad)]) == 1
    assert "INVALID" in capsys.readouterr().err
