"""ShapeStories v1: procedurally generated illustrated stories, and their exact reader.

The contract lives in ``docs/SHAPESTORIES.md``; in short:

- Images: square RGB canvas of side W (canonical 64, any W >= 32; lengths scale by W/64).
  Flat background (gray, cream, sky, mint; never named in text) and one flat object:
  colour (red, green, blue, yellow, purple, orange), shape (circle, square, triangle),
  size (half-extent s = 7 small / 12 large at W = 64) and position (3x3 grid, centres at
  0.25, 0.5, 0.75 W). Triangle: (cx, cy-s), (cx-s, cy+s), (cx+s, cy+s).
- Rasterisation (ours): a pixel is painted when its centre (x + 0.5, y + 0.5) lies inside
  the shape, boundary included; no antialiasing, so :func:`~mmgen.data.shapes_reader.read_image` is exact. On a few
  small canvases (W = 33-54) a digitised small circle or triangle would read back as another
  shape; there :func:`half_extent` nudges s by at most 0.5 px (see there).
- Sentences: intro ``A {size} {colour} {shape} is {where}.``; changes
  ``The {shape} turns {colour}.``, ``The {shape} moves to the {position}.``,
  ``The {shape} grows.`` / ``The {shape} shrinks.``, ``The {old} becomes a {new}.``
- Stories: 2-4 frames; frame 1 an introduction, each later frame changes exactly one
  attribute to a different value; constant background; per document every frame is
  text-then-image or every frame image-then-text (p = 0.5).
- Ground truth in ``meta["shapes"]``: ``{"version": 1, "order", "image_size", "frames":
  [{shape, colour, size, position, background, change}, ...]}`` (``change`` is None for
  frame 1, else the changed attribute).
- Reading: background = per-channel median of the outer 2-pixel ring, nearest table colour;
  object pixels are farther than 60 (Euclidean RGB) from that table colour; colour = nearest
  table colour to their median; position = grid cell of their centroid (pixel centres);
  size small when half the larger bounding-box side (in pixels) < 9.5 W/64; shape from the
  fill ratio (object pixels / bounding-box pixels): > 0.9 square, > 0.65 circle, else
  triangle.

Seeds: training stories come from ``random.Random(seed)`` (an int seed); evaluation prompts
from ``random.Random("mmgen-shapes-eval/{task}/{seed}")`` (a string seed, hashed by SHA-512),
so the two streams never share a generator state. The attribute space is small (1296 frames),
so individual frames do recur between training and evaluation; only the streams differ.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmgen.data.documents import Document, Segment

VERSION = 1

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (210, 210, 210),
    "cream": (245, 235, 200),
    "sky": (195, 220, 245),
    "mint": (205, 240, 205),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
HALF_EXTENT = {"small": 7.0, "large": 12.0}  # at W = 64
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
WHERE = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)  # fmt: skip
ATTRIBUTES = ("shape", "colour", "size", "position")  # the object; scored jointly
CHANGES = ATTRIBUTES  # a later frame changes exactly one of these
TASKS = ("t2i", "caption", "continuation", "story", "reintro")

OBJECT_DISTANCE = 60.0  # object pixels are farther than this from the background (RGB)
SIZE_THRESHOLD = 9.5  # at W = 64: small when half the larger bbox side is under this
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.65
MIN_SIZE = 32


# ---------------------------------------------------------------------------------------------
# frames and rendering


@dataclass(frozen=True)
class Frame:
    """One picture: the object's attributes and the background, all by name."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, tuple(BACKGROUNDS)),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Frame:
        return cls(**{k: d[k] for k in ("shape", "colour", "size", "position", "background")})

    def replace(self, **changes: str) -> Frame:
        return Frame(**{**self.to_dict(), **changes})


def all_frames() -> Iterator[Frame]:
    """Every frame of the contract: 6 colours x 3 shapes x 2 sizes x 9 positions x 4 backgrounds."""
    for background in BACKGROUNDS:
        for colour in COLOURS:
            for shape in SHAPES:
                for size in SIZES:
                    for position in POSITIONS:
                        yield Frame(shape, colour, size, position, background)


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"ShapeStories images must be at least {MIN_SIZE} px wide, got {size}")


def _centre(position: str, size: int) -> tuple[float, float]:
    k = POSITIONS.index(position)
    row, col = divmod(k, 3)
    return (0.25 + 0.25 * col) * size, (0.25 + 0.25 * row) * size


