"""A/B of the tunnel across commits, in one run:
``python -m bench.e2e.ab COMMIT,COMMIT [ROUNDS [small_http,churn,websocket,single_download]]``
(``COMMIT+access``: that commit with the access log on, every request's line written to
tunneld's log file at info level; ``COMMIT+access-quiet``: on, but the log level drops the
lines, as ``bench.e2e.instr`` names them)

For each commit, ``git archive`` of protocol/ relay/ agent/ tunneld/ goes to a temp dir (its
optional C extension compiled in place: ``build_speedups``) that is put first on PYTHONPATH for
tunneld and the agent (the bench code, nginx origin and load stay the same); the commits
alternate, ``ROUNDS`` times, each on a fresh ``Stack``. Each run measures the direct baseline
and the tunnel back to back and prints tunnel/direct for small HTTP (wrk, 1 KiB, 50 connections),
churn (the same with ``Connection: close``), WebSocket echo (100 connections)
and one download, then the medians. On a shared machine a figure from another day mixes code and
machine; this compares code only (issue 7 used it for the "did not drop by more than 5 %"
check). Needs the commits' CLIs to accept the bench's flags. ``BENCH_DURATION``: seconds per
measurement (3).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .scenarios import run_loadgen, wrk
from .stack import ROOT, Stack, cpu_seconds

METRICS = ("small_http", "churn", "websocket", "single_download")
# seconds per measurement; BENCH_DURATION shortens it (tests/test_bench_entry_points.py)
DURATION = float(os.environ.get("BENCH_DURATION", "3"))


def count_arg(text: str) -> int:
    """A count given on the command line (ROUNDS, N); 0 when ``text`` is no whole number, which
    every caller's ``< 1`` check refuses with its usage line (exit 2, no traceback)."""
    try:
        return int(text)
    except ValueError:
        return 0


def tree(commit: str, base: Path) -> Path:
    d = base / commit
    if not d.exists():
        d.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "protocol", "relay", "agent", "tunneld"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(d)], input=archive, check=True)
        build_speedups(d)
    return d


def build_speedups(d: Path) -> None:
    """Compile the tree's optional C extension (tunneld/_speedups.c, from the commits that have
    it) in place, as ``pip install`` does from setup.py, so the run measures it and not the
    pure-Python fallback."""
    source = d / "tunneld" / "_speedups.c"
    if not source.exists():
        return
    target = source.with_name("_speedups" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(
        [
            *sysconfig.get_config_var("CC").split(),
            "-shared",
            "-fPIC",
            "-O2",
            f"-I{sysconfig.get_paths()['include']}",
            str(source),
            "-o",
            str(target),
        ],
        check=True,
    )


@contextlib.contextmanager
def variant_env(variant: str, base: Path) -> Iterator[tuple[str, ...]]:
    """While a variant's stack starts and runs: ``COMMIT``'s tree (under ``base``) first on
    PYTHONPATH, and with ``+access`` or ``+access-quiet`` the access log on; yields tunneld's
    extra arguments. The bench's tunneld logs at warning: with the access log on its lines are
    written only at info (``+access``), else the level drops them (``+access-quiet``)."""
    commit, _, kind = variant.partition("+")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "TUNNELD_ACCESS_LOG")}
    os.environ["PYTHONPATH"] = str(tree(commit, base))
    if kind.startswith("access"):
        os.environ["TUNNELD_ACCESS_LOG"] = "true"
    try:
        yield ("--log-level", "info") if kind == "access" else ()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def one_run(metrics: list[str], tunneld_args: tuple[str, ...] = ()) -> dict[str, float]:
    stack = Stack(tunneld_args=tunneld_args).start()
    try:
        out: dict[str, float] = {}
        (dp, dh), (tp, th) = stack.targets()["direct"], stack.targets()["tunnel"]
        if "small_http" in metrics:
            d = wrk(dp, dh, "/1k", 50, DURATION)["req_s"]
            pids = stack.relay_pids()
            before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
            run = wrk(tp, th, "/1k", 50, DURATION)
            out["small_http"] = run["req_s"] / d
            # CPU time per request of each tunnel process: far steadier than req/s on a shared
            # machine (another process's load slows the run but hardly changes the CPU each
            # request costs), so a few percent of code cost shows up in a few rounds.
            for k, v in pids.items():
                spent = sum(cpu_seconds(p) for p in v) - before[k]
                out[f"small_http_{k}_us"] = spent / max(run["requests"], 1) * 1e6
        if "churn" in metrics:
            d, t = (
                wrk(p, h, "/1k", 50, DURATION, headers=("Connection: close",))["req_s"]
                for p, h in ((dp, dh), (tp, th))
            )
            out["churn"] = t / d
        if "single_download" in metrics:
            d, t = (
                run_loadgen("download", p, h, path="/big", duration=DURATION)["mib_per_s"]
                for p, h in ((dp, dh), (tp, th))
            )
            out["single_download"] = t / d
            out["single_download_mib_s"] = t
        if "websocket" in metrics:
            (dp, dh), (tp, th) = stack.targets("ws")["direct"], stack.targets("ws")["tunnel"]
            d, t = (
                run_loadgen("ws", p, h, conns=100, duration=DURATION, warmup=1)["msgs_per_s"]
                for p, h in ((dp, dh), (tp, th))
            )
            out["websocket"] = t / d
        if os.environ.get("TUNNELD_ACCESS_LOG") and stack.tunneld is not None:
            # what the access log wrote (0 when the level drops its lines): the run logged
            # what its name says (lines leave 50 ms after the first; a scenario ran since)
            time.sleep(0.2)
            out["access_lines"] = stack.tunneld.log.read_bytes().count(b" tunneld.access: ")
        return out
    finally:
        stack.close()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    commits = argv[0].split(",")
    rounds = count_arg(argv[1]) if len(argv) > 1 else 4
    metrics = ["small_http", "websocket", "single_download"]
    if len(argv) > 2:
        metrics = argv[2].split(",")
    unknown = [m for m in metrics if m not in METRICS]
    if rounds < 1 or unknown:  # one_run() skips what it does not know: nothing would be measured
        print(
            f"unknown metric(s) {unknown} or ROUNDS < 1; metrics: {','.join(METRICS)}",
            file=sys.stderr,
        )
        return 2
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in commits}
    with tempfile.TemporaryDirectory(prefix="tunneld-ab-") as tmp:
        for i in range(rounds):
            for c in commits:
                with variant_env(c, Path(tmp)) as tunneld_args:
                    r = one_run(metrics, tunneld_args)
                runs[c].append(r)
                shown = {k: round(v, 3) for k, v in r.items()}
                print(f"round {i} {c}: {shown} load {os.getloadavg()[0]:.1f}", flush=True)
    medians = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    print(json.dumps({"runs": runs, "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
