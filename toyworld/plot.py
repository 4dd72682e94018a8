"""Small scatter plots drawn with PIL (the project does not depend on matplotlib).

A plot is a list of series; each series has a label, a colour and points (x, y, x_spread, y_spread);
`line=True` joins its points in order (a sweep). Axes are linear with ticks every `tick`;
`zoom` fits them to the points.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Series:
    label: str
    points: List[Tuple[float, float, float, float]]  # x, y, x spread, y spread (0: none)
    colour: Tuple[int, int, int] = (0, 0, 0)
    line: bool = False
    point_labels: Optional[Sequence[str]] = None
    marker: str = "o"  # "o" circle, "s" square, "d" diamond


@dataclass
class Plot:
    title: str
    x_label: str
    y_label: str
    series: List[Series] = field(default_factory=list)
    x_range: Tuple[float, float] = (0.0, 1.0)
    y_range: Tuple[float, float] = (0.0, 1.0)
    tick: float = 0.1


def zoom(plot: Plot, tick: float = 0.05, margin: float = 0.02) -> Plot:
    """Axes fitted to every point and its spread (plus `margin`), on whole ticks, within 0..1."""
    xs = [v for s in plot.series for x, _, sx, _ in s.points for v in (x - sx, x + sx)]
    ys = [v for s in plot.series for _, y, _, sy in s.points for v in (y - sy, y + sy)]

    def fit(values):
        lo = max(0.0, math.floor((min(values) - margin) / tick) * tick)
        hi = min(1.0, math.ceil((max(values) + margin) / tick) * tick)
        return (round(lo, 6), round(hi if hi > lo else lo + tick, 6))

    plot.x_range, plot.y_range, plot.tick = fit(xs), fit(ys), tick
    return plot


def _marker(draw, x, y, kind, colour, r=6):
    box = (x - r, y - r, x + r, y + r)
    if kind == "s":
        draw.rectangle(box, fill=colour, outline=(0, 0, 0))
    elif kind == "d":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour, outline=(0, 0, 0))
    else:
        draw.ellipse(box, fill=colour, outline=(0, 0, 0))


def render(plot: Plot, width: int = 760, height: int = 560) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 210, 50, height - 60
    (x0, x1), (y0, y1) = plot.x_range, plot.y_range

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.text((left, 8), plot.title, fill=(0, 0, 0))
    digits = 1 if abs(plot.tick * 10 - round(plot.tick * 10)) < 1e-9 else 2  # 0.1 ticks: 0.3; 0.05 ticks: 0.35
    n_x = int(round((x1 - x0) / plot.tick))
    n_y = int(round((y1 - y0) / plot.tick))
    for i in range(n_x + 1):
        v = x0 + i * plot.tick
        x, _ = px(v, y0)
        draw.line([(x, top), (x, bottom)], fill=(230, 230, 230))
        draw.text((x - 10, bottom + 6), f"{v:.{digits}f}", fill=(0, 0, 0))
    for i in range(n_y + 1):
        v = y0 + i * plot.tick
        _, y = px(x0, v)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 34, y - 6), f"{v:.{digits}f}", fill=(0, 0, 0))
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text(((left + right) / 2 - 4 * len(plot.x_label) / 2 * 1.5, bottom + 26), plot.x_label, fill=(0, 0, 0))
    draw.text((6, top - 18), plot.y_label, fill=(0, 0, 0))

    for series in plot.series:
        pts = [px(x, y) for x, y, _, _ in series.points]
        if series.line and len(pts) > 1:
            draw.line(pts, fill=series.colour, width=2)
        for (x, y, sx, sy), (cx, cy) in zip(series.points, pts):
            if sx:
                draw.line([px(x - sx, y), px(x + sx, y)], fill=series.colour, width=2)
            if sy:
                draw.line([px(x, y - sy), px(x, y + sy)], fill=series.colour, width=2)
            _marker(draw, cx, cy, series.marker, series.colour)
        for label, (cx, cy) in zip(series.point_labels or [], pts):
            draw.text((cx + 8, cy - 14), label, fill=series.colour)

    # legend
    ly = top
    for series in plot.series:
        _marker(draw, right + 24, ly + 7, series.marker, series.colour, r=5)
        draw.text((right + 36, ly), series.label, fill=(0, 0, 0))
        ly += 20
    return img
