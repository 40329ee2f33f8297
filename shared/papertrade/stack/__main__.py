"""`python -m papertrade.stack up`: the stack as local processes (what `make up` runs)."""

from __future__ import annotations

import sys

from papertrade.stack.runner import main

if __name__ == "__main__":
    sys.exit(main())
