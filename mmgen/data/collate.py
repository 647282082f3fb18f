"""Documents → token sequences → packed rows → one :class:`Batch` the model consumes.

Sequence of one document (docs/DESIGN.md §3)::

    <bos> text tokens … <boi> <image>×Q  text tokens … <boi> <image>×Q … <eod>

- every text segment is tokenized on its own, with a leading space unless the tokenizer
  adds one itself, so a sentence gets the same tokens wherever it stands (first or not);
- an image (a video frame is an image) is ``<boi>`` followed by Q placeholders, which the
  model replaces with the resampler's Q outputs;
- several documents are packed into one row of at most ``seq_len`` tokens and
  ``max_images_per_seq`` images (next-fit, in order); a document never sees another's tokens
  or images (``segment_ids``, ``visible``);
- rows are padded to the longest row of the batch (or to ``pad_to``).

Shape legend: B rows, T tokens per row, N images in the batch, Q placeholders per image,
M image slots per row (the most images in one row, at least 1), S image size in pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmgen.data.documents import Document, Segment
from mmgen.data.kinds import kind_id
from mmgen.data.tokenizer import special_ids

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from mmgen.config import Config

IGNORE = -100  # label of tokens without a text loss

ImageLoader = Callable[[Document], "list[Image.Image]"]


def default_load_images(doc: Document) -> list[Image.Image]:
    """Images of ``doc`` in order, videos expanded to frames (``mmgen.data.media``)."""
    from mmgen.data.media import document_images

    return document_images(doc)


# ---------------------------------------------------------------------------------------------
# the batch


@dataclass
class Batch:
    """Packed rows for the model. Labels are NOT shifted: logits[t] predicts labels[t + 1]."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long; -100 on placeholders, padding, first token of each doc
    attention_mask: torch.Tensor  # (B, T) long; 1 real, 0 padding
    position_ids: torch.Tensor  # (B, T) long; restart at 0 for every packed document
    segment_ids: torch.Tensor  # (B, T) long; packed document index in its row, -1 on padding
    images: torch.Tensor  # (N, 3, S, S) float in [-1, 1], ordered by (row, position)
    image_row: torch.Tensor  # (N,) long; row of each image
    image_boi: torch.Tensor  # (N,) long; position of the image's <boi> in its row
    image_positions: torch.Tensor  # (N, Q) long; positions of its placeholders in its row
    row_images: torch.Tensor  # (B, M) long; index into `images` of row b's m-th image, -1 padding
    visible: torch.Tensor  # (B, T, M) bool; same document and image_boi < t
    image_loss_mask: torch.Tensor  # (N,) bool; a text token precedes the image in its document
    doc_ids: list[list[str]] = field(default_factory=list)  # documents packed in each row

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]


# ---------------------------------------------------------------------------------------------
# 1. encode one document


@dataclass
class EncodedDoc:
    """One document as tokens; positions count from the document's first token."""

    id: str
    ids: list[int]  # (L,)
    loss: list[bool]  # (L,) the token gets a text loss: False on its first token and placeholders
    image_boi: list[int]  # position of each image's <boi>
    images: list[Any]  # PIL images (or (3, H, W) tensors in [-1, 1]), one per <boi>
    image_context: list[bool]  # some text token precedes the image's <boi>
    num_queries: int  # Q placeholders after each <boi>
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


