"""The access log's cost in ONE tunneld process, switched on and off between wrk bursts:
``python -m bench.e2e.toggle [COMMIT] [ROUNDS]`` (COMMIT as in ``bench.e2e.ab``, default HEAD;
ROUNDS 30 unless given). ``python -m bench.e2e.toggle --pool OUT [OUT...]``: the same report over
the rounds of several saved outputs of runs of one code (each run's stdout), pooled: runs on a
shared machine differ from each other by more than their own intervals say, and the pooled
median of 360 rounds has an interval about half as wide as one run's.

``bench.e2e.interleave`` compares variants on stacks of their own, run at the same time: two
stacks of the same code (its A/A control) still differ by up to 4 % in the median and 20 % in a
quartile, and whole runs of one comparison by more than 10 %, because each stack has its own
processes, memory layout and place on the cores. Here there is one stack (tunneld, agent, nginx
origin), and ``access_log`` (live-changeable: SIGHUP, tunneld/cli.py's ``apply_reload``) is
switched in tunneld's TOML file between bursts: each burst opens new connections (wrk, 50 of
them, ``GET /1k`` through the tunnel, ``BENCH_DURATION`` s, 3 unless set), and a connection
takes the setting it finds when it opens. tunneld runs at info level, so with the log on every
line is written (the ``+access`` variant of ``bench.e2e.ab``/``interleave``).

Each round has three bursts, in an order that rotates from round to round: ``off``, ``on`` and
``off2`` (off again: the A/A control, which shares everything with ``off`` but the moment). For
each burst it reads the CPU time of tunneld's threads (``/proc/PID/task/*/schedstat``) and
divides it by the requests wrk completed; per round, ``on / off`` and ``off2 / off``. The report
gives their medians, quartiles and a 95 % bootstrap interval of the median, and checks that
every ``on`` burst wrote its lines (the log grew by at least one line per request) and no
``off`` burst wrote any.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .ab import DURATION, count_arg, variant_env
from .interleave import CONNS, tunneld_cpu_ns
from .scenarios import wrk
from .stack import Stack

STATES = ("off", "on", "off2")
RELOAD_TIMEOUT = 10.0
ACCESS_MARK = b" tunneld.access: "  # every text access line has it (tunneld/accesslog.py)


def bootstrap_median(values: list[float], draws: int = 2000, seed: int = 1) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(draws * 0.025)], medians[int(draws * 0.975) - 1]


class Toggled:
    """A stack whose tunneld reads ``access_log`` from a file that :meth:`set` rewrites."""

    def __init__(self, commit: str, tmp: Path) -> None:
        self.config = tmp / "tunneld.toml"
        self.config.write_text("access_log = false\n")
        self.state = "off"
        saved = os.environ.pop("TUNNELD_ACCESS_LOG", None)  # the environment beats the file
        try:
            with variant_env(commit, tmp):
                self.stack = Stack(
                    tunneld_args=("--config", str(self.config), "--log-level", "info")
                ).start()
        finally:
            if saved is not None:
                os.environ["TUNNELD_ACCESS_LOG"] = saved

    def set(self, on: bool) -> None:
        if self.state == ("on" if on else "off"):
            return
        proc = self.stack.tunneld
        assert proc is not None
        start = self.log_size()
        self.config.write_text(f"access_log = {'true' if on else 'false'}\n")
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while b"SIGHUP: configuration reloaded" not in self.log_since(start):
            if time.monotonic() > deadline:
                raise RuntimeError(f"tunneld did not reload: {proc.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.state = "on" if on else "off"

    def log_size(self) -> int:
        assert self.stack.tunneld is not None
        return self.stack.tunneld.log.stat().st_size

    def log_since(self, start: int) -> bytes:
        """tunneld's log from byte ``start`` on (the log of a long run is hundreds of MB)."""
        assert self.stack.tunneld is not None
        with self.stack.tunneld.log.open("rb") as f:
            f.seek(start)
            return f.read()

    def burst(self, state: str) -> dict[str, float]:
        self.set(state == "on")
        proc = self.stack.tunneld
        assert proc is not None
        port, host = self.stack.targets()["tunnel"]
        start = self.log_size()
        before = tunneld_cpu_ns(proc.pid)
        run = wrk(port, host, "/1k", CONNS, DURATION)
        spent = tunneld_cpu_ns(proc.pid) - before
        time.sleep(0.1)  # the access writer's last batch (FLUSH_AFTER, 50 ms)
        written = self.log_since(start).count(ACCESS_MARK)
        requests = max(int(run["requests"]), 1)
        if state == "on" and written < requests:
            raise RuntimeError(f"on: {written} access lines for {requests} requests")
        if state != "on" and written:
            raise RuntimeError(f"{state}: {written} access lines written with the log off")
        return {"tunneld_ns": spent / requests, "req_s": run["req_s"], "errors": run["errors"]}


