"""docs/protocol.md against a real ``tunneld`` process: a raw socket on 127.0.0.1 speaks frames
to its agent port, as a third-party (or hostile) agent could, and the test reads exactly which
frames come back and whether the connection then ends.

The sans-IO tests (tests/protocol/) hold ``protocol.Session`` to each rule; these hold the edge
that runs it: that it answers on the wire, in the documented order, and closes the connection
where the doc says so (which is ``relay/mux.py`` and ``tunneld/edge.py``, not the session).
One edge process serves the whole file.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import wsproto
import wsproto.events as wse

from protocol import control
from protocol.errors import GoAwayCode
from protocol.frames import PREFACE, Frame, FrameReader, FrameType, encode_frame, pack_header
from tests.e2e.procs import Processes, admin_client
from tests.e2e.test_public_tcp import port_range
from tunneld.auth import agent_token

DATA, WU, PING, GO_AWAY, CONTROL = (int(t) for t in FrameType)
SYN, ACK, FIN, RST = 1, 2, 4, 8
TIMEOUT = 15.0  # every read of this file is bounded by it
HANDSHAKE_TIMEOUT = 1.0  # the edge's, for this file
STREAM_SANDBOX = "sbstreams"  # its port 8000 is exposed before any agent of it connects
TCP_SANDBOX = "sbtcp"  # its port 9000 is exposed as raw TCP, with a public port of its own


class Edge:
    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.port = procs.ports["agent"]
        self.public_port = procs.ports["public"]
        self.tokens: dict[str, str] = {}
        self.preview_host = ""
        self.tcp_public_port = 0

    def hello(self, sandbox_id: str = "sb1") -> bytes:
        if sandbox_id not in self.tokens:
            self.tokens[sandbox_id] = agent_token(self.procs.secret, sandbox_id)
        hello = control.Hello(sandbox_id, self.tokens[sandbox_id], control.UNWATCH_PORT_VERSION)
        return encode_frame(CONTROL, payload=control.encode_message(hello))


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    procs = Processes(Path(tmp_path_factory.mktemp("protocol-doc-edge")))
    try:
        # a short handshake timeout: the one test that waits for it takes a second; the others
        # send their hello with the preface, or a bad preface the edge answers at once
        procs.start_edge(
            "--public-tcp-ports",
            port_range(4),
            env=procs.env(
                TUNNELD_ADMIN_TOKEN=procs.admin_token,
                TUNNELD_SECRET=procs.secret,
                TUNNELD_HANDSHAKE_TIMEOUT=str(HANDSHAKE_TIMEOUT),
            ),
        )
        edge = Edge(procs)
        with admin_client(procs) as admin:
            exposed = admin.post(f"/v1/sandboxes/{STREAM_SANDBOX}/ports", json={"port": 8000})
            assert exposed.status_code == 200, exposed.text
            edge.preview_host = exposed.json()["exposedAt"].split("//", 1)[1].split("/", 1)[0]
            tcp = {"port": 9000, "protocol": "tcp"}
            exposed = admin.post(f"/v1/sandboxes/{TCP_SANDBOX}/ports", json=tcp)
            assert exposed.status_code == 200, exposed.text
            edge.tcp_public_port = exposed.json()["publicPort"]
        yield edge
    finally:
        procs.close()


class Link:
    """One raw agent connection: bytes out, parsed frames in."""

    def __init__(self, edge: Edge) -> None:
        self.sock = socket.create_connection(("127.0.0.1", edge.port), timeout=TIMEOUT)
        self.reader = FrameReader()
        self.frames: list[Frame] = []
        self.eof = False

    def send(self, *chunks: bytes) -> None:
        self.sock.sendall(b"".join(chunks))

    def _read(self, deadline: float) -> None:
        assert time.monotonic() < deadline, f"no answer in time; frames so far: {self.frames}"
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return
        self.reader.feed(data)
        while (frame := self.reader.next_frame()) is not None:
            self.frames.append(frame)

    def until(self, done: Callable[[Frame], bool]) -> Frame:
        """The first frame (from the start of the connection) for which ``done`` is true."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            for frame in self.frames:
                if done(frame):
                    return frame
            assert not self.eof, f"the edge closed the connection; frames: {self.frames}"
            self._read(deadline)

    def until_eof(self) -> list[Frame]:
        """Every frame the edge sent until it closed the connection."""
        deadline = time.monotonic() + TIMEOUT
        while not self.eof:
            self._read(deadline)
        assert self.reader.buffered == 0, "the connection ended inside a frame"
        return self.frames

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def link(edge: Edge) -> Iterator[Link]:
    link = Link(edge)
    yield link
    link.close()


