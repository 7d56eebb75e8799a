"""Instructions per request of the edge and the agent, across commits: a cost that noise can't move.

``python -m bench.e2e.instr COMMIT[,COMMIT...] [REQUESTS] [--untimed] [--in-flight=N]
[--cache-sim]``
(``COMMIT+access``: that commit with the access log on, every request logged at info level;
``COMMIT+access-quiet``: on, but the log level drops the lines: what following the responses
costs)

``--in-flight=N`` (1-10, default 1): N requests at a time, each on its own connection, sent
together and then their responses read: the edge takes several per turn of its event loop, as
under load, where what a turn costs is shared (with one in flight every request pays a whole
turn, which weighs per-request overhead).

``--untimed`` leaves out work done per unit of time rather than per request: timer callbacks
(uvloop's ``TimerHandle._run``: the access log's batched write 50 ms after its first line, the
idle sweep) and the access log's once-a-second time stamp (``time.localtime``,
``time.strftime``). Under callgrind tunneld runs some 50-100 times slower, so that work lands
on 50-100 times fewer requests than at full speed and weighs that much more per request: a
50 ms write that carries ~256 lines at full load carries ~15 here. Without the flag the count
is all the process executed (an upper bound of the per-request cost).

``--cache-sim`` adds callgrind's cache simulation (``--cache-sim=yes``: L1 instruction and data
caches and the last level, the machine's sizes) and reports each process's L1 misses per
request too: ``I1`` (instruction fetches) and ``D1`` (data reads and writes). Instructions
understate what code that runs once per request costs when it is not in the L1 instruction
cache by the next request (an L1 miss costs ~10-15 cycles where an instruction costs ~0.5):
the access log measured +8 % in instructions but +13 % in CPU time per request, and +18 % in
I1 misses (docs/performance.md). It runs about twice as slow.

On a shared two-core machine req/s and even CPU-seconds per request swing by 10-30 % with what
else runs, so a code change of a few percent cannot be seen in them. This runs tunneld and the
agent (each commit's ``protocol relay agent tunneld``, as ``bench.e2e.ab`` does) under
``valgrind --tool=callgrind --instr-atstart=no``, warms them up with uninstrumented requests,
then counts the instructions each executes for ``REQUESTS`` small keep-alive requests
(``GET /1k`` through the tunnel, 10 connections used in turn, one request in flight: every
request pays a full event-loop round trip, so this weighs per-request overhead, the part that
matters for small HTTP). Runs of the same commit agree within about 1.5 %, whatever the load of
the machine (docs/performance.md). Needs valgrind (Debian package ``valgrind``), nginx and wrk
as for ``bench.e2e``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .ab import count_arg, tree
from .stack import Stack

CONNS = 10


def _read_response(s: socket.socket) -> None:
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("the tunnel closed a keep-alive connection")
        buf += chunk
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            m = re.search(rb"content-length: *(\d+)", buf[:head_end], re.I)
            if m is None or not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {buf[:200]!r}")
            if len(buf) >= head_end + 4 + int(m.group(1)):
                return


def _request_loop(port: int, host: str, count: int, in_flight: int = 1) -> None:
    """``count`` requests on ``CONNS`` connections used in turn, ``in_flight`` at a time (each
    on its own connection: sent together, then their responses read)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(CONNS)]
    req = f"GET /1k HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    try:
        done = 0
        while done < count:
            batch = [socks[(done + k) % CONNS] for k in range(min(in_flight, count - done))]
            for s in batch:
                s.sendall(req)
            for s in batch:
                _read_response(s)
            done += len(batch)
    finally:
        for s in socks:
            s.close()


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


# --untimed: callgrind's collection is off inside these (and what they call)
UNTIMED = ("*TimerHandle__run", "time_strftime", "time_localtime")


