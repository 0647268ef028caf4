"""Self-describing checkpoints: safetensors for tensors, JSON for everything else. No pickle.

A checkpoint is two files, NAME.safetensors and NAME.json. The JSON is written last and holds
the sha256 of the tensors file, so a torn or corrupted pair is detected and never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cnnkit.errors import RunError
from cnnkit.fileio import file_digest, save_with, write_json_atomic

STRIP_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile wrappers


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        for prefix in STRIP_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value.detach().contiguous().cpu().clone()
    return out


def save_checkpoint(
    stem: Path, model: torch.nn.Module, meta: dict[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> None:
    tensors = {f"model.{k}": v for k, v in model_state(model).items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _split_optimizer_state(optimizer.state_dict())
        tensors.update(opt_tensors)
    tensor_path = stem.with_suffix(".safetensors")
    save_with(tensor_path, lambda tmp: save_file(tensors, tmp))
    meta["tensors_sha256"] = file_digest(tensor_path)
    write_json_atomic(stem.with_suffix(".json"), meta)


def load_checkpoint(stem: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Return (model state dict, metadata, optimizer state dict or None), after checking integrity."""
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not json_path.is_file() or not tensor_path.is_file():
        raise RunError(f"checkpoint {stem} is missing ({json_path.name} and {tensor_path.name} are both needed)")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{json_path}: corrupt checkpoint metadata ({e})") from None
    if file_digest(tensor_path) != meta.get("tensors_sha256"):
        raise RunError(f"{tensor_path}: checksum does not match its metadata; the checkpoint is corrupt or torn")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as e:
        raise RunError(f"{tensor_path}: unreadable checkpoint ({e})") from None
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = _join_optimizer_state(tensors, meta["optimizer"]) if "optimizer" in meta else None
    return state, meta, optim


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
