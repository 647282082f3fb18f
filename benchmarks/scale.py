"""Real scale, measured: random weights at the public sizes, in the memory they need.

Builds random-weight Hugging Face folders at the public architecture sizes (CLIP ViT-L/14, the
SD-1.5 UNet and VAE, a Llama at 7B width with --llm-layers layers: 32 on a GPU) into a cache
folder outside the repository, then measures, each part in a process of its own (so its peak
memory is its own):

- a training step (batch 1, two 512 px images, the UNet trainable, configs/mm_interleaved_7b.yaml)
  with and without --low-memory: peak memory and seconds;
- the checkpoint it saved (the weights, GB);
- loading it and generating a 2-image document: peak memory;
- MMFS's share of a UNet step at 64x64 latents with 4 earlier images (target <= 10 %), an LLM
  step with vs without its MMFS layers (target <= 1.15x), our image step vs a bare diffusers loop
  over the same UNet and scheduler (target <= 1.10x).

Peak memory is the peak resident set size of the process on CPU, the peak allocated GPU memory
on CUDA. The last line is JSON with train_peak_gb, train_peak_gb_low_memory, step_seconds,
checkpoint_gb, generate_peak_gb, mmfs_unet_share (a sampling step: the earlier images' values are
prepared once per image, as `sample` does; that preparation is `mmfs_prepare_s`; 5 alternating runs with
and without MMFS, the fastest of each compared), llm_mmfs_ratio,
image_step_vs_diffusers.

    python benchmarks/scale.py --llm-layers 4              # CPU: ~25 minutes, ~16 GB
    python benchmarks/scale.py --device cuda --llm-layers 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MMGEN_SCALE_CACHE", Path.home() / ".cache" / "mmgen-scale"))
PROMPT = {"id": "scale", "segments": [{"type": "text", "text": "A small red circle is on the left."}, {"type": "image"},
                                      {"type": "text", "text": "The circle moves to the right."}, {"type": "image"}]}


def folder_paths(root: Path, llm_layers: int, smoke: bool = False) -> dict[str, Path]:
    """Where :func:`build_folders` puts the CLIP, LLM and Stable Diffusion folders."""
    if smoke:
        return {"clip": root / "clip", "llm": root / "llama", "sd": root / "sd"}
    return {"clip": root / "clip-vit-large-patch14", "llm": root / f"llama-7b-width-{llm_layers}-layers",
            "sd": root / "stable-diffusion-v1-5"}


def build_folders(root: Path, llm_layers: int, smoke: bool = False, device: str = "cpu") -> dict[str, Path]:
    """Random-weight folders at the public sizes (kept between runs); ``smoke``: tiny ones, to try the script."""
    import torch

    if smoke:
        return _smoke_folders(root)

    torch.manual_seed(0)
    out = folder_paths(root, llm_layers)
    if not (out["clip"] / "config.json").is_file():
        from transformers import CLIPVisionConfig, CLIPVisionModel

        CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=224, patch_size=14,
                                         projection_dim=768)).save_pretrained(out["clip"])
    if not (out["llm"] / "config.json").is_file():
        from transformers import AutoModelForCausalLM, LlamaConfig

        from mmgen.data.tokenizer import shapestories_sentences, train_tokenizer

        with torch.device(device):  # made in bf16, as Vicuna ships (on the GPU when there is one: 32 layers)
            lm = AutoModelForCausalLM.from_config(LlamaConfig(
                vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                tie_word_embeddings=False), dtype=torch.bfloat16)
        lm.save_pretrained(out["llm"])
        del lm
        train_tokenizer(shapestories_sentences(), 1000).save_pretrained(out["llm"])
    if not (out["sd"] / "unet" / "config.json").is_file():
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        UNet2DConditionModel(sample_size=64, cross_attention_dim=768).save_pretrained(out["sd"] / "unet")  # SD-1.5
        AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2).save_pretrained(out["sd"] / "vae")
        DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      steps_offset=1).save_pretrained(out["sd"] / "scheduler")
    return out


def _smoke_folders(root: Path) -> dict[str, Path]:
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.test_model import save_real_folders

    if not (root / "llama" / "config.json").is_file():
        save_real_folders(root)
    return folder_paths(root, 0, smoke=True)


def overrides(folders: dict[str, Path], run: Path, device: str, smoke: bool = False) -> list[str]:
    if smoke:
        return [f"model.vision.pretrained={folders['clip']}", f"model.llm.pretrained={folders['llm']}",
                f"model.decoder.pretrained={folders['sd']}", f"train.out_dir={run}", "model.mmfs.every_k=1",
                "model.mmfs.hidden_size=32", "model.mmfs.num_heads=2", "model.resampler.hidden_size=32",
                "model.resampler.num_heads=2", "model.resampler.num_layers=1", "model.decoder.perceiver_layers=1",
                "model.decoder.cross_attention_dim=32", "model.decoder.image_size=64",
                "model.vision.feature_scales=[1.0]", "model.mmfs.unet_levels=[0,1]",
                "data.sources=[{kind: shapes, weight: 1.0}]", "data.seq_len=256", "data.image_size=64",
                "data.max_images_per_seq=2", "data.num_workers=0", "train.batch_size=1", "train.grad_accum=1",
                "train.image_loss_limit=2", "train.steps=2", "train.save_every=2", "train.log_every=1",
                "train.warmup_steps=1", "train.mixed_precision=no"]
    return [f"model.vision.pretrained={folders['clip']}", f"model.llm.pretrained={folders['llm']}",
            f"model.decoder.pretrained={folders['sd']}", "model.decoder.trainable=true", f"train.out_dir={run}",
            "data.sources=[{kind: shapes, weight: 1.0}]", "data.seq_len=256", "data.image_size=512",
            "data.max_images_per_seq=2", "data.num_workers=0", "train.batch_size=1", "train.grad_accum=1",
            "train.image_loss_limit=2", "train.steps=2", "train.save_every=2", "train.log_every=1",
            "train.warmup_steps=1", "generate.steps=5", "generate.max_new_tokens=8",
            # bf16 on GPUs; fp32 on CPUs (bf16 matmuls run ~4x slower than fp32 on CPUs without bf16 units)
            f"train.mixed_precision={'bf16' if device != 'cpu' else 'no'}"]


def peak_gb() -> float:
    """This process's peak: resident set (CPU) or allocated GPU memory (CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GiB


