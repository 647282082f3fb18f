"""``--low-memory`` (``train.low_memory``): trade compute for memory, one switch for the whole model.

- gradient checkpointing in the LLM, the UNet and the vision tower (when they train): activations
  are recomputed in the backward pass — about a third more compute per step, much less memory;
- an 8-bit AdamW (bitsandbytes) for the trainable weights: 2 bytes of state per weight instead of
  8, on CUDA and on CPUs where bitsandbytes runs it (0.50 does; a one-step probe decides). Where it
  cannot run, torch's Adafactor (factored second moments, no first moment: a few bytes per matrix
  row and column) takes its place, said in one line;
- frozen components in bfloat16 when ``model.frozen_dtype`` is "auto" (half their memory). A run
  that computes in float32 (no ``train.mixed_precision``, as on a CPU, whose bf16 matmuls are
  slow) keeps their weights stored in bf16 and casts each layer up while it runs.
"""

from __future__ import annotations

import torch

from ..models.hf_compat import enable_activation_checkpointing
from ..models.precision import COMPUTES_IN_FLOAT32, is_quantized


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
        enable_activation_checkpointing(tower)
        done.append("vision tower")
    return done


def low_memory_optimizer(groups: list[dict], *, betas, eps: float) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' 8-bit AdamW where it runs (CUDA; CPUs with a recent bitsandbytes), else torch's
    Adafactor; returns it and a line saying which."""
    on_cuda = any(p.is_cuda for g in groups for p in g["params"]) or torch.cuda.is_available()
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    why = "bitsandbytes is not installed" if bnb is None else _adamw8bit_problem(bnb, "cuda" if on_cuda else "cpu")
    if why is None:
        return bnb.optim.AdamW8bit(groups, betas=tuple(betas), eps=eps), "8-bit AdamW (bitsandbytes)"
    return torch.optim.Adafactor(groups, lr=groups[0]["lr"]), f"Adafactor (torch; the 8-bit AdamW: {why})"


def _adamw8bit_problem(bnb, device: str) -> str | None:
    """None where bitsandbytes' 8-bit AdamW takes a step on ``device``, else why not. The probe is one
    4096-element tensor: the smallest that bitsandbytes keeps in 8 bits."""
    p = torch.nn.Parameter(torch.zeros(4096, device=device))
    p.grad = torch.ones_like(p)
    try:
        bnb.optim.AdamW8bit([p]).step()
    except Exception as e:  # an old bitsandbytes without this device's kernels, a broken install
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run it on {device} ({type(e).__name__})"
    return None


def compute_frozen_in_float32(model) -> list[str]:
    """Frozen components kept in a 16-bit dtype while the run computes in float32 (no autocast, as
    ``--low-memory`` on a CPU): their linear, convolution and embedding weights stay stored in 16 bits
    and are cast up one layer at a time while it runs (diffusers' layerwise casting); the rest
    (norms, patch and position embeddings) is small and goes to float32. Returns the components it applies to."""
    from diffusers.hooks import apply_layerwise_casting

    storage = model.frozen_dtype()
    done = []
    if storage == torch.float32:
        return done
    for name, module in model.frozen_components().items():
        if is_quantized(module):
            continue
        # diffusers' default skips (patch and position embeddings, norms): layers that read their own
        # weight's dtype to cast their input, as CLIP's patch embedding does, stay float32
        apply_layerwise_casting(module, storage_dtype=storage, compute_dtype=torch.float32)
        for sub in module.modules():
            if not hasattr(sub, "_diffusers_hook"):  # not cast layer by layer: float32 (small)
                for p in sub.parameters(recurse=False):
                    p.data = p.data.float()
                for key, b in sub.named_buffers(recurse=False):
                    if b.is_floating_point():
                        setattr(sub, key, b.float())
        setattr(module, COMPUTES_IN_FLOAT32, True)
        done.append(name)
    return done
