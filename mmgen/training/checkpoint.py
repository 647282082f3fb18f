"""Run folders and checkpoints: ``RUN/step-000500/{model/, trainer/}``, written atomically.

A checkpoint is first written under a temporary name (``.tmp-step-NNNNNN-*``) and renamed into
place, so a folder named ``step-NNNNNN`` is always complete; ``--resume auto`` takes the newest
one. Temporary folders left by a killed save are never loaded and are removed when training
starts again.

- ``model/``: the model folder (safetensors, resolved config, tokenizer) — the EMA weights
  when EMA is on, since those are what sampling uses;
- ``trainer/``: ``weights.safetensors`` (the raw training weights, only with EMA),
  ``ema.safetensors``, ``optimizer.pt`` and ``scheduler.pt`` (read back with
  ``weights_only=True``), ``state.json`` (step, seed, samples seen).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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


@contextmanager
def atomic_checkpoint(run: Path, step: int, keep_last_n: int) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes ``RUN/step-{step}`` in one rename
    and older checkpoints are pruned to the newest ``keep_last_n``; on any error it is removed."""
    final = step_dir(run, step)
    tmp = run / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a save)
            _remove(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run)[:-keep_last_n]:
        _remove(old)


def save_checkpoint(run: Path, step: int, *, save_model: Callable[[Path], None], raw_state: dict | None,
                    ema_state: dict | None, optimizer_state: dict, scheduler, state: dict, keep_last_n: int) -> Path:
    """Write ``RUN/step-{step}`` atomically and prune to the newest ``keep_last_n``.

    ``save_model(folder)`` writes the model folder (with the EMA weights when EMA is on);
    ``raw_state`` (the raw trainable weights) is written only with EMA.
    """
    with atomic_checkpoint(run, step, keep_last_n) as tmp:
        save_model(tmp / "model")
        trainer = tmp / "trainer"
        trainer.mkdir()
        if ema_state is not None:
            save_file(_contiguous(raw_state), trainer / "weights.safetensors")
            save_file(_contiguous(ema_state["shadow"]), trainer / "ema.safetensors")
            state = {**state, "ema_num_updates": ema_state["num_updates"], "ema_decay": ema_state["decay"]}
        torch.save(optimizer_state, trainer / "optimizer.pt")
        torch.save(scheduler.state_dict(), trainer / "scheduler.pt")
        (trainer / "state.json").write_text(json.dumps(state, indent=2))
    return step_dir(run, step)


def _remove(ckpt: Path) -> None:
    """Rename a checkpoint out of the ``step-*`` names, then delete it: a kill midway leaves a
    ``.tmp-*`` folder (removed at the next start), never a ``step-*`` folder with files missing."""
    trash = ckpt.parent / f".tmp-{ckpt.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(ckpt, trash)
    except OSError:
        trash = ckpt
    shutil.rmtree(trash, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict:
    """Read a checkpoint's trainer state; tensors only through safetensors / weights_only."""
    trainer = ckpt / "trainer"
    state = _read(trainer / "state.json", lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{trainer / 'state.json'}: holds no step number; the checkpoint is damaged — "
                              "resume from an older step-* folder")
    return {
        "state": state,
        "optimizer": _read(trainer / "optimizer.pt", _load_tensors),
        "scheduler": _read(trainer / "scheduler.pt", _load_tensors),
        "raw": _read(trainer / "weights.safetensors", load_file, optional=True),
        "ema": _read(trainer / "ema.safetensors", load_file, optional=True),
    }


def _load_tensors(path: Path) -> Any:
    """``torch.load`` that only accepts tensors and plain containers (never runs code)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as used, not copied whole


def _read(path: Path, loader: Callable[[Path], Any], *, optional: bool = False) -> Any:
    """``loader(path)``, with a :class:`CheckpointError` that names the file and says what to do."""
    if optional and not path.exists():
        return None
    try:
        return loader(path)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():  # weights_only met a class, function or call
            raise CheckpointError(f"{path}: refused — it holds Python objects other than tensors and plain "
                                  "containers, and loading them could run code; mmgen never writes such files, "
                                  "so do not trust this checkpoint: resume from another step-* folder or start "
                                  "afresh") from None
        raise CheckpointError(f"{path}: cannot read it ({_first_line(e)}); the checkpoint may be damaged — "
                              "resume from an older step-* folder") from None
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: cannot read it ({_first_line(e)}); the checkpoint may be damaged — "
                              "resume from an older step-* folder") from None


def _first_line(e: BaseException) -> str:
    """The first line of an error — its first sentence when that line runs on (torch's do)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0] if len(line) > 200 else line


def remove_partial(run: Path) -> list[Path]:
    """Delete the ``.tmp-step-*`` folders of saves that were killed midway; return what was removed."""
    if not run.is_dir():
        return []
    partial = [p for p in run.iterdir() if p.name.startswith(".tmp-step-") and p.is_dir()]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