def encode_document(doc: Document, tokenizer: PreTrainedTokenizerBase, *, num_queries: int,
                    load_images: ImageLoader | None = None, add_eod: bool = True) -> EncodedDoc:
    """Tokenize ``doc``: ``<bos>`` (if the tokenizer has one), its kind's token (``meta.kind``,
    if the tokenizer has kind tokens; given, never a loss target), its segments, ``<eod>``.

    Args:
        num_queries: Q, placeholders per image.
        load_images: ``doc -> list[PIL.Image]``, default ``mmgen.data.media.document_images``;
            called per image/video segment stored as a file, on a document holding only that
            segment (in-memory ``Segment.image`` is used directly).
        add_eod: end with ``<eod>`` (False for a prompt to be continued).
    """
    sp = special_ids(tokenizer)
    load_images = load_images or default_load_images
    ids: list[int] = [] if sp.bos is None else [sp.bos]
    kind = kind_id(tokenizer, doc.meta.get("kind"))
    ids += [] if kind is None else [kind]
    loss: list[bool] = [False] * len(ids)
    image_boi: list[int] = []
    images: list[Any] = []
    context: list[bool] = []
    seen_text = False
    space = " " if not _adds_prefix_space(tokenizer) else ""
    for k, seg in enumerate(doc.segments):
        if seg.is_placeholder:
            where = doc.origin or f"document {doc.id!r}"
            raise ValueError(f"{where}: segment {k + 1} is an empty {seg.type} placeholder; "
                             "training documents need content in every segment")
        if seg.type == "text":
            if not seg.text.strip():
                continue
            text = seg.text if seg.text[0].isspace() else space + seg.text
            tokens = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
            ids += tokens
            loss += [True] * len(tokens)
            seen_text = seen_text or bool(tokens)
        elif seg.type in ("image", "video"):
            for image in _segment_images(doc, k, load_images):
                image_boi.append(len(ids))
                images.append(image)
                context.append(seen_text)
                ids += [sp.boi] + [sp.image] * num_queries
                loss += [True] + [False] * num_queries
        else:
            raise ValueError(f"document {doc.id!r}: unknown segment type {seg.type!r}")
    if add_eod:
        ids.append(sp.eod)
        loss.append(True)
    if loss:
        loss[0] = False  # the first token is never predicted (from the previous packed document)
    return EncodedDoc(id=doc.id, ids=ids, loss=loss, image_boi=image_boi, images=images,
                      image_context=context, num_queries=num_queries)


def _segment_images(doc: Document, k: int, load_images: ImageLoader) -> list[Any]:
    """Images of segment ``k`` (one, or a video's frames)."""
    seg = doc.segments[k]
    if seg.image is not None:
        return list(seg.image) if isinstance(seg.image, (list, tuple)) else [seg.image]
    # the loader sees only this segment; empty text segments before it keep the segment
    # numbers of its error messages right
    only = [Segment("text")] * k + [seg]
    return list(load_images(dataclasses.replace(doc, segments=only)))


