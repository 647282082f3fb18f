"""Memory: generating document after document does not grow without bound."""

import gc
import os

import torch

from mmgen.config import load_config
from mmgen.data.documents import Document, Segment
from mmgen.data.tokenizer import build_tokenizer
from mmgen.generation.api import generate
from mmgen.models.mm_interleaved import MMInterleaved

from .test_train import TINY


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_twenty_documents_of_eight_images_do_not_grow_memory():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = MMInterleaved(cfg, build_tokenizer(cfg)).eval()
    segments = [s for _ in range(8) for s in (Segment("text", text="A small red circle is on the left."),
                                              Segment("image"))]
    rss, tensors = {}, {}
    for i in range(1, 21):
        (doc,) = generate([Document(f"doc-{i}", list(segments))], model=model, steps=1, max_images=8,
                          max_new_tokens=4, batch_size=1, seed=i)
        assert sum(s.type == "image" and s.source == "generated" for s in doc.segments) == 8
        del doc
        gc.collect()
        if i in (5, 20):
            rss[i], tensors[i] = resident_bytes(), live_tensors()
    assert rss[20] <= 1.10 * rss[5], f"resident memory grew from {rss[5] >> 20} MiB to {rss[20] >> 20} MiB"
    assert tensors[20] <= tensors[5], f"live tensors grew from {tensors[5]} to {tensors[20]}"
