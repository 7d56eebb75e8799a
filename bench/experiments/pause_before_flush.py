"""StreamEndpoint.forward(): pause the source *before* flushing, not after.

Question: ``forward()`` queued data with ``send_data()`` (which returns "pause" once the stream
holds ``stream_send_high_water``), then flushed, then paused the local socket. ``flush()``
dispatches the ``StreamWritable`` that ``data_to_send()`` emits when the stream drains below its
low-water mark, and that event found the socket not yet paused (a no-op); the pause that followed
was never undone. The stream stalled for good whenever nothing else arrived from the peer.

Found by the e2e bench: single-stream upload through the tunnel to nginx (``return 200`` answers
before the body is read) stopped after 8-15 MiB: tunneld's public socket had 3.4 MB unread in its
receive queue, the edge stream had credit (461 KiB) and nothing queued, the public connection was
``_read_paused``. Measured (``python -m bench.e2e --quick --only single_upload``, same machine):

    before: 0.90-1.36 MiB/s, ConnectionResetError after a 5 s stall (every run)
    after:  583-830 MiB/s (quick runs; full-run numbers in docs/performance.md)

Verdict: keep the pause-then-flush order. (The same fix also landed independently in the
lead's commit 04d42ee, so relay/mux.py at HEAD already has it.)

Reproduction: the e2e bench triggered it in every run (``python -m bench.e2e --quick --only
single_upload``, real processes, nginx origin). This file is the A/B harness in-process (edge +
agent in one uvloop process, nginx origin, old order monkeypatched); there the stall did NOT
reproduce (old 1,346 MiB vs new 1,324 MiB in 2 s): it depends on the cross-process timing of the
flush draining the stream below low water within the same call. Kept for the next attempt.

    .venv/bin/python -m bench.experiments.pause_before_flush    # [SECONDS] per upload, 2
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.e2e.stack import Stack as BenchStack
from relay.mux import StreamEndpoint

# The stall needs nginx's timing (it answers, then drains the body in large reads); the Python
# _EarlyAnswer origin below does not trigger it (1,484 vs 1,542 MiB in 2 s, old vs new order).
NGINX = True


def _old_forward(self: StreamEndpoint, data: memoryview | bytes) -> None:
    mux = self.mux
    if mux.session.closed or self._closed:
        return
    pause = mux.session.send_data(self.stream_id, data)
    mux.flush()
    if isinstance(data, memoryview):
        mux.release_shared(self.stream_id)
    if pause and not self._read_paused and self.transport is not None:
        self._read_paused = True
        self.transport.pause_reading()


class _EarlyAnswer(asyncio.Protocol):
    """Answers 200 as soon as the head is in, then keeps reading (discarding) the body."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.head = b""
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.head += data
            if b"\r\n\r\n" in self.head:
                self.answered = True
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")  # type: ignore[attr-defined]
                self.head = b""


async def _upload(seconds: float = 2.0) -> float:
    from tests.e2e.conftest import Stack

    st = await Stack().start()
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_EarlyAnswer, "127.0.0.1", 0)
    origin = BenchStack().start() if NGINX else None  # nginx `return 200`: the bench's origin
    try:
        port = origin.origin_port if origin else srv.sockets[0].getsockname()[1]
        await st.agent("sb1")
        host = st.host_of((await st.expose("sb1", port))["exposedAt"])
        assert st.edge is not None
        _, writer = await asyncio.open_connection("127.0.0.1", st.edge.public_port)
        writer.write(
            f"POST /u HTTP/1.1\r\nHost: {host}\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
        )
        block = b"u" * (1 << 20)
        sent = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            writer.write(block)
            try:
                await asyncio.wait_for(writer.drain(), seconds)
            except TimeoutError:
                break
            sent += len(block)
        writer.transport.abort()
        return sent / 2**20
    finally:
        srv.close()
        # the in-process stack first: nginx's graceful stop (SIGQUIT) waits for the agent's
        # connections to it, which held every run up for Stack.close()'s 5 s timeout
        await st.close()
        if origin is not None:
            origin.close()


def main(argv: list[str]) -> None:
    """``[SECONDS]``: how long each upload runs (2 by default)."""
    import uvloop

    seconds = float(argv[0]) if argv else 2.0
    current = StreamEndpoint.forward
    StreamEndpoint.forward = _old_forward  # type: ignore[method-assign]
    old = uvloop.run(_upload(seconds))
    StreamEndpoint.forward = current  # type: ignore[method-assign]
    new = uvloop.run(_upload(seconds))
    print(
        f"flush-then-pause (old): {old:.0f} MiB in {seconds:g} s; "
        f"pause-then-flush (now): {new:.0f} MiB"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
