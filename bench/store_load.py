"""Start-up with a big state directory (issue 8, acceptance 4): ``python -m bench.store_load``.

Fills a state directory with 100,000 exposures over 10,000 sandboxes (10 each, 12-character
names, generated tokens), then starts a real ``tunneld serve`` on it and on an empty one (the
baseline, same run) and reports, for each: seconds from spawn to listening (the ports file),
the load time tunneld logs (read + check + install every record), and RSS once listening.
The difference is what the stored exposures cost. Target: load under 2 s, under 100 MiB extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.hostnames import generate_token
from tunneld.store import SqliteStore, StoredExposure

BIN = Path(sys.executable).parent


def fill(state_dir: Path, sandboxes: int, per_sandbox: int) -> float:
    started = time.perf_counter()
    store = SqliteStore.open(state_dir)
    try:
        now = time.time()
        store.import_now(
            (
                StoredExposure(
                    f"sandbox-{s:05d}", 2000 + p, generate_token(), f"service-{p:04d}", now
                )
                for s in range(sandboxes)
                for p in range(per_sandbox)
            ),
            replace=True,
        )
    finally:
        store.close_now()
    return time.perf_counter() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(state_dir: Path, work: Path) -> dict[str, float]:
    ports = work / f"ports-{secrets.token_hex(4)}.json"
    log = work / f"log-{ports.stem}.txt"
    env = dict(os.environ, TUNNELD_ADMIN_TOKEN="bench", TUNNELD_SECRET="bench")
    argv = [
        str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
        "--admin-port", "0", "--ports-file", str(ports), "--state-dir", str(state_dir),
    ]  # fmt: skip
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = t0 + 60
        while not ports.exists():
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(log.read_text())
            time.sleep(0.005)
        ready = time.perf_counter() - t0
        time.sleep(0.5)  # let the allocator settle
        rss = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    match = re.search(
        r"loaded (\d+) exposures of (\d+) sandboxes .* in ([0-9.]+)s", log.read_text()
    )
    assert match, log.read_text()
    return {
        "exposures": int(match[1]),
        "ready_s": round(ready, 3),
        "load_s": float(match[3]),
        "rss_mib": round(rss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=10_000)
    parser.add_argument("--per-sandbox", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-load-") as tmp:
        work = Path(tmp)
        empty, full = work / "empty", work / "full"
        fill_s = fill(full, args.sandboxes, args.per_sandbox)
        SqliteStore.open(empty).close_now()
        size = (full / "exposures.db").stat().st_size
        results = []
        for _ in range(args.runs):
            results.append({"baseline": start(empty, work), "loaded": start(full, work)})
    best = min(results, key=lambda r: r["loaded"]["ready_s"])
    report = {
        "exposures": args.sandboxes * args.per_sandbox,
        "sandboxes": args.sandboxes,
        "db_mib": round(size / 2**20, 1),
        "fill_s": round(fill_s, 2),
        "runs": results,
        "best": best,
        "extra_ready_s": round(best["loaded"]["ready_s"] - best["baseline"]["ready_s"], 3),
        "extra_rss_mib": round(best["loaded"]["rss_mib"] - best["baseline"]["rss_mib"], 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
