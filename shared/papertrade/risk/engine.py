"""`RiskEngine`: the rules, the account state and the rate bucket of one account, in process.

For the backtester (and any in-process caller): no Redis, no NATS, time from the orders themselves.

    engine = RiskEngine(Limits(max_position_qty=500))
    decision = engine.check(request, marks={"AAPL": Decimal("187.5")})  # reserves on approve / clip
    engine.on_exec(report)                                                # fills, cancels, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from papertrade.messages import ExecReport, RiskCheckRequest, RiskDecision
from papertrade.risk import bucket as _bucket
from papertrade.risk.limits import Limits
from papertrade.risk.rules import check, reject, reserve_for
from papertrade.risk.state import AccountRiskState


class RiskEngine:
    def __init__(self, limits: Limits | None = None, state: AccountRiskState | None = None) -> None:
        self.limits = limits or Limits()
        self.state = state or AccountRiskState()
        self.kill_reason: str | None = None
        self.bucket: _bucket.TokenBucket | None = None

    def check(self, order: RiskCheckRequest, marks: Mapping[str, Decimal]) -> RiskDecision:
        """Decide; on approve / clip take a rate token and reserve the order's open exposure."""
        decision = check(order, self.limits, self.state, marks, kill_reason=self.kill_reason)
        if decision.decision == "reject":
            return decision
        rate = self.limits.max_orders_per_second
        if rate is not None:
            ok, bucket = _bucket.take(self.bucket, order.t.timestamp(), float(rate))
            self.bucket = bucket
            if not ok:
                return reject(
                    "max_orders_per_second", f"max_orders_per_second {rate} exceeded", throttled=True
                )
        reserve_for(self.state, order, decision, marks)
        return decision

    def on_exec(self, report: ExecReport) -> None:
        self.state.apply_exec(report)

    def kill(self, reason: str) -> None:
        self.kill_reason = reason

    def unkill(self) -> None:
        self.kill_reason = None
