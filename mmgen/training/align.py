"""COSMOS alignment stage (arXiv 2412.01814): contrastive loss + cross-modality self-distillation.

Shape legend: B frames per step, G global crops, L local crops, V views, S tower input size,
s local crop size, P patches, C vision width, T tokens, D text width, E embedding width,
K prototypes.

What one step does (``mmgen train --stage align``):

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

import copy
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AlignConfig, Config

COSMOS_WEIGHTS = "cosmos.safetensors"
PROJECTION_WEIGHTS = "projection.safetensors"
ALIGN_META = "align.json"


# ---------------------------------------------------------------------------------------------
# 1-2. data and crops


def draw_frames(rng: random.Random, n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` random frames as (n, 3, size, size) in [-1, 1] and their introduction sentences."""
    from ..data.shapes import intro_sentence, random_frame, render_array

    frames = [random_frame(rng) for _ in range(n)]
    images = torch.stack([torch.from_numpy(render_array(f, size)) for f in frames])  # (n, W, W, 3) uint8
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0, [intro_sentence(f) for f in frames]


def random_resized_crops(images: torch.Tensor, n: int, scale: tuple[float, float], size: int,
                         generator: torch.Generator) -> torch.Tensor:
    """``n`` random resized crops of each image (area share in ``scale``, aspect 3/4-4/3), bilinear.

    Args: images (B, 3, H, W). Returns: (n, B, 3, size, size), crop-major. No flips and no
    colour jitter: ShapeStories captions name left/right and colours.
    """
    B = images.shape[0]
    N = n * B
    area = torch.empty(N).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(N).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop side / image side
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(N, generator=generator) * 2 - 1) * (1 - w)  # centre, in [-1, 1] coordinates
    cy = (torch.rand(N, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(N, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, [N, 3, size, size], align_corners=False)  # (N, size, size, 2)
    src = images.repeat(n, 1, 1, 1)  # (n·B, 3, H, W), crop-major
    out = F.grid_sample(src, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(n, B, *out.shape[1:])  # (n, B, 3, size, size)


def crop_caption(sentence: str, rng: random.Random, share: tuple[float, float]) -> str:
    """A random run of the sentence's words, ``share`` of them (at least one), without the full stop."""
    words = sentence.rstrip(".").split()
    lo, hi = (max(1, round(f * len(words))) for f in share)
    k = rng.randint(lo, max(lo, hi))
    start = rng.randint(0, len(words) - k)
    return " ".join(words[start:start + k])


@dataclass
class Views:
    """The views of one step; caption view 0 is the full sentence."""

    globals: torch.Tensor  # (G, B, 3, S, S) in [-1, 1]
    locals: torch.Tensor | None  # (L, B, 3, s, s), None when align.local_crops = 0
    text_ids: torch.Tensor  # (1 + text_crops, B, T)
    text_len: torch.Tensor  # (1 + text_crops, B)
    groups: torch.Tensor  # (B,) equal for frames with the same sentence

    def to(self, device) -> Views:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Views(*(move(getattr(self, k)) for k in ("globals", "locals", "text_ids", "text_len", "groups")))


def make_views(images: torch.Tensor, sentences: list[str], cfg: AlignConfig, tokenizer, *, image_size: int,
               rng: random.Random) -> Views:
    """Multi-crop views of a batch of frames and their sentences (randomness from ``rng`` only)."""
    from ..models.text_encoder import encode_captions

    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    globals_ = random_resized_crops(images, cfg.global_crops, cfg.global_scale, image_size, gen)
    locals_ = (random_resized_crops(images, cfg.local_crops, cfg.local_scale, cfg.local_size, gen)
               if cfg.local_crops else None)
    captions = list(sentences)
    for _ in range(cfg.text_crops):
        captions += [crop_caption(s, rng, cfg.text_crop_words) for s in sentences]
    ids, lengths = encode_captions(tokenizer, captions, cfg.text_max_len)  # ((1+Tc)·B, T)
    B = len(sentences)
    index = {s: i for i, s in enumerate(dict.fromkeys(sentences))}
    return Views(globals_, locals_, ids.view(-1, B, ids.shape[-1]), lengths.view(-1, B),
                 torch.tensor([index[s] for s in sentences]))


# ---------------------------------------------------------------------------------------------
# 3. towers, head, cross-attention


class ProjectionHead(nn.Module):
    """DINO head: MLP → L2-normalised bottleneck → cosine with K normalised prototypes. (N, E) → (N, K)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T  # (N, K)


class DualEncoder(nn.Module):
    """Vision tower + text encoder + linear projections to E (+ the prototype head)."""

    def __init__(self, vision: nn.Module, text: nn.Module, *, embed_dim: int, mean, std,
                 head: ProjectionHead | None = None):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head
        self.vision_proj = nn.Linear(vision.config.hidden_size, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: images (N, 3, s, s) in [-1, 1]. Returns: embeddings (N, E), patch tokens (N, P, C)."""
        x = ((images + 1.0) / 2.0 - self.mean) / self.std
        out = self.vision(pixel_values=x, interpolate_pos_encoding=x.shape[-1] != self.vision.config.image_size)
        return self.vision_proj(out.pooler_output), out.last_hidden_state[:, 1:]  # (N, E), (N, P, C)

    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: ids (N, T), lengths (N,). Returns: embeddings (N, E), tokens (N, T, D), pad mask (N, T)."""
        from ..models.text_encoder import text_features

        pooled, tokens, pad = text_features(self.text, ids, lengths)
        return self.text_proj(pooled), tokens, pad


class CrossAttention(nn.Module):
    """One embedding attends to the other modality's tokens: (N, E) × (N, P, C) → (N, E)."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_out = nn.LayerNorm(dim), nn.LayerNorm(kv_dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        q = query[:, None]  # (N, 1, E)
        kv = self.norm_kv(tokens)  # (N, P, C)
        out, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=pad, need_weights=False)  # (N, 1, E)
        return self.norm_out(q + out)[:, 0]  # (N, E)


# ---------------------------------------------------------------------------------------------
# 4. losses


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between (B, E) image and text embeddings; equal ``groups`` are positives."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # (B, B)
    positive = (groups[:, None] == groups[None, :]).float()  # (B, B), symmetric
    target = positive / positive.sum(1, keepdim=True)
    i2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2i = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def distill_loss(teacher: torch.Tensor, student: torch.Tensor, student_temp: float, *,
                 skip_same_view: bool = False) -> torch.Tensor:
    """Cross-entropy H(teacher, softmax(student / τ)) averaged over view pairs (DINO).

    Args: teacher (Vt, B, K) probabilities (already centred and sharpened), student (Vs, B, K)
    logits. With ``skip_same_view``, teacher view i is not paired with student view i.
    """
    log_p = (student / student_temp).log_softmax(-1)  # (Vs, B, K)
    terms = [-(teacher[i] * log_p[j]).sum(-1).mean()
             for i in range(teacher.shape[0]) for j in range(student.shape[0])
             if not (skip_same_view and i == j)]
    return torch.stack(terms).mean()


class Cosmos(nn.Module):
    """Student and EMA teacher dual encoders, the student's cross-attention, the learned temperature."""

    def __init__(self, cfg: Config, tokenizer):
        super().__init__()
        from ..models.text_encoder import build_text_encoder
        from ..models.vision import _normalisation, build_vision_tower

        a = self.cfg = cfg.align
        vision = build_vision_tower(cfg.model.vision)
        vc = vision.config
        if a.local_crops and a.local_size % vc.patch_size:
            raise ValueError(f"align.local_size {a.local_size} must be a multiple of the vision tower's patch "
                             f"size {vc.patch_size}")
        self.image_size = vc.image_size  # S
        self.mean, self.std = _normalisation(cfg.model.vision.pretrained)
        head = ProjectionHead(a.embed_dim, a.head_hidden, a.head_bottleneck, a.prototypes)
        self.student = DualEncoder(vision, build_text_encoder(a, tokenizer), embed_dim=a.embed_dim,
                                   mean=self.mean, std=self.std, head=head)
        self.student.vision.requires_grad_(cfg.model.vision.trainable)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.image_xattn = CrossAttention(a.embed_dim, vc.hidden_size, a.cross_attn_heads)  # text → image patches
        self.text_xattn = CrossAttention(a.embed_dim, a.text_hidden_size, a.cross_attn_heads)  # image → text tokens
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / a.init_temperature)))
        self.register_buffer("center_image", torch.zeros(a.prototypes))
        self.register_buffer("center_text", torch.zeros(a.prototypes))

    def train(self, mode: bool = True) -> Cosmos:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, v: Views) -> dict[str, torch.Tensor]:
        a, s = self.cfg, self.student
        G, B = v.globals.shape[:2]
        # 1. student, both modalities, global views
        g_emb, g_patch = s.encode_images(v.globals.flatten(0, 1))  # (G·B, E), (G·B, P, C)
        g_emb = g_emb.view(G, B, -1)  # (G, B, E)
        t_emb, t_tok, t_pad = s.encode_texts(v.text_ids.flatten(0, 1), v.text_len.flatten())
        Vt = v.text_ids.shape[0]
        t_emb = t_emb.view(Vt, B, -1)  # (Vt, B, E); view 0 is the full sentence
        # 2. contrastive: every global crop against the full sentence
        scale = self.logit_scale.exp().clamp(max=100.0)
        clip = torch.stack([info_nce(g_emb[g], t_emb[0], scale, v.groups) for g in range(G)]).mean()
        out = {"clip_loss": clip, "temperature": (1.0 / scale).detach()}
        if a.distill_weight == 0:
            out["loss"] = clip
            return out
        # 3. teacher targets from the global views, centred and sharpened
        with torch.no_grad():
            ti = self.teacher.head(self.teacher.encode_images(v.globals.flatten(0, 1))[0]).view(G, B, -1)  # (G, B, K)
            tt = self.teacher.head(self.teacher.encode_texts(v.text_ids[0], v.text_len[0])[0])[None]  # (1, B, K)
            p_image = ((ti - self.center_image) / a.teacher_temp).softmax(-1)
            p_text = ((tt - self.center_text) / a.teacher_temp).softmax(-1)
            if self.training:
                m = a.center_momentum
                self.center_image.mul_(m).add_(ti.mean((0, 1)), alpha=1 - m)
                self.center_text.mul_(m).add_(tt.mean((0, 1)), alpha=1 - m)
        # 4. uni-modal: image crops → teacher's global crops, cropped captions → teacher's sentence
        views = [g_emb]
        if v.locals is not None:
            L = v.locals.shape[0]
            l_emb, l_patch = s.encode_images(v.locals.flatten(0, 1))  # (L·B, E), (L·B, P, C)
            views.append(l_emb.view(L, B, -1))
        else:  # no local crops: the global crops play their part in the cross-modal term
            L, l_patch = G, g_patch
        img_views = torch.cat(views)  # (G+L, B, E)
        uni_image = distill_loss(p_image, s.head(img_views), a.student_temp, skip_same_view=True)
        terms = {"uni_image": uni_image}
        if Vt > 1:
            terms["uni_text"] = distill_loss(p_text, s.head(t_emb[1:]), a.student_temp)
        # 5. cross-modal: text-conditioned image features → the teacher's sentence
        q = t_emb[0].repeat(L, 1)  # (L·B, E), the sentence's embedding for every crop
        img_by_text = self.image_xattn(q, l_patch).view(L, B, -1)  # (L, B, E)
        terms["cross_image"] = distill_loss(p_text, s.head(img_by_text), a.student_temp)
        #    image-conditioned text features (cropped captions) → the teacher's global image
        crops = slice(1, Vt) if Vt > 1 else slice(0, 1)
        n = len(range(Vt)[crops])
        tok = t_tok.view(Vt, B, *t_tok.shape[1:])[crops].flatten(0, 1)  # (n·B, T, D)
        pad = t_pad.view(Vt, B, -1)[crops].flatten(0, 1)  # (n·B, T)
        text_by_image = self.text_xattn(g_emb[0].repeat(n, 1), tok, pad).view(n, B, -1)  # (n, B, E)
        terms["cross_text"] = distill_loss(p_image.mean(0, keepdim=True), s.head(text_by_image), a.student_temp)
        distill = torch.stack(list(terms.values())).mean()
        out.update(terms, distill_loss=distill, loss=clip + a.distill_weight * distill)
        return out

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← momentum · teacher + (1 − momentum) · student, parameter by parameter."""
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            pt.lerp_(ps.detach(), 1.0 - momentum)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def teacher_momentum(cfg: AlignConfig, step: int) -> float:
    """The EMA decay at ``step``: fixed, or a cosine ramp to ``teacher_momentum_final`` (DINO)."""
    if cfg.teacher_momentum_final is None:
        return cfg.teacher_momentum
    t = min(1.0, step / max(1, cfg.steps))
    start, final = cfg.teacher_momentum, cfg.teacher_momentum_final
    return final - (final - start) * (math.cos(math.pi * t) + 1) / 2


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
    from tqdm.auto import tqdm

    from ..data.tokenizer import build_tokenizer, load_tokenizer
    from .checkpoint import CheckpointError, _read, load_trainer_state, remove_partial, resolve_resume
    from .optim import warmup_cosine
    from .trainer import StopOnInterrupt, TrainingError, _trim_metrics

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
    _trim_metrics(run / "metrics.jsonl", start)

    # 2. Ctrl-C: finish the step in flight, save, stop
    stop = StopOnInterrupt()
    stop.install()

    def save(step: int) -> Path:
        state = {"stage": "align", "step": step, "seed": tc.seed, "samples_seen": samples_seen}
        return save_align_checkpoint(run, step, model=model, tokenizer=tokenizer, cfg=cfg, optimizer=optimizer,
                                     scheduler=scheduler, state=state)

    end = min(a.steps, max_steps) if max_steps is not None else a.steps
    trainable = [p for _, p in model.trainable_parameters()]
    last_ckpt, step = ckpt, start
    t_last, samples_last = time.perf_counter(), samples_seen
    bar = tqdm(total=end, initial=start, desc="align", disable=not show_progress, dynamic_ncols=True)
    model.train()
    try:
        while step < end and not stop.requested:
            # 3. one step: the frames and crops are a function of (seed, step)
            rng = random.Random(f"mmgen-align/{tc.seed}/{step}")
            images, sentences = draw_frames(rng, a.batch_size, cfg.data.image_size)
            views = make_views(images, sentences, a, tokenizer, image_size=model.image_size, rng=rng).to(device)
            out = model(views)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}; stopping. The last good "
                                    f"checkpoint is {last_ckpt or 'none'}. Try a lower align.lr.")
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            model.update_teacher(teacher_momentum(a, step))
            step += 1
            samples_seen += a.batch_size

            # 4. log, save
            if step % tc.log_every == 0 or step == end:
                now = time.perf_counter()
                sps = (samples_seen - samples_last) / max(now - t_last, 1e-9)
                t_last, samples_last = now, samples_seen
                row = {"step": step, **{k: round(float(v.detach()), 6) for k, v in out.items()},
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": round(sps, 3)}
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(clip=f"{row['clip_loss']:.3f}", distill=f"{row.get('distill_loss', 0.0):.3f}",
                                lr=f"{row['lr']:.2e}", sps=f"{sps:.1f}")
            bar.update(1)
            if step % tc.save_every == 0 or step == end:
                last_ckpt = save(step)
    finally:
        bar.close()
        stop.restore()
    if stop.requested and (last_ckpt is None or last_ckpt.name != f"step-{step:06d}"):
        last_ckpt = save(step)
        print(f"saved {last_ckpt}; resume with --resume auto")

    # 5. retrieval on fresh frames with the exported towers
    retrieval = None
    if last_ckpt is not None:
        retrieval = {"checkpoint": str(last_ckpt), **evaluate_alignment(last_ckpt, a.eval_n, tc.seed)}
        (run / "retrieval.json").write_text(json.dumps(retrieval, indent=2) + "\n")
    return AlignResult(run, step, last_ckpt, retrieval, interrupted=stop.requested)


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