def is_welcome(frame: Frame) -> bool:
    return frame.type == CONTROL and b'"type":"welcome"' in frame.payload


def goaway(code: GoAwayCode) -> tuple[int, int, int, int]:
    return (GO_AWAY, 0, 0, int(code))


def header(frame: Frame) -> tuple[int, int, int, int]:
    return (frame.type, frame.flags, frame.stream_id, frame.length)


def welcomed(link: Link, edge: Edge, sandbox_id: str = "sb1") -> Link:
    link.send(PREFACE, edge.hello(sandbox_id))
    link.until(is_welcome)
    return link


# --------------------------------------------------------------------------- preface


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"TUNL\rX", GoAwayCode.PROTOCOL_ERROR),  # bytes 0-5 wrong
        (b"TUNL\r\n\x01X", GoAwayCode.PROTOCOL_ERROR),  # byte 7 wrong
        (b"TUNL\r\n\x02", GoAwayCode.UNSUPPORTED_VERSION),  # answered before byte 7 arrives
        (b"XXXX", GoAwayCode.PROTOCOL_ERROR),  # neither a preface nor a WebSocket upgrade
    ],
    ids=["magic", "last-byte", "version", "garbage"],
)
def test_a_bad_preface_is_one_goaway_then_the_end(link: Link, wire: bytes, code: int) -> None:
    """Preface: 'Bytes 0-5 and 7 wrong -> GO_AWAY(PROTOCOL_ERROR); bytes 0-5 right but the
    version byte is not 1 -> GO_AWAY(UNSUPPORTED_VERSION)', checked as the bytes arrive (one
    at a time here, and none after the wrong one: the edge answers without the rest, and a
    byte sent after its close could make our kernel drop the answer); the edge sends nothing
    else and closes. tunneld's edge judges from the fourth byte on ('XXXX')."""
    for byte in wire:
        link.send(bytes([byte]))
    assert [header(f) for f in link.until_eof()] == [goaway(GoAwayCode(code))]


def test_fewer_than_four_bytes_are_not_judged_before_the_handshake_timeout(link: Link) -> None:
    """Preface: tunneld's edge judges from the fourth byte on (the first four also tell a raw
    link from a WebSocket upgrade), so one wrong byte gets no GO_AWAY: the connection is closed
    by the handshake timeout (no GO_AWAY, as for any connection that sent no hello)."""
    link.send(b"X")
    assert link.until_eof() == []


# --------------------------------------------------------------------------- handshake


def test_the_edge_sends_no_preface_and_its_first_frame_is_the_welcome(
    link: Link, edge: Edge
) -> None:
    """Preface: 'The edge sends no preface'; Handshake: 'The first frame the agent receives
    must be CONTROL welcome or error' - also when the agent pinged right behind its hello (in
    the same write): the edge's PING|ACK, with the same value, comes after the welcome."""
    link.send(PREFACE, edge.hello(), pack_header(PING, 0, 0, 77))
    pong = link.until(lambda f: f.type == PING)
    assert is_welcome(link.frames[0]), link.frames
    assert header(pong) == (PING, ACK, 0, 77)
    assert link.frames.index(pong) > 0


