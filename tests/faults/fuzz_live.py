"""Helpers of the live-listener fuzzers (``tests/faults/test_fuzz_live_*.py``).

The fuzzers throw seeded, deterministic hostile bytes at a real in-process edge over real sockets.
This module holds what they share: an origin that records every request it was sent, the
documented status codes and error codes (read from the docs, so the docs are what is checked), a
strict reader of what the edge answered (h11 as a client), and the check that every request that
reached the origin carries the edge's own forwarding headers and none of a client's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import orjson

from tests.e2e.origin import Origin

DOCS = Path(__file__).resolve().parents[2] / "docs"

# What a fuzz case puts in every header it spoofs: the origin must never see it in a header of
# the internal families (nor any header whose name has "_").
SPOOF = b"spoof"
INTERNAL_PREFIXES = (b"x-tunnel-", b"x-sandbox-", b"x-forwarded-")
INTERNAL_NAMES = frozenset({b"forwarded", b"x-real-ip"})


def documented_preview_codes() -> dict[int, set[str]]:
    """Status -> error codes of the preview-URL error pages (docs/admin-api.md) and the 429s of
    the public side (docs/operations.md, Limits)."""
    text = (DOCS / "admin-api.md").read_text()
    section = text.split("## Preview-URL error pages", 1)[1].split("\n## ", 1)[0]
    codes: dict[int, set[str]] = {}
    for status, code in re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", section, re.M):
        codes.setdefault(int(status), set()).add(code)
    limits = (DOCS / "operations.md").read_text().split("## Limits", 1)[1].split("\n## ", 1)[0]
    for code in re.findall(r"429 `([A-Z_]+)`", limits):
        codes.setdefault(429, set()).add(code)
    return codes


def documented_admin_codes() -> dict[int, set[str]]:
    """Status -> error codes of the admin API (docs/admin-api.md, Errors)."""
    text = (DOCS / "admin-api.md").read_text()
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    codes: dict[int, set[str]] = {}
    pairs = re.findall(r"^\| (\d{3}) \| `([A-Z_]+)` \|", section, re.M)
    # the codes the sections below add, listed in prose under the table ("426 `UPGRADE_...`")
    pairs += re.findall(r"(\d{3})\s+`([A-Z_]+)`", section)
    for status, code in pairs:
        codes.setdefault(int(status), set()).add(code)
    return codes


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    connection: int  # the origin's count of its connections when this one was accepted


class RecordingOrigin(Origin):
    """The e2e origin, recording the method, target and raw headers of every request."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self._connection_of: dict[asyncio.StreamWriter, int] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connection_of[writer] = self.connections
        try:
            await super()._serve(reader, writer)
        finally:
            del self._connection_of[writer]

    async def _handle(self, conn, request, reader, writer) -> None:  # type: ignore[no-untyped-def]
        self.received.append(
            Received(
                request.method,
                request.target,
                list(request.headers.raw_items()),
                self._connection_of.get(writer, -1),
            )
        )
        try:
            await super()._handle(conn, request, reader, writer)
        except UnicodeDecodeError:  # /headers answers JSON; bytes past ASCII may not decode
            raise ConnectionResetError("the origin cannot answer this request") from None


def through_the_edge(received: list[Received]) -> list[Received]:
    """The requests of the origin connections that the edge made.

    The machine is shared: another process may connect to the origin's port (a port number it
    once had). The edge's stream always begins with a head the edge rebuilt (``X-Sandbox-Name``
    set), so a connection whose first request has none is a stranger's; any request the edge let
    through unparsed (smuggled) comes later on one of the edge's connections, and is kept."""
    first: dict[int, Received] = {}
    for r in received:
        first.setdefault(r.connection, r)
    ours = {
        c for c, r in first.items() if any(n.lower() == b"x-sandbox-name" for n, _ in r.headers)
    }
    return [r for r in received if r.connection in ours]


