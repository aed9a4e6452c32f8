"""The web view: an aiohttp server on 127.0.0.1 behind a token, and its JSON encoding.

`WebView` serves a JSON API of the bot's state and one page drawing live equity and depth
charts on `<canvas>` (no CDN). `to_jsonable` is the encoding described in `ui`'s docstring;
`depth_json` and `equity_json` are the bodies of `/api/depth` and `/api/equity`. `ui`
re-exports these names.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from enum import Enum
from functools import partial
from typing import Any, Final

import structlog
from aiohttp import web

from config import UISettings
from error_handler import ConfigError
from models import Control, OrderBook, Snapshot
from status_view import depth_levels, pairs_of, unrealised_pnl
from utils.utilities import register_secret


log = structlog.get_logger(__name__)


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
    bids, asks = depth_levels(book, levels)
    best_bid, best_ask = book.best_bid, book.best_ask
    mid = (best_bid + best_ask) / 2 if best_bid is not None and best_ask is not None else None
    spread = (best_ask - best_bid) / mid * 1e4 if mid and best_ask and best_bid else None
    body: dict[str, Any] = to_jsonable(
        {
            "pair": book.pair,
            "ts": book.ts,
            "bids": [list(level) for level in bids],
            "asks": [list(level) for level in asks],
            "best_bid": best_bid,
            "best_ask": best_ask,
            "mid": mid,
            "spread_bps": spread,
        }
    )
    return body


def equity_json(snapshot: Snapshot, points: int | None = None) -> dict[str, Any]:
    """Return the `/api/equity` body; `points` keeps at most that many, always the last."""
    curve = snapshot.equity_curve
    n = len(curve)
    if points is not None and 0 < points < n:
        curve = tuple(curve[(i + 1) * n // points - 1] for i in range(points))
    pf = snapshot.portfolio
    body: dict[str, Any] = to_jsonable(
        {
            "ts": snapshot.ts,
            "equity": pf.equity,
            "cash": pf.cash,
            "realised_pnl": pf.realised_pnl,
            "unrealised_pnl": unrealised_pnl(snapshot),
            "total_points": n,
            "points": [list(p) for p in curve],
        }
    )
    return body


_dumps = partial(json.dumps, separators=(",", ":"), allow_nan=False)


def _encode_snapshot(snapshot: Snapshot, excluded: frozenset[str] = frozenset()) -> str:
    # The `/api/snapshot` body, skipping the excluded fields instead of encoding them.
    # Each field is dumped on its own: json's C encoder holds the GIL for a whole call,
    # and one call per field keeps each hold to a few milliseconds when this runs in a
    # worker thread.
    names = [f.name for f in dataclasses.fields(snapshot) if f.name not in excluded]
    parts = (f'"{name}":{_dumps(to_jsonable(getattr(snapshot, name)))}' for name in names)
    return "{" + ",".join(parts) + "}"


class WebView:
    """Serve the bot's state as JSON and a live chart page on 127.0.0.1, behind a token.

    Every route needs the token, as `Authorization: Bearer <token>` or `?token=<token>`
    (compared in constant time); anything else gets 401. Routes:

    - `GET /` the page (equity and depth charts on canvas, polling the API each second)
    - `GET /api/snapshot[?exclude=field,field]` the whole `Snapshot`
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

    Raises:
        ConfigError: when no token is configured.
    """

    def __init__(self, control: Control, settings: UISettings, *, token: str | None = None):
        secret = token or (settings.web_token.get_secret_value() if settings.web_token else "")
        if not secret:
            raise ConfigError(
                "the web view needs a token: set KESTREL_UI__WEB_TOKEN", component="ui"
            )
        register_secret(secret)
        self._control = control
        self._settings = settings
        self._token = secret.encode()
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
        app.router.add_get("/api/snapshot", self._snapshot)
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
            text=PAGE_HTML, content_type="text/html", headers={"Content-Security-Policy": _CSP}
        )

    async def _snapshot(self, request: web.Request) -> web.Response:
        snapshot = self._control.snapshot()
        excluded = frozenset(n.strip() for n in request.query.get("exclude", "").split(","))
        # A full snapshot (long equity curve, every book) takes tens of milliseconds to
        # encode; a worker thread does it, so the loop is held only for GIL slices.
        text = await asyncio.to_thread(_encode_snapshot, snapshot, excluded)
        return web.Response(text=text, content_type="application/json")

    async def _equity(self, request: web.Request) -> web.Response:
        try:
            points = int(request.query["points"]) if "points" in request.query else None
        except ValueError:
            return web.json_response({"error": "points must be an integer"}, status=400)
        snapshot = self._control.snapshot()
        text = await asyncio.to_thread(lambda: _dumps(equity_json(snapshot, points)))
        return web.Response(text=text, content_type="application/json")

    async def _depth(self, request: web.Request) -> web.Response:
        pair = request.match_info["pair"]
        books = self._control.snapshot().order_books
        book = books.get(pair) or books.get(pair.replace("-", "/"))
        if book is None:
            return web.json_response({"error": f"no order book for {pair}"}, status=404)
        return web.json_response(depth_json(book), dumps=_dumps)

    async def _patterns(self, request: web.Request) -> web.Response:
        pair = request.match_info["pair"]
        pairs = pairs_of(self._control.snapshot())
        known = pair if pair in pairs else pair.replace("-", "/")
        if known not in pairs:
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


# The page: no external resources (the machine may have no internet). The script is inline
# and allowed by its hash in the Content-Security-Policy, so nothing else can run.
_SCRIPT: Final = r"""
"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
if (params.has("token")) history.replaceState(null, "", location.pathname);
const auth = {"Authorization": "Bearer " + token};
const $ = (id) => document.getElementById(id);
const GREEN = "#26a69a", RED = "#ef5350", LINE = "#4fc3f7", GRID = "#2d333b", DIM = "#8b949e";
const LIGHT = "equity_curve,order_books,recent_trades,last_decisions";
let pair = null;

