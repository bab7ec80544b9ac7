"""A small SVG chart renderer for report.html's figures (kdpipe.figures): panels of lines, markers, bars and
heatmaps on linear or log10 axes, side by side in one inline <svg>. It replaces matplotlib, whose import alone took
most of a second of the page's time; a figure here takes milliseconds, with no dependency but Pillow (and numpy)
for a heatmap's raster. Text stays text; every string is escaped here, so callers pass data as they find it.
"""

from __future__ import annotations

import base64
import io
import math
import zlib
from dataclasses import dataclass, field
from html import escape

CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
DASHES = {"-": "", "--": "5,3", ":": "1.5,2.5", "-.": "6,2.5,1.5,2.5"}
BLUES = ["#ffffff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]
TITLE, SMALL = 12, 10  # font sizes (px): titles and axis labels, ticks and legend
CHAR = 0.6  # a character's mean width in font sizes: margins and the legend are sized without measuring text
CORNERS = ("upper right", "upper left", "lower left", "lower right")  # "best" tries them in this order


@dataclass
class Series:
    kind: str  # line (markers only: dash ""), bars and hbars (from 0 on a linear axis), heatmap (y: the matrix)
    x: list  # a heatmap's: the labels of its rows and columns, its counts written in when there are any
    y: list
    color: str = CYCLE[0]
    label: str | None = None
    dash: str = "-"  # a key of DASHES, or "" for no line
    marker: str = ""  # "." a dot, "o" a circle, "_" a short thick horizontal bar (a limit), "" none
    width: float = 0.8  # a bar's width in data units


@dataclass
class Panel:
    """One axes: series drawn in a frame on scales fitted to their data (5% padding), unless `xlim`/`ylim` fix
    an end (None: fitted; lo > hi inverts the axis). `xticks`/`yticks`: explicit (value, label) ticks."""
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    xlog: bool = False
    ylog: bool = False
    xlim: tuple = (None, None)
    ylim: tuple = (None, None)
    xticks: list | None = None
    yticks: list | None = None
    grid: str = "xy"
    legend: str = "best"  # a corner of CORNERS, or "best": the one that covers the fewest data points
    square: bool = False  # equal units on both axes (a heatmap's cells)
    series: list = field(default_factory=list)

    def line(self, x, y, color: str, label: str | None = None, dash: str = "-", marker: str = "") -> None:
        self.series.append(Series("line", list(x), list(y), color, label, dash, marker))

    def bars(self, x, heights, width: float, color: str, label: str | None = None) -> None:
        self.series.append(Series("bars", list(x), list(heights), color, label, width=width))

    def hbars(self, names: list[str], values, color: str) -> None:
        """Horizontal bars, the first name at the bottom, each name as its tick label."""
        self.series.append(Series("hbars", list(values), list(range(len(names))), color))
        self.yticks = list(enumerate(names))

    def heatmap(self, matrix: list[list[float]], labels: list[str] | None = None) -> None:
        """Row 0 at the top; `labels` tick every row and column (counts written in the cells when given)."""
        rows, columns = len(matrix), len(matrix[0]) if matrix else 0
        self.series.append(Series("heatmap", list(labels or []), matrix))
        self.xlim, self.ylim = (-0.5, columns - 0.5), (rows - 0.5, -0.5)
        self.square, self.grid, self.legend = True, "", ""
        if labels:
            self.xticks = self.yticks = list(enumerate(labels))


def figure(panels: list[Panel], width: float, height: float) -> str:
    """The panels side by side, each in an equal column, as one <svg> element. Clip paths are named after the
    content, so the many figures of one page never share an id unless they are the same figure."""
    column = width / len(panels)
    body = "".join(_draw(p, i * column, column, height, f"<id>-{i}") for i, p in enumerate(panels))
    body = body.replace("<id>", f"kdp{zlib.crc32(body.encode()):08x}")  # "<" never comes from data: escaped
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:g} {height:g}" width="{width:g}" '
            f'height="{height:g}" font-family="sans-serif" font-size="{SMALL}">'
            f'<rect width="{width:g}" height="{height:g}" fill="#fff"/>{body}</svg>')


def finite(v, log: bool = False) -> bool:
    """Whether `v` can be drawn: a number, not NaN or infinite, positive on a log axis."""
    return isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)


