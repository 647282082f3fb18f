"""Public corpora read in place and converted: VIST, MMC4, OBELICS, webdataset shards; the registry.

Fixtures are written by tests/corpus_fixtures.py in each corpus's own layout, bad cases included.
Training from them (workers, ranks, resume) is in tests/test_corpora_training.py.
"""

import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from mmgen.config import ConfigError, SourceConfig, config_from_dict
from mmgen.data.corpora import SOURCE_KINDS, source_class
from mmgen.data.corpora.convert import convert
from mmgen.data.documents import DocumentError, read_documents, validate_files
from mmgen.data.media import document_images
from tests import corpus_fixtures as F

runner = CliRunner()


def source(kind, path, **kw):
    return source_class(kind)(SourceConfig(kind=kind, path=str(path), **{k: (str(v) if isinstance(v, Path) else v)
                                                                        for k, v in kw.items()}))


def records(src):
    return list(src.documents())


def texts(doc):
    return [s.text for s in doc.segments if s.type == "text"]


def kinds(doc):
    return "".join("T" if s.type == "text" else "I" for s in doc.segments)


# --- the registry -------------------------------------------------------------------------------


def test_the_registry_names_every_kind_and_refuses_others():
    assert set(SOURCE_KINDS) >= {"shapes", "jsonl", "pairs", "vist", "mmc4", "obelics", "webdataset"}
    for kind in SOURCE_KINDS:
        assert isinstance(source_class(kind), type)
    with pytest.raises(KeyError, match=r"unknown source kind 'laion' \(known: shapes, .*webdataset\)"):
        source_class("laion")
    with pytest.raises(ConfigError, match=r"`data.sources\[1\].kind` must be one of shapes, .*vist.*got 'laion'"):
        config_from_dict({"data": {"sources": [{"kind": "shapes"}, {"kind": "laion", "path": "x"}]}})
    with pytest.raises(ConfigError, match="a `vist` source needs a `path`"):
        config_from_dict({"data": {"sources": [{"kind": "vist"}]}})
    from mmgen.training.data import DataError, build_source
    from mmgen.config import DataConfig
    with pytest.raises(DataError, match="unknown source kind 'laion'"):
        build_source(SourceConfig(kind="laion", path="x"), DataConfig())


# --- VIST ---------------------------------------------------------------------------------------


def test_vist_story_in_sequence_orders_each_story_by_the_workers_arrangement(tmp_path):
    sis, images, stories = F.vist_corpus(tmp_path)
    docs = records(source("vist", sis, images=images))
    assert [d.id for d in docs] == [f"vist-{s}" for s in stories]
    for doc in docs:
        sid = doc.meta["vist"]["story_id"]
        assert kinds(doc) == "TI" * 5
        assert texts(doc) == [t for _, t in stories[sid]]  # original_text, in worker_arranged_photo_order
        assert [Path(s.path).name for s in doc.segments if s.type == "image"] == [f"{p}.jpg" for p, _ in stories[sid]]
    # the pixels are the files' pixels
    first = document_images(docs[0])[0]
    assert first.getpixel((5, 5))[0] > 150  # COLOURS[0] is red


def test_vist_reformatted_layouts(tmp_path):
    _, images, stories = F.vist_corpus(tmp_path, n_stories=2)
    plain = {sid: [{"caption": t, "image_id": p, "sequence_index": k} for k, (p, t) in enumerate(items)][::-1]
             for sid, items in stories.items()}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    (tmp_path / "wrapped.json").write_text(json.dumps({"annotations": plain}))
    for name in ("plain.json", "wrapped.json"):
        docs = records(source("vist", tmp_path / name, images=images))
        assert [texts(d) for d in docs] == [[t for _, t in items] for items in stories.values()]
        assert all(kinds(d) == "TI" * 5 for d in docs)


