"""A malformed HTTP/2 request is a stream error, not a connection error (RFC 9113 8.1.1): the
edge (tunneld/h2public.py) answers that one stream ``400 BAD_REQUEST`` (JSON), refuses a request
body still coming with ``RST_STREAM(PROTOCOL_ERROR)``, never forwards the request to the
service, and every other stream of the client's connection goes on: a response in flight on
stream 1 arrives whole and a new request on the same connection is served. Browsers multiplex a
page's requests over one connection, so one bad request (from a page script) must not cut the
others, which h2's own header checks did (GOAWAY), as did its ``content-length`` checks (a value
that is no number; DATA that contradicts it: ``InvalidBodyLengthError``) and a ``:status 1xx`` in
a request (h2 takes it for an informational response). Malformed trailers, trailers without
END_STREAM (which h2 made a connection error too), and DATA against the content-length of a
request the service has, cut their request (RST_STREAM PROTOCOL_ERROR, the
service's connection reset before the request's end), and each such cut takes from the client's
rapid-reset budget. A header block HPACK cannot decode is still a connection error, of type
COMPRESSION_ERROR (RFC 9113 4.3): the connection's decoding state is lost.

Everything is real: an in-process edge serving HTTPS (ALPN ``h2``), a real agent, a service on
127.0.0.1 scripted per test (``Service`` of test_h2_edges.py, which records every request head it
gets), and a client on the ``h2`` library over a real TLS socket whose outbound header checks are
off (``unchecked_client``), so it sends the header blocks as given."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Final

import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import orjson
import pytest
import trustme

from tests.e2e import test_http2, test_public_tls
from tests.e2e.conftest import Stack, wait_until
from tests.e2e.test_h2_edges import (
    Seen,
    Service,
    ending,
    expose,
    h2_connection_at_the_edge,
    nothing_left,
    pump,
    unchecked_client,
)
from tests.e2e.test_http2 import RawH2

pytestmark = pytest.mark.anyio

ca = test_public_tls.ca  # the module's certificate authority fixture
stack = test_public_tls.stack  # an HTTPS stack with the default configuration
cluster = test_http2.cluster  # two nodes and a Redis store (tests/cluster/nodes.py)

PART: Final = 10_000  # the slow response: PART bytes, then (once the test says) PART more
PROTOCOL_ERROR: Final = h2.errors.ErrorCodes.PROTOCOL_ERROR
COMPRESSION_ERROR: Final = h2.errors.ErrorCodes.COMPRESSION_ERROR
ENHANCE_YOUR_CALM: Final = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


async def slow_or_drain(service: Service, reader: asyncio.StreamReader, writer) -> None:
    """``GET /slow``: PART bytes of a 2 x PART response, the rest once ``go`` is set. Anything
    else (an upload): read to the end, record it, answer 200 if the request was complete."""
    head = service.heads[-1]
    if head.startswith(b"GET /slow "):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (2 * PART) + b"a" * PART)
        await writer.drain()
        await service.wait_go()
        if writer.is_closing():  # the edge reset it meanwhile
            service.ends.append("reset")
            return
        writer.write(b"b" * PART)
        await writer.drain()
        service.ends.append("served")
        return
    if head.startswith(b"GET "):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        service.ends.append("served")
        return
    body = bytearray()
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 15):
            body += chunk
            if body.endswith(b"0\r\n\r\n"):
                break
    except ConnectionResetError:
        service.received.append(bytes(body))
        service.ends.append("reset")
        return
    service.received.append(bytes(body))
    if body.endswith(b"0\r\n\r\n"):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        service.ends.append("served")
    else:
        service.ends.append(await ending(reader))


def base(authority: bytes, path: bytes = b"/malformed") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", authority),
        (b":path", path),
    ]


def malformed_block(kind: str, authority: bytes) -> list[tuple[bytes, bytes]]:
    """A request header block RFC 9113 8.2 / 8.3 makes malformed (its :path /malformed)."""
    ok = base(authority)
    return {
        "upper-case name": [*ok, (b"X-Upper", b"1")],
        "connection: keep-alive": [*ok, (b"connection", b"keep-alive")],
        "transfer-encoding": [*ok, (b"transfer-encoding", b"chunked")],
        "keep-alive": [*ok, (b"keep-alive", b"timeout=5")],
        "upgrade": [*ok, (b"upgrade", b"websocket")],
        "te: gzip": [*ok, (b"te", b"gzip")],
        "pseudo after regular": [*ok[:3], (b"accept", b"*/*"), ok[3]],
        "no :path": ok[:3],
        "empty :path": [*ok[:3], (b":path", b"")],
        "no :method": ok[1:],
        "duplicate :path": [*ok, (b":path", b"/again")],
        ":status in a request": [*ok, (b":status", b"200")],
        "unknown pseudo-header": [*ok, (b":nonsense", b"1")],
        ":protocol without CONNECT": [*ok, (b":protocol", b"websocket")],
        "host and :authority differ": [*ok, (b"host", b"other." + authority)],
        "CR LF in a value": [*ok, (b"x-split", b"a\r\nx-injected: 1")],
        "NUL in a value": [*ok, (b"x-nul", b"a\x00b")],
        "space around a value": [*ok, (b"x-space", b" a ")],
        "space in a name": [*ok, (b"x bad", b"1")],
        "colon in a name": [*ok, (b"x:bad", b"1")],
        "empty name": [*ok, (b"", b"1")],
        # h2 takes a 1xx :status for an informational response (a connection error there)
        ":status 1xx in a request": [*ok, (b":status", b"100")],
        ":status 1xx first": [(b":status", b"103"), *ok],
        # h2 checks content-length itself (a connection error there)
        "content-length no number": [*ok, (b"content-length", b"abc")],
        "content-length negative": [*ok, (b"content-length", b"-1")],
        "content-length list": [*ok, (b"content-length", b"0, 0")],
        "content-lengths differ": [*ok, (b"content-length", b"0"), (b"content-length", b"1")],
        # (h2 lets this one through: the service would wait for a body that never comes)
        "content-length but no body": [*ok, (b"content-length", b"5")],
    }[kind]


KINDS: Final = [
    "upper-case name",
    "connection: keep-alive",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
    "te: gzip",
    "pseudo after regular",
    "no :path",
    "empty :path",
    "no :method",
    "duplicate :path",
    ":status in a request",
    "unknown pseudo-header",
    ":protocol without CONNECT",
    "host and :authority differ",
    "CR LF in a value",
    "NUL in a value",
    "space around a value",
    "space in a name",
    "colon in a name",
    "empty name",
    ":status 1xx in a request",
    ":status 1xx first",
    "content-length no number",
    "content-length negative",
    "content-length list",
    "content-lengths differ",
    "content-length but no body",
]


def send_block(
    client: RawH2, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False
) -> None:
    """HEADERS opening ``sid`` with ``headers`` as given. h2 takes the first block of a stream
    with a leading ``:status 1xx`` for an informational response, which a client cannot send:
    its stream is made a client's before h2 looks."""
    stream = client.conn._get_or_create_stream(sid, h2.connection.AllowedStreamIDs.ODD)
    stream.state_machine.client = True
    client.conn.send_headers(sid, headers, end_stream=end_stream)


