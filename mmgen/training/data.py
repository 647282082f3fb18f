"""Training data: sources mixed by weight, drawn as a pure function of (seed, step, micro, rank).

Every micro-batch is drawn from its own generator seeded by (seed, step, micro-step, rank), so
the data position *is* the step: a resumed run sees exactly the documents a straight run
would have seen, with no iterator state to save, and each process of a distributed run
draws different documents.

Sources (``data.sources``):
- ``shapes``: ShapeStories rendered on the fly at ``data.image_size``;
- ``shapes_pairs``: independent ShapeStories frames with their introduction sentences,
  2-4 per document, sentence first with probability 0.75 (``mmgen.data.shapes.make_pairs``);
- ``shapes_video``: ShapeStories told as text and a clip (``mmgen.data.shapes_video``), the
  clip's key frames rendered on the fly in memory, no MP4 written;
- ``jsonl``: a JSONL file of documents, or a folder of them (docs/DOCUMENTS.md);
- ``pairs``: image–caption pairs, either as two-segment documents or as compact
  ``{"image": PATH, "caption": TEXT}`` lines; each is shown in a random order (text then
  image trains drawing, image then text trains captioning);
- ``vist``, ``mmc4``, ``obelics``, ``webdataset``: public corpora read in place
  (:mod:`mmgen.data.corpora`), a record drawn uniformly through a light index.

Which class reads a kind is the registry :data:`mmgen.data.corpora.SOURCE_KINDS`. A bad
record (a line that is not JSON, an image that does not decode, ...) is reported with its
``file:line`` and another is drawn from the same generator, so skipping stays deterministic;
with ``data.strict: true`` the first one stops the run. :mod:`mmgen.training.loader` builds
the micro-batches in ``data.num_workers`` worker processes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..config import DataConfig, SourceConfig
from ..data.corpora import SOURCE_KINDS, source_class, unknown_kind
from ..data.documents import Document, DocumentError, Segment, document_from_json, iter_records, safe_id
from ..data.shapes import make_pairs, make_story
from ..data.shapes_video import make_video_story


class DataError(ValueError):
    """A training source cannot be used."""


class ShapesSource:
    def __init__(self, cfg: SourceConfig, image_size: int, input_variety: float = 0.0):
        self.seed = cfg.seed
        self.image_size = image_size
        self.variety = input_variety

    def sample(self, rng: random.Random, name: str) -> Document:
        return make_story(rng, size=self.image_size, story_id=name, variety=self.variety)


class ShapesPairsSource(ShapesSource):
    def sample(self, rng: random.Random, name: str) -> Document:
        return make_pairs(rng, size=self.image_size, doc_id=name, variety=self.variety)


class ShapesVideoSource(ShapesSource):
    def sample(self, rng: random.Random, name: str) -> Document:
        return make_video_story(rng, size=self.image_size, story_id=name)


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{path}: the folder holds no .jsonl files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [path]


class JsonlSource:
    """Documents read once (images are loaded lazily, when a document is drawn)."""

    def __init__(self, cfg: SourceConfig):
        self.docs: list[Document] = []
        problems: list[DocumentError] = []
        for f in _jsonl_files(Path(cfg.path)):
            for rec in self._records(f):
                (problems if isinstance(rec, DocumentError) else self.docs).append(rec)
        if problems:
            shown = "\n  ".join(str(p) for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise DataError(f"{len(problems)} bad record(s) in {cfg.path} "
                            f"(run `mmgen data validate`):\n  {shown}{more}")
        if not self.docs:
            raise DataError(f"{cfg.path}: no documents")

    def _records(self, f: Path):
        return iter_records(f)

    def sample(self, rng: random.Random, name: str) -> Document:
        return self.docs[rng.randrange(len(self.docs))]


class PairsSource(JsonlSource):
    """Image–caption pairs; the order of image and text is drawn per sample."""

    def _records(self, f: Path):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield DocumentError(f, i, f"not valid JSON: {e.msg}")
                    continue
                default_id = safe_id(f"{f.stem}-{i:06d}")
                if isinstance(obj, dict) and "segments" not in obj and "image" in obj:
                    caption = obj.get("caption", obj.get("text"))
                    if not isinstance(obj["image"], str) or not isinstance(caption, str):
                        yield DocumentError(f, i, 'a pair needs "image" (a path) and "caption" (a string)')
                        continue
                    obj = {"id": obj.get("id", default_id),
                           "segments": [{"type": "image", "path": obj["image"]}, {"type": "text", "text": caption}]}
                try:
                    doc = document_from_json(obj, file=f, line=i, default_id=default_id)
                except DocumentError as e:
                    yield e
                    continue
                kinds = sorted(s.type for s in doc.segments)
                if kinds != ["image", "text"] or any(s.is_placeholder for s in doc.segments):
                    yield DocumentError(f, i, "a pair must hold exactly one image and one text")
                    continue
                yield doc

    def sample(self, rng: random.Random, name: str) -> Document:
        doc = super().sample(rng, name)
        image = next(s for s in doc.segments if s.type == "image")
        text = next(s for s in doc.segments if s.type == "text")
        order = [text, image] if rng.random() < 0.5 else [image, text]
        return Document(doc.id, order, {"kind": "captions", **doc.meta}, doc.base_dir, doc.origin)


MAX_BAD_IN_A_ROW = 100  # a source this bad is broken, not noisy: stop and say so


def build_source(cfg: SourceConfig, data: DataConfig):
    """The reader of ``cfg.kind`` (the registry :data:`~mmgen.data.corpora.SOURCE_KINDS`)."""
    if cfg.kind not in SOURCE_KINDS:
        raise DataError(f"data.sources: {unknown_kind(cfg.kind)}")
    cls = source_class(cfg.kind)
    try:
        if cfg.kind.startswith("shapes"):
            return cls(cfg, data.image_size, data.input_variety)
        return cls(cfg) if cfg.kind in ("jsonl", "pairs") else cls(cfg, data)
    except DocumentError as e:
        raise DataError(f"data.sources: {e}") from None


class DocumentStream:
    """Draws the documents of any (step, micro-step, rank) deterministically.

    Problems met on the way (and those found while indexing the sources) are kept until
    :meth:`take_problems`; with ``strict`` the first one raises :class:`DataError`.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.sources = [build_source(s, cfg) for s in cfg.sources]
        self.weights = [s.weight for s in cfg.sources]
        self.seeds = [s.seed for s in cfg.sources]
        self.kinds = [s.kind for s in cfg.sources]
        self.seed = seed
        self.strict = cfg.strict
        self._problems: list[DocumentError] = []
        for src in self.sources:
            for p in getattr(src, "problems", []):
                self.report(p)

    def rng(self, step: int, micro: int = 0, rank: int = 0) -> random.Random:
        return random.Random(f"mmgen-train/{self.seed}/{step}/{micro}/{rank}")

    def report(self, problem: DocumentError) -> None:
        """Count a bad record; under ``data.strict`` stop at it."""
        if self.strict:
            raise DataError(f"{problem} (data.strict is on; set it off to skip bad records)")
        self._problems.append(problem)

    def take_problems(self) -> list[DocumentError]:
        """The problems reported since the last call."""
        out, self._problems = self._problems, []
        return out

    def _sample(self, j: int, rng: random.Random, name: str) -> Document:
        src = self.sources[j]
        for _ in range(MAX_BAD_IN_A_ROW):
            try:
                doc = src.sample(rng, name)
            except DocumentError as e:
                self.report(e)
                continue
            finally:
                for note in getattr(src, "take_notes", list)():
                    self.report(note)
            return doc
        raise DataError(f"data.sources[{j}] ({self.kinds[j]}): {MAX_BAD_IN_A_ROW} bad records in a row, "
                        f"the last: {self._problems[-1]}")

    def draw(self, rng: random.Random, k: int) -> list[Document]:
        """The next ``k`` documents from ``rng``: a source by weight, then a document from it."""
        docs = []
        for i in range(k):
            j = rng.choices(range(len(self.sources)), weights=self.weights)[0]
            sub = random.Random(f"{self.seeds[j]}/{rng.getrandbits(64)}")
            docs.append(self._sample(j, sub, name=f"train-{i}"))
        return docs

    def documents(self, step: int, micro: int = 0, rank: int = 0) -> Iterator[Document]:
        """The endless document stream of one micro-batch (the collator takes what it needs)."""
        rng = self.rng(step, micro, rank)
        while True:
            yield from self.draw(rng, 8)
