"""`python -m papertrade_orderbook`: serve the orderbook service until SIGTERM/SIGINT."""

from __future__ import annotations

from papertrade.service import run_service
from papertrade_orderbook.app import build_app
from papertrade_orderbook.settings import OrderbookSettings


def main() -> None:
    settings = OrderbookSettings()
    run_service(build_app(settings), settings)


if __name__ == "__main__":
    main()
