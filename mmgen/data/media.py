"""Images and video frames that documents point to.

Every failure is a :class:`DocumentError` that says which file (and, inside a document,
which line and segment) and what is wrong, never a traceback from PIL or decord. decord is
imported only when a video is read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from PIL import Image

from mmgen.data.documents import MAX_FRAMES, Document, DocumentError, file_problem


class _MediaError(Exception):
    """What is wrong with one media file, without its path (callers add the location)."""


def _shown_path(path: Path) -> str:
    """``path`` for a one-line message: control characters escaped, a huge one cut short."""
    text = str(path)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 300 else f"{text[:200]}...{text[-97:]}"


def _open_image(path: Path, *, convert: bool = True) -> Image.Image:
    problem = file_problem(path)
    if problem:
        raise _MediaError(f"image {problem}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB") if convert else im
    except Image.UnidentifiedImageError:
        raise _MediaError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise _MediaError("image too large (over PIL's decompression-bomb limit)") from None
    except Exception as e:  # PIL raises many kinds for damaged files
        raise _MediaError(f"corrupt image ({e})") from None


_DECORD_NOISE = re.compile(r"\[\d{2}:\d{2}:\d{2}\]\s*|\S+\.(?:cc|cpp|h):\d+:\s*")


def _decord_reason(e: Exception) -> str:
    """decord's message on one line, without its clock time and C++ source locations (the same
    problem reads the same at every call), at most 200 characters."""
    return _DECORD_NOISE.sub("", " ".join(str(e).split()))[:200]


def _open_video(path: Path) -> Any:
    problem = file_problem(path)
    if problem:
        raise _MediaError(f"video {problem}")
    try:
        import decord
    except ImportError:
        raise _MediaError("cannot read videos: decord is not installed") from None
    decord.logging.set_level(decord.logging.QUIET)  # problems come back as our messages instead
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception as e:
        text = _decord_reason(e)
        reason = text.rsplit(", ", 1)[-1] if "ERROR opening" in text else text
        raise _MediaError(f"decord cannot open the video ({reason})") from None
    if len(reader) == 0:
        raise _MediaError("video has no frames")
    return reader


def frame_indices(num_frames: int, *, frames: int | None = None, fps: float | None = None,
                  video_fps: float | None = None, default_frames: int = 4) -> list[int]:
    """Which frames of a ``num_frames``-frame video to sample.

    Without ``fps``: ``frames`` (else ``default_frames``) evenly spaced frames, the middle
    of each of that many equal parts, never more than the video has. With ``fps``: one
    frame every ``1/fps`` seconds from the start (at most every frame), using the video's
    own ``video_fps``; ``frames`` then caps the count. Never more than ``MAX_FRAMES``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    want = frames if frames is not None else default_frames
    if want < 1:
        raise ValueError(f"frames must be at least 1, got {want}")
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be above 0, got {fps}")
        if video_fps is None or not math.isfinite(video_fps) or video_fps <= 0:
            raise ValueError("the video reports no frame rate; give `frames` instead of `fps`")
        step = max(video_fps / fps, 1.0)  # source frames per sample
        count = min(int((num_frames - 1) / step) + 1, frames or MAX_FRAMES, MAX_FRAMES)
        return [min(int(i * step), num_frames - 1) for i in range(count)]
    k = min(want, num_frames, MAX_FRAMES)
    return [(2 * i + 1) * num_frames // (2 * k) for i in range(k)]  # (k,) centres of k parts


def _video_frames(path: Path, frames: int | None, fps: float | None,
                  default_frames: int) -> list[Image.Image]:
    reader = _open_video(path)
    try:
        indices = frame_indices(len(reader), frames=frames, fps=fps,
                                video_fps=reader.get_avg_fps(), default_frames=default_frames)
    except ValueError as e:
        raise _MediaError(str(e)) from None
    try:
        batch = reader.get_batch(indices)
        arrays = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()  # (K, H, W, 3)
    except Exception as e:
        try:  # decord 0.6 fails batches at some widths (48, 72 px): read frame by frame instead
            arrays = [_unpad(reader[i]) for i in indices]
        except Exception:
            raise _MediaError(f"decord cannot decode the video frames ({_decord_reason(e)})") from None
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def _unpad(frame: Any) -> Any:
    """One decord frame as (H, W, 3), undoing decord 0.6's padded rows at some widths.

    There decord hands back the H rows of the padded buffer (e.g. 192 bytes for 48 px) as a
    (H, W, 4) array; the first 3 W bytes of each row are the pixels.
    """
    a = frame.asnumpy() if hasattr(frame, "asnumpy") else frame.numpy()  # (H, W, C)
    h, w = a.shape[:2]
    if a.ndim == 3 and a.shape[2] != 3 and a.size // h > 3 * w:
        a = a.reshape(h, -1)[:, : 3 * w].reshape(h, w, 3)  # (H, W, 3)
    return a


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB; :class:`DocumentError` if missing, a folder or corrupt."""
    try:
        return _open_image(Path(path))
    except _MediaError as e:
        raise DocumentError(path, 0, str(e)) from None


def load_video_frames(path: str | Path, frames: int | None = None, fps: float | None = None,
                      default_frames: int = 4) -> list[Image.Image]:
    """Sample RGB frames from a video with decord (see :func:`frame_indices` for which)."""
    try:
        return _video_frames(Path(path), frames, fps, default_frames)
    except _MediaError as e:
        raise DocumentError(path, 0, str(e)) from None


def document_images(doc: Document, *, default_frames: int = 4) -> list[Image.Image]:
    """Every image of ``doc`` in order; a video segment gives its sampled frames.

    A segment's in-memory ``image`` is used when set, else its ``path`` (resolved with
    ``doc.resolve``) is loaded. Placeholders are skipped. Raises :class:`DocumentError` at
    ``doc.origin`` naming the segment, the file and the problem.
    """
    images: list[Image.Image] = []
    for i, seg in enumerate(doc.segments, 1):
        if seg.type == "text":
            continue
        if seg.image is not None:
            images.extend(seg.image if isinstance(seg.image, (list, tuple)) else [seg.image])
            continue
        if seg.path is None:
            continue  # placeholder
        path = doc.resolve(seg.path)
        try:
            if seg.type == "image":
                images.append(_open_image(path))
            else:
                images.extend(_video_frames(path, seg.frames, seg.fps, default_frames))
        except _MediaError as e:
            raise doc.error(f"segment {i}: {e}: {_shown_path(path)}") from None
    return images


def media_problem(kind: str, path: Path) -> str | None:
    """What is wrong with the ``kind`` ("image" or "video") file at ``path``, or None.

    Images are fully decoded; videos must open with decord. Never raises.
    """
    try:
        if kind == "image":
            _open_image(path, convert=False)
        elif kind == "video":
            _open_video(path)
    except _MediaError as e:
        return f"{e}: {_shown_path(path)}"
    except Exception as e:
        return f"cannot check {kind} ({type(e).__name__}: {e}): {_shown_path(path)}"
    return None