def test_vist_bad_input_is_located_and_a_missing_photo_fails_or_is_skipped(tmp_path):
    sis, images, stories = F.vist_corpus(tmp_path, n_stories=2, missing="1002")
    docs = records(source("vist", sis, images=images))
    bad = [d for d in docs if isinstance(d, DocumentError)]
    assert len(bad) == 1 and "story 40, photo 3: image '1002' not found" in str(bad[0])
    assert str(bad[0]).startswith(f"{sis}: ")
    src = source("vist", sis, images=images, skip_missing=True)
    docs = records(src)
    assert kinds(docs[0]) == "TITITTITI" and len(src.take_notes()) == 1
    # a file cut short: named with its line, the rest of the folder still read
    F.vist_sis(tmp_path / "sis" / "cut.json", {"9": [("1000", "x")]})
    F.truncate(tmp_path / "sis" / "cut.json")
    docs = records(source("vist", tmp_path / "sis", images=images))
    errors = [str(d) for d in docs if isinstance(d, DocumentError)]
    assert any(e.startswith(f"{tmp_path / 'sis' / 'cut.json'}:") and "not valid JSON" in e for e in errors)
    assert sum(not isinstance(d, DocumentError) for d in docs) == 1  # story 41 (story 40 lacks a photo)


# --- MMC4 ---------------------------------------------------------------------------------------


def test_mmc4_places_each_image_before_its_matched_sentence(tmp_path):
    shard = tmp_path / "docs_shard_0_v2.jsonl"
    F.mmc4_shard(shard, tmp_path / "images")
    got = records(source("mmc4", shard, images=tmp_path / "images"))
    assert [type(r).__name__ for r in got] == ["Document", "DocumentError", "DocumentError", "Document"]
    doc = got[0]
    # a2 (sentence 0), then sentences 0-1, a1 (sentence 2), sentences 2-3; low.jpg (0.1 < 0.24) left out
    assert kinds(doc) == "ITIT"
    assert [Path(s.path).name for s in doc.segments if s.type == "image"] == ["a2.png", "a1.jpg"]
    assert texts(doc) == ["Doc 0 sentence 0. Doc 0 sentence 1.", "Doc 0 sentence 2. Doc 0 sentence 3."]
    assert doc.id == "docs_shard_0_v2-000001" and doc.meta["mmc4"]["url"] == "https://example.org/page0"
    assert str(got[1]).startswith(f"{shard}:2: not valid JSON")
    assert str(got[2]) == f"{shard}:3: image_info[0]: matched_text_index 7 out of range (text_list has 4 sentences)"
    # --min-sim: a lower threshold keeps low.jpg, beside sentence 3
    doc = records(source("mmc4", shard, images=tmp_path / "images", min_sim=0.0))[0]
    assert kinds(doc) == "ITITIT"


def test_mmc4_zip_reads_the_same_documents(tmp_path):
    shard = tmp_path / "docs_shard_0_v2.jsonl"
    F.mmc4_shard(shard, tmp_path / "images")
    zipped = F.zip_of(shard, tmp_path / "z" / "docs_shard_0_v2.jsonl.zip")
    plain = records(source("mmc4", shard, images=tmp_path / "images"))
    inzip = records(source("mmc4", zipped.parent, images=tmp_path / "images"))
    assert [d.to_json() for d in plain if not isinstance(d, DocumentError)] == \
           [d.to_json() for d in inzip if not isinstance(d, DocumentError)]
    assert str([d for d in inzip if isinstance(d, DocumentError)][0]).startswith(
        f"{zipped}:docs_shard_0_v2.jsonl:2: not valid JSON")
    # random access draws the same record as the sequential read
    src = source("mmc4", zipped, images=tmp_path / "images")
    assert src.read(3).to_json() == plain[3].to_json() and src.read(0).to_json() == plain[0].to_json()
    # a damaged zip is reported, not raised
    (tmp_path / "z" / "bad.jsonl.zip").write_bytes(zipped.read_bytes()[:40])
    assert "cannot read" in str(source("mmc4", tmp_path / "z", images=tmp_path / "images").problems[0])


# --- OBELICS ------------------------------------------------------------------------------------


