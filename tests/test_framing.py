"""Wire framing against the real-SA captures in tests/vectors/ and against broken input."""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import pytest

from armsproxy.arms.framing import (
    ECHO_REQUEST,
    ECHO_RESPONSE,
    END_OF_STREAM,
    MAX_CHUNK_HEADER_LINE,
    TUNNEL_OPEN_RESPONSE,
    Chunk,
    ChunkDecoder,
    EchoRequest,
    EchoResponse,
    EmptyMessageError,
    EndOfStream,
    FramingError,
    MessageAssembler,
    TunnelMessage,
    TunnelReader,
    build_http_error,
    build_push_request,
    build_sa_response,
    build_tunnel_open_response,
    encode_chunk,
    extract_arms_xml,
    find_header_end,
    new_chunk_id,
    parse_http_head,
    parse_http_message,
    parse_sa_push_response,
    parse_tunnel_file,
)

VECTORS = Path(__file__).parent / "vectors"
FOLDERS = ("simple", "simple-errors", "tunnel")
SA_XML_DECLARATION = b'<?xml version="1.0" encoding="US-ASCII" ?>\r'

_HTTP_START = re.compile(rb"(HTTP/\d\.\d \d{3}[^\r\n]*|[A-Z]+ \S+ HTTP/\d\.\d)\r?\n")
_CHUNK_START = re.compile(rb"[0-9a-f]+(;[!-~]*)?\r\n")


def _index() -> list[tuple[str, dict]]:
    entries = []
    for folder in FOLDERS:
        for entry in json.loads((VECTORS / folder / "index.json").read_bytes()):
            entries.append((folder, entry))
    return entries


INDEX = _index()
IDS = [f"{folder}/{entry['file']}" for folder, entry in INDEX]


def _data(folder: str, entry: dict) -> bytes:
    return (VECTORS / folder / entry["file"]).read_bytes()


def _kind(folder: str, entry: dict) -> str:
    """udp / empty / http / tunnel, from the content, cross-checked against index.json."""
    data = _data(folder, entry)
    transport = entry["meta"].get("transport")
    if entry["file"].endswith(".bin"):
        assert transport == "udp"
        return "udp"
    if not data:
        assert "no HTTP response" in entry["meta"]["error"]
        return "empty"
    if _HTTP_START.match(data):
        assert transport == "https" or entry["summary"]["first_line"].startswith("HTTP/")
        return "http"
    assert _CHUNK_START.match(data), entry["file"]
    assert transport == "https-tunnel"
    return "tunnel"


def _entries(kind: str) -> list[tuple[str, dict]]:
    return [(folder, entry) for folder, entry in INDEX if _kind(folder, entry) == kind]


def _ids(entries: list[tuple[str, dict]]) -> list[str]:
    return [f"{folder}/{entry['file']}" for folder, entry in entries]


def _check_arms_xml(xml: bytes, summary: dict) -> None:
    """Exactly one arms-message of the indexed type, as whole as index.json describes it."""
    assert xml.startswith(b"<arms-message>")
    assert xml.endswith(b"</arms-message>")
    assert xml.count(b"<arms-message") == 1
    assert xml.count(b"</arms-message>") == 1
    root = b"arms-request" if summary["arms"] == "request" else b"arms-response"
    assert f'<{root.decode()} type="{summary.get("type")}"'.encode() in xml
    if summary.get("result_code") is not None:
        assert f"<result-code>{summary['result_code']}</result-code>".encode() in xml
    if summary.get("transaction_id") is not None:
        assert f"<transaction-id>{summary['transaction_id']}</transaction-id>".encode() in xml


# --------------------------------------------------------------------------------------------
# Every capture file
# --------------------------------------------------------------------------------------------


def test_index_lists_every_file():
    for folder in FOLDERS:
        on_disk = {p.name for p in (VECTORS / folder).iterdir() if p.name != "index.json"}
        listed = {entry["file"] for f, entry in INDEX if f == folder}
        assert on_disk == listed


