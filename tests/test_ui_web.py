"""The web view: token auth, the JSON API against known snapshots, commands, and the page
rendered by headless Chromium (screenshot kept in test-artifacts/)."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest
from PIL import Image  # pillow comes with matplotlib (vectorbt's dependency)
from pydantic import SecretStr

from config import UISettings
from error_handler import ConfigError
from models import (
    BotState,
    ClosedTrade,
    OrderBook,
    PortfolioSnapshot,
    Position,
    PositionSide,
    Snapshot,
    TradingState,
)
from tests.conftest import ROOT
from tests.test_ui_support import T0, FakeControl, make_snapshot, sample_chart
from ui import WebView


TOKEN = "test-token-5f2c9a"
GOOD = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
async def web(control: FakeControl) -> AsyncIterator[WebView]:
    view = WebView(control, UISettings(web_port=0, web_token=SecretStr(TOKEN)))
    async with view:
        yield view


@pytest.fixture
async def reports_web(control: FakeControl, tmp_path: Path) -> AsyncIterator[WebView]:
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "backtest.html").write_text("<h1>report</h1>")
    (folder / "notes.txt").write_text("not a report")
    (tmp_path / "secret.html").write_text("outside")
    settings = UISettings(web_port=0, web_token=SecretStr(TOKEN))
    view = WebView(control, settings, reports_dir=folder)
    async with view:
        yield view


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(web: WebView, path: str) -> str:
    return f"http://127.0.0.1:{web.port}{path}"


# -- Auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/api/snapshot"),
        ("GET", "/api/equity"),
        ("GET", "/api/depth/BTC/USDT"),
        ("GET", "/api/patterns/BTC/USDT"),
        ("GET", "/static/lightweight-charts.js"),
        ("GET", "/api/chart/BTC/USDT"),
        ("GET", "/api/reports"),
        ("GET", "/reports/backtest.html"),
        ("POST", "/api/pause"),
        ("POST", "/api/resume"),
        ("POST", "/api/resetrisk"),
    ],
)
@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"Authorization": "Bearer wrong-token"}, ""),
        ({"Authorization": f"Basic {TOKEN}"}, ""),
        ({}, "?token=wrong"),
        ({}, f"?token={TOKEN[:-1]}"),
        ({"Authorization": "Bearer wrong-token"}, f"?token={TOKEN}"),  # a bad header wins
    ],
)
async def test_every_route_needs_the_token(
    web: WebView,
    http: aiohttp.ClientSession,
    control: FakeControl,
    method: str,
    path: str,
    headers: dict[str, str],
    query: str,
) -> None:
    """Without the right token every route answers 401 and no command runs."""
    async with http.request(method, url(web, path + query), headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await response.json() == {"error": "unauthorized"}
    assert control.calls == []
    assert control.snapshot_calls == 0


@pytest.mark.parametrize(
    ("headers", "query"), [(GOOD, ""), ({}, f"?token={TOKEN}")], ids=["bearer", "query"]
)
async def test_the_token_is_accepted_as_header_or_query(
    web: WebView, http: aiohttp.ClientSession, headers: dict[str, str], query: str
) -> None:
    """A Bearer header or a ?token= query parameter both authorise."""
    async with http.get(url(web, "/api/snapshot" + query), headers=headers) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert (await response.json())["mode"] == "sim"


def test_a_web_view_without_a_token_refuses_to_start(control: FakeControl) -> None:
    """No configured token is a configuration error, not an open server."""
    with pytest.raises(ConfigError, match="KESTREL_UI__WEB_TOKEN"):
        WebView(control, UISettings(web_port=0))


async def test_stop_releases_the_port(control: FakeControl, http: aiohttp.ClientSession) -> None:
    """After stop the port no longer answers; stop twice is harmless."""
    view = WebView(control, UISettings(web_port=0), token=TOKEN)
    await view.start()
    port = view.port
    await view.stop()
    await view.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"http://127.0.0.1:{port}/api/snapshot", headers=GOOD)


# -- JSON ------------------------------------------------------------------------------------


def small_snapshot() -> Snapshot:
    """Return a snapshot small enough to spell out its JSON by hand."""
    return Snapshot(
        ts=1_000,
        mode="live",
        state=BotState.RUNNING,
        trading_state=TradingState.HALTED,
        portfolio=PortfolioSnapshot(
            ts=1_000,
            cash=Decimal("100.50"),
            equity=Decimal("150.25"),
            positions=(
                Position(
                    pair="BTC/USDT",
                    side=PositionSide.SHORT,
                    qty=Decimal("0.001"),
                    entry_price=Decimal("50000.0"),
                    ts_opened=900,
                    mark_price=Decimal("49000"),
                ),
            ),
        ),
        pairs=("BTC/USDT",),
        recent_trades=(
            ClosedTrade("ETH/USDT", PositionSide.LONG, 1, 2, 10.0, 11.5, 2.0, 0.01, 2.99, "tp"),
        ),
        equity_curve=((500, 149.0), (1_000, float("nan"))),
        order_books={"BTC/USDT": OrderBook("BTC/USDT", 999, ((48999.5, 0.25),), ((49000.5, 1.0),))},
        scores={"trend": 0.5},
        errors=("boom",),
        rate_limit_budget={"rest": 0.9},
        risk={"exposure": Decimal("0.33"), "circuit_breakers": {"exchange": "open"}},
        late_streams=("SOL/USDT",),
    )


EXPECTED_SNAPSHOT: dict[str, Any] = {
    "ts": 1000,
    "mode": "live",
    "state": "running",
    "trading_state": "halted",
    "portfolio": {
        "ts": 1000,
        "cash": "100.50",
        "equity": "150.25",
        "positions": [
            {
                "pair": "BTC/USDT",
                "side": "short",
                "qty": "0.001",
                "entry_price": "50000.0",
                "ts_opened": 900,
                "stop_price": None,
                "take_profit": None,
                "mark_price": "49000",
                "fees_paid": "0",
                "liquidation_price": None,
                "leverage": None,
            }
        ],
        "realised_pnl": "0",
        "fees": "0",
    },
    "pairs": ["BTC/USDT"],
    "recent_trades": [
        {
            "pair": "ETH/USDT",
            "side": "long",
            "entry_ts": 1,
            "exit_ts": 2,
            "entry_price": 10.0,
            "exit_price": 11.5,
            "qty": 2.0,
            "fee": 0.01,
            "pnl": 2.99,
            "reason": "tp",
            "stop_price": None,
            "adds_at_loss": 0,
            "strategy": "",
            "funding": 0.0,
        }
    ],
    "open_orders": [],
    "equity_curve": [[500, 149.0], [1000, None]],
    "last_decisions": {},
    "order_books": {
        "BTC/USDT": {
            "pair": "BTC/USDT",
            "ts": 999,
            "bids": [[48999.5, 0.25]],
            "asks": [[49000.5, 1.0]],
        }
    },
    "scores": {"trend": 0.5},
    "errors": ["boom"],
    "rate_limit_budget": {"rest": 0.9},
    "risk": {"exposure": "0.33", "circuit_breakers": {"exchange": "open"}},
    "model": {},
    "markets": {},
    "ranking": [],
    "anomalies": {},
    "patterns": {},
    "allocation": {},
    "late_streams": ["SOL/USDT"],
}


async def test_snapshot_json_equals_the_snapshot(
    web: WebView, http: aiohttp.ClientSession, control: FakeControl
) -> None:
    """/api/snapshot is the Snapshot field for field: Decimals as strings, NaN as null."""
    control.base = small_snapshot()
    async with http.get(url(web, "/api/snapshot"), headers=GOOD) as response:
        assert response.content_type == "application/json"
        assert await response.json() == EXPECTED_SNAPSHOT


async def test_snapshot_can_leave_heavy_fields_out(
    web: WebView, http: aiohttp.ClientSession, control: FakeControl
) -> None:
    """?exclude= drops the named fields and keeps the rest."""
    control.base = small_snapshot()
    path = "/api/snapshot?exclude=equity_curve,order_books"
    async with http.get(url(web, path), headers=GOOD) as response:
        body = await response.json()
    expected = {
        k: v for k, v in EXPECTED_SNAPSHOT.items() if k not in ("equity_curve", "order_books")
    }
    assert body == expected


async def test_equity_json(web: WebView, http: aiohttp.ClientSession, control: FakeControl) -> None:
    """/api/equity carries the equity figures and the curve."""
    control.base = small_snapshot()
    async with http.get(url(web, "/api/equity"), headers=GOOD) as response:
        body = await response.json()
    assert body == {
        "ts": 1000,
        "equity": "150.25",
        "cash": "100.50",
        "realised_pnl": "0",
        "unrealised_pnl": "1.0000",  # short 0.001 from 50000 to 49000
        "total_points": 2,
        "points": [[500, 149.0], [1000, None]],
    }
    async with http.get(url(web, "/api/equity?points=x"), headers=GOOD) as response:
        assert response.status == 400


@pytest.mark.parametrize("pair", ["BTC/USDT", "BTC%2FUSDT", "BTC-USDT"])
async def test_depth_json_is_cumulative(
    web: WebView, http: aiohttp.ClientSession, pair: str
) -> None:
    """/api/depth/<pair> returns [price, qty, cumulative] per level, best first."""
    async with http.get(url(web, f"/api/depth/{pair}"), headers=GOOD) as response:
        assert response.status == 200
        body = await response.json()
    assert body["pair"] == "BTC/USDT"
    assert body["bids"] == [[50599.0, 1.0, 1.0], [50598.0, 2.0, 3.0], [50590.0, 3.0, 6.0]]
    assert body["asks"] == [[50601.0, 0.5, 0.5], [50602.0, 1.5, 2.0], [50610.0, 4.0, 6.0]]
    assert body["mid"] == 50600.0
    assert body["spread_bps"] == pytest.approx(2 / 50600 * 1e4)


async def test_depth_of_an_unknown_pair_is_404(web: WebView, http: aiohttp.ClientSession) -> None:
    """A pair without a book is a 404 with a reason."""
    async with http.get(url(web, "/api/depth/DOGE/USDT"), headers=GOOD) as response:
        assert response.status == 404
        assert "DOGE/USDT" in (await response.json())["error"]


async def test_patterns_of_a_traded_pair_and_404_for_others(
    web: WebView, http: aiohttp.ClientSession, control: FakeControl
) -> None:
    """/api/patterns/<pair> returns what Control.patterns found; unknown pairs are a 404."""
    from data_manager import latest_patterns, load_candles
    from tests.conftest import SAMPLE

    day = load_candles(SAMPLE / "bybit_BTC-USDT_1m.csv.gz", timeframe="1m")
    end = next(i for i in range(60, len(day)) if latest_patterns(day.iloc[:i]))
    control.found_patterns["BTC/USDT"] = latest_patterns(day.iloc[:end])
    async with http.get(url(web, "/api/patterns/BTC-USDT"), headers=GOOD) as response:
        assert response.status == 200
        body = await response.json()
    assert body["pair"] == "BTC/USDT"
    assert body["patterns"] == control.found_patterns["BTC/USDT"]
    async with http.get(url(web, "/api/patterns/DOGE/USDT"), headers=GOOD) as response:
        assert response.status == 404


async def test_pause_and_resume_commands(
    web: WebView, http: aiohttp.ClientSession, control: FakeControl
) -> None:
    """POST /api/pause and /api/resume call the Control and report the new state."""
    async with http.post(url(web, "/api/pause"), headers=GOOD) as response:
        assert await response.json() == {"ok": True, "state": "paused"}
    assert control.calls == [("pause", "web view")]
    async with http.post(url(web, f"/api/resume?token={TOKEN}")) as response:
        assert await response.json() == {"ok": True, "state": "running"}
    assert control.calls == [("pause", "web view"), ("resume", "web view")]
    async with http.get(url(web, "/api/pause"), headers=GOOD) as response:
        assert response.status == 405  # a link or an image cannot pause the bot
    assert len(control.calls) == 2


async def test_reset_risk_command_needs_the_token_and_a_post(
    web: WebView, http: aiohttp.ClientSession, control: FakeControl
) -> None:
    """POST /api/resetrisk resets through the Control as "web view"; no token or GET: nothing."""
    async with http.post(url(web, "/api/resetrisk")) as response:
        assert response.status == 401
    async with http.get(url(web, "/api/resetrisk"), headers=GOOD) as response:
        assert response.status == 405
    assert control.calls == []
    async with http.post(url(web, "/api/resetrisk"), headers=GOOD) as response:
        body = await response.json()
    assert body["ok"] is True
    assert body["trading_state"] == str(control.snapshot().trading_state)
    assert control.calls == [("reset_risk", "web view")]


async def test_chart_and_library_routes(
    web: WebView, http: aiohttp.ClientSession, control: FakeControl
) -> None:
    """/api/chart answers the control's chart for a traded pair, 404 otherwise; the chart
    library is the vendored file, served as JavaScript."""
    control.charts["BTC/USDT"] = sample_chart(limit=20)
    async with http.get(url(web, "/api/chart/BTC-USDT?limit=20"), headers=GOOD) as response:
        body = await response.json()
    assert body["pair"] == "BTC/USDT"
    assert len(body["candles"]) == 20
    assert body["position"]["stop_price"] is not None
    async with http.get(url(web, "/api/chart/DOGE/USDT"), headers=GOOD) as response:
        assert response.status == 404
    async with http.get(url(web, "/api/chart/BTC/USDT?limit=x"), headers=GOOD) as response:
        assert response.status == 400
    async with http.get(url(web, "/static/lightweight-charts.js"), headers=GOOD) as response:
        assert response.content_type == "application/javascript"
        library = await response.read()
    assert library == (ROOT / "static" / "lightweight-charts.standalone.production.js").read_bytes()


async def test_reports_are_listed_and_served_from_their_folder_only(
    reports_web: WebView, http: aiohttp.ClientSession
) -> None:
    """Only .html/.json files straight in the reports folder are listed and served, with a
    policy that lets no script run; other names and paths are 404."""
    async with http.get(url(reports_web, "/api/reports"), headers=GOOD) as response:
        listed = await response.json()
    assert [r["name"] for r in listed["reports"]] == ["backtest.html"]
    async with http.get(url(reports_web, "/reports/backtest.html"), headers=GOOD) as response:
        assert await response.text() == "<h1>report</h1>"
        assert "sandbox" in response.headers["Content-Security-Policy"]
    for name in ("notes.txt", "..%2Fsecret.html", "missing.html"):
        async with http.get(url(reports_web, f"/reports/{name}"), headers=GOOD) as response:
            assert response.status == 404, name


async def test_page_is_self_contained(web: WebView, http: aiohttp.ClientSession) -> None:
    """The page loads nothing from elsewhere and locks scripts to its own inline one."""
    async with http.get(url(web, "/"), headers=GOOD) as response:
        html = await response.text()
        csp = response.headers["Content-Security-Policy"]
    assert response.content_type == "text/html"
    assert "<canvas" in html
    assert "http://" not in html
    assert "https://" not in html
    assert "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp


# -- In a real browser -----------------------------------------------------------------------


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/browser.sh should have installed it")
        pytest.skip("chromium not installed (run .ci/browser.sh)")
    return path


def _count_near(image: Any, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> int:
    pixels = np.asarray(image.crop(box).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(colour)) <= 12).all(axis=-1).sum())


def _distinct_colours(image: Any, box: tuple[int, int, int, int]) -> int:
    pixels = np.asarray(image.crop(box).convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


async def _chromium_run(tmp_path: Path, web: WebView, *flags: str) -> str:
    # Headless Chromium on the page with the token, offline, and its network log kept.
    process = await asyncio.create_subprocess_exec(
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--hide-scrollbars",
        # The browser's own background traffic goes nowhere; the page's is logged below.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"--log-net-log={tmp_path / 'netlog.json'}",
        "--window-size=1200,800",
        "--virtual-time-budget=3000",  # let the page's fetches and first tick finish
        *flags,
        f"http://127.0.0.1:{web.port}/?token={TOKEN}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        output, errors = await asyncio.wait_for(process.communicate(), timeout=45)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, errors.decode(errors="replace")[-2000:]
    return output.decode(errors="replace")


def _page_requests(netlog: Path) -> set[str]:
    # Every URL a page asked for, from Chromium's own network log: the requests started with
    # an origin as initiator (the browser's own update and account checks have none).
    text = netlog.read_text(errors="replace").rstrip()
    if not text.endswith("}"):  # the log may end without its closing brackets
        text = text.rstrip(",") + "]}"
    log = json.loads(text)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return {
        str(e["params"]["url"])
        for e in log["events"]
        if e["type"] == start_job
        and e.get("params", {}).get("initiator", "not an origin") != "not an origin"
    }


async def test_page_draws_charts_in_headless_chromium(
    web: WebView, control: FakeControl, tmp_path: Path
) -> None:
    """Chromium loads the page, which fetches the API and draws candles and equity."""
    control.charts["BTC/USDT"] = sample_chart()
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "web_view.png"
    shot.unlink(missing_ok=True)
    await _chromium_run(tmp_path, web, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    assert control.snapshot_calls >= 2  # the page's script polled the API with the token

    with Image.open(shot) as image:
        assert image.size == (1200, 800)
        price_box, equity_box = (14, 80, 790, 460), (14, 500, 790, 730)
        assert _count_near(image, (0x26, 0xA6, 0x9A), price_box) > 300  # rising candles
        assert _count_near(image, (0xEF, 0x53, 0x50), price_box) > 300  # falling candles
        assert _count_near(image, (0x4F, 0xC3, 0xF7), equity_box) > 300  # the equity line
        assert _distinct_colours(image, equity_box) > 20  # axes, labels, fill: not a flat box


async def test_page_shows_the_selected_pairs_candles_and_trades(
    web: WebView, control: FakeControl, tmp_path: Path
) -> None:
    """The chart holds the pair's candles, the strategy's EMAs and every entry, exit and
    stop mark (read back from the chart's own series); nothing but 127.0.0.1 is asked."""
    chart = sample_chart()
    control.charts["BTC/USDT"] = chart
    halt = {"ts": T0 - 20 * 60_000, "from": "normal", "to": "halted", "trigger": "daily_loss",
            "reason": "day loss 3.10% >= 3.00%"}  # fmt: skip
    control.base = make_snapshot(
        risk={**control.base.risk, "breaker_history": [halt]}, late_streams=("SOL/USDT",)
    )
    dom = await _chromium_run(tmp_path, web, "--dump-dom")

    box = re.search(r'<div id="price-chart"([^>]*)>', dom)
    assert box is not None, dom[:2000]
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', box.group(1)))
    assert attrs["pair"] == "BTC/USDT"
    assert int(attrs["candles"]) == len(chart["candles"]) == 300
    assert attrs["overlays"] == "ema_fast,ema_slow"
    markers = json.loads(html.unescape(attrs["markers"]))
    expected = [(m["ts"] // 1000, m["kind"]) for m in chart["marks"]]
    shapes = {"entry": "arrowUp", "exit": "arrowDown", "stop": "square"}
    assert [(t, shape) for t, shape, _ in markers] == [(t, shapes[k]) for t, k in expected]
    assert [k for _, k in expected] == ["entry", "exit", "entry", "stop", "entry"]
    candle_times = {c[0] // 1000 for c in chart["candles"]}
    assert {t for t, _, _ in markers} <= candle_times
    # The equity curve's last 20 minutes (of 60 one-minute points) are shaded as halted.
    equity = re.search(r'<div id="equity-chart"([^>]*)>', dom)
    assert equity is not None
    shown = dict(re.findall(r'data-([a-z]+)="([^"]*)"', equity.group(1)))
    assert (shown["points"], shown["shaded"]) == ("60", "20")
    assert "day loss 3.10% &gt;= 3.00%" in dom  # the breaker history panel
    assert "<td>late streams</td><td>SOL/USDT (decided alone)</td>" in dom  # the risk table
    assert "ETH/USDT" in dom  # the panels are filled from the snapshot
    assert "meanrev" in dom

    urls = _page_requests(tmp_path / "netlog.json")
    assert any("/api/chart/BTC%2FUSDT" in u for u in urls)
    assert any("/static/lightweight-charts.js" in u for u in urls)
    assert {urlsplit(u).hostname for u in urls} == {"127.0.0.1"}


async def test_page_lists_the_patterns_of_the_selected_pair(
    web: WebView, control: FakeControl, tmp_path: Path
) -> None:
    """The page's script fetches /api/patterns for the selected pair and lists them."""
    control.found_patterns["BTC/USDT"] = [
        {"name": "cdlhammer", "label": "Hammer", "direction": "bullish", "bars_ago": 0, "ts": 1},
        {"name": "cdldoji", "label": "Doji", "direction": "neutral", "bars_ago": 2, "ts": 1},
    ]
    dom = await _chromium_run(tmp_path, web, "--dump-dom")
    assert "patterns: Hammer \u25b2 (last candle), Doji \u00b7 (2 ago)" in dom
