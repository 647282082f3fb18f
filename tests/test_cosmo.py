"""CosMo: the contrastive loss after the text-only layers, its image–text pairing, retrieval."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mmgen.config import ConfigError, load_config
from mmgen.data.collate import Collator
from mmgen.data.documents import Document, Segment, read_documents
from mmgen.data.shapes import Frame, intro_sentence, render_frame, stream_stories, write_corpus
from mmgen.data.tokenizer import build_tokenizer
from mmgen.models.contrastive import image_text_spans
from mmgen.models.mm_interleaved import MMInterleaved
from mmgen.training.trainer import train

from .test_train import TINY

COSMO = ["model.llm.text_only_layers=1"]  # 2 LLM layers: layer 0 text-only, MMFS in layer 1
CONTRASTIVE_ONLY = ["train.loss_weights.text=0", "train.loss_weights.image=0", "train.loss_weights.contrastive=1"]

runner = CliRunner()


def make(*overrides, seed=0):
    cfg = load_config(None, [*TINY, *overrides])
    tok = build_tokenizer(cfg)
    torch.manual_seed(seed)
    return MMInterleaved(cfg, tok), Collator(tok, cfg)


def frame(shape="circle", colour="red", size="small", position="left", background="gray"):
    return Frame(shape=shape, colour=colour, size=size, position=position, background=background)


def image(f: Frame) -> Segment:
    return Segment("image", image=render_frame(f, 32))


def text(s: str) -> Segment:
    return Segment("text", text=s)


# --- config and model -----------------------------------------------------------------------------


def test_contrastive_weight_needs_text_only_layers():
    with pytest.raises(ConfigError, match="text_only_layers"):
        load_config(None, [*TINY, "train.loss_weights.contrastive=0.5"])
    load_config(None, [*TINY, *COSMO, "train.loss_weights.contrastive=0.5"])  # fine with text-only layers


def test_head_exists_only_with_text_only_layers_and_joins_the_sync_group():
    plain, _ = make()
    assert plain.contrastive is None and not any(k.startswith("contrastive.") for k in plain.state_dict())
    model, _ = make(*COSMO)
    assert {k for k in model.state_dict() if k.startswith("contrastive.")} == {
        "contrastive.image_proj.weight", "contrastive.text_proj.weight", "contrastive.logit_scale"}
    assert model.contrastive.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's init
    with torch.no_grad():
        model.contrastive.logit_scale.fill_(10.0)
    assert model.contrastive.scale().item() == pytest.approx(100.0)  # clamped
    groups = {g["name"]: g for g in model.param_groups()}
    assert any(p is model.contrastive.logit_scale for p in groups["new_no_decay"]["params"])
    assert any(p is model.contrastive.text_proj.weight for p in groups["new"]["params"])
    model.set_trainable(sync=False)
    assert not any(p.requires_grad for p in model.contrastive.parameters())


# --- pairing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [False, True], ids=["no-kind", "kind-tokens"])
def test_pairing_picks_each_images_sentence(kinds):
    """Text-image documents: the sentence before; image-first documents: the sentence after; images
    in a row share the text before them; an image in a document without text is left out. A
    document's kind token is not text: with it, a captions document still opens with an image."""
    sentences = ["A small red circle is on the left.", "The circle turns blue.",
                 "A large green square is at the top.", "The square grows.", "A small blue triangle is in the center."]
    docs = [
        Document("a", [text(sentences[0]), image(frame()), text(sentences[1]), image(frame(colour="blue"))]),
        Document("b", [image(frame("square", "green", "large", "top")), text(sentences[2]),
                       image(frame("square", "green", "large", "top")), text(sentences[3])]),
        Document("c", [image(frame("triangle"))]),
        Document("d", [text(sentences[4]), image(frame("triangle", "blue")), image(frame("triangle", "blue"))]),
    ]
    if kinds:
        for doc, kind in zip(docs, ("story", "captions", "captions", "web")):
            doc.meta["kind"] = kind
    cfg = load_config(None, [*TINY, "data.seq_len=256"])
    tok = build_tokenizer(cfg)
    collator = Collator(tok, cfg)
    batch = collator(docs)
    assert batch.input_ids.shape[0] == 1 and batch.num_images == 7  # all four documents in one row
    kind_ids = set(collator.special.kinds) & set(batch.input_ids[0].tolist())
    assert len(kind_ids) == (3 if kinds else 0)
    start, end, valid = image_text_spans(batch.input_ids, batch.segment_ids, batch.position_ids,
                                         batch.image_row, batch.image_boi, collator.special)
    expected = [sentences[0], sentences[1], sentences[2], sentences[3], None, sentences[4], sentences[4]]
    assert valid.tolist() == [e is not None for e in expected]
    for i, want in enumerate(expected):
        if want is None:
            continue
        ids = batch.input_ids[0, start[i]:end[i]].tolist()
        assert ids == tok.encode(" " + want, add_special_tokens=False), (i, tok.decode(ids))
    # image 1 ("The circle turns blue.") ends right before its <boi>
    assert end[1] == batch.image_boi[1]
    # image 2 opens document b: its sentence starts right after its placeholders
    assert start[2] == batch.image_positions[2, -1] + 1


