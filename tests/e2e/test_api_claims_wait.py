"""docs/admin-api.md, "Wait for a port": "The body (optional; {} takes every default)" and
"interval: milliseconds between probes, clamped to 100-10,000 (as Cloudflare does)": an
interval outside the range is clamped, not refused (Cloudflare's port-watch clamps it too);
one that is not a number is 400 (tests/e2e/test_wait_port.py::test_bad_input_is_400_json).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from .conftest import Stack

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def healthy() -> AsyncIterator[int]:
    """A service that answers every request 200 and closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_no_body_and_out_of_range_intervals_are_waits(stack: Stack, healthy: int) -> None:
    assert stack.admin is not None
    await stack.agent("sb1")
    path = f"/v1/sandboxes/sb1/ports/{healthy}/wait"
    ready = {"port": healthy, "ready": True}
    for body in (
        None,  # no body at all
        {},
        {"interval": 1},  # clamped up to 100
        {"interval": 0.5, "mode": "tcp"},
        {"interval": 10**9, "timeout": 5},  # clamped down to 10,000
        {"interval": 99.6},
    ):
        r = await stack.admin.post(path, json=body)
        assert (r.status_code, r.json()) == (200, ready), (body, r.text)
