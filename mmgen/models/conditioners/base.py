"""What a decoder conditioner is: one input of the image decoder beside the reference path.

Shape legend: N images, T context tokens, X cross-attention width, c diffusion-space channels,
s latent side, S' side of a given image.

A conditioner acts in one or both of two places (docs/DESIGN.md §6):

- the context: :meth:`Conditioner.context` gives a term (N, T, X) that the per-token context
  encoder (``model.decoder.context_encoder: tokens``) adds to each projected context token;
- the UNet's input: ``channels`` more input channels after the latents, filled by
  :meth:`Conditioner.input`. Those of a ``built_in`` conditioner are part of a UNet built from the
  config (initialised as the rest of it); the others widen any UNet's input convolution with
  weights that start at zero, so adding one leaves the UNet's output unchanged until it is trained.
  The UNet input is: the latents, the built-in conditioners' channels, then the others', each
  group in the order the config lists them.

Inputs that change per call (the previous image) are handed over by :meth:`Conditioner.begin`
inside ``ImageDecoder.image_context`` and dropped by :meth:`Conditioner.end`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mmgen.config import DecoderConfig


class Conditioner(nn.Module):
    """Base class: no context term, no input channels. See the module docstring."""

    built_in: ClassVar[bool] = False  # its channels are part of a UNet built from the config
    channels: int = 0  # UNet input channels it adds (a class attribute for built-in ones)

    def __init__(self, cfg: DecoderConfig, *, cross_dim: int, latent_channels: int, vocab_size: int | None):
        super().__init__()

    def context(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """Token ids (N, T) of the context → a term (N, T, X) added to each projected token, or None."""
        return None

    def begin(self, decoder: nn.Module, *, prev_image: torch.Tensor | None, guidance_pairs: bool) -> None:
        """Take this call's inputs (``ImageDecoder.image_context``)."""

    def end(self) -> None:
        """Drop them."""

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet input (N, c, s, s) → this conditioner's channels (N, channels, s, s)."""
        raise NotImplementedError(f"{type(self).__name__} adds no input channels")
