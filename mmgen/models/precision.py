"""The dtype a component computes in, which is not always the dtype it is stored in."""

from __future__ import annotations

import torch

# set on a component whose 16-bit layers are cast up to float32 one at a time while they run
# (mmgen.training.low_memory.compute_frozen_in_float32)
COMPUTES_IN_FLOAT32 = "_mmgen_computes_in_float32"


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype to hand ``module`` its inputs in: float32 for a component stored in 16 bits and
    computed in float32, else the dtype of its parameters."""
    if getattr(module, COMPUTES_IN_FLOAT32, False):
        return torch.float32
    return next(module.parameters()).dtype


def is_quantized(module: torch.nn.Module) -> bool:
    """A Hugging Face model read in 8 or 4 bits (``model.llm.quantize``): it is never cast whole."""
    return getattr(module, "hf_quantizer", None) is not None
