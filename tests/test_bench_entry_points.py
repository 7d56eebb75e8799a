"""Every bench entry point docs/performance.md cites still runs: each test runs one for real (real
nginx, wrk, h2load, redis-server, valgrind, tunneld and agents on 127.0.0.1) with the smallest
parameters it accepts, and checks that the lines and JSON fields the docs quote are there and are
numbers, never how fast anything was (speed claims are ratios in docs/performance.md).

What makes the runs small: ``--repeat 1 --duration 1`` for ``python -m bench.e2e``;
``BENCH_DURATION=1`` (seconds per measurement of ``bench.e2e.ab`` and ``bench.e2e.cluster``);
``BENCH_BIG_FILE_MIB=8`` with ``BENCH_CACHE_DIR`` in a temp directory (the single-stream file is
4 GiB otherwise). Results go to ``--out`` in a temp directory: no test writes ``bench/results/``
(checked around every test). ``test_docs_cite_only_covered_entry_points`` fails when
docs/performance.md cites an entry point this file has no test for. ``make ensure-test-tools``
installs nginx, wrk, h2load and redis-server; valgrind comes from Debian's ``valgrind``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
NUM = r"-?[\d,]+(?:\.\d+)?"  # a figure as the bench prints it: 53,773 / 0.18 / 17.4

# entry point (as docs/performance.md spells it) -> the test below that runs it
COVERED = {
    "make bench": "test_make_bench_runs_the_e2e_head_of_line_and_transfer_scenarios",
    "make bench-quick": "test_make_bench_quick_runs_small_http_websocket_and_https",
    "make bench-micro": "test_make_bench_micro_runs_every_micro_benchmark_file",
    "python -m bench.e2e": "test_make_bench_quick_runs_small_http_websocket_and_https",
    "python -m bench.e2e.ab": "test_ab_compares_two_variants_of_a_commit",
    "python -m bench.e2e.instr": "test_instr_counts_instructions_per_request",
    "python -m bench.e2e.interleave": "test_interleave_compares_variants_running_at_once",
    "python -m bench.e2e.toggle": "test_toggle_switches_the_access_log_in_one_process",
    "python -m bench.e2e.cluster": "test_cluster_handover_and_workers",
    "python -m bench.store_load": "test_store_load_reports_load_time_and_rss",
    "bench/experiments/inplace_frame_parse.py": "test_experiment_inplace_frame_parse",
    "bench/experiments/pause_before_flush.py": "test_experiment_pause_before_flush",
}


def cited_entry_points(text: str) -> set[str]:
    """``python -m bench...`` commands, ``make bench...`` targets and bench/ scripts that exist."""
    cited = {f"python -m {m}" for m in re.findall(r"python -m (bench(?:\.\w+)*)", text)}
    cited |= {f"make {t}" for t in re.findall(r"\bmake (bench[\w-]*)", text)}
    cited |= {p for p in re.findall(r"bench/experiments/\w+\.py", text) if (ROOT / p).exists()}
    return cited


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(
        BENCH_CACHE_DIR=str(tmp_path_factory.mktemp("bench-cache")),
        BENCH_BIG_FILE_MIB="8",
        BENCH_DURATION="1",
    )
    return env


def _snapshot() -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in RESULTS.iterdir()}


@pytest.fixture(autouse=True)
def results_untouched() -> Iterator[None]:
    before = _snapshot()
    yield
    assert _snapshot() == before, "a bench run wrote bench/results/"


# program -> Debian package
PACKAGES = {
    "nginx": "nginx-light",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "redis-server": "redis-server",
    "valgrind": "valgrind",
    "callgrind_control": "valgrind",
}


def needs(*programs: str) -> None:
    """Fails (never skips) when a program the entry point runs is missing, saying what to do."""
    missing = [p for p in programs if not (shutil.which(p) or Path(f"/usr/sbin/{p}").exists())]
    packages = " ".join(sorted({PACKAGES.get(p, p) for p in missing}))
    assert not missing, f"missing {missing}: apt-get install -y {packages}"


def run(argv: list[str], env: dict[str, str], timeout: float = 150) -> str:
    """Runs an entry point from the repository root; its stdout, once it exited 0. Without this
    suite's pytest-xdist variables: pytest-benchmark turns itself off in an xdist worker (and
    then refuses --benchmark-only), which a `make bench-micro` typed in a shell never is."""
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST")}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"{argv} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    assert "FAILED" not in r.stdout, r.stdout
    return r.stdout


def make_line(target: str, module: str) -> str:
    """The command of ``make TARGET`` that runs ``module`` (what the Makefile would run)."""
    out = subprocess.run(
        ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    (line,) = [ln for ln in out.splitlines() if f"-m {module}" in ln]
    return line


def trailing_json(out: str) -> Any:
    """The JSON document ab, instr and cluster print last (``json.dumps(..., indent=1)``)."""
    lines = out.splitlines()
    return json.loads("\n".join(lines[lines.index("{") :]))


def number(value: Any) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    assert math.isfinite(value), value
    return float(value)


def positive(value: Any) -> float:
    v = number(value)
    assert v > 0, value
    return v


def md_row(md: str, scenario: str, metric: str, paths: int = 3) -> list[float]:
    """A row of the results table: the direct, tunnel (and nginx) figures and tunnel/direct."""
    figures = r" \| ".join([f"({NUM})"] * paths + ["-"] * (3 - paths) + [f"({NUM})"])
    m = re.search(rf"^\| {scenario} \| {re.escape(metric)} \| {figures} \|", md, re.M)
    assert m, f"no {scenario} {metric} row in:\n{md}"
    return [float(g.replace(",", "")) for g in m.groups()]


def e2e_results(out_dir: Path, tag: str) -> tuple[str, dict[str, Any]]:
    md = (out_dir / f"{tag}.md").read_text()
    payload = json.loads((out_dir / f"{tag}.json").read_text())
    return md, payload


def target_value(payload: dict[str, Any], label: str) -> float:
    (row,) = [t for t in payload["targets"] if t["target"] == label]
    assert row["verdict"] in ("pass", "MISS"), row
    return number(row["value"])


# -- the citations -------------------------------------------------------------------------------
def test_docs_cite_only_covered_entry_points() -> None:
    cited = cited_entry_points((ROOT / "docs" / "performance.md").read_text())
    assert {"python -m bench.e2e.ab", "make bench-quick"} <= cited  # the parser finds them
    assert cited <= COVERED.keys(), f"cited without a test here: {cited - COVERED.keys()}"
    assert all(callable(globals().get(name)) for name in COVERED.values())


# -- make targets and python -m bench.e2e ----------------------------------------------------------
def test_make_bench_micro_runs_every_micro_benchmark_file(tmp_path: Path) -> None:
    """``make bench-micro``'s command, one round per benchmark (its timings mean nothing here)."""
    line = make_line("bench-micro", "pytest")
    report = tmp_path / "micro.json"
    extra = "--benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off"
    run(["bash", "-c", f"{line} {extra} --benchmark-json={report}"], dict(os.environ))
    benchmarks = json.loads(report.read_text())["benchmarks"]
    files = {b["fullname"].split("::")[0] for b in benchmarks}
    micro = {str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "micro").glob("test_bench_*.py")}
    assert files == micro
    for b in benchmarks:
        positive(b["stats"]["mean"])


