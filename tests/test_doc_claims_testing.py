"""docs/testing.md's claims about the suite itself: the files, fixtures and helpers it names
exist and do what it says, every test it cites (planted-bug evidence included) exists, the
"Running one layer" commands name real paths and real tests, the backends and parsers each layer
runs on, the real programs and how they are started, and `make mutation`'s configuration."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from tests.test_doc_claims_readme import check_links

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DOC = (ROOT / "docs" / "testing.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else len(DOC)]


def _defines(path: Path, name: str) -> bool:
    """``path`` defines ``name`` (a function, class, or an assigned module-level name), or
    ``Class.method``."""
    tree = ast.parse(path.read_text())
    head, _, rest = name.partition(".")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (
            node.name == head
        ):
            return not rest or any(
                isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == rest
                for n in node.body
            )
        if (
            isinstance(node, ast.Assign)
            and not rest
            and any(isinstance(t, ast.Name) and t.id == head for t in node.targets)
        ):
            return True
    return False


def _files(name: str) -> list[Path]:
    path = ROOT / name
    if path.exists():
        return [path]
    return sorted(TESTS.rglob(Path(name).name))


def test_every_link_of_testing_md_resolves() -> None:
    check_links(ROOT / "docs" / "testing.md")


def test_every_test_file_and_test_it_cites_exists() -> None:
    """`tests/...py::name` and `test_x.py::name` (the planted-bug table, the layers); names
    abbreviated with '...' only need their file."""
    cited = re.findall(r"`((?:tests/)?[\w/]*test_\w+\.py)(?:::([^`\s]+))?`", DOC)
    assert len(cited) >= 40
    for file, name in cited:
        files = _files(file)
        assert files, file
        if name and "..." not in name:
            test = name.split("::")[0].split("[")[0]
            assert any(_defines(f, test) for f in files), f"{file}::{name}"


def test_the_layers_table_names_real_directories_files_and_helpers() -> None:
    layers = _section("Layers")
    for directory in re.findall(r"`(tests/[\w/]+/)`", layers):
        assert (ROOT / directory).is_dir(), directory
    for file in re.findall(r"`([\w/]+\.py)`", layers):
        assert _files(file), file
    helpers = {
        "SessionPair": TESTS / "protocol" / "conftest.py",
        "Stack": TESTS / "e2e" / "conftest.py",
        "Registry.match": ROOT / "tunneld" / "registry.py",
        "no_unhandled_errors": TESTS / "e2e" / "conftest.py",
    }
    for name, path in helpers.items():
        assert f"`{name}`" in layers, name
        assert _defines(path, name), name
    assert "`hostile_edge.py`" in layers and (TESTS / "faults" / "hostile_edge.py").exists()
    assert "`origin.py`" in layers and (TESTS / "e2e" / "origin.py").exists()


def test_the_backends_and_parsers_each_layer_runs_on() -> None:
    """SDK: 'anyio on three backends' (asyncio, uvloop, trio); e2e: 'parametrised over asyncio
    and uvloop'; the design's 'Tests run the public listener against both parsers'."""
    sdk = (TESTS / "sdk" / "conftest.py").read_text()
    for backend in ('"asyncio"', '"trio"', "use_uvloop"):
        assert backend in sdk, backend
    e2e = (TESTS / "e2e" / "conftest.py").read_text()
    assert 'id="asyncio"' in e2e and 'id="uvloop"' in e2e
    assert '@pytest.fixture(params=["httptools", "h11"])' in e2e
    users = [p for p in (TESTS / "e2e").glob("test_*.py") if "any_parser_stack" in p.read_text()]
    assert users


def test_the_guards_and_helpers_of_the_rules_exist() -> None:
    """'filterwarnings = error holds for the whole suite'; the autouse guard covers setup,
    call and teardown; `wait_until` (e2e, sdk), `_wait` and `Forwarder` in test_processes.py;
    test_backpressure.py imports its bounds' constants; procs.py logs children to files."""
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert pytest_ini["ini_options"]["filterwarnings"] == ["error"]
    conftest = (TESTS / "e2e" / "conftest.py").read_text()
    assert "@pytest.fixture(autouse=True)\ndef no_unhandled_errors(" in conftest
    guard = conftest[conftest.index("def no_unhandled_errors") :]
    for phase in ("setup", "call", "teardown"):
        assert f'"{phase}"' in guard, phase
    assert _defines(TESTS / "e2e" / "conftest.py", "wait_until")
    assert _defines(TESTS / "sdk" / "conftest.py", "wait_until")
    processes = TESTS / "e2e" / "test_processes.py"
    assert _defines(processes, "_wait") and _defines(processes, "Forwarder")
    backpressure = (TESTS / "e2e" / "test_backpressure.py").read_text()
    for constant in (
        "TUNNEL_HIGH_WATER", "LOCAL_HIGH_WATER", "MAX_FRAME_PAYLOAD", "DEFAULT_MAX_STREAM_WINDOW",
    ):  # fmt: skip
        assert re.search(rf"^from .*import .*\b{constant}\b|^    {constant},$", backpressure, re.M)
    procs = (TESTS / "e2e" / "procs.py").read_text()
    assert "stdout=out, stderr=subprocess.STDOUT" in procs and "PIPE" not in procs


