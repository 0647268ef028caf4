"""Batched data augmentation on the training device, with per-sample random parameters.

Every op takes a float batch in [0, 1] of shape (B, C, H, W) and a torch.Generator, so the same
seed gives the same augmented batches on the CPU. Ops are configured as data, a preset name or a
list of ops with their parameters, e.g. in a recipe:

    augment = "light"
    augment = [{op = "affine", rotation_range = 20, width_shift_range = 0.2}, {op = "hflip"}]

Every image op also takes `p`, the probability that a sample is changed at all. `affine` uses
the parameter names and meanings of Keras' ImageDataGenerator, so the course's settings carry
over one to one. Label-mixing ops (mixup, cutmix) run last and turn labels into soft targets.

Why hand-written: torchvision.transforms.v2 draws one set of parameters per batch, not per
sample; kornia draws per sample but from the global RNG (no generator), and on this 2-core CPU
its colour jitter took 50 ms per 512 CIFAR images and its affine 1.5 ms per 64 Fashion-MNIST
images against 0.6 ms here. All geometric ops below share one warp (affine_grid + grid_sample).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError

AugmentSpec = str | list[dict[str, Any]]
Tensor = torch.Tensor

# Keras fill_mode (and the pad-and-crop names) -> grid_sample padding_mode
FILL_MODES = {"nearest": "border", "edge": "border", "constant": "zeros", "zero": "zeros", "reflect": "reflection"}


# -- random draws (all from the generator, on the CPU, then moved: reproducible on any device)


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low


def _coin(n: int, p: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) < p


def _sign(n: int, g: torch.Generator) -> Tensor:
    return torch.where(_coin(n, 0.5, g), 1.0, -1.0).double()


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


# -- the one warp


def warp(x: Tensor, m: Tensor, fill: str = "zero") -> Tensor:
    """Resample x with per-sample matrices m (B, 2, 3) mapping output to input pixel coordinates,
    both centred on the image centre. fill: zero, nearest/edge or reflect."""
    if fill not in FILL_MODES:
        raise ConfigError(f"fill mode must be one of {sorted(FILL_MODES)}, got {fill!r}")
    _, _, h, w = x.shape
    # To grid_sample's normalised coordinates, where x runs over [-1, 1] across the width.
    s = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    theta = m.clone()
    theta[:, :, :2] = m[:, :, :2] * s[None, None, :] / s[None, :, None]
    theta[:, :, 2] = m[:, :, 2] / s[None, :]
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=FILL_MODES[fill], align_corners=False)


def affine_matrix(angle: Tensor, shear_x: Tensor, shear_y: Tensor, zx: Tensor, zy: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Output -> input pixel mapping: rotation (radians), then shear, then zoom, then shift (pixels)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    # Keras' shear: x' = x - sin(s) y, y' = cos(s) y; the y-shear is its transpose.
    shear = torch.stack([torch.stack([one, -torch.sin(shear_x)], -1), torch.stack([zero, torch.cos(shear_x)], -1)], -2)
    shear = shear @ torch.stack([torch.stack([torch.cos(shear_y), zero], -1), torch.stack([-torch.sin(shear_y), one], -1)], -2)
    zoom = torch.diag_embed(torch.stack([zx, zy], -1))
    m = torch.zeros(len(angle), 2, 3, dtype=torch.float64)
    m[:, :, :2] = rot @ shear @ zoom
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def identity_params(n: int) -> dict[str, Tensor]:
    z = torch.zeros(n, dtype=torch.float64)
    return {"angle": z, "shear_x": z, "shear_y": z, "zx": z + 1, "zy": z + 1, "tx": z, "ty": z}


# -- geometric ops


def affine(
    x: Tensor, g: torch.Generator, *, rotation_range: float = 0.0, width_shift_range: float = 0.0,
    height_shift_range: float = 0.0, zoom_range: float | list[float] = 0.0, shear_range: float = 0.0,
    horizontal_flip: bool = False, vertical_flip: bool = False, fill_mode: str = "nearest",
) -> Tensor:
    """Keras ImageDataGenerator: rotation in degrees, shifts as fractions of width/height, zoom
    factor in [1 - z, 1 + z] per axis, shear angle in degrees, and optional random flips."""
    b, _, h, w = x.shape
    zlo, zhi = (1 - zoom_range, 1 + zoom_range) if isinstance(zoom_range, (int, float)) else zoom_range
    params = {
        "angle": torch.deg2rad(_uniform(b, -rotation_range, rotation_range, g)),
        "shear_x": torch.deg2rad(_uniform(b, -shear_range, shear_range, g)),
        "shear_y": torch.zeros(b, dtype=torch.float64),
        "zx": _uniform(b, zlo, zhi, g), "zy": _uniform(b, zlo, zhi, g),
        "tx": _uniform(b, -width_shift_range, width_shift_range, g) * w,
        "ty": _uniform(b, -height_shift_range, height_shift_range, g) * h,
    }
    if rotation_range or shear_range or width_shift_range or height_shift_range or zoom_range:
        x = warp(x, affine_matrix(**params), fill_mode)
    if horizontal_flip:
        x = _random_flip(x, g, -1)
    if vertical_flip:
        x = _random_flip(x, g, -2)
    return x


def hflip(x: Tensor, g: torch.Generator) -> Tensor:
    """Mirror left-right (each sample with probability p, 0.5 by default)."""
    return x.flip(-1)


def vflip(x: Tensor, g: torch.Generator) -> Tensor:
    """Mirror top-bottom (each sample with probability p, 0.5 by default)."""
    return x.flip(-2)


def alternating_hflip(x: Tensor, g: torch.Generator, *, ids: Tensor | None = None, epoch: int = 1, seed: int = 0) -> Tensor:
    """airbench's alternating flip: every training image is mirrored in every other epoch, half of
    them from the first epoch on, the other half from the second. Any two consecutive epochs show
    each image both ways, where a random flip shows a quarter of them one way only. Which half an
    image is in depends on (seed, sample id). Without sample ids (previews) it is a random flip."""
    if ids is None:
        return _random_flip(x, g, -1)
    flip = alternating_flip_mask(ids, epoch, seed)
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def alternating_flip_mask(ids: Tensor, epoch: int, seed: int) -> Tensor:
    """Which of the samples `ids` alternating_hflip mirrors in `epoch` (bool, one per sample)."""
    return (_hash32(ids.to(torch.int64) + seed * 1_000_003) + epoch) % 2 == 1


def _hash32(k: Tensor) -> Tensor:
    """A 32-bit integer hash (Mueller's): nearby keys give unrelated bits."""
    h = k & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _random_flip(x: Tensor, g: torch.Generator, dim: int) -> Tensor:
    mask = _coin(x.shape[0], 0.5, g).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(dim), x)


