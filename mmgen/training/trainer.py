"""The training loop: Accelerate (one CPU, several GPUs, DDP/FSDP/DeepSpeed), exact resume.

One step = ``train.grad_accum`` micro-batches of ``train.batch_size`` packed rows each. Every
micro-batch's documents and random numbers (noise, timesteps, guidance dropout) are a pure
function of (seed, step, micro-step, rank), so 4 straight steps and 2 + resume + 2 give the
same losses and weights.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..oom import is_oom
from .checkpoint import CheckpointError, load_trainer_state, remove_partial, resolve_resume, save_checkpoint
from .loader import BatchLoader
from .loop import Loop, StepOutput, TrainingError, out_of_memory, trim_metrics
from .distributed import (EngineError, accelerator_kwargs, check_engine, configure_fsdp, full_model_state,
                          full_optimizer_state, is_sharded, load_full_optimizer_state)
from .low_memory import compute_frozen_in_float32, enable_checkpointing
from .optim import EMA, build_optimizer, build_scheduler
from .plot import plot_losses, read_metrics


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    interrupted: bool = False
    main: bool = True  # the main process of the run (the one that reports)
    engine: str = "single"  # "single", "ddp", "fsdp2", "fsdp1" or "deepspeed"
    world_size: int = 1


def _seed_everything(seed: int, step: int, micro: int, rank: int) -> None:
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + micro * 17 + rank) % (2**63))


def train(cfg: Config, *, resume: str | None = None, max_steps: int | None = None,
          show_progress: bool = True) -> TrainResult:
    """Train ``cfg`` into ``cfg.train.out_dir``; ``max_steps`` stops early (the schedule keeps
    ``train.steps``). Returns where it stopped."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from ..data.tokenizer import build_tokenizer
    from ..models.mm_interleaved import MMInterleaved, weights_mismatch

    tc = cfg.train
    if tc.deterministic:  # e.g. index_put's accumulate is not bit-exact across threads otherwise
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        **accelerator_kwargs(),
    )
    try:
        engine = check_engine(accelerator)
    except EngineError as e:
        raise TrainingError(str(e)) from None
    rank, main = accelerator.process_index, accelerator.is_main_process
    run = Path(tc.out_dir)
    ckpt = resolve_resume(resume, run)
    if main:
        run.mkdir(parents=True, exist_ok=True)
        for partial in remove_partial(run):
            print(f"removed {partial.name}, a checkpoint whose save was cut short")

    # 1. tokenizer, model, optimiser — from the checkpoint's tokenizer when resuming
    init = Path(tc.init_from) if tc.init_from and ckpt is None else None
    if ckpt:
        tokenizer = _checkpoint_tokenizer(ckpt)
    elif init:
        tokenizer = _init_tokenizer(init)
    else:
        tokenizer = build_tokenizer(cfg)
    torch.manual_seed(tc.seed)
    try:
        model = MMInterleaved(cfg, tokenizer)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        raise TrainingError(out_of_memory(e, "building the model", None)) from None
    if main:  # the sizes of the model as loaded (a pretrained folder's, not the config's numbers)
        (run / "config.yaml").write_text(model.cfg.to_yaml())
    if init:
        new = _init_weights(model, init)
        if main:
            print(f"initialised from {init}" + (f"; new in this config: {', '.join(new)}" if new else ""))
    # 16-bit frozen parts in a float32 run (no autocast): stored in 16 bits, computed in float32
    cast_up = compute_frozen_in_float32(model) if tc.mixed_precision == "no" else []
    if tc.low_memory:
        what = enable_checkpointing(model)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    if tc.low_memory and main:
        print(f"low memory: gradient checkpointing in {', '.join(what)}; optimizer {type(optimizer).__name__}; "
              f"frozen parts in {str(model.frozen_dtype()).removeprefix('torch.')}"
              + (f" (computed in float32, layer by layer: {', '.join(cast_up)})" if cast_up else ""))

    # 2. resume: weights (before sharding), then optimiser, schedule, EMA, step (after)
    start, samples_seen, saved = 0, 0, None
    if ckpt is not None:
        saved = load_trainer_state(ckpt)
        if saved["raw"] is not None:  # EMA runs keep the raw training weights apart
            try:
                result = model.load_state_dict(saved["raw"], strict=False)
            except RuntimeError as e:  # shapes differ
                raise TrainingError(_MISMATCH.format(ckpt=ckpt, what=weights_mismatch(e))) from None
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            if result.unexpected_keys or set(result.missing_keys) - frozen - _buffers(model):
                what = f"e.g. {(result.unexpected_keys or result.missing_keys)[:3]}"
                raise TrainingError(_MISMATCH.format(ckpt=ckpt, what=what))
        else:
            _load_model_weights(model, ckpt / "model")
        saved["raw"] = None  # loaded: no second copy of the weights
        start, samples_seen = saved["state"]["step"], saved["state"].get("samples_seen", 0)
    if main and ckpt is None:  # steps after the checkpoint are done again: drop their rows
        trim_metrics(run / "metrics.jsonl", start)

    if engine.startswith("fsdp"):
        names = configure_fsdp(accelerator, model)
        if main:
            print(f"FSDP wraps {', '.join(names)}")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    # the EMA copy is made from the prepared (under FSDP2: sharded) parameters
    ema = EMA([(n, p) for n, p in raw_model.named_parameters() if p.requires_grad], tc.ema_decay) \
        if tc.ema_decay else None
    if saved is not None:
        try:
            _load_optimizer(raw_model, optimizer, saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TrainingError(f"{ckpt}: its optimiser or schedule state does not fit this config ({e}); the "
                                "trainable groups or optimiser settings changed — resume with the config it was "
                                "trained with, or start afresh in a new train.out_dir") from None
        if ema is not None and saved["ema"] is not None:
            ema.load_state_dict({"decay": tc.ema_decay, "num_updates": saved["state"].get("ema_num_updates", 0),
                                 "shadow": saved["ema"]})
        del saved  # the optimiser holds its state now: no second copy
        if main:
            trim_metrics(run / "metrics.jsonl", start)
            print(f"resumed from {ckpt} at step {start}")
    end = min(tc.steps, max_steps) if max_steps is not None else tc.steps
    # micro-batches are read, decoded and collated ahead, in data.num_workers processes
    loader = BatchLoader(cfg, tokenizer, seed=tc.seed, rank=rank, start=start, end=end,
                         world=accelerator.num_processes)

    def save(step: int) -> Path | None:
        """Every rank calls this (sharded tensors are gathered together); the main one writes."""
        state = {"step": step, "seed": tc.seed, "samples_seen": loop.samples_seen, "engine": engine,
                 "world_size": accelerator.num_processes,
                 "data_position": {"step": step, "note": "documents are a function of (seed, step, micro, rank)"}}
        sharded = is_sharded(raw_model)
        if not sharded and not main:
            return None
        optim_state = full_optimizer_state(raw_model, optimizer.optimizer if sharded else optimizer)
        ema_state = ema.state_dict() if ema else None
        # raw weights apart only with EMA (the model folder then holds the EMA weights); else no copy
        raw_state = full_model_state(raw_model, trainable_only=True) if ema else None
        weights = None
        if ema is not None:
            weights = full_model_state(raw_model)  # under sharding only the main process receives tensors
            if main:
                weights.update({k: v.to(weights[k].dtype) for k, v in ema_state["shadow"].items()})
        elif sharded:
            weights = full_model_state(raw_model)
        if not main:
            return None
        if sharded:
            state["optimizer_format"] = "full_state_dict"
        return save_checkpoint(run, step, save_model=lambda folder: raw_model.save_pretrained(folder, state_dict=weights),
                               raw_state=raw_state, ema_state=ema_state, optimizer_state=optim_state,
                               scheduler=scheduler, state=state, keep_last_n=tc.keep_last_n)

    # 3. one optimiser step over grad_accum micro-batches; the loop logs, saves and stops
    model.train()

    def step_fn(step: int) -> StepOutput:
        totals, samples = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}, 0
        for micro in range(tc.grad_accum):
            _seed_everything(tc.seed, step, micro, rank)
            batch = loader.next(step, micro).to(accelerator.device)
            loop.phase = "the forward pass"
            with accelerator.autocast():
                out = model(batch, image_loss_limit=tc.image_loss_limit)
            loop.check_finite(out["loss"], step, "Try a lower train.lr or train.grad_clip.")
            sync = micro == tc.grad_accum - 1
            loop.phase = "the backward pass"
            with (accelerator.no_sync(model) if not sync else nullcontext()):
                accelerator.backward(out["loss"] / tc.grad_accum)
            for k, v in out.items():  # every loss the model returns (e.g. contrastive_loss) is logged
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / tc.grad_accum
            samples += batch.input_ids.shape[0] * accelerator.num_processes
        # the norm before clipping is logged: how often it exceeds the clip says how much clipping slows training
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        ranks = _per_rank(accelerator, totals["loss"], grad_norm) if accelerator.num_processes > 1 else None
        loop.phase = "the optimiser step"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update((n, p) for n, p in raw_model.named_parameters() if p.requires_grad)
        fields = {**{k: round(v, 6) for k, v in totals.items()},
                  "grad_norm": round(float(grad_norm), 6) if grad_norm is not None else None,
                  "lr": scheduler.get_last_lr()[0], **loader.log_fields()}  # bad records skipped so far (this process)
        if ranks is not None:  # what each process saw: its own data, the same synchronised gradients
            fields.update(world_size=accelerator.num_processes, engine=engine, **ranks)
        return StepOutput(fields, samples)

    loop = Loop(run, start, end, step_fn, save, tc.save_every, tc.log_every, last_checkpoint=ckpt,
                samples_seen=samples_seen, main=main, show_progress=show_progress,
                postfix=lambda row: dict(text=f"{row['text_loss']:.3f}", image=f"{row['image_loss']:.4f}",
                                         lr=f"{row['lr']:.2e}"),
                barrier=accelerator.wait_for_everyone)
    try:
        step = loop.run_steps()
    finally:
        loader.close()
    if main and (run / "metrics.jsonl").exists():
        plot_losses(read_metrics(run / "metrics.jsonl"), run / "loss.png")
    accelerator.wait_for_everyone()
    return TrainResult(run, step, loop.last_checkpoint, interrupted=loop.interrupted, main=main, engine=engine,
                       world_size=accelerator.num_processes)


