"""Kestrel: an async trading-bot daemon for Bybit.

    python main.py --mode sim --feed replay --no-ui --duration 30
    python main.py --mode live                      (testnet unless mainnet is opted in)
    python main.py --mode backtest --strategy sma_cross --param fast=10 --param slow=30

One event loop. `main` parses the command line, loads the settings once, builds every
component and injects its collaborators, owns the TaskGroup, and turns SIGINT/SIGTERM
into an orderly shutdown. Heavy libraries are imported only by the modes that use them,
so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from config import Settings
    from run_summary import RunSummary


MODES = (
    "sim",
    "live",
    "backtest",
    "optimize",
    "backfill",
    "train",
    "pairs",
    "parity",
    "anomalies",
    "patterns",
    "models",
)
EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2
WATCHABLE_SPEED = 40.0  # candles a second for a replay watched on the dashboard


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="kestrel",
        description="Async trading bot for Bybit: paper (sim), live, backtests and batch jobs.",
        epilog="Settings come from KESTREL_* environment variables and .env; "
        "see README.md or --print-config.",
    )
    parser.add_argument("--mode", choices=MODES, default="sim", help="what to run (default sim)")
    parser.add_argument(
        "--feed",
        choices=("live", "replay", "auto"),
        help="market data for sim: live Bybit, replay of stored candles, or auto (default: "
        "KESTREL_SIMULATION__FEED)",
    )
    parser.add_argument(
        "--data", type=Path, help="replay/backtest this candle file (.csv[.gz]/.parquet)"
    )
    parser.add_argument(
        "--funding",
        type=Path,
        help="perpetual replay/backtest: the pair's recorded funding (CSV timestamp,funding_rate)",
    )
    parser.add_argument("--pairs", help="comma-separated pairs, e.g. BTC/USDT,ETH/USDT")
    parser.add_argument("--timeframe", help="candle timeframe, e.g. 1m, 5m, 1h")
    parser.add_argument("--strategy", help="built-in strategy name or path to a .py file")
    parser.add_argument(
        "--param", action="append", default=[], metavar="K=V", help="strategy parameter"
    )
    parser.add_argument("--timerange", help="YYYYMMDD-YYYYMMDD (either side optional)")
    parser.add_argument("--since", help="start date for backfill/parity, e.g. 2024-01-01")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--speed", type=float, help="replay candles per second (0 = max)")
    parser.add_argument("--no-ui", action="store_true", help="no terminal dashboard")
    parser.add_argument("--summary-json", type=Path, help="write the run summary here")
    parser.add_argument(
        "--force",
        action="store_true",
        help="optimize: approve the chosen parameters even if the out-of-sample gate fails",
    )
    parser.add_argument(
        "--report-html", type=Path, help="backtest: write an HTML report (equity, drawdown, trades)"
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "replay", "fast"),
        default="auto",
        help="backtest engine: auto (default: fast where it can stand in for the replay, "
        "else replay), replay (the live code path, candle by candle) or fast (one pair, "
        "all_in or the standard profile on spot: the same trades and curve, many times "
        "faster; an error where it cannot)",
    )
    parser.add_argument(
        "--promote", metavar="NAME@VERSION", help="models: make this version the champion"
    )
    parser.add_argument(
        "--rollback", metavar="NAME", help="models: restore the previous champion of NAME"
    )
    parser.add_argument("--print-config", action="store_true", help="show settings (masked), exit")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default .env)")
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"kestrel: error: {message}", file=sys.stderr)
    return code


def parse_params(items: Sequence[str]) -> dict[str, float]:
    """Parse repeated `--param k=v` into numbers."""
    params: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--param {item!r}: value must be a number") from None
    return params


def _is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _apply_cli(settings: Settings, args: argparse.Namespace) -> Settings:
    """Return settings with command-line overrides applied (validated again)."""
    from config import Settings

    data = settings.model_dump()
    if args.feed:
        data["simulation"]["feed"] = args.feed
    if args.speed is not None:
        data["simulation"]["replay_speed"] = args.speed
    if args.pairs:
        data["strategy"]["pairs"] = [p.strip() for p in args.pairs.split(",") if p.strip()]
    if args.timeframe:
        data["strategy"]["timeframe"] = args.timeframe
    if args.strategy:
        data["strategy"]["name"] = args.strategy
        data["strategy"]["params"] = {}
    if args.param:
        data["strategy"]["params"] = {**data["strategy"]["params"], **parse_params(args.param)}
    if args.log_level:
        data["logging"]["level"] = args.log_level
    if args.no_ui:
        data["ui"]["enabled"] = False
    if (
        args.mode == "sim"
        and data["simulation"]["feed"] == "replay"
        and args.speed is None
        and not data["simulation"]["replay_speed"]
        and data["ui"]["enabled"]
        and _is_interactive()
    ):
        # Watched on the dashboard, a replay runs at a pace one can follow; on a pipe or in
        # CI it runs flat out and prints the summary.
        data["simulation"]["replay_speed"] = WATCHABLE_SPEED
    # Secrets were dumped as SecretStr objects; model_validate keeps them as they are.
    return Settings.model_validate(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = build_parser().parse_args(argv)
    from config import load_settings, masked
    from error_handler import BotError, ConfigError, DataError, FatalError

    try:
        settings = _apply_cli(load_settings(env_file=args.env_file), args)
    except ConfigError as e:
        return _fail(e.message)
    except ValueError as e:
        return _fail(str(e))
    if args.print_config:
        print(json.dumps(masked(settings), indent=2, default=str))
        return EXIT_OK
    if args.mode == "live" and not settings.exchange.has_keys:
        return _fail(
            "--mode live needs API keys: set KESTREL_EXCHANGE__API_KEY and "
            "KESTREL_EXCHANGE__API_SECRET (testnet keys unless KESTREL_EXCHANGE__TESTNET=false "
            "and KESTREL_EXCHANGE__ALLOW_MAINNET=true)"
        )
    from utils.utilities import setup_logging

    _register_secrets(settings)
    # Backtests replay history: only warnings unless --log-level asks for more.
    quiet = args.mode in ("backtest", "anomalies") and not args.log_level
    # A replay run flat out would scroll its decisions past in a second: they go to the log
    # file, and the console shows warnings and the summary.
    replay = (
        args.mode == "sim"
        and settings.simulation.feed == "replay"
        and not settings.simulation.replay_speed
        and not args.log_level
    )
    setup_logging(
        settings.storage.log_dir,
        level="WARNING" if quiet else settings.logging.level,
        json_console=settings.logging.json_console,
        # The dashboard owns the terminal: nothing may be written over it, from the start.
        console=not (args.mode in ("sim", "live") and settings.ui.enabled and _is_interactive()),
        console_level="WARNING" if replay else None,
        cache_loggers=True,
    )
    try:
        return asyncio.run(run_mode(args, settings))
    except (ConfigError, DataError) as e:
        return _fail(e.message)
    except FatalError as e:
        return _fail(e.message, e.exit_code)
    except BotError as e:  # e.g. the exchange stayed unreachable through every retry
        return _fail(f"{type(e).__name__}: {e.message}", EXIT_FATAL)
    except KeyboardInterrupt:
        return 130


def _register_secrets(settings: Settings) -> None:
    # Every secret the settings hold, so the logs redact it wherever it turns up.
    from utils.utilities import register_secret

    for secret in (
        settings.exchange.api_key,
        settings.exchange.api_secret,
        settings.telegram.token,
    ):
        if secret is not None:
            register_secret(secret.get_secret_value())


async def run_mode(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch to the chosen mode."""
    if args.mode in ("sim", "backtest", "live"):
        from runner import run_trading

        summary = await run_trading(args, settings)
        write_summary(summary, args.summary_json)
        if summary.restart_as:
            restart(summary.restart_as)
        return EXIT_OK
    from runner import run_batch

    return await run_batch(args, settings)


