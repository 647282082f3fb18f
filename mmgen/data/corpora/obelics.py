"""OBELICS documents: parquet files with ``texts`` and ``images`` aligned position by position.

Columns read (OBELICS's layout)::

    images:   list<string | null>   an image URL where the document has an image
    texts:    list<string | null>   a paragraph where it has text (exactly one of the two is set)
    metadata: string                JSON: a list as long as ``images``, per-image dicts
                                    ({src, formatted_filename, alt_text, ...}) or null
    general_metadata: string        JSON: the document's URL and Common Crawl location

Images come from a local folder (``images:`` / ``--images``), keyed by URL or file name: the
first of these names that exists is used (each with or without an image extension):
the URL percent-quoted whole (``urllib.parse.quote(url, safe="")``), the SHA-1 hex digest of
the URL, the URL's last path component, and the metadata's ``formatted_filename``.

Index: parquet row groups (from the footer only). A drawn row reads its row group's three
columns, one row group cached per process. Locations read ``file:row`` (1-based rows).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

from mmgen.data.corpora.base import CorpusSource, check_document, files_under
from mmgen.data.documents import Document, DocumentError, Segment, safe_id

REQUIRED = ("texts", "images")


def image_names(url: str, meta: Any) -> list[str]:
    """File names an OBELICS image may be stored under, most specific first."""
    names = [quote(url, safe=""), hashlib.sha1(url.encode("utf-8")).hexdigest(),
             unquote(Path(urlparse(url).path).name)]
    if isinstance(meta, dict) and isinstance(meta.get("formatted_filename"), str):
        names.append(meta["formatted_filename"])
    return names


class ObelicsSource(CorpusSource):
    """OBELICS documents from ``path`` (a parquet file or a folder of them) and ``images``."""

    kind = "obelics"

    def __init__(self, cfg: Any, data: Any = None):
        super().__init__(cfg, data)
        import pyarrow.parquet as pq

        self.units: list[tuple[Path, int, int, list[str]]] = []  # (file, row group, first row, columns)
        self._ends: list[int] = []
        self._cache: tuple[tuple[Path, int], Any] | None = None
        for f in files_under(self.path, (".parquet",), "parquet files"):
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
                self.problems.append(DocumentError(f, 0, f"not a readable parquet file ({_first_line(e)}); skipped"))
                continue
            names = pf.schema_arrow.names
            missing = [c for c in REQUIRED if c not in names]
            if missing:
                self.problems.append(DocumentError(
                    f, 0, f"not OBELICS: no `{'`, `'.join(missing)}` column (columns: {', '.join(names)}); skipped"))
                continue
            columns = [c for c in ("texts", "images", "metadata", "general_metadata") if c in names]
            first = 0
            for rg in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if n:
                    self.units.append((f, rg, first, columns))
                    self._ends.append((self._ends[-1] if self._ends else 0) + n)
                first += n
        self._size = self._ends[-1] if self._ends else 0

    def _row(self, i: int) -> tuple[dict, Path, int]:
        import pyarrow.parquet as pq

        u = bisect.bisect_right(self._ends, i)
        j = i - (self._ends[u - 1] if u else 0)
        f, rg, first, columns = self.units[u]
        if self._cache is None or self._cache[0] != (f, rg):
            try:
                table = pq.ParquetFile(f).read_row_group(rg, columns=columns)
            except Exception as e:
                raise DocumentError(f, first + j + 1, f"row group {rg} cannot be read ({_first_line(e)})") from None
            self._cache = ((f, rg), table)
        return self._cache[1].slice(j, 1).to_pylist()[0], f, first + j + 1

    def read(self, i: int) -> Document:
        row, f, line = self._row(i)

        def bad(message: str) -> DocumentError:
            return DocumentError(f, line, message)

        texts, images = row.get("texts") or [], row.get("images") or []
        if len(texts) != len(images):
            raise bad(f"`texts` ({len(texts)}) and `images` ({len(images)}) differ in length")
        metas: list = []
        if isinstance(row.get("metadata"), str):
            try:
                metas = json.loads(row["metadata"])
            except json.JSONDecodeError as e:
                raise bad(f"`metadata` is not valid JSON ({e.msg})") from None
        metas = metas if isinstance(metas, list) else []
        segments: list[Segment] = []
        for k, (text, url) in enumerate(zip(texts, images)):
            if (text is None) == (url is None):
                raise bad(f"position {k}: exactly one of texts[{k}] and images[{k}] must be set")
            if text is not None:
                if text.strip():
                    segments.append(Segment("text", text=text.strip()))
                continue
            seg = self.image_segment(image_names(url, metas[k] if k < len(metas) else None),
                                     DocumentError(f, line, f"images[{k}]"))
            if seg is not None:
                segments.append(seg)
        meta: dict = {}
        try:
            general = json.loads(row["general_metadata"]) if isinstance(row.get("general_metadata"), str) else None
        except json.JSONDecodeError:
            general = None
        if isinstance(general, dict) and general.get("url"):
            meta["url"] = general["url"]
        doc = Document(id=safe_id(f"{f.stem}-{line:06d}"), segments=segments,
                       meta={"kind": "web", "obelics": meta},
                       origin=f"{f}:{line}")
        return check_document(doc)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
