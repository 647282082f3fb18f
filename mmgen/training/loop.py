"""The one training loop that ``mmgen train`` and ``mmgen train --stage align`` share.

What a stage brings: ``step_fn(step)``, which runs one optimiser step and returns what to log
and how many samples it used, and ``save(step)``, which writes ``RUN/step-NNNNNN``. What the
loop does for both, in one place:

1. progress bar from the resumed step to the end;
2. the step (its losses checked with :func:`check_finite` before the backward pass);
3. a ``metrics.jsonl`` row every ``log_every`` steps (and at the end), samples per second;
4. a checkpoint every ``save_every`` steps (and at the end);
5. Ctrl-C: the step in flight finishes, a checkpoint is saved, the loop stops (a second Ctrl-C
   quits at once); out of memory: one line naming the part of the step and the last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..oom import allocation, is_oom
from .plot import read_metrics


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


class StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop (and save) after the step in flight;
    a second one restores the previous handler and quits at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit at once)")

    def install(self) -> None:
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        """Put back the handler that ``install`` replaced (nothing if it was never installed)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class StepOutput:
    """What one step gives the loop: the fields of its log row and the samples it used."""

    fields: dict
    samples: int


@dataclass
class Loop:
    """Runs steps ``start`` → ``end``; see the module docstring. ``main``: this process logs, shows the
    bar and takes Ctrl-C (every process steps and calls ``save``; ``barrier`` lines them up)."""

    run: Path
    start: int
    end: int
    step_fn: Callable[[int], StepOutput]
    save: Callable[[int], Path | None]
    save_every: int
    log_every: int
    last_checkpoint: Path | None = None
    samples_seen: int = 0
    main: bool = True
    desc: str = "train"
    show_progress: bool = True
    postfix: Callable[[dict], dict] = lambda row: {}
    barrier: Callable[[], None] = lambda: None
    phase: str = "the step"  # the part of the step in flight, for the out-of-memory message
    interrupted: bool = False

    def run_steps(self) -> int:
        """Run to the end (or a Ctrl-C); returns the step reached. ``last_checkpoint`` is the latest save."""
        from tqdm.auto import tqdm

        stop = StopOnInterrupt()
        if self.main:
            stop.install()
        metrics = self.run / "metrics.jsonl"
        bar = tqdm(total=self.end, initial=self.start, desc=self.desc, disable=not (self.main and self.show_progress),
                   dynamic_ncols=True)
        step = self.start
        t_last, samples_last = time.perf_counter(), self.samples_seen
        try:
            while step < self.end and not stop.requested:
                out = self.step_fn(step)
                self.samples_seen += out.samples
                step += 1
                if self.main and (step % self.log_every == 0 or step == self.end):
                    now = time.perf_counter()
                    sps = (self.samples_seen - samples_last) / max(now - t_last, 1e-9)
                    t_last, samples_last = now, self.samples_seen
                    row = {"step": step, **out.fields, "samples_per_s": round(sps, 3)}
                    with open(metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(**self.postfix(row), sps=f"{sps:.1f}")
                bar.update(1)
                if step % self.save_every == 0 or step == self.end:
                    self.barrier()
                    self.last_checkpoint = self.save(step) or self.last_checkpoint
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            raise TrainingError(out_of_memory(e, f"{self.phase} of step {step + 1}", self.last_checkpoint)) from None
        finally:
            bar.close()
            stop.restore()
        self.interrupted = stop.requested
        if stop.requested:
            self.barrier()
            if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{step:06d}":
                self.last_checkpoint = self.save(step) or self.last_checkpoint
                if self.main:
                    print(f"saved {self.last_checkpoint}; resume with --resume auto")
        return step

    def check_finite(self, loss: torch.Tensor, step: int, hint: str) -> None:
        """Stop before a non-finite loss reaches the weights; the last checkpoint is named and kept."""
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at step {step}; stopping. The last good checkpoint is "
                f"{self.last_checkpoint or 'none (no checkpoint was written yet)'} and was left untouched. {hint}")


def out_of_memory(e: BaseException, part: str, last_ckpt: Path | None) -> str:
    """One line: which part ran out of memory, how much it asked for, what to try."""
    return (f"out of memory in {part}{allocation(e)}; the last checkpoint "
            f"{'is ' + str(last_ckpt) + ', untouched' if last_ckpt else 'does not exist yet'} — try --low-memory, "
            "a smaller data.seq_len or train.image_loss_limit")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (and drop a line cut short by a kill)."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if isinstance(r, dict) and isinstance(r.get("step"), int)
            and r["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
