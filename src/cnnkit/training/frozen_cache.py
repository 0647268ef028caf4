"""The training step on kept outputs of the frozen lower layers (`cache_frozen`).

With `keep_frozen` the lowest layer groups of a pretrained backbone never train and their
BatchNorm layers keep their ImageNet statistics: they are a fixed function of the input image, so
a training image's output from them is the same in every epoch, up to augmentation. This step
computes it once per image and orientation (the image and its mirror, each when a batch first
asks for it), keeps it in memory in bf16, and otherwise runs only the layers that train, forward
and backward. Lite0 at 160 px with the top 4 of 9 groups training, on a 2-core Zen 4 capped to
AVX2: 97 images/s through the whole network, 154 from kept outputs, 335 through the frozen part
alone, which is what keeping costs (benchmarks/RESULTS.md, `transfer-speed-cached`).

What it does to augmentation: flips stay exact (both orientations are kept); `translate` by p
pixels becomes a shift of the kept maps by whole cells (one cell is the lower layers' stride, 16
pixels of the model's input for Lite0's stages 0-3), p scaled to the model's input and rounded, at
least one cell; any other op changes pixels the kept maps cannot follow and is refused.

Written here: neither PyTorch nor timm keeps a sub-network's outputs per training sample; this is
the loop's own step with the forward cut in two at timm's EfficientNet stages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cnnkit.augment import DEFAULT_P, Augment, alternating_flip_mask, op_params, translate
from cnnkit.errors import ConfigError
from cnnkit.finetune import Unfreezer
from cnnkit.inference import autocast, forward
from cnnkit.preprocess import Preprocess
from cnnkit.training.step import TrainStep

log = logging.getLogger(__name__)

CACHEABLE_OPS = ("hflip", "alternating_hflip", "translate")


class FrozenSplit:
    """A timm EfficientNet-family model cut where its frozen groups end: `bottom` (stem and the
    first stages) and `top(h)` (the rest, through the classifier)."""

    def __init__(self, model: nn.Module, keep_frozen: int, unfreezer: Unfreezer):
        needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
        if not all(hasattr(model, a) for a in needed):
            raise ConfigError(f"cache_frozen cuts an EfficientNet-family model (timm's conv_stem, blocks, conv_head); "
                              f"{type(model).__name__} is not one: drop --cache-frozen")
        stages = keep_frozen - 1  # group 0 is the stem, group i the i-th stage of blocks
        if not 1 <= keep_frozen <= len(model.blocks):
            raise ConfigError(f"cache_frozen needs keep_frozen between 1 and {len(model.blocks)} (the stem and up to "
                              f"all but the last stage of {type(model).__name__}); got {keep_frozen}")
        self.model, self.stages = model, stages
        self.bottom = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:stages])
        frozen = {n for n, g in unfreezer.ids.items() if g < keep_frozen}
        cut = {id(p) for p in self.bottom.parameters()}
        names = {n for n, p in model.named_parameters() if id(p) in cut}
        if names != frozen:  # the cut must be exactly the groups that never train
            raise ConfigError(f"cache_frozen: the first {keep_frozen} layer groups of {type(model).__name__} are not "
                              "its stem and first stages; drop --cache-frozen")

    @torch.no_grad()
    def output_shape(self, preprocess: Preprocess, device: torch.device) -> tuple[int, ...]:
        """(C, H, W) of the bottom's output for one image at the model's input size."""
        x = torch.zeros(1, preprocess.model_channels, preprocess.input_size, preprocess.input_size, device=device)
        with eval_mode(self.bottom):
            return tuple(self.bottom(x).shape[1:])

    def top(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        for stage in m.blocks[self.stages:]:
            h = stage(h)
        return m.forward_head(m.bn2(m.conv_head(h)))


class FrozenCacheStep(TrainStep):
    """TrainStep's order of operations with the frozen bottom's outputs kept per (image, flip)."""

    def __init__(self, step: TrainStep, split: FrozenSplit, images: int, cell_shift: int, fill: str):
        super().__init__(step.net, step.preprocess, step.augment, step.loss_fn, step.num_classes, step.device,
                         step.precision, step.channels_last, step.seed)
        self.split, self.cell_shift, self.fill = split, cell_shift, fill
        self.flip_rule = flip_rule(step.augment, step.seed)
        self.kept: torch.Tensor | None = None  # (images, 2 orientations, C, H, W), bf16, allocated at first use
        self.filled = torch.zeros(images, 2, dtype=torch.bool)

    @property
    def bottom_images(self) -> int:
        """Images passed through the bottom so far (each (image, flip) once)."""
        return int(self.filled.sum())

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, rng: torch.Generator, *,
                 ids: torch.Tensor | None = None, epoch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is None:
            raise ValueError("FrozenCacheStep needs the batch's sample ids")
        ids = ids.cpu().long()
        flips = self.flip_rule(ids, epoch, rng).long()
        self._fill(images, ids, flips)
        h = self.kept[ids.to(self.kept.device), flips.to(self.kept.device)].to(self.device, torch.float32)
        if self.cell_shift:
            h = translate(h, rng, pixels=self.cell_shift, fill=self.fill)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            logits = self.split.top(h)
        return self.loss_fn(logits.float(), labels), logits

    @torch.no_grad()
    def _fill(self, images: torch.Tensor, ids: torch.Tensor, flips: torch.Tensor) -> None:
        missing = ~self.filled[ids, flips]
        if not missing.any():
            return
        where = missing.nonzero().squeeze(1)
        x = self.preprocess.to_float(images[where.to(images.device)])
        mirror = flips[where].bool().to(x.device)[:, None, None, None]
        x = torch.where(mirror, x.flip(-1), x)
        with eval_mode(self.split.bottom):
            h = forward(self.split.bottom, self.preprocess, x, self.device, self.precision, self.channels_last)
        if self.kept is None:
            self.kept = torch.empty((len(self.filled), 2, *h.shape[1:]), dtype=torch.bfloat16, device=self.device)
            log.info("cache_frozen: keeping the frozen layers' outputs, %s per image and orientation, %.2f GB in all",
                     "x".join(map(str, h.shape[1:])), self.kept.numel() * 2 / 1e9)
        self.kept[ids[where].to(self.device), flips[where].to(self.device)] = h.to(torch.bfloat16)
        self.filled[ids[where], flips[where]] = True


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """Every module of `net` in inference mode for the block, each back to its own mode after:
    the frozen BatchNorm layers are in inference mode already, other modules (dropout, drop path)
    must be too for the outputs to be a fixed function of the image."""
    modes = {m: m.training for m in net.modules()}
    for m in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def flip_rule(augment: Augment, seed: int) -> Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]:
    """Which orientation each sample trains in, by the augmentation's flip op (none: never mirrored)."""
    for spec in augment.ops:
        if spec["op"] == "alternating_hflip":
            return lambda ids, epoch, rng: alternating_flip_mask(ids, epoch, seed)
        if spec["op"] == "hflip":
            p = float(spec.get("p", DEFAULT_P["hflip"]))
            return lambda ids, epoch, rng: torch.rand(len(ids), generator=rng) < p
    return lambda ids, epoch, rng: torch.zeros(len(ids), dtype=torch.bool)


