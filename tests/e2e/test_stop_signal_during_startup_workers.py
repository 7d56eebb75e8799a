"""A stop signal that reaches a ``tunneld serve --workers 2`` worker while its Python still starts
stops it cleanly: never a death by the signal's default action.

The worker's Python start (``python -m tunneld.cli``: Python's own start, ``import tunneld``,
tunneld/cli.py up to its first lines, which install tunneld/entry.py's handlers) runs with
SIGTERM, SIGINT and SIGHUP held blocked by the supervisor (tunneld/supervisor.py ``_start``); a
stop signal meanwhile waits for entry.py's handlers, which let it in: the worker exits 0 (SIGTERM)
or 130 (SIGINT) with one line, and the supervisor, stopping too, logs it as a worker stopped
before it was ready, neither a crash nor one to restart. Worker 0 at a point of its start (the
hooks of tests/signal_hooks.py; test_signal_before_handlers.py's docstring says how they work)
gets the signal as it does in production:

- SIGTERM to the supervisor, passed on to the starting worker (``TERM-up``: the worker holds its
  own SIGTERM until the supervisor passed it on, then has the mask it would have at that point);
- systemd's stop: SIGTERM to every process of the unit at once (``TERM-all``);
- a terminal's Ctrl-C: SIGINT to the whole foreground process group (``INT``);
- SIGTERM to worker 0 alone (an operator's ``kill``): it exits 0, and the supervisor, not
  stopping, takes it as a worker that ended before every worker was ready: a failed start
  (docs/operations.md, Workers: it stops the other worker and exits 1).

And a worker whose start hangs with the SIGTERM held (``TERM-up-stuck``) is killed by the
supervisor's bounded stop (SIGKILL ``grace_period + STOP_MARGIN`` after SIGTERM, logged), which
then exits 0.

Two races of that stop, made to happen every time: a worker that ends while the supervisor's own
SIGTERM is still pending (``TERM-starved``: Linux runs SIGCHLD's handler first; the supervisor
took the worker for a failed start and exited 1 before ``_reap_soon``), and the private
redis-server, which systemd's stop signals too, exiting just after it answered the write-back's
check (``TERM-redis``: "exposures NOT written back", exit 1, before it was checked again). On a
busy 2-core host the first was seen in 5 of 30 runs of the ``systemd's stop`` cases, the second
in 1 of 20.

The points before entry.py's handlers (``import:tunneld``, ``import:tunneld.cli``,
``import:tunneld.entry``) failed before the supervisor held SIGTERM and SIGINT: worker 0 "was
killed by SIGTERM" (or SIGINT); the point after them (``import:argparse``) checks that the
handlers are in once the held signals are let in.
"""

from __future__ import annotations

import re

import pytest

from .test_signal_before_handlers import (
    Run,
    run,  # noqa: F401  (the fixture)
)
from .test_signal_during_startup import needs_redis

# Worker 0's points: its Python start before tunneld/entry.py's handlers, then one after them.
BEFORE_HANDLERS = ["import:tunneld", "import:tunneld.cli", "import:tunneld.entry"]
POINTS = [*BEFORE_HANDLERS, "import:argparse"]
# how the stop reaches worker 0: (hook, the signal the supervisor gets, worker 0's exit status)
STOPS = {
    "SIGTERM passed on": ("TERM-up", "SIGTERM", 0),
    "systemd's stop": ("TERM-all", "SIGTERM", 0),
    "Ctrl-C": ("INT", "SIGINT", 130),
}
STOP_MARGIN = 10  # tunneld.supervisor.STOP_MARGIN: SIGTERM -> SIGKILL beyond the grace period


def check_no_signal_death(text: str) -> None:
    assert "was killed by" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "restarting it" not in text and "all 2 workers ready" not in text, text[-3000:]


@needs_redis
@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("point", POINTS)
def test_a_stop_while_a_worker_starts_stops_it_cleanly_with_the_supervisor(
    run: Run,  # noqa: F811  (the fixture imported above)
    point: str,
    stop: str,
) -> None:
    how, sig, code = STOPS[stop]
    run.start("script", point, how, "--workers", "2", where="w0")
    status, text = run.wait()
    run.check_clean_end(point, text)
    assert status == 0, (status, text[-3000:])
    check_no_signal_death(text)
    # The supervisor stops; worker 0 took the signal with tunneld/entry.py's handler: its line,
    # its exit status, and the supervisor's word that it was stopped before it was ready.
    # Ctrl-C: the supervisor, stopping on its SIGINT, sends the workers SIGTERM too, and either
    # can reach worker 0 first (seen in a CI run: SIGTERM first, status 0): both are clean stops.
    worker_sig = "SIGINT" if how == "INT" else "SIGTERM"
    codes = f"({code}|0)" if how == "INT" else str(code)
    assert f"tunneld: {worker_sig} during start-up: stopped before serving" in text, text[-3000:]
    assert re.search(rf"{sig}: stopping 2 workers, [12] of them still starting", text), text[-3000:]
    exited = rf"worker 0 \(pid \d+\) exited with status {codes}, before it was ready"
    assert re.search(exited, text), text[-3000:]
    assert "during start-up; stopping" not in text, text[-3000:]  # not a failed start
    assert "supervisor stopped" in text, text[-3000:]
    if how == "TERM-up":
        assert "passed on" in run.fired() and "not passed on" not in run.fired(), run.fired()
        # held at that point by the supervisor's mask until entry.py's handlers let it in
        held = "held by the worker" in run.fired()
        assert held == (point in BEFORE_HANDLERS), run.fired()


