"""Generation from code and from prompt files.

    from mmgen import generate
    docs = generate(["A large red circle is in the top left."], max_images=3, seed=1)
    docs[0].segments  # text and PIL images, each marked "prompt" or "generated"

``generate_files`` is what ``mmgen generate`` runs: prompts from files, results written as
they finish (a crash or a broken prompt never loses the others), a summary of what failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.documents import Document, DocumentError, Segment, read_prompts
from ..models.samplers import SAMPLERS, unknown_sampler
from .output import OutputError, Written, prepare_out_dir, unique_folder, write_document, write_run_index

BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[2] / "examples" / "checkpoints" / "shapes-tiny"


class GenerationError(RuntimeError):
    """Generation cannot start (bad checkpoint, settings, output folder or prompt files)."""


@dataclass
class Report:
    written: list[Written] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise GenerationError(f"unknown device {device!r} (cpu, cuda, cuda:N, mps or auto)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def model_folder(checkpoint: str | Path) -> Path:
    """A model folder from a model folder, a ``RUN/step-NNNNNN`` checkpoint or a run folder."""
    path = Path(checkpoint)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "model" / "model.safetensors").is_file():
        return path / "model"
    from ..training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        return latest / "model"
    if not path.exists():
        raise GenerationError(f"{path}: no such checkpoint folder")
    raise GenerationError(f"{path}: not a model folder (no model.safetensors), checkpoint or run folder")


def load_model(checkpoint: str | Path = BUNDLED_CHECKPOINT, device: str = "auto", *, low_memory: bool = False):
    """The model of a model, checkpoint or run folder, and that model folder; ``low_memory``: in bfloat16."""
    from ..models.mm_interleaved import MMInterleaved
    from ..oom import generation_oom, is_oom

    folder = model_folder(checkpoint)
    try:
        return MMInterleaved.from_pretrained(folder, device=resolve_device(device), low_memory=low_memory), folder
    except (FileNotFoundError, ValueError, OSError) as e:
        raise GenerationError(f"cannot load the model from {folder}: {e}") from None
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e):
            raise
        raise GenerationError(generation_oom(e, f"loading the model from {folder}")) from None


def _check_names(settings: Any) -> None:
    """Refuse a sampler or document kind that is not registered (``mmgen/models/samplers.py``,
    ``mmgen/data/kinds.py``); unset ones are the config's."""
    from ..data.kinds import KINDS, unknown_kind

    get = settings.get if isinstance(settings, dict) else lambda key: getattr(settings, key)
    if get("sampler") is not None and get("sampler") not in SAMPLERS:
        raise GenerationError(unknown_sampler(get("sampler")))
    if get("kind") and get("kind") not in KINDS:
        raise GenerationError(unknown_kind(get("kind")))


def make_settings(model, overrides: dict[str, Any]):
    from .generator import settings_from

    settings = settings_from(model.cfg.generate, **overrides)
    _check_names(settings)
    return settings


def generate(prompts: Iterable[str | Document], *, checkpoint: str | Path = BUNDLED_CHECKPOINT,
             device: str = "auto", model=None, **settings: Any) -> list[Document]:
    """Generate one document per prompt (a string or a :class:`Document`); raises on a bad prompt.

    Settings are those of ``mmgen generate`` (sampler, steps, guidance, temperature, top_p,
    max_images, min_images, max_new_tokens, batch_size, seed); unset ones come from the checkpoint's config.
    """
    from .generator import Generator

    _check_names(settings)
    docs = [p if isinstance(p, Document) else Document(f"prompt-{i:04d}", [Segment("text", text=p)])
            for i, p in enumerate(prompts)]
    if model is None:
        model, folder = load_model(checkpoint, device)
    else:
        folder = checkpoint
    gen = Generator(model, checkpoint=str(folder))
    results: list[Document | None] = [None] * len(docs)
    for i, doc in gen.generate(docs, make_settings(model, settings)):
        if isinstance(doc, Exception):
            raise doc
        results[i] = doc
    return results  # type: ignore[return-value]


def read_prompt_files(files: Iterable[Path]) -> tuple[list[Document], list[str]]:
    prompts: list[Document] = []
    problems: list[str] = []
    for f in files:
        docs, errors = read_prompts(f)
        problems += [str(e) for e in errors]
        prompts += docs
    return prompts, problems


