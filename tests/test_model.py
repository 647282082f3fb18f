"""The composed MM-Interleaved model: forward/backward, checkpoints, real-folder loading, freezing."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from mmgen.config import load_config
from mmgen.data.collate import Collator
from mmgen.data.shapes import stream_stories
from mmgen.data.tokenizer import build_tokenizer, shapestories_sentences, train_tokenizer
from mmgen.models.mm_interleaved import MMInterleaved


def make(overrides=(), seed=0):
    cfg = load_config(overrides=["data.seq_len=96", *overrides])
    tok = build_tokenizer(cfg)
    torch.manual_seed(seed)
    return MMInterleaved(cfg, tok), Collator(tok, cfg)


def first_batch(collator, rows=8, seed=0):
    """One batch of ``rows`` packed rows of ShapeStories documents (in-memory PIL images)."""
    return next(collator.batches(stream_stories(seed, size=32), rows_per_batch=rows))


def losses(model, batch, seed=0):
    torch.manual_seed(seed)  # the diffusion noise and timesteps
    with torch.no_grad():
        return {k: v.item() for k, v in model(batch).items()}


@pytest.fixture(scope="module")
def tiny():
    model, collator = make()
    return model, collator, first_batch(collator)


def test_forward_backward_batch_8(tiny):
    model, _, batch = tiny
    assert batch.input_ids.shape[0] == 8 and batch.num_images > 8
    assert any(len(ids) > 1 for ids in batch.doc_ids)  # packed rows
    model.train()
    model.zero_grad()
    out = model(batch)
    assert set(out) == {"loss", "text_loss", "image_loss", "contrastive_loss"}  # the shipped config: CosMo on
    assert all(torch.isfinite(v) for v in out.values())
    w = model.cfg.train.loss_weights
    assert torch.allclose(out["loss"], w.text * out["text_loss"] + w.image * out["image_loss"]
                          + w.contrastive * out["contrastive_loss"])
    out["loss"].backward()
    params = dict(model.named_parameters())
    for name in ("vision.tower.embeddings.patch_embedding.weight", "resampler.queries",
                 "llm.lm.model.layers.0.self_attn.q_proj.weight", f"llm.mmfs.{next(iter(model.llm.mmfs))}.gate",
                 "decoder.unet.conv_in.weight", "decoder.context_encoder.proj.1.weight",
                 "decoder.mmfs_blocks.0.zero_conv.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


@pytest.mark.parametrize("words", [True, False])
def test_the_decoder_gets_hidden_states_and_token_ids(words):
    """The decoder's context is the LLM's last hidden states (B, T, D), nothing glued on; each image's
    inputs carry the token ids of its context, which the ``words`` conditioner embeds itself."""
    conditioners = "[words, previous_image, coords]" if words else "[previous_image, coords]"
    model, collator = make([f"model.decoder.conditioners={conditioners}"])
    batch = first_batch(collator, rows=2)
    assert model.decoder.context_dim == model.llm.lm.get_input_embeddings().embedding_dim
    h, maps = hidden_states(model, batch)
    which = batch.image_loss_mask.nonzero().squeeze(-1)
    c = model.image_conditions(batch, h, maps, which)
    rows, boi = batch.image_row[which], batch.image_boi[which]
    index, _ = model.context_index(boi, batch.position_ids[rows, boi])
    assert torch.equal(c.ids, batch.input_ids[rows[:, None], index]) and c.ids.shape == c.mask.shape
    assert torch.equal(c.context, h[rows[:, None], index])
    model.train()
    model.zero_grad()
    model(batch)["loss"].backward()
    params = dict(model.named_parameters())
    assert params["decoder.context_encoder.proj.1.weight"].grad.abs().sum() > 0
    if words:
        assert params["decoder.conditioners.words.embedding.weight"].grad.abs().sum() > 0
    else:
        assert not any("words" in name for name in params)


def test_context_grad_scales_the_image_loss_gradient_into_the_llm():
    """model.decoder.context_grad: same losses; the image loss's gradient reaching the LLM through
    the decoder context is scaled by it (0: none), the decoder's own gradient is not."""
    model, collator = make(["train.loss_weights.text=0"])
    batch = first_batch(collator, rows=2)
    model.train()
    llm, dec = "llm.lm.model.layers.1.mlp.down_proj.weight", "decoder.context_encoder.proj.1.weight"
    grads, loss = {}, {}
    for scale in (1.0, 0.5, 0.0):
        model.cfg.model.decoder.context_grad = scale
        model.zero_grad()
        torch.manual_seed(0)
        out = model(batch)
        out["loss"].backward()
        params = dict(model.named_parameters())
        loss[scale] = out["image_loss"].item()
        grads[scale] = {n: None if params[n].grad is None else params[n].grad.clone() for n in (llm, dec)}
    assert loss[1.0] == loss[0.5] == loss[0.0]
    assert grads[1.0][llm].abs().sum() > 0
    torch.testing.assert_close(grads[0.5][llm], 0.5 * grads[1.0][llm])
    assert grads[0.0][llm] is None or not grads[0.0][llm].any()
    for scale in (0.5, 0.0):
        torch.testing.assert_close(grads[scale][dec], grads[1.0][dec])


