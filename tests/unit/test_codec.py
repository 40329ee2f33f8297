from datetime import UTC, datetime
from decimal import Decimal
from uuid import uuid4

import orjson
import pytest

from papertrade.codec import convert, decode, encode
from papertrade.enums import ExecType, Interval, Side
from papertrade.errors import ValidationError
from papertrade.messages import CancelCmd, Command, ExecReport, NewOrderCmd, ReplaceCmd, RiskDecision
from papertrade.models import Bar

T = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def test_bar_wire_shape_is_the_contracts() -> None:
    bar = Bar(
        symbol="AAPL",
        interval=Interval.M1,
        t=T,
        o=Decimal("1.5"),
        h=Decimal("2"),
        l=Decimal("1"),
        c=Decimal("1.75"),
        v=Decimal(100),
    )
    body = orjson.loads(encode(bar))
    assert body == {
        "symbol": "AAPL",
        "interval": "1m",
        "t": "2024-01-02T14:30:00Z",
        "o": "1.5",
        "h": "2",
        "l": "1",
        "c": "1.75",
        "v": "100",
    }
    assert decode(encode(bar), Bar) == bar


def test_decimals_accept_numbers_and_strings() -> None:
    raw = b'{"symbol":"A","interval":"1m","t":"2024-01-02T14:30:00Z","o":1.1,"h":"2","l":1,"c":"1.5","v":3}'
    bar = decode(raw, Bar)
    assert bar.o == Decimal("1.1") and bar.l == Decimal(1)


def test_command_union_round_trips_by_tag() -> None:
    oid, acc = uuid4(), uuid4()
    cmds: list[Command] = [
        NewOrderCmd(
            order_id=oid,
            account_id=acc,
            symbol="AAPL",
            side=Side.BUY,
            type="limit",  # type: ignore[arg-type]
            time_in_force="gtc",
            t=T,
            qty=Decimal(5),
            limit_price=Decimal("10.01"),
        ),  # type: ignore[arg-type]
        CancelCmd(order_id=oid, account_id=acc, symbol="AAPL", t=T),
        ReplaceCmd(order_id=oid, new_order_id=uuid4(), account_id=acc, symbol="AAPL", t=T, qty=Decimal(3)),
    ]
    for cmd in cmds:
        wire = encode(cmd)
        assert orjson.loads(wire)["cmd"] in ("new", "cancel", "replace")
        assert decode(wire, Command) == cmd  # type: ignore[arg-type]


def test_exec_report_and_risk_decision() -> None:
    rep = ExecReport(
        exec=ExecType.FILL,
        seq=7,
        order_id=uuid4(),
        account_id=uuid4(),
        symbol="AAPL",
        side=Side.SELL,
        t=T,
        exec_id="AAPL-7",
        price=Decimal("10"),
        qty=Decimal(2),
    )
    assert decode(encode(rep), ExecReport) == rep
    dec = decode(b'{"decision":"clip","qty":"5"}', RiskDecision)
    assert dec.qty == Decimal(5) and not dec.throttled


@pytest.mark.parametrize(
    ("raw", "field"),
    [(b'{"cmd":"new","symbol":1}', "symbol"), (b'{"cmd":"explode"}', "body"), (b"{not json", "body")],
)
def test_bad_bodies_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        decode(raw, Command)  # type: ignore[arg-type]
    assert err.value.field == field or field == "body"


def test_convert_from_builtins() -> None:
    dec = convert({"decision": "reject", "reason": "x", "rule": "max_order_qty"}, RiskDecision)
    assert dec.decision == "reject"
    with pytest.raises(ValidationError):
        convert({"decision": "maybe"}, RiskDecision)
