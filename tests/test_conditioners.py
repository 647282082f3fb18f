"""The image decoder's conditioners (mmgen/models/conditioners/): the registry, each conditioner's
shape, zero start and effect, the reference decoder without any, and the bundled model's keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmgen.config import ConfigError, load_config
from mmgen.models.conditioners import CONDITIONERS, conditioner_class
from mmgen.models.conditioners.base import Conditioner
from mmgen.models.image_decoder import ImageDecoder

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "examples" / "checkpoints" / "shapes-tiny"
LLM_DIM, VOCAB, T = 128, 64, 10


@pytest.fixture(scope="module")
def cfg():
    return load_config().model


def decoder(cfg, conditioners, **overrides):
    torch.manual_seed(0)
    dec_cfg = dataclasses.replace(cfg.decoder, conditioners=list(conditioners), **overrides)
    return ImageDecoder(dec_cfg, cfg.mmfs, llm_dim=LLM_DIM, vision_dim=64, num_levels=3, vocab_size=VOCAB).eval()


def inputs(n=3, seed=0):
    """Images (n, 3, 32, 32), context (n, T, LLM_DIM) with row 0 padded after 4 tokens, token ids (n, T)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    context = torch.randn(n, T, LLM_DIM, generator=g)
    mask = torch.ones(n, T, dtype=torch.bool)
    mask[0, 4:] = False
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return x0, context, mask, ids


def predict(dec, x0, context, mask, ids, prev_image=None):
    t = torch.tensor([10, 500, 990])[:x0.shape[0]]
    with torch.no_grad(), dec.image_context(None, None, prev_image=prev_image):
        return dec.denoise(x0, t, *dec.encode_context(context, mask, ids))


def changed_rows(a, b):
    return (a - b).flatten(1).abs().amax(1) > 1e-5


# --- the registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONDITIONERS))
def test_every_entry_is_a_conditioner_in_its_own_file(name):
    cls = conditioner_class(name)
    assert issubclass(cls, Conditioner) and cls.__module__ == f"mmgen.models.conditioners.{CONDITIONERS[name][0]}"
    assert cls.built_in == CONDITIONERS[name][2]
    doc = __import__(cls.__module__, fromlist=["_"]).__doc__
    assert doc.startswith(f"``{name}``") and "Why:" in doc and "docs/RESULTS.md" in doc  # reason, measurement


def test_an_unknown_conditioner_is_refused_with_the_known_ones(cfg):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.decoder.conditioners=[words, magic]"])
    message = str(e.value)
    assert "unknown decoder conditioner 'magic'" in message and "\n" not in message
    assert all(name in message for name in CONDITIONERS)
    with pytest.raises(ValueError, match="unknown decoder conditioner 'magic'; choose from words, previous_image, coords"):
        decoder(cfg, ["magic"])


def test_a_built_in_conditioner_needs_a_unet_built_from_the_config():
    with pytest.raises(ConfigError, match="coords needs a UNet built from the config"):
        load_config(None, ["model.decoder.pretrained=sd"])  # the shipped list has coords
    cfg = load_config(None, ["model.decoder.pretrained=sd", "model.decoder.conditioners=[words, previous_image]"])
    assert cfg.model.decoder.conditioners == ["words", "previous_image"]


# --- the reference decoder: no conditioner ---------------------------------------------------


