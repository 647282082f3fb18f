"""ShapeStories evaluation (docs/SHAPESTORIES.md "Evaluation tasks"), scored with the library's reader.

- ``t2i``: intro sentence → image; per attribute and joint.
- ``caption``: image → intro sentence, parsed; per attribute and joint.
- ``continuation``: frame 1 (sentence + image) + change sentence → frame-2 image; per
  attribute, joint, and background consistency (frame 2's background = frame 1's; chance 25 %).
- ``story``: intro sentence → the model writes and draws the rest; each generated image is
  scored against the sentences before it, and each generated sentence against the grammar.

Prompts come from ``eval_prompts`` (a seed stream apart from training's).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..data.documents import Document
from ..data.shapes import ATTRIBUTES, TASKS, apply_change, parse_sentence
from ..data.shapes_reader import read_image, score_attributes
from .shapes_prompts import eval_prompts

_SENTENCE_END = re.compile(r"(?<=\.)\s+")


@dataclass
class Sample:
    """One scored prompt, kept for the report."""

    task: str
    id: str
    document: Document
    truth: dict[str, Any]
    read: dict[str, Any] | None
    scores: dict[str, bool]
    text: str | None = None


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0


def _mean(values: list[bool]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _summary(samples: list[Sample], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: _mean([s.scores[k] for s in samples if k in s.scores]) for k in keys}


def _generated(doc: Document, kind: str) -> list:
    return [s for s in doc.segments if s.source == "generated" and s.type == kind]


def score_t2i(doc: Document, truth: dict) -> Sample:
    frame = truth["frames"][0]
    images = _generated(doc, "image")
    read = read_image(images[0].image) if images else None
    return Sample("t2i", doc.id, doc, frame, read, score_attributes(read, frame))


def score_caption(doc: Document, truth: dict) -> Sample:
    frame = truth["frames"][0]
    texts = _generated(doc, "text")
    text = texts[0].text if texts else ""
    first = _SENTENCE_END.split(text.strip())[0] if text else ""
    parsed = parse_sentence(first)
    pred = parsed if parsed and parsed["kind"] == "intro" else None
    scores = score_attributes(pred, frame)
    scores["grammar"] = parsed is not None
    return Sample("caption", doc.id, doc, frame, pred, scores, text=text)


def score_continuation(doc: Document, truth: dict) -> Sample:
    first, second = truth["frames"][0], truth["frames"][1]
    images = _generated(doc, "image")
    read = read_image(images[0].image) if images else None
    scores = score_attributes(read, second)
    scores["background"] = bool(read) and read.get("background") == first["background"]
    return Sample("continuation", doc.id, doc, second, read, scores)


def score_reintro(doc: Document, truth: dict) -> Sample:
    """The image after a new introduction: right (``joint``), or showing an attribute of the frame
    before where the new sentence names another value (``copied``); the background kept."""
    first, second = truth["frames"][0], truth["frames"][1]
    images = _generated(doc, "image")
    read = read_image(images[0].image) if images else None
    scores = score_attributes(read, second)
    differ = [a for a in ATTRIBUTES if first[a] != second[a]]
    scores["copied"] = bool(read) and any(read.get(a) == first[a] for a in differ)
    scores["background"] = bool(read) and read.get("background") == first["background"]
    return Sample("reintro", doc.id, doc, second, read, scores)


def in_words(doc: Document, source: str) -> str:
    """The ``source`` ("prompt" or "generated") segments of ``doc`` in reading order, images as
    ``[image]``, joined by " / "."""
    return " / ".join(seg.text or "[image]" for seg in doc.segments if seg.source == source)


def score_story(doc: Document, truth: dict) -> Sample:
    """Each generated image against the state its preceding sentences describe (an introduction
    sets the object, a change one attribute); each generated sentence against the grammar
    (``grammar``: any ShapeStories sentence) and the story (``changes``: a valid change, what a
    story goes on with — it names the current object's shape and gives the attribute a new value,
    so "The triangle grows." after a square, or after a large triangle, is no change); each image
    after the first against the first one's background (no sentence names it)."""
    state = dict(truth["frames"][0])
    image_ok, grammar_ok, change_ok, background_ok = [], [], [], []
    first_background = None
    for seg in doc.segments:
        if seg.source != "generated":
            continue
        if seg.type == "text" and seg.text:
            for sentence in _SENTENCE_END.split(seg.text.strip()):
                parsed = parse_sentence(sentence)
                grammar_ok.append(parsed is not None)
                change_ok.append(parsed is not None and parsed["kind"] == "change" and parsed["subject"] == state["shape"]
                                 and parsed[parsed["change"]] != state[parsed["change"]])
                if parsed is not None:
                    state = apply_change(state, parsed)
        elif seg.type == "image" and seg.image is not None:
            read = read_image(seg.image)
            image_ok.append(score_attributes(read, state)["joint"])
            background = read.get("background") if read else None
            if len(image_ok) == 1:
                first_background = background
            else:
                background_ok.append(background is not None and background == first_background)
    scores = {"image_match": _mean(image_ok), "grammar": _mean(grammar_ok), "changes": _mean(change_ok),
              "background": _mean(background_ok), "images": len(image_ok), "later_images": len(background_ok),
              "sentences": len(grammar_ok)}
    return Sample("story", doc.id, doc, truth["frames"][0], None, scores, text=in_words(doc, "generated"))


