"""Cluster costs (issue 9): ``python -m bench.e2e.cluster [ROUNDS] [landing,workers,instr]``.

**landing**: two ``tunneld serve`` nodes on one redis-server (a private one in a temp dir, Unix
socket), one agent connected to node A, the nginx origin behind it. The same load goes through
A's public port (the owner) and through B's, alternating, ``ROUNDS`` times, as ratios B/A:

- *handover*: B is a node of the same host, so it passes each connection's socket to A
  (tunneld/handover.py) and steps out; every churn request (``Connection: close``) pays one
  hand-over. Target: a handed-over connection costs <= 10 % of churn throughput (ratio >= 0.9).
- *forwarded*: B with ``handover = false`` relays over a node link, as a node on another host
  would. Target: a forwarded small request >= 0.6 x an owner-landed one.

Small keep-alive requests (wrk, 1 KiB, 50 connections) and churn, each, with the CPU time (user
+ system, ``/proc``) both nodes spent per request. ``handover`` or ``forwarded`` instead of
``landing``: only that half.

**workers**: ``--workers 2`` against ``--workers 1`` (both on Redis), four sandboxes (one agent
each, one wrk thread per sandbox's Host), aggregate small-request req/s, alternating. On this
two-core machine wrk, nginx and the agents share the cores with the workers: the figure says
what a second worker buys here, not on a bigger host.

**instr** (``python -m bench.e2e.cluster N instr``): instructions per churn request (callgrind,
as ``bench.e2e.instr``; a cost the machine's load cannot move): node A and node B both run under
``valgrind --tool=callgrind``; ``N`` x 100 sequential ``Connection: close`` requests land on A
(owner-landed: A's count) and then on B (handed over: B's count, A's count, and their sum), then
10 s of wrk churn with 16 connections the same way (concurrent hand-overs travel together). The
ratio ``(A owner-landed) / (A + B handed over)`` is what the hand-over costs in tunneld's own
work; wrk, nginx and the agent do the same work either way, so the wall-clock ratio is higher.

**floor** (``python -m bench.e2e.cluster N floor``): the same ``N`` x 100 sequential requests
through the least a landing worker on uvloop does per handed-over connection
(``bench/e2e/landing_floor.py``: accept, peer address, head timer, one read, find the Host, pass
the descriptor, read the answer, close), under callgrind the same way: what tunneld's landing
node (``landing B`` above) is measured against.

``BENCH_DURATION``: seconds per wrk run of landing and workers (3); ``BENCH_INSTR_CONNS``: the
connection counts instr measures (``1,16``; ``1``: the sequential requests only). Both for a
short smoke run.

Needs nginx, wrk and redis-server (Debian packages); ``instr`` needs valgrind too.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tunneld.private_redis import PrivateRedis

from .ab import count_arg
from .scenarios import wrk
from .stack import VENV_BIN, Stack, _wait_json, cpu_seconds, tree_pids, tunneld_env

# seconds per wrk run of landing and workers; BENCH_DURATION shortens it (a smoke run:
# tests/test_bench_entry_points.py)
DURATION = float(os.environ.get("BENCH_DURATION", "3"))
CONCURRENT = 16  # wrk connections for the concurrent instruction counts
# instr: the connection counts measured (1: sequential requests; more: 10 s of wrk), "1" alone
# for a smoke run (wrk under callgrind needs its 10 s)
INSTR_CONNS = [int(c) for c in os.environ.get("BENCH_INSTR_CONNS", f"1,{CONCURRENT}").split(",")]


def _landing(url: str, rounds: int, handover: bool) -> dict[str, list[float]]:
    label = "handover" if handover else "forwarded"
    stack = Stack().start()
    try:
        ports_file = stack.dir / "node-b-ports.json"
        env = {**tunneld_env(), "TUNNELD_HANDOVER": "true" if handover else "false"}
        b = stack.spawn(
            "tunneld-b",
            [str(VENV_BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
             "--admin-port", "0", "--ports-file", str(ports_file), "--log-level", "warning"],
            env,
        )  # fmt: skip
        b_public = _wait_json(ports_file, b)["public"]
        owner = (stack.public_port, stack.http_host)
        other = (b_public, stack.http_host)
        assert wrk(*other, "/1k", 2, 1.0)["non2xx"] == 0
        runs: dict[str, list[float]] = {}
        assert stack.tunneld is not None
        assert stack.agent is not None and stack.origin is not None
        # CPU time is read for A, B, and everything else that works per request (the agent,
        # nginx, wrk): on a machine whose cores are the limit, req/s follows the total, so its
        # ratio is what the req/s ratio would be without the other load on the machine.
        pids = (stack.tunneld.pid, b.pid, stack.agent.pid, *tree_pids(stack.origin.pid))
        for i in range(rounds):
            for name, headers in (("small_http", ()), ("churn", ("Connection: close",))):
                a, a_cpu = _wrk_cpu(owner, headers, pids)
                f, f_cpu = _wrk_cpu(other, headers, pids)
                bad = a["errors"] + a["non2xx"] + f["errors"] + f["non2xx"]
                runs.setdefault(f"{label}_{name}", []).append(f["req_s"] / a["req_s"])
                # CPU time per request (us) of both nodes, landing on A and on B; and the ratio
                # of the total (nodes, agent, nginx, wrk) of both
                runs.setdefault(f"{label}_{name}_nodes_cpu_us_owner", []).append(sum(a_cpu[:2]))
                runs.setdefault(f"{label}_{name}_nodes_cpu_us_via_b", []).append(sum(f_cpu[:2]))
                runs.setdefault(f"{label}_{name}_cpu_ratio", []).append(sum(a_cpu) / sum(f_cpu))
                print(
                    f"round {i} {label} {name}: owner {a['req_s']:.0f} req/s, via B "
                    f"{f['req_s']:.0f} req/s, ratio {f['req_s'] / a['req_s']:.3f}"
                    f"{f', {bad} errors' if bad else ''}; CPU us/request: owner-landed A "
                    f"{a_cpu[0]:.0f} (all {sum(a_cpu):.0f}), via B: A {f_cpu[0]:.0f} + B "
                    f"{f_cpu[1]:.0f} (all {sum(f_cpu):.0f}), total CPU ratio "
                    f"{sum(a_cpu) / sum(f_cpu):.3f} (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        return runs
    finally:
        stack.close()


def _wrk_cpu(
    target: tuple[int, str], headers: tuple[str, ...], pids: tuple[int, ...]
) -> tuple[dict[str, Any], list[float]]:
    """wrk on ``target``, and the CPU time (user + system, /proc) each of ``pids`` spent per
    request meanwhile, in microseconds, and wrk's own last."""
    before = [cpu_seconds(pid) for pid in pids]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = wrk(*target, "/1k", 50, DURATION, headers=headers)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    requests = max(1, r["requests"])
    spent = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    spent.append(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
    return r, [t * 1e6 / requests for t in spent]


_HOSTS_LUA = """
local hosts = {%s}
local n = 0
function setup(thread)
  n = n + 1
  thread:set("host", hosts[(n - 1) %% #hosts + 1])
end
function init(args)
  wrk.headers["Host"] = host
end
"""


def _workers(rounds: int, sandboxes: int = 4) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"workers_2_over_1": []}
    for i in range(rounds):
        figures = {}
        for workers in (1, 2):
            stack = Stack(tunneld_args=("--workers", str(workers))).start()
            try:
                hosts = [stack.http_host]
                for k in range(1, sandboxes):
                    stack.spawn_agent(f"bench{k}")
                    hosts.append(stack.expose(f"bench{k}", stack.origin_port))
                script = stack.dir / "hosts.lua"
                script.write_text(_HOSTS_LUA % ", ".join(f'"{h}"' for h in hosts))
                r = wrk(
                    stack.public_port, hosts[0], "/1k", 64, DURATION,
                    script=str(script), threads=sandboxes,
                )  # fmt: skip
                figures[workers] = r["req_s"]
                bad = r["errors"] + r["non2xx"]
                detail = f"{r.get('socket_errors', '')}, non-2xx {r['non2xx']}"
                print(
                    f"round {i} --workers {workers}: {r['req_s']:.0f} req/s over {sandboxes} "
                    f"sandboxes{f', {bad} errors: {detail}' if bad else ''} "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
            finally:
                stack.close()
        out["workers_2_over_1"].append(figures[2] / figures[1])
    return out


def _churn(port: int, host: str, count: int) -> None:
    """``count`` sequential one-request connections (``Connection: close``), each read to EOF."""
    req = f"GET /1k HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(req)
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        if not buf.startswith(b"HTTP/1.1 200") or len(buf) < 1024:
            raise RuntimeError(f"unexpected response: {buf[:200]!r}")


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _instr_totals(out: Path, name: str, phase: str) -> int:
    """Instructions in the dumps of ``name`` since the last call (each dump zeroes the counters);
    the dumps move to ``out/phase/`` (kept with BENCH_KEEP_DIR, for callgrind_annotate)."""
    total = 0
    (out / phase).mkdir(exist_ok=True)
    for f in out.glob(f"{name}.callgrind.*"):
        counts = re.findall(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.M)
        total += max([0, *map(int, counts)])
        f.rename(out / phase / f.name)
    return total


def _instr(requests: int) -> dict[str, list[float]]:
    out = Path(tempfile.mkdtemp(prefix="tunneld-cluster-instr-"))
    wrap = "valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={}"
    os.environ["BENCH_TUNNELD_WRAP"] = wrap.format(out / "a.callgrind")
    try:
        stack = Stack().start()
    finally:
        del os.environ["BENCH_TUNNELD_WRAP"]
    try:
        assert stack.tunneld is not None
        ports_file = stack.dir / "node-b-ports.json"
        b = stack.spawn(
            "tunneld-b",
            [*shlex.split(wrap.format(out / "b.callgrind")), sys.executable,
             str(VENV_BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
             "--admin-port", "0", "--ports-file", str(ports_file), "--log-level", "warning"],
            {**tunneld_env(), "TUNNELD_HANDOVER": "true"},
        )  # fmt: skip
        b_public = _wait_json(ports_file, b, 180)["public"]
        for port in (stack.public_port, b_public):
            _churn(port, stack.http_host, 300)  # warm
        counts: dict[str, float] = {}
        pids = {"a": stack.tunneld.pid, "b": b.pid}
        for phase, port, conns in (
            (phase, port, conns)
            for conns in INSTR_CONNS
            for phase, port in (("owner", stack.public_port), ("handover", b_public))
        ):
            label = f"{phase}_c{conns}"
            for pid in pids.values():
                _callgrind(pid, "--instr=on")
            if conns == 1:
                _churn(port, stack.http_host, requests)
                done = requests
            else:  # wrk: several connections at once, as in the wall-clock figures
                r = wrk(port, stack.http_host, "/1k", conns, 10, headers=("Connection: close",))
                done = r["requests"]
                if r["errors"] or r["non2xx"] or done < 100:
                    raise RuntimeError(f"wrk under callgrind: {r}")
            for pid in pids.values():
                _callgrind(pid, "--instr=off")
                _callgrind(pid, "--dump")
            time.sleep(1.0)
            for name in pids:
                counts[f"{label}_{name}"] = _instr_totals(out, name, label) / done
    finally:
        stack.close()
        if not os.environ.get("BENCH_KEEP_DIR"):
            shutil.rmtree(out, ignore_errors=True)
        else:
            print(f"callgrind dumps in {out}", flush=True)
    runs: dict[str, list[float]] = {}
    for conns in INSTR_CONNS:
        owner, landing = counts[f"owner_c{conns}_a"], counts[f"handover_c{conns}_b"]
        adopting = counts[f"handover_c{conns}_a"]
        print(
            f"instructions per churn request, {conns} connection(s): owner-landed: A "
            f"{owner:,.0f}; handed over: landing B {landing:,.0f} + owner A {adopting:,.0f} = "
            f"{landing + adopting:,.0f}, {(landing + adopting) / owner:.2f} x owner-landed",
            flush=True,
        )
        runs[f"instr_c{conns}_owner"] = [owner]
        runs[f"instr_c{conns}_landing"] = [landing]
        runs[f"instr_c{conns}_adopting"] = [adopting]
    return runs


def _floor(requests: int) -> dict[str, list[float]]:
    """Instructions per request of ``bench/e2e/landing_floor.py``'s landing worker (callgrind)."""
    out = Path(tempfile.mkdtemp(prefix="tunneld-landing-floor-"))
    address, ports_file = str(out / "owner.sock"), out / "ports.json"
    module = [sys.executable, "-m", "bench.e2e.landing_floor"]
    root = Path(__file__).resolve().parents[2]  # the bench package's, whatever the cwd
    procs = [subprocess.Popen([*module, "owner", address], cwd=root)]
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(address) and time.monotonic() < deadline:
            time.sleep(0.05)
        wrap = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={out / 'floor.callgrind'}"]  # fmt: skip
        landing = subprocess.Popen(
            [*wrap, *module, "landing", address, str(ports_file)],
            cwd=root,
            stderr=subprocess.DEVNULL,
        )
        procs.append(landing)
        deadline = time.monotonic() + 180
        while not ports_file.exists():
            if time.monotonic() > deadline or landing.poll() is not None:
                raise RuntimeError("the landing floor did not start")
            time.sleep(0.2)
        port = json.loads(ports_file.read_text())["public"]
        host = "8000-bench-tok.localhost"
        _churn(port, host, 300)  # warm
        _callgrind(landing.pid, "--instr=on")
        _churn(port, host, requests)
        _callgrind(landing.pid, "--instr=off")
        _callgrind(landing.pid, "--dump")
        time.sleep(1.0)
        floor = _instr_totals(out, "floor", "floor") / requests
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(out, ignore_errors=True)
    print(f"instructions per churn request, the landing floor: {floor:,.0f}", flush=True)
    return {"instr_c1_landing_floor": [floor]}


PARTS = ("landing", "handover", "forwarded", "workers", "instr", "floor")


def main(argv: list[str]) -> int:
    rounds = count_arg(argv[0]) if argv else 5
    parts = argv[1].split(",") if len(argv) > 1 else ["landing", "workers"]
    unknown = [p for p in parts if p not in PARTS]
    if rounds < 1 or unknown:  # before a misspelt part silently measured nothing
        print(f"unknown part(s) {unknown} or ROUNDS < 1; parts: {','.join(PARTS)}", file=sys.stderr)
        return 2
    # The redis-server tunneld runs for --workers without a store of one's own: a private Unix
    # socket, no persistence, stopped at the end.
    redis = PrivateRedis(None)
    redis.start(fresh=True)
    os.environ["BENCH_TUNNELD_STORE"] = redis.url
    runs: dict[str, list[float]] = {}
    try:
        if "landing" in parts or "handover" in parts:
            runs.update(_landing(redis.url, rounds, handover=True))
        if "landing" in parts or "forwarded" in parts:
            runs.update(_landing(redis.url, rounds, handover=False))
        if "instr" in parts:
            runs.update(_instr(rounds * 100))
        if "floor" in parts:
            runs.update(_floor(rounds * 100))
        if "workers" in parts:
            runs.update(_workers(rounds))
    finally:
        redis.cleanup()
        os.environ.pop("BENCH_TUNNELD_STORE", None)
    medians = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    print(json.dumps({"runs": runs, "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
