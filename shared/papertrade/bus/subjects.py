"""Every NATS subject of CONTRACT.md, defined once. Symbols go through `subject_token`."""

from __future__ import annotations

from uuid import UUID

from papertrade.enums import Interval
from papertrade.symbols import subject_token

RISK_CHECK = "risk.check"
#: broker -> risk (publish, queue group): an approved order never reached the book (e.g. the broker
#: refused it after risk approved it); body `papertrade.messages.CancelCmd`. Risk releases its
#: open exposure.
RISK_RELEASE = "risk.release"
#: risk replica -> every risk replica (request, one answer per replica): limits / kill switch changes,
#: a replica that stops. Body JSON `{"op": "limits" | "kill" | "gone", ...}`; answer `{"r": replica}`.
RISK_CTL = "risk.ctl"

#: JetStream streams: name -> subjects. Market data keeps a bounded history so late strategies warm up;
#: commands and executions are durable so a restarted orderbook or broker loses nothing.
STREAM_MD = "MD"
STREAM_EX_CMD = "EX_CMD"
STREAM_EX_EXEC = "EX_EXEC"

MD_ALL = "md.>"
EX_CMD_ALL = "ex.cmd.>"
EX_EXEC_ALL = "ex.exec.>"
EX_TRADE_ALL = "ex.trade.>"
EX_QUOTE_ALL = "ex.quote.>"
BROKER_EVENT_ALL = "broker.event.>"


def md_bar(interval: Interval | str, symbol: str) -> str:
    """`md.bar.<interval>.<symbol>`; `interval` or `symbol` may be `*` for a wildcard subscription."""
    return f"md.bar.{interval}.{_token(symbol)}"


def ex_cmd(symbol: str) -> str:
    return f"ex.cmd.{_token(symbol)}"


def ex_exec(symbol: str) -> str:
    return f"ex.exec.{_token(symbol)}"


def ex_trade(symbol: str) -> str:
    return f"ex.trade.{_token(symbol)}"


def ex_quote(symbol: str) -> str:
    return f"ex.quote.{_token(symbol)}"


def risk_own(replica: str) -> str:
    """`risk.own.<replica>`: checks and execution reports forwarded to the replica owning the account."""
    return f"risk.own.{replica}"


def broker_event(account_id: UUID | str) -> str:
    return f"broker.event.{account_id}"


def _token(symbol: str) -> str:
    return symbol if symbol in ("*", ">") else subject_token(symbol)
