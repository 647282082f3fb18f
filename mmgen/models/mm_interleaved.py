"""MM-Interleaved: vision → resampler → LLM with MMFS → text loss, + image decoder → image loss.

Shape legend: B rows, T tokens, N images in the batch, n images with an image loss, Q
placeholders per image, D LLM width, C vision width, M image slots per row, L levels,
K context length (longest document prefix up to an image's ``<boi>``).

One training step (docs/DESIGN.md §1–§7):
1. every image → vision tokens (N, 1+G², C) and multi-scale maps [(N, C, H_l, W_l)];
2. the resampler turns the tokens into Q embeddings that replace the image's placeholders;
3. the LLM (with MMFS reading each row's image slots) gives logits and last hidden states;
4. text loss: next-token cross-entropy on ``labels`` (logits[t] predicts labels[t + 1]);
5. image loss: for every image with ``image_loss_mask``, the hidden states of its document
   from the start to its ``<boi>`` condition the decoder, which also reads (MMFS) the images
   that its ``<boi>`` sees;
6. contrastive loss (CosMo, when ``model.llm.text_only_layers`` ≥ 1 and its weight > 0): each
   image's pooled resampler output against its text's pooled hidden states after the text-only
   layers (``mmgen.models.contrastive``).

A checkpoint folder (``save_pretrained``) holds ``model.safetensors``, the fully resolved
``config.yaml`` (with the sizes of the components as loaded) and ``tokenizer/``. Components of
real configs are built from their local folders (the ``pretrained`` fields): the tensors of a
frozen component read from such a base folder are not saved again (``base.json`` names the
folders), so those folders must exist when a checkpoint is loaded; ``mmgen.models.export``
writes a folder that stands alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError, safe_open

from mmgen.config import Config, ConfigError, config_from_dict, model_config_dict
from mmgen.data.collate import IGNORE, Batch, collate, encode_document, truncate
from mmgen.data.documents import Document, Segment
from mmgen.data.tokenizer import load_tokenizer, special_ids
from mmgen.models.contrastive import ContrastiveHead, image_text_spans, pool_spans, text_token_mask
from mmgen.models.image_decoder import ImageDecoder
from mmgen.models.llm import MMFSLanguageModel, build_llm
from mmgen.models.offload import execution_device, offload_components
from mmgen.models.model_files import (  # noqa: F401 (check_base_folders, verify_checksum: used from here)
    CHECKSUMS_NAME, CONFIG_NAME, _frozen_dtype, _loaded_sizes, _resized, _shared_names, _store_once,
    check_base_folders, file_sha256, resolve_base_folders, save_tensors, verify_checksum, weights_mismatch)
from mmgen.models.precision import is_quantized
from mmgen.models.resampler import Resampler
from mmgen.models.vision import VisionEncoder

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
LOAD_CHUNK_BYTES = 1 << 28  # load_weights reads the file in chunks of about this size (256 MB)
BASE_NAME = "base.json"  # the base folders whose frozen tensors the weights file leaves out
TOKENIZER_DIR = "tokenizer"
FREEZE_GROUPS = ("vision", "llm", "sync", "decoder")


class DecoderInputs(NamedTuple):
    """What the image decoder reads for n images (:meth:`MMInterleaved.image_conditions`)."""

    context: torch.Tensor  # (n, K, D) the LLM's hidden states from the document start to the <boi>
    mask: torch.Tensor  # (n, K) bool, the real ones
    ids: torch.Tensor  # (n, K) their token ids (the ``words`` conditioner reads them)
    prev_features: list[torch.Tensor]  # [(n, M', C, H_l, W_l)] the earlier images MMFS reads
    prev_visible: torch.Tensor  # (n, M') bool
    prev_image: torch.Tensor | None  # (n, 3, S, S) the latest earlier image, zeros for none


class MMInterleaved(nn.Module):
    """The composed model. ``forward(batch) -> {"loss", "text_loss", "image_loss"[, "contrastive_loss"]}``.

    With ``model.llm.text_only_layers`` ≥ 1 it also has a :class:`ContrastiveHead` (``contrastive``),
    trained when ``train.loss_weights.contrastive`` > 0 and used for retrieval; else ``contrastive``
    is None, so checkpoints without text-only layers keep their keys.
    """

    def __init__(self, cfg: Config, tokenizer):
        super().__init__()
        m = cfg.model
        if cfg.train.loss_weights.contrastive and not m.llm.text_only_layers:
            raise ConfigError("train.loss_weights.contrastive > 0 needs model.llm.text_only_layers ≥ 1: the "
                              "CosMo contrastive loss reads the text after the text-only layers")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self.vision = VisionEncoder(m.vision)
        C, L = self.vision.out_dim, self.vision.num_levels
        # a frozen LLM is read in the dtype it is kept in: no full-precision copy on the way. A 4/8-bit
        # one computes in its own dtype (no layer-by-layer cast), so it takes the run's compute dtype
        # (float32 in a CPU run even under --low-memory, or its hidden states would reach float32 MMFS in bf16)
        if m.llm.trainable:
            lm_dtype = torch.float32
        elif m.llm.quantize != "none":
            lm_dtype = getattr(torch, cfg.frozen_dtype_name())
        else:
            lm_dtype = _frozen_dtype(cfg)
        lm = build_llm(m.llm, len(tokenizer), dtype=lm_dtype)
        self.llm = MMFSLanguageModel(lm, m.mmfs, value_dim=C, num_levels=L, text_only_layers=m.llm.text_only_layers,
                                     gradient_checkpointing=m.llm.gradient_checkpointing)
        D = lm.get_input_embeddings().embedding_dim
        self.resampler = Resampler(m.resampler, C, D)
        self.decoder = ImageDecoder(m.decoder, m.mmfs, llm_dim=D, vision_dim=C, num_levels=L,
                                    vocab_size=len(tokenizer))
        self.contrastive = ContrastiveHead(D, m.llm.contrastive_dim) if m.llm.text_only_layers else None
        self.set_trainable()
        self._cast_frozen()
        self.cfg = self.cfg if m.llm.pretrained is None and m.vision.pretrained is None else _loaded_sizes(self)

    @property
    def device(self) -> torch.device:
        """Where the model runs (with ``--low-memory`` on an accelerator its big parts wait on the CPU)."""
        return execution_device(self.decoder.unet)

    # --- the pieces of a step (also used by generation) -----------------------------------------

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (N, 3, S, S) in [-1, 1] → placeholder embeddings (N, Q, D), maps [(N, C, H_l, W_l)]."""
        tokens, maps = self.vision(images)  # (N, 1+G², C)
        return self.resampler(tokens), maps

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_row: torch.Tensor | None = None, image_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with each image's placeholders replaced by its Q embeddings."""
        embeds = self.llm.embed_tokens(input_ids)  # (B, T, D)
        if image_embeds is None or image_embeds.shape[0] == 0:
            return embeds
        rows = image_row[:, None].expand_as(image_positions)  # (N, Q)
        return embeds.index_put((rows, image_positions), image_embeds.to(embeds.dtype))  # (B, T, D)

    def decoder_context(self, out) -> torch.Tensor:
        """Per-token context for the image decoder: the LLM's last hidden states (B, T, D), their
        gradient scaled by ``model.decoder.context_grad``."""
        return scale_grad(out.last_hidden_state, self.cfg.model.decoder.context_grad)

    @staticmethod
    def row_features(maps: list[torch.Tensor], row_images: torch.Tensor) -> list[torch.Tensor]:
        """Gather each row's images into slots: [(N, C, H, W)] + (B, M) → [(B, M, C, H, W)].

        Empty slots (-1) hold image 0's maps; they are never visible.
        """
        idx = row_images.clamp(min=0)  # (B, M)
        return [f[idx] for f in maps]

    @staticmethod
    def context_index(boi: torch.Tensor, boi_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices of each image's context: its document from the start to its ``<boi>``.

        Args: boi (n,) position of each <boi> in its row; boi_position (n,) its position id
        (positions restart at 0 for every packed document). Returns index (n, K), mask (n, K).
        """
        length = boi_position + 1  # (n,)
        K = int(length.max()) if length.numel() else 0
        offs = torch.arange(K, device=boi.device)  # (K,)
        mask = offs[None, :] < length[:, None]  # (n, K)
        index = (boi - boi_position)[:, None] + offs[None, :]  # (n, K)
        return torch.where(mask, index, boi[:, None].expand_as(index)), mask

    def image_conditions(self, batch: Batch, hidden: torch.Tensor, maps: list[torch.Tensor],
                         which: torch.Tensor) -> DecoderInputs:
        """Decoder inputs of images ``which`` (n,): context, its mask and token ids, previous images.

        ``hidden`` (B, T, D) is :meth:`decoder_context` of the LLM output. The earlier images are
        those its ``<boi>`` sees (of its own document), compacted to the first M' slots in their
        order (M' = the most any of them sees: MMFS cost grows with the slots); ``prev_image``, the
        latest of them, is None unless the decoder reads it (the ``previous_image`` conditioner).
        """
        rows, boi = batch.image_row[which], batch.image_boi[which]  # (n,)
        index, mask = self.context_index(boi, batch.position_ids[rows, boi])  # (n, K)
        context = hidden[rows[:, None], index]  # (n, K, D)
        ids = batch.input_ids[rows[:, None], index]  # (n, K)
        visible = batch.visible[rows, boi]  # (n, M)
        keep = max(1, int(visible.sum(1).max()))  # M'
        order = torch.sort((~visible).to(torch.uint8), dim=1, stable=True).indices[:, :keep]  # (n, M') visible first
        prev_visible = visible.gather(1, order)  # (n, M')
        slots = batch.row_images[rows].gather(1, order)  # (n, M') image indices, visible first
        prev_features = self.row_features(maps, slots)  # [(n, M', C, H_l, W_l)]
        prev_image = None
        if self.decoder.previous_image:
            latest = slots[torch.arange(len(rows), device=slots.device), (prev_visible.sum(1) - 1).clamp(min=0)]
            seen = prev_visible.any(1).view(-1, 1, 1, 1).to(batch.images.dtype)
            prev_image = batch.images[latest.clamp(min=0)] * seen  # (n, 3, S, S)
        return DecoderInputs(context, mask, ids, prev_features, prev_visible, prev_image)

    def image_losses(self, batch: Batch, hidden: torch.Tensor, maps: list[torch.Tensor],
                     limit: int | None = None) -> torch.Tensor:
        """Per-image diffusion losses (n,) of the images with ``image_loss_mask`` (at most ``limit``)."""
        which = batch.image_loss_mask.nonzero().squeeze(-1)  # (n,)
        if limit is not None and which.numel() > limit:
            which = which[torch.randperm(which.numel(), device=which.device)[:limit]].sort().values
        if which.numel() == 0:
            return hidden.new_zeros(0)
        c = self.image_conditions(batch, hidden, maps, which)
        return self.decoder.loss(batch.images[which], c.context, c.mask, c.prev_features, c.prev_visible,
                                 context_ids=c.ids, prev_image=c.prev_image)

    def forward(self, batch: Batch, *, image_loss_limit: int | None = None) -> dict[str, torch.Tensor]:
        """Losses of one packed batch; ``image_loss_limit`` caps the images the decoder trains on."""
        has_images = batch.num_images > 0
        # 1-2. vision tokens → placeholder embeddings; multi-scale maps for the synchronizers
        if has_images:
            image_embeds, maps = self.encode_images(batch.images)  # (N, Q, D), [(N, C, H_l, W_l)]
            features = self.row_features(maps, batch.row_images)  # [(B, M, C, H_l, W_l)]
        else:
            image_embeds, maps, features = None, [], None
        embeds = self.embed(batch.input_ids, image_embeds, batch.image_row, batch.image_positions)

        # 3. the LLM over packed rows
        out = self.llm(inputs_embeds=embeds, segment_ids=batch.segment_ids, position_ids=batch.position_ids,
                       image_features=features, visible=batch.visible if has_images else None)

        # 4. next-token text loss, averaged over the labelled tokens
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        labels = batch.labels[:, 1:]  # (B, T-1)
        n_text = (labels != IGNORE).sum()
        text_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                    ignore_index=IGNORE, reduction="sum") / n_text.clamp(min=1)

        # 5. diffusion loss of every image with context
        if has_images:
            context = self.decoder_context(out)  # (B, T, D)
            per_image = self.image_losses(batch, context, maps, image_loss_limit)
        else:
            per_image = out.last_hidden_state.new_zeros(0)
        image_loss = per_image.mean() if per_image.numel() else out.last_hidden_state.new_zeros(())

        w = self.cfg.train.loss_weights
        losses = {"loss": w.text * text_loss + w.image * image_loss, "text_loss": text_loss,
                  "image_loss": image_loss}

        # 6. CosMo contrastive loss: images against their text after the text-only layers
        if w.contrastive and has_images:
            image_emb, text_emb = self.contrastive_pairs(batch, image_embeds, out.hidden_states)
            losses["contrastive_loss"] = self.contrastive.loss(image_emb, text_emb)
        elif w.contrastive:
            losses["contrastive_loss"] = 0.0 * self.contrastive.logit_scale.sum()
        if w.contrastive:
            losses["loss"] = losses["loss"] + w.contrastive * losses["contrastive_loss"]
        return losses

    # --- CosMo: contrastive embeddings and retrieval ---------------------------------------------

    def require_contrastive(self) -> ContrastiveHead:
        if self.contrastive is None:
            raise ValueError("this model has no text-only LLM layers (model.llm.text_only_layers = 0), so it "
                             "has no CosMo contrastive embeddings for retrieval; train one with "
                             "model.llm.text_only_layers ≥ 1 and train.loss_weights.contrastive > 0")
        return self.contrastive

    def contrastive_pairs(self, batch: Batch, image_embeds: torch.Tensor,
                          hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings (n, E) of the images that have a text in their document, and of their texts.

        Args: image_embeds (N, Q, D) resampler outputs; hidden_states the LLM's per-layer states,
        of which ``[text_only_layers]`` (the output of the last text-only layer) is pooled.
        """
        head = self.require_contrastive()
        start, end, valid = image_text_spans(batch.input_ids, batch.segment_ids, batch.position_ids,
                                             batch.image_row, batch.image_boi, self.special)  # (N,) each
        hidden = hidden_states[self.cfg.model.llm.text_only_layers]  # (B, T, D)
        text = pool_spans(hidden, batch.image_row[valid], start[valid], end[valid])  # (n, D)
        return head.embed_images(image_embeds[valid]), head.embed_texts(text)

    def embed_images_for_retrieval(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [-1, 1] → unit embeddings (N, E): vision → resampler → pool → project."""
        head = self.require_contrastive()
        tokens, _ = self.vision(images.to(self.device))  # (N, 1+G², C)
        return head.embed_images(self.resampler(tokens))  # (N, E)

    def embed_texts_for_retrieval(self, texts: list[str]) -> torch.Tensor:
        """Sentences → unit embeddings (n, E); each is a text-only document, one per row, pooled
        over its text tokens after the text-only layers (as in training)."""
        head = self.require_contrastive()
        Q, d = self.cfg.model.resampler.num_queries, self.cfg.data
        rows = []
        for i, text in enumerate(texts):
            doc = encode_document(Document(f"text-{i}", [Segment("text", text=text)]), self.tokenizer,
                                  num_queries=Q)
            doc = truncate(doc, d.seq_len, d.max_images_per_seq)
            if doc is None:
                raise ValueError(f"text {i} ({text!r}) has no tokens to embed")
            rows.append([doc])
        batch = collate(rows, pad_id=self.special.pad, num_queries=Q, image_size=d.image_size).to(self.device)
        out = self.llm(input_ids=batch.input_ids, segment_ids=batch.segment_ids, position_ids=batch.position_ids)
        mask = text_token_mask(batch.input_ids, batch.segment_ids, self.special)  # (n, T)
        if not mask.any(1).all():
            empty = int((~mask.any(1)).nonzero()[0])
            raise ValueError(f"text {empty} ({texts[empty]!r}) has no text tokens to embed")
        T = mask.shape[1]
        start = mask.int().argmax(1)  # (n,) first text token
        end = T - mask.flip(1).int().argmax(1)  # (n,) one past the last
        hidden = out.hidden_states[self.cfg.model.llm.text_only_layers]  # (n, T, D)
        return head.embed_texts(pool_spans(hidden, torch.arange(len(rows), device=self.device), start, end))

    # --- freezing and optimiser groups -----------------------------------------------------------

    def groups(self) -> dict[str, list[nn.Module]]:
        """The freeze groups: vision tower, LLM, synchronizers (MMFS, resampler, contrastive head), decoder."""
        return {
            "vision": [self.vision],
            "llm": [self.llm.lm],
            "sync": [self.resampler, self.llm.mmfs, self.decoder.mmfs_blocks]
            + ([self.contrastive] if self.contrastive is not None else []),
            "decoder": [self.decoder.unet, self.decoder.context_encoder, self.decoder.conditioners],
        }

    def set_trainable(self, *, vision: bool | None = None, llm: bool | None = None, sync: bool | None = None,
                      decoder: bool | None = None) -> None:
        """Set requires_grad per group; None takes the config's flag. The VAE is always frozen."""
        m = self.cfg.model
        flags = {"vision": m.vision.trainable if vision is None else vision,
                 "llm": m.llm.trainable if llm is None else llm,
                 "sync": m.mmfs.trainable if sync is None else sync,
                 "decoder": m.decoder.trainable if decoder is None else decoder}
        for name, modules in self.groups().items():
            for module in modules:
                module.requires_grad_(flags[name])
        if self.decoder.vae is not None:
            self.decoder.vae.requires_grad_(False)

    def frozen_dtype(self) -> torch.dtype:
        """The dtype frozen components are kept in: ``model.frozen_dtype``, "auto" following
        ``train.mixed_precision`` (bfloat16 under ``train.low_memory``)."""
        return _frozen_dtype(self.cfg)

    def big_components(self) -> dict[str, nn.Module]:
        """The big components, by name: vision tower, LLM, UNet and (with one) VAE."""
        parts = {"vision tower": self.vision.tower, "LLM": self.llm.lm, "UNet": self.decoder.unet,
                 "VAE": self.decoder.vae}
        return {name: module for name, module in parts.items() if module is not None}

    def frozen_components(self) -> dict[str, nn.Module]:
        """The big components without a trainable parameter, by name."""
        return {name: module for name, module in self.big_components().items()
                if not any(p.requires_grad for p in module.parameters())}

    def _cast_frozen(self) -> None:
        """Frozen components in :meth:`frozen_dtype` (a quantized LLM keeps its bits); trainable ones stay fp32."""
        dtype = self.frozen_dtype()
        if dtype == torch.float32:
            return
        for module in self.frozen_components().values():
            if not is_quantized(module):  # nn.Module's own cast: diffusers' override warns even when it keeps nothing
                nn.Module.to(module, dtype)  # in fp32 (the SD VAE: "should be kept in float32: []")

    def base_folders(self) -> dict[str, str]:
        """State-dict prefix → base folder, for the frozen components read from a folder (training
        leaves them as loaded, so checkpoints do not store them again)."""
        m, out = self.cfg.model, {}
        frozen = lambda mod: not any(p.requires_grad for p in mod.parameters())  # noqa: E731
        if m.vision.pretrained and frozen(self.vision.tower):
            out["vision.tower."] = m.vision.pretrained
        if m.llm.pretrained and frozen(self.llm.lm):
            out["llm.lm."] = m.llm.pretrained
        if m.decoder.pretrained and self.decoder.vae is not None:
            out["decoder.vae."] = m.decoder.pretrained
        if m.decoder.pretrained and frozen(self.decoder.unet):
            out["decoder.unet."] = m.decoder.pretrained
        return out

    def base_keys(self, keys) -> set[str]:
        """Those of ``keys`` that come unchanged from a base folder. Not among them: token embeddings
        resized for the tokenizer (the new rows are this model's) and a UNet input widened by conditioners."""
        prefixes = tuple(self.base_folders())
        if not prefixes:
            return set()
        own = {f"decoder.unet.conv_in.{n}" for n in ("weight", "bias")} if self.decoder.widened else set()
        if "llm.lm." in prefixes and _resized(self.cfg.model.llm.pretrained, self.llm.lm):
            embeds = [self.llm.lm.get_input_embeddings(), self.llm.lm.get_output_embeddings()]
            ids = {id(e.weight) for e in embeds if e is not None}
            own |= {f"llm.lm.{n}" for n, p in self.llm.lm.named_parameters(remove_duplicate=False) if id(p) in ids}
        return {k for k in keys if k.startswith(prefixes) and k not in own}

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups of the trainable parameters: name, params, lr, weight_decay.

        ``train.lr_pretrained`` goes to pretrained components (UNet, LLM, vision tower from a
        folder) and to MMFS sampling offsets; ``train.lr`` to the rest. No weight decay on
        biases, norms, gates, sampling offsets and other 1-D parameters.
        """
        t, m = self.cfg.train, self.cfg.model
        pretrained = {id(p) for module, folder in ((self.decoder.unet, m.decoder.pretrained),
                                                   (self.llm.lm, m.llm.pretrained), (self.vision, m.vision.pretrained))
                      if folder is not None for p in module.parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            slow = id(p) in pretrained or "sampling_offsets" in name
            no_decay = p.ndim < 2 or any(k in name for k in ("sampling_offsets", "gate", "norm"))
            groups.setdefault((slow, no_decay), []).append(p)
        out = []
        for (slow, no_decay), params in sorted(groups.items()):
            out.append({"name": ("pretrained" if slow else "new") + ("_no_decay" if no_decay else ""),
                        "params": params, "lr": t.lr_pretrained if slow else t.lr,
                        "weight_decay": 0.0 if no_decay else t.weight_decay})
        return out

    # --- checkpoints -----------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
                        whole: bool = False) -> Path:
        """Write ``model.safetensors``, ``config.yaml``, ``tokenizer/`` and ``base.json``.

        The weights file holds every tensor but those of frozen components read from a base
        folder (all of them with ``whole``); shared tensors are stored once, nothing is copied.
        ``state_dict`` replaces the model's own (e.g. whole tensors gathered from FSDP shards).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        base = set() if whole else self.base_keys(state)
        save_tensors(_store_once({k: v for k, v in state.items() if k not in base}), folder / WEIGHTS_NAME,
                     metadata={"format": "pt", "library": "mmgen"})
        if base:  # what the weights file leaves out, and where it is read from
            (folder / BASE_NAME).write_text(json.dumps({"folders": self.base_folders(),
                                                        "tensors_left_out": len(base)}, indent=2) + "\n")
        (folder / CHECKSUMS_NAME).write_text(json.dumps({WEIGHTS_NAME: file_sha256(folder / WEIGHTS_NAME)}) + "\n")
        (folder / CONFIG_NAME).write_text(self.cfg.model_yaml(), encoding="utf-8")
        self.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu",
                        overrides: list[str] | tuple[str, ...] = (), low_memory: bool = False) -> MMInterleaved:
        """Load a folder written by :meth:`save_pretrained` (safetensors only, strict keys): the model
        is rebuilt from the base folders its config names (``overrides`` such as
        ``model.llm.pretrained=/new/place`` point at moved ones), then the file's tensors are read
        into it a chunk at a time from the memory-mapped file.

        For inference the whole model takes one dtype: bfloat16 with ``low_memory`` (``mmgen generate
        --low-memory``), else that of its frozen parts (``model.frozen_dtype``)."""
        folder = Path(folder)
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_DIR) if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(f"{folder} is not an mmgen checkpoint folder: {', '.join(missing)} "
                                    f"{'is' if len(missing) == 1 else 'are'} missing; a model folder holds "
                                    f"{CONFIG_NAME}, {WEIGHTS_NAME} and {TOKENIZER_DIR}/ as save_pretrained "
                                    "wrote them — copy the whole folder again")
        try:
            raw = yaml.safe_load((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{folder / CONFIG_NAME}: not valid YAML: {e}") from None
        from mmgen.config import _apply_override

        raw = model_config_dict(raw or {})
        try:
            for item in overrides:
                _apply_override(raw, item)
            resolve_base_folders(raw, folder)
            cfg = config_from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{folder / CONFIG_NAME}: {e}; this must be the config saved with the weights — "
                              "undo the edit, or load it with the mmgen version that wrote it") from None
        check_base_folders(cfg, folder)
        verify_checksum(folder, WEIGHTS_NAME)
        model = cls(cfg, load_tokenizer(folder / TOKENIZER_DIR))
        model.load_weights(folder)
        dtype = torch.bfloat16 if low_memory else getattr(torch, model.cfg.frozen_dtype_name())
        if dtype != torch.float32:  # a quantized LLM keeps its 8 or 4 bits (and computes in its own dtype)
            for module in [*model.children(), *model.llm.children()]:
                if module is not model.llm and not is_quantized(module):
                    module.to(dtype)
        if low_memory and torch.device(device).type != "cpu":  # big components on the device only while they run
            offload_components(model, device)
            return model
        return model.to(device=device)

    def load_weights(self, folder: Path) -> None:
        """Read ``folder/model.safetensors`` into this model, a tensor at a time from the mapped file
        (no second copy of the model); every tensor not from a base folder must be in the file."""
        path = Path(folder) / WEIGHTS_NAME
        missing: set[str] | None = None
        unexpected: list[str] = []
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            while keys:  # chunks of about LOAD_CHUNK_BYTES: memory of the model plus one chunk
                # the file is mapped again for each chunk: the pages read so far count as this process's
                # memory while the mapping is open (the 7B config's generation peaked there, +3.9 GB)
                with safe_open(str(path), framework="pt") as f:
                    chunk, size = {}, 0
                    while keys and size < LOAD_CHUNK_BYTES:
                        key = keys.pop(0)
                        chunk[key] = t = f.get_tensor(key)
                        size += t.numel() * t.element_size()
                result = self.load_state_dict(chunk, strict=False)
                del chunk
                unexpected += result.unexpected_keys
                missing = set(result.missing_keys) if missing is None else missing & set(result.missing_keys)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); it is damaged "
                             "or was cut short — copy it again or use another checkpoint") from None
        except RuntimeError as e:
            raise ValueError(f"{path} does not match {CONFIG_NAME}: {weights_mismatch(e)}; the "
                             f"weights were saved with another model config — use the {CONFIG_NAME} saved "
                             "with them") from None
        state_keys = set(self.state_dict())
        missing = (state_keys if missing is None else missing) - self.base_keys(state_keys) - _shared_names(self)
        if missing or unexpected:
            parts = [f"{len(keys)} tensor{'s' if len(keys) != 1 else ''} {what} (e.g. {sorted(keys)[0]})"
                     for keys, what in ((missing, "missing from the file"),
                                        (unexpected, "in the file but not in the model")) if keys]
            what = ", ".join(parts)
            raise ValueError(f"{path} does not match {CONFIG_NAME}: {what}; the weights were saved with another "
                             f"model config — use the {CONFIG_NAME} saved with them")


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` in the backward pass."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x * scale + x.detach() * (1.0 - scale)