def test_the_running_one_layer_commands_name_real_paths_and_tests() -> None:
    block = re.search(r"## Running one layer\n\n```sh\n(.*?)```", DOC, re.S)
    assert block is not None
    for line in block.group(1).splitlines():
        command = line.split("#")[0].split()
        if command[:1] == ["make"]:
            assert re.search(rf"^{command[1]}:", (ROOT / "Makefile").read_text(), re.M)
            continue
        assert command[:3] == [".venv/bin/python", "-m", "pytest"], line
        assert (ROOT / command[3]).exists(), command[3]
        if "-k" in command:
            names = re.findall(r"not (\w+)", line)
            tests = (ROOT / command[3]).rglob("test_*.py")
            text = "\n".join(p.read_text() for p in tests)
            for name in names:  # the deselected tests exist, so the -k is not stale
                assert re.search(rf"def test_\w*{name}\w*\(", text), name


def test_the_real_programs_are_started_by_the_files_named_and_never_skipped() -> None:
    """'Real programs the tests start': each file starts the program it is named for, `make
    unit` installs them (TEST_TOOLS), and none of these tests skips."""
    section = _section("Real programs the tests start")
    makefile = (ROOT / "Makefile").read_text()
    tools = re.search(r"^TEST_TOOLS := (.*?)\n\n?ensure-test-tools:", makefile, re.M | re.S)
    assert tools is not None
    assert re.search(r"^unit: .*ensure-test-tools", makefile, re.M)
    started = {
        "redis-server": ["tests/redis_server.py"],
        "tinyproxy": ["tests/faults/test_agent_proxy.py"],
        "nginx": ["tests/test_proxyproto.py", "tests/e2e/test_public_tcp.py"],
        "chromium": ["tests/e2e/test_browser.py"],
        "curl": ["tests/e2e/test_http2.py"],
        "wrk": ["tests/test_bench_https.py"],
        "h2load": ["tests/test_bench_https.py"],
        "buildah": ["tests/agent/test_sandbox_image.py"],
        "mmdebstrap": ["tests/agent/test_sandbox_image.py"],
    }
    for program, files in started.items():
        assert f"{program}=" in tools.group(1), program
        for file in files:
            assert f"`{file}`" in section, file
            text = (ROOT / file).read_text()
            assert program in text, (program, file)
            assert not re.search(r"pytest\.skip\(|skipif|importorskip", text), file
    assert "RedisServer" in section and _defines(TESTS / "redis_server.py", "RedisServer")
    assert "--headless" in (TESTS / "e2e" / "test_browser.py").read_text()


def test_make_mutation_is_configured_as_described() -> None:
    """'`make mutation` installs the optional mutation group (mutmut) and runs it, niced, over
    protocol/frames.py and protocol/session.py with the protocol unit tests'; 'Results stay in
    mutants/ (git-ignored)'."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert any(d.startswith("mutmut") for d in extras["mutation"])
    mutmut = pyproject["tool"]["mutmut"]
    assert mutmut["only_mutate"] == ["protocol/frames.py", "protocol/session.py"]
    assert mutmut["pytest_add_cli_args_test_selection"] == ["tests/protocol/"]
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nmutation:") :]
    assert "pip install -q -e '.[mutation]'" in recipe and "nice -n 10 " in recipe
    assert "mutants/" in (ROOT / ".gitignore").read_text().splitlines()
