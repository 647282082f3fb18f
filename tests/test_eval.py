"""Evaluation: the scorers are right on known answers; the command writes metrics and a report."""

import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from mmgen.data.documents import Document, Segment
from mmgen.data.shapes import Frame, render_frame
from mmgen.evaluation.shapes_prompts import eval_prompts
from mmgen.evaluation.shapes_eval import score_caption, score_continuation, score_story, score_t2i

from .test_generate import checkpoint  # noqa: F401  (the tiny saved model fixture)

runner = CliRunner()


def answered(prompt: Document, *fills: Segment) -> Document:
    """The prompt with its placeholders replaced by ``fills``, marked generated."""
    fills = list(fills)
    segments = [fills.pop(0) if s.is_placeholder else s for s in prompt.segments]
    return Document(prompt.id, segments + fills, prompt.meta)


def gen_image(frame: dict, size=32) -> Segment:
    return Segment("image", image=render_frame(Frame.from_dict(frame), size), source="generated")


def test_t2i_scores_a_correct_and_a_wrong_image():
    (p,) = eval_prompts("t2i", 1, 0, 32)
    truth = p.meta["shapes"]
    frame = truth["frames"][0]
    assert score_t2i(answered(p, gen_image(frame)), truth).scores["joint"]
    other = {**frame, "colour": "red" if frame["colour"] != "red" else "blue"}
    s = score_t2i(answered(p, gen_image(other)), truth).scores
    assert not s["joint"] and not s["colour"] and s["shape"] and s["position"]


def test_caption_parses_the_first_sentence():
    (p,) = eval_prompts("caption", 1, 0, 32)
    truth = p.meta["shapes"]
    f = truth["frames"][0]
    where = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
             "left": "on the left", "center": "in the center", "right": "on the right",
             "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}
    text = f"A {f['size']} {f['colour']} {f['shape']} is {where[f['position']]}. The {f['shape']} grows."
    s = score_caption(answered(p, Segment("text", text=text, source="generated")), truth).scores
    assert s["joint"] and s["grammar"]
    s = score_caption(answered(p, Segment("text", text="A blue thing somewhere.", source="generated")), truth).scores
    assert not s["joint"] and not s["grammar"]


def test_continuation_checks_the_background_of_frame_one():
    (p,) = eval_prompts("continuation", 1, 0, 32)
    truth = p.meta["shapes"]
    second = truth["frames"][1]
    assert score_continuation(answered(p, gen_image(second)), truth).scores["background"]
    wrong_bg = {**second, "background": "mint" if second["background"] != "mint" else "gray"}
    s = score_continuation(answered(p, gen_image(wrong_bg)), truth).scores
    assert s["joint"] and not s["background"]  # the object is right, the background is not


def test_story_follows_the_sentences():
    (p,) = eval_prompts("story", 1, 0, 32)
    truth = p.meta["shapes"]
    f = truth["frames"][0]
    new_colour = "green" if f["colour"] != "green" else "orange"
    doc = answered(p, gen_image(f), Segment("text", text=f"The {f['shape']} turns {new_colour}.", source="generated"),
                   gen_image({**f, "colour": new_colour}), Segment("text", text="Nonsense here.", source="generated"),
                   gen_image(f))  # the last image ignores the change: wrong
    sample = score_story(doc, truth)
    s = sample.scores
    assert s["images"] == 3 and s["image_match"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["sentences"] == 2 and s["grammar"] == 0.5 and s["changes"] == 0.5
    assert s["later_images"] == 2 and s["background"] == 1.0
    assert sample.text == f"[image] / The {f['shape']} turns {new_colour}. / [image] / Nonsense here. / [image]"


def test_a_change_counts_only_when_it_changes_the_current_object():
    """Grammatical, but no change of this story: another shape's name, or the value it already has."""
    (p,) = eval_prompts("story", 1, 0, 32)
    truth = p.meta["shapes"]
    f = truth["frames"][0]
    other = "square" if f["shape"] != "square" else "circle"
    same_size = "grows" if f["size"] == "large" else "shrinks"
    texts = [f"The {other} turns {f['colour']}.", f"The {f['shape']} {same_size}.", f"The {f['shape']} becomes a {other}.",
             f"The {other} moves to the {f['position']}."]  # only the third changes this object (then it is the other)
    doc = answered(p, gen_image(f), *[Segment("text", text=t, source="generated") for t in texts])
    s = score_story(doc, truth).scores
    assert s["grammar"] == 1.0 and s["changes"] == 0.25


def test_story_scores_an_introduction_and_keeps_the_first_background():
    """A new introduction mid-story sets the object its image is read against (the grammar allows
    it, but it is no change); the background is the first generated image's, which no sentence
    names: the prompt's hidden one does not count."""
    (p,) = eval_prompts("story", 1, 0, 32)
    truth = p.meta["shapes"]
    f = {**truth["frames"][0], "background": "mint" if truth["frames"][0]["background"] != "mint" else "gray"}
    other = {**f, "shape": "square" if f["shape"] != "square" else "circle", "size": "large", "position": "center"}
    intro = f"A large {other['colour']} {other['shape']} is in the center."
    wrong_bg = {**other, "background": "gray" if f["background"] != "gray" else "sky"}
    doc = answered(p, gen_image(f), Segment("text", text=intro, source="generated"), gen_image(other),
                   Segment("text", text=intro, source="generated"), gen_image(wrong_bg))
    s = score_story(doc, truth).scores
    assert s["image_match"] == 1.0 and s["grammar"] == 1.0 and s["changes"] == 0.0
    assert s["later_images"] == 2 and s["background"] == 0.5


def test_eval_command_writes_metrics_with_settings_and_a_report(tmp_path, checkpoint):  # noqa: F811
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--tasks", "t2i,caption,zeroshot",
                                 "--n", "2", "--steps", "2", "--seed", "3", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.json").read_text())
    assert record["settings"]["seed"] == 3 and record["settings"]["steps"] == 2
    assert record["settings"]["sampler"] == "dpm++" and "guidance" in record["settings"]
    assert set(record["tasks"]) == {"t2i", "caption", "zeroshot"}
    assert 0.0 <= record["tasks"]["t2i"]["metrics"]["joint"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## t2i" in report and "t2i-grid.png" in report and (out / "t2i-grid.png").is_file()


def test_eval_rejects_unknown_tasks(checkpoint):  # noqa: F811
    result = runner.invoke(app, ["eval", "--checkpoint", str(checkpoint), "--tasks", "t2i,bogus", "--n", "1"])
    assert result.exit_code == 1 and "unknown task(s) bogus" in result.output
