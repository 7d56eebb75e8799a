"""The HTTPS scenario of issue 10: small keep-alive requests over TLS, HTTP/1.1 and HTTP/2, against
nginx serving the files itself over TLS (**direct**) and through tunneld's public HTTPS listener
(**tunnel**: client -TLS-> tunneld -> agent -> the origin nginx of ``Stack``), same certificate.

- Certificates are made per run with trustme: one CA, one leaf for ``*.bench.test`` (the TLS
  tunneld runs with ``--domain bench.test``), used by both nginx and tunneld.
- **h1**: wrk (``https://127.0.0.1:PORT/1k``, ``Host:`` the preview name, 50 connections). wrk
  sends the URL's host as SNI (``127.0.0.1``), which no certificate covers, so tunneld answers
  with its default pair (the same wildcard); wrk does not verify certificates.
- **h2**: h2load (``https://PREVIEW-HOST/1k --connect-to 127.0.0.1:PORT``, 10 connections x 5
  streams = 50 requests in flight): SNI and ``:authority`` are the preview name, so tunneld picks
  the wildcard pair by SNI; h2load does not verify certificates. A run that does not negotiate
  ``h2`` by ALPN is an error, not an HTTP/1.1 figure.
- Each round runs h1 direct, h1 tunnel, h2 direct, h2 tunnel back to back; ``repeat`` rounds;
  medians per path, and every round's tunnel/direct ratio in the notes (the spread).
- CPU per request: CPU seconds (``/proc``) of tunneld + agent over a tunnel run (of nginx's
  workers over a direct run) divided by the requests completed.

Run alone: ``python -m bench.e2e --only https --repeat 3``. Needs nginx (with http_v2 and ssl),
wrk and h2load (Debian: ``nghttp2-client``).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .scenarios import Result, Settings, wrk
from .stack import (
    ADMIN_TOKEN,
    SANDBOX,
    SECRET,
    VENV_BIN,
    Proc,
    Sampler,
    Stack,
    _nginx_common,
    _nginx_http_common,
    _wait_json,
    _wait_port,
    cpu_seconds,
    find_nginx,
    free_port,
    nofile_limit,
    tree_pids,
    tunneld_env,
)

DOMAIN = "bench.test"
H1_CONNS = 50
H2_CONNS, H2_STREAMS = 10, 5  # 50 requests in flight, as h1's 50 connections
MAX_DURATION = 3.0  # per run: 4 runs a round


# -- certificates and the direct TLS nginx ---------------------------------------------------------
@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(d: Path) -> Certs:
    """A CA and one leaf for ``*.bench.test`` (and 127.0.0.1), PEM files in ``d``."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(f"*.{DOMAIN}", "127.0.0.1")
    certs = Certs(d / "https-ca.pem", d / "https-cert.pem", d / "https-key.pem")
    ca.cert_pem.write_to_path(str(certs.ca))
    certs.cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(certs.key))
    certs.key.chmod(0o600)
    return certs


def nginx_version(nginx: str) -> tuple[int, ...]:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def tls_conf(d: Path, port: int, certs: Certs, version: tuple[int, ...]) -> str:
    """nginx serving ``d/www`` over TLS, HTTP/1.1 and h2 on one port (ALPN), like the origin
    (``worker_processes auto``, the same keep-alive settings)."""
    # 1.25.1 made h2 a server directive (``listen ... http2`` still works there, with a warning)
    h2_listen, h2_directive = (" http2", "") if version < (1, 25, 1) else ("", "http2 on;")
    return (
        _nginx_common(d, "https", "auto", nofile_limit() - 100)
        + "http {\n"
        + _nginx_http_common(d, "https")
        + f"""    server {{
        listen 127.0.0.1:{port} ssl{h2_listen} backlog=4096 reuseport;
        {h2_directive}
        ssl_certificate {certs.cert};
        ssl_certificate_key {certs.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        http2_max_concurrent_streams 100;
        root {d}/www;
    }}
}}
"""
    )


# -- h2load ----------------------------------------------------------------------------------------
def parse_h2load(out: str) -> dict[str, Any]:
    """h2load's summary -> req_s, requests (succeeded: 2xx and 3xx), failed (failed, which counts
    4xx and 5xx, + errored + timeout), mean_ms (mean time for request), proto (ALPN result)."""
    res: dict[str, Any] = {}
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    res["req_s"] = float(m.group(1)) if m else 0.0
    m = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    res["requests"] = int(m.group(1)) if m else 0
    res["failed"] = sum(int(x) for x in m.groups()[1:]) if m else 0
    m = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    res["mean_ms"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Application protocol: (\S+)", out)
    res["proto"] = m.group(1) if m else ""
    return res


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]


def h2load(port: int, host: str, path: str, duration: float) -> dict[str, Any]:
    argv = [
        "h2load",
        "-t2",
        f"-c{H2_CONNS}",
        f"-m{H2_STREAMS}",
        f"-D{max(1, round(duration))}",
        f"--connect-to=127.0.0.1:{port}",
        f"https://{host}{path}",
    ]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    res = parse_h2load(p.stdout)
    if res["proto"] != "h2" or not res["requests"]:
        raise RuntimeError(f"h2load did not run over h2: {(p.stdout + p.stderr)[-1500:]}")
    return res


# -- tunneld with the public HTTPS listener --------------------------------------------------------
@dataclass
class TlsEdge:
    tunneld: Proc
    agent: Proc
    public_port: int
    host: str  # the preview name (SNI and Host / :authority)


