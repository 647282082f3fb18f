"""Documents → packed batch: labels, masks, positions, packing edge cases, images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmgen.config import load_config
from mmgen.data.collate import (IGNORE, Batch, Collator, EncodedDoc, Packer, collate, encode_document,
                                image_to_tensor, pack_documents, tensor_to_image, truncate)
from mmgen.data.documents import Document, Segment
from mmgen.data.tokenizer import load_tokenizer, shapestories_sentences, special_ids, train_tokenizer

Q = 4  # placeholders per image in these tests
S = 16  # image size in these tests


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(shapestories_sentences(), 512)


@pytest.fixture(scope="module")
def sp(tok):
    return special_ids(tok)


def no_files(doc):
    raise AssertionError(f"in-memory images must not reach the loader ({doc.id})")


def img(colour=(220, 40, 40), size=(24, 24)):
    return Image.new("RGB", size, colour)


def doc(id_, *parts):
    """parts: str → text segment, a PIL image → image segment."""
    segs = [Segment("text", text=p) if isinstance(p, str) else Segment("image", image=p) for p in parts]
    return Document(id_, segs)


def encode(tok, d, **kw):
    return encode_document(d, tok, num_queries=Q, load_images=no_files, **kw)


def batch_of(tok, docs, seq_len=256, max_images=16, pad_to=None):
    rows = pack_documents([encode(tok, d) for d in docs], seq_len, max_images)
    return collate(rows, pad_id=special_ids(tok).pad, num_queries=Q, image_size=S, pad_to=pad_to)


def text_ids(tok, text):
    return tok.encode(" " + text, add_special_tokens=False)


A1, A2 = "A small red circle is in the top left.", "The circle turns blue."
B1, B2 = "A large green square is at the bottom.", "The square grows."


# ---------------------------------------------------------------------------------------------
# encoding one document


def test_sequence_layout(tok, sp):
    e = encode(tok, doc("a", A1, img(), A2))
    expected = ([sp.bos] + text_ids(tok, A1) + [sp.boi] + [sp.image] * Q + text_ids(tok, A2) + [sp.eod])
    assert e.ids == expected
    assert e.image_boi == [1 + len(text_ids(tok, A1))]
    assert e.image_context == [True]
    # a sentence tokenizes the same wherever it stands
    assert encode(tok, doc("b", A2)).ids[1:-1] == text_ids(tok, A2)


def test_empty_text_segments_add_nothing(tok):
    plain = encode(tok, doc("a", A1, img(), A2))
    padded = encode(tok, doc("a", "", A1, "   ", img(), "", A2, ""))
    assert padded.ids == plain.ids and padded.image_boi == plain.image_boi


def test_special_token_text_is_not_special(tok, sp):
    e = encode(tok, doc("a", "look: <boi><image><eod>"))
    assert e.ids.count(sp.boi) == e.ids.count(sp.image) == 0 and e.ids.count(sp.eod) == 1


def test_placeholders_raise(tok):
    d = Document("p", [Segment("text", text=A1), Segment("image"), Segment("text", text=A2)])
    with pytest.raises(ValueError, match="placeholder"):
        encode(tok, d)


def test_file_images_and_video_frames_go_through_the_loader(tok, sp):
    calls = []

    def loader(one):
        *before, seg = one.segments
        assert all(s.type == "text" and s.text is None for s in before)  # keeps segment numbers
        calls.append((len(before), seg.type))
        return [img()] * (3 if seg.type == "video" else 1)

    d = Document("v", [Segment("text", text=A1), Segment("image", path="a.png"),
                       Segment("video", path="v.mp4", frames=3), Segment("text", text=A2)])
    e = encode_document(d, tok, num_queries=Q, load_images=loader)
    assert calls == [(1, "image"), (2, "video")]
    assert len(e.images) == 4 and e.ids.count(sp.boi) == 4 and e.ids.count(sp.image) == 4 * Q


def test_default_loader_reads_files(tok, tmp_path):
    pytest.importorskip("mmgen.data.media")
    img((40, 80, 220)).save(tmp_path / "a.png")
    d = Document("f", [Segment("text", text=A1), Segment("image", path="a.png")], base_dir=tmp_path)
    (image,) = encode_document(d, tok, num_queries=Q).images
    assert image.getpixel((0, 0)) == (40, 80, 220)
    bad = Document("g", [Segment("text", text=A1), Segment("image", path="missing.png")], base_dir=tmp_path,
                   origin=f"{tmp_path / 'docs.jsonl'}:3")
    with pytest.raises(ValueError, match=r"docs.jsonl:3: segment 2.*missing.png"):
        encode_document(bad, tok, num_queries=Q)


# ---------------------------------------------------------------------------------------------
# labels, positions, segments, visibility


def test_labels_are_ignored_exactly_on_placeholders_padding_and_doc_starts(tok, sp):
    docs = [doc("a", A1, img(), A2), doc("b", img(), B1, img(), B2),
            doc("c", B2), doc("d", A1, img(), img(), A2, img())]
    b = batch_of(tok, docs, seq_len=40)  # several rows of different lengths → padding
    assert b.input_ids.shape[0] > 1 and (b.attention_mask == 0).any()
    starts = torch.zeros_like(b.input_ids, dtype=torch.bool)
    starts[b.attention_mask.bool()] = b.position_ids[b.attention_mask.bool()] == 0
    ignored = (b.input_ids == sp.image) | (b.attention_mask == 0) | starts
    assert torch.equal(b.labels == IGNORE, ignored)
    assert torch.equal(b.labels[~ignored], b.input_ids[~ignored])
    # <boi> and <eod> keep their labels
    assert (b.labels == sp.boi).sum() == (b.input_ids == sp.boi).sum()
    assert (b.labels == sp.eod).sum() == (b.input_ids == sp.eod).sum() == len(docs)


def test_positions_restart_and_segments_count_docs(tok):
    da, db = doc("a", A1, img(), A2), doc("b", B1)
    la, lb = len(encode(tok, da)), len(encode(tok, db))
    b = batch_of(tok, [da, db, doc("c", A2)], seq_len=la + lb)  # a and b share row 0; c alone
    assert b.doc_ids == [["a", "b"], ["c"]]
    T = la + lb
    assert b.input_ids.shape == (2, T)
    assert torch.equal(b.position_ids[0], torch.cat([torch.arange(la), torch.arange(lb)]))
    assert torch.equal(b.segment_ids[0], torch.tensor([0] * la + [1] * lb))
    lc = int(b.attention_mask[1].sum())
    assert torch.equal(b.segment_ids[1], torch.tensor([0] * lc + [-1] * (T - lc)))
    assert torch.equal(b.position_ids[1, :lc], torch.arange(lc))
    assert torch.equal(b.attention_mask, (b.segment_ids >= 0).long())


def test_visible_on_a_two_document_row(tok, sp):
    da, db = doc("a", A1, img(), A2), doc("b", B1, img(), B2)
    ea, eb = encode(tok, da), encode(tok, db)
    la, lb = len(ea), len(eb)
    row = [ea, eb]
    b = collate([row, [encode(tok, doc("c", B2))]], pad_id=sp.pad, num_queries=Q, image_size=S)
    assert b.row_images.tolist() == [[0, 1], [-1, -1]]
    boi_a, boi_b = ea.image_boi[0], la + eb.image_boi[0]
    assert b.image_boi.tolist() == [boi_a, boi_b] and b.image_row.tolist() == [0, 0]
    t = torch.arange(b.input_ids.shape[1])
    # image of a: seen by a's tokens after its <boi> (placeholders included), never by b
    assert torch.equal(b.visible[0, :, 0], (t > boi_a) & (t < la))
    # image of b: seen only inside b, strictly after its <boi>
    assert torch.equal(b.visible[0, :, 1], (t > boi_b) & (t < la + lb))
    assert not b.visible[0, boi_b, 1] and b.visible[0, boi_b + 1, 1]
    assert not b.visible[1].any()  # row without images; padding slots see nothing
    for n in range(2):  # placeholders of an image see it
        assert b.visible[0, b.image_positions[n], n].all()


def test_image_indices_agree(tok, sp):
    docs = [doc("a", img(), A1, img()), doc("b", B1), doc("c", img(), img(), img())]
    b = batch_of(tok, docs, seq_len=30, max_images=2)
    N = b.images.shape[0]
    assert b.image_positions.shape == (N, Q)
    assert (b.input_ids[b.image_row, b.image_boi] == sp.boi).all()
    assert (b.input_ids[b.image_row[:, None], b.image_positions] == sp.image).all()
    assert torch.equal(b.image_positions, b.image_boi[:, None] + 1 + torch.arange(Q))
    order = [(r, p) for r, p in zip(b.image_row.tolist(), b.image_boi.tolist())]
    assert order == sorted(order)
    slots = b.row_images[b.row_images >= 0]
    assert torch.equal(slots, torch.arange(N))
    assert b.row_images.shape[1] == max(1, int((b.row_images >= 0).sum(1).max()))


def test_image_loss_mask_needs_preceding_text(tok):
    b = batch_of(tok, [doc("a", img(), A1, img(), "", img()), doc("b", img(), img())])
    assert b.image_loss_mask.tolist() == [False, True, True, False, False]


def test_documents_of_only_images(tok, sp):
    b = batch_of(tok, [doc("a", img(), img()), doc("b", img())])
    assert b.images.shape == (3, 3, S, S)
    assert not b.image_loss_mask.any()
    assert (b.labels != IGNORE).sum() == 3 + 2  # three <boi> and two <eod>
    assert b.visible[0, :, 0].sum() == b.visible[0, :, 1].sum() + 1 + Q


# ---------------------------------------------------------------------------------------------
# packing


def test_doc_exactly_seq_len_fills_a_row(tok):
    da = doc("a", A1, img(), A2)
    L = len(encode(tok, da))
    rows = pack_documents([encode(tok, da), encode(tok, doc("b", B1))], L, 16)
    assert [[d.id for d in r] for r in rows] == [["a"], ["b"]]
    assert not rows[0][0].truncated and rows[0][0].ids == encode(tok, da).ids


def test_truncation_never_splits_an_image(tok, sp):
    full = encode(tok, doc("a", A1, img(), A2, img(), img(), B1))
    for seq_len in range(2, len(full)):
        cut = truncate(full, seq_len, 16)
        if cut is None:
            assert seq_len < 2 or full.image_boi[0] < 2
            continue
        assert cut.truncated and len(cut) <= seq_len and cut.ids == full.ids[:len(cut)]
        assert sp.eod not in cut.ids
        assert len(cut.images) == len(cut.image_boi) == cut.ids.count(sp.boi)
        assert cut.ids.count(sp.image) == Q * len(cut.images)  # whole blocks only
        assert cut.ids[-1] != sp.boi
    assert truncate(full, len(full), 16) is full


def test_long_document_is_truncated_in_the_batch(tok, sp):
    b = batch_of(tok, [doc("a", A1, img(), A2, img(), B1)], seq_len=len(text_ids(tok, A1)) + 1 + Q + 3)
    ids = b.input_ids[0].tolist()
    assert len(ids) <= len(text_ids(tok, A1)) + 1 + Q + 3
    assert ids.count(sp.boi) == 1 and ids.count(sp.image) == Q and sp.eod not in ids


def test_image_crossing_the_row_boundary_moves_the_document(tok):
    ea = encode(tok, doc("a", A1))
    eb = encode(tok, doc("b", B2, img()))
    seq_len = len(ea) + len(eb) - 2  # b's image would straddle the end of row 0
    rows = pack_documents([ea, eb], seq_len, 16)
    assert [[d.id for d in r] for r in rows] == [["a"], ["b"]]
    assert not rows[1][0].truncated


def test_max_images_per_row(tok, sp):
    docs = [doc(str(i), A1, img(), A2, img()) for i in range(5)]
    rows = pack_documents([encode(tok, d) for d in docs], 1000, 3)
    assert all(sum(len(d.images) for d in r) <= 3 for r in rows)
    assert sum(len(r) for r in rows) == 5
    (big,) = pack_documents([encode(tok, doc("big", *[img()] * 5, A1))], 1000, 3)[0]
    assert len(big.images) == 3 and big.truncated and big.ids[-1] == sp.image


def test_packer_streams_rows(tok):
    packer = Packer(50, 16)
    closed = [r for i in range(6) for r in packer.add(encode(tok, doc(str(i), A1, img())))]
    closed += packer.flush()
    assert [d.id for r in closed for d in r] == [str(i) for i in range(6)]
    assert all(sum(len(d) for d in r) <= 50 for r in closed)
    assert packer.flush() == []


# ---------------------------------------------------------------------------------------------
# images, padding, devices


def test_image_tensors(tok):
    big = Image.new("RGB", (60, 40), (255, 255, 255))
    big.paste((0, 0, 0), (0, 0, 10, 40))  # a black band that the centre crop removes
    b = batch_of(tok, [doc("a", img((220, 40, 40)), A1, big, Image.new("L", (8, 8), 0))])
    assert b.images.shape == (3, 3, S, S) and b.images.dtype == torch.float32
    assert b.images.min() >= -1 and b.images.max() <= 1
    red = torch.tensor([220, 40, 40]) / 127.5 - 1
    assert torch.allclose(b.images[0], red[:, None, None].expand(3, S, S))
    assert torch.allclose(b.images[1], torch.ones(3, S, S))
    assert torch.allclose(b.images[2], -torch.ones(3, S, S))
    back = tensor_to_image(b.images[0])
    assert back.size == (S, S) and back.getpixel((3, 5)) == (220, 40, 40)
    assert torch.equal(image_to_tensor(b.images[0], S), b.images[0])


def test_no_images_and_pad_to(tok, sp):
    b = batch_of(tok, [doc("a", A1)], pad_to=32)
    assert b.input_ids.shape == (1, 32) and b.images.shape == (0, 3, S, S)
    assert b.image_positions.shape == (0, Q) and b.row_images.shape == (1, 1)
    assert b.visible.shape == (1, 32, 1) and not b.visible.any()
    assert (b.input_ids[0, int(b.attention_mask.sum()):] == sp.pad).all()
    with pytest.raises(ValueError, match="pad_to"):
        batch_of(tok, [doc("a", A1)], pad_to=3)


def test_batch_to_keeps_everything(tok):
    b = batch_of(tok, [doc("a", A1, img(), A2)])
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and moved.doc_ids == b.doc_ids
    assert torch.equal(moved.visible, b.visible) and torch.equal(moved.images, b.images)


# ---------------------------------------------------------------------------------------------
# the Collator on config sizes, other tokenizers


def test_collator_on_config(tok):
    cfg = load_config(overrides=["data.seq_len=64", "model.resampler.num_queries=4",
                                 "data.max_images_per_seq=3"])
    docs = [doc(str(i), A1, img(), A2, img(), B2, img()) for i in range(4)]
    b = Collator(tok, cfg, load_images=no_files)(docs)
    assert b.input_ids.shape[1] <= 64 and b.images.shape[-1] == cfg.data.image_size
    assert b.row_images.shape[1] <= 3 and [i for r in b.doc_ids for i in r] == ["0", "1", "2", "3"]
    same = Collator(tok, cfg, load_images=no_files)(docs)  # a fresh collator: the same batch
    assert torch.equal(same.input_ids, b.input_ids)
    batches = list(Collator(tok, cfg, load_images=no_files).batches(iter(docs * 3), rows_per_batch=2))
    assert [x.input_ids.shape[0] for x in batches] == [2] * 6


def test_sentencepiece_style_tokenizer_gets_no_double_space(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    t.decoder = decoders.Metaspace(prepend_scheme="first")
    t.train_from_iterator(shapestories_sentences(),
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                              show_progress=False))
    (tmp_path / "sp").mkdir()
    t.save(str(tmp_path / "sp" / "tokenizer.json"))
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    sp_tok = load_tokenizer(tmp_path / "sp")
    e = encode_document(doc("a", img(), A2), sp_tok, num_queries=Q, load_images=no_files)
    assert e.ids[0] == sp_tok.bos_token_id and e.loss[0] is False
    assert e.ids[2 + Q:-1] == sp_tok.encode(A2, add_special_tokens=False)


def test_shapestories_documents_collate(tok):
    shapes = pytest.importorskip("mmgen.data.shapes")
    cfg = load_config()
    stream = shapes.stream_stories(0, 64)
    docs = [next(stream) for _ in range(6)]
    b = Collator(tok, cfg, load_images=no_files)(docs)
    frames = sum(len(d.meta["shapes"]["frames"]) for d in docs)
    assert b.images.shape == (frames, 3, cfg.data.image_size, cfg.data.image_size)
    assert (b.input_ids == special_ids(tok).image).sum() == frames * cfg.model.resampler.num_queries
    text = tok.decode(b.input_ids[0][b.segment_ids[0] == 0], skip_special_tokens=True)
    assert text.strip() == " ".join(docs[0].texts)


def test_encoded_doc_is_plain_data(tok):
    e = encode(tok, doc("a", A1, img()))
    assert isinstance(e, EncodedDoc) and len(e) == len(e.ids) == len(e.loss)