def limits(values: list, log: bool, fixed: tuple) -> tuple[float, float]:
    """An axis's range: the finite data padded by 5% (of decades on a log axis), the ends in `fixed` kept."""
    lo, hi = fixed
    if lo is not None and hi is not None:
        return lo, hi
    data = [math.log10(v) if log else v for v in values if finite(v, log)]
    low, high = (min(data), max(data)) if data else (0.0, 1.0)
    if low == high:  # one value: a range around it
        spread = 0.5 if log else abs(low) / 10 or 0.5
        low, high = low - spread, high + spread
    pad = (high - low) / 20
    low, high = (10 ** (low - pad), 10 ** (high + pad)) if log else (low - pad, high + pad)
    return (low if lo is None else lo), (high if hi is None else hi)


def ticks(lo: float, hi: float, log: bool) -> list[tuple[float, str]]:
    """Ticks within [lo, hi]: at most 7 at a 1, 2 or 5 × 10^k step on a linear axis; on a log axis the decades
    (every nth when there are many), or 1, 2, 5 × 10^k when fewer than two decades fall in range, else the ends."""
    lo, hi = min(lo, hi), max(lo, hi)
    if not hi > lo:
        return []
    inside = lambda v: lo - 1e-9 * abs(lo) <= v <= hi + 1e-9 * abs(hi)  # noqa: E731
    if log:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        found = [10.0 ** k for k in range(first, last + 1) if inside(10.0 ** k)]
        found = found[::math.ceil(len(found) / 7)] if found else found
        if len(found) < 2:
            found = [m * 10.0 ** k for k in range(first, last + 1) for m in (1, 2, 5) if inside(m * 10.0 ** k)]
        return [(v, f"{v:.4g}") for v in (found if len(found) >= 2 else [lo, hi])]
    step = 10.0 ** math.floor(math.log10((hi - lo) / 7))
    while True:
        for m in (1, 2, 5):
            first, last = math.ceil(lo / (m * step) - 1e-9), math.floor(hi / (m * step) + 1e-9)
            if last - first < 7:  # labels as short as the step allows: no -0, no 0.30000000000000004
                digits = math.floor(math.log10(m * step))
                values = [round(i * m * step, max(0, 1 - digits)) + 0.0 for i in range(first, last + 1)]
                sure = max(6, math.floor(math.log10(max(abs(lo), abs(hi)))) - digits + 1)
                return [(v, f"{v:.{sure}g}") for v in values]
        step *= 10


class Scale:
    """Data → pixels along one axis: `lo` at pixel `a`, `hi` at pixel `b`, linear or log10."""

    def __init__(self, lo: float, hi: float, log: bool, a: float, b: float):
        self.f = math.log10 if log else float
        self.lo, self.a, self.k = self.f(lo), a, (b - a) / ((self.f(hi) - self.f(lo)) or 1)
        self.log = log

    def __call__(self, v: float) -> float:
        return self.a + (self.f(v) - self.lo) * self.k


def _width(text: str, size: float = SMALL) -> float:
    return len(text) * size * CHAR


def _text(x: float, y: float, text: str, size: float = SMALL, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{extra}>{escape(str(text))}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, extra: str = "") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{extra}/>'


def _dash(dash: str) -> str:
    return f' stroke-dasharray="{DASHES[dash]}"' if DASHES.get(dash) else ""


def _marker(x: float, y: float, series: Series) -> str:
    if series.marker == "_":
        return _line(x - 14, y, x + 14, y, series.color, ' stroke-width="2.5"')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2.2 if series.marker == "." else 3.5}" fill="{series.color}"/>'


