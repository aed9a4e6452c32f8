"""Telegram pieces without a server: templates, views, rate limiter, outbox."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from config import TelegramSettings
from error_handler import ConfigError, RateLimitError
from models import (
    BotState,
    ClosedTrade,
    Decision,
    Fill,
    Liquidity,
    OrderIntent,
    OrderType,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Side,
    Snapshot,
    TradingState,
)
from telegram_bot import Outbox, OutgoingMessage, RateLimiter, TelegramBot, api_urls
from telegram_templates import (
    MAX_MESSAGE_CHARS,
    Alert,
    circuit_breaker,
    daily_summary,
    error_alert,
    find_pair,
    order_filled,
    order_rejected,
    plain_text,
    reconciliation_report,
    render_positions,
    render_profit,
    render_why,
    split_text,
    stop_hit,
    text_alert,
    trade_closed,
    trade_opened,
)
from tests.fake_telegram import TOKEN, FakeControl, html_problem
from utils.utilities import register_secret


NASTY = '<script>&amp; 1 < 2 > 0 & "q"</script>'
TS = 1_700_000_000_000


def _position(pair: str = "BTC/USDT", side: PositionSide = PositionSide.LONG) -> Position:
    return Position(
        pair=pair,
        side=side,
        qty=Decimal("0.0100"),
        entry_price=Decimal("65000.50"),
        ts_opened=TS,
        stop_price=Decimal("63700"),
        take_profit=Decimal("70000"),
        mark_price=Decimal("66000"),
    )


def _trade(pnl: float, pair: str = "ETH/USDT", reason: str = "take profit") -> ClosedTrade:
    return ClosedTrade(
        pair, PositionSide.LONG, TS, TS + 3_900_000, 2000.0, 2100.0, 1.0, 0.5, pnl, reason
    )


def _snapshot(**overrides: object) -> Snapshot:
    values: dict[str, object] = {
        "ts": TS,
        "mode": "sim",
        "state": BotState.RUNNING,
        "trading_state": TradingState.NORMAL,
        "portfolio": PortfolioSnapshot(ts=TS, cash=Decimal(1000), equity=Decimal(1000)),
    }
    values.update(overrides)
    return Snapshot(**values)  # type: ignore[arg-type]


# -- Templates ---------------------------------------------------------------------------------


TEMPLATES: dict[str, Callable[[str], Alert]] = {
    "text": lambda s: text_alert(s),
    "opened": lambda s: trade_opened(_position(pair=s), reason=s),
    "closed": lambda s: trade_closed(_trade(12.5, pair=s, reason=s)),
    "stop": lambda s: stop_hit(_position(pair=s), fill_price=Decimal("63650"), pnl=-13.5),
    "filled": lambda s: order_filled(
        Fill(s, s, Side.BUY, Decimal("1.5"), Decimal("2"), Decimal("0.01"), s, Liquidity.MAKER,
             TS, s)
    ),
    "rejected": lambda s: order_rejected(
        OrderIntent(s, Side.SELL, Decimal("0.1"), OrderType.LIMIT, s, s, price=Decimal("9.5")), s
    ),
    "breaker": lambda s: circuit_breaker(s, value=0.034, limit=0.03, state=s, detail=s),
    "error": lambda s: error_alert(RuntimeError(s), component=s),
    "daily": lambda s: daily_summary(TS, [_trade(5.0, pair=s)], equity=1005.0),
    "reconcile": lambda s: reconciliation_report(s),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_are_valid_html_for_hostile_text(name: str) -> None:
    """Every template escapes free-form text: Telegram accepts it and shows it literally."""
    alert = TEMPLATES[name](NASTY)
    assert html_problem(alert.text) is None
    assert NASTY in plain_text(alert.text)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_never_show_secrets(name: str) -> None:
    """A registered secret inside any free-form field is masked."""
    register_secret("s3cr3t-api-key-value")
    alert = TEMPLATES[name]("leaked s3cr3t-api-key-value here")
    assert "s3cr3t-api-key-value" not in alert.text
    assert "***" in alert.text


def test_trade_closed_shows_pnl_percent_and_holding_time() -> None:
    """A closed trade shows prices, PnL with its percentage of cost, and how long it was held."""
    text = plain_text(trade_closed(_trade(99.5)).text)
    assert "2000 → 2100 · qty 1" in text
    assert "PnL +99.50 (+4.98%) · fee 0.5000" in text
    assert "held 1h 05m" in text


def test_circuit_breaker_shows_the_numbers_that_tripped_it() -> None:
    """The breaker alert names the guard, its value and limit, the new state and until when."""
    alert = circuit_breaker(
        "daily_loss", value=0.034, limit=0.03, state=TradingState.HALTED, until_ts=TS
    )
    text = plain_text(alert.text)
    assert "Circuit breaker: daily_loss" in text
    assert "value 3.40% ≥ limit 3.00%" in text
    assert "trading → halted until 2023-11-14 22:13 UTC" in text


def test_similar_errors_share_a_coalescing_key() -> None:
    """Errors of one kind from one component coalesce; other kinds or components do not."""
    a = error_alert(RateLimitError("429 on fetch_ohlcv", component="exchange"))
    b = error_alert(RateLimitError("429 on fetch_ticker", component="exchange"))
    c = error_alert(RateLimitError("429", component="feed"))
    assert a.coalesce_key == b.coalesce_key != c.coalesce_key
    assert "RateLimitError in exchange" in plain_text(a.text)


def test_daily_summary_counts_and_equity_change() -> None:
    """The daily summary totals the day's trades and the equity change."""
    trades = [_trade(30.0, "BTC/USDT"), _trade(-10.0, "ETH/USDT")]
    text = plain_text(daily_summary(TS, trades, equity=1020.0, equity_start=1000.0).text)
    assert "Daily summary 2023-11-14" in text
    assert "trades 2 · wins 1 · losses 1" in text
    assert "PnL +20.00" in text
    assert "equity 1,000.00 → 1,020.00 (+2.00%)" in text
    assert "best BTC/USDT +30.00 · worst ETH/USDT -10.00" in text