@pytest.mark.parametrize(("folder", "entry"), INDEX, ids=IDS)
def test_every_capture_file(folder, entry):
    data = _data(folder, entry)
    summary = entry["summary"]
    kind = _kind(folder, entry)

    if kind == "udp":
        # Heartbeats are UDP datagrams: neither HTTP nor chunk framing may accept them.
        with pytest.raises(FramingError):
            parse_http_message(data)
        with pytest.raises(FramingError):
            ChunkDecoder().feed(data)
        return

    if kind == "empty":
        with pytest.raises(EmptyMessageError):
            parse_http_message(data)
        response = parse_sa_push_response(data)
        assert response.status is None
        assert not response.answered
        assert response.xml == b""
        return

    if kind == "tunnel":
        events = parse_tunnel_file(data)
        first_line = summary["first_line"]
        if summary.get("type") is not None:
            assert len(events) == 1
            (message,) = events
            assert isinstance(message, TunnelMessage)
            assert message.chunk_id == int(re.search(r"id=(\d+)", first_line).group(1))
            assert extract_arms_xml(message.body) == message.body.strip().split(b"?>\n")[-1]
            _check_arms_xml(extract_arms_xml(message.body), summary)
        elif "echo-request" in first_line:
            assert events == [EchoRequest()]
        elif "echo-response" in first_line:
            assert events == [EchoResponse()]
        else:
            assert first_line == "0"
            assert events == [EndOfStream()]
        return

    message = parse_http_message(data)
    assert message.start_line == summary["first_line"]
    assert message.is_request == (entry["part"] == "request")
    xml = extract_arms_xml(message.body)
    if summary.get("type") is not None:
        _check_arms_xml(xml, summary)
    else:
        assert xml == b""  # tunnel open, 401/400 with only the declaration

    if message.body_framing == "content-length":
        assert len(message.body) == int(message.header("content-length"))
        assert data.endswith(message.body)
    elif message.body_framing == "chunked":
        assert message.declares_chunked
        # The SA's XML has no CRLF: any left in the body would be chunk framing.
        assert b"\r\n" not in message.body
        if message.body:
            assert message.framing_notes == []
    else:
        assert message.body_framing == "eof"
        assert data.endswith(message.body)

    if "status_line" in entry["meta"]:  # an answer of the SA's https-simple listener
        assert message.version == "HTTP/1.0"
        assert message.header("Content-Length") is None
        assert message.body.startswith(SA_XML_DECLARATION)  # bare CR kept
        response = parse_sa_push_response(data)
        assert response.answered
        assert f"{response.version} {response.status} {response.reason}" == (
            entry["meta"]["status_line"])
        assert response.body == message.body
        assert response.xml == xml


def test_chunked_sa_request_split_in_many_chunks():
    data = (VECTORS / "simple" / "12-read-status-done.request.txt").read_bytes()
    message = parse_http_message(data)
    assert message.body_framing == "chunked"
    assert message.framing_notes == []
    assert message.body == (
        b'<arms-message><arms-request type="read-status-done"><transaction-result>100'
        b"</transaction-result><distribution-id>0001-0002-0003-0004-0005-0006-0007-0008"
        b"</distribution-id><transaction-id>1341705726</transaction-id><description>"
        b"libarms Test Client</description><read-status-done-request>"
        b'<status-report id="1" result="100">id=1: get_status_cb() result</status-report>'
        b"</read-status-done-request></arms-request></arms-message>"
    )
    assert message.headers[0] == ("Host", "127.0.0.1:18446")
    assert message.header("transfer-encoding") == "chunked"
    assert message.header("AUTHORIZATION", "").startswith("Basic ")


def test_sa_answer_without_content_length_keeps_bare_cr():
    data = (VECTORS / "simple" / "07-check-transaction.response.txt").read_bytes()
    message = parse_http_message(data)
    assert message.body_framing == "eof"
    assert message.body == data[data.index(b"\r\n\r\n") + 4:]
    assert message.body.startswith(SA_XML_DECLARATION + b"<arms-message>")
    assert [name for name, _ in message.headers] == ["Server", "Connection", "Content-Type"]


