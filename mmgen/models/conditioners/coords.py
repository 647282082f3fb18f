"""``coords``: x and y coordinate channels in [-1, 1] join the UNet's input.

Shape legend: N images, c diffusion-space channels, s latent side.

Why: position was the slowest attribute for the tiny pixel-space UNet to learn, and a
convolution's input says nothing about where it is beyond the padding at the borders; two
constant coordinate maps tell every pixel where it is (CoordConv). It came with the first tiny
recipe and was never ablated on its own: docs/RESULTS.md records no measurement of it (every
recorded run has it; position reached 1.00 once the loss was plain v-loss: docs/RESULTS.md,
"Carrying the background over").

Its two channels are built into a UNet made from the config (initialised as the rest of it),
so it needs ``model.decoder.pretrained`` unset.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mmgen.models.conditioners.base import Conditioner


class Coords(Conditioner):
    """UNet input (N, c, s, s) → its x/y coordinates (N, 2, s, s), pixel centres in [-1, 1]."""

    built_in: ClassVar[bool] = True
    channels = 2

    def input(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        ys = torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)  # (2, s, s)
        return grid.unsqueeze(0).expand(N, -1, -1, -1)  # (N, 2, s, s)
