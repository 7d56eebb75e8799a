"""Issue 7 rows 9 and 2 (public half): an abnormal end upstream never looks normal to the client.

Row 9: a stream that dies before any response byte (the service resets or closes without
answering, the agent link drops) answers a JSON page (502 ``UPSTREAM_RESET`` / ``UPSTREAM_CLOSED``,
503 ``SANDBOX_NOT_CONNECTED``) instead of an empty reply.

Row 2: once response bytes went out, a stream that is reset (service RST, link drop, agent
killed) ends the client connection with RST, never FIN: a response without a length cut short
must not reach curl as a complete 200.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import FaultStack, Stack
from tests.faults.origins import ScriptedOrigin
from tunneld.auth import agent_token

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent
PARTIAL = b"x" * 65536


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class RawOrigin(ScriptedOrigin):
    """A service that misbehaves on purpose after reading one request head.

    ``reset``/``close``: RST / FIN without a byte of response. ``hang``: never answers.
    ``partial``: a 200 without Content-Length (body until close), 64 KiB of it, then waits for
    ``release`` and resets (``cut="reset"``) or keeps hanging (``cut="hang"``).
    """

    def __init__(self, mode: str, cut: str = "reset") -> None:
        super().__init__()
        self.mode = mode
        self.cut = cut
        self.got_head = asyncio.Event()
        self.sent_partial = asyncio.Event()
        self.release = asyncio.Event()

    def closing(self) -> None:
        self.release.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        self.got_head.set()
        if self.mode == "reset":
            _rst(writer)
            return
        if self.mode == "close":
            writer.close()
            return
        if self.mode == "partial":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
            )
            writer.write(PARTIAL)
            await writer.drain()
            self.sent_partial.set()
        await asyncio.wait_for(self.release.wait(), 30)
        if self.mode == "partial" and self.cut == "reset":
            _rst(writer)


async def _wait_for(predicate, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _responded(stack: Stack) -> bool:
    assert stack.edge is not None
    return any(c._responded for c in stack.edge.public_connections)


async def _page(stack: Stack, origin: RawOrigin) -> tuple[int, dict]:
    exposed = await stack.expose("sb1", origin.port)
    async with stack.client(exposed["exposedAt"], timeout=20) as client:
        r = await client.get("/")
    return r.status_code, r.json()


# -- row 9: before any response byte, a page ------------------------------------------------------
@pytest.mark.parametrize(
    "mode, status, code",
    [("reset", 502, "UPSTREAM_RESET"), ("close", 502, "UPSTREAM_CLOSED")],
)
async def test_service_gives_up_before_answering(
    stack: Stack, mode: str, status: int, code: str
) -> None:
    async with RawOrigin(mode) as origin:
        await stack.agent("sb1")
        assert await _page(stack, origin) == (status, _page_body(code, origin.port))


def _page_body(code: str, port: int) -> dict:
    messages = {
        "UPSTREAM_RESET": f"The connection to port {port} in sandbox sb1 was reset before any "
        "response (CANCEL).",
        "UPSTREAM_CLOSED": f"The service on port {port} in sandbox sb1 closed the connection "
        "without answering.",
    }
    return {"error": messages[code], "code": code}


async def test_link_drop_before_answer_is_503(faulty_stack: FaultStack) -> None:
    stack = faulty_stack
    async with RawOrigin("hang") as origin:
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", origin.port)
        async with stack.client(exposed["exposedAt"], timeout=20) as client:
            request = asyncio.ensure_future(client.get("/"))
            await asyncio.wait_for(origin.got_head.wait(), 10)
            assert stack.proxy.drop() >= 1
            r = await asyncio.wait_for(request, 10)
    assert r.status_code == 503
    assert r.json()["code"] == "SANDBOX_NOT_CONNECTED"


# -- row 2: after response bytes, a reset ---------------------------------------------------------
async def _curl(stack: Stack, url: str) -> asyncio.subprocess.Process:
    assert stack.edge is not None
    return await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-o",
        os.devnull,
        "-w",
        "%{http_code}",
        "--max-time",
        "20",
        "-H",
        f"Host: {stack.host_of(url)}",
        f"http://127.0.0.1:{stack.edge.public_port}/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def _cut_short(stack: Stack, origin: RawOrigin, cut) -> tuple[int | None, bytes]:
    exposed = await stack.expose("sb1", origin.port)
    curl = await _curl(stack, exposed["exposedAt"])
    try:
        await asyncio.wait_for(origin.sent_partial.wait(), 10)
        await _wait_for(lambda: _responded(stack))  # response bytes went out to curl
        await cut()
        _out, err = await asyncio.wait_for(curl.communicate(), 20)
    finally:
        if curl.returncode is None:
            curl.kill()
            await curl.wait()
    return curl.returncode, err


async def test_service_reset_mid_body_reaches_curl_as_an_error(stack: Stack) -> None:
    async with RawOrigin("partial", cut="reset") as origin:
        await stack.agent("sb1")

        async def cut() -> None:
            origin.release.set()

        code, err = await _cut_short(stack, origin, cut)
    assert code != 0, "curl took a body cut short by a service reset for a complete response"
    assert b"reset" in err.lower() or b"recv failure" in err.lower(), err


async def test_link_drop_mid_body_reaches_curl_as_an_error(faulty_stack: FaultStack) -> None:
    stack = faulty_stack
    async with RawOrigin("partial", cut="hang") as origin:
        await stack.agent("sb1")

        async def cut() -> None:
            assert stack.proxy.drop() >= 1

        code, err = await _cut_short(stack, origin, cut)
    assert code != 0, f"curl took a body cut short by a link drop for a complete response: {err!r}"


async def test_agent_killed_mid_body_reaches_curl_as_an_error(stack: Stack) -> None:
    """A real ``tunnel-agent`` process, killed with SIGKILL while the body streams."""
    assert stack.edge is not None
    agent = subprocess.Popen(
        [
            str(BIN / "tunnel-agent"),
            "run",
            "--server",
            f"127.0.0.1:{stack.edge.agent_port}",
            "--sandbox-id",
            "sb1",
            "--api-port",
            "0",
        ],
        env={**os.environ, "TUNNEL_AGENT_TOKEN": agent_token(stack.secret, "sb1")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        registry = stack.edge.registry
        await _wait_for(lambda: (s := registry.get("sb1")) is not None and s.session is not None)
        async with RawOrigin("partial", cut="hang") as origin:

            async def cut() -> None:
                agent.send_signal(signal.SIGKILL)

            code, err = await _cut_short(stack, origin, cut)
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.wait(10)
    assert code != 0, f"curl took a body cut short by a killed agent as complete: {err!r}"
