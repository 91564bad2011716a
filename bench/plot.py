"""Small PNG charts with Pillow only (no plotting library needed): one or more panels of lines."""
from __future__ import annotations

from collections.abc import Sequence

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def line_panels(path: str, title: str, panels: Sequence[dict], width: int = 520, height: int = 360) -> str:
    """panels: [{"title", "x_label", "y_label", "series": {name: [(x, y), ...]}}]; side by side."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width * len(panels), height + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    for i, panel in enumerate(panels):
        _panel(draw, panel, x0=i * width, y0=30, width=width, height=height)
    img.save(path)
    return path


def _panel(draw, panel: dict, x0: int, y0: int, width: int, height: int) -> None:
    left, right, top, bottom = x0 + 60, x0 + width - 20, y0 + 25, y0 + height - 45
    series = {k: [(float(x), float(y)) for x, y in v if y is not None] for k, v in panel["series"].items()}
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = 0.0, max(ys) * 1.1 if max(ys) > 0 else 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.text((left, y0 + 5), panel.get("title", ""), fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for t in _ticks(y_lo, y_hi):
        _, py = at(x_lo, t)
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.line([(left + 1, py), (right, py)], fill=(230, 230, 230))
        draw.text((x0 + 5, py - 6), _fmt(t), fill="black")
    for x in sorted(set(xs)):
        px, _ = at(x, y_lo)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        draw.text((px - 6, bottom + 6), _fmt(x), fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 22), panel.get("x_label", ""), fill="black")
    draw.text((left + 5, top - 12), panel.get("y_label", ""), fill=(90, 90, 90))
    for j, (name, pts) in enumerate(series.items()):
        color = COLORS[j % len(COLORS)]
        pts = sorted(pts)
        if len(pts) > 1:
            draw.line([at(x, y) for x, y in pts], fill=color, width=2)
        for x, y in pts:
            px, py = at(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((right - 150, top + 4 + 14 * j), name, fill=color)
