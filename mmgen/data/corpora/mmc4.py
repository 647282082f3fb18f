"""MMC4 documents: ``docs_shard_{N}_v2.jsonl`` or ``.jsonl.zip``, one document per line.

Fields read (MMC4's layout)::

    {"url": str, "text_list": [sentence, ...],
     "image_info": [{"image_name", "raw_url", "matched_text_index", "matched_sim", ...}, ...],
     "similarity_matrix": [[...]], "could_have_url_duplicate": ...}

Images are not in the files: users download them by ``raw_url`` and keep them under their
``image_name`` in one folder (``images:`` / ``--images``). An image whose ``matched_sim``
reaches ``min_sim`` (0.24 by default, OpenFlamingo's training threshold for CLIP ViT-L/14
similarities) is placed just before its matched sentence; the sentences between two images
form one text segment.

Index: the byte offset of every line. A ``.jsonl.zip`` member is decompressed once to index
it and again (one member cached per process) when drawn from; for random access at scale,
``mmgen data convert`` or ``mmgen data shard`` the corpus first.
"""

from __future__ import annotations

import bisect
import json
import zipfile
from array import array
from pathlib import Path
from typing import Any

from mmgen.data.corpora.base import CorpusSource, check_document, files_under, line_index
from mmgen.data.documents import Document, DocumentError, Segment, safe_id

_SUFFIXES = (".jsonl", ".jsonl.zip", ".zip")


def _stem(name: str) -> str:
    name = Path(name).name
    for s in (".zip", ".jsonl"):
        name = name[: -len(s)] if name.endswith(s) else name
    return name


def mmc4_segments(obj: Any, *, where: DocumentError, min_sim: float,
                  image_for: Any) -> list[Segment]:
    """Segments of one parsed MMC4 record: sentences, each matched image just before its sentence.

    ``image_for(k, info)`` gives the image segment of ``image_info[k]`` or None to drop it.
    Raises ``DocumentError`` at ``where`` for a record of the wrong shape or an image whose
    ``matched_text_index`` is out of range.
    """
    def bad(message: str) -> DocumentError:
        return DocumentError(where.file, where.line, message)

    if not isinstance(obj, dict):
        raise bad("expected a JSON object with `text_list` and `image_info`")
    texts, infos = obj.get("text_list"), obj.get("image_info", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad("`text_list` must be a list of strings")
    if not isinstance(infos, list):
        raise bad("`image_info` must be a list")
    before: dict[int, list[Segment]] = {}
    for k, info in enumerate(infos):
        if not isinstance(info, dict):
            raise bad(f"image_info[{k}] must be an object")
        idx, sim = info.get("matched_text_index"), info.get("matched_sim")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(texts):
            raise bad(f"image_info[{k}]: matched_text_index {idx!r} out of range "
                      f"(text_list has {len(texts)} sentences)")
        if isinstance(sim, (int, float)) and sim < min_sim:
            continue
        seg = image_for(k, info)
        if seg is not None:
            before.setdefault(idx, []).append(seg)
    segments: list[Segment] = []
    words: list[str] = []
    for i, sentence in enumerate(texts):
        if i in before:
            if words:
                segments.append(Segment("text", text=" ".join(words)))
                words = []
            segments += before[i]
        if sentence.strip():
            words.append(" ".join(sentence.split()))
    if words:
        segments.append(Segment("text", text=" ".join(words)))
    return segments


class Mmc4Source(CorpusSource):
    """MMC4 documents from ``path`` (a shard, or a folder of them) and ``images``."""

    kind = "mmc4"

    def __init__(self, cfg: Any, data: Any = None):
        super().__init__(cfg, data)
        # units: (file, zip member or None, offsets, line numbers); `_ends` cumulative counts
        self.units: list[tuple[Path, str | None, array, array]] = []
        self._ends: list[int] = []
        self._cache: tuple[tuple[Path, str], bytes] | None = None
        for f in files_under(self.path, _SUFFIXES, "MMC4 shards"):
            try:
                if f.name.lower().endswith(".zip"):
                    with zipfile.ZipFile(f) as z:
                        for m in z.namelist():
                            if not m.endswith("/"):
                                with z.open(m) as fh:
                                    self._add(f, m, *line_index(fh))
                else:
                    with open(f, "rb") as fh:
                        self._add(f, None, *line_index(fh))
            except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
                self.problems.append(DocumentError(f, 0, f"cannot read ({e}); the file is skipped"))
        self._size = self._ends[-1] if self._ends else 0

    def _add(self, f: Path, member: str | None, offsets: array, lines: array) -> None:
        if len(offsets):
            self.units.append((f, member, offsets, lines))
            self._ends.append((self._ends[-1] if self._ends else 0) + len(offsets))

    def _line(self, u: int, j: int) -> tuple[bytes, DocumentError]:
        f, member, offsets, lines = self.units[u]
        where = DocumentError(f"{f}:{member}" if member else f, lines[j], "")
        if member is None:
            fh = self.open(f)
            fh.seek(offsets[j])
            return fh.readline(), where
        if self._cache is None or self._cache[0] != (f, member):
            with zipfile.ZipFile(f) as z:
                self._cache = ((f, member), z.read(member))
        data = self._cache[1]
        end = data.find(b"\n", offsets[j])
        return data[offsets[j]: end if end >= 0 else len(data)], where

    def where(self, i: int) -> str:
        u = bisect.bisect_right(self._ends, i)
        f, member, _, lines = self.units[u]
        line = lines[i - (self._ends[u - 1] if u else 0)]
        return f"{f}:{member}:{line}" if member else f"{f}:{line}"

    def read(self, i: int) -> Document:
        u = bisect.bisect_right(self._ends, i)
        j = i - (self._ends[u - 1] if u else 0)
        raw, where = self._line(u, j)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DocumentError(where.file, where.line, f"not valid JSON ({getattr(e, 'msg', e)})") from None

        def image_for(k: int, info: dict) -> Segment | None:
            name = info.get("image_name")
            return self.image_segment([name] if isinstance(name, str) else [],
                                      DocumentError(where.file, where.line, f"image_info[{k}]"))

        segments = mmc4_segments(obj, where=where, min_sim=self.min_sim, image_for=image_for)
        f, member = self.units[u][:2]
        doc = Document(id=safe_id(f"{_stem(member or f.name)}-{where.line:06d}"), segments=segments,
                       meta={"kind": "web", "mmc4": {"url": obj.get("url")}}, origin=f"{where.file}:{where.line}")
        return check_document(doc)