def restart_argv(argv: Sequence[str], mode: str) -> list[str]:
    """Return the command line that restarts this run in `mode`."""
    out = list(argv)
    if "--mode" in out:
        out[out.index("--mode") + 1] = mode
    else:
        out += ["--mode", mode]
    if mode == "live" and "--feed" in out:  # the live feed is implied
        at = out.index("--feed")
        del out[at : at + 2]
    return out


def restart(mode: str) -> None:
    """Replace this process with the same command in another mode (dashboard's sim/live)."""
    import os

    from utils.utilities import stop_log_listener

    argv = restart_argv(sys.argv, mode)
    stop_log_listener()  # execv skips atexit: flush the queued log lines first
    print(f"kestrel: restarting in {mode} mode", file=sys.stderr)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *argv])  # noqa: S606 - our own entry point


def write_summary(summary: RunSummary, path: Path | None) -> None:
    """Print the summary and write it as JSON (`RunSummary.to_dict`) when asked."""
    from rich.console import Console
    from rich.table import Table

    from utils.utilities import atomic_write, flush_logs

    flush_logs()  # the run's last log lines first: on one pipe, the summary ends the output
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(summary.to_dict(), indent=2, default=str, sort_keys=True)
        atomic_write(path, text)
    table = Table(title=f"Kestrel {summary.mode} summary", show_header=False)
    rows: tuple[tuple[str, float | int, str], ...] = (
        ("candles", summary.candles, "int"),
        ("n_trades", summary.n_trades, "int"),
        ("final_equity", summary.final_equity, "num"),
        ("total_return", summary.total_return, "pct"),
        ("max_drawdown", summary.max_drawdown, "pct"),
        ("fees", summary.fees, "num"),
        ("vetoes", summary.vetoes, "int"),
        ("rejections", summary.rejections, "int"),
    )
    for key, value, kind in rows:
        if isinstance(value, float):
            shown = f"{value:.2%}" if kind == "pct" else f"{value:,.4f}"
        else:
            shown = str(value)
        table.add_row(key, shown)
    trips = summary.breaker_trips
    if trips:
        last = trips[-1]
        table.add_row("breaker trips", f"{len(trips)} (last: {last.rule} -> {last.to_state})")
    off: dict[str, float] = {}
    for span in summary.trading_spans:
        off[span.state] = off.get(span.state, 0.0) + span.duration_ms / 3_600_000
    if off:
        table.add_row("time off normal", ", ".join(f"{k} {v:,.1f} h" for k, v in off.items()))
    Console(file=sys.stdout, width=100).print(table)


if __name__ == "__main__":
    sys.exit(main())
