"""Enumerations of CONTRACT.md. Values are the lowercase wire strings Alpaca uses."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from papertrade.errors import ValidationError


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        """+1 for buy, -1 for sell: the sign of the position change a fill of this side makes."""
        return 1 if self is Side.BUY else -1

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"
    STOP = "stop"
    STOP_LIMIT = "stop_limit"

    @property
    def needs_limit_price(self) -> bool:
        return self in (OrderType.LIMIT, OrderType.STOP_LIMIT)

    @property
    def needs_stop_price(self) -> bool:
        return self in (OrderType.STOP, OrderType.STOP_LIMIT)


class TimeInForce(StrEnum):
    DAY = "day"
    GTC = "gtc"
    IOC = "ioc"
    FOK = "fok"

    @property
    def rests(self) -> bool:
        """Whether an unfilled remainder may rest on the book."""
        return self in (TimeInForce.DAY, TimeInForce.GTC)


class OrderStatus(StrEnum):
    NEW = "new"
    ACCEPTED = "accepted"
    PENDING_NEW = "pending_new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REPLACED = "replaced"
    PENDING_CANCEL = "pending_cancel"
    REJECTED = "rejected"
    DONE_FOR_DAY = "done_for_day"

    @property
    def is_open(self) -> bool:
        return self in _OPEN_STATUSES

    @property
    def is_final(self) -> bool:
        return self in _FINAL_STATUSES


_OPEN_STATUSES = frozenset(
    {
        OrderStatus.NEW,
        OrderStatus.ACCEPTED,
        OrderStatus.PENDING_NEW,
        OrderStatus.PARTIALLY_FILLED,
        OrderStatus.PENDING_CANCEL,
    }
)
_FINAL_STATUSES = frozenset(
    {
        OrderStatus.FILLED,
        OrderStatus.CANCELED,
        OrderStatus.EXPIRED,
        OrderStatus.REPLACED,
        OrderStatus.REJECTED,
        OrderStatus.DONE_FOR_DAY,
    }
)


class ExecType(StrEnum):
    """The kinds of execution report the orderbook publishes on `ex.exec.<symbol>`."""

    ACCEPTED = "accepted"
    FILL = "fill"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REJECTED = "rejected"
    TRIGGERED = "triggered"
    REPLACED = "replaced"


class LiquiditySide(StrEnum):
    MAKER = "maker"
    TAKER = "taker"


class SelfTradePrevention(StrEnum):
    NONE = "none"
    CANCEL_NEWEST = "cancel_newest"
    CANCEL_OLDEST = "cancel_oldest"
    CANCEL_BOTH = "cancel_both"


class Interval(StrEnum):
    M1 = "1m"
    M5 = "5m"
    M15 = "15m"
    M30 = "30m"
    H1 = "1h"
    D1 = "1d"

    @property
    def seconds(self) -> int:
        return _INTERVAL_SECONDS[self]

    @property
    def delta(self) -> timedelta:
        return timedelta(seconds=self.seconds)

    @property
    def minutes(self) -> int:
        return self.seconds // 60

    @classmethod
    def parse(cls, value: str, field: str = "interval") -> Interval:
        """The interval named by `value`; also accepts Alpaca timeframes such as `5Min`, `1Hour`, `1Day`."""
        text = str(value).strip()
        alias = _ALPACA_TIMEFRAMES.get(text.lower())
        if alias is not None:
            return alias
        try:
            return cls(text.lower())
        except ValueError:
            allowed = ", ".join(i.value for i in cls)
            raise ValidationError(field, f"unknown interval {value!r}; use one of {allowed}") from None


_INTERVAL_SECONDS = {
    Interval.M1: 60,
    Interval.M5: 300,
    Interval.M15: 900,
    Interval.M30: 1800,
    Interval.H1: 3600,
    Interval.D1: 86400,
}

_ALPACA_TIMEFRAMES = {
    "1min": Interval.M1,
    "1t": Interval.M1,
    "5min": Interval.M5,
    "5t": Interval.M5,
    "15min": Interval.M15,
    "15t": Interval.M15,
    "30min": Interval.M30,
    "30t": Interval.M30,
    "1hour": Interval.H1,
    "60min": Interval.H1,
    "1h": Interval.H1,
    "1day": Interval.D1,
    "1d": Interval.D1,
}
