"""The ``implementation`` fixture: a test that uses it runs twice, with the C extension's
functions (tunneld/_speedups.c) and with their pure-Python references, whatever
``TUNNELD_NO_EXTENSIONS`` says (tunneld/speedups.py). Use it with
``pytestmark = pytest.mark.usefixtures("implementation")`` after importing it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tunneld import accesslog, metrics, responses

# (module, name it is used by, pure-Python reference): everything tunneld/speedups.py switches
SWITCHED = (
    (responses, "simple_head", responses.simple_head_py),
    (accesslog, "whole_response", accesslog.whole_response_py),
    (accesslog, "text_line", accesslog.text_line_py),
    (accesslog, "request_ids", accesslog.request_ids_py),
    (accesslog, "begin_request", accesslog.begin_request_py),
    (accesslog, "log_response", accesslog.log_response_py),
    (accesslog, "log_request", accesslog.log_request_py),
    (accesslog, "spill", accesslog.spill_py),
    (metrics, "tally", metrics.tally_py),
)


@pytest.fixture(params=["c", "python"])
def implementation(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    if request.param == "c":
        from tunneld import _speedups  # not built: an error, not a skip (CI builds it)

        for module, name, reference in SWITCHED:
            monkeypatch.setattr(module, name, getattr(_speedups, reference.__name__[:-3]))
    else:
        for module, name, reference in SWITCHED:
            monkeypatch.setattr(module, name, reference)
    yield request.param
