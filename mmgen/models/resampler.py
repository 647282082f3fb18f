"""Perceiver resampler: a variable number of input tokens → a fixed number of output tokens.

Shape legend: N items (images or contexts), T input tokens, Q learned queries, D width.

Each layer is pre-norm cross-attention in which the queries attend to the concatenation
[inputs; queries] (Flamingo's perceiver resampler), followed by a pre-norm MLP. The same
module serves the image resampler (vision tokens → LLM placeholder embeddings, docs/DESIGN.md §2)
and the decoder's context perceiver (LLM hidden states → UNet context, §6).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.config import ResamplerConfig


class PerceiverAttention(nn.Module):
    """Queries (N, Q, D) attend to [inputs (N, T, D); queries]; optional key padding mask."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"perceiver width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, T, D), q (N, Q, D), mask (N, T) bool (True = attend) → (N, Q, D)."""
        N, T, D = x.shape
        Q, H = q.shape[1], self.num_heads
        x, q = self.norm_x(x), self.norm_q(q)
        kv_in = torch.cat([x, q], dim=1)  # (N, T+Q, D)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)  # (N, T+Q, D) each
        q = self.to_q(q)  # (N, Q, D)
        q, k, v = (t.reshape(N, -1, H, D // H).transpose(1, 2) for t in (q, k, v))  # (N, H, *, D/H)
        attn_mask = None
        if mask is not None:
            keep = torch.cat([mask.bool(), mask.new_ones(N, Q, dtype=torch.bool)], dim=1)  # (N, T+Q)
            attn_mask = keep[:, None, None, :]  # (N, 1, 1, T+Q); the queries are always visible
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, Q, D/H)
        out = out.transpose(1, 2).reshape(N, Q, D)  # (N, Q, D)
        return self.proj(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Perceiver(nn.Module):
    """(N, T, in_dim) [+ mask (N, T)] → (N, Q, out_dim) with Q learned queries."""

    def __init__(self, in_dim: int, out_dim: int, *, width: int, num_queries: int, num_layers: int,
                 num_heads: int):
        super().__init__()
        self.num_queries = num_queries
        self.proj_in = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width ** -0.5)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, num_heads), FeedForward(width)])
            for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._read(self.proj_in(x), mask)

    def _read(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The queries read the projected inputs x (N, T, W) → (N, Q, out_dim)."""
        q = self.queries.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (N, Q, W)
        for attn, ff in self.layers:
            q = q + attn(x, q, mask)
            q = q + ff(q)
        return self.proj_out(self.norm_out(q))  # (N, Q, out_dim)


@functools.lru_cache(maxsize=8)
def grid_positions(num_tokens: int, width: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions (T, W) for a class token then a G x G grid, row-major.

    The class token's row is 0; of each grid row, half the channels encode y, half x, each as
    sines and cosines of geometrically spaced frequencies (MAE's table). Cached: one table per
    grid size, built once rather than at every image batch.
    """
    side = math.isqrt(num_tokens - 1)
    if num_tokens < 2 or side * side != num_tokens - 1:
        raise ValueError(f"{num_tokens} tokens are not a class token and a square grid")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))  # (W/4,)
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    parts = [f(c.flatten()[:, None] * omega) for c in (y, x) for f in (torch.sin, torch.cos)]  # 4 x (G², W/4)
    return torch.cat([torch.zeros(1, width), torch.cat(parts, 1)])  # (1+G², W)


class Resampler(Perceiver):
    """Image resampler: vision tokens (N, T_v, in_dim) → placeholder embeddings (N, Q, out_dim).

    With ``grid_positions`` the tokens carry where on the image they are (:func:`grid_positions`)."""

    def __init__(self, cfg: ResamplerConfig, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, width=cfg.hidden_size, num_queries=cfg.num_queries,
                         num_layers=cfg.num_layers, num_heads=cfg.num_heads)
        self.grid_positions = cfg.grid_positions

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.proj_in(x)  # (N, T, W)
        if self.grid_positions:
            x = x + grid_positions(x.shape[1], x.shape[2]).to(x)
        return self._read(x, mask)
