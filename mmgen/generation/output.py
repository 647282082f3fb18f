"""Writing generated documents (docs/DOCUMENTS.md, "What `mmgen generate` writes").

For each document, under ``OUT/<id>/``: ``document.json`` (segments marked ``prompt`` or
``generated``, image paths relative to the folder, settings and timings in ``meta``),
``index.html`` (offline, every text escaped), ``story.md``, ``story.png`` (the whole document
as one picture) and ``images/*.png``; and ``OUT/index.html``, a gallery of the run.

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
from .picture import story_picture


class OutputError(RuntimeError):
    """The output folder cannot be used or written."""


@dataclass
class Written:
    id: str
    folder: Path
    title: str  # the first sentence
    images: tuple[str, ...] = ()  # paths relative to ``folder``, in order
    seed: int | None = None
    sampler: str | None = None

    @property
    def num_images(self) -> int:
        return len(self.images)


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
        pictures = []  # PIL images in order, for story.png
        k = 0
        for seg in doc.segments:
            out = Segment(seg.type, text=seg.text, path=seg.path, frames=seg.frames, fps=seg.fps,
                          source=seg.source or "prompt", image=seg.image)
            if seg.type in ("image", "video") and seg.image is not None:
                k += 1
                out.type, out.frames, out.fps = "image", None, None
                out.path = f"images/{k:02d}.png"
                seg.image.save(folder / out.path, format="PNG")
                pictures.append(seg.image)
            elif seg.type == "image" and seg.path is not None:  # a prompt image: copied in
                from ..data.media import load_image

                k += 1
                out.path = f"images/{k:02d}.png"
                pictures.append(load_image(doc.resolve(seg.path)))
                pictures[-1].save(folder / out.path, format="PNG")
            segments.append(out)
        record = Document(doc.id, segments, doc.meta)
        story_picture(record, pictures).save(folder / "story.png", format="PNG")  # pictures first, then the text
        _atomic_text(folder / "document.json", json.dumps(record.to_json(), indent=2, ensure_ascii=False) + "\n")
        _atomic_text(folder / "index.html", document_html(record))
        _atomic_text(folder / "story.md", document_markdown(record))
    except OSError as e:
        raise OutputError(f"{folder}: cannot write ({e.strerror or e})") from None
    images = tuple(seg.path for seg in segments if seg.type == "image" and seg.path)
    return Written(doc.id, folder, _title(record), images, doc.meta.get("seed"), doc.meta.get("sampler"))


def write_run_index(out: Path, written: list[Written], failed: list[str]) -> Path:
    """``OUT/index.html``: a gallery, one card per document (thumbnails, first sentence, settings)."""
    cards = "\n".join(_card(w) for w in written)
    fails = ""
    if failed:
        fails = ('<h2>Failed</h2><ul class="failed">' + "".join(f"<li>{html.escape(f)}</li>" for f in failed)
                 + "</ul>")
    count = f"{len(written)} document{'s' if len(written) != 1 else ''}"
    page = _page("mmgen — generated documents",
                 f'<h1>Generated documents</h1><p class="meta">{count}</p>\n'
                 f'<main class="gallery">\n{cards}\n</main>{fails}', wide=True)
    path = out / "index.html"
    try:
        _atomic_text(path, page)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def _card(w: Written) -> str:
    link = html.escape(f"{w.folder.name}/index.html", quote=True)
    thumbs = "".join(f'<img class="thumb" src="{html.escape(f"{w.folder.name}/{p}", quote=True)}" '
                     f'alt="image {i + 1} of {html.escape(w.id, quote=True)}">' for i, p in enumerate(w.images))
    facts = [f"{w.num_images} image{'s' if w.num_images != 1 else ''}"]
    facts += [f"seed {w.seed}"] if w.seed is not None else []
    facts += [f"sampler {html.escape(str(w.sampler))}"] if w.sampler else []
    return (f'<article class="card"><a href="{link}">'
            f'<div class="thumbs">{thumbs or "<span class=none>no images</span>"}</div>'
            f'<h2>{html.escape(w.id)}</h2></a><p>{html.escape(w.title)}</p>'
            f'<p class="meta">{" · ".join(facts)}</p></article>')


def document_html(doc: Document) -> str:
    """One document: prompt and generated parts told apart (a label and a colour each)."""
    parts = [f"<h1>{html.escape(doc.id)}</h1>",
             '<p class="legend"><span class="tag prompt">prompt</span> given &nbsp; '
             '<span class="tag generated">generated</span> written or drawn by the model</p>']
    for seg in doc.segments:
        source = seg.source or "prompt"
        tag = f'<span class="tag {source}">{source}</span>'
        if seg.type == "text" and seg.text is not None:
            parts.append(f'<p class="seg {source}">{tag} {html.escape(seg.text)}</p>')
        elif seg.type == "image" and seg.path is not None:
            src = seg.path if not os.path.isabs(seg.path) else Path(seg.path).as_uri()
            parts.append(f'<figure class="seg {source}">{tag}<img class="full" src="{html.escape(src, quote=True)}" '
                         f'alt="{source} image"></figure>')
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


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:40em;margin:2em auto;line-height:1.5;padding:0 1em}"
          "body.wide{max-width:72em}img{image-rendering:pixelated;image-rendering:crisp-edges}"
          "img.full{width:256px;height:256px;border:1px solid #ccc;display:block;margin-top:.3em}"
          ".seg{border-left:4px solid #aaa;padding-left:.6em;margin:.8em 0}.seg.generated{border-color:#4a7}"
          ".tag{font-size:.7em;text-transform:uppercase;letter-spacing:.05em;padding:0 .4em;border-radius:3px;"
          "background:#eee;color:#555}.tag.generated{background:#dfe;color:#275}"
          ".gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(17em,1fr));gap:1em}"
          ".card{border:1px solid #ddd;border-radius:6px;padding:.7em}.card a{color:inherit;text-decoration:none}"
          ".card h2{font-size:1em;margin:.4em 0 0}.card p{margin:.3em 0}"
          ".thumbs{display:flex;gap:4px;flex-wrap:wrap}img.thumb{width:64px;height:64px;border:1px solid #ccc}"
          ".meta,footer,.legend{color:#777;font-size:.85em}.failed{color:#a33}")


def _page(title: str, body: str, *, wide: bool = False) -> str:
    body_class = ' class="wide"' if wide else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body{body_class}>\n{body}\n</body></html>\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