def test_chunked_probe_answer_is_decoded_raw_with_a_note():
    data = (VECTORS / "simple" / "08-md-command-chunked-probe.response.txt").read_bytes()
    message = parse_http_message(data)
    assert message.status == 400
    assert message.declares_chunked
    assert message.body == SA_XML_DECLARATION
    assert message.body_framing == "eof"
    assert any("not chunk-framed" in note for note in message.framing_notes)
    response = parse_sa_push_response(data)
    assert response.status == 400
    assert response.xml == b""
    assert response.header("www-authenticate") == 'Basic realm=""'
    assert response.framing_notes == message.framing_notes


def test_unauthorized_answer_has_no_xml():
    data = (VECTORS / "simple-errors" / "07-check-transaction-bad-auth.response.txt").read_bytes()
    response = parse_sa_push_response(data)
    assert (response.status, response.reason) == (401, "Authorization Required")
    assert response.headers[0] == ("WWW-Authenticate", 'Basic realm=""')
    assert response.body == SA_XML_DECLARATION
    assert response.xml == b""


def test_tunnel_open_request_head():
    data = (VECTORS / "tunnel" / "04-https-tunnel-open.request.txt").read_bytes()
    assert find_header_end(data) == len(data)
    head = parse_http_head(data)
    assert (head.method, head.target, head.version) == ("POST", "/arms-tunnel.cgi", "HTTP/1.1")
    assert head.body == b""
    assert [name for name, _ in head.headers] == [
        "Host", "Connection", "Content-Type", "Transfer-Encoding", "Authorization"]
    message = parse_http_message(data)
    assert message.body == b""
    assert message.body_framing == "chunked"
    assert message.framing_notes == ["no last-chunk (0 CRLF CRLF) before EOF"]


def test_find_header_end_incremental():
    data = (VECTORS / "tunnel" / "04-https-tunnel-open.request.txt").read_bytes() + b"13b;id=1"
    buffer = b""
    found = None
    for i in range(len(data)):
        buffer += data[i:i + 1]
        found = find_header_end(buffer)
        if found is not None:
            break
    assert found == data.index(b"\r\n\r\n") + 4
    assert find_header_end(data) == found


# --------------------------------------------------------------------------------------------
# Tunnel chunks
# --------------------------------------------------------------------------------------------

TUNNEL = _entries("tunnel")


@pytest.mark.parametrize(("folder", "entry"), TUNNEL, ids=_ids(TUNNEL))
def test_tunnel_file_byte_by_byte(folder, entry):
    data = _data(folder, entry)
    whole = ChunkDecoder().feed(data)
    decoder = ChunkDecoder()
    pieces: list[Chunk] = []
    for i in range(len(data)):
        pieces.extend(decoder.feed(data[i:i + 1]))
        done = b"".join(encode_or_constant(c) for c in pieces)
        assert decoder.at_boundary == (data[:i + 1] == done)
    assert pieces == whole
    assert decoder.at_boundary
    reader = TunnelReader()
    events = []
    for i in range(len(data)):
        events.extend(reader.feed(data[i:i + 1]))
    assert events == parse_tunnel_file(data)
    assert reader.idle


def encode_or_constant(chunk: Chunk) -> bytes:
    """Re-encode a decoded chunk; echo and end chunks are fixed byte strings."""
    if chunk.end_of_stream:
        return END_OF_STREAM
    if chunk.echo_request:
        return ECHO_REQUEST
    if chunk.echo_response:
        return ECHO_RESPONSE
    return encode_chunk(chunk.data, chunk_id=chunk.id, trail=chunk.trail)


