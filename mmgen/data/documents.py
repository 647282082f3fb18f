"""Interleaved documents: the one JSONL format for data, prompts and results (docs/DOCUMENTS.md).

A :class:`Document` is an id, a list of :class:`Segment` (text, image or video) and free-form
``meta``. A segment with no content is a placeholder: a place for generation to fill.

Reading is strict (:func:`read_documents` raises the first problem) or lenient
(:func:`iter_records`, :func:`read_prompts` carry on past bad lines). Every problem is a
:class:`DocumentError` that reads ``file:line: what is wrong``. This module imports neither
torch nor PIL at import time; media checks live in :mod:`mmgen.data.media`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SEGMENT_TYPES = ("text", "image", "video")
SOURCES = ("prompt", "generated")
MAX_FRAMES = 1024  # most frames one video segment may ask for
MAX_FPS = 1000.0
MAX_ID_BYTES = 100  # an id is a folder name: keep it well under the usual 255-byte limit

_DOCUMENT_KEYS = ("id", "segments", "meta")
_SEGMENT_KEYS = {
    "text": ("type", "text", "source"),
    "image": ("type", "path", "source"),
    "video": ("type", "path", "frames", "fps", "source"),
}
_ALL_SEGMENT_KEYS = ("type", "text", "path", "frames", "fps", "source")
_RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                   *(f"lpt{i}" for i in range(10))}  # Windows device names


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

    def error(self, message: str) -> DocumentError:
        """A :class:`DocumentError` located at this document's ``origin``."""
        file, line = _split_origin(self.origin)
        return DocumentError(file or self.id, line, message)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "segments": [s.to_json() for s in self.segments], "meta": self.meta}


def _split_origin(origin: str | None) -> tuple[str, int]:
    file, _, line = (origin or "").rpartition(":")
    return (file, int(line)) if file and line.isdigit() else (origin or "", 0)


# ---------------------------------------------------------------------------------------------
# ids


def safe_id(s: str) -> str:
    """Reduce ``s`` to a safe folder name: letters, digits, ``-``, ``_`` and single dots.

    No path separators, no ``..``, no leading dot, no control characters, never empty,
    at most ``MAX_ID_BYTES`` bytes of UTF-8 (long ids keep a hash of the original so
    they stay distinct). Safe ids map to themselves.
    """
    s = unicodedata.normalize("NFC", str(s))
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in s)
    out = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", out)).strip("-.")
    if len(out.encode("utf-8")) > MAX_ID_BYTES:
        digest = hashlib.sha1(s.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        head = out.encode("utf-8")[: MAX_ID_BYTES - 9].decode("utf-8", "ignore").rstrip("-.")
        out = f"{head}-{digest}"
    if not out:
        return "untitled"
    if out.split(".")[0].lower() in _RESERVED_NAMES:
        out = "_" + out
    return out


# ---------------------------------------------------------------------------------------------
# parsing one JSON object


def _json_type(value: Any) -> str:
    kinds = ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string"),
             ((int, float), "a number"))
    for kind, name in kinds:
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a huge bad value can't flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: str) -> str:
    """An object key for a message: as written if short and printable, else escaped and cut."""
    return key if len(key) <= 60 and key.isprintable() else _shown(key)[1:-1]


def _parse_segment(raw: Any, where: str) -> Segment:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {_json_type(raw)}")
    if "type" not in raw:
        raise ValueError(f"{where}: missing `type` (text, image or video)")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in SEGMENT_TYPES:
        shown = _shown(kind) if isinstance(kind, str) else _json_type(kind)
        raise ValueError(f"{where}: unknown type {shown} (expected text, image or video)")
    for key in raw:
        if key not in _ALL_SEGMENT_KEYS:
            raise ValueError(f"{where}: unknown key `{_key(key)}` (allowed: {', '.join(_SEGMENT_KEYS[kind])})")
        if key not in _SEGMENT_KEYS[kind]:
            raise ValueError(f"{where}: `{key}` does not apply to {kind} segments")
    text, path = raw.get("text"), raw.get("path")
    frames, fps, source = raw.get("frames"), raw.get("fps"), raw.get("source")
    if "text" in raw and not isinstance(text, str):
        raise ValueError(f"{where}: `text` must be a string, got {_json_type(text)}")
    if "path" in raw and (not isinstance(path, str) or not path or "\x00" in path):
        raise ValueError(f"{where}: `path` must be a non-empty string without NUL, got {_json_type(path)}")
    if "frames" in raw and (not isinstance(frames, int) or isinstance(frames, bool)
                            or not 1 <= frames <= MAX_FRAMES):
        raise ValueError(f"{where}: `frames` must be a whole number from 1 to {MAX_FRAMES}, got {_shown(frames)}")
    if "fps" in raw and (not isinstance(fps, (int, float)) or isinstance(fps, bool)
                         or not 0 < fps <= MAX_FPS):
        raise ValueError(f"{where}: `fps` must be a number above 0 and at most {MAX_FPS:g}, got {_shown(fps)}")
    if "source" in raw and source not in SOURCES:
        raise ValueError(f"{where}: `source` must be \"prompt\" or \"generated\", got {_shown(source)}")
    return Segment(type=kind, text=text, path=path, frames=frames,
                   fps=float(fps) if fps is not None else None, source=source)