def report_of(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per state: medians, and the ratios to the ``off`` burst of the same round (their median,
    quartiles and a 95 % bootstrap interval of the median)."""
    base = runs["off"]
    report: dict[str, dict[str, float]] = {}
    for state in STATES:
        ratios = [r["tunneld_ns"] / b["tunneld_ns"] for r, b in zip(runs[state], base, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios * 3)
        low, high = bootstrap_median(ratios)
        ns = statistics.median(r["tunneld_ns"] for r in runs[state])
        report[state] = {
            "tunneld_us_per_request": ns / 1000,
            "req_s": statistics.median(r["req_s"] for r in runs[state]),
            "errors": sum(r["errors"] for r in runs[state]),
            "cpu_ratio": statistics.median(ratios),
            "cpu_ratio_q1": q1,
            "cpu_ratio_q3": q3,
            "cpu_ratio_95_low": low,
            "cpu_ratio_95_high": high,
        }
    return report


def pool(paths: list[str]) -> int:
    """``--pool``: the report over the rounds of saved outputs (their JSON after the round
    lines), with each file's commit; 2 with a message for a file that holds no such output."""
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in STATES}
    commits = []
    for path in paths:
        try:
            text = Path(path).read_text()
            saved, _ = json.JSONDecoder().raw_decode(text[text.index("\n{") + 1 :])
            for state in STATES:
                runs[state].extend(saved["runs"][state])
            commits.append(saved["commit"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{path}: not the output of a toggle run ({exc})", file=sys.stderr)
            return 2
        if len({len(runs[state]) for state in STATES}) != 1:
            print(f"{path}: its states have different numbers of rounds", file=sys.stderr)
            return 2
    print(json.dumps({"commits": commits, "report": report_of(runs)}, indent=1))
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--pool":
        if len(argv) < 2:
            print("--pool needs the saved output of at least one run", file=sys.stderr)
            return 2
        return pool(argv[1:])
    commit = argv[0] if argv else "HEAD"
    rounds = count_arg(argv[1]) if len(argv) > 1 else 30
    if rounds < 1:
        print("ROUNDS must be a whole number >= 1", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in STATES}
    with tempfile.TemporaryDirectory(prefix="tunneld-toggle-") as tmp:
        toggled = Toggled(commit, Path(tmp))
        try:
            for state in STATES:  # warm up: imports, caches, the first connections
                toggled.burst(state)
            for i in range(rounds):
                order = STATES[i % 3 :] + STATES[: i % 3]
                for state in order:
                    r = toggled.burst(state)
                    runs[state].append(r)
                    print(
                        f"round {i} {state}: tunneld {r['tunneld_ns'] / 1000:.2f} us/request, "
                        f"{r['req_s']:.0f} req/s, load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
        finally:
            toggled.stack.close()
    print(json.dumps({"commit": commit, "runs": runs, "report": report_of(runs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
