"""Self-describing checkpoints in safetensors: no pickle, one atomic file, verified on load.

A checkpoint is STEM.safetensors: the model's tensors under `model.`, optionally the optimiser's
under `optim.` and others (RNG states) by name, and in its header the metadata as JSON with a
sha256 of all tensor bytes. One file written by rename, so a crash leaves either the old or the
new checkpoint, never a mix; the checksum catches later corruption. STEM.json is a readable copy
of the metadata for people and tools; it is not needed to load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cnnkit.errors import RunError
from cnnkit.fileio import save_with, write_json_atomic

STRIP_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile wrappers


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]  # state dict, without wrapper prefixes
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None = None  # optimiser state dict, when saved
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. RNG states, by name


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        for prefix in STRIP_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value.detach().contiguous().cpu().clone()
    return out


def save_checkpoint(
    stem: Path, model: torch.nn.Module, meta: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    tensors.update({k: v.detach().contiguous().cpu().clone() for k, v in (extra or {}).items()})
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _split_optimizer_state(optimizer.state_dict())
        tensors.update(opt_tensors)
    meta["tensors_sha256"] = tensor_digest(tensors)
    header = {"cnnkit": json.dumps(meta)}
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_with(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, tmp, metadata=header))
    write_json_atomic(stem.with_suffix(".json"), meta)


def load_checkpoint(stem: Path) -> Checkpoint:
    """Read a checkpoint, after checking its tensors against the checksum in its header."""
    path = stem.with_suffix(".safetensors")
    if not path.is_file():
        raise RunError(f"checkpoint {path} is missing")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(path)
        meta = json.loads(header["cnnkit"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise RunError(f"{path}: unreadable or truncated checkpoint ({e}); it cannot be used") from None
    if tensor_digest(tensors) != meta.get("tensors_sha256"):
        raise RunError(f"{path}: checksum does not match the tensors; the checkpoint is corrupt and cannot be used")
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = _join_optimizer_state(tensors, meta["optimizer"]) if "optimizer" in meta else None
    extra = {k: v for k, v in tensors.items() if not k.startswith(("model.", "optim."))}
    return Checkpoint(state, meta, optim, extra)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
