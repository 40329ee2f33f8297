"""Settings of the orderbook service (env vars; see papertrade.settings for the common ones).

| env var | default | meaning |
| --- | --- | --- |
| `ORDERBOOK_LIQUIDITY_ENABLED` | true | synthetic liquidity for a symbol nobody switched on/off over REST |
| `ORDERBOOK_LIQUIDITY_SPREAD_BPS` | 10 | best bid to best ask, basis points of the bar's close |
| `ORDERBOOK_LIQUIDITY_LEVELS` | 5 | price levels per side |
| `ORDERBOOK_LIQUIDITY_SIZE` | 100 | quantity per level |
| `ORDERBOOK_LIQUIDITY_STEP_BPS` | 5 | distance between levels, basis points |
| `ORDERBOOK_LIQUIDITY_SIZE_STEP` | 0 | extra quantity per level further out |
| `ORDERBOOK_LIQUIDITY_REFRESH_BARS` | 1 | re-quote every N one-minute bars |
| `ORDERBOOK_WATCHLIST_POLL_SECONDS` | 2 | how often the streamer's watchlist (Redis) is re-read |
| `ORDERBOOK_PUBLISH_QUOTES` | true | publish `ex.quote.<symbol>` when the top of book changes |
| `ORDERBOOK_SNAPSHOT_EVERY` | 5000 | snapshot every book to Redis every N commands (and at shutdown); 0: never |
"""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from pydantic import Field

from papertrade.book.liquidity import LiquidityConfig
from papertrade.settings import ServiceSettings


class OrderbookSettings(ServiceSettings):
    service_name: ClassVar[str] = "orderbook"

    liquidity_enabled: bool = Field(True, validation_alias="ORDERBOOK_LIQUIDITY_ENABLED")
    liquidity_spread_bps: Decimal = Field(
        Decimal(10), validation_alias="ORDERBOOK_LIQUIDITY_SPREAD_BPS", ge=0
    )
    liquidity_levels: int = Field(5, validation_alias="ORDERBOOK_LIQUIDITY_LEVELS", ge=0, le=100)
    liquidity_size: Decimal = Field(Decimal(100), validation_alias="ORDERBOOK_LIQUIDITY_SIZE", gt=0)
    liquidity_step_bps: Decimal = Field(Decimal(5), validation_alias="ORDERBOOK_LIQUIDITY_STEP_BPS", ge=0)
    liquidity_size_step: Decimal = Field(Decimal(0), validation_alias="ORDERBOOK_LIQUIDITY_SIZE_STEP", ge=0)
    liquidity_refresh_bars: int = Field(1, validation_alias="ORDERBOOK_LIQUIDITY_REFRESH_BARS", ge=1)
    watchlist_poll_seconds: float = Field(2.0, validation_alias="ORDERBOOK_WATCHLIST_POLL_SECONDS", gt=0)
    publish_quotes: bool = Field(True, validation_alias="ORDERBOOK_PUBLISH_QUOTES")
    snapshot_every: int = Field(5000, validation_alias="ORDERBOOK_SNAPSHOT_EVERY", ge=0)

    def liquidity_config(self) -> LiquidityConfig:
        return LiquidityConfig(
            spread_bps=self.liquidity_spread_bps,
            levels=self.liquidity_levels,
            size=self.liquidity_size,
            step_bps=self.liquidity_step_bps,
            size_step=self.liquidity_size_step,
            refresh_bars=self.liquidity_refresh_bars,
        )
