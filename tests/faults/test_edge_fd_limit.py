"""``tunneld serve`` out of file descriptors: more public connections than its RLIMIT_NOFILE.

On the asyncio loop, asyncio's own accept loop rests a listener after ``accept`` fails with
EMFILE, but goes on through the whole backlog (4096 for the public port) first, logging a
traceback and scheduling one more retry per attempt: under a limit of 128 and 300 waiting
clients, tunneld logged about 70,000 tracebacks in 5 s and spent half its CPU doing it. Now
(relay/accept.py, ``guard_accept``) the listener rests one second after the first failure,
with a rate-limited warning, and accepts the waiting clients once descriptors are free again.
On uvloop, libuv accepts and closes at once the connections it has no descriptor for.

docs/operations.md, File descriptors: both loops recover once clients go away (a public request
is answered, admin ``/healthz`` is 200), the agent's link stays up throughout, nothing is
logged as a traceback; at start the edge raises its soft limit to the hard one (at most 2**20)
and warns when the limit is below ``max_connections`` plus 1024.

Real processes: tunneld under ``prlimit --nofile=128:128`` (or 128:4096), a real tunnel-agent,
raw client sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from relay.budget import LOG_BURST, LOG_RATE
from tests.e2e.procs import Processes, admin_client, is_connected, wait_for

NOFILE = 128
CLIENTS = 300  # more than NOFILE, all held open at once


class LimitedProcesses(Processes):
    """Processes whose edge runs under ``prlimit --nofile=SOFT:HARD``."""

    def __init__(self, tmp: Path, loop: str, soft: int, hard: int) -> None:
        super().__init__(tmp, loop)
        self.nofile = f"{soft}:{hard}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if name == "edge":
            prlimit = shutil.which("prlimit")
            assert prlimit is not None, "prlimit (util-linux) is needed"
            argv = [prlimit, f"--nofile={self.nofile}", "--", *argv]
        return super()._spawn(name, argv, env)


def _closed_by_peer(conn: socket.socket) -> bool:
    conn.setblocking(False)  # with a timeout, recv would wait for it instead of EAGAIN
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _accept_failures(procs: Processes) -> int:
    """Failed accepts the edge logged: its own warning, or asyncio's (without guard_accept)."""
    assert procs.edge is not None
    output = procs.output(procs.edge)
    return output.count("accept failed") + output.count("accept() out of system resource")


def _public_answers(port: int) -> bool:
    try:
        answer = httpx.get(
            f"http://127.0.0.1:{port}/", headers={"host": "nothing.localhost"}, timeout=3
        )
    except httpx.HTTPError:
        return False
    return answer.status_code == 404


def _soft_limit_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open files limit for {pid}")


def _answer(conn: socket.socket) -> bytes | None:
    """What the edge sent on ``conn`` so far and then closed it with, or None while it is open
    and silent."""
    conn.setblocking(False)
    try:
        data = conn.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:  # reset
        return b""
    return data if data == b"" or data.endswith(b"}") else None


def test_public_connections_past_the_descriptor_limit_are_503(tmp_path: Path) -> None:
    """At a limit of 128, ``max_connections`` (10000) is lowered to 64 (the limit less the 1024
    it keeps for agents and the admin API, at least half of it): the 65th client on is answered
    503 TOO_MANY_CONNECTIONS at once instead of finding no descriptor (uvloop would close it
    unanswered), and admin requests are served meanwhile."""
    cap = NOFILE // 2
    procs = LimitedProcesses(tmp_path, "uvloop", NOFILE, NOFILE)
    clients: list[socket.socket] = []
    try:
        # The admitted clients send no head: no 408 for them while the test runs.
        secrets = {"TUNNELD_ADMIN_TOKEN": procs.admin_token, "TUNNELD_SECRET": procs.secret}
        ports = procs.start_edge(env=procs.env(TUNNELD_HEAD_TIMEOUT="300", **secrets))
        assert procs.edge is not None
        procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
        clients = [
            socket.create_connection(("127.0.0.1", ports["public"]), timeout=10)
            for _ in range(CLIENTS)
        ]
        refused = CLIENTS - cap

        def answered() -> list[bytes]:
            return [a for a in map(_answer, clients) if a is not None]

        wait_for(lambda: len(answered()) >= refused, what=f"{refused} refusals")
        answers = answered()
        assert len(answers) == refused, len(answers)  # the first 64 wait for their heads
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b'"code":"TOO_MANY_CONNECTIONS"' in answer, answer
            assert f"the limit is {cap} public connections in total".encode() in answer, answer
        with admin_client(procs) as admin:  # the admin API has descriptors meanwhile
            assert admin.get("/healthz").status_code == 200
        for conn in clients:
            conn.close()
        clients = []
        wait_for(lambda: _public_answers(ports["public"]), what="a public answer")
        assert is_connected(procs, "sb1")
    finally:
        for conn in clients:
            conn.close()
        procs.close()
    output = procs.output(procs.edge)
    assert "Traceback" not in output, output[-3000:]
    assert "accept failed" not in output, output[-3000:]
    assert output.count("agent connected") == 1, output[-3000:]
    assert "file descriptor limit raised" not in output  # hard == soft: nothing to raise
    assert (
        f"file descriptor limit {NOFILE} is below max_connections (10000) plus 1024 for agents "
        f"and the admin API: public connections limited to {cap}"
    ) in output, output[-3000:]


