"""Multi-image feature synchronizer (MMFS): multi-scale, multi-image deformable attention.

docs/DESIGN.md §5. Every query reads a few bilinearly sampled points from the multi-scale feature
maps of the images it may see, Deformable-DETR style, instead of attending to every image
token. Pure PyTorch (``F.grid_sample`` / ``F.embedding_bag``), so it runs on CPU and GPU alike.

Shape legend:
    B  batch rows                  Q  queries per row
    M  image slots per row         L  feature levels (scales)
    P  sampling points             H  heads
    D  hidden width (hidden_size)  Dh head width D // H
    C  query width (query_dim)     Cv value width (value_dim)
    K  visible (image, query) pairs of the fullest row

Conventions: points are (x, y) in [0, 1] image coordinates, sampled with
``align_corners=False`` and zero padding, so (0, 0) is the top-left corner of the image and
(0.5, 0.5) its centre. A sampling offset is in pixels of the level it samples: the location on
level l is ``ref + offset / (W_l, H_l)``.

How it is fast: two paths, the same maths (tests hold both to a loop written from DESIGN §5).

* Sampling (while autograd records: training). Values are projected once per image (a batched
  matmul on the channel-first maps) into one "atlas" per (row, head) and level, the row's images
  stacked top to bottom, so a single ``grid_sample`` per level reads every visible (image,
  query) pair and nothing else (a causal text sequence sees about half of its pairs). Pairs are
  sampled image-major in chunks of 64 for cache locality; attention weights are folded in right
  after sampling without materialising products. Float32 atlas coordinates resolve about
  ``2**-24 * M * H_l`` pixels (1e-4 px for 32 images of 64 rows).
* Gathering (no autograd: generation). Values go into one table whose rows are (level, row,
  image, y, x, head), each a head's Dh values side by side, every map zero-padded by one pixel
  before and two after. A point is the weighted sum of four rows (its bilinear corners), so all
  of a (pair, head)'s points, levels and corners, bilinear and attention weights multiplied in,
  are one bag of ``F.embedding_bag(mode="sum")``: a fused gather-and-sum over contiguous rows
  that never materialises the samples. Points are clamped into [-1, size] pixels, where the
  padding reads zeros exactly as zero padding would. At the 7B config's 32x32 UNet level its
  forward is 2.8x faster than sampling (grid_sample reads channel-first maps one cache line per
  channel); its backward is slower at the tiny model's shapes (embedding_bag's table gradient),
  so training keeps sampling.

fp16/bf16 inputs are sampled or gathered in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MMFS", "GatedMMFS", "Values", "image_ranks", "repeat_rows"]


PAD = 3  # the gathering path's padding pixels per axis of each stored map: 1 before, 2 after


def _sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _PointSum(torch.autograd.Function):
    """``(samples * weights).sum(-2)`` for samples (N, Dh, G, P, Kc), weights (N, 1, G, P, Kc).

    The same maths as autograd's, in fewer passes over the samples: no product of their size
    is materialised forward, and the samples' gradient comes out contiguous, as
    ``grid_sample``'s backward wants it (otherwise it copies).
    """

    @staticmethod
    def forward(ctx, samples: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(samples, weights)
        out = samples.select(-2, 0) * weights.select(-2, 0)  # (N, Dh, G, Kc)
        for p in range(1, samples.shape[-2]):
            out.addcmul_(samples.select(-2, p), weights.select(-2, p))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        samples, weights = ctx.saved_tensors
        grad_samples = grad.unsqueeze(-2) * weights  # (N, Dh, G, P, Kc)
        grad_weights = torch.stack([torch.linalg.vecdot(grad, samples.select(-2, p), dim=1)
                                    for p in range(samples.shape[-2])], -2)  # (N, G, P, Kc)
        return grad_samples, grad_weights.unsqueeze(1)


class Values(NamedTuple):
    """The projected features of a batch's images (:meth:`MMFS.prepare_values`).

    ``table`` (R, Dh): one row per (level, row b, image m, y, x, head), the levels one after
    another, each a head's Dh values; ``sizes`` the (H_l, W_l) of each level; ``rows`` B and
    ``images`` M, the slots it was made for.
    """

    table: Tensor
    sizes: tuple[tuple[int, int], ...]
    rows: int
    images: int


def repeat_rows(values: list[Tensor] | Values, k: int) -> list[Tensor] | Values:
    """Values for a batch that repeats its rows k times in order (classifier-free guidance's
    [null; cond] halves): the sampling path's atlases are per row and are repeated; the gathering
    path's table already serves such a batch (:meth:`MMFS.forward`)."""
    return values if isinstance(values, Values) else [v.repeat(k, 1, 1, 1) for v in values]


