"""A test origin: the "service inside the sandbox" of the end-to-end tests (h11 over asyncio).

Endpoints:
  GET  /                      b"hello from origin"
  GET  /headers               JSON list of the request's header pairs (as the origin saw them)
  GET  /bytes?n=N&seed=S      N deterministic bytes (see ``pattern``), Content-Length framed
  GET  /chunked?n=N&seed=S    the same bytes, chunked
  POST /upload                JSON {"length": n, "sha256": hex} of the body (any framing)
  POST /echo                  the body back, chunked
  GET  /sse                   text/event-stream: one event, waits for ``sse_release``, then two more
  GET  /slow-close            closes the connection after the response (Connection: close)
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from urllib.parse import parse_qs, urlsplit

import h11
import orjson

BLOCK = 1 << 20


def pattern_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def pattern(n: int, seed: int = 1):
    """Yield ``n`` bytes of the deterministic pattern in 1 MiB pieces."""
    block = pattern_block(seed)
    while n > 0:
        piece = block if n >= BLOCK else block[:n]
        n -= len(piece)
        yield piece


def pattern_sha256(n: int, seed: int = 1) -> str:
    h = hashlib.sha256()
    for piece in pattern(n, seed):
        h.update(piece)
    return h.hexdigest()


class Origin:
    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.sse_release = asyncio.Event()
        self.sse_finished = False
        self.requests = 0
        self.connections = 0
        self.open_connections = 0
        self.last_headers: list[tuple[bytes, bytes]] = []

    async def start(self) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server.close_clients() if hasattr(self.server, "close_clients") else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, (h11.ConnectionClosed, type(None))):
                    return
                assert isinstance(event, h11.Request), event
                self.requests += 1
                self.last_headers = list(event.headers.raw_items())
                await self._handle(conn, event, reader, writer)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    return
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # The loop is shutting down under a handler still waiting (an SSE never released).
            # Python 3.11's start_server callback calls task.exception() on a cancelled handler
            # and logs a traceback that the e2e error check would blame on the test: end quietly.
            return
        finally:
            self.open_connections -= 1
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(256 * 1024)
                conn.receive_data(data)
                continue
            return event

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader):
        while True:
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise h11.RemoteProtocolError(f"unexpected {event!r}")

    async def _handle(self, conn, request, reader, writer) -> None:
        url = urlsplit(request.target.decode())
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path

        async def send(*events) -> None:
            for e in events:
                data = conn.send(e)
                if writer.is_closing():  # the tunnel reset this connection (RST from the agent)
                    raise ConnectionResetError("the client reset the connection")
                if data:
                    writer.write(data)
            await writer.drain()

        if path in ("/upload", "/echo"):
            if path == "/upload":
                h = hashlib.sha256()
                n = 0
                async for chunk in self._body(conn, reader):
                    h.update(chunk)
                    n += len(chunk)
                body = orjson.dumps({"length": n, "sha256": h.hexdigest()})
                await send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("content-length", str(len(body))),
                            ("content-type", "application/json"),
                        ],
                    ),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )
            else:
                await send(
                    h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])
                )
                async for chunk in self._body(conn, reader):
                    await send(h11.Data(data=chunk))
                await send(h11.EndOfMessage())
            return
        async for _ in self._body(conn, reader):
            pass
        if path == "/":
            body = b"hello from origin"
            await send(
                h11.Response(status_code=200, headers=[("content-length", str(len(body)))]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        elif path == "/headers":
            body = orjson.dumps([[n.decode(), v.decode()] for n, v in request.headers.raw_items()])
            await send(
                h11.Response(status_code=200, headers=[("content-length", str(len(body)))]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        elif path in ("/bytes", "/chunked"):
            n = int(query.get("n", "0"))
            seed = int(query.get("seed", "1"))
            headers = (
                [("content-length", str(n))]
                if path == "/bytes"
                else [("transfer-encoding", "chunked")]
            )
            await send(h11.Response(status_code=200, headers=headers))
            for piece in pattern(n, seed):
                await send(h11.Data(data=piece))
            await send(h11.EndOfMessage())
        elif path == "/sse":
            self.sse_finished = False
            await send(
                h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "text/event-stream"),
                        ("transfer-encoding", "chunked"),
                    ],
                )
            )
            await send(h11.Data(data=b"data: first\n\n"))
            await asyncio.wait_for(self.sse_release.wait(), 30)
            await send(h11.Data(data=b"data: second\n\n"), h11.Data(data=b"data: third\n\n"))
            self.sse_finished = True
            await send(h11.EndOfMessage())
        elif path == "/slow-close":
            body = b"bye"
            await send(
                h11.Response(
                    status_code=200, headers=[("content-length", "3"), ("connection", "close")]
                ),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        else:
            body = b"not found"
            await send(
                h11.Response(status_code=404, headers=[("content-length", str(len(body)))]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )


class OriginThread:
    """The test origin on its own asyncio loop in a thread (the service in the sandbox)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.origin = Origin()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.origin.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.port = self.origin.port

    def release_sse(self) -> None:
        self.loop.call_soon_threadsafe(self.origin.sse_release.set)

    def close(self) -> None:
        async def stop() -> None:
            # End handlers still waiting on an SSE release, so that no task is left pending
            # when the loop stops (bounded: idle keep-alive handlers may stay until then).
            self.origin.sse_release.set()
            await self.origin.close()
            deadline = self.loop.time() + 1
            while self.origin.open_connections and self.loop.time() < deadline:
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
