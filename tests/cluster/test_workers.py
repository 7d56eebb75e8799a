"""``tunneld serve --workers N`` as real processes on a real Redis: the supervisor, its workers,
their shared ports, restarts, signals and what systemd sees (tunneld/supervisor.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.origin import OriginThread
from tests.e2e.procs import BIN, Processes, admin_client, preview_get, wait_for
from tunneld.config import ConfigError, load_config

from .conftest import RedisServer

GRACE = 5.0  # Processes.start_edge passes --grace-period 5
STOP_MARGIN = 10.0  # tunneld.supervisor.STOP_MARGIN: SIGTERM -> SIGKILL beyond the grace period


def start_workers(procs: Processes, redis: RedisServer, *args: str, **env: str) -> list[int]:
    procs.start_edge(
        "--workers",
        "2",
        "--store",
        redis.url,
        *args,
        env=procs.env(TUNNELD_ADMIN_TOKEN=procs.admin_token, TUNNELD_SECRET=procs.secret, **env),
    )
    return procs.ports["workers"]  # type: ignore[return-value]


def ports_file(procs: Processes) -> Path:
    (path,) = procs.tmp.glob("edge-*.json")
    return path


def read_ports(procs: Processes) -> dict:
    return json.loads(ports_file(procs).read_text())


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def healthz_many(procs: Processes, times: int = 20) -> None:
    """The admin port answers every time (a new connection each: the kernel picks a worker)."""
    for _ in range(times):
        r = httpx.get(f"http://127.0.0.1:{procs.ports['admin']}/healthz", timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}


def public_answers(procs: Processes, times: int = 10) -> None:
    for _ in range(times):
        r = httpx.get(
            f"http://127.0.0.1:{procs.ports['public']}/", headers={"host": "nothing.example"}
        )
        assert r.status_code == 404 and r.json()["code"] == "UNKNOWN_HOST"


def previews_answer(procs: Processes, url: str, times: int = 20) -> bool:
    """``times`` preview requests, each a new connection (so on either worker: one not holding
    the agent passes its socket to the one that does: tunneld/handover.py), all served by the
    origin."""
    for _ in range(times):
        r = preview_get(procs, url)
        if r.status_code != 200 or r.content != b"hello from origin":
            return False
    return True


@pytest.fixture
def origin() -> Iterator[OriginThread]:
    o = OriginThread()
    try:
        yield o
    finally:
        o.close()


def agent_status(api_port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{api_port}/v1/status", timeout=10).json()


def test_workers_serve_restart_reload_and_stop(
    procs: Processes, redis_server: RedisServer, origin: OriginThread
) -> None:
    pids = start_workers(procs, redis_server)
    supervisor = procs.edge
    assert supervisor is not None
    assert len(pids) == 2 and len(set(pids)) == 2 and supervisor.pid not in pids
    assert all(alive(pid) and parent_of(pid) == supervisor.pid for pid in pids)
    assert {"public", "agent", "admin"} <= procs.ports.keys() and 0 not in procs.ports.values()

    healthz_many(procs)
    public_answers(procs)
    with admin_client(procs) as admin:
        for _ in range(10):
            assert admin.get("/v1/sandboxes").status_code == 200

    # An agent connects (to whichever worker the kernel chose) and exposes through it; the
    # exposure is in Redis, so the admin API of every worker lists it.
    _, api_port = procs.start_agent("sb1")
    wait_for(lambda: agent_status(api_port)["connected"], what="agent connected")
    r = httpx.post(f"http://127.0.0.1:{api_port}/v1/ports", json={"port": origin.port}, timeout=10)
    assert r.status_code == 200, r.text
    url = r.json()["exposedAt"]
    assert f".localhost:{procs.ports['public']}/" in url

    def listed_everywhere() -> bool:
        with admin_client(procs) as admin:
            return all(
                [p["exposedAt"] for p in admin.get("/v1/sandboxes/sb1/ports").json()["ports"]]
                == [url]
                for _ in range(10)
            )

    wait_for(listed_everywhere, what="the exposure listed by every worker")
    assert previews_answer(procs, url)

    # kill -9 one worker: the supervisor logs it, starts another, and rewrites the ports file
    # once that one is ready; the listeners answer throughout the new set.
    os.kill(pids[0], signal.SIGKILL)
    new = wait_for(
        lambda: (w := read_ports(procs)["workers"])[0] not in (pids[0], 0) and w,
        what="a new worker in the ports file",
    )
    assert new[1] == pids[1] and alive(new[0]) and parent_of(new[0]) == supervisor.pid
    out = procs.output(supervisor)
    assert f"worker 0 (pid {pids[0]}) was killed by SIGKILL" in out
    assert f"worker 0 started (pid {new[0]})" in out
    healthz_many(procs)
    public_answers(procs)
    wait_for(lambda: agent_status(api_port)["connected"], what="agent connected after the kill")
    with admin_client(procs) as admin:
        ports = admin.get("/v1/sandboxes/sb1/ports").json()["ports"]
        assert [p["port"] for p in ports] == [origin.port]
    wait_for(lambda: previews_answer(procs, url), what="previews served after the kill")

    # SIGHUP reaches every worker, each reloads.
    supervisor.send_signal(signal.SIGHUP)
    wait_for(
        lambda: all(
            f"tunneld[w{i}]: SIGHUP: configuration reloaded" in procs.output(supervisor)
            for i in (0, 1)
        ),
        what="both workers reloaded",
    )

    # SIGTERM: every worker drains and exits, then the supervisor, with 0.
    started = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(GRACE + STOP_MARGIN + 5) == 0
    assert time.monotonic() - started < GRACE + STOP_MARGIN
    assert not any(alive(pid) for pid in new)
    out = procs.output(supervisor)
    assert "supervisor stopped" in out and "SIGKILL: " not in out


def recv_with_sender(sock: socket.socket) -> tuple[int, bytes]:
    """One datagram and the pid the kernel says sent it."""
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pids = [
        struct.unpack_from("i", payload)[0]
        for level, kind, payload in ancdata
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    return (pids[0] if pids else 0), data


def test_systemd_sees_the_supervisor_only(
    procs: Processes, redis_server: RedisServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(20)
    messages: list[bytes] = []
    try:
        # WATCHDOG_USEC 2 s: the supervisor pings every second while both workers ping it
        # every half second. Started by hand, not start_edge: that one waits for the ports file.
        ports = tmp_path / "ports.json"
        log = tmp_path / "supervisor.log"
        argv = ["serve", "--workers", "2", "--store", redis_server.url, "--grace-period", "5"]
        argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
        argv += ["--ports-file", str(ports), "--state-dir", str(tmp_path / "state")]
        env = procs.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="b", NOTIFY_SOCKET=path)
        with log.open("wb") as out:
            supervisor = subprocess.Popen(
                [str(BIN / "tunneld"), *argv],
                env={**env, "WATCHDOG_USEC": "2000000"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.procs.append(supervisor)

        def receive() -> bytes:
            sender, data = recv_with_sender(sock)
            assert sender == supervisor.pid, f"{data!r} came from pid {sender}, not the supervisor"
            messages.append(data)
            return data

        while not receive().startswith(b"READY=1"):
            pass
        # Only once both workers said READY=1 to the supervisor, after it wrote the ports file.
        assert b"STATUS=serving with 2 workers" in messages[-1]
        pids = json.loads(ports.read_text())["workers"]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        text = log.read_text()
        assert all(f"worker {i} (pid {pid}) ready" in text for i, pid in enumerate(pids))
        while receive() != b"WATCHDOG=1":
            pass

        # A worker restart is a status change, never a second READY=1.
        os.kill(pids[1], signal.SIGKILL)
        wait_for(
            lambda: json.loads(ports.read_text())["workers"][1] != pids[1],
            what="worker 1 replaced",
        )
        while receive() != b"WATCHDOG=1":  # and the watchdog goes on with the new worker
            pass

        supervisor.send_signal(signal.SIGTERM)
        while receive() != b"STOPPING=1":
            pass
        assert supervisor.wait(GRACE + STOP_MARGIN + 5) == 0
    finally:
        sock.close()
    assert sum(m.startswith(b"READY=1") for m in messages) == 1
    assert any(m.startswith(b"STATUS=1 of 2 workers serving") for m in messages)


def test_a_worker_failing_at_start_fails_the_start(procs: Processes, tmp_path: Path) -> None:
    """Redis unreachable: each worker exits 2 at start; so does the supervisor, leaving none."""
    with socket.socket() as held:  # a port nothing answers on: bound, never listening
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        argv = ["serve", "--workers", "2", "--store", f"redis://127.0.0.1:{port}/0?timeout=1"]
        argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
        argv += ["--ports-file", str(tmp_path / "ports.json")]
        proc = subprocess.Popen(
            [str(BIN / "tunneld"), *argv],
            env=procs.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="b"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 2, err
    text = err.decode()
    assert "during start-up; stopping" in text
    assert not (tmp_path / "ports.json").exists()
    lines = [line for line in text.splitlines() if "started (pid" in line]
    started = [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in lines]
    assert len(started) == 2 and not any(alive(pid) for pid in started)


def run_serve(procs: Processes, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "tunneld"), "serve", *args],
        env=procs.env(TUNNELD_ADMIN_TOKEN="a", TUNNELD_SECRET="b"),
        capture_output=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "must be at least 1"), ("x", "a number of processes or auto"), ("-1", "or auto")],
)
def test_bad_workers_flag_exit_2(procs: Processes, value: str, message: str) -> None:
    out = run_serve(procs, "--workers", value)
    assert out.returncode == 2
    assert "argument --workers" in out.stderr.decode() and message in out.stderr.decode()


def test_help_explains_workers() -> None:
    out = subprocess.run(
        [str(BIN / "tunneld"), "serve", "--help"], capture_output=True, timeout=30, check=True
    )
    text = " ".join(out.stdout.decode().split())
    assert "--workers N" in text and "SO_REUSEPORT" in text and "--store redis://" in text
    assert "--worker-index" not in text


def test_worker_index_by_hand_is_refused(procs: Processes) -> None:
    out = run_serve(procs, "--worker-index", "0")
    assert out.returncode == 2
    assert b"is for the workers `tunneld serve --workers N` starts" in out.stderr


def test_workers_setting_in_file_and_environment(tmp_path: Path) -> None:
    env = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"}
    config = tmp_path / "tunneld.toml"
    config.write_text('workers = "auto"\nstore = "redis://127.0.0.1:6379/0"\n')
    assert load_config(str(config), environ=env).workers == (os.cpu_count() or 1)
    assert load_config(str(config), environ={**env, "TUNNELD_WORKERS": "3"}).workers == 3
    with pytest.raises(ConfigError, match="workers must be 1-1024 or auto, not 0"):
        load_config(str(config), environ={**env, "TUNNELD_WORKERS": "0"})
    with pytest.raises(ConfigError, match="workers must be a number of processes or auto"):
        load_config(str(config), environ={**env, "TUNNELD_WORKERS": "many"})
    assert load_config(None, environ=env).workers == 1  # the default: one process, sqlite
