"""MMFS: the vectorised module against a slow, obviously-correct loop, plus masking, init and gradients."""

import math

import pytest
import torch

from mmgen.models.mmfs import MMFS, GatedMMFS, Values, image_ranks, repeat_rows

B, Q, M, C, CV, D, H, P = 2, 3, 3, 8, 6, 8, 2, 2
SIZES = [(4, 5), (2, 3)]  # (H_l, W_l), deliberately not square
L = len(SIZES)


def make(seed=0, randomise=True, dtype=torch.float64, gated=False, max_images=4):
    torch.manual_seed(seed)
    cls = GatedMMFS if gated else MMFS
    m = cls(C, CV, hidden_size=D, num_heads=H, num_points=P, num_levels=L, max_images=max_images).to(dtype)
    if randomise:  # leave the zero init so that offsets, logits and the rank embedding all matter
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name != "gate":
                    p.normal_(0, 0.5)
            # large offsets: some points fall outside their image
            m.get_submodule("mmfs" if gated else "").sampling_offsets.weight.mul_(4)
    feats = [torch.randn(B, M, CV, h, w, dtype=dtype) for h, w in SIZES]
    query = torch.randn(B, Q, C, dtype=dtype)
    visible = torch.tensor([[[1, 1, 0], [0, 1, 1], [0, 0, 0]],   # row 0: query 2 sees nothing
                            [[1, 0, 1], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    return m, feats, query, visible


def bilinear(img, x, y):
    """img (C, H, W) sampled at (x, y) in [0, 1] image coordinates, align_corners=False, zeros outside."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for xi in (x0, x0 + 1):
        for yi in (y0, y0 + 1):
            if 0 <= xi < w and 0 <= yi < h:
                out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * img[:, yi, xi]
    return out


def reference(m, query, feats, visible, ref_points=None):
    """One query, image, level, head and point at a time, straight from docs/DESIGN.md §5."""
    Dh = D // H
    out = torch.zeros(B, Q, C, dtype=query.dtype)
    for b in range(B):
        for q in range(Q):
            seen = [j for j in range(M) if visible[b, q, j]]
            if not seen:
                continue  # exactly 0
            rx, ry = (0.5, 0.5) if ref_points is None else ref_points[b, q].tolist()
            heads = []
            for h in range(H):
                logits, vals = [], []  # every (image, level, point) slot plus one null per (image, level)
                for j in seen:
                    rank = min(sum(bool(visible[b, q, k]) for k in range(j, M)), m.max_images)
                    x = query[b, q] + m.image_index_embed.weight[rank]
                    off = (m.sampling_offsets.weight @ x + m.sampling_offsets.bias).view(H, P, 2)
                    lg = (m.attention_weights.weight @ x + m.attention_weights.bias).view(H, L, P + 1)
                    for lvl, (hl, wl) in enumerate(SIZES):
                        vmap = torch.einsum("dc,chw->dhw", m.value_proj.weight, feats[lvl][b, j])
                        vmap = (vmap + m.value_proj.bias[:, None, None])[h * Dh:(h + 1) * Dh]
                        for p in range(P):
                            sx = rx + off[h, p, 0].item() / wl
                            sy = ry + off[h, p, 1].item() / hl
                            logits.append(lg[h, lvl, p])
                            vals.append(bilinear(vmap, sx, sy))
                        logits.append(lg[h, lvl, P])
                        vals.append(torch.zeros(Dh, dtype=query.dtype))
                w = torch.stack(logits).softmax(0)
                heads.append(sum(wi * vi for wi, vi in zip(w, vals)))
            out[b, q] = m.output_proj.weight @ torch.cat(heads) + m.output_proj.bias
    return out


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("path", ["sampling", "gathering", "sampling-chunked"])
def test_matches_reference_loop(with_ref, path):
    """Both paths: sampling while autograd records (training), gathering without (generation)."""
    m, feats, query, visible = make()
    if path == "sampling-chunked":
        m.CHUNK = 4  # rows of 4 and 7 pairs -> 2 chunks of 4, padded
    ref_points = torch.rand(B, Q, 2, dtype=query.dtype) if with_ref else None
    with torch.set_grad_enabled(path != "gathering"):
        values = m.prepare_values(feats)
        got = m(query, values, visible, ref_points).detach()
    assert isinstance(values, Values) == (path == "gathering")
    with torch.no_grad():
        want = reference(m, query, feats, visible, ref_points)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("grad", [False, True])
def test_matches_reference_loop_float32(grad):
    m, feats, query, visible = make()
    with torch.no_grad():
        want = reference(m, query, feats, visible)
        m32 = m.float()
    with torch.set_grad_enabled(grad):
        got = m32(query.float(), m32.prepare_values([f.float() for f in feats]), visible).detach()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_invisible_images_are_ignored_and_visible_ones_read():
    m, feats, query, visible = make()
    with torch.no_grad():
        base = m(query, m.prepare_values(feats), visible)
        altered = [f.clone() for f in feats]
        for f in altered:
            f[0, 2] += 10.0  # row 0, slot 2: seen by query 1 only
        new = m(query, m.prepare_values(altered), visible)
    assert torch.equal(new[0, 0], base[0, 0])  # query 0 cannot see slot 2
    assert torch.equal(new[1], base[1])  # another row
    assert not torch.allclose(new[0, 1], base[0, 1])  # query 1 can


def test_no_visible_image_gives_exact_zero():
    m, feats, query, visible = make()
    out = m(query, m.prepare_values(feats), visible)
    assert torch.equal(out[0, 2], torch.zeros(C, dtype=out.dtype))
    out = m(query, m.prepare_values(feats), torch.zeros_like(visible))
    assert torch.equal(out, torch.zeros_like(out))
    empty = [f[:, :0] for f in feats]  # no image slots at all
    assert torch.equal(m(query, m.prepare_values(empty), visible[..., :0]), torch.zeros_like(query))


def test_gated_is_exactly_zero_at_init_and_gradients_reach_everything():
    m, feats, query, visible = make(randomise=False, gated=True, dtype=torch.float32)
    feats, query = [f.float() for f in feats], query.float()
    assert torch.equal(m(query, m.prepare_values(feats), visible), torch.zeros_like(query))
    with torch.no_grad():
        m.gate.fill_(0.5)
    m(query, m.prepare_values(feats), visible).square().sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    for name in ["gate", "mmfs.sampling_offsets.weight", "mmfs.sampling_offsets.bias",
                 "mmfs.attention_weights.weight", "mmfs.attention_weights.bias",
                 "mmfs.value_proj.weight", "mmfs.output_proj.weight"]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_init_is_deformable_detr_like():
    m, *_ = make(randomise=False)
    assert torch.equal(m.sampling_offsets.weight, torch.zeros_like(m.sampling_offsets.weight))
    assert torch.equal(m.attention_weights.weight, torch.zeros_like(m.attention_weights.weight))
    assert torch.equal(m.attention_weights.bias, torch.zeros_like(m.attention_weights.bias))
    ring = m.sampling_offsets.bias.view(H, P, 2)
    assert torch.allclose(ring[:, 1], 2 * ring[:, 0])  # point p sits at radius p + 1
    assert torch.allclose(ring[:, 0].abs().amax(-1), torch.ones(H, dtype=ring.dtype))
    names = [n for n, _ in GatedMMFS(C, CV, hidden_size=D, num_heads=H, num_points=P, num_levels=L,
                                     max_images=4).named_parameters()]
    assert "gate" in names and "mmfs.sampling_offsets.weight" in names


def test_image_ranks():
    visible = torch.tensor([[[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]], dtype=torch.bool)
    assert image_ranks(visible, 32).tolist() == [[[3, 0, 2, 1], [0, 0, 0, 0], [4, 3, 2, 1]]]
    assert image_ranks(visible, 2).tolist() == [[[2, 0, 2, 1], [0, 0, 0, 0], [2, 2, 2, 1]]]


def test_rank_embedding_makes_image_order_matter():
    """Two visible images: swapping their features changes the output only through the ranks."""
    m, feats, query, visible = make()
    visible = torch.zeros_like(visible)
    visible[:, :, :2] = True
    swapped = [f[:, [1, 0, 2]] for f in feats]
    with torch.no_grad():
        a = m(query, m.prepare_values(feats), visible)
        b = m(query, m.prepare_values(swapped), visible)
        assert not torch.allclose(a, b)
        m.image_index_embed.weight.zero_()  # without the embedding the images are a set
        a = m(query, m.prepare_values(feats), visible)
        b = m(query, m.prepare_values(swapped), visible)
    torch.testing.assert_close(a, b)


def test_ranks_shift_when_visibility_changes():
    """Identical features in every slot: seeing one more image changes ranks, hence the output."""
    m, feats, query, _ = make()
    same = [f[:, :1].expand_as(f).contiguous() for f in feats]
    one, two = torch.zeros(B, Q, M, dtype=torch.bool), torch.zeros(B, Q, M, dtype=torch.bool)
    one[..., 1] = True
    two[..., 1] = two[..., 2] = True
    other = one.roll(1, -1)  # a different single slot: same rank, same features, same output
    with torch.no_grad():
        values = m.prepare_values(same)
        torch.testing.assert_close(m(query, values, one), m(query, values, other))
        assert not torch.allclose(m(query, values, one), m(query, values, two))


def test_gradcheck():
    """Analytic gradients (point-sum backward, atlas clamping, edge fading) match finite differences."""
    m, feats, query, visible = make()
    m.CHUNK = 4
    feats = [f.requires_grad_() for f in feats]
    query.requires_grad_()
    ref_points = torch.rand(B, Q, 2, dtype=query.dtype, requires_grad=True)

    def f(query, ref_points, *feats):
        return m(query, m.prepare_values(list(feats)), visible, ref_points)

    assert torch.autograd.gradcheck(f, (query, ref_points, *feats), fast_mode=True)


def test_low_precision_samples_in_float32():
    m, feats, query, visible = make(dtype=torch.float32)
    with torch.no_grad():
        want = m(query, m.prepare_values(feats), visible)
        m16 = m.to(torch.bfloat16)
        values = m16.prepare_values([f.bfloat16() for f in feats])
        assert values.table.dtype == torch.float32
        got = m16(query.bfloat16(), values, visible)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.02)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m.float()
        got = m(query, m.prepare_values(feats), visible)
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.02)


def test_values_serve_a_batch_that_repeats_their_rows():
    """Classifier-free guidance runs [null; cond] over the same images: values prepared once for B
    rows serve 2B query rows exactly as values prepared for the repeated features."""
    m, feats, query, visible = make()
    with torch.no_grad():
        twice = torch.cat([query, query.flip(1)])  # (2B, Q, C)
        vis2 = visible.repeat(2, 1, 1)
        want = m(twice, m.prepare_values([f.repeat(2, 1, 1, 1, 1) for f in feats]), vis2)
        got = m(twice, m.prepare_values(feats), vis2)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="do not match"):
        m(query[:1], m.prepare_values(feats), visible[:1])
    # the sampling path (autograd on) needs its per-row atlases repeated: repeat_rows does either
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = m(twice, repeat_rows(m.prepare_values(feats), 2), vis2).detach()
        torch.testing.assert_close(got, want)
