"""`python -m papertrade_streamer`: serve the streamer service until SIGTERM/SIGINT."""

from __future__ import annotations

from papertrade.service import run_service
from papertrade_streamer.app import build_app
from papertrade_streamer.settings import StreamerSettings


def main() -> None:
    settings = StreamerSettings()
    run_service(build_app(settings), settings)


if __name__ == "__main__":
    main()
