"""``python -m agent``: the ``tunnel-agent`` program (:mod:`agent.entry`, Ctrl-C handled first)."""

import sys

from agent.entry import main

if __name__ == "__main__":
    sys.exit(main())
