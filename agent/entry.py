"""The ``tunnel-agent`` program's entry point: Ctrl-C exits 130 from its first statement on.

The console script (``tunnel-agent = "agent.entry:main"`` in pyproject.toml), ``python -m agent``
(agent/__main__.py) and ``tunnel-agent.pyz`` (packaging/agent/zipapp_main.py) start here, not in
:mod:`agent.cli`: importing the CLI takes 20-120 ms (argparse, http.client, ssl, email, json,
protocol/, orjson ...), and a SIGINT that landed then raised ``KeyboardInterrupt`` inside an
import, which printed a traceback, once a ``TypeError`` from a half-imported ssl, and once
crashed Python 3.13 (exit -11). So :func:`main` installs the SIGINT handler first and imports the
CLI only then. Besides ``signal`` this module imports only what Python loaded at its start
(``os``, ``sys``, ``types``): what runs before the handler is Python's own start (site, and the
console script's ``import sys``) and these few lines, where a Ctrl-C is still Python's own
``KeyboardInterrupt``.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["EXIT_INTERRUPTED", "exit_on_sigint", "main"]

EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as shells report it; agent.cli.EXIT_INTERRUPTED


def _exit_interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGINT (Ctrl-C) in the ``tunnel-agent`` program: exit 130 at once, without a traceback.

    A ``KeyboardInterrupt`` can land anywhere: half-way through an import, or through
    ``http.client`` building its response objects, whose destructors then print "Exception
    ignored ... AttributeError" tracebacks at exit. ``os._exit`` runs no destructor: the streams
    are flushed, then the process ends (this never returns). ``run`` replaces this handler with
    its own (a clean stop) while its loop runs.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, RuntimeError, ValueError):  # closed, broken pipe, or mid-write
            pass
    os._exit(EXIT_INTERRUPTED)


def exit_on_sigint() -> None:
    """From now on SIGINT ends the process with exit status 130 and no traceback.

    In the main thread only (elsewhere ``signal.signal`` refuses, and ``KeyboardInterrupt``
    stays, which :func:`agent.cli.main` turns into 130 too)."""
    try:
        signal.signal(signal.SIGINT, _exit_interrupted)
    except ValueError:  # not the main thread
        pass


def main() -> int:
    """The ``tunnel-agent`` program: :func:`agent.cli.main` with Ctrl-C handled from the start."""
    exit_on_sigint()
    from agent.cli import main as cli_main

    return cli_main()