def test_make_bench_quick_runs_small_http_websocket_and_https(
    tmp_path: Path, bench_env: dict[str, str]
) -> None:
    """``make bench-quick``'s command (``--quick --tag quick``), three of its scenarios for 1 s:
    ``small_http`` and ``websocket`` (docs: ``--only small_http,websocket``) and ``https``
    (docs: ``--only https``), results in a temp ``--out``."""
    needs("nginx", "wrk", "h2load")
    line = make_line("bench-quick", "bench.e2e")
    only = "--only small_http,websocket,https --duration 1"
    stdout = run(["bash", "-c", f"{line} {only} --out {tmp_path}"], bench_env)
    assert f"results: {tmp_path / 'quick'}.md, .json" in stdout
    md, payload = e2e_results(tmp_path, "quick")
    assert payload["settings"]["repeat"] == 1 and payload["settings"]["duration"] == 1.0
    assert payload["settings"]["idle_ws"] == 2_000  # --quick
    for scenario, metric in (("small_http", "req_s (req/s)"), ("websocket", "msgs_per_s (msg/s)")):
        direct, tunnel, nginx, ratio = md_row(md, scenario, metric)
        assert min(direct, tunnel, nginx) > 0 and ratio > 0
    for metric in ("h1_req_s (req/s)", "h2_req_s (req/s)"):
        direct, tunnel, ratio = md_row(md, "https", metric, paths=2)
        assert min(direct, tunnel) > 0 and ratio > 0
    req_s = payload["scenarios"]["small_http"]["metrics"]["req_s"]
    assert req_s.keys() == {"direct", "tunnel", "nginx"}
    for v in req_s.values():
        positive(v)
    positive(target_value(payload, "small HTTP req/s ≥ 0.25 x direct"))
    positive(target_value(payload, "WebSocket msgs/s ≥ 0.50 x direct"))
    positive(target_value(payload, "tunneld RSS under small HTTP ≤ 60 MiB"))
    for proto in ("h1", "h2"):
        runs = payload["scenarios"]["https"]["runs"]["tunnel"]
        positive(runs[0][f"{proto}_tunneld_us"])


