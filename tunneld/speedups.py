"""The optional C extension ``tunneld._speedups``: which implementation this process uses.

Theory of operation
-------------------
With the access log on, the edge's per-request work (validating a whole response's head,
adding the ``x-request-id`` line to it, formatting the text line, finding the client's request
id) cost ~48k instructions of Python per small request, ~38 % of relaying it
(docs/performance.md, "Access log (issue 10)"). tunneld/_speedups.c does each of those in one C
call. It is optional, as in aiohttp, yarl and multidict: ``pip install`` compiles it when it
can (setup.py, ``optional=True``) and goes on without it when it cannot; the pure-Python
functions (``*_py`` in tunneld/responses.py and tunneld/accesslog.py) stay the reference
implementation and the fallback, and tests/test_speedups.py checks that both give the same
results on arbitrary and hostile bytes. ``TUNNELD_NO_EXTENSIONS=1`` (any value but empty or
``0``) in the environment makes a process use the pure-Python code even when the extension is
built.

``c`` is the loaded extension module, or None; ``describe()`` says which is in use (logged at
the start of ``tunneld serve``).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["DISABLED", "c", "describe"]

DISABLED = os.environ.get("TUNNELD_NO_EXTENSIONS", "") not in ("", "0")


def _load() -> ModuleType | None:
    if DISABLED:
        return None
    try:
        from . import _speedups
    except ImportError:  # not built here: the pure-Python code
        return None
    return _speedups


c = _load()


def describe() -> str:
    if c is not None:
        return "C speedups (tunneld._speedups)"
    if DISABLED:
        return "pure Python (TUNNELD_NO_EXTENSIONS is set)"
    return "pure Python (tunneld._speedups is not built)"
