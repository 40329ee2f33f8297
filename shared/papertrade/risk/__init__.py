"""Pre-trade risk rules (pure: no I/O, no clock). Stable API for the risk service and the backtester.

    from papertrade.risk import Limits, AccountRiskState, RiskEngine, check, reserve_for

    limits = Limits(max_position_qty=500, clip_to_limits=True)       # pydantic; bad values raise
    state = AccountRiskState()                                       # positions, open orders, day P&L
    decision = check(request, limits, state, marks)                  # -> papertrade.messages.RiskDecision
    if decision.decision != "reject":
        reserve_for(state, request, decision, marks)                 # the order's open exposure
    state.apply_exec(exec_report)                                    # fills / cancels / expiries

`request` is a `papertrade.messages.RiskCheckRequest` (the same body the broker sends on `risk.check`);
its `t` is the time the trading-hours rule uses. `marks` maps a symbol to its reference price: the
last trade, else the latest bar close. A decision is `approve`, `clip` (`qty`, or `notional` for a
notional order, is the reduced size) or `reject` with `rule` and a `reason` naming the rule and the
numbers (`max_position_qty 500 exceeded: would be 620`). At a limit is allowed; over it is not.

`RiskEngine` bundles limits + state + the rate bucket + the kill switch for one account in process
(what the backtester uses); `papertrade.risk.bucket.take` is the token bucket alone.

Rules, in the order they are checked (the first that fails names the reject):
kill switch, allowed_symbols, blocked_symbols, trading_hours (`regular`: NYSE session via
`papertrade.calendar`, crypto always open), price_collar_pct (limit price vs reference),
max_daily_loss (realised today + unrealised vs average entry; once the loss reaches the limit only
position-reducing orders pass), then the quantity limits max_order_qty, max_order_notional,
max_position_qty (worst case counting open orders of the same side), max_gross_exposure (sum of
worst-case |position| x price) which `clip_to_limits` reduces the order to fit, and finally
max_orders_per_second (the token bucket; a reject there has `throttled=True`).
"""

from papertrade.risk.bucket import TokenBucket, take
from papertrade.risk.engine import RiskEngine
from papertrade.risk.limits import Limits
from papertrade.risk.rules import APPROVE, check, final_qty, order_price, reject, reserve_for
from papertrade.risk.state import AccountRiskState, ExecEffect, OpenOrder, PositionState, session_day

__all__ = [
    "APPROVE",
    "AccountRiskState",
    "ExecEffect",
    "Limits",
    "OpenOrder",
    "PositionState",
    "RiskEngine",
    "TokenBucket",
    "check",
    "final_qty",
    "order_price",
    "reject",
    "reserve_for",
    "session_day",
    "take",
]