def answered_400(seen: Seen, sid: int) -> None:
    assert seen.heads[sid][b":status"] == b"400", seen.heads.get(sid)
    page = orjson.loads(bytes(seen.bodies[sid]))
    assert page["code"] == "BAD_REQUEST"
    assert page["error"].startswith("Malformed HTTP/2 request: "), page


async def cut_at_the_service(client: RawH2, seen: Seen, service: Service, upload: int) -> bytes:
    """The upload ``upload``, which the service has, is cut: RST_STREAM(PROTOCOL_ERROR) to the
    client, no GOAWAY, and the service's connection reset. Returns what the service received."""
    await pump(client, seen, lambda: seen.over(upload) or seen.goaway is not None)
    assert seen.goaway is None, f"GOAWAY {seen.goaway}"
    assert seen.resets.get(upload) == PROTOCOL_ERROR, (seen.heads, seen.resets)
    await wait_until(lambda: len(service.ends) == 1, what="the upload's service end")
    assert service.ends == ["reset"], service.ends
    (received,) = service.received
    return received


async def the_rest_goes_on(
    stack: Stack, client: RawH2, seen: Seen, service: Service, slow: int, cut: bool = False
) -> None:
    """No GOAWAY; the response of ``slow`` arrives whole once the service sends the rest; a new
    request on the same connection is served; the service saw only those two requests (``cut``:
    and the POST ``cut_at_the_service`` saw cut, forgotten here)."""
    if cut:
        service.heads.remove(next(h for h in service.heads if h.startswith(b"POST")))
        service.ends.clear()
    assert seen.goaway is None and not seen.closed
    fresh = await the_slow_response_ends_and_more_is_served(client, seen, service, slow)
    assert seen.heads[slow][b":status"] == b"200"
    assert seen.heads[fresh][b":status"] == b"200"
    assert [h.split(b" ")[:2] for h in service.heads] == [[b"GET", b"/slow"], [b"GET", b"/after"]]


