"""COSMOS alignment stage (arXiv 2412.01814): contrastive loss + cross-modality self-distillation.

The model (crops, towers, heads, losses) is ``mmgen/models/cosmos.py``; this file is the stage:
its step, checkpoints and retrieval score, run by the loop ``mmgen train`` uses
(``mmgen/training/loop.py``). What one step does (``mmgen train --stage align``):

1. draw B random ShapeStories frames with their introduction sentences (the sentence that
   describes a frame completely; change sentences only make sense after the previous frame);
2. multi-crop: G global crops (large random resized crops of the frame, at the tower's size)
   and L local crops (small ones, at ``align.local_size``, position embeddings interpolated);
   the full sentence is the global caption, random runs of its words are cropped captions;
3. the student — vision tower (the main model's ``CLIPVisionModel``), CLIP text encoder,
   linear projections to E and a DINO-style head to K prototypes — encodes every view; the
   teacher, an EMA copy that gets no gradients, encodes the global views only;
4. losses:
   - symmetric InfoNCE with a learned temperature between each global crop and the global
     caption (frames that share a sentence count as positives of each other);
   - self-distillation, DINO-style (teacher centred and sharpened, student softmax at a
     higher temperature, cross-entropy): uni-modal — image crops → teacher's global image
     crops, cropped captions → teacher's global caption; cross-modal, through the student's
     cross-attention module — text-conditioned image features (the caption's embedding
     attends to a local crop's patch tokens) → teacher's global caption, image-conditioned
     text features (a global crop's embedding attends to a cropped caption's tokens) →
     teacher's global image;
   - ``loss = contrastive + align.distill_weight · mean(the four distillation terms)``;
5. optimiser step, then the teacher moves towards the student by EMA (``teacher_momentum``).

A checkpoint ``RUN/step-NNNNNN/`` holds ``vision/`` (the exported ``CLIPVisionModel`` with a
``preprocessor_config.json`` of the normalisation used, loadable as ``model.vision.pretrained``),
``text/`` (text encoder + tokenizer), ``projection.safetensors``, ``align.json``,
``config.yaml`` and ``trainer/`` (the whole student/teacher state, optimiser, schedule, step).
The student is exported by default (``align.export``): it is what the contrastive loss trains
directly, while the teacher trails it by the EMA, far behind in runs of a few hundred steps.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config
from ..models.cosmos import Cosmos, DualEncoder, draw_frames, make_views
from .loop import Loop, StepOutput, TrainingError, trim_metrics

COSMOS_WEIGHTS = "cosmos.safetensors"
PROJECTION_WEIGHTS = "projection.safetensors"
ALIGN_META = "align.json"


# ---------------------------------------------------------------------------------------------
# checkpoints: exported towers + the whole training state, written atomically


@contextmanager
def _quiet_hf():
    """No transformers progress bars ("Writing model shards") inside our own progress bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def export_towers(model: Cosmos, tokenizer, cfg: Config, folder: Path) -> None:
    """Write ``vision/``, ``text/``, ``projection.safetensors`` and ``align.json`` into ``folder``."""
    from safetensors.torch import save_file
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    enc = model.student if cfg.align.export == "student" else model.teacher
    S = model.image_size
    with _quiet_hf():
        enc.vision.save_pretrained(folder / "vision")
        enc.text.save_pretrained(folder / "text")
    # the normalisation the tower was trained with; build_vision_tower's users read it back
    CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                          image_mean=list(model.mean), image_std=list(model.std)).save_pretrained(folder / "vision")
    tokenizer.save_pretrained(str(folder / "text"))
    save_file({"vision_proj.weight": enc.vision_proj.weight.detach().contiguous().cpu(),
               "text_proj.weight": enc.text_proj.weight.detach().contiguous().cpu(),
               "logit_scale": model.logit_scale.detach().reshape(1).cpu()},
              folder / PROJECTION_WEIGHTS)
    meta = {"export": cfg.align.export, "frame_size": cfg.data.image_size, "text_max_len": cfg.align.text_max_len,
            "embed_dim": cfg.align.embed_dim}
    (folder / ALIGN_META).write_text(json.dumps(meta, indent=2) + "\n")


