"""The optimiser's self-contained HTML report: front, folds, stitched curve, sensitivity.

One file with inline SVG and CSS: no script, no CDN, nothing fetched, so it opens the same
on an air-gapped machine and in a mail attachment. Built from the JSON document
`--mode optimize` writes (`render_html(document)`), so the two never disagree. Part of
`parameter_optimization`, which re-exports it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final


WIDTH: Final = 640
HEIGHT: Final = 300
PAD: Final = 44

STYLE: Final = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}.bad{color:#b00020;font-weight:600}
.good{color:#11702c;font-weight:600}svg{background:#fcfcfc;border:1px solid #eee;margin:.3em}
.note{color:#555;font-size:.9em}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return html.escape(str(value))


def _scale(values: Sequence[float], lo_px: float, hi_px: float) -> Any:
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5

    def to_px(v: float) -> float:
        return lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px)

    return to_px, lo, hi


def _frame(
    title: str,
    x_label: str,
    y_label: str,
    body: str,
    ranges: tuple[float, ...],
    x_format: Any = None,
) -> str:
    x_lo, x_hi, y_lo, y_hi = ranges
    fmt_x = x_format or (lambda v: _fmt(v, 3))
    x_text = "" if x_lo == x_hi else f" ({fmt_x(x_lo)} \u2192 {fmt_x(x_hi)})"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{html.escape(title)}">'
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}'
        "</text>"
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 10}" y2="{HEIGHT - PAD}" '
        'stroke="#888"/>'
        f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#888"/>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" text-anchor="middle" font-size="11">'
        f"{html.escape(x_label)}{x_text}</text>"
        f'<text x="12" y="{HEIGHT / 2}" font-size="11" transform="rotate(-90 12 {HEIGHT / 2})" '
        f'text-anchor="middle">{html.escape(y_label)} ({_fmt(y_lo, 3)} \u2192 {_fmt(y_hi, 3)})'
        f"</text>{body}</svg>"
    )


def scatter_svg(
    title: str,
    points: Sequence[tuple[float, float]],
    *,
    x_label: str,
    y_label: str,
    highlight: int | None = None,
) -> str:
    """Return an SVG scatter plot; the `highlight` point is drawn larger, in red."""
    fx, x_lo, x_hi = _scale([p[0] for p in points], PAD + 6, WIDTH - 16)
    fy, y_lo, y_hi = _scale([p[1] for p in points], HEIGHT - PAD - 6, 30)
    dots = "".join(
        f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="{6 if i == highlight else 3.5}" '
        f'fill="{"#d62728" if i == highlight else "#1f77b4"}" fill-opacity="0.8"/>'
        for i, (x, y) in enumerate(points)
        if math.isfinite(x) and math.isfinite(y)
    )
    return _frame(title, x_label, y_label, dots, (x_lo, x_hi, y_lo, y_hi))


def line_svg(
    title: str,
    points: Sequence[tuple[float, float | None]],
    *,
    x_label: str,
    y_label: str,
    x_format: Any = None,
    marker: float | None = None,
) -> str:
    """Return an SVG line chart (gaps where y is None), with a dashed line at `marker`."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points if p[1] is not None]
    fx, x_lo, x_hi = _scale(xs, PAD + 4, WIDTH - 14)
    fy, y_lo, y_hi = _scale(ys, HEIGHT - PAD - 4, 30)
    segments: list[list[str]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y):
            segments.append([])
        else:
            segments[-1].append(f"{fx(x):.1f},{fy(y):.1f}")
    body = "".join(
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.6" points="{" ".join(s)}"/>'
        for s in segments
        if s
    )
    if marker is not None and math.isfinite(marker):
        body += (
            f'<line x1="{fx(marker):.1f}" y1="28" x2="{fx(marker):.1f}" y2="{HEIGHT - PAD}" '
            'stroke="#d62728" stroke-dasharray="4 3"/>'
        )
    return _frame(title, x_label, y_label, body, (x_lo, x_hi, y_lo, y_hi), x_format)


def _date(ms: float) -> str:
    from datetime import UTC, datetime

    return f"{datetime.fromtimestamp(ms / 1000, tz=UTC):%Y-%m-%d %H:%M}"