def test_make_bench_runs_the_e2e_head_of_line_and_transfer_scenarios(
    tmp_path: Path, bench_env: dict[str, str]
) -> None:
    """``make bench``'s end-to-end command with the docs' ``--only head_of_line,
    head_of_line_paced,single_download,bulk_download --repeat 1`` less ``head_of_line_paced``
    (``head_of_line``'s code with a paced reader; left out to keep this file near 2 minutes),
    0.5 s runs. Reduced: the single-stream file is 8 MiB, so the "loaded" head-of-line probe
    runs beside a download that ends early; the figures are there and are numbers, no more."""
    needs("nginx", "wrk", "h2load")
    line = make_line("bench", "bench.e2e")
    only = "--only head_of_line,single_download,bulk_download"
    run(["bash", "-c", f"{line} {only} --repeat 1 --duration 0.5 --out {tmp_path}"], bench_env)
    md, payload = e2e_results(tmp_path, "latest")  # the default --tag
    for scenario, metric in (
        ("head_of_line", "p99_ratio (x)"),
        ("single_download", "mib_per_s (MiB/s)"),
        ("bulk_download", "mib_s (MiB/s)"),
    ):
        figures = md_row(md, scenario, metric)
        assert min(figures) > 0, (scenario, figures)
    positive(target_value(payload, "head-of-line p99 loaded/alone ≤ 2"))
    positive(target_value(payload, "single-stream download ≥ 500 MiB/s"))
    positive(target_value(payload, "bulk download (1 MiB GETs) ≥ 0.30 x direct"))


# -- A/B, instructions, cluster ---------------------------------------------------------------
def test_ab_compares_two_variants_of_a_commit(bench_env: dict[str, str]) -> None:
    """``python -m bench.e2e.ab HEAD,HEAD+access,HEAD+access-quiet 1 small_http``: one round
    of each (docs: 8 rounds of two or three commits), 1 s per measurement; HEAD is ``git
    archive``d as any commit is. The access log's variants write what they say."""
    needs("nginx", "wrk")
    variants = ("HEAD", "HEAD+access", "HEAD+access-quiet")
    out = run([PY, "-m", "bench.e2e.ab", ",".join(variants), "1", "small_http"], bench_env)
    for variant in variants:
        m = re.search(rf"^round 0 {re.escape(variant)}: \{{'small_http': ({NUM}),", out, re.M)
        assert m and float(m.group(1)) > 0, out
    report = trailing_json(out)
    assert report["medians"].keys() == set(variants)
    for medians in report["medians"].values():
        for key in ("small_http", "small_http_tunneld_us", "small_http_agent_us"):
            positive(medians[key])
    # +access writes a line per request (wrk's, at least); +access-quiet none; off no count
    assert report["medians"]["HEAD+access"]["access_lines"] > 100
    assert report["medians"]["HEAD+access-quiet"]["access_lines"] == 0
    assert "access_lines" not in report["medians"]["HEAD"]


