"""The agent installs alone (issue 10): tunnel-agent.pyz and the tunnel-agent distribution.

The zipapp is built by ``tools/build_agent.py`` (what ``make agent`` runs) into a tmp directory
and run with ``python -I -S``: no site-packages at all, so no orjson, uvloop, h11 or wsproto but
the ones inside the archive (checked, not assumed). A real ``tunneld`` subprocess is the edge and
a stdlib HTTP server the sandbox's service; a preview request goes through the edge and the
zipapp's agent. The same runs with every other supported python found on the machine.

The orjson stand-in (packaging/agent/_orjson_fallback.py) is compared with orjson itself, and
the tunnel-agent distribution's metadata with the repository's pyproject.toml and with what
agent/, protocol/ and relay/ import.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.agent.conftest import BUILD, tls_files
from tests.e2e.procs import Processes, is_connected, preview_get, wait_for, wait_for_file

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "sandbox-image" / "entrypoint.sh"
ISOLATED = ("-I", "-S", "-u")  # no site-packages, no PYTHON* variables; unbuffered logs
AGENT_PACKAGES = ("agent", "protocol", "relay")
EDGE_ONLY = {"httptools", "prometheus_client", "anyio", "redis", "hiredis", "tunneld"}


def _supported_pythons() -> dict[str, str]:
    """``{"3.X": interpreter}``: this one, plus the others tools/find_python.sh finds."""
    found = subprocess.run(
        ["/bin/sh", str(ROOT / "tools" / "find_python.sh"), "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.split()
    pythons = dict(zip(found[::2], found[1::2], strict=False))
    pythons[f"{sys.version_info[0]}.{sys.version_info[1]}"] = sys.executable
    return dict(sorted(pythons.items()))


PYTHONS = _supported_pythons()


def _old_python() -> str | None:
    """A python3.10 that runs (a pyenv shim may exist and fail), for the refusal message."""
    candidates = [shutil.which("python3.10")]
    candidates += [str(p) for p in Path.home().glob(".pyenv/versions/3.10.*/bin/python3.10")]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


OLD_PYTHON = _old_python()


def run_pyz(python: str, pyz: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *ISOLATED, str(pyz), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kw,
    )


# -- the archive ------------------------------------------------------------------------------
def test_pyz_holds_the_agent_and_pure_python_dependencies_only(pyz: Path) -> None:
    with zipfile.ZipFile(pyz) as zf:
        names = zf.namelist()
        main = zf.read("__main__.py").decode()
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {
        "__main__.py",
        "_orjson_fallback.py",
        "agent",
        "protocol",
        "relay",
        "h11",
        "wsproto",
        "LICENSES",
    }
    assert {"agent/cli.py", "agent/core.py", "relay/mux.py", "protocol/session.py"} <= set(names)
    assert not [n for n in names if n.endswith((".pyc", ".so")) or "__pycache__" in n]
    assert {n.split("-")[0] for n in names if n.startswith("LICENSES/") and n[-1] != "/"} == {
        "LICENSES/h11",
        "LICENSES/wsproto",
    }
    assert "from agent.cli import main" in main


def test_isolated_python_sees_no_installed_package_and_main_uses_the_fallback(pyz: Path) -> None:
    # The precondition of every run below: -I -S hides the venv's orjson and uvloop.
    probe = subprocess.run(
        [sys.executable, *ISOLATED, "-c", "import orjson"], capture_output=True, timeout=30
    )
    assert probe.returncode != 0 and b"No module named 'orjson'" in probe.stderr
    # The archive's __main__ runs `--help` and leaves the fallback registered as orjson.
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(pyz)!r}); sys.argv = ['tunnel-agent', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(pyz)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "import h11, wsproto\n"
        "print(sys.modules['orjson'].__name__, h11.__file__, 'uvloop' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, *ISOLATED, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    name, h11_file, uvloop_loaded = out.stdout.split()[-3:]
    assert name == "_orjson_fallback"
    assert h11_file.startswith(str(pyz))
    assert uvloop_loaded == "False"


@pytest.mark.parametrize("version", list(PYTHONS))
def test_help_exits_0_on_every_supported_python(pyz: Path, version: str) -> None:
    done = run_pyz(PYTHONS[version], pyz, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tunnel-agent")
    run_help = run_pyz(PYTHONS[version], pyz, "run", "--help")
    assert run_help.returncode == 0 and "--server" in run_help.stdout


@pytest.mark.skipif(OLD_PYTHON is None, reason="no python3.10 on this machine")
def test_an_older_python_is_told_why(pyz: Path) -> None:
    assert OLD_PYTHON is not None
    done = run_pyz(OLD_PYTHON, pyz, "--help")
    assert done.returncode == 2
    assert "tunnel-agent.pyz needs Python >= 3.11; this is 3.10" in done.stderr
    assert "Traceback" not in done.stderr


def test_usage_errors_exit_2(pyz: Path) -> None:
    done = run_pyz(sys.executable, pyz, "run", "--sandbox-id", "sb1")
    assert done.returncode == 2
    assert "--server HOST:PORT is required" in done.stderr
    remote = run_pyz(
        sys.executable,
        pyz,
        "run",
        "--server",
        "edge.example.com:7000",
        env={**os.environ, "TUNNEL_AGENT_TOKEN": "t", "TUNNEL_AGENT_SANDBOX_ID": "sb1"},
    )
    assert remote.returncode == 2 and "--tls" in remote.stderr, remote.stderr


# -- a real run -------------------------------------------------------------------------------
class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from {self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def service() -> Iterator[int]:
    """The sandbox's service: a stdlib HTTP server on 127.0.0.1, port chosen by the kernel."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    p = Processes(tmp_path_factory.mktemp("edge"), "asyncio")
    try:
        p.start_edge()
        yield p
    finally:
        p.close()