def bars_svg(title: str, groups: Sequence[tuple[str, float | None, float | None]]) -> str:
    """Return paired bars (in sample blue, out of sample orange) per fold, around zero."""
    values = [v for _, a, b in groups for v in (a, b) if v is not None and math.isfinite(v)]
    fy, y_lo, y_hi = _scale([*values, 0.0], HEIGHT - PAD - 4, 30)
    slot = (WIDTH - PAD - 20) / max(1, len(groups))
    zero = fy(0.0)
    body = [f'<line x1="{PAD}" y1="{zero:.1f}" x2="{WIDTH - 10}" y2="{zero:.1f}" stroke="#aaa"/>']
    for i, (label, a, b) in enumerate(groups):
        left = PAD + 6 + i * slot
        for j, (v, colour) in enumerate(((a, "#1f77b4"), (b, "#ff7f0e"))):
            if v is None or not math.isfinite(v):
                continue
            top, bottom = sorted((fy(v), zero))
            body.append(
                f'<rect x="{left + j * slot * 0.4:.1f}" y="{top:.1f}" width="{slot * 0.38:.1f}" '
                f'height="{max(bottom - top, 0.5):.1f}" fill="{colour}"/>'
            )
        body.append(
            f'<text x="{left + slot * 0.4:.1f}" y="{HEIGHT - PAD + 14}" font-size="10" '
            f'text-anchor="middle">{html.escape(label)}</text>'
        )
    return _frame(
        title,
        "fold (blue in sample, orange out of sample)",
        "score",
        "".join(body),
        (0, 0, y_lo, y_hi),
    )


def heatmap_svg(
    title: str,
    x_values: Sequence[float],
    y_values: Sequence[float],
    scores: Sequence[Sequence[float | None]],
    *,
    x_label: str,
    y_label: str,
) -> str:
    """Return an SVG heatmap (red low, green high, grey where a point could not be scored)."""
    flat = [v for row in scores for v in row if v is not None and math.isfinite(v)]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    span = hi - lo or 1.0
    cols, rows = max(1, len(x_values)), max(1, len(y_values))
    w, h = (WIDTH - PAD - 20) / cols, (HEIGHT - PAD - 34) / rows
    cells = []
    for r, row in enumerate(scores):
        for c, v in enumerate(row):
            if v is None or not math.isfinite(v):
                colour = "#cccccc"
            else:
                t = (v - lo) / span
                colour = f"rgb({int(220 * (1 - t))},{int(60 + 160 * t)},60)"
            y = HEIGHT - PAD - (r + 1) * h
            cells.append(
                f'<rect x="{PAD + 2 + c * w:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{x_label}={_fmt(x_values[c])} '
                f"{y_label}={_fmt(y_values[r])}: {_fmt(v)}</title></rect>"
            )
    x_range = (min(x_values), max(x_values)) if x_values else (0.0, 0.0)
    y_range = (min(y_values), max(y_values)) if y_values else (0.0, 0.0)
    return _frame(title, x_label, y_label, "".join(cells), (*x_range, *y_range))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _params(params: Mapping[str, float] | None) -> str:
    if not params:
        return "-"
    return html.escape(" ".join(f"{k}={v:g}" for k, v in params.items()))


def _front_section(doc: Mapping[str, Any]) -> str:
    front = doc.get("pareto") or []
    best = doc.get("best") or {}
    if not front:
        return "<h2>Pareto front</h2><p>No feasible candidate.</p>"
    chosen = next((i for i, t in enumerate(front) if t["params"] == best.get("params")), None)
    points = [(t["objectives"]["drawdown"], t["objectives"]["return"]) for t in front]
    rows = [
        [_params(t["params"]), *(_fmt(v) for v in t["objectives"].values()), _fmt(t["score"])]
        for t in front
    ]
    names = list(front[0]["objectives"])
    return (
        "<h2>Pareto front</h2>"
        + scatter_svg(
            "return against drawdown (red: chosen)",
            points,
            x_label="max drawdown",
            y_label="total return",
            highlight=chosen,
        )
        + _table(["params", *names, "score"], rows)
    )


