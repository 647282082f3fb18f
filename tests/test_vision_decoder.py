"""Vision encoder, resampler and image decoder: tiny random components, seconds on CPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmgen.config import DecoderConfig, VisionConfig, load_config
from mmgen.models.image_decoder import ImageDecoder
from mmgen.models.samplers import SAMPLERS
from mmgen.models.resampler import Resampler
from mmgen.models.vision import VisionEncoder

LLM_DIM = 128
VOCAB = 64


@pytest.fixture(scope="module")
def cfg():
    return load_config().model


@pytest.fixture(scope="module")
def vision(cfg):
    torch.manual_seed(0)
    return VisionEncoder(cfg.vision).eval()


def make_decoder(cfg, vision_dim=64, num_levels=3, **overrides):
    torch.manual_seed(0)
    # the shipped conditioners but words: the context is hidden states only, (n, T, LLM_DIM)
    overrides.setdefault("conditioners", ["previous_image", "coords"])
    dec_cfg = dataclasses.replace(cfg.decoder, **overrides)
    return ImageDecoder(dec_cfg, cfg.mmfs, llm_dim=LLM_DIM, vision_dim=vision_dim, num_levels=num_levels,
                        vocab_size=VOCAB)


def inputs(n=3, m=2, seed=0):
    """Random images, LLM context with padding, previous-image features and visibility."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    context = torch.randn(n, 10, LLM_DIM, generator=g)
    mask = torch.ones(n, 10, dtype=torch.bool)
    mask[0, 4:] = False
    feats = [torch.randn(n, m, 64, s, s, generator=g) for s in (16, 8, 4)]
    visible = torch.ones(n, m, dtype=torch.bool)
    visible[0, 1] = False
    visible[-1] = False  # the first image of a story: nothing to read
    return x0, context, mask, feats, visible


