"""Frame and stream-state errors on the public HTTP/2 side (tunneld/h2public.py): which the h2
library answers on their stream alone, and which end the connection (docs/operations.md,
"Malformed requests are stream errors", its list of what is still a connection error).

None of them is a malformed request (RFC 9113 8.1.1): they break the framing, the stream
states or flow control, which h2 checks itself. The edge answers them as h2 says:

* on a stream the client has ended while the edge's response is still coming (half-closed,
  remote), DATA or HEADERS is a stream error STREAM_CLOSED (RFC 9113 5.1), and a WINDOW_UPDATE
  past the stream's window limit a stream error FLOW_CONTROL_ERROR (6.9.1): RST_STREAM on that
  stream, the others go on;
* the rest is a connection error (GOAWAY with the code, then the close; every stream cut),
  some of them where the RFC says a stream error (a stream's WINDOW_UPDATE of 0, 6.9; a PRIORITY
  frame of a length other than 5, 6.3; a stream that depends on itself, RFC 7540 5.3.1): h2
  raises them from its frame handling (or its frame parser), where the edge cannot take them
  per stream without overriding more of h2.

Everything is real, as in test_h2_malformed_stream.py: an in-process edge serving HTTPS (ALPN
``h2``), a real agent, a scripted service on 127.0.0.1, and an h2 client over a real TLS socket
whose frames the test writes raw where h2 would refuse to send them."""

from __future__ import annotations

from typing import Final

import h2.errors
import hyperframe.frame
import pytest
import trustme

from tests.e2e import test_public_tls
from tests.e2e.conftest import Stack, wait_until
from tests.e2e.test_h2_edges import Seen, Service, expose, nothing_left, pump, unchecked_client
from tests.e2e.test_http2 import RawH2
from tests.faults import test_h2_malformed_stream as malformed

pytestmark = pytest.mark.anyio

ca = test_public_tls.ca  # the module's certificate authority fixture
stack = test_public_tls.stack  # an HTTPS stack with the default configuration

