"""The registry of training-source kinds (``data.sources[].kind``): one entry per kind, here only.

Each entry names the class that reads the kind (imported only when a source is built, so the
config and the CLI start without torch or pyarrow), whether a ``path`` is required, and
whether ``mmgen data convert`` can turn it into our JSONL documents. The config validates
``kind`` against :data:`SOURCE_KINDS`; :func:`source_class` builds nothing else.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceKind:
    target: str  # "module:Class", imported lazily
    needs_path: bool
    convertible: bool  # `mmgen data convert KIND` reads it
    help: str


SOURCE_KINDS: dict[str, SourceKind] = {
    "shapes": SourceKind("mmgen.training.data:ShapesSource", False, False,
                         "ShapeStories rendered on the fly"),
    "shapes_pairs": SourceKind("mmgen.training.data:ShapesPairsSource", False, False,
                               "independent ShapeStories frames with their sentences"),
    "shapes_video": SourceKind("mmgen.training.data:ShapesVideoSource", False, False,
                               "ShapeStories told as text and a clip"),
    "jsonl": SourceKind("mmgen.training.data:JsonlSource", True, False,
                        "our JSONL documents (a file or a folder of them)"),
    "pairs": SourceKind("mmgen.training.data:PairsSource", True, False,
                        "image-caption pairs, shown in a random order"),
    "vist": SourceKind("mmgen.data.corpora.vist:VistSource", True, True,
                       "VIST *.story-in-sequence.json (or {story_id: [...]}) + a local image folder"),
    "mmc4": SourceKind("mmgen.data.corpora.mmc4:Mmc4Source", True, True,
                       "MMC4 docs_shard_*.jsonl / .jsonl.zip + a local image folder"),
    "obelics": SourceKind("mmgen.data.corpora.obelics:ObelicsSource", True, True,
                          "OBELICS parquet files + a local image folder"),
    "webdataset": SourceKind("mmgen.data.corpora.webdataset:WebDatasetSource", True, True,
                             "webdataset .tar shards (MMC4 packing or `mmgen data shard`)"),
}


def known_kinds(*, convertible: bool = False) -> list[str]:
    return [k for k, v in SOURCE_KINDS.items() if v.convertible or not convertible]


def unknown_kind(kind: object, *, convertible: bool = False) -> str:
    """The message for a kind that is not registered."""
    return f"unknown source kind {kind!r} (known: {', '.join(known_kinds(convertible=convertible))})"


def source_class(kind: str) -> type:
    """The class that reads ``kind``; ``KeyError`` with :func:`unknown_kind`'s message if none."""
    if kind not in SOURCE_KINDS:
        raise KeyError(unknown_kind(kind))
    module, name = SOURCE_KINDS[kind].target.split(":")
    return getattr(importlib.import_module(module), name)
