"""``previous_image``: the latest earlier image of the document joins the UNet's input channels.

Shape legend: N images, c diffusion-space channels, s latent side, S' side of a given image.

Why: MMFS (the reference path) lets the UNet read earlier images' vision features, but the tiny
UNet did not carry a flat background over from them. Given the latest earlier image (in
diffusion space) as input channels whose weights start at zero — InstructPix2Pix's way of adding
an image condition to a trained UNet — it copies it from its input. Measured (see
docs/RESULTS.md, "Carrying the background over"): background error at t = 950 with / without
the image 0.076 / 0.095 after 250 steps; together with plain v-loss, continuation background
0.34 → 1.00 and continuation joint 0.44 → 0.97 (the bundled model before and after, n 32). A
global condition through the time embedding, tried first, left the background at 0.34.

Not MMFS, though it reads earlier images too: it needs no ``model.mmfs.unet``. A row with no
earlier image gets zeros (as its input weights started). Both guidance halves see the image.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmgen.config import DecoderConfig
from mmgen.models.conditioners.base import Conditioner


class PreviousImage(Conditioner):
    """Latest earlier image (N, 3, S', S') in [-1, 1] (zeros: none) → input channels (N, c, s, s)."""

    def __init__(self, cfg: DecoderConfig, *, cross_dim: int, latent_channels: int, vocab_size: int | None):
        super().__init__(cfg, cross_dim=cross_dim, latent_channels=latent_channels, vocab_size=vocab_size)
        self.channels = latent_channels
        self._z: torch.Tensor | None = None  # (N or 2N, c, s, s) inside ImageDecoder.image_context

    def begin(self, decoder: nn.Module, *, prev_image: torch.Tensor | None, guidance_pairs: bool) -> None:
        if prev_image is not None:
            z = decoder.encode_condition(prev_image)  # (N, c, s, s), zero rows kept zero
            self._z = z.repeat(2, 1, 1, 1) if guidance_pairs else z

    def end(self) -> None:
        self._z = None

    def input(self, x: torch.Tensor) -> torch.Tensor:
        if self._z is None:  # no earlier image: zeros, as the input weights started
            return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])
        return self._z.to(x.dtype)
