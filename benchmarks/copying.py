"""Why does the decoder copy the previous frame on a new introduction? Each earlier-image path, switched off.

The ``reintro`` task (docs/SHAPESTORIES.md): frame 1 with its sentence, then the introduction of
another object on the same background → its image. ``copied`` is the share of images that show
frame 1's value of an attribute the new sentence changed. The decoder reads earlier images two
ways: the ``previous_image`` conditioner (the latest image as UNet input channels) and the UNet's
MMFS blocks; and its text context holds the whole document so far, frame 1's sentence included.
Switching each off at sampling time, on the same prompts and seeds, says which one carries the
copy; ``continuation`` (a change sentence after frame 1) says what each path is for, and
``story`` (the model writes on from one sentence) whether the copy is what a free story meets.

    python benchmarks/copying.py [--checkpoint runs/shapes-tiny] [--n 64]

Prints a line per variant and a final JSON line {variant: {task: {joint, copied, background,
image_match, changes}}}.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("joint", "copied", "background", "image_match", "changes")


@contextmanager
def switched_off(model, path: str):
    """Sample with one path from the document's past off: "previous_image" (zeros, as when a
    document has no earlier image), "mmfs" (no earlier image visible to the UNet's MMFS blocks) or
    "earlier_text" (the decoder's context holds only the tokens after the latest image)."""
    decoder = model.decoder
    original = decoder.sample

    def sample(context, cmask, prev_features, prev_visible, **kw):
        if path == "previous_image" and kw.get("prev_image") is not None:
            kw["prev_image"] = torch.zeros_like(kw["prev_image"])
        if path == "mmfs" and prev_visible is not None:
            prev_visible = torch.zeros_like(prev_visible)
        if path == "earlier_text":  # the context keeps only the tokens after the latest image
            is_image = kw["context_ids"] == model.special.image  # (n, K)
            after = torch.arange(is_image.shape[1], device=is_image.device) > \
                torch.where(is_image, torch.arange(is_image.shape[1], device=is_image.device), -1).amax(1, keepdim=True)
            cmask = cmask & after
        return original(context, cmask, prev_features, prev_visible, **kw)

    if path != "none":
        decoder.sample = sample
    try:
        yield
    finally:
        decoder.sample = original


def main() -> None:
    from mmgen.evaluation.shapes_eval import evaluate
    from mmgen.models.mm_interleaved import MMInterleaved

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "examples" / "checkpoints" / "shapes-tiny"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="reintro,continuation,story")
    ap.add_argument("--variants", default="none,previous_image,mmfs,earlier_text")
    args = ap.parse_args()
    folder = Path(args.checkpoint)
    if (folder / "model").is_dir():
        folder = folder / "model"
    elif not (folder / "config.yaml").is_file():  # a run folder: its latest checkpoint
        folder = sorted(folder.glob("step-*"))[-1] / "model"
    model = MMInterleaved.from_pretrained(folder)
    results = {}
    for variant in args.variants.split(","):
        with switched_off(model, variant):
            out = evaluate(model, args.tasks.split(","), n=args.n, seed=args.seed)
        results[variant] = {task: {k: r.metrics.get(k) for k in KEYS if k in r.metrics} for task, r in out.items()}
        print(f"off: {variant:15s}", "  ".join(f"{task} {json.dumps(m)}" for task, m in results[variant].items()),
              flush=True)
    print(json.dumps({"checkpoint": str(folder), "n": args.n, **results}))


if __name__ == "__main__":
    main()
