"""The live context: a strategy trading through the broker's REST API (Alpaca v2) like any client.

Synchronous on purpose: the strategy's callbacks run in their own thread (see
`papertrade_strategy_runner.container`), so a slow call blocks that strategy only. Bars and trade
updates arrive from NATS through the runner, which feeds them here (`on_bar`) and to the `Driver`.

An order the broker refuses (403 buying power / risk, 422 invalid, 429 throttled) is not an exception:
`submit` returns it with status `rejected` and the broker's message as `reason`, and a `rejected`
trade update follows the current callback (`pending_updates`), as in the backtester.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import httpx

from papertrade.enums import Interval, OrderStatus, Side
from papertrade.ledger import Ledger
from papertrade.messages import TradeUpdate
from papertrade.models import Bar, Order, Position
from papertrade.money import ZERO, fmt
from papertrade.strategy.context import AccountSnapshot, OrderRequest
from papertrade.strategy.wire import (
    account_from_alpaca,
    order_from_alpaca,
    order_to_alpaca,
    position_from_alpaca,
)
from papertrade.timeutil import EPOCH, utcnow

if TYPE_CHECKING:
    import pandas as pd

#: Seconds a request keeps retrying while the broker refuses connections (a restart), then fails.
RECONNECT_FOR = 30.0

#: Bars kept per symbol for `history()` (warm-up from the JetStream MD stream fills it at start).
HISTORY_BARS = 10_000


class BrokerError(RuntimeError):
    """The broker answered something unexpected (not a refusal of an order: those are `rejected`)."""


class LiveContext:
    """A StrategyContext over the broker's REST API; market data from the bars the runner feeds in."""

    def __init__(
        self,
        broker_url: str,
        key_id: str,
        secret: str,
        *,
        interval: Interval,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        self.http = client or httpx.Client(
            base_url=broker_url.rstrip("/"),
            headers={"APCA-API-KEY-ID": key_id, "APCA-API-SECRET-KEY": secret},
            timeout=timeout,
        )
        self.interval = interval
        self.account_id: UUID = UUID(int=0)
        self.bars: dict[str, deque[Bar]] = {}
        self.pending_updates: list[TradeUpdate] = []
        #: the strategy's own P&L: a ledger fed by its fills, marked at the latest closes
        self.ledger = Ledger(cash=ZERO)
        self.seen_exec: set[str] = set()
        self._now: datetime | None = None
        self._lock = threading.Lock()

    def connect(self) -> UUID:
        """Check the key pair and learn the account id (GET /v2/account)."""
        data = self._get("/v2/account")
        self.account_id = UUID(str(data["id"]))
        return self.account_id

    def close(self) -> None:
        self.http.close()

    # --- fed by the runner -----------------------------------------------------------------------

    def on_bar(self, bar: Bar) -> bool:
        """Keep the bar for history(); False if it is not newer than what we have (a duplicate)."""
        with self._lock:
            buf = self.bars.setdefault(bar.symbol, deque(maxlen=HISTORY_BARS))
            if buf and bar.t <= buf[-1].t:
                return False
            buf.append(bar)
            end = bar.t + bar.interval.delta
            if self._now is None or end > self._now:
                self._now = end
            return True

    def on_update(self, update: TradeUpdate) -> None:
        """Book the strategy's own fills in its P&L ledger (once per execution id)."""
        if update.event not in ("fill", "partial_fill") or update.qty is None or update.price is None:
            return
        exec_id = update.execution_id or f"{update.order.get('id')}:{update.timestamp.isoformat()}"
        if exec_id in self.seen_exec:
            return
        self.seen_exec.add(exec_id)
        side = Side(str(update.order.get("side", "buy")).lower())
        self.ledger.fill(
            str(update.order.get("symbol")), side, Decimal(update.qty), Decimal(update.price), fee=ZERO
        )

    def pnl(self) -> Decimal:
        """Realised + unrealised P&L of the strategy's own fills, at the latest closes."""
        marks = {s: b[-1].c for s, b in self.bars.items() if b}
        total = self.ledger.realized_pl
        for symbol, pos in self.ledger.positions.items():
            if pos.qty and symbol in marks:
                total += pos.unrealized_pl(marks[symbol])
        return total

    # --- StrategyContext -------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._now if self._now is not None else utcnow()

    def submit(self, request: OrderRequest) -> Order:
        body: dict[str, Any] = {
            "symbol": request.symbol,
            "side": request.side.value,
            "type": request.type.value,
            "time_in_force": request.time_in_force.value,
            "client_order_id": request.client_order_id or f"st-{uuid.uuid4().hex[:24]}",
        }
        if request.qty is not None:
            body["qty"] = fmt(request.qty)
        if request.notional is not None:
            body["notional"] = fmt(request.notional)
        if request.limit_price is not None:
            body["limit_price"] = fmt(request.limit_price)
        if request.stop_price is not None:
            body["stop_price"] = fmt(request.stop_price)
        if request.all_or_none:
            body["all_or_none"] = True
        if request.extended_hours:
            body["extended_hours"] = True
        r = self._send("POST", "/v2/orders", json=body)
        if r.status_code == 200:
            return order_from_alpaca(r.json(), self.account_id)
        if r.status_code in (400, 403, 404, 422, 429):
            return self._refused(request, body["client_order_id"], _message(r))
        raise BrokerError(f"POST /v2/orders answered {r.status_code}: {r.text[:300]}")

    def cancel(self, order_id: UUID) -> None:
        """Cancel; a 503 (the broker cannot send the cancel yet: its command stream is down, or it is
        recovering orders after a restart) is asked again for up to `RECONNECT_FOR` seconds."""
        r = self._send("DELETE", f"/v2/orders/{order_id}", retry_unavailable=True)
        if r.status_code not in (200, 204, 404, 422):
            raise BrokerError(f"DELETE /v2/orders/{order_id} answered {r.status_code}: {r.text[:300]}")

    def cancel_all(self) -> None:
        r = self._send("DELETE", "/v2/orders")
        if r.status_code not in (200, 204, 207):
            raise BrokerError(f"DELETE /v2/orders answered {r.status_code}: {r.text[:300]}")

    def close_all(self) -> list[Order]:
        self.cancel_all()
        out = []
        for pos in self.positions():
            side = Side.SELL if pos.qty > 0 else Side.BUY
            out.append(self.submit(OrderRequest(symbol=pos.symbol, side=side, qty=abs(pos.qty))))
        return out

    def position(self, symbol: str) -> Position:
        r = self._send("GET", f"/v2/positions/{symbol}")
        if r.status_code == 404:
            return Position(account_id=self.account_id, symbol=symbol)
        if r.status_code != 200:
            raise BrokerError(f"GET /v2/positions/{symbol} answered {r.status_code}: {r.text[:300]}")
        return position_from_alpaca(r.json(), self.account_id)

    def positions(self) -> list[Position]:
        return [position_from_alpaca(p, self.account_id) for p in self._get("/v2/positions")]

    def account(self) -> AccountSnapshot:
        return account_from_alpaca(self._get("/v2/account"))

    def open_orders(self) -> list[Order]:
        data = self._get("/v2/orders", params={"status": "open", "limit": 500, "direction": "asc"})
        return [order_from_alpaca(o, self.account_id) for o in data]

    def history(self, symbol: str, interval: str, n: int) -> pd.DataFrame:
        # imported here: pandas and the market calendar cost seconds, and many strategies never ask
        from papertrade.bars.aggregate import aggregate
        from papertrade.bars.frame import to_frame
        from papertrade.bars.series import BarSeries

        iv = Interval.parse(interval)
        with self._lock:
            bars = list(self.bars.get(symbol, ()))
        if not bars:
            return to_frame(BarSeries.empty(symbol, iv))
        series = BarSeries.from_bars(bars, symbol, bars[0].interval)
        if iv != series.interval:
            series = aggregate(series, iv)
            now_ns = int((self.now() - EPOCH).total_seconds() * 1e9)
            if len(series) and now_ns < int(series.t[-1]) + iv.seconds * 1_000_000_000:
                series = series.take(slice(0, len(series) - 1))
        return to_frame(series.take(slice(max(0, len(series) - n), len(series))))

    # --- internals -------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, retry_unavailable: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """One request; while the broker cannot be reached (it restarts) retry for up to
        `RECONNECT_FOR` seconds. A connect failure is always retried: the request never reached the
        broker. A connection lost before the answer (the broker died mid-request) is retried only
        when a second copy cannot do anything twice: reads, cancels (a second cancel answers 422) and
        order submits, which carry a client_order_id (the broker answers a repeat with the first
        order). With `retry_unavailable`, a 503 answer is asked again within the same time."""
        deadline = time.monotonic() + RECONNECT_FOR
        delay = 0.1
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
                if not (retry_unavailable and r.status_code == 503) or time.monotonic() + delay > deadline:
                    return r
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if time.monotonic() + delay > deadline:
                    raise
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if not _repeatable(method, path, kwargs) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        r = self._send("GET", path, params=params)
        if r.status_code != 200:
            raise BrokerError(f"GET {path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def _refused(self, request: OrderRequest, client_order_id: str, reason: str) -> Order:
        now = self.now()
        order = request.to_order(
            id=uuid.uuid4(),
            client_order_id=client_order_id,
            account_id=self.account_id,
            now=now,
            status=OrderStatus.REJECTED,
            reason=reason,
        )
        self.pending_updates.append(
            TradeUpdate(event="rejected", order=order_to_alpaca(order), timestamp=now)
        )
        return order


def _repeatable(method: str, path: str, kwargs: dict[str, Any]) -> bool:
    """Whether sending this request again is safe when the first copy's fate is unknown."""
    if method in ("GET", "DELETE"):
        return True
    body = kwargs.get("json")
    return (
        method == "POST"
        and path == "/v2/orders"
        and isinstance(body, dict)
        and bool(body.get("client_order_id"))
    )


def _message(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:300]
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])
    return str(data)[:300]
