"""webdataset tar shards: read in place (MMC4 packing or our documents), and written by `data shard`.

A shard is a POSIX tar; a sample is the members that share a key (the member name up to the
first dot of its file name; the rest is the member's extension)::

    000000042.json      the sample's record
    000000042.0.png     an image member (extension "0.png"), as `mmgen data shard` writes

Two records are read:
- OpenFlamingo's MMC4 packing: the MMC4 document (``text_list``, ``image_info`` with
  ``matched_text_index`` / ``matched_sim``), each ``image_info[k].image_base64`` holding the
  image bytes, or its ``image_name`` naming a member of the sample or of the shard;
- our documents (docs/DOCUMENTS.md), an image segment's ``path`` naming a member of the same
  sample by its extension (``"0.png"``).

Index: the tar headers only (member offsets and sizes; the data is skipped), so a drawn
sample costs one seek per member. Compressed tars can't be seeked and are refused (unpack
them, or write shards with `mmgen data shard`). A shard cut short keeps the samples before
the cut and is reported. Locations read ``shard:member``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgen.data.corpora.base import CorpusSource, check_document, files_under
from mmgen.data.corpora.mmc4 import mmc4_segments
from mmgen.data.documents import Document, DocumentError, Segment, document_from_json, safe_id

Member = tuple[int, int]  # (offset of the data in the shard, size in bytes)


@dataclass
class InlineImage:
    """Image bytes held in a shard (kept undecoded when converting, so they are written as is)."""

    data: bytes
    ext: str  # lower-case file extension with the dot, e.g. ".jpg"


def split_member(name: str) -> tuple[str, str]:
    """webdataset's (key, extension) of a member name: the extension starts at the file name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext if dot else ""


def _decode(data: bytes, where: str) -> Any:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many kinds for damaged bytes
        raise DocumentError(where, 0, f"image does not decode ({type(e).__name__}: {str(e)[:120]})") from None


def _image_ext(data: bytes) -> str:
    heads = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp"}
    return next((ext for head, ext in heads.items() if data.startswith(head)), ".img")


