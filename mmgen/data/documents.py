"""Interleaved documents: the one JSONL format for data, prompts and results (DOCUMENTS.md).

A :class:`Document` is an id, a list of :class:`Segment` (text, image or video) and free-form
``meta``. A segment with no content is a placeholder: a place for generation to fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEGMENT_TYPES = ("text", "image", "video")
SOURCES = ("prompt", "generated")


class DocumentError(ValueError):
    """A problem in an input file, located by file and line (1-based; 0 = the file itself)."""

    def __init__(self, file: str | Path, line: int, message: str):
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


@dataclass
class Segment:
    """One piece of a document.

    ``path`` is kept as written in the file; :meth:`Document.resolve` makes it absolute
    against the document's ``base_dir``. ``image`` holds an in-memory ``PIL.Image`` (the
    ShapeStories stream and generation use it instead of files).
    """

    type: str
    text: str | None = None
    path: str | None = None
    frames: int | None = None  # video: how many frames, evenly spaced
    fps: float | None = None  # video: sample at this rate instead
    source: str | None = None  # "prompt" | "generated" in generation results
    image: Any = None  # PIL.Image.Image, never serialised

    @property
    def is_placeholder(self) -> bool:
        if self.type == "text":
            return self.text is None
        return self.path is None and self.image is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for key in ("text", "path", "frames", "fps", "source"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class Document:
    id: str
    segments: list[Segment]
    meta: dict[str, Any] = field(default_factory=dict)
    base_dir: Path | None = None  # folder that relative paths are resolved against
    origin: str | None = None  # "file:line" the document was read from, for messages

    def resolve(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute() or self.base_dir is None:
            return p
        return self.base_dir / p

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.segments if s.type == "text" and s.text is not None]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "segments": [s.to_json() for s in self.segments], "meta": self.meta}
