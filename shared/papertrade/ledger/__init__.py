"""The pure ledger: fills -> positions, cash, realised/unrealised P&L, fees, buying power. No I/O.

The broker applies every fill through these functions (state in Postgres); the backtester uses the
`Ledger` class in-process, so paper trading and backtests book fills identically.

Stable API (other packages import it):

    from papertrade.ledger import Ledger, CommissionModel, PositionState, apply_fill, cash_delta

    ledger = Ledger(cash=Decimal("100000"), commission=CommissionModel.per_share("0.005", minimum="1"))
    result = ledger.fill("AAPL", Side.BUY, Decimal("10"), Decimal("187.20"), order_id="o1")
    result.fee, result.realized_pl, result.position.qty        # fee charged, P&L realised, new qty
    ledger.cash                                                # cash after price and fee
    ledger.equity(prices)                                      # cash + sum(qty * price)
    ledger.position("AAPL").avg_entry_price
    ledger.unrealized_pl(prices)
    ledger.check_invariant()                                   # raises LedgerInvariantError if broken

Model (exact Decimals throughout; nothing is rounded except a fee, to the cent):
- A position is signed: `qty` > 0 long, < 0 short. `cost` is the signed cost of the open quantity
  (sum of qty * price of the opening fills, minus what closing fills removed); the average entry
  price is `cost / qty`.
- A fill that reduces a position removes cost pro rata (`cost * closed / |qty|`, exact to 1e-12;
  the whole cost when it closes the position); realised P&L = proceeds - cost removed. A fill that
  crosses zero closes the old position and opens the rest on the other side at the fill price.
- Cash moves by `-side.sign * qty * price - fee`. Hence, exactly:
  `cash + sum(position cost) == starting cash - fees + realised P&L`.
- Commission (`CommissionModel`): flat per order, per share, or percent of notional, with a
  per-order minimum (and optional maximum), applying to buys, sells or both. A fill's fee is the
  order's cumulative fee target after the fill minus what the order already paid, so partial fills
  sum to the same fee as one fill of the whole order.
- Buying power (a cash account with 100% margin on shorts): `cash - 2 * |short market value| -
  reserved`, floored at 0, where `reserved` is what open orders hold (`reservation`). A buy that
  covers a short, or a sell of shares held, needs no buying power for that part.
"""

from __future__ import annotations

from papertrade.ledger.commission import CommissionKind, CommissionModel, CommissionSides
from papertrade.ledger.core import (
    COST_QUANTUM,
    FillResult,
    Ledger,
    LedgerInvariantError,
    PositionState,
    apply_fill,
    buying_power,
    cash_delta,
    market_values,
    reservation,
)

__all__ = [
    "COST_QUANTUM",
    "CommissionKind",
    "CommissionModel",
    "CommissionSides",
    "FillResult",
    "Ledger",
    "LedgerInvariantError",
    "PositionState",
    "apply_fill",
    "buying_power",
    "cash_delta",
    "market_values",
    "reservation",
]
