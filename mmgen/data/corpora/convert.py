"""``mmgen data convert``: a public corpus, read in place, written as our JSONL documents.

Images from a local folder (vist, mmc4, obelics) are checked (fully decoded) and written as
paths relative to the output file's folder; images held inside shards (webdataset) are
written, bytes unchanged, to ``<out stem>-images/`` beside it. A record that can't be used is
reported as ``file:line`` (or ``shard:member``) and left out; the summary counts them by kind.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmgen.data.corpora import SOURCE_KINDS, source_class, unknown_kind
from mmgen.data.documents import Document, DocumentError, safe_id

# what a problem is, for the summary: the first phrase of its message that matches
_KINDS = (("not valid JSON", "not JSON"), ("does not decode", "undecodable image"),
          ("corrupt image", "undecodable image"), ("not an image", "undecodable image"),
          ("not found", "missing image"), ("no image", "missing image"), ("out of range", "index out of range"),
          ("truncated", "truncated shard"), ("column", "wrong columns"), ("parquet", "unreadable file"))


def problem_kind(p: DocumentError | str) -> str:
    text = str(p)
    return next((name for phrase, name in _KINDS if phrase in text), "other")


@dataclass
class ConvertReport:
    out: Path
    documents: int = 0
    images: int = 0
    problems: list[DocumentError] = field(default_factory=list)  # records left out
    dropped: list[DocumentError] = field(default_factory=list)  # missing images skipped (--skip-missing)

    def summary(self) -> str:
        kinds = Counter(problem_kind(p) for p in self.problems)
        parts = [f"wrote {self.documents} document(s) with {self.images} image(s) to {self.out}"]
        if self.problems:
            parts.append(f"{len(self.problems)} record(s) left out ("
                         + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")
        if self.dropped:
            parts.append(f"{len(self.dropped)} missing image(s) skipped")
        return "; ".join(parts)


def build_reader(kind: str, src: Path, *, images: Path | None = None, skip_missing: bool = False,
                 min_sim: float = 0.24):
    """The registered reader of ``kind`` over ``src`` (``ValueError`` for a kind convert can't read)."""
    from mmgen.config import SourceConfig

    if kind not in SOURCE_KINDS or not SOURCE_KINDS[kind].convertible:
        raise ValueError(unknown_kind(kind, convertible=True))
    cfg = SourceConfig(kind=kind, path=str(src), images=str(images) if images else None,
                       skip_missing=skip_missing, min_sim=min_sim)
    reader = source_class(kind)(cfg)
    reader.decode = False  # webdataset: keep the bytes, write them as they are
    return reader


def convert(kind: str, src: Path, out: Path, *, images: Path | None = None, skip_missing: bool = False,
            min_sim: float = 0.24, progress: Callable[[int], None] | None = None) -> ConvertReport:
    """Convert corpus ``src`` of ``kind`` into ``out`` (JSONL); see the module docstring.

    Raises ``DocumentError`` when ``src`` can't be read at all, ``ValueError`` for an unknown kind.
    """
    from mmgen.data.media import media_problem

    reader = build_reader(kind, src, images=images, skip_missing=skip_missing, min_sim=min_sim)
    report = ConvertReport(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    media = out.parent / f"{out.stem}-images"
    base = out.parent.absolute()
    seen: Counter = Counter()
    checked: dict[str, str | None] = {}
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for record in reader.documents():
            report.dropped += reader.take_notes()
            if progress:
                progress(1)
            if isinstance(record, DocumentError):
                report.problems.append(record)
                continue
            try:
                line = _document_json(record, base, media, checked, media_problem)
            except DocumentError as e:
                report.problems.append(e)
                continue
            seen[record.id] += 1
            if seen[record.id] > 1:  # ids name output folders: keep them unique
                line["id"] = safe_id(f"{record.id}-{seen[record.id]}")
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            report.documents += 1
            report.images += sum(s["type"] == "image" for s in line["segments"])
    os.replace(tmp, out)
    return report


def _document_json(doc: Document, base: Path, media: Path, checked: dict, media_problem) -> dict:
    segments = []
    for k, seg in enumerate(doc.segments, 1):
        if seg.type == "text":
            segments.append({"type": "text", "text": seg.text})
            continue
        if seg.image is not None:  # bytes from a shard (InlineImage), already decoded once
            media.mkdir(parents=True, exist_ok=True)
            path = media / f"{doc.id}-{k}{seg.image.ext}"
            path.write_bytes(seg.image.data)
        else:
            path = Path(seg.path)
            key = str(path)
            if key not in checked:
                checked[key] = media_problem("image", path)
            if checked[key]:
                raise doc.error(f"segment {k}: {checked[key]}")
        try:
            shown = os.path.relpath(path.absolute(), base)
        except ValueError:  # another drive
            shown = str(path.absolute())
        segments.append({"type": "image", "path": Path(shown).as_posix()})
    return {"id": doc.id, "segments": segments, "meta": doc.meta}
