"""Settings of the streamer service (env vars; see papertrade.settings for the common ones).

| env var | default | meaning |
| --- | --- | --- |
| `STREAMER_FEED` | `synthetic` | `synthetic` (seeded generator), `replay` (CSV/Parquet files) or `polygon` (REST) |
| `STREAMER_SYMBOLS` | `AAPL,MSFT,SPY,@BTCUSD` | the watchlist at start (when not set and Redis holds one, that one is kept) |
| `STREAMER_INTERVALS` | `1m,5m,15m,30m,1h,1d` | the intervals published (1m bars are aggregated into the others) |
| `STREAMER_MODE` | `realtime` | `realtime` (bars published as their interval closes), `accelerated` (x `STREAMER_SPEED`), `replay` (as fast as possible from `STREAMER_START` to `STREAMER_END`) |
| `STREAMER_SPEED` | `1` | simulation seconds per wall second in `accelerated` mode (e.g. `60`: a minute a second) |
| `STREAMER_START` | now | the simulation's first instant (ISO 8601; naive = local zone); any instant, past or future |
| `STREAMER_END` | none | where a run stops (`replay` needs it, unless the replay files end first) |
| `STREAMER_SEED` | `0` | the synthetic feed's seed: the same seed, symbol and minute always give the same bar |
| `STREAMER_HOURS` | `regular` | `regular` (NYSE sessions, holidays, half days, DST) or `24/7`; `@` crypto symbols are always 24/7 |
| `STREAMER_REPLAY_FILES` | none | comma-separated `SYMBOL=path` or `path` (symbol from the file name) CSV / Parquet files |
| `STREAMER_REPLAY_TZ` | `America/New_York` | zone of the replay files' naive timestamps |
| `STREAMER_REPLAY_STAMP` | `open` | `close` when the files stamp intraday bars at their close (backtrader's do) |
| `STREAMER_AUTOSTART` | `true` | start publishing at startup (`false`: only after `POST /admin/run`) |
| `STREAMER_CHUNK_DAYS` | `20` | days prepared at once in `replay` mode (bigger: faster, more memory) |
| `POLYGON_API_KEY` / `POLYGON_SECRET_FILE` | none | the Polygon key, or a YAML file with `polygon_api_key` |
| `POLYGON_BASE_URL` | `https://api.polygon.io` | where Polygon is (tests point it at a local fake) |
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from papertrade.enums import Interval
from papertrade.settings import ServiceSettings
from papertrade.symbols import normalize_symbol
from papertrade.timeutil import parse_time

DEFAULT_SYMBOLS = ("AAPL", "MSFT", "SPY", "@BTCUSD")
ALL_INTERVALS = tuple(Interval)


class StreamerSettings(ServiceSettings):
    service_name: ClassVar[str] = "streamer"

    feed: Literal["synthetic", "replay", "polygon"] = Field("synthetic", validation_alias="STREAMER_FEED")
    symbols: str = Field(",".join(DEFAULT_SYMBOLS), validation_alias="STREAMER_SYMBOLS")
    intervals: str = Field(",".join(i.value for i in ALL_INTERVALS), validation_alias="STREAMER_INTERVALS")
    mode: Literal["realtime", "accelerated", "replay"] = Field("realtime", validation_alias="STREAMER_MODE")
    speed: float = Field(1.0, gt=0, validation_alias="STREAMER_SPEED")
    start: str | None = Field(None, validation_alias="STREAMER_START")
    end: str | None = Field(None, validation_alias="STREAMER_END")
    seed: int = Field(0, validation_alias="STREAMER_SEED")
    hours: Literal["regular", "24/7"] = Field("regular", validation_alias="STREAMER_HOURS")
    replay_files: str = Field("", validation_alias="STREAMER_REPLAY_FILES")
    replay_tz: str = Field("America/New_York", validation_alias="STREAMER_REPLAY_TZ")
    replay_stamp: Literal["open", "close"] = Field("open", validation_alias="STREAMER_REPLAY_STAMP")
    autostart: bool = Field(True, validation_alias="STREAMER_AUTOSTART")
    chunk_days: int = Field(20, ge=1, le=366, validation_alias="STREAMER_CHUNK_DAYS")
    polygon_api_key: str | None = Field(None, validation_alias="POLYGON_API_KEY")
    polygon_secret_file: Path | None = Field(None, validation_alias="POLYGON_SECRET_FILE")
    polygon_base_url: str = Field("https://api.polygon.io", validation_alias="POLYGON_BASE_URL")

    @field_validator("start", "end")
    @classmethod
    def _check_time(cls, value: str | None) -> str | None:
        if value:
            parse_time(value, "STREAMER_START/END")
        return value or None

    @property
    def symbol_list(self) -> list[str]:
        return [normalize_symbol(s, "STREAMER_SYMBOLS") for s in self.symbols.split(",") if s.strip()]

    @property
    def interval_list(self) -> list[Interval]:
        found = [Interval.parse(s, "STREAMER_INTERVALS") for s in self.intervals.split(",") if s.strip()]
        return sorted(set(found), key=lambda i: i.seconds)

    @property
    def start_time(self) -> datetime | None:
        return parse_time(self.start, "STREAMER_START") if self.start else None

    @property
    def end_time(self) -> datetime | None:
        return parse_time(self.end, "STREAMER_END") if self.end else None

    @property
    def symbols_explicit(self) -> bool:
        """Whether STREAMER_SYMBOLS was given (else a watchlist kept in Redis wins)."""
        return "symbols" in self.model_fields_set
