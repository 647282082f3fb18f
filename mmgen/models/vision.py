"""Vision encoder: a Hugging Face CLIP vision tower yielding tokens and multi-scale maps.

Shape legend: N images, S input size, G patch grid side, C tower width, L feature levels.

The tower is a local ``CLIPVisionModel`` folder (real configs) or a tiny random one built
from :class:`~mmgen.config.VisionConfig` (default). Its output feeds two consumers:
the resampler reads the token sequence of the last layer, the synchronizers (MMFS) read
feature maps taken from ``feature_layers`` and resized by ``feature_scales`` (docs/DESIGN.md §1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmgen.config import VisionConfig

from .precision import compute_dtype

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_vision_tower(cfg: VisionConfig) -> CLIPVisionModel:
    """A CLIP vision tower from a local folder (``cfg.pretrained``) or from ``cfg``'s numbers."""
    if cfg.pretrained is not None:
        folder = Path(cfg.pretrained)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.vision.pretrained: {folder} is not a local Hugging Face model folder "
                "(no config.json); download it once with `hf download` and point the config at it")
        return _load_quietly(CLIPVisionModel, folder)
    config = CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, projection_dim=cfg.hidden_size)
    return CLIPVisionModel(config)


def _load_quietly(cls, folder: Path):
    """``cls.from_pretrained(folder)`` with one log line instead of transformers' load-report table.

    A full CLIPModel folder holds a text tower too: its weights are skipped and counted. A
    weight the vision tower needs but the folder lacks is an error, not a random initialisation.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                          output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    missing = list(info["missing_keys"]) + [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} weight(s) of the {cls.__name__} are missing or of another "
                         f"shape (first: {sorted(missing)[0]})")
    unused = sorted(info["unexpected_keys"])
    if unused:
        groups = sorted({k.split(".")[0] for k in unused})
        log.info("%s: loaded the %s; skipped %d weight(s) it does not use (%s)", folder, cls.__name__,
                 len(unused), ", ".join(groups))
    return model


def _normalisation(folder: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std from the folder's ``preprocessor_config.json`` if present, else CLIP's."""
    if folder is not None:
        path = Path(folder) / "preprocessor_config.json"
        if path.is_file():
            pre = json.loads(path.read_text(encoding="utf-8"))
            if "image_mean" in pre and "image_std" in pre:
                return tuple(pre["image_mean"]), tuple(pre["image_std"])
    return CLIP_MEAN, CLIP_STD


class VisionEncoder(nn.Module):
    """Images in [-1, 1] → (tokens (N, 1+G², C), maps [(N, C, H_l, W_l)] for l in levels)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = build_vision_tower(cfg)
        tc = self.tower.config
        self.image_size = tc.image_size
        self.grid = tc.image_size // tc.patch_size  # G
        n_layers = tc.num_hidden_layers
        # hidden_states has n_layers + 1 entries (embeddings first); -1 is the last layer
        self.feature_layers = [l if l >= 0 else n_layers + 1 + l for l in cfg.feature_layers]
        if not all(0 <= l <= n_layers for l in self.feature_layers):
            raise ValueError(f"model.vision.feature_layers {cfg.feature_layers} out of range for a "
                             f"tower with {n_layers} layers")
        self.feature_scales = list(cfg.feature_scales)
        if len(self.feature_layers) == 1:  # one layer feeds every scale
            self.feature_layers = self.feature_layers * len(self.feature_scales)
        if len(self.feature_layers) != len(self.feature_scales):
            raise ValueError("model.vision.feature_layers must name one layer, or one per entry of "
                             f"model.vision.feature_scales; got {cfg.feature_layers} for "
                             f"{cfg.feature_scales}")
        mean, std = _normalisation(cfg.pretrained)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.tower.config.hidden_size  # C

    @property
    def num_levels(self) -> int:
        return len(self.feature_scales)

    def map_sizes(self) -> list[int]:
        """Side of each feature map (square), in level order."""
        return [max(1, round(self.grid * s)) for s in self.feature_scales]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Args: images (N, 3, S, S) in [-1, 1]. Returns: tokens (N, 1+G², C), maps per level."""
        x = (images + 1.0) / 2.0  # (N, 3, S, S) in [0, 1]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False).clamp(0.0, 1.0)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = x.to(compute_dtype(self.tower))
        out = self.tower(pixel_values=x, output_hidden_states=True)
        tokens = out.last_hidden_state  # (N, 1+G², C)
        N, G, C = tokens.shape[0], self.grid, tokens.shape[-1]
        maps = []
        for layer, side in zip(self.feature_layers, self.map_sizes()):
            grid = out.hidden_states[layer][:, 1:]  # (N, G², C), without the class token
            grid = grid.transpose(1, 2).reshape(N, C, G, G)  # (N, C, G, G)
            if side == G:
                maps.append(grid)
            else:
                maps.append(F.interpolate(grid, size=(side, side), mode="bilinear",
                                          align_corners=False))  # (N, C, side, side)
        return tokens, maps
