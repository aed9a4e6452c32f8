"""The web view: an aiohttp server on 127.0.0.1 behind a token, and its JSON encoding.

`WebView` serves a JSON API of the bot's state and one page (`web_page`) drawing live
price, equity and depth charts with the vendored Lightweight Charts library (no CDN).
`to_jsonable` is the encoding described in `ui`'s docstring; `depth_json` and
`equity_json` are the bodies of `/api/depth` and `/api/equity`. `ui` re-exports these names.
`encode_json` writes the same JSON as `to_jsonable` + `json.dumps`, with orjson (about ten
times faster), so the API encodes on the loop in slices instead of in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from decimal import Decimal
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from config import UISettings
from error_handler import ConfigError
from models import Control, OrderBook, Snapshot
from status_view import depth_levels, pairs_of, unrealised_pnl
from utils.utilities import register_secret
from web_page import CHART_LIBRARY, CHART_LIBRARY_ROUTE, CSP, page_html


log = structlog.get_logger(__name__)
_REPORT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.(html|json)")
_REPORTS_LISTED: Final = 50
# How long one slice of encoding may hold the loop before it yields (seconds).
_ENCODE_SLICE_S: Final = 0.002


# -- Web view --------------------------------------------------------------------------------


_FIELDS: dict[type, tuple[str, ...]] = {}


def to_jsonable(value: Any) -> Any:
    """Return `value` as JSON-ready data: Decimal -> str, non-finite float -> None, see module."""
    if value is None or (isinstance(value, bool | int | str) and not isinstance(value, Enum)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, Enum):
        return to_jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        names = _FIELDS.get(cls)
        if names is None:
            names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return {name: to_jsonable(getattr(value, name)) for name in names}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_item(v) for v in value]
    return str(value)


def _item(value: Any) -> Any:
    # Inline the common leaves of long sequences (book levels, curve points): a snapshot
    # of 100 pairs holds tens of thousands of them.
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int or kind is str:
        return value
    if kind is tuple:
        return [_item(v) for v in value]
    return to_jsonable(value)


def depth_json(book: OrderBook, levels: int = 50) -> dict[str, Any]:
    """Return the `/api/depth` body: levels as [price, qty, cumulative qty], best first."""
    body: dict[str, Any] = to_jsonable(_depth_body(book, levels))
    return body


def _depth_body(book: OrderBook, levels: int = 50) -> dict[str, Any]:
    # `depth_json` before `to_jsonable`: what `encode_json` encodes for the route.
    bids, asks = depth_levels(book, levels)
    best_bid, best_ask = book.best_bid, book.best_ask
    mid = (best_bid + best_ask) / 2 if best_bid is not None and best_ask is not None else None
    spread = (best_ask - best_bid) / mid * 1e4 if mid and best_ask and best_bid else None
    return {
        "pair": book.pair,
        "ts": book.ts,
        "bids": bids,
        "asks": asks,
        "best_bid": best_bid,
        "best_ask": best_ask,
        "mid": mid,
        "spread_bps": spread,
    }


def equity_json(snapshot: Snapshot, points: int | None = None) -> dict[str, Any]:
    """Return the `/api/equity` body; `points` keeps at most that many, always the last."""
    body: dict[str, Any] = to_jsonable(_equity_body(snapshot, points))
    return body


def _equity_body(snapshot: Snapshot, points: int | None = None) -> dict[str, Any]:
    # `equity_json` before `to_jsonable`: what `encode_json` encodes for the route.
    curve = snapshot.equity_curve
    n = len(curve)
    if points is not None and 0 < points < n:
        curve = tuple(curve[(i + 1) * n // points - 1] for i in range(points))
    pf = snapshot.portfolio
    return {
        "ts": snapshot.ts,
        "equity": pf.equity,
        "cash": pf.cash,
        "realised_pnl": pf.realised_pnl,
        "unrealised_pnl": unrealised_pnl(snapshot),
        "total_points": n,
        "points": curve,
    }


_dumps = partial(json.dumps, separators=(",", ":"), allow_nan=False)
# Dataclasses and datetimes go through `_orjson_default`, as `to_jsonable` would write them
# (orjson's own forms skip `_`-prefixed fields and use RFC 3339 dates).
_ORJSON_OPTIONS: Final = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _orjson_default(value: Any) -> Any:
    # orjson calls this for every value it has no native form for; the result is encoded
    # in turn. Native forms already agree with `to_jsonable`: str, int, bool, None, float
    # (non-finite -> null), enums (their values), dict and list subclasses, tuples.
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        names = _FIELDS.get(cls)
        if names is None:
            names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return {name: getattr(value, name) for name in names}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    return str(value)


def encode_json(value: Any) -> bytes:
    """Return `value` as compact UTF-8 JSON, the same document as `_dumps(to_jsonable(value))`.

    orjson writes it; what orjson refuses (a dict key that is not a plain str, an integer
    beyond 64 bits, a lone surrogate) goes the `to_jsonable` way instead, so the content
    never depends on which encoder ran.
    """
    try:
        return orjson.dumps(value, default=_orjson_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError
        return _dumps(to_jsonable(value)).encode()


def _snapshot_parts(snapshot: Snapshot, excluded: frozenset[str]) -> Iterator[bytes]:
    # The `/api/snapshot` body field by field, skipping the excluded fields instead of
    # encoding them: `{`, then `"name":value` pieces with their commas, then `}`.
    yield b"{"
    first = True
    for f in dataclasses.fields(snapshot):
        if f.name in excluded:
            continue
        head = b'"' + f.name.encode() + b'":'
        yield (head if first else b"," + head) + encode_json(getattr(snapshot, f.name))
        first = False
    yield b"}"


def _encode_snapshot(snapshot: Snapshot, excluded: frozenset[str] = frozenset()) -> bytes:
    # The whole `/api/snapshot` body in one go (tests, benchmarks).
    return b"".join(_snapshot_parts(snapshot, excluded))


async def _encode_in_slices(parts: Iterator[bytes]) -> bytes:
    # Encode on the loop, yielding to it whenever a slice has held it for _ENCODE_SLICE_S:
    # a full snapshot of 100 pairs takes about a millisecond with orjson, and the fields
    # are encoded one by one, so no slice holds the loop much longer than its largest field.
    # (A worker thread would hold the loop longer: the loop then waits for GIL switches.)
    out: list[bytes] = []
    started = time.perf_counter()
    for part in parts:
        out.append(part)
        if time.perf_counter() - started > _ENCODE_SLICE_S:
            await asyncio.sleep(0)
            started = time.perf_counter()
    return b"".join(out)


class WebView:
    """Serve the bot's state as JSON and a live chart page on 127.0.0.1, behind a token.

    Every route needs the token, as `Authorization: Bearer <token>` or `?token=<token>`
    (compared in constant time); anything else gets 401. Routes:

    - `GET /` the page (price, equity and depth charts and the panels, polling each second)
    - `GET /static/lightweight-charts.js` the vendored chart library the page loads
    - `GET /api/snapshot[?exclude=field,field]` the whole `Snapshot`
    - `GET /api/chart/<pair>[?limit=N]` candles, the strategy's overlays and trade marks
    - `GET /api/reports` the HTML/JSON reports in `reports_dir`, newest first;
      `GET /reports/<name>` one of them
    - `GET /api/equity[?points=N]` equity figures and the curve as [[ts, equity], ...]
    - `GET /api/depth/<pair>` cumulative depth (`BTC/USDT`, `BTC%2FUSDT` or `BTC-USDT`)
    - `GET /api/patterns/<pair>` candlestick patterns on the pair's last candles
    - `POST /api/pause`, `POST /api/resume` the operator commands
    - `POST /api/resetrisk` lifts latched circuit breakers (audited as "web view")

    The access log is off so that a token in a query string never reaches a log file.

    Args:
        control: The operator façade.
        settings: `web_host`, `web_port` (0 picks a free port) and `web_token`.
        token: Overrides `settings.web_token`.
        reports_dir: Where backtest and optimisation reports are written (None: none listed).

    Raises:
        ConfigError: when no token is configured.
    """

    def __init__(
        self,
        control: Control,
        settings: UISettings,
        *,
        token: str | None = None,
        reports_dir: Path | None = None,
    ):
        secret = token or (settings.web_token.get_secret_value() if settings.web_token else "")
        if not secret:
            raise ConfigError(
                "the web view needs a token: set KESTREL_UI__WEB_TOKEN", component="ui"
            )
        register_secret(secret)
        self._control = control
        self._settings = settings
        self._token = secret.encode()
        self._reports_dir = reports_dir
        self._library: bytes | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """Return the bound port (after `start`)."""
        if self._port is None:
            raise RuntimeError("the web view is not started")
        return self._port

    @property
    def url(self) -> str:
        """Return the base URL, without the token."""
        return f"http://{self._settings.web_host}:{self.port}/"

    def build_app(self) -> web.Application:
        """Return the aiohttp application with its routes and the token middleware."""
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get(CHART_LIBRARY_ROUTE, self._chart_library)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/chart/{pair:.+}", self._chart)
        app.router.add_get("/api/reports", self._reports)
        app.router.add_get("/reports/{name}", self._report)
        app.router.add_get("/api/equity", self._equity)
        app.router.add_get("/api/depth/{pair:.+}", self._depth)
        app.router.add_get("/api/patterns/{pair:.+}", self._patterns)
        app.router.add_post("/api/pause", self._pause)
        app.router.add_post("/api/resume", self._resume)
        app.router.add_post("/api/resetrisk", self._reset_risk)
        return app

    async def start(self) -> None:
        """Bind and start serving."""
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._settings.web_host, self._settings.web_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("web_view_started", host=self._settings.web_host, port=self._port)

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("web_view_stopped", port=self._port)

    async def __aenter__(self) -> WebView:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- Handlers --------------------------------------------------------------------------

    def _is_authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        given = (
            header[7:].strip() if header.startswith("Bearer ") else request.query.get("token", "")
        )
        return hmac.compare_digest(given.encode(), self._token)

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self._is_authorized(request):
            log.warning("web_unauthorized", path=request.path, remote=request.remote)
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=page_html(self._token.decode()),
            content_type="text/html",
            headers={"Content-Security-Policy": CSP},
        )

    async def _chart_library(self, request: web.Request) -> web.Response:
        if self._library is None:
            self._library = await asyncio.to_thread(CHART_LIBRARY.read_bytes)
        return web.Response(body=self._library, content_type="application/javascript")

    def _known_pair(self, pair: str) -> str | None:
        pairs = pairs_of(self._control.snapshot())
        for name in (pair, pair.replace("-", "/")):
            if name in pairs:
                return name
        return None

    async def _chart(self, request: web.Request) -> web.Response:
        pair = self._known_pair(request.match_info["pair"])
        if pair is None:
            return web.json_response({"error": "not a traded pair"}, status=404)
        try:
            limit = int(request.query.get("limit", "300"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        body = self._control.chart(pair, max(1, limit))
        return _json(encode_json(body))

    def _report_files(self) -> list[Path]:
        folder = self._reports_dir
        if folder is None or not folder.is_dir():
            return []
        found = [p for p in folder.iterdir() if p.is_file() and _REPORT_NAME.fullmatch(p.name)]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:_REPORTS_LISTED]

    async def _reports(self, request: web.Request) -> web.Response:
        files = await asyncio.to_thread(self._report_files)
        listed = [{"name": p.name, "modified": int(p.stat().st_mtime * 1000)} for p in files]
        return web.json_response({"reports": listed}, dumps=_dumps)

    async def _report(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        # Only plain names of listed kinds, straight inside the folder: no path escapes it.
        if self._reports_dir is None or not _REPORT_NAME.fullmatch(name):
            return web.json_response({"error": "no such report"}, status=404)
        path = self._reports_dir / name
        if not path.is_file():
            return web.json_response({"error": "no such report"}, status=404)
        body = await asyncio.to_thread(path.read_bytes)
        kind = "text/html" if name.endswith(".html") else "application/json"
        return web.Response(
            body=body, content_type=kind, headers={"Content-Security-Policy": _REPORT_CSP}
        )

    async def _snapshot(self, request: web.Request) -> web.Response:
        snapshot = self._control.snapshot()
        excluded = frozenset(n.strip() for n in request.query.get("exclude", "").split(","))
        return _json(await _encode_in_slices(_snapshot_parts(snapshot, excluded)))

    async def _equity(self, request: web.Request) -> web.Response:
        try:
            points = int(request.query["points"]) if "points" in request.query else None
        except ValueError:
            return web.json_response({"error": "points must be an integer"}, status=400)
        return _json(encode_json(_equity_body(self._control.snapshot(), points)))

    async def _depth(self, request: web.Request) -> web.Response:
        pair = request.match_info["pair"]
        books = self._control.snapshot().order_books
        book = books.get(pair) or books.get(pair.replace("-", "/"))
        if book is None:
            return web.json_response({"error": f"no order book for {pair}"}, status=404)
        return _json(encode_json(_depth_body(book)))

    async def _patterns(self, request: web.Request) -> web.Response:
        pair = request.match_info["pair"]
        known = self._known_pair(pair)
        if known is None:
            return web.json_response({"error": f"{pair} is not traded"}, status=404)
        return web.json_response(
            {"pair": known, "patterns": self._control.patterns(known)}, dumps=_dumps
        )

    async def _pause(self, request: web.Request) -> web.Response:
        await self._control.pause("web view")
        log.info("web_command", command="pause")
        return web.json_response({"ok": True, "state": str(self._control.snapshot().state)})

    async def _resume(self, request: web.Request) -> web.Response:
        await self._control.resume("web view")
        log.info("web_command", command="resume")
        return web.json_response({"ok": True, "state": str(self._control.snapshot().state)})

    async def _reset_risk(self, request: web.Request) -> web.Response:
        await self._control.reset_risk("web view")
        log.info("web_command", command="resetrisk")
        snapshot = self._control.snapshot()
        return web.json_response(
            {"ok": True, "state": str(snapshot.state), "trading_state": str(snapshot.trading_state)}
        )


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", charset="utf-8")


# Reports are static documents (inline SVG and styles): no script may run in them.
_REPORT_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"
