"""Batched data augmentation on the training device, with per-sample random parameters.

Augmentations take float batches in [0, 1] of shape (B, C, H, W) and a torch.Generator, so the
same seed gives the same augmented batches. They are configured as data (a list of ops with
parameters) or by preset name, e.g. in a recipe:

    augment = "seed"
    augment = [{op = "affine", rotation_range = 20}, {op = "hflip", p = 0.5}]

`affine` uses the parameter names and meanings of Keras' ImageDataGenerator, so the course's
settings carry over one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError

AugmentSpec = str | list[dict[str, Any]]

PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    # The course's ImageDataGenerator(rotation_range=20, width_shift_range=0.2,
    # height_shift_range=0.2, horizontal_flip=True); Keras' default fill_mode is "nearest".
    "seed": [
        {"op": "affine", "rotation_range": 20, "width_shift_range": 0.2, "height_shift_range": 0.2},
        {"op": "hflip", "p": 0.5},
    ],
}

# Keras fill_mode -> grid_sample padding_mode
FILL_MODES = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low


def affine(
    x: torch.Tensor,
    g: torch.Generator,
    *,
    rotation_range: float = 0.0,
    width_shift_range: float = 0.0,
    height_shift_range: float = 0.0,
    zoom_range: float | list[float] = 0.0,
    shear_range: float = 0.0,
    fill_mode: str = "nearest",
    p: float = 1.0,
) -> torch.Tensor:
    """Random rotation (degrees), shifts (fractions of width/height), zoom and shear (degrees)."""
    if fill_mode not in FILL_MODES:
        raise ConfigError(f"affine: fill_mode must be one of {list(FILL_MODES)}, got {fill_mode!r}")
    b, _, h, w = x.shape
    zlo, zhi = (1 - zoom_range, 1 + zoom_range) if isinstance(zoom_range, (int, float)) else zoom_range
    angle = torch.deg2rad(_uniform(b, -rotation_range, rotation_range, g))
    shear = torch.deg2rad(_uniform(b, -shear_range, shear_range, g))
    tx = _uniform(b, -width_shift_range, width_shift_range, g) * w
    ty = _uniform(b, -height_shift_range, height_shift_range, g) * h
    zx, zy = _uniform(b, zlo, zhi, g), _uniform(b, zlo, zhi, g)
    apply = torch.rand(b, generator=g) < p
    # Output pixel -> input pixel in centred pixel coordinates: rotation, then shear, then zoom.
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.zeros(b, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = cos * zx
    m[:, 0, 1] = (-sin * torch.cos(shear) + cos * torch.sin(shear)) * zy
    m[:, 1, 0] = sin * zx
    m[:, 1, 1] = (sin * torch.sin(shear) + cos * torch.cos(shear)) * zy
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    # To grid_sample's normalised coordinates, where x runs over [-1, 1] across the width.
    s = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    theta = m.clone()
    theta[:, :, :2] = m[:, :, :2] * s[None, None, :] / s[None, :, None]
    theta[:, :, 2] = m[:, :, 2] / s[None, :]
    identity = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.float64)
    theta[~apply] = identity
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=FILL_MODES[fill_mode], align_corners=False)


def _flip(dim: int) -> Callable[..., torch.Tensor]:
    def flip(x: torch.Tensor, g: torch.Generator, *, p: float = 0.5) -> torch.Tensor:
        mask = (torch.rand(x.shape[0], generator=g) < p).to(x.device)
        return torch.where(mask[:, None, None, None], x.flip(dim), x)

    return flip


OPS: dict[str, Callable[..., torch.Tensor]] = {"affine": affine, "hflip": _flip(-1), "vflip": _flip(-2)}


class Augment:
    """A list of ops applied in order. Call with a float batch and a generator."""

    def __init__(self, ops: list[dict[str, Any]]):
        self.ops = [dict(op) for op in ops]
        self._calls = []
        for spec in self.ops:
            params = {k: v for k, v in spec.items() if k != "op"}
            name = spec.get("op")
            if name not in OPS:
                raise ConfigError(f"unknown augmentation op {name!r}; available: {', '.join(OPS)}")
            _check_params(name, OPS[name], params)
            self._calls.append((OPS[name], params))

    def __bool__(self) -> bool:
        return bool(self._calls)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for fn, params in self._calls:
            x = fn(x, g, **params)
        return x


def build_augment(spec: AugmentSpec | None) -> Augment:
    if spec is None:
        return Augment([])
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"unknown augmentation preset {spec!r}; available: {', '.join(PRESETS)}")
        return Augment(PRESETS[spec])
    if not isinstance(spec, list) or not all(isinstance(op, dict) for op in spec):
        raise ConfigError("augment must be a preset name or a list of ops like [{op = 'hflip', p = 0.5}]")
    return Augment(spec)


def _check_params(name: str, fn: Callable[..., Any], params: dict[str, Any]) -> None:
    code = fn.__code__
    allowed = set(code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount])
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(f"augmentation op {name!r}: unknown parameter(s) {sorted(unknown)}; known: {sorted(allowed)}")
    for key, value in params.items():
        if isinstance(value, (int, float)) and (math.isnan(value) or (key == "p" and not 0 <= value <= 1)):
            raise ConfigError(f"augmentation op {name!r}: bad value {key}={value}")