def test_pairing_stays_inside_the_document():
    """An image-only document packed after a text document is not paired with that text."""
    docs = [Document("a", [text("A small red circle is on the left."), image(frame())]),
            Document("b", [image(frame("square"))])]
    cfg = load_config(None, [*TINY, "data.seq_len=256"])
    collator = Collator(build_tokenizer(cfg), cfg)
    batch = collator(docs)
    _, _, valid = image_text_spans(batch.input_ids, batch.segment_ids, batch.position_ids,
                                   batch.image_row, batch.image_boi, collator.special)
    assert valid.tolist() == [True, False]


# --- the loss -------------------------------------------------------------------------------------


def test_loss_is_finite_and_trains_heads_text_only_layers_and_resampler():
    model, collator = make(*COSMO, *CONTRASTIVE_ONLY)
    batch = next(collator.batches(stream_stories(0, size=32), rows_per_batch=4))
    model.train()
    out = model(batch)
    assert set(out) == {"loss", "text_loss", "image_loss", "contrastive_loss"}
    assert torch.isfinite(out["contrastive_loss"]) and out["contrastive_loss"] > 0
    assert torch.allclose(out["loss"], out["contrastive_loss"])  # the other weights are 0
    out["loss"].backward()
    params = dict(model.named_parameters())
    for name in ("contrastive.image_proj.weight", "contrastive.text_proj.weight", "contrastive.logit_scale",
                 "llm.lm.model.layers.0.self_attn.q_proj.weight", "llm.lm.model.layers.0.mlp.up_proj.weight",
                 "llm.lm.model.embed_tokens.weight", "resampler.queries", "resampler.proj_out.weight",
                 "vision.tower.embeddings.patch_embedding.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    # the text is read below layer 1 (the first MMFS layer): nothing above it gets a gradient
    for name in ("llm.lm.model.layers.1.self_attn.q_proj.weight", "llm.mmfs.1.gate", "llm.lm.lm_head.weight"):
        grad = params[name].grad
        assert grad is None or grad.abs().sum() == 0, name


def test_training_embeddings_match_retrieval_embeddings():
    """The pair embeddings of a packed batch equal those of the retrieval path (same pooling)."""
    model, collator = make(*COSMO, *CONTRASTIVE_ONLY)
    model.eval()
    f = frame("square", "orange", "large", "bottom right")
    other = frame("circle", "green", "small", "top")
    batch = collator([Document("x", [text(intro_sentence(f)), image(f)]),
                      Document("y", [image(other), text(intro_sentence(other))])])
    captured = {}
    with torch.no_grad():
        image_embeds, maps = model.encode_images(batch.images)
        embeds = model.embed(batch.input_ids, image_embeds, batch.image_row, batch.image_positions)
        out = model.llm(inputs_embeds=embeds, segment_ids=batch.segment_ids, position_ids=batch.position_ids,
                        image_features=model.row_features(maps, batch.row_images), visible=batch.visible)
        captured["image"], captured["text"] = model.contrastive_pairs(batch, image_embeds, out.hidden_states)
        image_r = model.embed_images_for_retrieval(batch.images)
        text_r = model.embed_texts_for_retrieval([intro_sentence(f), intro_sentence(other)])
    assert captured["image"].shape == (2, model.cfg.model.llm.contrastive_dim)
    torch.testing.assert_close(captured["image"], image_r, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(captured["text"][0], text_r[0], atol=1e-5, rtol=1e-4)  # text before its image
    assert torch.allclose(captured["text"].norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text_r[0], text_r[1], atol=1e-3)


def test_contrastive_loss_falls_when_training_on_shapestories(tmp_path):
    """Contrastive loss only, through the trainer, on a corpus of 6 stories drawn again and again:
    a few dozen steps take the loss on those stories from chance (log n) well below it.
    (A fresh model's pooled embeddings are nearly identical, so the loss starts at log n.)"""
    corpus = write_corpus(tmp_path / "corpus", 6, seed=0, size=32)
    overrides = [*TINY, *COSMO, *CONTRASTIVE_ONLY, f"data.sources=[{{kind: jsonl, path: '{corpus}'}}]",
                 "train.batch_size=4", "train.image_loss_limit=1", "train.ema_decay=null", "train.warmup_steps=2"]
    cfg = load_config(None, [*overrides, f"train.out_dir={tmp_path / 'run'}", "train.steps=60",
                             "train.save_every=60"])
    result = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.train.steps and all(math.isfinite(r["contrastive_loss"]) for r in rows)  # logged

    def loss_on_corpus(model):
        batch = Collator(model.tokenizer, model.cfg)(read_documents(corpus))
        model.eval()
        with torch.no_grad():
            loss = model(batch, image_loss_limit=1)["contrastive_loss"].item()
        pairs = image_text_spans(batch.input_ids, batch.segment_ids, batch.position_ids, batch.image_row,
                                 batch.image_boi, model.special)[2].sum()
        return loss, math.log(int(pairs))

    fresh, chance = loss_on_corpus(make(*overrides)[0])
    trained, _ = loss_on_corpus(MMInterleaved.from_pretrained(result.last_checkpoint / "model"))
    assert fresh > 0.9 * chance and trained < 0.7 * chance, (chance, fresh, trained)


# --- retrieval ------------------------------------------------------------------------------------


def test_retrieval_command_writes_recall(tmp_path):
    model, _ = make(*COSMO)
    folder = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--checkpoint", str(folder), "--tasks", "retrieval", "--n", "12",
                                 "--out", str(out), "--device", "cpu", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]["retrieval"]["metrics"]
    assert set(metrics) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["i2t_r5"] >= metrics["i2t_r1"] and metrics["t2i_r5"] >= metrics["t2i_r1"]
    assert metrics["i2t_r5"] < 1.0 or metrics["i2t_r1"] < 1.0  # a random model does not find everything
    assert "## retrieval" in (out / "report.md").read_text()


def test_retrieval_frames_have_distinct_sentences():
    from mmgen.evaluation.retrieval import retrieval_frames

    frames = retrieval_frames(200, seed=1)
    assert len({intro_sentence(f) for f in frames}) == 200
    assert frames[:5] == retrieval_frames(5, seed=1) and frames[:5] != retrieval_frames(5, seed=2)
    with pytest.raises(ValueError, match="distinct"):
        retrieval_frames(1000, seed=0)


def test_checkpoint_without_text_only_layers_loads_and_refuses_retrieval_in_words(tmp_path):
    model, _ = make("model.llm.text_only_layers=0", "train.loss_weights.contrastive=0")
    assert model.contrastive is None
    folder = model.save_pretrained(tmp_path / "model")
    assert MMInterleaved.from_pretrained(folder).contrastive is None
    result = runner.invoke(app, ["eval", "--checkpoint", str(folder), "--tasks", "retrieval", "--n", "4",
                                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "text_only_layers" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "eval" / "metrics.json").exists()
