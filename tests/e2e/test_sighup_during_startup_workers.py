"""A SIGHUP while ``tunneld serve --workers 2`` starts is a reload once it serves, never a death.

``systemctl reload`` (deploy/tunneld.service: ``ExecReload=/bin/kill -HUP $MAINPID``) reaches the
supervisor; ``systemctl kill -s HUP`` or a ``pkill -HUP tunneld`` reach its workers too. The
cases of test_signal_before_handlers.py (its docstring says how they work), for the supervisor
and for worker 0:

- in the supervisor before ``Supervisor.run`` installs its handlers: deferred (tunneld/entry.py)
  and applied then (``SIGHUP: passed to 0 workers``: none runs yet);
- in worker 0, from the start of its Python (``import tunneld``, before tunneld/cli.py's first
  lines: the supervisor starts it with SIGHUP blocked, and SIGTERM and SIGINT:
  test_stop_signal_during_startup_workers.py) to its reload handler: deferred, and reloaded once
  it serves;
- sent to the supervisor while worker 0 starts, after worker 0 read its configuration: the
  supervisor passes it to the starting worker, which reloads once it serves, so the token file
  rewritten before the SIGHUP is the one every worker uses.

Each ends with all workers ready and serving, the SIGHUP logged as a reload, then a normal stop
(SIGTERM, exit 0), no worker killed, no traceback, nothing left. Before: the supervisor died at
the first two points, worker 0 at the four points inside it (the supervisor then stopped,
"worker 0 ... was killed by SIGHUP during start-up"), and a SIGHUP sent to the supervisor while
worker 0 started was passed to the ready workers only: worker 0 kept the old token.
"""

from __future__ import annotations

import pytest

from .test_signal_before_handlers import (
    NEW_TOKEN,
    OLD_TOKEN,
    Run,
    admin_status,
    run,  # noqa: F401  (the fixture)
)
from .test_signal_during_startup import needs_redis

# (where, point, how)
CASES = [
    ("main", "import:tunneld.supervisor", "HUP"),
    ("main", "call:tunneld/supervisor.py:Supervisor.run", "HUP"),
    ("w0", "import:tunneld", "HUP"),  # the worker's Python start: before any handler of its own
    ("w0", "import:argparse", "HUP"),
    ("w0", "call:tunneld/cli.py:_serve", "HUP"),
    ("w0", "call:tunneld/edge.py:EdgeServer.start", "HUP"),
    ("w0", "call:tunneld/edge.py:EdgeServer.start", "HUP-up"),
]


@needs_redis
@pytest.mark.parametrize(("where", "point", "how"), CASES)
def test_a_sighup_while_the_workers_start_is_a_reload_once_they_serve(
    run: Run,  # noqa: F811  (the fixture imported above)
    where: str,
    point: str,
    how: str,
) -> None:
    # Rewritten before a SIGHUP that reaches every worker (through the supervisor), not before
    # one that worker 0 raises in itself only (worker 1 rightly keeps the token it read).
    rewrite = where == "main" or how == "HUP-up"
    run.start("script", point, how, "--workers", "2", where=where, rewrite_token=rewrite)
    ports = run.wait_serving()
    # Every worker uses that token (the kernel spreads the connections over both: a few of
    # them reach each with near certainty, and either way none may be refused).
    for _ in range(6):
        token = NEW_TOKEN if rewrite else OLD_TOKEN
        assert admin_status(ports["admin"], token) == 200, run.output()[-3000:]
    status, text = run.stop()
    run.check_clean_end(point, text)
    assert status == 0, (status, text[-3000:])
    assert "was killed by" not in text and "during start-up; stopping" not in text, text[-3000:]
    assert "all 2 workers ready" in text and "supervisor stopped" in text, text[-3000:]
    if where == "main":
        assert "tunneld.supervisor: SIGHUP during start-up: reloading now" in text, text[-3000:]
        assert "SIGHUP: passed to 0 workers" in text, text[-3000:]
    else:
        assert "tunneld[w0]: SIGHUP: configuration reloaded" in text, text[-3000:]
    if how == "HUP-up":
        assert "passed on" in run.fired() and "not passed on" not in run.fired(), run.fired()
        assert "SIGHUP: passed to 2 workers" in text, text[-3000:]