def _per_rank(accelerator, loss: float, grad_norm) -> dict:
    """Every rank's loss (its own documents) and gradient norm (the same after DDP's all-reduce)."""
    norm = float(grad_norm) if grad_norm is not None else float("nan")
    both = accelerator.gather(torch.tensor([[loss, norm]], dtype=torch.float64, device=accelerator.device))
    return {"rank_losses": [round(float(x), 6) for x in both[:, 0]],
            "rank_grad_norms": [float(x) for x in both[:, 1]]}


def _load_optimizer(model: torch.nn.Module, optimizer, state: dict) -> None:
    """The saved optimiser state into the prepared optimiser; moments of 1-element parameters saved
    0-dim by older runs (the MMFS gates) take the parameter's shape."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if is_sharded(model):
        load_full_optimizer_state(model, inner, state)
        return
    inner.load_state_dict(state)
    for p, st in inner.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim == 0 and p.ndim == 1 and p.numel() == 1 and k != "step":
                st[k] = v.reshape(1)


def _buffers(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_buffers()}


_MISMATCH = ("{ckpt}: its weights do not fit the model this config builds ({what}); it was trained with "
             "another model config — resume with that model config (-c {ckpt}/model/config.yaml "
             "train.out_dir={ckpt.parent} and your train settings), or start afresh in a new train.out_dir")


def _checkpoint_tokenizer(ckpt: Path):
    from ..data.tokenizer import TokenizerError, load_tokenizer

    folder = ckpt / "model" / "tokenizer"
    if not folder.is_dir():
        raise CheckpointError(f"{ckpt}: model/tokenizer/ is missing, so the checkpoint is incomplete; resume "
                              "from another step-* folder or start afresh")
    try:
        return load_tokenizer(folder)
    except TokenizerError as e:
        raise CheckpointError(f"{ckpt}: its tokenizer cannot be loaded ({e})") from None


def _init_tokenizer(folder: Path):
    from ..data.tokenizer import TokenizerError, load_tokenizer
    from ..models.mm_interleaved import TOKENIZER_DIR, WEIGHTS_NAME

    missing = [n for n in (WEIGHTS_NAME, TOKENIZER_DIR) if not (folder / n).exists()]
    if missing:
        raise TrainingError(f"train.init_from: {folder} is not a model folder ({', '.join(missing)} missing); "
                            "give a run's step-*/model folder or a bundled checkpoint")
    try:
        return load_tokenizer(folder / TOKENIZER_DIR)
    except TokenizerError as e:
        raise TrainingError(f"train.init_from: {folder}: its tokenizer cannot be loaded ({e})") from None


def _init_weights(model: torch.nn.Module, folder: Path) -> list[str]:
    """Load ``folder``'s weights into ``model`` for ``train.init_from``; returns the model's tensors the
    file lacks (they keep their initialisation) and the widened UNet input. Other tensors of another
    shape, or not in the model, are an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.mm_interleaved import WEIGHTS_NAME, verify_checksum, weights_mismatch

    path = folder / WEIGHTS_NAME
    try:
        verify_checksum(folder, WEIGHTS_NAME)
        state = load_file(str(path))
        widened = _widen_inputs(model, state)
        result = model.load_state_dict(state, strict=False)
    except ValueError as e:  # the recorded checksum differs
        raise TrainingError(f"train.init_from: {e}") from None
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"train.init_from: {path} cannot be read ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:
        raise TrainingError(f"train.init_from: {folder} does not fit the model this config builds "
                            f"({weights_mismatch(e)})") from None
    if result.unexpected_keys:
        raise TrainingError(f"train.init_from: {folder} holds {len(result.unexpected_keys)} tensors this config's "
                            f"model has not (e.g. {result.unexpected_keys[0]}); it was trained with another "
                            "model config")
    base = model.base_keys(result.missing_keys)  # frozen tensors the folder reads from its base folders
    return [k for k in result.missing_keys if k not in _buffers(model) and k not in base] + widened