def _draw(panel: Panel, x0: float, width: float, height: float, clip: str) -> str:
    """One panel in the column starting at `x0`: the frame's margins are sized from its tick and axis labels."""
    xs, ys = [], []
    for s in panel.series:
        if s.kind == "line":
            xs += s.x
            ys += s.y
        elif s.kind in ("bars", "hbars"):  # each bar's width along the one axis, 0 to its value along the other
            along, value = (s.x, s.y) if s.kind == "bars" else (s.y, s.x)
            spread, across = [p + d * s.width / 2 for p in along for d in (-1, 1)], [0, *value]
            xs, ys = (xs + spread, ys + across) if s.kind == "bars" else (xs + across, ys + spread)
    xlim, ylim = limits(xs, panel.xlog, panel.xlim), limits(ys, panel.ylog, panel.ylim)
    yticks = panel.yticks if panel.yticks is not None else ticks(*ylim, panel.ylog)
    left = x0 + 12 + max((_width(label) for _, label in yticks), default=0) + (16 if panel.ylabel else 0)
    right, top = x0 + width - 12, 24.0
    xticks = panel.xticks if panel.xticks is not None else ticks(*xlim, panel.xlog)
    bottom = height - 24 - (16 if panel.xlabel else 0)  # under upright tick labels
    span = min(right - left, bottom - top) if panel.square else right - left
    at = sorted(Scale(*xlim, panel.xlog, 0, span)(v) for v, _ in xticks)
    room = min((b - a for a, b in zip(at, at[1:])), default=span)
    widest = max((_width(label) for _, label in xticks), default=0)
    tilted = widest > room - 4  # labels that would overlap each other: turned by 45°
    bottom -= max(0, widest * 0.71 - 8) if tilted else 0
    if panel.square:  # shrink the longer side to a square, centred in the column
        side = min(right - left, bottom - top)
        left, right, bottom = (left + right - side) / 2, (left + right + side) / 2, top + side
    x, y = Scale(*xlim, panel.xlog, left, right), Scale(*ylim, panel.ylog, bottom, top)
    out = [f'<clipPath id="{clip}"><rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
           f'height="{bottom - top:.1f}"/></clipPath>']
    for axis, scale, lim, marks in (("x", x, xlim, xticks), ("y", y, ylim, yticks)):
        for value, label in marks:
            if not (finite(value, scale.log) and min(lim) <= value <= max(lim)):
                continue
            p = scale(value)
            grid, tick = ((p, top, p, bottom), (p, bottom, p, bottom + 4)) if axis == "x" else \
                ((left, p, right, p), (left - 4, p, left, p))
            if axis in panel.grid:
                out.append(_line(*grid, "#e4e4e4"))
            out.append(_line(*tick, "#333"))
            if axis == "y":
                out.append(_text(left - 6, p + 3.5, label, anchor="end"))
            elif tilted:
                turn = f' transform="rotate(-45 {p + 3:.1f} {bottom + 10:.1f})"'
                out.append(_text(p + 3, bottom + 10, label, anchor="end", extra=turn))
            else:
                out.append(_text(p, bottom + 15, label))
    data, markers, points = _data(panel, x, y, (left, top, right, bottom))
    out.append(f'<g clip-path="url(#{clip})">{"".join(data)}</g>{"".join(markers)}')
    out.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" height="{bottom - top:.1f}" '
               'fill="none" stroke="#333" stroke-width="0.8"/>')
    out.append(_text((left + right) / 2, top - 8, panel.title, TITLE))
    if panel.xlabel:
        out.append(_text((left + right) / 2, height - 10, panel.xlabel, TITLE - 1))
    if panel.ylabel:
        out.append(_text(x0 + 14, (top + bottom) / 2, panel.ylabel, TITLE - 1,
                         extra=f' transform="rotate(-90 {x0 + 14:.1f} {(top + bottom) / 2:.1f})"'))
    return "<g>" + "".join(out) + _legend(panel, (left, top, right, bottom), points) + "</g>"


def _data(panel: Panel, x: Scale, y: Scale, box: tuple) -> tuple[list[str], list[str], list[tuple]]:
    """The series' clipped shapes, their markers (drawn unclipped when their centre is inside the frame: a dot on
    the frame stays whole) and sample points of both in pixels, for the legend to avoid."""
    left, top, right, bottom = box
    data, markers, points = [], [], []
    for s in panel.series:
        if s.kind == "heatmap":
            data.append(_heatmap(s.y, x, y, bool(s.x)))
            continue
        if s.kind in ("bars", "hbars"):
            along, value, place = (s.x, s.y, (x, y)) if s.kind == "bars" else (s.y, s.x, (y, x))
            for p, v in zip(along, value):
                if finite(p) and finite(v):
                    a, b = sorted((place[0](p - s.width / 2), place[0](p + s.width / 2)))
                    c, d = sorted((place[1](0), place[1](v)))
                    rx, ry, w, h = (a, c, b - a, d - c) if s.kind == "bars" else (c, a, d - c, b - a)
                    data.append(f'<rect x="{rx:.1f}" y="{ry:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{s.color}"/>')
                    points += [(rx + w * i / 2, ry + h * j / 2) for i in range(3) for j in range(3)]
            continue
        runs, run = [], []  # a value that cannot be drawn (None, NaN, ≤ 0 on a log axis) splits the line
        for u, v in zip(s.x, s.y):
            if finite(u, x.log) and finite(v, y.log):
                run.append((x(u), y(v)))
            elif run:
                runs, run = runs + [run], []
        for run in runs + [run]:
            if s.dash and len(run) > 1:
                coordinates = " ".join(f"{u:.1f},{v:.1f}" for u, v in run)
                data.append(f'<polyline points="{coordinates}" fill="none" stroke="{s.color}" stroke-width="1.5"'
                            f'{_dash(s.dash)}/>')
                points += [(a[0] + (b[0] - a[0]) * i / 5, a[1] + (b[1] - a[1]) * i / 5)
                           for a, b in zip(run, run[1:]) for i in range(5)]
            for u, v in run:
                points.append((u, v))
                if s.marker and left <= u <= right and top <= v <= bottom:
                    markers.append(_marker(u, v, s))
    return data, markers, points


