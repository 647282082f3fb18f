"""One rank of tests/test_distributed.py's FSDP2 run (started by torchrun, 2 CPU processes, gloo).

It shards the tiny model the way accelerate's FSDP2 preparation does (``fully_shard`` on every
layer class ``wrap_class_names`` names, then the root: mmgen.training.distributed.shard), makes
the EMA from the sharded parameters, trains one step, saves whole tensors (model, optimiser, EMA)
gathered from the shards, resumes into a fresh sharded model, and trains one more step on both.
An unsharded copy trained on the same batches is the reference. Writes OUT/rank-N.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mmgen.config import load_config
from mmgen.data.collate import Collator
from mmgen.data.tokenizer import build_tokenizer
from mmgen.models.mm_interleaved import MMInterleaved
from mmgen.training.data import DocumentStream
from mmgen.training.distributed import (full_model_state, full_optimizer_state, load_full_model_state,
                                        load_full_optimizer_state, local_numel, shard, wrap_class_names)
from mmgen.training.optim import EMA, build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_train import TINY  # noqa: E402


def _documents(stream, step: int, micro: int, rank: int):
    """An endless document stream for one micro-batch (the collator takes what it needs)."""
    rng = stream.rng(step, micro, rank)
    while True:
        yield from stream.draw(rng, 8)


def step(model, optimizer, batch) -> float:
    loss = model(batch, image_loss_limit=4)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    cfg = load_config(None, [*TINY, "train.ema_decay=0.9", "train.deterministic=false"])
    tokenizer = build_tokenizer(cfg)

    def build() -> MMInterleaved:
        torch.manual_seed(0)
        return MMInterleaved(cfg, tokenizer)

    reference = build()
    ref_opt = build_optimizer(reference, cfg.train)
    model = build()
    total = sum(p.numel() for p in model.parameters())
    names = wrap_class_names(model)
    shard(model, names, mesh=mesh)
    optimizer = build_optimizer(model, cfg.train)
    ema = EMA([(n, p) for n, p in model.named_parameters() if p.requires_grad], 0.9)

    stream, collator = DocumentStream(cfg.data, 0), Collator(tokenizer, cfg)
    batches = [next(collator.batches(_documents(stream, s, 0, 0), 2)) for s in range(2)]  # the same on each rank

    torch.manual_seed(1)
    ref_losses = [step(reference, ref_opt, batches[0])]
    torch.manual_seed(1)
    losses = [step(model, optimizer, batches[0])]
    ema.update((n, p) for n, p in model.named_parameters() if p.requires_grad)

    # save: whole tensors from the shards (every rank takes part)
    weights, optim, shadow = full_model_state(model), full_optimizer_state(model, optimizer), ema.state_dict()
    if rank == 0:
        model.save_pretrained(out / "model", state_dict=weights)
        torch.save(optim, out / "optimizer.pt")
    dist.barrier()
    ref_state = reference.state_dict()
    max_diff = max(float((weights[k].float() - ref_state[k].float()).abs().max()) for k in ref_state) if rank == 0 else None

    # resume into a fresh sharded model
    resumed = build()
    shard(resumed, names, mesh=mesh)
    load_full_model_state(resumed, MMInterleaved.from_pretrained(out / "model").state_dict())
    resumed_opt = build_optimizer(resumed, cfg.train)
    load_full_optimizer_state(resumed, resumed_opt, torch.load(out / "optimizer.pt", weights_only=True))
    resumed_ema = EMA([(n, p) for n, p in resumed.named_parameters() if p.requires_grad], 0.9)
    resumed_ema.load_state_dict(shadow)

    torch.manual_seed(2)
    ref_losses.append(step(reference, ref_opt, batches[1]))
    torch.manual_seed(2)
    losses.append(step(model, optimizer, batches[1]))
    torch.manual_seed(2)
    resumed_loss = step(resumed, resumed_opt, batches[1])
    after, again = full_model_state(model), full_model_state(resumed)
    ema_after = resumed_ema.state_dict()["shadow"]
    result = {
        "rank": rank, "world_size": world, "wrapped": names, "params_total": total, "params_local": local_numel(model),
        "gate_shapes": sorted({tuple(m.gate.shape) for m in model.llm.mmfs.values()}),
        "sharded_gate": type(next(iter(model.llm.mmfs.values())).gate).__name__,
        "losses": losses, "ref_losses": ref_losses, "resumed_loss": resumed_loss,
        "max_diff_vs_reference": max_diff,
        "resume_max_diff": max(float((after[k] - again[k]).abs().max()) for k in after) if rank == 0 else None,
        "ema_keys": len(ema_after), "ema_equal": all(torch.equal(ema_after[k], shadow["shadow"][k]) for k in ema_after),
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
