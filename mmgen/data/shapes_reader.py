"""Reading a ShapeStories frame back (docs/SHAPESTORIES.md "Reading an image back"), and scoring it.

A correct renderer scores 100 % under this reader: evaluation never trusts a model's own words
for what it drew.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mmgen.data.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, OBJECT_DISTANCE, _read_mask


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = np.linalg.norm(np.asarray([table[k] for k in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(d))]


def read_image(img: Image.Image | np.ndarray) -> dict[str, Any]:
    """Read a frame back by the contract's rule (``img``: PIL image or (H, W, 3) 0-255 array).

    Returns ``{"found", "background", "shape", "colour", "size", "position"}``; with no
    object pixels, ``found`` is False and the object attributes are None.
    """
    if isinstance(img, Image.Image):
        a = np.asarray(img.convert("RGB"), dtype=np.float64)
    else:
        a = np.asarray(img, dtype=np.float64)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        a = a[:, :, :3]
    h, w = a.shape[:2]
    # 1. background: per-channel median of the outer 2-pixel ring
    ring = np.ones((h, w), dtype=bool)
    ring[2:-2, 2:-2] = False
    background = _nearest(np.median(a[ring], axis=0), BACKGROUNDS)
    # 2. object pixels: farther than 60 from the background's table colour
    bg_rgb = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    mask = np.linalg.norm(a - bg_rgb, axis=2) > OBJECT_DISTANCE  # (H, W)
    out: dict[str, Any] = {"found": False, "background": background}
    out.update(dict.fromkeys(ATTRIBUTES))
    if not mask.any():
        return out
    # 3. colour: nearest to the median; shape, size, position: from the mask's geometry
    colour = _nearest(np.median(a[mask], axis=0), COLOURS)
    shape, size, position = _read_mask(mask, w, h)
    out.update(found=True, shape=shape, colour=colour, size=size, position=position)
    return out


def score_attributes(
    pred: dict[str, Any] | None,
    truth: dict[str, Any],
    attributes: tuple[str, ...] = ATTRIBUTES,
) -> dict[str, bool]:
    """Per-attribute correctness and ``joint`` (all right); a None prediction scores all False."""
    pred = pred or {}
    scores = {a: pred.get(a) is not None and pred.get(a) == truth[a] for a in attributes}
    scores["joint"] = all(scores.values())
    return scores
