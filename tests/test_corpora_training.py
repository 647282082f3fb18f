"""Training from public corpora: a mixed vist + webdataset source read by 2 workers, rank and worker
splitting, bad records counted in the log, data.strict, and a worker that dies."""

import json
import os
import signal

import pytest
import torch

from mmgen.config import SourceConfig
from mmgen.data.corpora.webdataset import WebDatasetSource
from mmgen.data.tokenizer import build_tokenizer
from mmgen.training.checkpoint import list_checkpoints
from mmgen.training.data import DataError
from mmgen.training.loader import BatchLoader
from mmgen.training.trainer import train
from tests import corpus_fixtures as F
from tests.test_train import losses, tiny_config


@pytest.fixture
def corpora(tmp_path):
    """VIST stories (one photo missing) and two MMC4-packed shards (one image that does not decode)."""
    sis, images, _ = F.vist_corpus(tmp_path / "vist", n_stories=6, missing="1012")
    F.mmc4_packed_shard(tmp_path / "wds" / "000000.tar", 0, 6, bad_image_at=4)
    F.mmc4_packed_shard(tmp_path / "wds" / "000001.tar", 6, 6)
    return [f"data.sources=[{{kind: vist, path: '{sis}', images: '{images}', weight: 1.0}}, "
            f"{{kind: webdataset, path: '{tmp_path / 'wds'}', weight: 1.0}}]",
            "data.image_size=32", "data.max_images_per_seq=6", "data.seq_len=96"]


def test_two_workers_give_the_batches_of_the_main_process_and_resume_exactly(tmp_path, corpora):
    cfg = tiny_config(tmp_path / "run", "train.steps=6", "train.grad_accum=2", *corpora)
    tok = build_tokenizer(cfg)

    def run(workers, start=0, end=6, rank=0):
        cfg.data.num_workers = workers
        loader = BatchLoader(cfg, tok, seed=3, rank=rank, start=start, end=end, echo=lambda line: None)
        out = [loader.next(s, m) for s in range(start, end) for m in range(2)]
        bad = loader.bad_records
        loader.close()
        return out, bad

    inline, bad0 = run(0)
    pooled, bad2 = run(2)
    resumed, _ = run(2, start=3)
    assert bad0 == bad2 > 0  # the missing photo and the undecodable image were met, and skipped
    for a, b in zip(inline, pooled):
        assert a.doc_ids == b.doc_ids and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.images, b.images)
    for a, b in zip(inline[6:], resumed):
        assert a.doc_ids == b.doc_ids and torch.equal(a.images, b.images)
    ids = {d for b in inline for row in b.doc_ids for d in row}
    assert any(d.startswith("vist-") for d in ids) and any(d.startswith("000000-") or d.startswith("000001-")
                                                           for d in ids)
    assert "vist-42" not in ids and "000000-000000004" not in ids  # the bad records never reach a batch
    # ranks: another rank's stream is other documents
    other, _ = run(0, rank=1)
    assert [b.doc_ids for b in other] != [b.doc_ids for b in inline]


def test_two_ranks_by_two_workers_build_every_micro_batch_once(tmp_path, corpora):
    """Each (rank, worker) builds its own micro-batches: together they are all of them, none twice."""
    cfg = tiny_config(tmp_path / "run", "train.steps=4", *corpora)
    tok = build_tokenizer(cfg)
    cfg.data.num_workers = 2
    built: dict[tuple[int, int], int] = {}  # (rank, micro-batch index) -> worker pid
    for rank in (0, 1):
        loader = BatchLoader(cfg, tok, seed=0, rank=rank, start=0, end=4, echo=lambda line: None)
        loader.dataset.status  # per-worker status buffers: "pid<TAB>record"
        for step in range(4):
            loader.next(step, 0)
            pid = bytes(loader.dataset.status[step % 2].value).split(b"\t")[0]
            built[(rank, step)] = int(pid)
        loader.close()
    assert sorted(built) == [(r, s) for r in (0, 1) for s in range(4)]  # complete
    for rank in (0, 1):  # split by worker: micro-batch k is worker k % 2's, two different processes
        assert built[(rank, 0)] == built[(rank, 2)] != built[(rank, 1)] == built[(rank, 3)]
    assert len({pid for pid in built.values()}) == 4 and os.getpid() not in built.values()


