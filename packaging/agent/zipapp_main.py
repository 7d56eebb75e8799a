"""tunnel-agent.pyz: tunneld's in-sandbox agent in one file (``make agent``; docs/agent.md).

    python3 tunnel-agent.pyz run --server edge.example.com:7000 --sandbox-id abc123 --tls

Inside: agent/, protocol/ and relay/ from the tunneld repository, the pure-Python h11 and wsproto
it imports, and ``_orjson_fallback`` (orjson's ``loads``/``dumps`` on the standard library's json),
used as ``orjson`` only when no real orjson is importable. uvloop is used when installed, asyncio's
own loop otherwise (relay/loop.py). Nothing else is needed but a python3 >= 3.11.

This file is the archive's ``__main__.py``; it must still parse on an older python3 so that it can
say why it will not run there.
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 - the point: say why an older python cannot run it
    major, minor = sys.version_info[:2]
    sys.stderr.write(
        f"error: tunnel-agent.pyz needs Python >= 3.11; this is {major}.{minor}"
        f" ({sys.executable or 'python'})\n"
    )
    sys.exit(2)

# Ctrl-C exits 130 without a traceback from here on, also while what follows is imported (the
# handler of the console script and `python -m agent`: agent/entry.py).
from agent.entry import exit_on_sigint

exit_on_sigint()

import importlib.util  # noqa: E402 - after the handler (loaded already by runpy)

if importlib.util.find_spec("orjson") is None:
    import _orjson_fallback

    sys.modules["orjson"] = _orjson_fallback

from agent.cli import main  # noqa: E402 - after the handler and the orjson choice

sys.exit(main())
