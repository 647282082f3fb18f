"""The `mmgen` command line: a thin typer app over the library.

Every command is a plain function with a typed signature; the work happens in `mmgen`.
Heavy imports (torch, transformers, diffusers) happen inside the commands, never at start-up,
so `mmgen --help` answers at once.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mmgen.data.corpora import known_kinds  # the registry of source kinds: no torch, no pyarrow
from mmgen.data.kinds import KINDS  # a light module too
from mmgen.models.samplers import SAMPLERS  # a light module: no torch, no diffusers

app = typer.Typer(
    name="mmgen",
    help="Train and run MM-Interleaved-style models that write illustrated documents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make, check and inspect interleaved-document corpora.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and check configs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")



@app.callback()
def _root(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also show library warnings, load reports and info logs (give it before the "
                                "command: mmgen --verbose generate ...).")] = False) -> None:
    """Train and run MM-Interleaved-style models that write illustrated documents."""
    _configure_output(verbose)


def _configure_output(verbose: bool) -> None:
    """The one place where library noise is filtered: warnings, HF load reports and download bars.

    Our own warnings (a prompt cut to the context, a broken record) go through `logging` and stay
    visible; with ``--verbose`` everything is shown, info logs included.
    """
    import logging
    import os
    import warnings

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(key, value)  # read when the libraries are imported, inside the commands
    # bitsandbytes (model.llm.quantize), once installed, is imported with diffusers and asks the Hub
    # for a CPU kernel, which its publisher check refuses (never trust_remote_code; not HF_HUB_OFFLINE
    # either, which skips that check); it logs the refusal and falls back to its own kernels
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # worker and launched processes too


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (default: configs/shapes_tiny.yaml)."),
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Dotted overrides, e.g. train.lr=1e-3 model.mmfs.every_k=4.", show_default=False),
]


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error (no traceback) and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load_config(config: Path | None, overrides: list[str] | None):
    from mmgen.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        fail(str(e))


# ---------------------------------------------------------------------------------------------
# mmgen train


class Stage(str, Enum):
    main = "main"
    align = "align"


@app.command("train")
def train_command(
    config: ConfigOpt = None,
    overrides: Overrides = None,
    stage: Annotated[Stage, typer.Option(
        "--stage", help="main: the whole model (train.*, into train.out_dir). align: COSMOS alignment of the "
                        "vision tower with a small text encoder (align.*, into align.out_dir); use its "
                        "RUN/step-NNNNNN/vision as model.vision.pretrained.")] = Stage.main,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", help="`auto` (newest checkpoint of train.out_dir, or align.out_dir with --stage align, if any) "
                         "or a RUN/step-NNNNNN folder.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=1, help="Stop after this many steps (the schedule still spans train.steps, "
                                   "or align.steps).")] = None,
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="train.low_memory=true: gradient checkpointing (LLM, UNet, vision tower), an 8-bit "
                             "AdamW (bitsandbytes on CUDA) or Adafactor; slower steps, much less memory.")] = False,
) -> None:
    """Train a model (default config: configs/shapes_tiny.yaml). Ctrl-C saves and stops.

    Under `accelerate launch` the main stage runs on several processes or GPUs; the align stage runs on one.
    """
    cfg = _load_config(config, [*(overrides or []), *(["train.low_memory=true"] if low_memory else [])])
    from mmgen.config import ConfigError
    from mmgen.data.tokenizer import TokenizerError
    from mmgen.training.checkpoint import CheckpointError
    from mmgen.training.data import DataError
    from mmgen.training.trainer import TrainingError, train

    if stage is Stage.align:
        import json

        from mmgen.training.align import train_align

        try:
            result = train_align(cfg, resume=resume, max_steps=max_steps)
        except (TrainingError, CheckpointError, TokenizerError, ConfigError, ValueError) as e:
            fail(str(e))
        if result.retrieval is not None:
            typer.echo(f"retrieval: {json.dumps(result.retrieval)}")
        where = result.last_checkpoint or result.run_dir
        typer.echo(f"{'stopped' if result.interrupted else 'done'} at step {result.step}; checkpoint: {where}"
                   + (f"; vision tower: {where / 'vision'}" if result.last_checkpoint else ""))
        return
    try:
        result = train(cfg, resume=resume, max_steps=max_steps)
    except (TrainingError, CheckpointError, DataError, TokenizerError, ConfigError) as e:
        fail(str(e))
    if not result.main:  # one line per run, from its main process
        return
    where = result.last_checkpoint or result.run_dir
    typer.echo(f"{'stopped' if result.interrupted else 'done'} at step {result.step}; checkpoint: {where}"
               + (f" ({result.engine}, {result.world_size} processes)" if result.world_size > 1 else ""))


# ---------------------------------------------------------------------------------------------
# mmgen generate

BUNDLED = Path(__file__).resolve().parent.parent / "examples" / "checkpoints" / "shapes-tiny"
SAMPLER_HELP = f"Diffusion sampler: {', '.join(SAMPLERS)}."
KIND_HELP = (f"The kind of document to write when a prompt has no meta.kind: {', '.join(KINDS)} "
             "(default: the model's generate.kind, story).")


@app.command("generate")
def generate_command(
    prompt_files: Annotated[Optional[list[Path]], typer.Argument(
        help=".txt (one prompt per line) or .jsonl prompt files.", show_default=False)] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", "-p", help="A prompt sentence (repeat for more documents).", show_default=False)] = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        "--image", help="Start a document from this picture (repeat: one per --prompt, or one for all).",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out"),
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="A model folder or a RUN/step-NNNNNN checkpoint (default: the bundled model).")] = BUNDLED,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=0, help="Most new images per document.")] = None,
    min_images: Annotated[Optional[int], typer.Option(
        "--min-images", min=0, help="Fewest new images before a freely continued document may end.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Most new text tokens per document.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed (a prompt's meta.seed wins).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Diffusion sampling steps.")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help=SAMPLER_HELP)] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0.0, help="Text temperature (0: greedy).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Documents generated together.")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help=KIND_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Allow writing into a folder that holds results.")] = False,
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="The whole model in bfloat16 (half the memory; slower on CPUs without bf16); on a GPU "
                             "its big parts also wait in CPU memory and move to the GPU only while they run.")] = False,
) -> None:
    """Generate illustrated documents from prompt files, --prompt and --image into OUT/<id>/ (+ OUT/index.html).

    mmgen generate --prompt "A small red circle is on the left." --out out
    """
    from mmgen.generation.api import GenerationError, command_line_prompts, generate_files

    if not prompt_files and not prompt and not image:
        fail("nothing to generate: give prompt files, --prompt TEXT or --image PATH")
    try:
        report = generate_files(
            prompt_files or [], out, checkpoint=checkpoint, device=device, overwrite=overwrite, low_memory=low_memory,
            prompts=command_line_prompts(prompt or [], image or []),
            settings=dict(max_images=max_images, min_images=min_images, max_new_tokens=max_new_tokens, seed=seed, steps=steps,
                          sampler=sampler, guidance=guidance, temperature=temperature, top_p=top_p,
                          batch_size=batch_size, kind=kind),
            progress=True)
    except GenerationError as e:
        fail(str(e))
    for problem in report.failed:
        typer.secho(f"failed: {problem}", fg=typer.colors.RED, err=True)
    typer.echo(f"wrote {len(report.written)} document(s) to {out} (open {out / 'index.html'})"
               + (f"; {len(report.failed)} failed" if report.failed else ""))
    if report.failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# mmgen serve


@app.command("serve")
def serve_command(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="A model folder or a RUN/step-NNNNNN checkpoint (default: the bundled model).")] = BUNDLED,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (local only unless you say so).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where each result is saved as a document folder.")]
    = Path("out/serve"),
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, or auto.")] = "auto",
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="As for generate: bfloat16, and on a GPU the big parts move there only while they run.")] = False,
) -> None:
    """A local story studio: type a sentence or drop a picture, watch the story appear; JSON API at /api.

    Needs the serve extra: pip install 'mmgen[serve]'. POST /api/generate {"prompt": "...", "max_images": 3}
    returns the finished document; /api/jobs and /api/jobs/ID/events stream it segment by segment.
    """
    import socket

    try:
        from mmgen.serve.app import serve
    except ImportError as e:
        fail(f"mmgen serve needs the serve extra ({e.name} is missing): pip install 'mmgen[serve]'")
    from mmgen.generation.api import GenerationError

    try:
        with socket.create_server((host, port)):
            pass  # free now; uvicorn binds it again below
    except OSError as e:
        fail(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host")
    try:
        serve(checkpoint, out, host=host, port=port, device=device, low_memory=low_memory,
              on_ready=lambda url: typer.echo(f"serving the story studio on {url} (results in {out}; Ctrl-C stops)"))
    except GenerationError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{out}: cannot write results here ({e.strerror or e})")


# ---------------------------------------------------------------------------------------------
# mmgen eval


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A model folder or a RUN/step-NNNNNN checkpoint.")],
    out: Annotated[Path, typer.Argument(help="A new folder for the standalone model.")],
    overrides: Overrides = None,
) -> None:
    """Write a model folder that stands alone: the base folders its checkpoint was started from (hard-linked),
    its trained weights, tokenizer and config. Overrides point at moved base folders (model.llm.pretrained=...)."""
    from mmgen.models.export import export_model

    try:
        where = export_model(checkpoint, out, overrides=overrides or [])
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        fail(str(e))
    typer.echo(f"exported {checkpoint} to {where}")


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Model, checkpoint or run folder.")] = BUNDLED,
    tasks: Annotated[str, typer.Option(
        "--tasks", help="Comma-separated: t2i, caption, continuation, story, reintro, zeroshot, fewshot, retrieval; "
                        "caption@48 / continuation@96 (given frames drawn at that size), caption@jpeg (64 px, "
                        "JPEG quality 70).")]
    = "t2i,caption,continuation,story",
    n: Annotated[int, typer.Option("--n", min=1, help="Prompts per task.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the evaluation prompts and of sampling.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for metrics.json and report.md.")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help=SAMPLER_HELP)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Diffusion sampling steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale.")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        "--temperature", min=0.0, help="Text temperature (default: the model's generate.temperature, as "
                                       "`mmgen generate` uses it; 0: greedy).")] = None,
    min_images: Annotated[Optional[int], typer.Option(
        "--min-images", min=0, help="Fewest new images before a story may end (default: the model's "
                                    "generate.min_images).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Prompts generated together.")] = 32,
    kind: Annotated[Optional[str], typer.Option("--kind", help=KIND_HELP)] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, ... or auto.")] = "auto",
) -> None:
    """Score a model on ShapeStories; write metrics.json and report.md (with sample grids)."""
    import json

    from mmgen.evaluation.report import write_metrics, write_report
    from mmgen.evaluation.in_context import IN_CONTEXT, evaluate_in_context
    from mmgen.evaluation.retrieval import evaluate_retrieval
    from mmgen.evaluation.shapes_eval import evaluate
    from mmgen.generation.api import GenerationError, load_model, make_settings

    from .progress import progress_callback

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    overrides = dict(sampler=sampler, steps=steps, guidance=guidance, temperature=temperature,
                     min_images=min_images, batch_size=batch_size, seed=seed, kind=kind)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        model, folder = load_model(checkpoint, device)
        settings = make_settings(model, overrides)
        extra = [t for t in names if t in IN_CONTEXT]
        retrieval = "retrieval" in names
        if retrieval:
            model.require_contrastive()  # a model without text-only layers fails before any task runs
        shapes_tasks = [t for t in names if t not in IN_CONTEXT and t != "retrieval"]
        with progress_callback("prompts", total=n * len(shapes_tasks)) as advance:
            results = evaluate(model, shapes_tasks, n=n, seed=seed, settings=overrides, checkpoint=str(folder),
                               progress=lambda: advance(1))
        results.update(evaluate_in_context(model, extra, n=n, seed=seed, settings=overrides))
        if retrieval:
            results["retrieval"] = evaluate_retrieval(model, n=n, seed=seed, batch_size=batch_size or 32)
    except (GenerationError, ValueError) as e:
        fail(str(e))
    record = {"checkpoint": str(folder), "n": n, "seed": seed, **settings.__dict__}
    for task, r in results.items():
        typer.echo(f"{task:13s} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in r.metrics.items()))
    out = out or folder.parent / "eval" if folder.name == "model" else (out or Path("eval"))
    write_metrics(out, results, record)
    report = write_report(out, results, record)
    typer.echo(f"wrote {out / 'metrics.json'} and {report}")
    typer.echo(json.dumps({t: r.metrics for t, r in results.items()}))


# ---------------------------------------------------------------------------------------------
# mmgen config ...


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the fully resolved config (after overrides) as YAML."""
    cfg = _load_config(config, overrides)
    typer.echo(cfg.to_yaml(), nl=False)


