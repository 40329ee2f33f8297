"""Small builders for orderbook tests: commands on one book with readable arguments."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from papertrade.book import OrderBook
from papertrade.enums import ExecType, OrderType, SelfTradePrevention, Side, TimeInForce
from papertrade.messages import CancelCmd, ExecReport, NewOrderCmd, ReplaceCmd

T0 = datetime(2024, 1, 2, 15, 0, tzinfo=UTC)
A = UUID(int=0xA)
B = UUID(int=0xB)


def oid(n: int) -> UUID:
    return UUID(int=1000 + n)


class Harness:
    """An OrderBook plus terse commands; every call returns the reports it caused."""

    def __init__(self, symbol: str = "AAPL", engine: Any = None) -> None:
        self.book = OrderBook(symbol, engine)
        self.symbol = symbol
        self.t = T0

    def new(
        self,
        n: int,
        side: str,
        qty: Any = None,
        price: Any = None,
        *,
        type: str | None = None,
        tif: str = "gtc",
        stop: Any = None,
        notional: Any = None,
        aon: bool = False,
        account: UUID = A,
        stp: str = "none",
        t: datetime | None = None,
    ) -> list[ExecReport]:
        if type is None:
            type = "limit" if price is not None else "market"
            if stop is not None:
                type = "stop_limit" if price is not None else "stop"
        cmd = NewOrderCmd(
            order_id=oid(n),
            account_id=account,
            symbol=self.symbol,
            side=Side(side),
            type=OrderType(type),
            time_in_force=TimeInForce(tif),
            t=t or self.t,
            qty=None if qty is None else Decimal(str(qty)),
            notional=None if notional is None else Decimal(str(notional)),
            limit_price=None if price is None else Decimal(str(price)),
            stop_price=None if stop is None else Decimal(str(stop)),
            all_or_none=aon,
            stp=SelfTradePrevention(stp),
        )
        return self.apply(cmd)

    def cancel(self, n: int, account: UUID = A) -> list[ExecReport]:
        return self.apply(CancelCmd(order_id=oid(n), account_id=account, symbol=self.symbol, t=self.t))

    def replace(
        self,
        n: int,
        new: int,
        qty: Any = None,
        price: Any = None,
        stop: Any = None,
        tif: str | None = None,
    ) -> list[ExecReport]:
        return self.apply(
            ReplaceCmd(
                order_id=oid(n),
                new_order_id=oid(new),
                account_id=A,
                symbol=self.symbol,
                t=self.t,
                qty=None if qty is None else Decimal(str(qty)),
                limit_price=None if price is None else Decimal(str(price)),
                stop_price=None if stop is None else Decimal(str(stop)),
                time_in_force=None if tif is None else TimeInForce(tif),
            )
        )

    def apply(self, cmd: Any) -> list[ExecReport]:
        reports = self.book.apply(cmd)
        self.book.core.check()
        return reports

    def bids(self) -> list[tuple[str, str, int]]:
        return [(str(p), str(q), c) for p, q, c in self.book.levels(Side.BUY)]

    def asks(self) -> list[tuple[str, str, int]]:
        return [(str(p), str(q), c) for p, q, c in self.book.levels(Side.SELL)]


def kinds(reports: list[ExecReport]) -> list[str]:
    return [r.exec.value for r in reports]


def fills(reports: list[ExecReport], liquidity: str = "taker") -> list[tuple[str, str]]:
    return [
        (str(r.price), str(r.qty))
        for r in reports
        if r.exec is ExecType.FILL and r.liquidity is not None and r.liquidity.value == liquidity
    ]


def only(reports: list[ExecReport], kind: str) -> ExecReport:
    found = [r for r in reports if r.exec.value == kind]
    assert len(found) == 1, (kind, reports)
    return found[0]
