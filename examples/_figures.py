"""Heat maps as PNG files, drawn with Pillow.

Pillow comes with nnsight-dask already (Bokeh, our dashboard's library, depends on it), so the
recipes save their figures without matplotlib: a grid of coloured cells with row and column labels,
a title, and a colour bar with its range. Enough to see a pattern; the numbers are in the table the
recipe prints beside it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

#: Viridis at five stops (dark blue, blue, teal, green, yellow): ordered in lightness, readable in grey.
_STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_MARGIN = 8


def colour(fraction: float) -> tuple[int, int, int]:
    """The colour of ``fraction`` (0 to 1, clipped) on the five-stop scale, linearly between stops."""
    x = min(max(fraction, 0.0), 1.0) * (len(_STOPS) - 1)
    low = min(int(x), len(_STOPS) - 2)
    t = x - low
    return tuple(round(a + (b - a) * t) for a, b in zip(_STOPS[low], _STOPS[low + 1]))  # type: ignore[return-value]


def heatmap(values: torch.Tensor, rows: Sequence[str], columns: Sequence[str], title: str, *, cell: int = 28,
            value_range: tuple[float, float] | None = None) -> Image.Image:
    """``values`` (``[len(rows), len(columns)]``) drawn as a heat map with its labels and colour bar.

    ``value_range`` fixes the ends of the colour scale (default: the values' own minimum and maximum).
    """
    values = values.detach().float().cpu()
    if values.shape != (len(rows), len(columns)):
        raise ValueError(f"values have shape {tuple(values.shape)}, labels say {(len(rows), len(columns))}")
    low, high = value_range or (float(values.min()), float(values.max()))
    span = high - low or 1.0
    font = ImageFont.load_default(size=max(10, cell // 2))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        return int(measure.textlength(text, font=font))

    left = _MARGIN + max(text_width(r) for r in rows) + _MARGIN
    width = max(cell, max(text_width(c) for c in columns) + 4)  # columns widen to fit their labels
    top = _MARGIN + cell + _MARGIN
    grid_w, grid_h = width * len(columns), cell * len(rows)
    bar_left = left + grid_w + 2 * _MARGIN
    image = Image.new("RGB", (bar_left + cell + _MARGIN + text_width(f"{high:.3g}") + _MARGIN,
                              top + grid_h + cell + 2 * _MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_MARGIN, _MARGIN), title, fill="black", font=font)
    for i, row in enumerate(rows):
        draw.text((_MARGIN, top + i * cell + cell // 4), row, fill="black", font=font)
        for j in range(len(columns)):
            x, y = left + j * width, top + i * cell
            draw.rectangle([x, y, x + width - 1, y + cell - 1], fill=colour((float(values[i, j]) - low) / span))
    for j, column in enumerate(columns):
        draw.text((left + j * width + 2, top + grid_h + _MARGIN // 2), column, fill="black", font=font)
    for k in range(grid_h):  # the colour bar: high at the top
        draw.line([bar_left, top + k, bar_left + cell - 1, top + k], fill=colour(1 - k / max(grid_h - 1, 1)))
    draw.text((bar_left + cell + 4, top), f"{high:.3g}", fill="black", font=font)
    draw.text((bar_left + cell + 4, top + grid_h - cell // 2), f"{low:.3g}", fill="black", font=font)
    return image


def save_png(path: str | Path, *panels: Image.Image) -> Path:
    """Write ``panels`` side by side, top-aligned, as one PNG at ``path``; return the path."""
    canvas = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    path = Path(path)
    canvas.save(path)
    return path
