"""The names that differ between the transformers 5.x releases we support (``transformers>=5.17,<6``;
``make test-oldest`` runs the tests on 5.17): one function per seam, so the code that calls a model
reads the same on each."""

from __future__ import annotations

import inspect

from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of a Hugging Face model's layers: ``activation_checkpointing_enable``
    in recent 5.x (where ``gradient_checkpointing_enable`` is its deprecated alias), the older name
    before it existed (5.17, as GPU images ship)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)


def kv_cache_argument(model: nn.Module) -> str:
    """The name ``forward`` takes the KV cache under: ``cache`` in recent 5.x (``past_key_values`` is
    deprecated there, gone in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