async def the_slow_response_ends_and_more_is_served(
    client: RawH2, seen: Seen, service: Service, slow: int
) -> int:
    """Once the service sends the rest, the response of ``slow`` arrives whole and a new request
    on the same connection is served, no GOAWAY. Returns the new request's stream."""
    service.go.set()
    await pump(client, seen, lambda: seen.over(slow))
    assert slow in seen.ended and slow not in seen.resets
    assert bytes(seen.bodies[slow]) == b"a" * PART + b"b" * PART
    fresh = client.request(b"GET", b"/after")
    await client.send()
    await pump(client, seen, lambda: seen.over(fresh))
    assert fresh in seen.ended and bytes(seen.bodies[fresh]) == b"ok"
    assert seen.goaway is None and not seen.closed
    return fresh


async def goaways_to_the_close(client: RawH2, seen: Seen) -> list[h2.errors.ErrorCodes | int]:
    """The codes of every GOAWAY the edge sends until it closes the connection (streams that
    end or are reset meanwhile go into ``seen``)."""
    codes: list[h2.errors.ErrorCodes | int] = []
    for _ in range(10_000):  # bounded: each event, or next_event's timeout, ends a turn
        try:
            event = await client.next_event(timeout=15)
        except ConnectionError:
            return codes
        if isinstance(event, h2.events.ConnectionTerminated):
            codes.append(event.error_code if event.error_code is not None else -1)
        elif isinstance(event, h2.events.StreamEnded):
            seen.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            seen.resets.setdefault(event.stream_id, event.error_code)
    raise AssertionError("the edge never closed the connection")


async def slow_response_in_flight(client: RawH2, seen: Seen) -> int:
    slow = client.request(b"GET", b"/slow")
    await client.send()
    await pump(client, seen, lambda: len(seen.bodies[slow]) == PART)
    return slow


async def slow_and_an_upload(
    client: RawH2, seen: Seen, service: Service, size: int
) -> tuple[int, int]:
    """``slow_response_in_flight``, then an upload (``POST /upload``) of ``size`` bytes not
    ended, once the service has its head. Returns the two streams."""
    slow = await slow_response_in_flight(client, seen)
    upload = client.request(b"POST", b"/upload", end=False)
    client.conn.send_data(upload, b"u" * size)
    await client.send()
    await wait_until(lambda: len(service.heads) == 2, what="the upload at the service")
    return slow, upload


