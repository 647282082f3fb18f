"""Generation speed: KV cache, batching, the image step's overhead, one whole story.

    .venv/bin/python benchmarks/generate.py [--checkpoint PATH] [--device cpu|cuda] [--quick]

Measured in one run, side by side, with the same model:
  * ``kv_cache_speedup``: greedy decoding of 256 new tokens, the LLM re-run over the whole
    sequence at every step (no cache) vs the KV cache — time without / time with;
  * ``kv_cache_speedup_wide``: the same with a randomly initialised LLM of the same architecture
    and MMFS layers at 512 wide × 8 layers (26.5M parameters, untrained: only its speed means
    anything), where recomputing the prefix costs compute rather than per-call overhead;
  * ``batch_speedup``: documents/s generating 16 story prompts at batch size 16 vs 1;
  * ``image_overhead``: our image step (context perceiver, guidance, MMFS reading the previous
    image and, where the model takes it, the image as input channels, vision encoding of the
    result) vs a bare diffusers loop with the same UNet, scheduler and step count (guidance
    batch, no MMFS, no encoding) — our time / bare time;
  * ``story_seconds``: wall time of one 4-image story (free continuation of one sentence).
The last line is JSON with those keys.
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
from mmgen.generation.api import BUNDLED_CHECKPOINT, load_model  # noqa: E402
from mmgen.generation.generator import Generator, settings_from  # noqa: E402


CONTEXT_LEN = 24  # LLM context tokens of the image step (about one story frame and a sentence)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 3) -> float:
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


@torch.no_grad()
def decode(llm, start: int, n_new: int, *, cache: bool) -> None:
    """Greedy decoding of ``n_new`` tokens after the one-token prompt ``start``."""
    from transformers import DynamicCache

    dev = next(llm.parameters()).device
    ids = torch.tensor([[start]], device=dev)
    if cache:
        kv = DynamicCache(config=llm.lm.config)
        mask = torch.ones(1, 1, dtype=torch.long, device=dev)
        out = llm(input_ids=ids, attention_mask=mask, cache=kv, use_cache=True)
        for _ in range(n_new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask[:, :1]], dim=1)
            out = llm(input_ids=nxt, attention_mask=mask, cache=out.cache, use_cache=True)
    else:
        seq = ids
        for _ in range(n_new):
            out = llm(input_ids=seq, attention_mask=torch.ones_like(seq))
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)


def wide_llm(model, hidden: int = 512, layers: int = 8):
    """The bundled model's LLM (architecture, MMFS layers, vocabulary) at ``hidden`` × ``layers``,
    randomly initialised."""
    import dataclasses

    from mmgen.models.llm import MMFSLanguageModel, build_llm

    m = model.cfg.model
    cfg = dataclasses.replace(m.llm, pretrained=None, hidden_size=hidden, num_layers=layers,
                              num_heads=hidden // 64, intermediate_size=hidden * 11 // 4)
    lm = build_llm(cfg, len(model.tokenizer))
    llm = MMFSLanguageModel(lm, m.mmfs, value_dim=model.vision.out_dim, num_levels=model.vision.num_levels,
                            text_only_layers=cfg.text_only_layers)
    return llm.to(model.device).eval()


@torch.no_grad()
def bare_diffusers(model, n: int, steps: int, guidance: float, sampler: str) -> None:
    """The same UNet and scheduler in a plain classifier-free-guidance loop."""
    from diffusers.utils.torch_utils import randn_tensor

    dec, dev = model.decoder, model.device
    sched = dec.make_sampler(sampler, steps, dev)
    tokens = dec.cfg.context_tokens if dec.cfg.context_encoder == "perceiver" else CONTEXT_LEN
    cond = torch.randn(2 * n, tokens, dec.unet.config.cross_attention_dim, device=dev)
    side = dec.cfg.image_size // dec.vae_factor
    x = randn_tensor((n, dec.latent_channels, side, side), device=dev) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        # the conditioners' input channels (coords; zeros for an earlier image: none here)
        inp = dec.unet_input(inp)
        u, c = dec.unet(inp, t, encoder_hidden_states=cond).sample.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    dec.decode(x)


@torch.no_grad()
def ours_image_step(model, n: int, steps: int, guidance: float, sampler: str):
    """What the generator runs for one image: context encoder, guidance, MMFS reading the
    previous image, then vision encoding of the new one. The previous image's maps were made
    when that image was drawn (the generator encodes every image once), so they are prepared
    here, outside the returned (timed) function."""
    dec, dev = model.decoder, model.device
    context = torch.randn(n, CONTEXT_LEN, dec.context_dim, device=dev)
    mask = torch.ones(n, CONTEXT_LEN, dtype=torch.bool, device=dev)
    ids = torch.randint(0, len(model.tokenizer), (n, CONTEXT_LEN), device=dev)  # for the words conditioner
    prev = torch.zeros(n, 3, model.cfg.data.image_size, model.cfg.data.image_size, device=dev)
    _, maps = model.encode_images(prev)
    features = [m[:, None] for m in maps]  # one earlier image per document
    visible = torch.ones(n, 1, dtype=torch.bool, device=dev)

    @torch.no_grad()
    def step() -> None:
        images = dec.sample(context, mask, features, visible, context_ids=ids,
                            prev_image=prev if dec.previous_image else None, sampler=sampler, steps=steps, guidance=guidance)
        model.encode_images(images)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and prompts (a smoke run)")
    args = ap.parse_args()
    model, folder = load_model(args.checkpoint, args.device)
    dev = model.device
    s = settings_from(model.cfg.generate)
    print(f"checkpoint {folder}; device {dev}; threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    n_new = 64 if args.quick else 256

    # 1. KV cache vs re-running the whole sequence: the bundled LLM, then a wider one
    start = model.special.bos if model.special.bos is not None else model.special.eod
    t_cache = timed(lambda: decode(model.llm, start, n_new, cache=True), dev, repeats=2)
    t_plain = timed(lambda: decode(model.llm, start, n_new, cache=False), dev, repeats=1)
    print(f"decode {n_new} tokens: with KV cache {t_cache:.2f} s, without {t_plain:.2f} s")
    wide = wide_llm(model)
    w_cache = timed(lambda: decode(wide, start, n_new, cache=True), dev, repeats=2)
    w_plain = timed(lambda: decode(wide, start, n_new, cache=False), dev, repeats=1)
    n_wide = sum(p.numel() for p in wide.parameters())
    print(f"the same, LLM {n_wide / 1e6:.1f}M parameters (untrained): with KV cache {w_cache:.2f} s, "
          f"without {w_plain:.2f} s")
    del wide

    # 2. batch 16 vs 1 on 16 story prompts (each: one sentence, then 2 images of continuation)
    from mmgen.evaluation.shapes_prompts import eval_prompts

    prompts = eval_prompts("story", 4 if args.quick else 16, 0, model.cfg.data.image_size)
    gen = Generator(model)
    story = settings_from(s, max_images=2, max_new_tokens=48, temperature=0.0)

    def run(batch: int) -> None:
        for _ in gen.generate(prompts, settings_from(story, batch_size=batch)):
            pass

    t1 = timed(lambda: run(1), dev, repeats=1)
    t16 = timed(lambda: run(len(prompts)), dev, repeats=1)
    print(f"{len(prompts)} stories: batch 1 {t1:.2f} s ({len(prompts) / t1:.2f} docs/s), "
          f"batch {len(prompts)} {t16:.2f} s ({len(prompts) / t16:.2f} docs/s)")

    # 3. our image step vs a bare diffusers loop, one image, same UNet / scheduler / steps
    t_ours = timed(ours_image_step(model, 1, s.steps, s.guidance, s.sampler), dev)
    t_bare = timed(lambda: bare_diffusers(model, 1, s.steps, s.guidance, s.sampler), dev)
    print(f"one image, {s.sampler} {s.steps} steps: ours {t_ours:.3f} s, bare diffusers {t_bare:.3f} s")

    # 4. one 4-image story with the default settings
    one = eval_prompts("story", 1, 1, model.cfg.data.image_size)
    four = settings_from(s, max_images=4, batch_size=1)
    t = time.perf_counter()
    (_, doc), = list(gen.generate(one, four))
    story_s = time.perf_counter() - t
    print(f"one story: {story_s:.2f} s, {doc.meta['generated']['images']} images, "
          f"{doc.meta['generated']['tokens']} tokens")

    print(json.dumps({"kv_cache_speedup": round(t_plain / t_cache, 3),
                      "kv_cache_speedup_wide": round(w_plain / w_cache, 3), "batch_speedup": round(t1 / t16, 3),
                      "image_overhead": round(t_ours / t_bare, 3), "story_seconds": round(story_s, 3),
                      "story_images": doc.meta["generated"]["images"], "device": str(dev)}))


if __name__ == "__main__":
    main()