def open_zero_convs(dec, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in dec.mmfs_blocks.values():
            block.zero_conv.weight.copy_(torch.randn(block.zero_conv.weight.shape, generator=g) * 0.1)


# --- vision and resampler ---------------------------------------------------------------------


def test_vision_shapes(vision):
    tokens, maps = vision(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert tokens.shape == (2, 1 + 8 * 8, 64)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]
    assert vision.out_dim == 64 and vision.num_levels == 3
    tokens2, maps2 = vision(torch.rand(2, 3, 48, 48) * 2 - 1)  # resized to the tower's size
    assert tokens2.shape == tokens.shape and maps2[0].shape == maps[0].shape


def test_vision_layers_per_scale():
    cfg = VisionConfig(feature_layers=[0, -1], feature_scales=[2.0, 1.0])
    tokens, maps = VisionEncoder(cfg)(torch.zeros(1, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 16), (1, 64, 8, 8)]
    with pytest.raises(ValueError, match="feature_layers"):
        VisionEncoder(VisionConfig(feature_layers=[0, 1], feature_scales=[2.0, 1.0, 0.5]))


def test_resampler_shape(cfg):
    r = Resampler(cfg.resampler, 64, LLM_DIM)
    out = r(torch.randn(3, 65, 64))
    assert out.shape == (3, cfg.resampler.num_queries, LLM_DIM)
    mask = torch.ones(3, 65, dtype=torch.bool)
    mask[:, 30:] = False
    x = torch.randn(3, 65, 64)
    y = x.clone()
    y[:, 30:] = 1e3  # masked tokens must not matter
    assert torch.allclose(r(x, mask), r(y, mask), atol=1e-6)


def test_grid_positions_let_the_queries_tell_where_a_patch_is(cfg):
    """One distinct patch on a plain 8x8 grid, moved from one corner to the other: a bag of
    patches reads the same; with grid positions the queries read a different image."""
    torch.manual_seed(0)
    plain = torch.randn(64).expand(1, 65, 64).clone()  # class token + 8x8 identical patches
    left, right = plain.clone(), plain.clone()
    odd = torch.randn(64)
    left[0, 1], right[0, 64] = odd, odd  # first and last grid cell
    for on in (False, True):
        torch.manual_seed(0)
        r = Resampler(dataclasses.replace(cfg.resampler, grid_positions=on), 64, LLM_DIM).eval()
        with torch.no_grad():
            gap = (r(left) - r(right)).abs().max().item()
        assert (gap > 1e-3) if on else (gap < 1e-5), (on, gap)
    assert load_config().model.resampler.grid_positions  # the shipped recipe uses them
    with pytest.raises(ValueError, match="square grid"):
        Resampler(dataclasses.replace(cfg.resampler, grid_positions=True), 64, LLM_DIM)(torch.randn(1, 11, 64))


# --- decoder ----------------------------------------------------------------------------------


def test_decoder_sizes(cfg):
    dec = make_decoder(cfg)
    unet_m = sum(p.numel() for p in dec.unet.parameters()) / 1e6
    assert 1.5 < unet_m < 2.0  # the measured recipe's 1.7M UNet
    assert [type(b).__name__ for b in dec.unet.down_blocks] == [
        "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert sorted(dec.mmfs_blocks) == ["0", "1"]
    assert not any(k.startswith("unet.") and "mmfs" in k for k in dec.state_dict())


def test_unet_norms_keep_several_channels_per_group(cfg):
    # one channel per group sets each channel's spatial mean to the norm's bias: the UNet could not
    # choose an image's flat colour (the bundled model's backgrounds were ~11 RGB units off)
    norms = lambda dec: [m for m in dec.unet.modules() if isinstance(m, torch.nn.GroupNorm)]  # noqa: E731
    shipped = norms(make_decoder(cfg))
    assert shipped and min(m.num_channels // m.num_groups for m in shipped) >= 4
    # the default (folders saved without model.decoder.norm_groups) rebuilds the UNet they were trained as
    assert {m.num_groups for m in norms(make_decoder(cfg, norm_groups=32))} == {32}


@pytest.mark.parametrize("encoder,names", [
    ("perceiver", ("context_encoder.perceiver.queries", "context_encoder.null_context")),
    ("tokens", ("context_encoder.proj.1.weight", "context_encoder.distance.weight",
                "context_encoder.null_context"))])
def test_loss_and_gradients(cfg, encoder, names):
    dec = make_decoder(cfg, context_encoder=encoder).train()
    x0, context, mask, feats, visible = inputs()
    uncond = torch.tensor([False, True, False])
    loss = dec.loss(x0, context, mask, feats, visible, uncond=uncond)
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = dict(dec.named_parameters())
    for name in ("unet.conv_in.weight", *names, "mmfs_blocks.0.zero_conv.weight", "mmfs_blocks.1.zero_conv.weight"):
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    # through an opened zero conv, the gradient reaches MMFS itself
    dec.zero_grad()
    open_zero_convs(dec)
    dec.loss(x0, context, mask, feats, visible, uncond=uncond).mean().backward()
    for level in ("0", "1"):
        assert grads[f"mmfs_blocks.{level}.mmfs.value_proj.weight"].grad.abs().sum() > 0


def test_loss_epsilon_and_no_snr(cfg):
    for overrides in ({"prediction_type": "epsilon"}, {"snr_gamma": None}):
        dec = make_decoder(cfg, **overrides)
        x0, context, mask, feats, visible = inputs()
        loss = dec.loss(x0, context, mask, feats, visible, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(loss).all()
    assert torch.isfinite(dec.loss(x0, None, None)).all()  # no context at all: the null context


def test_token_context_masks_padding_and_reads_each_token(cfg):
    """Per-token context: padding never matters; one changed word changes the prediction."""
    dec = make_decoder(cfg, context_encoder="tokens").eval()
    x0, context, mask, _, _ = inputs()
    t = torch.tensor([10, 500, 990])
    padded = context.clone()
    padded[0, 4:] = 1e3  # row 0's padding
    word = context.clone()
    word[:, 2] = torch.randn(3, LLM_DIM, generator=torch.Generator().manual_seed(5))  # one real token per row
    with torch.no_grad():
        ref = dec.denoise(x0, t, *dec.context_encoder(context, mask))
        assert torch.allclose(dec.denoise(x0, t, *dec.context_encoder(padded, mask)), ref, atol=1e-5)
        changed = (dec.denoise(x0, t, *dec.context_encoder(word, mask)) - ref).flatten(1).abs().amax(1)
    assert (changed > 1e-4).all()
    # dropped rows become the null context: one learned token, the rest masked
    cond, cmask = dec.context_encoder(context, mask, drop=torch.tensor([True, False, False]))
    null, null_mask = dec.context_encoder.null(1, context.shape[1])
    assert torch.equal(cond[0], null[0]) and torch.equal(cmask[0], null_mask[0])
    assert cmask[0].sum() == 1 and torch.equal(cmask[1:], mask[1:])
    with pytest.raises(ValueError, match="must be 128 wide"):
        dec.context_encoder(context[..., :100], mask)


def test_zero_init_leaves_unet_unchanged(cfg):
    dec = make_decoder(cfg).eval()
    x0, context, mask, feats, visible = inputs()
    t = torch.tensor([10, 500, 990])
    cond, cmask = dec.context_encoder(context, mask)
    with torch.no_grad():
        plain = dec.denoise(x0, t, cond, cmask)
        with dec.image_context(feats, visible):
            synced = dec.denoise(x0, t, cond, cmask)
    assert torch.equal(plain, synced)

    # opened zero convs: the previous image's features now change the output ...
    open_zero_convs(dec)
    feats2 = [f.clone() for f in feats]
    for f in feats2:
        f[:, 0] += 1.0  # change the previous image in slot 0
    with torch.no_grad():
        with dec.image_context(feats, visible):
            a = dec.denoise(x0, t, cond, cmask)
        with dec.image_context(feats2, visible):
            b = dec.denoise(x0, t, cond, cmask)
        after = dec.denoise(x0, t, cond, cmask)  # ... only inside the context
    changed = (a - b).flatten(1).abs().amax(1)
    assert changed[0] > 0 and changed[1] > 0
    assert changed[2] == 0  # the last row sees no previous image
    assert torch.equal(after, plain)


def test_guidance_pairs_read_context_free_levels_once(cfg):
    """Level 0 (no cross-attention below it) reads the previous images once for both guidance
    halves; the result equals reading them for each half."""
    dec = make_decoder(cfg).eval()
    open_zero_convs(dec)
    assert dec.mmfs_blocks["0"].context_free and not dec.mmfs_blocks["1"].context_free
    x0, context, mask, feats, visible = inputs()
    t = torch.tensor(500)
    cond, cmask = dec.context_encoder(context, mask)
    null, null_mask = dec.context_encoder.null(3, cond.shape[1])
    both, both_mask = torch.cat([null, cond]), torch.cat([null_mask, cmask])
    feats2, visible2 = [torch.cat([f, f]) for f in feats], torch.cat([visible, visible])
    calls = []
    handle = dec.mmfs_blocks["0"].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with torch.no_grad():
        with dec.image_context(feats2, visible2):
            ref = dec.denoise(torch.cat([x0, x0]), t, both, both_mask)
        with dec.image_context(feats, visible, guidance_pairs=True):  # one row per image
            shared = dec.denoise(torch.cat([x0, x0]), t, both, both_mask)
    handle.remove()
    assert calls == [6, 3]
    assert torch.allclose(shared, ref, atol=1e-5)


def test_previous_image_channels_start_at_zero_and_then_copy_the_image(cfg):
    """The ``previous_image`` conditioner: the UNet's input widens by the latest earlier image with
    zero weights (a no-op at first); the loss trains those weights; once trained, the earlier image
    changes the prediction of the rows that have one; guidance pairs repeat it."""
    dec = make_decoder(cfg, conditioners=["previous_image", "coords"]).eval()
    assert dec.unet.conv_in.in_channels == dec.unet.config.in_channels == 3 + 2 + 3  # image, coords, previous
    x0, context, mask, feats, visible = inputs()
    prev = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prev[-1] = 0  # the last row has no earlier image
    t = torch.tensor([10, 500, 990])
    cond, cmask = dec.context_encoder(context, mask)
    with torch.no_grad():
        plain = dec.denoise(x0, t, cond, cmask)
        with dec.image_context(feats, visible, prev_image=prev):
            assert torch.equal(dec.denoise(x0, t, cond, cmask), plain)  # zero weights: unchanged

    dec.train()
    dec.loss(x0, context, mask, feats, visible, prev_image=prev, generator=torch.Generator().manual_seed(0)).sum().backward()
    assert dec.unet.conv_in.weight.grad[:, 5:].abs().sum() > 0
    dec.eval()

    with torch.no_grad():
        dec.unet.conv_in.weight[:, 5:].normal_(0, 0.1)
        other = prev.clone()
        other[:2] = -other[:2]
        with dec.image_context(feats, visible, prev_image=prev):
            a = dec.denoise(x0, t, cond, cmask)
        with dec.image_context(feats, visible, prev_image=other):
            b = dec.denoise(x0, t, cond, cmask)
        changed = (a - b).flatten(1).abs().amax(1)
        assert changed[0] > 0 and changed[1] > 0 and changed[2] == 0
        null, null_mask = dec.context_encoder.null(3, cond.shape[1])
        both, both_mask = torch.cat([null, cond]), torch.cat([null_mask, cmask])
        with dec.image_context([torch.cat([f, f]) for f in feats], torch.cat([visible, visible]),
                               prev_image=torch.cat([prev, prev])):
            ref = dec.denoise(torch.cat([x0, x0]), t.repeat(2), both, both_mask)
        with dec.image_context(feats, visible, prev_image=prev, guidance_pairs=True):
            pairs = dec.denoise(torch.cat([x0, x0]), t.repeat(2), both, both_mask)
    assert torch.allclose(pairs, ref, atol=1e-5)


def test_deepcopy_keeps_hooks_on_the_copy(cfg):
    """EMA copies the decoder: the copy's hooks must use the copy's MMFS blocks."""
    dec = make_decoder(cfg).eval()
    ema = copy.deepcopy(dec)
    open_zero_convs(ema)
    x0, context, mask, feats, visible = inputs()
    t = torch.tensor([10, 500, 990])
    cond, cmask = dec.context_encoder(context, mask)
    with torch.no_grad():
        ref = dec.denoise(x0, t, cond, cmask)
        with dec.image_context(feats, visible):
            assert torch.equal(dec.denoise(x0, t, cond, cmask), ref)
        with ema.image_context(feats, visible):
            assert not torch.equal(ema.denoise(x0, t, cond, cmask), ref)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_range_and_determinism(cfg, sampler):
    dec = make_decoder(cfg).eval()
    open_zero_convs(dec)
    _, context, mask, feats, visible = inputs(n=2)
    kw = dict(sampler=sampler, steps=3, guidance=2.5)
    a = dec.sample(context, mask, feats, visible, generator=torch.Generator().manual_seed(7), **kw)
    b = dec.sample(context, mask, feats, visible, generator=torch.Generator().manual_seed(7), **kw)
    c = dec.sample(context, mask, feats, visible, generator=torch.Generator().manual_seed(8), **kw)
    assert a.shape == (2, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_does_not_clip_the_guided_x0(cfg):
    """DDIM draws its image from x0 estimates: clipping a guided estimate to [-1, 1] at high noise
    undid the guidance (runs/cg0x step 4500: t2i joint 0.09 clipped, 0.50 not; docs/RESULTS.md)."""
    dec = make_decoder(cfg)
    assert dec.scheduler.config.clip_sample  # the training scheduler's default, which DDIM inherited
    sched = dec.make_sampler("ddim", 10)
    assert not sched.config.clip_sample
    t = sched.timesteps[0]
    x = torch.randn(1, 3, 4, 4)
    pred = torch.full_like(x, -3.0)  # v at t≈T is ≈ -x0: an x0 estimate of +3, beyond the range
    out = sched.step(pred, t, x)
    assert out.pred_original_sample.max() > 2.5


def test_coord_channels(cfg):
    dec = make_decoder(cfg, conditioners=["coords"])
    assert dec.unet.config.in_channels == 5
    x0, context, mask, feats, visible = inputs(n=2)
    assert torch.isfinite(dec.loss(x0, context, mask, feats, visible)).all()
    assert dec.sample(context, mask, steps=2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 32, 32)


# --- real-folder loading ----------------------------------------------------------------------


def test_pretrained_vision_folder(tmp_path, vision):
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64))
    tower.save_pretrained(tmp_path / "clip", safe_serialization=True)
    enc = VisionEncoder(VisionConfig(pretrained=str(tmp_path / "clip"), feature_layers=[-2])).eval()
    assert enc.out_dim == 32 and enc.grid == 4
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens, maps = enc(x)
    assert tokens.shape == (2, 17, 32) and [m.shape[-1] for m in maps] == [8, 4, 2]
    loaded = enc.tower.state_dict()
    assert loaded.keys() == tower.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in tower.state_dict().items())
    with pytest.raises(FileNotFoundError, match="model.vision.pretrained"):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path / "missing")))


