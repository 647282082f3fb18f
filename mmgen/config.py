"""Typed, nested, validated configuration.

A config is a tree of dataclasses (model: vision, resampler, llm, mmfs, decoder; data; train;
generate; align, the COSMOS alignment stage) loaded from YAML, with dotted ``key=value`` overrides from the command line:

    cfg = load_config("configs/shapes_tiny.yaml", ["train.lr=1e-3", "model.mmfs.every_k=2"])

Every value is type-checked against its field's annotation and every section validates its
own invariants; problems raise :class:`ConfigError` with a message written for the user.
This module must stay importable without torch (the CLI imports it at start-up).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmgen.data.kinds import KINDS
from mmgen.models.conditioners import CONDITIONERS, unknown_conditioner
from mmgen.models.llm_families import LLM_FAMILIES
from mmgen.models.samplers import SAMPLERS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes_tiny.yaml"


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, unknown or inconsistent."""


# ---------------------------------------------------------------------------------------------
# model sections


@dataclass
class VisionConfig:
    """The vision tower: a local HF CLIP vision folder, or a tiny ViT built from these numbers."""

    pretrained: str | None = None  # local folder with a CLIPVisionModel (or CLIPModel) checkpoint
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    # hidden-state layers (negative = from the end) that feed the multi-scale maps, and the
    # scale of each map relative to the patch grid (the reference: 2, 1, 0.5, 0.25)
    feature_layers: list[int] = field(default_factory=lambda: [-1])
    feature_scales: list[float] = field(default_factory=lambda: [2.0, 1.0, 0.5])
    trainable: bool = True

    def validate(self) -> None:
        _positive(self, "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                  "intermediate_size")
        if self.image_size % self.patch_size:
            raise ConfigError("model.vision.image_size must be a multiple of model.vision.patch_size")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.vision.hidden_size must be divisible by model.vision.num_heads")
        if not self.feature_layers:
            raise ConfigError("model.vision.feature_layers must name at least one layer")
        if not self.feature_scales or any(s <= 0 for s in self.feature_scales):
            raise ConfigError("model.vision.feature_scales must be a non-empty list of positive numbers")


@dataclass
class ResamplerConfig:
    """Perceiver resampler: a fixed number of learned queries per image."""

    num_queries: int = 8  # placeholder tokens per image (64 in the reference)
    num_layers: int = 1
    num_heads: int = 4
    hidden_size: int = 64
    # 2D sin-cos positions added to the vision grid tokens before the queries read them (as
    # Qwen-VL's resampler does); off in models saved before it. Without them the queries pool a
    # bag of patches: colour and size, but no position or shape (docs/RESULTS.md)
    grid_positions: bool = False

    def validate(self) -> None:
        _positive(self, "num_queries", "num_layers", "num_heads", "hidden_size")
        if self.grid_positions and self.hidden_size % 4:
            raise ConfigError("model.resampler.grid_positions needs model.resampler.hidden_size divisible by 4")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.resampler.hidden_size must be divisible by model.resampler.num_heads")


@dataclass
class LLMConfig:
    """The causal LM: a local HF folder, or a tiny one of ``arch`` built from these numbers."""

    pretrained: str | None = None  # local folder with an HF causal LM (config + safetensors)
    tokenizer: str | None = None  # local tokenizer folder; defaults to `pretrained`
    arch: str = "llama"  # a tiny LM's family: a name in mmgen/models/llm_families.py
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    vocab_size: int = 1024  # size of the tokenizer trained on the corpus (tiny configs)
    text_only_layers: int = 0  # CosMo: lower layers without MMFS
    contrastive_dim: int = 64  # CosMo: width of the image/text embeddings of the contrastive loss
    trainable: bool = True
    gradient_checkpointing: bool = False
    # a frozen pretrained LLM read in 8 or 4 bits (bitsandbytes; NF4 for 4 bits): "none", "8bit", "4bit"
    quantize: Literal["none", "8bit", "4bit"] = "none"

    def validate(self) -> None:
        _one_of(self, "arch", LLM_FAMILIES)
        if self.quantize != "none" and (self.trainable or self.pretrained is None):
            raise ConfigError(f"model.llm.quantize={self.quantize} needs a frozen pretrained LLM "
                              "(model.llm.pretrained=FOLDER and model.llm.trainable=false): quantized "
                              "weights are read from a folder and cannot be trained")
        _positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size",
                  "max_position_embeddings", "vocab_size", "contrastive_dim")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.llm.hidden_size must be divisible by model.llm.num_heads")
        if not 0 <= self.text_only_layers <= self.num_layers:
            raise ConfigError("model.llm.text_only_layers must be between 0 and model.llm.num_layers")