def forwarding_problems(received: Received, port: int, sandbox: str) -> list[str]:
    """What is wrong with the headers of one request the origin got through the edge."""
    problems: list[str] = []
    by_name: dict[bytes, list[bytes]] = {}
    for name, value in received.headers:
        by_name.setdefault(name.lower(), []).append(value)
        lname = name.lower()
        internal = lname.startswith(INTERNAL_PREFIXES) or lname in INTERNAL_NAMES
        if b"_" in lname:
            problems.append(f"a header with '_' reached the origin: {name!r}: {value!r}")
        if internal and SPOOF in value.lower():
            problems.append(f"a client's internal header reached the origin: {name!r}: {value!r}")
    expected = {
        b"host": b"localhost:%d" % port,
        b"x-forwarded-for": b"127.0.0.1",
        b"x-sandbox-name": sandbox.encode(),
    }
    for name, value in expected.items():
        if by_name.get(name) != [value]:
            problems.append(f"{name!r} is {by_name.get(name)!r}, not [{value!r}]")
    for name in (b"x-forwarded-host", b"x-forwarded-proto"):
        if len(by_name.get(name, [])) != 1:
            problems.append(f"{name!r} is {by_name.get(name)!r}, not one value")
    return problems


@dataclass
class Exchange:
    """What one fuzz connection got back."""

    data: bytes = b""
    reset: bool = False  # the edge's close was a reset (or our write hit one)
    hung: bool = False  # nothing closed the connection within the case's deadline
    responses: list[tuple[int, list[tuple[bytes, bytes]], bytes]] = field(default_factory=list)
    problem: str | None = None  # the bytes are not well-formed HTTP/1.1 responses
    partial: bool = False  # the last response is not complete


async def exchange(
    port: int,
    pieces: list[bytes],
    *,
    half_close: bool,
    pace: float,
    deadline: float,
    upgrades: bool = False,
    head: bool = False,
    answered_is_enough: bool = False,
) -> Exchange:
    """Send ``pieces`` (``pace`` seconds apart), half-close if asked, and read until the edge
    closes; ``hung`` if it has not within ``deadline`` seconds.

    ``answered_is_enough``: stop too once complete responses came and nothing more follows
    within half a second (a keep-alive connection that would wait for the next request).
    ``head``: the (first) request is a HEAD, so its response has no body."""
    out = Exchange()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    received = bytearray()

    async def send() -> None:
        try:
            for i, piece in enumerate(pieces):
                if i and pace:
                    await asyncio.sleep(pace)
                writer.write(piece)
                await writer.drain()
            if half_close and writer.can_write_eof():
                writer.write_eof()
        except (OSError, RuntimeError):  # the edge closed first (a reset, ENOTCONN)
            out.reset = True

    sender = asyncio.ensure_future(send())
    try:
        async with asyncio.timeout(deadline):
            while True:
                try:
                    chunk = await reader.read(65536)
                except OSError:  # a reset
                    out.reset = True
                    break
                if not chunk:
                    break
                received += chunk
                while answered_is_enough and _answered(bytes(received), upgrades, head):
                    try:
                        async with asyncio.timeout(0.5):
                            chunk = await reader.read(65536)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    received += chunk
                else:
                    continue
                break
    except TimeoutError:
        out.hung = True
    finally:
        sender.cancel()
        try:
            await sender
        except asyncio.CancelledError:
            pass
        writer.transport.abort()
    out.data = bytes(received)
    parse_responses(out, upgrades=upgrades, head=head)
    return out


async def converse(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    send: Callable[[], Awaitable[None]],
    deadline: float,
    received: bytearray,
    on_chunk: Callable[[bytes], bool] | None = None,
) -> bool:
    """Run ``send`` (a socket error there: the edge closed first) beside reading into
    ``received`` until the edge closes or resets the connection, or ``on_chunk`` (each chunk)
    says to stop. True when that happened within ``deadline`` seconds, False when the connection
    was still open then. ``on_chunk``'s exceptions propagate; the connection is aborted after."""

    async def sending() -> None:
        try:
            await send()
        except (OSError, RuntimeError):  # the edge closed first (a reset, ENOTCONN)
            pass

    sender = asyncio.ensure_future(sending())
    try:
        async with asyncio.timeout(deadline):
            while True:
                try:
                    chunk = await reader.read(65536)
                except OSError:  # a reset
                    return True
                if not chunk:
                    return True
                received += chunk
                if on_chunk is not None and on_chunk(chunk):
                    return True
    except TimeoutError:
        return False
    finally:
        sender.cancel()
        try:
            await sender
        except asyncio.CancelledError:
            pass
        writer.transport.abort()


