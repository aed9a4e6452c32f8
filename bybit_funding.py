"""Funding on Bybit's USDT perpetuals (part of `exchange`: `Exchange` inherits these calls).

The funding the exchange booked on our positions (the execution list, execType Funding),
the next funding time with its current rate (the ticker), and the funding rate history
(`/v5/market/funding/history`), as our types.
"""

from __future__ import annotations

import functools
from typing import Any

from bybit_converters import funding_from_ccxt
from exchange_base import ExchangeBase
from models import FundingPayment, MarketType


class ExchangeFunding(ExchangeBase):
    """`Exchange`'s funding calls (see the module docstring)."""

    async def fetch_funding_payments(
        self, pair: str, since: int | None = None
    ) -> list[FundingPayment]:
        """Return the funding settled on `pair`'s position since `since` (ms), oldest first.

        Bybit's execution list with execType Funding (ccxt `fetch_funding_history`); an
        empty list for spot pairs.
        """
        client = self._ensure_open()
        if self.market(pair).type is not MarketType.LINEAR:
            return []
        raw = await self._call(
            "fetch_funding_history", lambda: client.fetch_funding_history(pair, since), pair
        )
        payments = [funding_from_ccxt(r, pair) for r in raw]
        return sorted(payments, key=lambda p: (p.ts, p.payment_id))

    async def fetch_next_funding(self, pair: str) -> tuple[int, float] | None:
        """Return the next funding time (ms) and its current rate, None for spot pairs.

        Bybit's ticker (`nextFundingTime`, `fundingRate`; ccxt `fetch_funding_rate`): the
        rate the next settlement will apply if nothing changes before it.
        """
        client = self._ensure_open()
        if self.market(pair).type is not MarketType.LINEAR:
            return None
        raw = await self._call("fetch_funding_rate", lambda: client.fetch_funding_rate(pair), pair)
        ts, rate = raw.get("fundingTimestamp"), raw.get("fundingRate")
        if ts is None or rate is None:
            return None
        return int(ts), float(rate)

    async def fetch_funding_rates(
        self, pair: str, since: int, until: int | None = None
    ) -> list[tuple[int, float]]:
        """Return the pair's funding rate history as (funding time ms, rate), oldest first.

        Bybit's `/v5/market/funding/history` (ccxt `fetch_funding_rate_history`) answers
        at most 200 rates, the newest of its window: the range is walked in windows of
        199 funding intervals (the market's `fundingInterval`, else one hour), up to
        `until` or now.
        """
        client = self._ensure_open()
        info = (client.markets or {}).get(pair, {}).get("info") or {}
        interval = int(info.get("fundingInterval") or 60) * 60_000
        last = until if until is not None else self.server_now_ms()
        out: dict[int, float] = {}
        start = since
        while start <= last:
            end = min(start + 199 * interval, last)
            call = functools.partial(
                client.fetch_funding_rate_history, pair, start, 200, {"until": end}
            )
            raw: list[dict[str, Any]] = await self._call("fetch_funding_rate_history", call, pair)
            out.update(
                (int(r["timestamp"]), float(r["fundingRate"])) for r in raw if r.get("timestamp")
            )
            start = end + 1
        return sorted(out.items())
