"""The cost of landing on the wrong node (issue 9): ``python -m bench.e2e.cluster [ROUNDS]``.

Two ``tunneld serve`` nodes on one redis-server (a private one in a temp dir, Unix socket), one
agent connected to node A, the nginx origin behind it. The same load is run through A's public
port (the owner: one hop, as a single edge) and through B's (the load balancer picked the other
node: B hands each connection to A over a node link, one extra hop), alternating, ``ROUNDS``
times; reported as ratios B/A, medians over the rounds, for small keep-alive requests (wrk,
1 KiB, 50 connections) and for churn (``Connection: close``: every request is a new
connection, so a new node-link stream). Target (issue 9): a forwarded small request >= 0.6 x an
owner-landed one. Needs nginx, wrk and redis-server (Debian packages).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .scenarios import wrk
from .stack import VENV_BIN, Stack, _wait_json, tunneld_env

DURATION = 3.0


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--dir", str(directory),
         "--appendonly", "yes", "--save", "", "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(str(sock))
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return proc, f"unix://{sock}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    with tempfile.TemporaryDirectory(prefix="tunneld-cluster-bench-") as tmp:
        redis, url = start_redis(Path(tmp))
        os.environ["BENCH_TUNNELD_STORE"] = url
        stack = Stack().start()
        try:
            ports_file = stack.dir / "node-b-ports.json"
            b = stack.spawn(
                "tunneld-b",
                [str(VENV_BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
                 "--admin-port", "0", "--ports-file", str(ports_file), "--log-level", "warning"],
                tunneld_env(),
            )  # fmt: skip
            b_public = _wait_json(ports_file, b)["public"]
            owner = (stack.public_port, stack.http_host)
            other = (b_public, stack.http_host)
            assert wrk(*other, "/1k", 2, 1.0)["non2xx"] == 0
            runs: dict[str, list[float]] = {"small_http": [], "churn": []}
            for i in range(rounds):
                for name, headers in (("small_http", ()), ("churn", ("Connection: close",))):
                    a = wrk(*owner, "/1k", 50, DURATION, headers=headers)
                    f = wrk(*other, "/1k", 50, DURATION, headers=headers)
                    bad = a["errors"] + a["non2xx"] + f["errors"] + f["non2xx"]
                    runs[name].append(f["req_s"] / a["req_s"])
                    print(
                        f"round {i} {name}: owner {a['req_s']:.0f} req/s, forwarded "
                        f"{f['req_s']:.0f} req/s, ratio {f['req_s'] / a['req_s']:.3f}"
                        f"{f', {bad} errors' if bad else ''} (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            medians = {k: statistics.median(v) for k, v in runs.items()}
            print(json.dumps({"runs": runs, "medians": medians}, indent=1))
        finally:
            stack.close()
            redis.terminate()
            redis.wait(10)
            os.environ.pop("BENCH_TUNNELD_STORE", None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
