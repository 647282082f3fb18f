"""ShapeStories: rendering, the exact reader, sentences, stories, corpus files, eval prompts."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from mmgen.data import shapes as S
from mmgen.data.shapes_reader import read_image, score_attributes
from mmgen.evaluation.shapes_prompts import eval_prompts
from mmgen.data.shapes import Frame

ALL = list(S.all_frames())


def test_all_frames_enumerates_the_contract():
    assert len(ALL) == 6 * 3 * 2 * 9 * 4 == 1296
    assert len(set(ALL)) == 1296


@pytest.mark.parametrize("size", [32, 64])
def test_reader_reads_every_rendered_frame(size):
    wrong = []
    for f in ALL:
        got = read_image(S.render_array(f, size))
        if not got["found"] or any(got[k] != v for k, v in f.to_dict().items()):
            wrong.append((f, got))
    assert not wrong, f"{len(wrong)} misread at W={size}, e.g. {wrong[0]}"


@pytest.mark.parametrize("size", [32, 64])
def test_render_frame_is_flat_rgb_with_table_colours(size):
    f = Frame("triangle", "purple", "large", "center", "cream")
    img = S.render_frame(f, size)
    assert img.mode == "RGB" and img.size == (size, size)
    colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert colours == {S.BACKGROUNDS["cream"], S.COLOURS["purple"]}
    assert read_image(img)["shape"] == "triangle"  # PIL input works too


@pytest.mark.parametrize("size", [32, 64])
def test_exact_half_extent_at_canonical_sizes(size):
    for shape, sz, pos in itertools.product(S.SHAPES, S.SIZES, S.POSITIONS):
        assert S.half_extent(shape, sz, pos, size) == S.HALF_EXTENT[sz] * size / 64


def test_square_geometry_at_64():
    m = S.object_mask("square", "small", "top left", 64)  # centre (16, 16), s = 7
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (9, 22, 9, 22)
    m = S.object_mask("triangle", "large", "bottom right", 64)  # centre (48, 48), s = 12
    ys, xs = np.nonzero(m)
    assert ys.min() == 37 and ys.max() == 59  # row 36 is empty: the apex sits on a pixel edge
    assert xs[ys == 59].min() == 36 and xs[ys == 59].max() == 59


def test_shape_geometry_reads_back_at_every_small_size():
    # W from 32 to 72: shape, size and position depend only on the mask, so one colour suffices
    for size in range(32, 73):
        for shape, sz, pos in itertools.product(S.SHAPES, S.SIZES, S.POSITIONS):
            f = Frame(shape, "red", sz, pos, "gray")
            got = read_image(S.render_array(f, size))
            assert (got["shape"], got["size"], got["position"]) == (shape, sz, pos), (size, f)
            assert abs(S.half_extent(shape, sz, pos, size) - S.HALF_EXTENT[sz] * size / 64) <= 0.5


def test_too_small_canvas_is_refused():
    with pytest.raises(ValueError, match="at least 32"):
        S.render_frame(ALL[0], 31)


def test_blank_canvas_has_no_object():
    for bg, rgb in S.BACKGROUNDS.items():
        img = np.empty((64, 64, 3), np.uint8)
        img[:] = rgb
        got = read_image(img)
        assert got["found"] is False and got["background"] == bg
        assert all(got[a] is None for a in S.ATTRIBUTES)
    assert score_attributes(read_image(img), ALL[0].to_dict())["joint"] is False


def test_frame_validates_names():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        Frame("circle", "pink", "small", "top", "gray")


# ---------------------------------------------------------------------------------------------
# sentences


def test_intro_sentences_round_trip():
    assert S.intro_sentence(Frame("circle", "red", "large", "top left", "gray")) == (
        "A large red circle is in the top left."
    )
    for f in ALL[: 6 * 3 * 2 * 9]:  # one background: 324 object frames
        parsed = S.parse_sentence(S.intro_sentence(f))
        assert parsed is not None and parsed["kind"] == "intro"
        assert S.apply_change({"background": f.background}, parsed) == f.to_dict()


def test_change_sentences_round_trip():
    values = {"shape": S.SHAPES, "colour": S.COLOURS, "size": S.SIZES, "position": S.POSITIONS}
    seen = set()
    for old in ALL[: 6 * 3 * 2 * 9]:
        for attr, vals in values.items():
            for v in vals:
                if v == getattr(old, attr):
                    continue
                new = old.replace(**{attr: v})
                text = S.change_sentence(old, new)
                parsed = S.parse_sentence(text)
                assert parsed["kind"] == "change" and parsed["change"] == attr, text
                assert parsed["subject"] == old.shape
                assert S.apply_change(old.to_dict(), parsed) == new.to_dict(), text
                seen.add(text.split()[2].rstrip("."))
    assert seen == {"turns", "moves", "grows", "shrinks", "becomes"}


def test_change_sentence_forms():
    f = Frame("square", "blue", "small", "center", "sky")
    assert S.change_sentence(f, f.replace(colour="red")) == "The square turns red."
    moved = "The square moves to the bottom right."
    assert S.change_sentence(f, f.replace(position="bottom right")) == moved
    assert S.change_sentence(f, f.replace(size="large")) == "The square grows."
    assert S.change_sentence(f.replace(size="large"), f) == "The square shrinks."
    assert S.change_sentence(f, f.replace(shape="circle")) == "The square becomes a circle."
    with pytest.raises(ValueError):
        S.change_sentence(f, f.replace(colour="red", size="large"))
    with pytest.raises(ValueError):
        S.change_sentence(f, f.replace(background="mint", colour="red"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello.",
        "A large red circle is in the top left",  # no full stop
        "A huge red circle is in the top left.",
        "A large pink circle is in the top left.",
        "A large red circle is at the top left.",
        "The circle becomes a circle.",
        "The circle turns gray.",  # backgrounds are never named
        "The circle moves to the middle.",
        "A large red circle is in the top left. The circle grows.",
    ],
)
def test_parse_rejects_sentences_outside_the_grammar(text):
    assert S.parse_sentence(text) is None


def test_parse_ignores_case_and_spacing():
    assert S.parse_sentence("  a Large RED circle   is in the center. ") == {
        "kind": "intro", "shape": "circle", "colour": "red", "size": "large", "position": "center",
    }  # fmt: skip


def test_score_attributes():
    truth = {"shape": "circle", "colour": "red", "size": "large", "position": "top"}
    truth["background"] = "sky"
    pred = {**truth, "colour": "blue"}
    assert score_attributes(pred, truth) == {
        "shape": True, "colour": False, "size": True, "position": True, "joint": False,
    }  # fmt: skip
    assert score_attributes(truth, truth)["joint"]
    assert score_attributes(None, truth) == dict.fromkeys([*S.ATTRIBUTES, "joint"], False)
    assert score_attributes(pred, truth, ("background",)) == {"background": True, "joint": True}


# ---------------------------------------------------------------------------------------------
# stories


def _check_story(doc):
    truth = doc.meta["shapes"]
    assert truth["version"] == 1 and truth["image_size"] == 32
    frames = [Frame.from_dict(f) for f in truth["frames"]]
    assert 2 <= len(frames) <= 4 and len(doc.segments) == 2 * len(frames)
    assert len({f.background for f in frames}) == 1
    kinds = [s.type for s in doc.segments]
    pair = ["text", "image"] if truth["order"] == "text-image" else ["image", "text"]
    assert kinds == pair * len(frames)
    texts = [s.text for s in doc.segments if s.type == "text"]
    images = [s.image for s in doc.segments if s.type == "image"]
    assert truth["frames"][0]["change"] is None
    attrs = {"background": frames[0].background}
    for k, (frame, text, image) in enumerate(zip(frames, texts, images)):
        parsed = S.parse_sentence(text)
        assert parsed["kind"] == ("intro" if k == 0 else "change")
        if k:
            change = truth["frames"][k]["change"]
            assert S.changed_attribute(frames[k - 1], frame) == change == parsed["change"]
        attrs = S.apply_change(attrs, parsed)
        assert attrs == frame.to_dict()
        assert read_image(image) == {"found": True, **frame.to_dict()}
    return truth["order"], len(frames), [f["change"] for f in truth["frames"][1:]]


def test_stories_obey_the_rules():
    stats = [_check_story(d) for d in itertools.islice(S.stream_stories(7, 32), 300)]
    orders = [o for o, _, _ in stats]
    assert 100 < orders.count("text-image") < 200
    assert {n for _, n, _ in stats} == {2, 3, 4}
    assert {c for _, _, cs in stats for c in cs} == set(S.CHANGES)


def test_pairs_are_independent_described_frames():
    """shapes_pairs: each image follows (or precedes) its own introduction sentence; one background."""
    rng = random.Random(11)
    docs = [S.make_pairs(rng, size=32, doc_id=f"p{i}") for i in range(200)]
    orders = [d.meta["shapes"]["order"] for d in docs]
    assert 120 < orders.count("text-image") < 180  # sentence first with probability 0.75
    assert {len(d.segments) // 2 for d in docs} == {2, 3, 4}
    for d, order in zip(docs, orders):
        frames = d.meta["shapes"]["frames"]
        for k, f in enumerate(frames):
            first, second = d.segments[2 * k], d.segments[2 * k + 1]
            text, image = (first, second) if order == "text-image" else (second, first)
            assert text.type == "text" and image.type == "image"
            parsed = S.parse_sentence(text.text)
            assert parsed["kind"] == "intro" and f["change"] is None
            assert read_image(image.image) == {"found": True, **{a: f[a] for a in
                                                  ("shape", "colour", "size", "position", "background")}}
    # the background is the document's, as in a story (the synchronizer's rule holds everywhere);
    # it is drawn per document, so all four occur
    assert all(len({f["background"] for f in d.meta["shapes"]["frames"]}) == 1 for d in docs)
    assert {d.meta["shapes"]["frames"][0]["background"] for d in docs} == set(S.BACKGROUNDS)
    # the objects do not carry over: some document has two pairs that differ in shape, colour and position
    assert any(all(a[k] != b[k] for k in ("shape", "colour", "position"))
               for d in docs for a, b in itertools.pairwise(d.meta["shapes"]["frames"]))


def test_stream_is_deterministic_and_ids_count():
    a = [d.to_json() for d in itertools.islice(S.stream_stories(3, 32), 20)]
    b = [d.to_json() for d in itertools.islice(S.stream_stories(3, 32), 20)]
    c = [d.to_json() for d in itertools.islice(S.stream_stories(4, 32), 20)]
    assert a == b and a != c
    assert [d["id"] for d in a[:2]] == ["story-000000", "story-000001"]


def test_make_story_uses_the_given_rng():
    d1 = S.make_story(random.Random(5), size=32, story_id="x")
    d2 = S.make_story(random.Random(5), size=32, story_id="x")
    assert d1.to_json() == d2.to_json() and d1.id == "x"


def _tree(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def test_write_corpus_is_byte_identical_per_seed(tmp_path):
    calls = []
    path = S.write_corpus(tmp_path / "a", 12, 1, 32, progress=lambda i, n: calls.append((i, n)))
    S.write_corpus(tmp_path / "b", 12, seed=1, size=32)
    S.write_corpus(tmp_path / "c", 12, seed=2, size=32)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b and a != c
    assert calls[-1] == (12, 12) and len(calls) == 12
    lines = path.read_text().splitlines()
    assert len(lines) == 12
    for line in lines:
        doc = json.loads(line)
        for seg in doc["segments"]:
            if seg["type"] == "image":
                img = Image.open(tmp_path / "a" / seg["path"])
                assert not seg["path"].startswith("/") and img.size == (32, 32)
        frames = doc["meta"]["shapes"]["frames"]
        first = next(s for s in doc["segments"] if s["type"] == "image")
        read = read_image(Image.open(tmp_path / "a" / first["path"]))
        assert read == {"found": True, **{k: v for k, v in frames[0].items() if k != "change"}}


# ---------------------------------------------------------------------------------------------
# evaluation prompts


def test_eval_prompts():
    layouts = {
        "t2i": [("text", False), ("image", True)],
        "caption": [("image", False), ("text", True)],
        "continuation": [("text", False), ("image", False), ("text", False), ("image", True)],
        "story": [("text", False)],
        "reintro": [("text", False), ("image", False), ("text", False), ("image", True)],
    }
    for task, layout in layouts.items():
        docs = eval_prompts(task, 20, seed=0, size=32)
        assert len(docs) == 20 and docs[0].id == f"{task}-0000"
        records = [d.to_json() for d in docs]
        assert records == [d.to_json() for d in eval_prompts(task, 20, seed=0, size=32)]
        assert records != [d.to_json() for d in eval_prompts(task, 20, seed=1, size=32)]
        for d in docs:
            assert [(s.type, s.is_placeholder) for s in d.segments] == layout
            truth = d.meta["shapes"]
            assert truth["task"] == task
            assert len(truth["frames"]) == (2 if task in ("continuation", "reintro") else 1)
            first = truth["frames"][0]
            if task != "caption":
                parsed = S.parse_sentence(d.segments[0].text)
                attrs = S.apply_change({"background": first["background"]}, parsed)
                assert attrs == {k: v for k, v in first.items() if k != "change"}
            if task == "continuation":
                second = truth["frames"][1]
                assert second["background"] == first["background"]
                parsed = S.parse_sentence(d.segments[2].text)
                assert parsed["change"] == second["change"]
            if task == "reintro":  # another object's introduction, on the same background
                second = truth["frames"][1]
                assert second["background"] == first["background"] and second["change"] is None
                attrs = S.apply_change({"background": first["background"]}, S.parse_sentence(d.segments[2].text))
                assert attrs == {k: v for k, v in second.items() if k != "change"}
            if task in ("caption", "continuation", "reintro"):
                image = next(s.image for s in d.segments if s.type == "image")
                assert read_image(image)["colour"] == first["colour"]
    with pytest.raises(ValueError, match="unknown evaluation task"):
        eval_prompts("vqa", 1, 0, 32)


def test_eval_stream_differs_from_training():
    train = next(S.stream_stories(0, 32)).meta["shapes"]["frames"][0]
    evals = [eval_prompts(t, 1, 0, 32)[0].meta["shapes"]["frames"][0] for t in S.TASKS]
    assert sum(e == train for e in evals) < len(evals)


def test_shapes_pairs_training_source():
    from mmgen.config import DataConfig, SourceConfig
    from mmgen.training.data import build_source

    src = build_source(SourceConfig(kind="shapes_pairs"), DataConfig(image_size=32))
    doc = src.sample(random.Random(0), "train-0")
    assert doc.id == "train-0" and doc.meta["shapes"]["pairs"] is True
    assert all(S.parse_sentence(s.text)["kind"] == "intro" for s in doc.segments if s.type == "text")