@pytest.mark.parametrize(("folder", "entry"), TUNNEL, ids=_ids(TUNNEL))
def test_tunnel_file_reencodes_exactly(folder, entry):
    """The SA and the captured proxy frame like encode_chunk: lowercase hex, ;id=N;trail."""
    data = _data(folder, entry)
    chunks = ChunkDecoder().feed(data)
    assert b"".join(encode_or_constant(chunk) for chunk in chunks) == data
    if entry["direction"] == "server->SA" and chunks[0].id is not None:
        # Every proxy message in the captures is one chunk with ;trail.
        (chunk,) = chunks
        assert encode_chunk(chunk.data, chunk_id=chunk.id) == data


def test_sa_multi_chunk_message_fields():
    data = (VECTORS / "tunnel" / "19-md-command.response.txt").read_bytes()
    chunks = ChunkDecoder().feed(data)
    assert [(c.size, c.id, c.trail) for c in chunks] == [
        (0x96, 2146828120, False), (0x16, 2146828120, False), (0x41, 2146828120, True)]
    assert chunks[1].data == b"md_command(id=1): done"
    assert chunks[0].extensions == ("id=2146828120",)
    (message,) = parse_tunnel_file(data)
    assert message.body == b"".join(c.data for c in chunks)


def test_whole_tunnel_stream_with_random_splits():
    """All SA->proxy tunnel files as one stream, cut at random places, give the same events."""
    stream = b""
    expected = []
    for folder, entry in TUNNEL:
        if entry["direction"] == "SA->server":
            data = _data(folder, entry)
            stream += data
            expected.extend(parse_tunnel_file(data))
    assert isinstance(expected[-1], EndOfStream)
    rng = random.Random(20240601)
    for _ in range(25):
        reader = TunnelReader()
        events = []
        pos = 0
        while pos < len(stream):
            step = rng.choice((1, 2, 3, 7, 64, 300, 8191))
            events.extend(reader.feed(stream[pos:pos + step]))
            pos += step
        assert events == expected
    assert sum(isinstance(e, TunnelMessage) for e in expected) == 23


def test_zero_size_chunk_with_id_ends_message_not_stream():
    reader = TunnelReader()
    events = reader.feed(b"5;id=7\r\nhello\r\n0;id=7;trail\r\n\r\n4;echo-request;trail\r\necho\r\n")
    assert events == [TunnelMessage(chunk_id=7, body=b"hello"), EchoRequest()]
    assert not reader.decoder.closed
    assert reader.feed(END_OF_STREAM) == [EndOfStream()]
    assert reader.decoder.closed


def test_zero_size_chunk_split_everywhere():
    data = b"0;id=9;trail\r\n\r\n" + END_OF_STREAM
    for cut in range(len(data) + 1):
        decoder = ChunkDecoder()
        chunks = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert [(c.size, c.id, c.trail, c.end_of_stream) for c in chunks] == [
            (0, 9, True, False), (0, None, False, True)]


def test_lone_zero_chunk_with_id_yields_nothing():
    assembler = MessageAssembler()
    (chunk,) = ChunkDecoder().feed(b"0;id=3;trail\r\n\r\n")
    assert not chunk.end_of_stream
    assert assembler.feed(chunk) == []


def test_unknown_extensions_are_ignored():
    (chunk,) = ChunkDecoder().feed(b"3;x-foo=bar;id=12;future;trail\r\nabc\r\n")
    assert (chunk.id, chunk.trail, chunk.data) == (12, True, b"abc")
    assert chunk.extensions == ("x-foo=bar", "id=12", "future", "trail")
    (echo,) = ChunkDecoder().feed(b"4;echo\r\necho\r\n")
    assert echo.echo_response and not echo.echo_request


def test_chunk_without_id_counts_as_id_zero():
    reader = TunnelReader()
    assert reader.feed(b"3\r\n<a>\r\n4;trail\r\n</a>\r\n") == [
        TunnelMessage(chunk_id=0, body=b"<a></a>")]


