"""Start-up and crash recovery: the journal merged with the exchange's truth.

Part of `trade_executor` (which re-exports it). The same path serves a clean start and a
restart after a crash: orders are adopted or marked never-sent, missed fills recorded,
positions rebuilt, each position's stop re-adopted (one only), and a position that lost its
stop gets it back before the first decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import structlog

from executor_core import StopState
from models import (
    ATTEMPT_SEPARATOR,
    Fill,
    Order,
    OrderIntent,
    OrderPurpose,
    PositionSide,
    purpose_of,
)
from order_pieces import PieceExecutor
from portfolio import Portfolio


log = structlog.get_logger("trade_executor")


class RecoveringExecutor(PieceExecutor):
    """Reconcile the journal with the exchange and restore each position's protection."""

    # Where the start-up catch-up must look back to for closes the exchange made while the
    # bot was down (the oldest rebuilt position's opening; None: nothing held).
    outside_since: int | None = None

    async def reconcile(self, account: Any, store: Any, *, quote: str) -> str:
        """Merge the store's journal with the exchange's truth; return a report.

        The same path serves a clean start and a restart after a crash (STYLE rule 13):

        1. Orders journaled but never acknowledged are looked up by client order id and
           adopted when the exchange has them, else marked never-sent (so they are not
           resent, and not counted) once their request is too old to be processed.
        2. Orders the store believes open are refreshed from the exchange.
        3. Our fills that happened while the bot was down are fetched and recorded (the
           store ignores ones it already has).
        4. Positions are rebuilt by replaying every recorded fill; cash is the exchange's
           balance of the quote currency.
        5. Each position's protection is re-adopted: the newest working stop (by the
           journal's record of what each order is for) is the position's stop; any other
           working stop is cancelled, so at most one remains.
        """
        adopted, never_sent = await self._settle_unacknowledged(store)
        refreshed = await self._refresh_open(account, store)
        known = {o.client_order_id: o for o in await self._off(store.all_orders)}
        new_fills = await self._record_missed_fills(account, store, known)
        rebuilt = Portfolio(self.portfolio.cash, quote=quote)
        intents = {cid: await self._off(store.get_intent, cid) for cid in known}
        journal_fills = await self._off(store.fills)
        for fill in sorted(journal_fills, key=lambda f: (f.ts, f.fill_id)):
            intent = intents.get(fill.client_order_id)
            rebuilt.apply_fill(fill, reason=intent.reason if intent else "")
        balances = await account.fetch_balance()
        cash = balances[quote].total if quote in balances else self.portfolio.cash
        self.portfolio.restore(
            cash=cash,
            positions=list(rebuilt.positions().values()),
            fees=rebuilt.fees,
            realised_pnl=rebuilt.realised_pnl,
        )
        self.portfolio.closed.extend(rebuilt.closed)
        # A liquidation or ADL while the bot was down is no order of ours, so the fetch
        # above skips it: the catch-up before trading looks back to the oldest position.
        opened = [p.ts_opened for p in self.portfolio.positions().values()]
        self.outside_since = min(opened) - _SKEW_MARGIN_MS if opened else None
        # An entry still filling: its first pieces are the start of a position, no dust.
        filling = {
            order.pair
            for cid, order in known.items()
            if not self.orders.get(cid, order).status.is_terminal
            and (intent := intents.get(cid)) is not None
            and purpose_of(intent) is OrderPurpose.ENTRY
        }
        for pair in list(self.portfolio.positions()):
            if pair in filling:
                continue
            market = self._market_for(pair)
            self.portfolio.drop_dust(pair, max(market.min_qty, market.lot_size))
        await self._adopt_protection(known, intents)
        # The rebuilt portfolio holds every recorded fill: that is what is applied.
        self._applied = {}
        for fill in journal_fills:
            self._applied[fill.client_order_id] = (
                self._applied.get(fill.client_order_id, Decimal(0)) + fill.qty
            )
        for cid in list(self.orders):
            self._refresh_unapplied(cid)
        positions = self.portfolio.positions()
        lines = [
            f"orders adopted {adopted}, never sent {never_sent}, refreshed {refreshed}",
            f"fills recorded while down {new_fills}; {len(journal_fills)} fills in the journal",
            f"cash {cash} {quote}; {len(positions)} position(s)",
        ]
        lines += [f"  {p.pair} {p.side} {p.qty} @ {p.entry_price}" for p in positions.values()]
        self._audit.record(
            "reconciled",
            self._clock.now_ms(),
            adopted=adopted,
            never_sent=never_sent,
            refreshed=refreshed,
            new_fills=new_fills,
        )
        return "\n".join(lines)

    def catch_up_since(self, since: int | None) -> int | None:
        """Return where the start-up fill catch-up starts (None: Bybit's last seven days).

        `since`, or earlier when a held position is older: the exchange may have closed it
        (liquidation, ADL) since it opened, and that execution is no order of ours.
        """
        if since is None or self.outside_since is None:
            return since
        return min(since, self.outside_since)

    async def _settle_unacknowledged(self, store: Any) -> tuple[int, int]:
        """Adopt or mark never-sent each order journaled but never acknowledged."""
        adopted = never_sent = 0
        for order in await self._off(store.unacknowledged):
            found = await self._look_up(order.pair, order.client_order_id, order.ts_created)
            if isinstance(found, Order):
                adopted += 1
            elif found is False:
                never_sent += 1
            else:  # the exchange cannot tell yet: nothing more is sent on the pair until then
                self._unresolved[order.pair] = (order.client_order_id, order.ts_created)
        return adopted, never_sent

    async def _refresh_open(self, account: Any, store: Any) -> int:
        refreshed = 0
        for order in await self._off(store.open_orders):
            fresh = await account.fetch_order(order.pair, client_order_id=order.client_order_id)
            if fresh is not None:
                await self._off(store.update_order, fresh)
                self.orders[fresh.client_order_id] = fresh
                refreshed += 1
        return refreshed

    async def _record_missed_fills(self, account: Any, store: Any, known: dict[str, Order]) -> int:
        recorded = await self._off(store.fills)
        since = _fills_since(known.values(), recorded)
        new_fills = 0
        for pair in sorted({o.pair for o in known.values()}):
            for fill in await account.fetch_my_trades(pair, since=since):
                if fill.client_order_id in known and await self._off(store.record_fill, fill):
                    new_fills += 1
        return new_fills

    async def _adopt_protection(
        self, known: dict[str, Order], intents: dict[str, OrderIntent | None]
    ) -> None:
        working: dict[str, list[Order]] = {}
        for cid, order in known.items():
            intent = intents.get(cid)
            if intent is None:
                continue
            self._intents.setdefault(cid, intent)
            current = self.orders.setdefault(cid, order)
            kind = purpose_of(intent)
            if kind is OrderPurpose.ENTRY:
                self._note_entry(order, known)
            if current.status.is_terminal:
                continue
            if kind is OrderPurpose.STOP:
                working.setdefault(order.pair, []).append(current)
            elif kind is OrderPurpose.TAKE_PROFIT:
                self._slot(order.pair).others.append(cid)
        for pair, stops in working.items():
            await self._keep_one_stop(pair, stops)

    def _note_entry(self, order: Order, known: dict[str, Order]) -> None:
        # The newest entry of a held position is the one its protection belongs to.
        if not self.portfolio.has_position(order.pair):
            return
        slot = self._slot(order.pair)
        base = known.get(slot.base) if slot.base else None
        if base is None or order.ts_created >= base.ts_created:
            slot.base = order.client_order_id

    async def _keep_one_stop(self, pair: str, stops: list[Order]) -> None:
        """Keep the newest working stop of a held position; cancel every other one."""
        stops.sort(key=lambda o: (o.ts_created, o.client_order_id))
        slot = self._slot(pair)
        keep = stops[-1] if self.portfolio.has_position(pair) else None
        for stop in stops:
            if stop is keep:
                continue
            # A second stop, or one left on a flat account: it could only sell twice.
            slot.stop, slot.state = stop.client_order_id, StopState.WORKING
            if not await self._clear_stop(pair, slot):
                log.error(
                    "extra_stop_not_cancelled", pair=pair, client_order_id=stop.client_order_id
                )
        if keep is not None:
            slot.stop, slot.state = keep.client_order_id, StopState.WORKING
            if keep.stop_price is not None:
                # The working stop is the position's stop: trailing continues from it.
                self.portfolio.set_protection(pair, stop=keep.stop_price)
            log.info("stop_adopted", pair=pair, client_order_id=keep.client_order_id)

    async def restore_protection(self, price_for: Callable[[str], Decimal | None]) -> list[str]:
        """Give every position that lacks one its stop again; return pairs past their stop.

        A bot killed between an entry's fill and its stop's placement (or whose stop was
        lost) starts with an unprotected position: the stop goes back at its last level
        (the newest journaled stop, else the entry's). A position whose price is already
        through that level is returned for the engine to close at market instead.
        """
        crossed: list[str] = []
        if not self.protective_orders:
            return crossed
        for pair, position in self.portfolio.positions().items():
            async with self._holding(pair) as slot:
                self._settle(pair, slot)
                if slot.state is StopState.WORKING:
                    # Pieces that filled while the bot was down: the stop follows them.
                    await self._resize_stop(pair, slot, price_for(pair))
                    continue
                if slot.state is not StopState.NONE or slot.base is None:
                    continue
                level = position.stop_price or self._last_stop_level(pair, slot.base)
                if level is None:
                    continue
                price = price_for(pair)
                long = position.side is PositionSide.LONG
                if price is not None and (price <= level if long else price >= level):
                    crossed.append(pair)
                    continue
                self.portfolio.set_protection(pair, stop=level)
                await self._place_stop(pair, slot, level, seq=self._clock.now_ms(), price=price)
                log.warning("stop_restored", pair=pair, level=str(level), state=str(slot.state))
        return crossed

    def _last_stop_level(self, pair: str, base: str) -> Decimal | None:
        levels = [
            (intent.ts, intent.stop_price)
            for cid, intent in self._intents.items()
            if intent.pair == pair
            and cid.startswith(base.rpartition(ATTEMPT_SEPARATOR)[0] or base)
            and purpose_of(intent) is OrderPurpose.STOP
            and intent.stop_price is not None
        ]
        if levels:
            return max(levels, key=lambda t: t[0])[1]
        entry = self._intents.get(base)
        return entry.stop_loss if entry is not None else None


_SKEW_MARGIN_MS = 60_000


def _fills_since(orders: Iterable[Order], recorded: Iterable[Fill]) -> int | None:
    """Return where to start fetching our executions so that no missing fill is skipped.

    The newest recorded fill is not enough: a fill lost to a crash (or one that landed
    before the private stream subscribed) can be older than fills recorded after it. Any
    order whose filled quantity exceeds its recorded fills has one missing, so the fetch
    starts at the earliest such order's creation (less a minute for clock skew). None
    (Bybit's last seven days) only when nothing is recorded and nothing is missing.
    """
    recorded = list(recorded)
    totals: dict[str, Decimal] = {}
    for fill in recorded:
        totals[fill.client_order_id] = totals.get(fill.client_order_id, Decimal(0)) + fill.qty
    gaps = [
        o.ts_created - _SKEW_MARGIN_MS
        for o in orders
        if o.filled_qty > totals.get(o.client_order_id, Decimal(0))
    ]
    newest = [max(f.ts for f in recorded)] if recorded else []
    return min([*newest, *gaps], default=None)
