"""What every corpus reader shares: random access by index, image look-up, located problems.

A corpus source reads a public corpus in place. Building it makes a light index (line
offsets, parquet row groups, tar members) and never loads the corpus whole; ``read(i)``
turns record ``i`` into a :class:`~mmgen.data.documents.Document` or raises a
:class:`~mmgen.data.documents.DocumentError` that names ``file:line`` (or shard and member).
Problems found while indexing (a truncated shard, a file of the wrong shape) are kept in
``problems``; images dropped under ``skip_missing`` are reported through ``take_notes``.

Open files are per process (DataLoader workers reopen them) and never pickled.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mmgen.data.documents import Document, DocumentError, Segment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


class CorpusSource:
    """Base class: subclasses fill ``self._size`` in ``__init__`` and implement ``read``."""

    kind = "corpus"
    watch: Callable[[str], None] | None = None  # set in data workers: told where each read starts

    def __init__(self, cfg: Any, data: Any = None):
        if not cfg.path:
            raise DocumentError(self.kind, 0, f"a `{self.kind}` source needs a `path`")
        self.path = Path(cfg.path)
        self.images = Path(cfg.images) if getattr(cfg, "images", None) else None
        self.skip_missing = bool(getattr(cfg, "skip_missing", False))
        self.min_sim = float(getattr(cfg, "min_sim", 0.24))
        self.problems: list[DocumentError] = []  # found while indexing
        self._notes: list[DocumentError] = []  # images dropped by skip_missing since the last take
        self._size = 0
        self._files: dict[Path, IO[bytes]] = {}
        self._pid = os.getpid()

    # -- random access ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def read(self, i: int) -> Document:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, rng: random.Random, name: str) -> Document:
        """A document drawn uniformly (``name`` is unused: corpus documents keep their own ids)."""
        if not self._size:
            raise DocumentError(self.path, 0, f"no {self.kind} documents")
        i = rng.randrange(self._size)
        if CorpusSource.watch is not None:
            CorpusSource.watch(self.where(i))
        return self.read(i)

    def where(self, i: int) -> str:
        """Where record ``i`` is, for a worker's last words (subclasses name the file and line)."""
        return f"{self.path} record {i}"

    def documents(self) -> Iterator[Document | DocumentError]:
        """Every record in corpus order: its document, or the problem that stops it."""
        yield from self.problems
        for i in range(self._size):
            try:
                yield self.read(i)
            except DocumentError as e:
                yield e

    def take_notes(self) -> list[DocumentError]:
        """Images dropped under ``skip_missing`` since the last call."""
        notes, self._notes = self._notes, []
        return notes

    # -- files --------------------------------------------------------------------------------

    def open(self, path: Path) -> IO[bytes]:
        """``path`` opened for reading, once per process."""
        if os.getpid() != self._pid:  # a forked worker: the parent's handles are not ours
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        return f

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}
        if "_cache" in state:  # a reader's decoded block (a row group, an unzipped shard)
            state["_cache"] = None
        return state

    # -- images -------------------------------------------------------------------------------

    def image_segment(self, names: list[str], where: DocumentError) -> Segment | None:
        """An image segment for the first of ``names`` found in the image folder.

        ``names`` are file names with or without an extension (``IMAGE_EXTENSIONS`` are
        tried). A missing image is dropped (None, and a note) under ``skip_missing``, else
        it fails the document: ``DocumentError`` at ``where``'s file and line.
        """
        if self.images is None:
            raise DocumentError(where.file, where.line,
                                f"{where.message}: no image folder given (`images:` / --images)")
        for name in names:
            if not name or "/" in name or "\\" in name or name in (".", ".."):
                continue
            stem = self.images / name
            candidates = [stem] if Path(name).suffix.lower() in IMAGE_EXTENSIONS else []
            candidates += [self.images / (name + ext) for ext in IMAGE_EXTENSIONS]
            for c in candidates:
                if c.is_file():
                    return Segment("image", path=str(c.absolute()))
        shown = names[0] if names else "?"
        problem = DocumentError(where.file, where.line,
                                f"{where.message}: image {shown!r} not found in {self.images}")
        if self.skip_missing:
            self._notes.append(DocumentError(problem.file, problem.line, problem.message + " (skipped)"))
            return None
        raise problem


def line_index(f: IO[bytes]) -> tuple[array, array]:
    """(byte offset, 1-based line number) of every non-blank line of a binary file."""
    offsets, lines = array("q"), array("q")
    pos = 0
    for n, raw in enumerate(f, 1):
        if raw.strip():
            offsets.append(pos)
            lines.append(n)
        pos += len(raw)
    return offsets, lines


def files_under(path: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    """``path`` itself, or the files under folder ``path`` whose names end in ``suffixes``, sorted."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
        if not found:
            raise DocumentError(path, 0, f"the folder holds no {what} ({', '.join(suffixes)})")
        return found
    if not path.is_file():
        raise DocumentError(path, 0, "no such file or folder")
    return [path]


def check_document(doc: Document) -> Document:
    """Refuse a document left with nothing to learn from (no segment, or no text and no image)."""
    if not doc.segments:
        raise doc.error("nothing left of the document (no text, no image)")
    return doc
