"""Build the agent alone, without the edge (``make agent``; docs/agent.md, "Installing the agent").

    python tools/build_agent.py [--out dist] [--what pyz|wheel|all]

- ``dist/tunnel-agent.pyz``: a zipapp (``zipapp.create_archive``, compressed) holding agent/,
  protocol/ and relay/ from this checkout, the pure-Python h11 and wsproto taken from the running
  interpreter's installation (with their licences), packaging/agent/_orjson_fallback.py and
  packaging/agent/zipapp_main.py as ``__main__.py``. It runs with any python3 >= 3.11 and nothing
  installed: ``python3 tunnel-agent.pyz run --server ...``.
- ``dist/tunnel_agent-VERSION-py3-none-any.whl``: the ``tunnel-agent`` distribution
  (packaging/agent/pyproject.toml) built by ``pip wheel`` from a staging copy in
  build/tunnel-agent/ (pip fetches setuptools into an isolated build environment, as for the
  edge's own install).

Only source files are packed (no ``__pycache__``): bytecode is specific to one Python version, and
the sandbox's python3 may be any >= 3.11. The build refuses to vendor a distribution that ships
compiled files or needs one that is not vendored, rather than making a zipapp that fails in the
sandbox. Exit status 0 on success, 2 on a usage error, 1 when a build step fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import zipapp
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGING: Final = ROOT / "packaging" / "agent"
PYZ_NAME: Final = "tunnel-agent.pyz"
INTERPRETER: Final = "/usr/bin/env python3"
# The agent's own packages (whole: relay/linked.py is the edge's, but small and stdlib-only).
PACKAGES: Final = ("agent", "protocol", "relay")
# Pure-Python distributions the agent imports, packed into the zipapp. orjson and uvloop are
# compiled: the zipapp uses them when the sandbox's python has them, and otherwise
# _orjson_fallback (json) and asyncio's own event loop.
VENDORED: Final = ("h11", "wsproto")
_SOURCE_SUFFIXES: Final = frozenset({".py", ".typed"})
_COMPILED_SUFFIXES: Final = frozenset({".so", ".pyd", ".dylib", ".dll"})


class BuildError(Exception):
    pass


def _copy_sources(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix not in _SOURCE_SUFFIXES:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return match.group(0).lower().replace("_", "-")


def _vendor(name: str, stage: Path) -> None:
    """Copy installed distribution ``name``'s top-level package and licence into ``stage``."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"{name} is not installed in {sys.executable}: run `make setup`") from None
    for requirement in dist.requires or ():
        if ";" in requirement:  # an extra or a platform marker: not needed at run time here
            continue
        if _requirement_name(requirement) not in VENDORED:
            raise BuildError(f"{name} needs {requirement}, which is not vendored")
    files = dist.files or []
    compiled = [str(f) for f in files if Path(str(f)).suffix in _COMPILED_SUFFIXES]
    if compiled:
        raise BuildError(f"{name} ships compiled files ({compiled[0]}): it cannot go in a zipapp")
    module_file = __import__(name).__file__
    if module_file is None:
        raise BuildError(f"{name} is not a regular package")
    package_dir = Path(module_file).parent
    _copy_sources(package_dir, stage / name)
    licences = [f for f in files if re.search(r"LICEN[CS]E|COPYING", str(f), re.IGNORECASE)]
    if not licences:
        raise BuildError(f"{name}: no licence file found in its installation")
    for licence in licences:
        target = stage / "LICENSES" / f"{name}-{dist.version}-{Path(str(licence)).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(str(licence.locate())), target)


def build_pyz(out_dir: Path) -> Path:
    """Build ``out_dir/tunnel-agent.pyz``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / PYZ_NAME
    with tempfile.TemporaryDirectory(prefix="tunnel-agent-pyz-") as tmp:
        stage = Path(tmp)
        for package in PACKAGES:
            _copy_sources(ROOT / package, stage / package)
        for name in VENDORED:
            _vendor(name, stage)
        shutil.copyfile(PACKAGING / "_orjson_fallback.py", stage / "_orjson_fallback.py")
        shutil.copyfile(PACKAGING / "zipapp_main.py", stage / "__main__.py")
        partial = out_dir / (PYZ_NAME + ".tmp")
        zipapp.create_archive(stage, partial, interpreter=INTERPRETER, compressed=True)
        partial.replace(target)  # a reader never sees a half-written archive
    return target


def build_wheel(out_dir: Path) -> Path:
    """Build the ``tunnel-agent`` wheel into ``out_dir``; returns its path."""
    stage = ROOT / "build" / "tunnel-agent"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for package in PACKAGES:
        _copy_sources(ROOT / package, stage / package)
    shutil.copyfile(PACKAGING / "pyproject.toml", stage / "pyproject.toml")
    shutil.copyfile(PACKAGING / "README.md", stage / "README.md")
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out_dir), str(stage)]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise BuildError("pip wheel failed (output above)")
    built = sorted(out_dir.glob("tunnel_agent-*.whl"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise BuildError(f"pip wheel wrote no tunnel_agent-*.whl into {out_dir}")
    return built[-1]  # the newest: pip rewrites an existing wheel of the same version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory")
    parser.add_argument("--what", choices=("pyz", "wheel", "all"), default="all")
    args = parser.parse_args(argv)
    try:
        if args.what in ("pyz", "all"):
            pyz = build_pyz(args.out)
            print(f"{pyz}: {pyz.stat().st_size / 1024:.0f} KiB")
        if args.what in ("wheel", "all"):
            wheel = build_wheel(args.out)
            print(f"{wheel}: {wheel.stat().st_size / 1024:.0f} KiB")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
