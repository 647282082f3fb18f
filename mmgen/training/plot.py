"""A loss-curve PNG drawn with pillow (no plotting library needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = {"text_loss": (40, 80, 220), "image_loss": (220, 40, 40), "contrastive_loss": (30, 150, 60),
            "loss": (60, 60, 60)}


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interruption
    return rows


def plot_losses(metrics: list[dict], out: str | Path, *, width: int = 640, height: int = 360) -> Path:
    """Draw text, image and (if logged) contrastive loss (log scale) against step; return the PNG path."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 10, 10, height - 30
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    series = {k: [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float)) and m[k] > 0]
              for k in ("text_loss", "image_loss", "contrastive_loss")}
    points = [p for s in series.values() for p in s]
    if points:
        steps = [p[0] for p in points]
        logs = [math.log10(p[1]) for p in points]
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)
        y0, y1 = math.floor(min(logs)), math.ceil(max(logs) + 1e-9)
        y1 = max(y1, y0 + 1)

        def xy(step: float, value: float) -> tuple[float, float]:
            x = left + (step - x0) / (x1 - x0) * (right - left)
            y = bottom - (math.log10(value) - y0) / (y1 - y0) * (bottom - top)
            return x, y

        for decade in range(y0, y1 + 1):
            _, y = xy(x0, 10.0 ** decade)
            draw.line([left, y, right, y], fill=(235, 235, 235))
            draw.text((4, y - 6), f"1e{decade}", fill=(90, 90, 90))
        for name, s in series.items():
            if len(s) > 1:
                draw.line([xy(*p) for p in s], fill=_COLOURS[name], width=2)
        draw.text((left, bottom + 8), f"step {x0}", fill=(90, 90, 90))
        draw.text((right - 80, bottom + 8), f"step {x1}", fill=(90, 90, 90))
    shown = ["text_loss", "image_loss"] + (["contrastive_loss"] if series["contrastive_loss"] else [])
    for i, name in enumerate(shown):
        draw.text((left + 10 + 110 * i, top + 4), name, fill=_COLOURS[name])
    out = Path(out)
    img.save(out)
    return out
