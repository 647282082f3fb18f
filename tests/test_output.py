"""The generation writer: escaped HTML, ids that can't leave OUT, distinct folders,
refusing unusable output folders, and a document.json that reads back as a document."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmgen.data.documents import Document, Segment, iter_records, safe_id, validate_files
from mmgen.generation.output import (
    OutputError,
    Written,
    prepare_out_dir,
    unique_folder,
    write_document,
    write_run_index,
)

HOSTILE = "<script>alert(1)</script> <b>bold</b> & \"double\" 'single'"


def image(colour=(255, 0, 0), size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, colour)


def story(doc_id="story", text="A red circle.", **meta) -> Document:
    return Document(doc_id, [
        Segment("text", text=text, source="prompt"),
        Segment("image", image=image((255, 0, 0)), source="prompt"),
        Segment("text", text="It turns blue.", source="generated"),
        Segment("image", image=image((0, 0, 255), (16, 12)), source="generated"),
    ], meta=dict(meta))


def write_run(out: Path, docs: list[Document], failed=()) -> list[Written]:
    """What `mmgen generate` does with finished documents: one folder each, then the index."""
    prepare_out_dir(out, overwrite=False)
    taken: set[str] = set()
    written = []
    for doc in docs:
        _, folder = unique_folder(out, doc.id, taken)
        assert folder.parent == out.resolve(), f"{doc.id!r} -> {folder}"  # before writing anything
        written.append(write_document(doc, folder))
    write_run_index(out, written, list(failed))
    return written


def files_under(root: Path) -> set[Path]:
    return {Path(d, f).resolve() for d, _, fs in os.walk(root) for f in fs}


# --- escaping -----------------------------------------------------------------------------


def test_text_id_and_meta_are_escaped_in_both_pages(tmp_path):
    out = tmp_path / "out"
    doc = story(doc_id=f"id {HOSTILE}", text=HOSTILE, checkpoint="</footer><script>x()</script>", seed=3)
    (w,) = write_run(out, [doc], failed=["<script>failed()</script>"])
    pages = {"document": (w.folder / "index.html").read_text(encoding="utf-8"),
             "run": (out / "index.html").read_text(encoding="utf-8")}
    for name, page in pages.items():
        assert "<script" not in page and "<b>" not in page, name
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, name
        assert "&lt;b&gt;bold&lt;/b&gt;" in page and "&amp;" in page, name
        assert '"double"' not in page and "&quot;double&quot;" in page, name
    assert "&lt;/footer&gt;&lt;script&gt;x()" in pages["document"]
    assert "&lt;script&gt;failed()&lt;/script&gt;" in pages["run"]


def test_pages_are_utf8_and_keep_unicode(tmp_path):
    text = "Le cercle 😀 \u202eRTL\u202c — done"
    (w,) = write_run(tmp_path / "out", [story(text=text)])
    page = (w.folder / "index.html").read_bytes()
    assert b'<meta charset="utf-8">' in page and text.encode("utf-8") in page


# --- ids never leave OUT ------------------------------------------------------------------

ESCAPING_IDS = ["../../x", "../", "/etc/passwd", "..", ".", "", "a/../../b", "..\\..\\x", "~",
                "x/./y", "\x00", "/", "//", "CON", ".hidden", "-", "index.html"]


def test_ids_cannot_write_outside_out(tmp_path):
    out = tmp_path / "deep" / "out"
    written = write_run(out, [story(doc_id=i) for i in ESCAPING_IDS])
    assert files_under(tmp_path) <= files_under(out)  # nothing written anywhere else
    folders = [w.folder for w in written]
    assert len(set(folders)) == len(ESCAPING_IDS)  # each got its own folder
    for w in written:
        assert w.folder.parent == out.resolve() and (w.folder / "document.json").is_file()
    assert (out / "index.html").is_file()  # the id "index.html" did not take the run index


def test_a_symlink_in_out_cannot_redirect_a_document(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "story").symlink_to(elsewhere, target_is_directory=True)
    prepare_out_dir(out, overwrite=True)
    with pytest.raises(OutputError, match="would write outside"):
        unique_folder(out, "story", set())
    assert list(elsewhere.iterdir()) == []


def test_same_id_twice_gets_two_folders(tmp_path):
    out = tmp_path / "out"
    written = write_run(out, [story(text="first"), story(text="second"), story(doc_id="STORY", text="third")])
    assert [w.folder.name for w in written] == ["story", "story-2", "STORY-3"]
    texts = [json.loads((w.folder / "document.json").read_text(encoding="utf-8"))["segments"][0]["text"]
             for w in written]
    assert texts == ["first", "second", "third"]
    run = (out / "index.html").read_text(encoding="utf-8")
    for w in written:
        assert f'href="{w.folder.name}/index.html"' in run


def test_unique_folder_names_are_safe_and_distinct(tmp_path):
    taken: set[str] = set()
    names = [unique_folder(tmp_path, i, taken)[0] for i in ["a", "a", "a-2", "A", "../a"]]
    assert names == ["a", "a-2", "a-2-2", "A-3", "a-4"]
    assert all(n == safe_id(n) for n in names) and taken == set(names)


# --- the out folder -----------------------------------------------------------------------


def test_prepare_out_dir_refuses_results_unless_overwrite(tmp_path):
    out = tmp_path / "new" / "out"
    prepare_out_dir(out, overwrite=False)  # made, parents too
    assert out.is_dir() and list(out.iterdir()) == []
    prepare_out_dir(out, overwrite=False)  # empty: fine
    (out / "old.txt").write_text("earlier run")
    with pytest.raises(OutputError) as e:
        prepare_out_dir(out, overwrite=False)
    assert str(e.value) == f"{out}: already holds results; choose another --out or pass --overwrite"
    prepare_out_dir(out, overwrite=True)
    assert (out / "old.txt").read_text() == "earlier run"  # overwrite never deletes by itself


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(OutputError, match=r": exists and is not a folder$"):
        prepare_out_dir(out, overwrite=True)


def test_out_under_a_regular_file_is_refused_clearly(tmp_path):
    parent = tmp_path / "file.txt"
    parent.write_text("x")
    out = parent / "out"
    with pytest.raises(OutputError) as e:
        prepare_out_dir(out, overwrite=False)
    assert str(e.value) == f"{out}: cannot write here (Not a directory)"
    with pytest.raises(OutputError, match=r"cannot write \(Not a directory\)$"):
        write_document(story(), out / "story")
    with pytest.raises(OutputError, match=r"cannot write \(Not a directory\)$"):
        write_run_index(out, [], [])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root ignores permissions (the regular-file parent test covers this)")
def test_read_only_out_is_refused_clearly(tmp_path):
    out = tmp_path / "out"
    out.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputError) as e:
            prepare_out_dir(out, overwrite=False)
        assert str(e.value) == f"{out}: cannot write here (Permission denied)"
    finally:
        out.chmod(0o700)


# --- what is written reads back -----------------------------------------------------------


def test_document_json_reads_back_with_relative_images(tmp_path):
    doc = story(doc_id="../Story 1", seed=7, sampler="ddim", timings={"total_s": 1.5})
    (w,) = write_run(tmp_path / "out", [doc])
    path = w.folder / "document.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert set(raw) == {"id", "segments", "meta"} and raw["meta"] == doc.meta
    (back,) = list(iter_records(path))  # a .json file is one document
    assert isinstance(back, Document) and back.id == safe_id("../Story 1") == "Story-1"
    assert [(s.type, s.text, s.source) for s in back.segments] == [
        ("text", "A red circle.", "prompt"), ("image", None, "prompt"),
        ("text", "It turns blue.", "generated"), ("image", None, "generated")]
    images = [s.path for s in back.segments if s.type == "image"]
    assert images == ["images/01.png", "images/02.png"]
    for p, size in zip(images, [(8, 6), (16, 12)]):
        assert not os.path.isabs(p) and back.resolve(p).is_file()
        with Image.open(back.resolve(p)) as im:
            assert im.size == size
    assert validate_files([path]) == (1, [])
    assert w.num_images == 2 and w.title == "A red circle."


def test_prompt_image_from_a_file_is_copied_in(tmp_path):
    image((0, 255, 0)).save(tmp_path / "prompt.png")
    doc = Document("p", [Segment("image", path="prompt.png"), Segment("text", text="Then:", source="generated")],
                   base_dir=tmp_path)
    (w,) = write_run(tmp_path / "out", [doc])
    (back,) = list(iter_records(w.folder / "document.json"))
    assert back.segments[0].source == "prompt" and back.segments[0].path == "images/01.png"
    assert (w.folder / "images" / "01.png").is_file()  # copied in: the output folder stands alone
    assert validate_files([w.folder / "document.json"]) == (1, [])


def test_story_md_references_the_images(tmp_path):
    (w,) = write_run(tmp_path / "out", [story(text=HOSTILE)])
    md = (w.folder / "story.md").read_text(encoding="utf-8")
    assert md.startswith("# story\n")
    for p in ["images/01.png", "images/02.png"]:
        assert f"]({p})" in md and (w.folder / p).is_file()
    assert "<script>" not in md and "&lt;script&gt;" in md  # inline HTML is escaped in Markdown too
    order = [md.index(s) for s in ["&lt;script&gt;", "images/01.png", "It turns blue.", "images/02.png"]]
    assert order == sorted(order)  # segments in document order
    html_page = (w.folder / "index.html").read_text(encoding="utf-8")
    assert html_page.count("<img ") == 2 and 'src="images/02.png"' in html_page


def test_story_png_shows_every_image_crisply_with_its_text(tmp_path):
    from mmgen.generation.picture import BAR, PAD, PANEL

    doc = story(seed=1)  # text, red 8x6 image (prompt), text, blue 16x12 image (generated)
    doc.segments.append(Segment("text", text="The end, after the last image.", source="generated"))
    (w,) = write_run(tmp_path / "out", [doc])
    picture = Image.open(w.folder / "story.png").convert("RGB")
    assert picture.size[0] == PAD + 3 * (PANEL + PAD)  # two image panels and one for the last text
    top = PAD + BAR
    for k, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        x = PAD + k * (PANEL + PAD)
        inside = {picture.getpixel((x + dx, top + dy)) for dx in (0, PANEL // 2, PANEL - 1) for dy in (0, PANEL - 1)}
        assert inside == {colour}  # nearest-neighbour scaling: no blended edge pixels
    bars = [picture.getpixel((PAD + k * (PANEL + PAD) + 5, PAD + 1)) for k in range(2)]
    assert bars[0] != bars[1]  # prompt and generated images are told apart
    below = picture.crop((PAD, top + PANEL, PAD + PANEL, picture.size[1]))
    assert below.getcolors(1 << 16) and len(below.getcolors(1 << 16)) > 1  # the caption was drawn