def start_edge(stack: Stack, certs: Certs) -> TlsEdge:
    """A second tunneld (HTTPS on its public port, ``--domain bench.test``) and one agent, with
    the stack's origin nginx exposed; returns once an HTTPS GET through it, verified against the
    CA with the preview name as SNI, gets the file."""
    from tunneld.auth import agent_token

    d = stack.dir
    ports_file = d / "tunneld-https-ports.json"
    tunneld = stack.spawn(
        "tunneld-https",
        [str(VENV_BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
         "--admin-port", "0", "--ports-file", str(ports_file), "--log-level", "warning",
         "--parser", stack.parser, "--domain", DOMAIN,
         "--public-tls-cert", str(certs.cert), "--public-tls-key", str(certs.key)],
        tunneld_env(),
    )  # fmt: skip
    ports = _wait_json(ports_file, tunneld)
    agent = stack.spawn(
        "agent-https",
        [str(VENV_BIN / "tunnel-agent"), "run", "--server", f"127.0.0.1:{ports['agent']}",
         "--sandbox-id", SANDBOX, "--api-port", "0", "--log-level", "warning"],
        {"TUNNEL_AGENT_TOKEN": agent_token(SECRET, SANDBOX),
         "TUNNEL_AGENT_PORTS_FILE": str(d / "agent-https.json")},
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(certs.ca))
    deadline = time.monotonic() + 20
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(
                f"http://127.0.0.1:{ports['admin']}/v1/sandboxes/{SANDBOX}/ports",
                data=json.dumps({"port": stack.origin_port}).encode(),
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                url = json.loads(resp.read())["exposedAt"]
            host = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
            if _https_get(ports["public"], host, context).startswith(b"HTTP/1.1 200"):
                return TlsEdge(tunneld, agent, ports["public"], host)
        except Exception as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"the HTTPS tunnel did not serve /1k: {last}; logs in {d}")


def _https_get(port: int, host: str, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(f"GET /1k HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return s.recv(100)


def _stop(proc: Proc, sig: int = signal.SIGTERM) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(sig)
    try:
        proc.popen.wait(10)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
        proc.popen.wait()


# -- the scenario ----------------------------------------------------------------------------------
def https(stack: Stack, s: Settings) -> Result:
    if not shutil.which("h2load"):
        raise RuntimeError("h2load is missing (Debian: apt-get install nghttp2-client)")
    res = Result("https")
    duration = min(s.duration, MAX_DURATION)
    d = stack.dir
    certs = make_certs(d)
    nginx = find_nginx()
    port = free_port()
    (d / "https.conf").write_text(tls_conf(d, port, certs, nginx_version(nginx)))
    direct = stack.spawn("nginx-https", [nginx, "-c", str(d / "https.conf"), "-e", "stderr"])
    edge: TlsEdge | None = None
    try:
        _wait_port(port)
        edge = start_edge(stack, certs)
        host = edge.host
        relay = {"tunneld": [edge.tunneld.pid], "agent": [edge.agent.pid]}
        for i in range(s.repeat):
            for proto in ("h1", "h2"):
                for path in ("direct", "tunnel"):
                    p = port if path == "direct" else edge.public_port
                    pids = relay if path == "tunnel" else {"nginx": tree_pids(direct.pid)}
                    cpu0 = {k: sum(cpu_seconds(x) for x in v) for k, v in pids.items()}
                    with Sampler(pids) as sampler:
                        if proto == "h1":
                            r = wrk(p, host, "/1k", H1_CONNS, duration, scheme="https")
                            r["failed"] = r["errors"] + r["non2xx"]
                        else:
                            r = h2load(p, host, "/1k", duration)
                    spent = {k: sum(cpu_seconds(x) for x in v) - cpu0[k] for k, v in pids.items()}
                    n = max(int(r["requests"]), 1)
                    r["cpu_us"] = sum(spent.values()) / n * 1e6
                    if path == "tunnel":
                        for k, v in spent.items():
                            r[f"{k}_us"] = v / n * 1e6
                        for k, peak in sampler.peak.items():
                            res.memory[k] = max(res.memory.get(k, 0), peak)
                        for k, share in sampler.cpu.items():
                            res.cpu[k] = max(res.cpu.get(k, 0.0), share)
                    runs = res.runs.setdefault(path, [])
                    if len(runs) <= i:
                        runs.append({})
                    runs[i].update(
                        {f"{proto}_{k}": v for k, v in r.items() if isinstance(v, int | float)}
                    )
                    time.sleep(0.3)
    finally:
        for proc in (edge.agent, edge.tunneld) if edge else ():
            _stop(proc)
        _stop(direct, signal.SIGQUIT)  # nginx's graceful stop
    keys = sorted({k for runs in res.runs.values() for r in runs for k in r})
    for k in keys:
        res.metrics[k] = {
            p: statistics.median(float(r[k]) for r in runs if k in r)
            for p, runs in res.runs.items()
            if any(k in r for r in runs)
        }
    for proto in ("h1", "h2"):
        ratios = [
            t[f"{proto}_req_s"] / dr[f"{proto}_req_s"]
            for dr, t in zip(res.runs["direct"], res.runs["tunnel"], strict=True)
            if dr.get(f"{proto}_req_s")
        ]
        res.notes.append(
            f"{proto} tunnel/direct req/s per round: {', '.join(f'{x:.3f}' for x in ratios)}"
            f" (median {statistics.median(ratios):.3f})"
        )
    for p, runs in res.runs.items():
        for proto in ("h1", "h2"):
            failed = sum(int(r.get(f"{proto}_failed", 0)) for r in runs)
            if failed:
                res.notes.append(f"{proto} {p}: {failed} requests failed (errors or non-2xx)")
    res.notes.append(f"{duration:g} s per run; h2: h2load -c{H2_CONNS} -m{H2_STREAMS}")
    return res
