"""The ccxt.pro Bybit subclass's frame handling: kline frames dispatched as ccxt would."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import ccxt.pro
from hypothesis import given, settings
from hypothesis import strategies as st

from bybit_client import KestrelBybit


class _Client:
    """What ccxt's frame handlers read of a WebSocket client: its URL and resolve/reject."""

    def __init__(self) -> None:
        self.url = "wss://stream.bybit.com/v5/public/spot"
        self.resolved: list[tuple[Any, str]] = []
        self.rejected: list[tuple[Any, Any]] = []
        self.subscriptions: dict[str, Any] = {}

    def resolve(self, result: Any, message_hash: str) -> Any:
        self.resolved.append((result, message_hash))
        return result

    def reject(self, error: Any, message_hash: Any = None) -> None:
        self.rejected.append((error, message_hash))


def _kline(confirm: bool, **extra: Any) -> dict[str, Any]:
    return {
        "topic": "kline.1.BTCUSDT",
        "type": "snapshot",
        "ts": 1_700_000_060_000,
        "data": [
            {
                "start": 1_700_000_000_000,
                "end": 1_700_000_059_999,
                "interval": "1",
                "open": "100",
                "close": "101.5",
                "high": "102",
                "low": "99.5",
                "volume": "3.25",
                "turnover": "330",
                "confirm": confirm,
                "timestamp": 1_700_000_060_000,
            }
        ],
    } | extra


def _handled(client_class: type, message: dict[str, Any]) -> tuple[Any, list[Any], list[Any]]:
    # A fresh client handles one frame: what its OHLCV cache holds, what it resolved and
    # rejected, each made comparable.
    exchange = client_class()
    client = _Client()
    exchange.handle_message(client, json.loads(json.dumps(message)))
    cache = {
        symbol: {tf: [list(row) for row in rows] for tf, rows in by_tf.items()}
        for symbol, by_tf in exchange.ohlcvs.items()
    }
    resolved = [(h, [r[0], r[1], [list(x) for x in r[2]]]) for r, h in client.resolved]
    return cache, resolved, [(type(e).__name__, h) for e, h in client.rejected]


class _CcxtDispatch(KestrelBybit):
    """Kestrel's client with ccxt's own dispatch, for comparison."""

    handle_message = ccxt.pro.bybit.handle_message


def test_a_kline_frame_is_handled_as_ccxts_dispatch_handles_it() -> None:
    """The shortcut leaves the cache and the resolved futures as ccxt's dispatch does."""
    for confirm in (False, True):
        ours = _handled(KestrelBybit, _kline(confirm))
        assert ours == _handled(_CcxtDispatch, _kline(confirm))
        cache, resolved, rejected = ours
        # No markets loaded: the symbol is the exchange's id.
        assert cache == {
            "BTCUSDT": {"1m": [[1_700_000_000_000, 100, 102, 99.5, 101.5, 3.25, confirm]]}
        }
        assert [h for h, _ in resolved] == ["ohlcv::BTCUSDT::1m"]
        assert rejected == []


def test_a_kline_frame_with_error_fields_takes_ccxts_dispatch() -> None:
    """A frame carrying an error code goes through ccxt's error check, not the shortcut."""
    frame = _kline(True, retCode=10001, retMsg="params error", reqId="7")
    ours = _handled(KestrelBybit, frame)
    assert ours == _handled(_CcxtDispatch, frame)
    cache, resolved, rejected = ours
    assert cache == {}
    assert resolved == []
    assert rejected == [("BadRequest", "7")]


def _tapped(verdict: bool | None, confirm: bool) -> tuple[Any, list[Any], dict[Any, Any], Any]:
    # A client with a tap on the frame's market handles one frame: what it handled as in
    # `_handled`, the rows the tap saw and the taps left. `verdict` None: the tap raises.
    exchange = KestrelBybit()
    seen: list[list[list[Any]]] = []

    def tap(rows: list[list[Any]]) -> bool:
        seen.append(rows)
        if verdict is None:
            raise RuntimeError("a bug in the tap")
        return verdict

    exchange.kestrel_kline_taps[("BTCUSDT", "1m")] = tap
    client = _Client()
    exchange.handle_message(client, _kline(confirm))
    cache = {
        symbol: {tf: [list(row) for row in rows] for tf, rows in by_tf.items()}
        for symbol, by_tf in exchange.ohlcvs.items()
    }
    resolved = [(h, [r[0], r[1], [list(x) for x in r[2]]]) for r, h in client.resolved]
    rejected = [(type(e).__name__, h) for e, h in client.rejected]
    return (cache, resolved, rejected), seen, dict(exchange.kestrel_kline_taps), tap