def test_a_training_run_with_two_workers_reads_a_mixed_vist_and_webdataset_source(tmp_path, corpora):
    a = tiny_config(tmp_path / "a", "train.steps=3", "train.save_every=3", "data.num_workers=2", *corpora)
    b = tiny_config(tmp_path / "b", "train.steps=3", "train.save_every=3", "data.num_workers=0", *corpora)
    result = train(a, show_progress=False)
    train(b, show_progress=False)
    assert result.step == 3 and [s for s, _ in list_checkpoints(tmp_path / "a")] == [3]
    ra, rb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]  # the workers changed nothing but who did the work
    assert ra[-1]["bad_records"] >= 1 and ra[-1]["bad_records"] == rb[-1]["bad_records"]


def test_strict_stops_at_the_first_bad_record(tmp_path, corpora):
    cfg = tiny_config(tmp_path / "run", "train.steps=3", "data.strict=true", *corpora)
    with pytest.raises(DataError, match=r"(1012' not found|does not decode).*data.strict is on"):
        train(cfg, show_progress=False)


def test_a_worker_that_dies_is_named_with_its_shard_and_the_checkpoint_survives(tmp_path, corpora, monkeypatch):
    cfg = tiny_config(tmp_path / "run", "train.steps=8", "train.save_every=2", "data.num_workers=2",
                      f"data.sources=[{{kind: webdataset, path: '{tmp_path / 'wds'}'}}]", *corpora[1:])
    flag = tmp_path / "kill-workers"
    read, next_batch = WebDatasetSource.read, BatchLoader.next

    def killing_read(self, i):  # once the flag is up, a worker is killed as if by the OOM killer
        if torch.utils.data.get_worker_info() is not None and flag.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)

    def flagging_next(self, step, micro):  # the main process raises the flag when it reaches step 2
        if step == 2:
            flag.touch()
        return next_batch(self, step, micro)

    monkeypatch.setattr(WebDatasetSource, "read", killing_read)
    monkeypatch.setattr(BatchLoader, "next", flagging_next)
    with pytest.raises(DataError, match=r"a data worker died .* was reading .*wds/00000[01]\.tar:0000000\d\d.*"
                                        r"checkpoints already written are intact"):
        train(cfg, show_progress=False)
    saved = list_checkpoints(tmp_path / "run")
    assert saved and saved[0][0] == 2 and saved[-1][0] < 8
    for step, ckpt in saved:  # every checkpoint written is whole
        assert json.loads((ckpt / "trainer" / "state.json").read_text())["step"] == step
        assert (ckpt / "model" / "model.safetensors").stat().st_size > 0


def test_two_ranks_with_two_workers_each_train_on_a_mixed_vist_and_webdataset_source(tmp_path, corpora):
    """The shipped CPU DDP launch (2 gloo processes), each rank reading the corpora in 2 workers:
    both ranks ran (world size 2), read their own documents (their losses differ), agreed on the
    gradients, and counted the bad records they met; one checkpoint, one done line."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_train import TINY

    root = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "configs" / "accelerate" / "ddp_cpu.yaml"), "-m", "cli.main", "train", *TINY, *corpora,
           "data.num_workers=2", f"train.out_dir={run}", "train.steps=3", "train.save_every=3"]
    done = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [3]
    rows = losses(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["world_size"] == 2 and r["engine"] == "ddp", r
        assert r["rank_losses"][0] != r["rank_losses"][1]
        a, b = r["rank_grad_norms"]
        assert a > 0 and abs(a - b) <= 1e-6 * a, r
    assert rows[-1]["bad_records"] >= 1
    assert done.stdout.count("done at step 3") == 1, done.stdout