def test_instr_counts_instructions_per_request(bench_env: dict[str, str]) -> None:
    """``python -m bench.e2e.instr HEAD 10 --untimed --in-flight=2 --cache-sim``: tunneld and
    the agent under callgrind with its cache simulation, 10 counted requests (docs: 1,000-3,000;
    a callgrind run of two commits takes minutes), with collection off in timer callbacks and
    the time stamp (the run without ``--untimed`` is the same minus those options), two requests
    at a time, and their L1 misses (without ``--cache-sim``: the same minus that option and the
    misses). Reduced: one commit."""
    needs("nginx", "valgrind", "callgrind_control")
    argv = [PY, "-m", "bench.e2e.instr", "HEAD", "10", "--untimed", "--in-flight=2", "--cache-sim"]
    out = run(argv, bench_env)
    m = re.search(rf"^HEAD: instructions per request: tunneld ({NUM}), agent ({NUM})$", out, re.M)
    assert m, out
    m = re.search(
        rf"^HEAD: L1 misses per request: tunneld I1 ({NUM}), D1 ({NUM}); "
        rf"agent I1 ({NUM}), D1 ({NUM})$",
        out,
        re.M,
    )
    assert m, out
    report = trailing_json(out)
    for name in ("tunneld", "agent"):
        assert positive(report["HEAD"][name]["ir"]) > 1000  # a request is ~10^5 instructions
        assert number(report["HEAD"][name]["ratio"]) == 1.0
        for misses in ("I1", "D1"):  # an L1 miss per ~50-100 instructions of Python
            assert (
                10
                < positive(report["HEAD"][f"{name} {misses}"]["count"])
                < report["HEAD"][name]["ir"]
            )


def test_interleave_compares_variants_running_at_once(bench_env: dict[str, str]) -> None:
    """``python -m bench.e2e.interleave HEAD,HEAD+access 2``: both stacks at once, two rounds of
    1 s bursts (docs: 20 rounds of three variants); tunneld's CPU per request of each, and the
    median of the rounds' ratios to the first variant with its quartiles."""
    needs("nginx", "wrk")
    out = run([PY, "-m", "bench.e2e.interleave", "HEAD,HEAD+access", "2"], bench_env)
    for i in range(2):
        for variant in ("HEAD", "HEAD+access"):
            pattern = rf"^round {i} {re.escape(variant)}: tunneld ({NUM}) us/request, ({NUM}) req/s"
            m = re.search(pattern, out, re.M)
            assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    report = trailing_json(out)["report"]
    assert report["HEAD"]["cpu_ratio"] == 1.0 and report["HEAD"]["errors"] == 0
    on = report["HEAD+access"]
    assert number(on["cpu_ratio_q1"]) <= number(on["cpu_ratio"]) <= number(on["cpu_ratio_q3"])
    positive(on["tunneld_us_per_request"])


