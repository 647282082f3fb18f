"""Document kinds: what a document is, said by ``meta.kind`` and by one token after ``<bos>``.

The same word serves training data, prompts and results (docs/DOCUMENTS.md "Document kinds"):
a source marks its documents (ShapeStories stories ``story``, pairs ``captions``, VIST
``story``, MMC4 and OBELICS ``web``); a prompt asks for a kind with ``meta.kind`` or
``mmgen generate --kind`` (default ``generate.kind``, ``story``); the result records it.
Without it a model cannot tell from one introduction whether a story or a list of captioned
pictures should follow, as both begin the same way.

The model reads the kind as one special token (``<story>``, ...) right after ``<bos>``, given
and never predicted. A tokenizer trained or loaded by mmgen carries every kind token; a model
saved before kinds existed has none, and its prompts run without one. To add a kind, add an
entry here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

KINDS: dict[str, str] = {
    "story": "one subject through several frames: an introduction, then changes (ShapeStories stories, VIST)",
    "captions": "independent pictures, each with its own sentence (image-caption pairs, ShapeStories pairs)",
    "web": "a web page's text and pictures in their order (MMC4, OBELICS)",
}


def kind_token(kind: str) -> str:
    return f"<{kind}>"


KIND_TOKENS = tuple(kind_token(k) for k in KINDS)


def unknown_kind(kind: object) -> str:
    """The one-line message for a kind that is not in :data:`KINDS`."""
    return f"unknown document kind {kind!r}; choose one of {', '.join(KINDS)}"


def kind_id(tokenizer: PreTrainedTokenizerBase, kind: str | None) -> int | None:
    """The id of ``kind``'s token, or None when there is no kind or the tokenizer lacks its token."""
    if not kind:
        return None
    if kind not in KINDS:
        raise ValueError(unknown_kind(kind))
    token = kind_token(kind)
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


def kind_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every kind token the tokenizer has (the model never writes them)."""
    return [i for i in (kind_id(tokenizer, k) for k in KINDS) if i is not None]
