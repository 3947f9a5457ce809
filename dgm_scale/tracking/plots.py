"""Line charts and labelled scatter charts drawn with PIL only (no matplotlib): axes, 1-2-5 ticks
with readable numbers, a legend and a title. Used by the run report (tracking/report.py) for loss
and metric curves and the 2-D projection of a model's features.

A chart keeps its data-to-pixel mapping (`Chart.to_pixel`), so tests can check that a point
lands where it should.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: matplotlib's tab10: distinct colours that stay distinct for the common colour blindnesses
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
AXIS, GRID, TEXT = (60, 60, 60), (228, 228, 228), (30, 30, 30)
MAX_POINTS_PER_PIXEL = 2  # longer series are thinned to this many points per horizontal pixel
MARKER_LIMIT = 15  # series with at most this many points (evaluations) also get a dot at each point


@dataclass
class Series:
    """One curve: y over x; NaN / inf values are gaps (counted in the legend)."""
    name: str
    x: np.ndarray
    y: np.ndarray

    def finite(self) -> Tuple[np.ndarray, np.ndarray]:
        keep = np.isfinite(self.x) & np.isfinite(self.y)
        return self.x[keep], self.y[keep]

    @property
    def nonfinite(self) -> int:
        """Logged values that are NaN or inf (a diverged loss shows up here, not as a line)."""
        return int(np.sum(np.isfinite(self.x) & ~np.isfinite(self.y)))


@dataclass
class Chart:
    """A drawn chart and the mapping of its plot area: data (x, y) -> pixel (column, row)."""
    image: Image.Image
    box: Tuple[int, int, int, int]  # plot area: left, top, right, bottom (pixels)
    x_range: Tuple[float, float]
    y_range: Tuple[float, float]
    colors: List[Tuple[int, int, int]] = field(default_factory=list)  # one per series, in order

    def to_pixel(self, x: float, y: float) -> Tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)


@lru_cache(maxsize=4)
def font(size: int = 13) -> ImageFont.ImageFont:
    """A scalable font: Pillow's bundled one (>= 10.1), else DejaVu, else the tiny bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: load_default() takes no size
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def nice_ticks(low: float, high: float, target: int = 5) -> Tuple[np.ndarray, float]:
    """Tick values at a 1, 2 or 5 x 10^k step covering [low, high] with about `target` ticks."""
    raw = (high - low) / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    count = math.ceil((high - first) / step - 1e-9) + 1
    return first + step * np.arange(count), step