@dataclass
class MMFSConfig:
    """Multi-image feature synchronizer (docs/DESIGN.md §5)."""

    llm: bool = True  # MMFS layers inside the LLM
    unet: bool = True  # MMFS blocks inside the UNet
    every_k: int = 2  # an MMFS layer after every k-th LLM decoder layer (4 in the reference)
    num_heads: int = 4  # attention heads of each MMFS layer
    num_points: int = 4  # sampling points per head, level and image
    hidden_size: int = 64  # width of the sampled values
    max_images: int = 32  # size of the relative image-index embedding
    unet_levels: list[int] = field(default_factory=lambda: [0, 1])  # UNet down-block levels with MMFS
    trainable: bool = True  # the "sync" freeze group: MMFS, resampler, projections

    def validate(self) -> None:
        _positive(self, "every_k", "num_heads", "num_points", "hidden_size", "max_images")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.mmfs.hidden_size must be divisible by model.mmfs.num_heads")


@dataclass
class DecoderConfig:
    """Stable Diffusion decoder: a local SD folder (unet/, vae/, scheduler/) or a tiny UNet."""

    pretrained: str | None = None  # a local Stable Diffusion folder; null: a tiny UNet from the numbers below
    use_vae: bool = False  # pixel-space diffusion when False (tiny configs only)
    image_size: int = 32  # generated image size in pixels
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # tiny UNet: width per level
    layers_per_block: int = 1  # tiny UNet: ResNet (+ attention) layers per level
    attention_head_dim: int = 4  # tiny UNet: heads of its attention layers (diffusers' naming)
    cross_attention_dim: int = 128  # tiny UNet: width of the context its cross-attention reads
    # how the LLM context reaches the UNet's cross-attention: "perceiver" resamples it to
    # context_tokens tokens; "tokens" projects every context token (masked, with its distance
    # from the <boi>), so a word such as "red" stays a key of its own
    context_encoder: Literal["perceiver", "tokens"] = "perceiver"
    context_tokens: int = 16  # perceiver output tokens (77 in the reference)
    perceiver_layers: int = 1  # "perceiver": its cross-attention layers
    max_context: int = 128  # "tokens": distances from the <boi> beyond this share one embedding
    # inputs beyond the reference path (context encoder + MMFS), by name from the registry in
    # mmgen/models/conditioners/ (one file each, with its reason and measurement): words,
    # previous_image, coords. None by default: the reference decoder
    conditioners: list[str] = field(default_factory=list)
    # how much of the image loss's gradient reaches the LLM (and through it the resampler and
    # vision encoder) through the decoder context: 1 trains end to end, 0 leaves the LLM to the
    # text loss (the decoder still reads it), in between scales it
    context_grad: float = 1.0
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"  # what the UNet predicts
    beta_schedule: str = "squaredcos_cap_v2"  # tiny UNet: the noise schedule (an SD folder brings its own)
    num_train_timesteps: int = 1000  # tiny UNet: diffusion steps of that schedule
    norm_groups: int = 32  # tiny UNet: GroupNorm groups (the largest divisor of every block's width up to this)
    snr_gamma: float | None = 5.0  # min-SNR loss weighting; null to disable
    cfg_dropout: float = 0.1  # probability of the learned null context in training
    trainable: bool = True  # the "decoder" freeze group: UNet, context encoder, conditioners

    def validate(self) -> None:
        _positive(self, "image_size", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                  "context_tokens", "perceiver_layers", "num_train_timesteps", "max_context")
        if not self.block_out_channels:
            raise ConfigError("model.decoder.block_out_channels must not be empty")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError("model.decoder.cfg_dropout must be in [0, 1)")
        if not 0.0 <= self.context_grad <= 1.0:
            raise ConfigError("model.decoder.context_grad must be in [0, 1]")
        for name in self.conditioners:
            if name not in CONDITIONERS:
                raise ConfigError(f"model.decoder.conditioners: {unknown_conditioner(name)}")
            if CONDITIONERS[name][2] and self.pretrained is not None:  # its channels are built into the UNet
                raise ConfigError(f"model.decoder.conditioners: {name} needs a UNet built from the config; "
                                  "leave it out with model.decoder.pretrained")
        if len(set(self.conditioners)) != len(self.conditioners):
            raise ConfigError("model.decoder.conditioners lists a conditioner twice")
        if self.use_vae and self.pretrained is None:
            raise ConfigError("model.decoder.use_vae needs model.decoder.pretrained (an SD folder with vae/)")
        down = 2 ** (len(self.block_out_channels) - 1)
        factor = 8 if self.use_vae else 1
        if self.pretrained is None and self.image_size % (down * factor):
            raise ConfigError(f"model.decoder.image_size must be a multiple of {down * factor} "
                              "for this UNet")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    mmfs: MMFSConfig = field(default_factory=MMFSConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # dtype of the frozen components (the VAE, and the vision tower, LLM or UNet when not trainable):
    # "auto" is the run's compute dtype (train.mixed_precision: bf16 → bfloat16, fp16 → float16, no → float32);
    # under train.low_memory a float32 run keeps them in bfloat16 and computes each layer in float32
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


# ---------------------------------------------------------------------------------------------
# data, training, generation


@dataclass
class SourceConfig:
    """One training source; several are mixed with their weights."""

    kind: str = "shapes"  # a kind of mmgen.data.corpora.SOURCE_KINDS (the one registry of kinds)
    path: str | None = None  # the corpus: a file or a folder of them (every kind but shapes*)
    weight: float = 1.0
    seed: int = 0  # shapes, shapes_pairs, shapes_video: the stream's seed
    images: str | None = None  # vist, mmc4, obelics: the local folder holding the corpus's images
    skip_missing: bool = False  # a missing image is dropped (and reported) instead of failing its document
    min_sim: float = 0.24  # mmc4 (and MMC4-packed webdataset): keep images whose matched_sim reaches this

    def validate(self) -> None:
        from .data.corpora import SOURCE_KINDS

        if SOURCE_KINDS[self.kind].needs_path and not self.path:
            raise ConfigError(f"data.sources: a `{self.kind}` source needs a `path`")
        if self.weight <= 0:
            raise ConfigError("data.sources: `weight` must be positive")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    seq_len: int = 256  # packed sequence length in tokens
    image_size: int = 32  # images are resized to this for the vision tower and the decoder
    max_images_per_seq: int = 16
    num_workers: int = 0  # DataLoader worker processes that read, decode and collate (0: in the main process)
    strict: bool = False  # stop at the first bad record instead of skipping and counting it
    # ShapeStories sources: the share of frames drawn as users' files arrive (32-128 px, half of them JPEG),
    # then resized by the loader (mmgen.data.shapes.render_as_arrived)
    input_variety: float = 0.0

    def validate(self) -> None:
        from .data.corpora import SOURCE_KINDS

        _positive(self, "seq_len", "image_size", "max_images_per_seq")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers must not be negative")
        if not 0.0 <= self.input_variety <= 1.0:
            raise ConfigError("data.input_variety must be in [0, 1]")
        if not self.sources:
            raise ConfigError("data.sources must hold at least one source")
        for i, s in enumerate(self.sources):
            if s.kind not in SOURCE_KINDS:
                raise ConfigError(f"`data.sources[{i}].kind` must be one of {', '.join(SOURCE_KINDS)}, "
                                  f"got {s.kind!r}")
            s.validate()


@dataclass
class LossWeights:
    text: float = 1.0
    image: float = 10.0  # λ in docs/DESIGN.md §7 (reference: 10)
    contrastive: float = 0.0


@dataclass
class TrainConfig:
    out_dir: str = "runs/shapes-tiny"
    steps: int = 2000
    # start from the weights (and tokenizer) of a model folder — a run's step-*/model or a bundled
    # checkpoint — with a fresh optimiser and schedule; tensors the folder lacks (a module the
    # config adds) keep their initialisation, input channels it adds to the UNet start at zero.
    # Ignored when resuming a run of its own.
    init_from: str | None = None
    batch_size: int = 8
    grad_accum: int = 1
    image_loss_limit: int | None = None  # most images per micro-batch that get a diffusion loss
    lr: float = 1e-4  # new modules
    lr_pretrained: float = 1e-5  # pretrained UNet and MMFS sampling offsets
    lr_min_ratio: float = 0.1  # cosine floor as a fraction of the peak
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.995)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    loss_weights: LossWeights = field(default_factory=LossWeights)
    save_every: int = 500
    keep_last_n: int = 3
    log_every: int = 10
    seed: int = 0
    deterministic: bool = True  # bit-exact resume; costs a little speed on GPUs
    # `--low-memory`: gradient checkpointing in the LLM, UNet and vision tower, an 8-bit AdamW
    # (bitsandbytes) or, where it cannot run, Adafactor for the trainable weights, and frozen parts in bfloat16 when
    # model.frozen_dtype is auto (mmgen/training/low_memory.py)
    low_memory: bool = False

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum", "save_every", "keep_last_n", "log_every")
        if self.lr <= 0 or self.lr_pretrained <= 0:
            raise ConfigError("train.lr and train.lr_pretrained must be positive")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps must not be negative")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in (0, 1), or null to disable EMA")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("train.betas must both be in [0, 1)")


