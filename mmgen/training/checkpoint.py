"""Run folders and checkpoints: ``RUN/step-000500/{model/, trainer/}``, written atomically.

A checkpoint is first written under a temporary name and renamed into place, so a folder
named ``step-NNNNNN`` is always complete; ``--resume auto`` takes the newest one.

- ``model/``: the model folder (safetensors, resolved config, tokenizer) — the EMA weights
  when EMA is on, since those are what sampling uses;
- ``trainer/``: ``weights.safetensors`` (the raw training weights, only with EMA),
  ``ema.safetensors``, ``optimizer.pt`` and ``scheduler.pt`` (read back with
  ``weights_only=True``), ``state.json`` (step, seed, samples seen).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read."""


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:06d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    if not run.is_dir():
        return []
    found = []
    for p in run.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer" / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    ckpts = list_checkpoints(run)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str | None, run: Path) -> Path | None:
    """``None`` → start fresh; ``auto`` → the newest checkpoint of ``run`` if any; else a path."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run)
    path = Path(resume)
    if not (path / "trainer" / "state.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected trainer/state.json inside); "
                              f"use --resume auto or a RUN/step-NNNNNN folder")
    return path


def save_checkpoint(run: Path, step: int, *, save_model: Callable[[Path], None], raw_state: dict,
                    ema_state: dict | None, optimizer, scheduler, state: dict, keep_last_n: int) -> Path:
    """Write ``RUN/step-{step}`` atomically and prune to the newest ``keep_last_n``.

    ``save_model(folder)`` writes the model folder (with the EMA weights when EMA is on).
    """
    final = step_dir(run, step)
    tmp = run / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_model(tmp / "model")
        trainer = tmp / "trainer"
        trainer.mkdir()
        if ema_state is not None:
            save_file(_contiguous(raw_state), trainer / "weights.safetensors")
            save_file(_contiguous(ema_state["shadow"]), trainer / "ema.safetensors")
            state = {**state, "ema_num_updates": ema_state["num_updates"], "ema_decay": ema_state["decay"]}
        torch.save(optimizer.state_dict(), trainer / "optimizer.pt")
        torch.save(scheduler.state_dict(), trainer / "scheduler.pt")
        (trainer / "state.json").write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run)[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path) -> dict:
    """Read a checkpoint's trainer state; tensors only through safetensors / weights_only."""
    trainer = ckpt / "trainer"
    try:
        state = json.loads((trainer / "state.json").read_text())
        out = {
            "state": state,
            "optimizer": torch.load(trainer / "optimizer.pt", map_location="cpu", weights_only=True),
            "scheduler": torch.load(trainer / "scheduler.pt", map_location="cpu", weights_only=True),
            "raw": load_file(trainer / "weights.safetensors") if (trainer / "weights.safetensors").exists() else None,
            "ema": load_file(trainer / "ema.safetensors") if (trainer / "ema.safetensors").exists() else None,
        }
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}: cannot read the trainer state ({e}); "
                              "the folder may be damaged — resume from an older step-* folder") from None
    return out


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
