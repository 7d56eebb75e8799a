"""docs/admin-api.md lists the admin API's error codes: every ``ApiError(status, "CODE", ...)``
that tunneld/ and relay/ raise with a literal code is documented there with its status (in the
error table, or in the text of its section as "STATUS `CODE`"). Codes that come from elsewhere
(validation errors, a node's RouteError) are covered by the tests of their sections."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "admin-api.md").read_text()
RAISED = re.compile(r'ApiError\(\s*(\d{3}),\s*"([A-Z_]+)"')
# Raised only when the client has already gone: nobody reads it.
NEVER_SEEN = {"CLIENT_GONE"}


def raised_codes() -> set[tuple[int, str, str]]:
    found = set()
    for package in ("tunneld", "relay"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for status, code in RAISED.findall(path.read_text()):
                found.add((int(status), code, str(path.relative_to(ROOT))))
    return found


def documented(status: int, code: str) -> bool:
    return bool(re.search(rf"\|\s*{status}\s*\|\s*`{code}`|\b{status}\s+`{code}`", DOC))


def test_every_literal_admin_error_code_is_documented_with_its_status() -> None:
    found = raised_codes()
    assert len(found) >= 20  # the scan sees the admin API's errors at all
    missing = [
        f"{status} {code} ({path})"
        for status, code, path in sorted(found)
        if code not in NEVER_SEEN and not documented(status, code)
    ]
    assert not missing, "not in docs/admin-api.md: " + ", ".join(missing)


def test_the_check_sees_a_code_missing_from_the_doc() -> None:
    assert documented(409, "TOO_MANY_EXPOSURES")
    assert not documented(409, "NO_SUCH_CODE_ANYWHERE")
    assert not documented(404, "TOO_MANY_EXPOSURES")  # the status is part of the claim