@pytest.mark.parametrize(
    "first",
    [pack_header(PING, 0, 0, 1), pack_header(WU, 0, 0, 1), encode_frame(DATA, SYN, 1, b"{}")],
    ids=["ping", "window-update", "syn"],
)
def test_a_first_frame_that_is_not_hello_is_a_protocol_error(link: Link, first: bytes) -> None:
    """Handshake: 'The first frame after the agent's preface must be CONTROL hello; anything
    else -> GO_AWAY(PROTOCOL_ERROR)'."""
    link.send(PREFACE, first)
    assert [header(f) for f in link.until_eof()] == [goaway(GoAwayCode.PROTOCOL_ERROR)]


def test_a_goaway_as_the_first_frame_is_answered_with_nothing(link: Link) -> None:
    """Handshake: '... except a GO_AWAY: the agent giving up before it said hello, taken as
    such with nothing sent back'."""
    link.send(PREFACE, pack_header(GO_AWAY, 0, 0, int(GoAwayCode.SHUTTING_DOWN)))
    assert link.until_eof() == []


# --------------------------------------------------------------------------- frame errors


def _ctrl(obj: object) -> bytes:
    return encode_frame(CONTROL, payload=orjson.dumps(obj))


WELCOME_TO_EDGE = _ctrl(
    {"type": "welcome", "session": "s", "heartbeat_s": 1.0, "limits": {}, "exposures": []}
)
BAD_FRAMES = {
    # frame header
    "version 2": b"\x02" + pack_header(PING, 0, 0, 1)[1:],
    "unknown type": pack_header(5, 0, 0, 0),
    "flag not allowed (PING|SYN)": pack_header(PING, SYN, 0, 1),
    "flag not allowed (DATA|ACK)": pack_header(DATA, ACK, 1, 0),
    # wrong stream
    "PING on a stream": pack_header(PING, 0, 2, 1),
    "GO_AWAY on a stream": pack_header(GO_AWAY, 0, 2, 0),
    "CONTROL on a stream": encode_frame(CONTROL, 0, 2, b"{}"),
    "DATA on stream 0": encode_frame(DATA, 0, 0, b"x"),
    "ACK on stream 0": pack_header(WU, ACK, 0, 0),
    "RST on stream 0": pack_header(WU, RST, 0, 0),
    # streams
    "DATA on a stream never opened": encode_frame(DATA, 0, 4, b"x"),
    "SYN from the agent": encode_frame(DATA, SYN, 1, b'{"port":8000,"via":"direct"}'),
    # control
    "hello after the handshake": b"HELLO",  # replaced by the real hello below
    "welcome sent to the edge": WELCOME_TO_EDGE,
    "control payload that does not decode": encode_frame(CONTROL, payload=b'{"type":'),
    "control message with an unknown field": _ctrl({"type": "list", "id": 1, "x": 0}),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_a_bad_frame_is_goaway_protocol_error_and_nothing_after_it_is_read(
    link: Link, edge: Edge, name: str
) -> None:
    """Frame header, frame types, handshake: each of these -> GO_AWAY(PROTOCOL_ERROR); Ending a
    session: 'the detecting side sends GO_AWAY(<code>), ignores all further input, and closes
    the connection' - a PING and a `list` right behind the bad frame get no answer."""
    welcomed(link, edge)
    bad = edge.hello() if name == "hello after the handshake" else BAD_FRAMES[name]
    link.send(bad, pack_header(PING, 0, 0, 9), _ctrl({"type": "list", "id": 2}))
    after = [header(f) for f in link.until_eof()[1:]]  # [0]: the welcome
    assert after == [goaway(GoAwayCode.PROTOCOL_ERROR)], name


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (pack_header(DATA, 0, 2, 65537), GoAwayCode.FRAME_TOO_LARGE),
        (pack_header(CONTROL, 0, 0, 65537), GoAwayCode.FRAME_TOO_LARGE),
        (pack_header(WU, 0, 0, 2**31 - 1), GoAwayCode.FLOW_CONTROL_ERROR),
    ],
    ids=["data-too-large", "control-too-large", "session-window-overflow"],
)
def test_size_and_window_errors_have_their_own_codes(
    link: Link, edge: Edge, frame: bytes, code: GoAwayCode
) -> None:
    """'Oversized `length` is refused as soon as the header is read (before buffering the
    payload) -> GO_AWAY(FRAME_TOO_LARGE)': only the 12 header bytes are sent here. 'A
    WINDOW_UPDATE that would take a window above 2^31-1 -> GO_AWAY(FLOW_CONTROL_ERROR)'."""
    welcomed(link, edge)
    link.send(frame)
    assert [header(f) for f in link.until_eof()[1:]] == [goaway(code)]


