"""Reliability: SIGKILL mid-training, damaged checkpoints, pickles that would run code, a full disk.

Every damaged file must give one clear line that says what is wrong and what to do — from the
library (``from_pretrained``, ``load_model``, ``train``) and from the CLI (exit 1, ``error: ...``,
no traceback).
"""

import ast
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from mmgen.generation import output
from mmgen.generation.api import GenerationError, generate_files, load_model
from mmgen.models.mm_interleaved import MMInterleaved
from mmgen.training.checkpoint import list_checkpoints, load_trainer_state, save_checkpoint
from mmgen.training.trainer import train

from .test_train import ROOT, TINY, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real one-step checkpoint (EMA on, as in the shipped config): ``RUN/step-000001``."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(run, "train.steps=2", "train.save_every=1"), max_steps=1, show_progress=False)
    return run / "step-000001"


def copy_checkpoint(trained: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "run" / trained.name
    shutil.copytree(trained, ckpt)
    return ckpt


def one_error_line(result) -> str:
    """The CLI failed cleanly: exit 1, no traceback, exactly one line and it is ``error: ...``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- 2. interruption ---------------------------------------------------------------------------

STEPS = 40  # the schedule's length; runs are killed or stopped (--max-steps) long before it


@pytest.fixture
def launch():
    """``launch(run, log)`` starts ``mmgen train --resume auto``; whatever still runs at the end is killed."""
    procs = []

    def start(run: Path, log: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "cli.main", "train", *TINY, f"train.out_dir={run}", f"train.steps={STEPS}",
               "train.save_every=1", "train.keep_last_n=2", "--resume", "auto"]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(proc: subprocess.Popen, log: Path, what: str, done, pause: float) -> None:
    deadline = time.monotonic() + 90
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after 90 s:\n{log.read_text()[-3000:]}")
        time.sleep(pause)


def _done_steps(run: Path) -> int:
    """The last step whose metrics row was written (rows are written before that step's save)."""
    steps = [0]
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line cut short by the kill
    return max(steps)


def _partial(run: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(run) if e.name.startswith(".tmp-step-"))
    except FileNotFoundError:
        return []


def _kill(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"it had already stopped:\n{log.read_text()[-3000:]}"


def _check_after_kill(run: Path, done: int) -> int:
    """Every listed checkpoint is whole, and at most one save interval (1 step) was lost."""
    ckpts = list_checkpoints(run)
    assert ckpts, "no complete checkpoint"
    for step, path in ckpts:
        assert load_trainer_state(path)["state"]["step"] == step
        assert load_file(path / "model" / "model.safetensors")
    latest = ckpts[-1][0]
    assert done - latest <= 1, f"{done} steps done but the newest checkpoint is step {latest}"
    return latest


def test_three_sigkills_then_resume_auto_loses_at_most_one_save(tmp_path, capsys, launch):
    rng = random.Random(20240611)
    run = tmp_path / "run"

    # 1. kill at a random moment after the first checkpoint
    log = tmp_path / "1.log"
    proc = launch(run, log)
    target = rng.randint(1, 3)
    _wait(proc, log, f"step {target}", lambda: _done_steps(run) >= target, 0.01)
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(proc, log)
    latest = _check_after_kill(run, _done_steps(run))

    # a folder that looks like a finished save of a later step, under a temporary name: never loaded
    decoy = run / ".tmp-step-999999-deadbeef"
    shutil.copytree(run / f"step-{latest:06d}", decoy)
    (decoy / "trainer" / "state.json").write_text(json.dumps({"step": 999999, "seed": 0}))

    # 2. kill the moment a checkpoint write starts (retried if the save beat the poll)
    for attempt in range(3):
        log = tmp_path / f"2-{attempt}.log"
        before = set(_partial(run))
        proc = launch(run, log)
        _wait(proc, log, "a checkpoint write", lambda: set(_partial(run)) - before - {decoy.name}, 0.001)
        _kill(proc, log)
        text = log.read_text()
        assert f"resumed from {run / f'step-{latest:06d}'} at step {latest}" in text, text[-3000:]
        assert "999999" not in text.replace(f"removed {decoy.name}", "")
        latest = _check_after_kill(run, _done_steps(run))
        cut = [name for name in _partial(run) if name != decoy.name]
        if cut:
            break
    assert cut, "could not kill training in the middle of a checkpoint write"
    assert not decoy.exists()  # removed when training started again

    # 3. kill at a random moment of the resumed run
    log = tmp_path / "3.log"
    proc = launch(run, log)
    _wait(proc, log, "the resume", lambda: "resumed from" in log.read_text(), 0.01)
    text = log.read_text()
    assert f"resumed from {run / f'step-{latest:06d}'} at step {latest}" in text, text[-3000:]
    assert all(f"removed {name}" in text for name in cut)  # the half-written save was never loaded
    target = latest + rng.randint(2, 3)  # past any row the killed run wrote after its last save
    _wait(proc, log, f"step {target}", lambda: _done_steps(run) >= target, 0.01)
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(proc, log)
    latest = _check_after_kill(run, _done_steps(run))

    # 4. the last resume goes on cleanly; the metrics hold every step once
    capsys.readouterr()
    end = latest + 2
    result = train(tiny_config(run, f"train.steps={STEPS}", "train.save_every=1", "train.keep_last_n=2"),
                   resume="auto", max_steps=end, show_progress=False)
    assert f"resumed from {run / f'step-{latest:06d}'} at step {latest}" in capsys.readouterr().out
    assert result.step == end and result.last_checkpoint == run / f"step-{end:06d}"
    assert [s for s, _ in list_checkpoints(run)] == [end - 1, end]
    assert _partial(run) == []
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, end + 1))


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    import mmgen.training.checkpoint as checkpoint

    run = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(step):
        def save_model(folder):
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"weights")
        save_checkpoint(run, step, save_model=save_model, raw_state=None, ema_state=None,
                        optimizer_state=optimizer.state_dict(),
                        scheduler=scheduler, state={"step": step}, keep_last_n=1)

    save(1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes the weights, then the process dies
        (Path(path) / "model" / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    for _, path in list_checkpoints(run):
        assert (path / "model" / "model.safetensors").is_file(), f"{path.name} is listed but half deleted"
    assert [s for s, _ in list_checkpoints(run)] == [2]


# --- 3. damaged model folders ------------------------------------------------------------------


def _truncate(folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _garble_header(folder):
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[8:24] = b"\xff" * 16
    w.write_bytes(bytes(data))


def _rename_a_tensor(folder):  # header still valid, offsets unchanged: only a name differs
    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data.replace(b'"llm.', b'"LLM.', 1))


def _unknown_field(folder):
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["model"]["colour_depth"] = 3
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))


