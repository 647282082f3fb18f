"""The CLI: thin, fast to start, clear when given bad input."""

import json
import subprocess
import sys

from PIL import Image
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_cli_start_up_does_not_import_torch():
    code = "import sys, cli.main; heavy = {'torch', 'transformers', 'diffusers'} & set(sys.modules); print(sorted(heavy))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("data", "config"):
        assert name in result.output


def test_config_show_applies_overrides():
    result = runner.invoke(app, ["config", "show", "train.lr=0.5"])
    assert result.exit_code == 0, result.output
    assert "lr: 0.5" in result.output


def test_config_show_rejects_bad_override_without_traceback():
    result = runner.invoke(app, ["config", "show", "train.lr=fast"])
    assert result.exit_code == 1
    assert "`train.lr` must be a number" in result.output
    assert "Traceback" not in result.output


def test_data_shapes_then_validate(tmp_path):
    out = tmp_path / "shapes"
    result = runner.invoke(app, ["data", "shapes", "--out", str(out), "--n", "5", "--seed", "3", "--size", "32"])
    assert result.exit_code == 0, result.output
    lines = (out / "documents.jsonl").read_text().splitlines()
    assert len(lines) == 5
    result = runner.invoke(app, ["data", "validate", str(out / "documents.jsonl")])
    assert result.exit_code == 0, result.output


def test_validate_lists_every_problem_with_file_and_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"id": "a", "segments": [{"type": "text", "text": "hi"}, {"type": "image", "path": "ok.png"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"segments": [{"type": "sound", "path": "x.wav"}]}),
        json.dumps({"segments": [{"type": "image", "path": "missing.png"}]}),
        json.dumps({"segments": [{"type": "image", "path": "broken.png"}]}),
    ]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["data", "validate", str(f)])
    assert result.exit_code == 1
    out = result.output
    assert "Traceback" not in out
    for line in (2, 3, 4, 5):
        assert f"{f}:{line}:" in out
    assert f"{f}:1:" not in out


def test_shipped_example_prompts_are_valid():
    from pathlib import Path

    prompts = sorted((Path(__file__).resolve().parent.parent / "examples" / "prompts").glob("*.*"))
    assert {p.suffix for p in prompts} >= {".txt", ".jsonl"}
    result = runner.invoke(app, ["data", "validate", *map(str, prompts)])
    assert result.exit_code == 0, result.output