def child(args: list[str], log: Path) -> dict:
    """Run this script in a subprocess for one part; its last line is its JSON result."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, __file__, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        return {"error": tail[0][:300] if tail else f"exit {done.returncode}"}
    return json.loads(lines[-1])


def part_train(cfg_overrides: list[str], low_memory: bool, limit_gb: float | None) -> dict:
    from mmgen.config import load_config
    from mmgen.training.trainer import TrainingError, train

    if limit_gb:  # on a shared machine: fail with mmgen's out-of-memory line instead of meeting the OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), resource.RLIM_INFINITY))

    cfg = load_config(ROOT / "configs" / "mm_interleaved_7b.yaml",
                      [*cfg_overrides, *(["train.low_memory=true"] if low_memory else [])])
    t0 = time.perf_counter()
    try:
        result = train(cfg, show_progress=False)
    except TrainingError as e:
        return {"error": str(e), "peak_gb": round(peak_gb(), 2)}
    rows = [json.loads(x) for x in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    weights = result.last_checkpoint / "model" / "model.safetensors"
    trainer = sum(p.stat().st_size for p in (result.last_checkpoint / "trainer").iterdir())
    return {"peak_gb": round(peak_gb(), 2), "seconds": round(time.perf_counter() - t0, 1),
            "step_seconds": round(1.0 / rows[-1]["samples_per_s"], 1),  # batch 1: the second step
            "checkpoint_gb": round(weights.stat().st_size / 1e9, 2), "trainer_state_gb": round(trainer / 1e9, 2),
            "checkpoint": str(result.last_checkpoint)}


def part_generate(checkpoint: str, device: str, out: Path, low_memory: bool = False) -> dict:
    from mmgen.data.documents import Document
    from mmgen.generation.api import generate
    from mmgen.models.mm_interleaved import MMInterleaved

    t0 = time.perf_counter()
    model = MMInterleaved.from_pretrained(Path(checkpoint) / "model", device=device, low_memory=low_memory).eval()
    load_s = time.perf_counter() - t0
    doc = Document.from_dict(PROMPT) if hasattr(Document, "from_dict") else None
    if doc is None:
        from mmgen.data.documents import Segment

        doc = Document("scale", [Segment("text", text=PROMPT["segments"][0]["text"]), Segment("image"),
                                 Segment("text", text=PROMPT["segments"][2]["text"]), Segment("image")])
    t1 = time.perf_counter()
    (result,) = generate([doc], model=model, steps=5, max_images=2, max_new_tokens=8, batch_size=1, seed=0)
    images = sum(s.type == "image" and s.source == "generated" for s in result.segments)
    return {"peak_gb": round(peak_gb(), 2), "load_seconds": round(load_s, 1), "images": images,
            "seconds_per_image": round((time.perf_counter() - t1) / max(images, 1), 1)}


def part_speed(checkpoint: str, device: str) -> dict:
    """MMFS's share of a UNet step, the LLM with vs without MMFS, our image step vs bare diffusers."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generate import bare_diffusers, ours_image_step, timed  # the loops of benchmarks/generate.py

    from mmgen.models.mm_interleaved import MMInterleaved

    model = MMInterleaved.from_pretrained(Path(checkpoint) / "model", device=device).eval()
    dec, dtype = model.decoder, model.decoder.unet.dtype
    torch.manual_seed(0)
    with torch.no_grad():
        # 1. a UNet step at 64x64 latents reading 4 earlier images, with and without MMFS
        C, sizes = model.vision.out_dim, model.vision.map_sizes()
        feats = [torch.randn(1, 4, C, s, s, device=device, dtype=dtype) for s in sizes]
        visible = torch.ones(1, 4, dtype=torch.bool, device=device)
        x = torch.randn(1, dec.latent_channels, 64, 64, device=device, dtype=dtype)
        t = torch.tensor([500], device=device)
        ctx = torch.randn(1, 77, dec.cross_dim, device=device, dtype=dtype)  # the encoded context
        prev = torch.zeros(1, 3, 512, 512, device=device, dtype=dtype) if dec.previous_image else None

        def context():
            return dec.image_context(feats, visible, prev_image=prev) if prev is not None else \
                dec.image_context(feats, visible)

        # a sampling step, as in `sample`: the earlier images' values are prepared once per image,
        # when the context is entered, and every denoising step reads them
        # with and without alternate, 5 pairs, so that a busy moment of the machine hits both
        # the share from the fastest of each (noise only ever adds time: on 2 busy cores single pairs
        # ranged 0.06-0.13, and the median of 5 pairs 0.058-0.112 between two runs of the same code)
        with_times, without_times = [], []
        for _ in range(5):
            with context():
                with_times.append(timed(lambda: dec.denoise(x, t, ctx), device, 1))
            without_times.append(timed(lambda: dec.denoise(x, t, ctx), device, 1))
        share = (min(with_times) - min(without_times)) / min(with_times)
        pairs = [round((w - wo) / w, 3) for w, wo in zip(with_times, without_times)]

        def prepare():  # the once-per-image preparation (entering the context; leaving it costs nothing)
            with context():
                pass

        prepare_s = timed(prepare, device, 2)
        # 2. the LLM over 256 tokens with and without its MMFS layers (2 images)
        T, M = 256, 2
        ids = torch.randint(0, len(model.tokenizer), (1, T), device=device)
        llm_feats = [torch.randn(1, M, C, s, s, device=device, dtype=dtype) for s in sizes]
        vis = torch.ones(1, T, M, dtype=torch.bool, device=device)
        llm_with = timed(lambda: model.llm(input_ids=ids, image_features=llm_feats, visible=vis), device, 5)
        llm_without = timed(lambda: model.llm(input_ids=ids), device, 5)
        # 3. our image step vs the bare diffusers loop (benchmarks/generate.py), 5 steps, guidance
        ours = timed(ours_image_step(model, 1, 5, 7.5, "ddim"), device, 1)
        bare = timed(lambda: bare_diffusers(model, 1, 5, 7.5, "ddim"), device, 1)
    return {"mmfs_unet_share": round(share, 3), "mmfs_unet_share_pairs": pairs, "mmfs_prepare_s": round(prepare_s, 3),
            "llm_mmfs_ratio": round(llm_with / llm_without, 3),
            "image_step_vs_diffusers": round(ours / bare, 3), "unet_step_s": round(min(with_times), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--skip-full", action="store_true", help="Only the --low-memory training step.")
    ap.add_argument("--limit-gb", type=float, default=None,
                    help="Address-space cap of each training process (CPU): past it the step stops with "
                         "mmgen's out-of-memory line (default: none).")
    ap.add_argument("--smoke", action="store_true", help="Tiny folders and 64 px: try the script in a minute.")
    ap.add_argument("--print-overrides", action="store_true",
                    help="Print the training run's config overrides, one a line (benchmarks/gpu_check.sh reuses them).")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--arg", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "train":
        print(json.dumps(part_train(args.arg[1:], args.arg[0] == "low", args.limit_gb)))
        return
    if args.part == "generate":
        print(json.dumps(part_generate(args.arg[0], args.device, Path(args.arg[1]), args.arg[2:] == ["low"])))
        return
    if args.part == "speed":
        print(json.dumps(part_speed(args.arg[0], args.device)))
        return

    cache = args.cache.expanduser() / ("smoke" if args.smoke else "")
    if args.print_overrides:  # the folders this script builds, with the run's settings
        run = overrides(folder_paths(cache, args.llm_layers, args.smoke), cache / "runs" / "x", args.device, args.smoke)
        print("\n".join(o for o in run if not o.startswith("train.out_dir=")))
        return
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = build_folders(cache, args.llm_layers, args.smoke, args.device)
    print(f"folders ready in {time.perf_counter() - t0:.0f} s under {cache}", flush=True)
    logs = cache / "logs"
    logs.mkdir(exist_ok=True)
    results = {}
    for name, low in (("low_memory", True),) + ((("full", False),) if not args.skip_full else ()):
        run = cache / "runs" / name
        shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
        extra = [f"--arg={'low' if low else 'full'}",
                 *[f"--arg={o}" for o in overrides(folders, run, args.device, args.smoke)]]
        cap = [f"--limit-gb={args.limit_gb}"] if args.limit_gb else []
        results[name] = child(["--part", "train", "--device", args.device, *cap, *extra], logs / f"train-{name}.log")
        print(f"train ({name}): {json.dumps(results[name])}", flush=True)
    ckpt = results["low_memory"].get("checkpoint")
    if ckpt:
        results["generate"] = child(["--part", "generate", "--device", args.device, f"--arg={ckpt}",
                                     f"--arg={cache / 'out'}"], logs / "generate.log")
        print(f"generate: {json.dumps(results['generate'])}", flush=True)
        if args.device != "cpu":  # --low-memory: bf16, big components on the device only while they run
            results["generate_low"] = child(["--part", "generate", "--device", args.device, f"--arg={ckpt}",
                                             f"--arg={cache / 'out'}", "--arg=low"], logs / "generate-low.log")
            print(f"generate (low memory): {json.dumps(results['generate_low'])}", flush=True)
        results["speed"] = child(["--part", "speed", "--device", args.device, f"--arg={ckpt}"], logs / "speed.log")
        print(f"speed: {json.dumps(results['speed'])}", flush=True)
    low, full = results["low_memory"], results.get("full", {})
    gen, speed = results.get("generate", {}), results.get("speed", {})
    print(json.dumps({
        "device": args.device, "llm_layers": args.llm_layers,
        "train_peak_gb": full.get("peak_gb"), "train_peak_gb_low_memory": low.get("peak_gb"),
        "step_seconds": full.get("step_seconds"), "step_seconds_low_memory": low.get("step_seconds"),
        "checkpoint_gb": low.get("checkpoint_gb"), "generate_peak_gb": gen.get("peak_gb"),
        "seconds_per_image": gen.get("seconds_per_image"),
        "generate_peak_gb_low_memory": results.get("generate_low", {}).get("peak_gb"),
        "mmfs_unet_share": speed.get("mmfs_unet_share"), "mmfs_prepare_s": speed.get("mmfs_prepare_s"),
        "llm_mmfs_ratio": speed.get("llm_mmfs_ratio"),
        "image_step_vs_diffusers": speed.get("image_step_vs_diffusers"),
        "errors": {k: v["error"] for k, v in results.items() if "error" in v} or None}))


if __name__ == "__main__":
    main()