def translate(x: Tensor, g: torch.Generator, *, pixels: int = 2, fill: str = "reflect") -> Tensor:
    """Pad-and-crop: shift each image by a whole number of pixels in [-pixels, pixels] per axis."""
    b, _, h, w = x.shape
    mode = {"zero": "constant", "constant": "constant", "reflect": "reflect", "edge": "replicate", "nearest": "replicate"}
    if fill not in mode:
        raise ConfigError(f"translate: fill must be one of {sorted(mode)}, got {fill!r}")
    padded = F.pad(x, (pixels,) * 4, mode=mode[fill])
    dx = torch.randint(0, 2 * pixels + 1, (b,), generator=g).to(x.device)
    dy = torch.randint(0, 2 * pixels + 1, (b,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_resized_crop(
    x: Tensor, g: torch.Generator, *, scale: list[float] = (0.35, 1.0), ratio: list[float] = (3 / 4, 4 / 3)
) -> Tensor:
    """Crop a random area fraction `scale` with aspect `ratio` and resize it back to the full size."""
    b, _, h, w = x.shape
    area = _uniform(b, scale[0], scale[1], g)
    r = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), g))
    cw, ch = torch.sqrt(area * r).clamp(max=1.0), torch.sqrt(area / r).clamp(max=1.0)
    params = identity_params(b)
    params.update(zx=cw, zy=ch, tx=_uniform(b, -1, 1, g) * (1 - cw) * w / 2, ty=_uniform(b, -1, 1, g) * (1 - ch) * h / 2)
    return warp(x, affine_matrix(**params), "reflect")


# -- photometric ops (values stay in [0, 1])


