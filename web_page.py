"""The web view's page: one HTML document, its inline script and its Content-Security-Policy.

Part of `ui` (`web_view` serves it). The price and equity charts are TradingView's
Lightweight Charts (Apache-2.0), vendored in `static/` and served by the web view itself
behind the token, so the page reaches nothing but the bot (`connect-src 'self'`).

The page polls the JSON API once a second. What it draws is also written into the DOM as
data attributes (`#price-chart[data-pair][data-candles][data-markers][data-overlays]`,
`#equity-chart[data-points][data-shaded]`, the points shaded as held back by a circuit
breaker), read back from the chart series themselves, so a test (or
an operator's script) can check what is on screen without reading pixels.
"""

from __future__ import annotations

import base64
import hashlib
import html
from pathlib import Path
from typing import Final
from urllib.parse import quote


STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
CHART_LIBRARY: Final = STATIC_DIR / "lightweight-charts.standalone.production.js"
CHART_LIBRARY_ROUTE: Final = "/static/lightweight-charts.js"

# The page's own script, inlined and allowed by its hash (nothing else inline may run).
_SCRIPT: Final = (STATIC_DIR / "web_view.js").read_text(encoding="utf-8")

_STYLE: Final = """
body { margin: 0; background: #0f1419; color: #d8dee9; font: 13px/1.4 "DejaVu Sans", sans-serif; }
header { display: flex; gap: 16px; align-items: center; padding: 8px 14px;
         background: #161b22; border-bottom: 1px solid #2d333b; }
.badge { padding: 2px 8px; border-radius: 4px; font-weight: bold; color: #fff; }
.live { background: #b71c1c; } .sim { background: #1565c0; }
.grow { flex: 1; } .dim { color: #8b949e; } .up { color: #26a69a; } .down { color: #ef5350; }
button { background: #21262d; color: #d8dee9; border: 1px solid #444c56; border-radius: 4px;
         padding: 3px 10px; cursor: pointer; }
main { padding: 10px 14px; display: grid; gap: 10px; grid-template-columns: 2fr 1fr; }
section { background: #161b22; border: 1px solid #2d333b; border-radius: 6px; padding: 6px 10px;
          min-width: 0; overflow: auto; }
.wide { grid-column: 1 / -1; }
h2 { margin: 0 0 6px; font-size: 12px; color: #8b949e; font-weight: normal;
     text-transform: uppercase; display: flex; gap: 10px; align-items: center; }
#price-chart { height: 380px; } #equity-chart { height: 220px; }
#depth-chart { width: 100%; height: 160px; display: block; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
td, th { padding: 2px 6px; text-align: right; white-space: nowrap; }
td:first-child, th:first-child { text-align: left; } th { color: #8b949e; font-weight: normal; }
a { color: #4fc3f7; text-decoration: none; } a.sel { font-weight: bold; color: #fff; }
select { background: #21262d; color: #d8dee9; border: 1px solid #444c56; }
pre { margin: 0; color: #ef5350; white-space: pre-wrap; }
ul { margin: 0; padding-left: 18px; }
.cols { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 10px; }
"""

_BODY: Final = """
<header><strong>Kestrel</strong><span id="mode" class="badge">-</span>
<span>state <b id="state">-</b></span><span>trading <b id="trading">-</b></span>
<span>equity <b id="equity">-</b></span><span>PnL <b id="pnl">-</b></span>
<span>positions <b id="positions">-</b></span><span class="grow"></span>
<span id="note" class="dim"></span>
<button id="pause">Pause</button><button id="resume">Resume</button>
<button id="resetrisk">Reset risk</button></header>
<main>
<section><h2>Price <select id="pair"></select><span id="price-info" class="dim"></span></h2>
<div id="price-chart"></div><div id="patterns" class="dim"></div></section>
<section><h2>Pairs</h2><table id="pairs"></table>
<h2 style="margin-top:10px">Strategy ranking</h2><table id="ranking"></table></section>
<section><h2>Equity &amp; drawdown <span id="equity-info" class="dim"></span></h2>
<div id="equity-chart"></div></section>
<section><h2>Risk</h2><table id="risk-table"></table></section>
<section class="wide"><h2>Open positions</h2><table id="positions-table"></table></section>
<section><h2>Recent trades</h2><table id="trades-table"></table></section>
<section><h2>Breaker history</h2><table id="breaker-history"></table></section>
<section class="wide"><div class="cols">
<div><h2>Model</h2><table id="model-table"></table></div>
<div><h2>Anomalies</h2><table id="anomalies"></table></div>
<div><h2>Reports</h2><ul id="reports"></ul></div></div></section>
<section><h2>Market depth <span id="depth-info" class="dim"></span></h2>
<canvas id="depth-chart"></canvas></section>
<section><h2>Recent errors</h2><pre id="errors"></pre></section>
</main>
"""


def page_html(token: str) -> str:
    """Return the page; `token` (the one the request carried) authorises the chart library.

    A `<script src>` cannot send a header, so the library's URL carries the token the page
    was opened with; the page's own script then drops the token from the address bar.
    """
    library = html.escape(f"{CHART_LIBRARY_ROUTE}?token={quote(token, safe='')}")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Kestrel</title>\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<link rel="icon" href="data:,"><style>{_STYLE}</style></head><body>{_BODY}'
        f'<script src="{library}"></script>\n<script>{_SCRIPT}</script>\n</body></html>\n'
    )


_SCRIPT_HASH: Final = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
CSP: Final = (
    f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}' 'self'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
