"""Interleaved generation: prompts → illustrated documents (docs/DESIGN.md "The generation loop").

The loop, for a batch of prompts that share one KV cache (rows = documents):
1. each document feeds its next chunk — the prompt prefix, a sampled token, or a new image's
   Q embeddings — padded to a common length; the padding stays masked out of the cache;
2. a document whose chunk ended in ``<boi>`` gets an image: the LLM's hidden states of the
   document up to that ``<boi>`` condition the diffusion sampler (classifier-free guidance
   against the learned null context), which also reads the document's earlier images
   through the UNet's MMFS blocks; all documents that need an image are sampled together;
3. the new image is encoded once by the vision encoder: its resampler tokens are the next
   chunk, its multi-scale maps join the images the LLM's MMFS layers read;
4. otherwise the next token is sampled (temperature, top-p) from the document's own
   generator; ``<eod>``, a filled last placeholder or a limit ends the document, which then
   leaves the batch (its cache rows are dropped) without stalling the others.

Placeholders (``{"type": "image"}``, ``{"type": "text"}``) are filled in order and generation
stops after the last segment; a prompt without placeholders is continued freely until
``<eod>``, ``max_images`` or ``max_new_tokens``; ``<eod>`` is not sampled before ``min_images``
new images are drawn (as ``min_new_tokens`` holds off the end of a text).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from ..config import GenerateConfig
from ..data.collate import encode_document, image_to_tensor, tensor_to_image
from ..data.documents import Document, Segment
from ..data.kinds import kind_id, kind_ids
from ..data.shapes import foreign_sentences
from ..oom import OutOfMemory, generation_oom, is_oom, release

log = logging.getLogger(__name__)


# the sampling settings are the config's `generate` section; every one is recorded in `meta`
Settings = GenerateConfig


def settings_from(cfg: GenerateConfig, **overrides: Any) -> GenerateConfig:
    """``cfg`` with the overrides that are not None."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


class Mode(Enum):
    """What a document being generated does next; :meth:`Generator._transition` is every change.

    ============  =========================================================================
    WRITE         sample the next token and continue the document freely (the start)
    FILL_TEXT     sample the text of a text placeholder
    DRAW          the chunk being fed ends with ``<boi>``: an image is drawn after it
    DONE          finished: the document leaves the batch
    ============  =========================================================================
    """

    WRITE = "write"
    FILL_TEXT = "fill_text"
    DRAW = "draw"
    DONE = "done"


@dataclass
class _Doc:
    """One document being generated."""

    prompt: Document
    index: int  # the prompt's position in the call, as yielded
    seed: int
    kind: str | None  # the document kind given to the model (None: none, or a model without kinds)
    gen: torch.Generator
    pending: list[Segment]  # prompt segments not yet fed
    placeholders: bool  # the prompt has places to fill (else: continue freely)
    segments: list[Segment] = field(default_factory=list)  # the output so far
    chunk_ids: list[int] = field(default_factory=list)  # next tokens to feed
    chunk_images: list[tuple[int, torch.Tensor, int | None]] = field(default_factory=list)
    # (offset of the first placeholder in the chunk, (Q, D) embeddings, cache index of its <boi> if fed earlier)
    last_fed: int = -1  # cache index of the last real token fed
    # [((t, D) hidden states, (t,) token ids)] of every real token, in order: the decoder's context
    hidden: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    maps: list[list[torch.Tensor]] = field(default_factory=list)  # per image, per level (C, H, W)
    latest: torch.Tensor | None = None  # the latest image's pixels (3, S, S)
    boi_at: list[int] = field(default_factory=list)  # cache index of each image's <boi>
    text: list[int] = field(default_factory=list)  # tokens of the text being generated
    mode: Mode = Mode.WRITE
    new_tokens: int = 0
    new_images: int = 0
    length: int = 0  # real tokens fed
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"text": 0.0, "image": 0.0})