class WebDatasetSource(CorpusSource):
    """Samples of the ``.tar`` shards at ``path`` (a shard or a folder of them)."""

    kind = "webdataset"
    decode = True  # False: images stay InlineImage bytes (convert writes them unchanged)

    def __init__(self, cfg: Any, data: Any = None):
        super().__init__(cfg, data)
        self.shards: list[Path] = []
        self.loose: list[dict[str, Member]] = []  # per shard: members of samples without a .json
        self.samples: list[tuple[int, str, dict[str, Member]]] = []  # (shard, key, {ext: member})
        for f in files_under(self.path, (".tar", ".tar.gz", ".tgz"), "tar shards"):
            if not f.name.endswith(".tar"):
                self.problems.append(DocumentError(f, 0, "compressed shard: unpack it to a .tar (read in place, "
                                                         "members are seeked); skipped"))
                continue
            self._index(f)
        self._size = len(self.samples)

    def _index(self, f: Path) -> None:
        s = len(self.shards)
        self.shards.append(f)
        size = f.stat().st_size
        groups: dict[str, dict[str, Member]] = {}
        last = None
        try:
            with tarfile.open(f, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        raise tarfile.ReadError(f"member {m.name} is cut short")
                    key, ext = split_member(m.name)
                    groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
                    last = m.name
                # tarfile stops quietly at a header cut short: a whole tar ends in two zero blocks
                tf.fileobj.seek(tf.offset)
                end = tf.fileobj.read(1024)
                if len(end) < 1024 or end.strip(b"\0"):
                    raise tarfile.ReadError("no end-of-archive blocks")
        except (tarfile.TarError, EOFError, OSError) as e:
            where = f"after member {last}" if last else "before its first member"
            self.problems.append(DocumentError(f, 0, f"truncated or damaged shard ({e}): read up to {where}; "
                                                     "the rest is skipped"))
        loose: dict[str, Member] = {}
        for key, members in groups.items():
            if "json" in members:
                self.samples.append((s, key, members))
            else:
                for ext, m in members.items():
                    loose[f"{key}.{ext}" if ext else key] = m
        self.loose.append(loose)

    def _bytes(self, shard: int, member: Member) -> bytes:
        fh = self.open(self.shards[shard])
        fh.seek(member[0])
        return fh.read(member[1])

    def _image(self, data: bytes, ext: str, where: str) -> Segment:
        image = _decode(data, where)
        return Segment("image", image=image if self.decode else InlineImage(data, ext))

    def where(self, i: int) -> str:
        s, key, _ = self.samples[i]
        return f"{self.shards[s]}:{key}"

    def read(self, i: int) -> Document:
        s, key, members = self.samples[i]
        shard = self.shards[s]
        where = f"{shard}:{key}.json"
        try:
            obj = json.loads(self._bytes(s, members["json"]))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DocumentError(where, 0, f"not valid JSON ({getattr(e, 'msg', e)})") from None
        if isinstance(obj, dict) and "segments" in obj:
            return self._ours(obj, s, key, members, where)
        return self._mmc4(obj, s, key, members, where)

    def _ours(self, obj: dict, s: int, key: str, members: dict[str, Member], where: str) -> Document:
        doc = document_from_json(obj, file=where, line=0, default_id=f"{self.shards[s].stem}-{key}")
        for k, seg in enumerate(doc.segments, 1):
            if seg.type == "text" or seg.path is None:
                continue
            if seg.type != "image" or seg.path not in members:
                raise DocumentError(where, 0, f"segment {k}: {seg.type} {seg.path!r} is not a member of sample {key}")
            member_name = f"{self.shards[s]}:{key}.{seg.path}"
            image = self._image(self._bytes(s, members[seg.path]), "." + seg.path.rsplit(".", 1)[-1].lower(),
                                member_name)
            seg.image, seg.path = image.image, None
        doc.base_dir, doc.origin = None, f"{where}:0"
        return check_document(doc)

    def _mmc4(self, obj: Any, s: int, key: str, members: dict[str, Member], where: str) -> Document:
        shard = self.shards[s]

        def image_for(k: int, info: dict) -> Segment | None:
            at = f"{where} image_info[{k}]"
            b64, name = info.get("image_base64"), info.get("image_name")
            if isinstance(b64, str) and b64:
                try:
                    data = base64.b64decode(b64, validate=True)
                except (binascii.Error, ValueError):
                    raise DocumentError(at, 0, "image_base64 is not valid base64") from None
                return self._image(data, _image_ext(data), at)
            member = None
            if isinstance(name, str):
                member = members.get(name) or self.loose[s].get(name) or self.loose[s].get(f"{key}.{name}")
            if member is not None:
                return self._image(self._bytes(s, member), Path(name).suffix.lower() or ".img", f"{shard}:{name}")
            problem = DocumentError(at, 0, f"no image (no image_base64, and no member {name!r})")
            if self.skip_missing:
                self._notes.append(DocumentError(at, 0, problem.message + " (skipped)"))
                return None
            raise problem

        segments = mmc4_segments(obj, where=DocumentError(where, 0, ""), min_sim=self.min_sim, image_for=image_for)
        url = obj.get("url") if isinstance(obj, dict) else None
        doc = Document(id=safe_id(f"{shard.stem}-{key}"), segments=segments,
                       meta={"kind": "web", "mmc4": {"url": url}},
                       origin=f"{where}:0")
        return check_document(doc)


# ---------------------------------------------------------------------------------------------
# writing shards


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def sample_members(doc: Document, key: str) -> list[tuple[str, bytes]]:
    """The tar members of one document: its images as ``key.<k>.<ext>``, then ``key.json``.

    Raises ``DocumentError`` (at the document's origin) for a video segment, a placeholder or
    an image file that can't be read.
    """
    members: list[tuple[str, bytes]] = []
    segments = []
    for k, seg in enumerate(doc.segments):
        if seg.type == "text":
            segments.append(seg.to_json())
            continue
        if seg.type != "image" or seg.is_placeholder:
            raise doc.error(f"segment {k + 1}: only text and image segments are packed into shards ({seg.type}"
                            f"{' placeholder' if seg.is_placeholder else ''})")
        if seg.image is not None:
            buf = io.BytesIO()
            seg.image.save(buf, format="PNG")
            data, ext = buf.getvalue(), ".png"
        else:
            path = doc.resolve(seg.path)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise doc.error(f"segment {k + 1}: cannot read {path} ({e.strerror or e})") from None
            ext = path.suffix.lower() or ".img"
        ext_name = f"{k}{ext}"
        members.append((f"{key}.{ext_name}", data))
        segments.append({"type": "image", "path": ext_name})
    record = {"id": doc.id, "segments": segments, "meta": doc.meta}
    members.append((f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8")))
    return members


def write_shards(docs: Iterable[Document | DocumentError], out: Path, *, per_shard: int = 1000,
                 prefix: str = "shard", report: Callable[[DocumentError], None] = lambda e: None,
                 progress: Callable[[], None] = lambda: None) -> tuple[list[Path], int]:
    """Pack documents into ``out/{prefix}-{N:06d}.tar`` shards of ``per_shard`` samples.

    Member order and headers are fixed (mtime 0), so the same documents give the same bytes.
    A bad record is passed to ``report`` and left out. Each shard is written under a temporary
    name and renamed when complete. Returns the shards written and the documents packed.
    """
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    count = 0
    tf: tarfile.TarFile | None = None
    tmp = None

    def close() -> None:
        nonlocal tf
        if tf is not None:
            tf.close()
            os.replace(tmp, shards[-1])
            tf = None

    for doc in docs:
        progress()
        if isinstance(doc, DocumentError):
            report(doc)
            continue
        try:
            members = sample_members(doc, f"{count:09d}")
        except DocumentError as e:
            report(e)
            continue
        if tf is None:
            shards.append(out / f"{prefix}-{len(shards):06d}.tar")
            tmp = shards[-1].with_name(f".{shards[-1].name}.tmp")
            tf = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        for name, data in members:
            _tar_add(tf, name, data)
        count += 1
        if count % per_shard == 0:
            close()
    close()
    return shards, count
