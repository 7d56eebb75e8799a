"""The sans-IO request framer: no sockets, no loop; whole input, byte by byte, and with trailers."""

from __future__ import annotations

import pytest

from tunneld.framing import (
    MAX_UPGRADE_HOLD,
    RequestFramer,
    State,
    forward_head,
)
from tunneld.httphead import H11HeadParser, HeadError, HttptoolsHeadParser, RequestHead

PARSERS = [HttptoolsHeadParser(), H11HeadParser()]
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def _run(framer: RequestFramer, data: bytes, *, split: bool) -> list[tuple[str, bytes]]:
    """Feed ``data`` whole or byte by byte; body pieces of consecutive events are merged."""
    events = []
    pieces = [data[i : i + 1] for i in range(len(data))] if split else [data]
    for piece in pieces:
        events += framer.receive_data(memoryview(piece))
    out: list[tuple[str, bytes]] = []
    for event in events:
        if isinstance(event, RequestHead):
            out.append(("head", event.target))
        elif isinstance(event, HeadError):
            out.append(("invalid", event.code.encode()))
        else:
            assert isinstance(event, (bytes, memoryview)), event
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + bytes(event))
            else:
                out.append(("body", bytes(event)))
    return out


@pytest.fixture(params=PARSERS, ids=lambda p: p.name)
def framer(request) -> RequestFramer:
    return RequestFramer(request.param)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_pipelined_requests_with_bodies(framer: RequestFramer, split: bool) -> None:
    data = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert _run(framer, data, split=split) == [
        ("head", b"/a"),
        ("body", b"hello"),
        ("head", b"/b"),
        ("body", b"3\r\nabc\r\n0\r\n\r\n"),
        ("head", b"/c"),
    ]
    assert framer.state is State.HEAD and framer.idle and not framer.head_pending


def test_partial_head_is_pending(framer: RequestFramer) -> None:
    assert framer.idle
    assert framer.receive_data(b"GET / HTTP/1.1\r\nHo") == []
    assert framer.head_pending and not framer.idle


@pytest.mark.parametrize(
    "data, code",
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
            b"BAD_REQUEST",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40_000, b"HEADERS_TOO_LARGE"),
        (b"GARBAGE\r\n\r\n", b"BAD_REQUEST"),
    ],
)
def test_invalid_input_ends_relaying(framer: RequestFramer, data: bytes, code: bytes) -> None:
    events = _run(framer, data + b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", split=False)
    assert events[-1] == ("invalid", code)
    assert framer.state is State.DONE
    assert framer.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


@pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
def test_upgrade_waits_for_101_then_releases_held_bytes(framer: RequestFramer, split: bool) -> None:
    assert _run(framer, UPGRADE + b"early bytes", split=split) == [("head", b"/ws")]
    assert framer.state is State.UPGRADE_PENDING and framer.holding
    assert framer.receive_response(b"HTTP/1.1 10") is None  # status line incomplete
    assert framer.receive_response(b"1 Switching Protocols\r\nUpgrade: websocket\r\n") is True
    assert framer.state is State.TUNNEL and not framer.holding
    assert framer.take_held() == b"early bytes"
    # raw from now on: a request-looking byte sequence is relayed, not parsed
    assert _run(framer, b"GET / HTTP/1.1\r\nHost: other\r\n\r\n", split=False) == [
        ("body", b"GET / HTTP/1.1\r\nHost: other\r\n\r\n")
    ]


@pytest.mark.parametrize(
    "status", [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 400 Bad\r\n", b"HTTP/1.1 1010 x\r\n", b"junk\r\n"]
)
def test_upgrade_refused_drops_held_bytes(framer: RequestFramer, status: bytes) -> None:
    second = b"GET /admin HTTP/1.1\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    assert _run(framer, UPGRADE + second, split=False) == [("head", b"/ws")]
    assert framer.receive_response(status + b"content-length: 0\r\n\r\n") is False
    assert framer.state is State.DONE
    assert framer.take_held() == b""
    assert framer.receive_data(second) == []


def test_upgrade_with_a_body_waits_after_the_body(framer: RequestFramer) -> None:
    head = UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n")
    assert _run(framer, head + b"abcEARLY", split=False) == [("head", b"/ws"), ("body", b"abc")]
    assert framer.state is State.UPGRADE_PENDING
    assert framer.receive_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n") is True
    assert framer.take_held() == b"EARLY"


def test_upgrade_hold_is_bounded(framer: RequestFramer) -> None:
    framer.receive_data(UPGRADE)
    assert framer.receive_data(b"x" * MAX_UPGRADE_HOLD) == []
    events = framer.receive_data(b"x")
    assert len(events) == 1 and isinstance(events[0], HeadError) and events[0].status == 400
    assert framer.state is State.DONE and framer.take_held() == b""


def test_endless_status_line_is_not_101(framer: RequestFramer) -> None:
    framer.receive_data(UPGRADE)
    assert framer.receive_response(b"HTTP/1.1 101" + b" " * 10_000) is False


def test_response_is_ignored_unless_an_upgrade_is_pending(framer: RequestFramer) -> None:
    framer.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert framer.receive_response(b"HTTP/1.1 101 Switching Protocols\r\n\r\n") is None
    assert framer.state is State.HEAD


def test_forward_head_drops_internal_and_underscore_headers() -> None:
    head = HttptoolsHeadParser().parse(
        b"GET /x HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nx-forwarded_host: e\r\n"
        b"X-Sandbox-Name: o\r\nForwarded: for=6\r\nX-Real-IP: 6\r\nX-Tunnel-A: 1\r\n"
        b"My_Header: dropped\r\nX-Kept: yes\r\n\r\n"
    )
    out = forward_head(head, b"host: localhost:8000\r\n", b"x-forwarded-for: 1.2.3.4\r\n\r\n")
    assert out == (
        b"GET /x HTTP/1.1\r\nhost: localhost:8000\r\nx-kept: yes\r\n"
        b"x-forwarded-for: 1.2.3.4\r\n\r\n"
    )


def test_the_module_constants_are_the_states_of_their_names() -> None:
    """tunneld/framing.py unpacks State into STATE_* in definition order: a member added or
    moved must not give a constant another state's member."""
    from tunneld import framing

    for member in State:
        assert getattr(framing, f"STATE_{member.name}") is member
