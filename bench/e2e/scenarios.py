"""The scenarios of issue 4. Each runs the same load against every path of ``Stack.targets()``
(direct origin, the tunnel, nginx as a one-hop proxy), interleaved, ``repeat`` times, and returns
``{metric: {path: median}}`` plus the raw runs. Targets are checked in ``runner``.

Issue 7 added two isolation scenarios: ``hostile_flood`` (hostile agents flood the agent port
while another sandbox is probed; tunnel only) and ``stalled_readers`` (200 downloads that never
read, then small GETs to the same sandbox; tunnel, and direct as the baseline).
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stack import (
    ROOT,
    SECRET,
    VENV_BIN,
    Sampler,
    Stack,
    _wait_json,
    rss,
    tree_pids,
    tunneld_env,
)

PATHS = ("direct", "tunnel", "nginx")


@dataclass
class Settings:
    duration: float = 5.0
    repeat: int = 3
    idle_ws: int = 10_000
    agents: int = 1_000
    ws_conns: int = 100
    flood_s: float = 10.0  # issue 7: each hostile-agent flood lasts 10 s
    stalled: int = 200  # issue 7: 200 stalled readers on one sandbox


@dataclass
class Result:
    name: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)  # peak RSS of tunneld/agent (tunnel runs)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU share of tunneld/agent (tunnel runs)
    notes: list[str] = field(default_factory=list)


# -- wrk -------------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    port: int,
    host: str,
    path: str,
    conns: int,
    duration: float,
    *,
    headers: tuple[str, ...] = (),
    script: str | None = None,
    threads: int = 2,
    scheme: str = "http",
) -> dict[str, Any]:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-H",
        f"Host: {host}",
    ]
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", script]
    argv.append(f"{scheme}://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    res: dict[str, Any] = {"errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["req_s"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    res["mib_s"] = float(m.group(1)) * _BYTES[m.group(2)] / 2**20 if m else 0.0
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+(\S+)", out, re.M)
        res[f"p{p}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
        res["socket_errors"] = m.group(0)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    if not res["req_s"]:
        res["raw"] = out[-2000:]
    return res


def loadgen(mode: str, port: int, host: str, **kw: Any) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "bench.e2e.loadgen",
        mode,
        "--port",
        str(port),
        "--host-header",
        host,
    ]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    stdin = subprocess.PIPE if mode == "ws-idle" else subprocess.DEVNULL
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=stdin, text=True, cwd=ROOT)


def run_loadgen(mode: str, port: int, host: str, **kw: Any) -> dict[str, Any]:
    p = loadgen(mode, port, host, **kw)
    out, _ = p.communicate(timeout=float(kw.get("duration", 5)) + 120)
    return json.loads(out.strip().splitlines()[-1])


# -- the generic repeat loop -----------------------------------------------------------------------
def _repeat(
    stack: Stack,
    s: Settings,
    name: str,
    run: Callable[[int, str, str], dict[str, Any]],
    kind: str = "http",
    paths: tuple[str, ...] = PATHS,
) -> Result:
    res = Result(name)
    targets = stack.targets(kind)
    for _ in range(s.repeat):
        for path in paths:
            port, host = targets[path]
            if path == "tunnel":
                with Sampler(stack.relay_pids()) as sampler:
                    r = run(port, host, path)
                for k, v in sampler.peak.items():
                    res.memory[k] = max(res.memory.get(k, 0), v)
                for k, v in sampler.cpu.items():
                    res.cpu[k] = max(res.cpu.get(k, 0.0), v)
            else:
                r = run(port, host, path)
            res.runs.setdefault(path, []).append(r)
            time.sleep(0.3)
    keys = [
        k for k, v in res.runs["direct"][0].items() if isinstance(v, int | float) and k != "pid"
    ]
    for k in keys:
        res.metrics[k] = {
            p: statistics.median(float(r[k]) for r in res.runs[p]) for p in paths if p in res.runs
        }
    return res


# -- 1. small HTTP ---------------------------------------------------------------------------------
def small_http(stack: Stack, s: Settings) -> Result:
    return _repeat(
        stack, s, "small_http", lambda port, host, _: wrk(port, host, "/1k", 50, s.duration)
    )


# -- 2. bulk ---------------------------------------------------------------------------------------
_POST_LUA = """wrk.method = "POST"
wrk.body = string.rep("u", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def bulk_download(stack: Stack, s: Settings) -> Result:
    return _repeat(
        stack, s, "bulk_download", lambda port, host, _: wrk(port, host, "/1m", 10, s.duration)
    )


def single_download(stack: Stack, s: Settings) -> Result:
    return _repeat(
        stack,
        s,
        "single_download",
        lambda port, host, _: run_loadgen("download", port, host, path="/big", duration=s.duration),
    )


def bulk_upload(stack: Stack, s: Settings) -> Result:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_POST_LUA)
    try:

        def run(port: int, host: str, _: str) -> dict[str, Any]:
            r = wrk(port, host, "/upload", 10, s.duration, script=f.name)
            r["mib_s"] = r["req_s"]  # wrk's Transfer/sec counts responses; each request is 1 MiB
            return r

        return _repeat(stack, s, "bulk_upload", run)
    finally:
        Path(f.name).unlink()


