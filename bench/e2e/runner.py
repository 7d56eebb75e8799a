"""Runs the scenarios, checks the targets of issues 4 and 7, writes Markdown + JSON (+ PNG)
results."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .scenarios import SCENARIOS, Result, Settings
from .stack import ROOT, Stack, ensure_tools, find_nginx

RESULTS = ROOT / "bench" / "results"
MIB = 2**20

# (label, scenario, metric, how, threshold). how: "ratio" tunnel/direct >= t, "min" tunnel >= t,
# "max" tunnel <= t, "max_mem" peak RSS (MiB) <= t for one process.
TARGETS: list[tuple[str, str, str, str, float]] = [
    ("small HTTP req/s ≥ 0.25 x direct", "small_http", "req_s", "ratio", 0.25),
    ("small HTTP p99 ≤ 10 ms", "small_http", "p99", "max", 10.0),
    ("bulk download (1 MiB GETs) ≥ 0.30 x direct", "bulk_download", "mib_s", "ratio", 0.30),
    ("single-stream download ≥ 500 MiB/s", "single_download", "mib_per_s", "min", 500.0),
    ("bulk upload (1 MiB POSTs) ≥ 0.30 x direct", "bulk_upload", "mib_s", "ratio", 0.30),
    ("single-stream upload ≥ 500 MiB/s", "single_upload", "mib_per_s", "min", 500.0),
    ("WebSocket msgs/s ≥ 0.50 x direct", "websocket", "msgs_per_s", "ratio", 0.50),
    ("churn req/s ≥ 0.20 x direct", "churn", "req_s", "ratio", 0.20),
    ("head-of-line p99 loaded/alone ≤ 2", "head_of_line", "p99_ratio", "max", 2.0),
    (
        "(diagnostic) head-of-line, bulk paced at 200 MiB/s ≤ 2",
        "head_of_line_paced",
        "p99_ratio",
        "max",
        2.0,
    ),
    (
        "idle WebSocket ≤ 10 KiB each (tunneld+agent)",
        "idle_websockets",
        "bytes_per_conn",
        "max",
        10240.0,
    ),
    ("tunneld RSS under small HTTP ≤ 60 MiB", "small_http", "tunneld", "max_mem", 60.0),
    ("agent RSS under small HTTP ≤ 60 MiB", "small_http", "agent", "max_mem", 60.0),
    # issue 7: isolation
    (
        "200 stalled readers: same sandbox small GET p99 ≤ 100 ms",
        "stalled_readers",
        "p99_loaded",
        "max",
        100.0,
    ),
    ("hostile-agent floods: other sandbox p99 ≤ 50 ms", "hostile_flood", "p99", "max", 50.0),
    (
        "hostile-agent floods: tunneld RSS growth ≤ 64 MiB",
        "hostile_flood",
        "rss_growth_mib",
        "max",
        64.0,
    ),
]

_HOL = [("p99_alone", "ms"), ("p99_loaded", "ms"), ("p99_ratio", "x"), ("bulk_mib_s", "MiB/s")]
# What each scenario's headline metrics are, with units, for the table.
SHOWN: dict[str, list[tuple[str, str]]] = {
    "small_http": [("req_s", "req/s"), ("p50", "ms"), ("p99", "ms")],
    "bulk_download": [("mib_s", "MiB/s"), ("p99", "ms")],
    "single_download": [("mib_per_s", "MiB/s")],
    "bulk_upload": [("mib_s", "MiB/s")],
    "single_upload": [("mib_per_s", "MiB/s")],
    "websocket": [("msgs_per_s", "msg/s"), ("p50", "ms"), ("p99", "ms")],
    "churn": [("req_s", "req/s"), ("p99", "ms")],
    "https": [("h1_req_s", "req/s"), ("h1_p99", "ms"), ("h1_cpu_us", "us/req"),
              ("h1_tunneld_us", "us/req"), ("h2_req_s", "req/s"), ("h2_mean_ms", "ms"),
              ("h2_cpu_us", "us/req"), ("h2_tunneld_us", "us/req")],
    "head_of_line": _HOL,
    "head_of_line_paced": _HOL,
    "idle_websockets": [("bytes_per_conn", "B/conn"), ("tunneld_bytes_per_conn", "B/conn"),
                        ("agent_bytes_per_conn", "B/conn"), ("conns", "conns")],
    "many_agents": [("tunneld_bytes_per_agent", "B/agent"),
                    ("agent_process_bytes_per_agent", "B/agent"), ("agents", "agents")],
    "hostile_flood": [("p99", "ms"), ("p50", "ms"), ("p99_alone", "ms"), ("errors", "errors"),
                      ("rss_growth_mib", "MiB"), ("ping_mib_sent", "MiB"),
                      ("list_mib_sent", "MiB"), ("wsping_mib_sent", "MiB")],
    "stalled_readers": [("p99_loaded", "ms"), ("p50_loaded", "ms"), ("p99_alone", "ms"),
                        ("p50_alone", "ms"), ("p99_ratio", "x"), ("p99_filling", "ms"),
                        ("max_filling", "ms"), ("settle_s", "s"), ("stalled_ok", "conns"),
                        ("errors", "errors")],
}  # fmt: skip


def system_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def out(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": out([find_nginx(), "-v"]),
        "wrk": out(["wrk", "-v"]),
        "h2load": out(["h2load", "--version"]),
        "git": out(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
        "loadavg_start": os.getloadavg(),
    }


def evaluate(results: dict[str, Result]) -> list[dict[str, Any]]:
    rows = []
    for label, scen, metric, how, threshold in TARGETS:
        r = results.get(scen)
        value: float | None = None
        if r is not None:
            if how == "max_mem":
                value = r.memory.get(metric, 0) / MIB if metric in r.memory else None
            else:
                m = r.metrics.get(metric, {})
                if how == "ratio" and m.get("direct"):
                    value = m.get("tunnel", 0.0) / m["direct"]
                elif how != "ratio":
                    value = m.get("tunnel")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            verdict = "n/a"
        elif how in ("ratio", "min"):
            verdict = "pass" if value >= threshold else "MISS"
        else:
            verdict = "pass" if value <= threshold else "MISS"
        rows.append({"target": label, "value": value, "threshold": threshold, "verdict": verdict})
    return rows


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(info: dict[str, Any], settings: Settings, results: dict[str, Result],
             verdicts: list[dict[str, Any]], elapsed: float) -> str:  # fmt: skip
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M')} · {info['cpu_model']} · {info['cores']} cores · "
        f"Linux {info['kernel']} · Python {info['python']} · {info['nginx']} · {info['wrk']} · "
        f"{info.get('h2load', '?')} · "
        f"git {info['git']} · {settings.duration:g} s per run, median of {settings.repeat} · "
        f"total {elapsed:.0f} s",
        "",
        "| scenario | metric | direct | tunnel | nginx proxy | tunnel/direct | tunnel/nginx |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for metric, unit in SHOWN.get(name, []):
            m = r.metrics.get(metric)
            if not m:
                continue
            d, t, n = m.get("direct"), m.get("tunnel"), m.get("nginx")
            rd = _fmt(t / d) if t is not None and d else "-"
            rn = _fmt(t / n) if t is not None and n else "-"
            lines.append(
                f"| {name} | {metric} ({unit}) | {_fmt(d)} | {_fmt(t)} | {_fmt(n)} | {rd} | {rn} |"
            )
    mem_rows = [(n, r) for n, r in results.items() if r.memory]
    if mem_rows:
        lines += [
            "",
            "| scenario | tunneld peak RSS (MiB) | agent peak RSS (MiB) "
            "| tunneld CPU | agent CPU |",
            "|---|---:|---:|---:|---:|",
        ]
        for n, r in mem_rows:
            mem, cpu = r.memory, r.cpu
            lines.append(
                f"| {n} | {mem.get('tunneld', 0) / MIB:.1f} | {mem.get('agent', 0) / MIB:.1f}"
                f" | {cpu.get('tunneld', 0):.0%} | {cpu.get('agent', 0):.0%} |"
            )
    lines += ["", "| target | measured | verdict |", "|---|---:|---|"]
    for v in verdicts:
        lines.append(f"| {v['target']} | {_fmt(v['value'])} | {v['verdict']} |")
    notes = [f"{n}: {x}" for n, r in results.items() for x in r.notes]
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, tunnel, nginx = [], [], []
    for name, r in results.items():
        for metric, _ in SHOWN.get(name, [])[:1]:
            m = r.metrics.get(metric, {})
            if m.get("direct") and m.get("tunnel") is not None:
                labels.append(f"{name}\n{metric}")
                tunnel.append(m["tunnel"] / m["direct"])
                nginx.append(m.get("nginx", 0) / m["direct"])
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], tunnel, 0.4, label="tunneld (2 hops)")
    ax.bar([x + 0.2 for x in xs], nginx, 0.4, label="nginx proxy (1 hop)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("x direct (higher is better; latency rows: lower)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    ap.add_argument(
        "--quick", action="store_true", help="each scenario once, 2 s, fewer idle conns"
    )
    ap.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--repeat", type=int)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--parser", choices=["auto", "httptools", "h11"], default="auto")
    ap.add_argument("--install", action="store_true", help="apt-get install missing tools")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--tag", default="latest", help="results file name stem")
    args = ap.parse_args(argv)

    ensure_tools(args.install or os.environ.get("BENCH_INSTALL") == "1")
    settings = Settings()
    if args.quick:
        settings = Settings(duration=2.0, repeat=1, idle_ws=2_000, agents=200, flood_s=4.0)
    if args.duration:
        settings.duration = args.duration
    if args.repeat:
        settings.repeat = args.repeat
    names = list(SCENARIOS) if not args.only else args.only.split(",")
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"unknown scenario {n!r}")

    info = system_info()
    print(f"# tunneld end-to-end bench: {info['cpu_model']}, {info['cores']} cores", flush=True)
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack's processes too
    stack = Stack(loop=args.loop, parser=args.parser).start()
    results: dict[str, Result] = {}
    failed: list[str] = []
    try:
        for n in names:
            ts = time.perf_counter()
            print(f"## {n} ...", end=" ", flush=True)
            try:
                results[n] = SCENARIOS[n](stack, settings)
            except Exception as exc:
                print(f"FAILED: {exc!r}", flush=True)
                failed.append(n)
                continue
            summary = ", ".join(
                f"{k} {'/'.join(_fmt(v.get(p)) for p in ('direct', 'tunnel', 'nginx') if p in v)}"
                for k, _ in SHOWN.get(n, [])
                for v in [results[n].metrics.get(k, {})]
                if v
            )
            print(f"{time.perf_counter() - ts:.0f} s: {summary}", flush=True)
    finally:
        stack.close()
    elapsed = time.perf_counter() - t0
    verdicts = evaluate(results)
    md = markdown(info, settings, results, verdicts, elapsed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.md").write_text(md)
    payload = {
        "system": info,
        "settings": asdict(settings),
        "loop": args.loop,
        "parser": args.parser,
        "elapsed_s": elapsed,
        "targets": verdicts,
        "scenarios": {n: asdict(r) for n, r in results.items()},
    }
    (args.out / f"{args.tag}.json").write_text(json.dumps(payload, indent=1, default=str))
    png = chart(results, args.out / f"{args.tag}.png")
    print()
    print(md)
    print(
        f"results: {args.out / args.tag}.md, .json"
        + (", .png" if png else " (no matplotlib: no PNG)")
    )
    if failed:  # the results are written, but a scenario that broke must not pass for a run
        print(f"failed scenarios: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
