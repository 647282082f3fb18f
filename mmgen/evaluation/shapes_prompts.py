"""The prompts of the ShapeStories evaluation tasks, ground truth in ``meta["shapes"]``."""

from __future__ import annotations

import random

from PIL import Image

from mmgen.data.documents import Document, Segment
from mmgen.data.shapes import (TASKS, Frame, _check_size, _truth, frame_sentence, intro_sentence, jpeg_round_trip,
                               random_frames, render_frame)


def eval_prompts(task: str, n: int, seed: int, size: int = 64, *, input_size: int | None = None,
                 jpeg: int | None = None) -> list[Document]:
    """``n`` prompts for one evaluation task, ground truth in ``meta["shapes"]``.

    The prompt's frames are drawn at ``input_size`` (default ``size``) and, with ``jpeg``, saved
    as JPEG at that quality and read back: frames as a user's files arrive. The prompts are the
    same whatever the frames' form.

    - ``t2i``: intro sentence, image placeholder; truth: frame 1 (background not scored).
    - ``caption``: image, text placeholder; truth: frame 1.
    - ``continuation``: intro, frame-1 image, change sentence, image placeholder; truth: both
      frames (frame 2 keeps frame 1's background).
    - ``story``: intro sentence only; truth: frame 1.
    - ``reintro``: intro, frame-1 image, the introduction of another object on the same
      background, image placeholder; truth: both frames. What the decoder does when the text
      starts a new object while the previous image shows another (does it copy the old one?).

    The generator is ``random.Random(f"mmgen-shapes-eval/{task}/{seed}")``, a stream apart
    from training's ``random.Random(seed)``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; expected one of {', '.join(TASKS)}")
    _check_size(size)
    rng = random.Random(f"mmgen-shapes-eval/{task}/{seed}")
    if input_size is not None:
        _check_size(input_size)

    def given(frame: Frame) -> Image.Image:
        drawn = render_frame(frame, input_size or size)
        return jpeg_round_trip(drawn, jpeg) if jpeg else drawn

    docs = []
    for i in range(n):
        frames, changes = random_frames(rng, 2 if task == "continuation" else 1)
        if task == "reintro":  # another object (every attribute drawn anew), the same background
            other = random_frames(rng, 1)[0][0]
            frames, changes = [frames[0], Frame(other.shape, other.colour, other.size, other.position,
                                                frames[0].background)], [None, None]
        intro = Segment("text", text=intro_sentence(frames[0]))
        if task == "t2i":
            segments = [intro, Segment("image")]
        elif task == "caption":
            segments = [Segment("image", image=given(frames[0])), Segment("text")]
        elif task in ("continuation", "reintro"):
            second = frame_sentence(frames, 1) if task == "continuation" else intro_sentence(frames[1])
            segments = [intro, Segment("image", image=given(frames[0])), Segment("text", text=second),
                        Segment("image")]
        else:
            segments = [intro]
        order = "image-text" if task == "caption" else "text-image"
        truth = _truth(frames, changes, size, task=task, order=order)
        docs.append(Document(f"{task}-{i:04d}", segments, meta={"shapes": truth}))
    return docs


