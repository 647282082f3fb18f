"""``mmgen export CHECKPOINT OUT``: a model folder that stands alone.

A checkpoint's ``model/`` folder leaves out the tensors of frozen components read from base
folders (``base.json``) and names those folders in its ``config.yaml``. The export copies each
base folder into ``OUT/base/<vision|llm|decoder>/`` (hard links where the file system allows,
so no second copy on disk), the weights file, tokenizer and checksums beside them, and points the
config at the copies with paths relative to ``OUT``, which
:meth:`~mmgen.models.mm_interleaved.MMInterleaved.from_pretrained` reads against the folder.
The result can be moved or copied to another machine as one folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from mmgen.models.mm_interleaved import BASE_NAME, CHECKSUMS_NAME, CONFIG_NAME, TOKENIZER_DIR, WEIGHTS_NAME

COMPONENTS = ("vision", "llm", "decoder")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_model(folder: str | Path, out: str | Path, *, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write a standalone copy of the model folder ``folder`` (or a ``step-*`` checkpoint) into ``out``."""
    from mmgen.config import _apply_override
    from mmgen.models.mm_interleaved import check_base_folders, resolve_base_folders, verify_checksum
    from mmgen.config import config_from_dict, model_config_dict

    folder, out = Path(folder), Path(out)
    if (folder / "model" / WEIGHTS_NAME).is_file():
        folder = folder / "model"
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder}: not a model folder ({WEIGHTS_NAME} missing)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; give a new folder")
    verify_checksum(folder, WEIGHTS_NAME)
    raw = yaml.safe_load((folder / CONFIG_NAME).read_text(encoding="utf-8")) or {}
    for item in overrides:
        _apply_override(raw, item)
    resolve_base_folders(raw, folder)
    cfg = config_from_dict(model_config_dict(raw) | {"train": raw.get("train") or {}})
    check_base_folders(cfg, folder)
    raw = yaml.safe_load(cfg.model_yaml())  # what a model folder keeps, as save_pretrained writes it
    out.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        src = raw.get("model", {}).get(name, {}).get("pretrained")
        if src is None:
            continue
        shutil.copytree(Path(src).expanduser(), out / "base" / name, copy_function=_link_or_copy)
        raw["model"][name]["pretrained"] = f"base/{name}"
    if raw.get("model", {}).get("llm", {}).get("tokenizer"):
        raw["model"]["llm"]["tokenizer"] = None  # training reads the tokenizer from the LLM folder; the model, from tokenizer/
    for name in (WEIGHTS_NAME, CHECKSUMS_NAME, BASE_NAME):
        if (folder / name).is_file():
            _link_or_copy(str(folder / name), str(out / name))
    shutil.copytree(folder / TOKENIZER_DIR, out / TOKENIZER_DIR)
    (out / CONFIG_NAME).write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return out
