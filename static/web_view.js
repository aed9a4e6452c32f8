"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token") || "";
if (params.has("token")) history.replaceState(null, "", location.pathname);
const auth = {"Authorization": "Bearer " + token};
const $ = (id) => document.getElementById(id);
const GREEN = "#26a69a", RED = "#ef5350", LINE = "#4fc3f7", GRID = "#2d333b", DIM = "#8b949e";
const OVERLAY_COLOURS = ["#f0b429", "#b48ead", "#88c0d0", "#ebcb8b"];
const LIGHT = "equity_curve,order_books,last_decisions";
const LWC = window.LightweightCharts;
let pair = null, shownPair = null;

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
  if (v === null || v === undefined || v === "") return "-";
  return Number(v).toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
}
function px(v) {
  if (v === null || v === undefined) return "-";
  const a = Math.abs(Number(v));
  return num(v, a >= 100 ? 2 : a >= 1 ? 4 : 6);
}
function signed(v, d, suffix) {
  const n = Number(v), span = document.createElement("span");
  span.textContent = (n > 0 ? "+" : "") + num(n, d) + (suffix || "");
  span.className = n > 0 ? "up" : n < 0 ? "down" : "";
  return span;
}
function utc(ts) { return new Date(ts).toISOString().slice(11, 19); }
function day(ts) { return new Date(ts).toISOString().slice(0, 16).replace("T", " "); }
function cell(v) {
  const td = document.createElement("td");
  if (v instanceof Node) td.append(v); else td.textContent = v;
  return td;
}
function table(id, header, rows, empty) {
  const t = $(id);
  if (!rows.length) {
    const tr = document.createElement("tr"), td = cell(empty);
    td.colSpan = header.length; td.className = "dim"; tr.append(td);
    t.replaceChildren(tr);
    return;
  }
  const head = document.createElement("tr");
  head.append(...header.map((h) => { const th = document.createElement("th"); th.textContent = h; return th; }));
  t.replaceChildren(head, ...rows.map((r) => { const tr = document.createElement("tr"); tr.append(...r.map(cell)); return tr; }));
  return t;
}
function chartOptions() {
  return {
    autoSize: true,
    layout: {background: {color: "#161b22"}, textColor: DIM, attributionLogo: true},
    grid: {vertLines: {color: GRID}, horzLines: {color: GRID}},
    rightPriceScale: {borderColor: GRID},
    timeScale: {borderColor: GRID, timeVisible: true, secondsVisible: false},
    crosshair: {mode: 0},
  };
}

// -- Price chart: candles, the strategy's overlays, entry/exit/stop marks, position lines --
const priceChart = LWC.createChart($("price-chart"), chartOptions());
const candles = priceChart.addCandlestickSeries({
  upColor: GREEN, downColor: RED, borderVisible: false, wickUpColor: GREEN, wickDownColor: RED,
});
let overlaySeries = {}, positionLines = [];

function drawPrice(c) {
  const data = c.candles.map((k) => ({time: k[0] / 1000, open: k[1], high: k[2], low: k[3], close: k[4]}));
  candles.setData(data);
  const names = Object.keys(c.overlays);
  for (const [name, s] of Object.entries(overlaySeries)) {
    if (!names.includes(name)) { priceChart.removeSeries(s); delete overlaySeries[name]; }
  }
  names.forEach((name, i) => {
    if (!overlaySeries[name]) {
      overlaySeries[name] = priceChart.addLineSeries({
        color: OVERLAY_COLOURS[i % OVERLAY_COLOURS.length], lineWidth: 1, title: name,
        priceLineVisible: false, lastValueVisible: false, crosshairMarkerVisible: false,
      });
    }
    overlaySeries[name].setData(c.overlays[name].map((p) => ({time: p[0] / 1000, value: p[1]})));
  });
  const style = {
    entry: (m) => ({position: m.side === "short" ? "aboveBar" : "belowBar", color: GREEN,
                    shape: m.side === "short" ? "arrowDown" : "arrowUp"}),
    exit: (m) => ({position: m.side === "short" ? "belowBar" : "aboveBar", color: LINE,
                   shape: m.side === "short" ? "arrowUp" : "arrowDown"}),
    stop: () => ({position: "aboveBar", color: RED, shape: "square"}),
  };
  candles.setMarkers(c.marks.map((m) => ({time: m.ts / 1000, text: m.text, ...style[m.kind](m)})));
  positionLines.forEach((l) => candles.removePriceLine(l));
  positionLines = [];
  const p = c.position;
  if (p) {
    positionLines.push(candles.createPriceLine({price: p.entry_price, color: DIM, lineStyle: 2, title: "entry"}));
    if (p.stop_price !== null) positionLines.push(candles.createPriceLine({price: p.stop_price, color: RED, lineStyle: 2, title: "stop"}));
    if (p.take_profit !== null) positionLines.push(candles.createPriceLine({price: p.take_profit, color: GREEN, lineStyle: 2, title: "target"}));
  }
  if (shownPair !== c.pair) { priceChart.timeScale().fitContent(); shownPair = c.pair; }
  // What the chart holds, read back from the series, for tests and scripts.
  const box = $("price-chart");
  box.dataset.pair = c.pair;
  box.dataset.candles = String(candles.data().length);
  box.dataset.overlays = Object.keys(overlaySeries).join(",");
  box.dataset.markers = JSON.stringify(candles.markers().map((m) => [m.time, m.shape, m.text]));
  $("price-info").textContent = c.candles.length ? c.timeframe + " · last " + px(c.candles[c.candles.length - 1][4]) : "no candles yet";
}

