"""MMFS against dense cross-attention over every image token: time and peak memory.

    .venv/bin/python benchmarks/mmfs.py [--device cpu|cuda] [--quick] [--profile]

Both sides run forward + backward on the same inputs (features and queries require grad, the
value/key projections are inside the timed region), median of several repeats after warm-up.

Dense baselines, same widths (query, key, value and output projections, H heads, masked by
visibility, all levels of all images concatenated into one token sequence):
  * ``dense``: ``F.scaled_dot_product_attention`` with a boolean mask -- what
    ``nn.MultiheadAttention(need_weights=False)`` runs; on CPU a fused flash kernel that never
    materialises the (Q, tokens) scores, on CUDA the memory-efficient kernel. The headline.
  * ``dense_math``: the explicit ``softmax(q k^T) v`` (``need_weights=True``), which stores
    the scores: the ``*_vs_math`` keys.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the
call; on CPU the running sum of the allocator's [memory] events recorded by
``torch.profiler`` (``profile_memory=True``), maximum over the call. Parameter and input
gradients are allocated by a warm-up call first, so both count activations and temporaries.

Cases: UNet-like (a 32x32 query map with pixel-centre reference points reading 4 images at
64/32/16/8) and LLM-like (256 tokens, causal over 1, 4 or 16 images at 32/16/8, image m
placed at token m * 256 / M so that later tokens see more images).
The last line is a JSON summary: ``unet_speedup`` (dense / MMFS time) and ``unet_mem_ratio``
(dense / MMFS peak) for the UNet case; ``llm_time_ratio`` (MMFS / dense time, the worse of 4
and 16 images, also given apart); ``images_scaling`` (MMFS time at 16 images / at 1 image).

On a shared CPU run it on an idle machine (it prints the load average): a busy core stalls
every multi-threaded op, and MMFS has many more, smaller ops than dense attention.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmgen.models.mmfs import MMFS  # noqa: E402


class DenseCrossAttention(nn.Module):
    """Multi-head cross-attention from the queries to every token of every visible image."""

    def __init__(self, query_dim: int, value_dim: int, hidden: int, heads: int, math: bool = False):
        super().__init__()
        self.heads, self.math = heads, math
        self.q_proj = nn.Linear(query_dim, hidden)
        self.k_proj = nn.Linear(value_dim, hidden)
        self.v_proj = nn.Linear(value_dim, hidden)
        self.out_proj = nn.Linear(hidden, query_dim)

    def forward(self, query, tokens, token_image, visible):
        B, Q, _ = query.shape
        T = tokens.shape[1]
        q = self.q_proj(query).view(B, Q, self.heads, -1).transpose(1, 2)  # (B, H, Q, Dh)
        k = self.k_proj(tokens).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v_proj(tokens).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, Dh)
        mask = visible[:, None, :, token_image]  # (B, 1, Q, T)
        if self.math:
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Q, T)
            out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, Q, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Q, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, Q, -1))  # (B, Q, C)


def make_case(kind, *, M, sizes, Q, dim, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, M, dim, s, s, generator=g).to(device).requires_grad_() for s in sizes]
    # the dense side reads the same features as a channel-last token sequence (its natural input)
    tokens = torch.cat([f.detach().flatten(3).transpose(2, 3).reshape(1, -1, dim) for f in feats], 1)
    tokens = tokens.clone().requires_grad_()
    token_image = torch.cat([torch.arange(M).repeat_interleave(s * s) for s in sizes]).to(device)
    query = torch.randn(1, Q, dim, generator=g).to(device).requires_grad_()
    if kind == "unet":
        side = int(Q ** 0.5)
        c = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        ref = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(1, Q, 2).to(device)  # (x, y)
        visible = torch.ones(1, Q, M, dtype=torch.bool, device=device)
    else:
        ref = None
        start = torch.arange(M) * Q // M  # image m sits at token start[m]; causal visibility
        visible = (torch.arange(Q)[:, None] >= start[None, :])[None].to(device)
    grad = torch.randn(1, Q, dim, generator=g).to(device)
    return dict(feats=feats, tokens=tokens, token_image=token_image, query=query, ref=ref,
                visible=visible, grad=grad)


def step_fn(model, case):
    if isinstance(model, MMFS):
        def step():
            values = model.prepare_values(case["feats"])
            model(case["query"], values, case["visible"], case["ref"]).backward(case["grad"])
    else:
        def step():
            model(case["query"], case["tokens"], case["token_image"], case["visible"]).backward(case["grad"])
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(steps, device, warmup, repeats):
    """(median, min) seconds per call of each step. Repeats are interleaved, so that load drift
    on a shared machine hits every contender alike; ``repeats`` maps step name to count."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for r in range(max(repeats.values())):
        for k, step in steps.items():
            if r >= repeats[k]:
                continue
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def peak_memory(step, device):
    """Extra bytes allocated at the peak of one call (after time_all: gradient buffers exist)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    peak = total = 0
    for _, n in events:
        total += n
        peak = max(peak, total)
    return peak


def build(kind, dim, heads, points, levels, device):
    torch.manual_seed(0)
    if kind == "mmfs":
        m = MMFS(dim, dim, hidden_size=dim, num_heads=heads, num_points=points, num_levels=levels,
                 max_images=32)
        with torch.no_grad():  # trained-looking weights: offsets and logits depend on the query
            m.sampling_offsets.weight.normal_(0, 0.02)
            m.attention_weights.weight.normal_(0, 0.02)
    else:
        m = DenseCrossAttention(dim, dim, dim, heads, math=kind == "dense_math")
    return m.to(device)


def run_case(name, case, args, device, levels, kinds, measure_memory=True):
    steps = {k: step_fn(build(k, args.dim, args.heads, args.points, levels, device), case) for k in kinds}
    # the explicit-softmax baseline is slow and only a reference point: half the repeats
    repeats = {k: max(1, args.repeats // 2) if k == "dense_math" else args.repeats for k in kinds}
    times = time_all(steps, device, args.warmup, repeats)
    res = {}
    for k, step in steps.items():
        mem = peak_memory(step, device) if measure_memory else float("nan")
        (t, t_min), res[k] = times[k], (times[k][0], mem)
        print(f"{name:<10} {k:<11} median {t * 1e3:8.1f} ms  (min {t_min * 1e3:8.1f})   "
              f"peak {mem / 2**20:8.1f} MiB", flush=True)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="half-size maps and one repeat: a smoke run, not the measured targets")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table for MMFS (LLM, 16 images)")
    p.add_argument("--dim", type=int, default=256, help="query, value and hidden width")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    s = 2 if args.quick else 1  # --quick halves every map and the query grid
    unet_sizes, llm_sizes = [64 // s, 32 // s, 16 // s, 8 // s], [32 // s, 16 // s, 8 // s]
    load = os.getloadavg()[0]
    print(f"device {device}, threads {torch.get_num_threads()}, dim {args.dim}, heads {args.heads}, "
          f"points {args.points}, repeats {args.repeats} (median after {args.warmup} warm-up), "
          f"load average {load:.2f}")
    if device.type == "cpu" and load > 0.5 and torch.get_num_threads() > 1:
        print("warning: the CPU is busy. Every multi-threaded op then waits for a descheduled thread, "
              "which slows MMFS's many small ops far more than dense attention's few big ones; "
              "compare on an idle machine, or with --threads 1")

    # 1. UNet-like: a 32x32 feature map reads 4 images at 64/32/16/8
    case = make_case("unet", M=4, sizes=unet_sizes, Q=(32 // s) ** 2, dim=args.dim, device=device)
    unet = run_case("unet M=4", case, args, device, len(unet_sizes), ["mmfs", "dense", "dense_math"])
    del case

    # 2. LLM-like: 256 tokens, causal over 1, 4 and 16 images at 32/16/8
    llm = {}
    for M in (1, 4, 16):
        case = make_case("llm", M=M, sizes=llm_sizes, Q=256 // s, dim=args.dim, device=device)
        kinds = ["mmfs"] if M == 1 else ["mmfs", "dense", "dense_math"]
        llm[M] = run_case(f"llm M={M}", case, args, device, len(llm_sizes), kinds, measure_memory=M != 1)
        if args.profile and M == 16:
            from torch.profiler import ProfilerActivity, profile
            step = step_fn(build("mmfs", args.dim, args.heads, args.points, len(llm_sizes), device), case)
            step()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        del case

    summary = {
        "device": str(device),
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "unet_speedup": unet["dense"][0] / unet["mmfs"][0],
        "unet_mem_ratio": unet["dense"][1] / unet["mmfs"][1],
        "llm_time_ratio": max(llm[M]["mmfs"][0] / llm[M]["dense"][0] for M in (4, 16)),
        "images_scaling": llm[16]["mmfs"][0] / llm[1]["mmfs"][0],
        "llm_time_ratio_4": llm[4]["mmfs"][0] / llm[4]["dense"][0],
        "llm_time_ratio_16": llm[16]["mmfs"][0] / llm[16]["dense"][0],
        "llm_mem_ratio_16": llm[16]["dense"][1] / llm[16]["mmfs"][1],
        "unet_speedup_vs_math": unet["dense_math"][0] / unet["mmfs"][0],
        "unet_mem_ratio_vs_math": unet["dense_math"][1] / unet["mmfs"][1],
        "llm_time_ratio_vs_math": max(llm[M]["mmfs"][0] / llm[M]["dense_math"][0] for M in (4, 16)),
        "mmfs_ms": {"unet": unet["mmfs"][0] * 1e3, **{f"llm_{M}": llm[M]["mmfs"][0] * 1e3 for M in llm}},
    }
    summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}
    summary["mmfs_ms"] = {k: round(v, 1) for k, v in summary["mmfs_ms"].items()}
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