def _heatmap(matrix: list[list[float]], x: Scale, y: Scale, counts: bool) -> str:
    """The matrix as a PNG raster, one pixel a cell, white (0) to dark blue (its largest value); with `counts`
    each non-zero cell's value written in (white on the darker half)."""
    import numpy as np
    from PIL import Image

    values = np.nan_to_num(np.asarray(matrix, dtype=float))
    if values.ndim != 2 or not values.size:
        return ""
    top = float(values.max())
    colours = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in BLUES], dtype=float)
    ramp = np.linspace(0, 1, len(BLUES))
    palette = np.stack([np.interp(np.linspace(0, 1, 256), ramp, colours[:, i]) for i in range(3)], 1)
    image = Image.fromarray(np.round(255 * values / (top or 1)).clip(0, 255).astype(np.uint8))
    image.putpalette(np.round(palette).astype(np.uint8).tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    rows, columns = values.shape
    a, b, c, d = x(-0.5), x(columns - 0.5), y(-0.5), y(rows - 0.5)
    pixelated = ' style="image-rendering:pixelated"' if b - a >= columns else ""  # shrunk: let the browser average
    out = [f'<image x="{a:.1f}" y="{c:.1f}" width="{b - a:.1f}" height="{d - c:.1f}" preserveAspectRatio="none"'
           f'{pixelated} href="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode("ascii")}"/>']
    if counts:
        for (row, column), value in np.ndenumerate(values):
            if value:
                ink = ' fill="#fff"' if value > top / 2 else ""
                out.append(_text(x(column), y(row) + 3.5, f"{value:g}", extra=ink))
    return "".join(out)


def _legend(panel: Panel, box: tuple, points: list[tuple]) -> str:
    """A box of the labelled series (a swatch and the name) in a corner of the frame; "best": the corner whose
    box covers the fewest of `points`."""
    shown = [s for s in panel.series if s.label is not None]
    if not shown or not panel.legend:
        return ""
    left, top, right, bottom = box
    w, h = 42 + max(_width(s.label) for s in shown), 6 + 13 * len(shown)
    place = {"upper right": (right - 6 - w, top + 6), "upper left": (left + 6, top + 6),
             "lower left": (left + 6, bottom - 6 - h), "lower right": (right - 6 - w, bottom - 6 - h)}
    covered = lambda c: sum(c[0] <= u <= c[0] + w and c[1] <= v <= c[1] + h for u, v in points)  # noqa: E731
    lx, ly = place[panel.legend] if panel.legend in place else min((place[c] for c in CORNERS), key=covered)
    out = [f'<rect x="{lx:.1f}" y="{ly:.1f}" width="{w:.1f}" height="{h}" fill="#fff" fill-opacity="0.85" '
           'stroke="#ccc"/>']
    for number, s in enumerate(shown):
        mid = ly + 9.5 + 13 * number
        if s.kind in ("bars", "hbars"):
            out.append(f'<rect x="{lx + 8:.1f}" y="{mid - 4:.1f}" width="20" height="8" fill="{s.color}"/>')
        if s.kind == "line" and s.dash:
            out.append(_line(lx + 6, mid, lx + 30, mid, s.color, ' stroke-width="1.5"' + _dash(s.dash)))
        if s.kind == "line" and s.marker:
            out.append(_marker(lx + 18, mid, s))
        out.append(_text(lx + 36, mid + 3.5, s.label, anchor="start"))
    return "".join(out)