def test_full_clip_folder_loads_quietly_with_one_line(tmp_path, capfd, caplog):
    """A CLIPModel folder (text tower too): the vision weights load exactly; one log line, no table."""
    from transformers import CLIPConfig, CLIPModel

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    full = CLIPModel(CLIPConfig(text_config=small, vision_config=dict(small, image_size=32, patch_size=8),
                                projection_dim=16))
    full.save_pretrained(tmp_path / "clip", safe_serialization=True)
    capfd.readouterr()
    with caplog.at_level("INFO", logger="mmgen.models.vision"):
        enc = VisionEncoder(VisionConfig(pretrained=str(tmp_path / "clip"), feature_layers=[-1]))
    printed = capfd.readouterr()
    assert "LOAD REPORT" not in printed.out + printed.err and "UNEXPECTED" not in printed.out + printed.err
    lines = [r.getMessage() for r in caplog.records if r.name == "mmgen.models.vision"]
    assert len(lines) == 1 and "skipped" in lines[0] and "text_model" in lines[0], lines
    want = full.vision_model.state_dict()
    got = enc.tower.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_vision_folder_missing_weights_is_an_error(tmp_path):
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64))
    state = {k: v for k, v in tower.state_dict().items() if "layers.1." not in k}
    tower.save_pretrained(tmp_path / "clip", state_dict=state, safe_serialization=True)
    with pytest.raises(ValueError, match="missing or of another shape"):
        VisionEncoder(VisionConfig(pretrained=str(tmp_path / "clip")))