def _mask(shape: str, s: float, cx: float, cy: float, size: int) -> np.ndarray:
    """(W, W) bool: pixels whose centres lie inside the shape of half-extent ``s`` (boundary in)."""
    c = np.arange(size, dtype=np.float64) + 0.5
    dx = c[None, :] - cx  # (1, W)
    dy = c[:, None] - cy  # (W, 1)
    eps = 1e-9  # keep exact-boundary pixel centres inside despite float rounding
    if shape == "circle":
        return dx * dx + dy * dy <= s * s + eps
    if shape == "square":
        return (np.abs(dx) <= s + eps) & (np.abs(dy) <= s + eps)
    if shape == "triangle":
        # apex (cx, cy - s), base y = cy + s from cx - s to cx + s: half-width grows by 1/2 per row
        return (dy <= s + eps) & (np.abs(dx) <= (dy + s) / 2 + eps)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


@functools.lru_cache(maxsize=4096)
def half_extent(shape: str, size_name: str, position: str, size: int = 64) -> float:
    """The half-extent in pixels that the renderer uses: s = 7 or 12 times W/64.

    On a few small canvases (W = 33-54) the digitised small circle or triangle would read back
    as another shape; there s is nudged by the smallest multiple of 0.01 px (at most 0.5 px)
    that reads back right (<= 0.29 px). Checked for every W from 32 to 1024: only W = 33, 34,
    35, 37, 40 and 54 need a nudge; W = 32 and 64 render with the exact s.
    """
    _check_size(size)
    s = HALF_EXTENT[size_name] * size / 64
    cx, cy = _centre(position, size)
    want = (shape, size_name, position)
    for k in range(51):
        for candidate in (s - 0.01 * k, s + 0.01 * k) if k else (s,):
            if _read_mask(_mask(shape, candidate, cx, cy, size), size, size) == want:
                return candidate
    raise AssertionError(f"no half-extent near {s} renders a readable {want} at W = {size}")


def object_mask(shape: str, size_name: str, position: str, size: int = 64) -> np.ndarray:
    """(W, W) bool mask of the object's pixels, as :func:`render_frame` paints them."""
    s = half_extent(shape, size_name, position, size)
    cx, cy = _centre(position, size)
    return _mask(shape, s, cx, cy, size)


