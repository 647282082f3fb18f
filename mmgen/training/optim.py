"""Optimiser, learning-rate schedule and EMA (docs/DESIGN.md "The training recipe").

The parameter groups come from the model (``MMInterleaved.param_groups``): new modules train
at ``train.lr``, pretrained components and MMFS sampling offsets at ``train.lr_pretrained``,
with no weight decay on gates, offsets, norms and biases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import TrainConfig

def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups (``model.param_groups()``: lr and decay per group);
    with ``train.low_memory`` an 8-bit AdamW or Adafactor (:mod:`mmgen.training.low_memory`)."""
    groups = model.param_groups()
    if not groups:
        raise ValueError("nothing to train: every freeze group (vision, llm, sync, decoder) is frozen")
    if cfg.low_memory:
        from .low_memory import low_memory_optimizer

        optimizer, _ = low_memory_optimizer(groups, betas=cfg.betas, eps=cfg.eps)
        return optimizer
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
        # made from the prepared model: under FSDP2 each shadow is a DTensor shard like its parameter
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
        """Whole tensors (gathered from the shards under FSDP2: every rank must call this)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: _full(v) for k, v in self.shadow.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Whole tensors in; each shadow keeps its own shard under FSDP2."""
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for name, t in state["shadow"].items():
            here = self.shadow[name]
            t = t.reshape(here.shape) if t.numel() == here.numel() else t  # 0-dim gates of older runs
            if hasattr(here, "device_mesh"):  # a DTensor shard
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(here.dtype), here.device_mesh, here.placements)
            here.copy_(t)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