@dataclass
class GenerateConfig:
    sampler: str = "dpm++"  # a name in mmgen/models/samplers.py
    steps: int = 20
    guidance: float = 2.5
    temperature: float = 1.0
    top_p: float = 0.9
    max_images: int = 4
    min_images: int = 0  # a freely continued document may end (<eod>) only after this many new images (at most max_images)
    max_new_tokens: int = 128
    batch_size: int = 8
    seed: int = 0
    kind: str = "story"  # the document kind a prompt without meta.kind asks for (mmgen/data/kinds.py); "" for none

    def validate(self) -> None:
        _one_of(self, "sampler", SAMPLERS)
        if self.kind:
            _one_of(self, "kind", KINDS)
        _positive(self, "steps", "max_new_tokens", "batch_size")
        if self.max_images < 0:
            raise ConfigError("generate.max_images must not be negative")
        if self.min_images < 0:
            raise ConfigError("generate.min_images must not be negative")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("generate.top_p must be in (0, 1]")
        if self.temperature < 0:
            raise ConfigError("generate.temperature must not be negative")


@dataclass
class AlignConfig:
    """COSMOS alignment stage (`mmgen train --stage align`, docs/DESIGN.md §8).

    Trains the vision tower (``model.vision``) and a tiny CLIP text encoder with an image-text
    contrastive loss plus cross-modality self-distillation from an EMA teacher. The optimiser
    settings not named here (betas, eps, weight decay, clipping, lr floor, save/log cadence,
    seed) come from ``train.*``.
    """

    out_dir: str = "runs/align-tiny"  # its own run folder: never a main training run's
    steps: int = 300
    batch_size: int = 32  # images (each with its sentence) per step
    lr: float = 1e-3
    warmup_steps: int = 20
    # the text encoder: a CLIPTextModel built from these numbers, fed the project's tokenizer
    text_hidden_size: int = 64
    text_num_layers: int = 2
    text_num_heads: int = 4  # also the heads of the two cross-modal attention modules
    text_intermediate_size: int = 128
    text_max_len: int = 32  # tokens per caption, end-of-text token included
    embed_dim: int = 64  # shared image-text embedding width
    # multi-crop: image crops are given as shares of the frame's area
    global_scale: tuple[float, float] = (0.7, 1.0)  # mild: positions are named in the captions
    local_crops: int = 4
    local_size: int = 16  # pixels; a multiple of model.vision.patch_size
    text_crops: int = 2  # cropped captions: random runs of words of the sentence
    # losses
    distill_weight: float = 1.0  # weight of the self-distillation loss; 0: contrastive only
    prototypes: int = 64  # K outputs of the DINO-style projection head
    teacher_momentum: float = 0.996  # EMA decay of the teacher
    export: Literal["student", "teacher"] = "student"  # the towers written to step-*/vision, text
    eval_n: int = 64  # fresh frames for the retrieval score at the end of a run

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "text_hidden_size", "text_num_layers", "text_num_heads",
                  "text_intermediate_size", "text_max_len", "embed_dim", "local_size",
                  "prototypes", "eval_n")
        if self.lr <= 0:
            raise ConfigError("align.lr must be positive")
        if self.warmup_steps < 0 or self.local_crops < 0 or self.text_crops < 0:
            raise ConfigError("align.warmup_steps, align.local_crops and align.text_crops must not be negative")
        if self.batch_size < 2:
            raise ConfigError("align.batch_size must be at least 2: the contrastive loss needs negatives")
        if self.text_hidden_size % self.text_num_heads:
            raise ConfigError("align.text_hidden_size must be divisible by align.text_num_heads")
        if self.embed_dim % self.text_num_heads:  # the cross-attention modules use the text encoder's heads
            raise ConfigError("align.embed_dim must be divisible by align.text_num_heads")
        if self.text_max_len < 2:
            raise ConfigError("align.text_max_len must be at least 2 (a word and the end-of-text token)")
        lo, hi = self.global_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"align.global_scale must be two shares with 0 < low <= high <= 1, got {[lo, hi]}")
        if self.distill_weight < 0:
            raise ConfigError("align.distill_weight must not be negative (0 trains the contrastive loss alone)")
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ConfigError(f"align.teacher_momentum must be in [0, 1], got {self.teacher_momentum}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def validate(self) -> Config:
        """Check every section and the invariants between sections; return self."""
        for section in _walk(self):
            if hasattr(section, "validate") and section is not self:
                section.validate()
        m, d = self.model, self.data
        if m.vision.pretrained is None and m.vision.image_size != d.image_size:
            raise ConfigError("model.vision.image_size must equal data.image_size for a tiny vision tower")
        if m.decoder.pretrained is None and m.decoder.image_size != d.image_size:
            raise ConfigError("model.decoder.image_size must equal data.image_size for a tiny decoder")
        if self.train.loss_weights.contrastive and not m.llm.text_only_layers:
            raise ConfigError("train.loss_weights.contrastive > 0 needs model.llm.text_only_layers ≥ 1: the "
                              "CosMo contrastive loss reads the text after the text-only layers")
        if m.vision.pretrained is None and self.align.local_size % m.vision.patch_size:
            raise ConfigError("align.local_size must be a multiple of model.vision.patch_size")
        if m.resampler.num_queries + 2 >= d.seq_len:
            raise ConfigError("data.seq_len is too short to hold one image")
        if m.llm.pretrained is None and d.seq_len > m.llm.max_position_embeddings:
            raise ConfigError("data.seq_len must not exceed model.llm.max_position_embeddings")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def frozen_dtype_name(self) -> str:
        """``model.frozen_dtype`` with "auto" resolved from ``train.mixed_precision``."""
        name = self.model.frozen_dtype
        if name == "auto":
            name = {"bf16": "bfloat16", "fp16": "float16"}.get(self.train.mixed_precision, "float32")
        return name

    def frozen_storage_dtype_name(self) -> str:
        """The dtype frozen components are kept in: :meth:`frozen_dtype_name`, but bfloat16 under
        ``train.low_memory`` when "auto" resolves to float32 (they are then cast up layer by layer
        while they run: mmgen/training/low_memory.py)."""
        name = self.frozen_dtype_name()
        if self.model.frozen_dtype == "auto" and name == "float32" and self.train.low_memory:
            return "bfloat16"
        return name

    def model_yaml(self) -> str:
        """What a model folder keeps: what a loaded model reads (``model_config_dict``), with the
        frozen dtype resolved; the rest of ``train`` and the ``align`` section stay in the run folder."""
        raw = model_config_dict(self.to_dict())
        raw["model"]["frozen_dtype"] = self.frozen_dtype_name()
        return yaml.safe_dump(raw, sort_keys=False)


# what a model folder's config.yaml holds: whole sections, and the one train setting the model's
# forward pass reads (the weights of its losses)
MODEL_SECTIONS = ("model", "data", "generate")
MODEL_TRAIN_KEYS = ("loss_weights",)


def model_config_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """The part of a config a model folder keeps (older folders' other train keys and align section dropped)."""
    out = {k: v for k, v in raw.items() if k in MODEL_SECTIONS}
    train = {k: v for k, v in (raw.get("train") or {}).items() if k in MODEL_TRAIN_KEYS}
    if train:
        out["train"] = train
    return out


# ---------------------------------------------------------------------------------------------
# loading, overrides, type checking


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (default: ``configs/shapes_tiny.yaml``), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    try:
        for item in overrides:
            _apply_override(raw, item)
        return from_dict(Config, raw).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data (e.g. a checkpoint's ``config.yaml``)."""
    return from_dict(Config, raw).validate()


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like key.path=value")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override `{item}`: bad key `{key}`")
    tp = _field_type(Config, parts, key)  # unknown keys are rejected before touching the tree
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, bool) and _takes_string(tp):  # YAML 1.1 reads no/yes/on/off as booleans
        value = text.strip()
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _takes_string(tp: Any) -> bool:
    """Whether a field of type ``tp`` accepts a string (``str``, or a ``Literal`` of strings)."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_takes_string(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _field_type(cls: type, parts: list[str], key: str) -> Any:
    tp: Any = cls
    for i, p in enumerate(parts):
        tp = _unwrap_optional(tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key `{key}`: `{'.'.join(parts[:i])}` has no sub-keys")
        hints = typing.get_type_hints(tp)
        if p not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(tp))
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key `{key}` (known at {where}: {known})")
        tp = hints[p]
    return tp


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every value against its annotation."""
    if not isinstance(data, dict):
        raise ConfigError(f"`{where or 'config'}` must be a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"unknown config key `{key}` (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
              for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"`{where}` must be {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{where}` must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{where}` must be a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"`{where}` must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"`{where}` must be {_type_name(tp)}, got {_describe(value)}")


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if tp is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _one_of(obj: Any, name: str, known: dict[str, Any]) -> None:
    """A name that must be a key of a registry (samplers, LLM families)."""
    value = getattr(obj, name)
    if value not in known:
        raise ConfigError(f"`{_section_name(obj)}.{name}` must be one of {', '.join(map(repr, known))}, "
                          f"got {value!r}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"`{_section_name(obj)}.{n}` must be positive, got {getattr(obj, n)}")


_SECTION_NAMES = {
    "VisionConfig": "model.vision", "ResamplerConfig": "model.resampler", "LLMConfig": "model.llm",
    "MMFSConfig": "model.mmfs", "DecoderConfig": "model.decoder", "DataConfig": "data",
    "TrainConfig": "train", "GenerateConfig": "generate", "AlignConfig": "align",
}


def _section_name(obj: Any) -> str:
    return _SECTION_NAMES.get(type(obj).__name__, type(obj).__name__)


def _walk(obj: Any):
    yield obj
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                yield from _walk(v)


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x