def _walk_forward_section(doc: Mapping[str, Any]) -> str:
    wf = doc.get("walk_forward")
    if not wf:
        return "<h2>Walk-forward</h2><p>No walk-forward windows (too few candles).</p>"
    verdict = wf.get("verdict")
    cls = "good" if verdict == "robust" else "bad"
    rows = []
    for f in wf["folds"]:
        ins, oos = f.get("in_sample") or {}, f.get("out_of_sample") or {}
        rows.append(
            [
                f["index"],
                _params(f.get("params")),
                _fmt(ins.get("score")),
                _fmt(oos.get("score")),
                _fmt((oos.get("objectives") or {}).get("return")),
                '<span class="bad">yes</span>' if f.get("degraded") else "no",
            ]
        )
    curve = [(float(ts), float(eq)) for ts, eq in wf.get("stitched") or []]
    chart = (
        line_svg(
            "stitched out-of-sample equity",
            curve,
            x_label="time (UTC)",
            y_label="equity",
            x_format=_date,
        )
        if len(curve) > 1
        else ""
    )
    bars = bars_svg(
        "score per fold",
        [
            (
                str(f["index"]),
                (f.get("in_sample") or {}).get("score"),
                (f.get("out_of_sample") or {}).get("score"),
            )
            for f in wf["folds"]
        ],
    )
    return (
        "<h2>Walk-forward</h2>"
        f'<p class="{cls}">{html.escape(str(verdict))}: {html.escape(wf.get("message", ""))}</p>'
        f"<p>walk-forward efficiency {_fmt(wf.get('efficiency'))}</p>"
        + _table(["fold", "params", "in sample", "out of sample", "OOS return", "degraded"], rows)
        + bars
        + chart
    )


def _overfitting_section(doc: Mapping[str, Any]) -> str:
    of = doc.get("overfitting") or {}
    gate = doc.get("gate") or {}
    rows = [[html.escape(k), _fmt(v)] for k, v in of.items()]
    checks = [
        [
            html.escape(name),
            _fmt(c.get("value")),
            html.escape(str(c.get("rule"))),
            '<span class="good">pass</span>'
            if c.get("passed")
            else '<span class="bad">fail</span>',
        ]
        for name, c in (gate.get("checks") or {}).items()
    ]
    approved = doc.get("approved")
    verdict = (
        f'<p class="good">approved: {html.escape(str(approved.get("path")))}'
        f"{' (FORCED)' if approved.get('forced') else ''}</p>"
        if approved
        else '<p class="bad">not approved: sim and live keep their current parameters</p>'
    )
    return (
        "<h2>Overfitting and the gate</h2>"
        + _table(["estimate", "value"], rows)
        + _table(["criterion", "value", "rule", "verdict"], checks)
        + verdict
    )


def _sensitivity_section(doc: Mapping[str, Any]) -> str:
    sens = doc.get("sensitivity")
    if not sens:
        return ""
    parts = ["<h2>Sensitivity</h2>"]
    edge = sens.get("knife_edge")
    parts.append(
        f'<p class="{"bad" if edge else "good"}">'
        f"{'knife-edge optimum' if edge else 'plateau'}: neighbours keep "
        f"{_fmt(sens.get('retained'), 3)} of the chosen score</p>"
    )
    morris = sens.get("morris") or {}
    parts.append(
        _table(
            ["parameter", "mu*", "sigma"],
            [[html.escape(k), _fmt(v["mu_star"]), _fmt(v["sigma"])] for k, v in morris.items()],
        )
    )
    for name, points in (sens.get("curves") or {}).items():
        parts.append(
            line_svg(
                f"score along {name} (red: chosen)",
                [(float(x), y) for x, y in points],
                x_label=name,
                y_label="score",
                marker=(sens.get("params") or {}).get(name),
            )
        )
    for h in sens.get("heatmaps") or []:
        parts.append(
            heatmap_svg(
                f"score over {h['y']} x {h['x']}",
                h["x_values"],
                h["y_values"],
                h["scores"],
                x_label=h["x"],
                y_label=h["y"],
            )
        )
    return "".join(parts)


def render_html(doc: Mapping[str, Any]) -> str:
    """Return the self-contained HTML report of an optimisation document."""
    title = f"Kestrel optimisation: {doc.get('strategy')} {doc.get('timeframe')}"
    best = doc.get("best") or {}
    head = (
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="note">pairs {html.escape(", ".join(doc.get("pairs") or []))}; '
        f"created {html.escape(str(doc.get('created')))}; stopped {_fmt(doc.get('stopped'))}; "
        f"{_fmt((doc.get('search') or {}).get('evaluated'))} backtests</p>"
        f"<p>chosen: <b>{_params(best.get('params'))}</b> score {_fmt(best.get('score'))}</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + head
        + _front_section(doc)
        + _walk_forward_section(doc)
        + _overfitting_section(doc)
        + _sensitivity_section(doc)
        + "</body></html>"
    )
