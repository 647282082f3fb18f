"""Model folders on disk: checksums, one-line load errors, and the base folders a checkpoint names.

A model folder's weights file leaves out the tensors of frozen components read from a base folder
(a local Hugging Face folder named by ``model.<part>.pretrained``); these helpers say which
folders those are, check that they exist, and keep tied tensors stored once.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from mmgen.config import Config, config_from_dict

CONFIG_NAME = "config.yaml"
CHECKSUMS_NAME = "checksums.json"


def _frozen_dtype(cfg: Config) -> torch.dtype:
    """The dtype frozen components are kept in (``Config.frozen_storage_dtype_name``)."""
    return getattr(torch, cfg.frozen_storage_dtype_name())


def resolve_base_folders(raw: dict, folder: Path) -> None:
    """Relative base folders that exist inside the model folder (an export's ``base/llm``) are read from there."""
    for name in ("vision", "llm", "decoder"):
        section = (raw.get("model") or {}).get(name) or {}
        where = section.get("pretrained")
        if isinstance(where, str) and not Path(where).is_absolute() and (folder / where).exists():
            section["pretrained"] = str(folder / where)


def check_base_folders(cfg: Config, folder: Path) -> None:
    """Every base folder ``cfg`` names must exist: a moved one is named with the override to use."""
    m = cfg.model
    for key, where in (("model.vision.pretrained", m.vision.pretrained), ("model.llm.pretrained", m.llm.pretrained),
                       ("model.decoder.pretrained", m.decoder.pretrained)):
        if where is not None and not Path(where).expanduser().exists():
            raise FileNotFoundError(f"{folder}: its base folder {where} ({key} in {CONFIG_NAME}) does not exist — "
                                    f"it has moved or is on another machine; point at it with the override "
                                    f"{key}=<its new place>")


def _resized(pretrained: str, lm: nn.Module) -> bool:
    """Whether the LLM's token embeddings were grown past its folder's vocabulary."""
    try:
        n = json.loads((Path(pretrained).expanduser() / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError):
        return True
    return lm.get_input_embeddings().num_embeddings != n


def _store_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors sharing memory (tied embeddings) kept under their first name; contiguous, not copied."""
    seen, out = set(), {}
    for k, v in state.items():
        mark = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else (k,)
        if mark not in seen:
            seen.add(mark)
            out[k] = v.detach().contiguous()
    return out


def _shared_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors that share memory with an earlier name (stored once)."""
    state = model.state_dict()
    return set(state) - set(_store_once(state))


def _loaded_sizes(model) -> Config:
    """The config with the sizes of the components as loaded from their folders (what ran)."""
    raw = model.cfg.to_dict()
    m = raw["model"]
    if m["llm"]["pretrained"] is not None:
        c = model.llm.lm.config
        m["llm"].update(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                        max_position_embeddings=c.max_position_embeddings)
        if getattr(c, "intermediate_size", None):
            m["llm"]["intermediate_size"] = c.intermediate_size
    if m["vision"]["pretrained"] is not None:
        c = model.vision.tower.config
        m["vision"].update(image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
                           num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                           intermediate_size=c.intermediate_size)
    return config_from_dict(raw)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(folder: Path, name: str) -> None:
    """Compare ``name`` with the SHA-256 that ``save_pretrained`` recorded (folders without one pass)."""
    record = folder / CHECKSUMS_NAME
    if not record.is_file():
        return
    try:
        expected = json.loads(record.read_text()).get(name)
    except (ValueError, AttributeError):
        raise ValueError(f"{record} is damaged (not a JSON object); copy the model folder again") from None
    if expected is not None and file_sha256(folder / name) != expected:
        raise ValueError(f"{folder / name} is damaged: its SHA-256 differs from the one recorded when it was "
                         f"saved ({CHECKSUMS_NAME}); copy it again or use another checkpoint")


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


def weights_mismatch(error: RuntimeError) -> str:
    """One line out of torch's multi-line ``load_state_dict`` error: what differs, with an example."""
    text = str(error)
    sizes = _SIZE_MISMATCH.findall(text)
    missing = re.search(r"Missing key\(s\) in state_dict: (.*)", text)
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*)", text)
    parts = []
    if sizes:
        name, there, here = sizes[0]
        more = f" ({len(sizes) - 1} more tensors differ in shape)" if len(sizes) > 1 else ""
        parts.append(f"{name} is {there} in the file but {here} in the model{more}")
    for match, what in ((missing, "missing from the file"), (unexpected, "in the file but not in the model")):
        if match:
            keys = re.findall(r'"([^"]+)"', match[1])
            parts.append(f"{len(keys)} tensor{'s' if len(keys) != 1 else ''} {what} (e.g. {keys[0] if keys else '?'})")
    if not parts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        parts.append(lines[-1][:240] if lines else type(error).__name__)
    return ", ".join(parts)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file a tensor at a time, straight from each tensor's memory.

    ``safetensors.torch.save_file`` first turns every tensor into a bytes copy (a checkpoint's
    size in extra memory); this writes the same format (8-byte header length, JSON header, the
    tensors' bytes in header order) without it.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            t = t.detach().contiguous().cpu()  # no copy for a contiguous CPU tensor
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
