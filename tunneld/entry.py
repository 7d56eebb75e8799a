"""The ``tunneld`` program's entry point: its start-up signals are handled from here on.

The console script (``tunneld = "tunneld.entry:main"`` in pyproject.toml) and ``python -m
tunneld`` (tunneld/__main__.py) start here, not in :mod:`tunneld.cli`, whose imports (argparse,
asyncio, the configuration, relay/ ...) are the longest part of the start before ``tunneld
serve`` starts anything. :func:`main` takes the signals first and imports the CLI only then:

- SIGTERM (systemd's stop, an operator) and SIGINT (Ctrl-C) end the process at once
  (:func:`_stop_starting`): one line on stderr, exit 0 for SIGTERM and 130 for SIGINT, no
  traceback, since nothing has been started yet.
- SIGHUP (``systemctl reload``: ``ExecReload`` in deploy/tunneld.service) is deferred
  (:func:`_defer_reload`): noted, not acted on, and applied once, as a reload, when ``tunneld
  serve`` (tunneld/cli.py ``_serve``) or the ``--workers`` supervisor (tunneld/supervisor.py
  ``Supervisor.run``) installs its reload handler (:func:`take_deferred_reload`). Deferred, not
  ignored: the configuration may have been read already when the SIGHUP came, and a reload asked
  for must not be lost. Before, SIGHUP had its default action until then: the process died.

Whoever started this process may have held the three blocked: the ``--workers`` supervisor does,
for each worker, across the worker's whole Python start (tunneld/supervisor.py ``_start``), so
that a signal sent to a worker still starting waits for these handlers instead of killing it by
its default action (which the supervisor would see as a worker killed by SIGTERM or SIGINT).
:func:`handle_start_signals` lets them in right after installing the handlers: one that came
meanwhile is taken then, as above (a SIGTERM: exit 0, the worker stopped cleanly). Started with
none of them blocked (the single process; a worker restarted by a supervisor still running an
earlier version, which held only SIGHUP or nothing), the unblocking changes nothing.

Everything that starts something runs on an event loop whose own handlers replace these first;
the other commands get Python's defaults back once their command line is parsed
(:func:`restore_default_signals`). tunneld/cli.py takes the same signals in its first lines when
it is run as the program itself (``python -m tunneld.cli``, which the supervisor starts its
workers with, and console scripts written before this module). What comes before this module's
handlers: Python's own start, ``import tunneld`` (an empty package), this module's own
``import signal``, and the console script's ``import sys``; there a signal has its default
action, unless it is held blocked (a worker's).

Besides ``signal`` this module imports only what Python loaded at its start (``os``, ``sys``,
``types``).
"""

import os
import signal
import sys
from types import FrameType

__all__ = [
    "EXIT_INTERRUPTED",
    "START_SIGNALS",
    "handle_start_signals",
    "main",
    "restore_default_signals",
    "take_deferred_reload",
]

EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C), as shells report it; no traceback
# What is taken here; the supervisor holds these blocked across a worker's Python start.
START_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

_deferred_reload = False  # a SIGHUP came before the reload handler was installed


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


def _defer_reload(signum: int, frame: FrameType | None) -> None:
    """SIGHUP before the reload handler exists: noted, and applied once that handler is in."""
    global _deferred_reload
    _deferred_reload = True


def take_deferred_reload() -> bool:
    """Whether a SIGHUP came before the reload handler; cleared. Called right after the loop's
    SIGHUP handler is installed, so none is lost (one that comes just as it is installed may be
    seen by both: a second reload, harmless)."""
    global _deferred_reload
    deferred, _deferred_reload = _deferred_reload, False
    return deferred


def handle_start_signals() -> bool:
    """SIGTERM and SIGINT end the process (:func:`_stop_starting`), SIGHUP is deferred
    (:func:`_defer_reload`); then the three are let in where they were blocked (a worker's
    start), so that one pending now is handled at once, by these. False where Python refuses
    (not the main thread: an embedding program keeps its own handling)."""
    try:
        signal.signal(signal.SIGTERM, _stop_starting)
        signal.signal(signal.SIGINT, _stop_starting)
        signal.signal(signal.SIGHUP, _defer_reload)
    except ValueError:
        return False
    signal.pthread_sigmask(signal.SIG_UNBLOCK, START_SIGNALS)
    return True


def restore_default_signals() -> None:
    """Python's own handling of the three, for the commands other than ``serve``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> int:
    """The ``tunneld`` program: :func:`tunneld.cli.main` with its start-up signals handled."""
    handle_start_signals()
    from tunneld.cli import main as cli_main

    return cli_main()
