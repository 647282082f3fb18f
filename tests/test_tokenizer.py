"""Tokenizers: training on ShapeStories, special tokens, save → load, local HF folders."""

from __future__ import annotations

import json

import pytest

from mmgen.config import load_config
from mmgen.data.tokenizer import (BOI, EOD, IMAGE, TokenizerError, build_tokenizer, load_tokenizer,
                                  shapestories_sentences, special_ids, train_tokenizer)

TEXTS = ["A small red circle is in the top left.", " The circle turns blue.",
         "Hello, world! Ünïcödé 123 <not special>", "x<boi>y"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapestories_sentences(), 512)


def _gpt2_like_folder(path, *, with_eos=True):
    """A tiny byte-level BPE folder that knows nothing of mmgen (like a real LLM's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if with_eos else []
    t.train_from_iterator(["hello world, the circle turns blue"] * 4,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    t.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if with_eos:
        config["eos_token"] = "<|endoftext|>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_grammar_covers_shapestories():
    sentences = shapestories_sentences()
    assert len(sentences) == len(set(sentences)) == 2 * 6 * 3 * 9 + 3 * (6 + 9 + 2 + 2)
    assert "A small red circle is in the top left." in sentences
    assert "The triangle becomes a square." in sentences


def test_grammar_matches_the_story_stream():
    shapes = pytest.importorskip("mmgen.data.shapes")
    known = set(shapestories_sentences())
    stream = shapes.stream_stories(0, 32)
    for _ in range(50):
        for text in next(stream).texts:
            assert text in known


def test_special_tokens_are_single_distinct_ids(tok):
    sp = special_ids(tok)
    ids = [sp.boi, sp.image, sp.eod, sp.pad, sp.bos]
    assert len(set(ids)) == 5 and all(isinstance(i, int) for i in ids)
    for token, i in ((BOI, sp.boi), (IMAGE, sp.image), (EOD, sp.eod)):
        assert tok.encode(token, add_special_tokens=False) == [i]
    assert tok.eos_token == EOD and tok.pad_token_id == sp.pad and tok.bos_token_id == sp.bos


def test_shapestories_words_are_single_tokens_and_round_trip(tok):
    for s in shapestories_sentences():
        for text in (s, " " + s):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
            assert len(ids) == len(text.replace(".", " .").split())  # one token per word and "."
    assert len(tok) <= 512


def test_any_text_round_trips(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_training_is_deterministic(tok):
    again = train_tokenizer(shapestories_sentences(), 512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_vocab_too_small_is_an_error():
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_tokenizer(["a b c"], 100)


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.mmgen_added_tokens == 0 and len(loaded) == len(tok)
    assert special_ids(loaded) == special_ids(tok)
    for text in TEXTS + shapestories_sentences()[::37]:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_foreign_tokenizer_gets_the_mmgen_tokens(tmp_path):
    folder = _gpt2_like_folder(tmp_path / "llm")
    tok = load_tokenizer(folder)
    assert tok.mmgen_added_tokens == 3  # caller resizes embeddings to len(tok)
    sp = special_ids(tok)
    assert {sp.boi, sp.image, sp.eod} == set(range(len(tok) - 3, len(tok)))
    assert sp.pad == tok.convert_tokens_to_ids("<|endoftext|>")  # pad falls back to eos
    assert tok.encode("a<boi><image><eod>", add_special_tokens=False)[-3:] == [sp.boi, sp.image, sp.eod]
    again = load_tokenizer(folder)  # loading never changes the folder
    assert special_ids(again) == sp


def test_foreign_tokenizer_without_eos_gets_a_pad_token(tmp_path):
    tok = load_tokenizer(_gpt2_like_folder(tmp_path / "llm", with_eos=False))
    assert tok.mmgen_added_tokens == 4
    assert tok.pad_token == "<pad>" and special_ids(tok).bos is None


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match="nowhere.*does not exist"):
        load_tokenizer(missing)


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"no usable tokenizer in .*empty"):
        load_tokenizer(tmp_path / "empty")


def test_build_tokenizer_trains_or_loads(tmp_path):
    cfg = load_config()
    tok = build_tokenizer(cfg)
    assert len(tok) <= cfg.model.llm.vocab_size
    special_ids(tok)
    tok.save_pretrained(tmp_path / "tok")
    cfg = load_config(overrides=[f"model.llm.tokenizer={tmp_path / 'tok'}"])
    loaded = build_tokenizer(cfg)
    assert loaded.get_vocab() == tok.get_vocab()


def test_build_tokenizer_reads_jsonl_text(tmp_path):
    lines = [{"id": str(i), "segments": [{"type": "text", "text": "Zebras gallop quickly."}]}
             for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
    cfg = load_config(overrides=["data.sources=[{kind: shapes}, {kind: jsonl, path: "
                                 f"{tmp_path / 'docs.jsonl'}}}]"])
    tok = build_tokenizer(cfg)
    assert len(tok.encode(" gallop", add_special_tokens=False)) == 1
