"""`python -m papertrade_strategy_runner`: serve the strategy-runner service until SIGTERM/SIGINT."""

from __future__ import annotations

from papertrade.service import run_service
from papertrade_strategy_runner.app import build_app
from papertrade_strategy_runner.settings import StrategyRunnerSettings


def main() -> None:
    settings = StrategyRunnerSettings()
    run_service(build_app(settings), settings)


if __name__ == "__main__":
    main()
