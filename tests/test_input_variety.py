"""Frames as users' files arrive: other sizes and JPEG, in training (data.input_variety) and in eval (TASK@SIZE)."""

from __future__ import annotations

import random

import pytest

from mmgen.config import ConfigError, load_config
from mmgen.data.collate import image_to_tensor, tensor_to_image
from mmgen.data.shapes import INPUT_SIZES, Frame, random_frame, render_as_arrived, render_frame
from mmgen.data.shapes_reader import read_image
from mmgen.evaluation.shapes_prompts import eval_prompts
from mmgen.evaluation.shapes_eval import task_variant
from mmgen.training.data import build_source


def test_no_variety_is_the_plain_render_and_draws_nothing():
    rng = random.Random(3)
    frame = Frame("circle", "red", "large", "left", "gray")
    state = rng.getstate()
    assert render_as_arrived(frame, 32, rng, 0.0).tobytes() == render_frame(frame, 32).tobytes()
    assert rng.getstate() == state  # the data stream of a config without variety is unchanged


def test_arrived_frames_read_back_right_after_the_loaders_resize():
    """What the model sees (its 32 px view) keeps colour, size, place and background; a small
    shape is a few pixels there, so its outline after an antialiased resize is sometimes ambiguous."""
    rng = random.Random(0)
    sizes, jpegs, shapes_right = set(), 0, 0
    for _ in range(120):
        frame = random_frame(rng)
        image = render_as_arrived(frame, 32, rng, 1.0)
        sizes.add(image.size[0])
        plain = render_frame(frame, image.size[0])
        jpegs += image.tobytes() != plain.tobytes()  # a JPEG round trip changes pixels
        seen = tensor_to_image(image_to_tensor(image, 32))  # what the model sees, at its size
        read = read_image(seen)
        assert {k: read[k] for k in ("colour", "size", "position", "background")} == \
            {k: v for k, v in frame.to_dict().items() if k != "shape"}, (frame, image.size)
        shapes_right += read["shape"] == frame.shape
    assert shapes_right >= 0.85 * 120, shapes_right
    assert sizes == set(INPUT_SIZES)
    assert 30 <= jpegs <= 90  # about half of them


def test_the_shapes_sources_use_data_input_variety():
    cfg = load_config(None, ["data.input_variety=0.5"])
    source = build_source(cfg.data.sources[0], cfg.data)
    sizes = [seg.image.size[0] for i in range(40) for seg in source.sample(random.Random(i), f"d{i}").segments
             if seg.type == "image"]
    other = sum(s != cfg.data.image_size for s in sizes)
    assert 0.2 * len(sizes) < other < 0.6 * len(sizes)  # half are drawn differently, some of those at 32 again
    with pytest.raises(ConfigError, match="input_variety"):
        load_config(None, ["data.input_variety=1.5"])


def test_eval_prompts_give_the_same_frames_in_another_form():
    plain = eval_prompts("caption", 8, 0, 32)
    big = eval_prompts("caption", 8, 0, 32, input_size=96)
    jpeg = eval_prompts("caption", 8, 0, 32, input_size=64, jpeg=70)
    for a, b, c in zip(plain, big, jpeg):
        assert a.meta == b.meta == c.meta
        assert b.segments[0].image.size == (96, 96) and c.segments[0].image.size == (64, 64)
        assert c.segments[0].image.tobytes() != render_frame(Frame.from_dict(a.meta["shapes"]["frames"][0]),
                                                             64).tobytes()


@pytest.mark.parametrize("name, parsed", [
    ("caption", ("caption", {})),
    ("caption@48", ("caption", {"input_size": 48})),
    ("continuation@96", ("continuation", {"input_size": 96})),
    ("caption@jpeg", ("caption", {"input_size": 64, "jpeg": 70})),
    ("t2i@48", None), ("story@jpeg", None), ("caption@16", None), ("caption@big", None), ("poem", None),
])
def test_task_variants(name, parsed):
    assert task_variant(name) == parsed
