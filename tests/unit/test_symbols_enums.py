import pytest

from papertrade.bus import subjects
from papertrade.enums import Interval, OrderStatus, OrderType, Side, TimeInForce
from papertrade.errors import ValidationError
from papertrade.instruments import instrument
from papertrade.symbols import is_crypto, normalize_symbol, subject_token, symbol_from_token


@pytest.mark.parametrize(
    ("raw", "norm"), [("aapl", "AAPL"), (" BRK.B ", "BRK.B"), ("@btcusd", "@BTCUSD"), ("BTC/USD", "BTC/USD")]
)
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_symbol(raw) == norm


@pytest.mark.parametrize(
    "bad", ["", "AA PL", "A_B", ".AAPL", "AAPL.", "@@BTC", "A*", "TOOLONGSYMBOLNAME12345", "A>B"]
)
def test_invalid_symbols_are_refused_with_the_field(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        normalize_symbol(bad, "symbols[0]")
    assert err.value.field == "symbols[0]"


def test_non_string_symbol() -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        normalize_symbol(42)


def test_subject_token_keeps_one_token_and_inverts() -> None:
    for sym in ("AAPL", "BRK.B", "@BTCUSD", "BTC/USD", "BF-B"):
        token = subject_token(sym)
        assert "." not in token and " " not in token and "*" not in token and ">" not in token
        assert symbol_from_token(token) == sym
    assert subjects.md_bar(Interval.M1, "BRK.B") == "md.bar.1m.BRK_B"
    assert subjects.ex_cmd("@BTCUSD") == "ex.cmd.@BTCUSD"
    assert subjects.ex_exec("AAPL") == "ex.exec.AAPL"
    assert subjects.md_bar("*", "*") == "md.bar.*.*"
    assert subjects.broker_event("abc") == "broker.event.abc"
    assert is_crypto("@BTCUSD") and not is_crypto("AAPL")


def test_enums_are_the_lowercase_wire_values() -> None:
    assert [s.value for s in Side] == ["buy", "sell"]
    assert OrderType("stop_limit").needs_limit_price and OrderType("stop_limit").needs_stop_price
    assert not TimeInForce.IOC.rests and TimeInForce.GTC.rests
    assert OrderStatus.PARTIALLY_FILLED.is_open and OrderStatus.REPLACED.is_final
    assert Side.BUY.opposite is Side.SELL and Side.SELL.sign == -1


def test_intervals_and_alpaca_timeframes() -> None:
    assert Interval.parse("5m") is Interval.M5
    assert Interval.parse("1Hour") is Interval.H1
    assert Interval.parse("1Day") is Interval.D1
    assert Interval.M15.seconds == 900 and Interval.D1.minutes == 1440
    with pytest.raises(ValidationError, match="interval: unknown interval '7m'"):
        Interval.parse("7m")


def test_instruments() -> None:
    assert str(instrument("AAPL").tick) == "0.01" and instrument("AAPL").lot == 1
    assert instrument("@BTCUSD").crypto and str(instrument("@BTCUSD").lot) == "0.0001"
