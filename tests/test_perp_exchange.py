"""Perpetuals live: funding settlements, funding rate history and liqPrice from the emulator."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from bybit_converters import funding_from_ccxt
from exchange import Exchange
from models import OrderIntent, OrderType, PositionSide, Side
from perpetuals import isolated_margin, liquidation_price
from portfolio import Portfolio
from tests.bybit_emulator import BybitEmulator, exchange_settings


PERP = "BTC/USDT:USDT"


@pytest.fixture
async def emu() -> AsyncIterator[BybitEmulator]:
    """Return a running emulator."""
    async with BybitEmulator() as server:
        yield server


@pytest.fixture
async def ex(emu: BybitEmulator) -> AsyncIterator[Exchange]:
    """Return an open Exchange on the emulator with fast retries."""
    async with Exchange(
        exchange_settings(emu), retry_attempts=3, retry_base_s=0.01, retry_cap_s=0.05
    ) as exchange:
        yield exchange


async def _open(ex: Exchange, side: Side, qty: str, cid: str) -> None:
    await ex.create_order(OrderIntent(PERP, side, Decimal(qty), OrderType.MARKET, cid, "t"))


async def test_funding_settled_on_the_exchange_reaches_the_portfolio_once(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """A long pays a positive rate: the wallet, the execution list and the portfolio agree;
    the same settlement fetched twice is applied once."""
    await _open(ex, Side.BUY, "0.02", "f-1")
    before = emu.wallet["USDT"]
    mark = emu.last_price("BTCUSDT", "linear")
    paid = emu.settle_funding("BTCUSDT", "0.0001")
    assert paid == Decimal("0.02") * mark * Decimal("0.0001")
    assert emu.wallet["USDT"] == before - paid
    [payment] = await ex.fetch_funding_payments(PERP)
    assert (payment.pair, payment.amount, payment.rate) == (PERP, paid, Decimal("0.0001"))
    portfolio = Portfolio(Decimal(1_000))
    assert portfolio.apply_funding_payment(payment)
    assert not portfolio.apply_funding_payment(payment)
    assert portfolio.cash == Decimal(1_000) - paid
    assert portfolio.funding == -paid
    assert await ex.fetch_funding_payments("BTC/USDT") == []  # spot has no funding


async def test_a_short_pays_a_negative_rate_and_receives_a_positive_one(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Short 0.03: at -0.02 % it pays, at +0.01 % it receives; amounts signed accordingly."""
    await _open(ex, Side.SELL, "0.03", "f-2")
    mark = emu.last_price("BTCUSDT", "linear")
    emu.settle_funding("BTCUSDT", "-0.0002", ts=emu.clock.now_ms() - 2)
    emu.settle_funding("BTCUSDT", "0.0001", ts=emu.clock.now_ms() - 1)
    first, second = await ex.fetch_funding_payments(PERP, since=emu.clock.now_ms() - 60_000)
    assert first.amount == Decimal("0.03") * mark * Decimal("0.0002")
    assert second.amount == -(Decimal("0.03") * mark * Decimal("0.0001"))


async def test_positions_carry_bybits_liquidation_price(emu: BybitEmulator, ex: Exchange) -> None:
    """At 10x, the emulator's liqPrice (Bybit's formula) equals ours for the same position."""
    await ex.set_leverage(PERP, 10)
    await _open(ex, Side.BUY, "0.05", "f-3")
    [position] = await ex.fetch_positions([PERP])
    assert position.leverage == Decimal(10)
    margin = isolated_margin(position.entry_price, position.qty, Decimal(10))
    ours = liquidation_price(PositionSide.LONG, position.entry_price, position.qty, margin, PERP)
    assert position.liquidation_price == ours
    assert position.liquidation_price == position.entry_price * Decimal("0.905")


