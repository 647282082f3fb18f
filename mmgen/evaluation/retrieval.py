"""Cross-modal retrieval: recall@k from a similarity matrix, and the ShapeStories ``retrieval`` task.

Shape legend: N paired items (image i belongs with text i), E embedding width.
"""

from __future__ import annotations

import random
import time

import torch

from ..data.collate import image_to_tensor
from ..data.documents import Document, Segment
from ..data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Frame, intro_sentence, random_frame, render_frame
from .shapes_eval import Sample, TaskResult


def recall_at_k(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k in both directions for a square similarity matrix (N, N) of image i vs text j.

    The right match of row i is column i. Returns ``{"i2t_r1", "i2t_r5", "t2i_r1", ...}``:
    the share of images whose caption ranks in the top k among all N captions, and the
    reverse. Ties are counted against the model (a constant score never counts as found).
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"recall_at_k needs a square (N, N) matrix, got {tuple(similarity.shape)}")
    sim = similarity.float()
    right = sim.diagonal()  # (N,)
    # rank = how many candidates score at least as high as the right one (excluding itself)
    i2t_rank = (sim >= right[:, None]).sum(1) - 1  # (N,)
    t2i_rank = (sim >= right[None, :]).sum(0) - 1  # (N,)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = round((i2t_rank < k).float().mean().item(), 4)
        out[f"t2i_r{k}"] = round((t2i_rank < k).float().mean().item(), 4)
    return out


# ---------------------------------------------------------------------------------------------
# the `retrieval` task on ShapeStories frames


def retrieval_frames(n: int, seed: int) -> list[Frame]:
    """``n`` random frames with distinct intro sentences, from ``random.Random(f"mmgen-retrieval/{seed}")``
    (a stream apart from training's and the other tasks')."""
    distinct = len(SHAPES) * len(SIZES) * len(COLOURS) * len(POSITIONS)
    if n > distinct:
        raise ValueError(f"retrieval: --n {n} is more than the {distinct} distinct ShapeStories sentences")
    rng = random.Random(f"mmgen-retrieval/{seed}")
    frames, seen = [], set()
    while len(frames) < n:
        frame = random_frame(rng)
        if intro_sentence(frame) not in seen:
            seen.add(intro_sentence(frame))
            frames.append(frame)
    return frames


@torch.no_grad()
def evaluate_retrieval(model, *, n: int = 64, seed: int = 0, batch_size: int = 32, progress=None) -> TaskResult:
    """Image→text and text→image recall@1 and @5 among ``n`` ShapeStories frames and their sentences.

    Images and sentences are embedded with the model's CosMo contrastive head
    (``embed_images_for_retrieval`` / ``embed_texts_for_retrieval``) and compared by cosine
    similarity. Returns a ``TaskResult`` whose samples are the frames, scored right when the
    image's best sentence is its own. Raises ``ValueError`` for a model without text-only layers.
    """
    model.require_contrastive()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    size = model.cfg.data.image_size
    frames = retrieval_frames(n, seed)
    images = [render_frame(f, size) for f in frames]
    sentences = [intro_sentence(f) for f in frames]
    image_emb, text_emb = [], []
    for i in range(0, n, batch_size):
        pixels = torch.stack([image_to_tensor(im, size) for im in images[i:i + batch_size]])  # (b, 3, S, S)
        image_emb.append(model.embed_images_for_retrieval(pixels).float().cpu())  # (b, E)
        text_emb.append(model.embed_texts_for_retrieval(sentences[i:i + batch_size]).float().cpu())  # (b, E)
        if progress is not None:
            progress(len(sentences[i:i + batch_size]))
    model.train(was_training)
    similarity = torch.cat(image_emb) @ torch.cat(text_emb).T  # (n, n) cosine: the embeddings are unit
    metrics = recall_at_k(similarity, (1, 5))
    best = similarity.argmax(1)  # (n,) each image's top sentence
    found = (similarity >= similarity.diagonal()[:, None]).sum(1) == 1  # (n,) i2t rank 1, as recall_at_k counts
    samples = [Sample("retrieval", f"retrieval-{i:04d}",
                      Document(f"retrieval-{i:04d}", [Segment("image", image=images[i]),
                                                      Segment("text", text=sentences[i])]),
                      frames[i].to_dict(), None, {"joint": bool(found[i])}, text=sentences[int(best[i])])
               for i in range(n)]
    return TaskResult("retrieval", metrics, samples, round(time.perf_counter() - t0, 2))
