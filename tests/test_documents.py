"""Documents: reading, writing, ids, media loading and validation, with exact messages."""

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmgen.data.documents import (
    MAX_ID_BYTES,
    Document,
    DocumentError,
    Segment,
    document_from_json,
    iter_records,
    read_documents,
    read_prompts,
    safe_id,
    validate_files,
    write_documents,
)
from mmgen.data.media import document_images, frame_indices, load_image, load_video_frames


def png(path: Path, colour=(255, 0, 0), size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def lines(path: Path, *rows) -> Path:
    """Write rows (dicts as JSON, strings as they are) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def doc_json(*segments, **extra):
    return {"segments": list(segments) or [{"type": "text", "text": "hi"}], **extra}


def make_mp4(path: Path, n: int = 20, fps: int = 10) -> Path:
    """Frame i is a flat grey of value 12 * i, so a decoded frame tells its index."""
    av = pytest.importorskip("av")
    np = pytest.importorskip("numpy")
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(n):
            frame = np.full((32, 32, 3), 12 * i, dtype=np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def messages(errors):
    return [str(e) for e in errors]


# --- writing and reading ------------------------------------------------------------------


def test_round_trip(tmp_path):
    docs = [
        Document("story-1", [Segment("text", text="Ein großer roter Kreis ☺"),
                             Segment("image", path="images/a.png", source="prompt"),
                             Segment("text"), Segment("image")],
                 meta={"seed": 3, "nested": {"a": [1, 2.5, None]}}),
        Document("clip", [Segment("video", path="/abs/v.mp4", frames=8, fps=2.5)]),
    ]
    path = tmp_path / "sub" / "out.jsonl"
    write_documents(path, docs)
    assert "großer" in path.read_text(encoding="utf-8")  # not \u-escaped
    back = read_documents(path)
    assert [d.to_json() for d in back] == [d.to_json() for d in docs]
    assert back[0].base_dir == path.parent.absolute()
    assert [d.origin for d in back] == [f"{path}:1", f"{path}:2"]
    assert back[0].segments[2].is_placeholder and back[0].segments[3].is_placeholder
    assert any(s.is_placeholder for s in back[0].segments) and not any(s.is_placeholder for s in back[1].segments)


def test_single_json_document_reads(tmp_path):
    path = tmp_path / "document.json"
    path.write_text(json.dumps(doc_json(id="x"), indent=2), encoding="utf-8")
    (doc,) = read_documents(path)
    assert doc.id == "x" and doc.texts == ["hi"]
    path.write_text('{\n  "segments": [\n    oops\n  ]\n}\n', encoding="utf-8")
    assert messages(read_prompts(path)[1]) == [f"{path}:3: invalid JSON: Expecting value (column 5)"]


def test_default_ids_count_records_from_zero(tmp_path):
    path = lines(tmp_path / "My Prompts.jsonl", doc_json(), "", doc_json(id="named"), doc_json())
    assert [d.id for d in read_documents(path)] == ["My-Prompts-0000", "named", "My-Prompts-0002"]
    assert [d.origin.rsplit(":", 1)[1] for d in read_documents(path)] == ["1", "3", "4"]


def test_txt_prompts(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("# a comment\n\n  A red circle.  \n   # indented comment\nA blue square.\r\n",
                    encoding="utf-8")
    docs, errors = read_prompts(path)
    assert errors == []
    assert [d.id for d in docs] == ["stories-0000", "stories-0001"]
    assert [d.texts for d in docs] == [["A red circle."], ["A blue square."]]
    assert [d.origin for d in docs] == [f"{path}:3", f"{path}:5"]
    assert all(len(d.segments) == 1 and not d.segments[0].is_placeholder for d in docs)


def test_shipped_example_prompts_read():
    docs, errors = read_prompts(Path(__file__).parent.parent / "examples" / "prompts" / "stories.txt")
    assert errors == [] and len(docs) >= 1


# --- ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("story-0001", "story-0001"),
    ("../../x", "x"),
    ("/etc/passwd", "etc-passwd"),
    ("C:\\Windows\\x", "C-Windows-x"),
    ("", "untitled"),
    ("..", "untitled"),
    (".hidden", "hidden"),
    ("a..b", "a.b"),
    ("tab\there\nnew\x00", "tab-here-new"),
    ("héllo wörld", "héllo-wörld"),
    ("nul", "_nul"),
])
def test_safe_id(raw, expected):
    assert safe_id(raw) == expected


def test_safe_id_bounds_length_and_keeps_long_ids_distinct():
    a, b = safe_id("x" * 500 + "a"), safe_id("x" * 500 + "b")
    assert len(a.encode()) <= MAX_ID_BYTES and len(safe_id("é" * 300).encode()) <= MAX_ID_BYTES
    assert a != b


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_safe_id_is_always_a_safe_file_name(s):
    out = safe_id(s)
    assert out and "/" not in out and "\\" not in out and ".." not in out
    assert not out.startswith(".") and not Path(out).is_absolute()
    assert all(c.isprintable() and not c.isspace() for c in out)
    assert len(out.encode("utf-8")) <= MAX_ID_BYTES
    assert safe_id(out) == out


def test_ids_from_file_are_made_safe(tmp_path):
    path = lines(tmp_path / "p.jsonl", doc_json(id="../../evil"), doc_json(id=7))
    assert [d.id for d in read_documents(path)] == ["evil", "7"]


# --- paths and media ----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    png(data / "images" / "a.png", (0, 255, 0))
    absolute = png(tmp_path / "elsewhere" / "b.png", (0, 0, 255), mode="RGBA")
    path = lines(data / "d.jsonl", doc_json({"type": "image", "path": "images/a.png"},
                                            {"type": "text", "text": "then"},
                                            {"type": "image", "path": str(absolute)},
                                            {"type": "image"}))
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working folder
    (doc,) = read_documents(path)
    assert doc.resolve("images/a.png") == data.absolute() / "images" / "a.png"
    assert doc.resolve(str(absolute)) == absolute
    images = document_images(doc)  # the placeholder is skipped
    assert [im.mode for im in images] == ["RGB", "RGB"]
    assert [im.getpixel((0, 0)) for im in images] == [(0, 255, 0), (0, 0, 255)]


def test_in_memory_image_wins_over_path(tmp_path):
    im = Image.new("RGB", (4, 4), (1, 2, 3))
    doc = Document("d", [Segment("image", path="missing.png", image=im), Segment("image")],
                   base_dir=tmp_path)
    assert not doc.segments[0].is_placeholder and doc.segments[1].is_placeholder
    assert document_images(doc) == [im]


def test_load_image_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    whole = png(tmp_path / "whole.png", size=(64, 64))
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:60])
    for name, expected in [("nope.png", "image not found"),
                           (".", "image is a directory, not a file"),
                           ("bad.png", "not an image (unrecognised format)")]:
        with pytest.raises(DocumentError) as e:
            load_image(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: {expected}"
    with pytest.raises(DocumentError, match=r"cut\.png: corrupt image \("):
        load_image(tmp_path / "cut.png")
    assert load_image(png(tmp_path / "g.png", 7, mode="L")).getpixel((0, 0)) == (7, 7, 7)


def test_document_images_error_names_line_segment_and_file(tmp_path):
    path = lines(tmp_path / "d.jsonl", doc_json(), doc_json({"type": "text", "text": "a"},
                                                            {"type": "image", "path": "gone.png"}))
    doc = read_documents(path)[1]
    with pytest.raises(DocumentError) as e:
        document_images(doc)
    assert str(e.value) == f"{path}:2: segment 2: image not found: {tmp_path.absolute() / 'gone.png'}"


@pytest.mark.parametrize("n, k, expected", [
    (20, 4, [2, 7, 12, 17]),
    (10, 1, [5]),
    (3, 8, [0, 1, 2]),  # never more frames than the video has
    (100, 5, [10, 30, 50, 70, 90]),
])
def test_frame_indices_are_evenly_spaced(n, k, expected):
    assert frame_indices(n, frames=k) == expected


def test_frame_indices_with_fps():
    assert frame_indices(20, fps=2, video_fps=10) == [0, 5, 10, 15]
    assert frame_indices(20, fps=2, video_fps=10, frames=2) == [0, 5]
    assert frame_indices(5, fps=100, video_fps=10) == [0, 1, 2, 3, 4]  # at most every frame
    assert frame_indices(7, fps=3, video_fps=7) == [0, 2, 4]
    with pytest.raises(ValueError, match="no frame rate"):
        frame_indices(20, fps=2, video_fps=0.0)


def test_video_frames_evenly_spaced(tmp_path):
    video = make_mp4(tmp_path / "clip.mp4")

    def index(im):  # the grey level says which frame it is (lossy codec: allow slack)
        return round(im.getpixel((16, 16))[0] / 12)

    frames = load_video_frames(video, frames=4)
    assert [im.size for im in frames] == [(32, 32)] * 4
    assert [index(im) for im in frames] == [2, 7, 12, 17]
    assert [index(im) for im in load_video_frames(video)] == [2, 7, 12, 17]  # default 4
    assert [index(im) for im in load_video_frames(video, fps=2)] == [0, 5, 10, 15]
    path = lines(tmp_path / "v.jsonl", doc_json({"type": "text", "text": "a"},
                                                {"type": "video", "path": "clip.mp4", "frames": 3},
                                                {"type": "image", "path": "i.png"}))
    png(tmp_path / "i.png", (255, 255, 255))
    images = document_images(read_documents(path)[0])
    assert [index(im) for im in images[:3]] == [3, 10, 16]
    assert images[3].getpixel((0, 0)) == (255, 255, 255)
    assert validate_files([path]) == (1, [])


def test_unreadable_video(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"\x00\x01 definitely not a video" * 10)
    with pytest.raises(DocumentError) as e:
        load_video_frames(tmp_path / "v.mp4")
    assert str(e.value).startswith(f"{tmp_path / 'v.mp4'}: decord cannot open the video (")
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


# --- bad input ----------------------------------------------------------------------------

BAD_LINES = [
    ('{"segments": [', "invalid JSON: Expecting value (column 15)"),
    ('[1, 2]', "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
    ('{"segments": [{"type": "text", "text": NaN}]}', "invalid JSON: NaN is not allowed"),
    ("[" * 100000, "invalid JSON: nested too deeply"),
    ({"segments": [{"type": "audio", "path": "a.wav"}]},
     "segment 1: unknown type 'audio' (expected text, image or video)"),
    ({"segments": [{"text": "hi"}]}, "segment 1: missing `type` (text, image or video)"),
    ({"segments": []}, "`segments` is empty"),
    ({"id": "x"}, "missing `segments` (a list of text, image and video segments)"),
    ({"segments": {"type": "text"}}, "`segments` must be a list, got an object"),
    ({"segments": ["hi"]}, "segment 1: expected an object, got a string"),
    ({"segment": []}, "unknown key `segment` (allowed: id, segments, meta)"),
    (doc_json(meta=[1]), "`meta` must be an object, got an array"),
    (doc_json(id=None), "`id` must be a string, got null"),
    (doc_json({"type": "text", "text": 3}), "segment 1: `text` must be a string, got a number"),
    (doc_json({"type": "text", "text": "a"}, {"type": "image", "path": 5}),
     "segment 2: `path` must be a non-empty string without NUL, got a number"),
    (doc_json({"type": "image", "path": ""}),
     "segment 1: `path` must be a non-empty string without NUL, got a string"),
    (doc_json({"type": "image", "caption": "x"}),
     "segment 1: unknown key `caption` (allowed: type, path, source)"),
    (doc_json({"type": "image", "frames": 2}), "segment 1: `frames` does not apply to image segments"),
    (doc_json({"type": "video", "path": "v.mp4", "frames": 0}),
     "segment 1: `frames` must be a whole number from 1 to 1024, got 0"),
    (doc_json({"type": "video", "path": "v.mp4", "frames": 5000}),
     "segment 1: `frames` must be a whole number from 1 to 1024, got 5000"),
    (doc_json({"type": "video", "path": "v.mp4", "frames": 2.5}),
     "segment 1: `frames` must be a whole number from 1 to 1024, got 2.5"),
    (doc_json({"type": "video", "path": "v.mp4", "frames": True}),
     "segment 1: `frames` must be a whole number from 1 to 1024, got True"),
    (doc_json({"type": "video", "path": "v.mp4", "fps": -1}),
     "segment 1: `fps` must be a number above 0 and at most 1000, got -1"),
    (doc_json({"type": "text", "text": "a", "source": "model"}),
     "segment 1: `source` must be \"prompt\" or \"generated\", got 'model'"),
]


@pytest.mark.parametrize("row, expected", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_line_message_and_line_number(tmp_path, row, expected):
    path = lines(tmp_path / "d.jsonl", doc_json(), "", row, doc_json())
    records = list(iter_records(path))  # lenient: carries on past the bad line
    assert [type(r).__name__ for r in records] == ["Document", "DocumentError", "Document"]
    assert str(records[1]) == f"{path}:3: {expected}"
    assert records[2].id == "d-0002" and records[2].origin == f"{path}:4"
    with pytest.raises(DocumentError) as e:  # strict: the first problem
        read_documents(path)
    assert (e.value.file, e.value.line, e.value.message) == (str(path), 3, expected)


def test_document_from_json_directly():
    doc = document_from_json(doc_json(), file="/data/x.jsonl", line=9, default_id="x-0008")
    assert (doc.id, doc.origin, doc.base_dir) == ("x-0008", "/data/x.jsonl:9", Path("/data"))
    with pytest.raises(DocumentError, match=r"^/data/x.jsonl:9: expected a JSON object, got null$"):
        document_from_json(None, file="/data/x.jsonl", line=9, default_id="x")


def test_non_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(doc_json()).encode() + b'\n{"id": "caf\xe9"}\n')
    docs, errors = read_prompts(path)
    assert len(docs) == 1
    assert messages(errors) == [f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 12)"]


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", b"", "empty file: no documents"),
    ("blank.jsonl", b"\n  \n", "empty file: no documents"),
    ("empty.txt", b"", "empty file: no prompts"),
    ("comments.txt", b"# one\n\n# two\n", "no prompts: every line is blank or a comment"),
    ("empty.json", b" ", "empty file: no document"),
])
def test_empty_files_are_a_file_level_problem(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    docs, errors = read_prompts(path)
    assert docs == [] and messages(errors) == [f"{path}: {expected}"]
    assert errors[0].line == 0


def test_unreadable_files(tmp_path):
    assert messages(validate_files([tmp_path / "nope.jsonl"])[1]) == [f"{tmp_path / 'nope.jsonl'}: file not found"]
    assert messages(validate_files([tmp_path])[1]) == [f"{tmp_path}: is a directory, not a file"]
    if os.path.exists("/dev/zero"):  # must be refused without being read (it never ends)
        assert messages(validate_files([Path("/dev/zero")])[1]) == ["/dev/zero: is not a regular file"]


# --- validation ---------------------------------------------------------------------------


def test_validate_reports_every_problem_in_order(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all")
    (tmp_path / "text.png").write_text("hello")
    text = {"type": "text", "text": "t"}
    path = lines(
        tmp_path / "d.jsonl",
        doc_json(text, {"type": "image", "path": "ok.png"}),             # 1 fine
        '{"segments": [',                                                # 2
        doc_json(text, {"type": "image", "path": "missing.png"},         # 3 two problems
                 {"type": "image", "path": "corrupt.png"}, {"type": "image", "path": "text.png"}),
        doc_json({"type": "sound"}),                                     # 4
        doc_json({"type": "image", "path": "folder.png"}),               # 5
        doc_json({"type": "video", "path": "bad.mp4"}),                  # 6
        "[]",                                                            # 7
        doc_json({"type": "image", "path": "ok.png"}, id="a"),           # 8
        doc_json({"type": "image"}, id="a"),                             # 9 duplicate id
    )
    count, errors = validate_files([path, tmp_path / "missing.txt"])
    assert count == 6
    got = [(e.line, e.message.split(" (")[0]) for e in errors]
    assert got == [
        (2, "invalid JSON: Expecting value"),
        (3, f"segment 2: image not found: {tmp_path.absolute() / 'missing.png'}"),
        (3, "segment 3: corrupt image"),
        (3, "segment 4: not an image"),
        (4, "segment 1: unknown type 'sound'"),
        (5, f"segment 1: image is a directory, not a file: {tmp_path.absolute() / 'folder.png'}"),
        (6, "segment 1: decord cannot open the video"),
        (7, "expected a JSON object, got an array"),
        (9, "duplicate id 'a'"),
        (0, "file not found"),
    ]
    assert all(str(e).startswith(f"{path}:") for e in errors[:-1])
    assert str(errors[-1]) == f"{tmp_path / 'missing.txt'}: file not found"


def test_validate_corrupt_image_after_a_valid_header(tmp_path):
    whole = png(tmp_path / "whole.png", size=(64, 64))
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:60])
    path = lines(tmp_path / "d.jsonl", doc_json({"type": "image", "path": "cut.png"}))
    count, errors = validate_files([path])
    assert count == 1 and len(errors) == 1
    assert str(errors[0]).startswith(f"{path}:1: segment 1: corrupt image (")


def test_validate_txt_and_jsonl_together(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# c\none\ntwo\n", encoding="utf-8")
    path = lines(tmp_path / "d.jsonl", doc_json())
    assert validate_files([txt, path]) == (3, [])


@settings(max_examples=60, deadline=None)
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".txt", ".json"]))
def test_validate_never_raises_on_random_bytes(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    path.write_bytes(content)
    count, errors = validate_files([path])
    assert count >= 0 and all(isinstance(e, DocumentError) and str(e).startswith(str(path)) for e in errors)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=5) | st.sampled_from(["text", "image", "video", "prompt"]),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["id", "segments", "meta", "type", "text",
                                                       "path", "frames", "fps", "source", "x"]),
                                      inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_document_from_json_accepts_or_explains(obj):
    try:
        doc = document_from_json(obj, file="f.jsonl", line=1, default_id="f-0000")
    except DocumentError as e:
        assert str(e).startswith("f.jsonl:1: ")
    else:
        assert doc.segments and all(s.type in ("text", "image", "video") for s in doc.segments)
        assert document_from_json(doc.to_json(), file="f.jsonl", line=1, default_id="z").to_json() == doc.to_json()
