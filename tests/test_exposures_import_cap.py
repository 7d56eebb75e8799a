"""``tunneld exposures import`` and ``max_sandboxes``: the real CLI, on a real state directory.

The configured cap (config file or ``TUNNELD_MAX_SANDBOXES``, as ``tunneld serve`` reads it) is
the one the import counts against. As at ``serve``'s start-up, more sandboxes than that is kept,
never dropped: everything is imported (exit 0) and one warning line gives the count the directory
now holds and the configured cap; under the cap nothing is said.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.procs import BIN

WARNING = "tunneld exposures import: warning: "


def _lines(sandboxes: list[str], port: int = 8000) -> bytes:
    return "".join(
        json.dumps({"sandbox_id": s, "port": port, "token": f"t{i}"}) + "\n"
        for i, s in enumerate(sandboxes)
    ).encode()


def _cli(
    tmp_path: Path, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tunneld"), "exposures", *args, "--state-dir", str(tmp_path / "state")],
        input=stdin.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})},
    )


def _exported(tmp_path: Path) -> list[tuple[str, int]]:
    out = _cli(tmp_path, "export")
    assert out.returncode == 0, out.stderr
    return [(r["sandbox_id"], r["port"]) for r in map(json.loads, out.stdout.splitlines())]


@pytest.mark.parametrize("source", ["env", "config file"])
def test_an_import_past_the_configured_cap_keeps_everything_and_warns_once(
    tmp_path: Path, source: str
) -> None:
    if source == "env":
        env = {"TUNNELD_MAX_SANDBOXES": "3"}
    else:
        config = tmp_path / "tunneld.toml"
        config.write_text("max_sandboxes = 3\n")
        env = {"TUNNELD_CONFIG": str(config)}
    sandboxes = [f"sb{i}" for i in range(1, 6)]
    out = _cli(tmp_path, "import", stdin=_lines(sandboxes), env=env)
    assert out.returncode == 0, out.stderr
    assert "imported 5 exposures" in out.stderr, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith(WARNING)]
    assert len(warnings) == 1 and out.stderr.count("more than max_sandboxes") == 1, out.stderr
    assert warnings[0].startswith(
        WARNING + "5 sandboxes now have stored exposures, more than max_sandboxes (3)"
    ), warnings
    assert "409 TOO_MANY_SANDBOXES" in warnings[0] and "until fewer than 3" in warnings[0]
    assert _exported(tmp_path) == [(s, 8000) for s in sandboxes]  # nothing dropped


def test_the_count_is_what_the_directory_holds_after_the_import(tmp_path: Path) -> None:
    """Kept records count with the imported ones; --replace counts only the file's."""
    env = {"TUNNELD_MAX_SANDBOXES": "4"}
    out = _cli(tmp_path, "import", stdin=_lines(["a1", "a2", "a3"]), env=env)
    assert out.returncode == 0 and WARNING not in out.stderr, out.stderr  # 3: under the cap
    out = _cli(tmp_path, "import", stdin=_lines(["a3", "b1", "b2"], 9000), env=env)
    assert out.returncode == 0, out.stderr
    assert WARNING + "5 sandboxes now have stored exposures, more than max_sandboxes (4)" in (
        out.stderr
    ), out.stderr
    assert len(_exported(tmp_path)) == 6
    out = _cli(tmp_path, "import", "--replace", stdin=_lines(["c1", "c2"]), env=env)
    assert out.returncode == 0 and WARNING not in out.stderr, out.stderr
    assert _exported(tmp_path) == [("c1", 8000), ("c2", 8000)]


def test_at_the_cap_nothing_is_said(tmp_path: Path) -> None:
    out = _cli(
        tmp_path, "import", stdin=_lines(["sb1", "sb2", "sb3"]),
        env={"TUNNELD_MAX_SANDBOXES": "3"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"imported 3 exposures into {tmp_path / 'state' / 'exposures.db'}"
    ], out.stderr