# --------------------------------------------------------------------------- ending a session


def _preview_request(edge: Edge) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", edge.public_port), timeout=TIMEOUT)
    client.sendall(f"GET / HTTP/1.1\r\nHost: {edge.preview_host}\r\n\r\n".encode())
    return client


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return out + b"<reset>"
        if not data:
            return out
        out += data
    raise AssertionError(f"the client's answer did not end: {out!r}")


def test_a_draining_goaway_lets_the_live_stream_finish_then_the_edge_closes(
    link: Link, edge: Edge
) -> None:
    """Ending a session: with GO_AWAY(SHUTTING_DOWN) 'existing streams may finish; the
    connection is closed once no stream is left'. The agent says it is going away while a
    request is open; its answer still reaches the client whole, then the edge closes the link
    (without a GO_AWAY of its own: the agent's ended the session)."""
    welcomed(link, edge, STREAM_SANDBOX)
    client = _preview_request(edge)
    try:
        syn = link.until(lambda f: f.type == DATA and f.flags & SYN)
        sid = syn.stream_id
        link.until(lambda f: f.type == DATA and f.stream_id == sid and not f.flags & SYN)
        link.send(pack_header(WU, ACK, sid, 0))
        link.send(pack_header(GO_AWAY, 0, 0, int(GoAwayCode.SHUTTING_DOWN)))
        body = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        link.send(encode_frame(DATA, FIN, sid, body))
        assert _read_all(client) == body
        frames = link.until_eof()
        assert not [f for f in frames if f.type == GO_AWAY], frames
    finally:
        client.close()


def test_any_other_goaway_code_drops_the_live_stream_at_once(link: Link, edge: Edge) -> None:
    """Ending a session: 'Any other code means the sender gave up: the receiver drops all
    streams at once': the client waiting for its answer gets the edge's 503
    SANDBOX_NOT_CONNECTED (the agent left before answering), and the link is closed."""
    welcomed(link, edge, STREAM_SANDBOX)
    client = _preview_request(edge)
    try:
        sid = link.until(lambda f: f.type == DATA and f.flags & SYN).stream_id
        link.send(pack_header(WU, ACK, sid, 0))
        link.send(pack_header(GO_AWAY, 0, 0, int(GoAwayCode.INTERNAL_ERROR)))
        answer = _read_all(client)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"code":"SANDBOX_NOT_CONNECTED"' in answer
        link.until_eof()
    finally:
        client.close()


def test_a_newer_session_for_the_sandbox_replaces_the_older_with_goaway_replaced(
    edge: Edge,
) -> None:
    """GO_AWAY codes: 'REPLACED | 6 | a newer session for the same sandbox took over': the older
    link gets GO_AWAY(REPLACED) and, holding no stream, is closed; the newer one is served."""
    older, newer = Link(edge), Link(edge)
    try:
        welcomed(older, edge, "sbreplaced")
        welcomed(newer, edge, "sbreplaced")
        assert [header(f) for f in older.until_eof()[1:]] == [goaway(GoAwayCode.REPLACED)]
        newer.send(pack_header(PING, 0, 0, 5))
        assert header(newer.until(lambda f: f.type == PING)) == (PING, ACK, 0, 5)
    finally:
        older.close()
        newer.close()