def image_ranks(visible: Tensor, max_images: int) -> Tensor:
    """Relative index of each visible image: the most recent visible slot is 1, the one before 2.

    Args:
        visible: (B, Q, M) bool, query q of row b may read image slot m.
        max_images: ranks are clamped to this value.
    Returns:
        (B, Q, M) long; 0 where the slot is invisible.
    """
    # rank[b, q, m] = number of visible slots m' >= m (a reversed cumulative sum)
    rank = visible.flip(-1).long().cumsum(-1).flip(-1)  # (B, Q, M)
    return rank.clamp(max=max_images) * visible


class MMFS(nn.Module):
    """Multi-scale, multi-image deformable attention with a null slot per image and level.

    Per query and head it predicts P sampling offsets (shared across levels, scaled per
    level) and attention logits over images x levels x (P + 1); the extra "null" slot has a
    zero value, so a query may attend to nothing. A relative image-index embedding is added
    to the query before both projections. The softmax is joint over all visible images,
    levels and slots; invisible images are masked out; queries that see no image return 0.
    """

    CHUNK = 64  # (image, query) pairs sampled together; see forward

    def __init__(self, query_dim: int, value_dim: int, *, hidden_size: int, num_heads: int,
                 num_points: int, num_levels: int, max_images: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_points, self.num_levels, self.max_images = num_points, num_levels, max_images
        self.sampling_offsets = nn.Linear(query_dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(query_dim, num_heads * num_levels * (num_points + 1))
        # row r is the r-th most recent visible image; row 0 (invisible) only ever gets masked.
        # Unit-normal init, the scale of the LayerNormed queries it is added to
        self.image_index_embed = nn.Embedding(max_images + 1, query_dim)
        self.value_proj = nn.Linear(value_dim, hidden_size)
        self.output_proj = nn.Linear(hidden_size, query_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring per head, attention is uniform."""
        H, P = self.num_heads, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(H, dtype=torch.float32) * (2 * math.pi / H)
        ring = torch.stack([theta.cos(), theta.sin()], -1)  # (H, 2)
        ring = ring / ring.abs().amax(-1, keepdim=True)  # onto the unit square
        ring = ring[:, None, :] * torch.arange(1, P + 1, dtype=torch.float32)[None, :, None]  # (H, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.normal_(self.image_index_embed.weight)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def prepare_values(self, features: list[Tensor]) -> list[Tensor] | Values:
        """Project the multi-scale features once per image, for the sampling path while autograd
        records (training) and for the gathering path otherwise (generation); see the module doc.

        Args:
            features: L tensors (B, M, Cv, H_l, W_l), per-row padded image slots.
        Returns:
            sampling path: L atlases (B * H, Dh, M * H_l, W_l), float32 at least: per row and
            head, the row's images stacked top to bottom. Gathering path: :class:`Values`.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
        return self._atlases(features) if torch.is_grad_enabled() else self._table(features)

    def _atlases(self, features: list[Tensor]) -> list[Tensor]:
        D, H, w, b = self.hidden_size, self.num_heads, self.value_proj.weight, self.value_proj.bias
        values = []
        for f in features:
            B, M, Cv, Hl, Wl = f.shape
            # a 1x1 projection of channel-first maps is one batched matmul, no input copy
            v = torch.baddbmm(b[None, :, None].expand(B * M, D, 1), w.expand(B * M, D, Cv),
                              f.reshape(B * M, Cv, Hl * Wl))  # (B*M, D, HW)
            v = v.view(B, M, D, Hl * Wl).transpose(1, 2)  # (B, D, M, HW)
            dt = _sampling_dtype(v.dtype)  # atlas coordinates need float32 at least
            v = v.contiguous() if v.dtype == dt else v.to(dt, memory_format=torch.contiguous_format)
            values.append(v.view(B * H, D // H, M * Hl, Wl))  # (B*H, Dh, M*H_l, W_l)
        return values

    def _table(self, features: list[Tensor]) -> Values:
        """Every level's projected pixels as rows of one zero-padded table (:class:`Values`)."""
        H, w, b = self.num_heads, self.value_proj.weight, self.value_proj.bias
        B, M = features[0].shape[:2]
        D, sizes = self.hidden_size, [tuple(f.shape[-2:]) for f in features]
        counts = [B * M * (hl + PAD) * (wl + PAD) for hl, wl in sizes]  # padded pixels per level
        table = torch.zeros(sum(counts) * H, D // H, device=w.device,
                            dtype=_sampling_dtype(torch.result_type(features[0], w)))  # (R, Dh)
        start = 0
        for f, (hl, wl), n in zip(features, sizes, counts):
            # a 1x1 projection of channel-first maps, written pixel-major: (B*M, HW, D) is already
            # the table's row order (b, m, y, x, head) with each head's Dh values contiguous
            v = torch.baddbmm(b.expand(B * M, 1, -1), f.reshape(B * M, f.shape[2], hl * wl).transpose(1, 2),
                              w.t().expand(B * M, -1, -1))  # (B*M, HW, D)
            # into the padded map: one zero pixel above and left, two below and right (forward, step 4)
            level = table[start * H:(start + n) * H].view(B * M, hl + PAD, wl + PAD, D)
            level[:, 1:hl + 1, 1:wl + 1] = v.view(B * M, hl, wl, D)
            start += n
        return Values(table, tuple(sizes), B, M)

    def forward(self, query: Tensor, values: list[Tensor] | Values, visible: Tensor,
                ref_points: Tensor | None = None) -> Tensor:
        """Sample the visible images' features for every query.

        Args:
            query: (B, Q, C).
            values: from :meth:`prepare_values`. The gathering path's :class:`Values` may also
                serve B / k rows that the batch repeats k times in order (row b reads values row
                b mod rows), as the [null; cond] halves of classifier-free guidance do.
            visible: (B, Q, M) bool, query q of row b may read image slot m.
            ref_points: (B, Q, 2) in [0, 1], (x, y); None puts every query at the image centre.
        Returns:
            (B, Q, C); exactly 0 for queries that see no image.
        """
        B, Q, C = query.shape
        M, H, L, P = visible.shape[-1], self.num_heads, self.num_levels, self.num_points
        gather = isinstance(values, Values)
        levels = len(values.sizes) if gather else len(values)
        if levels != L:
            raise ValueError(f"expected {L} value levels, got {levels}")
        if (B % values.rows or values.images != M) if gather else \
                any(v.shape[0] != B * H or v.shape[-2] % max(M, 1) for v in values):
            raise ValueError(f"values do not match query rows ({B}) and visible's image slots ({M})")
        visible = visible.bool()
        has_image = visible.any(-1, keepdim=True)  # (B, Q, 1)
        if M == 0 or not has_image.any():
            return query.new_zeros(B, Q, C)

        # 1. logits per (query, image): a linear of (q + e) is (W q + b) + W e, so the queries
        #    are projected once and the projected image-index table is gathered by rank
        rank = image_ranks(visible, self.max_images)  # (B, Q, M)
        table = self.image_index_embed.weight
        logit_table = F.linear(table, self.attention_weights.weight)  # (R, H*L*(P+1))
        logit = self.attention_weights(query)[:, :, None] + F.embedding(rank, logit_table)
        dt = values.table.dtype if gather else values[0].dtype  # the sampling dtype, float32 at least
        logit = logit.to(dt).view(B, Q, M, H, L * (P + 1))  # (B, Q, M, H, L*(P+1))

        # 2. joint softmax over visible images x levels x (points + null); the null slot's value
        #    is zero, so it only enters the normaliser. A finite fill keeps rows that see nothing
        #    NaN-free (in the backward too); none of their entries is ever read.
        logit = logit.masked_fill(~visible[..., None, None], torch.finfo(dt).min)
        attn = (logit - logit.logsumexp((2, 4), keepdim=True)).exp()  # (B, Q, M, H, L*(P+1))
        attn = attn.view(B, Q, M, H, L, P + 1)[..., :P]  # (B, Q, M, H, L, P)
        if gather:
            return self._gather(query, values, visible, ref_points, rank, attn, has_image)

        # 3. only visible (image, query) pairs are sampled, in chunks of at most CHUNK:
        #    grid_sample walks a chunk's P points before the next chunk, so neighbouring reads
        #    stay in cache, and P stays an outer dimension
        pm, pq, qi, ri, valid, off, G = self._pairs(query, visible, rank, self.CHUNK)
        K = pm.shape[1]
        Kc = K // G  # pairs per chunk
        valid = valid.flatten()  # (B*K,)
        off = off.to(dt).view(B, G, Kc, H, P, 2).permute(0, 3, 1, 4, 2, 5)  # (B, H, G, P, Kc, 2)
        w = attn.flatten(0, 2).index_select(0, ri) * valid[:, None, None, None]  # (B*K, H, L, P)
        w = w.view(B, G, Kc, H, L, P).permute(4, 0, 3, 1, 5, 2).contiguous()  # (L, B, H, G, P, Kc)
        if ref_points is None:
            ref = off.new_tensor(0.5)
        else:
            ref = ref_points.to(dt).flatten(0, 1)[qi].view(B, 1, G, 1, Kc, 2)  # (B, 1, G, 1, Kc, 2)
        top = pm.view(B, 1, G, 1, Kc).to(dt)  # first atlas row of each pair's image, in image heights

        # 4. sampling grids for all levels at once, in grid_sample's [-1, 1] coordinates. Images
        #    touch in the atlas, so y is clamped into the pair's own image and zero padding is
        #    emulated by a factor that fades the sample out beyond the top and bottom edges
        #    (exact: bilinear weights are linear in the distance to the edge)
        size = off.new_tensor([[v.shape[-1], v.shape[-2] // M] for v in values]).view(L, 1, 1, 1, 1, 1, 2)
        x, y = (ref * size + off - 0.5).unbind(-1)  # (L, B, H, G, P, Kc) pixel coordinates
        Wl, Hl = size.unbind(-1)  # (L, 1, 1, 1, 1, 1)
        fade = (1 - (-y).clamp(0, 1)) * (1 - (y - (Hl - 1)).clamp(0, 1))  # (L, B, H, G, P, Kc)
        gx = (x + 0.5) * (2 / Wl) - 1
        gy = (top * Hl + torch.minimum(y.clamp(min=0), Hl - 1) + 0.5) * (2 / (M * Hl)) - 1
        grid = torch.stack([gx, gy], -1)  # (L, B, H, G, P, Kc, 2)
        w = w * fade  # (L, B, H, G, P, Kc)

        # 5. one grid_sample per level over all (pair, head) points, weighted and summed over
        #    points right away
        out = None
        with torch.autocast(query.device.type, enabled=False):  # keep the atlas coordinates exact
            for v, g, wl in zip(values, grid.unbind(0), w.unbind(0)):
                s = F.grid_sample(v, g.view(B * H, G * P, Kc, 2), mode="bilinear", padding_mode="zeros",
                                  align_corners=False)  # (B*H, Dh, G*P, Kc)
                s = s.view(B * H, -1, G, P, Kc)  # (B*H, Dh, G, P, Kc)
                s = _PointSum.apply(s, wl.view(B * H, 1, G, P, Kc))  # (B*H, Dh, G, Kc)
                out = s if out is None else out + s

        # 6. back to queries: each pair adds to its query's column (a scatter along the last
        #    dimension keeps the gradient of the samples contiguous); then the output projection
        out = out.view(B, self.hidden_size, K)  # (B, D, K), chunks back in pair order
        index = pq[:, None].expand_as(out)  # (B, D, K)
        out = out.new_zeros(B, self.hidden_size, Q).scatter_add(2, index, out)  # (B, D, Q)
        out = self.output_proj(out.transpose(1, 2).to(query.dtype))  # (B, Q, C)
        return out * has_image.to(out.dtype)

    def _pairs(self, query: Tensor, visible: Tensor, rank: Tensor, chunk: int | None):
        """The visible (image, query) pairs of each row, image-major (neighbouring pairs read the
        same image), rows padded with invalid pairs to the longest, rounded up to G equal chunks
        of at most ``chunk`` (one chunk for None), and each pair's sampling offsets.

        Returns pm, pq (B, K) each pair's image and query; qi, ri (B*K,) its query and (query,
        image) entry, flattened; valid (B, K); offsets (B*K, H*P*2); G.
        """
        B, Q, _ = query.shape
        M = visible.shape[-1]
        vis = visible.transpose(1, 2).flatten(1)  # (B, M*Q)
        count = vis.sum(1)  # (B,)
        n = int(count.max())
        pair = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n) visible, in order
        G = 1 if chunk is None else -(-n // chunk)  # chunks
        K = G * -(-n // G)
        pair = F.pad(pair, (0, K - n))  # (B, K)
        pm, pq = pair // Q, pair % Q  # (B, K)
        qi = (torch.arange(B, device=query.device)[:, None] * Q + pq).flatten()  # (B*K,) each pair's query
        ri = qi * M + pm.flatten()  # (B*K,) each pair's (query, image) entry
        valid = torch.arange(K, device=query.device) < count[:, None]  # (B, K)
        off_table = F.linear(self.image_index_embed.weight, self.sampling_offsets.weight)  # (R, H*P*2)
        off = self.sampling_offsets(query).flatten(0, 1).index_select(0, qi)  # (B*K, H*P*2)
        off = off + F.embedding(rank.flatten()[ri], off_table)
        return pm, pq, qi, ri, valid, off, G

    def _gather(self, query: Tensor, values: Values, visible: Tensor, ref_points: Tensor | None,
                rank: Tensor, attn: Tensor, has_image: Tensor) -> Tensor:
        """Steps 3-6 of :meth:`forward` on the gathering path (no autograd: generation)."""
        B, Q, _ = query.shape
        M, H, L, P = visible.shape[-1], self.num_heads, self.num_levels, self.num_points
        dt = values.table.dtype
        # 3. only visible (image, query) pairs are gathered
        pm, pq, qi, ri, valid, off, _ = self._pairs(query, visible, rank, None)
        K = pm.shape[1]
        off = off.to(dt).view(B, K, H, 1, P, 2)  # (B, K, H, 1, P, 2), shared by the levels
        w = attn.flatten(0, 2).index_select(0, ri).view(B, K, H, L, P)  # (B, K, H, L, P)
        w = w * valid[..., None, None, None]
        if ref_points is None:
            ref = off.new_tensor(0.5)
        else:
            ref = ref_points.to(dt).flatten(0, 1)[qi].view(B, K, 1, 1, 1, 2)  # (B, K, 1, 1, 1, 2)

        # 4. bilinear corners as table rows. Each level's maps are stored zero-padded (one pixel
        #    before, two after), so a point clamped into [-1, size] reads zeros exactly where
        #    zero padding would, and the 2x2 corners around it never leave its own image
        size = off.new_tensor([[wl, hl] for hl, wl in values.sizes]).view(L, 1, 2)  # (L, 1, 2) as (W, H), beside (L, P, axis)
        xy = ref * size + off - 0.5  # (B, K, H, L, P, 2) pixel coordinates on each level
        xy = torch.maximum(torch.minimum(xy, size), xy.new_tensor(-1.0))
        c0 = xy.floor()
        frac = xy - c0  # (B, K, H, L, P, 2)
        idx = torch.int32 if values.table.shape[0] < 2 ** 31 else torch.int64
        c0 = c0.to(idx) + 1  # in padded pixels
        # row of (b, image, y, x, head) on level l: base_l + (((b*M + m)*H'_l + y)*W'_l + x)*H + h
        padded = [(hl + PAD, wl + PAD) for hl, wl in values.sizes]
        hw = [hl * wl for hl, wl in padded]
        base = torch.tensor([0] + hw[:-1], device=query.device).cumsum(0) * (values.rows * M * H)  # (L,)
        head = (base.view(L, 1) + torch.arange(H, device=query.device).view(H, 1, 1)).to(idx)  # (H, L, 1)
        height, width = (torch.tensor(t, device=query.device, dtype=idx).view(L, 1) for t in zip(*padded))  # (L, 1)
        rows_of = torch.arange(B, device=query.device) % values.rows  # (B,) the values row each row reads
        image = (rows_of[:, None] * M + pm).to(idx).view(B, K, 1, 1, 1)  # (B, K, 1, 1, 1)
        row00 = ((image * height + c0[..., 1]) * width + c0[..., 0]) * H + head  # (B, K, H, L, P)
        corner = torch.stack([torch.zeros_like(width), width.new_full(width.shape, 1), width, width + 1], -1) * H  # (L, 1, 4): dy, dx
        rows = row00[..., None] + corner  # (B, K, H, L, P, 4)
        wy = torch.stack([1 - frac[..., 1], frac[..., 1]], -1) * w[..., None]  # (B, K, H, L, P, 2)
        wx = torch.stack([1 - frac[..., 0], frac[..., 0]], -1)  # (B, K, H, L, P, 2)
        weight = wy[..., :, None] * wx[..., None, :]  # (B, K, H, L, P, 2, 2): dy, dx

        # 5. one weighted gather-sum per (pair, head) over its L*P*4 corners; then each pair adds
        #    to its query, and the output projection
        out = F.embedding_bag(rows.view(B * K * H, L * P * 4), values.table, mode="sum",
                              per_sample_weights=weight.view(B * K * H, L * P * 4))  # (B*K*H, Dh)
        out = out.view(B, K, self.hidden_size)  # (B, K, D), heads in order
        index = pq[..., None].expand_as(out)  # (B, K, D)
        out = out.new_zeros(B, Q, self.hidden_size).scatter_add(1, index, out)  # (B, Q, D)
        out = self.output_proj(out.to(query.dtype))  # (B, Q, C)
        return out * has_image.to(out.dtype)


def one_element_params(*names: str):
    """A load-state-dict pre-hook that reshapes the 0-dim tensors ``names`` of older checkpoints to
    the 1-element parameters they are now."""

    def hook(state_dict, prefix, *args) -> None:
        for name in names:
            t = state_dict.get(prefix + name)
            if t is not None and t.ndim == 0:
                state_dict[prefix + name] = t.reshape(1)

    return hook


class GatedMMFS(nn.Module):
    """Residual MMFS branch for the LLM: ``tanh(gate) * MMFS(LayerNorm(hidden))``.

    The gate is one number initialised to 0, so the branch is exactly 0 at step 0 and the
    wrapped LLM reproduces the plain one. The caller adds the output to the residual stream.
    It is a 1-element tensor, not a 0-dim one, so that FSDP2 can shard it; checkpoints that
    stored it 0-dim load unchanged (:func:`one_element_params`).
    """

    def __init__(self, query_dim: int, value_dim: int, *, hidden_size: int, num_heads: int,
                 num_points: int, num_levels: int, max_images: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(query_dim, eps=eps)
        self.mmfs = MMFS(query_dim, value_dim, hidden_size=hidden_size, num_heads=num_heads,
                         num_points=num_points, num_levels=num_levels, max_images=max_images)
        self.gate = nn.Parameter(torch.zeros(1))
        self._register_load_state_dict_pre_hook(one_element_params("gate"))

    def prepare_values(self, features: list[Tensor]) -> list[Tensor] | Values:
        """See :meth:`MMFS.prepare_values`."""
        return self.mmfs.prepare_values(features)

    def forward(self, hidden: Tensor, values: list[Tensor] | Values, visible: Tensor,
                ref_points: Tensor | None = None) -> Tensor:
        """(B, Q, C) hidden states -> (B, Q, C) branch output, to be added to the residual."""
        return torch.tanh(self.gate) * self.mmfs(self.norm(hidden), values, visible, ref_points)