def test_messages_keyed_by_id():
    reader = TunnelReader()
    events = reader.feed(
        encode_chunk(b"<a>", chunk_id=1, trail=False)
        + encode_chunk(b"<b>", chunk_id=2, trail=False)
        + encode_chunk(b"</a>", chunk_id=1)
        + ECHO_REQUEST
        + encode_chunk(b"</b>", chunk_id=2)
    )
    assert events == [
        TunnelMessage(chunk_id=1, body=b"<a></a>"),
        EchoRequest(),
        TunnelMessage(chunk_id=2, body=b"<b></b>"),
    ]


def test_unfinished_message_at_end_of_stream_stays_pending():
    reader = TunnelReader()
    assert reader.feed(encode_chunk(b"<arms", chunk_id=5, trail=False) + END_OF_STREAM) == [
        EndOfStream()]
    assert reader.assembler.pending_ids == [5]
    assert not reader.idle
    with pytest.raises(FramingError, match="inside message id=5"):
        parse_tunnel_file(encode_chunk(b"<arms", chunk_id=5, trail=False))
    with pytest.raises(FramingError, match="ends inside a chunk"):
        parse_tunnel_file(b"a;id=5;trail\r\n<arms")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"zz\r\nab\r\n", "hex digit"),
        (b"1g\r\nx\r\n", "invalid chunk size"),
        (b"4;echo-request;trail\r\nechoXX", "missing CRLF after 4 bytes"),
        (b"4\r\necho\nX", "missing CRLF"),
        (b"4\necho\r\n", "bare LF"),
        (b"4; trail\r\necho\r\n", "invalid byte"),
        (b"4;id=12a\r\necho\r\n", "invalid chunk id"),
        (b"4;id=\r\necho\r\n", "invalid chunk id"),
        (b"4;id=-1\r\necho\r\n", "invalid chunk id"),
        (b"0\r\n\r\n4;echo\r\necho\r\n", "after the end-of-stream"),
        (b"fffffff;id=1\r\n", "exceeds the limit"),
        (b"1" * 40 + b"\r\n", "exceeds the limit"),
        (b"POST / HTTP/1.1\r\n", "hex digit"),
        (b"\r\n", "hex digit"),
    ],
)
def test_chunk_garbage(data, match):
    with pytest.raises(FramingError, match=match):
        ChunkDecoder().feed(data)
    # Byte by byte the error is the same (it may come earlier, never later than the whole).
    decoder = ChunkDecoder()
    with pytest.raises(FramingError, match=match):
        for i in range(len(data)):
            decoder.feed(data[i:i + 1])


def test_chunk_header_length_limit():
    ok = b"5;id=1;" + b"x" * (MAX_CHUNK_HEADER_LINE - 7) + b"\r\nhello\r\n"
    assert len(ok.split(b"\r\n")[0]) == MAX_CHUNK_HEADER_LINE
    (chunk,) = ChunkDecoder().feed(ok)
    assert chunk.data == b"hello"
    too_long = b"5;id=1;" + b"x" * (MAX_CHUNK_HEADER_LINE - 6) + b"\r\nhello\r\n"
    with pytest.raises(FramingError, match="exceeds 255 bytes"):
        ChunkDecoder().feed(too_long)
    # Without any line end yet: detected as soon as the header cannot fit any more.
    decoder = ChunkDecoder()
    decoder.feed(b"5;" + b"x" * (MAX_CHUNK_HEADER_LINE - 1))
    with pytest.raises(FramingError, match="exceeds 255 bytes"):
        decoder.feed(b"yy")


def test_decoder_errors_are_final():
    decoder = ChunkDecoder()
    with pytest.raises(FramingError):
        decoder.feed(b"nothex\r\n")
    with pytest.raises(FramingError, match="already failed"):
        decoder.feed(ECHO_REQUEST)


