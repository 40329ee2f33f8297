"""`python -m papertrade_broker`: serve the broker service until SIGTERM/SIGINT."""

from __future__ import annotations

from papertrade.service import run_service
from papertrade_broker.app import build_app
from papertrade_broker.settings import BrokerSettings


def main() -> None:
    settings = BrokerSettings()
    run_service(build_app(settings), settings)


if __name__ == "__main__":
    main()