// -- Equity and drawdown --
const equityChart = LWC.createChart($("equity-chart"), {...chartOptions(), leftPriceScale: {visible: true, borderColor: GRID}});
const equityLine = equityChart.addAreaSeries({lineColor: LINE, topColor: "rgba(79,195,247,0.35)", bottomColor: "rgba(79,195,247,0.02)", lineWidth: 2});
const drawdownBars = equityChart.addHistogramSeries({priceScaleId: "left", color: "rgba(239,83,80,0.5)", priceFormat: {type: "percent", precision: 2}});
equityChart.priceScale("left").applyOptions({scaleMargins: {top: 0.65, bottom: 0}});
equityChart.priceScale("right").applyOptions({scaleMargins: {top: 0.05, bottom: 0.3}});
let equityFitted = false;
// The stretches a circuit breaker held trading back, shaded behind the curve.
const SPAN_COLOURS = {reduced: "rgba(212,167,44,0.18)", reducing: "rgba(225,111,36,0.22)",
                      halted: "rgba(239,83,80,0.25)", flatten: "rgba(130,80,223,0.28)"};
const spanBars = equityChart.addHistogramSeries({priceScaleId: "spans", priceLineVisible: false, lastValueVisible: false});
equityChart.priceScale("spans").applyOptions({scaleMargins: {top: 0, bottom: 0}, visible: false});
let breakerHistory = [];
function drawEquity(d) {
  const points = [], dd = [];
  let peak = -Infinity, last = -Infinity;
  for (const [t, v] of d.points) {
    if (v === null || t / 1000 <= last) continue;
    last = t / 1000; peak = Math.max(peak, v);
    points.push({time: last, value: v});
    dd.push({time: last, value: peak > 0 ? -(peak - v) / peak * 100 : 0});
  }
  equityLine.setData(points);
  drawdownBars.setData(dd);
  const history = breakerHistory.slice().sort((a, b) => a.ts - b.ts);
  let at = -1, state = "normal";
  const spans = [];
  for (const p of points) {
    while (at + 1 < history.length && history[at + 1].ts / 1000 <= p.time) { at++; state = history[at].to; }
    if (SPAN_COLOURS[state]) spans.push({time: p.time, value: 1, color: SPAN_COLOURS[state]});
    else spans.push({time: p.time});  // whitespace: nothing drawn
  }
  spanBars.setData(spans);
  $("equity-chart").dataset.shaded = String(spans.filter((p) => p.value !== undefined).length);
  if (!equityFitted && points.length > 1) { equityChart.timeScale().fitContent(); equityFitted = true; }
  $("equity-chart").dataset.points = String(equityLine.data().length);
  const worst = dd.reduce((a, p) => Math.min(a, p.value), 0);
  $("equity-info").textContent = "max drawdown " + num(-worst, 2) + "%";
}