def test_context_index():
    # two packed documents: the second starts at 5; <boi>s at 3 (doc 1) and 8 (doc 2)
    boi = torch.tensor([3, 8])
    pos = torch.tensor([3, 3])
    index, mask = MMInterleaved.context_index(boi, pos)
    assert index[mask].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert mask.sum(1).tolist() == [4, 4]


def hidden_states(model, batch):
    """The LLM's last hidden states (B, T, D) and the vision maps of a batch, as ``forward`` computes them."""
    with torch.no_grad():
        embeds, maps = model.encode_images(batch.images)
        h = model.llm(inputs_embeds=model.embed(batch.input_ids, embeds, batch.image_row, batch.image_positions),
                      segment_ids=batch.segment_ids, position_ids=batch.position_ids,
                      image_features=model.row_features(maps, batch.row_images),
                      visible=batch.visible).last_hidden_state
    return h, maps


def test_image_conditions_ignore_other_documents(tiny):
    """An image's decoder inputs depend on its own document only, not on documents packed beside it."""
    model, _, _ = tiny
    model.eval()
    collator = Collator(model.tokenizer, load_config())  # 256-token rows: both documents fit
    docs = list(itertools.islice(stream_stories(3, size=32), 2))
    n0 = sum(seg.type == "image" for seg in docs[0].segments)
    conds = []
    for batch in (collator([docs[0]]), collator([docs[1], docs[0]])):
        h, maps = hidden_states(model, batch)
        which = (batch.image_row == 0).nonzero().squeeze(-1)[-n0:]  # docs[0]'s images
        conds.append((batch, model.image_conditions(batch, h, maps, which)))
    (alone, (c1, m1, i1, f1, v1, p1)), (packed, (c2, m2, i2, f2, v2, p2)) = conds
    assert len(packed.doc_ids[0]) == 2 and c1.shape == c2.shape
    torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-5)
    assert torch.equal(m1, m2) and torch.equal(i1, i2)
    # the same earlier images are visible, in the same (compacted) slots
    assert torch.equal(v1, v2) and v1.any() and not v1[0].any()  # the first image sees none
    assert v1.shape[1] == n0 - 1
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a[v1], b[v2])


def test_previous_image_is_the_latest_earlier_image_of_its_own_document():
    """The ``previous_image`` conditioner: each image's decoder input is the image before it in its own
    document (zeros for a document's first), also when another document is packed before it."""
    model, _ = make(["model.decoder.conditioners=[previous_image]"])
    model.eval()
    collator = Collator(model.tokenizer, load_config())
    docs = list(itertools.islice(stream_stories(3, size=32), 2))
    batch = collator([docs[1], docs[0]])
    assert batch.input_ids.shape[0] == 1 and len(batch.doc_ids[0]) == 2
    h, maps = hidden_states(model, batch)
    which = torch.arange(batch.num_images)
    prev = model.image_conditions(batch, h, maps, which).prev_image
    first = sum(seg.type == "image" for seg in docs[1].segments)  # images of the first packed document
    for i in range(batch.num_images):
        if i in (0, first):  # a document's first image has none
            assert prev[i].abs().max() == 0, i
        else:
            assert torch.equal(prev[i], batch.images[i - 1]), i