def single_upload(stack: Stack, s: Settings) -> Result:
    return _repeat(
        stack,
        s,
        "single_upload",
        lambda port, host, _: run_loadgen(
            "upload", port, host, path="/upload", duration=s.duration
        ),
    )


# -- 3. WebSocket ----------------------------------------------------------------------------------
def websocket(stack: Stack, s: Settings) -> Result:
    return _repeat(
        stack,
        s,
        "websocket",
        lambda port, host, _: run_loadgen(
            "ws", port, host, conns=s.ws_conns, duration=s.duration, warmup=1
        ),
        kind="ws",
    )


# -- 4. churn --------------------------------------------------------------------------------------
def churn(stack: Stack, s: Settings) -> Result:
    return _repeat(
        stack,
        s,
        "churn",
        lambda port, host, _: wrk(
            port, host, "/1k", 50, s.duration, headers=("Connection: close",)
        ),
    )


# -- 5. head-of-line -------------------------------------------------------------------------------
def head_of_line(stack: Stack, s: Settings) -> Result:
    """Small GETs at 200/s on 4 connections, alone and while one bulk download of the big file
    runs on the same sandbox (same session, same port) for the whole probe."""

    return _head_of_line(stack, s, "head_of_line", 0)


def head_of_line_paced(stack: Stack, s: Settings) -> Result:
    """Diagnostic variant: the bulk download is paced by its reader at 200 MiB/s, so the CPU is
    not saturated and what remains is queueing inside the relay (frames of the bulk stream ahead
    of the small responses). Not a target of issue 4; it separates mux HOL from CPU contention."""
    return _head_of_line(stack, s, "head_of_line_paced", 200)


def _head_of_line(stack: Stack, s: Settings, name: str, rate_mib: float) -> Result:
    def run(port: int, host: str, _: str) -> dict[str, Any]:
        probe = dict(path="/1k", conns=4, rate=200, duration=s.duration, warmup=0.5)
        alone = run_loadgen("probe", port, host, **probe)
        time.sleep(0.2)
        bulk = loadgen(
            "download", port, host, path="/big", duration=s.duration + 1.5, rate_mib=rate_mib
        )
        time.sleep(0.3)
        loaded = run_loadgen("probe", port, host, **probe)
        out, _ = bulk.communicate(timeout=s.duration + 60)
        down = json.loads(out.strip().splitlines()[-1])
        return {
            "p50_alone": alone["p50"],
            "p99_alone": alone["p99"],
            "p50_loaded": loaded["p50"],
            "p99_loaded": loaded["p99"],
            "p99_ratio": loaded["p99"] / alone["p99"],
            "bulk_mib_s": down["mib_per_s"],
            "errors": alone["errors"] + loaded["errors"],
        }

    return _repeat(stack, s, name, run)


