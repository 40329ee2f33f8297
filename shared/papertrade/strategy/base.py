"""`papertrade.Strategy`: the base class every strategy subclasses."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

from papertrade.enums import Interval, OrderType, Side, TimeInForce
from papertrade.errors import ValidationError
from papertrade.messages import TradeUpdate
from papertrade.models import Bar, Order, Position
from papertrade.money import to_decimal
from papertrade.strategy.context import AccountSnapshot, OrderRequest, StrategyContext
from papertrade.symbols import normalize_symbol

if TYPE_CHECKING:
    import pandas as pd


class ParamsError(ValueError):
    """The params given to a strategy do not fit its declared `params`."""


class StrategyNotBound(RuntimeError):
    """An order or read was attempted before the strategy runs (in `__init__`, say)."""


class Params(dict[str, Any]):
    """The resolved params: a dict that also reads as attributes (`self.p.fast`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no param {name!r}; params are {sorted(self)}") from None


class Strategy:
    """Subclass this and override the callbacks you need.

    Declare tunable parameters with their defaults in `params`; a deployment or a backtest may
    override them (unknown names and values of the wrong type are refused with `ParamsError`), and
    the strategy reads them as `self.p.name`. For extra checks override `check_params`.

        class SmaCross(Strategy):
            params = {"fast": 10, "slow": 30, "qty": 100}

            def on_bar(self, bar):
                closes = self.history(bar.symbol, "1m", self.p.slow)[bar.symbol]["close"]
                ...
                self.buy(bar.symbol, self.p.qty)

    Callbacks run one at a time, in the order events happened: `on_start`, then `on_bar(bar)` for each
    closed bar of every subscribed symbol (a `papertrade.models.Bar`), `on_order_update(update)` for
    every trade update of the account's orders (a `papertrade.messages.TradeUpdate`, Alpaca's
    trade_update shape: event in new, partial_fill, fill, canceled, rejected, expired, replaced),
    `on_fill(update)` additionally for partial_fill and fill, `on_periodic()` each `period` of
    simulation time, and `on_stop`. Orders sent during a callback reach the book after it returns,
    as they would over the network. A callback that raises pauses the strategy and is reported.
    """

    #: Parameter names and their defaults; a deployment's params override them.
    params: ClassVar[dict[str, Any]] = {}
    #: How often `on_periodic` runs, in simulation time (None: never).
    period: ClassVar[timedelta | None] = None
    #: A one-line description (the first docstring line is used when empty).
    description: ClassVar[str] = ""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.p = Params(resolve_params(type(self), params))
        self._ctx: StrategyContext | None = None
        self.symbols: tuple[str, ...] = ()
        self.interval: Interval = Interval.M1

    # --- callbacks (override) --------------------------------------------------------------------

    def on_start(self) -> None:
        """Called once before the first bar."""

    def on_bar(self, bar: Bar) -> None:
        """Called for every closed bar of the subscribed symbols and interval."""

    def on_fill(self, update: TradeUpdate) -> None:
        """Called for every fill and partial fill of the strategy's orders."""

    def on_order_update(self, update: TradeUpdate) -> None:
        """Called for every trade update of the strategy's orders (fills included)."""

    def on_periodic(self) -> None:
        """Called every `period` of simulation time."""

    def on_stop(self) -> None:
        """Called once when the strategy stops (end of a backtest, stop of a deployment)."""

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Raise ParamsError (or ValueError) if the resolved params make no sense."""

    # --- orders ----------------------------------------------------------------------------------

    def buy(
        self,
        symbol: str,
        qty: Decimal | int | str | None = None,
        *,
        notional: Decimal | int | str | None = None,
        type: OrderType | str = OrderType.MARKET,
        time_in_force: TimeInForce | str = TimeInForce.DAY,
        limit_price: Decimal | int | str | None = None,
        stop_price: Decimal | int | str | None = None,
        client_order_id: str | None = None,
        all_or_none: bool = False,
    ) -> Order:
        """Buy `qty` (or `notional` dollars) of `symbol`; a market order unless `type` says otherwise."""
        return self.order(
            symbol,
            Side.BUY,
            qty,
            notional=notional,
            type=type,
            time_in_force=time_in_force,
            limit_price=limit_price,
            stop_price=stop_price,
            client_order_id=client_order_id,
            all_or_none=all_or_none,
        )

    def sell(
        self,
        symbol: str,
        qty: Decimal | int | str | None = None,
        *,
        notional: Decimal | int | str | None = None,
        type: OrderType | str = OrderType.MARKET,
        time_in_force: TimeInForce | str = TimeInForce.DAY,
        limit_price: Decimal | int | str | None = None,
        stop_price: Decimal | int | str | None = None,
        client_order_id: str | None = None,
        all_or_none: bool = False,
    ) -> Order:
        """Sell `qty` (or `notional` dollars) of `symbol` (short if the account allows it)."""
        return self.order(
            symbol,
            Side.SELL,
            qty,
            notional=notional,
            type=type,
            time_in_force=time_in_force,
            limit_price=limit_price,
            stop_price=stop_price,
            client_order_id=client_order_id,
            all_or_none=all_or_none,
        )

    def order(
        self,
        symbol: str,
        side: Side | str,
        qty: Decimal | int | str | None = None,
        *,
        notional: Decimal | int | str | None = None,
        type: OrderType | str = OrderType.MARKET,
        time_in_force: TimeInForce | str = TimeInForce.DAY,
        limit_price: Decimal | int | str | None = None,
        stop_price: Decimal | int | str | None = None,
        client_order_id: str | None = None,
        all_or_none: bool = False,
    ) -> Order:
        """Any order: side, type (market/limit/stop/stop_limit), time in force (day/gtc/ioc/fok).

        Bad arguments raise ValidationError at once; an order the broker or risk refuses comes back
        with status `rejected` and its `reason` (and an `on_order_update` follows).
        """
        request = make_request(
            symbol,
            side,
            qty,
            notional=notional,
            type=type,
            time_in_force=time_in_force,
            limit_price=limit_price,
            stop_price=stop_price,
            client_order_id=client_order_id,
            all_or_none=all_or_none,
        )
        return self._context.submit(request)

    def cancel(self, order_id: UUID | str | Order) -> None:
        """Ask to cancel one open order; the outcome arrives as an `on_order_update`."""
        if isinstance(order_id, Order):
            oid = order_id.id
        elif isinstance(order_id, UUID):
            oid = order_id
        else:
            try:
                oid = UUID(str(order_id))
            except ValueError:
                raise ValidationError("order_id", f"{order_id!r} is not an order id") from None
        self._context.cancel(oid)

    def cancel_all(self) -> None:
        """Ask to cancel every open order."""
        self._context.cancel_all()

    def close_all(self) -> list[Order]:
        """Cancel every open order and flatten every position with market orders."""
        return self._context.close_all()

    # --- reads -----------------------------------------------------------------------------------

    def position(self, symbol: str) -> Position:
        """The signed position in `symbol` (qty 0 when flat)."""
        return self._context.position(normalize_symbol(symbol))

    def positions(self) -> list[Position]:
        """Every open (non-zero) position."""
        return self._context.positions()

    def account(self) -> AccountSnapshot:
        return self._context.account()

    def open_orders(self) -> list[Order]:
        return self._context.open_orders()

    def history(self, symbol: str, interval: Interval | str | None = None, n: int = 100) -> pd.DataFrame:
        """The last `n` closed bars of `symbol` up to now: columns (symbol, field), UTC index ascending."""
        iv = Interval.parse(str(interval)) if interval is not None else self.interval
        if n <= 0:
            raise ValidationError("n", f"must be positive, got {n}")
        return self._context.history(normalize_symbol(symbol), iv.value, int(n))

    def now(self) -> datetime:
        """Simulation time (never the wall clock in a backtest)."""
        return self._context.now()

    # --- internals -------------------------------------------------------------------------------

    @property
    def _context(self) -> StrategyContext:
        if self._ctx is None:
            raise StrategyNotBound(
                "the strategy is not running yet: trade and read from callbacks (on_start, on_bar, ...), "
                "not from __init__"
            )
        return self._ctx

    def bind(self, ctx: StrategyContext, symbols: tuple[str, ...], interval: Interval) -> None:
        """Attach the strategy to the context it runs in (called by the backtester and the runner)."""
        self._ctx = ctx
        self.symbols = symbols
        self.interval = interval

    @classmethod
    def describe(cls) -> str:
        """The strategy's one-line description."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0].strip() if doc else cls.__name__


def resolve_params(cls: type[Strategy], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The class's defaults overridden by `given`; unknown names and wrong types raise ParamsError."""
    if given is not None and not isinstance(given, Mapping):
        raise ParamsError(f"params must be a JSON object, got {type(given).__name__}")
    defaults = dict(cls.params)
    out = dict(defaults)
    for name, value in (given or {}).items():
        if name not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ParamsError(f"unknown param {name!r} for {cls.__name__} (known: {known})")
        out[name] = _coerce(name, defaults[name], value)
    try:
        cls.check_params(out)
    except ParamsError:
        raise
    except (ValueError, TypeError) as exc:
        raise ParamsError(str(exc)) from None
    return out


def make_request(
    symbol: str,
    side: Side | str,
    qty: Decimal | int | str | None = None,
    *,
    notional: Decimal | int | str | None = None,
    type: OrderType | str = OrderType.MARKET,
    time_in_force: TimeInForce | str = TimeInForce.DAY,
    limit_price: Decimal | int | str | None = None,
    stop_price: Decimal | int | str | None = None,
    client_order_id: str | None = None,
    all_or_none: bool = False,
) -> OrderRequest:
    """Validate an order's arguments into an OrderRequest (ValidationError naming the field)."""
    sym = _SYMBOLS.get(symbol) if isinstance(symbol, str) else None
    if sym is None:
        sym = normalize_symbol(symbol)
        if len(_SYMBOLS) < 10_000:
            _SYMBOLS[symbol] = sym
    side_ = _enum(Side, side, "side")
    type_ = _enum(OrderType, type, "type")
    tif = _enum(TimeInForce, time_in_force, "time_in_force")
    if (qty is None) == (notional is None):
        raise ValidationError("qty", "give exactly one of qty and notional")
    q = to_decimal(qty, "qty", positive=True) if qty is not None else None
    notional_ = to_decimal(notional, "notional", positive=True) if notional is not None else None
    if notional_ is not None and type_ is not OrderType.MARKET:
        raise ValidationError("notional", "notional orders must be market orders")
    lp = to_decimal(limit_price, "limit_price", positive=True) if limit_price is not None else None
    sp = to_decimal(stop_price, "stop_price", positive=True) if stop_price is not None else None
    if type_.needs_limit_price and lp is None:
        raise ValidationError("limit_price", f"is required for {type_.value} orders")
    if type_.needs_stop_price and sp is None:
        raise ValidationError("stop_price", f"is required for {type_.value} orders")
    if not type_.needs_limit_price and lp is not None:
        raise ValidationError("limit_price", f"must not be set for {type_.value} orders")
    if not type_.needs_stop_price and sp is not None:
        raise ValidationError("stop_price", f"must not be set for {type_.value} orders")
    return OrderRequest(
        symbol=sym,
        side=side_,
        type=type_,
        time_in_force=tif,
        qty=q,
        notional=notional_,
        limit_price=lp,
        stop_price=sp,
        client_order_id=client_order_id,
        all_or_none=bool(all_or_none),
    )


#: symbols already normalized (orders name the same few symbols over and over)
_SYMBOLS: dict[str, str] = {}


def _enum(cls: Any, value: object, field: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        allowed = ", ".join(v.value for v in cls)
        raise ValidationError(field, f"{value!r} is not one of {allowed}") from None


def _coerce(name: str, default: Any, value: Any) -> Any:
    """`value` converted to the type of `default` when that is unambiguous, else ParamsError."""
    if default is None:
        return value
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"param {name!r} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ParamsError(f"param {name!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ParamsError(f"param {name!r} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ParamsError(f"param {name!r} must be a number, got {value!r}")
    if kind is Decimal:
        try:
            return to_decimal(value, name)
        except ValidationError as exc:
            raise ParamsError(f"param {exc}") from None
    if kind is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"param {name!r} must be a string, got {value!r}")
    if kind in (list, tuple):
        if isinstance(value, (list, tuple)):
            return kind(value)
        raise ParamsError(f"param {name!r} must be a list, got {value!r}")
    if kind is dict:
        if isinstance(value, dict):
            return value
        raise ParamsError(f"param {name!r} must be an object, got {value!r}")
    return value
