"""Training throughput of the default config, and FLOP utilisation against this machine's peak.

    .venv/bin/python benchmarks/train.py [--config FILE] [--steps 8] [--device cpu|cuda]

Measured in one run, side by side:
  * samples/s: packed rows per second over ``--steps`` full training steps (forward, backward,
    clipping, AdamW) at ``train.batch_size`` rows, after two warm-up steps;
  * FLOPs per step: counted by ``torch.utils.flop_counter.FlopCounterMode`` on one step
    (matmuls, convolutions, attention; forward + backward);
  * peak: the best fp32 matmul GFLOP/s on this device (square matmuls of a few sizes).
The last line is JSON: ``samples_per_s``, ``flop_utilisation`` (achieved / peak) and the parts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmgen.config import load_config  # noqa: E402
from mmgen.data.collate import Collator  # noqa: E402
from mmgen.data.tokenizer import build_tokenizer  # noqa: E402
from mmgen.models.mm_interleaved import MMInterleaved  # noqa: E402
from mmgen.training.data import DocumentStream  # noqa: E402
from mmgen.training.optim import build_optimizer  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of square matmuls."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        sync(device)
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    dev = args.device
    print(f"device {dev}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")

    tok = build_tokenizer(cfg)
    torch.manual_seed(0)
    model = MMInterleaved(cfg, tok).to(dev).train()
    opt = build_optimizer(model, cfg.train)
    stream, collator = DocumentStream(cfg.data, 0), Collator(tok, cfg)
    batches = [next(collator.batches(stream.documents(s, 0, 0), cfg.train.batch_size)).to(dev)
               for s in range(args.steps + 2)]

    def step(batch) -> None:
        out = model(batch, image_loss_limit=cfg.train.image_loss_limit)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # 1. FLOPs of one step, counted
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batches[0])
    flops = counter.get_total_flops()

    # 2. time full steps
    step(batches[1])
    times = []
    for b in batches[2:]:
        sync(dev)
        t = time.perf_counter()
        step(b)
        sync(dev)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    rows = cfg.train.batch_size
    samples_per_s = rows / step_s
    achieved = flops / step_s / 1e9

    # 3. this device's fp32 matmul peak, in the same run
    peak = matmul_peak(dev)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {params / 1e6:.2f}M parameters; step {step_s:.3f} s (median of {len(times)}) at {rows} rows")
    print(f"samples/s {samples_per_s:.2f}; {flops / 1e9:.1f} GFLOP per step -> {achieved:.1f} GFLOP/s; "
          f"fp32 matmul peak {peak:.1f} GFLOP/s")
    print(json.dumps({"samples_per_s": round(samples_per_s, 3), "flop_utilisation": round(achieved / peak, 4),
                      "step_seconds": round(step_s, 4), "gflop_per_step": round(flops / 1e9, 2),
                      "achieved_gflops": round(achieved, 2), "peak_gflops": round(peak, 2), "device": dev}))


if __name__ == "__main__":
    main()