def _answered(data: bytes, upgrades: bool, head: bool) -> bool:
    """``data`` is one or more complete responses and nothing else (so far)."""
    probe = Exchange(data=data, reset=True)  # reset: no end of stream is fed to h11
    parse_responses(probe, upgrades=upgrades, head=head)
    return bool(probe.responses) and probe.problem is None and probe.partial is False


def parse_responses(out: Exchange, *, upgrades: bool = False, head: bool = False) -> None:
    """Parse ``out.data`` as HTTP/1.1 responses with h11 as the client; set ``out.problem`` if it
    is not a sequence of well-formed responses (the last may be cut short only by a reset).
    ``upgrades``: a 100 or a 101 may come (after a 101 the bytes are not HTTP any more)."""
    conn = h11.Connection(h11.CLIENT)
    proposal = [("connection", "upgrade"), ("upgrade", "fuzz")] if upgrades else []

    def ask() -> None:
        # h11 reads a response only for a request it sent: a stand-in GET per response.
        method = "HEAD" if head and not out.responses else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("host", "fuzz"), *proposal]))
        conn.send(h11.EndOfMessage())

    ask()
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    body = bytearray()
    eof_given = False
    try:
        if out.data:
            conn.receive_data(out.data)  # (b"" would mean the end of the stream to h11)
        while True:
            event = conn.next_event()
            if event is h11.PAUSED and conn.their_state is h11.SWITCHED_PROTOCOL:
                return  # a 101: what follows is the upgraded protocol's
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if conn.their_state is h11.SEND_BODY and not out.reset and not eof_given:
                    if not _close_delimited(headers):
                        break  # cut short: judged below
                    eof_given = True
                    conn.receive_data(b"")  # a body delimited by the close ends here
                    continue
                break
            if isinstance(event, h11.InformationalResponse):
                if upgrades and event.status_code in (100, 101):
                    if event.status_code == 101:
                        out.responses.append((101, list(event.headers.raw_items()), b""))
                    continue
                out.problem = f"an informational response {event.status_code}"
                return
            if isinstance(event, h11.Response):
                status, headers, body = (
                    event.status_code,
                    list(event.headers.raw_items()),
                    bytearray(),
                )
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.responses.append((status, headers, bytes(body)))
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    ask()
                else:
                    # Connection: close (or HTTP/1.0): nothing may follow this response
                    leftover, _closed = conn.trailing_data
                    if leftover:
                        out.problem = f"bytes after a closing response: {leftover[:80]!r}"
                    return
            elif isinstance(event, h11.ConnectionClosed):
                return
    except h11.RemoteProtocolError as exc:
        out.problem = f"malformed response ({exc}): {out.data[:300]!r}"
        return
    leftover, _closed = conn.trailing_data
    out.partial = bool(leftover) or conn.their_state is h11.SEND_BODY
    if out.reset:
        return  # a reset may cut a response anywhere: that looks abnormal, as it should
    if leftover:
        out.problem = f"a response head cut short by a clean close: {out.data[-300:]!r}"
    elif conn.their_state is h11.SEND_BODY and status != 200:
        # The service's own responses are relayed raw, so a service that closes its connection
        # mid-response (or the edge's timeouts closing a silent one, see the module docstring of
        # test_fuzz_live_http1.py) ends the client's with a FIN; the edge's pages are written
        # whole and must never be cut.
        out.problem = f"a {status} response cut short by a clean close: {out.data[-300:]!r}"


def _close_delimited(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {name.lower() for name, _ in headers}
    return b"content-length" not in names and b"transfer-encoding" not in names


def page_problem(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, codes: dict[int, set[str]]
) -> str | None:
    """None if this is one of the documented JSON error pages, else what is wrong."""
    if status not in codes:
        return f"undocumented status {status}"
    try:
        page = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    if not isinstance(page, dict) or page.get("code") not in codes[status]:
        return f"{status} with an undocumented code: {body[:200]!r}"
    if not isinstance(page.get("error"), str):
        return f"{status} without an error message: {body[:200]!r}"
    return None