// -- Depth (a ladder, not a time series: drawn on its own canvas) --
function drawDepth(d) {
  const c = $("depth-chart"), dpr = window.devicePixelRatio || 1, w = c.clientWidth, h = c.clientHeight;
  c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.clearRect(0, 0, w, h);
  ctx.font = "12px DejaVu Sans, sans-serif"; ctx.fillStyle = DIM;
  if (!d || (!d.bids.length && !d.asks.length)) { ctx.fillText("no order book (replay feeds have none)", 12, 20); return; }
  const all = d.bids.concat(d.asks), prices = all.map((l) => l[0]);
  const pad = Math.max((Math.max(...prices) - Math.min(...prices)) * 0.08, 1e-9);
  const lo = Math.min(...prices) - pad, hi = Math.max(...prices) + pad;
  const top = Math.max(...all.map((l) => l[2])) * 1.05 || 1;
  const x = (p) => 8 + (p - lo) / (hi - lo) * (w - 16), y = (q) => h - 20 - q / top * (h - 30);
  const side = (levels, colour, edge) => {
    if (!levels.length) return;
    ctx.beginPath(); ctx.moveTo(x(levels[0][0]), y(0));
    let prev = 0;
    for (const [p, , cum] of levels) { ctx.lineTo(x(p), y(prev)); ctx.lineTo(x(p), y(cum)); prev = cum; }
    ctx.lineTo(x(edge), y(prev)); ctx.lineTo(x(edge), y(0)); ctx.closePath();
    ctx.globalAlpha = 0.35; ctx.fillStyle = colour; ctx.fill();
    ctx.globalAlpha = 1; ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.stroke();
  };
  side(d.bids, GREEN, lo); side(d.asks, RED, hi);
  ctx.fillStyle = DIM; ctx.textAlign = "left"; ctx.fillText(px(lo), 8, h - 4);
  ctx.textAlign = "right"; ctx.fillText(px(hi), w - 8, h - 4);
  $("depth-info").textContent = d.mid === null ? "" : "mid " + px(d.mid) + " · spread " + num(d.spread_bps, 1) + " bps";
}