def test_toggle_switches_the_access_log_in_one_process(bench_env: dict[str, str]) -> None:
    """``python -m bench.e2e.toggle HEAD 1``: one stack, the access log switched by SIGHUP
    between 1 s bursts (docs: 30 rounds); off, on and off again, each with tunneld's CPU per
    request, and the ratios to ``off`` with quartiles and a bootstrap interval. The bench itself
    fails when an ``on`` burst wrote fewer access lines than requests or an ``off`` burst any."""
    needs("nginx", "wrk")
    out = run([PY, "-m", "bench.e2e.toggle", "HEAD", "1"], bench_env)
    for state in ("off", "on", "off2"):
        m = re.search(rf"^round 0 {state}: tunneld ({NUM}) us/request, ({NUM}) req/s", out, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out
    report = trailing_json(out)["report"]
    assert report["off"]["cpu_ratio"] == 1.0 and report["off"]["errors"] == 0
    for state in ("on", "off2"):
        r = report[state]
        assert (
            number(r["cpu_ratio_95_low"])
            <= number(r["cpu_ratio"])
            <= number(r["cpu_ratio_95_high"])
        )
        positive(r["tunneld_us_per_request"])


@pytest.mark.parametrize(
    "argv",
    [
        ["bench.e2e.ab", "HEAD", "four"],
        ["bench.e2e.interleave", "HEAD,HEAD+access", "x"],
        ["bench.e2e.toggle", "HEAD", "1.5"],
        ["bench.e2e.instr", "HEAD", "many"],
        ["bench.e2e.instr", "HEAD", "5", "--in-flight=x"],
        ["bench.e2e.cluster", "x"],
    ],
    ids=["ab", "interleave", "toggle", "instr", "instr-in-flight", "cluster"],
)
def test_a_count_that_is_no_whole_number_is_a_usage_error(
    argv: list[str], bench_env: dict[str, str]
) -> None:
    """ROUNDS, N and --in-flight=N given as no whole number: exit 2 with the bench's one usage
    line, before anything starts (no traceback)."""
    env = {k: v for k, v in bench_env.items() if not k.startswith("PYTEST_XDIST")}
    r = subprocess.run(
        [PY, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_cluster_handover_and_workers(bench_env: dict[str, str]) -> None:
    """``python -m bench.e2e.cluster 1 handover,workers``: one round, 1 s per wrk run (docs:
    ``5``, i.e. landing and workers, and ``3 handover``, 3 s runs). Reduced: ``forwarded``, the
    other half of ``landing`` (the same ``_landing`` with node B's ``TUNNELD_HANDOVER=false``), is
    left out to keep this file near 2 minutes."""
    needs("nginx", "wrk", "redis-server")
    out = run([PY, "-m", "bench.e2e.cluster", "1", "handover,workers"], bench_env)
    for name in ("small_http", "churn"):
        pattern = (
            rf"^round 0 handover {name}: owner ({NUM}) req/s, via B ({NUM}) req/s, "
            rf"ratio ({NUM}); CPU us/request: .* total CPU ratio ({NUM}) "
        )
        assert re.search(pattern, out, re.M), out
    assert re.search(rf"^round 0 --workers 2: ({NUM}) req/s over 4 sandboxes \(", out, re.M), out
    medians = trailing_json(out)["medians"]
    for name in ("small_http", "churn"):
        positive(medians[f"handover_{name}"])
        positive(medians[f"handover_{name}_cpu_ratio"])
    positive(medians["workers_2_over_1"])


def test_cluster_instr_counts_the_hand_over(bench_env: dict[str, str]) -> None:
    """``python -m bench.e2e.cluster 1 instr``: both nodes under callgrind, 100 sequential churn
    requests landing on A, then on B (docs: ``5 instr``, 500). Reduced: ``BENCH_INSTR_CONNS=1``
    leaves out the 16-connection phases (10 s of wrk each under callgrind; shorter runs counted
    0 requests on this loaded machine); their code differs only in driving wrk."""
    needs("nginx", "redis-server", "valgrind", "callgrind_control")
    out = run(
        [PY, "-m", "bench.e2e.cluster", "1", "instr"], {**bench_env, "BENCH_INSTR_CONNS": "1"}
    )
    pattern = (
        rf"^instructions per churn request, 1 connection\(s\): owner-landed: A ({NUM}); "
        rf"handed over: landing B ({NUM}) \+ owner A ({NUM}) = ({NUM}), ({NUM}) x owner-landed$"
    )
    assert re.search(pattern, out, re.M), out
    medians = trailing_json(out)["medians"]
    assert {k for k in medians if k.startswith("instr_")} == {
        "instr_c1_owner",
        "instr_c1_landing",
        "instr_c1_adopting",
    }
    for part in ("owner", "landing", "adopting"):
        assert positive(medians[f"instr_c1_{part}"]) > 1000  # a request is ~10^5 instructions


def test_entry_points_refuse_arguments_they_cannot_run(bench_env: dict[str, str]) -> None:
    """A misspelt scenario, metric or part is refused (exit 2) instead of measuring nothing."""
    for argv, says in (
        (["bench.e2e", "--only", "small_htp"], "unknown scenario 'small_htp'"),
        (["bench.e2e.ab", "HEAD,HEAD", "1", "small_htp"], "unknown metric(s) ['small_htp']"),
        (["bench.e2e.cluster", "1", "handvoer"], "unknown part(s) ['handvoer']"),
        (["bench.e2e.cluster", "0"], "ROUNDS < 1"),
        (["bench.e2e.instr"], "python -m bench.e2e.instr COMMIT[,COMMIT...] [REQUESTS]"),
        (["bench.e2e.ab"], "python -m bench.e2e.ab COMMIT,COMMIT [ROUNDS"),
    ):
        r = subprocess.run(
            [PY, "-m", *argv], cwd=ROOT, env=bench_env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert says in r.stdout + r.stderr, (argv, r.stdout, r.stderr)


# -- the rest --------------------------------------------------------------------------------------
def test_store_load_reports_load_time_and_rss(bench_env: dict[str, str]) -> None:
    """``python -m bench.store_load`` with 100 exposures over 20 sandboxes and one run (docs:
    100,000 over 10,000, 3 runs): a real ``tunneld serve`` on the filled and an empty store."""
    argv = [PY, "-m", "bench.store_load", "--sandboxes", "20", "--per-sandbox", "5", "--runs", "1"]
    report = json.loads(run(argv, bench_env))
    assert report["exposures"] == 100 and len(report["runs"]) == 1
    best = report["best"]
    assert best["loaded"]["exposures"] == 100 and best["baseline"]["exposures"] == 0
    for side in ("loaded", "baseline"):
        number(best[side]["load_s"])
        positive(best[side]["ready_s"])
        positive(best[side]["rss_mib"])
    number(report["extra_ready_s"])
    number(report["extra_rss_mib"])
    number(report["db_mib"])  # 0.0 (MiB, one decimal) for 100 exposures


def test_experiment_inplace_frame_parse(bench_env: dict[str, str]) -> None:
    """``python -m bench.experiments.inplace_frame_parse 4``: 4 MiB per reader (docs: 64)."""
    out = run([PY, "-m", "bench.experiments.inplace_frame_parse", "4"], bench_env)
    for frames, reads in ((65536, 262144), (100, 65536)):
        pattern = (
            rf"^{frames} B frames in {reads} B reads: FrameReader ({NUM}) ms, "
            rf"InPlaceReader ({NUM}) ms$"
        )
        m = re.search(pattern, out, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, out


def test_experiment_pause_before_flush(bench_env: dict[str, str]) -> None:
    """``python -m bench.experiments.pause_before_flush 0.5``: each upload for 0.5 s (docs: 2)."""
    needs("nginx")
    out = run([PY, "-m", "bench.experiments.pause_before_flush", "0.5"], bench_env, timeout=60)
    pattern = (
        rf"^flush-then-pause \(old\): ({NUM}) MiB in 0.5 s; pause-then-flush \(now\): ({NUM}) MiB$"
    )
    m = re.search(pattern, out, re.M)
    assert m, out
    assert float(m.group(2)) > 0  # the fixed order uploads
