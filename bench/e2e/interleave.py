"""Interleaved A/B of tunneld's CPU per request under load, across commits and the access log:
``python -m bench.e2e.interleave COMMIT[+access|+access-quiet],COMMIT... [ROUNDS]``

``bench.e2e.ab`` runs its variants one after another, each on a fresh stack, for seconds each: on
a shared two-core machine what else runs changes between them, and single rounds of the same
code swing by +-30 % in req/s and +-20 % in CPU per request. Here every variant runs at the same
time, each on its own ``Stack`` (tunneld, agent, nginx origin; ``COMMIT`` as in
``bench.e2e.ab``: its ``git archive`` first on PYTHONPATH, its C extension compiled; ``+access``:
the access log on and every line written at info level to tunneld's log file;
``+access-quiet``: on, the log level dropping the lines), and each round gives every variant in
turn one short wrk burst (``BENCH_DURATION`` s, 3 unless set, as for ``bench.e2e.ab``; 50
connections, ``GET /1k`` through the tunnel), rotating which goes first. For each burst it
reads the CPU time tunneld's threads spent (``/proc/PID/task/*/schedstat``, nanoseconds) and
divides it by the requests wrk completed. What varies slowly (another process's load, the
CPU's clock) then weighs on the variants of a round alike, and the median of the rounds'
ratios to the first variant is the cost of the code; naming one commit twice (short and full
hash) gives an A/A control, the noise.

tunneld's CPU per request is what bounds an edge's throughput (on this machine the agent, the
origin and wrk share the cores too, so req/s mixes all four; it is printed, not compared).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from .ab import DURATION, count_arg, variant_env
from .scenarios import wrk
from .stack import Stack

CONNS = 50


def tunneld_cpu_ns(pid: int) -> int:
    """CPU time (ns) all of ``pid``'s threads have run (a thread that ended is not counted:
    tunneld's event loop thread is the one that serves)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def start(variant: str, tmp: Path) -> Stack:
    with variant_env(variant, tmp) as tunneld_args:
        return Stack(tunneld_args=tunneld_args).start()


def burst(stack: Stack) -> dict[str, float]:
    assert stack.tunneld is not None
    port, host = stack.targets()["tunnel"]
    before = tunneld_cpu_ns(stack.tunneld.pid)
    run = wrk(port, host, "/1k", CONNS, DURATION)
    spent = tunneld_cpu_ns(stack.tunneld.pid) - before
    requests = max(int(run["requests"]), 1)
    return {"tunneld_ns": spent / requests, "req_s": run["req_s"], "errors": run["errors"]}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    variants = argv[0].split(",")
    rounds = count_arg(argv[1]) if len(argv) > 1 else 20
    if len(variants) < 2 or len(set(variants)) != len(variants) or rounds < 1:
        print("give two or more distinct variants and ROUNDS >= 1", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="tunneld-interleave-") as tmp:
        stacks: dict[str, Stack] = {}
        try:
            for v in variants:
                stacks[v] = start(v, Path(tmp))
            for v in variants:  # warm up: imports, caches, the first connections
                burst(stacks[v])
            for i in range(rounds):
                order = variants[i % len(variants) :] + variants[: i % len(variants)]
                for v in order:
                    r = burst(stacks[v])
                    runs[v].append(r)
                    print(
                        f"round {i} {v}: tunneld {r['tunneld_ns'] / 1000:.2f} us/request, "
                        f"{r['req_s']:.0f} req/s, load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        finally:
            for s in stacks.values():
                s.close()
    base = runs[variants[0]]
    report: dict[str, dict[str, float]] = {}
    for v in variants:
        ratios = sorted(
            r["tunneld_ns"] / b["tunneld_ns"] for r, b in zip(runs[v], base, strict=True)
        )
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
        report[v] = {
            "tunneld_us_per_request": statistics.median(r["tunneld_ns"] for r in runs[v]) / 1000,
            "req_s": statistics.median(r["req_s"] for r in runs[v]),
            "errors": sum(r["errors"] for r in runs[v]),
            "cpu_ratio": statistics.median(ratios),
            "cpu_ratio_q1": q1,
            "cpu_ratio_q3": q3,
        }
    print(json.dumps({"runs": runs, "report": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
