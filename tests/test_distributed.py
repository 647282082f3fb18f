"""FSDP2 on 2 CPU processes over gloo (tests/fsdp_worker.py): sharded 1-element gates, EMA on the
shards, whole-tensor save and resume; checked against an unsharded copy trained on the same batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp2_shards_trains_saves_and_resumes_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    total = ranks[0]["params_total"]
    assert sum(r["params_local"] for r in ranks) >= total  # every element lives on some rank …
    assert all(r["params_local"] < 0.6 * total for r in ranks)  # … and each holds about half
    assert ranks[0]["wrapped"][0] == "LlamaDecoderLayer" and "CLIPEncoderLayer" in ranks[0]["wrapped"]
    assert ranks[0]["gate_shapes"] == [[1]] and ranks[0]["sharded_gate"] == "DTensor"
    for r in ranks:  # the sharded run is the unsharded one, step for step, and resumes exactly
        assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5)
        assert r["resumed_loss"] == pytest.approx(r["losses"][1], rel=1e-6)
        assert r["ema_keys"] > 0 and r["ema_equal"]
    assert ranks[0]["max_diff_vs_reference"] < 1e-5 and ranks[0]["resume_max_diff"] < 1e-6
    assert (tmp_path / "model" / "model.safetensors").is_file()  # whole tensors, written by rank 0
