"""The Makefile's choice of interpreter (issue 13), run with real `make` against a PATH we build.

Each test puts tiny shell-script stand-ins (python3.13, python3, python3.10, ...) in a temp dir and
runs `make print-python` (or `make setup`) with PATH set to that dir alone, or that dir first and
then /usr/bin:/bin where a test needs coreutils; the stand-ins then always win, so the pyenv shims
and /usr/bin/python3.11 of the machine cannot leak in. A stand-in answers the version probe
(`-c 'import sys; ...'`) with the version it was made for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def stand_in(directory: Path, name: str, version: str, log: Path | None = None) -> Path:
    """A fake interpreter: prints `version` for `-c`, logs its arguments, fakes `-m venv DIR`."""
    path = directory / name
    lines = ["#!/bin/sh"]
    if log is not None:
        lines.append(f'echo "$0 $*" >> "{log}"')
    lines += [
        'case "$1" in',
        f"-c) echo {version} ;;",
        f"-V | --version) echo 'Python {version}.0' ;;",
        # `python -m venv --clear DIR`: make DIR/bin/python a copy of this stand-in.
        '-m) if [ "$2" = venv ]; then mkdir -p "$4/bin" && cp "$0" "$4/bin/python"; fi ;;',
        "esac",
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def broken_shim(directory: Path, name: str) -> Path:
    """Like a pyenv shim for a version that is installed but not active: exists, fails to run."""
    path = directory / name
    path.write_text(f"#!/bin/sh\necho 'pyenv: {name}: command not found' >&2\nexit 127\n")
    path.chmod(0o755)
    return path


def make(*args: str, path: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # a `make test PYTHON=...` around us must not leak into the make under test
        if k not in {"PYTHON", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    }
    env["PATH"] = path
    if python is not None:
        env["PYTHON"] = python
    assert MAKE is not None
    return subprocess.run(
        [MAKE, "-s", "--no-print-directory", "-C", str(ROOT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def test_only_python3_13_is_picked(fake: Path) -> None:
    stand_in(fake, "python3.13", "3.13")
    result = make("print-python", path=str(fake))
    assert (result.returncode, result.stdout.strip()) == (0, str(fake / "python3.13")), result


def test_the_newest_of_several_wins(fake: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    stand_in(fake, "python3.11", "3.11")
    stand_in(fake, "python3", "3.11")
    stand_in(fake, "python3.10", "3.10")
    stand_in(other, "python3.13", "3.13")  # later on PATH, still the newest
    stand_in(fake, "python3.12", "3.12")
    result = make("print-python", path=f"{fake}:{other}")
    assert (result.returncode, result.stdout.strip()) == (0, str(other / "python3.13")), result


def test_a_shim_that_does_not_run_is_skipped(fake: Path) -> None:
    # This machine: ~/.pyenv/shims/python3.13 exists but fails, 3.11 is the active version.
    broken_shim(fake, "python3.13")
    stand_in(fake, "python3.12", "3.12")
    result = make("print-python", path=str(fake))
    assert (result.returncode, result.stdout.strip()) == (0, str(fake / "python3.12")), result


def test_only_python3_is_picked_when_it_is_new_enough(fake: Path) -> None:
    stand_in(fake, "python3", "3.12")
    result = make("print-python", path=str(fake))
    assert (result.returncode, result.stdout.strip()) == (0, str(fake / "python3")), result


@pytest.mark.parametrize("name", ["python3.10", "python3"])
def test_only_python_3_10_is_a_clear_error(fake: Path, name: str) -> None:
    stand_in(fake, name, "3.10")
    broken_shim(fake, "python3.12")
    result = make("print-python", path=str(fake))
    assert result.returncode == 2, result
    assert result.stdout == ""
    err = result.stderr
    assert "no Python >= 3.11 found" in err
    assert "python3.11" in err and "then python3" in err  # what it looked for
    assert f"{name}: Python 3.10, too old" in err  # what it found instead
    assert f"{fake / 'python3.12'}: does not run" in err
    assert "apt-get install python3" in err and "PYTHON=/path/to/python3" in err  # how to fix
    assert "Traceback" not in err
    # make exits 2 on any failed recipe; the script itself says 2 as well
    script = subprocess.run(
        ["/bin/sh", str(ROOT / "tools" / "find_python.sh")],
        env={"PATH": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (script.returncode, script.stdout) == (2, ""), script
    assert "no Python >= 3.11 found" in script.stderr


def test_python_from_the_environment_is_honoured(fake: Path, tmp_path: Path) -> None:
    stand_in(fake, "python3.13", "3.13")
    chosen = stand_in(tmp_path, "my-python", "3.11")
    result = make("print-python", path=str(fake), python=str(chosen))
    assert (result.returncode, result.stdout.strip()) == (0, str(chosen)), result


def test_python_on_the_command_line_is_honoured(fake: Path) -> None:
    stand_in(fake, "python3.13", "3.13")
    stand_in(fake, "python3.12", "3.12")
    result = make("print-python", "PYTHON=python3.12", path=str(fake))
    assert (result.returncode, result.stdout.strip()) == (0, "python3.12"), result


@pytest.mark.parametrize(
    ("version", "why"), [("3.10", "is Python 3.10"), (None, "was not found or does not run")]
)
def test_an_unusable_python_setting_is_a_clear_error(
    fake: Path, version: str | None, why: str
) -> None:
    stand_in(fake, "python3.13", "3.13")
    if version is None:
        broken_shim(fake, "python3.10")
    else:
        stand_in(fake, "python3.10", version)
    result = make("print-python", "PYTHON=python3.10", path=str(fake))
    assert result.returncode == 2, result
    assert f"PYTHON=python3.10 {why}" in result.stderr
    assert "tunneld needs Python 3.11 or newer" in result.stderr


def test_setup_creates_the_venv_with_the_pick_then_reuses_it(fake: Path, tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    stand_in(fake, "python3.13", "3.13", log=log)
    stand_in(fake, "python3.11", "3.11", log=log)
    venv = tmp_path / "venv"
    path = f"{fake}:/usr/bin:/bin"  # mkdir, cp, touch; the stand-ins come first and are newer

    first = make("setup", f"VENV={venv}", path=path)
    assert first.returncode == 0, first
    assert f"creating it with {fake / 'python3.13'}" in first.stdout
    calls = log.read_text().splitlines()
    assert f"{fake / 'python3.13'} -m venv --clear {venv}" in calls
    assert f"{venv}/bin/python -m pip install -q -e .[test]" in calls
    assert (venv / ".installed").exists()

    # pyproject.toml newer than the stamp: reinstall into the same venv, never recreate it
    # (the shared .venv of a checkout must survive a pyproject.toml edit).
    (venv / ".installed").unlink()
    log.write_text("")
    second = make("setup", f"VENV={venv}", "PYTHON=python3.11", path=path)
    assert second.returncode == 0, second
    assert "reusing it (Python 3.13.0)" in second.stdout
    assert "PYTHON=python3.11 applies only when it is created" in second.stdout
    calls = log.read_text().splitlines()
    assert not [c for c in calls if "-m venv" in c], calls
    assert f"{venv}/bin/python -m pip install -q -e .[test]" in calls


def test_this_machine_has_a_pick() -> None:
    """The default selection works where the suite runs (CI builds .venv with it)."""
    result = make("print-python", path=os.environ["PATH"])
    assert result.returncode == 0, result
    picked = result.stdout.strip()
    probe = subprocess.run(
        [picked, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.stdout.strip() == "True", (picked, probe)