def render_array(frame: Frame, size: int = 64) -> np.ndarray:
    """The frame as a (W, W, 3) uint8 array."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[frame.background]
    img[object_mask(frame.shape, frame.size, frame.position, size)] = COLOURS[frame.colour]
    return img


def render_frame(frame: Frame, size: int = 64) -> Image.Image:
    """The frame as a W x W RGB ``PIL.Image``."""
    return Image.fromarray(render_array(frame, size), mode="RGB")


# ---------------------------------------------------------------------------------------------
# sentences


def intro_sentence(frame: Frame) -> str:
    """``A {size} {colour} {shape} is {where}.``"""
    where = WHERE[POSITIONS.index(frame.position)]
    return f"A {frame.size} {frame.colour} {frame.shape} is {where}."


def change_sentence(old: Frame, new: Frame) -> str:
    """The sentence for a change of exactly one object attribute from ``old`` to ``new``."""
    changed = changed_attribute(old, new)
    if changed == "colour":
        return f"The {old.shape} turns {new.colour}."
    if changed == "position":
        return f"The {old.shape} moves to the {new.position}."
    if changed == "size":
        return f"The {old.shape} {'grows' if new.size == 'large' else 'shrinks'}."
    return f"The {old.shape} becomes a {new.shape}."


def changed_attribute(old: Frame, new: Frame) -> str:
    """The one object attribute that differs between two frames (ValueError otherwise)."""
    if old.background != new.background:
        raise ValueError("the background must stay the same within a story")
    diff = [a for a in CHANGES if getattr(old, a) != getattr(new, a)]
    if len(diff) != 1:
        raise ValueError(f"exactly one attribute must change between frames, got {diff or 'none'}")
    return diff[0]


_SHAPE_RE = "|".join(SHAPES)
_COLOUR_RE = "|".join(COLOURS)
_INTRO = re.compile(
    rf"a ({'|'.join(SIZES)}) ({_COLOUR_RE}) ({_SHAPE_RE}) is ({'|'.join(WHERE)})\."
)
_TURNS = re.compile(rf"the ({_SHAPE_RE}) turns ({_COLOUR_RE})\.")
_MOVES = re.compile(rf"the ({_SHAPE_RE}) moves to the ({'|'.join(POSITIONS)})\.")
_RESIZE = re.compile(rf"the ({_SHAPE_RE}) (grows|shrinks)\.")
_BECOMES = re.compile(rf"the ({_SHAPE_RE}) becomes a ({_SHAPE_RE})\.")


def parse_sentence(text: str) -> dict[str, str] | None:
    """Parse one sentence of the grammar (case and extra whitespace ignored); None otherwise.

    Returns, for an introduction, ``{"kind": "intro", shape, colour, size, position}``; for a
    change, ``{"kind": "change", "change": attribute, "subject": shape named, attribute: new
    value}`` plus ``"shape"`` (the subject's shape, or the new shape for a shape change).
    """
    t = " ".join(text.split()).lower()
    if m := _INTRO.fullmatch(t):
        size, colour, shape, where = m.groups()
        pos = POSITIONS[WHERE.index(where)]
        return {"kind": "intro", "shape": shape, "colour": colour, "size": size, "position": pos}
    if m := _TURNS.fullmatch(t):
        return _change("colour", m[1], m[2])
    if m := _MOVES.fullmatch(t):
        return _change("position", m[1], m[2])
    if m := _RESIZE.fullmatch(t):
        return _change("size", m[1], "large" if m[2] == "grows" else "small")
    if (m := _BECOMES.fullmatch(t)) and m[1] != m[2]:
        return _change("shape", m[1], m[2])
    return None


def foreign_sentences(text: str) -> list[str]:
    """The sentences of ``text`` that are not ShapeStories sentences (what the bundled model knows)."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return [s for s in sentences if parse_sentence(s) is None]


def _change(attr: str, subject: str, value: str) -> dict[str, str]:
    return {"kind": "change", "change": attr, "subject": subject, "shape": subject, attr: value}


def apply_change(frame_attrs: dict[str, Any], parsed: dict[str, str]) -> dict[str, Any]:
    """The attributes after ``parsed`` (from :func:`parse_sentence`); the input is not modified.

    An introduction sets all four object attributes; a change sets only the changed one.
    Other keys (e.g. ``background``) are kept.
    """
    out = dict(frame_attrs)
    if parsed["kind"] == "intro":
        out.update({a: parsed[a] for a in ATTRIBUTES})
    else:
        out[parsed["change"]] = parsed[parsed["change"]]
    return out


# ---------------------------------------------------------------------------------------------
# stories


def random_frame(rng: random.Random) -> Frame:
    """A uniformly random frame."""
    return Frame(
        shape=rng.choice(SHAPES),
        colour=rng.choice(tuple(COLOURS)),
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        background=rng.choice(tuple(BACKGROUNDS)),
    )


def random_change(rng: random.Random, frame: Frame) -> tuple[str, Frame]:
    """Change one uniformly chosen attribute of ``frame`` to a different, uniformly chosen value."""
    attr = rng.choice(CHANGES)
    values = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS}[attr]
    new = rng.choice([v for v in values if v != getattr(frame, attr)])
    return attr, frame.replace(**{attr: new})


def random_frames(rng: random.Random, n: int) -> tuple[list[Frame], list[str | None]]:
    """``n`` frames of one story and the change of each (None for the first)."""
    frames, changes = [random_frame(rng)], [None]
    for _ in range(n - 1):
        attr, frame = random_change(rng, frames[-1])
        frames.append(frame)
        changes.append(attr)
    return frames, changes


def _truth(
    frames: list[Frame], changes: list[str | None], size: int, **extra: Any
) -> dict[str, Any]:
    return {
        "version": VERSION,
        **extra,
        "image_size": size,
        "frames": [{**f.to_dict(), "change": c} for f, c in zip(frames, changes)],
    }


def frame_sentence(frames: list[Frame], k: int) -> str:
    """The sentence of frame ``k`` (0-based): an introduction for k = 0, else a change."""
    return intro_sentence(frames[0]) if k == 0 else change_sentence(frames[k - 1], frames[k])


# frames as users' files arrive: drawn at another size (the loader resizes them), PNG or JPEG
INPUT_SIZES = (32, 48, 64, 96, 128)
JPEG_QUALITY = (70, 95)


