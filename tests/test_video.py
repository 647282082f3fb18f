"""ShapeStories video: clips, MP4 round trips through decord, corpora, training, prompts."""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from mmgen.config import ConfigError, DataConfig, SourceConfig, load_config
from mmgen.data.collate import Collator
from mmgen.data.documents import DocumentError, iter_records, read_documents, validate_files
from mmgen.data.media import document_images, load_image, load_video_frames
from mmgen.data.shapes import ATTRIBUTES, Frame, random_frames, render_array, stream_stories
from mmgen.data.shapes_reader import read_image
from mmgen.data.shapes_video import (
    FPS,
    FRAMES_PER_STATE,
    key_frame_indices,
    make_video_story,
    render_clip,
    story_clip,
    stream_video_stories,
    write_mp4,
    write_video_corpus,
)
from mmgen.data.tokenizer import shapestories_sentences, train_tokenizer
from mmgen.training.data import DocumentStream

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def decoded(path, **sampling) -> np.ndarray:
    """(K, H, W, 3) frames of an MP4 as the library reads them (decord)."""
    return np.stack([np.asarray(im) for im in load_video_frames(path, **sampling)])


def truth_frames(doc) -> list[Frame]:
    return [Frame.from_dict(f) for f in doc.meta["shapes"]["frames"]]


# --- the clip --------------------------------------------------------------------------------


