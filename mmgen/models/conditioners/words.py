"""``words``: the decoder's own embedding of each context token's id, added to the token.

Shape legend: N images, T context tokens, X cross-attention width, V vocabulary.

Why: the tiny UNet did not learn to read an object's colour from a trained LLM's hidden states,
though a linear probe finds it there; it read it at once from word embeddings of its own.
Measured (decoder-only A/B, colour, chance 0.17; docs/RESULTS.md, "The decoder reads words"):
hidden states only 0.25 after 615 steps; with the LLM's own input embeddings beside them 0.19–0.22
after 200; with this embedding added per token **0.88** after 400 steps. The hidden states stay
in the context (what changed in a story, which object "it" is).

It needs ``model.decoder.context_encoder: tokens`` (one context token per id). Its embedding
starts N(0, 1): unit scale, as the context encoder's normalised tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.config import ConfigError, DecoderConfig
from mmgen.models.conditioners.base import Conditioner


class Words(Conditioner):
    """Token ids (N, T) → their embeddings (N, T, X), a term of each projected context token."""

    def __init__(self, cfg: DecoderConfig, *, cross_dim: int, latent_channels: int, vocab_size: int | None):
        super().__init__(cfg, cross_dim=cross_dim, latent_channels=latent_channels, vocab_size=vocab_size)
        if cfg.context_encoder != "tokens":
            raise ConfigError("the words decoder conditioner needs model.decoder.context_encoder: tokens "
                              "(one context token per word)")
        if vocab_size is None:
            raise ValueError("the words decoder conditioner needs the tokenizer's vocabulary size")
        self.embedding = nn.Embedding(vocab_size, cross_dim)  # (V, X), N(0, 1)

    def context(self, ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:
            raise ValueError("the words decoder conditioner needs the context's token ids (context_ids)")
        return self.embedding(ids)  # (N, T, X)
