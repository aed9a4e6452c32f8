"""The operator's windows on the bot: a terminal dashboard, a Rich status print, a web view.

Three read-only views over one façade (`models.Control` + `models.Snapshot`); the only
writes are the operator commands the façade offers.

- `render_snapshot(snapshot)` returns a plain Rich renderable of the whole state, for
  `--no-ui` status prints. Its sections (`section_equity`, `section_depth`, ...) are the
  same renderables the dashboard shows, so the two never disagree.
- `Dashboard` is a Textual app run inside the bot's own event loop (`await
  dashboard.run_async()`); it polls `control.snapshot()` `refresh_hz` times a second and
  re-renders only the panels whose inputs changed, one per frame, so the loop is
  never held for a whole-screen repaint. Keys: left/right (or tab/shift+tab)
  switch the depth chart's pair, `p` pauses or resumes, `r` resets latched circuit
  breakers after a confirmation, `s` toggles sim/live after a
  confirmation (only when API keys are configured), `q` quits. By default `q` also asks
  the bot to stop gracefully (`control.stop`), because the dashboard is the daemon's
  foreground; pass `quit_stops_bot=False` to only close the window.
- `WebView` is an aiohttp server on 127.0.0.1 behind a token, with a JSON API of the same
  state and one page (`web_page`) with live price (candles, the strategy's overlays, entry,
  exit and stop marks), equity/drawdown and depth charts, drawn with the vendored
  Lightweight Charts library (no CDN), and panels for pairs, positions, trades, ranking,
  risk and breaker history, model, anomalies and reports.

JSON encoding (`to_jsonable`): `Decimal` values become strings (exact, `str(Decimal)`),
`float` values stay JSON numbers (NaN and infinities become `null`), enums become their
string values, timestamps stay integer milliseconds UTC, tuples become arrays. The web view
writes the same documents with orjson (`encode_json`), on the loop, field by field.

This module is the entry point and re-exports the parts: `status_view` (formatting, charts,
sections, `render_snapshot`), `dashboard` (`Dashboard`, `ConfirmScreen`) and `web_view`
(`WebView`, `to_jsonable`, `encode_json`, `depth_json`, `equity_json`).
"""

from __future__ import annotations

from dashboard import NO_KEYS_REASON as NO_KEYS_REASON
from dashboard import ConfirmScreen as ConfirmScreen
from dashboard import Dashboard as Dashboard
from dashboard import SwitchMode as SwitchMode
from status_view import Cell as Cell
from status_view import DepthChart as DepthChart
from status_view import Sparkline as Sparkline
from status_view import depth_levels as depth_levels
from status_view import max_drawdown as max_drawdown
from status_view import pairs_of as pairs_of
from status_view import render_snapshot as render_snapshot
from status_view import section_depth as section_depth
from status_view import section_equity as section_equity
from status_view import section_errors as section_errors
from status_view import section_metrics as section_metrics
from status_view import section_positions as section_positions
from status_view import section_risk as section_risk
from status_view import section_status as section_status
from status_view import section_system as section_system
from status_view import section_trades as section_trades
from status_view import sparkline_text as sparkline_text
from status_view import unrealised_pnl as unrealised_pnl
from web_page import page_html as page_html
from web_view import WebView as WebView
from web_view import _encode_snapshot as _encode_snapshot
from web_view import depth_json as depth_json
from web_view import encode_json as encode_json
from web_view import equity_json as equity_json
from web_view import to_jsonable as to_jsonable