def render_as_arrived(frame: Frame, size: int, rng: random.Random, variety: float = 0.0) -> Image.Image:
    """``frame`` at ``size``; with probability ``variety``, drawn instead at a size from
    :data:`INPUT_SIZES` and, half of those times, saved as JPEG (quality in :data:`JPEG_QUALITY`)
    and read back. The loader (``collate.image_to_tensor``) then resizes it to the model's size,
    so training sees the frames users hand in. ``variety`` 0 draws nothing from ``rng``."""
    if variety <= 0 or rng.random() >= variety:
        return render_frame(frame, size)
    drawn = render_frame(frame, rng.choice(INPUT_SIZES))
    if rng.random() < 0.5:
        return jpeg_round_trip(drawn, rng.randint(*JPEG_QUALITY))
    return drawn


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """``image`` saved as JPEG at ``quality`` and decoded again (RGB)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def make_story(rng: random.Random, *, size: int = 64, story_id: str, variety: float = 0.0) -> Document:
    """One story of 2-4 frames, images in memory (``Segment.image``), ground truth in meta;
    ``variety``: see :func:`render_as_arrived`."""
    _check_size(size)
    n = rng.randint(2, 4)
    order = rng.choice(("text-image", "image-text"))
    frames, changes = random_frames(rng, n)
    segments: list[Segment] = []
    for k, frame in enumerate(frames):
        text = Segment("text", text=frame_sentence(frames, k))
        image = Segment("image", image=render_as_arrived(frame, size, rng, variety))
        segments += [text, image] if order == "text-image" else [image, text]
    return Document(story_id, segments, meta={"kind": "story", "shapes": _truth(frames, changes, size, order=order)})


def make_pairs(rng: random.Random, *, size: int = 64, doc_id: str, text_first: float = 0.75,
               variety: float = 0.0) -> Document:
    """2-4 independent frames, each with its introduction sentence: a document of caption pairs.

    Not a story (no object carries over from one pair to the next); a training source that gives
    the decoder many images whose sentence describes them fully, and examples of independent
    pairs in one context (few-shot captioning). The order, sentence then image (drawing) with
    probability ``text_first`` or image then sentence (captioning), is drawn per document.
    The background is drawn once per document, as in a story: in every ShapeStories document an
    image's background is the one before it, so the decoder's synchronizer has one rule to learn.
    """
    _check_size(size)
    n = rng.randint(2, 4)
    order = "text-image" if rng.random() < text_first else "image-text"
    background = rng.choice(tuple(BACKGROUNDS))
    frames = [random_frame(rng).replace(background=background) for _ in range(n)]
    segments: list[Segment] = []
    for frame in frames:
        text = Segment("text", text=intro_sentence(frame))
        image = Segment("image", image=render_as_arrived(frame, size, rng, variety))
        segments += [text, image] if order == "text-image" else [image, text]
    return Document(doc_id, segments,
                    meta={"kind": "captions", "shapes": _truth(frames, [None] * n, size, order=order, pairs=True)})


def stream_stories(seed: int, size: int = 64, *, prefix: str = "story") -> Iterator[Document]:
    """An endless, deterministic stream of stories with ids ``{prefix}-{i:06d}``."""
    rng = random.Random(seed)
    i = 0
    while True:
        yield make_story(rng, size=size, story_id=f"{prefix}-{i:06d}")
        i += 1


def save_documents(
    docs: Iterable[Document],
    out_dir: str | Path,
    *,
    filename: str = "documents.jsonl",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write documents as JSONL in ``out_dir``, in-memory images as ``images/{id}-{k}.png``.

    k counts a document's images from 1; image paths are relative to ``out_dir``. PNGs carry
    no metadata, so the same documents give byte-identical files. The documents are not
    modified. ``progress(done)`` is called after each document. Returns the JSONL path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / filename
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, doc in enumerate(docs):
            record = doc.to_json()
            k = 0
            for seg, seg_json in zip(doc.segments, record["segments"]):
                if seg.type == "image" and seg.image is not None:
                    k += 1
                    rel = f"images/{doc.id}-{k}.png"
                    seg.image.save(out / rel, format="PNG", optimize=False, compress_level=6)
                    seg_json["path"] = rel
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(i + 1)
    return path


def write_corpus(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 64,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the first ``n`` stories of ``stream_stories(seed, size)`` to ``out_dir``.

    Writes ``out_dir/documents.jsonl`` and ``out_dir/images/{id}-{k}.png`` (see
    :func:`save_documents`); the same arguments give byte-identical files.
    ``progress(done, n)`` is called after each story. Returns the JSONL path.
    """
    docs = itertools.islice(stream_stories(seed, size), n)
    report = None if progress is None else (lambda done: progress(done, n))
    return save_documents(docs, out_dir, progress=report)


# ---------------------------------------------------------------------------------------------
# reading an object mask back (the full reader: mmgen/data/shapes_reader.py)


def _read_mask(mask: np.ndarray, w: int, h: int) -> tuple[str, str, str]:
    """(shape, size, position) of a non-empty (H, W) object mask, by the contract's rule."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # centroid of pixel centres
    col, row = min(2, int(3 * cx / w)), min(2, int(3 * cy / h))
    bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)  # bounding box, px
    size = "small" if max(bw, bh) / 2 < SIZE_THRESHOLD * w / 64 else "large"
    fill = len(xs) / (bw * bh)
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return shape, size, POSITIONS[3 * row + col]
