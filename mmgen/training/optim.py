"""Optimiser, learning-rate schedule and EMA (DESIGN.md "Training facts").

Parameter groups: new modules train at ``train.lr``; the pretrained UNet and the MMFS sampling
offsets at ``train.lr_pretrained``; gates, sampling offsets, norms, biases and learned
embeddings/queries carry no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import TrainConfig

_NO_DECAY_WORDS = ("gate", "sampling_offsets", "norm", "bias", "null_context", "embed", "queries",
                   "position", "time_embedding")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that should not be decayed (1-D tensors, gates, offsets, embeddings)."""
    lowered = name.lower()
    return param.ndim < 2 or any(w in lowered for w in _NO_DECAY_WORDS)


def slow_lr(name: str, *, pretrained_unet: bool) -> bool:
    """True for parameters trained at the lower ``lr_pretrained``."""
    return "sampling_offsets" in name or (pretrained_unet and ".unet." in f".{name}")


def param_groups(model: nn.Module, cfg: TrainConfig, *, pretrained_unet: bool = False) -> list[dict]:
    """Split the trainable parameters into (lr, weight-decay) groups, each named for logging."""
    groups: dict[tuple[bool, bool], list[torch.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (slow_lr(name, pretrained_unet=pretrained_unet), no_weight_decay(name, p))
        groups.setdefault(key, []).append(p)
    out = []
    for (slow, no_decay), params in sorted(groups.items()):
        out.append({
            "name": f"{'slow' if slow else 'new'}{'-no_decay' if no_decay else ''}",
            "params": params,
            "lr": cfg.lr_pretrained if slow else cfg.lr,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        })
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, pretrained_unet: bool = False) -> torch.optim.AdamW:
    groups = param_groups(model, cfg, pretrained_unet=pretrained_unet)
    if not groups:
        raise ValueError("nothing to train: every parameter group is frozen")
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.lr_min_ratio),
    )


class EMA:
    """Bias-corrected exponential moving average of the trainable weights (used for sampling).

    The effective decay at update n is ``min(decay, (1 + n) / (10 + n))``, so early averages are
    not dominated by the random initialisation.
    """

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]], decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in params}

    @torch.no_grad()
    def update(self, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in params:
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)
