"""``metrics.json`` and a Markdown report with a grid of samples, right and wrong ones labelled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .shapes_eval import Sample, TaskResult, in_words

RIGHT, WRONG = (40, 170, 70), (220, 40, 40)


def write_metrics(out: Path, results: dict[str, TaskResult], settings: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings,
              "tasks": {t: {"metrics": r.metrics, "seconds": r.seconds, "n": len(r.samples)} for t, r in results.items()}}
    path = out / "metrics.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def sample_grid(samples: list[Sample], path: Path, *, cols: int = 8, cell: int = 64) -> Path | None:
    """The first image of each sample (generated, or the prompt's for captions), framed green if
    the sample is right (joint), red if wrong."""
    tiles = []
    for s in samples:
        images = [seg.image for seg in s.document.segments if seg.type == "image" and seg.image is not None]
        generated = [seg.image for seg in s.document.segments
                     if seg.type == "image" and seg.image is not None and seg.source == "generated"]
        img = (generated or images or [None])[0]
        if img is None:
            continue
        ok = s.scores.get("joint", s.scores.get("image_match", 0) == 1)
        tiles.append((img.convert("RGB").resize((cell, cell), Image.NEAREST), bool(ok)))
    if not tiles:
        return None
    rows = -(-len(tiles) // cols)
    pad = 3
    grid = Image.new("RGB", (cols * (cell + 2 * pad), rows * (cell + 2 * pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, (img, ok) in enumerate(tiles):
        x, y = (k % cols) * (cell + 2 * pad), (k // cols) * (cell + 2 * pad)
        draw.rectangle([x, y, x + cell + 2 * pad - 1, y + cell + 2 * pad - 1], fill=RIGHT if ok else WRONG)
        grid.paste(img, (x + pad, y + pad))
    grid.save(path)
    return path


def write_report(out: Path, results: dict[str, TaskResult], settings: dict[str, Any], *, examples: int = 8) -> Path:
    """``report.md``: the metrics table, a labelled grid per task and a few samples in words."""
    lines = ["# ShapeStories evaluation", "", "Settings: `" + json.dumps(settings) + "`", ""]
    for task, r in results.items():
        lines += [f"## {task} ({len(r.samples)} prompts, {r.seconds:.1f} s)", "",
                  "| " + " | ".join(r.metrics) + " |", "|" + "---|" * len(r.metrics),
                  "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.metrics.values()) + " |", ""]
        grid = sample_grid(r.samples, out / f"{task}-grid.png")
        if grid is not None:
            lines += [f"![{task} samples: green right, red wrong]({grid.name})", ""]
        for s in r.samples[:examples]:
            prompt = in_words(s.document, "prompt")
            mark = "right" if s.scores.get("joint", s.scores.get("image_match") == 1) else "wrong"
            detail = s.text if s.text is not None else (json.dumps(s.read) if s.read else "")
            lines.append(f"- {mark}: `{s.id}` prompt: {prompt} → {detail}")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