def _adds_prefix_space(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a word boundary before text by itself (SentencePiece style)."""
    cached = getattr(tokenizer, "_mmgen_adds_prefix_space", None)
    if cached is None:
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
        cached = bool(first) and first[0][:1] in ("▁", "Ġ")
        try:
            tokenizer._mmgen_adds_prefix_space = cached
        except AttributeError:
            pass
    return cached


# ---------------------------------------------------------------------------------------------
# 2. pack documents into rows


Row = list[EncodedDoc]


def truncate(doc: EncodedDoc, max_tokens: int, max_images: int) -> EncodedDoc | None:
    """Cut ``doc`` to at most ``max_tokens`` tokens and ``max_images`` images.

    The cut never falls inside an image: a partial ``<boi>`` + placeholders block is dropped
    whole. A truncated document loses its ``<eod>``. Returns None when fewer than 2 tokens
    would remain (nothing to learn from).
    """
    cut = min(len(doc.ids), max_tokens)
    if len(doc.image_boi) > max_images:
        cut = min(cut, doc.image_boi[max_images])
    block = 1 + doc.num_queries
    for boi in doc.image_boi:
        if boi < cut < boi + block:
            cut = boi
    if cut == len(doc.ids):
        return doc
    if cut < 2:
        return None
    keep = sum(boi < cut for boi in doc.image_boi)
    return dataclasses.replace(doc, ids=doc.ids[:cut], loss=doc.loss[:cut],
                               image_boi=doc.image_boi[:keep], images=doc.images[:keep],
                               image_context=doc.image_context[:keep], truncated=True)


class Packer:
    """Streaming next-fit packer: documents go into the open row while they fit, in order.

    ``add`` returns the rows it closed (zero or one); ``flush`` closes the open row.
    """

    def __init__(self, seq_len: int, max_images_per_seq: int):
        if seq_len < 2 or max_images_per_seq < 1:
            raise ValueError("seq_len must be at least 2 and max_images_per_seq at least 1")
        self.seq_len = seq_len
        self.max_images = max_images_per_seq
        self._row: Row = []
        self._tokens = 0
        self._images = 0

    def add(self, doc: EncodedDoc) -> list[Row]:
        doc = truncate(doc, self.seq_len, self.max_images)
        if doc is None:
            return []
        closed = []
        if self._row and (self._tokens + len(doc) > self.seq_len
                          or self._images + len(doc.images) > self.max_images):
            closed = self.flush()
        self._row.append(doc)
        self._tokens += len(doc)
        self._images += len(doc.images)
        return closed

    def flush(self) -> list[Row]:
        row, self._row, self._tokens, self._images = self._row, [], 0, 0
        return [row] if row else []

    def __len__(self) -> int:
        """Tokens in the open row."""
        return self._tokens


def pack_documents(docs: Iterable[EncodedDoc], seq_len: int, max_images_per_seq: int) -> list[Row]:
    """Pack encoded documents into rows (next-fit, order kept); see :class:`Packer`."""
    packer = Packer(seq_len, max_images_per_seq)
    rows = [row for doc in docs for row in packer.add(doc)]
    return rows + packer.flush()


# ---------------------------------------------------------------------------------------------
# 3. collate rows into a batch


def image_to_tensor(image: Any, size: int) -> torch.Tensor:
    """A PIL image → (3, size, size) float in [-1, 1]: centre square crop, bicubic resize.

    A tensor passes through (resized if needed); it must already be (3, H, W) in [-1, 1].
    """
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bicubic",
                                                align_corners=False, antialias=True)[0]
        return x.clamp(-1, 1)
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    w, h = image.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (S*S*3,)
    x = x.view(size, size, 3).permute(2, 0, 1)  # (3, S, S)
    return x.float() / 127.5 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, S, S) in [-1, 1] → an RGB PIL image."""
    from PIL import Image

    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, S, S)
    h, w = x.shape[-2:]
    return Image.frombytes("RGB", (w, h), x.permute(1, 2, 0).contiguous().numpy().tobytes())