def test_an_agent_is_never_sent_a_public_port(link: Link, edge: Edge) -> None:
    """Exposure: `public_port` is 'never sent to an agent, nor to an older node: either would
    refuse the unknown field'. A `tcp` exposure has one (the admin API says it), yet neither the
    welcome that lists it nor the `ok` to the agent's own `tcp` expose carries it."""
    assert edge.tcp_public_port
    welcome = welcomed(link, edge, TCP_SANDBOX).until(is_welcome)
    (listed,) = orjson.loads(welcome.payload)["exposures"]
    assert listed["port"] == 9000 and "public_port" not in listed, listed
    link.send(_ctrl({"type": "expose", "id": 1, "port": 9001, "protocol": "tcp"}))
    ok = link.until(lambda f: f.type == CONTROL and b'"type":"ok"' in f.payload)
    (exposure,) = orjson.loads(ok.payload)["exposures"]
    assert exposure["port"] == 9001 and "public_port" not in exposure, exposure


def test_over_a_websocket_message_boundaries_carry_no_meaning(edge: Edge) -> None:
    """'an upgrade `GET /v1/agent` on the agent port, subprotocol `tunneld.v1`, after which the
    same byte stream travels in binary messages whose boundaries carry no meaning': the preface,
    hello and a PING cut at odd places (mid-preface, mid-header, two frames in one message) get
    the welcome and the PING|ACK, whatever messages the edge puts them in."""
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock = socket.create_connection(("127.0.0.1", edge.port), timeout=TIMEOUT)
    try:
        request = wse.Request(host="edge", target="/v1/agent", subprotocols=["tunneld.v1"])
        sock.sendall(ws.send(request))
        reader = FrameReader()
        got: list[Frame] = []
        accepted: list[wse.AcceptConnection] = []

        def read_until(done: Callable[[], bool]) -> None:
            deadline = time.monotonic() + TIMEOUT
            while not done():
                assert time.monotonic() < deadline, f"no answer in time: {got}"
                data = sock.recv(65536)
                assert data, f"the edge closed the link: {got}"
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, wse.AcceptConnection):
                        accepted.append(event)
                    elif isinstance(event, wse.BytesMessage):
                        reader.feed(event.data)
                        while (frame := reader.next_frame()) is not None:
                            got.append(frame)

        read_until(lambda: bool(accepted))
        assert accepted[0].subprotocol == "tunneld.v1"
        stream = PREFACE + edge.hello() + pack_header(PING, 0, 0, 3)
        cuts = [0, 1, 5, len(PREFACE) + 7, len(stream) - 14, len(stream) - 5, len(stream)]
        for start, end in itertools.pairwise(cuts):
            sock.sendall(ws.send(wse.BytesMessage(stream[start:end])))
        read_until(lambda: any(f.type == PING for f in got))
        assert is_welcome(got[0]) and header(got[1]) == (PING, ACK, 0, 3), got
    finally:
        sock.close()


def _reply_to(link: Link, request_id: int) -> dict[str, object]:
    frame = link.until(
        lambda f: f.type == CONTROL and orjson.loads(f.payload).get("id") == request_id
    )
    reply: dict[str, object] = orjson.loads(frame.payload)
    return reply