def test_obelics_parquet_keeps_the_document_order(tmp_path):
    path = tmp_path / "obelics-00000.parquet"
    F.obelics_parquet(path, tmp_path / "images")
    src = source("obelics", path, images=tmp_path / "images")
    assert len(src) == 3 and len(src.units) == 2  # 2 row groups, indexed from the footer
    got = records(src)
    assert kinds(got[0]) == "TIT" and texts(got[0]) == ["A cat sat on the mat.", "Then it slept."]
    assert Path(got[0].segments[1].path).name == "cat.jpg"
    assert kinds(got[1]) == "IT" and Path(got[1].segments[0].path).name == "dog.png"  # query string ignored
    assert got[0].meta["obelics"]["url"] == "https://example.org/doc0"
    assert str(got[2]) == f"{path}:3: images[2]: image 'https%3A%2F%2Fimg.example.org%2Fabsent.jpg' not found in " \
                          f"{tmp_path / 'images'}"
    assert kinds(records(source("obelics", path, images=tmp_path / "images", skip_missing=True))[2]) == "TI"


def test_obelics_file_with_other_columns_is_reported_and_skipped(tmp_path):
    F.obelics_parquet(tmp_path / "good.parquet", tmp_path / "images")
    F.other_parquet(tmp_path / "laion.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    src = source("obelics", tmp_path, images=tmp_path / "images")
    problems = sorted(str(p) for p in src.problems)
    assert len(src) == 3 and len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'junk.parquet'}: not a readable parquet file")
    assert problems[1] == (f"{tmp_path / 'laion.parquet'}: not OBELICS: no `texts`, `images` column "
                           "(columns: caption, url); skipped")


# --- webdataset ---------------------------------------------------------------------------------


def test_webdataset_mmc4_packing_with_base64_images(tmp_path):
    images = F.mmc4_packed_shard(tmp_path / "shards" / "000000.tar", 0, 3, bad_image_at=1)
    src = source("webdataset", tmp_path / "shards")
    got = records(src)
    assert [type(r).__name__ for r in got] == ["Document", "DocumentError", "Document"]
    assert str(got[1]).startswith(f"{tmp_path / 'shards' / '000000.tar'}:000000001.json image_info[1]: "
                                  "image does not decode")
    doc = got[2]
    assert kinds(doc) == "ITIT" and texts(doc) == ["Doc 2 sentence 0. Doc 2 sentence 1.",
                                                   "Doc 2 sentence 2. Doc 2 sentence 3."]
    from PIL import Image
    import io
    expected = Image.open(io.BytesIO(images["000000002"][0])).convert("RGB")
    assert doc.segments[0].image.tobytes() == expected.tobytes()
    assert src.where(2) == f"{tmp_path / 'shards' / '000000.tar'}:000000002"


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    F.mmc4_packed_shard(tmp_path / "000000.tar", 0, 4)
    F.mmc4_packed_shard(tmp_path / "000001.tar", 4, 4)
    F.mmc4_packed_shard(tmp_path / "000002.tar", 8, 4)
    F.truncate_tar(tmp_path / "000001.tar", 2)  # inside the third sample's data
    F.truncate_tar(tmp_path / "000002.tar", 1, in_header=True)  # inside the second sample's header
    src = source("webdataset", tmp_path)
    problems = [str(p) for p in src.problems]
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / '000001.tar'}: truncated or damaged shard (member 000000006.json "
                                  "is cut short): read up to after member 000000005.json")
    assert problems[1].startswith(f"{tmp_path / '000002.tar'}: truncated or damaged shard")
    assert [src.where(i).rsplit(":", 1)[1] for i in range(len(src))] == \
           [f"{k:09d}" for k in (0, 1, 2, 3, 4, 5, 8)]
    assert all(not isinstance(d, DocumentError) for d in records(src)[2:])


# --- convert and shard --------------------------------------------------------------------------