def save_sd_folder(folder, *, prediction_type="epsilon"):
    """A tiny Stable-Diffusion-style folder: unet/, vae/ (2× down), scheduler/."""
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).save_pretrained(folder / "unet", safe_serialization=True)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=32,
    ).save_pretrained(folder / "vae", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type,
                  clip_sample=False).save_pretrained(folder / "scheduler")


def test_pretrained_sd_folder(tmp_path, cfg):
    save_sd_folder(tmp_path / "sd")
    dec_cfg = DecoderConfig(pretrained=str(tmp_path / "sd"), use_vae=True, image_size=32, context_tokens=5,
                            prediction_type="v_prediction", conditioners=["previous_image"])
    dec = ImageDecoder(dec_cfg, cfg.mmfs, llm_dim=LLM_DIM, vision_dim=64, num_levels=3)
    assert dec.prediction_type == "epsilon"  # the folder's scheduler decides
    assert dec.vae is not None and dec.vae_factor == 2 and dec.cross_dim == 32
    assert not any(p.requires_grad for p in dec.vae.parameters())
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet").state_dict()
    mine = dec.unet.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in ref.items() if k != "conv_in.weight")
    # the previous image's latents widen the input: the folder's weights, then zeros
    assert dec.previous_image and mine["conv_in.weight"].shape[1] == 2 * ref["conv_in.weight"].shape[1]
    assert torch.equal(mine["conv_in.weight"][:, :4], ref["conv_in.weight"])
    assert mine["conv_in.weight"][:, 4:].abs().max() == 0
    x0, context, mask, feats, visible = inputs(n=2)
    prev = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    loss = dec.loss(x0, context, mask, feats, visible, prev_image=prev)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    out = dec.sample(context, mask, feats, visible, prev_image=prev, steps=2,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1

    with pytest.raises(ValueError, match="use_vae"):  # a latent UNet cannot diffuse pixels
        ImageDecoder(dataclasses.replace(dec_cfg, use_vae=False), cfg.mmfs, llm_dim=LLM_DIM, vision_dim=64,
                     num_levels=3)
    with pytest.raises(FileNotFoundError, match="vae/"):
        ImageDecoder(dataclasses.replace(dec_cfg, pretrained=str(tmp_path)), cfg.mmfs, llm_dim=LLM_DIM,
                     vision_dim=64, num_levels=3)