# -- Views -------------------------------------------------------------------------------------


def test_views_of_an_empty_bot() -> None:
    """Views of a bot with nothing going on say so instead of rendering empty tables."""
    snap = _snapshot()
    assert render_positions(snap) == "No open positions."
    assert render_profit(snap).startswith("No closed trades yet.")
    assert "No decision recorded for BTC/USDT. Known: none." in render_why(snap, "BTC/USDT")


def test_why_shows_the_order_that_was_sent() -> None:
    """/why on an approved decision shows the order intent with its stop and take-profit."""
    intent = OrderIntent(
        "BTC/USDT:USDT", Side.BUY, Decimal("0.02"), OrderType.MARKET, "cid", "entry",
        stop_loss=Decimal("63000"), take_profit=Decimal("70000.5"),
    )  # fmt: skip
    decision = Decision("BTC/USDT:USDT", TS, None, "approved", intent=intent)
    text = plain_text(render_why(_snapshot(last_decisions={"BTC/USDT:USDT": decision}), "btcusdt"))
    assert "Why BTC/USDT:USDT" in text
    assert "signal: none" in text
    assert "order: buy 0.02 market stop 63000 tp 70000.5" in text


def test_why_shows_the_latest_patterns_with_their_direction_and_age() -> None:
    """Patterns come newest first with a direction mark and how many bars ago they formed."""
    decision = Decision("BTC/USDT", TS, None, "no signal")
    patterns = [
        {"name": "cdlengulfing", "label": "Engulfing Pattern", "direction": "bullish",
         "bars_ago": 0, "ts": TS},
        {"name": "cdldoji", "label": "Doji", "direction": "neutral", "bars_ago": 2, "ts": TS},
        {"name": "cdlhammer", "label": "Hammer", "direction": "bearish", "bars_ago": 1, "ts": TS},
    ]  # fmt: skip
    snap = _snapshot(last_decisions={"BTC/USDT": decision})
    text = plain_text(render_why(snap, "BTC/USDT", patterns))
    assert (
        "patterns: Engulfing Pattern ▲ (last candle), Doji · (2 bars ago), Hammer ▼ (1 bar ago)"
        in text
    )
    many = [dict(patterns[0], bars_ago=0) for _ in range(11)]
    assert "+3 more" in plain_text(render_why(snap, "BTC/USDT", many))
    assert "patterns" not in plain_text(render_why(snap, "BTC/USDT"))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("BTC/USDT", "BTC/USDT"),
        ("btcusdt", "BTC/USDT"),
        ("btc-usdt", "BTC/USDT"),
        ("ETHUSDT", "ETH/USDT:USDT"),
        ("eth/usdt:usdt", "ETH/USDT:USDT"),
        ("DOGEUSDT", None),
    ],
)
def test_find_pair_accepts_what_operators_type(query: str, expected: str | None) -> None:
    """Pairs match regardless of case and separators, linear contracts by their base/quote."""
    assert find_pair(query, ["BTC/USDT", "ETH/USDT:USDT"]) == expected