# -- 6. scale --------------------------------------------------------------------------------------
def idle_websockets(stack: Stack, s: Settings) -> Result:
    """N idle WebSockets held open; RSS growth divided by N. One run (memory, not timing)."""
    res = Result("idle_websockets")
    assert stack.echo and stack.proxy and stack.tunneld and stack.agent
    targets = stack.targets("ws")
    # nginx holds two fds per proxied connection; keep it under the per-process fd limit
    from .stack import nofile_limit

    counts = {
        "direct": s.idle_ws,
        "tunnel": s.idle_ws,
        "nginx": min(s.idle_ws, (nofile_limit() - 500) // 4),
    }
    measured = {
        "direct": lambda: [stack.echo.pid],  # type: ignore[union-attr]
        "tunnel": lambda: [stack.tunneld.pid, stack.agent.pid],  # type: ignore[union-attr]
        "nginx": lambda: tree_pids(stack.proxy.pid),  # type: ignore[union-attr]
    }
    for path in PATHS:
        port, host = targets[path]
        pids = measured[path]()
        before = {p: rss(p) for p in pids}
        p = loadgen("ws-idle", port, host, conns=counts[path])
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        if not line:
            p.stdin.close()
            p.wait(60)
            res.notes.append(f"{path}: opening {counts[path]} idle WebSockets failed")
            continue
        ready = json.loads(line)
        time.sleep(1.0)
        after = {q: rss(q) for q in measured[path]()}
        grown = sum(after.values()) - sum(before.get(q, 0) for q in after)
        run = {
            "conns": ready["ready"],
            "open_s": ready["open_s"],
            "rss_delta": grown,
            "bytes_per_conn": grown / ready["ready"],
        }
        if path == "tunnel":
            run["tunneld_bytes_per_conn"] = (
                after[stack.tunneld.pid] - before[stack.tunneld.pid]
            ) / ready["ready"]
            run["agent_bytes_per_conn"] = (
                after[stack.agent.pid] - before[stack.agent.pid]
            ) / ready["ready"]
            run["tunneld_rss"] = after[stack.tunneld.pid]
            run["agent_rss"] = after[stack.agent.pid]
        p.stdin.close()
        p.wait(60)
        res.runs[path] = [run]
        time.sleep(1.0)
    for k in ("bytes_per_conn", "conns"):
        res.metrics[k] = {path: float(res.runs[path][0][k]) for path in PATHS if path in res.runs}
    if "tunnel" in res.runs:
        for k in ("tunneld_bytes_per_conn", "agent_bytes_per_conn"):
            res.metrics[k] = {"tunnel": float(res.runs["tunnel"][0][k])}
    return res


def many_agents(stack: Stack, s: Settings) -> Result:
    """N agents (in-process ``agent.core.Agent`` objects in one Python process) connected to a
    fresh tunneld: its RSS growth per agent. No direct counterpart.

    A fresh tunneld, because the shared one has already grown its heap in earlier scenarios
    (10,000 idle WebSockets) and would host the agents in freed memory, showing ~0 per agent."""
    res = Result("many_agents")
    ports_file = stack.dir / "tunneld-agents-ports.json"
    fresh = stack.spawn(
        "tunneld-agents",
        [str(VENV_BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
         "--admin-port", "0", "--ports-file", str(ports_file), "--log-level", "warning"],
        tunneld_env(),
    )  # fmt: skip
    agent_port = _wait_json(ports_file, fresh)["agent"]
    time.sleep(0.5)
    before = rss(fresh.pid)
    argv = [sys.executable, "-m", "bench.e2e.agents", "--server", f"127.0.0.1:{agent_port}",
            "--count", str(s.agents)]  # fmt: skip
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout is not None and p.stdin is not None
    line = p.stdout.readline()
    if not line:
        raise RuntimeError("agents process failed")
    ready = json.loads(line)
    time.sleep(1.0)
    after = rss(fresh.pid)
    p.stdin.close()
    p.wait(60)
    fresh.popen.terminate()
    fresh.popen.wait(30)
    run = {
        "agents": ready["connected"],
        "connect_s": ready["connect_s"],
        "tunneld_bytes_per_agent": (after - before) / ready["connected"],
        "agent_process_bytes_per_agent": ready["bytes_per_agent"],
    }
    res.runs["tunnel"] = [run]
    for k in ("tunneld_bytes_per_agent", "agent_process_bytes_per_agent", "agents"):
        res.metrics[k] = {"tunnel": float(run[k])}
    return res


# -- 7. isolation (issue 7) ------------------------------------------------------------------------
_PROBE: dict[str, Any] = {"path": "/1k", "conns": 4, "rate": 200, "warmup": 0.5}
MIB = 2**20
FILL_PROBE_S = 3.0  # stalled_readers: the 200 downloads start ~0.1 s in and fill in ~2 s


def _stalled_download(port: int, host: str) -> socket.socket:
    """A GET of the big file on a raw socket with a 4 KiB receive buffer that is never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def _wait_response_heads(socks: list[socket.socket], timeout: float) -> tuple[int, int]:
    """Waits (peeking, reading nothing) until every socket holds the start of its response;
    returns (answered 200, answered otherwise or closed). Bounded by ``timeout``."""
    pending = list(socks)
    ok = bad = 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        still = []
        for sock in pending:
            try:
                head = sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                still.append(sock)
                continue
            except OSError:
                bad += 1
                continue
            if len(head) < 12 and head:
                still.append(sock)
            elif head.startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                bad += 1
        pending = still
        if pending:
            time.sleep(0.05)
    return ok, bad


def _wait_rss_settled(pids: list[int], timeout: float, quiet: float = 1.0) -> float:
    """Waits until the summed RSS of ``pids`` moved by < 1 MiB over ``quiet`` s (the stalled
    streams' windows and buffers are full); returns the seconds it took (``timeout`` if never)."""
    t0 = time.monotonic()
    last = sum(rss(p) for p in pids)
    since = t0
    while time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        now = sum(rss(p) for p in pids)
        if abs(now - last) >= MIB:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return since - t0
    return timeout


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the stalled client goes away at once, as a killed one does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def stalled_readers(stack: Stack, s: Settings) -> Result:
    """Small GETs at 200/s on 4 connections, alone and while ``s.stalled`` downloads of the big
    file on the same sandbox (same port) are open and never read (4 KiB SO_RCVBUF). Direct runs
    the same against the origin, so the ratio compares like with like. Issue 7: tunnel
    p99_loaded <= 100 ms; tunneld and agent peak RSS come from the tunnel runs' sampler."""

    def run(port: int, host: str, path: str) -> dict[str, Any]:
        assert stack.origin is not None
        watched = [*stack.relay_pids().values()] if path == "tunnel" else [[stack.origin.pid]]
        pids = [q for group in watched for p in group for q in tree_pids(p)]
        alone = run_loadgen("probe", port, host, duration=s.duration, **_PROBE)
        socks: list[socket.socket] = []
        # diagnostic: a probe that runs while the stalled downloads start and fill their windows
        filling = loadgen("probe", port, host, **{**_PROBE, "duration": FILL_PROBE_S})
        try:
            time.sleep(0.6)  # the probe process is up and connected (0.5 s warm-up)
            t0 = time.perf_counter()
            for _i in range(s.stalled):
                socks.append(_stalled_download(port, host))
            ok, bad = _wait_response_heads(socks, 30.0)
            open_s = time.perf_counter() - t0
            # established = every response started and the relay's memory stopped growing
            # (windows and buffers full): the probe then measures the stalled steady state
            settle_s = _wait_rss_settled(pids, 30.0)
            out, _err = filling.communicate(timeout=FILL_PROBE_S + 60)
            fill = json.loads(out.strip().splitlines()[-1])
            loaded = run_loadgen("probe", port, host, duration=s.duration, **_PROBE)
        finally:
            for sock in socks:
                _abort(sock)
            if filling.poll() is None:  # only on an error above: it ends by itself otherwise
                filling.kill()
                filling.wait()
        time.sleep(1.0)  # the relay cleans up 200 reset streams before the next run
        return {
            "p50_alone": alone["p50"],
            "p99_alone": alone["p99"],
            "p50_loaded": loaded["p50"],
            "p99_loaded": loaded["p99"],
            "p99_ratio": loaded["p99"] / alone["p99"],
            "p99_filling": fill["p99"],
            "max_filling": fill["max"],
            "stalled_ok": ok,
            "stalled_failed": bad,
            "open_s": open_s,
            "settle_s": settle_s,
            "requests": loaded["requests"],
            "errors": alone["errors"] + loaded["errors"],
            "slowest_loaded": loaded["slowest"],
            "slowest_filling": fill["slowest"],
        }

    return _repeat(stack, s, "stalled_readers", run, paths=("direct", "tunnel"))


def hostile_flood(stack: Stack, s: Settings) -> Result:
    """Three hostile sandboxes flood the bench's tunneld for ``s.flood_s`` each run: a PING
    flood, a `list` flood after 100 long-named exposures (~25 KiB per 40-byte request), and a
    WebSocket ping flood on the agent port before any token. None reads what the edge sends.
    Meanwhile the probe measures small GETs to the bench's own sandbox. Tunnel only (the floods
    are about the agent link). Issue 7: p99 <= 50 ms, tunneld RSS growth <= 64 MiB."""
    from tests.faults.hostile_agent import (
        HostileAgent,
        list_batch,
        ping_batch,
        websocket_ping_flood,
    )
    from tunneld.auth import agent_token

    assert stack.tunneld is not None
    res = Result("hostile_flood")
    port, host = stack.targets()["tunnel"]
    pid = stack.tunneld.pid
    for i in range(s.repeat):
        alone = run_loadgen("probe", port, host, duration=s.duration, **_PROBE)
        names = (f"hostile-ping-{i}", f"hostile-list-{i}")
        hostiles = [HostileAgent(stack.agent_port, n, agent_token(SECRET, n)) for n in names]
        try:
            hostiles[1].expose_many(100)
            time.sleep(0.5)
            before = rss(pid)
            with Sampler(stack.relay_pids()) as sampler, ThreadPoolExecutor(3) as pool:
                floods = [
                    pool.submit(hostiles[0].flood, ping_batch, s.flood_s),
                    pool.submit(hostiles[1].flood, list_batch, s.flood_s),
                    pool.submit(websocket_ping_flood, stack.agent_port, s.flood_s),
                ]
                # warm-up 0.5 s + (flood_s - 1) s: the probe measures inside the flood
                loaded = run_loadgen("probe", port, host, duration=s.flood_s - 1.0, **_PROBE)
                sent = [f.result(timeout=s.flood_s + 30) for f in floods]
        finally:
            for h in hostiles:
                h.close()
        for k, v in sampler.peak.items():
            res.memory[k] = max(res.memory.get(k, 0), v)
        for k, v in sampler.cpu.items():
            res.cpu[k] = max(res.cpu.get(k, 0.0), v)
        res.runs.setdefault("tunnel", []).append(
            {
                "p50_alone": alone["p50"],
                "p99_alone": alone["p99"],
                "p50": loaded["p50"],
                "p99": loaded["p99"],
                "max_ms": loaded["max"],
                "requests": loaded["requests"],
                "errors": alone["errors"] + loaded["errors"],
                "rss_before_mib": before / MIB,
                "rss_growth_mib": (sampler.peak["tunneld"] - before) / MIB,
                "rss_after_mib": rss(pid) / MIB,
                "ping_mib_sent": sent[0] / MIB,
                "list_mib_sent": sent[1] / MIB,
                "wsping_mib_sent": sent[2] / MIB,
                "slowest": loaded["slowest"],
            }
        )
        time.sleep(1.0)
    runs = res.runs["tunnel"]
    for k, v in runs[0].items():
        if isinstance(v, int | float):
            res.metrics[k] = {"tunnel": statistics.median(float(r[k]) for r in runs)}
    return res


def _https(stack: Stack, s: Settings) -> Result:
    from .https import https  # it imports this module

    return https(stack, s)


SCENARIOS: dict[str, Callable[[Stack, Settings], Result]] = {
    "small_http": small_http,
    "bulk_download": bulk_download,
    "single_download": single_download,
    "bulk_upload": bulk_upload,
    "single_upload": single_upload,
    "websocket": websocket,
    "churn": churn,
    "https": _https,  # bench/e2e/https.py (issue 10)
    "head_of_line": head_of_line,
    "head_of_line_paced": head_of_line_paced,
    "idle_websockets": idle_websockets,
    "many_agents": many_agents,
    # last: they grow tunneld's heap (stalled readers up to the windows' bound), which would
    # hide the growth the idle_websockets and many_agents scenarios measure
    "hostile_flood": hostile_flood,
    "stalled_readers": stalled_readers,
}
