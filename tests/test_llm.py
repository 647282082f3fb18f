"""MMFSLanguageModel: exactness at gate 0, image visibility, state-dict keys, packing, KV cache."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mmgen.config import ConfigError, LLMConfig, MMFSConfig
from mmgen.models.llm import (MMFSLanguageModel, build_llm, decoder_layers, mmfs_layer_indices,
                              packed_causal_mask, packed_position_ids)

V, D, C, L, M = 64, 32, 16, 2, 2  # vocab, LM width, image feature width, levels, image slots


def llm_cfg(arch="llama", **kw):
    return LLMConfig(arch=arch, hidden_size=D, num_layers=4, num_heads=4, intermediate_size=64,
                     max_position_embeddings=128, vocab_size=V, **kw)


def wrap(lm, every_k=2, text_only_layers=0, **kw):
    return MMFSLanguageModel(lm, MMFSConfig(every_k=every_k, num_heads=2, num_points=2, hidden_size=16),
                             value_dim=C, num_levels=L, text_only_layers=text_only_layers,
                             **kw)


def make(arch="llama", seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    lm = build_llm(llm_cfg(arch), V, attn_implementation=attn).eval()
    plain = copy.deepcopy(lm)
    return plain, wrap(lm).eval()


def features(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, M, C, s, s, generator=g) for s in (4, 2)]  # [l]: (B, M, C, H_l, W_l)


def set_gates(model, value):
    with torch.no_grad():
        for m in model.mmfs.values():
            m.gate.fill_(value)


def visibility(B, T, first_seen=(4, 8)):
    """Tokens from first_seen[m] on see image m: (B, T, M) bool."""
    t = torch.arange(T)[:, None]
    return (t >= torch.tensor(first_seen)[None]).expand(B, T, M).clone()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2"])
def test_zero_gates_reproduce_plain_lm_exactly(arch):
    plain, model = make(arch)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = plain(ids).logits
        out = model(ids, image_features=features(2), visible=visibility(2, 12))
        no_img = model(ids)
    assert out.logits.shape == (2, 12, V) and out.last_hidden_state.shape == (2, 12, D)
    assert torch.equal(out.logits, ref) and torch.equal(no_img.logits, ref)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_nonzero_gate_changes_only_tokens_that_see_an_image(arch):
    plain, model = make(arch)
    set_gates(model, 1.0)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        ref = plain(ids).logits
        out = model(ids, image_features=features(2), visible=visibility(2, 12)).logits
    assert torch.equal(out[:, :4], ref[:, :4])  # no image visible yet
    assert (out[:, 4:] - ref[:, 4:]).abs().amax(-1).min() > 1e-4


def test_invisible_image_does_not_matter_visible_one_does():
    _, model = make()
    set_gates(model, 1.0)
    ids, vis = torch.randint(0, V, (2, 12)), visibility(2, 12)
    feats = features(2)
    changed = [f.clone() for f in feats]
    for f in changed:
        f[:, 1] = torch.randn_like(f[:, 1])  # alter image 1, seen from token 8 on
    with torch.no_grad():
        a = model(ids, image_features=feats, visible=vis).logits
        b = model(ids, image_features=changed, visible=vis).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().amax(-1).min() > 1e-5


def test_placement_follows_every_k_and_text_only_layers():
    assert mmfs_layer_indices(4, 2) == [1, 3]
    assert mmfs_layer_indices(8, 4) == [3, 7]
    assert mmfs_layer_indices(4, 1, text_only_layers=1) == [1, 2, 3]
    assert mmfs_layer_indices(6, 2, text_only_layers=2) == [3, 5]
    lm = build_llm(llm_cfg(), V)
    model = wrap(lm, every_k=1, text_only_layers=2)
    assert sorted(model.mmfs.keys()) == ["2", "3"] and model.mmfs_layers == [2, 3]
    hooked = [i for i, layer in enumerate(decoder_layers(lm)) if layer._forward_pre_hooks]
    assert hooked == [2, 3]
    with pytest.raises(ConfigError, match="every_k"):
        wrap(build_llm(llm_cfg(), V), every_k=3, text_only_layers=2)


def test_plain_checkpoint_loads_strict(tmp_path):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, max_position_embeddings=128)).eval()
    plain.save_pretrained(tmp_path / "lm")
    lm = build_llm(LLMConfig(pretrained=str(tmp_path / "lm")), V)
    model = wrap(lm).eval()
    assert list(model.lm.state_dict()) == list(plain.state_dict())
    assert not any(k.startswith("lm.") for k in model.state_dict() if "mmfs" in k)
    state = load_file(tmp_path / "lm" / "model.safetensors")
    model.lm.load_state_dict({**plain.state_dict(), **state}, strict=True)
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids, image_features=features(1), visible=visibility(1, 9)).logits,
                           plain(ids).logits)


def test_pretrained_errors_and_resize(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_llm(LLMConfig(pretrained=str(tmp_path / "missing")), V)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        build_llm(LLMConfig(pretrained=str(tmp_path / "empty")), V)
    build_llm(llm_cfg(), V).save_pretrained(tmp_path / "lm")
    lm = build_llm(LLMConfig(pretrained=str(tmp_path / "lm")), V + 5)
    assert lm.get_input_embeddings().num_embeddings == V + 5
    assert lm.get_output_embeddings().weight.shape[0] == V + 5


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt_neox"])
def test_build_every_arch(arch):
    lm = build_llm(llm_cfg(arch), V)
    assert len(decoder_layers(lm)) == 4
    out = wrap(lm)(torch.randint(0, V, (1, 5)), image_features=features(1), visible=visibility(1, 5, (1, 3)))
    assert out.logits.shape == (1, 5, V)


def test_packed_mask_and_positions():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    assert packed_position_ids(seg).tolist() == [[0, 1, 0, 1, 2, 0]]
    m = packed_causal_mask(seg, 6)[0, 0]  # (T, S)
    assert m[3].tolist() == [False, False, True, True, False, False]
    assert m[5].tolist() == [False] * 5 + [True]  # padding sees only itself
    assert packed_causal_mask(seg, 2).shape == (1, 1, 2, 6)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("gpt_neox", "sdpa")])
def test_packed_documents_do_not_see_each_other(arch, attn):
    _, model = make(arch, attn=attn)
    set_gates(model, 1.0)
    a, b = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 7))
    ids = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)  # (1, 14) = doc a, doc b, padding
    seg = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2])
    feats = features(1)
    vis = torch.zeros(1, 14, M, dtype=torch.bool)
    vis[0, 2:5, 0] = True  # doc a sees image 0
    vis[0, 8:12, 1] = True  # doc b sees image 1 from its 4th token on
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, image_features=feats, visible=vis).logits
        alone = model(b, image_features=feats, visible=vis[:, 5:12]).logits
        first = model(a, image_features=feats, visible=vis[:, :5]).logits
    torch.testing.assert_close(packed[:, 5:12], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, :5], first, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_kv_cache_matches_full_forward(arch):
    _, model = make(arch)
    set_gates(model, 1.0)
    B, T, T0 = 2, 10, 6
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # row 1 is left-padded
    vis = visibility(B, T, (3, 7)) & mask.bool()[:, :, None]
    feats = features(B)
    values = model.prepare_image_values(feats)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, image_values=values, visible=vis).logits
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :T0], attention_mask=mask[:, :T0], image_values=values, visible=vis[:, :T0],
                    cache=cache, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(T0, T):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], image_values=values,
                        visible=vis[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
        unpadded = model(ids[1:, 2:], image_features=[f[1:] for f in feats],
                         visible=vis[1:, 2:]).logits
    torch.testing.assert_close(torch.stack(steps, 1), full[:, T0 - 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[1:, 2:], unpadded, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = wrap(build_llm(llm_cfg(), V), gradient_checkpointing=ckpt).train()
        set_gates(model, 0.5)
        ids = torch.randint(0, V, (2, 12))
        seg = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
        out = model(ids, segment_ids=seg, image_features=features(2), visible=visibility(2, 12))
        out.logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert all(m.gate.grad is not None and m.gate.grad.abs() > 0 for m in model.mmfs.values())
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_deepcopy_keeps_its_own_branches():
    _, model = make()
    ema = copy.deepcopy(model)
    set_gates(ema, 1.0)  # only the copy's gates open
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        a = model(ids, image_features=features(1), visible=visibility(1, 12)).logits
        b = ema(ids, image_features=features(1), visible=visibility(1, 12)).logits
        c = model(ids).logits
    assert torch.equal(a, c) and not torch.allclose(a[:, 4:], b[:, 4:])