def test_an_agents_expose_is_refused_with_the_admin_apis_codes(link: Link, edge: Edge) -> None:
    """Error codes: 'An agent's `expose`/`unexpose` is answered like the admin API would
    (`INVALID_PORT`, `INVALID_TOKEN_FORMAT`, `TOKEN_IN_USE`)', each an `error` with the request's
    id, and the session goes on. A name past 256 characters never reaches that check: the
    message does not decode (the codec bounds it), a protocol error."""
    welcomed(link, edge, "sbrequests")
    requests = [
        (1, {"type": "expose", "port": 80}, "INVALID_PORT"),
        (2, {"type": "expose", "port": 3000}, "INVALID_PORT"),
        (3, {"type": "unexpose", "port": 1023}, "INVALID_PORT"),
        (4, {"type": "expose", "port": 8000, "token": "Not-Valid"}, "INVALID_TOKEN_FORMAT"),
        (5, {"type": "expose", "port": 8000, "token": "t1"}, None),
        (6, {"type": "expose", "port": 8001, "token": "t1"}, "TOKEN_IN_USE"),
    ]
    for request_id, request, code in requests:
        link.send(_ctrl({**request, "id": request_id}))
        reply = _reply_to(link, request_id)
        if code is None:
            assert reply["type"] == "ok", reply
        else:
            assert (reply["type"], reply["code"]) == ("error", code), reply
    link.send(_ctrl({"type": "expose", "id": 7, "port": 8002, "name": "n" * 257}))
    assert [header(f) for f in link.until_eof() if f.type == GO_AWAY] == [
        goaway(GoAwayCode.PROTOCOL_ERROR)
    ]


def test_a_message_the_edge_does_not_serve_gets_an_error_without_an_id(
    link: Link, edge: Edge
) -> None:
    """Error codes: 'a message the edge does not serve gets `UNEXPECTED_MESSAGE`, an `error`
    without an `id` even when the message had one'; the session goes on."""
    welcomed(link, edge, "sbunexpected")
    link.send(_ctrl({"type": "watch_port", "id": 7, "port": 8000}))
    error = link.until(lambda f: f.type == CONTROL and b'"type":"error"' in f.payload)
    reply = orjson.loads(error.payload)
    assert reply["code"] == "UNEXPECTED_MESSAGE" and "id" not in reply, reply
    link.send(_ctrl({"type": "list", "id": 8}))
    assert _reply_to(link, 8)["type"] == "ok"


def test_an_agent_cannot_expose_for_another_sandbox(link: Link, edge: Edge) -> None:
    """Messages: `expose`'s `sandbox?` is 'node -> owner node on a node link only'. From an
    agent it counts for nothing: the port is exposed for the agent's own sandbox, never for the
    sandbox it names."""
    welcomed(link, edge, "sbown")
    link.send(_ctrl({"type": "expose", "id": 1, "port": 8000, "sandbox": "sbvictim"}))
    reply = _reply_to(link, 1)
    assert reply["type"] == "ok", reply
    exposures = reply["exposures"]
    assert isinstance(exposures, list) and len(exposures) == 1, reply
    exposure = exposures[0]
    assert "-sbown-" in exposure["url"], exposure
    with admin_client(edge.procs) as admin:
        sandboxes = {s["id"]: s for s in admin.get("/v1/sandboxes").json()["sandboxes"]}
    assert [p["port"] for p in sandboxes["sbown"]["ports"]] == [8000]
    assert "sbvictim" not in sandboxes


def test_a_ping_flood_gets_its_burst_answered_then_goaway_too_many_requests(
    link: Link, edge: Edge
) -> None:
    """PING: answered 'up to 10 PINGs a second on average with bursts of 100; past that the
    session ends with GO_AWAY(TOO_MANY_REQUESTS)'. 101 PINGs in one write: 100 PING|ACKs with
    their values, in order, then the GO_AWAY, and the edge closes the connection."""
    welcomed(link, edge, "sbpings")
    link.send(b"".join(pack_header(PING, 0, 0, 1000 + i) for i in range(101)))
    after = [header(f) for f in link.until_eof()[1:]]
    assert after[:100] == [(PING, ACK, 0, 1000 + i) for i in range(100)]
    assert after[100:] == [goaway(GoAwayCode.TOO_MANY_REQUESTS)]