def _grey(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def brightness(x: Tensor, g: torch.Generator, *, factor: float = 0.2) -> Tensor:
    """Multiply by a factor in [1 - factor, 1 + factor]."""
    return (x * _per_sample(_uniform(len(x), 1 - factor, 1 + factor, g), x)).clamp(0, 1)


def contrast(x: Tensor, g: torch.Generator, *, factor: float = 0.2) -> Tensor:
    """Scale the distance from the mean grey level by a factor in [1 - factor, 1 + factor]."""
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * _per_sample(_uniform(len(x), 1 - factor, 1 + factor, g), x) + mean).clamp(0, 1)


def saturation(x: Tensor, g: torch.Generator, *, factor: float = 0.2) -> Tensor:
    """Scale the distance from the grey image by a factor in [1 - factor, 1 + factor] (RGB only)."""
    f = _per_sample(_uniform(len(x), 1 - factor, 1 + factor, g), x)
    if x.shape[1] == 1:
        return x
    grey = _grey(x)
    return (grey + (x - grey) * f).clamp(0, 1)


def hue(x: Tensor, g: torch.Generator, *, shift: float = 0.05) -> Tensor:
    """Rotate hue by up to `shift` of a full turn (a rotation of the chroma plane in YIQ space)."""
    angle = _uniform(len(x), -shift, shift, g) * 2 * math.pi
    if x.shape[1] == 1:
        return x
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(x), 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(device=x.device, dtype=x.dtype)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def color_jitter(x: Tensor, g: torch.Generator, *, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2, hue: float = 0.0) -> Tensor:
    """Brightness, contrast, saturation and hue in turn (torchvision's ColorJitter amounts)."""
    for op, amount in ((_brightness, brightness), (_contrast, contrast), (_saturation, saturation)):
        if amount:
            x = op(x, g, factor=amount)
    return _hue(x, g, shift=hue) if hue else x


# color_jitter's keyword names (torchvision's) shadow these functions inside it, hence the aliases.
_brightness, _contrast, _saturation, _hue = brightness, contrast, saturation, hue


def gamma(x: Tensor, g: torch.Generator, *, range: list[float] = (0.8, 1.25)) -> Tensor:  # noqa: A002
    """Raise to a power drawn log-uniformly from `range`."""
    gm = torch.exp(_uniform(len(x), math.log(range[0]), math.log(range[1]), g))
    return x.clamp_min(1e-6).pow(_per_sample(gm, x))


def noise(x: Tensor, g: torch.Generator, *, std: float = 0.05) -> Tensor:
    """Gaussian noise with a per-sample standard deviation drawn from [0, std]."""
    sigma = _per_sample(_uniform(len(x), 0, std, g), x)
    return (x + sigma * torch.randn(x.shape, generator=g).to(x.device, x.dtype)).clamp(0, 1)