// -- Panels --
function upnl(p) {
  return p.mark_price === null ? 0 : (p.mark_price - p.entry_price) * p.qty * (p.side === "long" ? 1 : -1);
}
function extra(s, key) {
  if (s[key] !== undefined && s[key] !== null) return s[key];
  if (s.risk && s.risk[key] !== undefined) return s.risk[key];
  return undefined;
}
function keyValues(id, obj, empty) {
  const rows = Object.entries(obj || {}).map(([k, v]) => [k, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)]);
  table(id, ["", ""], rows, empty);
}
function showPanels(s) {
  const markets = s.markets || {};
  const pairs = s.pairs.length ? s.pairs : Object.keys(markets);
  table("pairs", ["pair", "last", "24h"], pairs.map((p) => {
    const m = markets[p] || {};
    const a = document.createElement("a"); a.href = "#"; a.textContent = p; a.dataset.pair = p;
    if (p === pair) a.className = "sel";
    return [a, px(m.last), m.change === undefined || m.change === null ? "-" : signed(m.change * 100, 2, "%")];
  }), "no pairs");
  table("positions-table", ["pair", "side", "qty", "entry", "mark", "uPnL", "stop"], s.portfolio.positions.map((p) => [
    p.pair, p.side, num(p.qty, 4), px(p.entry_price), px(p.mark_price), signed(upnl(p), 2), px(p.stop_price),
  ]), "no open positions");
  const trades = (s.recent_trades || []).slice().sort((a, b) => b.exit_ts - a.exit_ts).slice(0, 12);
  table("trades-table", ["exit", "pair", "side", "entry", "exit px", "PnL", "why"], trades.map((t) => [
    day(t.exit_ts), t.pair, t.side, px(t.entry_price), px(t.exit_price), signed(t.pnl, 2),
    (t.reason || "").split(" for ")[0],
  ]), "no closed trades yet");
  const ranking = extra(s, "ranking");
  if (Array.isArray(ranking) && ranking.length) {
    table("ranking", ["#", "strategy", "score", "lower bound", "trades"], ranking.map((r, i) => [
      String(i + 1), r.name, num(r.total, 3), num(r.lcb, 3), String(r.trades),
    ]), "none yet");
  } else {
    table("ranking", ["strategy", "score"], Object.entries(s.scores || {}).sort((a, b) => b[1] - a[1]).map(([k, v]) => [k, num(v, 3)]), "none yet");
  }
  const r = s.risk || {};
  const risk = [["trading", s.trading_state], ["exposure", num((r.exposure || 0) * 100, 1) + "%"],
                ["drawdown", num((r.drawdown || 0) * 100, 2) + "%"], ["day loss", num((r.day_loss || 0) * 100, 2) + "%"],
                ["losses in a row", String(r.consecutive_losses ?? "-")]];
  for (const [name, state] of Object.entries(r.circuit_breakers || {})) risk.push(["breaker " + name, state]);
  for (const [name, t] of Object.entries(r.latched || {})) risk.push(["latched " + name, t.state + ": " + t.reason]);
  if ((s.late_streams || []).length) risk.push(["late streams", s.late_streams.join(", ") + " (decided alone)"]);
  table("risk-table", ["", ""], risk, "");
  breakerHistory = r.breaker_history || [];
  const history = breakerHistory.slice().reverse();
  table("breaker-history", ["time", "rule", "to", "reason"], history.map((h) => [day(h.ts), h.trigger, h.to, h.reason]), "no breaker has tripped");
  keyValues("model-table", s.model, "none yet");
  const anomalies = extra(s, "anomalies");
  const list = Array.isArray(anomalies) ? anomalies.map((a, i) => [typeof a === "object" ? (a.pair || String(i)) : String(i), typeof a === "object" ? JSON.stringify(a) : String(a)])
    : Object.entries(anomalies || {}).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]);
  table("anomalies", ["", ""], list, "none yet");
  $("errors").textContent = s.errors.length ? s.errors.slice(-5).join("\n") : "no errors";
  return pairs;
}
function showStatus(s) {
  $("mode").textContent = s.mode.toUpperCase();
  $("mode").className = "badge " + (s.mode === "live" ? "live" : "sim");
  $("state").textContent = s.state;
  $("trading").textContent = s.trading_state;
  $("equity").textContent = num(s.portfolio.equity, 2);
  const pnl = Number(s.portfolio.realised_pnl) + s.portfolio.positions.reduce((a, p) => a + upnl(p), 0);
  $("pnl").replaceChildren(signed(pnl, 2));
  $("positions").textContent = s.portfolio.positions.length;
  const pairs = showPanels(s);
  const sel = $("pair");
  if (sel.options.length !== pairs.length || pairs.some((p, i) => sel.options[i].value !== p)) {
    sel.replaceChildren(...pairs.map((p) => new Option(p, p)));
  }
  if (!pairs.includes(pair)) pair = pairs.length ? pairs[0] : null;
  sel.value = pair || "";
}
async function showReports() {
  try {
    const found = await getJSON("/api/reports");
    $("reports").replaceChildren(...found.reports.map((r) => {
      const a = document.createElement("a"); a.href = "#"; a.textContent = r.name; a.dataset.report = r.name;
      const li = document.createElement("li"); li.append(a, " ", Object.assign(document.createElement("span"), {className: "dim", textContent: day(r.modified)}));
      return li;
    }));
    if (!found.reports.length) $("reports").textContent = "none yet (backtest --report-html, optimise)";
  } catch (e) { $("reports").textContent = String(e); }
}
async function openReport(name) {
  const r = await fetch("/reports/" + encodeURIComponent(name), {headers: auth});
  if (!r.ok) { $("note").textContent = "report: HTTP " + r.status; return; }
  window.open(URL.createObjectURL(await r.blob()), "_blank", "noopener");
}

async function tick() {
  try {
    const s = await getJSON("/api/snapshot?exclude=" + LIGHT);
    showStatus(s);
    const width = Math.max(100, Math.floor($("equity-chart").clientWidth));
    const q = pair ? encodeURIComponent(pair) : null;
    const [eq, chart, depth, found] = await Promise.all([
      getJSON("/api/equity?points=" + width),
      q ? getJSON("/api/chart/" + q + "?limit=300").catch(() => null) : null,
      q ? getJSON("/api/depth/" + q).catch(() => null) : null,
      q ? getJSON("/api/patterns/" + q).catch(() => null) : null,
    ]);
    drawEquity(eq);
    if (chart) drawPrice(chart);
    drawDepth(depth);
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
$("pairs").addEventListener("click", (e) => {
  if (e.target.dataset && e.target.dataset.pair) { e.preventDefault(); pair = e.target.dataset.pair; tick(); }
});
$("reports").addEventListener("click", (e) => {
  if (e.target.dataset && e.target.dataset.report) { e.preventDefault(); openReport(e.target.dataset.report); }
});
$("pause").addEventListener("click", () => command("/api/pause"));
$("resume").addEventListener("click", () => command("/api/resume"));
$("resetrisk").addEventListener("click", () => {
  if (confirm("Reset risk? Latched circuit breakers are lifted.")) command("/api/resetrisk");
});
tick();
showReports();
setInterval(tick, 1000);
setInterval(showReports, 30000);
