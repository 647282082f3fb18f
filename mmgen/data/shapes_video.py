"""ShapeStories as video: a story told in text and shown as one short clip.

A story's 2-4 states (the frames of :mod:`mmgen.data.shapes`) become one clip in which the
object slides between positions and morphs its size, colour and shape through in-between
frames; the background stays fixed. Every state is *held* long enough that both ways a
document can sample a video (docs/DOCUMENTS.md) land on it exactly:

- the clip has ``F`` frames per state (default 8) at 8 fps, ``N = n * F`` frames in all;
- frames ``k*F .. k*F + F//2`` show state ``k`` exactly as :func:`~mmgen.data.shapes.render_array`
  draws it; the remaining ``F - F//2 - 1`` frames move towards state ``k + 1`` (the last state
  is held to the end);
- so ``"frames": n`` (the centres of n equal parts: ``k*F + F//2``) and ``"fps": 8 / F``
  (``k*F``) both give the n states, and :func:`~mmgen.data.shapes_reader.read_image` reads them
  right. :func:`key_frame_indices` names the first kind.

In-between frames (ours, not part of the ShapeStories contract): with the eased fraction
``u = t * t * (3 - 2t)`` of the way from state k to k + 1, the centre and the half-extent
move linearly in ``u``, the colour blends in RGB, and the shape is the zero level of the blend
of the two shapes' gauge functions (1 on the outline, below 1 inside).

Documents: one text segment (the story's sentences, in order) and one video segment
(``frames: n``), in the order ``text-video`` (draw the clip from the story) or
``video-text`` (tell the story of the clip), each with p = 0.5; ground truth in
``meta["shapes"]`` as for ShapeStories, with ``order`` one of those two and a ``clip``
entry (``fps``, ``frames_per_state``, ``num_frames``, ``key_frames``). A given seed draws
the same stories as :func:`~mmgen.data.shapes.stream_stories`, only the order's names differ.

Files: MP4, H.264 via ``libx264rgb`` at ``qp 0`` (lossless, RGB kept as RGB, so decoded
frames equal the rendered ones bit for bit) and one encoder thread, so the same clip gives
the same bytes with the same PyAV/x264 build. Most web browsers do not play 4:4:4 H.264;
FFmpeg-based readers (decord, PyAV, torchvision, OpenCV) do.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from mmgen.data.documents import Document, Segment
from mmgen.data.media import frame_indices
from mmgen.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    Frame,
    _centre,
    _check_size,
    _truth,
    frame_sentence,
    half_extent,
    random_frames,
    render_array,
)

FPS = 8
FRAMES_PER_STATE = 8
ORDERS = ("text-video", "video-text")


# ---------------------------------------------------------------------------------------------
# the clip


def _check_frames_per_state(frames_per_state: int) -> None:
    if frames_per_state < 1:
        raise ValueError(f"frames_per_state must be at least 1, got {frames_per_state}")


def clip_length(num_states: int, frames_per_state: int = FRAMES_PER_STATE) -> int:
    """N, the frames of a clip of ``num_states`` states."""
    _check_frames_per_state(frames_per_state)
    return num_states * frames_per_state


def key_frame_indices(num_states: int, frames_per_state: int = FRAMES_PER_STATE) -> list[int]:
    """The frames that ``"frames": num_states`` samples: one per state, each the state exactly."""
    return frame_indices(clip_length(num_states, frames_per_state), frames=num_states)


def _hold(frames_per_state: int) -> int:
    """How many frames each state is held before moving on (covers k*F and k*F + F//2)."""
    return frames_per_state // 2 + 1


def _gauge(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    """(W, W): 1 on the outline of the shape of half-extent ``s``, below 1 inside (degree-1 homogeneous)."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) / s
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) / s
    # triangle: dy <= s and |dx| <= (dy + s) / 2, i.e. 2|dx| - dy <= s
    return np.maximum(dy, 2 * np.abs(dx) - dy) / s


def _between(a: Frame, b: Frame, t: float, size: int) -> np.ndarray:
    """(W, W, 3) uint8: the in-between frame a fraction ``t`` (0 < t < 1) of the way from a to b."""
    u = t * t * (3 - 2 * t)  # smoothstep: start and stop gently
    (ax, ay), (bx, by) = _centre(a.position, size), _centre(b.position, size)
    cx, cy = ax + u * (bx - ax), ay + u * (by - ay)
    sa = half_extent(a.shape, a.size, a.position, size)
    sb = half_extent(b.shape, b.size, b.position, size)
    s = sa + u * (sb - sa)
    c = np.arange(size, dtype=np.float64) + 0.5  # pixel centres
    dx, dy = c[None, :] - cx, c[:, None] - cy  # (1, W), (W, 1)
    gauge = (1 - u) * _gauge(a.shape, dx, dy, s) + u * _gauge(b.shape, dx, dy, s)  # (W, W)
    colour = (1 - u) * np.asarray(COLOURS[a.colour], float) + u * np.asarray(COLOURS[b.colour], float)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[a.background]
    img[gauge <= 1 + 1e-9] = np.round(colour).astype(np.uint8)
    return img


def render_clip(
    frames: Sequence[Frame],
    size: int = 64,
    *,
    frames_per_state: int = FRAMES_PER_STATE,
    indices: Iterable[int] | None = None,
) -> np.ndarray:
    """The story's clip as a (K, W, W, 3) uint8 array: every frame, or only ``indices``.

    Args:
        frames: the story's states, one background for all.
        indices: which of the ``N = len(frames) * frames_per_state`` frames to draw (default
            all, in order); held frames are exactly :func:`~mmgen.data.shapes.render_array`.
    """
    _check_size(size)
    if not frames:
        raise ValueError("a clip needs at least one state")
    if len({f.background for f in frames}) != 1:
        raise ValueError("the background must stay the same within a story")
    n, per = len(frames), frames_per_state
    total = clip_length(n, per)
    hold = _hold(per)
    keys: dict[int, np.ndarray] = {}  # each state is drawn once
    out = []
    for i in range(total) if indices is None else indices:
        if not 0 <= i < total:
            raise ValueError(f"frame {i} is outside the clip's {total} frames")
        k, j = divmod(i, per)
        if k == n - 1 or j < hold:
            if k not in keys:
                keys[k] = render_array(frames[k], size)
            out.append(keys[k])
        else:
            out.append(_between(frames[k], frames[k + 1], (j - hold + 1) / (per - hold + 1), size))
    return np.stack(out) if out else np.zeros((0, size, size, 3), dtype=np.uint8)


def write_mp4(clip: np.ndarray, dest: str | Path | IO[bytes], *, fps: int = FPS) -> None:
    """Encode a (N, H, W, 3) uint8 clip as lossless H.264 MP4 (see the module docstring)."""
    import av  # imported here: only writing videos needs it

    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or len(clip) == 0:
        raise ValueError(f"expected a non-empty (N, H, W, 3) uint8 clip, got {clip.dtype} {clip.shape}")
    target = str(dest) if isinstance(dest, (str, Path)) else dest
    with av.open(target, "w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "rgb24"
        stream.thread_count = 1  # same bytes on every run
        stream.options = {"qp": "0", "preset": "veryslow"}  # lossless; slow is still fast at 64 px
        for array in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------
# documents


def _clip_meta(num_states: int, frames_per_state: int, fps: int) -> dict[str, Any]:
    return {"fps": fps, "frames_per_state": frames_per_state,
            "num_frames": clip_length(num_states, frames_per_state),
            "key_frames": key_frame_indices(num_states, frames_per_state)}


def make_video_story(
    rng: random.Random,
    *,
    size: int = 64,
    story_id: str,
    frames_per_state: int = FRAMES_PER_STATE,
    fps: int = FPS,
) -> Document:
    """One story as text and a clip; the video segment holds its n key frames in memory.

    The segment is ``Segment("video", frames=n, image=[n PIL images])``: what reading the
    clip's MP4 with ``frames: n`` gives, drawn without encoding anything. Draws from ``rng``
    exactly as :func:`~mmgen.data.shapes.make_story` does, so a seed tells the same stories.
    """
    _check_size(size)
    n = rng.randint(2, 4)
    order = rng.choice(ORDERS)
    frames, changes = random_frames(rng, n)
    text = Segment("text", text=" ".join(frame_sentence(frames, k) for k in range(n)))
    keys = render_clip(frames, size, frames_per_state=frames_per_state,
                       indices=key_frame_indices(n, frames_per_state))
    video = Segment("video", frames=n, image=[Image.fromarray(a, mode="RGB") for a in keys])
    truth = _truth(frames, changes, size, order=order, clip=_clip_meta(n, frames_per_state, fps))
    segments = [text, video] if order == "text-video" else [video, text]
    return Document(story_id, segments, meta={"kind": "story", "shapes": truth})


def stream_video_stories(seed: int, size: int = 64, *, prefix: str = "story",
                         frames_per_state: int = FRAMES_PER_STATE, fps: int = FPS) -> Iterator[Document]:
    """An endless, deterministic stream of video stories with ids ``{prefix}-{i:06d}``."""
    rng = random.Random(seed)
    for i in itertools.count():
        yield make_video_story(rng, size=size, story_id=f"{prefix}-{i:06d}",
                               frames_per_state=frames_per_state, fps=fps)


def story_clip(doc: Document) -> np.ndarray:
    """The full (N, W, W, 3) clip of a video story, redrawn from its ``meta["shapes"]``."""
    truth = doc.meta["shapes"]
    frames = [Frame.from_dict(f) for f in truth["frames"]]
    return render_clip(frames, truth["image_size"], frames_per_state=truth["clip"]["frames_per_state"])


def save_video_documents(
    docs: Iterable[Document],
    out_dir: str | Path,
    *,
    filename: str = "documents.jsonl",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write video stories as JSONL in ``out_dir``, each clip as ``videos/{id}.mp4``.

    Clips are redrawn from each document's ground truth (:func:`story_clip`); paths are
    relative to ``out_dir``. The documents are not modified. Returns the JSONL path.
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    path = out / filename
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, doc in enumerate(docs):
            record = doc.to_json()
            for k, seg in enumerate(doc.segments):
                if seg.type == "video" and seg.image is not None:
                    rel = f"videos/{doc.id}.mp4"
                    write_mp4(story_clip(doc), out / rel, fps=doc.meta["shapes"]["clip"]["fps"])
                    record["segments"][k] = {"type": "video", "path": rel, "frames": seg.frames}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress(i + 1)
    return path


def write_video_corpus(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 64,
    *,
    frames_per_state: int = FRAMES_PER_STATE,
    fps: int = FPS,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the first ``n`` stories of :func:`stream_video_stories` to ``out_dir``.

    Writes ``out_dir/documents.jsonl`` and ``out_dir/videos/{id}.mp4``; the same arguments
    give byte-identical files (with the same PyAV/x264 build). Returns the JSONL path.
    """
    docs = itertools.islice(stream_video_stories(seed, size, frames_per_state=frames_per_state, fps=fps), n)
    report = None if progress is None else (lambda done: progress(done, n))
    return save_video_documents(docs, out_dir, progress=report)
