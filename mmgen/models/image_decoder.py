"""Image decoder: a diffusers UNet conditioned on LLM context and on earlier images (MMFS).

Shape legend: N images to decode, T context tokens (LLM hidden states), K perceiver output
tokens, X cross-attention width, M previous-image slots, L vision levels, C UNet channels,
S image side, s latent side (S in pixel space).

docs/DESIGN.md §6: the LLM hidden states of an image's context (document start … its ``<boi>``)
reach the UNet's cross-attention through a context encoder — a small perceiver to K tokens
(the reference) or a per-token projection with a padding mask (``context_encoder: tokens``,
which the tiny model needs to read single words); a learned null
context replaces them with probability ``cfg_dropout`` in training and is the unconditional
branch of classifier-free guidance. At chosen down blocks the UNet feature map reads the
multi-scale vision features of the previous images through MMFS, added through a
zero-initialised 1×1 convolution (ControlNet style), by forward hooks on the down blocks —
diffusers' code is used as it is. The hooks act only inside :meth:`ImageDecoder.image_context`.
Both guidance branches see the previous images: guidance amplifies the text condition only.

That reference path is the whole of the conditioning; anything more is a conditioner that the
config lists (``model.decoder.conditioners``, :mod:`mmgen.models.conditioners`): a term added to
each context token from its token id, or UNet input channels.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from mmgen.config import DecoderConfig, MMFSConfig
from mmgen.models.conditioners import CONDITIONERS, conditioner_class
from mmgen.models.mmfs import MMFS, repeat_rows
from mmgen.models.offload import execution_device
from mmgen.models.precision import compute_dtype
from mmgen.models.resampler import Perceiver
from mmgen.models.samplers import make_sampler

log = logging.getLogger(__name__)


def _tiny_unet(cfg: DecoderConfig, extra_in: int) -> UNet2DConditionModel:
    """A UNet from ``cfg``'s numbers: cross-attention at every level but the first, and in the middle;
    ``extra_in`` input channels after the 3 of the image (those of built-in conditioners)."""
    n = len(cfg.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=3 + extra_in, out_channels=3,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=math.gcd(cfg.norm_groups, *cfg.block_out_channels))


def _sd_folder(cfg: DecoderConfig) -> Path:
    folder = Path(cfg.pretrained)
    missing = [sub for sub in ("unet", "scheduler") + (("vae",) if cfg.use_vae else ())
               if not (folder / sub).is_dir()]
    if missing:
        raise FileNotFoundError(f"model.decoder.pretrained: {folder} is not a local Stable Diffusion "
                                f"folder (missing {', '.join(s + '/' for s in missing)})")
    return folder


def _heads(width: int) -> int:
    head_dim = 64 if width >= 512 else 32
    return max(1, width // head_dim) if width % head_dim == 0 else 1


class ContextPerceiver(nn.Module):
    """LLM context (N, T, llm_dim) + mask (N, T) → UNet context (N, K, X); learned null context.

    Every context encoder returns ``(context, mask)``; the perceiver's mask is None (all K kept).
    """

    def __init__(self, cfg: DecoderConfig, llm_dim: int, cross_dim: int):
        super().__init__()
        self.context_dim = llm_dim  # width of the context tokens it takes
        self.perceiver = Perceiver(llm_dim, cross_dim, width=cross_dim, num_queries=cfg.context_tokens,
                                   num_layers=cfg.perceiver_layers, num_heads=_heads(cross_dim))
        self.null_context = nn.Parameter(torch.randn(cfg.context_tokens, cross_dim) * 0.02)  # (K, X)

    def null(self, n: int, length: int | None = None) -> tuple[torch.Tensor, None]:
        return self.null_context.unsqueeze(0).expand(n, -1, -1), None  # (n, K, X)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """``drop`` (N,) bool marks the rows replaced by the null context. No per-token terms
        (``extra``): its K tokens are not the context's."""
        if extra is not None:
            raise ValueError("the perceiver context encoder takes no per-token conditioner terms; "
                             "use model.decoder.context_encoder: tokens")
        out = self.perceiver(context, mask)  # (N, K, X)
        if drop is not None:
            out = torch.where(drop[:, None, None], self.null(out.shape[0])[0].to(out.dtype), out)
        return out, None


