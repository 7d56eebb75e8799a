"""docs/operations.md, the sections tests/e2e/test_doc_claims_operations.py left out: what SIGHUP
changes live, systemd, state and restarts, the security model, troubleshooting and port-forward.
Each test names the claim it checks; real processes where the claim is about processes (signals,
restarts, logs, exit codes), an in-process edge on 127.0.0.1 otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import orjson
import pytest

from agent.core import AgentConfig
from protocol import control
from protocol.session import Role, Session
from tests.faults.hostile_agent import HostileAgent
from tunneld import systemd
from tunneld.auth import agent_token
from tunneld.config import Config
from tunneld.private_redis import KILL_WAIT, START_TIMEOUT, STOP_TIMEOUT
from tunneld.store import DB_FILE
from tunneld.supervisor import STOP_MARGIN

from .conftest import Stack, raw_request
from .origin import OriginThread
from .procs import BIN, Processes, admin_client, is_connected, wait_for, wait_for_file

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent.parent
IO_TIMEOUT = 10


def _start_edge(procs: Processes, *args: str, **env: str) -> dict[str, int]:
    """``tunneld serve`` on ports 0, without the ``--grace-period`` flag Processes.start_edge
    adds (a flag would beat the config file this module reloads)."""
    ports_file = procs.tmp / f"edge-{len(procs.procs)}.json"
    argv = [
        str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
        "--admin-port", "0", "--ports-file", str(ports_file),
        "--state-dir", str(procs.tmp / "state"), *args,
    ]  # fmt: skip
    environ = procs.env(TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET=procs.secret, **env)
    procs.edge = procs._spawn("edge", argv, environ)
    procs.ports = wait_for_file(ports_file, procs.edge, log=procs.logs[procs.edge.pid])
    return procs.ports


def _log(procs: Processes) -> str:
    assert procs.edge is not None
    return procs.output(procs.edge)


def _expose(procs: Processes, sandbox: str, port: int, **body: object) -> str:
    with admin_client(procs) as admin:
        r = admin.post(f"/v1/sandboxes/{sandbox}/ports", json={"port": port, **body})
        assert r.status_code == 200, r.text
        return r.json()["exposedAt"]


def _keepalive_get(procs: Processes, url: str) -> bytes:
    """One GET on a kept-alive connection, then everything until the edge closes it."""
    host = url.split("//", 1)[1].split("/", 1)[0].encode()
    with socket.create_connection(("127.0.0.1", procs.ports["public"]), IO_TIMEOUT) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return answer


# -- SIGHUP: the settings that change live, and one that does not -------------------------------
def test_sighup_applies_the_live_settings_and_keeps_the_rest(tmp_path: Path) -> None:
    """systemd, SIGHUP: "These settings change live: ... `head_timeout`, `control_timeout`,
    `grace_period`, `access_log`, `log_level` ... Everything else (... `domain` ...) needs a
    restart." Each is set one way in the file at start and the other way before the SIGHUP;
    the admin token, secret, plaintext rule and certificates have their own tests
    (test_processes.py, faults/test_tokens.py, faults/test_integrity.py, test_public_tls.py)."""
    procs = Processes(tmp_path, "asyncio")
    origin = OriginThread()
    hostile: HostileAgent | None = None
    config = tmp_path / "tunneld.toml"
    fixed = "keepalive_timeout = 0.3\n"  # a kept-alive connection is closed soon: a debug line
    try:
        config.write_text(
            fixed + 'domain = "one.test"\nhead_timeout = 30.0\ncontrol_timeout = 30.0\n'
            'grace_period = 30.0\naccess_log = false\nlog_level = "info"\n'
        )
        _start_edge(procs, "-c", str(config))
        procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="agent connected")
        url = _expose(procs, "sb1", origin.port)
        assert ".one.test" in url
        _keepalive_get(procs, url)  # at info and without access log: neither line
        assert "idle for keepalive_timeout" not in _log(procs)
        assert "tunneld.access" not in _log(procs)

        config.write_text(
            fixed + 'domain = "two.test"\nhead_timeout = 0.5\ncontrol_timeout = 0.5\n'
            'grace_period = 1.0\naccess_log = true\nlog_level = "debug"\n'
        )
        assert procs.edge is not None
        procs.edge.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: configuration reloaded" in _log(procs), what="the reload")

        # head_timeout: an unfinished head gets its 408 long before the old 30 s
        with socket.create_connection(("127.0.0.1", procs.ports["public"]), IO_TIMEOUT) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 408 ")
        # control_timeout: an agent that never acks makes an expose 504 AGENT_TIMEOUT
        hostile = HostileAgent(procs.ports["agent"], "sb2", procs.token("sb2"))
        with admin_client(procs, timeout=IO_TIMEOUT) as admin:
            r = admin.post("/v1/sandboxes/sb2/ports", json={"port": 8000})
        assert r.status_code == 504 and r.json()["code"] == "AGENT_TIMEOUT", r.text
        # access_log and log_level: the access line, and the debug line of the idle close
        _keepalive_get(procs, url)
        wait_for(
            lambda: re.search(r'tunneld\.access: 127\.0\.0\.1 "GET /" 200 ', _log(procs)),
            what="an access log line",
        )
        wait_for(
            lambda: re.search(
                r"DEBUG   tunneld\.public: .* idle for keepalive_timeout", _log(procs)
            ),
            what="a debug line",
        )
        # domain needs a restart: new URLs still carry the domain tunneld started with
        assert ".one.test" in _expose(
            procs, "sb1", origin.port + 1 if origin.port < 65535 else 1025
        )
        # grace_period
        procs.edge.send_signal(signal.SIGTERM)
        assert procs.edge.wait(30) == 0
        assert "SIGTERM: draining (grace period 1s)" in _log(procs)
        assert "Traceback" not in _log(procs)
    finally:
        if hostile is not None:
            hostile.sock.close()
        procs.close()
        origin.close()


# -- systemd -------------------------------------------------------------------------------------
def test_systemd_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    """systemd: "`READY=1` (with `STATUS=serving`) once all three listeners are bound;
    `WATCHDOG=1` every `WatchdogSec/2` when `$WATCHDOG_USEC` is set; `STOPPING=1` when a
    `SIGTERM`/`SIGINT` drain starts" (READY and STOPPING alone: test_processes.py)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(IO_TIMEOUT)
    procs = Processes(tmp_path, "asyncio")
    try:
        ports = _start_edge(procs, NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        for name in ("public", "agent", "admin"):  # bound before READY
            socket.create_connection(("127.0.0.1", ports[name]), IO_TIMEOUT).close()
        assert sock.recv(4096) == b"WATCHDOG=1"  # WatchdogSec 2 s: one now, then every second
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert procs.edge is not None
        procs.edge.send_signal(signal.SIGINT)
        while (message := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert procs.edge.wait(30) == 0
    finally:
        sock.close()
        procs.close()


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd: "`WatchdogSec=30` → every 15 s"; a `$WATCHDOG_USEC` for another pid is not ours."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    monkeypatch.delenv("WATCHDOG_PID")
    assert systemd.watchdog_interval() is None


def _unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_files_are_what_the_doc_says() -> None:
    """systemd: "`deploy/tunneld.service` runs the edge as `Type=notify`", "`WatchdogSec=30`", "Set
    `TimeoutStopSec` above the grace period (the unit uses 90 s)", reload is `systemctl reload`
    (SIGHUP), `StateDirectory=tunneld` with `DynamicUser=yes`; "`deploy/tunnel-agent.service`
    runs the agent as `Type=simple`, `Restart=always`"."""
    edge = _unit("tunneld.service")
    assert edge["Type"] == ["notify"] and edge["WatchdogSec"] == ["30"]
    # above the longest stop: the workers' grace and kill, then the private redis-server's end
    # (the stop's SIGTERM reaches it too), its start again for the write-back, and its stop
    grace = Config().grace_period
    assert grace == 30.0
    redis_stop = STOP_TIMEOUT + KILL_WAIT
    longest = grace + STOP_MARGIN + redis_stop + START_TIMEOUT + redis_stop
    assert edge["TimeoutStopSec"] == ["90"] and longest < 90
    assert edge["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert edge["StateDirectory"] == ["tunneld"] and edge["DynamicUser"] == ["yes"]
    assert edge["KillSignal"] == ["SIGTERM"]
    agent = _unit("tunnel-agent.service")
    assert agent["Type"] == ["simple"] and agent["Restart"] == ["always"]


# -- State and restarts --------------------------------------------------------------------------
def test_a_memory_store_forgets_everything_at_a_restart(tmp_path: Path) -> None:
    """What survives what: "tunneld restart with `store = "memory"` | **lost**: orchestrators must
    expose again; generated tokens change (custom tokens give the same URL again)"; and a memory
    store keeps its state "nowhere" (no state directory)."""
    procs = Processes(tmp_path, "asyncio")
    try:
        _start_edge(procs, "--store", "memory", "--url-port", "80")
        generated = _expose(procs, "sb1", 8001)
        custom = _expose(procs, "sb1", 8002, token="mine")
        assert procs.edge is not None and procs.stop(procs.edge) == 0
        _start_edge(procs, "--store", "memory", "--url-port", "80")
        with admin_client(procs) as admin:
            assert admin.get("/v1/sandboxes").json()["sandboxes"] == []
        assert _expose(procs, "sb1", 8002, token="mine") == custom
        assert _expose(procs, "sb1", 8001) != generated
        assert not (tmp_path / "state").exists()
    finally:
        procs.close()


def test_a_stored_record_past_the_cap_refuses_the_start_naming_the_file(tmp_path: Path) -> None:
    """Start-up checks: "refuses to start (exit 2, nothing bound) when ... the file ... holds a
    record the rules refuse (e.g. more exposures for a sandbox than
    `max_exposures_per_sandbox`). The message names the file and what to do"; and a state
    directory tunneld creates is mode 0700."""
    procs = Processes(tmp_path, "asyncio")
    try:
        _start_edge(procs)
        state = tmp_path / "state"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for port in (8001, 8002, 8003):
            _expose(procs, "sb1", port)
        assert procs.edge is not None and procs.stop(procs.edge) == 0
        ports_file = tmp_path / "refused.json"
        out = subprocess.run(
            [str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
             "--admin-port", "0", "--ports-file", str(ports_file), "--state-dir", str(state)],
            env=procs.env(
                TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET=procs.secret,
                TUNNELD_MAX_EXPOSURES_PER_SANDBOX="2",
            ),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 2, out
        assert f"cannot start: {state / DB_FILE}: stored exposure 'sb1'" in out.stderr
        assert "raise max_exposures_per_sandbox" in out.stderr
        assert "listening" not in out.stderr and not ports_file.exists()  # nothing bound
        assert "Traceback" not in out.stderr
    finally:
        procs.close()


# -- Security model ------------------------------------------------------------------------------
async def test_admin_and_agent_tokens_are_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Security model: "Admin token: Bearer, constant-time compare" and "Agent tokens:
    HMAC-SHA256 of the sandbox id under the server secret, compared in constant time" (preview
    tokens: test_registry.py::test_match_compares_in_constant_time_on_both_refusals)."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):  # type: ignore[no-untyped-def]
        compared.append((a, b))
        return real(a, b)

    stack = await Stack().start()
    try:
        assert stack.edge is not None and stack.admin is not None
        monkeypatch.setattr(hmac, "compare_digest", spy)
        r = await stack.admin.get("/v1/sandboxes", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert compared == [(stack.admin_token.encode(), b"wrong")]
        compared.clear()
        wrong = agent_token("another-secret", "sb1")
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.agent_port)
        session = Session(Role.AGENT)
        session.send_control(control.Hello("sb1", wrong))
        writer.writelines(session.data_to_send())
        await asyncio.wait_for(reader.read(), IO_TIMEOUT)  # refused, then closed
        writer.close()
        expected = agent_token(stack.secret, "sb1")
        assert (expected.encode(), wrong.encode()) in compared
    finally:
        monkeypatch.undo()
        await stack.close()


async def test_the_agent_dials_ipv6_loopback_when_ipv4_refuses() -> None:
    """Security model: "the agent only dials `127.0.0.1`, then `::1`"; Troubleshooting:
    UPSTREAM_CONNECT_FAILED is "nothing listens on that port on 127.0.0.1/::1"."""
    try:
        v4 = socket.socket()
        v4.bind(("127.0.0.1", 0))  # held, not listening: a connect there is refused
    except OSError:
        pytest.skip("no IPv4 loopback")
    port = v4.getsockname()[1]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nover 6")
        await writer.drain()
        writer.close()

    try:
        service = await asyncio.start_server(serve, "::1", port)
    except OSError:
        v4.close()
        pytest.skip("no IPv6 loopback, or the port is taken there")
    stack = await Stack().start()
    try:
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", port))["exposedAt"]).encode()
        assert stack.edge is not None
        get = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
        answer = await raw_request(stack.edge.public_port, get)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"over 6"), answer
        service.close()
        await service.wait_closed()
        answer = await raw_request(stack.edge.public_port, get)
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "UPSTREAM_CONNECT_FAILED"
    finally:
        service.close()
        v4.close()
        await stack.close()


# -- Troubleshooting -----------------------------------------------------------------------------
def _agent(procs: Processes, server: str, sandbox: str, token: str, *args: str):  # type: ignore[no-untyped-def]
    return procs._spawn(
        "agent",
        [str(BIN / "tunnel-agent"), "run", "--server", server, "--sandbox-id", sandbox,
         "--api-port", "0", *args],
        procs.env(TUNNEL_AGENT_TOKEN=token),
    )  # fmt: skip


def test_the_agent_and_edge_log_lines_of_the_troubleshooting_table(tmp_path: Path) -> None:
    """Troubleshooting, each row's log line as tunneld and tunnel-agent write it: a token minted
    for another sandbox id (agent `edge refused the session: Invalid agent token for this sandbox
    id. (AUTH_FAILED)`, edge `authentication failed for sandbox …`: "a token only authenticates
    its own sandbox id"); two agents with one id; an edge that is down; `--tls` against a plain
    listener; and `tunnel-agent expose` exit 3 without a running agent."""
    procs = Processes(tmp_path, "asyncio")
    try:
        ports = _start_edge(procs, "--store", "memory")
        edge = f"127.0.0.1:{ports['agent']}"
        stolen = _agent(procs, edge, "sb2", procs.token("sb1"))
        first, _ = procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="sb1 connected")
        procs.start_agent("sb1")  # the same id again: replaces the first
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # held, never listening
            down = _agent(procs, f"127.0.0.1:{closed.getsockname()[1]}", "sb3", "t")
            tls = _agent(procs, edge, "sb4", procs.token("sb4"), "--tls")
            wait_for(
                lambda: (
                    "edge refused the session: Invalid agent token for this sandbox id. "
                    "(AUTH_FAILED)" in procs.output(stolen)
                ),
                what="the agent's AUTH_FAILED line",
            )
            wait_for(
                lambda: re.search(
                    r"WARNING tunneld: agent 127\.0\.0\.1:\d+: authentication failed for sandbox "
                    r"sb2\n",
                    _log(procs),
                ),
                what="the edge's authentication line",
            )
            wait_for(
                lambda: (
                    "another agent connected as sandbox sb1 and replaced this one"
                    in procs.output(first)
                ),
                what="the replaced line",
            )
            wait_for(
                lambda: re.search(
                    # uvloop says "Connection refused", asyncio "Connect call failed (...)"
                    r"cannot connect to edge 127\.0\.0\.1:\d+: ConnectionRefusedError: "
                    r"\[Errno 111\] ",
                    procs.output(down),
                ),
                what="the connection-refused line",
            )
            wait_for(
                lambda: re.search(r"cannot connect to edge 127\.0\.0\.1:\d+: TLS failed: ",
                                  procs.output(tls)),
                what="the TLS line",
            )  # fmt: skip
        assert not is_connected(procs, "sb2")
        expose = subprocess.run(
            [str(BIN / "tunnel-agent"), "expose", "8000", "--api", f"http://{edge}"],
            capture_output=True, text=True, timeout=30, env=procs.env(),
        )  # fmt: skip
        assert expose.returncode == 3, expose
    finally:
        procs.close()


async def test_a_reused_connection_for_another_host_is_421_misdirected_request() -> None:
    """Troubleshooting: "preview 421 `MISDIRECTED_REQUEST` | a client reused a connection for
    another preview host" (the status alone: test_preview.py)."""
    stack = await Stack().start()
    try:
        origin = await stack.origin()
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", origin.port))["exposedAt"]).encode()
        assert stack.edge is not None
        answer = await raw_request(
            stack.edge.public_port,
            b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: 9999-other-tok.localhost\r\n\r\n",
        )
        first, _, rest = answer.partition(b"hello from origin")
        assert first.startswith(b"HTTP/1.1 200 ")
        assert rest.startswith(b"HTTP/1.1 421 "), rest
        assert orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["code"] == "MISDIRECTED_REQUEST"
    finally:
        await stack.close()


# -- Port-forward --------------------------------------------------------------------------------
def test_port_forward_prints_and_logs_the_documented_lines(tmp_path: Path) -> None:
    """Port-forward: the stdout line `Forwarding from 127.0.0.1:N -> sandbox SANDBOX port PORT`,
    and the log lines `connection 1 from 127.0.0.1:…: open to sandbox sb1 port …`, `…: closed (N
    bytes out, M in)` and `…: cannot open port …: Nothing is listening on that port in the
    sandbox. (UPSTREAM_CONNECT_FAILED)` (the traffic itself: test_raw_tcp.py)."""
    procs = Processes(tmp_path, "asyncio")
    origin = OriginThread()
    try:
        ports = _start_edge(procs, "--store", "memory")
        procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="agent connected")
        env = procs.env(
            TUNNELD_ADMIN_URL=f"http://127.0.0.1:{ports['admin']}",
            TUNNELD_ADMIN_TOKEN=procs.admin_token,
        )
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))  # held, never listening: nothing there in the sandbox
            dead = unused.getsockname()[1]
            forwards = [
                procs._spawn("pf", [str(BIN / "tunneld"), "port-forward", "sb1", str(p)], env)
                for p in (origin.port, dead)
            ]

            def local(proc: subprocess.Popen[bytes], port: int) -> int | None:
                out = procs.output(proc)
                match = re.search(
                    rf"^Forwarding from 127\.0\.0\.1:(\d+) -> sandbox sb1 port {port}$", out, re.M
                )
                assert match or proc.poll() is None, out
                return int(match[1]) if match else None

            live = wait_for(lambda: local(forwards[0], origin.port), what="the first line")
            refused = wait_for(lambda: local(forwards[1], dead), what="the second line")
            request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            with socket.create_connection(("127.0.0.1", live), IO_TIMEOUT) as conn:
                conn.sendall(request)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
            with socket.create_connection(("127.0.0.1", refused), IO_TIMEOUT) as conn:
                with pytest.raises(ConnectionResetError):
                    conn.recv(65536)
        who = r"tunneld\.port-forward: connection 1 from 127\.0\.0\.1:\d+"
        wait_for(
            lambda: re.search(
                rf"{who}: closed \({len(request)} bytes out, {len(answer)} in\)",
                procs.output(forwards[0]),
            ),
            what="the closed line",
        )
        assert re.search(
            rf"{who}: open to sandbox sb1 port {origin.port}\n", procs.output(forwards[0])
        )
        wait_for(
            lambda: re.search(
                rf"{who}: cannot open port {dead}: Nothing is listening on that port in the "
                r"sandbox\. \(UPSTREAM_CONNECT_FAILED\)",
                procs.output(forwards[1]),
            ),
            what="the cannot-open line",
        )
        for proc in forwards:
            assert procs.stop(proc, signal.SIGTERM) == 0
    finally:
        procs.close()
        origin.close()


def test_agent_config_dials_loopback_only() -> None:
    """Security model: the hosts the agent dials are 127.0.0.1, then ::1, and nothing else."""
    assert AgentConfig("127.0.0.1", 7000, "sb1", "t").dial_hosts == ("127.0.0.1", "::1")