@given(st.text(alphabet=st.sampled_from("ab<>&\n "), max_size=400), st.integers(5, 60))
def test_split_text_keeps_everything_within_the_limit(text: str, limit: int) -> None:
    """Chunks never exceed the limit and put back together give the text (line breaks aside)."""
    chunks = split_text(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://127.0.0.1:8081", ("http://127.0.0.1:8081/bot", "http://127.0.0.1:8081/file/bot")),
        ("https://api.telegram.org/", ("https://api.telegram.org/bot", "https://api.telegram.org/file/bot")),
        ("http://h:1/bot", ("http://h:1/bot", "http://h:1/file/bot")),
        ("http://h:1/bot{token}/test", ("http://h:1/bot{token}/test", "http://h:1/file/bot{token}/test")),
    ],
)  # fmt: skip
def test_api_urls(base: str, expected: tuple[str, str]) -> None:
    """A server root gains /bot and /file/bot; explicit forms are kept."""
    assert api_urls(base) == expected


def test_api_urls_refuse_other_schemes() -> None:
    """Only http(s) URLs are accepted, and a bot configured otherwise fails at construction."""
    with pytest.raises(ValueError, match="http"):
        api_urls("ftp://127.0.0.1")
    settings = TelegramSettings(token=SecretStr(TOKEN), chat_ids=[1], base_url="ftp://127.0.0.1")
    with pytest.raises(ConfigError, match="http"):
        TelegramBot(settings, FakeControl())


# -- Rate limiter ------------------------------------------------------------------------------


def test_rate_limiter_spaces_messages_per_chat() -> None:
    """A chat waits the per-chat interval; another chat does not."""
    limiter = RateLimiter(per_chat_per_second=2.0)
    limiter.record(1, now=10.0)
    assert limiter.delay(1, now=10.1) == pytest.approx(0.4)
    assert limiter.delay(2, now=10.1) == 0.0
    assert limiter.delay(1, now=10.5) == 0.0


def test_rate_limiter_caps_groups_per_minute() -> None:
    """A group (negative id) gets at most 20 messages in any minute."""
    limiter = RateLimiter(per_chat_per_second=100.0, group_per_minute=20)
    for i in range(20):
        assert limiter.delay(-5, now=float(i)) == 0.0
        limiter.record(-5, now=float(i))
    assert limiter.delay(-5, now=20.0) == pytest.approx(40.0)
    assert limiter.delay(7, now=20.0) == 0.0  # private chats are not group-limited


def _schedule(
    limiter: RateLimiter, chats: list[int], start: float = 0.0
) -> list[tuple[int, float]]:
    # Send one message per entry as early as the limiter allows, in order.
    now, sent = start, []
    for chat in chats:
        now += limiter.delay(chat, now)
        limiter.record(chat, now)
        sent.append((chat, now))
    return sent


@settings(max_examples=60)
@given(
    st.lists(st.sampled_from([1, 2, 3, -10]), min_size=1, max_size=120),
    st.floats(0.5, 20.0),
    st.integers(1, 30),
)
def test_rate_limiter_schedule_never_breaks_a_limit(
    chats: list[int], per_chat: float, total: int
) -> None:
    """Whatever the order of chats, the schedule keeps every per-chat, group and total limit."""
    sent = _schedule(RateLimiter(per_chat, float(total), group_per_minute=20), chats)
    eps = 1e-9
    for chat in set(chats):
        times = [t for c, t in sent if c == chat]
        assert all(b - a >= 1 / per_chat - eps for a, b in itertools.pairwise(times))
        if chat < 0:
            assert all(b - a >= 60 - eps for a, b in zip(times, times[20:], strict=False))
    times = [t for _, t in sent]
    assert all(b - a >= 1 - eps for a, b in zip(times, times[total:], strict=False))