def test_the_cap_follows_the_limit() -> None:
    from tunneld.cli import NOFILE_RESERVE, public_connections_cap

    assert public_connections_cap(10000, 10000 + NOFILE_RESERVE) == 10000
    assert public_connections_cap(10000, resource.RLIM_INFINITY) == 10000
    assert public_connections_cap(10000, 4096) == 4096 - NOFILE_RESERVE
    assert public_connections_cap(10000, 1024) == 512  # at least half of the limit
    assert public_connections_cap(100, 1024) == 100  # never above max_connections


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_edge_out_of_descriptors_logs_a_little_and_recovers(tmp_path: Path, loop: str) -> None:
    """Descriptors run out all the same. On asyncio through the agent listener: its accept loop
    takes a whole burst before any connection is counted (then those past
    ``max_pending_agents`` are closed). On uvloop each is counted as it is accepted, and
    ``max_pending_agents`` is lowered to fit the limit
    (tests/faults/test_edge_fd_pending_agents.py): there through the admin listener, connections
    that send nothing from several client addresses (``admin_max_connections_per_ip`` each)."""
    procs = LimitedProcesses(tmp_path, loop, NOFILE, NOFILE)
    clients: list[socket.socket] = []
    try:
        ports = procs.start_edge()
        assert procs.edge is not None
        procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
        started = time.monotonic()
        if loop == "asyncio":
            # All of them in the backlog before the edge's next wake-up (it is stopped while
            # they connect): one burst, however fast this machine runs the two processes.
            os.kill(procs.edge.pid, signal.SIGSTOP)
            try:
                clients = [
                    socket.create_connection(("127.0.0.1", ports["agent"]), timeout=10)
                    for _ in range(CLIENTS)
                ]
            finally:
                os.kill(procs.edge.pid, signal.SIGCONT)
        else:
            clients = [
                socket.create_connection(
                    ("127.0.0.1", ports["admin"]),
                    timeout=10,
                    source_address=(f"127.0.0.{2 + i % 5}", 0),
                )
                for i in range(CLIENTS)
            ]
        if loop == "asyncio":  # a rest, then a retry that failed as well: a second warning
            wait_for(lambda: _accept_failures(procs) >= 2, what="two failed accepts logged")
        else:  # libuv closes what it has no descriptor for
            wait_for(lambda: any(_closed_by_peer(c) for c in clients), what="a dropped client")
        assert procs.edge.poll() is None
        # An admin request meanwhile: asyncio leaves it in the backlog, uvloop closes it.
        admin_conn = socket.create_connection(("127.0.0.1", ports["admin"]), timeout=15)
        clients.append(admin_conn)
        admin_conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        if loop == "asyncio":  # never accepted: the last clients wait, none is closed
            assert not any(_closed_by_peer(c) for c in clients[-50:])
        else:
            wait_for(lambda: _closed_by_peer(admin_conn), what="the admin connection closed")
        waiting = clients.pop()
        for conn in clients:
            conn.close()
        clients = [waiting]
        if loop == "asyncio":  # accepted and answered once descriptors are free
            waiting.setblocking(True)
            waiting.settimeout(15)
            assert waiting.recv(65536).startswith(b"HTTP/1.1 200 "), "the waiting admin request"
        # Once the clients are gone, every listener serves again.
        wait_for(lambda: _public_answers(ports["public"]), what="a public answer")
        with admin_client(procs) as admin:
            assert admin.get("/healthz").status_code == 200
        assert is_connected(procs, "sb1")
        elapsed = time.monotonic() - started
    finally:
        for conn in clients:
            conn.close()
        procs.close()
    output = procs.output(procs.edge)
    assert "Traceback" not in output, output[-3000:]
    assert output.count("agent connected") == 1, output[-3000:]  # the link stayed up
    warnings = output.count("accept failed")
    assert warnings <= LOG_BURST + 2 + int(elapsed * LOG_RATE), output[-3000:]
    if loop == "asyncio":
        assert f"Too many open files; not accepting for 1 s (file descriptor limit {NOFILE})" in (
            output
        )


def test_the_edge_raises_its_soft_limit_to_the_hard_one(tmp_path: Path) -> None:
    """With ``--workers 2``: the supervisor raises it once, the workers inherit it."""
    procs = LimitedProcesses(tmp_path, "uvloop", NOFILE, 4096)
    try:
        ports = procs.start_edge("--workers", "2")
        assert procs.edge is not None
        pid = procs.edge.pid
        assert _soft_limit_of(pid) == 4096
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        commands = [Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ") for c in children]
        pairs = zip(children, commands, strict=True)
        workers = [child for child, command in pairs if b"--worker" in command]
        assert len(workers) == 2, commands
        assert [_soft_limit_of(int(worker)) for worker in workers] == [4096, 4096]
        assert _public_answers(ports["public"])
    finally:
        procs.close()
    output = procs.output(procs.edge)
    assert output.count(f"file descriptor limit raised from {NOFILE} to 4096") == 1, output
    # each worker lowers its own max_connections (4096 - 1024)
    limited = "file descriptor limit 4096 is below max_connections (10000)"
    assert output.count(limited) == 2, output
    assert output.count("public connections limited to 3072") == 2, output


def test_a_limit_the_edge_cannot_raise_is_one_info_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tunneld.cli import _raise_fd_limit
    from tunneld.config import Config

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed to raise the current limit")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (2048, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    caplog.set_level(logging.DEBUG, "tunneld")
    _raise_fd_limit(Config(max_connections=10))
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            logging.INFO,
            "file descriptor limit 2048 kept: cannot raise it "
            "(not allowed to raise the current limit)",
        )
    ], lines