def check_cacheable(augment: Augment, progressive_sizes: list[int]) -> None:
    """Refuse what the kept outputs cannot follow, saying what to do."""
    other = [spec["op"] for spec in augment.ops if spec["op"] not in CACHEABLE_OPS]
    if other:
        raise ConfigError(f"cache_frozen keeps the frozen layers' outputs of each training image and its mirror, so "
                          f"it can follow flips and translate only, not {', '.join(other)}: set --augment to flips "
                          "and shifts (e.g. cifar10), or drop --cache-frozen")
    if progressive_sizes:
        raise ConfigError("cache_frozen keeps outputs at one input size; progressive_sizes changes it: use one or the other")


def cell_shift(augment: Augment, preprocess: Preprocess, bottom_stride: int) -> tuple[int, str]:
    """translate's pixels as whole cells of the kept maps (at least one), and its fill."""
    for spec in augment.ops:
        if spec["op"] == "translate":
            params = {**op_params(translate), **spec}  # the op's own defaults where the recipe sets none
            pixels = int(params["pixels"]) * preprocess.input_size / preprocess.data_size
            return max(1, round(pixels / bottom_stride)), params["fill"]
    return 0, op_params(translate)["fill"]


def cached_step(cfg: Any, step: TrainStep, model: nn.Module, unfreezer: Unfreezer | None, images: int) -> TrainStep:
    """`step` on kept outputs of the frozen layers where `cfg.cache_frozen` asks and they fit in
    `cfg.cache_frozen_gb`; otherwise `step` itself (a warning says why)."""
    if not cfg.cache_frozen:
        return step
    if unfreezer is None or cfg.keep_frozen < 1:
        raise ConfigError("cache_frozen keeps the outputs of layers that never train: it needs --strategy finetune, "
                          "gradual or frozen with --keep-frozen 1 or more")
    if step.net is not model:
        raise ConfigError("cache_frozen runs the layers that train itself: not with --compile or several processes")
    check_cacheable(step.augment, cfg.progressive_sizes)
    split = FrozenSplit(model, cfg.keep_frozen, unfreezer)
    shape = split.output_shape(step.preprocess, step.device)
    gb = images * 2 * math.prod(shape) * 2 / 1e9  # two orientations, bf16
    if gb > cfg.cache_frozen_gb:
        log.warning("cache_frozen: the frozen layers' outputs would take %.1f GB (%d images x 2 orientations x %s, "
                    "bf16), over cache_frozen_gb = %g: training through every layer instead", gb, images,
                    "x".join(map(str, shape)), cfg.cache_frozen_gb)
        return step
    shift, fill = cell_shift(step.augment, step.preprocess, step.preprocess.input_size // shape[-1])
    log.info("cache_frozen: the first %d layer groups run once per training image and orientation (up to %.2f GB)%s",
             cfg.keep_frozen, gb, f"; translate becomes a shift of their outputs by up to {shift} cell(s)" if shift else "")
    return FrozenCacheStep(step, split, images, shift, fill)