def test_convert_cli_writes_documents_that_validate(tmp_path):
    sis, vimages, _ = F.vist_corpus(tmp_path / "vist", n_stories=3, missing="1007")
    F.mmc4_shard(tmp_path / "mmc4" / "docs_shard_0_v2.jsonl", tmp_path / "mmc4" / "images")
    F.obelics_parquet(tmp_path / "obelics" / "a.parquet", tmp_path / "obelics" / "images")
    F.mmc4_packed_shard(tmp_path / "wds" / "000000.tar", 0, 3, bad_image_at=1)
    (tmp_path / "vimages-broken").mkdir()
    cases = {  # kind, src, extra args, documents written, summary says
        "vist": (sis, ["--images", str(vimages)], 2, "1 missing image"),
        "mmc4": (tmp_path / "mmc4" / "docs_shard_0_v2.jsonl", ["--images", str(tmp_path / "mmc4" / "images")], 2,
                 "1 index out of range, 1 not JSON"),
        "obelics": (tmp_path / "obelics", ["--images", str(tmp_path / "obelics" / "images"), "--skip-missing"], 3,
                    "1 missing image(s) skipped"),
        "webdataset": (tmp_path / "wds", [], 2, "1 undecodable image"),
    }
    for kind, (src, extra, n, said) in cases.items():
        out = tmp_path / "out" / f"{kind}.jsonl"
        result = runner.invoke(app, ["data", "convert", kind, str(src), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert said in result.output and f"wrote {n} document(s)" in result.output, result.output
        assert validate_files([out]) == (n, [])
        assert runner.invoke(app, ["data", "validate", str(out)]).exit_code == 0
    # shard images are written unchanged beside the output
    wds = read_documents(tmp_path / "out" / "webdataset.jsonl")
    written = (tmp_path / "out" / wds[0].segments[0].path).read_bytes()
    assert written == F.mmc4_packed_shard(tmp_path / "again.tar", 0, 1)["000000000"][0]
    # a kind convert can't read, and a source that isn't there: one line each
    result = runner.invoke(app, ["data", "convert", "vist", str(tmp_path / "nope"), "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1 and "no such file or folder" in result.output
    assert runner.invoke(app, ["data", "convert", "shapes", str(sis), "--out", "x.jsonl"]).exit_code == 2


def test_an_undecodable_image_file_leaves_its_document_out_of_convert(tmp_path):
    sis, images, _ = F.vist_corpus(tmp_path, n_stories=2)
    (images / "1003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    report = convert("vist", sis, tmp_path / "out.jsonl", images=images)
    assert report.documents == 1 and len(report.problems) == 1
    assert "segment 8" in str(report.problems[0]) and "1003.jpg" in str(report.problems[0])
    assert "1 undecodable image" in report.summary()


def test_shard_packs_documents_that_read_back_the_same(tmp_path):
    sis, images, stories = F.vist_corpus(tmp_path, n_stories=3)
    convert("vist", sis, tmp_path / "vist.jsonl", images=images)
    for out in ("a", "b"):
        result = runner.invoke(app, ["data", "shard", str(tmp_path / "vist.jsonl"), "--out", str(tmp_path / out),
                                     "--per-shard", "2"])
        assert result.exit_code == 0 and "packed 3 document(s) into 2 shard(s)" in result.output, result.output
    shards = sorted((tmp_path / "a").glob("*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in shards)  # same input, same bytes
    back = records(source("webdataset", tmp_path / "a"))
    originals = read_documents(tmp_path / "vist.jsonl")
    assert [d.id for d in back] == [d.id for d in originals]
    for got, want in zip(back, originals):
        assert texts(got) == texts(want) and kinds(got) == kinds(want)
        assert [s.image.tobytes() for s in got.segments if s.type == "image"] == \
               [im.tobytes() for im in document_images(want)]
    # and shards convert back to documents that validate
    report = convert("webdataset", tmp_path / "a", tmp_path / "back.jsonl")
    assert report.documents == 3 and validate_files([tmp_path / "back.jsonl"]) == (3, [])


def test_the_vist_finetune_config_reads_vist_from_local_folders():
    from mmgen.config import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "vist_finetune.yaml")
    real = load_config(root / "configs" / "mm_interleaved_7b.yaml")
    (src,) = cfg.data.sources
    assert src.kind == "vist" and src.path.endswith(".story-in-sequence.json") and src.images
    assert not Path(src.path).is_absolute() and cfg.data.num_workers > 0 and cfg.data.image_size == 512
    assert cfg.model == real.model  # the real-scale model, fine-tuned from its pre-trained weights
    assert cfg.train.init_from and "vist" in cfg.train.out_dir
