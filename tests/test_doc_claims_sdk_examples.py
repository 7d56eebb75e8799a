"""docs/sdk.md's complete examples, read from the document and run as written against a real
edge, agent and services (only addresses substituted: every listener here is on port 0).

The first example is a whole program (`anyio.run(main)`), run on asyncio and, as its last
comment says, on trio; the raw TCP example is a top-level `async with`, run inside an async
function. The inspection and PortNotReadyError fragments use names defined elsewhere (`sb`, an
endless loop) and are not run here; what they show is tests/sdk/ and tests/e2e/'s.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.server import ServerConnection, serve

from tests.e2e.conftest import Stack
from tests.e2e.conftest import no_unhandled_errors as no_unhandled_errors  # autouse there
from tests.e2e.conftest import stack as stack  # a started Stack, closed after

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "sdk.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC, re.S | re.M)
MAIN = BLOCKS[0]
RAW_TCP = next(b for b in BLOCKS if "open_tcp(6379)" in b)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _ws_service() -> Iterator[int]:
    """/health answers 200; /ws echoes WebSocket messages."""

    def health(connection: ServerConnection, request: object) -> object:
        if getattr(request, "path", "") == "/health":
            return connection.respond(200, "ok\n")
        return None

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0, process_request=health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server.socket.getsockname()[1]
        server.shutdown()


@pytest.fixture
def service() -> Iterator[int]:
    yield from _ws_service()


@pytest.fixture
def service2() -> Iterator[int]:
    yield from _ws_service()


async def _run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", program, *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_the_first_example_runs_as_written(
    stack: Stack, service: int, service2: int, backend: str
) -> None:
    """Every call of the example against a real edge: wait_for_port, expose_port (plain, with
    wait=, with a custom token), get_exposed_ports, ws_connect + send/receive, unexpose_port,
    list_sandboxes, health; and the URL printed has the shape of its comment."""
    assert stack.edge is not None
    await stack.agent("abc123")
    program = MAIN.replace("http://127.0.0.1:7070", f"http://127.0.0.1:{stack.edge.admin_port}")
    program = program.replace('"admin-secret"', repr(stack.admin_token))
    program = re.sub(r"\b8000\b", str(service), program)
    program = re.sub(r"\b8002\b", str(service2), program)
    if backend == "trio":
        assert 'anyio.run(main, backend="trio")' in program
        program = program.replace("anyio.run(main)", 'anyio.run(main, backend="trio")', 1)
    result = await _run(program)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    shown = re.search(r"print\(p\.url\)\s+# (\S+)", MAIN)
    assert shown is not None
    pattern = re.escape(shown.group(1).replace("k3x9q2m7p4w8z1c5", "TOKEN"))
    pattern = pattern.replace("TOKEN", "[a-z0-9]{16}").replace("8000", str(service))
    assert re.fullmatch(pattern.replace("8080", str(stack.edge.public_port)), lines[0])
    ports = sorted([service, service2, 8001])
    assert lines[1].count("ExposedPort(") == 3
    assert [int(p) for p in re.findall(r"port=(\d+)", lines[1])] == ports  # sorted by port
    assert "exposed_at='http://8001-abc123-my_token.localhost:" in lines[1]
    assert lines[2] == "hi"
    assert "SandboxInfo(id='abc123', connected=True" in lines[3] and "'status': 'ok'" in lines[3]


async def test_the_raw_tcp_example_runs_as_written(stack: Stack) -> None:
    """A Redis-like service (PING -> +PONG, then closes after the client's EOF): the example's
    prints are b'+PONG\\r\\n' and nothing else; EndOfStream ends the loop."""
    assert stack.edge is not None
    await stack.agent("sb1")

    async def redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"PING\r\n"
        writer.write(b"+PONG\r\n")
        await writer.drain()
        assert await reader.read() == b""  # the half-close arrives as EOF
        writer.close()

    server = await asyncio.start_server(redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code = RAW_TCP.replace("http://127.0.0.1:7070", f"http://127.0.0.1:{stack.edge.admin_port}")
        code = code.replace('"admintok"', repr(stack.admin_token)).replace("6379", str(port))
        imports = [ln for ln in code.splitlines() if ln.startswith(("import ", "from "))]
        body = [ln for ln in code.splitlines() if ln not in imports]
        program = "\n".join(
            [*imports, "async def main():", *("    " + ln for ln in body), "anyio.run(main)"]
        )
        result = await _run(program)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["b'+PONG\\r\\n'"]
    finally:
        server.close()
