"""A fault-injection TCP proxy of the project's own, for the link between agent and edge.

Theory of operation (in the spirit of asyncpg's ``TCPFuzzingProxy``): the proxy listens on
127.0.0.1 port 0; every accepted connection gets an upstream connection to the target and two
pumps, one per direction ("up" = client to target, i.e. agent to edge; "down" = the reverse).
A pump reads at most one chunk, applies the current faults to it and writes it, then waits for
``drain()``; asyncio streams pause reading above their limit, so a slow side stops the other
one's reads and no buffer grows past ``chunk_size`` + the stream limits.

Faults switch at run time and apply to connections already open:

- ``pass_through()``: forward unchanged (the default; also clears stall, delay, throttle, corrupt);
- ``stall()``: stop forwarding both ways (nothing is read, so the kernel buffers fill and TCP
  backpressure reaches both ends); ``pass_through()`` resumes;
- ``drop()``: reset every current connection (RST, both sides), keep accepting;
- ``refuse()`` / ``accept()``: reset new connections at once, or not;
- ``delay(seconds)``: sleep before forwarding each chunk;
- ``throttle(bytes_per_second)``: forward at about that rate;
- ``corrupt(within=N)``: flip one byte at a random offset of the next N bytes (once);
  ``corrupt(probability=p)``: flip one byte of each chunk with probability p (until cleared).
  Both are seeded (``FaultProxy(seed=...)``) and may be limited to one direction.
- ``drop_every(seconds)``: a background task that calls ``drop()`` periodically.

Counters: ``accepted``, ``refused``, ``dropped`` (connections reset by drop), ``bytes_up``,
``bytes_down``, ``corrupted`` (bytes flipped). ``close()`` cancels every task it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Final, Literal

from relay.mux import abort_with_reset

Direction = Literal["up", "down", "both"]

CHUNK_SIZE: Final = 64 * 1024
"""Largest chunk read and forwarded at once: one frame of the protocol, enough for throughput."""

STREAM_LIMIT: Final = 64 * 1024
"""asyncio stream buffer limit; reading pauses above twice this, so a stall holds little."""


def _reset(transport: asyncio.BaseTransport) -> None:
    """``abort_with_reset`` that tolerates a transport already closed (uvloop then has no fd)."""
    try:
        abort_with_reset(transport)  # type: ignore[arg-type]
    except ValueError:
        transport.abort()  # type: ignore[attr-defined]


class _Link:
    """One proxied connection: the accepted client side and the upstream side."""

    __slots__ = ("client", "tasks", "upstream")

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        _reset(self.client.transport)
        _reset(self.upstream.transport)


class FaultProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        seed: int = 0,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.target = (target_host, target_port)
        self.chunk_size = chunk_size
        self.random = random.Random(seed)
        self.port = 0
        # counters
        self.accepted = 0
        self.refused = 0
        self.dropped = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.corrupted = 0
        # faults
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._delay = 0.0
        self._rate = 0.0
        self._corrupt_direction: Direction = "both"
        self._corrupt_within = 0  # bytes left in a one-shot window; 0 = none
        self._corrupt_at = 0  # offset in that window of the byte to flip
        self._corrupt_probability = 0.0
        # bookkeeping
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropper: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=STREAM_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._closing = True  # a connection accepted from now on is reset, not proxied
        self.stop_drop_every()
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        for link in list(self._links):
            link.reset()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._dropper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._dropper
            self._dropper = None
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        """Connections currently proxied."""
        return len(self._links)

    # -- faults ------------------------------------------------------------------------------------
    def pass_through(self) -> None:
        self._flowing.set()
        self._refusing = False
        self._delay = 0.0
        self._rate = 0.0
        self._corrupt_within = 0
        self._corrupt_probability = 0.0

    def stall(self) -> None:
        self._flowing.clear()

    def refuse(self) -> None:
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def drop(self) -> int:
        """Reset every current connection (RST both ways); returns how many."""
        links = list(self._links)
        for link in links:
            self._links.discard(link)
            link.reset()
            for task in link.tasks:
                task.cancel()
        self.dropped += len(links)
        return len(links)

    def delay(self, seconds: float) -> None:
        self._delay = max(0.0, seconds)

    def throttle(self, bytes_per_second: float) -> None:
        """Forward about ``bytes_per_second`` per direction and connection (0 = unlimited)."""
        self._rate = max(0.0, bytes_per_second)

    def corrupt(
        self,
        *,
        within: int = 0,
        probability: float = 0.0,
        direction: Direction = "both",
    ) -> None:
        if within <= 0 and probability <= 0:
            raise ValueError("corrupt() needs within > 0 or probability > 0")
        self._corrupt_direction = direction
        self._corrupt_within = max(0, within)
        self._corrupt_at = self.random.randrange(within) if within > 0 else 0
        self._corrupt_probability = min(1.0, max(0.0, probability))

    def drop_every(self, seconds: float) -> None:
        """Call ``drop()`` every ``seconds`` in a background task, until ``stop_drop_every()``."""
        if seconds <= 0:
            raise ValueError("drop_every() needs a positive interval")
        self.stop_drop_every()
        self._dropper = asyncio.get_running_loop().create_task(self._drop_loop(seconds))

    def stop_drop_every(self) -> None:
        if self._dropper is not None:
            self._dropper.cancel()

    async def _drop_loop(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            self.drop()

    # -- waits -------------------------------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        """Wait (bounded) until ``predicate()`` holds, e.g. ``lambda: proxy.accepted >= 2``."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("fault proxy condition not reached")
            await asyncio.sleep(0.01)

    # -- the proxy ---------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._closing:
            _reset(writer.transport)
            return
        if self._refusing:
            self.refused += 1
            _reset(writer.transport)
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target, limit=STREAM_LIMIT), 10
            )
        except (OSError, TimeoutError, asyncio.CancelledError):
            # close() cancels a connect still pending: the accepted side must end too (3.12+
            # Server.wait_closed() waits for it). The task ends normally, as below: on a
            # cancelled one, start_server's done callback raises before 3.13 and closes nothing.
            _reset(writer.transport)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        loop = asyncio.get_running_loop()
        link.tasks = [
            loop.create_task(self._pump(link, reader, up_writer, "up")),
            loop.create_task(self._pump(link, up_reader, writer, "down")),
        ]
        for t in link.tasks:
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        try:
            await asyncio.gather(*link.tasks)
        except asyncio.CancelledError:
            link.reset()
        finally:
            self._links.discard(link)
            writer.close()
            up_writer.close()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                size = self.chunk_size
                if self._rate:
                    size = max(1, min(size, int(self._rate / 20)))
                data = await reader.read(size)
                if not data:
                    if not writer.transport.is_closing() and writer.can_write_eof():
                        writer.write_eof()
                    return
                await self._flowing.wait()  # a stall that began during the read holds the chunk
                if self._delay:
                    await asyncio.sleep(self._delay)
                data = self._maybe_corrupt(data, direction)
                writer.write(data)
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await writer.drain()
                if self._rate:
                    await asyncio.sleep(len(data) / self._rate)
        except (ConnectionError, OSError, RuntimeError):
            # One side failed (uvloop raises RuntimeError on a closed handle): the other side
            # must see an abnormal end too.
            link.reset()

    def _maybe_corrupt(self, data: bytes, direction: str) -> bytes:
        if self._corrupt_direction not in ("both", direction):
            return data
        if self._corrupt_within:
            if self._corrupt_at < len(data):
                self._corrupt_within = 0
                return self._flip(data, self._corrupt_at)
            self._corrupt_at -= len(data)
            self._corrupt_within = max(0, self._corrupt_within - len(data))
            return data
        if self._corrupt_probability and self.random.random() < self._corrupt_probability:
            return self._flip(data, self.random.randrange(len(data)))
        return data

    def _flip(self, data: bytes, offset: int) -> bytes:
        mutable = bytearray(data)
        mutable[offset] ^= 1 << self.random.randrange(8)
        self.corrupted += 1
        return bytes(mutable)