def _widen_inputs(model: torch.nn.Module, state: dict) -> list[str]:
    """The UNet's input convolution when the config adds input channels (a conditioner such as ``previous_image``):
    the file's weights fill the first channels, the new ones start at zero. Returns what it widened."""
    key = "decoder.unet.conv_in.weight"
    here = dict(model.named_parameters()).get(key)
    there = state.get(key)
    if here is None or there is None or there.shape == here.shape:
        return []
    if there.shape[0] != here.shape[0] or there.shape[2:] != here.shape[2:] or there.shape[1] > here.shape[1]:
        return []  # another shape altogether: load_state_dict names it
    wide = torch.zeros(here.shape, dtype=there.dtype)
    wide[:, :there.shape[1]] = there
    state[key] = wide
    return [f"{key} (input channels {there.shape[1]} → {here.shape[1]}, the new ones zero)"]


def _load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors import SafetensorError

    from ..models.mm_interleaved import verify_checksum

    try:
        verify_checksum(folder, "model.safetensors")
        model.load_weights(folder)
    except ValueError as e:  # the recorded checksum differs, or the tensors do not fit
        if "does not match" in str(e):
            raise TrainingError(_MISMATCH.format(ckpt=folder.parent, what=str(e).split(": ", 1)[-1])) from None
        if "not a readable safetensors file" in str(e):
            why = str(e).split("safetensors file (", 1)[-1].split("); it is damaged")[0]
            raise TrainingError(f"{folder / 'model.safetensors'}: cannot resume from it ({why}); it is damaged — "
                                "resume from another step-* folder or start afresh") from None
        raise TrainingError(f"cannot resume: {e}") from None
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"{folder / 'model.safetensors'}: cannot resume from it ({str(e).splitlines()[0]}); it "
                            "is damaged — resume from another step-* folder or start afresh") from None