@config_app.command("check")
def config_check(
    files: Annotated[list[Path], typer.Argument(help="Config files to validate.")],
) -> None:
    """Validate config files; exit code 1 if any is invalid."""
    from mmgen.config import ConfigError, load_config

    bad = 0
    for f in files:
        try:
            load_config(f)
            typer.echo(f"{f}: ok")
        except ConfigError as e:
            bad += 1
            typer.secho(str(e), fg=typer.colors.RED, err=True)
    if bad:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# mmgen data ...


@data_app.command("validate")
def data_validate(
    files: Annotated[list[Path], typer.Argument(help="JSONL documents or .txt prompt files.")],
) -> None:
    """Check documents and prompt files; list every problem as file:line: what is wrong."""
    from mmgen.data.documents import validate_files

    n_docs, problems = validate_files(files)
    for p in problems:
        typer.echo(str(p))
    if problems:
        typer.secho(f"{len(problems)} problem(s) in {len(files)} file(s); {n_docs} document(s) ok",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.secho(f"ok: {n_docs} document(s) in {len(files)} file(s)", fg=typer.colors.GREEN, err=True)


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of stories.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int, typer.Option("--size", min=32, help="Image width W in pixels (>= 32).")] = 64,
    video: Annotated[bool, typer.Option(
        "--video", help="Tell each story as text and one MP4 clip (videos/*.mp4) instead of images.")] = False,
) -> None:
    """Write a ShapeStories corpus: documents.jsonl, images/*.png (or videos/*.mp4), ground truth in meta."""
    from mmgen.data.shapes import write_corpus
    from mmgen.data.shapes_video import write_video_corpus

    from .progress import progress_callback

    write = write_video_corpus if video else write_corpus
    with progress_callback("stories", total=n) as advance:
        path = write(out, n=n, seed=seed, size=size, progress=lambda done, total: advance(1))
    typer.echo(f"wrote {n} {'video ' if video else ''}stories to {path}")