def axis_range(values: np.ndarray, pad: float = 0.0) -> Tuple[float, float]:
    """[min, max] of the values, widened when flat (a constant curve still gets an axis)."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        half = abs(high) * 0.1 if high != 0 else 1.0
        return low - half, high + half
    margin = (high - low) * pad
    return low - margin, high + margin


def format_tick(value: float, step: float) -> str:
    """Short, exact-looking labels: 1.5k, 2M, 0.25, 3e-05 (as many decimals as the step needs)."""
    if abs(value) < step * 1e-6:
        return "0"
    if abs(step) >= 1000 and abs(value) >= 1000:
        for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= divisor:
                return format_tick(value / divisor, step / divisor) + suffix
    if abs(step) < 1e-3 or abs(value) >= 1e7:
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(abs(step)) + 1e-9))  # steps are 1, 2 or 5 x 10^k
    return f"{value:.{decimals}f}"


def _thin(x: np.ndarray, y: np.ndarray, limit: int) -> Tuple[np.ndarray, np.ndarray]:
    """At most `limit` evenly spaced points (drawing 1e6 segments would take seconds)."""
    if len(x) <= limit:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, limit).round().astype(int))
    return x[keep], y[keep]


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font())
    return right - left, bottom - top


def _draw_legend(draw: ImageDraw.ImageDraw, labels: Sequence[str], colors: Sequence[tuple], left: int,
                 top: int, right: int) -> int:
    """Swatch + label entries, wrapped over rows; returns the y below the legend."""
    x, y, row_height = left, top, _text_size(draw, "Ag")[1] + 6
    for label, color in zip(labels, colors):
        width = 22 + _text_size(draw, label)[0] + 16
        if x + width > right and x > left:
            x, y = left, y + row_height
        draw.line((x, y + row_height // 2, x + 16, y + row_height // 2), fill=color, width=3)
        draw.text((x + 22, y), label, fill=TEXT, font=font())
        x += width
    return y + row_height


def _draw_axes(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], x_range, y_range,
               x_label: str) -> None:
    """Grid lines, tick labels and the frame of the plot area."""
    left, top, right, bottom = box
    x_ticks, x_step = nice_ticks(*x_range)
    y_ticks, y_step = nice_ticks(*y_range)
    for value in y_ticks:
        if y_range[0] - 1e-9 * y_step <= value <= y_range[1] + 1e-9 * y_step:
            row = bottom - (value - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top)
            draw.line((left, row, right, row), fill=GRID)
            label = format_tick(value, y_step)
            width, height = _text_size(draw, label)
            draw.text((left - 6 - width, row - height / 2 - 2), label, fill=TEXT, font=font())
    for value in x_ticks:
        if x_range[0] - 1e-9 * x_step <= value <= x_range[1] + 1e-9 * x_step:
            column = left + (value - x_range[0]) / (x_range[1] - x_range[0]) * (right - left)
            draw.line((column, top, column, bottom), fill=GRID)
            draw.line((column, bottom, column, bottom + 4), fill=AXIS)
            label = format_tick(value, x_step)
            width, _ = _text_size(draw, label)
            draw.text((column - width / 2, bottom + 6), label, fill=TEXT, font=font())
    draw.rectangle(box, outline=AXIS)
    width, height = _text_size(draw, x_label)
    draw.text(((left + right - width) / 2, bottom + 10 + height), x_label, fill=TEXT, font=font())


def _y_label_width(draw: ImageDraw.ImageDraw, y_range: Tuple[float, float]) -> int:
    ticks, step = nice_ticks(*y_range)
    return max(_text_size(draw, format_tick(value, step))[0] for value in ticks)


def line_chart(series: Sequence[Series], title: str, x_label: str = "iteration",
               size: Tuple[int, int] = (560, 320)) -> Chart:
    """Draw the series' finite points as lines (dots too when few). Needs one finite point."""
    drawable = [(s, *s.finite()) for s in series]
    xs = np.concatenate([x for _, x, _ in drawable])
    ys = np.concatenate([y for _, _, y in drawable])
    if len(xs) == 0:
        raise ValueError(f"chart '{title}': no finite values to draw")
    x_range, y_range = axis_range(xs, pad=0.02), axis_range(ys, pad=0.05)  # dots at the ends stay whole
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.text((12, 8), title, fill=TEXT, font=font(15))
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    labels = [s.name + (f" ({s.nonfinite} non-finite)" if s.nonfinite else "") for s in series]
    legend_bottom = _draw_legend(draw, labels, colors, 12, 32, width - 12)
    text_height = _text_size(draw, "0")[1]
    box = (18 + _y_label_width(draw, y_range), legend_bottom + 6, width - 16, height - 2 * text_height - 22)
    _draw_axes(draw, box, x_range, y_range, x_label)
    chart = Chart(image, box, x_range, y_range, colors)
    for (_, x, y), color in zip(drawable, colors):
        x, y = _thin(x, y, MAX_POINTS_PER_PIXEL * (box[2] - box[0]))
        points = [chart.to_pixel(a, b) for a, b in zip(x.tolist(), y.tolist())]
        if len(points) > 1:
            draw.line(points, fill=color, width=2, joint="curve")
        if len(points) <= MARKER_LIMIT:
            for column, row in points:
                draw.ellipse((column - 3, row - 3, column + 3, row + 3), fill=color)
    return chart


def scatter_chart(points: np.ndarray, labels: np.ndarray, title: str, x_label: str = "", y_label: str = "",
                  size: Tuple[int, int] = (560, 460), radius: int = 2) -> Chart:
    """Points [N, 2] as dots coloured by their integer labels [N] (PALETTE, cycling beyond ten
    classes), with a legend of the labels; the same axes as line_chart. Needs one point."""
    if len(points) == 0:
        raise ValueError(f"chart '{title}': no points to draw")
    classes = sorted(set(np.asarray(labels).tolist()))
    colors = {cls: PALETTE[i % len(PALETTE)] for i, cls in enumerate(classes)}
    x_range, y_range = axis_range(points[:, 0], pad=0.04), axis_range(points[:, 1], pad=0.04)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.text((12, 8), title, fill=TEXT, font=font(15))
    legend_bottom = _draw_legend(draw, [str(cls) for cls in classes], [colors[c] for c in classes], 12, 32,
                                 width - 12)
    text_height = _text_size(draw, "0")[1]
    box = (18 + _y_label_width(draw, y_range), legend_bottom + 6 + (text_height + 4 if y_label else 0),
           width - 16, height - 2 * text_height - 22)
    _draw_axes(draw, box, x_range, y_range, x_label)
    if y_label:
        draw.text((box[0], legend_bottom + 4), y_label, fill=TEXT, font=font())
    chart = Chart(image, box, x_range, y_range, [colors[c] for c in classes])
    for (x, y), label in zip(np.asarray(points, dtype=float).tolist(), np.asarray(labels).tolist()):
        column, row = chart.to_pixel(x, y)
        draw.ellipse((column - radius, row - radius, column + radius, row + radius), fill=colors[label])
    return chart
