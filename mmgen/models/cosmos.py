"""COSMOS (arXiv 2412.01814), the model of the alignment stage: crops, towers, losses, EMA teacher.

Shape legend: B frames per step, G global crops, L local crops, V views, S tower input size,
s local crop size, P patches, C vision width, T tokens, D text width, E embedding width,
K prototypes. What a step does with it, and the stage around it: ``mmgen/training/align.py``.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmgen.config import AlignConfig, Config

# constants of the recipe, as DINO and COSMOS set them (never varied here, so not config knobs)
GLOBAL_CROPS = 2  # DINO's two global views
LOCAL_SCALE = (0.15, 0.45)  # local crops: share of the frame's area
TEXT_CROP_WORDS = (0.3, 0.7)  # cropped captions: share of the sentence's words kept
INIT_TEMPERATURE = 0.07  # contrastive temperature at the start (learned; CLIP's value)
HEAD_BOTTLENECK = 32  # the DINO head's L2-normalised bottleneck
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04  # DINO's softmax temperatures
CENTER_MOMENTUM = 0.9  # DINO's centring of the teacher's outputs


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
    globals_ = random_resized_crops(images, GLOBAL_CROPS, cfg.global_scale, image_size, gen)
    locals_ = (random_resized_crops(images, cfg.local_crops, LOCAL_SCALE, cfg.local_size, gen)
               if cfg.local_crops else None)
    captions = list(sentences)
    for _ in range(cfg.text_crops):
        captions += [crop_caption(s, rng, TEXT_CROP_WORDS) for s in sentences]
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
        head = ProjectionHead(a.embed_dim, a.embed_dim, HEAD_BOTTLENECK, a.prototypes)  # hidden width: E
        self.student = DualEncoder(vision, build_text_encoder(a, tokenizer), embed_dim=a.embed_dim,
                                   mean=self.mean, std=self.std, head=head)
        self.student.vision.requires_grad_(cfg.model.vision.trainable)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.image_xattn = CrossAttention(a.embed_dim, vc.hidden_size, a.text_num_heads)  # text → image patches
        self.text_xattn = CrossAttention(a.embed_dim, a.text_hidden_size, a.text_num_heads)  # image → text tokens
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INIT_TEMPERATURE)))
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
            p_image = ((ti - self.center_image) / TEACHER_TEMP).softmax(-1)
            p_text = ((tt - self.center_text) / TEACHER_TEMP).softmax(-1)
            if self.training:
                m = CENTER_MOMENTUM
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
        uni_image = distill_loss(p_image, s.head(img_views), STUDENT_TEMP, skip_same_view=True)
        terms = {"uni_image": uni_image}
        if Vt > 1:
            terms["uni_text"] = distill_loss(p_text, s.head(t_emb[1:]), STUDENT_TEMP)
        # 5. cross-modal: text-conditioned image features → the teacher's sentence
        q = t_emb[0].repeat(L, 1)  # (L·B, E), the sentence's embedding for every crop
        img_by_text = self.image_xattn(q, l_patch).view(L, B, -1)  # (L, B, E)
        terms["cross_image"] = distill_loss(p_text, s.head(img_by_text), STUDENT_TEMP)
        #    image-conditioned text features (cropped captions) → the teacher's global image
        crops = slice(1, Vt) if Vt > 1 else slice(0, 1)
        n = len(range(Vt)[crops])
        tok = t_tok.view(Vt, B, *t_tok.shape[1:])[crops].flatten(0, 1)  # (n·B, T, D)
        pad = t_pad.view(Vt, B, -1)[crops].flatten(0, 1)  # (n·B, T)
        text_by_image = self.text_xattn(g_emb[0].repeat(n, 1), tok, pad).view(n, B, -1)  # (n, B, E)
        terms["cross_text"] = distill_loss(p_image.mean(0, keepdim=True), s.head(text_by_image), STUDENT_TEMP)
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