# the kinds `data convert` reads come from the one registry of source kinds (a light module)
CorpusKind = Enum("CorpusKind", {k: k for k in known_kinds(convertible=True)}, type=str)


def _print_problems(problems: list, limit: int = 50) -> None:
    for p in problems[:limit]:
        typer.echo(str(p), err=True)
    if len(problems) > limit:
        typer.echo(f"... and {len(problems) - limit} more", err=True)


@data_app.command("convert")
def data_convert(
    kind: Annotated[CorpusKind, typer.Argument(help="The corpus's layout (README \"Real corpora\").")],
    src: Annotated[Path, typer.Argument(help="A file of the corpus or a folder of them: VIST *.json, MMC4 "
                                             "*.jsonl / *.jsonl.zip, OBELICS *.parquet, webdataset *.tar.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The JSONL documents to write.")],
    images: Annotated[Optional[Path], typer.Option(
        "--images", help="Folder holding the corpus's images (vist, mmc4, obelics); nothing is downloaded.")] = None,
    skip_missing: Annotated[bool, typer.Option(
        "--skip-missing", help="Drop a missing image from its document (reported) instead of leaving the "
                               "document out.")] = False,
    min_sim: Annotated[float, typer.Option(
        "--min-sim", help="mmc4 (and MMC4-packed shards): keep images whose matched_sim reaches this.")] = 0.24,
) -> None:
    """Convert a public interleaved corpus into our JSONL documents (checked: `mmgen data validate` passes).

    Bad records (a line that is not JSON, an image that does not decode, a matched_text_index out of range,
    a truncated shard, ...) are listed as file:line and left out; a summary counts them.
    """
    from mmgen.data.corpora.convert import convert
    from mmgen.data.documents import DocumentError

    from .progress import progress_callback

    try:
        with progress_callback("records", total=None) as advance:
            report = convert(kind.value, src, out, images=images, skip_missing=skip_missing, min_sim=min_sim,
                             progress=advance)
    except (DocumentError, ValueError) as e:
        fail(str(e))
    _print_problems(report.problems + report.dropped)
    typer.secho(report.summary(), fg=typer.colors.YELLOW if report.problems else typer.colors.GREEN, err=True)
    if report.documents == 0:
        raise typer.Exit(1)


@data_app.command("shard")
def data_shard(
    files: Annotated[list[Path], typer.Argument(help="JSONL documents (text and image segments).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards (shard-NNNNNN.tar).")],
    per_shard: Annotated[int, typer.Option("--per-shard", min=1, help="Documents per shard.")] = 1000,
) -> None:
    """Pack documents into webdataset tar shards (read with `kind: webdataset`); same input, same bytes."""
    import itertools

    from mmgen.data.corpora.webdataset import write_shards
    from mmgen.data.documents import iter_records

    from .progress import progress_callback

    problems: list = []
    with progress_callback("documents", total=None) as advance:
        shards, count = write_shards(itertools.chain.from_iterable(iter_records(f) for f in files), out,
                                     per_shard=per_shard, report=problems.append, progress=advance)
    _print_problems(problems)
    typer.secho(f"packed {count} document(s) into {len(shards)} shard(s) in {out}"
                + (f"; {len(problems)} left out" if problems else ""),
                fg=typer.colors.YELLOW if problems else typer.colors.GREEN, err=True)
    if count == 0:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