def _other_hidden_size(folder):
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["model"]["llm"]["hidden_size"] = 64
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))


def _alter_data(folder):  # a few bytes inside a tensor: the file still parses
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-100:-96] = bytes(255 - b for b in data[-100:-96])
    w.write_bytes(bytes(data))


def _unrecorded(damage):  # a folder without checksums.json (e.g. written by hand): the file itself is checked
    return lambda folder: ((folder / "checksums.json").unlink(), damage(folder))


CHANGED = r"model\.safetensors is damaged: its SHA-256 differs .* copy it again"
DAMAGED_MODELS = {
    "truncated weights": (_truncate, CHANGED),
    "garbled header": (_garble_header, CHANGED),
    "altered tensor bytes": (_alter_data, CHANGED),
    "renamed tensor": (_rename_a_tensor, CHANGED),
    "truncated weights, no checksum": (_unrecorded(_truncate),
                                       r"model\.safetensors is not a readable safetensors file .*cut short — "
                                       r"copy it again"),
    "garbled header, no checksum": (_unrecorded(_garble_header),
                                    r"model\.safetensors is not a readable safetensors file .*damaged"),
    "renamed tensor, no checksum": (_unrecorded(_rename_a_tensor),
                                    r"model\.safetensors does not match config\.yaml: 1 tensor missing from "
                                    r"the file \(e\.g\. llm\..*\), 1 tensor in the file but not in the model "
                                    r"\(e\.g\. LLM\..*use the config"),
    "unknown config field": (_unknown_field,
                             r"config\.yaml: unknown config key `model\.colour_depth` .*undo the edit"),
    "missing tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"),
                          r"tokenizer is missing; .*copy the whole folder"),
    "other hidden size": (_other_hidden_size, r"does not match config\.yaml: llm\.lm\.model\.embed_tokens\.weight is "
                                              r"\[\d+, 32\] in the file but \[\d+, 64\] in the model"),
}


