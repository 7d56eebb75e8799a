"""What a command's ``--help`` lists under "options:", one entry per option (the CLI tests of
tunneld and tunnel-agent)."""

from __future__ import annotations

import re
import subprocess


def help_entries(argv: list[str], env: dict[str, str], timeout: float) -> dict[str, str]:
    """``argv --help`` run at 100 columns: each option's first spelling -> its whole entry on
    one line. Fails the test on a non-zero exit or a traceback."""
    out = subprocess.run(
        [*argv, "--help"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "COLUMNS": "100"},
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    options = out.stdout.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}
