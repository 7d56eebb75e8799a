"""protocol/ is sans-IO: no event loop, sockets, threads, clock, OS access, nor the I/O shells.

Every ``.py`` under ``protocol/`` is parsed with :mod:`ast` and every import is checked, wherever it
appears (module level, inside functions, under ``if TYPE_CHECKING``), including ``__import__("x")``
and ``importlib.import_module("x")`` with a literal name. The checker itself is tested on synthetic
sources, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"

FORBIDDEN: frozenset[str] = frozenset(
    {
        # event loops
        "asyncio",
        "uvloop",
        "anyio",
        "trio",
        # I/O
        "socket",
        "ssl",
        "select",
        "selectors",
        "subprocess",
        "os",
        # threads and the clock: time comes in as an argument (``now: float``)
        "threading",
        "time",
        "datetime",
        # the shells depend on protocol/, never the reverse
        "relay",
        "agent",
        "tunneld",
    }
)

# The order above protocol/: relay/ (the asyncio shell both daemons share) imports protocol/ only;
# agent/ and tunneld/ import relay/ and protocol/ but not each other. The one exception is the
# demo, which runs an edge and an agent in one process on purpose.
ROOT = PROTOCOL_DIR.parent
SHELL_FORBIDDEN: dict[str, frozenset[str]] = {
    "relay": frozenset({"agent", "tunneld"}),
    "agent": frozenset({"tunneld"}),
    "tunneld": frozenset({"agent"}),
}
SHELL_EXEMPT: frozenset[str] = frozenset({"tunneld/demo.py"})


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def forbidden_imports(
    source: str, filename: str = "<string>", forbidden: frozenset[str] = FORBIDDEN
) -> list[str]:
    """``"file:line: name"`` for every import in ``source`` of a module in ``forbidden``."""
    found: list[str] = []

    def hit(node: ast.AST, module: str) -> None:
        if _top(module) in forbidden:
            found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {module}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                hit(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            # relative imports stay inside protocol/; "from . import x" has module None
            if node.level == 0 and node.module is not None:
                hit(node, node.module)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            is_dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
                isinstance(func, ast.Attribute) and func.attr == "import_module"
            )
            arg = node.args[0]
            if is_dynamic and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                hit(node, arg.value)
    return found


def protocol_files() -> list[Path]:
    return sorted(PROTOCOL_DIR.rglob("*.py"))


def test_protocol_package_exists() -> None:
    files = protocol_files()
    assert PROTOCOL_DIR / "__init__.py" in files
    assert len(files) >= 1


@pytest.mark.parametrize(
    "path", protocol_files(), ids=lambda p: str(p.relative_to(PROTOCOL_DIR.parent))
)
def test_protocol_module_is_sans_io(path: Path) -> None:
    assert_sans_io(path, PROTOCOL_DIR.parent)


def shell_files() -> list[Path]:
    files = (p for layer in SHELL_FORBIDDEN for p in (ROOT / layer).rglob("*.py"))
    return sorted(p for p in files if str(p.relative_to(ROOT)) not in SHELL_EXEMPT)


@pytest.mark.parametrize("path", shell_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_layers_import_only_downwards(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    found = forbidden_imports(
        path.read_text(encoding="utf-8"), rel, SHELL_FORBIDDEN[path.parts[len(ROOT.parts)]]
    )
    assert found == [], "layer order protocol -> relay -> agent | tunneld broken:\n" + "\n".join(
        found
    )


def test_shell_checker_would_fail(tmp_path: Path) -> None:
    assert forbidden_imports("from tunneld.edge import x", "relay/x.py", SHELL_FORBIDDEN["relay"])
    assert forbidden_imports("import agent.core", "tunneld/x.py", SHELL_FORBIDDEN["tunneld"])
    assert not forbidden_imports("from relay.mux import x", "agent/x.py", SHELL_FORBIDDEN["agent"])


def assert_sans_io(path: Path, root: Path) -> None:
    rel = str(path.relative_to(root))
    found = forbidden_imports(path.read_text(encoding="utf-8"), rel)
    assert found == [], "protocol/ must stay sans-IO; forbidden imports:\n" + "\n".join(found)


# --- the checker catches what it must ------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_checker_flags_every_forbidden_module(module: str) -> None:
    for source in (
        f"import {module}",
        f"import {module} as alias",
        f"import json, {module}",
        f"import {module}.sub",
        f"from {module} import x",
        f"from {module}.sub import x",
        f"def f():\n    import {module}\n",
        f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from {module} import x\n",
        f"try:\n    import {module}\nexcept ImportError:\n    pass\n",
        f"m = __import__({module!r})",
        f"import importlib\nm = importlib.import_module({module!r})",
    ):
        found = forbidden_imports(source)
        assert len(found) == 1, source
        assert found[0].endswith(module) or module + "." in found[0], (source, found)


def test_checker_reports_file_and_line() -> None:
    source = "import json\n\nimport asyncio\n"
    assert forbidden_imports(source, "protocol/x.py") == ["protocol/x.py:3: asyncio"]


@pytest.mark.parametrize(
    "source",
    [
        "import json",
        "import struct, enum, hmac, secrets, re",
        "from dataclasses import dataclass",
        "from collections.abc import Callable",
        "import orjson",
        "from . import frames",
        "from .frames import Frame",
        "from ..protocol import x",  # relative: never a top-level package
        "import osmium",  # a prefix of a forbidden name is not that name
        "import timeit",
        "import agents",
        "import protocol.time",  # a submodule of ours that happens to be named time
        "x = os_name = 'os'",
        "importlib.import_module(name)",  # dynamic name: cannot judge, not flagged
    ],
)
def test_checker_allows(source: str) -> None:
    assert forbidden_imports(source) == []


def test_checker_would_fail_the_real_test(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text("from __future__ import annotations\nimport struct\n", encoding="utf-8")
    assert_sans_io(good, tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("from __future__ import annotations\nimport time\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"bad\.py:2: time"):
        assert_sans_io(bad, tmp_path)
