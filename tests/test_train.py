"""Training: exact resume, atomic checkpoints, clear stops, Ctrl-C, DDP on 2 CPU processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgen.config import load_config
from mmgen.training.checkpoint import list_checkpoints
from mmgen.training.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parent.parent

# a very small model and batch, so that a step takes a fraction of a second
TINY = [
    "model.llm.hidden_size=32", "model.llm.num_layers=2", "model.llm.num_heads=2", "model.llm.intermediate_size=64",
    "model.mmfs.every_k=1", "model.mmfs.hidden_size=16", "model.mmfs.num_heads=2", "model.mmfs.num_points=2",
    "model.vision.hidden_size=16", "model.vision.num_layers=1", "model.vision.num_heads=2",
    "model.vision.intermediate_size=32", "model.resampler.hidden_size=16", "model.resampler.num_heads=2",
    "model.resampler.num_queries=4", "model.decoder.block_out_channels=[8,16,16]",
    "model.decoder.cross_attention_dim=16", "model.decoder.context_tokens=4",
    "data.seq_len=64", "train.batch_size=2", "train.warmup_steps=1", "train.log_every=1",
    "train.image_loss_limit=4", "train.lr=1e-3",
    # the plain model (the shipped config turns CosMo on; tests/test_cosmo.py trains it)
    "model.llm.text_only_layers=0", "train.loss_weights.contrastive=0",
]


def tiny_config(out_dir, *extra):
    return load_config(None, [*TINY, f"train.out_dir={out_dir}", *extra])


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_identical_losses_and_weights(tmp_path):
    straight = tiny_config(tmp_path / "a", "train.steps=4", "train.save_every=4", "train.ema_decay=0.9")
    train(straight, show_progress=False)
    resumed = tiny_config(tmp_path / "b", "train.steps=4", "train.save_every=2", "train.ema_decay=0.9")
    first = train(resumed, max_steps=2, show_progress=False)
    assert first.step == 2
    train(resumed, resume="auto", show_progress=False)

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert (ra["text_loss"], ra["image_loss"], ra["lr"]) == (rb["text_loss"], rb["image_loss"], rb["lr"])
        assert ra["grad_norm"] == rb["grad_norm"] and ra["grad_norm"] > 0  # before clipping
    for sub in ("model/model.safetensors", "trainer/weights.safetensors", "trainer/ema.safetensors"):
        wa = load_file(tmp_path / "a" / "step-000004" / sub)
        wb = load_file(tmp_path / "b" / "step-000004" / sub)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    # the exported model holds the EMA weights, not the raw ones
    model = load_file(tmp_path / "a" / "step-000004" / "model" / "model.safetensors")
    raw = load_file(tmp_path / "a" / "step-000004" / "trainer" / "weights.safetensors")
    assert any(not torch.equal(model[k], raw[k]) for k in raw)


def test_checkpoints_are_complete_and_pruned(tmp_path):
    cfg = tiny_config(tmp_path / "run", "train.steps=4", "train.save_every=1", "train.keep_last_n=2")
    result = train(cfg, show_progress=False)
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]
    assert result.last_checkpoint == run / "step-000004"
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    ckpt = run / "step-000004"
    for name in ("model/model.safetensors", "model/config.yaml", "model/tokenizer", "trainer/optimizer.pt",
                 "trainer/scheduler.pt", "trainer/state.json"):
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "trainer" / "state.json").read_text())["step"] == 4
    assert (run / "loss.png").stat().st_size > 0
    # the checkpoint's model folder loads on its own
    from mmgen.models.mm_interleaved import MMInterleaved
    assert isinstance(MMInterleaved.from_pretrained(ckpt / "model"), MMInterleaved)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from mmgen.models.mm_interleaved import MMInterleaved

    cfg = tiny_config(tmp_path / "run", "train.steps=6", "train.save_every=2")
    train(cfg, max_steps=2, show_progress=False)
    good = (tmp_path / "run" / "step-000002" / "model" / "model.safetensors").read_bytes()

    original = MMInterleaved.forward

    def poisoned(self, batch, **kw):
        out = original(self, batch, **kw)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MMInterleaved, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 2.*step-000002.*untouched"):
        train(cfg, resume="auto", show_progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert (tmp_path / "run" / "step-000002" / "model" / "model.safetensors").read_bytes() == good


def test_resume_from_a_path_that_is_not_a_checkpoint(tmp_path):
    from mmgen.training.checkpoint import CheckpointError

    cfg = tiny_config(tmp_path / "run", "train.steps=2")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        train(cfg, resume=str(tmp_path), show_progress=False)


def test_init_from_a_model_folder_widens_the_unet_input(tmp_path):
    """``train.init_from``: the weights of a trained model folder and a fresh schedule; the input
    channels the ``previous_image`` conditioner adds start at zero, so the model starts as it was;
    a model folder of another shape is a clear error."""
    train(tiny_config(tmp_path / "a", "train.steps=2", "train.save_every=2", "model.decoder.conditioners=[words, coords]"),
          show_progress=False)
    source = tmp_path / "a" / "step-000002" / "model"
    before = load_file(source / "model.safetensors")

    cfg = tiny_config(tmp_path / "b", "train.steps=1", "model.decoder.conditioners=[words, previous_image, coords]",
                      f"train.init_from={source}", "train.lr=1e-12", "train.lr_pretrained=1e-12")  # barely moves
    train(cfg, show_progress=False)
    after = load_file(tmp_path / "b" / "step-000001" / "model" / "model.safetensors")
    assert after.keys() == before.keys()
    key = "decoder.unet.conv_in.weight"
    assert after[key].shape[1] == before[key].shape[1] + 3
    assert torch.allclose(after[key][:, :before[key].shape[1]], before[key], atol=1e-6)
    assert after[key][:, before[key].shape[1]:].abs().max() < 1e-6
    assert all(torch.allclose(after[k], before[k], atol=1e-6) for k in before if k != key)
    assert losses(tmp_path / "b")[0]["step"] == 1  # a run of its own: step 1, not 3

    wider = tiny_config(tmp_path / "c", "train.steps=1", "model.llm.hidden_size=48", "model.decoder.conditioners=[words, coords]",
                        f"train.init_from={source}")
    with pytest.raises(TrainingError, match="does not fit the model"):
        train(wider, show_progress=False)
    with pytest.raises(TrainingError, match="not a model folder"):
        train(tiny_config(tmp_path / "d", f"train.init_from={tmp_path}"), show_progress=False)


def _cli(*args):
    return [sys.executable, "-m", "cli.main", *args]


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "run"
    args = ["train", *TINY, f"train.out_dir={run}", "train.steps=100000", "train.save_every=100000"]
    proc = subprocess.Popen(_cli(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (run / "metrics.jsonl").exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else ""
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "saving a checkpoint" in out and "--resume auto" in out
    (step, ckpt), = list_checkpoints(run)
    assert step >= 1 and (ckpt / "model" / "model.safetensors").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_on_two_cpu_processes(tmp_path):
    """configs/accelerate/ddp_cpu.yaml starts 2 processes that form one DDP group: each row of the
    metrics records both ranks, which trained on different documents (different losses) with the
    same all-reduced gradients (equal norms); one run prints one "done" line."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"), "-m", "cli.main", "train", *TINY,
           f"train.out_dir={run}", "train.steps=2", "train.save_every=2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [2]
    rows = losses(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["world_size"] == 2 and r["engine"] == "ddp", r
        assert len(r["rank_losses"]) == 2 and r["rank_losses"][0] != r["rank_losses"][1]  # own documents
        a, b = r["rank_grad_norms"]
        assert a > 0 and abs(a - b) <= 1e-6 * a, r  # gradients agreed after the all-reduce
        assert r["samples_per_s"] > 0
    assert done.stdout.count("done at step 2") == 1, done.stdout


def test_fsdp_where_it_cannot_run_is_one_clear_line(tmp_path):
    """An FSDP launch config on a CPU machine stops before training instead of starting copies."""
    if torch.cuda.is_available():
        pytest.skip("FSDP can run here")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    done = subprocess.run(_cli("train", *TINY, f"train.out_dir={run}", "train.steps=1"), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "asks for FSDP" in err[0] and "ddp_cpu.yaml" in err[0], done.stderr
    assert not list_checkpoints(run)