@needs_redis
def test_a_sigterm_to_a_starting_worker_alone_ends_it_with_status_0(
    run: Run,  # noqa: F811
) -> None:
    point = "import:tunneld"
    run.start("script", point, "TERM", "--workers", "2", where="w0")
    status, text = run.wait()
    run.check_clean_end(point, text)
    check_no_signal_death(text)
    assert "tunneld: SIGTERM during start-up: stopped before serving" in text, text[-3000:]
    # The supervisor was not stopping: a worker that ends before every worker is ready is a
    # failed start (it stops the other one and exits 1), as for any exit then.
    assert re.search(r"worker 0 \(pid \d+\) exited with status 0 during start-up; stopping", text)
    assert status == 1, (status, text[-3000:])
    assert "supervisor stopped" in text, text[-3000:]


@needs_redis
def test_a_worker_whose_start_hangs_with_sigterm_held_is_killed_by_the_bounded_stop(
    run: Run,  # noqa: F811
) -> None:
    point = "import:tunneld"
    # grace period 0: the SIGKILL comes STOP_MARGIN s after the SIGTERM
    args = ("--workers", "2", "--grace-period", "0")
    run.start("script", point, "TERM-up-stuck", *args, where="w0")
    status, text = run.wait()
    run.check_clean_end(point, text)
    assert "held by the worker" in run.fired(), run.fired()
    assert status == 0, (status, text[-3000:])
    assert re.search(r"SIGTERM: stopping 2 workers, [12] of them still starting", text), text[
        -3000:
    ]
    killed = rf"worker 0 \(pid \d+\) still running {STOP_MARGIN}s after SIGTERM: SIGKILL"
    assert re.search(killed, text), text[-3000:]
    died = r"worker 0 \(pid \d+\) was killed by SIGKILL, before it was ready"
    assert re.search(died, text), text[-3000:]
    other = r"worker 1 \(pid \d+\) exited with status 0, before it was ready"
    assert re.search(other, text), text[-3000:]
    assert "supervisor stopped" in text, text[-3000:]


@needs_redis
def test_a_worker_that_ends_with_the_supervisors_sigterm_pending_is_no_failed_start(
    run: Run,  # noqa: F811
) -> None:
    # As worker 1 is being started, the supervisor gets SIGTERM and so does worker 0, which ends
    # before the supervisor runs again: both signals are pending there at once, and Linux runs
    # SIGCHLD's handler before SIGTERM's. The stop is seen first all the same.
    point = "call:tunneld/supervisor.py:Supervisor._start#2"
    run.start("script", point, "TERM-starved", "--workers", "2", where="main")
    status, text = run.wait()
    run.check_clean_end(point, text)
    assert "both pending" in run.fired() and "not both" not in run.fired(), run.fired()
    assert status == 0, (status, text[-3000:])
    check_no_signal_death(text)
    assert "during start-up; stopping" not in text, text[-3000:]  # not a failed start
    assert re.search(r"SIGTERM: stopping 2 workers, [12] of them still starting", text), text
    exited = r"worker 0 \(pid \d+\) exited with status 0, before it was ready"
    assert re.search(exited, text), text[-3000:]
    assert "supervisor stopped" in text, text[-3000:]


@needs_redis
@pytest.mark.parametrize("check", [2, 3])  # the write-back's first and second checks
def test_a_private_redis_server_that_exits_just_after_answering_is_revived_for_the_write_back(
    run: Run,  # noqa: F811
    check: int,
) -> None:
    # systemd's stop sends SIGTERM to the private redis-server too, which answers for up to
    # 0.1 s more: here it answers the write-back's checks up to this one, then exits (seen in CI
    # after two checks: the third then found it gone, "exposures NOT written back").
    point = f"ccall:tunneld/private_redis.py:PrivateRedis.ping_async:startswith#{check}"
    run.start("script", point, "TERM-redis", "--workers", "2", where="main")
    run.wait_serving()
    status, text = run.stop()
    run.check_clean_end(point, text)
    assert "redis-server exited" in run.fired(), run.fired()
    assert status == 0, (status, text[-3000:])
    assert "starting it again on its append-only file" in text, text[-3000:]
    assert "exposures written back" in text and "NOT written back" not in text, text[-3000:]
