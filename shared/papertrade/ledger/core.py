"""Positions, cash and P&L from fills: exact, pure, deterministic (see the package docstring)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from papertrade.enums import Side
from papertrade.ledger.commission import CommissionModel
from papertrade.money import ZERO

#: The grid of a cost removed by a partial close (exact enough: 1e-12 of a dollar).
COST_QUANTUM = Decimal("1e-12")


class LedgerInvariantError(AssertionError):
    """cash + sum(position cost) != starting cash - fees + realised P&L."""


@dataclass(frozen=True, slots=True)
class PositionState:
    """A signed position: `qty` > 0 long, < 0 short; `cost` the signed cost of the open quantity."""

    qty: Decimal = ZERO
    cost: Decimal = ZERO
    realized_pl: Decimal = ZERO

    @property
    def avg_entry_price(self) -> Decimal:
        return ZERO if self.qty == 0 else self.cost / self.qty

    @property
    def side(self) -> Side:
        return Side.SELL if self.qty < 0 else Side.BUY

    def market_value(self, price: Decimal) -> Decimal:
        return self.qty * price

    def unrealized_pl(self, price: Decimal) -> Decimal:
        return self.qty * price - self.cost


@dataclass(frozen=True, slots=True)
class FillResult:
    position: PositionState
    realized_pl: Decimal
    cash_delta: Decimal
    fee: Decimal


#: the state of a symbol never traded (immutable, so one instance serves every lookup)
_FLAT = PositionState()


def apply_fill(pos: PositionState, side: Side, qty: Decimal, price: Decimal) -> tuple[PositionState, Decimal]:
    """The position after a fill of `qty` (> 0) at `price` on `side`, and the P&L it realises."""
    if qty <= 0:
        raise ValueError(f"fill qty must be positive, got {qty}")
    signed = qty * side.sign
    if pos.qty == 0 or (pos.qty > 0) == (signed > 0):
        # Opening or adding: cost grows by the fill's signed notional.
        return PositionState(pos.qty + signed, pos.cost + signed * price, pos.realized_pl), ZERO
    held = abs(pos.qty)
    closed = min(qty, held)
    if closed == held:
        removed = pos.cost
    else:
        removed = (pos.cost * closed / held).quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)
    # Closing a long (sell): proceeds +closed*price; closing a short (buy): -closed*price.
    realized = closed * price * (-side.sign) - removed
    new_qty = pos.qty + signed
    new_cost = pos.cost - removed
    if qty > held:
        # Crossed through zero: the rest opens on the other side at the fill price.
        new_cost = (qty - held) * side.sign * price
    return PositionState(new_qty, new_cost, pos.realized_pl + realized), realized


def cash_delta(side: Side, qty: Decimal, price: Decimal, fee: Decimal = ZERO) -> Decimal:
    """How a fill moves cash: a buy pays qty*price, a sell receives it; the fee is always paid."""
    return -side.sign * qty * price - fee


def market_values(positions: Iterable[tuple[Decimal, Decimal]]) -> tuple[Decimal, Decimal]:
    """(long market value, short market value (<= 0)) of (qty, price) pairs."""
    long_mv = ZERO
    short_mv = ZERO
    for qty, price in positions:
        mv = qty * price
        if qty > 0:
            long_mv += mv
        elif qty < 0:
            short_mv += mv
    return long_mv, short_mv


def buying_power(cash: Decimal, short_market_value: Decimal, reserved: Decimal) -> Decimal:
    """A cash account with shorts held at 100 %: cash - 2 * |short mv| - reserved, floored at 0."""
    return max(cash - 2 * abs(short_market_value) - reserved, ZERO)


def reservation(
    side: Side,
    qty: Decimal,
    price: Decimal,
    position_qty: Decimal,
    open_same_side_qty: Decimal = ZERO,
) -> Decimal:
    """Buying power an order of `qty` at (estimated) `price` must hold while open.

    A buy needs nothing for the part that covers a short (not already covered by other open buys);
    a sell needs nothing for shares held (not already promised to other open sells); the rest of
    either (a new long, or a new short) holds qty * price.
    """
    if side is Side.BUY:
        free = max(-position_qty - open_same_side_qty, ZERO)
    else:
        free = max(position_qty - open_same_side_qty, ZERO)
    needs = max(qty - free, ZERO)
    return needs * price


@dataclass
class _OrderFees:
    qty: Decimal = ZERO
    notional: Decimal = ZERO
    fee: Decimal = ZERO


@dataclass
class Ledger:
    """One account's books in memory: the backtester's ledger, and the reference the broker follows."""

    cash: Decimal
    commission: CommissionModel = field(default_factory=CommissionModel)
    positions: dict[str, PositionState] = field(default_factory=dict)
    fees: Decimal = ZERO
    realized_pl: Decimal = ZERO
    starting_cash: Decimal = ZERO
    _orders: dict[str, _OrderFees] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.starting_cash:
            self.starting_cash = self.cash

    def position(self, symbol: str) -> PositionState:
        pos = self.positions.get(symbol)
        return _FLAT if pos is None else pos

    def fill(
        self,
        symbol: str,
        side: Side,
        qty: Decimal,
        price: Decimal,
        *,
        order_id: str | None = None,
        fee: Decimal | None = None,
    ) -> FillResult:
        """Book one fill. The fee is the commission model's (per `order_id`) unless given."""
        if fee is None:
            key = order_id if order_id is not None else f"_anon{len(self._orders)}"
            acc = self._orders.setdefault(key, _OrderFees())
            fee = self.commission.fill_fee(
                side, qty, price, prior_qty=acc.qty, prior_notional=acc.notional, prior_fee=acc.fee
            )
            acc.qty += qty
            acc.notional += qty * price
            acc.fee += fee
        pos, realized = apply_fill(self.position(symbol), side, qty, price)
        delta = cash_delta(side, qty, price, fee)
        self.positions[symbol] = pos
        self.cash += delta
        self.fees += fee
        self.realized_pl += realized
        return FillResult(pos, realized, delta, fee)

    def forget_order(self, order_id: str) -> None:
        """Drop an order's fee accumulator once it is final (keeps memory flat in long backtests)."""
        self._orders.pop(order_id, None)

    def equity(self, prices: Mapping[str, Decimal]) -> Decimal:
        return self.cash + sum((p.qty * prices[s] for s, p in self.positions.items() if p.qty), ZERO)

    def unrealized_pl(self, prices: Mapping[str, Decimal]) -> Decimal:
        return sum((p.unrealized_pl(prices[s]) for s, p in self.positions.items() if p.qty), ZERO)

    def buying_power(self, prices: Mapping[str, Decimal], reserved: Decimal = ZERO) -> Decimal:
        _, short_mv = market_values((p.qty, prices[s]) for s, p in self.positions.items() if p.qty)
        return buying_power(self.cash, short_mv, reserved)

    def check_invariant(self) -> None:
        """cash + sum(cost) == starting cash - fees + realised P&L, exactly; realised sums match."""
        cost = sum((p.cost for p in self.positions.values()), ZERO)
        lhs = self.cash + cost
        rhs = self.starting_cash - self.fees + self.realized_pl
        if lhs != rhs:
            raise LedgerInvariantError(f"cash + cost = {lhs} but start - fees + realised = {rhs}")
        per_position = sum((p.realized_pl for p in self.positions.values()), ZERO)
        if per_position != self.realized_pl:
            raise LedgerInvariantError(f"realised per position {per_position} != total {self.realized_pl}")
