"""The story studio's engine: one model in memory, one queue, one document generated at a time.

A request becomes a :class:`Job`. Jobs wait in a bounded line (a full line is refused, so a
flood of requests cannot grow memory); one worker thread takes them in order, streams every
segment as the generator makes it (``Job.events``), then writes the finished document as the
usual folder ``OUT/<job id>/`` (document.json, index.html, story.md, images/) whose files the
server serves under ``/files/<job id>/...``.

Request bodies (the JSON API and the page send the same thing)::

    {"prompt": "A small red circle is on the left."      # a sentence, or a document:
               | {"segments": [{"type": "image", "data": "data:image/png;base64,..."},
                               {"type": "text", "text": "The circle turns blue."}, {"type": "image"}]},
     "image": "data:image/png;base64,...",                # optional: a picture before the text
     "max_images": 3, "seed": 1, "sampler": "dpm++", "steps": 20, "guidance": 2.5,
     "temperature": 1.0, "top_p": 0.9, "min_images": 3, "max_new_tokens": 128, "kind": "story"}

Pictures travel as data URLs: the server never opens a path a request names.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.documents import Document, DocumentError, Segment, document_from_json

MAX_PROMPT_CHARS = 4000  # the bundled model's context holds ~2,000 characters of text
MAX_IMAGE_BYTES = 4 * 2**20
MAX_IMAGE_SIDE = 4096
SEED_ID = "prompt-0000"
MAX_WAITING = 8  # requests in line behind the running one; more are refused (429)
KEEP_FINISHED = 64  # finished jobs remembered for their event streams; their folders stay on disk
# setting -> (type, lowest, highest)
LIMITS: dict[str, tuple[type, float, float]] = {
    "max_images": (int, 0, 8), "min_images": (int, 0, 8), "max_new_tokens": (int, 1, 512), "seed": (int, 0, 2**63 - 1),
    "steps": (int, 1, 250), "guidance": (float, 0.0, 30.0), "temperature": (float, 0.0, 5.0),
    "top_p": (float, 0.0, 1.0),
}


class RequestError(ValueError):
    """A request the server refuses: a one-line message and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    prompt: Document
    settings: Any  # the GenerateConfig it runs with
    events: list[dict[str, Any]] = field(default_factory=list)  # {"event": name, "data": {...}}, in order
    state: str = "queued"  # queued | running | done | failed
    document: dict[str, Any] | None = None  # the finished document (our format), image segments with `url`
    error: str | None = None
    submitted: float = field(default_factory=time.time)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


def decode_image(data: object, what: str):
    """A PIL image from a ``data:image/...;base64,`` URL (or bare base64); RequestError if it is not one."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise RequestError(f"{what}: a picture must be a data URL (data:image/png;base64,...)")
    payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise RequestError(f"{what}: the picture is over {MAX_IMAGE_BYTES // 2**20} MB", 413)
    try:
        raw = base64.b64decode(payload, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64 data") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(f"{what}: not an image this server can read (PNG, JPEG, GIF, WebP, BMP)") from None
    if max(image.size) > MAX_IMAGE_SIDE:
        raise RequestError(f"{what}: the picture is {image.size[0]}x{image.size[1]}; the most is "
                           f"{MAX_IMAGE_SIDE} px a side", 413)
    return image.convert("RGB")


def parse_prompt(body: dict[str, Any], job_id: str) -> Document:
    """The prompt of a request body as a :class:`Document` (RequestError on anything wrong)."""
    prompt, picture = body.get("prompt"), body.get("image")
    if isinstance(prompt, str):
        text = prompt.strip()
        if not text and picture is None:
            raise RequestError("the prompt is empty: type a sentence, e.g. \"A small red circle is on the left.\"")
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(f"the prompt is {len(text)} characters; the most is {MAX_PROMPT_CHARS}", 413)
        segments = [Segment("text", text=text)] if text else []
        doc = Document(job_id, segments, origin="request")
    elif isinstance(prompt, dict):
        doc = _document_prompt(prompt, job_id)
    elif prompt is None and picture is not None:
        doc = Document(job_id, [], origin="request")
    else:
        raise RequestError('"prompt" must be a sentence or a document ({"segments": [...]})')
    if picture is not None:
        doc.segments.insert(0, Segment("image", image=decode_image(picture, '"image"')))
    return doc


def _document_prompt(obj: dict[str, Any], job_id: str) -> Document:
    segments = obj.get("segments")
    if not isinstance(segments, list) or not segments:
        raise RequestError('"prompt": a document needs a non-empty "segments" list')
    pictures: dict[int, Any] = {}
    plain = []
    for k, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise RequestError(f'"prompt" segment {k + 1}: must be an object')
        if "path" in seg:
            raise RequestError(f'"prompt" segment {k + 1}: the server opens no paths; send the picture as '
                               '"data" (a data URL)')
        seg = dict(seg)
        if "data" in seg:
            pictures[k] = decode_image(seg.pop("data"), f'"prompt" segment {k + 1}')
        plain.append(seg)
    text = sum(len(s.get("text") or "") for s in plain if isinstance(s.get("text"), str))
    if text > MAX_PROMPT_CHARS:
        raise RequestError(f"the prompt's text is {text} characters; the most is {MAX_PROMPT_CHARS}", 413)
    try:
        doc = document_from_json({"id": job_id, "segments": plain, "meta": obj.get("meta", {})},
                                 file="request", line=0, default_id=job_id)
    except DocumentError as e:
        raise RequestError(f'"prompt": {e.message}') from None
    for k, image in pictures.items():
        if doc.segments[k].type != "image":
            raise RequestError(f'"prompt" segment {k + 1}: "data" belongs to an image segment')
        doc.segments[k].image = image
    doc.id, doc.origin = job_id, "request"
    return doc


def parse_settings(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings a request gives, numbers checked against :data:`LIMITS`."""
    settings: dict[str, Any] = {}
    for key, (kind, low, high) in LIMITS.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise RequestError(f'"{key}" must be {"an integer" if kind is int else "a number"}')
        if not low <= value <= high:
            raise RequestError(f'"{key}" is {value}; it must be between {low} and {high}')
        settings[key] = kind(value)
    if settings.get("top_p") == 0:
        raise RequestError('"top_p" must be above 0')
    for key in ("sampler", "kind"):  # names in a registry: Studio.submit checks them with the model's settings
        value = body.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise RequestError(f'"{key}" must be a name (a string)')
            settings[key] = value
    return settings