@pytest.mark.parametrize("case", DAMAGED_MODELS)
def test_a_damaged_model_folder_gives_one_clear_line(case, trained, tmp_path):
    damage, expected = DAMAGED_MODELS[case]
    folder = tmp_path / "model"
    shutil.copytree(trained / "model", folder)
    damage(folder)

    with pytest.raises((ValueError, FileNotFoundError)) as e:
        MMInterleaved.from_pretrained(folder)
    assert re.search(expected, str(e.value)) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(GenerationError, match=expected):
        load_model(folder, "cpu")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A small red circle is on the left.\n")
    result = runner.invoke(app, ["generate", str(prompts), "--checkpoint", str(folder),
                                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert re.search(expected, one_error_line(result))


# --- 3. damaged checkpoints on resume ----------------------------------------------------------


def _cut(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _without_ema(ckpt: Path) -> None:
    for name in ("weights.safetensors", "ema.safetensors"):
        (ckpt / "trainer" / name).unlink()


DAMAGED_CHECKPOINTS = {
    "truncated raw weights": (lambda c: _cut(c / "trainer" / "weights.safetensors"), [],
                              r"weights\.safetensors: cannot read it .*resume from an older step-\* folder"),
    "truncated model weights, no EMA": (lambda c: (_without_ema(c), _cut(c / "model" / "model.safetensors")), [],
                                        r"cannot resume: .*model\.safetensors is damaged: its SHA-256 differs"),
    "truncated model weights, no EMA, no checksum": (
        lambda c: (_without_ema(c), (c / "model" / "checksums.json").unlink(), _cut(c / "model" / "model.safetensors")),
        [], r"model\.safetensors: cannot resume from it .*damaged"),
    "truncated optimizer": (lambda c: _cut(c / "trainer" / "optimizer.pt", 1000), [],
                            r"optimizer\.pt: cannot read it .*resume from an older step-\* folder"),
    "garbled state.json": (lambda c: (c / "trainer" / "state.json").write_text('{"step": '), [],
                           r"state\.json: cannot read it"),
    "missing tokenizer": (lambda c: shutil.rmtree(c / "model" / "tokenizer"), [],
                          r"model/tokenizer/ is missing, so the checkpoint is incomplete"),
    "other hidden size": (lambda c: None, ["model.llm.hidden_size=64"],
                          r"do not fit the model this config builds \(.* is \[\d+, 32\] in the file but \[\d+, 64\]"
                          r".*resume with that model config"),
    "other hidden size, no EMA": (_without_ema, ["model.llm.hidden_size=64"],
                                  r"do not fit the model this config builds .*\[\d+, 64\]"),
}


@pytest.mark.parametrize("case", DAMAGED_CHECKPOINTS)
def test_resume_from_a_damaged_checkpoint_gives_one_clear_line(case, trained, tmp_path):
    damage, overrides, expected = DAMAGED_CHECKPOINTS[case]
    ckpt = copy_checkpoint(trained, tmp_path)
    damage(ckpt)
    result = runner.invoke(app, ["train", *TINY, *overrides, f"train.out_dir={tmp_path / 'out'}", "train.steps=3",
                                 "--resume", str(ckpt)])
    assert re.search(expected, one_error_line(result))


# --- 4. no code runs from a checkpoint ---------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: what a malicious ``optimizer.pt`` would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_payload_in_optimizer_pt_is_refused_and_never_runs(trained, tmp_path):
    probe, marker = tmp_path / "probe-ran", tmp_path / "payload-ran"
    torch.save(Payload(probe), tmp_path / "probe.pt")  # the payload is live: a plain load runs it
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    ckpt = copy_checkpoint(trained, tmp_path)
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, ckpt / "trainer" / "optimizer.pt")
    result = runner.invoke(app, ["train", *TINY, f"train.out_dir={tmp_path / 'out'}", "train.steps=3",
                                 "--resume", str(ckpt)])
    line = one_error_line(result)
    assert re.search(r"optimizer\.pt: refused — .*could run code", line), line
    assert not marker.exists()


def _calls(root: Path, name: str):
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                yield path, node


def _keyword(node: ast.Call, name: str):
    return next((k.value.value for k in node.keywords if k.arg == name and isinstance(k.value, ast.Constant)), None)


def test_no_torch_load_without_weights_only_and_no_pickle():
    for root in (ROOT / "mmgen", ROOT / "cli"):
        for path, node in _calls(root, "load"):
            if ast.unparse(node.func) == "torch.load":
                assert _keyword(node, "weights_only") is True, f"{path}:{node.lineno}: torch.load without weights_only"
            assert ast.unparse(node.func) not in ("pickle.load", "pickle.loads"), f"{path}:{node.lineno}"
        for path, node in _calls(root, "loads"):
            assert ast.unparse(node.func) not in ("pickle.loads", "dill.loads"), f"{path}:{node.lineno}"
        # pretrained model weights come from safetensors only (tokenizers and schedulers hold none)
        for path, node in _calls(root, "from_pretrained"):
            receiver = ast.unparse(node.func.value)
            if re.search(r"Model|Autoencoder", receiver):
                assert _keyword(node, "use_safetensors") is True, f"{path}:{node.lineno}: {receiver}.from_pretrained"


# --- 6. a full disk, an unwritable --out -------------------------------------------------------


def test_a_full_disk_keeps_the_documents_already_written_and_reports_the_rest(trained, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": name, "segments": [{"type": "text", "text": text}, {"type": "image"}]})
                               + "\n" for name, text in (("red", "A small red circle is on the left."),
                                                         ("blue", "A large blue square is in the center."),
                                                         ("green", "A small green triangle is at the top."))))
    full = {"now": False}
    real_text, real_save = output._atomic_text, Image.Image.save

    def no_space(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write_text(path, text):
        if full["now"]:
            no_space()
        real_text(path, text)
        if path.name == "story.md":  # the last file of the first document: the disk is now full
            full["now"] = True

    def save_png(self, fp, *args, **kwargs):
        if full["now"]:
            no_space()
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(output, "_atomic_text", write_text)
    monkeypatch.setattr(Image.Image, "save", save_png)
    out = tmp_path / "out"
    report = generate_files([prompts], out, checkpoint=trained, device="cpu",
                            settings=dict(steps=1, max_images=1, max_new_tokens=4, batch_size=1))
    monkeypatch.undo()

    (first,) = report.written
    doc = json.loads((first.folder / "document.json").read_text())
    images = [s["path"] for s in doc["segments"] if s["type"] == "image"]
    assert len(images) == first.num_images == 1
    for name in ("index.html", "story.md", *images):
        assert (first.folder / name).stat().st_size > 0, name
    Image.open(first.folder / images[0]).verify()
    assert first.folder == out / "red"
    assert len(report.failed) == 3, report.failed  # two documents and the run's index.html
    assert all("No space left on device" in f for f in report.failed), report.failed
    assert report.failed[0].startswith(f"{prompts}:2: ") and report.failed[1].startswith(f"{prompts}:3: ")
    assert report.failed[2].startswith(f"{out / 'index.html'}: cannot write")


def test_an_unwritable_out_is_refused_before_any_work(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A small red circle is on the left.\n")
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "out"
    result = runner.invoke(app, ["generate", str(prompts), "--checkpoint", str(trained), "--out", str(out)])
    assert one_error_line(result) == f"error: {out}: cannot write here (Not a directory)"