@pytest.mark.parametrize("kind", KINDS)
async def test_a_malformed_request_is_answered_on_its_stream_only(
    stack: Stack, ca: trustme.CA, kind: str
) -> None:
    """The malformed request (ended with its HEADERS, as a GET is) gets a 400 and END_STREAM on
    its own stream, never reaches the service, and the connection carries on."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow = await slow_response_in_flight(client, seen)
            bad = client.conn.get_next_available_stream_id()
            send_block(client, bad, malformed_block(kind, host.encode()), end_stream=True)
            await client.send()
            await pump(client, seen, lambda: seen.over(bad) or seen.goaway is not None)
            assert seen.goaway is None, f"GOAWAY {seen.goaway}"
            answered_400(seen, bad)
            assert bad in seen.ended and bad not in seen.resets
            await the_rest_goes_on(stack, client, seen, service, slow)
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


@pytest.mark.parametrize(
    "field",
    [
        (b"connection", b"close"),
        (b"content-length", b"abc"),
        (b"content-length", b"5, 6"),
        (b":status", b"100"),
    ],
    ids=["connection", "content-length no number", "content-length list", ":status 1xx"],
)
async def test_a_malformed_request_with_a_body_coming_is_refused_with_protocol_error(
    stack: Stack, ca: trustme.CA, field: tuple[bytes, bytes]
) -> None:
    """A malformed POST whose body is still coming: 400, then RST_STREAM(PROTOCOL_ERROR) for the
    body; the DATA the client sends meanwhile is dropped (the connection's window is given back,
    so the next upload is not starved) and reaches no service."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow = await slow_response_in_flight(client, seen)
            bad = client.conn.get_next_available_stream_id()
            headers = [(b":method", b"POST"), *base(host.encode())[1:], field]
            send_block(client, bad, headers)
            for _ in range(3):
                client.conn.send_data(bad, b"x" * 16_000)
            await client.send()
            await pump(client, seen, lambda: seen.over(bad) or seen.goaway is not None)
            await pump(client, seen, lambda: bad in seen.resets or seen.goaway is not None)
            assert seen.goaway is None, f"GOAWAY {seen.goaway}"
            answered_400(seen, bad)
            assert seen.resets[bad] == PROTOCOL_ERROR
            await the_rest_goes_on(stack, client, seen, service, slow)
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


