"""``mmgen generate --low-memory`` on an accelerator: the big components wait in CPU memory and
each one moves to the device only while it runs (accelerate's ``cpu_offload_with_hook``).

The big components are the vision tower, the LLM, the UNet and the VAE; the small ones (resampler,
MMFS, conditioners, context encoder, heads) stay on the device. Before a big component runs, the
other big components go back to the CPU, so device memory holds one of them at a time plus the
small ones, at the price of copying each component over the bus whenever generation switches
between reading, writing and drawing (once per image, not per token or per denoising step).
A quantized LLM (bitsandbytes) cannot move and stays on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from .precision import is_quantized


def movable_components(model) -> dict[str, nn.Module]:
    """The model's big components that can move, by name (a quantized LLM cannot)."""
    return {name: m for name, m in model.big_components().items() if not is_quantized(m)}


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` runs: its offload hook's device when it has one, else that of its parameters."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


def offload_components(model, device: str | torch.device) -> list[str]:
    """Put ``model``'s small components on ``device`` and its big ones on the CPU, each moved to
    ``device`` when it is called (the LLM also when its input embedding is, which the model calls
    on its own to interleave images); returns the names of the big components."""
    from accelerate import cpu_offload_with_hook

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # as parameters report it, so the hooks see it is there
        device = torch.device("cuda", torch.cuda.current_device())
    parts = movable_components(model)
    for module in parts.values():
        module.to("cpu")
    _to_except(model, device, set(map(id, parts.values())))  # the small ones
    hooks = {name: cpu_offload_with_hook(module, execution_device=device)[1] for name, module in parts.items()}

    def swap_in(name: str):
        others = [h for n, h in hooks.items() if n != name]

        def pre_hook(module, args):
            for h in others:
                if next(h.model.parameters()).device.type != "cpu":
                    h.offload()
            if name == "LLM" and module is not parts["LLM"]:  # the embedding, called on its own
                hooks["LLM"].hook.pre_forward(parts["LLM"])
        return pre_hook

    for name, module in parts.items():
        module.register_forward_pre_hook(swap_in(name))
    if "LLM" in parts:
        parts["LLM"].get_input_embeddings().register_forward_pre_hook(swap_in("LLM"))
    return list(parts)


def _to_except(module: nn.Module, device: torch.device, skip: set[int]) -> None:
    """``module.to(device)`` for every parameter and buffer outside the modules whose ids are in ``skip``."""
    if id(module) in skip:
        return
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for key, b in module.named_buffers(recurse=False):
        setattr(module, key, b.to(device))
    for child in module.children():
        _to_except(child, device, skip)