def test_a_frame_the_tap_settles_is_not_handled_by_ccxt() -> None:
    """The tap sees the frame's rows as ccxt parses them (a candle still forming: its open
    time and flag only); when it settles the frame, ccxt's cache keeps nothing and no
    future is resolved; otherwise ccxt handles the frame as if there were no tap (its cache
    then holds the forming candle's prices), and a tap that raises is dropped."""
    for confirm in (False, True):
        row: list[Any] = [1_700_000_000_000, 100, 102, 99.5, 101.5, 3.25, confirm]
        if not confirm:
            row = [1_700_000_000_000, None, None, None, None, None, False]
        handled, seen, taps, tap = _tapped(True, confirm)
        assert seen == [[row]]
        assert handled == ({}, [], [])
        assert taps == {("BTCUSDT", "1m"): tap}
        without = _handled(KestrelBybit, _kline(confirm))
        assert without[0] == {
            "BTCUSDT": {"1m": [[1_700_000_000_000, 100, 102, 99.5, 101.5, 3.25, confirm]]}
        }
        handled, seen, taps, tap = _tapped(False, confirm)
        assert seen == [[row]]
        assert handled == without
        assert taps == {("BTCUSDT", "1m"): tap}
        handled, seen, taps, _ = _tapped(None, confirm)
        assert seen == [[row]]
        assert handled == without
        assert taps == {}


def _spot_market(symbol: str) -> dict[str, Any]:
    # The market ccxt lists for Bybit's BTCUSDT spot id, under `symbol`.
    base, quote = symbol.split("/")
    return {
        "id": "BTCUSDT", "symbol": symbol, "base": base, "quote": quote, "baseId": "BTC",
        "quoteId": "USDT", "type": "spot", "spot": True, "margin": False, "swap": False,
        "future": False, "option": False, "contract": False, "active": True,
        "precision": {"amount": 0.001, "price": 0.01}, "limits": {}, "info": {},
    }  # fmt: skip


def test_a_kline_frame_goes_to_the_tap_of_the_markets_loaded_now() -> None:
    """The market a kline topic names is kept between frames, and found again when the
    markets are reloaded: a frame then goes to the tap of its market's new symbol."""
    exchange = KestrelBybit()
    exchange.set_markets([_spot_market("BTC/USDT")])
    seen: list[str] = []

    def tap_of(symbol: str) -> Callable[[list[list[Any]]], bool]:
        def tap(rows: list[list[Any]]) -> bool:
            seen.append(symbol)
            return True

        return tap

    for symbol in ("BTC/USDT", "XBT/USDT"):
        exchange.kestrel_kline_taps[(symbol, "1m")] = tap_of(symbol)
    client = _Client()
    exchange.handle_message(client, _kline(True))
    exchange.handle_message(client, _kline(False))
    exchange.set_markets([_spot_market("XBT/USDT")])
    exchange.handle_message(client, _kline(True))
    assert seen == ["BTC/USDT", "BTC/USDT", "XBT/USDT"]
    assert exchange.ohlcvs == {}  # each settled


def _ccxt_row(exchange: KestrelBybit, item: Any, market: Any) -> list[Any]:
    # ccxt's own reading of a kline item, with the flag appended as Kestrel's does.
    row: list[Any] = ccxt.pro.bybit.parse_ws_ohlcv(exchange, item, market)
    return [*row, exchange.safe_bool(item, "confirm", False)]


def _same(a: list[Any], b: list[Any]) -> bool:
    # Equal rows, NaN matching NaN, and each value of the same type.
    return len(a) == len(b) and all(
        type(x) is type(y)
        and (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)))
        for x, y in zip(a, b, strict=True)
    )


