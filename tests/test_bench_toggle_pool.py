"""``python -m bench.e2e.toggle --pool OUT...`` (bench/e2e/toggle.py): the report over the
rounds of several saved runs, pooled; a file that is no run's output is refused with a message
and exit status 2. Saved outputs made here, with known ratios; the real runs are
tests/test_bench_entry_points.py's."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _saved(path: Path, commit: str, on: list[float], off2: list[float]) -> None:
    """A run's stdout: its round lines, then its JSON (off bursts at 10 us each)."""
    runs = {
        "off": [{"tunneld_ns": 10_000.0, "req_s": 100.0, "errors": 0} for _ in on],
        "on": [{"tunneld_ns": 10_000.0 * r, "req_s": 90.0, "errors": 0} for r in on],
        "off2": [{"tunneld_ns": 10_000.0 * r, "req_s": 100.0, "errors": 0} for r in off2],
    }
    rounds = "".join(f"round {i} on: tunneld 10.00 us/request\n" for i in range(len(on)))
    path.write_text(rounds + json.dumps({"commit": commit, "runs": runs, "report": {}}, indent=1))


def _pool(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.e2e.toggle", "--pool", *map(str, paths)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_rounds_of_several_runs_are_pooled(tmp_path: Path) -> None:
    a, b = tmp_path / "a.out", tmp_path / "b.out"
    on_a, on_b = [1.0, 1.2, 1.1], [1.3, 1.25, 1.4, 1.35]  # medians 1.1 and 1.325; pooled 1.25
    _saved(a, "abc1234", on_a, [1.0, 0.98, 1.01])
    _saved(b, "def5678", on_b, [1.02, 1.0, 0.99, 1.0])
    done = _pool(a, b)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["commits"] == ["abc1234", "def5678"]
    on = out["report"]["on"]
    assert on["cpu_ratio"] == statistics.median(on_a + on_b)  # all seven rounds, not per run
    assert on["cpu_ratio_95_low"] <= on["cpu_ratio"] <= on["cpu_ratio_95_high"]
    assert out["report"]["off2"]["cpu_ratio"] == statistics.median(
        [1.0, 0.98, 1.01, 1.02, 1.0, 0.99, 1.0]
    )
    assert out["report"]["off"]["cpu_ratio"] == 1.0


def test_a_file_that_is_no_run_s_output_is_refused(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.out", tmp_path / "bad.out"
    _saved(good, "abc1234", [1.1], [1.0])
    bad.write_text("round 0 on: tunneld 10.00 us/request\nTraceback (most recent call last):\n")
    done = _pool(good, bad)
    assert done.returncode == 2 and done.stdout == ""
    assert "bad.out: not the output of a toggle run" in done.stderr
    missing = _pool(tmp_path / "none.out")
    assert missing.returncode == 2 and "none.out: not the output of a toggle run" in missing.stderr
    empty = _pool()
    assert empty.returncode == 2 and "--pool needs" in empty.stderr
