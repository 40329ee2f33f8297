"""The orderbook's own commands on `ex.cmd.<symbol>`, besides the broker's new / cancel / replace.

They travel in the same JetStream stream as everyone's commands so that replaying the stream rebuilds
every book exactly (the book exists from `OpenBookCmd` on; DAY orders expire at `ExpireDayCmd`).
"""

from __future__ import annotations

from datetime import datetime

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


BookCommand = NewOrderCmd | CancelCmd | ReplaceCmd | OpenBookCmd | ExpireDayCmd
