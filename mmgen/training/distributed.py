"""Which engine a run really gets (DDP, FSDP2, DeepSpeed), and whole-model state under sharding.

Accelerate picks the engine from how the processes were launched. Two traps are closed here:

- accelerate starts several CPU processes only through ``mpirun``; ``torchrun`` (what
  ``accelerate launch`` uses for ``configs/accelerate/ddp_cpu.yaml``) gives processes that
  accelerate leaves as independent rank-0 copies unless it is told to use the CPU. On a machine
  without an accelerator, :func:`accelerator_kwargs` tells it so, and they join one gloo group;
- FSDP and DeepSpeed are turned on only for accelerators: asked for where they cannot run, a run
  stops with one line (:func:`check_engine`) instead of training unsharded copies that all write
  the same run folder.

Under FSDP2 the parameters are DTensor shards; :func:`full_model_state` and
:func:`full_optimizer_state` gather whole tensors (every rank must call them, rank 0 receives),
:func:`load_full_model_state` and :func:`load_full_optimizer_state` scatter them back, all through
``torch.distributed.checkpoint.state_dict``. :func:`shard` is what accelerate's FSDP2 preparation
does (``fully_shard`` on every auto-wrapped layer, then on the root); tests drive it on CPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn


class EngineError(RuntimeError):
    """The launch asks for an engine that cannot run here."""


def has_accelerator() -> bool:
    """Whether torch sees a CUDA/XPU/MPS/… device."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator_kwargs() -> dict:
    """Extra ``Accelerator`` arguments: CPU (gloo) when several processes run on a machine without
    an accelerator, so they form one process group instead of independent copies."""
    return {"cpu": True} if launched_processes() > 1 and not has_accelerator() else {}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def check_engine(accelerator) -> str:
    """The engine of this run ("single", "ddp", "fsdp2", "fsdp1", "deepspeed"); raises
    :class:`EngineError` when the launch asked for one that did not start."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    where = "a CPU" if accelerator.device.type == "cpu" else f"device {accelerator.device}"
    for flag, engine, wanted in (("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
                                 ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED)):
        if _flag(flag) and kind != wanted:
            raise EngineError(f"the launch config asks for {engine}, which accelerate runs only on GPUs (and other "
                              f"accelerators), not on {where}: the {launched_processes()} process(es) would train "
                              "unsharded copies; use configs/accelerate/ddp_cpu.yaml here, or launch on GPUs")
    if launched_processes() > accelerator.num_processes:
        raise EngineError(f"{launched_processes()} processes were launched but accelerate joined "
                          f"{accelerator.num_processes} ({kind.value}); they would train separate copies — "
                          "check the launch config (distributed_type, use_cpu)")
    if kind == DistributedType.FSDP:
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def wrap_class_names(model: nn.Module) -> list[str]:
    """The layer classes FSDP wraps one by one: the LLM's decoder layer as the model really has it
    (with MMFS added through hooks the class is unchanged, e.g. ``Qwen2DecoderLayer``), the vision
    tower's encoder layer. MMFS, resampler and decoder stay in the root unit."""
    from mmgen.models.llm import decoder_layers

    names = [type(decoder_layers(model.llm.lm)[0]).__name__]
    tower = model.vision.tower
    n = tower.config.num_hidden_layers
    for module in tower.modules():  # the encoder's list of layers
        if isinstance(module, nn.ModuleList) and len(module) == n:
            names.append(type(module[0]).__name__)
            break
    return names


def configure_fsdp(accelerator, model: nn.Module) -> list[str]:
    """Point accelerate's FSDP auto-wrap policy at :func:`wrap_class_names` (the shipped YAML names
    ``LlamaDecoderLayer``, wrong for a Qwen2 or GPT-NeoX LLM). Returns the names."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    names = wrap_class_names(model)
    plugin = accelerator.state.fsdp_plugin
    plugin.auto_wrap_policy = transformer_auto_wrap_policy  # set_auto_wrap_policy(model) binds the names
    plugin.transformer_cls_names_to_wrap = names
    return names


def shard(model: nn.Module, class_names: list[str], **kwargs) -> nn.Module:
    """FSDP2 as accelerate prepares it: ``fully_shard`` every module of ``class_names``, bottom up,
    then the root. ``kwargs`` go to ``fully_shard`` (mesh, reshard_after_forward, mp_policy)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for module in reversed(list(model.modules())):
        if module is not model and type(module).__name__ in class_names and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Whole tensors of ``model`` on the CPU (rank 0 gets them; every rank must call this)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not is_sharded(model):
        state = model.state_dict()
    else:
        state = get_model_state_dict(model, options=_options())
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return state


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True):
    """Load whole tensors into a (possibly sharded) model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not is_sharded(model):
        return model.load_state_dict(state, strict=strict)
    return set_model_state_dict(model, state, options=_options(strict=strict))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer state with whole tensors (keyed by parameter name under sharding)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    # strict=False: parameters that never had a gradient (e.g. CLIP's unused pooler norm) have no state
    set_optimizer_state_dict(model, optimizer, state, options=_options(strict=False))


def local_numel(model: nn.Module) -> int:
    """Parameter elements held by this rank (a shard's under FSDP)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
