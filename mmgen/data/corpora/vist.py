"""VIST (Visual Storytelling) stories: ``{split}.story-in-sequence.json`` and its reformatted form.

Story-in-sequence layout (the dataset's own files)::

    {"images": [...], "albums": [...], "info": {...}, "type": "...",
     "annotations": [[{"story_id", "photo_flickr_id", "worker_arranged_photo_order",
                       "original_text", "text", "album_id", "storylet_id", ...}], ...]}

``annotations`` holds one-element lists, five per story, in any order: a story is its
annotations grouped by ``story_id`` and ordered by ``worker_arranged_photo_order``; stories
are read in ``story_id`` order. The
reformatted form several projects use is ``{story_id: [{"caption", "image_id",
"sequence_index"}, ...]}``, possibly wrapped as ``{"annotations": {...}}``.

Each story becomes text, image, text, image, ...: the sentence (``original_text``, what the
worker wrote; ``text``, the lower-cased tokenised form, if it is empty) and then its photo,
``<photo_flickr_id>.jpg`` (or another image extension) from the image folder. The JSON files
are small (about 40k stories for the train split) and parsed once; stories are kept as
tuples of strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmgen.data.corpora.base import CorpusSource, check_document, files_under
from mmgen.data.documents import Document, DocumentError, Segment, safe_id

Story = tuple[str, str, tuple[tuple[str, str], ...]]  # (file, story id, ((photo id, sentence), ...))


def _sis_stories(file: Path, annotations: list, problems: list[DocumentError]) -> list[Story]:
    stories: dict[str, list[tuple[float, str, str]]] = {}
    bad: set[str] = set()
    for k, item in enumerate(annotations):
        a = item[0] if isinstance(item, list) and len(item) == 1 else item
        sid = str(a.get("story_id")) if isinstance(a, dict) and a.get("story_id") is not None else None
        try:
            if not isinstance(a, dict):
                raise ValueError("expected a one-element list holding an object")
            missing = [key for key in ("story_id", "photo_flickr_id", "worker_arranged_photo_order")
                       if a.get(key) is None]
            if missing:
                raise ValueError(f"missing `{missing[0]}`")
            text = a.get("original_text") or a.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("no `original_text` or `text`")
            order = float(a["worker_arranged_photo_order"])
        except (ValueError, TypeError) as e:
            problems.append(DocumentError(file, 0, f"annotation {k}" + (f" (story {sid})" if sid else "")
                                          + f": {e}"))
            if sid:
                bad.add(sid)
            continue
        stories.setdefault(sid, []).append((order, str(a["photo_flickr_id"]), " ".join(text.split())))
    ordered = sorted(stories, key=lambda sid: (not sid.isdigit(), int(sid) if sid.isdigit() else 0, sid))
    return [(str(file), sid, tuple((p, t) for _, p, t in sorted(stories[sid])))
            for sid in ordered if sid not in bad]


def _reformatted_stories(file: Path, data: dict, problems: list[DocumentError]) -> list[Story]:
    out = []
    for sid, items in data.items():
        try:
            if not isinstance(items, list) or not items:
                raise ValueError("expected a list of {caption, image_id, sequence_index}")
            rows = []
            for it in items:
                if not isinstance(it, dict) or any(it.get(k) is None for k in ("caption", "image_id")):
                    raise ValueError("an entry lacks `caption` or `image_id`")
                rows.append((float(it.get("sequence_index", len(rows))), str(it["image_id"]),
                             " ".join(str(it["caption"]).split())))
        except (ValueError, TypeError) as e:
            problems.append(DocumentError(file, 0, f"story {sid}: {e}"))
            continue
        out.append((str(file), str(sid), tuple((p, t) for _, p, t in sorted(rows))))
    return out


def read_stories(file: Path, problems: list[DocumentError]) -> list[Story]:
    """The stories of one VIST JSON file (either layout); problems are appended, never raised."""
    try:
        data: Any = json.loads(file.read_bytes())
    except json.JSONDecodeError as e:
        problems.append(DocumentError(file, e.lineno, f"not valid JSON ({e.msg}, column {e.colno}); "
                                                      "the file is skipped"))
        return []
    except (OSError, UnicodeDecodeError) as e:
        problems.append(DocumentError(file, 0, f"cannot read ({getattr(e, 'strerror', None) or e})"))
        return []
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return _sis_stories(file, data["annotations"], problems)
    if isinstance(data, dict) and isinstance(data.get("annotations"), dict):
        return _reformatted_stories(file, data["annotations"], problems)
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return _reformatted_stories(file, data, problems)
    problems.append(DocumentError(file, 0, "not a VIST file: expected `annotations` (story-in-sequence) "
                                           "or {story_id: [{caption, image_id, sequence_index}]}"))
    return []


class VistSource(CorpusSource):
    """VIST stories from ``path`` (a JSON file or a folder of ``*.json``) and ``images``."""

    kind = "vist"

    def __init__(self, cfg: Any, data: Any = None):
        super().__init__(cfg, data)
        self.stories: list[Story] = []
        for f in files_under(self.path, (".json",), "VIST JSON files"):
            self.stories += read_stories(f, self.problems)
        self._size = len(self.stories)

    def read(self, i: int) -> Document:
        file, sid, items = self.stories[i]
        segments: list[Segment] = []
        for k, (photo, text) in enumerate(items, 1):
            segments.append(Segment("text", text=text))
            image = self.image_segment([photo], DocumentError(file, 0, f"story {sid}, photo {k}"))
            if image is not None:
                segments.append(image)
        doc = Document(id=safe_id(f"vist-{sid}"), segments=segments,
                       meta={"kind": "story", "vist": {"story_id": sid, "photos": [p for p, _ in items]}},
                       origin=f"{file}:0")
        return check_document(doc)