async function getJSON(path) {
  const r = await fetch(path, {headers: auth, cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
async function command(path) {
  const r = await fetch(path, {method: "POST", headers: auth});
  $("note").textContent = r.ok ? path.slice(5) + " sent" : path + ": HTTP " + r.status;
  tick();
}
function num(v, d) {
  if (v === null || v === undefined) return "-";
  return Number(v).toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
}
function canvas(id) {
  const c = $(id), dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px DejaVu Sans, sans-serif";
  return [ctx, w, h];
}
function axisY(ctx, lo, hi, L, T, W, H, digits) {
  ctx.strokeStyle = GRID; ctx.fillStyle = DIM; ctx.lineWidth = 1; ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4, y = T + H - H * i / 4;
    ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(L + W, y); ctx.stroke();
    ctx.fillText(num(v, digits), L - 6, y + 4);
  }
}
function utc(ts) { return new Date(ts).toISOString().slice(11, 19); }

function drawEquity(d) {
  const [ctx, w, h] = canvas("equity-chart");
  const pts = d.points.filter((p) => p[1] !== null);
  if (pts.length < 2) {
    ctx.fillStyle = DIM;
    ctx.fillText("waiting for equity data", 12, 20);
    return;
  }
  const L = 80, R = 12, T = 10, B = 22, W = w - L - R, H = h - T - B;
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  if (hi === lo) { lo -= 1; hi += 1; }
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0] || t0 + 1;
  const x = (t) => L + (t - t0) / Math.max(1, t1 - t0) * W, y = (v) => T + (hi - v) / (hi - lo) * H;
  axisY(ctx, lo, hi, L, T, W, H, 2);
  ctx.textAlign = "left"; ctx.fillText(utc(t0) + " UTC", L, h - 6);
  ctx.textAlign = "right"; ctx.fillText(utc(t1) + " UTC", L + W, h - 6);
  ctx.beginPath(); ctx.moveTo(x(t0), T + H);
  for (const [t, v] of pts) ctx.lineTo(x(t), y(v));
  ctx.lineTo(x(t1), T + H); ctx.closePath();
  ctx.fillStyle = "rgba(79, 195, 247, 0.15)"; ctx.fill();
  ctx.beginPath();
  pts.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
  ctx.strokeStyle = LINE; ctx.lineWidth = 2; ctx.stroke();
}

function drawDepth(d) {
  const [ctx, w, h] = canvas("depth-chart");
  if (!d.bids.length && !d.asks.length) {
    ctx.fillStyle = DIM;
    ctx.fillText("empty book", 12, 20);
    return;
  }
  const L = 80, R = 12, T = 10, B = 22, W = w - L - R, H = h - T - B;
  const prices = d.bids.concat(d.asks).map((l) => l[0]);
  // Pad the price range so the outermost levels show as steps, not as the chart's edge.
  const pad = Math.max((Math.max(...prices) - Math.min(...prices)) * 0.08, 1e-9);
  const lo = Math.min(...prices) - pad, hi = Math.max(...prices) + pad, span = hi - lo;
  const top = Math.max(...d.bids.concat(d.asks).map((l) => l[2])) * 1.05 || 1;
  const x = (p) => L + (p - lo) / span * W, y = (q) => T + H - q / top * H;
  axisY(ctx, 0, top, L, T, W, H, 3);
  ctx.fillStyle = DIM;
  for (let i = 0; i <= 4; i++) {
    const p = lo + span * i / 4;
    ctx.textAlign = i === 0 ? "left" : i === 4 ? "right" : "center";
    ctx.fillText(num(p, p >= 100 ? 2 : 4), x(p), h - 6);
  }
  const side = (levels, colour, edge) => {
    if (!levels.length) return;
    ctx.beginPath(); ctx.moveTo(x(levels[0][0]), y(0));
    let prev = 0;
    for (const [p, , cum] of levels) {
      ctx.lineTo(x(p), y(prev));
      ctx.lineTo(x(p), y(cum));
      prev = cum;
    }
    ctx.lineTo(x(edge), y(prev)); ctx.lineTo(x(edge), y(0)); ctx.closePath();
    ctx.globalAlpha = 0.35; ctx.fillStyle = colour; ctx.fill();
    ctx.globalAlpha = 1; ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.stroke();
  };
  side(d.bids, GREEN, lo);
  side(d.asks, RED, hi);
  if (d.mid !== null) {
    ctx.setLineDash([4, 4]); ctx.strokeStyle = DIM; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(x(d.mid), T); ctx.lineTo(x(d.mid), T + H); ctx.stroke();
    ctx.setLineDash([]);
  }
  $("depth-info").textContent = d.mid === null ? "" :
    "mid " + num(d.mid, d.mid >= 100 ? 2 : 4) + " · spread " + num(d.spread_bps, 1) + " bps";
}

function showStatus(s) {
  $("mode").textContent = s.mode.toUpperCase();
  $("mode").className = "badge " + (s.mode === "live" ? "live" : "sim");
  $("state").textContent = s.state;
  $("trading").textContent = s.trading_state;
  $("equity").textContent = num(s.portfolio.equity, 2);
  const upnl = s.portfolio.positions.reduce((a, p) => a + (p.mark_price === null ? 0 :
    (p.mark_price - p.entry_price) * p.qty * (p.side === "long" ? 1 : -1)), 0);
  const pnl = Number(s.portfolio.realised_pnl) + upnl;
  $("pnl").textContent = (pnl >= 0 ? "+" : "") + num(pnl, 2);
  $("pnl").style.color = pnl >= 0 ? GREEN : RED;
  $("positions").textContent = s.portfolio.positions.length;
  $("errors").textContent = s.errors.length ? s.errors.slice(-5).join("\n") : "no errors";
  const pairs = s.pairs.length ? s.pairs : [];
  const sel = $("pair");
  if (sel.options.length !== pairs.length || pairs.some((p, i) => sel.options[i].value !== p)) {
    sel.replaceChildren(...pairs.map((p) => new Option(p, p)));
  }
  if (!pairs.includes(pair)) pair = pairs.length ? pairs[0] : null;
  sel.value = pair || "";
}

async function tick() {
  try {
    const s = await getJSON("/api/snapshot?exclude=" + LIGHT);
    showStatus(s);
    const width = Math.max(50, Math.floor($("equity-chart").clientWidth));
    const [eq, depth, found] = await Promise.all([
      getJSON("/api/equity?points=" + width),
      pair ? getJSON("/api/depth/" + encodeURIComponent(pair)).catch(() => null) : null,
      pair ? getJSON("/api/patterns/" + encodeURIComponent(pair)).catch(() => null) : null,
    ]);
    drawEquity(eq);
    if (depth) drawDepth(depth); else canvas("depth-chart");
    const marks = {bullish: "\u25b2", bearish: "\u25bc", neutral: "\u00b7"};
    $("patterns").textContent = found && found.patterns.length ? "patterns: " +
      found.patterns.map((p) => p.label + " " + (marks[p.direction] || "") + " (" +
        (p.bars_ago === 0 ? "last candle" : p.bars_ago + " ago") + ")").join(", ") : "";
    $("note").textContent = "updated " + utc(Date.now()) + " UTC";
  } catch (e) {
    $("note").textContent = String(e);
  }
}
$("pair").addEventListener("change", (e) => { pair = e.target.value; tick(); });
$("pause").addEventListener("click", () => command("/api/pause"));
$("resume").addEventListener("click", () => command("/api/resume"));
$("resetrisk").addEventListener("click", () => {
  if (confirm("Reset risk? Latched circuit breakers are lifted.")) command("/api/resetrisk");
});
tick();
setInterval(tick, 1000);
"""

PAGE_HTML: Final = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kestrel</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>
body { margin: 0; background: #0f1419; color: #d8dee9; font: 14px/1.4 "DejaVu Sans", sans-serif; }
header { display: flex; gap: 18px; align-items: center; padding: 10px 16px;
         background: #161b22; border-bottom: 1px solid #2d333b; }
.badge { padding: 2px 8px; border-radius: 4px; font-weight: bold; color: #fff; }
.live { background: #b71c1c; } .sim { background: #1565c0; }
.grow { flex: 1; } .dim { color: #8b949e; }
button { background: #21262d; color: #d8dee9; border: 1px solid #444c56; border-radius: 4px;
         padding: 4px 12px; cursor: pointer; }
main { padding: 12px 16px; display: grid; gap: 12px; }
section { background: #161b22; border: 1px solid #2d333b; border-radius: 6px; padding: 8px 12px; }
h2 { margin: 0 0 6px; font-size: 13px; color: #8b949e; font-weight: normal;
     text-transform: uppercase; display: flex; gap: 12px; align-items: center; }
canvas { width: 100%; height: 250px; display: block; }
select { background: #21262d; color: #d8dee9; border: 1px solid #444c56; }
pre { margin: 0; color: #ef5350; white-space: pre-wrap; }
</style></head><body>
<header><strong>Kestrel</strong><span id="mode" class="badge">-</span>
<span>state <b id="state">-</b></span><span>trading <b id="trading">-</b></span>
<span>equity <b id="equity">-</b></span><span>PnL <b id="pnl">-</b></span>
<span>positions <b id="positions">-</b></span><span class="grow"></span>
<span id="note" class="dim"></span>
<button id="pause">Pause</button><button id="resume">Resume</button>
<button id="resetrisk">Reset risk</button></header>
<main>
<section><h2>Equity</h2><canvas id="equity-chart"></canvas></section>
<section><h2>Market depth <select id="pair"></select><span id="depth-info" class="dim"></span>
</h2><canvas id="depth-chart"></canvas><div id="patterns" class="dim"></div></section>
<section><h2>Recent errors</h2><pre id="errors"></pre></section>
</main>
<script>"""
    + _SCRIPT
    + """</script>
</body></html>
"""
)

_SCRIPT_HASH: Final = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP: Final = (
    f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
