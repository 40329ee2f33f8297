"""`python -m papertrade.book.build [--quiet]`: compile the engine with mypyc (see papertrade.book.native).

`python -m papertrade.book.build --status` prints which engine `OrderBook` uses and why.
"""

from __future__ import annotations

import sys

from papertrade.book.native import build, status


def main(argv: list[str]) -> int:
    if "--status" in argv:
        print(status())
        return 0
    return 0 if build(quiet="--quiet" in argv) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