async def test_funding_rate_history_is_fetched_in_time_order(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Recorded rates come back oldest first, from `since` on, across pages."""
    start = emu.clock.now_ms() - 300 * 8 * 3_600_000
    for k in range(300):
        emu.settle_funding("BTCUSDT", Decimal(k) / 10**6, ts=start + k * 8 * 3_600_000)
    rates = await ex.fetch_funding_rates(PERP, since=start + 8 * 3_600_000)
    assert [t for t, _ in rates] == [start + k * 8 * 3_600_000 for k in range(1, 300)]
    assert [r for _, r in rates] == [k / 10**6 for k in range(1, 300)]


def test_the_recorded_bybit_funding_body_reads_as_a_short_paying() -> None:
    """ccxt's recorded Bybit funding execution: a short at rate -0.000761 paid 0.10232512."""
    raw = {
        "id": "8d1ef156-4ec6-4445-9a6c-1c0c24dbd046",
        "timestamp": 1710950400000,
        "amount": -0.10232512,
        "rate": -0.000761,
        "info": {"symbol": "XMRUSDT", "execTime": "1710950400000", "feeRate": "-0.000761",
                 "execValue": "134.3678", "execType": "Funding", "side": "Sell",
                 "execFee": "-0.10232512", "execId": "8d1ef156-4ec6-4445-9a6c-1c0c24dbd046"},
    }  # fmt: skip
    payment = funding_from_ccxt(raw, "XMR/USDT:USDT")
    assert payment.amount == Decimal("0.10232512")
    assert payment.rate == Decimal("-0.000761")
    assert payment.ts == 1710950400000


async def test_the_live_funding_poll_applies_each_settlement_once(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """The daemon's poll: a settlement reaches the open trade's funding once; later polls
    from the newest time seen add only new ones."""
    from daemon_live import apply_exchange_funding
    from models import Fill, Liquidity

    await _open(ex, Side.BUY, "0.02", "f-4")
    portfolio = Portfolio(Decimal(10_000))
    price = emu.last_price("BTCUSDT", "linear")
    portfolio.apply_fill(
        Fill("f-4", PERP, Side.BUY, price, Decimal("0.02"), Decimal(0), "USDT",
             Liquidity.TAKER, 1, "fill-1")
    )  # fmt: skip
    start = emu.clock.now_ms() - 10
    paid = emu.settle_funding("BTCUSDT", "0.0003", ts=start + 5)
    applied, newest = await apply_exchange_funding(ex, portfolio, [PERP, "BTC/USDT"], start)
    assert (applied, newest) == (1, start + 5)
    assert await apply_exchange_funding(ex, portfolio, [PERP], start) == (0, newest)
    assert portfolio.funding == -paid
    trade = portfolio.apply_fill(
        Fill("x", PERP, Side.SELL, price, Decimal("0.02"), Decimal(0), "USDT",
             Liquidity.TAKER, 2, "fill-2")
    )  # fmt: skip
    assert trade is not None
    assert trade.funding == pytest.approx(-float(paid))
    assert trade.pnl == pytest.approx(-float(paid))


async def test_backfill_stores_funding_beside_the_archive_and_replays_find_it(
    emu: BybitEmulator, ex: Exchange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backfilling a perpetual archives its funding history beside the candles; the
    replay's funding loader picks it up from there."""
    from candle_backfill import backfill_funding
    from config import load_settings
    from data_manager import backfill, replay_funding

    now = emu.clock.now_ms()
    since = now - now % 60_000 - 30 * 60_000
    times = [since - 8 * 3_600_000, since + 60_000, since + 120_000]
    for t, rate in zip(times, ("0.0001", "-0.0002", "0.0003"), strict=True):
        emu.settle_funding("BTCUSDT", rate, ts=t)
    await backfill(ex, tmp_path, [PERP], "1m", since, progress=False)
    written = await backfill_funding(ex, tmp_path, [PERP, "BTC/USDT"], "1m", since)
    assert written == {PERP: 2}  # the perpetual only, from `since` on
    monkeypatch.setenv("KESTREL_STORAGE__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KESTREL_STRATEGY__PAIRS", PERP)
    settings = load_settings(env_file=None)
    schedule = replay_funding(argparse.Namespace(data=None, funding=None), settings)[PERP]
    assert schedule.times.tolist() == times[1:]
    assert schedule.rates.tolist() == [-0.0002, 0.0003]


async def test_paper_trading_takes_the_next_funding_from_the_exchange(
    emu: BybitEmulator, ex: Exchange
) -> None:
    """Paper mode: the ticker's next funding time and rate join the engine's schedule; a
    refresh before that time replaces the rate, spot pairs get none."""
    from daemon_live import refresh_paper_funding
    from perpetuals import FundingSchedule

    now = emu.clock.now_ms()
    upcoming = now - now % 28_800_000 + 28_800_000
    emu.predicted_funding["BTCUSDT"] = Decimal("0.0005")
    funding: dict[str, FundingSchedule] = {}
    assert await refresh_paper_funding(ex, funding, [PERP, "BTC/USDT"]) == 1
    assert (funding[PERP].times.tolist(), funding[PERP].rates.tolist()) == ([upcoming], [0.0005])
    emu.predicted_funding["BTCUSDT"] = Decimal("-0.0002")
    await refresh_paper_funding(ex, funding, [PERP])
    assert (funding[PERP].times.tolist(), funding[PERP].rates.tolist()) == ([upcoming], [-0.0002])