def blur(x: Tensor, g: torch.Generator, *, sigma: list[float] = (0.1, 1.0), kernel: int = 5) -> Tensor:
    """Gaussian blur with a per-sample sigma (separable, one grouped convolution per axis)."""
    b, c, h, w = x.shape
    s = _uniform(b, sigma[0], sigma[1], g)
    r = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    k = torch.exp(-(r[None] ** 2) / (2 * s[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device, x.dtype)  # (B*C, k)
    y = F.pad(x.reshape(1, b * c, h, w), (kernel // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


# -- occlusion


def _boxes(b: int, h: int, w: int, bh: Tensor, bw: Tensor, g: torch.Generator, device) -> Tensor:
    """Boolean masks (B, 1, H, W) of boxes of sizes (bh, bw) at random positions inside the image."""
    top = (torch.rand(b, generator=g) * (h - bh + 1).double()).long()
    left = (torch.rand(b, generator=g) * (w - bw + 1).double()).long()
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None].to(device)


def erasing(x: Tensor, g: torch.Generator, *, scale: list[float] = (0.02, 0.25), ratio: list[float] = (0.3, 3.3),
            value: float | str = "random") -> Tensor:
    """Random erasing: a box of random area and aspect filled with noise (`random`) or a value."""
    b, c, h, w = x.shape
    area = _uniform(b, scale[0], scale[1], g) * h * w
    r = torch.exp(_uniform(b, math.log(ratio[0]), math.log(ratio[1]), g))
    bh = torch.sqrt(area * r).round().long().clamp(1, h)
    bw = torch.sqrt(area / r).round().long().clamp(1, w)
    mask = _boxes(b, h, w, bh, bw, g, x.device)
    fill = torch.rand(x.shape, generator=g).to(x.device, x.dtype) if value == "random" else torch.full_like(x, float(value))
    return torch.where(mask, fill, x)


def cutout(x: Tensor, g: torch.Generator, *, size: int = 8, value: float = 0.5) -> Tensor:
    """A size x size square (clipped at the borders) filled with `value`."""
    b, _, h, w = x.shape
    # The square's centre is anywhere in the image, so it may hang over the border (DeVries & Taylor).
    top = torch.randint(0, h, (b,), generator=g)[:, None] - size // 2
    left = torch.randint(0, w, (b,), generator=g)[:, None] - size // 2
    rows, cols = torch.arange(h)[None], torch.arange(w)[None]
    in_rows = (rows >= top) & (rows < top + size)
    in_cols = (cols >= left) & (cols < left + size)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None].to(x.device)
    return torch.where(mask, torch.full_like(x, value), x)


# -- policies: one op per sample per layer, chosen at random, with a magnitude in [0, 1]


def _policy_warp(kind: str) -> Callable[[Tensor, Tensor, torch.Generator], Tensor]:
    def op(x: Tensor, mag: Tensor, g: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        signed = mag * _sign(b, g)
        p = identity_params(b)
        if kind == "rotate":
            p["angle"] = torch.deg2rad(30 * signed)
        elif kind == "shear_x":
            p["shear_x"] = torch.atan(0.3 * signed)
        elif kind == "shear_y":
            p["shear_y"] = torch.atan(0.3 * signed)
        elif kind == "translate_x":
            p["tx"] = 0.3 * signed * w
        else:
            p["ty"] = 0.3 * signed * h
        return warp(x, affine_matrix(**p), "zero")

    return op


def _policy_enhance(fn: Callable[..., Tensor], **fixed: Any) -> Callable[[Tensor, Tensor, torch.Generator], Tensor]:
    """Brightness-like ops: factor 1 + 0.9 * magnitude * random sign."""

    def op(x: Tensor, mag: Tensor, g: torch.Generator) -> Tensor:
        f = _per_sample(1 + 0.9 * mag * _sign(len(x), g), x)
        return fn(x, f, **fixed)

    return op


def _blend_with(target: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def blend(x: Tensor, f: Tensor) -> Tensor:
        base = target(x)
        return (base + (x - base) * f).clamp(0, 1)

    return blend


def _solarize(x: Tensor, mag: Tensor, g: torch.Generator) -> Tensor:
    threshold = _per_sample(1 - mag, x)
    return torch.where(x >= threshold, 1 - x, x)


def _posterize(x: Tensor, mag: Tensor, g: torch.Generator) -> Tensor:
    levels = _per_sample(2 ** (8 - (4 * mag).round()), x)
    return torch.floor(x * (levels - 1e-3)) / (levels - 1)


def _autocontrast(x: Tensor, mag: Tensor, g: torch.Generator) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-3)).clamp(0, 1)


POLICY_OPS: dict[str, Callable[[Tensor, Tensor, torch.Generator], Tensor]] = {
    "identity": lambda x, mag, g: x,
    "rotate": _policy_warp("rotate"),
    "shear_x": _policy_warp("shear_x"),
    "shear_y": _policy_warp("shear_y"),
    "translate_x": _policy_warp("translate_x"),
    "translate_y": _policy_warp("translate_y"),
    "brightness": _policy_enhance(_blend_with(torch.zeros_like)),
    "contrast": _policy_enhance(_blend_with(lambda x: _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x))),
    "color": _policy_enhance(_blend_with(lambda x: _grey(x).expand_as(x))),
    "sharpness": _policy_enhance(_blend_with(lambda x: blur(x, torch.Generator().manual_seed(0), sigma=(1.0, 1.0), kernel=3))),
    "solarize": _solarize,
    "posterize": _posterize,
    "autocontrast": _autocontrast,
}


def _apply_policy(x: Tensor, g: torch.Generator, layers: int, magnitude: Tensor | None, ops: list[str] | None) -> Tensor:
    names = ops or list(POLICY_OPS)
    unknown = set(names) - set(POLICY_OPS)
    if unknown:
        raise ConfigError(f"unknown policy op(s) {sorted(unknown)}; available: {', '.join(POLICY_OPS)}")
    b = x.shape[0]
    for _ in range(layers):
        choice = torch.randint(0, len(names), (b,), generator=g)
        mag = magnitude if magnitude is not None else _uniform(b, 0, 1, g)
        out = x.clone()
        for i, name in enumerate(names):
            idx = (choice == i).nonzero().squeeze(1)
            if len(idx):
                out[idx.to(x.device)] = POLICY_OPS[name](x[idx.to(x.device)], mag[idx], g)
        x = out
    return x


def randaugment(x: Tensor, g: torch.Generator, *, n: int = 2, m: float = 9, ops: list[str] | None = None) -> Tensor:
    """RandAugment: n random ops per sample at a fixed magnitude m (0-30 scale, as the paper's)."""
    return _apply_policy(x, g, n, torch.full((x.shape[0],), min(m, 30) / 30, dtype=torch.float64), ops)


def trivialaugment(x: Tensor, g: torch.Generator, *, ops: list[str] | None = None) -> Tensor:
    """TrivialAugment: one random op per sample with a uniformly random magnitude."""
    return _apply_policy(x, g, 1, None, ops)


# -- label mixing: (x, soft targets) -> (x, soft targets)


def _beta(alpha: float, g: torch.Generator) -> float:
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(x: Tensor, y: Tensor, g: torch.Generator, *, alpha: float = 0.2) -> tuple[Tensor, Tensor]:
    """Blend each image and its label with another of the batch, weight ~ Beta(alpha, alpha)."""
    lam = _beta(alpha, g)
    perm = torch.randperm(len(x), generator=g).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def cutmix(x: Tensor, y: Tensor, g: torch.Generator, *, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """Paste a box of another image of the batch; labels mixed by the pasted area."""
    b, _, h, w = x.shape
    lam = _beta(alpha, g)
    perm = torch.randperm(b, generator=g).to(x.device)
    bh = torch.full((b,), round(h * math.sqrt(1 - lam)), dtype=torch.long)
    bw = torch.full((b,), round(w * math.sqrt(1 - lam)), dtype=torch.long)
    mask = _boxes(1, h, w, bh[:1], bw[:1], g, x.device).expand(b, 1, h, w)
    pasted = mask.float().mean().item()  # the label weight follows the area actually pasted
    return torch.where(mask, x[perm], x), (1 - pasted) * y + pasted * y[perm]


# -- registry, presets and the pipeline

IMAGE_OPS: dict[str, Callable[..., Tensor]] = {
    "affine": affine, "hflip": hflip, "alternating_hflip": alternating_hflip, "vflip": vflip, "translate": translate,
    "random_resized_crop": random_resized_crop, "brightness": brightness, "contrast": contrast,
    "saturation": saturation, "hue": hue, "color_jitter": color_jitter, "gamma": gamma, "noise": noise,
    "blur": blur, "erasing": erasing, "cutout": cutout, "randaugment": randaugment,
    "trivialaugment": trivialaugment,
}
MIX_OPS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"mixup": mixup, "cutmix": cutmix}
DEFAULT_P = {"hflip": 0.5, "vflip": 0.5}  # every other op changes every sample unless p says otherwise
# Given by the training loop, not by the recipe: the batch's sample ids, the epoch and the seed.
CONTEXT_PARAMS = ("ids", "epoch", "seed")

PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    # The course's ImageDataGenerator(rotation_range=20, width_shift_range=0.2,
    # height_shift_range=0.2, horizontal_flip=True); Keras' default fill_mode is "nearest".
    "seed": [{"op": "affine", "rotation_range": 20, "width_shift_range": 0.2, "height_shift_range": 0.2,
              "horizontal_flip": True}],
    "light": [{"op": "hflip"}, {"op": "translate", "pixels": 2, "fill": "reflect"}],
    "strong": [{"op": "hflip"}, {"op": "translate", "pixels": 2, "fill": "reflect"},
               {"op": "trivialaugment"}, {"op": "erasing", "p": 0.25}],
    # Per-dataset defaults. Fashion-MNIST: garments are centred and upright, and on the course's
    # CNN a flip cost about a point while a 2-pixel shift cost nothing (benchmarks/RESULTS.md).
    # CIFAR-10: mirrored photos are still photos of the class; upside-down ones are not, so no vflip.
    "fashion-mnist": [{"op": "translate", "pixels": 2, "fill": "zero"}],
    "cifar10": [{"op": "hflip"}, {"op": "translate", "pixels": 2, "fill": "reflect"}],
}


