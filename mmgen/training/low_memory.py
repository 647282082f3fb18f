"""``--low-memory`` (``train.low_memory``): trade compute for memory, one switch for the whole model.

- gradient checkpointing in the LLM, the UNet and the vision tower (when they train): activations
  are recomputed in the backward pass — about a third more compute per step, much less memory;
- an 8-bit AdamW (bitsandbytes, CUDA) for the trainable weights: 2 bytes of state per weight
  instead of 8. Without bitsandbytes or CUDA, torch's Adafactor (factored second moments, no
  first moment: a few bytes per matrix row and column) takes its place, said in one line;
- frozen components in bfloat16 when ``model.frozen_dtype`` is "auto" (half their memory; on a
  CPU without fast bf16 kernels they run slower).
"""

from __future__ import annotations

import torch


def enable_checkpointing(model) -> list[str]:
    """Gradient checkpointing in the LLM, the UNet and (if it trains) the vision tower. Returns what."""
    done = []
    model.llm.enable_gradient_checkpointing()
    done.append("LLM")
    unet = model.decoder.unet
    if any(p.requires_grad for p in unet.parameters()) and getattr(unet, "_supports_gradient_checkpointing", True):
        unet.enable_gradient_checkpointing()
        done.append("UNet")
    tower = model.vision.tower
    if any(p.requires_grad for p in tower.parameters()):
        tower.activation_checkpointing_enable({"use_reentrant": False})
        done.append("vision tower")
    return done


def low_memory_optimizer(groups: list[dict], *, betas, eps: float) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' 8-bit AdamW on CUDA, else torch's Adafactor; returns it and a line saying which."""
    on_cuda = any(p.is_cuda for g in groups for p in g["params"]) or torch.cuda.is_available()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is not None and on_cuda:
        return bnb.optim.AdamW8bit(groups, betas=tuple(betas), eps=eps), "8-bit AdamW (bitsandbytes)"
    why = "bitsandbytes is not installed" if bnb is None else "there is no CUDA device"
    return (torch.optim.Adafactor(groups, lr=groups[0]["lr"]),
            f"Adafactor (torch; the 8-bit AdamW needs bitsandbytes on CUDA, and {why})")
