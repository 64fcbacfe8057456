"""The plan report: one self-contained HTML page that shows what a plan decided and why.

``render_report(plan)`` returns the page as a string: inline SVG charts drawn here (no JavaScript,
no fonts, images or scripts from the network), so the file opens anywhere, offline. The page has

- bits per layer along the model's depth, coloured by format (``chart-bits``);
- a layer x format heatmap of log10 sensitivity, dropped or missing cells marked (``chart-sensitivity``);
- predicted latency per layer, the chosen format against unquantized (``chart-latency``);
- the budget curve: total score and predicted latency of the plan re-solved with
  ``autoq.resolve`` for budgets from the smallest feasible to 16 bits (``chart-budget``);
- the search's stage times (``chart-stages``), settings and hardware; dropped formats with their
  reasons; the plan's totals and notes; and a per-layer table.

Every piece of text from the plan goes through ``html.escape``. Colours per format come from
``FORMAT_COLOURS`` (unknown formats take the next colour of ``FALLBACK_COLOURS``).
"""

from __future__ import annotations

import html
import math
import re
import time
from dataclasses import dataclass

from autoq.plan import Plan

FORMAT_COLOURS: dict[str, str] = {
    "none": "#9e9e9e",
    "int8_dynamic": "#1f5fa8",
    "int8_weight_only": "#6fa8dc",
    "int4_g32": "#b45f06",
    "int4_g64": "#e69138",
    "int4_g128": "#f6c26b",
    "fp8_e4m3_dynamic": "#674ea7",
    "fp8_e4m3_weight_only": "#b4a7d6",
    "int4_sym_g32": "#38761d",  # the symmetric int4 names issue 13 proposes
    "int4_sym_g64": "#6aa84f",
    "int4_sym_g128": "#b6d7a8",
}
FALLBACK_COLOURS = ("#a64d79", "#45818e", "#cc0000", "#bf9000", "#4c1130", "#134f5c")
# Sequential scale for log sensitivity, low to high (viridis stops).
HEAT_STOPS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")
ZERO_CELL = "#f7f7f7"
MISSING_CELL = "#e0e0e0"

BUDGET_POINTS = 16  # budgets sampled for the budget curve (each one integer program solve)
CURVE_SECONDS = 5.0  # no new budget-curve solve (past the two ends) starts after this
MAX_BITS = 16.0
WIDTH = 1240  # px, every chart
FONT = 12

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
       max-width: 1280px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin: 28px 0 6px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