class Augment:
    """A list of ops applied in order; label-mixing ops after all image ops."""

    def __init__(self, ops: list[dict[str, Any]]):
        self.ops = [dict(op) for op in ops]
        self.image_ops: list[tuple[Callable[..., Tensor], float, dict[str, Any], bool]] = []
        self.mix_ops: list[tuple[Callable[..., tuple[Tensor, Tensor]], float, dict[str, Any]]] = []
        for spec in self.ops:
            name = spec.get("op")
            params = {k: v for k, v in spec.items() if k not in ("op", "p")}
            p = spec.get("p", DEFAULT_P.get(name, 1.0))
            if not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ConfigError(f"augmentation op {name!r}: p must be a probability in [0, 1], got {p!r}")
            if name in IMAGE_OPS:
                _check_params(name, IMAGE_OPS[name], params)
                wants_context = "ids" in inspect.signature(IMAGE_OPS[name]).parameters
                self.image_ops.append((IMAGE_OPS[name], float(p), params, wants_context))
            elif name in MIX_OPS:
                _check_params(name, MIX_OPS[name], params)
                self.mix_ops.append((MIX_OPS[name], float(p), params))
            else:
                raise ConfigError(f"unknown augmentation op {name!r}; available: {', '.join([*IMAGE_OPS, *MIX_OPS])}")

    def __bool__(self) -> bool:
        return bool(self.image_ops or self.mix_ops)

    @property
    def mixes_labels(self) -> bool:
        return bool(self.mix_ops)

    def __call__(self, x: Tensor, g: torch.Generator, *, ids: Tensor | None = None, epoch: int = 1, seed: int = 0) -> Tensor:
        """Augment batch `x`; `ids` (the samples' indices in the split), `epoch` and `seed` are for
        ops that treat a sample differently from epoch to epoch (alternating_hflip)."""
        for fn, p, params, wants_context in self.image_ops:
            context = dict(ids=ids, epoch=epoch, seed=seed) if wants_context else {}
            if p >= 1:
                x = fn(x, g, **params, **context)
            else:
                idx = _coin(len(x), p, g).nonzero().squeeze(1).to(x.device)
                if len(idx):
                    if context and ids is not None:
                        context["ids"] = ids[idx.to(ids.device)]
                    x = x.clone()
                    x[idx] = fn(x[idx], g, **params, **context)
        return x

    def mix(self, x: Tensor, labels: Tensor, num_classes: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Apply the label-mixing ops; returns soft targets (B, num_classes) that sum to 1."""
        y = F.one_hot(labels, num_classes).to(x.dtype)
        for fn, p, params in self.mix_ops:
            if bool(_coin(1, p, g)):
                x, y = fn(x, y, g, **params)
        return x, y


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


def op_params(fn: Callable[..., Any]) -> dict[str, Any]:
    """The parameters a recipe may set on an op, with their defaults."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name not in CONTEXT_PARAMS}


def _check_params(name: str, fn: Callable[..., Any], params: dict[str, Any]) -> None:
    allowed = set(op_params(fn))
    unknown = set(params) - allowed
    if unknown:
        raise ConfigError(f"augmentation op {name!r}: unknown parameter(s) {sorted(unknown)}; known: {sorted(allowed) or 'none'}")
    for key, value in params.items():
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"augmentation op {name!r}: {key} is NaN")


# -- test-time augmentation

TTA_MODES = ("none", "flip", "shift", "flip-shift")


def tta_views(x: Tensor, mode: str) -> list[Tensor]:
    """The views whose logits are averaged: the image, its mirror (flip), the image shifted by one
    pixel diagonally each way (shift), or all of these and the shifted mirrors (flip-shift).
    `shift` is for datasets whose mirror images are unlike the test set (Fashion-MNIST's shoes
    all point left)."""
    if mode == "none":
        return [x]
    views = [x] if mode == "shift" else [x, x.flip(-1)]
    if mode in ("shift", "flip-shift"):
        for d in (1, -1):
            shifted = _shift(x, d)
            views += [shifted] if mode == "shift" else [shifted, shifted.flip(-1)]
    return views


def tta_view_count(mode: str) -> int:
    """How many views `tta_views` gives in `mode`: each costs one forward pass per image."""
    return len(tta_views(torch.zeros(1, 1, 2, 2), mode))


def _shift(x: Tensor, d: int) -> Tensor:
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., 1 + d : 1 + d + h, 1 + d : 1 + d + w]
