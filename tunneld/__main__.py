"""``python -m tunneld``: the ``tunneld`` program (:mod:`tunneld.entry`, start-up signals first)."""

import sys

from tunneld.entry import main

if __name__ == "__main__":
    sys.exit(main())
