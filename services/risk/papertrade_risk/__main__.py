"""`python -m papertrade_risk`: serve the risk service until SIGTERM/SIGINT."""

from __future__ import annotations

from papertrade.service import run_service
from papertrade_risk.app import build_app
from papertrade_risk.settings import RiskSettings


def main() -> None:
    settings = RiskSettings()
    run_service(build_app(settings), settings)


if __name__ == "__main__":
    main()