Codes = h2.errors.ErrorCodes
DATA, HEADERS, PRIORITY, RST_STREAM, WINDOW_UPDATE = 0, 1, 2, 3, 8
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    """One frame as given (hyperframe checks what it serializes)."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def request_block(client: RawH2, path: bytes) -> bytes:
    """A GET's header block, encoded by the client's HPACK encoder (the tables stay in step)."""
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", client.host.encode()),
        (b":path", path),
    ]
    return client.conn.encoder.encode(headers)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("DATA", Codes.STREAM_CLOSED),
        ("HEADERS", Codes.STREAM_CLOSED),
        ("WINDOW_UPDATE past 2^31-1", Codes.FLOW_CONTROL_ERROR),
    ],
)
async def test_stream_state_errors_h2_answers_on_their_stream_only(
    stack: Stack, ca: trustme.CA, case: str, code: Codes
) -> None:
    """A second ``GET /slow`` (ended with its HEADERS) whose response is in flight gets DATA or
    HEADERS from the client, or a WINDOW_UPDATE past the window limit: RST_STREAM with the RFC's
    code on that stream, no GOAWAY; the first one's response arrives whole, and a new request on
    the connection is served."""
    async with Service(malformed.slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow = await malformed.slow_response_in_flight(client, seen)
            victim = await malformed.slow_response_in_flight(client, seen)
            if case == "DATA":
                raw = frame(DATA, 0, victim, b"x")
            elif case == "HEADERS":
                block = client.conn.encoder.encode([(b"x-late", b"1")])
                raw = frame(HEADERS, END_HEADERS | END_STREAM, victim, block)
            else:
                raw = hyperframe.frame.WindowUpdateFrame(victim, window_increment=2**31 - 1)
                raw = raw.serialize()
            await malformed.write(client, client.conn.data_to_send() + raw)
            await pump(client, seen, lambda: victim in seen.resets or seen.goaway is not None)
            assert seen.goaway is None, f"GOAWAY {seen.goaway}"
            assert seen.resets[victim] == code
            assert victim not in seen.ended
            await malformed.the_slow_response_ends_and_more_is_served(client, seen, service, slow)
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


CONNECTION_ERRORS: Final = {
    # where RFC 9113 says a stream error, h2 a connection error
    "WINDOW_UPDATE of 0 on a stream": Codes.PROTOCOL_ERROR,
    "PRIORITY of 4 bytes": Codes.FRAME_SIZE_ERROR,
    "PRIORITY on itself": Codes.PROTOCOL_ERROR,
    "HEADERS depending on itself": Codes.PROTOCOL_ERROR,
    # connection errors in the RFC too
    "RST_STREAM of 3 bytes": Codes.FRAME_SIZE_ERROR,
    "WINDOW_UPDATE of 3 bytes on a stream": Codes.FRAME_SIZE_ERROR,
    "DATA past SETTINGS_MAX_FRAME_SIZE": Codes.FRAME_SIZE_ERROR,
    "DATA whose padding is past its end": Codes.PROTOCOL_ERROR,
    "DATA on an idle stream": Codes.PROTOCOL_ERROR,
    "CONTINUATION without HEADERS": Codes.PROTOCOL_ERROR,
    "HEADERS on an even stream": Codes.PROTOCOL_ERROR,
}


def bad_frame(client: RawH2, case: str, upload: int) -> bytes:
    """The frame of ``case``, on the open upload ``upload`` or a stream of its own."""
    fresh = client.conn.get_next_available_stream_id()
    if case == "WINDOW_UPDATE of 0 on a stream":
        return frame(WINDOW_UPDATE, 0, upload, b"\0\0\0\0")
    if case == "PRIORITY of 4 bytes":
        return frame(PRIORITY, 0, upload, b"\0\0\0\0")
    if case == "PRIORITY on itself":
        return frame(PRIORITY, 0, upload, upload.to_bytes(4, "big") + b"\x0f")
    if case == "HEADERS depending on itself":
        priority = fresh.to_bytes(4, "big") + b"\x0f"
        flags = END_HEADERS | END_STREAM | PRIORITY_FLAG
        return frame(HEADERS, flags, fresh, priority + request_block(client, b"/p"))
    if case == "RST_STREAM of 3 bytes":
        return frame(RST_STREAM, 0, upload, b"\0\0\0")
    if case == "WINDOW_UPDATE of 3 bytes on a stream":
        return frame(WINDOW_UPDATE, 0, upload, b"\0\0\x01")
    if case == "DATA past SETTINGS_MAX_FRAME_SIZE":
        return frame(DATA, 0, upload, b"z" * 20_000)  # (16384: the edge says no other)
    if case == "DATA whose padding is past its end":
        return frame(DATA, PADDED, upload, b"\x09ab")
    if case == "DATA on an idle stream":
        return frame(DATA, 0, fresh, b"x")
    if case == "CONTINUATION without HEADERS":
        return frame(9, END_HEADERS, upload, b"")
    assert case == "HEADERS on an even stream"
    return frame(HEADERS, END_HEADERS | END_STREAM, upload + 1, request_block(client, b"/p"))


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
async def test_frame_errors_h2_raises_are_connection_errors(
    stack: Stack, ca: trustme.CA, case: str
) -> None:
    """With a response in flight and an upload open: one GOAWAY with the code h2 gives, then
    the close. The response is cut (never a clean end), so is the upload, and nothing else
    reaches the service."""
    async with Service(malformed.slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow, upload = await malformed.slow_and_an_upload(client, seen, service, 100)
            await malformed.write(client, bad_frame(client, case, upload))
            assert await malformed.goaways_to_the_close(client, seen) == [CONNECTION_ERRORS[case]]
            assert slow not in seen.ended and upload not in seen.ended
            await wait_until(lambda: bool(service.ends), what="the upload's service end")
            assert service.ends == ["reset"], service.ends
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")
        assert len(service.heads) == 2
