"""The ccxt.pro Bybit subclass with Kestrel's hooks, and the loopback URL overrides.

Part of `exchange`, imported lazily through `exchange.bybit_client_class()`: importing
this module imports ccxt (~0.3 s), which `python main.py --help` must not pay.

The hooks: `fetch2` spends the rate budgets, `handle_errors` attaches Bybit's reset delay
to rate-limit errors and refuses non-JSON 200 bodies (ccxt would return garbage, WIRE.md
section 3), `authenticate` signs the private WebSocket login with the corrected clock, and
`parse_ws_ohlcv` keeps Bybit's `confirm` flag, and `handle_ohlcv` hands each kline frame's
rows to the tap registered for its market and timeframe (`kestrel_kline_taps`), in the
read that brought the frame: the candle stream takes a closed candle from there, without
waiting for the watch's future to wake its task and the tasks behind it (each a turn of
the event loop, behind the other frames of the read), and a frame the tap settles is not
handled by ccxt at all. Signing, requests and parsing stay ccxt's own.

Each socket is read by one task that handles every frame as it comes (`_receive`), where
ccxt's `Client.receive_loop` starts a task for each read that finds at most one frame
buffered, then takes two more turns of the event loop (the task's callback, the loop's
next call) before reading again: when frames trickle in, as a minute's 100 do while the
exchange pushes them, that was ~50 us of scheduling a read, and the daemon fell behind the
pushes it could otherwise keep up with (in the latency benchmark, a minute's burst started
0.75 ms after the last push, 0.6 ms with one task). The frames are handled exactly as
ccxt's loop handles them (`Client.handle_message`, in order, nothing else running between
the frames of one read), and its rules on an ending socket are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import ccxt
import ccxt.pro
import structlog

from rate_budgets import RateBudgets


__all__ = ["KestrelBybit", "loopback_urls"]

log = structlog.get_logger("exchange")


def _reset_delay(headers: Any, server_now_ms: float) -> float | None:
    # Bybit's X-Bapi-Limit-Reset-Timestamp (ms) -> seconds to wait; ccxt never reads it.
    if not isinstance(headers, dict):
        return None
    lowered = {str(k).lower(): v for k, v in headers.items()}
    raw = lowered.get("x-bapi-limit-reset-timestamp")
    if raw is None:
        retry = lowered.get("retry-after")
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, float(retry)) if retry is not None else None
        return None
    try:
        return min(60.0, max(0.0, (int(raw) - server_now_ms) / 1000))
    except (TypeError, ValueError):
        return None


# What ccxt's Bybit error check reads in a frame (`handle_error_message`).
_ERROR_FIELDS = frozenset({"code", "ret_code", "retCode", "success"})

# A kline tap: called with a frame's parsed rows (ccxt's, `confirm` appended; a candle
# still forming carries only its open time and the flag); returns True when the frame
# needs nothing more (ccxt then does not handle it).
KlineTap = Callable[[list[list[Any]]], bool]


async def _receive(client: Any) -> None:
    # ccxt's `Client.receive_loop` and its per-read callback in one task (module docstring):
    # a failed read rejects the client's futures (its streams reconnect); a socket found
    # closed is reported closed, as ccxt's loop does on its next turn. A frame whose
    # handling raises is logged and the next one read (ccxt's loop stopped reading there,
    # leaving the socket open and unread until its keepalive gave up).
    while not client.closed():
        try:
            message = await client.receive()
        except asyncio.CancelledError:
            return
        except Exception as e:
            client.reject(ccxt.NetworkError(str(e)))
            return
        try:
            client.handle_message(message)
        except Exception:
            log.exception("ws_frame_failed", url=client.url)
    client.on_close(1006)


def _receive_loop(client: Any) -> None:
    # Installed as the client's `receive_loop` (ccxt calls it once a socket is open); a
    # socket closed before the task runs is reported closed, ccxt's rule.
    client.kestrel_receiving = client.asyncio_loop.create_task(_receive(client))


class KestrelBybit(ccxt.pro.bybit):  # type: ignore[misc]
    """ccxt.pro's Bybit with Kestrel's rate budgets, error hooks and kline flag and taps."""

    kestrel_budgets: RateBudgets | None = None

    def __init__(self, config: Any = None) -> None:
        super().__init__(config or {})
        # (unified symbol, timeframe) -> the tap of the candle stream watching it.
        self.kestrel_kline_taps: dict[tuple[str, str], KlineTap] = {}
        # (socket kind, kline topic) -> ((unified symbol, timeframe), market), for the
        # markets loaded (`_kestrel_markets`): found once, not on every frame.
        self._kestrel_topics: dict[tuple[str, str], tuple[tuple[str, str], Any] | None] = {}
        self._kestrel_markets: Any = None

    def client(self, url: str) -> Any:
        """Return ccxt's socket client for `url`, read by one task (`_receive`)."""
        fresh = url not in (self.clients or {})
        client = super().client(url)
        if fresh:
            client.receive_loop = functools.partial(_receive_loop, client)
        return client

    async def authenticate(self, url: str, params: Any = None) -> Any:
        """Log in on the private socket, signed with the corrected clock."""
        # ccxt 4.5.90 signs the private WebSocket login with the local clock
        # (`milliseconds() + 10000`), ignoring the offset it measured for REST; with a
        # local clock 10 s behind Bybit's, every login fails. Sign with the corrected
        # clock, exactly as REST requests are.
        self.check_required_credentials()
        client = self.client(url)
        future = client.reusableFuture("authenticated")
        if self.safe_value(client.subscriptions, "authenticated") is None:
            offset = self.safe_integer(self.options, "timeDifference", 0) or 0
            expires = self.number_to_string(self.milliseconds() - offset + 10000)
            signature = self.hmac(
                self.encode("GET/realtime" + expires),
                self.encode(self.secret),
                hashlib.sha256,
                "hex",
            )
            message = self.extend(
                {"op": "auth", "args": [self.apiKey, expires, signature]}, params or {}
            )
            self.watch(url, "authenticated", message, "authenticated")
        return await future

    async def fetch2(
        self,
        path: str,
        api: Any = ("public",),
        method: str = "GET",
        params: Any = None,
        config: Any = None,
    ) -> Any:
        """Spend the rate budgets, send, and pause a budget that Bybit reports exhausted."""
        params = {} if params is None else params
        budgets = self.kestrel_budgets
        slots = await budgets.acquire(path, params) if budgets is not None else []
        try:
            return await super().fetch2(path, api, method, params, config or {})
        except ccxt.RateLimitExceeded as e:
            if budgets is not None:
                status = getattr(e, "http_status", 0)
                budgets.penalise(path, params, getattr(e, "retry_after", None), status)
            raise
        finally:
            if budgets is not None:
                budgets.done(slots)  # counted from its answer (`RateBudget`)

    def handle_errors(
        self,
        code: int,
        reason: str,
        url: str,
        method: str,
        headers: Any,
        body: str,
        response: Any,
        request_headers: Any,
        request_body: Any,
    ) -> Any:
        """Map errors as ccxt does, plus the reset delay and non-JSON 200 bodies."""
        delay = _reset_delay(headers, self.nonce())
        try:
            super().handle_errors(
                code,
                reason,
                url,
                method,
                headers,
                body,
                response,
                request_headers,
                request_body,
            )
        except ccxt.RateLimitExceeded as e:
            e.retry_after = delay  # read by error_handler when mapping
            e.http_status = code
            raise
        if response is None and code in (403, 429):
            error = ccxt.RateLimitExceeded(f"{self.id} {code} {str(body)[:120]}")
            error.retry_after = delay
            error.http_status = code
            raise error
        if response is None and 200 <= code < 300:
            raise ccxt.BadResponse(f"{self.id} non-JSON body for {method} {url}: {body[:80]!r}")
        return None

    def parse_ws_ohlcv(self, ohlcv: Any, market: Any = None) -> list[Any]:
        """Return ccxt's kline row with Bybit's `confirm` flag appended.

        A kline item as Bybit V5 sends it (`start` an integer; open, high, low, close and
        volume numeric strings) is read here, into the row ccxt's own `parse_ws_ohlcv`
        returns for it (the same conversions: `int(float(start))` and `float` of each
        string; tests/test_bybit_client.py checks the two agree on random items) in half
        of ccxt's time: a minute's close brings two frames a pair, and the last pair's
        candle is read behind all of them. Any other item is ccxt's to read.
        """
        row = self._kestrel_kline_row(ohlcv, market)
        if row is None:
            row = super().parse_ws_ohlcv(ohlcv, market)
            row.append(self.safe_bool(ohlcv, "confirm", False))
        return row

    def _kestrel_kline_row(self, ohlcv: Any, market: Any) -> list[Any] | None:
        # None: not the usual shape (ccxt reads it, with its defaults for what is missing
        # or malformed); an inverse market's volume is its turnover (ccxt's rule).
        if self.number is not float or type(ohlcv) is not dict:
            return None
        if isinstance(market, dict) and market.get("inverse") is True:
            return None
        try:
            start, confirm = ohlcv["start"], ohlcv.get("confirm")
            o, h, low, c = ohlcv["open"], ohlcv["high"], ohlcv["low"], ohlcv["close"]
            v = ohlcv["volume"]
            if type(start) is int and type(o) is type(h) is type(low) is type(c) is type(v) is str:
                # float("") raises: ccxt reads an empty string as missing.
                return [
                    int(float(start)),
                    float(o),
                    float(h),
                    float(low),
                    float(c),
                    float(v),
                    confirm if type(confirm) is bool else False,
                ]
        except (KeyError, ValueError, OverflowError):  # an int too large for a float too
            pass
        return None

    def handle_message(self, client: Any, message: Any) -> None:
        """Dispatch a frame as ccxt does; a kline frame goes to `handle_ohlcv` directly.

        ccxt's dispatch builds its table of two dozen handlers and runs the error checks
        on every frame; a kline frame carries no error fields (`code`, `ret_code`,
        `retCode`, `success`), so for one it would only end up in `handle_ohlcv`. At 50
        pairs a minute closes with 100 of them in one read.
        """
        topic = message.get("topic") if isinstance(message, dict) else None
        if (
            isinstance(topic, str)
            and topic.startswith("kline.")
            and message.keys().isdisjoint(_ERROR_FIELDS)
        ):
            self.handle_ohlcv(client, message)
            return
        super().handle_message(client, message)

    def handle_subscription_status(self, client: Any, message: Any) -> Any:
        """Count the subscriptions the exchange acknowledged on `client`'s socket.

        ccxt resolves nothing on an acknowledgement (a watch returns on data only); the
        count is how `Exchange.wait_private_streams` knows the private topics are live.
        """
        if type(message) is dict and message.get("op") == "subscribe" and message.get("success"):
            client.kestrel_acknowledged = getattr(client, "kestrel_acknowledged", 0) + 1
        return super().handle_subscription_status(client, message)

    def handle_ohlcv(self, client: Any, message: Any) -> None:
        """Hand a kline frame's rows to its market's tap; ccxt handles what the tap leaves.

        A frame the tap settles (every candle in it yielded, taken, or the next one still
        forming) is not handled by ccxt: its cache does not keep the candle and the watch's
        future is not resolved, so the watch's task does not wake for a frame that would
        give it nothing. Any other frame, and every frame of a market without a tap, is
        ccxt's as it always was.
        """
        taps = self.kestrel_kline_taps
        if taps:
            found = self._kestrel_kline_market(client, message)
            if found is not None:
                key, market = found
                tap = taps.get(key)
                if tap is not None and self._kestrel_settled(key, tap, message, market):
                    return
        super().handle_ohlcv(client, message)

    def _kestrel_kline_market(
        self, client: Any, message: Any
    ) -> tuple[tuple[str, str], Any] | None:
        # (unified symbol, timeframe) of a kline frame and its market, found as ccxt's
        # `handle_ohlcv` finds them; None where ccxt would drop the frame. Kept per topic
        # while the same markets are loaded (a reload gives ccxt a new `markets`).
        if self._kestrel_markets is not self.markets:
            self._kestrel_topics.clear()
            self._kestrel_markets = self.markets
        topic = message.get("topic") if type(message) is dict else None
        if type(topic) is not str:  # a kline frame's is: ccxt's reading for anything else
            topic = self.safe_string(message, "topic", "")
        kind = "spot" if client.url.find("spot") > -1 else "contract"
        found = self._kestrel_topics.get((kind, topic), False)
        if found is not False:
            return found  # type: ignore[return-value]
        parts = topic.split(".")
        timeframe = self.find_timeframe(self.safe_string(parts, 1))
        if timeframe is None:
            found = None
        else:
            market = self.safe_market(self.safe_string(parts, len(parts) - 1), None, None, kind)
            found = (market["symbol"], timeframe), market
        if self.markets:  # without markets, ccxt makes up a market per frame: never kept
            self._kestrel_topics[kind, topic] = found
        return found

    def _kestrel_settled(
        self, key: tuple[str, str], tap: KlineTap, message: Any, market: Any
    ) -> bool:
        # The tap's verdict on the frame's rows (parsed as ccxt parses them, but for the
        # prices of a candle still forming); a tap that raises is dropped and the frame
        # left to ccxt.
        data = message.get("data") if type(message) is dict else None
        rows = []
        for item in data if isinstance(data, list) else ():
            # A candle still forming (Bybit's usual item, `confirm` false): the tap reads
            # its open time and flag only (it takes closed candles), so its prices are not
            # read; its open time is ccxt's (`int(float(start))`).
            start = item.get("start") if type(item) is dict else None
            if type(start) is int and item.get("confirm") is False:
                try:
                    rows.append([int(float(start)), None, None, None, None, None, False])
                    continue
                except OverflowError:  # too large for a float: ccxt's reading
                    pass
            rows.append(self.parse_ws_ohlcv(item, market))
        try:
            return tap(rows)
        except Exception:  # a bug in a tap: never into ccxt's reading of the socket
            # The watch's way still delivers the stream's candles, a moment later.
            if self.kestrel_kline_taps.get(key) is tap:
                del self.kestrel_kline_taps[key]
            log.exception("kline_tap_failed", symbol=key[0], timeframe=key[1])
            return False


def loopback_urls(base_url: str) -> dict[str, Any]:
    """Return ccxt `urls` pointing REST and streams at `base_url` (tests, emulator)."""
    http = base_url.rstrip("/")
    ws = "ws" + http[len("http") :]
    return {
        "public": http,
        "private": http,
        "spot": http,
        "futures": http,
        "v2": http,
        "ws": {
            "public": {
                "spot": f"{ws}/v5/public/spot",
                "linear": f"{ws}/v5/public/linear",
                "inverse": f"{ws}/v5/public/inverse",
                "option": f"{ws}/v5/public/option",
            },
            "private": {
                "contract": f"{ws}/v5/private",
                "spot": {"unified": f"{ws}/v5/private", "nonUnified": f"{ws}/spot/private/v3"},
                "usdc": f"{ws}/trade/option/usdc/private/v1",
                "trade": f"{ws}/v5/trade",
            },
        },
    }