def document_from_json(obj: Any, *, file: str | Path, line: int, default_id: str) -> Document:
    """Build a :class:`Document` from one parsed JSON value, checking every field.

    Args:
        obj: the parsed JSON value; must be an object with ``segments`` and optional
            ``id`` and ``meta``.
        file, line: where it was read, for ``origin`` and messages; relative paths are
            resolved against the folder of ``file``.
        default_id: the id when ``obj`` has none (it goes through :func:`safe_id` too).
    Raises:
        DocumentError: naming ``file:line`` and the first problem found.
    """
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {_json_type(obj)}")
        for key in obj:
            if key not in _DOCUMENT_KEYS:
                raise ValueError(f"unknown key `{_key(key)}` (allowed: id, segments, meta)")
        raw_id = obj.get("id", default_id)
        if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
            raise ValueError(f"`id` must be a string, got {_json_type(raw_id)}")
        if "segments" not in obj:
            raise ValueError("missing `segments` (a list of text, image and video segments)")
        raw_segments = obj["segments"]
        if not isinstance(raw_segments, list):
            raise ValueError(f"`segments` must be a list, got {_json_type(raw_segments)}")
        if not raw_segments:
            raise ValueError("`segments` is empty")
        segments = [_parse_segment(s, f"segment {i}") for i, s in enumerate(raw_segments, 1)]
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"`meta` must be an object, got {_json_type(meta)}")
        if "kind" in meta:
            from .kinds import KINDS, unknown_kind

            if meta["kind"] not in KINDS:
                raise ValueError(f"`meta.kind`: {unknown_kind(meta['kind'])}")
    except ValueError as e:
        raise DocumentError(file, line, str(e)) from None
    return Document(id=safe_id(str(raw_id)), segments=segments, meta=meta,
                    base_dir=Path(file).absolute().parent, origin=f"{file}:{line}")


# ---------------------------------------------------------------------------------------------
# reading files