def test_chunk_and_message_size_limits():
    with pytest.raises(FramingError, match="exceeds the limit of 16"):
        ChunkDecoder(max_chunk_size=16).feed(b"11;id=1\r\n")
    reader = TunnelReader(max_message_size=10)
    reader.feed(encode_chunk(b"x" * 6, chunk_id=4, trail=False))
    with pytest.raises(FramingError, match="id=4 exceeds 10 bytes"):
        reader.feed(encode_chunk(b"y" * 5, chunk_id=4))
    assembler = MessageAssembler(max_pending_messages=2)
    assembler.feed(Chunk(size=1, data=b"a", id=1))
    assembler.feed(Chunk(size=1, data=b"b", id=2))
    with pytest.raises(FramingError, match="more than 2 tunnel messages"):
        assembler.feed(Chunk(size=1, data=b"c", id=3))


def test_encode_chunk():
    assert encode_chunk(b"x" * 0xBB, chunk_id=1) == b"bb;id=1;trail\r\n" + b"x" * 0xBB + b"\r\n"
    assert encode_chunk(b"abc", chunk_id=None, trail=False) == b"3\r\nabc\r\n"
    assert encode_chunk(b"abc", chunk_id=2**31 - 1, trail=False) == (
        b"3;id=2147483647\r\nabc\r\n")
    with pytest.raises(ValueError, match="empty chunk"):
        encode_chunk(b"", chunk_id=1)
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="chunk id"):
            encode_chunk(b"a", chunk_id=bad)
    ids = {new_chunk_id() for _ in range(200)}
    assert len(ids) > 190
    assert all(0 < i < 2**31 for i in ids)


def test_tunnel_constants_equal_captures():
    tunnel = VECTORS / "tunnel"
    for name in ("04", "25", "30"):
        captured = (tunnel / f"{name}-https-tunnel-open.response.txt").read_bytes()
        assert build_tunnel_open_response() == captured == TUNNEL_OPEN_RESPONSE
    for name in ("09", "10"):
        assert (tunnel / f"{name}-tunnel-echo.response.txt").read_bytes() == ECHO_RESPONSE
        assert (tunnel / f"{name}-tunnel-echo.request.txt").read_bytes() == ECHO_REQUEST
    assert (tunnel / "29-tunnel-echo-unanswered.request.txt").read_bytes() == ECHO_REQUEST
    assert (tunnel / "34-tunnel-last-chunk.message.txt").read_bytes() == END_OF_STREAM
    opened = parse_http_message(TUNNEL_OPEN_RESPONSE)
    assert opened.start_line == "HTTP/1.1 200 OK"


# --------------------------------------------------------------------------------------------
# Builders against the captures
# --------------------------------------------------------------------------------------------

PUSHES = [
    (folder, entry)
    for folder, entry in _entries("http")
    if entry["direction"] == "server->SA" and entry["part"] == "request"
    and not entry["meta"].get("chunked")
]
PROXY_ANSWERS = [
    (folder, entry)
    for folder, entry in _entries("http")
    if entry["direction"] == "server->SA" and entry["part"] == "response"
    and entry["meta"].get("transport") == "https"
]


@pytest.mark.parametrize(("folder", "entry"), PUSHES, ids=_ids(PUSHES))
def test_build_push_request_equals_capture(folder, entry):
    data = _data(folder, entry)
    message = parse_http_message(data)
    host, port = message.header("Host").rsplit(":", 1)
    scheme, credentials = message.header("Authorization").split(" ")
    assert scheme == "Basic"
    distid, key = base64.b64decode(credentials).decode("ascii").split(":", 1)
    assert build_push_request(host, int(port), distid, key, message.body) == data


def test_push_request_exact_ping_start():
    data = (VECTORS / "simple" / "13-ping-start.request.txt").read_bytes()
    body = data[data.index(b"\r\n\r\n") + 4:]
    built = build_push_request(
        "127.0.0.1", 18450, "0001-0002-0003-0004-0005-0006-0007-0008", "harness-rs-key", body)
    assert built == data
    assert b"\r\nAuthorization: Basic " in built
    assert b"chunked" not in built


