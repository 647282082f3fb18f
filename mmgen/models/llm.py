"""The causal LM and its MMFS layers (docs/DESIGN.md §4).

``build_llm`` makes a Hugging Face causal LM (a local folder, or a tiny one built from
``LLMConfig``); ``MMFSLanguageModel`` wraps any such decoder-only LM and adds an MMFS branch
between self-attention and MLP of every k-th decoder layer:

    h   = x + attn(ln1(x))
    h   = h + tanh(g) · MMFS(h)        # g = 0 at init: the plain LLM, exactly
    out = h + mlp(ln2(h))

The branch is added through public forward hooks (a pre-hook on the decoder layer keeps its
input x, a hook on its self-attention adds the branch to the attention output), so the LM's own
modules and state-dict keys are untouched: a plain HF checkpoint loads into ``wrapper.lm``
with ``strict=True``. The MMFS modules live in ``wrapper.mmfs`` (keys = decoder-layer index).

The image context travels with the call as a keyword argument (``mmfs_context``) that HF
models pass down to every decoder layer and attention module; the hooks read it from there.
This keeps the context correct when a checkpointed layer is recomputed in the backward pass.

Shapes: B batch, T query tokens, S key tokens (past + T), D LM width, M image slots, V vocab.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mmgen.config import ConfigError, LLMConfig, MMFSConfig
from mmgen.models.hf_compat import enable_activation_checkpointing, kv_cache_argument
from mmgen.models.llm_families import tiny_llm_config

log = logging.getLogger(__name__)

_CTX_KW = "mmfs_context"  # keyword argument that carries the image context through the LM
_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers", "transformer.h")


# ---------------------------------------------------------------------------------------------
# building the LM


def build_llm(cfg: LLMConfig, vocab_size: int, *, dtype: torch.dtype = torch.float32,
              attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A HF causal LM: ``cfg.pretrained`` (a local folder) or a tiny ``cfg.arch`` from the numbers.

    Args:
        cfg: the ``model.llm`` section.
        vocab_size: tokenizer size; a pretrained LM with fewer embeddings is resized to it.
        dtype: parameter dtype (fp32 by default; use autocast for mixed precision).
        attn_implementation: "sdpa" or "eager" (both accept the packed 4D masks of ``forward``).
    """
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ConfigError(f"model.llm.pretrained: `{path}` {what}; it must be a local folder "
                              "saved with `save_pretrained` (config.json + safetensors weights)")
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, use_safetensors=True, dtype=dtype,
                attn_implementation=attn_implementation, **quantized(cfg.quantize, dtype))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model.llm.pretrained: cannot load a causal LM from `{path}`: {e}") from None
        n_embed = lm.get_input_embeddings().num_embeddings
        if vocab_size > n_embed:
            log.info("resizing token embeddings of %s from %d to %d", path, n_embed, vocab_size)
            lm.resize_token_embeddings(vocab_size, mean_resizing=False)
        return lm

    hf_cfg = tiny_llm_config(cfg, vocab_size)  # the families: mmgen/models/llm_families.py
    hf_cfg._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)