def measure(
    requests: int,
    out_dir: Path,
    access_log: bool = False,
    quiet: bool = False,
    untimed: bool = False,
    in_flight: int = 1,
    cache_sim: bool = False,
) -> dict[str, float]:
    """Instructions tunneld and the agent execute per request (this PYTHONPATH's code); with
    ``cache_sim`` also their L1 misses per request (``NAME I1``, ``NAME D1``)."""
    names = ("tunneld", "agent")
    # --toggle-collect sets --collect-atstart=no, so that comes after it: collection starts on
    toggles = "".join(f" --toggle-collect={f}" for f in UNTIMED) if untimed else ""
    toggles = f"{toggles} --collect-atstart=yes" if toggles else ""
    for name in names:
        os.environ[f"BENCH_{name.upper()}_WRAP"] = (
            "valgrind --tool=callgrind --instr-atstart=no "
            + ("--cache-sim=yes " if cache_sim else "")
            + f"--callgrind-out-file={out_dir / name}.callgrind{toggles}"
        )
    try:
        if access_log:  # every request logged at info level to tunneld's log file
            os.environ["TUNNELD_ACCESS_LOG"] = "true"
        verbose = access_log and not quiet  # quiet: framed and recorded, no line written
        stack = Stack(tunneld_args=("--log-level", "info") if verbose else ()).start()
    finally:
        for name in names:
            del os.environ[f"BENCH_{name.upper()}_WRAP"]
        os.environ.pop("TUNNELD_ACCESS_LOG", None)
    try:
        pids = {name: getattr(stack, name).pid for name in names}
        _request_loop(stack.public_port, stack.http_host, 300)  # warm: caches, JIT translation
        for pid in pids.values():
            _control(pid, "--instr=on")
        _request_loop(stack.public_port, stack.http_host, requests, in_flight)
        for pid in pids.values():
            _control(pid, "--instr=off")
            _control(pid, "--dump")
        time.sleep(1.0)
    finally:
        stack.close()
    result: dict[str, float] = {}
    for name in names:
        totals: dict[str, int] = {}
        for f in out_dir.glob(f"{name}.callgrind*"):
            # a dump's "summary:" line may be 0 (it is written first); "totals:" has the counts,
            # in the order of its "events:" line (Ir first; with --cache-sim the misses)
            text = f.read_text(errors="replace")
            events = re.search(r"^events: (.+)$", text, re.M)
            for line in re.findall(r"^(?:summary|totals): ([\d ]+)$", text, re.M):
                counts = dict(
                    zip(  # (a summary line may hold fewer numbers: 0 before the counts)
                        events.group(1).split() if events else ["Ir"],
                        map(int, line.split()),
                        strict=False,
                    )
                )
                if counts.get("Ir", 0) > totals.get("Ir", 0):
                    totals = counts
            f.unlink()
        if not totals.get("Ir"):
            raise RuntimeError(f"callgrind wrote no totals for {name}")
        result[name] = totals["Ir"] / requests
        if cache_sim:
            result[f"{name} I1"] = totals["I1mr"] / requests
            result[f"{name} D1"] = (totals["D1mr"] + totals["D1mw"]) / requests
    return result


def main(argv: list[str]) -> int:
    untimed = "--untimed" in argv
    cache_sim = "--cache-sim" in argv
    in_flight = 1
    for a in argv:
        if a.startswith("--in-flight="):
            in_flight = count_arg(a.partition("=")[2])
    if not 1 <= in_flight <= CONNS:
        print(f"--in-flight=N: 1 to {CONNS}", file=sys.stderr)
        return 2
    argv = [a for a in argv if a not in ("--untimed", "--cache-sim")]
    argv = [a for a in argv if not a.startswith("--in-flight=")]
    if not argv:
        print(__doc__)
        return 2
    commits = argv[0].split(",")
    requests = count_arg(argv[1]) if len(argv) > 1 else 2000
    if requests < 1:
        print("N (requests per commit) must be a whole number >= 1", file=sys.stderr)
        return 2
    saved = os.environ.get("PYTHONPATH")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tunneld-instr-") as tmp:
        for c in commits:
            commit, _, variant = c.partition("+")  # COMMIT+access: with the access log on
            os.environ["PYTHONPATH"] = str(tree(commit, Path(tmp)))
            try:
                results[c] = measure(
                    requests,
                    Path(tmp),
                    access_log=variant.startswith("access"),
                    quiet=variant == "access-quiet",
                    untimed=untimed,
                    in_flight=in_flight,
                    cache_sim=cache_sim,
                )
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
            r = results[c]
            shown = ", ".join(f"{k} {r[k]:,.0f}" for k in ("tunneld", "agent"))
            print(f"{c}: instructions per request: {shown}", flush=True)
            if cache_sim:
                shown = "; ".join(
                    f"{k} I1 {r[k + ' I1']:,.0f}, D1 {r[k + ' D1']:,.0f}"
                    for k in ("tunneld", "agent")
                )
                print(f"{c}: L1 misses per request: {shown}", flush=True)
    base = results[commits[0]]
    # instructions ("ir") per request, and with --cache-sim L1 misses ("count") per request
    report = {
        c: {k: {"count" if " " in k else "ir": v, "ratio": v / base[k]} for k, v in r.items()}
        for c, r in results.items()
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
