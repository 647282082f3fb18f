"""Real scale on tiny stand-ins: checkpoints that leave the base folders' frozen tensors out and
load back whole, moved base folders, recorded sizes, 1-element gates (old 0-dim ones load),
frozen parts in the compute dtype, --low-memory, string overrides, the out-of-memory line, and
configs/mm_interleaved_small.yaml."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgen.config import load_config
from mmgen.data.collate import Collator
from mmgen.data.tokenizer import build_tokenizer
from mmgen.models.mm_interleaved import MMInterleaved
from mmgen.training.trainer import out_of_memory, train

from .test_model import first_batch, losses, save_real_folders
from .test_train import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent


def real_config(root, *extra):
    return load_config(overrides=[
        "data.seq_len=96", f"model.llm.pretrained={root / 'llama'}", f"model.vision.pretrained={root / 'clip'}",
        f"model.decoder.pretrained={root / 'sd'}", "model.decoder.use_vae=true", "model.decoder.conditioners=[words, previous_image]",
        "model.mmfs.every_k=1", "model.vision.trainable=false", "model.llm.trainable=false",
        "model.llm.hidden_size=999", "model.llm.num_heads=9", *extra])  # sizes the folders overrule


def test_a_checkpoint_holds_what_training_changes_and_loads_whole(tmp_path):
    save_real_folders(tmp_path)
    cfg = real_config(tmp_path)
    model = MMInterleaved(cfg, build_tokenizer(cfg)).eval()
    assert (model.cfg.model.llm.hidden_size, model.cfg.model.llm.num_heads) == (64, 4)  # as loaded
    model.save_pretrained(tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert not any(k.startswith(("vision.tower.", "decoder.vae.")) for k in stored)
    assert not any(k.startswith("llm.lm.") for k in stored)  # frozen, and its vocabulary fits the tokenizer
    assert any(k.startswith("decoder.unet.") for k in stored)  # trainable: saved
    base = json.loads((tmp_path / "ckpt" / "base.json").read_text())
    assert base["folders"]["llm.lm."] == str(tmp_path / "llama") and base["tensors_left_out"] > 0
    whole = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in stored.values()) < 0.8 * whole

    loaded = MMInterleaved.from_pretrained(tmp_path / "ckpt").eval()
    batch = first_batch(Collator(model.tokenizer, cfg), rows=2)
    assert losses(model, batch) == losses(loaded, batch)
    saved_cfg = (tmp_path / "ckpt" / "config.yaml").read_text()
    assert "hidden_size: 64" in saved_cfg and "hidden_size: 999" not in saved_cfg

    (tmp_path / "llama").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError) as e:
        MMInterleaved.from_pretrained(tmp_path / "ckpt")
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "llama") in message and "model.llm.pretrained=" in message
    again = MMInterleaved.from_pretrained(tmp_path / "ckpt", overrides=[f"model.llm.pretrained={tmp_path / 'moved'}"])
    assert losses(again.eval(), batch) == losses(model, batch)


def mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header; the path is its 6th field
            current = len(parts) >= 6 and parts[5] == path
        elif current and parts[0] == "Rss:":
            total += int(parts[1])
    return total


def test_loading_holds_one_chunk_of_the_weights_file_at_a_time(tmp_path, monkeypatch):
    """The pages of a mapped file read so far count as the process's memory until it is unmapped
    (the 7B config's generation peaked there, 3.9 GB above the model): the file is mapped again for
    each chunk, so while a chunk is copied in only that chunk's pages are resident, and the chunks
    together load every tensor."""
    import mmgen.models.mm_interleaved as mmi

    cfg = tiny_config(tmp_path)
    model = MMInterleaved(cfg, build_tokenizer(cfg))
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    resident, real = [], torch.nn.Module.load_state_dict

    def spy(self, *args, **kwargs):
        if isinstance(self, MMInterleaved):
            resident.append(mapped_kib(str(weights)))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", spy)
    monkeypatch.setattr(mmi, "LOAD_CHUNK_BYTES", 1 << 16)  # several chunks from a tiny model
    loaded = MMInterleaved.from_pretrained(tmp_path / "ckpt")
    file_kib = weights.stat().st_size >> 10
    assert len(resident) > 3 and 0 < max(resident) < file_kib / 2, (resident, file_kib)  # one mapping: ~file_kib
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_frozen_parts_take_the_compute_dtype(tmp_path):
    save_real_folders(tmp_path)
    model = MMInterleaved(cfg := real_config(tmp_path, "model.frozen_dtype=bfloat16"), build_tokenizer(cfg))
    assert model.llm.lm.dtype == model.vision.tower.dtype == model.decoder.vae.dtype == torch.bfloat16
    assert model.decoder.unet.dtype == torch.float32  # trainable: fp32
    assert all(p.dtype == torch.float32 for p in model.llm.mmfs.parameters())
    auto = load_config(None, ["train.mixed_precision=bf16"])
    assert MMInterleaved.frozen_dtype(type("M", (), {"cfg": auto})()) == torch.bfloat16


def test_low_memory_stores_frozen_parts_in_bf16_and_computes_them_in_fp32(tmp_path, capsys):
    """``--low-memory`` on a float32 run (a CPU): the frozen CLIP, LLM and VAE keep their big layers in
    bf16 and cast each one up while it runs; the losses stay those of the float32 model."""
    from mmgen.training.low_memory import compute_frozen_in_float32

    save_real_folders(tmp_path)
    cfg = real_config(tmp_path, "train.low_memory=true")
    assert cfg.frozen_storage_dtype_name() == "bfloat16" and cfg.frozen_dtype_name() == "float32"  # what a model folder records
    full = MMInterleaved(real_config(tmp_path), build_tokenizer(cfg)).eval()
    low = MMInterleaved(cfg, build_tokenizer(cfg)).eval()
    low.load_state_dict(full.state_dict())  # the same weights, rounded to bf16 in the frozen parts
    assert compute_frozen_in_float32(low) == ["vision tower", "LLM", "VAE"]
    lm = low.llm.lm.model
    assert lm.layers[0].self_attn.q_proj.weight.dtype == lm.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.norm.weight.dtype == torch.float32 and low.decoder.unet.dtype == torch.float32
    batch = first_batch(Collator(low.tokenizer, cfg), rows=2)
    want, got = losses(full, batch), losses(low, batch)
    assert all(abs(got[k] - want[k]) <= 0.02 * abs(want[k]) + 1e-3 for k in want), (got, want)
    assert lm.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # stored in bf16 again after running
    low.train()
    torch.manual_seed(0)
    low(batch)["loss"].backward()
    assert all(p.grad is not None for p in low.llm.mmfs.parameters() if p.requires_grad)

    result = train(tiny_run := real_config(tmp_path, "train.low_memory=true", f"train.out_dir={tmp_path / 'run'}",
                                           "train.steps=2", "train.save_every=2", "train.ema_decay=null",
                                           "train.log_every=1"), show_progress=False)
    out = capsys.readouterr().out
    assert "frozen parts in bfloat16 (computed in float32, layer by layer: vision tower, LLM, VAE)" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert result.last_checkpoint is not None and tiny_run.train.low_memory


@pytest.mark.parametrize("bits, tol", [("8bit", 1e-3), ("4bit", 2e-2)])
def test_a_frozen_llm_read_in_8_or_4_bits_trains_what_reads_it(tmp_path, bits, tol):
    """``model.llm.quantize``: the frozen LLM's layers are bitsandbytes' 8-bit or NF4 layers, the
    losses stay near the full-precision model's, the gradient still reaches what feeds the LLM,
    and a checkpoint loads back with the LLM quantized again (its layers come from the base folder)."""
    save_real_folders(tmp_path)
    cfg = real_config(tmp_path)
    full = MMInterleaved(cfg, build_tokenizer(cfg))
    qcfg = real_config(tmp_path, f"model.llm.quantize={bits}")
    q = MMInterleaved(qcfg, build_tokenizer(qcfg))
    layer = q.llm.lm.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[bits]
    assert layer.weight.element_size() == 1  # int8, or two NF4 values per byte
    q.load_state_dict({k: v for k, v in full.state_dict().items() if ".layers." not in k or not k.startswith("llm.lm.")},
                      strict=False)  # the same new modules; the LLM's layers as read
    batch = first_batch(Collator(q.tokenizer, qcfg), rows=2)
    want, got = losses(full.eval(), batch), losses(q.eval(), batch)
    assert all(abs(got[k] - want[k]) <= tol * abs(want[k]) for k in want), (got, want)
    q.save_pretrained(tmp_path / "ckpt")
    again = MMInterleaved.from_pretrained(tmp_path / "ckpt").eval()
    assert type(again.llm.lm.model.layers[0].self_attn.q_proj) is type(layer)
    assert losses(again, batch) == got
    grads = []
    for model in (full, q):
        model.train().zero_grad()
        torch.manual_seed(0)
        model(batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.resampler.parameters()]))
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.95


def test_a_4bit_llm_trains_with_low_memory_in_a_float32_run(tmp_path, capsys):
    """4-bit LLM and ``--low-memory`` together on a CPU (no autocast): the quantized LLM computes in the
    run's float32, as the MMFS layers reading its hidden states do; it once ran in bf16 and stopped at
    the first MMFS layer (mat1 and mat2 must have the same dtype)."""
    save_real_folders(tmp_path)
    cfg = real_config(tmp_path, "model.llm.quantize=4bit", "train.low_memory=true", f"train.out_dir={tmp_path / 'run'}",
                      "train.steps=2", "train.save_every=2", "train.ema_decay=null", "train.log_every=1")
    result = train(cfg, show_progress=False)
    out = capsys.readouterr().out
    assert "(computed in float32, layer by layer: vision tower, VAE)" in out  # the LLM keeps its 4 bits
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 100 for r in rows)
    model = MMInterleaved.from_pretrained(result.last_checkpoint / "model")
    assert type(model.llm.lm.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_quantize_needs_a_frozen_pretrained_llm_and_bitsandbytes(tmp_path, monkeypatch):
    import sys

    from mmgen.config import ConfigError

    with pytest.raises(ConfigError, match="model.llm.quantize=4bit needs a frozen pretrained LLM"):
        load_config(None, ["model.llm.quantize=4bit"])
    save_real_folders(tmp_path)
    cfg = real_config(tmp_path, "model.llm.quantize=8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install bitsandbytes$"):
        MMInterleaved(cfg, build_tokenizer(cfg))


def test_gates_have_one_element_and_old_zero_dim_checkpoints_load():
    cfg = load_config(None, [*TINY, "model.llm.text_only_layers=1", "model.mmfs.every_k=1"])
    model = MMInterleaved(cfg, build_tokenizer(cfg))
    gates = {k: v for k, v in model.state_dict().items() if k.endswith(".gate")}
    assert gates and all(v.shape == (1,) for v in gates.values())
    assert model.contrastive.logit_scale.shape == (1,)
    old = {k: (v.reshape(()) + 0.25 if k.endswith((".gate", "logit_scale")) else v)
           for k, v in model.state_dict().items()}  # as saved before the change
    model.load_state_dict(old, strict=True)
    assert all(float(model.state_dict()[k]) == 0.25 for k in gates)


def test_overrides_keep_string_choices():
    cfg = load_config(None, ["train.mixed_precision=no", "model.llm.pretrained=off", "model.vision.trainable=no"])
    assert cfg.train.mixed_precision == "no" and cfg.model.llm.pretrained == "off"
    assert cfg.model.vision.trainable is False  # a boolean field still reads no as false


def test_low_memory_trains_with_checkpointing_and_a_lighter_optimizer(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", "train.steps=2", "train.save_every=2", "train.low_memory=true",
                      "train.ema_decay=null")
    result = train(cfg, show_progress=False)
    out = capsys.readouterr().out
    assert "gradient checkpointing in LLM, UNet, vision tower" in out
    assert "optimizer Adafactor" in out or "optimizer AdamW8bit" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    assert result.last_checkpoint is not None
    assert not (result.last_checkpoint / "trainer" / "weights.safetensors").exists()  # no EMA: no weight copy


def test_low_memory_optimizer_is_8bit_adamw_on_this_cpu_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    """bitsandbytes (a test dependency) runs its 8-bit AdamW on CPUs: ``--low-memory`` takes it there too,
    its state is 8-bit, and a run resumed half-way ends with the same losses and weights."""
    from mmgen.training.low_memory import low_memory_optimizer

    run = ["train.steps=4", "train.low_memory=true", "train.ema_decay=null", "train.log_every=1"]
    train(tiny_config(tmp_path / "a", *run, "train.save_every=4"), show_progress=False)
    assert "optimizer AdamW8bit;" in capsys.readouterr().out
    resumed = tiny_config(tmp_path / "b", *run, "train.save_every=2")
    train(resumed, max_steps=2, show_progress=False)
    train(resumed, resume="auto", show_progress=False)
    state = torch.load(tmp_path / "a" / "step-000004" / "trainer" / "optimizer.pt", weights_only=True)["state"]

    def moments(st: dict):  # bitsandbytes packs its state under __bnb_optimizer_quant_state__
        for k, v in st.items():
            yield from moments(v) if isinstance(v, dict) else [v.dtype] if k.startswith("state") else []

    kinds = {dtype for st in state.values() for dtype in moments(st)}
    assert torch.uint8 in kinds  # the weights of 4096 or more elements keep 1 byte per moment
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = (load_file(tmp_path / r / "step-000004" / "model" / "model.safetensors") for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    p = torch.nn.Parameter(torch.zeros(4096))
    opt, line = low_memory_optimizer([{"params": [p], "lr": 1e-3}], betas=(0.9, 0.999), eps=1e-8)
    assert isinstance(opt, torch.optim.Adafactor) and line.endswith("(torch; the 8-bit AdamW: bitsandbytes is not installed)")


def test_out_of_memory_is_one_line_with_the_part_the_need_and_the_switch(tmp_path):
    e = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")
    line = out_of_memory(e, "the backward pass of step 3", tmp_path / "step-000002")
    assert "\n" not in line and "backward pass of step 3" in line and "4.00 GiB" in line
    assert "--low-memory" in line and "data.seq_len" in line and "step-000002, untouched" in line


def test_the_small_config_is_valid_and_fits_one_24_gb_gpu():
    cfg = load_config(ROOT / "configs" / "mm_interleaved_small.yaml")
    m = cfg.model
    assert m.vision.pretrained and m.llm.pretrained and m.decoder.pretrained
    assert not m.vision.trainable and not m.llm.trainable and m.mmfs.trainable  # the reference's choices
    assert m.vision.hidden_size % m.vision.num_heads == 0 and m.llm.hidden_size <= 2048
    assert cfg.train.mixed_precision == "bf16" and m.llm.gradient_checkpointing


def test_export_writes_a_folder_that_stands_alone(tmp_path):
    from mmgen.models.export import export_model

    save_real_folders(tmp_path)
    cfg = real_config(tmp_path)
    model = MMInterleaved(cfg, build_tokenizer(cfg)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    export_model(tmp_path / "ckpt", tmp_path / "standalone")
    for name in ("llama", "clip", "sd"):  # the base folders go away: the export keeps working
        (tmp_path / name).rename(tmp_path / f"gone-{name}")
    moved = tmp_path / "elsewhere"
    (tmp_path / "standalone").rename(moved)
    loaded = MMInterleaved.from_pretrained(moved).eval()
    batch = first_batch(Collator(model.tokenizer, cfg), rows=2)
    assert losses(model, batch) == losses(loaded, batch)
    with pytest.raises(FileExistsError):
        export_model(tmp_path / "ckpt", moved)


def test_gpu_check_runs_its_steps_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.sh only ever runs blind on a GPU machine: SMOKE=1 runs the same steps on
    this CPU with tiny folders — the benchmark's JSON line, FSDP refused in one line (a CPU), the 4-bit
    LLM's 2 steps (bitsandbytes is a test dependency) — and the summary line says what ran."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "MMGEN_SCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    last = log.strip().splitlines()[-1]
    assert last == "gpu-check: scale ok, fsdp failed, zero2 skipped, nf4 ok", log[-3000:]
    assert done.returncode == 1  # FSDP cannot run on a CPU: the script says it failed
    result = json.loads((tmp_path / "out" / "scale.txt").read_text().strip().splitlines()[-1])
    assert result["errors"] is None and result["train_peak_gb_low_memory"] > 0 and result["generate_peak_gb"] > 0
    assert "error: the launch config asks for FSDP, which accelerate runs only on GPUs" in log
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics-nf4.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 100 for r in rows)
    assert not (tmp_path / "out" / "nf4").exists()  # runs stay under WORK; OUT holds a few small files