def test_push_request_checks_and_ipv6():
    built = build_push_request("2001:db8::7", 10443, "0001-0000-1A2B-0105-0000-0000-00C0-FFEE",
                               "k:with:colons", b"<arms-message/>")
    message = parse_http_message(built)
    assert message.header("Host") == "[2001:db8::7]:10443"
    decoded = base64.b64decode(message.header("Authorization").split(" ")[1])
    assert decoded == b"0001-0000-1A2B-0105-0000-0000-00C0-FFEE:k:with:colons"
    assert message.body == b"<arms-message/>"
    for bad in (
        dict(host="1.2.3.4\r\nX: y"),
        dict(port=0),
        dict(port=65536),
        dict(distid="a:b"),
        dict(key="k\r\n"),
        dict(key="schl\u00fcssel"),
    ):
        args = dict(host="192.0.2.1", port=10443, distid="D", key="K", body=b"x") | bad
        with pytest.raises(ValueError):
            build_push_request(**args)


@pytest.mark.parametrize(("folder", "entry"), PROXY_ANSWERS, ids=_ids(PROXY_ANSWERS))
def test_build_sa_response_matches_capture(folder, entry):
    """Same bytes as the captured answer except the order of two headers (§2.4)."""
    data = _data(folder, entry)
    captured = parse_http_message(data)
    built = build_sa_response(captured.body)
    length = len(captured.body)
    expected = data.replace(
        f"Connection: close\r\nContent-Length: {length}\r\n".encode(),
        f"Content-Length: {length}\r\nConnection: close\r\n".encode(),
    )
    assert built == expected
    reparsed = parse_http_message(built)
    assert sorted(reparsed.headers) == sorted(captured.headers)
    assert reparsed.body == captured.body


def test_build_sa_response_exact_bytes():
    body = (b'<arms-message><arms-response type="ping-done"><transaction-id>918273645'
            b"</transaction-id><result-code>100</result-code><description>OK</description>"
            b"</arms-response></arms-message>")
    assert len(body) == 178
    assert build_sa_response(body) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 178\r\n"
        b"Connection: close\r\n\r\n" + body)
    assert build_sa_response(b"", status=503).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")


