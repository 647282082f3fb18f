"""A small CLIP text encoder for the COSMOS alignment stage, fed the project's tokenizer.

Shape legend: N captions, T tokens, D text width.

The encoder is a ``transformers.CLIPTextModel`` built from ``align.text_*`` numbers with the
vocabulary of the project tokenizer (:func:`mmgen.data.tokenizer.build_tokenizer`). Every
caption ends with ``<eod>``, the end-of-text token; the caption's summary vector is the final
hidden state there (CLIP's "EOS pooling"). We pool by position ourselves: CLIPTextModel's own
``pooler_output`` treats ``eos_token_id == 2`` — the id ``<eod>`` gets in trained tokenizers —
as the legacy "highest token id" rule, which would pick the wrong token.
"""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from mmgen.config import AlignConfig
from mmgen.data.tokenizer import special_ids


def build_text_encoder(cfg: AlignConfig, tokenizer) -> CLIPTextModel:
    """A randomly initialised CLIP text tower sized by ``cfg`` for ``tokenizer``'s vocabulary."""
    ids = special_ids(tokenizer)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_num_layers, num_attention_heads=cfg.text_num_heads,
        max_position_embeddings=cfg.text_max_len, projection_dim=cfg.embed_dim,
        pad_token_id=ids.pad, bos_token_id=ids.bos if ids.bos is not None else ids.eod, eos_token_id=ids.eod)
    return CLIPTextModel(config)


def encode_captions(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and lengths of ``texts``, each ending with ``<eod>`` (cut to ``max_len``).

    Returns: input_ids (N, T) right-padded with the pad id, lengths (N,) counting ``<eod>``.
    """
    ids = special_ids(tokenizer)
    rows = [row[: max_len - 1] + [ids.eod]
            for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), ids.pad, dtype=torch.long)  # (N, T)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return input_ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


def text_features(encoder: CLIPTextModel, input_ids: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the encoder. Returns: pooled (N, D) at ``<eod>``, tokens (N, T, D), pad mask (N, T) True on pads."""
    T = input_ids.shape[1]
    pad = torch.arange(T, device=input_ids.device)[None, :] >= lengths[:, None]  # (N, T)
    out = encoder(input_ids=input_ids, attention_mask=(~pad).long())
    tokens = out.last_hidden_state  # (N, T, D), after the final layer norm
    pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]  # (N, D)
    return pooled, tokens, pad
