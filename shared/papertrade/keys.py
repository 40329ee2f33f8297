"""Redis keys shared between services, defined once. Values are JSON (papertrade.codec) unless noted.

| key | owner (writer) | value |
| --- | --- | --- |
| `pt:clock` | streamer | `{"timestamp", "is_open", "next_open", "next_close"}`: simulation time |
| `pt:watchlist` | streamer | `{"symbols": [...], "intervals": [...]}`: the tradable symbols |
| `pt:bar:<interval>:<symbol>` | streamer | the latest `Bar` of that symbol and interval |
| `pt:last:<symbol>` | orderbook | `{"price", "t"}`: the last trade price of that symbol's book |
| `pt:risk:*` | risk | risk's live state (exposure, rates, kill switches) |
"""

from __future__ import annotations

from papertrade.enums import Interval

CLOCK = "pt:clock"
WATCHLIST = "pt:watchlist"
RISK_PREFIX = "pt:risk:"


def latest_bar(interval: Interval | str, symbol: str) -> str:
    return f"pt:bar:{interval}:{symbol}"


def last_trade(symbol: str) -> str:
    return f"pt:last:{symbol}"