def test_clip_has_the_expected_frames_and_holds_each_state():
    frames, _ = random_frames(random.Random(1), 4)
    for per in (1, 2, 5, FRAMES_PER_STATE):
        clip = render_clip(frames, 64, frames_per_state=per)
        assert clip.shape == (4 * per, 64, 64, 3) and clip.dtype == np.uint8
        keys = key_frame_indices(4, per)
        assert keys == [k * per + per // 2 for k in range(4)]
        for k, frame in enumerate(frames):
            want = render_array(frame, 64)
            assert np.array_equal(clip[keys[k]], want) and np.array_equal(clip[k * per], want)
        # the background never changes: the outer ring of every frame is the background colour
        ring = np.ones((64, 64), dtype=bool)
        ring[2:-2, 2:-2] = False
        assert (clip[:, ring] == render_array(frames[0], 64)[0, 0]).all()
    assert np.array_equal(render_clip(frames, 64, indices=[13, 4]), render_clip(frames, 64)[[13, 4]])
    with pytest.raises(ValueError, match="outside the clip's 32 frames"):
        render_clip(frames, 64, indices=[32])


def test_in_between_frames_move_and_morph():
    a = Frame("circle", "red", "small", "top left", "sky")
    steps = {"position": a.replace(position="bottom right"), "size": a.replace(size="large"),
             "colour": a.replace(colour="blue"), "shape": a.replace(shape="square")}
    for change, b in steps.items():
        clip = render_clip([a, b], 64)
        between = clip[5:8]  # frames 0-4 hold a, 5-7 move towards b, 8-15 hold b
        assert not np.array_equal(clip[6], clip[0]) and not np.array_equal(clip[6], clip[8]), change
        # every in-between frame is one object on the fixed background
        assert all(read_image(f)["found"] and read_image(f)["background"] == "sky" for f in between)
    xs = [np.nonzero((render_clip([a, steps["position"]], 64)[i] != (195, 220, 245)).any(2))[1].mean()
          for i in (4, 5, 6, 7, 8)]
    assert xs == sorted(xs) and xs[0] < xs[-1]  # it slides, monotonically


# --- MP4 round trip ---------------------------------------------------------------------------


def test_mp4_frame_count_size_and_lossless_round_trip(tmp_path):
    frames, _ = random_frames(random.Random(2), 3)
    clip = render_clip(frames, 64)
    path = tmp_path / "clip.mp4"
    write_mp4(clip, path)
    assert path.stat().st_size < 10_000
    everything = decoded(path, frames=len(clip))
    assert everything.shape == (24, 64, 64, 3)
    assert np.array_equal(everything, clip)  # libx264rgb at qp 0: bit-exact colours
    buffer = io.BytesIO()
    write_mp4(clip, buffer)
    assert buffer.getvalue() == path.read_bytes()


@pytest.mark.parametrize("size", [64, 32, 48])  # decord 0.6 pads rows at 48 px; media.py undoes it
def test_decoded_key_frames_read_right(tmp_path, size):
    rng = random.Random(f"video-{size}")
    stories = 12
    for i in range(stories):
        doc = make_video_story(rng, size=size, story_id=f"s{i}")
        truth = doc.meta["shapes"]["frames"]
        path = tmp_path / f"{i}.mp4"
        write_mp4(story_clip(doc), path)
        for sampling in ({"frames": len(truth)}, {"fps": FPS / FRAMES_PER_STATE}):
            images = load_video_frames(path, **sampling)
            assert len(images) == len(truth) and images[0].size == (size, size)
            for image, want in zip(images, truth):
                got = read_image(image)
                assert {a: got[a] for a in (*ATTRIBUTES, "background")} == {
                    a: want[a] for a in (*ATTRIBUTES, "background")}, (i, sampling)
        # what the in-memory document holds is exactly what reading the file gives
        video = next(s for s in doc.segments if s.type == "video")
        assert np.array_equal(np.stack([np.asarray(im) for im in video.image]),
                              decoded(path, frames=video.frames))


def test_same_seed_same_bytes(tmp_path):
    a = write_video_corpus(tmp_path / "a", n=4, seed=7)
    b = write_video_corpus(tmp_path / "b", n=4, seed=7)
    c = write_video_corpus(tmp_path / "c", n=4, seed=8)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    videos = sorted(p.name for p in (tmp_path / "a" / "videos").iterdir())
    assert len(videos) == 4
    for name in videos:
        assert (tmp_path / "a" / "videos" / name).read_bytes() == (tmp_path / "b" / "videos" / name).read_bytes()


# --- documents and corpora ----------------------------------------------------------------------


def test_video_stories_tell_the_image_stories_of_the_same_seed():
    for video, image in itertools.islice(zip(stream_video_stories(3), stream_stories(3)), 20):
        assert video.meta["shapes"]["frames"] == image.meta["shapes"]["frames"]
        assert video.meta["shapes"]["order"] == image.meta["shapes"]["order"].replace("image", "video")
        assert [s.type for s in video.segments] == (
            ["text", "video"] if video.meta["shapes"]["order"] == "text-video" else ["video", "text"])
        text = next(s.text for s in video.segments if s.type == "text")
        assert text == " ".join(image.texts)


def test_cli_writes_a_video_corpus_that_validates(tmp_path):
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["data", "shapes", "--video", "--out", str(out), "--n", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 video stories" in result.output
    result = runner.invoke(app, ["data", "validate", str(out / "documents.jsonl")])
    assert result.exit_code == 0, result.output
    docs = read_documents(out / "documents.jsonl")
    for doc in docs:
        (video,) = [s for s in doc.segments if s.type == "video"]
        assert video.path == f"videos/{doc.id}.mp4" and video.frames == len(doc.meta["shapes"]["frames"])
        assert doc.meta["shapes"]["clip"]["key_frames"] == key_frame_indices(video.frames)
        assert [read_image(im)["colour"] for im in document_images(doc)] == [
            f.colour for f in truth_frames(doc)]


def test_collated_batches_hold_every_key_frame(tmp_path):
    tok = train_tokenizer(shapestories_sentences(), 512)
    cfg = load_config(None, ["data.seq_len=512", "data.max_images_per_seq=16"])
    collate = Collator(tok, cfg)
    # from disk (the jsonl source reads the MP4s with decord) ...
    write_video_corpus(tmp_path / "corpus", n=3, seed=0)
    cfg.data.sources = [SourceConfig(kind="jsonl", path=str(tmp_path / "corpus"))]
    on_disk = DocumentStream(cfg.data, seed=0).sources[0].docs
    batch = collate(on_disk)
    n = sum(len(d.meta["shapes"]["frames"]) for d in on_disk)
    assert batch.images.shape == (n, 3, cfg.data.image_size, cfg.data.image_size)
    # ... and rendered in memory by the shapes_video source: the same pixels
    in_memory = list(itertools.islice(stream_video_stories(0), 3))
    assert collate(in_memory).images.equal(batch.images)
    cfg.data.sources = [SourceConfig(kind="shapes_video", seed=5)]
    cfg.data.validate()
    stream = DocumentStream(cfg.data, seed=0)
    drawn = stream.draw(stream.rng(step=0), 4)
    assert all(any(s.type == "video" for s in d.segments) for d in drawn)
    assert len(collate(drawn).images) == sum(len(d.meta["shapes"]["frames"]) for d in drawn)
    with pytest.raises(ConfigError, match="needs a `path`"):
        DataConfig(sources=[SourceConfig(kind="jsonl")]).validate()


# --- prompts and errors ---------------------------------------------------------------------------


def test_the_shipped_video_prompts_generate(tmp_path):
    from mmgen.generation.api import BUNDLED_CHECKPOINT, generate_files

    prompts = ROOT / "examples" / "prompts" / "video.jsonl"
    assert validate_files([prompts]) == (2, [])
    assert all(p.stat().st_size < 8_000 for p in (ROOT / "examples" / "prompts" / "videos").glob("*.mp4"))
    report = generate_files([prompts], tmp_path / "out", checkpoint=BUNDLED_CHECKPOINT, device="cpu",
                            settings=dict(steps=2, max_images=1, max_new_tokens=8))
    assert report.failed == [] and len(report.written) == 2
    (doc,) = iter_records(tmp_path / "out" / "continue-the-clip" / "document.json")
    assert [(s.type, s.source) for s in doc.segments] == [
        ("text", "prompt"), ("image", "prompt"), ("image", "prompt"), ("text", "prompt"), ("image", "generated")]
    shown = [read_image(load_image(doc.resolve(s.path))) for s in doc.segments if s.source == "prompt" and s.type == "image"]
    assert [(r["size"], r["colour"], r["shape"]) for r in shown] == [("large", "green", "square"),
                                                                      ("small", "green", "square")]
    (caption,) = iter_records(tmp_path / "out" / "caption-the-clip" / "document.json")
    assert [s.type for s in caption.segments[:3]] == ["image"] * 3


def test_a_damaged_mp4_gives_a_readable_error_naming_the_file(tmp_path):
    frames, _ = random_frames(random.Random(4), 2)
    good = tmp_path / "good.mp4"
    write_mp4(render_clip(frames, 64), good)
    bad = tmp_path / "bad clip.mp4"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # cut short: no index
    with pytest.raises(DocumentError) as e:
        load_video_frames(bad, frames=2)
    message = str(e.value)
    assert message.startswith(f"{bad}: decord cannot open the video (") and "\n" not in message
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"id": "d", "segments": [
        {"type": "text", "text": "A small red circle is in the top left."},
        {"type": "video", "path": "bad clip.mp4", "frames": 2}]}) + "\n")
    (doc,) = read_documents(corpus)
    with pytest.raises(DocumentError) as e:
        document_images(doc)
    assert str(e.value).startswith(f"{corpus}:1: segment 2: decord cannot open the video (")
    assert str(e.value).endswith(str(bad))
    n, problems = validate_files([corpus])
    assert n == 1 and len(problems) == 1 and str(bad) in str(problems[0])


def test_decord_problems_read_the_same_at_every_call(tmp_path):
    """decord starts its messages with the time of day and a C++ source line; a problem is shown
    by `data validate` and the reader separately, so it must not carry either."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # a PNG claiming 10**10 pixels
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                     + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    with pytest.raises(DocumentError) as e:
        load_video_frames(bomb, frames=2)
    message = str(e.value)
    assert message.startswith(f"{bomb}: decord cannot open the video (") and "Check failed" in message
    assert not re.search(r"\d\d:\d\d:\d\d|\.(cc|h):\d+", message), message
