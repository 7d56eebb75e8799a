"""Cluster costs (issue 9): ``python -m bench.e2e.cluster [ROUNDS] [landing,workers]``.

**landing**: two ``tunneld serve`` nodes on one redis-server (a private one in a temp dir, Unix
socket), one agent connected to node A, the nginx origin behind it. The same load goes through
A's public port (the owner) and through B's, alternating, ``ROUNDS`` times, as ratios B/A:

- *handover*: B is a node of the same host, so it passes each connection's socket to A
  (tunneld/handover.py) and steps out; every churn request (``Connection: close``) pays one
  hand-over. Target: a handed-over connection costs <= 10 % of churn throughput (ratio >= 0.9).
- *forwarded*: B with ``handover = false`` relays over a node link, as a node on another host
  would. Target: a forwarded small request >= 0.6 x an owner-landed one.

Small keep-alive requests (wrk, 1 KiB, 50 connections) and churn, each.

**workers**: ``--workers 2`` against ``--workers 1`` (both on Redis), four sandboxes (one agent
each, one wrk thread per sandbox's Host), aggregate small-request req/s, alternating. On this
two-core machine wrk, nginx and the agents share the cores with the workers: the figure says
what a second worker buys here, not on a bigger host.

Needs nginx, wrk and redis-server (Debian packages).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from tunneld.private_redis import PrivateRedis

from .scenarios import wrk
from .stack import VENV_BIN, Stack, _wait_json, tunneld_env

DURATION = 3.0


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
        runs: dict[str, list[float]] = {f"{label}_small_http": [], f"{label}_churn": []}
        for i in range(rounds):
            for name, headers in (("small_http", ()), ("churn", ("Connection: close",))):
                a = wrk(*owner, "/1k", 50, DURATION, headers=headers)
                f = wrk(*other, "/1k", 50, DURATION, headers=headers)
                bad = a["errors"] + a["non2xx"] + f["errors"] + f["non2xx"]
                runs[f"{label}_{name}"].append(f["req_s"] / a["req_s"])
                print(
                    f"round {i} {label} {name}: owner {a['req_s']:.0f} req/s, via B "
                    f"{f['req_s']:.0f} req/s, ratio {f['req_s'] / a['req_s']:.3f}"
                    f"{f', {bad} errors' if bad else ''} (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        return runs
    finally:
        stack.close()


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


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    parts = argv[1].split(",") if len(argv) > 1 else ["landing", "workers"]
    # The redis-server tunneld runs for --workers without a store of one's own: a private Unix
    # socket, no persistence, stopped at the end.
    redis = PrivateRedis(None)
    redis.start(fresh=True)
    os.environ["BENCH_TUNNELD_STORE"] = redis.url
    runs: dict[str, list[float]] = {}
    try:
        if "landing" in parts:
            runs.update(_landing(redis.url, rounds, handover=True))
            runs.update(_landing(redis.url, rounds, handover=False))
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
