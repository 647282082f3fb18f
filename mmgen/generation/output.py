"""Writing generated documents (docs/DOCUMENTS.md, "What `mmgen generate` writes").

For each document, under ``OUT/<id>/``: ``document.json`` (segments marked ``prompt`` or
``generated``, image paths relative to the folder, settings and timings in ``meta``),
``index.html`` (offline, every text escaped), ``story.md`` and ``images/*.png``; and
``OUT/index.html`` linking every document of the run.

Ids are reduced to safe folder names and never leave ``OUT``; two documents with the same id
get distinct folders (``id``, ``id-2``, ...).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.documents import Document, Segment, safe_id


class OutputError(RuntimeError):
    """The output folder cannot be used or written."""


@dataclass
class Written:
    id: str
    folder: Path
    title: str
    num_images: int


def prepare_out_dir(out: Path, *, overwrite: bool) -> None:
    """Create ``out``; refuse one that already holds results unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: already holds results; choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mmgen-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{out}: cannot write here ({e.strerror or e})") from None


def unique_folder(out: Path, doc_id: str, taken: set[str]) -> tuple[str, Path]:
    """A safe folder name for ``doc_id`` inside ``out``, distinct from ``taken``.

    Names are compared ignoring case (``Story`` and ``story`` are one folder on macOS and
    Windows), and ``index.html`` is kept for the run index.
    """
    base = safe_id(doc_id)
    used = {t.lower() for t in taken} | {"index.html"}
    name, k = base, 1
    while name.lower() in used:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    folder = (out / name).resolve()
    if folder.parent != out.resolve():  # belt and braces: safe_id never yields separators
        raise OutputError(f"document id {doc_id!r} would write outside {out}")
    return name, folder


def write_document(doc: Document, folder: Path) -> Written:
    """Write one generated document (in-memory PIL images in ``Segment.image``) to ``folder``."""
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        segments: list[Segment] = []
        k = 0
        for seg in doc.segments:
            out = Segment(seg.type, text=seg.text, path=seg.path, frames=seg.frames, fps=seg.fps,
                          source=seg.source or "prompt", image=seg.image)
            if seg.type in ("image", "video") and seg.image is not None:
                k += 1
                out.type, out.frames, out.fps = "image", None, None
                out.path = f"images/{k:02d}.png"
                seg.image.save(folder / out.path, format="PNG")
            elif seg.type == "image" and seg.path is not None:  # a prompt image: copied in
                from ..data.media import load_image

                k += 1
                out.path = f"images/{k:02d}.png"
                load_image(doc.resolve(seg.path)).save(folder / out.path, format="PNG")
            segments.append(out)
        record = Document(doc.id, segments, doc.meta)
        _atomic_text(folder / "document.json", json.dumps(record.to_json(), indent=2, ensure_ascii=False) + "\n")
        _atomic_text(folder / "index.html", document_html(record))
        _atomic_text(folder / "story.md", document_markdown(record))
    except OSError as e:
        raise OutputError(f"{folder}: cannot write ({e.strerror or e})") from None
    return Written(doc.id, folder, _title(record), k)


def write_run_index(out: Path, written: list[Written], failed: list[str]) -> Path:
    items = "\n".join(
        f'<li><a href="{html.escape(w.folder.name, quote=True)}/index.html">{html.escape(w.id)}</a>'
        f" — {html.escape(w.title)} <small>({w.num_images} image{'s' if w.num_images != 1 else ''})</small></li>"
        for w in written)
    fails = ""
    if failed:
        fails = "<h2>Failed</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in failed) + "</ul>"
    page = _page("mmgen — generated documents",
                 f"<h1>Generated documents</h1><ul>{items}</ul>{fails}")
    path = out / "index.html"
    try:
        _atomic_text(path, page)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def document_html(doc: Document) -> str:
    parts = [f"<h1>{html.escape(doc.id)}</h1>"]
    for seg in doc.segments:
        cls = f' class="{seg.source or "prompt"}"'
        if seg.type == "text" and seg.text is not None:
            parts.append(f"<p{cls}>{html.escape(seg.text)}</p>")
        elif seg.type == "image" and seg.path is not None:
            src = seg.path if not os.path.isabs(seg.path) else Path(seg.path).as_uri()
            parts.append(f'<figure{cls}><img src="{html.escape(src, quote=True)}" alt="{html.escape(seg.source or "prompt")} image"></figure>')
    settings = {k: v for k, v in doc.meta.items() if k in ("checkpoint", "seed", "sampler", "steps", "guidance")}
    if settings:
        parts.append(f"<footer>{html.escape(json.dumps(settings))}</footer>")
    return _page(doc.id, "\n".join(parts))


def document_markdown(doc: Document) -> str:
    lines = [f"# {doc.id}", ""]
    for seg in doc.segments:
        if seg.type == "text" and seg.text is not None:
            lines += [html.escape(seg.text, quote=False), ""]
        elif seg.type == "image" and seg.path is not None:
            lines += [f"![{seg.source or 'prompt'} image]({seg.path})", ""]
    return "\n".join(lines)


def _title(doc: Document) -> str:
    texts = [s.text for s in doc.segments if s.type == "text" and s.text]
    return (texts[0][:80] if texts else doc.id)


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:40em;margin:2em auto;line-height:1.5}"
          "img{width:192px;image-rendering:pixelated;border:1px solid #ccc}"
          ".generated{border-left:4px solid #4a7;padding-left:.5em}"
          ".prompt{border-left:4px solid #aaa;padding-left:.5em}footer{color:#777;font-size:.8em}")


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
