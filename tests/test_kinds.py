"""Document kinds: one word that training data, prompts and results share, read by the model as a token."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mmgen.config import ConfigError, load_config
from mmgen.data.collate import encode_document
from mmgen.data.documents import Document, DocumentError, Segment, document_from_json, validate_files
from mmgen.data.kinds import KINDS, kind_id
from mmgen.data.shapes import make_pairs, make_story
from mmgen.data.tokenizer import build_tokenizer, special_ids
from mmgen.generation.api import GenerationError, generate, load_model
from mmgen.generation.generator import Generator, settings_from
from mmgen.models.mm_interleaved import MMInterleaved

from .test_train import TINY

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    return MMInterleaved(cfg, build_tokenizer(cfg)).eval()


def test_a_new_tokenizer_has_every_kind_token_and_encoding_puts_it_after_bos(tiny):
    tok = tiny.tokenizer
    ids = {k: kind_id(tok, k) for k in KINDS}
    assert None not in ids.values() and len(set(ids.values())) == len(KINDS)
    sp = special_ids(tok)
    story = make_story(random.Random(0), size=32, story_id="s")
    assert story.meta["kind"] == "story" and make_pairs(random.Random(0), size=32, doc_id="p").meta["kind"] == "captions"
    enc = encode_document(story, tok, num_queries=4)
    assert enc.ids[:2] == [sp.bos, ids["story"]] and enc.loss[:2] == [False, False]  # given, never a target
    plain = encode_document(Document("x", story.segments), tok, num_queries=4)
    assert plain.ids[1:] == enc.ids[2:]  # without meta.kind: no kind token, the rest the same
    assert tok.decode(enc.ids, skip_special_tokens=True).strip().startswith(story.texts[0])


def test_unknown_kinds_are_refused_with_the_known_ones(tmp_path):
    with pytest.raises(DocumentError, match="unknown document kind 'poem'; choose one of story, captions, web"):
        document_from_json({"segments": [{"type": "text", "text": "x"}], "meta": {"kind": "poem"}}, file="f", line=3,
                           default_id="d")
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"segments": [{"type": "text", "text": "x"}], "meta": {"kind": "poem"}}) + "\n")
    _, problems = validate_files([bad])
    assert len(problems) == 1 and f"{bad}:1" in str(problems[0]) and "poem" in str(problems[0])
    with pytest.raises(ConfigError, match="generate.kind"):
        load_config(None, ["generate.kind=poem"])
    with pytest.raises(GenerationError, match="unknown document kind"):
        generate(["A small red circle is on the left."], kind="poem", model=object())
    result = runner.invoke(app, ["generate", "--prompt", "A small red circle is on the left.", "--kind", "poem",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "choose one of story, captions, web" in result.output
    result = runner.invoke(app, ["eval", "--tasks", "t2i", "--n", "1", "--kind", "poem", "--out", str(tmp_path / "e")])
    assert result.exit_code == 1 and "choose one of story, captions, web" in result.output


def test_the_generator_gives_the_model_the_kind_and_records_it(tiny, monkeypatch):
    fed: list[list[int]] = []
    embed = tiny.llm.embed_tokens
    monkeypatch.setattr(tiny.llm, "embed_tokens", lambda ids: (fed.append(ids[0].tolist()), embed(ids))[1])
    tok, sp = tiny.tokenizer, special_ids(tiny.tokenizer)
    gen = Generator(tiny)
    s = settings_from(tiny.cfg.generate, steps=2, max_images=1, max_new_tokens=3, temperature=1.0)
    prompts = [Document("a", [Segment("text", text="A small red circle is on the left.")]),
               Document("b", [Segment("text", text="A small red circle is on the left.")], meta={"kind": "captions"})]
    for prompt, kind in zip(prompts, ("story", "captions")):
        fed.clear()
        ((_, doc),) = list(gen.generate([prompt], s))
        assert fed[0][:2] == [sp.bos, kind_id(tok, kind)]  # the shipped default asks for a story
        assert doc.meta["kind"] == kind
        written = [i for chunk in fed[1:] for i in chunk]
        assert not set(written) & {kind_id(tok, k) for k in KINDS}  # the model never writes a kind


def test_a_model_without_kinds_runs_and_says_a_kind_is_ignored(tmp_path, monkeypatch):
    """A model saved before kinds existed: its tokenizer has no kind tokens (loading does not add them)."""
    import mmgen.data.tokenizer as tokenizers
    from mmgen.data.tokenizer import load_tokenizer, shapestories_sentences, train_tokenizer

    cfg = load_config(None, TINY)
    with monkeypatch.context() as m:  # the tokenizer as it was trained before kinds
        m.setattr(tokenizers, "KIND_TOKENS", ())
        train_tokenizer(shapestories_sentences(), cfg.model.llm.vocab_size).save_pretrained(str(tmp_path / "tok"))
    torch.manual_seed(0)
    folder = MMInterleaved(cfg, load_tokenizer(tmp_path / "tok")).save_pretrained(tmp_path / "old")
    model, _ = load_model(folder, "cpu")
    assert kind_id(model.tokenizer, "story") is None
    prompt = Document("p", [Segment("text", text="A small red circle is on the left.")], meta={"kind": "captions"})
    (doc,) = generate([prompt], model=model, steps=2, max_images=1)
    assert any("without document kinds" in w for w in doc.meta["warnings"])
    (plain,) = generate(["A small red circle is on the left."], model=model, steps=2, max_images=1)
    assert "kind" not in plain.meta and "warnings" not in plain.meta


def test_a_prompt_from_another_world_gets_a_document_and_a_warning(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "--prompt", "A dragon flies over the sea.", "--prompt",
                                 "A small red circle is on the left.", "--out", str(out), "--steps", "2",
                                 "--max-images", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    dragon = json.loads((out / "prompt-0000" / "document.json").read_text())
    circle = json.loads((out / "prompt-0001" / "document.json").read_text())
    assert len(dragon["segments"]) >= 2  # a document, not a crash or an empty folder
    assert "outside what this model knows" in " ".join(dragon["meta"]["warnings"])
    assert "warnings" not in circle["meta"]
