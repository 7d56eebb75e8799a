"""The processes of one bench run, all on 127.0.0.1: origin nginx, WebSocket echo, nginx as a
one-hop reverse proxy (the C reference), tunneld and one agent, plus RSS/CPU sampling.

Every process is a child of the runner with its own temp dir; ``Stack.close()`` stops exactly the
processes it started (by pid).
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
ADMIN_TOKEN = "bench-admin-token"
SECRET = "bench-secret"
SANDBOX = "sb1"
# real blocks (a sparse file is read at ~400 MiB/s), cached across runs. BENCH_BIG_FILE_MIB: a
# smaller one (tests/test_bench_entry_points.py runs the entry points with a few MiB).
BIG_FILE_SIZE = int(os.environ.get("BENCH_BIG_FILE_MIB", "4096")) << 20
BIG_FILE_DIR = Path(os.environ.get("BENCH_CACHE_DIR", "/var/tmp/tunneld-bench"))


def big_file() -> Path:
    """The multi-GB single-stream file, written once and reused (it stays in the page cache)."""
    gib, rest = divmod(BIG_FILE_SIZE, 1 << 30)
    path = BIG_FILE_DIR / (f"big-{gib}g.bin" if not rest else f"big-{BIG_FILE_SIZE >> 20}m.bin")
    if not path.exists() or path.stat().st_size != BIG_FILE_SIZE:
        BIG_FILE_DIR.mkdir(parents=True, exist_ok=True)
        BIG_FILE_DIR.chmod(0o755)
        block = os.urandom(1 << 20)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(BIG_FILE_SIZE >> 20):
                f.write(block)
        tmp.rename(path)
    return path


def tunneld_env() -> dict[str, str]:
    """Secrets, plus the settings a bench run needs that production does not: every client is
    127.0.0.1 and idle_websockets holds 10,000 connections, so the public connection caps
    (256 per IP, 10,000 in total: issue 7) are lifted; exposures live in memory, so a run neither
    reads nor writes the sqlite store in the user's state directory. Environment variables, so a
    tunneld of an older commit (no such settings) ignores them."""
    return {
        "TUNNELD_ADMIN_TOKEN": ADMIN_TOKEN,
        "TUNNELD_SECRET": SECRET,
        "TUNNELD_MAX_CONNECTIONS_PER_IP": "1000000",
        "TUNNELD_MAX_CONNECTIONS": "1000000",
        # bench/e2e/cluster.py runs the nodes on a Redis store
        "TUNNELD_STORE": os.environ.get("BENCH_TUNNELD_STORE", "memory"),
        "TUNNELD_NODE_PORT": "0",  # a cluster node's link listener: any free port
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# -- /proc sampling --------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def rss(pid: int) -> int:
    return proc_status(pid).get("VmRSS", 0)


def tree_pids(pid: int) -> list[int]:
    """pid and its children (nginx master + workers)."""
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return pids


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class Sampler:
    """Samples VmRSS of some pids every ``interval`` s in a thread; keeps the peak of each."""

    def __init__(self, pids: dict[str, list[int]], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, int] = {k: 0 for k in pids}
        self.cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        self.cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()
        self.elapsed = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pids in self.pids.items():
                v = sum(rss(p) for p in pids)
                if v > self.peak[name]:
                    self.peak[name] = v
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.elapsed = time.perf_counter() - self._t0
        self.cpu = {
            k: (sum(cpu_seconds(p) for p in v) - self.cpu0[k]) / self.elapsed
            for k, v in self.pids.items()
        }


# -- nginx configs ---------------------------------------------------------------------------------
def _nginx_common(d: Path, name: str, workers: str, conns: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}-error.log warn;
worker_rlimit_nofile {nofile_limit()};
events {{ worker_connections {conns}; multi_accept on; }}
"""


def _nginx_http_common(d: Path, name: str) -> str:
    return f"""    access_log off;
    client_body_temp_path {d}/{name}-body;
    proxy_temp_path {d}/{name}-proxy;
    fastcgi_temp_path {d}/{name}-fcgi;
    uwsgi_temp_path {d}/{name}-uwsgi;
    scgi_temp_path {d}/{name}-scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    tcp_nodelay on;
    default_type application/octet-stream;
"""


def origin_conf(d: Path, port: int) -> str:
    return (
        _nginx_common(d, "origin", "auto", nofile_limit() - 100)
        + "http {\n"
        + _nginx_http_common(d, "origin")
        + f"""    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        root {d}/www;
        location = /upload {{ client_max_body_size 0; return 200 "ok\\n"; }}
    }}
}}
"""
    )


