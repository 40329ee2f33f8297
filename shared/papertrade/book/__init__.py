"""The matching engine: price-time-priority limit order books. Pure (no I/O, no clock), deterministic.

Two layers, both stable API:

- `OrderBook(symbol)` (papertrade.book.orderbook): exact decimals and the NATS messages. Feed it
  `NewOrderCmd` / `CancelCmd` / `ReplaceCmd` (papertrade.messages) or `ExpireDayCmd` / `QuoteCmd`
  (papertrade.book.commands: a session close; one account's cancels and places applied as a unit); `apply(cmd)` returns the `ExecReport`s the command caused, numbered by
  the book's `seq`. Bad commands (off-tick price, bad qty, unknown id, ...) give one `rejected`
  report with the reason and leave the book untouched. Queries: `top()`, `spread()`, `level(side,
  i)`, `levels(side, n)`, `depth(n)`, `find(order_id)`, `orders_of(account)`, `last_price`;
  empty answers are None. `take_prints()` gives the public trades (one per execution).
- `Book` (papertrade.book.engine): the fast core in integer ticks and lots; events are tuples in
  `book.events` (see the EV_* layouts there), turned into reports by `to_exec_reports`.
  `default_engine()` is the class `OrderBook` uses: the same source compiled with mypyc when it is
  built (`python -m papertrade.book.build`, run by `make install`), else the pure one;
  `PAPERTRADE_BOOK_ENGINE=pure` forces the pure one.

Rules: market, limit, stop, stop-limit and notional market orders; DAY/GTC/IOC/FOK and all-or-none
(fills entirely against the head order at the best price, or is canceled; never rests). A killed FOK
leaves the book as it was. Stops are dormant until the first trade, trigger on the last trade price
(buy: last >= stop, sell: last <= stop) after the order that traded completes, in entry order, and a
stop already satisfied fires at once; stops are never in depth. Every fill prints at the resting
order's price, one execution per maker. Replace: lowering only the quantity keeps priority; any other
change goes to the back of its level; at or below the filled quantity it is rejected. The replacing
order carries the old one's filled quantity (`cum_qty` continues). Self-trade prevention (per order,
from the account's setting): cancel_newest / cancel_oldest / cancel_both. `expire_day(close)` expires
DAY orders entered at or before the close.

Example::

    from datetime import UTC, datetime
    from decimal import Decimal
    from uuid import uuid4
    from papertrade.book import OrderBook
    from papertrade.enums import OrderType, Side, TimeInForce
    from papertrade.messages import NewOrderCmd

    book = OrderBook("AAPL")
    t = datetime(2024, 1, 2, 15, 0, tzinfo=UTC)
    acct = uuid4()
    def order(side, qty, price=None):
        kind = OrderType.LIMIT if price is not None else OrderType.MARKET
        return NewOrderCmd(order_id=uuid4(), account_id=acct, symbol="AAPL", side=side, type=kind,
                           time_in_force=TimeInForce.GTC, t=t, qty=Decimal(qty),
                           limit_price=None if price is None else Decimal(price))
    book.apply(order(Side.SELL, 10, "100.01"))          # [accepted]
    reports = book.apply(order(Side.BUY, 4))            # [accepted, fill (taker), fill (maker)]
    book.top()                                          # (None, (Decimal('100.01'), Decimal('6')))

The synthetic market maker's pure model is `papertrade.book.liquidity` (`ladder`, `reconcile`).
"""

from papertrade.book.commands import BookCommand, ExpireDayCmd, OpenBookCmd, QuoteCmd
from papertrade.book.engine import Book
from papertrade.book.orderbook import OrderBook, default_engine, to_exec_reports

__all__ = [
    "Book",
    "BookCommand",
    "ExpireDayCmd",
    "OpenBookCmd",
    "OrderBook",
    "QuoteCmd",
    "default_engine",
    "to_exec_reports",
]