def command_line_prompts(texts: list[str], images: list[Path]) -> list[Document]:
    """Documents from ``--prompt`` and ``--image`` (``prompt-0000``, ...).

    Prompts alone: one document per sentence. Pictures alone: one document per picture, which
    the model captions and continues. Both: document k is picture k then sentence k (one
    picture may serve every sentence).
    """
    for text in texts:
        if not text.strip():
            raise GenerationError('--prompt: an empty prompt; give a sentence, e.g. '
                                  '--prompt "A small red circle is on the left."')
    for path in images:
        if not Path(path).is_file():
            raise GenerationError(f"--image {path}: no such file")
    if texts and images and len(images) not in (1, len(texts)):
        raise GenerationError(f"{len(images)} --image for {len(texts)} --prompt: give one picture, or one per prompt")
    if texts and images:
        pictures = list(images) * len(texts) if len(images) == 1 else list(images)
        parts = [[Segment("image", path=str(Path(p).resolve())), Segment("text", text=t.strip())]
                 for p, t in zip(pictures, texts)]
    else:
        parts = [[Segment("text", text=t.strip())] for t in texts]
        parts += [[Segment("image", path=str(Path(p).resolve()))] for p in images]
    return [Document(f"prompt-{k:04d}", segs, origin=f"--prompt {k + 1}" if texts else f"--image {k + 1}")
            for k, segs in enumerate(parts)]


def generate_files(files: list[Path], out: Path, *, checkpoint: str | Path = BUNDLED_CHECKPOINT,
                   device: str = "auto", overwrite: bool = False, settings: dict[str, Any] | None = None,
                   progress: bool = False, prompts: list[Document] | None = None, low_memory: bool = False) -> Report:
    """Generate every prompt of ``files`` (then ``prompts``) into ``out``; say what was written and what failed."""
    from .generator import Generator

    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    _check_names(settings)
    report = Report()
    from_files, problems = read_prompt_files(files)
    prompts = from_files + list(prompts or [])
    report.failed += problems
    if not prompts:
        raise GenerationError("no prompts to generate" + (":\n  " + "\n  ".join(problems) if problems else ""))
    try:
        prepare_out_dir(out, overwrite=overwrite)
    except OutputError as e:
        raise GenerationError(str(e)) from None
    model, folder = load_model(checkpoint, device, low_memory=low_memory)
    s = make_settings(model, settings)
    taken: set[str] = set()
    position: dict[Path, int] = {}  # output folder -> its prompt's index
    total_images = sum(s.max_images if not any(seg.is_placeholder for seg in p.segments)
                       else sum(seg.is_placeholder and seg.type == "image" for seg in p.segments) for p in prompts)
    with _progress(progress, len(prompts), total_images) as (on_doc, on_image):
        for i, result in Generator(model, checkpoint=str(folder)).generate(prompts, s, on_image=on_image):
            prompt = prompts[i]
            where = prompt.origin or prompt.id
            if isinstance(result, Exception):
                report.failed.append(str(result) if isinstance(result, DocumentError) else f"{where}: {result}")
            else:
                try:
                    _, target = unique_folder(out, result.id, taken)
                    report.written.append(write_document(result, target))
                    position[target] = i
                except OutputError as e:
                    report.failed.append(f"{where}: {e}")
            on_doc()
    report.written.sort(key=lambda w: position[w.folder])  # prompt order, not completion order
    try:
        write_run_index(out, report.written, report.failed)
    except OutputError as e:
        report.failed.append(str(e))
    return report


class _progress:
    """A rich progress bar over documents and images (a no-op when ``enabled`` is False)."""

    def __init__(self, enabled: bool, documents: int, images: int):
        self.enabled, self.documents, self.images = enabled, documents, images

    def __enter__(self):
        if not self.enabled:
            return (lambda: None), (lambda: None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar.__enter__()
        docs = self.bar.add_task("documents", total=self.documents)
        imgs = self.bar.add_task("images   ", total=self.images or None)
        return (lambda: self.bar.advance(docs)), (lambda: self.bar.advance(imgs))

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


__all__ = ["generate", "generate_files", "load_model", "GenerationError", "Report", "BUNDLED_CHECKPOINT"]