def proxy_conf(d: Path, port: int, routes: dict[str, int], ws_routes: dict[str, int]) -> str:
    servers = []
    for i, (host, upstream_port) in enumerate(routes.items()):
        up = f"    upstream http{i} {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}\n"
        servers.append(
            up
            + f"""
    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        client_max_body_size 0;
        location / {{
            proxy_pass http://http{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost:{upstream_port};
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
            proxy_request_buffering off;
        }}
    }}
"""
        )
    for host, upstream_port in ws_routes.items():
        servers.append(f"""    server {{
        listen 127.0.0.1:{port};
        server_name {host};
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host localhost:{upstream_port};
            proxy_read_timeout 3600s;
            proxy_buffering off;
        }}
    }}
""")
    return (
        _nginx_common(d, "proxy", "1", nofile_limit() - 100)
        + "http {\n"
        + _nginx_http_common(d, "proxy")
        + f"""    server {{ listen 127.0.0.1:{port} default_server backlog=4096; return 404; }}
"""
        + "".join(servers)
        + "}\n"
    )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Stack:
    """Start with ``start()``; every address a scenario needs is an attribute."""

    loop: str = "uvloop"
    parser: str = "auto"
    tunneld_args: tuple[str, ...] = ()  # e.g. ("--workers", "2") (bench/e2e/cluster.py)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tunneld-bench-")))
    procs: list[Proc] = field(default_factory=list)
    origin_port: int = 0
    ws_port: int = 0
    proxy_port: int = 0
    public_port: int = 0
    agent_port: int = 0
    admin_port: int = 0
    http_host: str = ""
    ws_host: str = ""
    tunneld: Proc | None = None
    agent: Proc | None = None
    origin: Proc | None = None
    proxy: Proc | None = None
    echo: Proc | None = None

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        if self.loop == "asyncio":
            full_env["TUNNEL_LOOP"] = "asyncio"
        out = subprocess.PIPE if name == "echo" else open(log, "wb")  # noqa: SIM115
        err = open(log, "ab") if name != "echo" else subprocess.DEVNULL  # noqa: SIM115
        try:
            p = subprocess.Popen(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=ROOT,
                preexec_fn=raise_nofile,
            )
        finally:  # the child has its own copies (no ResourceWarning in tests/test_bench_https.py)
            for f in (out, err):
                if not isinstance(f, int):
                    f.close()
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def start(self) -> Stack:
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> Stack:
        d = self.dir
        d.chmod(0o755)
        www = d / "www"
        www.mkdir()
        (www / "1k").write_bytes(os.urandom(1024))
        (www / "1m").write_bytes(os.urandom(1 << 20))
        (www / "big").symlink_to(big_file())
        nginx = find_nginx()
        # origin
        self.origin_port = free_port()
        (d / "origin.conf").write_text(origin_conf(d, self.origin_port))
        self.origin = self.spawn("origin", [nginx, "-c", str(d / "origin.conf"), "-e", "stderr"])
        # WebSocket echo
        self.echo = self.spawn("echo", [sys.executable, "-m", "bench.e2e.wsecho"])
        assert self.echo.popen.stdout is not None
        self.ws_port = json.loads(self.echo.popen.stdout.readline())["port"]
        # tunneld
        env = tunneld_env()
        ports_file = d / "tunneld-ports.json"
        # BENCH_TUNNELD_WRAP: a command put in front of tunneld (bench/e2e/instr.py runs it
        # under valgrind --tool=callgrind to count instructions per request).
        wrap = shlex.split(os.environ.get("BENCH_TUNNELD_WRAP", ""))
        if wrap:
            wrap.append(sys.executable)
        self.tunneld = self.spawn(
            "tunneld",
            [*wrap, str(VENV_BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
             "--admin-port", "0", "--ports-file", str(ports_file), "--log-level", "warning",
             "--parser", self.parser, *self.tunneld_args],
            env,
        )  # fmt: skip
        ports = _wait_json(ports_file, self.tunneld, 180 if wrap else 15)
        self.public_port, self.agent_port, self.admin_port = (
            ports["public"],
            ports["agent"],
            ports["admin"],
        )
        self.agent = self.spawn_agent(SANDBOX)
        self.http_host = self.expose(SANDBOX, self.origin_port)
        self.ws_host = self.expose(SANDBOX, self.ws_port)
        # nginx as a one-hop reverse proxy with the same Host names
        self.proxy_port = free_port()
        (d / "proxy.conf").write_text(
            proxy_conf(
                d, self.proxy_port, {self.http_host: self.origin_port}, {self.ws_host: self.ws_port}
            )
        )
        self.proxy = self.spawn("proxy", [nginx, "-c", str(d / "proxy.conf"), "-e", "stderr"])
        for port in (self.origin_port, self.proxy_port):
            _wait_port(port)
        return self

    def spawn_agent(self, sandbox: str) -> Proc:
        from tunneld.auth import agent_token

        wrap = shlex.split(os.environ.get("BENCH_AGENT_WRAP", ""))  # as BENCH_TUNNELD_WRAP
        if wrap:
            wrap.append(sys.executable)
        return self.spawn(
            "agent",
            [*wrap, str(VENV_BIN / "tunnel-agent"), "run",
             "--server", f"127.0.0.1:{self.agent_port}", "--sandbox-id", sandbox,
             "--api-port", "0", "--log-level", "warning"],
            {"TUNNEL_AGENT_TOKEN": agent_token(SECRET, sandbox),
             "TUNNEL_AGENT_PORTS_FILE": str(self.dir / f"agent-{sandbox}.json")},
        )  # fmt: skip

    def expose(self, sandbox: str, port: int) -> str:
        """Expose ``port`` through the admin API (retrying until the agent is connected);
        returns the preview Host header."""
        deadline = time.monotonic() + 20
        last: Exception | None = None
        while time.monotonic() < deadline:
            req = urllib.request.Request(
                f"http://127.0.0.1:{self.admin_port}/v1/sandboxes/{sandbox}/ports",
                data=json.dumps({"port": port}).encode(),
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    url = json.loads(resp.read())["exposedAt"]
                host = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
                if self._agent_ready(host):
                    return host
            except Exception as exc:
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"could not expose port {port}: {last}; logs in {self.dir}")

    def _agent_ready(self, host: str) -> bool:
        """The service answered through the preview URL (whatever its status), not the edge.
        Not just "not a 503": with ``--workers 2`` a probe that lands on the worker whose store
        feed has not delivered the new exposure yet gets the edge's 404 (for a few ms), and
        taking that for readiness started wrk before the agent was connected (the non-2xx of
        some ``--workers 2`` runs, docs/performance.md). Edge answers carry a JSON error code."""
        with socket.create_connection(("127.0.0.1", self.public_port), timeout=5) as s:
            s.sendall(f"GET /1k HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536 and (chunk := s.recv(65536)):
                data += chunk  # the edge writes its error's head and body at once
        return data.startswith(b"HTTP/1.1 ") and b'"code":"' not in data

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                sig = signal.SIGQUIT if proc.name in ("origin", "proxy") else signal.SIGTERM
                proc.popen.send_signal(sig)
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if not os.environ.get("BENCH_KEEP_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- addresses ------------------------------------------------------------------------------
    def targets(self, kind: str = "http") -> dict[str, tuple[int, str]]:
        """path name -> (port, Host header) for the same load."""
        if kind == "http":
            return {
                "direct": (self.origin_port, f"localhost:{self.origin_port}"),
                "tunnel": (self.public_port, self.http_host),
                "nginx": (self.proxy_port, self.http_host),
            }
        return {
            "direct": (self.ws_port, f"localhost:{self.ws_port}"),
            "tunnel": (self.public_port, self.ws_host),
            "nginx": (self.proxy_port, self.ws_host),
        }

    def relay_pids(self) -> dict[str, list[int]]:
        assert self.tunneld is not None and self.agent is not None
        return {"tunneld": [self.tunneld.pid], "agent": [self.agent.pid]}


def find_nginx() -> str:
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and os.path.exists(cand):
            return cand
    raise SystemExit(missing_tools_message())


def missing_tools_message() -> str:
    return (
        "the end-to-end bench needs nginx, wrk and h2load (Debian: `apt-get install -y nginx-light "
        "wrk nghttp2-client`; run `python -m bench.e2e --install` as root to do it)"
    )


# tool -> Debian package (h2load: the HTTPS scenario's HTTP/2 load, bench/e2e/https.py)
TOOLS = {"nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client"}


def ensure_tools(install: bool) -> None:
    missing = [t for t in TOOLS if not (shutil.which(t) or os.path.exists(f"/usr/sbin/{t}"))]
    if not missing:
        return
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        pkgs = [TOOLS[t] for t in missing]
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=False)
        if r.returncode != 0 and "nginx-light" in pkgs:  # newer Debian: just "nginx"
            pkgs = ["nginx" if p == "nginx-light" else p for p in pkgs]
            subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True)
        return
    raise SystemExit(missing_tools_message())


def _wait_json(path: Path, proc: Proc, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not write {path}")


def _wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")
