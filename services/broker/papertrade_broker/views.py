"""Alpaca Trading API v2 JSON shapes, built from the broker's rows. Decimals out as strings, UUID ids."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from functools import cache, lru_cache
from typing import Any
from uuid import UUID

from papertrade.instruments import instrument
from papertrade.ledger import PositionState
from papertrade.money import ZERO, fmt
from papertrade.symbols import is_crypto
from papertrade.timeutil import iso

_ASSET_NS = UUID("7d1f3c52-2b1e-4c55-9a43-5a0c8e6f0b11")
#: Significant digits kept for derived prices (average prices) on the wire.
_PRICE_PLACES = Decimal("1e-9")


@cache
def asset_id(symbol: str) -> UUID:
    """A stable UUID per symbol (Alpaca's asset ids are UUIDs)."""
    return uuid.uuid5(_ASSET_NS, symbol)


def asset_class(symbol: str) -> str:
    return "crypto" if is_crypto(symbol) else "us_equity"


def exchange(symbol: str) -> str:
    return "CRYPTO" if is_crypto(symbol) else "NASDAQ"


def order_view(row: Mapping[Any, Any]) -> dict[str, Any]:
    """The Alpaca Order of one `orders` row."""
    view = _order_static(row)
    _order_dynamic(view, row)
    return view


class OrderViews:
    """`order_view` for a stream of updates to the same orders (the ledger's trade updates): what never
    changes on an order (ids, asset, terms, creation times) is built once per order and kept for the
    `size` orders seen last; only the changing fields are built per update. Same output as
    `order_view`."""

    def __init__(self, size: int = 65_536) -> None:
        self.size = size
        self._static: dict[Any, dict[str, Any]] = {}

    def view(self, row: Mapping[Any, Any]) -> dict[str, Any]:
        static = self._static.get(row["id"])
        if static is None:
            if len(self._static) >= self.size:
                del self._static[next(iter(self._static))]  # the oldest order seen
            static = self._static[row["id"]] = _order_static(row)
        view = static.copy()
        _order_dynamic(view, row)
        return view


def position_view(symbol: str, pos: PositionState, price: Decimal | None) -> dict[str, Any]:
    """The Alpaca Position of a signed position; `price` None when no price is known (cost is used)."""
    current = price if price is not None else abs(pos.avg_entry_price)
    market_value = pos.qty * current
    unrealized = market_value - pos.cost
    plpc = unrealized / abs(pos.cost) if pos.cost else ZERO
    return {
        "asset_id": str(asset_id(symbol)),
        "symbol": symbol,
        "exchange": exchange(symbol),
        "asset_class": asset_class(symbol),
        "asset_marginable": not is_crypto(symbol),
        "avg_entry_price": _price(abs(pos.avg_entry_price)),
        "qty": fmt(pos.qty),
        "qty_available": fmt(pos.qty),
        "side": "short" if pos.qty < 0 else "long",
        "market_value": _money(market_value),
        "cost_basis": _money(pos.cost),
        "unrealized_pl": _money(unrealized),
        "unrealized_plpc": _price(plpc),
        "unrealized_intraday_pl": _money(unrealized),
        "unrealized_intraday_plpc": _price(plpc),
        "current_price": fmt(current),
        "lastday_price": fmt(current),
        "change_today": "0",
        "realized_pl": _money(pos.realized_pl),
    }


def account_view(
    row: Mapping[Any, Any],
    *,
    long_mv: Decimal,
    short_mv: Decimal,
    buying_power: Decimal,
    reserved: Decimal,
) -> dict[str, Any]:
    """The Alpaca TradeAccount of one `accounts` row and its valued positions."""
    cash = row["cash"]
    equity = cash + long_mv + short_mv
    return {
        "id": str(row["id"]),
        "account_number": row["account_number"],
        "status": row["status"],
        "crypto_status": row["status"],
        "currency": "USD",
        "cash": _money(cash),
        "buying_power": _money(buying_power),
        "regt_buying_power": _money(buying_power),
        "daytrading_buying_power": _money(buying_power),
        "non_marginable_buying_power": _money(buying_power),
        "effective_buying_power": _money(buying_power),
        "options_buying_power": "0",
        "equity": _money(equity),
        "last_equity": _money(equity),
        "portfolio_value": _money(equity),
        "long_market_value": _money(long_mv),
        "short_market_value": _money(short_mv),
        "initial_margin": _money(abs(short_mv) + reserved),
        "maintenance_margin": _money(abs(short_mv)),
        "last_maintenance_margin": _money(abs(short_mv)),
        "sma": "0",
        "multiplier": "1",
        "accrued_fees": "0",
        "pending_transfer_in": "0",
        "pending_transfer_out": "0",
        "pattern_day_trader": False,
        "trading_blocked": False,
        "transfers_blocked": False,
        "account_blocked": False,
        "trade_suspended_by_user": False,
        "shorting_enabled": bool(row["shorting_enabled"]),
        "daytrade_count": 0,
        "created_at": _t(row["created_at"]),
        "fees": _money(row["fees"]),
        "realized_pl": _money(row["realized_pl"]),
    }


def asset_view(symbol: str) -> dict[str, Any]:
    inst = instrument(symbol)
    crypto = inst.crypto
    return {
        "id": str(asset_id(symbol)),
        "class": asset_class(symbol),
        "exchange": exchange(symbol),
        "symbol": symbol,
        "name": symbol,
        "status": "active",
        "tradable": True,
        "marginable": not crypto,
        "shortable": True,
        "easy_to_borrow": True,
        "fractionable": crypto,
        "min_order_size": fmt(inst.lot),
        "min_trade_increment": fmt(inst.lot),
        "price_increment": fmt(inst.tick),
        "maintenance_margin_requirement": 100,
        "attributes": [],
    }


def activity_view(row: Mapping[Any, Any], order_status: str) -> dict[str, Any]:
    """Alpaca's FILL activity of one execution row."""
    t: datetime = row["t"]
    return {
        "id": f"{t.strftime('%Y%m%d%H%M%S%f')}::{row['exec_id']}",
        "activity_type": "FILL",
        "transaction_time": _t(t),
        "type": "fill" if row["leaves_qty"] == 0 else "partial_fill",
        "price": fmt(row["price"]),
        "qty": fmt(row["qty"]),
        "side": row["side"],
        "symbol": row["symbol"],
        "leaves_qty": fmt(row["leaves_qty"]),
        "order_id": str(row["order_id"]),
        "cum_qty": fmt(row["cum_qty"]),
        "order_status": order_status,
        "execution_id": row["exec_id"],
        "commission": fmt(row["fee"]),
    }


def _t(dt: datetime | None) -> str | None:
    return _iso(dt) if dt is not None else None


@lru_cache(maxsize=4096)
def _iso(dt: datetime) -> str:
    """`iso`, remembered: an order's times repeat across its views (and a ledger batch stamps every
    order it changes with the same `updated_at`)."""
    return iso(dt)


def _id(value: UUID | None) -> str | None:
    return str(value) if value is not None else None


def _money(value: Decimal) -> str:
    return fmt(value.quantize(Decimal("0.01"))) or "0"


def _price(value: Decimal | None) -> str | None:
    if value is None:
        return None
    return fmt(value.quantize(_PRICE_PLACES))


def _order_static(row: Mapping[Any, Any]) -> dict[str, Any]:
    """An order's view with the fields that never change filled in, the others `None` (in place, so
    the keys keep `order_view`'s order)."""
    symbol = row["symbol"]
    return {
        "id": str(row["id"]),
        "client_order_id": row["client_order_id"],
        "created_at": _t(row["created_at"]),
        "updated_at": None,
        "submitted_at": _t(row["submitted_at"]),
        "filled_at": None,
        "expired_at": None,
        "canceled_at": None,
        "failed_at": None,
        "replaced_at": None,
        "replaced_by": None,
        "replaces": _id(row["replaces"]),
        "asset_id": str(asset_id(symbol)),
        "symbol": symbol,
        "asset_class": asset_class(symbol),
        "notional": fmt(row["notional"]),
        "qty": fmt(row["qty"]),
        "filled_qty": None,
        "filled_avg_price": None,
        "order_class": "simple",
        "order_type": row["type"],
        "type": row["type"],
        "side": row["side"],
        "position_intent": None,
        "time_in_force": row["time_in_force"],
        "limit_price": fmt(row["limit_price"]),
        "stop_price": fmt(row["stop_price"]),
        "status": None,
        "extended_hours": bool(row["extended_hours"]),
        "legs": None,
        "trail_percent": None,
        "trail_price": None,
        "hwm": None,
        "commission": None,
        "all_or_none": bool(row["all_or_none"]),
        "reason": None,
    }


def _order_dynamic(view: dict[str, Any], row: Mapping[Any, Any]) -> None:
    """Fill in the fields of an order's view that fills, cancels and replaces change."""
    filled = row["filled_qty"]
    view["updated_at"] = _t(row["updated_at"])
    view["filled_at"] = _t(row["filled_at"])
    view["expired_at"] = _t(row["expired_at"])
    view["canceled_at"] = _t(row["canceled_at"])
    view["failed_at"] = _t(row["failed_at"])
    view["replaced_at"] = _t(row["replaced_at"])
    view["replaced_by"] = _id(row["replaced_by"]) if row["status"] == "replaced" else None
    view["filled_qty"] = fmt(filled)
    view["filled_avg_price"] = _price(row["filled_notional"] / filled) if filled else None
    view["status"] = row["status"]
    view["commission"] = fmt(row["fees"])
    view["reason"] = row["reason"]
