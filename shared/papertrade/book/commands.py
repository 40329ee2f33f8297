"""The orderbook's own commands on `ex.cmd.<symbol>`, besides the broker's new / cancel / replace.

They travel in the same JetStream stream as everyone's commands so that replaying the stream rebuilds
every book exactly (the book exists from `OpenBookCmd` on; DAY orders expire at `ExpireDayCmd`; the
liquidity agent replaces its ladder with one `QuoteCmd`).
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from papertrade.messages import CancelCmd, NewOrderCmd, ReplaceCmd


class OpenBookCmd(msgspec.Struct, frozen=True, kw_only=True, tag="open_book", tag_field="cmd"):
    """Create the book of `symbol` (a no-op if it exists)."""

    symbol: str
    t: datetime | None = None


class ExpireDayCmd(msgspec.Struct, frozen=True, kw_only=True, tag="expire_day", tag_field="cmd"):
    """The session closed at `t`: every DAY order entered at or before `t` expires."""

    symbol: str
    t: datetime


class QuoteCmd(msgspec.Struct, frozen=True, kw_only=True, tag="quote", tag_field="cmd"):
    """One account's re-quote as one command: cancel its orders `cancels`, then place `places`.

    Applied as a unit, so no one's order lands between the cancels and the places and meets a
    half-replaced ladder (a market order would find no asks at all); the backtester replaces the
    maker's ladder between two strategy orders the same way. Every place must be `account_id`'s and
    on this book's symbol, else it is rejected on its own.
    """

    symbol: str
    account_id: UUID
    t: datetime
    cancels: tuple[UUID, ...] = ()
    places: tuple[NewOrderCmd, ...] = ()
    reason: str | None = None


BookCommand = NewOrderCmd | CancelCmd | ReplaceCmd | OpenBookCmd | ExpireDayCmd | QuoteCmd
