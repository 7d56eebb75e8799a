"""The ``tunneld`` program's entry point: a stop signal during its start is handled from here on.

The console script (``tunneld = "tunneld.entry:main"`` in pyproject.toml) and ``python -m
tunneld`` (tunneld/__main__.py) start here, not in :mod:`tunneld.cli`, whose imports (argparse,
asyncio, the configuration, relay/ ...) are the longest part of the start before ``tunneld
serve`` starts anything. :func:`main` takes the signals first and imports the CLI only then:

- SIGTERM (systemd's stop, an operator) and SIGINT (Ctrl-C) end the process at once
  (:func:`_stop_starting`): one line on stderr, exit 0 for SIGTERM and 130 for SIGINT, no
  traceback, since nothing has been started yet.

Everything that starts something runs on an event loop whose own handlers replace these first;
the other commands get Python's defaults back once their command line is parsed
(:func:`restore_default_signals`). tunneld/cli.py takes the same signals in its first lines when
it is run as the program itself (``python -m tunneld.cli``, which the supervisor starts its
workers with, and console scripts written before this module). What comes before this module's
handlers: Python's own start, ``import tunneld`` (an empty package), this module's own
``import signal``, and the console script's ``import sys``.

Besides ``signal`` this module imports only what Python loaded at its start (``os``, ``sys``,
``types``).
"""

import os
import signal
import sys
from types import FrameType

__all__ = [
    "EXIT_INTERRUPTED",
    "handle_start_signals",
    "main",
    "restore_default_signals",
]

EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as shells report it; no traceback


def _stop_starting(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or SIGINT before ``tunneld serve`` started anything: exit now, one line, no
    traceback. ``os._exit``: a ``KeyboardInterrupt`` raised inside an import or a half-built
    object prints tracebacks (and worse); there is nothing to clean up yet."""
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    try:
        sys.stderr.write(f"tunneld: {name} during start-up: stopped before serving\n")
        sys.stderr.flush()
    except (OSError, RuntimeError, ValueError, AttributeError):  # closed, mid-write, or None
        pass
    os._exit(0 if signum == signal.SIGTERM else EXIT_INTERRUPTED)


def handle_start_signals() -> bool:
    """SIGTERM and SIGINT end the process (:func:`_stop_starting`). False where Python refuses
    (not the main thread: an embedding program keeps its own handling)."""
    try:
        signal.signal(signal.SIGTERM, _stop_starting)
        signal.signal(signal.SIGINT, _stop_starting)
    except ValueError:
        return False
    return True


def restore_default_signals() -> None:
    """Python's own handling of both, for the commands other than ``serve``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> int:
    """The ``tunneld`` program: :func:`tunneld.cli.main` with its start-up signals handled."""
    handle_start_signals()
    from tunneld.cli import main as cli_main

    return cli_main()