# -- Outbox ------------------------------------------------------------------------------------


def _alert(chat: int, text: str, category: str = "info", key: str = "") -> OutgoingMessage:
    return OutgoingMessage(chat, text, category, key=key, ts_first=TS)


def test_identical_alerts_coalesce_with_a_count() -> None:
    """Queued alerts with the same key merge; the rendered message carries the count."""
    box = Outbox()
    outcomes = [box.put(_alert(1, "feed stalled")) for _ in range(3)]
    assert outcomes == ["queued", "coalesced", "coalesced"]
    [message] = box.take(1)
    assert message.render() == "feed stalled\n<i>(x3, first at 22:13:20 UTC)</i>"


def test_replies_jump_the_alert_queue_and_are_never_batched() -> None:
    """Interactive replies go before queued alerts and alone."""
    box = Outbox()
    box.put(_alert(1, "alert a"))
    box.put(_alert(1, "alert b"))
    box.put(OutgoingMessage(1, "reply", interactive=True))
    assert [m.text for m in box.take(1)] == ["reply"]
    assert [m.text for m in box.take(1)] == ["alert a", "alert b"]
    assert box.take(1) == []


def test_batches_fit_in_one_message() -> None:
    """A batch of queued alerts never exceeds Telegram's 4096 characters when joined."""
    box = Outbox()
    for i in range(30):
        box.put(_alert(1, f"{i:03d} " + "x" * 500))
    sizes = []
    while len(box):
        batch = box.take(1)
        sizes.append(len("\n\n".join(m.render() for m in batch)))
    assert max(sizes) <= MAX_MESSAGE_CHARS
    assert sizes == [4046, 4046, 4046, 3034]  # 8 alerts of 504 chars + separators each


def test_full_queue_folds_into_similar_alerts() -> None:
    """Past capacity a new alert is folded into the newest queued one of its category."""
    box = Outbox(capacity_per_chat=2)
    box.put(_alert(1, "fill 1", "order_filled"))
    box.put(_alert(1, "error 1", "error"))
    assert box.put(_alert(1, "fill 2", "order_filled")) == "folded"
    assert box.put(_alert(1, "stop 1", "stop_hit")) == "folded"  # no stop queued: the newest
    first, second = box.take(1, batch=False), box.take(1, batch=False)
    assert "+1 more while the queue was full (order_filled x1); latest:</i>\nfill 2" in (
        first[0].render()
    )
    assert "(stop_hit x1)" in second[0].render()


def test_requeue_absorbs_a_duplicate_that_arrived_meanwhile() -> None:
    """An alert put back after a failed send merges with its twin queued in the meantime."""
    box = Outbox()
    box.put(_alert(1, "ws reconnecting"))
    in_flight = box.take(1)
    box.put(_alert(1, "ws reconnecting"))
    box.requeue(in_flight)
    [message] = box.take(1)
    assert message.count == 2
    assert len(box) == 0


@settings(max_examples=80)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "put", "put", "take", "fail"]),
            st.sampled_from([1, 2]),
            st.sampled_from(["a", "b", "c", "d", "e"]),
        ),
        max_size=150,
    ),
    st.integers(1, 4),
)
def test_outbox_never_loses_an_alert(operations: list[tuple[str, int, str]], capacity: int) -> None:
    """Through puts, sends and failed sends, every alert is delivered or still queued, counted."""
    box = Outbox(capacity_per_chat=capacity)
    put = delivered = 0
    for operation, chat, text in operations:
        if operation == "put":
            box.put(_alert(chat, text, category=text))
            put += 1
        else:
            batch = box.take(chat)
            if operation == "fail":
                box.requeue(batch)
            else:
                delivered += sum(m.count + sum(m.folded.values()) for m in batch)
        assert len(box) <= 2 * capacity  # two chats, alerts only: bounded
    left = sum(m.count + sum(m.folded.values()) for m in box.drain())
    assert delivered + left == put