p.caption { color: #555; margin: 2px 0 8px; font-size: 13px; }
.meta { color: #555; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .value { font-size: 19px; font-weight: 600; }
.card .label { font-size: 12px; color: #666; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 12px; margin: 4px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px;
          border: 1px solid #999; }
svg { display: block; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
ul.notes li { font-size: 13px; }
"""


def e(text: object) -> str:
    """Escape any value for HTML text and attribute values."""
    return html.escape(str(text), quote=True)


# ------------------------------------------------------------------------------ colours


def format_colours(formats: list[str]) -> dict[str, str]:
    """One colour per format: from ``FORMAT_COLOURS``, else the next fallback colour."""
    colours = {}
    spare = iter(FALLBACK_COLOURS * (len(formats) // len(FALLBACK_COLOURS) + 1))
    for fmt in formats:
        colours[fmt] = FORMAT_COLOURS.get(fmt) or next(spare)
    return colours


def heat_colour(t: float) -> str:
    """Colour at ``t`` in [0, 1] on ``HEAT_STOPS``, linearly interpolated."""
    t = min(max(t, 0.0), 1.0) * (len(HEAT_STOPS) - 1)
    i = min(int(t), len(HEAT_STOPS) - 2)
    a, b = _rgb(HEAT_STOPS[i]), _rgb(HEAT_STOPS[i + 1])
    f = t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b, strict=True))


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


# ---------------------------------------------------------------------------- SVG helpers


def svg_open(chart_id: str, width: float, height: float, label: str) -> str:
    return (f'<svg id="{e(chart_id)}" width="{width:.0f}" '
            f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
            f'aria-label="{e(label)}">')


def rect(x: float, y: float, w: float, h: float, fill: str, title: str = "", extra: str = "") -> str:
    tip = f"<title>{e(title)}</title>" if title else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
            f'fill="{fill}"{extra}>{tip}</rect>')


def line(x1: float, y1: float, x2: float, y2: float, stroke: str = "#999", extra: str = "") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{extra}/>'


def text(x: float, y: float, content: object, anchor: str = "start", size: int = FONT,
         extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{e(content)}</text>")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values from at most ``lo`` to at least ``hi``."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    value = math.floor(lo / step) * step
    ticks = [round(value, 12)]
    while ticks[-1] < hi - step * 1e-9:
        value += step
        ticks.append(round(value, 12))
    return ticks


def number(value: float) -> str:
    """Compact, readable number for labels."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2g}"


def shorten(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters, keeping its end (the most specific part)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def legend(colours: dict[str, str], used: list[str]) -> str:
    items = "".join(f'<span><span class="swatch" style="background:{colours[f]}"></span>{e(f)}</span>'
                    for f in used)
    return f'<div class="legend">{items}</div>'


# ------------------------------------------------------------------------- depth axis


@dataclass
class Band:
    start: int  # first layer index
    stop: int  # one past the last
    label: str


def depth_bands(names: list[str]) -> list[Band]:
    """Consecutive layers of the same block (the name up to its first number, e.g.
    ``encoder.layer.3``) as one band labelled ``layer 3``; a name with no number is its own band."""
    bands: list[Band] = []
    previous_key = None
    for i, name in enumerate(names):
        found = re.match(r"^(?:(.*?)\.)?([A-Za-z_]*)\.?(\d+)(?=\.|$)", name)
        if found:
            key = found.group(0)
            label = f"{found.group(2)} {found.group(3)}".strip()
        else:
            key = name
            label = name if len(name) <= 16 else name[:15] + "…"
        if bands and key == previous_key:
            bands[-1].stop = i + 1
        else:
            bands.append(Band(i, i + 1, label))
        previous_key = key
    return bands


def depth_axis(names: list[str], x0: float, slot: float, top: float, bottom: float) -> str:
    """Alternately shaded block bands behind a chart plotted along depth, labelled below it
    (a label is skipped where it would overlap the previous one)."""
    parts = []
    last_end = -1e9
    for k, band in enumerate(depth_bands(names)):
        left, width = x0 + band.start * slot, (band.stop - band.start) * slot
        if k % 2 == 0:
            parts.append(rect(left, top, width, bottom - top, "#f3f3f3"))
        half = len(band.label) * FONT * 0.3
        centre = min(left + width / 2, WIDTH - half - 2)  # the last label stays inside the chart
        if centre - half > last_end + 6:
            parts.append(text(centre, bottom + 15, band.label, "middle", 11, ' fill="#444"'))
            last_end = centre + half
    return "".join(parts)


# ---------------------------------------------------------------------------------- charts


PLOT_LEFT = 64  # px reserved for the y axis of depth charts
PLOT_RIGHT = 16


def chart_bits(plan: Plan, colours: dict[str, str]) -> str:
    """Bars: storage bits of each layer's chosen format, in model order, coloured by format."""
    names = list(plan.layers)
    top, plot_h = 26, 220
    bottom = top + plot_h
    slot = (WIDTH - PLOT_LEFT - PLOT_RIGHT) / len(names)
    gap = 0.15 * slot if slot >= 4 else 0.0
    parts = [svg_open("chart-bits", WIDTH, bottom + 44, "bits per layer along the model's depth"),
             depth_axis(names, PLOT_LEFT, slot, top, bottom)]
    for tick in (0, 4, 8, 12, 16):
        y = bottom - tick / MAX_BITS * plot_h
        parts.append(line(PLOT_LEFT, y, WIDTH - PLOT_RIGHT, y, "#ccc"))
        parts.append(text(PLOT_LEFT - 6, y + 4, tick, "end"))
    for i, (name, layer) in enumerate(plan.layers.items()):
        bits = layer.bits[layer.format]
        h = bits / MAX_BITS * plot_h
        parts.append(rect(PLOT_LEFT + i * slot + gap / 2, bottom - h, slot - gap, h, colours[layer.format],
                          f"{name}: {layer.format}, {bits:.3f} bits"))
    y = bottom - plan.totals.effective_bits / MAX_BITS * plot_h
    parts.append(line(PLOT_LEFT, y, WIDTH - PLOT_RIGHT, y, "#c00", ' stroke-dasharray="6 4" stroke-width="1.5"'))
    parts.append(line(WIDTH - PLOT_RIGHT - 180, top - 12, WIDTH - PLOT_RIGHT - 150, top - 12, "#c00",
                      ' stroke-dasharray="6 4" stroke-width="1.5"'))
    parts.append(text(WIDTH - PLOT_RIGHT - 144, top - 8, f"effective {plan.totals.effective_bits:.3f} bits", "start",
                      11, ' fill="#c00" font-weight="600"'))
    parts.append(line(PLOT_LEFT, bottom, WIDTH - PLOT_RIGHT, bottom, "#333"))
    parts.append(text(16, top + plot_h / 2, "bits / weight", "middle", 12,
                      f' transform="rotate(-90 16 {top + plot_h / 2:.1f})"'))
    parts.append(text(PLOT_LEFT, bottom + 36, f"{len(names)} layers in model order (hover a bar for its name)",
                      "start", 11, ' fill="#666"'))
    parts.append("</svg>")
    return "".join(parts)


def chart_sensitivity(plan: Plan) -> str:
    """Heatmap, one row per layer and one column per format: log10 of the sensitivity; zero
    scores white, dropped or missing cells grey with a cross; the chosen format outlined."""
    names = list(plan.layers)
    fmts = list(plan.formats)
    positive = [s for layer in plan.layers.values() for s in layer.sensitivity.values() if s > 0]
    lo = math.log10(min(positive)) if positive else 0.0
    hi = math.log10(max(positive)) if positive else 1.0
    span = hi - lo if hi > lo else 1.0
    label_w = min(330, 14 + 6.6 * max(len(n) for n in names))
    max_chars = int((label_w - 10) / 6.3)
    row_h = max(3.0, min(16.0, 1400 / len(names)))
    col_w = min(120.0, (WIDTH - label_w - 190) / len(fmts))
    stagger = any(len(fmt) * 6.5 > col_w - 6 for fmt in fmts)  # long names: two rows of headers
    top = 48 if stagger else 34
    height = top + row_h * len(names) + 12
    scale_bottom = top + 240  # the colour bar and its keys (see _heat_scale)
    parts = [svg_open("chart-sensitivity", WIDTH, max(height, scale_bottom), "layer by format heatmap of log sensitivity")]
    for j, fmt in enumerate(fmts):
        y = top - 24 if stagger and j % 2 else top - 8
        parts.append(text(label_w + (j + 0.5) * col_w, y, fmt, "middle", 11))
    label_every = max(1, math.ceil(11 / row_h))
    for i, (name, layer) in enumerate(plan.layers.items()):
        y = top + i * row_h
        if i % label_every == 0:
            parts.append(text(label_w - 6, y + row_h / 2 + 4, shorten(name, max_chars), "end",
                              11 if row_h >= 12 else 9))
        for j, fmt in enumerate(fmts):
            x = label_w + j * col_w
            parts.append(_heat_cell(name, layer.sensitivity.get(fmt), layer.dropped.get(fmt), fmt,
                                    x, y, col_w, row_h, lo, span, fmt == layer.format))
    parts.append(_heat_scale(label_w + len(fmts) * col_w + 36, top, lo, hi))
    parts.append("</svg>")
    return "".join(parts)


def _heat_cell(name: str, score: float | None, dropped: str | None, fmt: str, x: float, y: float,
               w: float, h: float, lo: float, span: float, chosen: bool) -> str:
    """One cell; on thin rows (many layers) the chosen format is a black tick at the cell's left
    instead of an outline, which would hide the colours."""
    thin = h < 8
    outline = "" if thin else ' stroke="#000" stroke-width="2"' if chosen else ' stroke="#fff" stroke-width="0.5"'
    tick = rect(x, y, 4, h, "#000") if chosen and thin else ""
    if score is None:
        reason = dropped or "not a candidate for this layer"
        cell = rect(x, y, w, h, MISSING_CELL, f"{name} / {fmt}: dropped: {reason}", outline)
        if not thin:
            cell += line(x + 3, y + 2, x + w - 3, y + h - 2, "#888") + line(x + 3, y + h - 2, x + w - 3, y + 2, "#888")
        return cell + tick
    title = f"{name} / {fmt}: sensitivity {score:.4g}" + (" (chosen)" if chosen else "")
    if score <= 0:
        cell = rect(x, y, w, h, ZERO_CELL, title, outline)
        return cell + tick + (text(x + w / 2, y + h / 2 + 4, "0", "middle", 10, ' fill="#666"') if h >= 11 else "")
    t = (math.log10(score) - lo) / span
    cell = rect(x, y, w, h, heat_colour(t), title, outline) + tick
    if h >= 11:
        ink = "#000" if t > 0.6 else "#fff"
        cell += text(x + w / 2, y + h / 2 + 4, number(score), "middle", 10, f' fill="{ink}"')
    return cell


def _heat_scale(x: float, top: float, lo: float, hi: float) -> str:
    """Vertical colour bar with log10 tick labels, and the keys for zero and dropped cells."""
    h, steps = 160, 32
    parts = [text(x, top - 10, "log10 sensitivity", "start", 11)]
    for k in range(steps):
        t = 1 - k / (steps - 1)
        parts.append(rect(x, top + k * h / steps, 16, h / steps + 0.5, heat_colour(t)))
    for value in (hi, (lo + hi) / 2, lo):
        y = top + (hi - value) / (hi - lo if hi > lo else 1.0) * h
        parts.append(text(x + 22, y + 4, f"{value:.1f}", "start", 11))
    y = top + h + 14
    parts.append(rect(x, y, 16, 12, ZERO_CELL, "", ' stroke="#999"') + text(x + 22, y + 10, "score 0", "start", 11))
    parts.append(rect(x, y + 18, 16, 12, MISSING_CELL, "", ' stroke="#999"')
                 + line(x + 2, y + 19, x + 14, y + 29, "#888") + line(x + 2, y + 29, x + 14, y + 19, "#888")
                 + text(x + 22, y + 28, "dropped", "start", 11))
    parts.append(rect(x, y + 36, 16, 12, "#fff", "", ' stroke="#000" stroke-width="2"')
                 + text(x + 22, y + 46, "chosen", "start", 11))
    return "".join(parts)


def chart_latency(plan: Plan, colours: dict[str, str]) -> str:
    """Bars: predicted latency of each layer's chosen format (coloured by format); black ticks:
    the same layer unquantized."""
    names = list(plan.layers)
    chosen = [layer.latency.get(layer.format, 0.0) * 1e6 for layer in plan.layers.values()]
    base = [layer.latency.get("none", 0.0) * 1e6 for layer in plan.layers.values()]
    top, plot_h = 12, 220
    bottom = top + plot_h
    ticks = nice_ticks(0.0, 1.05 * max(chosen + base + [1e-9]))  # headroom: no tick on the top line
    y_max = ticks[-1] if ticks[-1] > 0 else 1.0
    slot = (WIDTH - PLOT_LEFT - PLOT_RIGHT) / len(names)
    gap = 0.2 * slot if slot >= 4 else 0.0
    parts = [svg_open("chart-latency", WIDTH, bottom + 44, "predicted latency per layer vs unquantized"),
             depth_axis(names, PLOT_LEFT, slot, top, bottom)]
    for tick in ticks:
        y = bottom - tick / y_max * plot_h
        parts.append(line(PLOT_LEFT, y, WIDTH - PLOT_RIGHT, y, "#ccc"))
        parts.append(text(PLOT_LEFT - 6, y + 4, number(tick), "end"))
    for i, (name, layer) in enumerate(plan.layers.items()):
        x = PLOT_LEFT + i * slot
        h = chosen[i] / y_max * plot_h
        parts.append(rect(x + gap / 2, bottom - h, slot - gap, h, colours[layer.format],
                          f"{name}: {layer.format} {chosen[i]:.1f} us vs unquantized {base[i]:.1f} us"))
        y = bottom - base[i] / y_max * plot_h
        parts.append(line(x, y, x + slot, y, "#000", ' stroke-width="2"'))
    parts.append(line(PLOT_LEFT, bottom, WIDTH - PLOT_RIGHT, bottom, "#333"))
    parts.append(text(16, top + plot_h / 2, "µs / batch", "middle", 12,
                      f' transform="rotate(-90 16 {top + plot_h / 2:.1f})"'))
    parts.append(text(PLOT_LEFT, bottom + 36, "bars: chosen format; black ticks: unquantized", "start", 11,
                      ' fill="#666"'))
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- budget curve


@dataclass
class BudgetPoint:
    budget: float
    effective_bits: float
    score: float
    latency: float  # seconds per calibration batch


@dataclass
class BudgetCurve:
    points: list[BudgetPoint]  # budgets in increasing order, all feasible
    smallest: float  # the smallest feasible budget
    latency_unquantized: float
    requested: int  # budgets asked for; fewer were solved when the time ran out
    seconds: float  # spent solving


def budget_curve(plan: Plan, points: int = BUDGET_POINTS, seconds: float = CURVE_SECONDS) -> BudgetCurve:
    """The plan re-solved (``autoq.resolve``, the plan's own objective and groups) for ``points``
    budgets evenly spaced from the smallest feasible one to 16 bits.

    Budgets are solved coarse to fine (both ends, the middle, the quarters, ...) and, past the two
    ends, no new solve starts after ``seconds``: on MiniLM all 16 take about 2 s, but one exact
    solve of a plan with hundreds of layers can take tens of seconds (``solve.TIME_LIMIT_S`` per
    integer program), and then the curve is coarser rather than minutes slow."""
    from autoq import solve
    from autoq.api import resolve

    start = time.perf_counter()
    lowest = solve.smallest_budget(plan.stats().costs(), solve.group_layers(plan.layers, plan.groups))
    try:
        solved = {lowest: resolve(plan, effective_bits=lowest)}
    except solve.InfeasibleBudget as err:  # the solver keeps a hair of margin below a limit
        lowest = err.smallest
        solved = {lowest: resolve(plan, effective_bits=lowest)}
    count = max(points, 2)
    highest = max(MAX_BITS, lowest)  # a plan that can only stay unquantized needs a hair over 16
    budgets = [lowest + (highest - lowest) * k / (count - 1) for k in range(count - 1)] + [highest]
    for n, k in enumerate(coarse_to_fine(count)):
        if budgets[k] in solved:
            continue
        if n >= 2 and time.perf_counter() - start > seconds:  # both ends always
            break
        try:
            solved[budgets[k]] = resolve(plan, effective_bits=budgets[k])
        except solve.InfeasibleBudget:
            continue
    curve = [_point(budget, solved[budget]) for budget in sorted(solved)]
    return BudgetCurve(curve, lowest, plan.totals.latency_unquantized, count, time.perf_counter() - start)


def coarse_to_fine(count: int) -> list[int]:
    """Indices ``0 .. count-1`` ordered ends first, then halves, quarters, eighths, ..."""
    order: list[int] = []
    parts = 1
    while len(order) < count:
        for j in range(parts + 1):
            index = round(j * (count - 1) / parts)
            if index not in order:
                order.append(index)
        parts *= 2
    return order


def _point(budget: float, solved: Plan) -> BudgetPoint:
    t = solved.totals
    return BudgetPoint(budget, t.effective_bits, t.score, t.latency)


def chart_budget(plan: Plan, curve: BudgetCurve) -> str:
    """Two panels over the same budget axis: total score (log scale when all are positive) and
    predicted latency with the unquantized latency dashed; the plan itself as a red ring."""
    left, gap, right, h = 64, 90, 20, 250
    panel_w = (WIDTH - left - gap - right) / 2
    parts = [svg_open("chart-budget", WIDTH, h + 70, "budget curve: total score and latency per budget")]
    scores = [p.score for p in curve.points]
    log = all(s > 0 for s in scores + [plan.totals.score])
    parts.append(_budget_panel(
        left, 24, panel_w, h, curve, [p.score for p in curve.points], (plan.budget, plan.totals.score),
        "total score" + (" (log scale)" if log else ""), log, None))
    parts.append(_budget_panel(
        left + panel_w + gap, 24, panel_w, h, curve, [p.latency * 1e3 for p in curve.points],
        (plan.budget, plan.totals.latency * 1e3), "predicted latency (ms / batch)", False, curve.latency_unquantized * 1e3))
    parts.append("</svg>")
    return "".join(parts)


def _budget_panel(x0: float, y0: float, w: float, h: float, curve: BudgetCurve, values: list[float],
                  plan_point: tuple[float, float], title: str, log: bool, reference: float | None) -> str:
    lo_x, hi_x = min(math.floor(curve.smallest), MAX_BITS - 1), MAX_BITS
    everything = values + [plan_point[1]] + ([reference] if reference is not None else [])
    if log:
        lo_y = math.floor(math.log10(min(everything)))
        hi_y = math.ceil(math.log10(max(everything)))
        hi_y = hi_y if hi_y > lo_y else lo_y + 1
        y_ticks = [float(k) for k in range(lo_y, hi_y + 1)]
        transform = math.log10
    else:
        y_ticks = nice_ticks(0.0, max(everything) * 1.05 or 1.0)
        lo_y, hi_y = 0.0, y_ticks[-1]

        def transform(v: float) -> float:
            return v

    def px(bits: float) -> float:
        return x0 + (bits - lo_x) / (hi_x - lo_x) * w

    def py(value: float) -> float:
        return y0 + h - (transform(value) - lo_y) / (hi_y - lo_y) * h

    parts = [text(x0, y0 - 8, title, "start", 12, ' font-weight="600"')]
    for tick in y_ticks:
        y = y0 + h - (tick - lo_y) / (hi_y - lo_y) * h
        parts.append(line(x0, y, x0 + w, y, "#ddd"))
        parts.append(text(x0 - 6, y + 4, f"1e{tick:.0f}" if log else number(tick), "end", 11))
    for bits in range(int(lo_x), int(hi_x) + 1):
        parts.append(line(px(bits), y0 + h, px(bits), y0 + h + 4, "#333"))
        parts.append(text(px(bits), y0 + h + 17, bits, "middle", 11))
    parts.append(text(x0 + w / 2, y0 + h + 36, "budget (effective bits per weight)", "middle", 12))
    if curve.smallest > lo_x:
        parts.append(rect(x0, y0, px(curve.smallest) - x0, h, "#f1e3e3",
                          f"infeasible: below {curve.smallest:.3f} bits"))
    parts.append(line(x0, y0 + h, x0 + w, y0 + h, "#333") + line(x0, y0, x0, y0 + h, "#333"))
    if reference is not None:
        parts.append(line(x0, py(reference), x0 + w, py(reference), "#555", ' stroke-dasharray="5 4"'))
        parts.append(text(x0 + w - 4, py(reference) - 5, f"unquantized {reference:.3g}", "end", 11, ' fill="#555"'))
    path = " ".join(f"{px(p.budget):.1f},{py(v):.1f}" for p, v in zip(curve.points, values, strict=True))
    parts.append(f'<polyline points="{path}" fill="none" stroke="#1f5fa8" stroke-width="2"/>')
    for p, v in zip(curve.points, values, strict=True):
        parts.append(f'<circle cx="{px(p.budget):.1f}" cy="{py(v):.1f}" r="3.5" fill="#1f5fa8">'
                     f"<title>{e(f'budget {p.budget:.3f}: effective {p.effective_bits:.3f} bits, value {v:.4g}')}"
                     "</title></circle>")
    bits = min(max(plan_point[0], lo_x), hi_x)
    parts.append(f'<circle cx="{px(bits):.1f}" cy="{py(plan_point[1]):.1f}" r="7" fill="none" stroke="#c00" '
                 f'stroke-width="2.5"><title>{e(f"this plan: budget {plan_point[0]:g}, value {plan_point[1]:.4g}")}'
                 "</title></circle>")
    return "".join(parts)


def chart_stages(plan: Plan) -> str:
    """Horizontal bars: seconds per search stage."""
    stages = list(plan.stage_seconds.items()) or [("(no stage times recorded)", 0.0)]
    row_h, label_w, bar_w = 22, 110, 520
    longest = max(seconds for _, seconds in stages) or 1.0
    parts = [svg_open("chart-stages", label_w + bar_w + 90, row_h * len(stages) + 8, "seconds per search stage")]
    for i, (stage, seconds) in enumerate(stages):
        y = 4 + i * row_h
        w = seconds / longest * bar_w
        parts.append(text(label_w - 8, y + 15, stage, "end"))
        parts.append(rect(label_w, y + 3, w, row_h - 6, "#6fa8dc", f"{stage}: {seconds:.3f} s"))
        parts.append(text(label_w + w + 6, y + 15, f"{seconds:.2f} s"))
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- HTML parts


def table(header: list[str], rows: list[list[object]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{e(v)}</td>' if j in numeric else f"<td>{e(v)}</td>"
                         for j, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(title: str, caption: str, content: str) -> str:
    note = f'<p class="caption">{e(caption)}</p>' if caption else ""
    return f"<section><h2>{e(title)}</h2>{note}{content}</section>"


def totals_cards(plan: Plan) -> str:
    t = plan.totals
    cards = [
        (f"{t.effective_bits:.3f}", f"effective bits (budget {plan.budget:g})"),
        (f"{t.size_bytes / 2**20:.2f} MiB", f"weights, vs {t.size_bytes_unquantized / 2**20:.2f} MiB at 16 bits"),
        (f"{t.latency * 1e3:.2f} ms", f"predicted latency / batch, vs {t.latency_unquantized * 1e3:.2f} ms"),
        (f"{t.speedup:.2f}x", "predicted speedup" + (" (slower)" if t.speedup < 1 else "")),
        (f"{t.score:.4g}", "total score (summed sensitivity)"),
    ]
    items = "".join(f'<div class="card"><div class="value">{e(v)}</div><div class="label">{e(label)}</div></div>'
                    for v, label in cards)
    return f'<div class="cards">{items}</div>'


def dropped_rows(plan: Plan) -> list[list[object]]:
    """One row per (format, reason) with the layers it applies to."""
    reasons: dict[tuple[str, str], list[str]] = {}
    for name, layer in plan.layers.items():
        for fmt, reason in layer.dropped.items():
            reasons.setdefault((fmt, reason), []).append(name)
    return [[fmt, reason, len(names), ", ".join(names)] for (fmt, reason), names in reasons.items()]


def layer_rows(plan: Plan) -> list[list[object]]:
    rows = []
    for i, (name, layer) in enumerate(plan.layers.items()):
        fmt = layer.format
        rows.append([i, name, f"{layer.out_features}x{layer.in_features}", fmt, f"{layer.bits[fmt]:.3f}",
                     f"{layer.sensitivity.get(fmt, 0.0):.4g}", f"{layer.latency.get(fmt, 0.0) * 1e6:.1f}",
                     f"{layer.latency.get('none', 0.0) * 1e6:.1f}", ", ".join(layer.dropped)])
    return rows


def curve_rows(curve: BudgetCurve) -> list[list[object]]:
    return [[f"{p.budget:.3f}", f"{p.effective_bits:.3f}", f"{p.score:.4g}", f"{p.latency * 1e3:.3f}",
             f"{curve.latency_unquantized / p.latency:.2f}x" if p.latency > 0 else "-"] for p in curve.points]


def budget_caption(plan: Plan, curve: BudgetCurve) -> str:
    caption = (f"The plan re-solved with autoq.resolve (objective {plan.objective}) for {len(curve.points)} "
               f"budgets from the smallest feasible ({curve.smallest:.3f} bits) to 16 bits, in "
               f"{curve.seconds:.1f} s; the red ring is this plan.")
    if len(curve.points) < curve.requested:
        caption += (f" Solving stopped after {curve.seconds:.0f} s, before all {curve.requested} budgets: "
                    "the curve is coarser than asked.")
    return caption


def render_report(plan: Plan, budget_points: int = BUDGET_POINTS, curve_seconds: float = CURVE_SECONDS) -> str:
    """The whole report page for ``plan`` as one self-contained HTML string (see the module
    docstring; ``budget_points`` and ``curve_seconds`` bound the budget curve's solves)."""
    if not plan.layers:
        raise ValueError("the plan has no layers to report on")
    colours = format_colours(list(dict.fromkeys([*plan.formats, *(la.format for la in plan.layers.values())])))
    used = [f for f in colours if any(layer.format == f for layer in plan.layers.values())]
    curve = budget_curve(plan, budget_points, curve_seconds)
    title = f"autoq plan report: {plan.model.architecture}"
    meta = (f"objective {plan.objective}, budget {plan.budget:g} bits · {len(plan.layers)} layers · "
            f"created {plan.created} · autoq {plan.autoq_version} · model {plan.model.fingerprint[:16]} · "
            f"plan {plan.cache_key or '(unsaved)'}")
    notes = "".join(f"<li>{e(note)}</li>" for note in plan.notes)
    dropped = dropped_rows(plan)
    sections = [
        section("Totals", "", totals_cards(plan) + (f'<ul class="notes">{notes}</ul>' if notes else "")),
        section("Bits per layer", "Storage bits per weight element of each layer's chosen format, in model order; "
                "shaded bands are blocks; the dashed line is the plan's effective bits.",
                legend(colours, used) + chart_bits(plan, colours)),
        section("Sensitivity", "log10 of each layer's sensitivity per candidate format (first-order output damage "
                "of quantizing that layer alone); the chosen format is outlined (a black tick where rows are thin); "
                "hover a cell for its value or the reason it was dropped.", chart_sensitivity(plan)),
        section("Predicted latency per layer", "Seconds per calibration batch as measured by the benchmark, for "
                "the chosen format and unquantized.", legend(colours, used) + chart_latency(plan, colours)),
        section("Budget curve", budget_caption(plan, curve),
                chart_budget(plan, curve) + table(["budget", "effective bits", "score", "latency (ms)", "speedup"],
                                                  curve_rows(curve), {0, 1, 2, 3, 4})),
        section("Dropped formats", "" if dropped else "No format was dropped for any layer.",
                table(["format", "reason", "layers", "which"], dropped, {2}) if dropped else ""),
        section("Search", f"{plan.num_batches} calibration batches (fingerprint {plan.calibration}).",
                chart_stages(plan)
                + table(["setting", "value"], [[k, v] for k, v in plan.settings.items()]
                        + [["formats", ", ".join(plan.formats)], ["group rules", " | ".join(plan.groups)]])
                + table(["hardware", "value"], [[k, v] for k, v in plan.hardware.items()])),
        section("Layers", "", table(["#", "layer", "shape", "format", "bits", "sensitivity", "latency (us)",
                                     "unquantized (us)", "dropped"], layer_rows(plan), {0, 4, 5, 6, 7})),
    ]
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body>"
            f"<h1>{e(title)}</h1><div class=\"meta\">{e(meta)}</div>"
            + "".join(sections) + "</body></html>\n")