_NUMERIC = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["", " 1 ", "1_000", "1e400", "nan", "-inf", "abc", "0x10", "1,5"]),
)
_ANY = st.one_of(
    _NUMERIC,
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.lists(st.none()),
)
_ITEMS = st.fixed_dictionaries(
    {},
    optional={
        "start": st.one_of(st.integers(-(2**64), 2**64), _ANY),
        "open": st.one_of(_NUMERIC, _ANY),
        "high": st.one_of(_NUMERIC, _ANY),
        "low": st.one_of(_NUMERIC, _ANY),
        "close": st.one_of(_NUMERIC, _ANY),
        "volume": st.one_of(_NUMERIC, _ANY),
        "turnover": _NUMERIC,
        "confirm": _ANY,
    },
)


_USUAL = st.fixed_dictionaries(
    {
        "start": st.one_of(st.integers(-(2**64), 2**64), st.integers(10**300, 10**400)),
        **dict.fromkeys(("open", "high", "low", "close", "volume", "turnover"), _NUMERIC),
        "confirm": st.one_of(st.booleans(), _ANY),
    }
)


@settings(max_examples=400, deadline=None)
@given(
    item=st.one_of(_USUAL, _ITEMS, _ANY),
    market=st.sampled_from([None, {"inverse": False}, {"inverse": True}, {"inverse": None}]),
)
def test_a_kline_item_reads_as_ccxt_reads_it(item: Any, market: Any) -> None:
    """Kestrel reads the usual kline item itself (for speed) and leaves the rest to ccxt:
    the row is ccxt's either way, malformed fields, inverse markets and all."""
    exchange = KestrelBybit()
    assert _same(exchange.parse_ws_ohlcv(item, market), _ccxt_row(exchange, item, market))


def test_a_usual_kline_item_is_read_without_ccxt() -> None:
    """The usual item (integer start, numeric strings) is Kestrel's to read; ccxt reads one
    it cannot (a string start) and any item of a client whose numbers are not floats."""
    exchange = KestrelBybit()
    item = _kline(True)["data"][0]
    row = [1_700_000_000_000, 100.0, 102.0, 99.5, 101.5, 3.25, True]
    assert exchange._kestrel_kline_row(item, None) == row
    assert exchange.parse_ws_ohlcv(item, None) == row
    assert exchange._kestrel_kline_row(item | {"start": "1700000000000"}, None) is None
    assert exchange._kestrel_kline_row(item, {"inverse": True}) is None
    exchange.number = str
    assert exchange._kestrel_kline_row(item, None) is None
    assert exchange.parse_ws_ohlcv(item, None) == _ccxt_row(exchange, item, None)


@settings(max_examples=400, deadline=None)
@given(
    items=st.lists(st.one_of(_USUAL, _ITEMS, _ANY), max_size=3),
    market=st.sampled_from([None, {"inverse": False}, {"inverse": True}]),
)
def test_the_tap_reads_a_frames_rows_as_ccxt_reads_them(items: Any, market: Any) -> None:
    """The rows a tap sees are ccxt's, except that a candle still forming (Bybit's usual
    item with `confirm` false) carries only ccxt's open time and the flag: the tap takes
    closed candles only, and a frame it does not settle goes to ccxt whole."""
    exchange = KestrelBybit()
    seen: list[list[list[Any]]] = []

    def tap(rows: list[list[Any]]) -> bool:
        seen.append(rows)
        return True

    message = {"topic": "kline.1.BTCUSDT", "data": items}
    assert exchange._kestrel_settled(("BTCUSDT", "1m"), tap, message, market)
    assert len(seen) == 1
    assert len(seen[0]) == len(items)
    for row, item in zip(seen[0], items, strict=True):
        ccxt_row = _ccxt_row(exchange, item, market)
        start = item.get("start") if type(item) is dict else None
        if type(start) is int and abs(start) < 2**1000 and item.get("confirm") is False:
            assert _same(row, [ccxt_row[0], None, None, None, None, None, False])
        else:
            assert _same(row, ccxt_row)
