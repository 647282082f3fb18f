"""In-context abilities without gradient updates (Kosmos-1 / Flamingo style).

- ``zeroshot``: classification by likelihood. For a rendered frame, the candidate captions
  differ in one attribute (the 6 colours, or the 3 shapes) and agree with the truth in the
  others; the model's choice is the caption it finds most likely after the image.
- ``fewshot``: captioning with k ∈ {0, 1, 2, 4} (image, caption) examples of other frames
  placed before the query image in the same document; the generated caption is parsed and
  scored jointly.
"""

from __future__ import annotations

import random

import torch

from ..data.collate import IGNORE, Collator
from ..data.documents import Document, Segment
from ..data.shapes import COLOURS, SHAPES, Frame, intro_sentence, random_frame, render_frame
from .shapes_eval import score_caption


@torch.no_grad()
def document_logprobs(model, docs: list[Document]) -> list[float]:
    """Sum of the log-probabilities of every labelled token of each document."""
    collator = Collator(model.tokenizer, model.cfg)
    out: list[float] = []
    for doc in docs:
        batch = collator([doc]).to(model.device)
        has_images = batch.num_images > 0
        image_embeds, maps = model.encode_images(batch.images) if has_images else (None, [])
        embeds = model.embed(batch.input_ids, image_embeds, batch.image_row, batch.image_positions)
        features = model.row_features(maps, batch.row_images) if has_images else None
        res = model.llm(inputs_embeds=embeds, segment_ids=batch.segment_ids, position_ids=batch.position_ids,
                        image_features=features, visible=batch.visible if has_images else None)
        logp = torch.log_softmax(res.logits[:, :-1].float(), dim=-1)  # (1, T-1, V)
        labels = batch.labels[:, 1:]  # (1, T-1)
        keep = labels != IGNORE
        picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (1, T-1)
        out.append(float(picked[keep].sum()))
    return out


def zeroshot(model, *, n: int = 32, seed: int = 0) -> dict[str, float]:
    """Accuracy of choosing the right colour (6-way) and shape (3-way) by likelihood."""
    rng = random.Random(f"mmgen-zeroshot/{seed}")
    size = model.cfg.data.image_size
    right = {"colour": 0, "shape": 0}
    for _ in range(n):
        frame = random_frame(rng)
        image = render_frame(frame, size)
        for attr, values in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
            candidates = [Frame(**{**frame.to_dict(), attr: v}) for v in values]
            docs = [Document("z", [Segment("image", image=image), Segment("text", text=intro_sentence(c))])
                    for c in candidates]
            scores = document_logprobs(model, docs)
            right[attr] += values[max(range(len(values)), key=scores.__getitem__)] == getattr(frame, attr)
    return {f"{k}_accuracy": round(v / n, 4) for k, v in right.items()}


def fewshot(model, *, shots: tuple[int, ...] = (0, 1, 2, 4), n: int = 32, seed: int = 0,
            settings: dict | None = None) -> dict[str, float]:
    """Joint caption accuracy with k examples in context, for each k."""
    from ..generation.api import make_settings
    from ..generation.generator import Generator

    s = make_settings(model, {"temperature": 0.0, "max_new_tokens": 24, **(settings or {})})
    gen = Generator(model)
    size = model.cfg.data.image_size
    result = {}
    for k in shots:
        rng = random.Random(f"mmgen-fewshot/{seed}")
        prompts, truths = [], []
        for i in range(n):
            examples = [random_frame(rng) for _ in range(k)]
            query = random_frame(rng)
            segments = []
            for e in examples:
                segments += [Segment("image", image=render_frame(e, size)), Segment("text", text=intro_sentence(e))]
            segments += [Segment("image", image=render_frame(query, size)), Segment("text")]
            prompts.append(Document(f"fewshot-{k}-{i:04d}", segments))
            truths.append({"frames": [query.to_dict()]})
        joint = []
        for i, doc in gen.generate(prompts, s):
            if isinstance(doc, Exception):
                raise doc
            joint.append(score_caption(doc, truths[i]).scores["joint"])
        result[f"caption_joint_{k}shot"] = round(sum(joint) / len(joint), 4)
    return result


IN_CONTEXT = ("zeroshot", "fewshot")


def evaluate_in_context(model, tasks: list[str], *, n: int, seed: int, settings: dict | None = None) -> dict:
    """Run the in-context tasks named in ``tasks``; results shaped like ``evaluate``'s."""
    import time

    from .shapes_eval import TaskResult

    out = {}
    for task in tasks:
        t0 = time.perf_counter()
        metrics = zeroshot(model, n=n, seed=seed) if task == "zeroshot" else \
            fewshot(model, n=n, seed=seed, settings={k: v for k, v in (settings or {}).items() if k != "temperature"})
        out[task] = TaskResult(task, metrics, [], round(time.perf_counter() - t0, 2))
    return out
