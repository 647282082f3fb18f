"""The LLM families a tiny LM can be built from (``model.llm.arch``): one entry per family.

Each entry names a transformers config class and a function giving the options that family
needs beside the shared numbers of :class:`~mmgen.config.LLMConfig` (width, layers, heads,
vocabulary, positions). To add a family, add one entry; the config accepts its name and the
error for an unknown one lists it. A pretrained LM (``model.llm.pretrained``) is whatever its
folder holds and does not use this table. This module imports neither torch nor transformers
at import time (the config reads it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# name -> (transformers config class, options from the model.llm section beside the shared numbers)
LLM_FAMILIES: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    "llama": ("LlamaConfig", lambda c: {"num_key_value_heads": c.num_heads}),
    "qwen2": ("Qwen2Config", lambda c: {"num_key_value_heads": c.num_heads, "use_sliding_window": False}),
    "mistral": ("MistralConfig", lambda c: {"num_key_value_heads": c.num_heads, "sliding_window": None}),
    "gpt_neox": ("GPTNeoXConfig", lambda c: {"hidden_dropout": 0.0, "attention_dropout": 0.0}),
}


def unknown_family(name: object) -> str:
    """The one-line message for an ``arch`` that is not in :data:`LLM_FAMILIES`."""
    return f"model.llm.arch: unknown LLM family {name!r}; choose one of {', '.join(LLM_FAMILIES)}"


def tiny_llm_config(cfg: Any, vocab_size: int):
    """The transformers config of a tiny ``cfg.arch`` LM built from the ``model.llm`` numbers."""
    import transformers

    from mmgen.config import ConfigError

    if cfg.arch not in LLM_FAMILIES:
        raise ConfigError(unknown_family(cfg.arch))
    cls, options = LLM_FAMILIES[cfg.arch]
    return getattr(transformers, cls)(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **options(cfg))
