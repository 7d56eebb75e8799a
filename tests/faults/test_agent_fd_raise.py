"""``tunnel-agent run`` raises its soft RLIMIT_NOFILE towards the hard limit at start.

Go programs (cloudflared, frp) get this from Go's runtime: a sandbox started with ``ulimit -n``
256 but a hard limit of 4096 leaves them 4096 descriptors. The agent capped its local connections
at the soft limit minus 160 (96 for 256) and never asked for more, so it refused streams with
REFUSED_STREAM (503 SANDBOX_BUSY at the edge) that it had the descriptors for.

docs/agent.md, What the agent dials: at start the agent raises the soft limit to the hard one (at
most 65536, or what ``--max-connections`` needs past that), never lowers it, and derives the
default cap from the raised limit; it logs ``file descriptor limit raised from 256 to 4096`` and
``at most 3936 local connections at a time (file descriptor limit 4096)``. With hard == soft
nothing changes and nothing fails.

Real ``tunnel-agent run`` processes started under ``setrlimit`` (``preexec_fn``), a scripted edge
(the sans-IO session) and a service that holds every connection open, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from agent.cli import _raise_fd_limit
from agent.core import (
    FD_LIMIT_CEILING,
    FD_RESERVE,
    MAX_CONNECTIONS_CAP,
    default_max_connections,
    fd_limit_target,
)
from protocol.events import StreamAccepted, StreamReset

from .hostile_edge import HostileEdge
from .test_agent_fd_limit import (
    Holder,
    _hello,
    _limits,
    _outcomes,
    _reset_all,
    _start,
    _stop,
    _stop_all,
    _wait_for_file,
)

pytestmark = pytest.mark.anyio

STREAMS = 200  # past the cap of a soft limit of 256 (96), well within that of 4096 (3936)


def _can_raise_hard(hard: int) -> bool:
    """Whether a child process may raise its hard limit to ``hard`` (CAP_SYS_RESOURCE)."""
    try:
        subprocess.run(["true"], preexec_fn=_limits(256, hard), check=True, timeout=10)
    except subprocess.SubprocessError:
        return False
    return True


def _soft_limit_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open files limit for {pid}")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_agent_raises_its_soft_limit_and_its_default_cap_follows(tmp_path: Path) -> None:
    holder = Holder()
    port = await holder.start()
    edge = HostileEdge([port])
    server = await asyncio.get_running_loop().create_server(lambda: edge, "127.0.0.1", 0)
    proc, ports_file, log_file = _start(tmp_path, server.sockets[0].getsockname()[1], 256, 4096)
    cap = default_max_connections(4096)
    assert cap == 4096 - FD_RESERVE
    try:
        api_port = (await asyncio.to_thread(_wait_for_file, ports_file, proc))["api"]
        assert _soft_limit_of(proc.pid) == 4096
        await _hello(edge)
        # More streams than a cap derived from 256 allows: every one is dialled.
        sids = [edge.open(port, flush=False) for _ in range(STREAMS)]
        edge.flush()
        outcomes = await _outcomes(edge, sids)
        refused = [e for e in outcomes if isinstance(e, StreamReset)]
        assert not refused, (len(refused), {e.code for e in refused})
        assert len([e for e in outcomes if isinstance(e, StreamAccepted)]) == STREAMS
        async with httpx.AsyncClient(timeout=10) as client:
            status = await client.get(f"http://127.0.0.1:{api_port}/v1/status")
        assert status.status_code == 200, status.text
        _reset_all(edge, sids)
        assert await _stop(proc) == 0
    finally:
        await _stop_all(proc, holder, server, edge)
    output = log_file.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    assert "file descriptor limit raised from 256 to 4096" in output, output[-3000:]
    assert f"at most {cap} local connections at a time (file descriptor limit 4096)" in output


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("soft", "hard", "extra", "raised", "cap"),
    [
        # hard == soft: nothing to raise, the cap as before, no line about raising
        (256, 256, (), 256, default_max_connections(256)),
        # a hard limit past the ceiling: raised to the ceiling only
        (256, 1 << 20, (), FD_LIMIT_CEILING, MAX_CONNECTIONS_CAP),
        # an explicit cap past the ceiling: raised as far as it needs, so no warning
        (256, 1 << 20, ("--max-connections", "70000"), 70000 + FD_RESERVE, 70000),
    ],
    ids=["hard-equals-soft", "ceiling", "explicit-cap"],
)
async def test_the_raise_stops_at_the_hard_limit_or_the_ceiling(
    tmp_path: Path, soft: int, hard: int, extra: tuple[str, ...], raised: int, cap: int
) -> None:
    if hard > resource.getrlimit(resource.RLIMIT_NOFILE)[1] and not _can_raise_hard(hard):
        pytest.skip(f"this machine does not let a process raise its hard limit to {hard}")
    # No edge: the agent keeps trying 127.0.0.1:1 (closed), its local API serves meanwhile.
    proc, ports_file, log_file = _start(tmp_path, 1, soft, hard, *extra)
    try:
        api_port = (await asyncio.to_thread(_wait_for_file, ports_file, proc))["api"]
        assert _soft_limit_of(proc.pid) == raised
        async with httpx.AsyncClient(timeout=10) as client:
            status = await client.get(f"http://127.0.0.1:{api_port}/v1/status")
        assert status.status_code == 200, status.text
        assert status.json()["connected"] is False
        deadline = time.monotonic() + 15
        while "local connections at a time" not in log_file.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no start line about the cap"
            await asyncio.sleep(0.02)
    finally:
        assert await _stop(proc) == 0
    output = log_file.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    assert "leaves fewer than" not in output, output[-3000:]  # the explicit cap's warning
    assert f"at most {cap} local connections at a time (file descriptor limit {raised})" in output
    if raised == soft:
        assert "file descriptor limit raised" not in output, output
    else:
        assert f"file descriptor limit raised from {soft} to {raised}" in output, output


def test_the_target_is_the_hard_limit_at_most_the_ceiling_and_never_lower() -> None:
    infinity = resource.RLIM_INFINITY
    assert fd_limit_target(256, 4096) == 4096
    assert fd_limit_target(1024, 1 << 20) == FD_LIMIT_CEILING
    assert fd_limit_target(1024, infinity) == FD_LIMIT_CEILING
    assert default_max_connections(FD_LIMIT_CEILING) == MAX_CONNECTIONS_CAP  # room for the default
    assert fd_limit_target(1024, 1 << 20, 70000) == 70000 + FD_RESERVE  # what the cap needs
    assert fd_limit_target(1024, 20000, 70000) == 20000  # but never past the hard limit
    assert fd_limit_target(256, 256) is None  # hard == soft: nothing to do
    assert fd_limit_target(100_000, 1 << 20) is None  # above the ceiling already: never lowered
    assert fd_limit_target(infinity, infinity) is None


def test_a_limit_that_cannot_be_raised_is_one_info_line_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed to raise the current limit")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (min(soft, 256), hard))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    caplog.set_level(logging.DEBUG, "tunnel.agent")
    _raise_fd_limit(None, logging.getLogger("tunnel.agent"))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            logging.INFO,
            f"file descriptor limit {min(soft, 256)} kept: cannot raise it "
            "(not allowed to raise the current limit)",
        )
    ], lines


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_local_api_out_of_descriptors_logs_a_little_and_answers_later(
    tmp_path: Path,
) -> None:
    """An explicit ``--max-connections`` past the descriptor limit (allowed, with a warning):
    the streams take every descriptor, so the local API cannot accept. On the asyncio loop that
    logged a traceback per connection in the listener's backlog, then again every second; now
    one rate-limited warning (relay/accept.py), and the request waiting in the backlog is
    answered once the streams end."""
    holder = Holder()
    port = await holder.start()
    edge = HostileEdge([port])
    server = await asyncio.get_running_loop().create_server(lambda: edge, "127.0.0.1", 0)
    edge_port = server.sockets[0].getsockname()[1]
    proc, ports_file, log_file = _start(
        tmp_path, edge_port, 256, 256, "--max-connections", "400", loop="asyncio"
    )
    api: socket.socket | None = None
    try:
        api_port = (await asyncio.to_thread(_wait_for_file, ports_file, proc))["api"]
        await _hello(edge)
        sids = [edge.open(port, flush=False) for _ in range(400)]  # past the 256 descriptors
        edge.flush()
        await _outcomes(edge, sids)
        api = socket.create_connection(("127.0.0.1", api_port), timeout=15)
        api.sendall(f"GET /v1/status HTTP/1.1\r\nhost: 127.0.0.1:{api_port}\r\n\r\n".encode())

        def failures() -> int:
            output = log_file.read_text(errors="replace")
            return output.count("accept failed") + output.count("out of system resource")

        deadline = time.monotonic() + 15
        while failures() < 2:  # a rest, and a retry that failed as well
            assert time.monotonic() < deadline, "no failed accept logged"
            assert proc.poll() is None
            await asyncio.sleep(0.05)
        _reset_all(edge, sids)
        answer = await asyncio.to_thread(api.recv, 65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert await _stop(proc) == 0
    finally:
        if api is not None:
            api.close()
        await _stop_all(proc, holder, server, edge)
    output = log_file.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    assert "accept failed: Too many open files; not accepting for 1 s" in output