def test_build_http_error():
    assert build_http_error(401, extra_headers=[("WWW-Authenticate", 'Basic realm="arms"')]) == (
        b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="arms"\r\n'
        b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert build_http_error(405, extra_headers=[("Allow", "POST")]) == (
        b"HTTP/1.1 405 Method Not Allowed\r\nAllow: POST\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n")
    too_large = build_http_error(413, body=b"request too large\n")
    message = parse_http_message(too_large)
    assert (message.status, message.reason) == (413, "Payload Too Large")
    assert message.header("Content-Type") == "text/plain; charset=us-ascii"
    assert message.body == b"request too large\n"
    for status, reason in ((400, "Bad Request"), (408, "Request Timeout"),
                           (503, "Service Unavailable")):
        assert parse_http_message(build_http_error(status)).reason == reason
    with pytest.raises(ValueError):
        build_http_error(200)
    with pytest.raises(ValueError):
        build_http_error(400, extra_headers=[("X-Bad", "a\r\nInjected: yes")])
    with pytest.raises(ValueError):
        build_http_error(400, extra_headers=[("Bad Name", "x")])


def test_parse_sa_push_response_edge_cases():
    closed = parse_sa_push_response(b"")
    assert closed.status is None and not closed.answered
    assert closed.framing_notes == ["connection closed without an HTTP answer"]
    with pytest.raises(FramingError, match="expected an HTTP response"):
        parse_sa_push_response(build_push_request("192.0.2.1", 1, "D", "K", b"<arms-message/>"))
    with pytest.raises(FramingError, match="not terminated"):
        parse_sa_push_response(b"HTTP/1.0 200 OK\r\nServer: armsd\r\n")
    cut = parse_sa_push_response(
        b"HTTP/1.0 200 OK\r\n\r\n" + SA_XML_DECLARATION + b"<arms-message><arms-response>")
    assert cut.xml == b"<arms-message><arms-response>"
    assert cut.framing_notes == ["arms-message not closed before the end of the body"]
    trailing = parse_sa_push_response(
        b"HTTP/1.0 200 OK\r\n\r\n<arms-message></arms-message>\r\n<junk/>")
    assert trailing.xml == b"<arms-message></arms-message>"
    assert trailing.framing_notes == ["non-whitespace bytes after </arms-message>"]


# --------------------------------------------------------------------------------------------
# HTTP leniency and bad input
# --------------------------------------------------------------------------------------------


def test_header_lines_may_end_in_lf_but_not_the_blank_line():
    message = parse_http_message(b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\nok")
    assert message.body == b"ok"
    assert message.framing_notes == ["header lines ending in bare LF"]
    with pytest.raises(FramingError, match="not terminated by CRLF CRLF"):
        parse_http_message(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
    with pytest.raises(FramingError, match="blank line 2 ends in bare LF"):
        parse_http_message(b"HTTP/1.1 200 OK\n\nX: y\r\n\r\n")


def test_status_line_without_reason_and_folding():
    message = parse_http_message(b"HTTP/1.0 200\r\nX-A: one\r\n  two\r\n\r\nbody")
    assert (message.status, message.reason, message.start_line) == (200, "", "HTTP/1.0 200")
    assert message.headers == [("X-A", "one two")]
    assert "obsolete header line folding" in message.framing_notes
    assert message.body == b"body"


def test_chunked_body_with_extensions_uppercase_and_trailers():
    data = (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"A;name=val\r\n0123456789\r\n1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n")
    message = parse_http_message(data)
    assert message.body == b"0123456789!"
    assert message.framing_notes == ["trailer fields ignored"]


def test_extra_bytes_after_content_length_body():
    message = parse_http_message(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert message.body == b"ok"
    assert message.framing_notes == ["5 bytes after the Content-Length body ignored"]


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 1100 + b"\r\n\r\n", {"max_header_line": 1024},
         "header line 2 is 1108 bytes, more than 1024"),
        (b"POST / HTTP/1.1\r\n" + b"X: y\r\n" * 400, {"max_header_bytes": 2048},
         "exceeds 2048 bytes"),
        (b"POST / HTTP/1.1\r\n" + b"X: y\r\n" * 400 + b"\r\n", {"max_header_bytes": 2048},
         "exceeds 2048 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", {}, "body truncated"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nx", {}, "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nx", {}, "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", {},
         "conflicting Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100, {"max_body": 99},
         "Content-Length 100 exceeds the body limit of 99"),
        (b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100, {"max_body": 99},
         "body of 100 bytes exceeds the body limit of 99"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64
         + b"\r\n40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n", {"max_body": 100},
         "chunked body exceeds the body limit of 100"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n", {},
         "invalid chunk size line"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY\r\n0\r\n\r\n", {},
         "missing CRLF after 2 bytes of chunk data"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc", {},
         "chunk of 16 bytes truncated"),
        (b"HELLO\r\n\r\n", {}, "not an HTTP request or status line"),
        (b"POST / HTTP/1.1\r\nNoColon\r\n\r\n", {}, "has no colon"),
        (b"POST / HTTP/1.1\r\nBad Name: x\r\n\r\n", {}, "invalid header name"),
        (b"POST / HTTP/1.1\r\nName : x\r\n\r\n", {}, "whitespace before the colon"),
        (b"POST / HTTP/1.1\r\n folded: x\r\n\r\n", {}, "continuation line before"),
        (b"POST / HTTP/1.1\r\nX: a\rb\r\n\r\n", {}, "bare CR"),
        (b"\r\n\r\n", {}, "empty start line"),
    ],
)
def test_http_bad_input(data, kwargs, match):
    with pytest.raises(FramingError, match=match):
        parse_http_message(data, **kwargs)


def test_empty_input():
    with pytest.raises(EmptyMessageError, match="closed without"):
        parse_http_message(b"")
    assert issubclass(EmptyMessageError, FramingError)