def save_align_checkpoint(run: Path, step: int, *, model: Cosmos, tokenizer, cfg: Config, optimizer, scheduler,
                          state: dict) -> Path:
    """Write ``RUN/step-{step}`` under a temporary name, rename it into place, prune old ones."""
    from safetensors.torch import save_file

    from .checkpoint import _contiguous, atomic_checkpoint, step_dir

    with atomic_checkpoint(run, step, cfg.train.keep_last_n) as tmp:
        export_towers(model, tokenizer, cfg, tmp)
        (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        trainer = tmp / "trainer"
        trainer.mkdir()
        save_file(_contiguous(model.state_dict()), trainer / COSMOS_WEIGHTS)
        torch.save(optimizer.state_dict(), trainer / "optimizer.pt")
        torch.save(scheduler.state_dict(), trainer / "scheduler.pt")
        (trainer / "state.json").write_text(json.dumps(state, indent=2))
    return step_dir(run, step)


# ---------------------------------------------------------------------------------------------
# 5. the training loop


@dataclass
class AlignResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None
    retrieval: dict | None = None
    interrupted: bool = False


def _param_groups(model: Cosmos, cfg: Config) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.trainable_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_align(cfg: Config, *, resume: str | None = None, max_steps: int | None = None,
                show_progress: bool = True) -> AlignResult:
    """Run the COSMOS alignment stage into ``align.out_dir``; ``max_steps`` stops early (the
    schedule keeps ``align.steps``). Evaluates retrieval at the end into ``RUN/retrieval.json``."""
    from safetensors.torch import load_file

    from ..data.tokenizer import build_tokenizer, load_tokenizer
    from .checkpoint import CheckpointError, _read, load_trainer_state, remove_partial, resolve_resume
    from .optim import warmup_cosine

    a, tc = cfg.align, cfg.train
    run = Path(a.out_dir)
    ckpt = resolve_resume(resume, run)
    if ckpt is not None and not (ckpt / "trainer" / COSMOS_WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt}: not an align checkpoint (no trainer/{COSMOS_WEIGHTS}); resume an align "
                              "run from its own align.out_dir")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    for partial in remove_partial(run):
        print(f"removed {partial.name}, a checkpoint whose save was cut short")

    # 1. tokenizer, model, optimiser — from the checkpoint when resuming
    tokenizer = load_tokenizer(ckpt / "text") if ckpt else build_tokenizer(cfg)
    torch.manual_seed(tc.seed)
    model = Cosmos(cfg, tokenizer)
    device = torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=a.lr, betas=tuple(tc.betas), eps=tc.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_cosine(
        k, warmup=a.warmup_steps, total=a.steps, min_ratio=tc.lr_min_ratio))
    start, samples_seen = 0, 0
    if ckpt is not None:
        saved = load_trainer_state(ckpt)
        try:
            model.load_state_dict(_read(ckpt / "trainer" / COSMOS_WEIGHTS, load_file))
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(f"{ckpt}: its state does not fit this config ({str(e).splitlines()[0]}); resume "
                                f"with the config it was trained with (-c {ckpt}/config.yaml)") from None
        start, samples_seen = saved["state"]["step"], saved["state"].get("samples_seen", 0)
        print(f"resumed from {ckpt} at step {start}")
    trim_metrics(run / "metrics.jsonl", start)

    def save(step: int) -> Path:
        state = {"stage": "align", "step": step, "seed": tc.seed, "samples_seen": loop.samples_seen}
        return save_align_checkpoint(run, step, model=model, tokenizer=tokenizer, cfg=cfg, optimizer=optimizer,
                                     scheduler=scheduler, state=state)

    # 2. one step: the frames and crops are a function of (seed, step); the loop logs, saves and stops
    trainable = [p for _, p in model.trainable_parameters()]
    model.train()

    def step_fn(step: int) -> StepOutput:
        rng = random.Random(f"mmgen-align/{tc.seed}/{step}")
        images, sentences = draw_frames(rng, a.batch_size, cfg.data.image_size)
        views = make_views(images, sentences, a, tokenizer, image_size=model.image_size, rng=rng).to(device)
        out = model(views)
        loop.check_finite(out["loss"], step, "Try a lower align.lr.")
        out["loss"].backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        model.update_teacher(a.teacher_momentum)
        return StepOutput({**{k: round(float(v.detach()), 6) for k, v in out.items()},
                           "lr": scheduler.get_last_lr()[0]}, a.batch_size)

    end = min(a.steps, max_steps) if max_steps is not None else a.steps
    loop = Loop(run, start, end, step_fn, save, tc.save_every, tc.log_every, last_checkpoint=ckpt,
                samples_seen=samples_seen, desc="align", show_progress=show_progress,
                postfix=lambda row: dict(clip=f"{row['clip_loss']:.3f}", distill=f"{row.get('distill_loss', 0.0):.3f}",
                                         lr=f"{row['lr']:.2e}"))
    step = loop.run_steps()
    last_ckpt = loop.last_checkpoint

    # 3. retrieval on fresh frames with the exported towers
    retrieval = None
    if last_ckpt is not None:
        retrieval = {"checkpoint": str(last_ckpt), **evaluate_alignment(last_ckpt, a.eval_n, tc.seed)}
        (run / "retrieval.json").write_text(json.dumps(retrieval, indent=2) + "\n")
    return AlignResult(run, step, last_ckpt, retrieval, interrupted=loop.interrupted)


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_alignment(folder: str | Path, n: int = 64, seed: int = 0) -> dict:
    """Image→text and text→image recall@1/@5 of an align checkpoint on ``n`` fresh frames.

    The frames come from ``random.Random("mmgen-align-eval/{seed}")`` (a stream apart from
    training's) and have ``n`` different sentences (n ≤ 324, the number of introductions), so
    every frame has exactly one right caption; backgrounds are random. Chance is 1/n and 5/n.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPVisionModel

    from ..data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, BACKGROUNDS, Frame, intro_sentence, render_array
    from ..data.tokenizer import load_tokenizer
    from ..evaluation.retrieval import recall_at_k
    from ..models.text_encoder import encode_captions
    from ..models.vision import _normalisation

    folder = Path(folder)
    objects = [(s, c, z, p) for s in SHAPES for c in COLOURS for z in SIZES for p in POSITIONS]
    if not 2 <= n <= len(objects):
        raise ValueError(f"evaluate_alignment: n must be between 2 and {len(objects)}, got {n}")
    meta = json.loads((folder / ALIGN_META).read_text())
    with _quiet_hf():
        vision = CLIPVisionModel.from_pretrained(folder / "vision", local_files_only=True, use_safetensors=True)
        text = CLIPTextModel.from_pretrained(folder / "text", local_files_only=True, use_safetensors=True)
    tokenizer = load_tokenizer(folder / "text")
    mean, std = _normalisation(str(folder / "vision"))
    enc = DualEncoder(vision, text, embed_dim=meta["embed_dim"], mean=mean, std=std).eval()
    weights = load_file(folder / PROJECTION_WEIGHTS)
    enc.vision_proj.weight.copy_(weights["vision_proj.weight"])
    enc.text_proj.weight.copy_(weights["text_proj.weight"])

    rng = random.Random(f"mmgen-align-eval/{seed}")
    frames = [Frame(s, c, z, p, rng.choice(tuple(BACKGROUNDS))) for s, c, z, p in rng.sample(objects, n)]
    images = torch.stack([torch.from_numpy(render_array(f, meta["frame_size"])) for f in frames])
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 3, W, W)
    S = vision.config.image_size
    if images.shape[-1] != S:  # as the main model's VisionEncoder does
        images = F.interpolate((images + 1) / 2, size=(S, S), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    ids, lengths = encode_captions(tokenizer, [intro_sentence(f) for f in frames], meta["text_max_len"])
    img = F.normalize(enc.encode_images(images)[0], dim=-1)  # (n, E)
    txt = F.normalize(enc.encode_texts(ids, lengths)[0], dim=-1)  # (n, E)
    scores = recall_at_k(img @ txt.T, ks=(1, 5))
    return {"n": n, "seed": seed, **scores, "chance_r1": round(1 / n, 4), "chance_r5": round(min(1.0, 5 / n), 4)}
