"""README.md's claims, checked against the code and, where they are runnable, by running them.

The README's examples are read from the README itself and run as written, with only the
addresses substituted (every test listens on port 0): the quick start's `make demo` session
(output lines, the page curl fetches, Ctrl-C), the "Using it" shell session (`tunneld serve`,
`tunneld token`, `tunnel-agent run`, the two admin calls and the answers shown under them), the
Python snippet on asyncio and trio, the in-sandbox CLI one-liner and the port-forward example.
Inline commands are parsed with the real argparse parsers; paths and links must exist.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from agent import cli as agent_cli
from tests.e2e.procs import BIN, Processes, wait_for, wait_for_file
from tests.redis_server import RedisServer
from tunneld import cli as tunneld_cli
from tunneld.client import Sandbox
from tunneld.config import Config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TOKEN_RE = "[a-z0-9]{16}"  # an automatic URL token


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def _fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


def _console(block: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, output lines) pairs."""
    pairs: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            pairs[-1][1].append(line)
    return pairs


# -- quick start: `make demo` ---------------------------------------------------------------------
QUICK = _section("Quick start")
DEMO_CMD, DEMO_OUT = _console(_fenced(QUICK, "console")[0])[0]
CURL_CMD, CURL_OUT = _console(_fenced(QUICK, "console")[1])[0]


def _line_pattern(line: str) -> str:
    """A README output line as a regex: numbers, URL tokens and the admin token vary per run."""
    variable = {
        r"\(token [^)]+\)": r"\(token [A-Za-z0-9_-]+\)",
        r"-demo-[a-z0-9]{16}": f"-demo-{TOKEN_RE}",
        r"\d+": r"\d+",
    }
    parts = re.split("(" + "|".join(variable) + ")", line)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(next(v for k, v in variable.items() if re.fullmatch(k, part)))
    return "".join(out)


def test_make_demo_runs_tunneld_demo_after_creating_the_venv(tmp_path: Path) -> None:
    """'$ make demo / … (creates .venv and installs the package the first time) /
    .venv/bin/tunneld demo'; and the recipe on an existing venv is that one line."""
    assert DEMO_CMD == "make demo"
    assert DEMO_OUT[0].startswith("…") and "creates .venv" in DEMO_OUT[0]
    assert DEMO_OUT[1] == ".venv/bin/tunneld demo"
    fresh = tmp_path / "v"
    dry = _make_dry("demo", f"VENV={fresh}")
    assert dry.returncode == 0, dry.stderr
    assert "-m venv --clear " + str(fresh) in dry.stdout
    assert f"{fresh}/bin/python -m pip install -q -e '.[test]'" in dry.stdout
    assert dry.stdout.splitlines()[-1] == f"{fresh}/bin/tunneld demo"
    assert not fresh.exists()  # -n: nothing was run
    existing = _make_dry("demo")
    assert existing.stdout.splitlines()[-1] == DEMO_OUT[1]


def test_the_demo_defaults_are_the_ports_the_readme_shows() -> None:
    """The URL shown is `8000-demo-…localhost:8080`: service port 8000, public port 8080; the
    agent API line shows 3000."""
    args = tunneld_cli.build_parser().parse_args(["demo"])
    assert (args.public_port, args.service_port) == (8080, 8000)
    url = re.search(r"preview URL:\s+(\S+)", "\n".join(DEMO_OUT))
    assert url is not None and re.fullmatch(
        rf"http://8000-demo-{TOKEN_RE}\.localhost:8080/", url.group(1)
    )
    assert any("http://127.0.0.1:3000  (inside the sandbox)" in line for line in DEMO_OUT)


