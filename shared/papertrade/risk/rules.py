"""The pre-trade rules: order + account state + limits + marks -> approve / clip / reject.

Pure: no I/O, no clock (the order's `t` is the time the hours rule uses). The rate limit is the token
bucket of `papertrade.risk.bucket` (the service keeps it in Redis); the kill switch is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_DOWN, Decimal

from papertrade.enums import OrderType, Side
from papertrade.instruments import instrument
from papertrade.messages import RiskCheckRequest, RiskDecision
from papertrade.money import CENT, floor_to, fmt
from papertrade.risk.limits import Limits
from papertrade.risk.state import AccountRiskState, session_day
from papertrade.timeutil import iso

APPROVE = RiskDecision(decision="approve")
_HUNDRED = Decimal(100)


def check(
    order: RiskCheckRequest,
    limits: Limits,
    state: AccountRiskState,
    marks: Mapping[str, Decimal],
    *,
    kill_reason: str | None = None,
) -> RiskDecision:
    """Decide on one order. `marks` maps symbols to their reference price (last trade, else bar close).

    The state is not changed: on approve / clip the caller reserves the order (`reserve_for`).
    """
    if kill_reason is not None:
        return reject("kill_switch", f"kill switch engaged: {kill_reason}")
    if limits.unlimited:
        return APPROVE
    symbol = order.symbol
    allowed, blocked = limits.symbol_sets()
    if allowed is not None and symbol not in allowed:
        return reject("allowed_symbols", f"allowed_symbols: {symbol} is not an allowed symbol")
    if symbol in blocked:
        return reject("blocked_symbols", f"blocked_symbols: {symbol} is blocked")
    if limits.trading_hours == "regular" and not _market_open(order.t, symbol):
        return reject("trading_hours", f"trading_hours regular: the market is closed at {iso(order.t)}")

    mark = marks.get(symbol)
    collar = limits.price_collar_pct
    if collar is not None and order.limit_price is not None and mark is not None and mark > 0:
        deviation = abs(order.limit_price - mark) / mark * _HUNDRED
        if deviation > collar:
            return reject(
                "price_collar_pct",
                f"price_collar_pct {fmt(collar)} exceeded: limit price {fmt(order.limit_price)} is "
                f"{_pct(deviation)}% from the reference price {fmt(mark)}",
            )

    price = order_price(order, mark)
    qty = order.qty
    if qty is None:
        if order.notional is None:
            return reject("order", "order has neither qty nor notional")
        if price is None or price <= 0:
            if _needs_price(limits):
                return reject("reference_price", f"no reference price for {symbol} to size a notional order")
            return APPROVE
        qty = order.notional / price
    if qty <= 0:
        return reject("order", f"order qty must be positive, got {fmt(qty)}")

    loss_limit = limits.max_daily_loss
    if loss_limit is not None:
        pnl = state.day_pnl(session_day(order.t), marks)
        if -pnl >= loss_limit and not _reduces(state.position_qty(symbol), order.side, qty):
            return reject(
                "max_daily_loss", f"max_daily_loss {fmt(loss_limit)} reached: day P&L {fmt(_cents(pnl))}"
            )

    breach = _quantity_caps(order, limits, state, marks, qty, price)
    if isinstance(breach, RiskDecision):
        return breach
    if breach is None:
        return APPROVE
    rule, reason, cap = breach
    if not limits.clip_to_limits:
        return reject(rule, reason)
    if order.qty is None:
        assert price is not None
        notional = (cap * price).quantize(CENT, rounding=ROUND_DOWN)
        if notional <= 0:
            return reject(rule, reason)
        return RiskDecision(decision="clip", notional=notional, rule=rule, reason=f"clipped: {reason}")
    clipped = floor_to(cap, instrument(symbol).lot)
    if clipped <= 0:
        return reject(rule, reason)
    return RiskDecision(decision="clip", qty=clipped, rule=rule, reason=f"clipped: {reason}")


def order_price(order: RiskCheckRequest, mark: Decimal | None) -> Decimal | None:
    """The price an order is valued at: its limit price, else its stop price, else the mark."""
    if order.limit_price is not None and order.type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
        return order.limit_price
    if order.stop_price is not None and order.type is OrderType.STOP:
        return order.stop_price
    return order.limit_price or order.stop_price or mark


def final_qty(order: RiskCheckRequest, decision: RiskDecision, mark: Decimal | None) -> Decimal | None:
    """The quantity an approved / clipped order reserves (a notional order's estimate at its price)."""
    if decision.qty is not None:
        return decision.qty
    if order.qty is not None:
        return order.qty
    notional = decision.notional if decision.notional is not None else order.notional
    price = order_price(order, mark)
    if notional is None or price is None or price <= 0:
        return None
    return notional / price


def reserve_for(
    state: AccountRiskState, order: RiskCheckRequest, decision: RiskDecision, marks: Mapping[str, Decimal]
) -> str | None:
    """Record an approved or clipped order in `state` as open (releasing the order it replaces).

    Returns its key in `state.open_orders` (the order id as text), or None when it has no quantity to
    reserve (a notional order without any price)."""
    mark = marks.get(order.symbol)
    qty = final_qty(order, decision, mark)
    replaces = str(order.replaces) if order.replaces is not None else None
    if qty is None:
        if replaces is not None:
            state.release(replaces)
        return None
    order_id = str(order.order_id)
    state.reserve(order_id, order.symbol, order.side, qty, order_price(order, mark), replaces)
    return order_id


def reject(rule: str, reason: str, *, throttled: bool = False) -> RiskDecision:
    return RiskDecision(decision="reject", rule=rule, reason=reason, throttled=throttled)


def _quantity_caps(
    order: RiskCheckRequest,
    limits: Limits,
    state: AccountRiskState,
    marks: Mapping[str, Decimal],
    qty: Decimal,
    price: Decimal | None,
) -> tuple[str, str, Decimal] | RiskDecision | None:
    """The first quantity limit the order breaks as (rule, reason, the largest qty that fits), or None."""
    symbol = order.symbol
    first: tuple[str, str, Decimal] | None = None
    cap_all: Decimal | None = None

    def breach(rule: str, reason: str, cap: Decimal) -> None:
        nonlocal first, cap_all
        if first is None:
            first = (rule, reason, cap)
        cap_all = cap if cap_all is None else min(cap_all, cap)

    max_qty = limits.max_order_qty
    if max_qty is not None and qty > max_qty:
        breach("max_order_qty", f"max_order_qty {fmt(max_qty)} exceeded: order qty {fmt(_q(qty))}", max_qty)

    max_notional = limits.max_order_notional
    if max_notional is not None:
        if price is None or price <= 0:
            return reject("max_order_notional", f"max_order_notional: no reference price for {symbol}")
        notional = order.notional if order.qty is None and order.notional is not None else qty * price
        if notional > max_notional:
            breach(
                "max_order_notional",
                f"max_order_notional {fmt(max_notional)} exceeded: order notional {fmt(_cents(notional))}",
                max_notional / price,
            )

    # The order it replaces counts no more: taken off this symbol's worst range (not a copy of the
    # state without it: that cost grew with the account's open orders).
    replaced = state.open_orders.get(str(order.replaces)) if order.replaces is not None else None
    if replaced is not None and replaced.symbol != symbol:
        state = state.copy()
        state.release(str(order.replaces))
        replaced = None

    def worst_range() -> tuple[Decimal, Decimal]:
        long, short = state.worst_range(symbol)
        if replaced is None:
            return long, short
        return (long - replaced.qty, short) if replaced.side is Side.BUY else (long, short + replaced.qty)

    max_pos = limits.max_position_qty
    if max_pos is not None:
        long, short = worst_range()
        if order.side is Side.BUY:
            after, cap = long + qty, max_pos - long
            if after > max_pos:
                breach(
                    "max_position_qty",
                    f"max_position_qty {fmt(max_pos)} exceeded: would be {fmt(_q(after))}",
                    cap,
                )
        else:
            after, cap = short - qty, max_pos + short
            if -after > max_pos:
                breach(
                    "max_position_qty",
                    f"max_position_qty {fmt(max_pos)} exceeded: would be {fmt(_q(after))}",
                    cap,
                )

    max_gross = limits.max_gross_exposure
    if max_gross is not None:
        sym_price = marks.get(symbol) or price or state.price_of(symbol, marks, skip=replaced)
        if sym_price is None or sym_price <= 0:
            return reject("max_gross_exposure", f"max_gross_exposure: no reference price for {symbol}")
        others = state.gross_exposure(marks, exclude=symbol)
        long, short = worst_range()
        before = max(abs(long), abs(short))
        if order.side is Side.BUY:
            long += qty
        else:
            short -= qty
        after_qty = max(abs(long), abs(short))
        total = others + after_qty * sym_price
        if total > max_gross and after_qty > before:
            room = max((max_gross - others) / sym_price, before)
            cap = room - (long - qty) if order.side is Side.BUY else room + (short + qty)
            breach(
                "max_gross_exposure",
                f"max_gross_exposure {fmt(max_gross)} exceeded: would be {fmt(_cents(total))}",
                cap,
            )
    if first is None:
        return None
    assert cap_all is not None
    return first[0], first[1], cap_all


def _market_open(t: datetime, symbol: str) -> bool:
    from papertrade import calendar  # pandas + exchange_calendars: loaded only when a limit needs them

    return calendar.is_open(t, symbol)


def _reduces(position: Decimal, side: Side, qty: Decimal) -> bool:
    """Whether an order only reduces the position (no flip)."""
    if position == 0:
        return False
    opposite = (position > 0 and side is Side.SELL) or (position < 0 and side is Side.BUY)
    return opposite and qty <= abs(position)


def _needs_price(limits: Limits) -> bool:
    return any(
        v is not None
        for v in (
            limits.max_order_qty,
            limits.max_order_notional,
            limits.max_position_qty,
            limits.max_gross_exposure,
        )
    )


def _cents(value: Decimal) -> Decimal:
    return value.quantize(CENT)


def _q(value: Decimal) -> Decimal:
    """A quantity for a message: exact if short, else to 6 decimals (notional estimates)."""
    exp = value.as_tuple().exponent
    if isinstance(exp, int) and exp < -6:
        return value.quantize(Decimal("0.000001"))
    return value


def _pct(value: Decimal) -> str:
    return fmt(value.quantize(Decimal("0.01"))) or "0"


__all__ = ["APPROVE", "check", "final_qty", "order_price", "reject", "reserve_for"]