def quantized(how: str, dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments that read the LLM in 8 or 4 bits (bitsandbytes), computing in
    ``dtype``; none for "none". The embeddings and the output head stay unquantized."""
    if how == "none":
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.llm.quantize={how} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_8bit=True) if how == "8bit" else \
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": q, "device_map": {"": "cpu"}}  # quantized on the CPU; moved with the model


def mmfs_layer_indices(num_layers: int, every_k: int, text_only_layers: int = 0) -> list[int]:
    """Decoder layers (0-based) that get an MMFS branch: every k-th layer above the text-only ones.

    >>> mmfs_layer_indices(8, 4)        # layers 4 and 8 in 1-based counting
    [3, 7]
    >>> mmfs_layer_indices(8, 2, text_only_layers=4)
    [5, 7]
    """
    return [i for i in range(text_only_layers, num_layers) if (i - text_only_layers + 1) % every_k == 0]


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a HF decoder-only LM (``model.layers``, ``gpt_neox.layers``, …)."""
    roots = []
    if hasattr(lm, "get_decoder"):
        try:
            roots.append(lm.get_decoder())
        except (AttributeError, NotImplementedError):
            pass
    roots += [getattr(lm, "base_model", lm), lm]
    n = getattr(getattr(lm, "config", None), "num_hidden_layers", None)
    for root in roots:
        for path in _LAYER_PATHS:
            mod = functools.reduce(lambda m, a: getattr(m, a, None), path.split("."), root)
            if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
                return mod
    for mod in lm.modules():  # last resort: the first module list with one entry per layer
        if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n:
            return mod
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")


def self_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of one decoder layer (``self_attn``, ``attention``, …)."""
    for name in _ATTN_NAMES:
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            return mod
    found = [m for _, m in layer.named_children() if "attention" in type(m).__name__.lower()]
    if len(found) == 1:
        return found[0]
    raise ValueError(f"cannot find the self-attention module of {type(layer).__name__}")


# ---------------------------------------------------------------------------------------------
# masks and positions


def packed_causal_mask(segment_ids: Tensor, q_len: int, *, sliding_window: int | None = None) -> Tensor:
    """Block-diagonal causal mask of packed documents; True = may attend.

    Args:
        segment_ids: (B, S) document index of every token, past and new; -1 = padding.
            Each document must be contiguous in its row.
        q_len: number of new (query) tokens: the last ``q_len`` of the row.
    Returns:
        (B, 1, q_len, S) bool. A padding token sees only itself (no empty softmax rows).
    """
    S = segment_ids.shape[1]
    k = torch.arange(S, device=segment_ids.device)  # (S,)
    q = k[S - q_len:]  # (T,)
    allowed = k[None, :] <= q[:, None]  # (T, S) causal
    if sliding_window is not None:
        allowed = allowed & (q[:, None] - k[None, :] < sliding_window)
    seg_q = segment_ids[:, S - q_len:]  # (B, T)
    same = (seg_q[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] >= 0)  # (B, T, S)
    allowed = (allowed[None] & same) | (q[:, None] == k[None, :])[None]  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


def packed_position_ids(segment_ids: Tensor) -> Tensor:
    """(B, S) segment ids -> (B, S) positions that restart at 0 at the start of every document."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)  # (B, S)
    new_doc = torch.ones_like(segment_ids, dtype=torch.bool)
    new_doc[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.cummax(torch.where(new_doc, idx, torch.zeros_like(idx)), dim=1).values  # (B, S)
    return idx - start


def _uniform_sliding_window(config: Any) -> int | None:
    """The sliding window to apply to a packed mask: only when every layer slides."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is None or all(t == "sliding_attention" for t in types):
        return int(window)
    if any(t == "sliding_attention" for t in types):
        log.warning("packed masks ignore the sliding window of the mixed sliding/full layers of this LM")
    return None


# ---------------------------------------------------------------------------------------------
# the wrapper


@dataclass
class _ImageContext:
    """Image context of one forward call, handed to the hooks through the LM's kwargs."""

    values: dict[str, Any]  # per MMFS layer: GatedMMFS.prepare_values(features)
    visible: Tensor  # (B, T, M) bool: which image slots each new token may see
    sees_any: Tensor  # (B, T, 1) bool: the token sees at least one image
    inputs: dict[int, Tensor] = field(default_factory=dict)  # decoder-layer inputs x, (B, T, D)
    ran: set[int] = field(default_factory=set)  # layers whose branch ran (a sanity check)


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V), or the last `logits_to_keep` positions
    last_hidden_state: Tensor  # (B, T, D) after the LM's final norm
    cache: Any = None  # the updated KV cache when use_cache
    hidden_states: tuple[Tensor, ...] = ()  # [0] embeddings, [i] output of decoder layer i-1 (B, T, D)


def _capture_layer_input(idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    ctx = kwargs.get(_CTX_KW)
    if ctx is not None:
        ctx.inputs[idx] = args[0] if args else kwargs["hidden_states"]  # (B, T, D)


def _add_mmfs_branch(idx: int, branch: nn.Module, module: nn.Module, args: tuple, kwargs: dict,
                     output: Any) -> Any:
    ctx = kwargs.get(_CTX_KW)
    if ctx is None:
        return None  # no images in this call: the plain LM
    attn_out = output[0] if isinstance(output, tuple) else output  # (B, T, D)
    h = ctx.inputs[idx] + attn_out  # (B, T, D) the residual stream after attention
    delta = branch(h, ctx.values[str(idx)], ctx.visible)  # (B, T, D) = tanh(g)·MMFS(h)
    attn_out = attn_out + torch.where(ctx.sees_any, delta, torch.zeros_like(delta))  # text-only tokens: exact
    ctx.ran.add(idx)
    return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out


class MMFSLanguageModel(nn.Module):
    """Any HF causal LM with MMFS branches in every k-th decoder layer.

    Args:
        lm: a HF decoder-only causal LM (e.g. from :func:`build_llm`).
        mmfs_cfg: the ``model.mmfs`` section (``every_k``, heads, points, width, max_images).
        value_dim: channel width of the image features given to MMFS.
        num_levels: number of feature-map scales per image.
        text_only_layers: CosMo: the lower layers get no MMFS.
        gradient_checkpointing: checkpoint every decoder layer (MMFS branch included).
        mmfs_factory: builds one branch; defaults to :class:`mmgen.models.mmfs.GatedMMFS`.
    """

    def __init__(self, lm: PreTrainedModel, mmfs_cfg: MMFSConfig, *, value_dim: int, num_levels: int,
                 text_only_layers: int = 0, gradient_checkpointing: bool = False,
                 mmfs_factory: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.lm = lm
        layers = decoder_layers(lm)
        ids = mmfs_layer_indices(len(layers), mmfs_cfg.every_k, text_only_layers) if mmfs_cfg.llm else []
        if mmfs_cfg.llm and not ids:
            raise ConfigError(f"model.mmfs.every_k={mmfs_cfg.every_k} places no MMFS layer in the "
                              f"{len(layers) - text_only_layers} LLM layers above model.llm.text_only_layers")
        if mmfs_factory is None:
            from mmgen.models.mmfs import GatedMMFS as mmfs_factory
        width = lm.get_input_embeddings().embedding_dim
        self.mmfs = nn.ModuleDict({
            str(i): mmfs_factory(width, value_dim, hidden_size=mmfs_cfg.hidden_size, num_heads=mmfs_cfg.num_heads,
                                 num_points=mmfs_cfg.num_points, num_levels=num_levels,
                                 max_images=mmfs_cfg.max_images)
            for i in ids})
        self.mmfs_layers = ids
        self._cache_arg = kv_cache_argument(lm)
        for i in ids:
            layers[i].register_forward_pre_hook(functools.partial(_capture_layer_input, i), with_kwargs=True)
            self_attention(layers[i]).register_forward_hook(
                functools.partial(_add_mmfs_branch, i, self.mmfs[str(i)]), with_kwargs=True)
        if gradient_checkpointing:
            self.enable_gradient_checkpointing()

    @property
    def config(self):
        return self.lm.config

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer (and its MMFS branch) in the backward pass; training mode only.

        Non-reentrant checkpointing is required: the recomputed layer reuses the layer input kept
        by the pre-hook, which is the same tensor only in non-reentrant mode.
        """
        if not getattr(self.lm, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.lm).__name__} does not support gradient checkpointing")
        enable_activation_checkpointing(self.lm)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D) input embeddings (replace placeholders, then call forward)."""
        return self.lm.get_input_embeddings()(ids)

    def prepare_image_values(self, features: list[Tensor]) -> dict[str, Any]:
        """Per-layer MMFS values of ``features[l]`` (B, M, value_dim, H_l, W_l); reuse across decode steps."""
        return {k: m.prepare_values(features) for k, m in self.mmfs.items()}

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None, *,
                attention_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                position_ids: Tensor | None = None, image_features: list[Tensor] | None = None,
                image_values: dict[str, Any] | None = None, visible: Tensor | None = None,
                cache: Any = None, use_cache: bool = False, logits_to_keep: int = 0) -> LMOutput:
        """Run the LM on new tokens, with image context for the MMFS layers.

        Args:
            input_ids / inputs_embeds: (B, T) ids or (B, T, D) embeddings of the new tokens.
            attention_mask: (B, S) 1 = token, 0 = padding (unpacked rows; S = past + T).
            segment_ids: (B, S) document index per token, -1 = padding: packed rows. Tokens attend
                only within their document; positions restart per document unless given.
            position_ids: (B, T); by default from ``segment_ids``, else from ``attention_mask``.
            image_features: multi-scale maps, ``[l]`` (B, M, value_dim, H_l, W_l); or
            image_values: the same already passed through :meth:`prepare_image_values`.
            visible: (B, T, M) bool, which image slots each new token may see.
            cache: a ``DynamicCache`` holding the earlier tokens (with ``use_cache``).
            logits_to_keep: if > 0, logits only for the last this many tokens.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and segment_ids is not None:
            raise ValueError("pass attention_mask (unpacked rows) or segment_ids (packed rows), not both")
        if image_features is not None and image_values is not None:
            raise ValueError("pass image_features or image_values, not both")
        ref = input_ids if input_ids is not None else inputs_embeds
        B, T = ref.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0

        mask = attention_mask
        if segment_ids is not None:
            if segment_ids.shape != (B, past + T):
                raise ValueError(f"segment_ids must be (B, past + T) = {(B, past + T)}, got {tuple(segment_ids.shape)}")
            mask = self._packed_mask(segment_ids, T, inputs_embeds.dtype if inputs_embeds is not None
                                     else self.lm.get_input_embeddings().weight.dtype)
            if position_ids is None:
                position_ids = packed_position_ids(segment_ids)[:, past:]  # (B, T)
        elif attention_mask is not None and position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T) left padding

        extra = {}
        has_images = image_features is not None or image_values is not None
        if has_images and self.mmfs:
            if visible is None or visible.shape[:2] != (B, T):
                raise ValueError(f"visible must be (B, T, M) with (B, T) = {(B, T)}")
            if image_values is None:
                image_values = self.prepare_image_values(image_features)
            visible = visible.bool()
            extra[_CTX_KW] = ctx = _ImageContext(image_values, visible, visible.any(-1, keepdim=True))

        out = self.lm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                      position_ids=position_ids, use_cache=use_cache, output_hidden_states=True,
                      logits_to_keep=logits_to_keep, **{self._cache_arg: cache}, **extra)
        if extra and ctx.ran != set(self.mmfs_layers):
            raise RuntimeError(f"{type(self.lm).__name__} did not pass keyword arguments down to its attention "
                               "modules, so its MMFS layers cannot see the images")
        return LMOutput(logits=out.logits, last_hidden_state=out.hidden_states[-1],
                        cache=getattr(out, self._cache_arg) if use_cache else None,
                        hidden_states=tuple(out.hidden_states))

    def _packed_mask(self, segment_ids: Tensor, q_len: int, dtype: torch.dtype) -> Tensor:
        """The 4D mask in the form the LM's attention takes as-is: bool for sdpa, additive for eager."""
        impl = self.lm.config._attn_implementation
        allowed = packed_causal_mask(segment_ids, q_len, sliding_window=_uniform_sliding_window(self.lm.config))
        if impl == "sdpa":
            return allowed  # (B, 1, T, S) bool, True = attend
        if impl == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)  # (B, 1, T, S) additive
        raise ValueError(f"packed sequences need attn_implementation 'sdpa' or 'eager', not {impl!r}")
