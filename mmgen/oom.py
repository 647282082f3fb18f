"""Out of memory, said in one line: which part ran out, how much it asked for, and what to try.
Training words it in ``mmgen.training.loop.out_of_memory``, generation in :func:`generation_oom`."""

from __future__ import annotations

import gc
import re

import torch


class OutOfMemory(RuntimeError):
    """Generation ran out of memory; the message is the one line to show."""


def is_oom(e: BaseException) -> bool:
    """torch's out-of-memory error (CUDA), a CPU allocation that failed, or Python's MemoryError."""
    text = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


def allocation(e: BaseException) -> str:
    """`` (one more allocation of 2.00 GiB did not fit)`` from the error's text, or "" when it says none."""
    m = re.search(r"(?:tried to allocate|allocate memory: you tried to allocate)\s+([\d.]+)\s*(bytes|[KMG]i?B)",
                  str(e), re.IGNORECASE)
    if not m:
        return ""
    n, unit = float(m[1]), m[2].upper()
    gib = n / 2**30 if unit == "BYTES" else n / 2**20 if unit.startswith("K") else n / 1024 if unit.startswith("M") else n
    return f" (one more allocation of {gib:.2f} GiB did not fit)"


def release() -> None:
    """Give back what the failed work held, before the next piece of work starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generation_oom(e: BaseException, part: str) -> str:
    """The line for ``mmgen generate``: the part that ran out, what it asked for, the switches to try."""
    return (f"out of memory {part}{allocation(e)} — try --low-memory (bfloat16; on a GPU the big "
            "components move there only while they run), a smaller --batch-size or --max-images")