def file_problem(path: Path) -> str | None:
    """Why ``path`` can't be read as a plain file (``"not found"``, ...), or None if it can.

    Only ``stat`` is called, so device files and pipes are refused without being opened.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "not found"
    except PermissionError:
        return "permission denied"
    except (OSError, ValueError) as e:
        return f"cannot be accessed ({getattr(e, 'strerror', None) or e})"  # not the name again
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud800": may be half a pair, or alone


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string (or key) of a parsed JSON value, else None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"\\u{ord(v[e.start]):04x}"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _parse_json(text: str, file: Path, line: int) -> Any:
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
        # JSON may escape a lone surrogate ("\ud800"); it is not Unicode, so it could never
        # be written back as UTF-8 (document.json, write_documents) or shown: refuse it here.
        lone = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(text) else None
        if lone:
            raise ValueError(f"lone surrogate {lone} in a string (not valid Unicode)")
        return obj
    except json.JSONDecodeError as e:
        raise DocumentError(file, line + e.lineno - 1, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DocumentError(file, line, "invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise DocumentError(file, line, f"invalid JSON: {e}") from None


def _lines(f: IO[bytes], file: Path) -> Iterator[tuple[int, str | DocumentError]]:
    """(line number, decoded line) pairs; a line that is not UTF-8 comes as an error."""
    for n, raw in enumerate(f, 1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, DocumentError(file, n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")


def _jsonl_records(f: IO[bytes], file: Path) -> Iterator[Document | DocumentError]:
    k = 0  # records seen, good or bad, so ids don't shift when a bad line is fixed
    for n, text in _lines(f, file):
        if isinstance(text, str) and not text.strip():
            continue
        k += 1
        if isinstance(text, DocumentError):
            yield text
            continue
        try:
            obj = _parse_json(text.rstrip("\r\n"), file, n)
            yield document_from_json(obj, file=file, line=n, default_id=f"{file.stem}-{k - 1:04d}")
        except DocumentError as e:
            yield e
    if k == 0:
        yield DocumentError(file, 0, "empty file: no documents")


def _json_record(f: IO[bytes], file: Path) -> Iterator[Document | DocumentError]:
    """A ``.json`` file holds one document (as ``mmgen generate`` writes ``document.json``)."""
    try:
        text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield DocumentError(file, 0, f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})")
        return
    if not text.strip():
        yield DocumentError(file, 0, "empty file: no document")
        return
    try:
        yield document_from_json(_parse_json(text, file, 1), file=file, line=1,
                                 default_id=f"{file.stem}-0000")
    except DocumentError as e:
        yield e


def _txt_records(f: IO[bytes], file: Path) -> Iterator[Document | DocumentError]:
    k, comments = 0, False
    for n, text in _lines(f, file):
        if isinstance(text, DocumentError):
            k += 1
            yield text
            continue
        prompt = text.strip()
        if not prompt or prompt.startswith("#"):
            comments = comments or bool(prompt)
            continue
        yield Document(id=safe_id(f"{file.stem}-{k:04d}"), segments=[Segment("text", text=prompt)],
                       base_dir=file.absolute().parent, origin=f"{file}:{n}")
        k += 1
    if k == 0:
        yield DocumentError(file, 0, "no prompts: every line is blank or a comment" if comments
                            else "empty file: no prompts")


def iter_records(path: str | Path) -> Iterator[Document | DocumentError]:
    """Each document of a file in order, and a :class:`DocumentError` for each bad line.

    ``.txt`` files hold one text prompt per non-empty line (``#`` starts a comment),
    ``.json`` files one document, anything else is JSONL. A file that can't be read at all
    gives one error at line 0. Never raises for bad input.
    """
    file = Path(path)
    problem = file_problem(file)
    if problem:
        yield DocumentError(file, 0, f"file {problem}" if problem == "not found" else problem)
        return
    suffix = file.suffix.lower()
    reader = _txt_records if suffix == ".txt" else _json_record if suffix == ".json" else _jsonl_records
    try:
        with open(file, "rb") as f:
            yield from reader(f, file)
    except OSError as e:
        yield DocumentError(file, 0, f"cannot read: {e.strerror or e}")


def read_documents(path: str | Path) -> list[Document]:
    """All documents of a file; raises :class:`DocumentError` for the first problem."""
    docs = []
    for record in iter_records(path):
        if isinstance(record, DocumentError):
            raise record
        docs.append(record)
    return docs


def read_prompts(path: str | Path) -> tuple[list[Document], list[DocumentError]]:
    """The good prompts of a ``.txt`` or ``.jsonl`` file, and the problems with the rest."""
    docs: list[Document] = []
    errors: list[DocumentError] = []
    for record in iter_records(path):
        (errors if isinstance(record, DocumentError) else docs).append(record)
    return docs, errors


def write_documents(path: str | Path, docs: Iterable[Document]) -> None:
    """Write documents as JSONL (UTF-8, one object per line); creates missing folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# validation


def validate_files(paths: Iterable[str | Path]) -> tuple[int, list[DocumentError]]:
    """Check every line of every file and every image and video they point to.

    Returns the number of documents read and every problem found (not only the first),
    in file and line order. Never raises for bad input.
    """
    from mmgen.data.media import media_problem  # PIL, and decord for videos

    count, errors = 0, []
    checked: dict[tuple[str, Path], str | None] = {}  # (type, path) -> problem, each file once
    for path in paths:
        seen: dict[str, int] = {}  # id -> line, ids name output folders so must be unique
        try:
            for record in iter_records(path):
                if isinstance(record, DocumentError):
                    errors.append(record)
                    continue
                count += 1
                line = _split_origin(record.origin)[1]
                if record.id in seen:
                    errors.append(record.error(f"duplicate id {record.id!r} (also on line {seen[record.id]})"))
                seen.setdefault(record.id, line)
                for i, seg in enumerate(record.segments, 1):
                    if seg.type == "text" or seg.path is None:
                        continue
                    key = (seg.type, record.resolve(seg.path))
                    if key not in checked:
                        checked[key] = media_problem(seg.type, key[1])
                    if checked[key]:
                        errors.append(record.error(f"segment {i}: {checked[key]}"))
        except Exception as e:  # a bug here must not hide the problems already found
            errors.append(DocumentError(path, 0, f"could not be checked ({type(e).__name__}: {e})"))
    return count, errors