class ContextTokens(nn.Module):
    """LLM context (N, T, llm_dim) + mask (N, T) → UNet context (N, T, X) + mask, token by token.

    Each hidden state is normalised and projected by a small MLP, plus an embedding of its
    distance from the ``<boi>`` (the latest sentence is the one an image illustrates), and
    normalised again: unit-scale keys and values, as a text encoder hands a UNet (a context
    of small magnitude barely moves cross-attention). The UNet masks the padding. The null
    context is one learned token. Conditioners' per-token terms (``extra`` (N, T, X), e.g. the
    ``words`` conditioner's embeddings of the token ids) are added after the projection.
    """

    def __init__(self, cfg: DecoderConfig, llm_dim: int, cross_dim: int):
        super().__init__()
        self.context_dim = llm_dim  # width of the context tokens it takes
        self.proj = nn.Sequential(nn.LayerNorm(llm_dim), nn.Linear(llm_dim, cross_dim), nn.GELU(),
                                  nn.Linear(cross_dim, cross_dim))
        self.distance = nn.Embedding(cfg.max_context, cross_dim)
        nn.init.normal_(self.distance.weight, std=0.02)
        self.norm_out = nn.LayerNorm(cross_dim)  # unit-scale keys and values, as a text encoder gives
        self.null_context = nn.Parameter(torch.randn(1, cross_dim))  # (1, X), on the same scale

    def null(self, n: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The null token padded to ``length`` (default 1): (n, L, X), mask (n, L) keeping token 0."""
        length = length or 1
        tok = self.null_context
        out = torch.cat([tok, tok.new_zeros(length - 1, tok.shape[1])]).unsqueeze(0).expand(n, -1, -1)
        mask = torch.zeros(n, length, dtype=torch.bool, device=tok.device)
        mask[:, 0] = True
        return out, mask

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``drop`` (N,) bool marks the rows replaced by the null context; ``extra`` (N, T, X) is
        added to every projected token."""
        N, T, _ = context.shape
        if mask is None:
            mask = torch.ones(N, T, dtype=torch.bool, device=context.device)
        mask = mask.bool()
        length = mask.sum(1, keepdim=True)  # (N, 1): contexts are left-aligned
        dist = (length - 1 - torch.arange(T, device=context.device)).clamp(0, self.distance.num_embeddings - 1)
        if context.shape[-1] != self.context_dim:
            raise ValueError(f"the decoder's context tokens must be {self.context_dim} wide (the LLM's hidden "
                             f"states), got {context.shape[-1]}")
        out = self.proj(context) + self.distance(dist).to(context.dtype)
        if extra is not None:
            out = out + extra.to(out.dtype)  # the conditioners' terms, e.g. word embeddings
        out = self.norm_out(out)  # (N, T, X)
        out = out * mask[..., None]
        if drop is not None:
            null, null_mask = self.null(N, T)
            out = torch.where(drop[:, None, None], null.to(out.dtype), out)
            mask = torch.where(drop[:, None], null_mask, mask)
        return out, mask


def make_context_encoder(cfg: DecoderConfig, llm_dim: int, cross_dim: int) -> nn.Module:
    if cfg.context_encoder == "tokens":
        return ContextTokens(cfg, llm_dim, cross_dim)
    return ContextPerceiver(cfg, llm_dim, cross_dim)


class UNetMMFS(nn.Module):
    """One UNet level reading previous images: feature map (N, C, h, w) → delta (N, C, h, w)."""

    def __init__(self, channels: int, vision_dim: int, mmfs_cfg: MMFSConfig, num_levels: int,
                 context_free: bool = False):
        super().__init__()
        # no cross-attention at or below this level: its feature map does not depend on the text
        # context, so the two halves of a guidance batch ([null; cond], same latents) are equal
        self.context_free = context_free
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.mmfs = MMFS(channels, vision_dim, hidden_size=mmfs_cfg.hidden_size,
                         num_heads=mmfs_cfg.num_heads, num_points=mmfs_cfg.num_points,
                         num_levels=num_levels, max_images=mmfs_cfg.max_images)
        self.zero_conv = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)
        self.state: tuple | None = None  # (values, visible (N, M), guidance_pairs) inside image_context

    def forward(self, h: torch.Tensor, values, visible: torch.Tensor) -> torch.Tensor:
        N, C, H, W = h.shape
        q = self.norm(h).flatten(2).transpose(1, 2)  # (N, h·w, C)
        ys = (torch.arange(H, device=h.device, dtype=h.dtype) + 0.5) / H
        xs = (torch.arange(W, device=h.device, dtype=h.dtype) + 0.5) / W
        ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(1, H * W, 2)  # (1, h·w, 2) as (x, y)
        vis = visible[:, None, :].expand(N, H * W, visible.shape[-1])  # (N, h·w, M)
        out = self.mmfs(q, values, vis, ref.expand(N, -1, -1))  # (N, h·w, C)
        out = out.transpose(1, 2).reshape(N, C, H, W)  # (N, C, h, w)
        return self.zero_conv(out)

    def hook(self, module: nn.Module, args, output):
        """Forward hook on a UNet down block: add the delta to its output and its last residual."""
        if self.state is None:
            return None
        hidden, residuals = output  # (N, C, h, w), tuple of skip tensors (the last is `hidden`)
        values, visible, guidance_pairs = self.state
        if guidance_pairs and self.context_free:  # both guidance halves hold the same map: read once
            delta = self(hidden[:hidden.shape[0] // 2], values, visible).repeat(2, 1, 1, 1)
        else:
            delta = self(hidden, values, visible)
        hidden = hidden + delta
        return hidden, residuals[:-1] + (hidden,)


def widen_conv_in(unet: UNet2DConditionModel, extra: int) -> None:
    """Give the UNet ``extra`` more input channels whose weights start at zero (its output is unchanged)."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(old.weight.device, old.weight.dtype)
    unet.register_to_config(in_channels=old.in_channels + extra)


class ImageDecoder(nn.Module):
    """UNet (+ VAE) + scheduler + context encoder + MMFS blocks + conditioners; ``loss`` and ``sample``."""

    def __init__(self, cfg: DecoderConfig, mmfs_cfg: MMFSConfig, *, llm_dim: int, vision_dim: int,
                 num_levels: int, vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.vae: AutoencoderKL | None = None
        classes = [conditioner_class(name) for name in cfg.conditioners]
        built_in = sum(c.channels for c in classes if c.built_in)  # UNet input channels made with it
        if cfg.pretrained is not None:
            if built_in:
                names = ", ".join(n for n in cfg.conditioners if CONDITIONERS[n][2])
                raise ValueError(f"model.decoder.conditioners: {names} needs a UNet built from the config, "
                                 "not model.decoder.pretrained")
            folder = _sd_folder(cfg)
            self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
            self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
            if cfg.use_vae:
                self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
                self.vae.requires_grad_(False)
            if self.scheduler.config.prediction_type != cfg.prediction_type:
                log.info("decoder: using the folder's prediction type %r (config says %r)",
                         self.scheduler.config.prediction_type, cfg.prediction_type)
        else:
            self.unet = _tiny_unet(cfg, built_in)
            self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                           beta_schedule=cfg.beta_schedule,
                                           prediction_type=cfg.prediction_type,
                                           timestep_spacing="trailing")
        uc = self.unet.config
        self.cross_dim = uc.cross_attention_dim
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1
        self.latent_channels = self.vae.config.latent_channels if self.vae else 3
        self.conditioners = nn.ModuleDict({  # before the context encoder: the words' embedding comes first
            name: cls(cfg, cross_dim=self.cross_dim, latent_channels=self.latent_channels, vocab_size=vocab_size)
            for name, cls in zip(cfg.conditioners, classes)})
        self.context_encoder = make_context_encoder(cfg, llm_dim, self.cross_dim)
        self.context_dim = self.context_encoder.context_dim  # width of the context tokens it takes
        self.mmfs_blocks = nn.ModuleDict()
        if mmfs_cfg.unet:
            for level in mmfs_cfg.unet_levels:
                if not 0 <= level < len(self.unet.down_blocks):
                    raise ValueError(f"model.mmfs.unet_levels: level {level} does not exist in a UNet "
                                     f"with {len(self.unet.down_blocks)} down blocks")
                context_free = not any(getattr(b, "has_cross_attention", False)
                                       for b in self.unet.down_blocks[:level + 1])
                block = UNetMMFS(uc.block_out_channels[level], vision_dim, mmfs_cfg, num_levels, context_free)
                self.mmfs_blocks[str(level)] = block
                self.unet.down_blocks[level].register_forward_hook(block.hook)
        if uc.in_channels != self.latent_channels + built_in or uc.out_channels != self.latent_channels:
            raise ValueError(f"the UNet takes {uc.in_channels} and gives {uc.out_channels} channels, but "
                             f"{'the VAE latents have' if self.vae else 'pixel-space diffusion needs'} "
                             f"{self.latent_channels}; check model.decoder.use_vae")
        # the UNet input: latents, built-in conditioners' channels, then the others' (zero weights)
        ordered = sorted(self.conditioners.values(), key=lambda c: not c.built_in)  # stable: listed order
        self._inputs = [c for c in ordered if c.channels]
        added = sum(c.channels for c in ordered if not c.built_in)
        if added:
            widen_conv_in(self.unet, added)

    @property
    def previous_image(self) -> bool:
        """Whether the decoder reads each image's latest earlier image (the ``previous_image`` conditioner)."""
        return "previous_image" in self.conditioners

    @property
    def widened(self) -> bool:
        """Whether conditioners added input channels to the UNet (its ``conv_in`` is then this model's own)."""
        return any(c.channels and not c.built_in for c in self.conditioners.values())

    # --- helpers -------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def make_sampler(self, name: str, steps: int, device: torch.device | str | None = None):
        return make_sampler(name, steps, self.scheduler.config, device)

    @contextmanager
    def image_context(self, prev_features: list[torch.Tensor] | None, prev_visible: torch.Tensor | None,
                      *, prev_image: torch.Tensor | None = None, guidance_pairs: bool = False):
        """Let the MMFS hooks read previous images for the duration of a call.

        Args: prev_features [(N, M, C_v, H_l, W_l)] per level; prev_visible (N, M) bool;
        ``guidance_pairs``: the UNet batch is [null; cond] over the same latents (classifier-free
        guidance), twice the N rows given here; levels below the first cross-attention read the
        previous images once for both halves, the others repeat them. ``prev_image`` (N, 3, S', S')
        in [-1, 1]: each row's latest earlier image (zeros where it has none), for the ``previous_image``
        conditioner. Without features (or with none visible) the hooks do nothing.
        """
        for conditioner in self.conditioners.values():
            conditioner.begin(self, prev_image=prev_image, guidance_pairs=guidance_pairs)
        active = (prev_features is not None and prev_visible is not None and len(self.mmfs_blocks) > 0
                  and prev_visible.shape[-1] > 0 and bool(prev_visible.any()))
        if active:
            for block in self.mmfs_blocks.values():
                values, visible = block.mmfs.prepare_values(prev_features), prev_visible.bool()
                if guidance_pairs and not block.context_free:  # this level sees both halves
                    values, visible = repeat_rows(values, 2), visible.repeat(2, 1)
                block.state = (values, visible, guidance_pairs)
        try:
            yield
        finally:
            for block in self.mmfs_blocks.values():
                block.state = None
            for conditioner in self.conditioners.values():
                conditioner.end()

    def encode_context(self, context: torch.Tensor, context_mask: torch.Tensor | None,
                       context_ids: torch.Tensor | None = None, *, drop: torch.Tensor | None = None):
        """LLM context (N, T, llm_dim) + mask (N, T) + token ids (N, T) → UNet context (N, K, X) +
        mask (N, K) or None, with the conditioners' per-token terms; ``drop`` (N,) rows get the null context."""
        extra = None
        for conditioner in self.conditioners.values():
            term = conditioner.context(context_ids)  # (N, T, X) or None
            if term is not None:
                extra = term if extra is None else extra + term
        return self.context_encoder(context, context_mask, drop=drop, extra=extra)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call: x (N, c, s, s), t (N,) or scalar, context (N, K, X) [+ mask (N, K)]
        → prediction (N, c, s, s). The conditioners' channels join x (inside :meth:`image_context`
        for those that read a per-call input)."""
        x = self.unet_input(x)
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype), encoder_attention_mask=context_mask).sample

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, c, s, s) → the UNet's input (N, c + extra, s, s): the conditioners' channels joined."""
        if not self._inputs:
            return x
        return torch.cat([x, *(c.input(x) for c in self._inputs)], dim=1)

    def encode(self, images: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
        """Images (N, 3, S, S) in [-1, 1] → diffusion space (N, c, s, s); ``mean``: the VAE latents'
        mean rather than a sample (for a condition)."""
        if self.vae is None:
            return images
        with torch.no_grad():
            dist = self.vae.encode(images.to(compute_dtype(self.vae))).latent_dist
            z = dist.mode() if mean else dist.sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def encode_condition(self, images: torch.Tensor) -> torch.Tensor:
        """Earlier images (N, 3, S', S') in [-1, 1], all-zero rows meaning none → diffusion space
        (N, c, s, s), zero rows kept zero (the ``previous_image`` conditioner's input weights start at zero)."""
        if images.shape[-1] != self.cfg.image_size:
            images = torch.nn.functional.interpolate(images.float(), size=(self.cfg.image_size,) * 2,
                                                     mode="bilinear", antialias=True, align_corners=False)
        present = images.flatten(1).abs().amax(1) > 0  # (N,)
        z = self.encode(images, mean=True)  # a condition: the latents' mean, not a sample
        return z * present.view(-1, 1, 1, 1).to(z.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space (N, c, s, s) → images (N, 3, S, S) in [-1, 1]."""
        if self.vae is not None:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            z = self.vae.decode((z / self.vae.config.scaling_factor + shift).to(compute_dtype(self.vae))).sample
        return z.float().clamp(-1.0, 1.0)

    # --- training ------------------------------------------------------------------------------

    def loss(self, x0: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None,
             prev_features: list[torch.Tensor] | None = None, prev_visible: torch.Tensor | None = None,
             *, context_ids: torch.Tensor | None = None, prev_image: torch.Tensor | None = None,
             uncond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image diffusion loss (N,).

        Args: x0 (N, 3, S, S) in [-1, 1]; context (N, T, llm_dim) with mask (N, T) (None: null) and
        token ids (N, T) (for the ``words`` conditioner);
        prev_features/prev_visible/prev_image as in :meth:`image_context`; ``uncond`` (N,) bool
        forces the null context on those rows (default: each row with probability ``cfg_dropout`` in training).
        """
        z0 = self.encode(x0)  # (N, c, s, s)
        N, device = z0.shape[0], z0.device
        noise = randn_tensor(z0.shape, generator=generator, device=device, dtype=z0.dtype)
        T = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, T, (N,), generator=generator, device="cpu" if generator is None
                          else generator.device).to(device)
        zt = self.scheduler.add_noise(z0, noise, t)  # (N, c, s, s)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(z0, noise, t)
        else:
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

        if uncond is None:
            p = self.cfg.cfg_dropout if self.training else 0.0
            uncond = torch.rand(N, generator=generator, device="cpu" if generator is None
                                else generator.device).to(device) < p
        if context is None:
            cond, cond_mask = self.context_encoder.null(N)
        else:
            cond, cond_mask = self.encode_context(context, context_mask, context_ids, drop=uncond.to(device))  # (N, K, X)

        with self.image_context(prev_features, prev_visible, prev_image=prev_image):
            pred = self.denoise(zt, t, cond, cond_mask)  # (N, c, s, s)
        mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (N,)
        if self.cfg.snr_gamma is None:
            return mse
        ac = self.scheduler.alphas_cumprod.to(device)[t].float()
        snr = ac / (1.0 - ac)  # (N,)
        clipped = snr.clamp(max=self.cfg.snr_gamma)
        # min-SNR-γ: ε-loss weight min(snr, γ)/snr; the v-loss is (snr+1)× the ε-loss in x0 terms
        weight = clipped / (snr + 1.0) if self.prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)
        return mse * weight

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, context: torch.Tensor | None, context_mask: torch.Tensor | None,
               prev_features: list[torch.Tensor] | None = None, prev_visible: torch.Tensor | None = None,
               *, context_ids: torch.Tensor | None = None, prev_image: torch.Tensor | None = None,
               sampler: str = "dpm++", steps: int = 20, guidance: float = 2.5,
               generator: torch.Generator | None = None, num_images: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """Images (N, 3, S, S) in [-1, 1] from context (N, T, llm_dim) and its token ids (N, T)
        (None: unconditional); the other inputs as in :meth:`loss`."""
        device = execution_device(self.unet)
        dtype = compute_dtype(self.unet)
        # 1. encode the condition; the null context is the unconditional branch
        N = context.shape[0] if context is not None else num_images
        if N is None:
            raise ValueError("sample() without context needs num_images")
        enc = self.context_encoder
        cond, cond_mask = self.encode_context(context, context_mask, context_ids) if context is not None else enc.null(N)
        do_cfg = context is not None and guidance != 1.0
        if do_cfg:
            null, null_mask = enc.null(N, cond.shape[1])
            cond = torch.cat([null.to(cond.dtype), cond])  # (2N, K, X)
            cond_mask = None if cond_mask is None else torch.cat([null_mask, cond_mask])  # (2N, K)

        # 2. prepare the timesteps
        sched = self.make_sampler(sampler, steps, device)

        # 3. prepare the initial noise
        side = self.cfg.image_size // self.vae_factor
        latents = randn_tensor((N, self.latent_channels, side, side), generator=generator,
                               device=device, dtype=dtype) * sched.init_noise_sigma

        # 4. denoise, with classifier-free guidance on a batch of [uncond; cond]
        with self.image_context(prev_features, prev_visible, prev_image=prev_image, guidance_pairs=do_cfg):
            for t in tqdm(sched.timesteps, desc="denoise", disable=not progress, leave=False):
                inp = torch.cat([latents, latents]) if do_cfg else latents
                inp = sched.scale_model_input(inp, t)
                pred = self.denoise(inp, t, cond, cond_mask)
                if do_cfg:
                    uncond_pred, cond_pred = pred.chunk(2)
                    pred = uncond_pred + guidance * (cond_pred - uncond_pred)
                latents = sched.step(pred, t, latents, generator=generator).prev_sample

        # 5. decode
        return self.decode(latents)