@pytest.mark.parametrize(
    "trailers",
    [
        [(b":path", b"/x")],  # a pseudo-header in trailers
        [(b"X-Upper", b"1")],
        [(b"x-split", b"a\r\nb")],
        [(b"connection", b"close")],
        [(b":status", b"100")],  # (h2: an informational response, a connection error)
        [(b"content-length", b"abc")],  # (h2: a connection error)
    ],
    ids=[
        "pseudo-header",
        "upper-case name",
        "CR LF in a value",
        "connection",
        ":status 1xx",
        "content-length no number",
    ],
)
async def test_malformed_trailers_cut_their_request_only(
    stack: Stack, ca: trustme.CA, trailers: list[tuple[bytes, bytes]]
) -> None:
    """An upload whose trailers are malformed: RST_STREAM(PROTOCOL_ERROR) on its stream, and the
    service's connection is reset before the request's end (the last chunk) reached it: a
    malformed request is never forwarded whole. The other streams go on."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow, upload = await slow_and_an_upload(client, seen, service, 1000)
            client.conn.send_headers(upload, trailers, end_stream=True)
            await client.send()
            received = await cut_at_the_service(client, seen, service, upload)
            assert not received.endswith(b"0\r\n\r\n"), "the malformed request reached its end"
            await the_rest_goes_on(stack, client, seen, service, slow, cut=True)
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


def unended_trailers(client: RawH2, sid: int, trailers: list[tuple[bytes, bytes]]) -> bytes:
    """What the client has to send, then a HEADERS frame of ``trailers`` on ``sid`` without
    END_STREAM, which the h2 library refuses to send: its block is encoded by the client's HPACK
    encoder, so that the header tables stay in step. The caller writes it."""
    frame = hyperframe.frame.HeadersFrame(sid, data=client.conn.encoder.encode(trailers))
    frame.flags.add("END_HEADERS")
    return client.conn.data_to_send() + frame.serialize()


async def write(client: RawH2, data: bytes) -> None:
    assert client.writer is not None
    client.writer.write(data)
    await client.writer.drain()


@pytest.mark.parametrize("then", ["nothing", "DATA with END_STREAM", "trailers with END_STREAM"])
async def test_trailers_without_end_stream_cut_their_request_only(
    stack: Stack, ca: trustme.CA, then: str
) -> None:
    """An upload whose trailers (a second HEADERS) come without END_STREAM: malformed (RFC 9113
    8.1), a stream error (8.1.1), which h2 made a connection error ("Trailers must have
    END_STREAM set": GOAWAY, every stream cut). RST_STREAM(PROTOCOL_ERROR) on its stream, and
    the service's connection is reset before the request's end (the last chunk) reached it,
    even when the client ends the stream right after them, in the same write (DATA with
    END_STREAM, or more trailers with it: h2 itself would trip on an assertion there). The
    other streams go on."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow, upload = await slow_and_an_upload(client, seen, service, 1000)
            data = unended_trailers(client, upload, [(b"x-trailer", b"1")])
            if then == "DATA with END_STREAM":
                client.conn.send_data(upload, b"v" * 100, end_stream=True)
            elif then == "trailers with END_STREAM":
                client.conn.send_headers(upload, [(b"x-trailer", b"2")], end_stream=True)
            await write(client, data + client.conn.data_to_send())
            received = await cut_at_the_service(client, seen, service, upload)
            assert not received.endswith(b"0\r\n\r\n"), "the malformed request reached its end"
            assert received.strip(b"0123456789abcdef\r\nu") == b"", received
            await the_rest_goes_on(stack, client, seen, service, slow, cut=True)
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


async def big_then_close(service: Service, reader: asyncio.StreamReader, writer) -> None:
    """A response of BIG bytes, at once, then the close (whatever the request's body)."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG + b"z" * BIG)
    await writer.drain()
    service.ends.append("served")


BIG: Final = 200_000  # past the client's windows (65535)


async def test_trailers_without_end_stream_on_a_complete_response_refuse_the_rest(
    stack: Stack, ca: trustme.CA
) -> None:
    """A request answered before its body ended, whose complete response waits at the edge for
    the client's window, and whose trailers then come without END_STREAM: the response still
    goes out whole, then RST_STREAM(PROTOCOL_ERROR) refuses the request's rest (the malformed
    request's stream error), where a request not malformed gets NO_ERROR (RFC 9113 8.1). Not
    GOAWAY: a new request on the connection is served."""
    async with Service(big_then_close) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            early = client.request(b"POST", b"/early", end=False)
            client.conn.send_data(early, b"u" * 100)
            await client.send()
            conn = await h2_connection_at_the_edge(stack)

            def waiting() -> bool:  # the response complete, its end waiting for a window
                stream = conn.streams.get(early)
                return stream is not None and stream.closing and bool(stream.outbound)

            await wait_until(waiting, what="the complete response to wait for the client")
            await write(client, unended_trailers(client, early, [(b"x-trailer", b"1")]))
            await pump(client, seen, lambda: early in seen.resets or seen.goaway is not None)
            assert seen.goaway is None, f"GOAWAY {seen.goaway}"
            assert early in seen.ended and bytes(seen.bodies[early]) == b"z" * BIG
            assert seen.resets[early] == PROTOCOL_ERROR
            fresh = client.request(b"GET", b"/after")
            await client.send()
            await pump(client, seen, lambda: seen.over(fresh))
            assert fresh in seen.ended and bytes(seen.bodies[fresh]) == b"z" * BIG
            assert seen.goaway is None and not seen.closed
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


@pytest.mark.parametrize("how", ["more DATA", "END_STREAM short", "trailers short"])
async def test_data_that_contradicts_content_length_cuts_its_request_only(
    stack: Stack, ca: trustme.CA, how: str
) -> None:
    """An upload of ``content-length: 1000`` whose DATA says otherwise once the service has its
    head (more bytes; END_STREAM, on DATA or on trailers, after 700): malformed (RFC 9113
    8.1.1), a stream error. RST_STREAM(PROTOCOL_ERROR) on its stream, and the service's
    connection is reset: it never gets the 1000 bytes of a complete-looking request, nor a byte
    past them (which it would read as a request of its own). h2 makes the first two connection
    errors (``InvalidBodyLengthError``: GOAWAY, every stream cut) and lets the third through
    (the service would wait for the rest). The other streams go on."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow = await slow_response_in_flight(client, seen)
            upload = client.request(b"POST", b"/upload", [(b"content-length", b"1000")], end=False)
            client.conn.send_data(upload, b"u" * 600)
            await client.send()
            await wait_until(lambda: len(service.heads) == 2, what="the upload at the service")
            if how == "more DATA":
                client.conn.send_data(upload, b"v" * 600)  # (h2 checks nothing it sends)
            elif how == "END_STREAM short":
                client.conn.send_data(upload, b"v" * 100, end_stream=True)
            else:
                client.conn.send_data(upload, b"v" * 100)
                client.conn.send_headers(upload, [(b"x-trailer", b"1")], end_stream=True)
            await client.send()
            received = await cut_at_the_service(client, seen, service, upload)
            assert len(received) < 1000, "the malformed request reached the service whole"
            assert received.strip(b"uv") == b"" and received.count(b"v") <= 100, received
            await the_rest_goes_on(stack, client, seen, service, slow, cut=True)
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")


async def test_data_past_content_length_before_the_request_went_anywhere_is_400(
    cluster: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    """On a node without the sandbox's agent, a request waits for the node link to the owner
    (``_hand_on``): DATA past its content-length that comes with its HEADERS finds it gone
    nowhere yet, so it is answered 400 on its stream, then RST_STREAM(PROTOCOL_ERROR) (the
    client is still sending). The origin never sees it, and the connection serves the next
    request (over the node link)."""
    from tests.cluster.nodes import wait_for as cluster_wait

    cert, key = test_public_tls.write_pair(ca, tmp_path, "wild", f"*.{test_public_tls.DOMAIN}")
    settings = {
        "domain": test_public_tls.DOMAIN,
        "scheme": "https",
        "public_tls_cert": cert,
        "public_tls_key": key,
    }
    a = await cluster.node("node-a", **settings)
    b = await cluster.node("node-b", **settings)
    origin = await cluster.origin()
    await cluster.agent(b, "sb1")
    r = await a.admin.post(
        "/v1/sandboxes/sb1/ports", json={"port": origin.port, "token": test_public_tls.TOKEN}
    )
    assert r.status_code == 200, r.text
    await cluster_wait(lambda: a.edge.cluster.owners.get("sb1", ("",))[0] == "node-b", what="owner")
    host = test_public_tls.host_of(r.json()["exposedAt"])
    async with unchecked_client(a, ca, host) as client:
        seen = Seen()
        bad = client.request(b"POST", b"/upload", [(b"content-length", b"3")], end=False)
        client.conn.send_data(bad, b"x" * 10)
        await client.send()  # (HEADERS and DATA in one write: one read at the edge)
        await pump(client, seen, lambda: bad in seen.resets or seen.goaway is not None)
        assert seen.goaway is None, f"GOAWAY {seen.goaway}"
        answered_400(seen, bad)
        assert seen.resets[bad] == PROTOCOL_ERROR
        fresh = client.request(b"GET", b"/headers")
        await client.send()
        await pump(client, seen, lambda: seen.over(fresh))
        assert seen.heads[fresh][b":status"] == b"200" and fresh in seen.ended
    assert origin.requests == 1  # the GET only


@pytest.mark.parametrize("how", ["DATA past content-length", "trailers without END_STREAM"])
async def test_a_client_that_makes_the_edge_cut_request_after_request_is_closed(
    ca: trustme.CA, tmp_path: Path, how: str
) -> None:
    """Each upload cut (for DATA past its content-length, or trailers without END_STREAM) cost
    a tunnel stream, as a request the client resets does (CVE-2023-44487), and takes from the
    same budget: past h2_max_streams (10 here) per second, bursts of twice that, the connection
    is closed with GOAWAY ENHANCE_YOUR_CALM, not served on one stream error at a time for
    ever."""
    stack = await test_public_tls.tls_stack(ca, tmp_path, h2_max_streams=10)
    try:
        async with Service(slow_or_drain) as service:
            host = await expose(stack, service.port)
            async with unchecked_client(stack, ca, host) as client:
                seen = Seen()
                for _ in range(100):  # bounded: 1000 uploads, 10 at a time (the stream limit)
                    if how == "DATA past content-length":
                        sids = [
                            client.request(b"POST", b"/up", [(b"content-length", b"0")], end=False)
                            for _ in range(10)
                        ]
                        for sid in sids:
                            client.conn.send_data(sid, b"x")
                        await client.send()
                    else:
                        sids = [client.request(b"POST", b"/up", end=False) for _ in range(10)]
                        data = b""
                        for sid in sids:
                            client.conn.send_data(sid, b"x")
                            data += unended_trailers(client, sid, [(b"x-trailer", b"1")])
                        await write(client, data)

                    def cut(sids: list[int] = sids) -> bool:  # (or the GOAWAY after the rest)
                        return all(seen.resets.get(s) == PROTOCOL_ERROR for s in sids)

                    await pump(client, seen, lambda: seen.goaway is not None or cut())
                    if seen.goaway is not None or seen.closed:
                        break
                assert seen.goaway is not None, (
                    "closed without GOAWAY" if seen.closed else "1000 uploads cut, served on"
                )
                assert seen.goaway.error_code == ENHANCE_YOUR_CALM
    finally:
        await stack.close()


@pytest.mark.parametrize(
    "block",
    [b"\x80", b"\xff\xff\xff\xff\xff\x0f", b"\x40\x85\xff\xff\xff\xff\xff\x01a"],
    ids=["index 0", "index past the tables", "bad Huffman"],
)
async def test_hpack_garbage_is_a_connection_error_compression_error(
    stack: Stack, ca: trustme.CA, block: bytes
) -> None:
    """A header block HPACK cannot decode leaves the connection's decoding state unknown: GOAWAY
    COMPRESSION_ERROR and the close (RFC 9113 4.3). The response in flight is cut (never a
    clean end) and its service connection reset; nothing reaches the service."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow = await slow_response_in_flight(client, seen)
            frame = hyperframe.frame.HeadersFrame(slow + 2, data=block)
            frame.flags.add("END_HEADERS")
            frame.flags.add("END_STREAM")
            assert client.writer is not None
            client.writer.write(frame.serialize())
            await client.writer.drain()
            assert await goaways_to_the_close(client, seen) == [COMPRESSION_ERROR]
            assert slow not in seen.ended, "a cut response ended like a complete one"
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")
        assert len(service.heads) == 1


async def test_an_oversized_header_block_is_one_goaway_enhance_your_calm(
    stack: Stack, ca: trustme.CA
) -> None:
    """A header block past SETTINGS_MAX_HEADER_LIST_SIZE (32 KiB) by far is a connection error
    too (HPACK decoding stops in its middle): one GOAWAY, ENHANCE_YOUR_CALM (h2's code), not a
    second one that says otherwise; nothing reaches the service."""
    async with Service(slow_or_drain) as service:
        host = await expose(stack, service.port)
        async with unchecked_client(stack, ca, host) as client:
            seen = Seen()
            slow = await slow_response_in_flight(client, seen)
            client.request(b"GET", b"/big", [(b"x-big", b"a" * 100_000)])
            await client.send()
            assert await goaways_to_the_close(client, seen) == [ENHANCE_YOUR_CALM]
            assert slow not in seen.ended, "a cut response ended like a complete one"
        await wait_until(lambda: nothing_left(stack), what="the edge to forget it all")
        assert len(service.heads) == 1
