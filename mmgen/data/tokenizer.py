"""Tokenizers: a small byte-level BPE trained on the corpus, or a local Hugging Face one.

Every tokenizer the project uses carries three special tokens of its own (docs/DESIGN.md §3):

- ``<boi>``   begin of image; also how the LLM asks for an image at generation time;
- ``<image>`` placeholder, replaced by the resampler's outputs (one per query);
- ``<eod>``   end of document.

Trained tokenizers also have ``<pad>``, ``<bos>`` and ``<unk>`` (``<eod>`` doubles as their
eos). Loaded tokenizers keep their own bos/eos/pad and get the three added when missing; the
caller must then resize the LLM's embeddings to ``len(tokenizer)``.

Ids are never hard-coded: ask :func:`special_ids`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .kinds import KIND_TOKENS

if TYPE_CHECKING:  # keep `import mmgen.data.tokenizer` cheap
    from transformers import PreTrainedTokenizerBase

    from mmgen.config import Config

BOI, IMAGE, EOD = "<boi>", "<image>", "<eod>"
PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
MMGEN_TOKENS = (BOI, IMAGE, EOD)  # added to every tokenizer; a new model's also gets the kinds' (kinds.py)


class TokenizerError(ValueError):
    """A tokenizer folder is missing, holds no tokenizer, or a tokenizer lacks a token."""


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens; ``bos`` is None for tokenizers without one (e.g. Qwen2)."""

    boi: int
    image: int
    eod: int
    pad: int
    bos: int | None
    kinds: tuple[int, ...] = ()  # the document-kind tokens the tokenizer has (mmgen.data.kinds)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """Look up the special ids of ``tokenizer``; raises :class:`TokenizerError` if one is missing."""
    ids = {}
    for name, token in (("boi", BOI), ("image", IMAGE), ("eod", EOD)):
        ids[name] = _token_id(tokenizer, token)
        if ids[name] is None:
            raise TokenizerError(f"the tokenizer has no `{token}` token; load it with "
                                 "mmgen.data.tokenizer.load_tokenizer, which adds it")
    if tokenizer.pad_token_id is None:
        raise TokenizerError("the tokenizer has no pad token; load it with load_tokenizer, which sets one")
    kinds = tuple(i for i in (_token_id(tokenizer, t) for t in KIND_TOKENS) if i is not None)
    return SpecialIds(boi=ids["boi"], image=ids["image"], eod=ids["eod"],
                      pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id, kinds=kinds)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of ``token`` if it is one whole token of the vocabulary (not the unk fallback)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


# ---------------------------------------------------------------------------------------------
# ShapeStories text: the whole sentence grammar of docs/SHAPESTORIES.md


SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
WHERE = ("in the top left", "at the top", "in the top right", "on the left", "in the center",
         "on the right", "in the bottom left", "at the bottom", "in the bottom right")


def shapestories_sentences() -> list[str]:
    """Every sentence ShapeStories can produce, in a fixed order (381 sentences)."""
    out = [f"A {size} {colour} {shape} is {where}."
           for size in SIZES for colour in COLOURS for shape in SHAPES for where in WHERE]
    for shape in SHAPES:
        out += [f"The {shape} turns {colour}." for colour in COLOURS]
        out += [f"The {shape} moves to the {position}." for position in POSITIONS]
        out += [f"The {shape} grows.", f"The {shape} shrinks."]
        out += [f"The {shape} becomes a {new}." for new in SHAPES if new != shape]
    return out


# ---------------------------------------------------------------------------------------------
# training


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Every byte is in the base alphabet, so any text encodes (no ``<unk>`` in practice). Each
    text is also trained with a leading space, the form it takes after other content in a
    document (see ``collate.encode_document``). Deterministic for the same texts. The
    vocabulary may come out smaller than ``vocab_size`` when the texts run out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOD, UNK, BOI, IMAGE, *KIND_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer "
                             f"(at least {len(alphabet) + len(specials)})")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=sorted(alphabet), show_progress=False)
    tok.train_from_iterator(_with_spaced(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOD, pad_token=PAD,
                                   unk_token=UNK, extra_special_tokens=[BOI, IMAGE, *KIND_TOKENS],
                                   model_max_length=1 << 30)


def _with_spaced(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        yield t
        if t and not t[0].isspace():
            yield " " + t


# ---------------------------------------------------------------------------------------------
# loading


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a LOCAL folder and make sure it has the mmgen special tokens.

    ``<boi>``, ``<image>`` and ``<eod>`` are added when missing, and a pad token is set when
    missing (the eos token if there is one, else a new ``<pad>``). When tokens were added,
    ``len(tokenizer)`` grows: resize the LLM's input/output embeddings to it. The number of
    tokens added is stored as ``tokenizer.mmgen_added_tokens``.
    """
    from transformers import AutoTokenizer

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise TokenizerError(f"tokenizer folder {str(folder)!r} does not exist; set "
                             "model.llm.tokenizer (or model.llm.pretrained) to a local folder that "
                             "holds tokenizer.json / tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable folders
        raise TokenizerError(f"no usable tokenizer in {str(folder)!r} ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else e}); the folder "
                             "needs the tokenizer files saved by `save_pretrained` "
                             "(tokenizer.json or the slow tokenizer's vocabulary files)") from e
    if isinstance(tokenizer, bool) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TokenizerError(f"{str(folder)!r} did not load as a tokenizer")
    before = len(tokenizer)
    missing = [t for t in MMGEN_TOKENS if _token_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # pad positions are masked; any id does
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    tokenizer.mmgen_added_tokens = len(tokenizer) - before
    special_ids(tokenizer)  # fail now, not mid-training, if anything is still missing
    return tokenizer


def build_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg``: loaded from ``model.llm.tokenizer`` or ``model.llm.pretrained``,
    else trained (vocab ``model.llm.vocab_size``) on the ShapeStories grammar plus the text of
    any ``jsonl``/``pairs`` sources that can be read.

    Save the result next to the checkpoint (``tokenizer.save_pretrained``) so that a trained
    model is always run with the tokenizer it was trained with.
    """
    llm = cfg.model.llm
    folder = llm.tokenizer or llm.pretrained
    if folder:  # a new model: its tokenizer gets the document kinds' tokens too
        tokenizer = load_tokenizer(folder)
        missing = [t for t in KIND_TOKENS if _token_id(tokenizer, t) is None]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            tokenizer.mmgen_added_tokens += len(missing)
        return tokenizer
    texts = shapestories_sentences()
    for source in cfg.data.sources:
        if source.kind in ("jsonl", "pairs") and source.path:
            texts.extend(jsonl_texts(source.path))
    return train_tokenizer(texts, llm.vocab_size)


def jsonl_texts(path: str | Path, limit: int = 200_000) -> list[str]:
    """Text strings of a JSONL file or a folder of them (text segments, ``text``/``caption`` keys).

    Best effort, for tokenizer training only: unreadable files and lines are skipped (the
    document reader reports them properly when the data is loaded).
    """
    root = Path(path)
    files = sorted(root.rglob("*.jsonl")) if root.is_dir() else [root]
    out: list[str] = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            for seg in obj.get("segments") or []:
                if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                    out.append(seg["text"])
            for key in ("text", "caption"):
                if isinstance(obj.get(key), str):
                    out.append(obj[key])
            if len(out) >= limit:
                return out[:limit]
    return out