@pytest.mark.parametrize("version", list(PYTHONS))
def test_pyz_agent_serves_a_preview_request(
    pyz: Path, edge: Processes, service: int, version: str, tmp_path: Path
) -> None:
    python = PYTHONS[version]
    sandbox = "pyz-" + version.replace(".", "-")
    ports_file = tmp_path / "agent.json"
    agent = edge._spawn(
        "pyz-agent",
        [
            python,
            *ISOLATED,
            str(pyz),
            "run",
            "--server",
            f"127.0.0.1:{edge.ports['agent']}",
            "--sandbox-id",
            sandbox,
            "--api-port",
            "0",
        ],
        edge.env(TUNNEL_AGENT_TOKEN=edge.token(sandbox), TUNNEL_AGENT_PORTS_FILE=str(ports_file)),
    )
    api_port = wait_for_file(ports_file, agent, log=edge.logs[agent.pid])["api"]
    wait_for(lambda: is_connected(edge, sandbox), what=f"{sandbox} connected")

    # The zipapp's own client commands, against its own local API (JSON through the fallback).
    api = f"http://127.0.0.1:{api_port}"
    exposed = run_pyz(python, pyz, "--api", api, "expose", str(service), "--name", "web", "--json")
    assert exposed.returncode == 0, exposed.stderr + edge.output(agent)
    url = json.loads(exposed.stdout)["exposedAt"]
    assert url.startswith(f"http://{service}-{sandbox}-")

    answer = preview_get(edge, url, "/through-the-pyz")
    assert answer.status_code == 200, answer.text
    assert answer.text == "hello from /through-the-pyz"

    status = run_pyz(python, pyz, "--api", api, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["connected"] is True
    assert edge.stop(agent) == 0
    assert "Traceback" not in edge.output(agent)


# -- the sandbox image's entrypoint ----------------------------------------------------------
SANDBOX_CMD = """
import json, os, sys, time, urllib.request
deadline = time.monotonic() + 20
path = os.environ["TUNNEL_AGENT_PORTS_FILE"]
while time.monotonic() < deadline:
    try:
        port = json.load(open(path))["api"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as answer:
            if json.load(answer)["connected"]:
                print("connected")
                sys.exit(0)
    except (OSError, ValueError):
        pass
    time.sleep(0.05)
sys.exit("the agent did not connect")
"""


@pytest.mark.parametrize("private_ca", [False, True], ids=["trust-store", "private-ca"])
def test_sandbox_image_entrypoint_starts_the_pyz_agent_over_tls(
    pyz: Path, tmp_path: Path, private_ca: bool
) -> None:
    """deploy/sandbox-image/entrypoint.sh as the image runs it: `tunnel-agent` is the pyz on PATH,
    python3 has nothing but the standard library, the token comes from a file, and the agent
    dials the edge with TLS. trust-store: the CA is in the trust store (SSL_CERT_FILE) and nothing
    but the entrypoint's own --tls asks for TLS; private-ca: TUNNEL_AGENT_TLS_CA and a certificate
    naming edge.test, not the address dialled (TUNNEL_AGENT_TLS_SERVER_NAME)."""
    tls = tls_files(tmp_path, "edge.test" if private_ca else "127.0.0.1")
    tls_env = (
        {"TUNNEL_AGENT_TLS_CA": str(tls.ca), "TUNNEL_AGENT_TLS_SERVER_NAME": "edge.test"}
        if private_ca
        else {"SSL_CERT_FILE": str(tls.ca)}
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"  # what `#!/usr/bin/env python3` finds: stdlib only
    python3.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S -u "$@"\n')
    python3.chmod(0o755)
    shutil.copyfile(pyz, bin_dir / "tunnel-agent")
    (bin_dir / "tunnel-agent").chmod(0o755)

    p = Processes(tmp_path, "asyncio")
    try:
        p.start_edge("--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
        token_file = tmp_path / "token"
        token_file.write_text(p.token("sb-image") + "\n")
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "TUNNEL_AGENT_SERVER": f"127.0.0.1:{p.ports['agent']}",
            "TUNNEL_AGENT_SANDBOX_ID": "sb-image",
            "TUNNEL_AGENT_TOKEN_FILE": str(token_file),
            "TUNNEL_AGENT_PORTS_FILE": str(tmp_path / "agent.json"),
            "TUNNEL_AGENT_ARGS": "--api-port 0  --log-level debug",  # never the real port 3000
            **tls_env,
        }
        log = tmp_path / "entrypoint.log"
        with log.open("wb") as out:
            entry = subprocess.Popen(
                ["/bin/sh", str(ENTRYPOINT), "python3", "-c", SANDBOX_CMD],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the agent stays in this group: stopped below
            )
        try:
            assert entry.wait(30) == 0, log.read_text()
            assert "connected" in log.read_text()
            assert is_connected(p, "sb-image")
        finally:
            with contextlib.suppress(ProcessLookupError):  # the background agent, by its group
                os.killpg(entry.pid, signal.SIGTERM)
        wait_for(lambda: not is_connected(p, "sb-image"), what="the agent gone")
        output = log.read_text()
        assert "Traceback" not in output
        assert "--tls" not in output  # no usage error
        assert "127.0.0.1:3000" not in output and "DEBUG" in output  # TUNNEL_AGENT_ARGS applied
    finally:
        p.close()


# -- the tunnel-agent distribution ----------------------------------------------------------
def _third_party_imports(package: str) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names} - stdlib - set(AGENT_PACKAGES)
    return found


def _requirement(req: str) -> tuple[str, str]:
    name = re.match(r"[A-Za-z0-9._-]+", req)
    assert name is not None
    return name.group(0).lower().replace("-", "_"), req


def test_agent_distribution_requires_exactly_what_the_agent_imports() -> None:
    agent_meta = tomllib.loads((ROOT / "packaging/agent/pyproject.toml").read_text())["project"]
    edge_meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    imports = set().union(*(_third_party_imports(p) for p in AGENT_PACKAGES))
    assert imports == {"h11", "wsproto", "orjson", "uvloop"}
    assert not imports & EDGE_ONLY
    required = dict(_requirement(r) for r in agent_meta["dependencies"])
    assert set(required) == imports
    # The same bounds as the edge's: the agent inside tunneld and the one alone are the same code.
    edge_required = dict(_requirement(r) for r in edge_meta["dependencies"])
    assert {n: edge_required[n] for n in required} == required
    assert agent_meta["version"] == edge_meta["version"]
    assert agent_meta["requires-python"] == edge_meta["requires-python"]
    assert agent_meta["scripts"] == {"tunnel-agent": edge_meta["scripts"]["tunnel-agent"]}


def test_the_wheel_installs_alone_and_its_agent_serves_a_preview_request(
    edge: Processes, service: int, tmp_path: Path
) -> None:
    """The tunnel-agent wheel (``make agent``) in a fresh venv: pip brings exactly the agent's
    dependencies (nothing of the edge's), ``import tunneld`` fails there, and its
    ``tunnel-agent`` console script connects, exposes and serves a preview request."""
    out = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, str(BUILD), "--what", "wheel", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("tunnel_agent-*.whl")
    stated = re.search(r"; the wheel (\d+) KiB\.", (ROOT / "docs" / "agent.md").read_text())
    assert stated, "docs/agent.md no longer states the wheel's size"
    built_kib = wheel.stat().st_size / 1024
    assert abs(int(stated.group(1)) - built_kib) <= 0.08 * built_kib, (stated[1], built_kib)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    names -= {"pip", "setuptools", "wheel"}  # what venv brings
    # h11 is wsproto's dependency as well as ours; nothing else may come along
    assert names == {"tunnel-agent", "h11", "wsproto", "orjson", "uvloop"}, names
    probe = subprocess.run(  # from tmp_path: the checkout's tunneld is not on sys.path
        [str(python), "-c", "import tunneld"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert probe.returncode != 0 and "No module named 'tunneld'" in probe.stderr

    sandbox = "wheel-agent"
    ports_file = tmp_path / "agent.json"
    script = str(venv / "bin" / "tunnel-agent")
    agent = edge._spawn(
        "wheel-agent",
        [script, "run", "--server", f"127.0.0.1:{edge.ports['agent']}", "--api-port", "0"],
        edge.env(
            TUNNEL_AGENT_TOKEN=edge.token(sandbox),
            TUNNEL_AGENT_SANDBOX_ID=sandbox,
            TUNNEL_AGENT_PORTS_FILE=str(ports_file),
        ),
    )
    api_port = wait_for_file(ports_file, agent, log=edge.logs[agent.pid])["api"]
    wait_for(lambda: is_connected(edge, sandbox), what=f"{sandbox} connected")
    exposed = subprocess.run(
        [script, "--api", f"http://127.0.0.1:{api_port}", "expose", str(service), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert exposed.returncode == 0, exposed.stderr + edge.output(agent)
    answer = preview_get(edge, json.loads(exposed.stdout)["exposedAt"], "/through-the-wheel")
    assert answer.status_code == 200 and answer.text == "hello from /through-the-wheel"
    assert edge.stop(agent) == 0
    assert "Traceback" not in edge.output(agent)


# -- the orjson stand-in ----------------------------------------------------------------------
def _load_fallback() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_orjson_fallback", ROOT / "packaging/agent/_orjson_fallback.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fallback = _load_fallback()

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.text()
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300)
@given(_JSON)
def test_fallback_writes_the_bytes_orjson_writes(value: Any) -> None:
    data = orjson.dumps(value)
    assert fallback.dumps(value) == data
    assert fallback.loads(data) == value
    assert fallback.loads(memoryview(data)) == orjson.loads(memoryview(data))


@settings(max_examples=200)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_fallback_floats_round_trip(value: float) -> None:
    # Same value; the text may differ in the exponent's padding (1e-07 here, 1e-7 in orjson).
    assert fallback.loads(fallback.dumps(value)) == value
    assert fallback.loads(orjson.dumps(value)) == value


BAD_DOCUMENTS = [
    b"",
    b" \n",
    b"\xff",
    b'"\xed\xa0\x80"',  # a surrogate encoded in UTF-8
    b'"\\ud800"',  # an escaped lone surrogate
    b'{"a": "\\udc00x"}',
    b"NaN",
    b"[Infinity]",
    b"-Infinity",
    b"1e400",
    b"1" * 5000,
    b"[" * 5000,
    b"\xef\xbb\xbf{}",
    b"[1] x",
    b"{'a': 1}",
    b"[1,]",
    "\ud800",
    123,
    None,
]


@pytest.mark.parametrize("doc", BAD_DOCUMENTS, ids=lambda d: repr(d)[:20])
def test_fallback_refuses_what_orjson_refuses_with_its_error(doc: Any) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(doc)
    with pytest.raises(fallback.JSONDecodeError) as info:
        fallback.loads(doc)
    assert isinstance(info.value, json.JSONDecodeError)


def test_fallback_reads_what_orjson_reads_at_the_edges() -> None:
    docs: list[Any] = [
        b'"\\ud83d\\ude00"',  # an escaped surrogate pair: one character
        b"18446744073709551615",
        b"18446744073709551616",  # beyond 64 bits: a float, as orjson reads it
        b"-9223372036854775809",
        b'{"a":1,"a":2}',
        b'"\\u0000"',
        bytearray(b"[1, 2.5, null]"),
        memoryview(b"xx[true]xx")[2:-2],
    ]
    for doc in docs:
        assert fallback.loads(doc) == orjson.loads(doc), doc
    assert type(fallback.loads(b"18446744073709551616")) is float


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        {"k": ["\udfff"]},
        1 << 64,
        -(1 << 63) - 1,
        {1: 2},
        b"bytes",
        {1, 2},
        object(),
        {"fine": [1, "two", None, True, 2.5]},  # the control: both write it
    ],
    # an object()'s repr holds its address: name it, so that every collection has the same ids
    ids=lambda value: "object()" if type(value) is object else repr(value),
)
def test_fallback_refuses_what_orjson_refuses_to_write(value: Any) -> None:
    try:
        expected = orjson.dumps(value)
    except orjson.JSONEncodeError:
        with pytest.raises(fallback.JSONEncodeError):
            fallback.dumps(value)
        with pytest.raises(TypeError):
            fallback.dumps(value)
    else:
        assert fallback.dumps(value) == expected


def test_fallback_depth_limit_is_orjsons() -> None:
    def nested(depth: int) -> list[Any]:
        value: list[Any] = []
        for _ in range(depth - 1):
            value = [value]
        return value

    assert fallback.dumps(nested(254)) == orjson.dumps(nested(254))
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(nested(255))
    with pytest.raises(fallback.JSONEncodeError):
        fallback.dumps(nested(255))


def test_fallback_differences_are_the_documented_ones() -> None:
    # orjson writes NaN as null; the stand-in refuses it (the agent never writes a float).
    assert orjson.dumps(math.nan) == b"null"
    with pytest.raises(fallback.JSONEncodeError):
        fallback.dumps(math.nan)


def test_the_pyz_size_in_the_agent_docs_is_the_built_ones(pyz: Path) -> None:
    """docs/agent.md gives the pyz's size twice; both must stay within 8 % of what
    `make agent` builds now, so the figure cannot drift as the agent grows."""
    text = (ROOT / "docs" / "agent.md").read_text()
    table = re.search(r"\| one file, (\d+) KiB: the agent, h11 and wsproto \|", text)
    prose = re.search(r"The pyz is about (\d+) KiB", text)
    assert table and prose, "docs/agent.md no longer states the pyz's size where expected"
    built_kib = pyz.stat().st_size / 1024
    for stated in (int(table.group(1)), int(prose.group(1))):
        assert abs(stated - built_kib) <= 0.08 * built_kib, (stated, round(built_kib))