class Generator:
    """Generates documents with a trained :class:`~mmgen.models.mm_interleaved.MMInterleaved`."""

    def __init__(self, model, *, checkpoint: str | None = None):
        self.on_segment: Callable[[int, Segment], None] | None = None
        self.model = model.eval()
        self.tok = model.tokenizer
        self.sp = model.special
        self.cfg = model.cfg
        self.Q = self.cfg.model.resampler.num_queries
        self.size = self.cfg.data.image_size
        self.device = model.device
        self.max_len = self._max_len()
        self.checkpoint = checkpoint
        self.never = [self.sp.image, *kind_ids(self.tok)] + ([self.sp.bos] if self.sp.bos is not None else [])
        self.ends_text = [t for t in (self.sp.eod, self.sp.pad) if t is not None]  # what ends a document
        # a model trained on ShapeStories alone knows only its sentences: say so when a prompt is foreign
        self.shapes_world = all(s.kind.startswith("shapes") for s in self.cfg.data.sources)

    def _max_len(self) -> int:
        c = self.model.llm.lm.config
        return int(getattr(c, "max_position_embeddings", None) or 2048)

    # --- public API ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[Document], settings: Settings, *,
                 on_image: Callable[[], None] | None = None,
                 on_segment: Callable[[int, Segment], None] | None = None,
                 ) -> Iterator[tuple[int, Document | Exception]]:
        """Yield ``(index, document)`` for every prompt, or ``(index, error)`` for one that failed.

        Prompts are run ``settings.batch_size`` at a time; results come in completion order.
        ``on_segment(index, segment)`` is called as each output segment is made (for streaming).
        """
        self.on_segment = on_segment
        for start in range(0, len(prompts), settings.batch_size):
            docs: dict[int, _Doc] = {}
            for i in range(start, min(start + settings.batch_size, len(prompts))):
                try:
                    docs[i] = self._start(prompts[i], i, settings)
                except Exception as e:  # a broken prompt must not take the batch down
                    yield i, e
            done: set[int] = set()
            error = None
            try:
                for i, doc in self._run(docs, settings, on_image):
                    done.add(i)
                    yield i, doc
            except Exception as e:  # out of memory: this batch's unfinished documents fail, the next batches run
                if not is_oom(e):
                    raise
                error = OutOfMemory(generation_oom(e, f"generating {len(docs)} document(s) together"))
            if error is not None:
                release()  # outside the except block: the error's frames (and their tensors) are gone
                yield from ((i, error) for i in docs if i not in done)

    # --- setup -----------------------------------------------------------------------------------

    def _start(self, prompt: Document, index: int, s: Settings) -> _Doc:
        seed = prompt.meta.get("seed", s.seed)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{prompt.origin or prompt.id}: meta.seed must be an integer")
        digest = hashlib.sha256(f"{seed}/{prompt.id}".encode()).digest()
        gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        kind = prompt.meta.get("kind", s.kind) or None
        token = kind_id(self.tok, kind)  # ValueError for an unknown kind
        d = _Doc(prompt=prompt, index=index, seed=seed, kind=kind if token is not None else None, gen=gen,
                 pending=list(prompt.segments), placeholders=any(seg.is_placeholder for seg in prompt.segments))
        if self.sp.bos is not None:
            d.chunk_ids.append(self.sp.bos)
        if token is not None:
            d.chunk_ids.append(token)
        elif "kind" in prompt.meta:
            self._warn(d, f"this model was trained without document kinds; meta.kind {kind!r} is ignored")
        if self.shapes_world:
            foreign = [f for seg in prompt.segments if seg.type == "text" and seg.text
                       for f in foreign_sentences(seg.text)]
            if foreign:
                self._warn(d, f"{foreign[0]!r} is outside what this model knows (ShapeStories sentences, "
                              "docs/SHAPESTORIES.md); what it writes may not follow it")
        self._advance_prompt(d, s)
        self._fit_context(d)
        return d

    def _advance_prompt(self, d: _Doc, s: Settings) -> None:
        """Queue prompt segments up to the next placeholder; decide what follows the chunk."""
        while d.pending:
            seg = d.pending.pop(0)
            if seg.is_placeholder:
                self._transition(d, "text placeholder" if seg.type == "text" else "image placeholder", s)
                return
            self._queue_segment(d, seg)
        if d.placeholders:  # the last place is filled: the document is complete
            self._transition(d, "prompt filled", s)

    def _transition(self, d: _Doc, event: str, s: Settings) -> None:
        """Every change of ``d.mode``: what happened (``event``) and the mode it leads to."""
        if event == "text placeholder":  # the prompt asks for a sentence here
            d.mode = Mode.FILL_TEXT
        elif event in ("image placeholder", "boi"):  # an image here: given by the prompt, or written
            if event == "boi" and d.new_images >= s.max_images:
                d.mode = Mode.DONE
            else:
                d.chunk_ids = [*(d.chunk_ids if event == "image placeholder" else []), self.sp.boi]
                d.mode = Mode.DRAW
        elif event == "prompt filled":  # the last placeholder is filled: the document is complete
            d.chunk_ids, d.chunk_images = [], []
            d.mode = Mode.DONE
        elif event == "text ended":  # <eod>, <boi> or a limit ends a generated text
            if d.mode is Mode.FILL_TEXT:  # the text place is filled; the prompt goes on
                d.mode = Mode.WRITE
                self._advance_prompt(d, s)
            else:
                d.mode = Mode.DONE
        elif event == "image drawn":  # the <boi> was fed; the image's embeddings are the next chunk
            d.mode = Mode.WRITE
            if d.placeholders:
                self._advance_prompt(d, s)
        elif event == "context full":
            d.warnings.append(f"stopped at the model's context length ({self.max_len} tokens)")
            d.mode = Mode.DONE
        else:
            raise ValueError(f"unknown generation event {event!r}")
        if d.mode in (Mode.WRITE, Mode.FILL_TEXT) and not d.chunk_ids:  # nothing left to feed
            d.mode = Mode.DONE

    def _queue_segment(self, d: _Doc, seg: Segment) -> None:
        """Add one prompt segment to the output and its tokens (and images) to the chunk."""
        enc = encode_document(Document(d.prompt.id, [seg], base_dir=d.prompt.base_dir, origin=d.prompt.origin),
                              self.tok, num_queries=self.Q, add_eod=False)
        ids = enc.ids[1:] if self.sp.bos is not None and enc.ids[:1] == [self.sp.bos] else enc.ids
        shift = len(enc.ids) - len(ids)
        base = len(d.chunk_ids)
        if enc.images:
            pixels = torch.stack([image_to_tensor(im, self.size) for im in enc.images]).to(self.device)
            embeds, maps = self.model.encode_images(pixels)  # (n, Q, D), [(n, C, H_l, W_l)]
            for j, boi in enumerate(enc.image_boi):
                d.chunk_images.append((base + boi - shift + 1, embeds[j], None))
                d.maps.append([m[j] for m in maps])
                d.latest = pixels[j]
                self._add(d, Segment("image", image=tensor_to_image(pixels[j].cpu()), source="prompt"))
        elif seg.type == "text":
            self._add(d, Segment("text", text=seg.text, source="prompt"))
        d.chunk_ids += ids

    def _fit_context(self, d: _Doc) -> None:
        """Cut a prompt longer than the model's context from the left (after ``<bos>``)."""
        room = self.max_len - (self.Q + 2) - 16  # leave room for at least one image and a sentence
        excess = len(d.chunk_ids) - room
        if excess <= 0:
            return
        keep_from = excess + (1 if self.sp.bos is not None else 0)
        # never start inside an image block: move the cut past any image it would split
        for start, _, _ in d.chunk_images:  # start - 1 is the image's <boi>
            if start - 1 < keep_from < start + self.Q:
                keep_from = start + self.Q
        head = [self.sp.bos] if self.sp.bos is not None else []
        dropped = {i for i, (start, _, _) in enumerate(d.chunk_images) if start - 1 < keep_from}
        d.chunk_images = [(start - keep_from + len(head), e, None) for start, e, _ in d.chunk_images
                          if start - 1 >= keep_from]
        d.maps = [m for i, m in enumerate(d.maps) if i not in dropped]
        d.chunk_ids = head + d.chunk_ids[keep_from:]
        msg = (f"prompt is longer than the model's context ({self.max_len} tokens): "
               f"cut {keep_from - len(head)} tokens from the left")
        self._warn(d, msg)

    # --- the loop --------------------------------------------------------------------------------

    def _run(self, docs: dict[int, _Doc], s: Settings, on_image) -> Iterator[tuple[int, Document | Exception]]:
        from transformers import DynamicCache

        order = [i for i, d in docs.items() if d.mode is not Mode.DONE]
        for i, d in list(docs.items()):
            if d.mode is Mode.DONE:
                yield i, self._finish(d, s)
        cache = DynamicCache(config=self.model.llm.lm.config)
        mask = torch.zeros(len(order), 0, dtype=torch.long, device=self.device)  # (B, S) 1 = real token
        values_key, values = None, None
        while order:
            rows = [docs[i] for i in order]
            # 1. feed every document's chunk, right-padded to a common length
            t0 = time.perf_counter()
            L = max(len(d.chunk_ids) for d in rows)
            B, past = len(rows), mask.shape[1]
            ids = torch.full((B, L), self.sp.pad, dtype=torch.long)
            new_mask = torch.zeros(B, L, dtype=torch.long)
            for b, d in enumerate(rows):
                ids[b, :len(d.chunk_ids)] = torch.tensor(d.chunk_ids)
                new_mask[b, :len(d.chunk_ids)] = 1
            ids, new_mask = ids.to(self.device), new_mask.to(self.device)
            embeds = self.model.llm.embed_tokens(ids)  # (B, L, D)
            for b, d in enumerate(rows):
                for start, e, boi in d.chunk_images:
                    embeds[b, start:start + self.Q] = e.to(embeds.dtype)  # (Q, D)
                    d.boi_at.append(past + start - 1 if boi is None else boi)
            mask = torch.cat([mask, new_mask], dim=1)  # (B, past + L)
            key = tuple((i, len(docs[i].maps)) for i in order)
            has_images = any(d.maps for d in rows)
            if has_images and key != values_key:  # the slots change only when an image is added
                values, values_key = self.model.llm.prepare_image_values(self._slots(rows)[0]), key
            out = self.model.llm(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True,
                                 image_values=values if has_images else None,
                                 visible=self._visible(rows, past, L) if has_images else None)
            cache = out.cache
            last = new_mask.sum(1) - 1  # (B,) index of each row's last real token in the chunk
            logits = out.logits[torch.arange(B), last].float()  # (B, V)
            context = self.model.decoder_context(out)  # (B, L, D)
            for b, d in enumerate(rows):
                n = len(d.chunk_ids)
                d.hidden.append((context[b, :n], ids[b, :n]))
                d.length += n
                d.last_fed = past + n - 1
                d.chunk_ids, d.chunk_images = [], []
            elapsed = time.perf_counter() - t0
            for d in rows:
                d.seconds["text"] += elapsed / B

            # 2. sample the next token of every document in text mode
            for b, d in enumerate(rows):
                if d.mode is not Mode.DRAW:
                    self._next_token(d, logits[b], s)

            # 3. draw the images asked for, all together — once their <boi> is fed: a <boi> just
            #    sampled is fed in the next round first, so that the image's context and the LLM's
            #    sequence hold it, as in training
            asking = [d for d in rows if d.mode is Mode.DRAW and not d.chunk_ids]
            if asking:
                self._draw_images(asking, s, on_image)

            # 4. finished documents leave the batch
            keep = [b for b, d in enumerate(rows)
                    if d.mode is not Mode.DONE and d.length + len(d.chunk_ids) < self.max_len]
            for b, d in enumerate(rows):
                if b not in keep:
                    if d.mode is not Mode.DONE:
                        self._flush_text(d)
                        self._transition(d, "context full", s)
                    yield order[b], self._finish(d, s)
            if len(keep) < len(rows):
                order = [order[b] for b in keep]
                if order:
                    idx = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(idx)
                    mask = mask[idx]
                    values_key = None

    def _slots(self, docs: list[_Doc]) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """Each document's images as slots: maps [(n, M, C, H_l, W_l)] and which slots hold one (n, M)."""
        M = max(len(d.maps) for d in docs)
        if M == 0:
            return None, None
        template = next(d.maps[0] for d in docs if d.maps)
        features = [torch.zeros(len(docs), M, *t.shape, device=self.device, dtype=t.dtype) for t in template]
        present = torch.zeros(len(docs), M, dtype=torch.bool, device=self.device)
        for n, d in enumerate(docs):
            for m, maps in enumerate(d.maps):
                for lvl, f in enumerate(maps):
                    features[lvl][n, m] = f
                present[n, m] = True
        return features, present

    def _visible(self, rows: list[_Doc], past: int, L: int) -> torch.Tensor:
        """Which image slots each new token sees (B, L, M): images whose <boi> came before it."""
        M = max(len(d.maps) for d in rows)
        positions = past + torch.arange(L, device=self.device)  # (L,) cache index of each new token
        visible = torch.zeros(len(rows), L, M, dtype=torch.bool, device=self.device)
        for b, d in enumerate(rows):
            for m, at in enumerate(d.boi_at):
                visible[b, :, m] = positions > at
        return visible

    def _next_token(self, d: _Doc, logits: torch.Tensor, s: Settings) -> None:
        t0 = time.perf_counter()
        if d.mode is Mode.WRITE and not d.placeholders and d.new_images < min(s.min_images, s.max_images):
            logits = logits.clone()
            logits[self.ends_text] = float("-inf")  # too few images yet: the document goes on
        token = self._sample(logits, s, d.gen)
        d.seconds["text"] += time.perf_counter() - t0
        d.chunk_ids = []
        if token == self.sp.boi:
            self._flush_text(d)
            self._transition(d, "text ended" if d.mode is Mode.FILL_TEXT else "boi", s)
        elif token in (self.sp.eod, self.sp.image, self.sp.pad):
            self._flush_text(d)
            self._transition(d, "text ended", s)
        else:
            d.text.append(token)
            d.new_tokens += 1
            d.chunk_ids = [token]
            if d.new_tokens >= s.max_new_tokens:
                self._flush_text(d)
                d.chunk_ids = []
                self._transition(d, "text ended", s)

    def _sample(self, logits: torch.Tensor, s: Settings, gen: torch.Generator) -> int:
        logits = logits.clone()
        logits[self.never] = float("-inf")  # placeholders, <bos> and kinds are given, never written
        if s.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1).cpu()
        if s.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _flush_text(self, d: _Doc) -> None:
        if d.text:
            text = self.tok.decode(d.text, skip_special_tokens=True).strip()
            if text:
                self._add(d, Segment("text", text=text, source="generated"))
            d.text = []

    def _draw_images(self, asking: list[_Doc], s: Settings, on_image) -> None:
        t0 = time.perf_counter()
        # 1. the condition: each document's hidden states up to and including its <boi>
        contexts = [torch.cat([h for h, _ in d.hidden]) for d in asking]  # [(K_i, D)]
        K = max(c.shape[0] for c in contexts)
        D = contexts[0].shape[1]
        context = torch.zeros(len(asking), K, D, device=self.device, dtype=contexts[0].dtype)
        cmask = torch.zeros(len(asking), K, dtype=torch.bool, device=self.device)
        cids = torch.full((len(asking), K), self.sp.pad, dtype=torch.long, device=self.device)  # (n, K)
        for n, (c, d) in enumerate(zip(contexts, asking)):
            context[n, :c.shape[0]], cmask[n, :c.shape[0]] = c, True
            cids[n, :c.shape[0]] = torch.cat([i for _, i in d.hidden])
        # 2. the earlier images each one may read (its own document's), as slots
        prev_features, prev_visible = self._slots(asking)
        prev_image = None
        if self.model.decoder.previous_image:  # the latest one, zeros for none
            blank = torch.zeros(3, self.size, self.size, device=self.device)
            prev_image = torch.stack([d.latest if d.latest is not None else blank for d in asking])
        # 3. sample, each image from its own document's generator
        images = self.model.decoder.sample(context, cmask, prev_features, prev_visible, context_ids=cids,
                                           prev_image=prev_image, sampler=s.sampler, steps=s.steps,
                                           guidance=s.guidance, generator=[d.gen for d in asking])
        # 4. encode the new images once: resampler tokens for the LLM, maps for MMFS
        pixels = torch.stack([image_to_tensor(tensor_to_image(x.cpu()), self.size) for x in images]).to(self.device)
        embeds, maps = self.model.encode_images(pixels)  # (n, Q, D), [(n, C, H_l, W_l)]
        elapsed = time.perf_counter() - t0
        for n, d in enumerate(asking):
            d.seconds["image"] += elapsed / len(asking)
            d.new_images += 1
            self._add(d, Segment("image", image=tensor_to_image(pixels[n].cpu()), source="generated"))
            d.maps.append([m[n] for m in maps])
            d.latest = pixels[n]
            # the <boi> was already fed: the chunk is the image's Q embeddings, then the prompt goes on
            d.chunk_ids = [self.sp.image] * self.Q
            d.chunk_images = [(0, embeds[n], d.last_fed)]
            self._transition(d, "image drawn", s)
            if on_image is not None:
                on_image()

    def _warn(self, d: _Doc, message: str) -> None:
        """A warning kept in the document's meta and shown once (a log line)."""
        d.warnings.append(message)
        log.warning("%s: %s", d.prompt.origin or d.prompt.id, message)

    def _add(self, d: _Doc, seg: Segment) -> None:
        """Append one output segment and tell the listener, if any."""
        d.segments.append(seg)
        if self.on_segment is not None:
            self.on_segment(d.index, seg)

    def _finish(self, d: _Doc, s: Settings) -> Document:
        meta = dict(d.prompt.meta)
        if d.kind is not None:
            meta["kind"] = d.kind
        meta.update({
            "checkpoint": self.checkpoint, "seed": d.seed, "sampler": s.sampler, "steps": s.steps,
            "guidance": s.guidance, "temperature": s.temperature, "top_p": s.top_p,
            "max_images": s.max_images, "min_images": s.min_images, "max_new_tokens": s.max_new_tokens,
            "timings": {k: round(v, 3) for k, v in d.seconds.items()},
            "generated": {"tokens": d.new_tokens, "images": d.new_images},
        })
        if d.warnings:
            meta["warnings"] = d.warnings
        return Document(d.prompt.id, d.segments, meta, origin=d.prompt.origin)
