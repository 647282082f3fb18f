"""CosMo's contrastive loss (arXiv 2401.00849): images against the text the text-only layers read.

Shape legend: B rows, T tokens, N images in the batch, n image–text pairs, Q placeholders per
image, D LLM width, E contrastive width.

- image embedding: the resampler's Q outputs of the image, mean-pooled, projected, L2-normalised;
- text embedding: the hidden states after the LLM's text-only layers (below every MMFS layer),
  mean-pooled over the tokens of the image's text, projected, L2-normalised;
- loss: symmetric InfoNCE (image→text and text→image) with a learned temperature, initialised
  and clamped as in CLIP (logit scale log(1/0.07), at most 100).

An image's text (:func:`image_text_spans`) is a maximal run of text tokens in its own document:
the nearest run before its ``<boi>``, except in documents that open with an image (captions
follow their images there), where it is the nearest run after the image. When the preferred
side has no text, the other side is used; an image whose document has no text is left out.
Text tokens are all real tokens except ``<bos>``, the kind token, ``<boi>``, ``<image>``, ``<eod>``
and padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.data.tokenizer import SpecialIds
from mmgen.models.mmfs import one_element_params


def text_token_mask(input_ids: torch.Tensor, segment_ids: torch.Tensor, special: SpecialIds) -> torch.Tensor:
    """(B, T) True on text tokens: real tokens other than ``<bos>``, a document's kind token,
    ``<boi>``, ``<image>``, ``<eod>``. (A kind token counted as text made every document look as
    if it opened with text, so captioning documents paired each image with the sentence before it.)"""
    mask = segment_ids >= 0
    for i in (special.boi, special.image, special.eod, special.bos, *special.kinds):
        if i is not None:
            mask = mask & (input_ids != i)
    return mask


def image_text_spans(input_ids: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor,
                     image_row: torch.Tensor, image_boi: torch.Tensor,
                     special: SpecialIds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text run paired with each image (see the module docstring).

    Args: the packed rows' input_ids, segment_ids, position_ids (B, T); each image's row and
    ``<boi>`` position (N,). Returns start (N,), end (N,) (exclusive) in the image's row, and
    valid (N,) bool (False: no text in its document; start = end = 0 then).
    """
    B, T = input_ids.shape
    dev = input_ids.device
    text = text_token_mask(input_ids, segment_ids, special)  # (B, T)
    idx = torch.arange(T, device=dev).expand(B, T)  # (B, T)
    same_prev = torch.zeros_like(text)
    same_prev[:, 1:] = text[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1])
    same_next = torch.zeros_like(text)
    same_next[:, :-1] = text[:, 1:] & (segment_ids[:, :-1] == segment_ids[:, 1:])
    run_start = torch.cummax(torch.where(text & ~same_prev, idx, -1), dim=1).values  # (B, T)
    run_end = T - 1 - torch.cummax(torch.where((text & ~same_next).flip(1), idx, -1), dim=1).values.flip(1)
    last_text = torch.cummax(torch.where(text, idx, -1), dim=1).values  # (B, T) latest text index ≤ t
    next_text = T - 1 - torch.cummax(torch.where(text.flip(1), idx, -1), dim=1).values.flip(1)  # earliest ≥ t, or T

    row, boi = image_row, image_boi  # (N,)
    doc_start = boi - position_ids[row, boi]  # (N,)
    seg = segment_ids[row, boi]  # (N,)
    # the nearest text run before the <boi>, within the document
    b = last_text[row, (boi - 1).clamp(min=0)]  # (N,)
    has_before = (boi > 0) & (b >= doc_start)
    before_end = b + 1
    before_start = run_start[row, b.clamp(min=0)]
    # the nearest text run after the image, within the document
    a = next_text[row, boi]  # (N,) placeholders are not text, so this skips the image
    has_after = a < T
    a_c = a.clamp(max=T - 1)
    has_after = has_after & (segment_ids[row, a_c] == seg)
    after_start, after_end = a_c, run_end[row, a_c] + 1
    # documents that open with an image pair images with the text after them
    key = row * T + doc_start  # (N,) one id per document
    opens_with_image = torch.zeros(B * T, dtype=torch.bool, device=dev)
    opens_with_image[key[~has_before]] = True
    use_after = (opens_with_image[key] & has_after) | ~has_before
    valid = has_before | has_after
    start = torch.where(use_after, after_start, before_start)
    end = torch.where(use_after, after_end, before_end)
    zero = torch.zeros_like(start)
    return torch.where(valid, start, zero), torch.where(valid, end, zero), valid


def pool_spans(hidden: torch.Tensor, row: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over tokens [start, end) of row ``row``, per span (n,) → (n, D)."""
    B, T, D = hidden.shape
    t = torch.arange(T, device=hidden.device)  # (T,)
    inside = (t[None] >= start[:, None]) & (t[None] < end[:, None])  # (n, T)
    weights = inside.to(hidden.dtype) / inside.sum(1, keepdim=True).clamp(min=1)  # (n, T)
    full = hidden.new_zeros(row.shape[0], B, T)  # (n, B, T): one row per span
    full[torch.arange(row.shape[0], device=hidden.device), row] = weights
    return full.reshape(-1, B * T) @ hidden.reshape(B * T, D)  # (n, D)


class ContrastiveHead(nn.Module):
    """Projections of pooled image and text features into one space, and the InfoNCE loss.

    Args:
        dim: D, the width of the resampler outputs and of the LLM hidden states.
        embed_dim: E, the width of the contrastive embeddings.
        init_temperature, max_logit_scale: CLIP's 0.07 and 100.
    """

    def __init__(self, dim: int, embed_dim: int, *, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0):
        super().__init__()
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)  # bias-free, as in CLIP
        self.text_proj = nn.Linear(dim, embed_dim, bias=False)
        # 1 element, not 0-dim, so that FSDP2 can shard it; older 0-dim checkpoints load unchanged
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        self._register_load_state_dict_pre_hook(one_element_params("logit_scale"))
        self.max_log_scale = math.log(max_logit_scale)

    def embed_images(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Resampler outputs (N, Q, D) → unit embeddings (N, E)."""
        pooled = image_embeds.mean(1)  # (N, D)
        return F.normalize(self.image_proj(pooled).float(), dim=-1)  # (N, E)

    def embed_texts(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mean-pooled text hidden states (n, D) → unit embeddings (n, E)."""
        return F.normalize(self.text_proj(pooled).float(), dim=-1)  # (n, E)

    def scale(self) -> torch.Tensor:
        """exp(logit scale), at most ``max_logit_scale``."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp().reshape(())

    def loss(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of n pairs of unit embeddings (n, E); pair i is image i with text i."""
        if image.shape[0] == 0:
            return image.new_zeros(()) + 0.0 * self.logit_scale.sum()  # keeps the graph (and DDP) happy
        logits = self.scale() * image @ text.T  # (n, n) image × text
        target = torch.arange(image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
