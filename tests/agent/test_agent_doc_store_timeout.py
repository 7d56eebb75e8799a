"""docs/agent.md, 'Local HTTP API': 503 ``STORE_UNAVAILABLE`` when 'a store that did not confirm
the write in time' (a hung disk), relayed as the edge says it, through the agent and its CLI.

The edge bounds a store write by 30 s (``tunneld.store.WRITE_TIMEOUT``). The agent used to wait
10 s for the edge's answer and the CLI 10 s for the agent's, so a hung disk reached the process in
the sandbox as ``AGENT_TIMEOUT`` ('the tunnel agent did not answer': wrong, the agent was fine) or,
at the local API, 504 ``EDGE_TIMEOUT``, never the edge's answer that the change may still be
applied. Now the agent waits 35 s (``agent.core.REQUEST_TIMEOUT``) and ``expose`` 45 s
(``agent.cli.EDGE_CLIENT_TIMEOUT``).

A real ``tunneld serve`` (its SQLite store held by another connection, as a hung disk would),
a real ``tunnel-agent run`` and a real ``tunnel-agent expose``, with every timeout shortened: the
edge's by 15 (2 s), the agent's and the CLI's by 7 (5 s and 6.4 s; they were 1.4 s and 1.4 s),
which keeps the order of each pair as it is at full length, before the fix and after it.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli, core
from tests.e2e.procs import Processes, wait_for, wait_for_file
from tunneld import store

EDGE_SCALE = 15.0
AGENT_SCALE = 7.0

# `tunneld serve` with the store's write timeout divided by argv[1]
_EDGE = """
import sys
import tunneld.store
tunneld.store.WRITE_TIMEOUT /= float(sys.argv.pop(1))  # read by SqliteStore.open
from tunneld.cli import main
sys.exit(main())
"""
# `tunnel-agent ...` with the agent's and the CLI's timeouts divided by argv[1]
_AGENT = """
import sys
import agent.cli, agent.core
scale = float(sys.argv.pop(1))
agent.core.REQUEST_TIMEOUT /= scale
agent.cli.CLIENT_TIMEOUT /= scale
agent.cli.EDGE_CLIENT_TIMEOUT = getattr(agent.cli, "EDGE_CLIENT_TIMEOUT", 10.0) / scale
sys.exit(agent.cli.main(sys.argv[1:]))
"""


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _start_edge(p: Processes) -> None:
    ports_file = p.tmp / "edge.json"
    argv = [
        sys.executable, "-c", _EDGE, str(EDGE_SCALE),
        "serve", "--public-port", "0", "--agent-port", "0", "--admin-port", "0",
        "--ports-file", str(ports_file), "--state-dir", str(p.tmp / "state"),
    ]  # fmt: skip
    env = p.env(TUNNELD_ADMIN_TOKEN=p.admin_token, TUNNELD_SECRET=p.secret)
    p.edge = p._spawn("edge", argv, env)
    p.ports = wait_for_file(ports_file, p.edge, log=p.logs[p.edge.pid])


def _start_agent(p: Processes, sandbox: str) -> int:
    ports_file = p.tmp / "agent.json"
    argv = [
        sys.executable, "-c", _AGENT, str(AGENT_SCALE),
        "run", "--server", f"127.0.0.1:{p.ports['agent']}", "--sandbox-id", sandbox,
        "--api-port", "0",
    ]  # fmt: skip
    env = p.env(TUNNEL_AGENT_TOKEN=p.token(sandbox), TUNNEL_AGENT_PORTS_FILE=str(ports_file))
    agent = p._spawn("agent", argv, env)
    api_port: int = wait_for_file(ports_file, agent, log=p.logs[agent.pid])["api"]
    return api_port


def test_the_timeouts_keep_their_order() -> None:
    """The edge's store bound < the agent's wait for the edge < the CLI's wait for the agent."""
    assert store.WRITE_TIMEOUT == 30.0
    assert core.REQUEST_TIMEOUT == 35.0 > store.WRITE_TIMEOUT
    assert cli.EDGE_CLIENT_TIMEOUT == core.REQUEST_TIMEOUT + cli.CLIENT_TIMEOUT == 45.0
    # and the shortened ones here keep it
    assert store.WRITE_TIMEOUT / EDGE_SCALE < core.REQUEST_TIMEOUT / AGENT_SCALE
    assert core.REQUEST_TIMEOUT / AGENT_SCALE < cli.EDGE_CLIENT_TIMEOUT / AGENT_SCALE


def test_a_hung_store_reaches_tunnel_agent_expose_as_the_edges_store_unavailable(
    procs: Processes,
) -> None:
    _start_edge(procs)
    api_port = _start_agent(procs, "sb1")

    def connected() -> bool:
        status = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--json", "--api", f"http://127.0.0.1:{api_port}"],
            capture_output=True, text=True, timeout=30, env=procs.env(),
        )  # fmt: skip
        return '"connected": true' in status.stdout

    wait_for(connected, 15, "the agent to connect")
    db = sqlite3.connect(procs.tmp / "state" / store.DB_FILE, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # the edge's writer waits for this lock: a hung disk
        expose = subprocess.run(
            [
                sys.executable, "-c", _AGENT, str(AGENT_SCALE),
                "expose", "8000", "--api", f"http://127.0.0.1:{api_port}",
            ],
            capture_output=True, text=True, timeout=60, env=procs.env(),
        )  # fmt: skip
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert expose.returncode == 1, (expose.stdout, expose.stderr)
    assert expose.stdout == ""
    err = expose.stderr
    assert err.startswith("error: The store did not confirm the change ("), err
    assert "it may still be applied" in err and err.endswith("(STORE_UNAVAILABLE)\n"), err


def test_the_commands_that_wait_on_the_edge_wait_longer_than_the_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`expose`, `unexpose` and `ports` give the agent longer than it gives the edge (its answer
    comes first); `status`, answered by the agent alone, keeps 10 s."""
    seen: list[float] = []

    class Recording(cli.AgentClient):
        def __init__(self, base_url: str, timeout: float) -> None:
            seen.append(timeout)
            raise ValueError("stop here")  # parser.error: exit 2, no request made

    monkeypatch.setattr(cli, "AgentClient", Recording)
    for argv in (["expose", "8000"], ["unexpose", "8000"], ["ports"], ["status"]):
        assert cli.main(argv) == cli.EXIT_USAGE
    assert seen == [cli.EDGE_CLIENT_TIMEOUT] * 3 + [cli.CLIENT_TIMEOUT]
    assert cli.CLIENT_TIMEOUT == 10.0
    assert cli.EDGE_CLIENT_TIMEOUT > core.REQUEST_TIMEOUT


def test_a_long_answer_timeout_is_not_a_long_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The connect to the API stays bounded by 10 s (a black-holed address is 'unreachable' as
    soon as before); only the wait for the answer is longer."""
    import http.client
    import socket

    connects: list[float | None] = []

    class Recording(http.client.HTTPConnection):
        def connect(self) -> None:
            connects.append(self.timeout)
            super().connect()

    monkeypatch.setattr(http.client, "HTTPConnection", Recording)  # as cli looks it up
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = cli.AgentClient(f"http://127.0.0.1:{listener.getsockname()[1]}", 45.0)
        conn = client._connect()
        try:
            assert conn.sock is not None and conn.sock.gettimeout() == 45.0
        finally:
            conn.close()
    assert connects == [cli.CLIENT_TIMEOUT]
