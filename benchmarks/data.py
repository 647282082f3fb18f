"""The data pipeline's speed: documents/s and images/s at 512 px with 0, 1 and 2 workers.

    .venv/bin/python benchmarks/data.py [--micro-batches 6] [--stories 60] [--workers 0 1 2]

A VIST-shaped corpus is written to a temporary folder (a story-in-sequence JSON file and
640x480 JPEG photos, five a story), then read the way training reads it: the ``vist``
source, documents drawn as a function of (seed, step), photos decoded, centre-cropped and
resized to 512 px, tokenized, packed and collated (``mmgen.training.loader.BatchLoader``) in
the batch shape of configs/vist_finetune.yaml (4 rows of 2048 tokens, up to 16 images a row,
64 queries an image). Timed: the micro-batches after the first (worker start-up is reported
apart). Against a training step: the real-scale model consumes ``batch_size * grad_accum``
rows a step; the last JSON line gives the pipeline's seconds per micro-batch to set beside
the GPU's seconds per micro-batch (2x ahead: data seconds at most half of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmgen.config import load_config  # noqa: E402
from mmgen.data.tokenizer import build_tokenizer  # noqa: E402
from mmgen.training.loader import BatchLoader  # noqa: E402


def write_corpus(root: Path, stories: int) -> tuple[Path, Path]:
    """A VIST story-in-sequence file and its photos (smooth colour fields with grain, like photos)."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    annotations = []
    yy, xx = np.mgrid[0:480, 0:640]
    for s in range(stories):
        for k in range(5):
            photo = str(10_000 + 5 * s + k)
            base = rng.uniform(0, 255, 3)
            field = (base + 60 * np.sin(xx[..., None] / rng.uniform(20, 90) + rng.uniform(0, 6, 3))
                     + 60 * np.cos(yy[..., None] / rng.uniform(20, 90)) + rng.normal(0, 12, (480, 640, 3)))
            Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(images / f"{photo}.jpg", quality=90)
            annotations.append([{"story_id": str(s), "photo_flickr_id": photo, "worker_arranged_photo_order": k,
                                 "original_text": f"On day {k} of the trip the family saw sight number {s}.",
                                 "text": "x", "album_id": "a", "storylet_id": str(5 * s + k)}])
    sis = root / "train.story-in-sequence.json"
    sis.write_text(json.dumps({"images": [], "albums": [], "annotations": annotations}))
    return sis, images


def measure(cfg, tok, workers: int, micro_batches: int) -> dict:
    cfg.data.num_workers = workers
    t0 = time.perf_counter()
    loader = BatchLoader(cfg, tok, seed=0, rank=0, start=0, end=micro_batches + 1, echo=lambda line: None)
    loader.next(0, 0)
    startup = time.perf_counter() - t0
    docs = images = 0
    t1 = time.perf_counter()
    for step in range(1, micro_batches + 1):
        batch = loader.next(step, 0)
        docs += sum(len(row) for row in batch.doc_ids)
        images += batch.images.shape[0]
    dt = time.perf_counter() - t1
    loader.close()
    return {"workers": workers, "documents_per_s": round(docs / dt, 2), "images_per_s": round(images / dt, 2),
            "s_per_micro_batch": round(dt / micro_batches, 3), "startup_s": round(startup, 2),
            "images_per_micro_batch": round(images / micro_batches, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--micro-batches", type=int, default=6, help="timed micro-batches per setting")
    ap.add_argument("--stories", type=int, default=60, help="VIST-shaped stories written (5 photos each)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sis, images = write_corpus(Path(tmp), args.stories)
        cfg = load_config(None, [
            f"data.sources=[{{kind: vist, path: '{sis}', images: '{images}'}}]", "data.seq_len=2048",
            "data.max_images_per_seq=16", "model.resampler.num_queries=64", "model.llm.max_position_embeddings=2048", "train.batch_size=4",
            "train.grad_accum=1"])
        cfg.data.image_size = 512  # the pipeline only: no model is built, so the tiny towers' sizes don't matter
        tok = build_tokenizer(cfg)
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; 512 px, 4 rows x 2048 tokens, "
              f"up to 16 images a row")
        results = []
        for w in args.workers:
            r = measure(cfg, tok, w, args.micro_batches)
            results.append(r)
            print(f"workers {w}: {r['documents_per_s']:7.2f} documents/s  {r['images_per_s']:7.2f} images/s  "
                  f"{r['s_per_micro_batch']:.3f} s per micro-batch ({r['images_per_micro_batch']:.0f} images); "
                  f"start-up {r['startup_s']:.2f} s")
    print(json.dumps({"benchmark": "data", "image_size": 512, "results": results}))


if __name__ == "__main__":
    main()
