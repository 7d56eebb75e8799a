"""What the agent costs in a sandbox (issue 10): ``python -m bench.agent_footprint``.

Builds ``tunnel-agent.pyz`` (tools/build_agent.py, as ``make agent``) into a temp directory, starts
a real ``tunneld serve`` on loopback, and starts the agent against it, one variant at a time:

- ``pyz-stdlib``: ``python -I -S tunnel-agent.pyz run``: nothing but the standard library (the
  orjson stand-in, asyncio's own loop), as in a sandbox image with a bare python3;
- ``pyz-compiled``: ``python -I tunnel-agent.pyz run`` with this venv's site-packages visible, so
  the real orjson and uvloop are used (h11 and wsproto still come from the archive);
- ``installed``: the venv's ``tunnel-agent`` entry point (a pip install), the baseline.

For each: seconds from spawn to connected (the local API's ``/v1/status``), then RSS (VmRSS of
``/proc/PID/status``) after 2 s connected and idle, median of ``--runs``. It also times the one
JSON document the agent parses per preview request (the stream's open metadata) and one control
message it writes, with orjson and with the stand-in. Prints JSON; docs/agent.md quotes it.
Not run by the tests (timings); run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SANDBOX = "footprint"
IDLE_S = 2.0


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} did not appear: {log.read_text(errors='replace')}")
        time.sleep(0.01)
    return json.loads(path.read_text())


def connected(api_port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/status", timeout=5) as answer:
        return bool(json.load(answer)["connected"])


def measure(argv: list[str], env: dict[str, str], work: Path) -> dict[str, float]:
    tag = secrets.token_hex(4)
    ports, log = work / f"agent-{tag}.json", work / f"agent-{tag}.log"
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, env=dict(env, TUNNEL_AGENT_PORTS_FILE=str(ports)), stdout=out, stderr=out
        )
    try:
        api_port = wait_file(ports, proc, log)["api"]
        deadline = time.monotonic() + 30
        while not connected(api_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not connect: {log.read_text(errors='replace')}")
            time.sleep(0.01)
        ready = time.perf_counter() - t0
        time.sleep(IDLE_S)  # the measurement itself: RSS once connected and idle
        rss = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return {"connected_s": round(ready, 3), "rss_mib": round(rss / 1024, 1)}


def json_cost(fallback: Any) -> dict[str, float]:
    """Microseconds per call: the open metadata the agent parses per preview stream, and an
    expose request as the agent writes it."""
    import orjson

    meta = orjson.dumps({"port": 8000, "via": "preview", "client": "203.0.113.7"})
    message = {"type": "expose", "id": 7, "port": 8000, "name": "web", "token": None}
    out: dict[str, float] = {}
    for name, module in (("orjson", orjson), ("fallback", fallback)):
        for op, call in (("loads", lambda m=module: m.loads(meta)),
                         ("dumps", lambda m=module: m.dumps(message))):  # fmt: skip
            runs = timeit.repeat(call, number=20_000, repeat=5)
            out[f"{name}_{op}_us"] = round(min(runs) / 20_000 * 1e6, 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--python", default=sys.executable, help="runs the pyz variants")
    args = parser.parse_args()
    build = _load("build_agent", ROOT / "tools" / "build_agent.py")
    fallback = _load("_orjson_fallback", ROOT / "packaging" / "agent" / "_orjson_fallback.py")
    secret = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="agent-footprint-") as tmp:
        work = Path(tmp)
        pyz = build.build_pyz(work)
        edge_ports, edge_log = work / "edge.json", work / "edge.log"
        env = dict(os.environ, TUNNELD_ADMIN_TOKEN=secrets.token_urlsafe(16), TUNNELD_SECRET=secret)
        argv = [
            str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
            "--admin-port", "0", "--ports-file", str(edge_ports),
            "--state-dir", str(work / "state"),
        ]  # fmt: skip
        with edge_log.open("wb") as out:
            edge = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            agent_port = wait_file(edge_ports, edge, edge_log)["agent"]
            token = subprocess.run(
                [str(BIN / "tunneld"), "token", SANDBOX],
                env=env,
                capture_output=True,
                check=True,
                timeout=30,
                text=True,
            ).stdout.strip()
            run = ["run", "--server", f"127.0.0.1:{agent_port}", "--sandbox-id", SANDBOX,
                   "--api-port", "0"]  # fmt: skip
            agent_env = dict(os.environ, TUNNEL_AGENT_TOKEN=token)
            variants = {
                "pyz-stdlib": [args.python, "-I", "-S", str(pyz), *run],
                "pyz-compiled": [args.python, "-I", str(pyz), *run],
                "installed": [str(BIN / "tunnel-agent"), *run],
            }
            results: dict[str, Any] = {}
            for name, agent_argv in variants.items():
                samples = [measure(agent_argv, agent_env, work) for _ in range(args.runs)]
                results[name] = {
                    key: statistics.median(s[key] for s in samples) for key in samples[0]
                }
        finally:
            edge.terminate()
            edge.wait(30)
        version = subprocess.run(
            [args.python, "-c", "import sys; print(sys.version.split()[0])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, Linux {platform.release()}",
            "python": version,
            "pyz_bytes": pyz.stat().st_size,
            "pyz_kib": round(pyz.stat().st_size / 1024),
            "idle_s": IDLE_S,
            "runs": args.runs,
            "median": results,
            "json": json_cost(fallback),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