def test_tunneld_demo_prints_the_readme_lines_serves_the_page_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    """The demo's output has the README's lines in order; `curl URL` as printed (no --resolve:
    curl resolves *.localhost itself) gets the README's page; the service is exposed as the
    printed admin API with the printed token says; Ctrl-C (SIGINT) stops it with status 0."""
    procs = Processes(tmp_path)
    try:
        demo = procs._spawn(
            "demo",
            [str(BIN / "tunneld"), "demo", "--public-port", "0", "--service-port", "0"],
            procs.env(),
        )
        out = wait_for(
            lambda: "Ctrl-C to stop." in procs.output(demo) and procs.output(demo),
            what="the demo's last line",
        )
        lines = out.splitlines()
        expected = [_line_pattern(line) for line in DEMO_OUT[2:]]
        assert len(lines) == len(expected), out
        for line, pattern in zip(lines, expected, strict=True):
            assert re.fullmatch(pattern, line), (line, pattern)
        url = re.search(r"preview URL:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
        assert f"try:  curl {url}" in out
        admin = re.search(r"admin API:\s+(\S+)\s+\(token (\S+)\)", out)
        assert admin is not None

        assert re.fullmatch(rf"curl http://8000-demo-{TOKEN_RE}\.localhost:8080/", CURL_CMD)
        curl = subprocess.run(
            ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", url],
            env=procs.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert curl.returncode == 0, curl.stderr
        page, status = curl.stdout.rsplit("\n", 1)
        assert status == "200"
        shown = [line for line in CURL_OUT if line != "…"]
        assert page.splitlines()[: len(shown)] == shown
        with httpx.Client(timeout=10) as http:
            ports = http.get(
                f"{admin.group(1)}/v1/sandboxes/demo/ports",
                headers={"authorization": f"Bearer {admin.group(2)}"},
            )
        assert ports.status_code == 200
        assert [p["exposedAt"] for p in ports.json()["ports"]] == [url]

        assert procs.stop(demo, signal.SIGINT) == 0
    finally:
        procs.close()


# -- quick start: `make test`, `make agent`, `make test-versions`, `make bench` -------------------
def _make_dry(*args: str) -> subprocess.CompletedProcess[str]:
    """`make -n ARGS` as a user types it. CI runs this suite under make: without MAKELEVEL and
    MAKEFLAGS, and with --no-print-directory, the output is the recipe alone, not make's
    "Entering/Leaving directory" lines."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(
        ["make", "--no-print-directory", "-n", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def _recipe(target: str, *variables: str) -> list[str]:
    dry = _make_dry(target, *variables)
    assert dry.returncode == 0, dry.stderr
    return dry.stdout.splitlines()


def test_make_test_is_lint_typecheck_and_the_suite_exactly_what_ci_runs() -> None:
    """'make test  # lint (ruff), type check (mypy), and the test suite; exactly what CI runs
    (.ci/run)'."""
    assert re.search(r"^make test +# lint \(ruff\), type check \(mypy\), and the test suite; "
                     r"exactly what CI runs \(\.ci/run\)$", QUICK, re.M)  # fmt: skip
    ci = (ROOT / ".ci" / "run").read_text()
    assert [ln for ln in ci.splitlines() if ln and not ln.startswith("#")][-1] == "exec make test"
    lines = _recipe("test")
    ruff = next(i for i, ln in enumerate(lines) if "/ruff check " in ln)
    mypy = next(i for i, ln in enumerate(lines) if "/mypy " in ln)
    suite = next(i for i, ln in enumerate(lines) if "-m pytest " in ln)
    assert ruff < mypy < suite
    assert any("/ruff format --check " in ln for ln in lines)
    # the whole suite: no path or -k narrows it
    assert " tests" not in lines[suite] and " -k" not in lines[suite]


def test_make_agent_builds_the_pyz_and_the_wheel() -> None:
    """'make agent builds dist/tunnel-agent.pyz ... and a tunnel-agent wheel' (the build itself
    is tests/agent/test_packaging.py's)."""
    assert _recipe("agent")[-1].endswith("tools/build_agent.py --out dist --what all")
    source = (ROOT / "tools" / "build_agent.py").read_text()
    assert '"tunnel-agent.pyz"' in source and "wheel" in source


def test_make_test_versions_uses_a_venv_per_version_and_is_not_ci() -> None:
    """'make test-versions (slow, not part of CI) ... each in its own .venv-3.X'."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ntest-versions:") : makefile.index("\ndemo:")]
    assert "venv=.venv-$$v" in recipe and "pyenv" not in recipe  # pyenv: find_python.sh
    assert "pyenv" in (ROOT / "tools" / "find_python.sh").read_text()
    assert not any("test-versions" in ln for ln in _recipe("test"))


def test_make_bench_runs_micro_and_end_to_end_into_bench_results() -> None:
    """'make bench runs the micro benchmarks and the end-to-end benchmark ...; results land in
    bench/results/'."""
    lines = _recipe("bench")
    assert any("pytest bench/micro --benchmark-only" in ln for ln in lines)
    assert lines[-1].endswith("BENCH_INSTALL=1 .venv/bin/python -m bench.e2e")
    assert 'RESULTS = ROOT / "bench" / "results"' in (ROOT / "bench/e2e/runner.py").read_text()
    assert (ROOT / "bench" / "results").is_dir()


# -- "Using it": the shell session, run as written ------------------------------------------------
USING = _section("Using it")
SHELL = _fenced(USING, "sh")[0]
PYTHON = _fenced(USING, "python")[0]


def _commands(block: str) -> list[tuple[str, list[str]]]:
    """(command, the comment lines right after it) for a shell block; continuations joined."""
    out: list[tuple[str, list[str]]] = []
    pending = ""
    for raw in block.splitlines():
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
        elif line.startswith("#"):
            if out:
                out[-1][1].append(line[1:].strip())
        elif line:
            out.append((re.sub(r"\s+#.*$", "", line), []))
    return out


class HealthService:
    """The sandbox's service: GET /health and GET / answer 200, anything else 404."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status = 200 if self.path in ("/", "/health") else 404
                body = b"ok" if status == 200 else b"not found"
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class World:
    """What the "Using it" block's background commands started, and the substitutions."""

    def __init__(self, procs: Processes, env: dict[str, str], service: HealthService) -> None:
        self.procs = procs
        self.env = env
        self.service = service
        self.ports: dict[str, int] = {}
        self.api_port = 0

    def sub(self, text: str) -> str:
        """The README's addresses replaced by this run's (only addresses, nothing else)."""
        text = text.replace("127.0.0.1:7070", f"127.0.0.1:{self.ports['admin']}")
        text = text.replace("127.0.0.1:7000", f"127.0.0.1:{self.ports['agent']}")
        text = re.sub(r"\b8000\b", str(self.service.port), text)
        return text

    def bash(self, command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The block's `export` and its two background commands (`tunneld serve &` and
    `TUNNEL_AGENT_TOKEN=$(tunneld token sb1) tunnel-agent run ... &`), run by bash as written;
    only port 0, a ports file, a state dir and the agent API's port 0 are added."""
    tmp = tmp_path_factory.mktemp("readme")
    procs = Processes(tmp)
    service = HealthService()
    commands = [c for c, _ in _commands(SHELL)]
    export = commands[0]
    assert export.startswith("export ")
    env = procs.env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.update(dict(word.split("=", 1) for word in shlex.split(export)[1:]))
    w = World(procs, env, service)
    try:
        serve = commands[1]
        assert serve == "tunneld serve &"
        ports_file = tmp / "ports.json"
        edge = procs._spawn(
            "edge",
            ["bash", "-c", f"exec {serve[:-1].strip()} --ports-file {ports_file}"],
            {
                **env,
                "TUNNELD_PUBLIC_PORT": "0",
                "TUNNELD_AGENT_PORT": "0",
                "TUNNELD_ADMIN_PORT": "0",
                "TUNNELD_STATE_DIR": str(tmp / "state"),
            },
        )
        w.ports = wait_for_file(ports_file, edge, log=procs.logs[edge.pid])
        agent = commands[2]
        assert agent.endswith(" &") and " tunnel-agent run " in agent
        agent = w.sub(agent[:-1].strip()).replace(" tunnel-agent run ", " exec tunnel-agent run ")
        agent_ports = tmp / "agent.json"
        proc = procs._spawn(
            "agent",
            ["bash", "-c", f"{agent} --api-port 0"],
            {**env, "TUNNEL_AGENT_PORTS_FILE": str(agent_ports)},
        )
        w.api_port = wait_for_file(agent_ports, proc, log=procs.logs[proc.pid])["api"]
        with httpx.Client(timeout=10) as http:

            def connected() -> bool:
                got = http.get(
                    f"http://127.0.0.1:{w.ports['admin']}/v1/sandboxes",
                    headers={"authorization": f"Bearer {env['TUNNELD_ADMIN_TOKEN']}"},
                ).json()["sandboxes"]
                return any(s["id"] == "sb1" and s["connected"] for s in got)

            wait_for(connected, what="the README's agent connected")
        yield w
    finally:
        procs.close()
        service.close()


def test_the_serve_comment_states_the_default_ports() -> None:
    """'tunneld serve &   # public :8080, agents :7000, admin :7070'; and the store is SQLite
    under the state directory by default ('SQLite by default, under the state directory')."""
    defaults = Config()
    comment = SHELL.splitlines()[1].split("#", 1)[1]
    assert re.findall(r"(\w+) :(\d+)", comment) == [
        ("public", str(defaults.public_port)),
        ("agents", str(defaults.agent_port)),
        ("admin", str(defaults.admin_port)),
    ]
    assert defaults.store == "sqlite"


def test_the_using_it_session_answers_what_the_readme_shows(world: World) -> None:
    """Each `curl` of the block, run by bash as written, answers the JSON shown under it."""
    calls = [(c, comments) for c, comments in _commands(SHELL) if c.startswith("curl ")]
    assert len(calls) == 2
    for command, comments in calls:
        result = world.bash(world.sub(command))
        assert result.returncode == 0, result.stderr
        got = json.loads(result.stdout)
        shown = json.loads(world.sub(comments[-1].split("  ")[0]))
        if "exposedAt" in shown:
            url = re.sub(r"-sb1-[a-z0-9]{16}\.", "-sb1-TOKEN.", shown["exposedAt"])
            url = url.replace(":8080/", f":{world.ports['public']}/")
            pattern = re.escape(url).replace("TOKEN", TOKEN_RE)
            assert re.fullmatch(pattern, got.pop("exposedAt")), got
            shown.pop("exposedAt")
        assert got == shown


def test_a_wait_that_never_gets_ready_is_504_port_not_ready_with_last_status(
    world: World,
) -> None:
    """'(504 PORT_NOT_READY with "lastStatus" if it never got ready)', same call, a path the
    service answers 404."""
    command = next(c for c, _ in _commands(SHELL) if c.startswith("curl ") and "/wait" in c)
    command = command.replace('"path":"/health","timeout":30', '"path":"/nope","timeout":1')
    assert "/nope" in command
    result = world.bash(world.sub(command.replace("curl -s ", 'curl -s -w "\\n%{http_code}" ')))
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "504"
    got = json.loads(body)
    assert got["code"] == "PORT_NOT_READY" and got["lastStatus"] == 404


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_python_snippet_runs_on_asyncio_and_trio(world: World, backend: str) -> None:
    """'or from Python (asyncio or trio)': the snippet, in an async function, run with anyio."""
    body = "\n".join("    " + line for line in world.sub(PYTHON).splitlines())
    program = (
        f"import anyio, sys\n\nasync def main():\n{body}\n\nanyio.run(main, backend=sys.argv[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, backend],
        env=world.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"http://{world.service.port}-sb1-{TOKEN_RE}\.localhost:{world.ports['public']}/\n",
        result.stdout,
    )


def test_expose_port_takes_wait_as_the_snippet_comment_says() -> None:
    """'# or expose_port(8000, wait=...) in one call'."""
    assert "expose_port(8000, wait=...)" in PYTHON
    assert inspect.signature(Sandbox.expose_port).parameters["wait"].kind is (
        inspect.Parameter.KEYWORD_ONLY
    )


def test_the_in_sandbox_one_liner_waits_then_prints_the_url(world: World) -> None:
    """'from inside the sandbox: tunnel-agent wait 8000 --http /health && tunnel-agent expose
    8000 --name api' (the agent's local API address from $TUNNEL_AGENT_API)."""
    line = re.search(r"from inside the sandbox: `([^`]+)`", USING)
    assert line is not None
    result = world.bash(
        world.sub(line.group(1)), TUNNEL_AGENT_API=f"http://127.0.0.1:{world.api_port}"
    )
    assert result.returncode == 0, result.stderr
    ready, url = result.stdout.splitlines()
    assert ready == f"port {world.service.port} is ready"
    assert re.fullmatch(
        rf"http://{world.service.port}-sb1-{TOKEN_RE}\.localhost:{world.ports['public']}/", url
    )
    assert (
        httpx.get(
            f"http://127.0.0.1:{world.ports['public']}/health",
            headers={"host": url.split("//")[1].rstrip("/")},
            timeout=10,
        ).text
        == "ok"
    )


def test_port_forward_then_redis_cli_ping(world: World, tmp_path: Path) -> None:
    """'tunneld port-forward sb1 16379:6379, then redis-cli -p 16379 PING' against a real
    redis-server in the sandbox (LOCAL 0 instead of 16379: the bound port is printed)."""
    forward = re.search(r"`(tunneld port-forward [^`]+)`, then `(redis-cli [^`]+)`", USING)
    assert forward is not None
    redis = RedisServer(tmp_path / "redis", tcp=True).start()
    try:
        argv = shlex.split(forward.group(1).replace("16379:6379", f"0:{redis.port}"))
        assert argv[:3] == ["tunneld", "port-forward", "sb1"]
        proc = world.procs._spawn(
            "port-forward",
            [str(BIN / "tunneld"), *argv[1:]],
            {**world.env, "TUNNELD_ADMIN_URL": f"http://127.0.0.1:{world.ports['admin']}"},
        )
        try:
            bound = wait_for(
                lambda: re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", world.procs.output(proc)),
                what="port-forward's bound port",
            ).group(1)
            cli = shlex.split(forward.group(2).replace("16379", bound))
            ping = subprocess.run(cli, capture_output=True, text=True, timeout=30)
            assert ping.stdout.strip() == "PONG", (ping.stdout, ping.stderr)
        finally:
            assert world.procs.stop(proc, signal.SIGINT) == 0
    finally:
        redis.stop()


# -- flags, paths and links ------------------------------------------------------------------------
def _inline_commands() -> list[list[str]]:
    """Every `tunneld …` / `tunnel-agent …` command the README shows, as argv: inline ones, the
    lines of its shell blocks, `$(…)` inside them, and the console's `.venv/bin/tunneld demo`."""
    lines = re.findall(r"`((?:tunneld|tunnel-agent) [^`]+)`", README)
    for block in _fenced(README, "sh"):
        lines += [command for command, _ in _commands(block)]
    lines += re.findall(r"\$\(((?:tunneld|tunnel-agent) [^)]+)\)", README)
    lines += [line.removeprefix(".venv/bin/") for line in DEMO_OUT if "bin/tunneld " in line]
    found = []
    for line in lines:
        for part in re.split(r"&&|\|", re.sub(r"\$\([^)]*\)", "x", line.replace("…", ""))):
            words = shlex.split(part.strip(" &"))
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)  # VAR=value before the command
            if words and words[0] in ("tunneld", "tunnel-agent"):
                found.append(words)
    return found


def test_every_command_line_shown_parses_with_the_real_parsers() -> None:
    """Every flag and subcommand the README shows exists: each command is parsed by the parser
    of tunneld/cli.py or agent/cli.py (argparse exits 2 on an unknown flag or bad value)."""
    commands = _inline_commands()
    shown = {" ".join(argv[:2]) for argv in commands}
    assert {
        "tunneld serve", "tunneld token", "tunneld port-forward", "tunneld demo",
        "tunnel-agent run", "tunnel-agent wait", "tunnel-agent expose",
    } <= shown  # fmt: skip
    for argv in commands:
        parser = (tunneld_cli if argv[0] == "tunneld" else agent_cli).build_parser()
        if argv[:2] == ["tunnel-agent", "run"] and "--sandbox-id" not in argv:
            argv = [*argv, "--sandbox-id", "sb1"]
        args = parser.parse_args(argv[1:])
        assert args is not None, argv
    assert "`--workers auto` for a supervisor and one worker per core" in README
    parsed = tunneld_cli.build_parser().parse_args(["serve", "--workers", "auto"])
    assert parsed.workers == (os.cpu_count() or 1)  # "auto": one worker per core


def test_the_agent_takes_several_edges_in_one_server_flag() -> None:
    """'tunnel-agent run --server a.example.com:7000,b.example.com:7000 …'."""
    entries = agent_cli.parse_servers("a.example.com:7000,b.example.com:7000")
    assert [(e.host, e.port) for e in entries] == [("a.example.com", 7000), ("b.example.com", 7000)]


def test_plaintext_agent_links_are_refused_off_loopback_unless_allowed() -> None:
    """'plain TCP or ws:// is accepted on loopback only, unless explicitly allowed' (the agent's
    side; the edge's is tests/test_auth.py and tests/faults/test_integrity.py)."""
    refuse = agent_cli.plaintext_refusal
    assert refuse("127.0.0.1:7000", tls=False, insecure=False) is None
    assert refuse("edge.example.com:7000", tls=False, insecure=False)
    assert refuse("ws://edge.example.com:7000", tls=False, insecure=False)
    assert refuse("edge.example.com:7000", tls=True, insecure=False) is None
    assert refuse("wss://edge.example.com:7000", tls=False, insecure=False) is None
    assert refuse("edge.example.com:7000", tls=False, insecure=True) is None
    assert Config().allow_plaintext_agents is False


def test_every_path_in_the_table_exists() -> None:
    table = README[README.index("| Path | What |") :]
    table = table[: table.index("\n\n")]
    paths = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert len(paths) == 9
    for path in paths:
        assert (ROOT / path).is_dir(), path
    for path in ("tests/faults", "deploy/sandbox-image"):
        assert (ROOT / path).is_dir()
    assert (ROOT / "deploy" / "tunneld.service").is_file()
    assert (ROOT / "deploy" / "tunneld.toml.example").is_file()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def check_cited(
    cited: tuple[tuple[str, tuple[str, ...]], ...], claim: Callable[[str], None]
) -> None:
    """A doc audit's CITED table: each phrase is in the doc (``claim(phrase)`` asserts it) and
    each test named next to it (``path::name``, from the repository's root) is defined in its
    file, so a renamed or deleted test cannot leave a claim unguarded."""
    for phrase, tests in cited:
        claim(phrase)
        for test in tests:
            path, _, name = test.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            if name:
                assert f"def {name}(" in source, f"{test} is gone (cited for {phrase!r})"


def check_links(doc: Path) -> int:
    """Every relative link of ``doc`` names a file, and its #anchor a heading there."""
    count = 0
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: {target}"
        if anchor:
            assert anchor in anchors(dest), f"{doc.name}: {target}"
        count += 1
    return count


def test_every_link_of_the_readme_resolves() -> None:
    assert check_links(ROOT / "README.md") >= 10


def test_the_slug_helper_is_githubs() -> None:
    assert slug("HTTPS on the public listener") == "https-on-the-public-listener"
    assert slug("Request inspection: `tunneld inspect`, `tunneld replay`") == (
        "request-inspection-tunneld-inspect-tunneld-replay"
    )


def test_supported_pythons_are_the_packages() -> None:
    """'On a machine with Python 3.11, 3.12 or 3.13'."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in pyproject
    versions = re.findall(r"Python :: (3\.\d+)", pyproject)
    assert versions == ["3.11", "3.12", "3.13"]
    assert "Python 3.11, 3.12 or 3.13" in QUICK


def test_the_tls_options_named_in_how_it_works_exist() -> None:
    """'The agent's one connection is TLS (`--tls`, or `wss://` ...)'; 'served over HTTPS by
    tunneld itself (`public_tls_cert`/`public_tls_key`, ... more pairs by SNI)'."""
    how = _section("How it works")
    assert "(`--tls`, or `wss://`" in how and "(`public_tls_cert`/`public_tls_key`," in how
    args = agent_cli.build_parser().parse_args(
        ["run", "--server", "wss://edge.example.com:443", "--sandbox-id", "sb1", "--tls"]
    )
    assert args.tls is True
    assert agent_cli.parse_servers("wss://edge.example.com:443")[0].port == 443
    defaults = Config()
    assert defaults.public_tls_cert == "" and defaults.public_tls_key == ""
    assert defaults.public_tls_extra == ()  # [[public_tls]]: more pairs, chosen by SNI