class Studio:
    """The model, the line of waiting jobs and the worker that runs them one at a time."""

    def __init__(self, model, checkpoint: Path, out: Path, *, max_waiting: int = MAX_WAITING):
        from ..generation.generator import Generator

        self.model, self.checkpoint, self.out = model, checkpoint, out
        self.generator = Generator(model, checkpoint=str(checkpoint))
        self.max_waiting = max_waiting
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.line: deque[Job] = deque()
        self.cond = threading.Condition()
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._stamp = time.strftime("%Y%m%d-%H%M%S")
        self.worker = threading.Thread(target=self._work, name="mmgen-studio", daemon=True)
        self.worker.start()

    def defaults(self) -> dict[str, Any]:
        from ..models.samplers import SAMPLERS

        g = self.model.cfg.generate
        from ..data.kinds import KINDS

        return {"defaults": {k: getattr(g, k) for k in ("sampler", "steps", "guidance", "temperature", "top_p",
                                                         "max_images", "min_images", "max_new_tokens", "seed", "kind")},
                "samplers": list(SAMPLERS), "kinds": list(KINDS),
                "limits": {k: [lo, hi] for k, (_, lo, hi) in LIMITS.items()},
                "checkpoint": str(self.checkpoint), "max_prompt_chars": MAX_PROMPT_CHARS}

    def submit(self, body: object) -> Job:
        """Check a request and put it in line; RequestError (with its HTTP status) if refused."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(body) - {"prompt", "image", "sampler", "kind", *LIMITS})
        if unknown:
            raise RequestError(f"unknown field(s): {', '.join(unknown)}")
        from ..generation.api import GenerationError, make_settings

        try:  # the model's generate settings with the request's; unknown sampler or kind names refused here
            settings = make_settings(self.model, parse_settings(body))
        except GenerationError as e:
            raise RequestError(str(e)) from None
        with self.cond:
            job_id = f"{self._stamp}-{next(self._ids):04d}"
        # the prompt's id seeds its sampling: the one `mmgen generate --prompt` and `mmgen.generate` give
        # their first prompt, so that a request, the CLI and the Python API agree for the same seed
        job = Job(job_id, parse_prompt(body, SEED_ID), settings)
        with self.cond:
            if len(self.line) >= self.max_waiting:
                raise RequestError(f"the line is full ({len(self.line)} requests waiting); try again shortly", 429)
            self.line.append(job)
            self.jobs[job.id] = job
            self._forget_old()
            self.cond.notify_all()
        return job

    def position(self, job: Job) -> int:
        """How many requests are ahead of ``job`` (0 while it runs or once it is finished)."""
        with self.cond:
            return self.line.index(job) + (1 if self._running else 0) if job in self.line else 0

    def _forget_old(self) -> None:
        finished = [k for k, j in self.jobs.items() if j.finished]
        for key in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[key]

    def _emit(self, job: Job, event: str, data: dict[str, Any]) -> None:
        with self.cond:
            job.events.append({"event": event, "data": data})
            self.cond.notify_all()

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.line:
                    self.cond.wait()
                job = self.line.popleft()
                self._running, job.state = job, "running"
            self._emit(job, "started", {"id": job.id})
            try:
                self._run(job)
            except Exception as e:  # a failed request must not stop the server
                job.error = f"generation failed: {e}"
                self._emit(job, "failed", {"message": job.error})
                job.state = "failed"  # after the event: a stream that sees the state has the event too
            finally:
                with self.cond:
                    self._running = None
                    self.cond.notify_all()

    def _run(self, job: Job) -> None:
        import json

        from ..generation.output import write_document

        counter = itertools.count(1)

        def on_segment(_: int, seg: Segment) -> None:
            data: dict[str, Any] = {"type": seg.type, "source": seg.source}
            if seg.type == "text":
                data["text"] = seg.text
            else:
                buf = io.BytesIO()
                seg.image.save(buf, format="PNG")
                data["index"] = next(counter)
                data["data"] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            self._emit(job, "segment", data)

        result = None
        for _, result in self.generator.generate([job.prompt], job.settings, on_segment=on_segment):
            pass
        if isinstance(result, Exception):
            raise result
        folder = self.out / job.id
        result.id = job.id
        write_document(result, folder)
        record = json.loads((folder / "document.json").read_text(encoding="utf-8"))
        for seg in record["segments"]:
            if seg.get("path"):
                seg["url"] = f"/files/{job.id}/{seg['path']}"
        record["meta"]["folder"] = str(folder)
        record["meta"]["page"] = f"/files/{job.id}/index.html"
        job.document = record
        self._emit(job, "done", {"document": record})
        job.state = "done"