def collate(rows: list[Row], *, pad_id: int, num_queries: int, image_size: int,
            pad_to: int | None = None) -> Batch:
    """Pad rows to the longest (or to ``pad_to``) and build every index the model needs."""
    if not rows:
        raise ValueError("collate needs at least one row")
    B = len(rows)
    T = max(sum(len(d) for d in row) for row in rows)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({T} tokens)")
        T = pad_to
    Q = num_queries
    M = max(1, max(sum(len(d.images) for d in row) for row in rows))

    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment_ids = torch.full((B, T), -1, dtype=torch.long)
    row_images = torch.full((B, M), -1, dtype=torch.long)
    slot_segment = torch.full((B, M), -1, dtype=torch.long)  # document of each image slot
    slot_boi = torch.full((B, M), T, dtype=torch.long)  # <boi> of each slot (T: never visible)
    images, image_row, image_boi, image_context = [], [], [], []

    for b, row in enumerate(rows):
        start = 0
        for s, doc in enumerate(row):
            if doc.num_queries != Q:
                raise ValueError(f"document {doc.id!r} was encoded with {doc.num_queries} "
                                 f"placeholders per image, the batch uses {Q}")
            L = len(doc)
            ids = torch.tensor(doc.ids, dtype=torch.long)  # (L,)
            span = slice(start, start + L)
            input_ids[b, span] = ids
            labels[b, span] = torch.where(torch.tensor(doc.loss), ids, IGNORE)
            attention_mask[b, span] = 1
            position_ids[b, span] = torch.arange(L)
            segment_ids[b, span] = s
            for boi, image, ctx in zip(doc.image_boi, doc.images, doc.image_context):
                m = int((row_images[b] >= 0).sum())
                row_images[b, m] = len(images)
                slot_segment[b, m] = s
                slot_boi[b, m] = start + boi
                images.append(image_to_tensor(image, image_size))
                image_row.append(b)
                image_boi.append(start + boi)
                image_context.append(ctx)
            start += L

    image_boi_t = torch.tensor(image_boi, dtype=torch.long)  # (N,)
    image_positions = image_boi_t[:, None] + 1 + torch.arange(Q)  # (N, Q)
    t = torch.arange(T)
    visible = ((segment_ids[:, :, None] == slot_segment[:, None, :])  # (B, T, M) same document
               & (segment_ids[:, :, None] >= 0)
               & (t[None, :, None] > slot_boi[:, None, :]))  # strictly after the <boi>
    return Batch(
        input_ids=input_ids, labels=labels, attention_mask=attention_mask,
        position_ids=position_ids, segment_ids=segment_ids,
        images=(torch.stack(images) if images
                else torch.zeros((0, 3, image_size, image_size))),  # (N, 3, S, S)
        image_row=torch.tensor(image_row, dtype=torch.long),
        image_boi=image_boi_t,
        image_positions=image_positions.reshape(len(image_boi), Q),
        row_images=row_images, visible=visible,
        image_loss_mask=torch.tensor(image_context, dtype=torch.bool),
        doc_ids=[[d.id for d in row] for row in rows],
    )


# ---------------------------------------------------------------------------------------------
# documents → batch


class Collator:
    """Turns documents into a :class:`Batch`: encode → pack into rows → collate.

    Sizes come from ``cfg``: ``data.seq_len``, ``data.max_images_per_seq``, ``data.image_size``
    and ``model.resampler.num_queries``. ``pad_to=None`` pads to the longest row of the batch;
    pass ``cfg.data.seq_len`` for fixed shapes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: Config, *,
                 load_images: ImageLoader | None = None, pad_to: int | None = None):
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self.seq_len = cfg.data.seq_len
        self.max_images_per_seq = cfg.data.max_images_per_seq
        self.image_size = cfg.data.image_size
        self.num_queries = cfg.model.resampler.num_queries
        self.load_images = load_images
        self.pad_to = pad_to

    def encode(self, doc: Document) -> EncodedDoc:
        return encode_document(doc, self.tokenizer, num_queries=self.num_queries,
                               load_images=self.load_images)

    def collate(self, rows: list[Row]) -> Batch:
        return collate(rows, pad_id=self.special.pad, num_queries=self.num_queries,
                       image_size=self.image_size, pad_to=self.pad_to)

    def __call__(self, docs: list[Document]) -> Batch:
        """All of ``docs`` packed into as few rows as next-fit gives (rows ≤ len(docs))."""
        rows = pack_documents((self.encode(d) for d in docs), self.seq_len, self.max_images_per_seq)
        if not rows:
            raise ValueError("no document left anything to train on")
        return self.collate(rows)

    def batches(self, docs: Iterable[Document], rows_per_batch: int) -> Iterator[Batch]:
        """Stream batches of exactly ``rows_per_batch`` full rows from a document stream.

        The last, partial batch is yielded too when the stream ends.
        """
        packer = Packer(self.seq_len, self.max_images_per_seq)
        pending: list[Row] = []
        for doc in docs:
            pending += packer.add(self.encode(doc))
            while len(pending) >= rows_per_batch:
                yield self.collate(pending[:rows_per_batch])
                pending = pending[rows_per_batch:]
        pending += packer.flush()
        if pending:
            yield self.collate(pending)