SCORERS = {"t2i": score_t2i, "caption": score_caption, "continuation": score_continuation, "story": score_story,
           "reintro": score_reintro}
JPEG_EVAL = (64, 70)  # TASK@jpeg: the canonical size at the lowest quality the targets cover


def task_variant(task: str) -> tuple[str, dict[str, int]] | None:
    """``caption@96`` → ("caption", {"input_size": 96}); ``caption@jpeg`` → 64 px at JPEG quality
    70; a plain task → (task, {}); None for a name that is not a task."""
    base, at, variant = task.partition("@")
    if base not in TASKS:
        return None
    if not at:
        return base, {}
    if base not in ("caption", "continuation"):
        return None  # only these tasks are given frames
    if variant == "jpeg":
        return base, {"input_size": JPEG_EVAL[0], "jpeg": JPEG_EVAL[1]}
    if variant.isdigit() and 32 <= int(variant) <= 512:
        return base, {"input_size": int(variant)}
    return None


def evaluate(model, tasks: list[str], *, n: int = 64, seed: int = 0, settings: dict[str, Any] | None = None,
             checkpoint: str | None = None, progress=None) -> dict[str, TaskResult]:
    """Run each task on ``n`` fresh prompts; return per-task metrics and the scored samples."""
    from ..generation.api import make_settings
    from ..generation.generator import Generator

    unknown = [t for t in tasks if task_variant(t) is None]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}, zeroshot, fewshot, "
                         "retrieval; caption and continuation also as TASK@SIZE (given frames drawn at "
                         "32-512 px) or TASK@jpeg (64 px, JPEG quality 70)")
    s = make_settings(model, settings or {})
    gen = Generator(model, checkpoint=checkpoint)
    size = model.cfg.data.image_size
    out: dict[str, TaskResult] = {}
    for task in tasks:
        base, frames = task_variant(task)
        prompts = eval_prompts(base, n, seed, size, **frames)
        t0 = time.perf_counter()
        samples: list[Sample] = []
        for i, doc in gen.generate(prompts, s):
            if isinstance(doc, Exception):
                raise doc
            samples.append(SCORERS[base](doc, prompts[i].meta["shapes"]))
            if progress is not None:
                progress()
        samples.sort(key=lambda x: x.id)
        if task == "story":
            metrics = {k: round(sum(x.scores[k] * x.scores[w] for x in samples) / max(1, sum(x.scores[w] for x in samples)), 4)
                       for k, w in (("image_match", "images"), ("background", "later_images"),
                                    ("grammar", "sentences"), ("changes", "sentences"))}
            metrics["images_per_story"] = round(sum(x.scores["images"] for x in samples) / max(1, len(samples)), 3)
        else:
            keys = (*ATTRIBUTES, "joint") + (("background",) if base in ("continuation", "reintro") else ()) \
                + (("copied",) if base == "reintro" else ()) \
                + (("grammar",) if base == "caption" else ())
            metrics = _summary(samples, keys)
        out[task] = TaskResult(task, metrics, samples, round(time.perf_counter() - t0, 2))
    return out