def test_without_conditioners_the_reference_path_runs(cfg):
    """No conditioner: the UNet takes the image's channels only, the decoder owns no conditioner
    tensor, and token ids are neither needed nor read."""
    dec = decoder(cfg, [])
    assert dec.unet.config.in_channels == 3 and len(dec.conditioners) == 0
    assert not dec.previous_image and not dec.widened
    assert not any(k.startswith("conditioners.") for k in dec.state_dict())
    x0, context, mask, ids = inputs()
    dec.train()
    loss = dec.loss(x0, context, mask, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    dec.eval()
    assert torch.equal(predict(dec, x0, context, mask, None), predict(dec, x0, context, mask, ids))
    out = dec.sample(context, mask, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 32, 32) and out.abs().max() <= 1


def test_a_model_without_conditioners_trains_and_generates():
    from mmgen.data.documents import Document, Segment
    from mmgen.data.tokenizer import build_tokenizer
    from mmgen.generation.api import generate
    from mmgen.models.mm_interleaved import MMInterleaved

    from .test_train import TINY

    cfg = load_config(None, [*TINY, "model.decoder.conditioners=[]", "model.decoder.context_encoder=perceiver"])
    torch.manual_seed(0)
    net = MMInterleaved(cfg, build_tokenizer(cfg)).eval()
    assert net.decoder.unet.config.in_channels == 3
    prompt = Document("t2i", [Segment("text", text="A small red circle is on the left."), Segment("image")])
    docs = generate([prompt], model=net, steps=2, max_images=1, max_new_tokens=4, seed=0)
    assert sum(s.type == "image" and s.source == "generated" for s in docs[0].segments) == 1


# --- words -------------------------------------------------------------------------------------


def test_words_embeds_the_token_ids_and_moves_only_their_tokens(cfg):
    dec = decoder(cfg, ["words"])
    words = dec.conditioners["words"]
    x0, context, mask, ids = inputs()
    assert words.context(ids).shape == (3, T, dec.cross_dim)
    assert torch.equal(words.context(ids), words.embedding.weight[ids])
    assert 0.8 < words.embedding.weight.std() < 1.2  # N(0, 1): unit scale, as the normalised tokens
    # one changed id changes that token's context, and the prediction; padding ids change nothing
    other, padded = ids.clone(), ids.clone()
    other[:, 2] = (ids[:, 2] + 1) % VOCAB
    padded[0, 4:] = (ids[0, 4:] + 1) % VOCAB
    a, _ = dec.encode_context(context, mask, ids)
    b, _ = dec.encode_context(context, mask, other)
    assert (a[:, 2] - b[:, 2]).abs().amax() > 1e-3 and torch.equal(a[:, :2], b[:, :2])
    ref = predict(dec, x0, context, mask, ids)
    assert changed_rows(predict(dec, x0, context, mask, other), ref).all()
    assert torch.allclose(predict(dec, x0, context, mask, padded), ref, atol=1e-6)
    with pytest.raises(ValueError, match="needs the context's token ids"):
        dec.encode_context(context, mask, None)
    # the loss trains the embedding
    dec.train()
    dec.loss(x0, context, mask, context_ids=ids, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert words.embedding.weight.grad[ids.unique()].abs().sum() > 0


def test_words_needs_the_per_token_context_encoder(cfg):
    with pytest.raises(ConfigError, match="words decoder conditioner needs model.decoder.context_encoder: tokens"):
        decoder(cfg, ["words"], context_encoder="perceiver")


# --- previous_image ----------------------------------------------------------------------------


def test_previous_image_starts_at_zero_and_then_reads_the_image(cfg):
    dec = decoder(cfg, ["previous_image"])
    cond = dec.conditioners["previous_image"]
    assert cond.channels == dec.latent_channels == 3 and dec.unet.config.in_channels == 6 and dec.widened
    assert dec.unet.conv_in.weight[:, 3:].abs().max() == 0  # zero weights: the UNet as it was
    x0, context, mask, ids = inputs()
    prev = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prev[-1] = 0  # the last row has none
    with dec.image_context(None, None, prev_image=prev):
        assert cond.input(x0).shape == (3, 3, 32, 32)
    assert torch.equal(cond.input(x0), torch.zeros(3, 3, 32, 32))  # outside the call: none
    ref = predict(dec, x0, context, mask, ids)
    assert torch.equal(predict(dec, x0, context, mask, ids, prev), ref)
    with torch.no_grad():
        dec.unet.conv_in.weight[:, 3:].normal_(0, 0.1)
    other = -prev
    moved = changed_rows(predict(dec, x0, context, mask, ids, prev), predict(dec, x0, context, mask, ids, other))
    assert moved.tolist() == [True, True, False]  # the row without an earlier image is not moved


# --- coords ------------------------------------------------------------------------------------


def test_coords_are_built_into_the_unet_and_read(cfg):
    dec = decoder(cfg, ["coords"])
    cond = dec.conditioners["coords"]
    assert dec.unet.config.in_channels == 5 and not dec.widened
    assert dec.unet.conv_in.weight[:, 3:].abs().max() > 0  # initialised as the rest of the UNet
    x0, context, mask, ids = inputs()
    grid = cond.input(x0)
    assert grid.shape == (3, 2, 32, 32) and grid.abs().max() < 1
    assert torch.all(grid[:, 0, :, 1:] > grid[:, 0, :, :-1]) and torch.all(grid[:, 1, 1:] > grid[:, 1, :-1])  # x, y
    ref = predict(dec, x0, context, mask, ids)
    original = type(cond).input
    try:  # the same decoder told other positions: its prediction moves
        type(cond).input = lambda self, x: original(self, x).flip(-1)
        assert changed_rows(predict(dec, x0, context, mask, ids), ref).all()
    finally:
        type(cond).input = original


def test_the_unet_input_is_latents_then_built_in_then_added_channels(cfg):
    dec = decoder(cfg, ["previous_image", "coords"])
    assert dec.unet.config.in_channels == 3 + 2 + 3
    x0 = torch.zeros(1, 3, 32, 32)
    prev = torch.ones(1, 3, 32, 32)
    with dec.image_context(None, None, prev_image=prev):
        full = dec.unet_input(x0)
    assert torch.equal(full[:, 3:5], dec.conditioners["coords"].input(x0)) and torch.equal(full[:, 5:], prev)


# --- the bundled model -------------------------------------------------------------------------


def test_the_bundled_model_loads_with_exactly_its_keys():
    """The converted checkpoint: its conditioners listed, every tensor of the file in the model and
    every tensor of the model in the file (``from_pretrained`` is strict)."""
    from mmgen.models.mm_interleaved import MMInterleaved, _shared_names

    model = MMInterleaved.from_pretrained(BUNDLED)
    assert model.cfg.model.decoder.conditioners == ["words", "previous_image", "coords"]
    with safe_open(str(BUNDLED / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    state = set(model.state_dict())
    assert stored == state - _shared_names(model)  # tied tensors are stored once
    assert "decoder.conditioners.words.embedding.weight" in stored
    assert not any(k.startswith("decoder.context_encoder.words") for k in stored)
