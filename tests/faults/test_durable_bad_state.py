"""Issue 8, acceptance 5: tunneld never starts empty over state it cannot use.

A corrupt database, a read-only state directory, or a state directory another tunneld holds:
`tunneld serve` exits 2 with a message that names the file or directory and says what to do,
and leaves the file as it was.
"""

from __future__ import annotations

import os
import signal

from tests.e2e.procs import Processes
from tunneld.store import DB_FILE

from .durable import admin, serve_refused, state_dir


def _seed(procs: Processes) -> None:
    """A real database with one exposure, from a tunneld stopped normally."""
    procs.start_edge()
    with admin(procs) as a:
        assert a.post("/v1/sandboxes/sb1/ports", json={"port": 8000}).status_code == 200
    assert procs.edge is not None
    assert procs.stop(procs.edge) == 0


def test_a_corrupt_database_is_refused_with_its_name(procs: Processes) -> None:
    _seed(procs)
    db = state_dir(procs) / DB_FILE
    data = bytearray(db.read_bytes())
    data[:100] = b"garbage!" * 12 + b"junk"  # the header: no longer a database
    db.write_bytes(bytes(data))
    code, out = serve_refused(procs)
    assert code == 2, out
    assert str(db) in out
    assert "restore it from a backup" in out
    assert "Traceback" not in out
    assert db.read_bytes() == bytes(data)  # left for the operator to inspect


def test_a_truncated_database_is_refused(procs: Processes) -> None:
    _seed(procs)
    db = state_dir(procs) / DB_FILE
    with db.open("r+b") as f:
        f.truncate(1000)  # half a page: a header, no tables
    code, out = serve_refused(procs)
    assert code == 2, out
    assert str(db) in out and "Traceback" not in out


def test_a_read_only_state_directory_is_refused(procs: Processes) -> None:
    _seed(procs)
    directory = state_dir(procs)
    os.chmod(directory, 0o555)
    try:
        code, out = serve_refused(procs, root_powers=False)
    finally:
        os.chmod(directory, 0o700)
    assert code == 2, out
    assert str(directory) in out and "not writable" in out
    assert "Traceback" not in out


def test_a_new_state_directory_that_cannot_be_created_is_refused(procs: Processes) -> None:
    parent = procs.tmp / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        code, out = serve_refused(procs, "--state-dir", str(parent / "state"), root_powers=False)
    finally:
        os.chmod(parent, 0o700)
    assert code == 2, out
    assert str(parent / "state") in out and "Traceback" not in out


def test_a_second_tunneld_on_the_same_state_directory_is_refused(procs: Processes) -> None:
    procs.start_edge()
    code, out = serve_refused(procs)
    assert code == 2, out
    assert "in use by another process" in out and str(state_dir(procs)) in out
    assert procs.edge is not None and procs.edge.poll() is None  # the first one is unaffected
    assert procs.stop(procs.edge, signal.SIGTERM) == 0
