"""The `papertrade` command. Subcommands (argparse subparsers; others may add theirs in `_COMMANDS`):

    papertrade backtest <entrypoint> --symbols AAPL,MSFT --start 2024-01-02 --end 2024-03-28 \\
        --interval 1m --params '{"fast": 10, "slow": 30}' --report out.html

`backtest` runs a strategy over the seeded synthetic market (default), or over real files with
`--data FILE` (CSV or Parquet, once per symbol; the symbol is the file's name unless `--symbols` names
them in the same order), prints the figures and writes the HTML report. Exit code 0 when the
strategy ran to the end, 1 when it raised (it is paused and the error is in the report), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from papertrade.enums import Interval
from papertrade.errors import ValidationError

if TYPE_CHECKING:
    from papertrade.bars.series import BarSeries


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papertrade", description="papertrade: the paper-trading stack's tools"
    )
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for name, (register, _) in _COMMANDS.items():
        register(sub.add_parser(name, help=_COMMANDS[name][1], description=_COMMANDS[name][1]))
    return parser


def _register_backtest(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "entrypoint", help="the strategy: package.module:Class (e.g. papertrade.samples.sma_cross:SmaCross)"
    )
    p.add_argument(
        "--symbols", default="", help="comma-separated symbols (default: AAPL, or the --data files' names)"
    )
    p.add_argument("--start", default=None, help="first bar (ISO date or time; naive = your zone)")
    p.add_argument("--end", default=None, help="last bar (inclusive)")
    p.add_argument("--interval", default="1m", help="bar interval: 1m 5m 15m 30m 1h 1d (default 1m)")
    p.add_argument("--params", default="{}", help="strategy params as a JSON object")
    p.add_argument("--data", action="append", default=[], help="a CSV/Parquet bar file (repeat per symbol)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic market (default 0)")
    p.add_argument("--hours", default="regular", choices=["regular", "24/7"], help="market hours")
    p.add_argument("--cash", default="100000", help="starting cash (default 100000)")
    p.add_argument(
        "--commission", default=None, help='commission model JSON, e.g. {"kind":"per_share","amount":"0.005"}'
    )
    p.add_argument("--limits", default=None, help="risk limits JSON (papertrade.risk.Limits)")
    p.add_argument("--report", default=None, help="write the HTML report here")
    p.add_argument("--trades", default=None, help="write the round trips as CSV here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_backtest)


def _backtest(args: argparse.Namespace) -> int:
    from papertrade.backtest import BacktestConfig, run_backtest
    from papertrade.ledger import CommissionModel
    from papertrade.strategy.loader import StrategyLoadError

    try:
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise ValueError("--params must be a JSON object")
        cash = Decimal(args.cash)
        commission = (
            CommissionModel.parse(json.loads(args.commission)) if args.commission else CommissionModel()
        )
        limits = json.loads(args.limits) if args.limits else None
        data = _load_data(args)
        config = BacktestConfig(cash=cash, commission=commission, limits=limits, hours=args.hours)
        result = run_backtest(
            args.entrypoint, data, params=params, config=config, progress=not args.no_progress
        )
    except (ValueError, ValidationError, StrategyLoadError, InvalidOperation, OSError) as exc:
        print(f"papertrade backtest: {exc}", file=sys.stderr)
        return 2
    width = max(len(k) for k, _ in result.summary())
    for label, value in result.summary():
        print(f"{label:<{width}}  {value}")
    if args.report:
        path = result.write_html(args.report)
        print(f"{'report':<{width}}  {path}")
    if args.trades:
        result.trades.to_csv(args.trades, index=False)
        print(f"{'trades':<{width}}  {args.trades}")
    if result.error:
        print(
            f"\nthe strategy stopped with an error:\n{result.raw.traceback or result.error}", file=sys.stderr
        )
        return 1
    return 0


def _load_data(args: argparse.Namespace) -> list[BarSeries]:
    from papertrade.bars import generate, load_file
    from papertrade.symbols import normalize_symbol
    from papertrade.timeutil import parse_time, utcnow

    interval = Interval.parse(args.interval)
    symbols = [normalize_symbol(s) for s in args.symbols.split(",") if s.strip()]
    start = parse_time(args.start, "start") if args.start else None
    end = parse_time(args.end, "end") if args.end else None
    if start and end and end < start:
        raise ValidationError("end", "is before start")
    out = []
    if args.data:
        if symbols and len(symbols) != len(args.data):
            raise ValidationError(
                "symbols", "give one symbol per --data file (or none to use the file names)"
            )
        for i, path in enumerate(args.data):
            series = load_file(Path(path), symbols[i] if symbols else None)
            series = series.between(_ns(start), _ns(end))
            out.append(_resample(series, interval, args.hours))
    else:
        end = end or utcnow()
        start = start or end - timedelta(days=30)
        for symbol in symbols or ["AAPL"]:
            series = generate(symbol, start, end, seed=args.seed, hours=args.hours)
            out.append(_resample(series, interval, args.hours))
    if not out or all(len(s) == 0 for s in out):
        raise ValidationError("data", "no bars in that range")
    return out


def _resample(series: BarSeries, interval: Interval, hours: str) -> BarSeries:
    from papertrade.bars import aggregate

    if series.interval == interval:
        return series
    return aggregate(series, interval, hours=hours)


def _ns(t: datetime | None) -> int | None:
    if t is None:
        return None
    from papertrade.bars import dt_to_ns

    return dt_to_ns(t)


#: name -> (register(parser), help). Add a subcommand by adding an entry.
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "backtest": (_register_backtest, "backtest a strategy over synthetic or real bars"),
}


if __name__ == "__main__":
    sys.exit(main())