def test_save_load_identical(tiny, tmp_path):
    model, _, batch = tiny
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checksums.json", "config.yaml", "model.safetensors", "tokenizer"]
    loaded = MMInterleaved.from_pretrained(tmp_path / "ckpt").eval()
    # the folder keeps what a loaded model reads; training settings stay in the run folder
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    assert list(saved) == ["model", "data", "generate", "train"] and saved["model"]["frozen_dtype"] == "float32"
    assert list(saved["train"]) == ["loss_weights"]  # what the model's forward pass reads of training
    assert (loaded.cfg.data, loaded.cfg.generate) == (model.cfg.data, model.cfg.generate)
    assert loaded.cfg.train.loss_weights == model.cfg.train.loss_weights
    assert replace(loaded.cfg.model, frozen_dtype="auto") == model.cfg.model
    # a folder written before keeps loading: its train and align sections (retired keys too) are not read
    saved["train"].update(init_from="/gone", steps=7)
    saved["align"] = {"student_temp": 0.1}
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert MMInterleaved.from_pretrained(tmp_path / "ckpt").cfg == loaded.cfg
    assert len(loaded.tokenizer) == len(model.tokenizer)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert losses(model, batch) == losses(loaded, batch)


def test_load_errors(tiny, tmp_path):
    model, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="config.yaml, model.safetensors, tokenizer are missing"):
        MMInterleaved.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is damaged: its SHA-256 differs"):
        MMInterleaved.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checksums.json").unlink()  # without the record, the file itself is checked
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MMInterleaved.from_pretrained(tmp_path / "ckpt")
    other, _ = make(["model.resampler.num_layers=2"])
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match config.yaml"):
        MMInterleaved.from_pretrained(tmp_path / "ckpt")


def test_freeze_groups(tiny):
    model, _, _ = tiny
    try:
        model.set_trainable(vision=False, llm=False, sync=True, decoder=False)
        for name, p in model.named_parameters():
            in_sync = name.startswith(("resampler.", "llm.mmfs.", "decoder.mmfs_blocks.", "contrastive."))
            assert p.requires_grad == in_sync, name
        names = {g["name"] for g in model.param_groups()}
        assert names == {"new", "new_no_decay", "pretrained_no_decay"}  # offsets: slow, no decay
        offsets = [g for g in model.param_groups() if g["name"] == "pretrained_no_decay"][0]
        assert offsets["lr"] == model.cfg.train.lr_pretrained and offsets["weight_decay"] == 0.0
        model.set_trainable(vision=True, llm=True, sync=False, decoder=True)
        assert not any(p.requires_grad for p in model.llm.mmfs.parameters())
        assert all(p.requires_grad for p in model.decoder.unet.parameters())
        assert all(p.requires_grad for p in model.decoder.context_encoder.parameters())
    finally:
        model.set_trainable()
    assert all(p.requires_grad for name, p in model.named_parameters())  # the tiny config trains all


# --- real configs: every component from a local folder ----------------------------------------


def save_real_folders(root):
    """Tiny random stand-ins for a Llama folder (+ tokenizer), a CLIP folder, an SD folder."""
    torch.manual_seed(0)
    tok = train_tokenizer(shapestories_sentences(), 300)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(root / "clip")
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(root / "sd" / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", clip_sample=False).save_pretrained(root / "sd" / "scheduler")


def test_real_config_folders(tmp_path):
    save_real_folders(tmp_path)
    cfg = load_config(overrides=[
        "data.seq_len=96", f"model.llm.pretrained={tmp_path / 'llama'}", f"model.vision.pretrained={tmp_path / 'clip'}",
        f"model.decoder.pretrained={tmp_path / 'sd'}", "model.decoder.use_vae=true", "model.decoder.conditioners=[words, previous_image]", "model.mmfs.every_k=1",
        "model.vision.trainable=false", "model.llm.trainable=false"])
    tok = build_tokenizer(cfg)
    model = MMInterleaved(cfg, tok)
    lm = model.llm.lm
    assert lm.get_input_embeddings().num_embeddings == len(tok)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied
    assert not any(p.requires_grad for p in model.vision.parameters())
    slow = [g for g in model.param_groups() if g["name"].startswith("pretrained")]
    assert sum(len(g["params"]) for g in slow) > len(list(model.decoder.unet.parameters()))

    batch = first_batch(Collator(tok, cfg), rows=2)
    model.train()
    out = model(batch)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.decoder.unet.conv_in.weight.grad is not None

    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = MMInterleaved.from_pretrained(tmp_path / "ckpt").eval()
    lm2 = loaded.llm.lm
    assert lm2.get_output_embeddings().weight is lm2.get_input_embeddings().weight
    assert losses(model, batch) == losses(loaded, batch)
