"""Fine-tuning a pretrained backbone: which layers train when, and at what learning rate.

The network is cut into layer groups, from the input to the classifier, by timm's own
`group_matcher` (stem, then each stage of blocks, then the head). Strategies:

- frozen: only the classifier trains, for the whole run (the course's transfer learning; unlike
  linear-probe, every epoch sees newly augmented images).
- finetune: for `head_epochs` only the classifier trains (the backbone frozen, its BatchNorm in
  inference mode); then every layer trains. As fastai's `fine_tune` and Lightning's
  BackboneFinetuning.
- gradual: the same first phase; then one more group, from the top down, every `unfreeze_epochs`
  (ULMFiT's gradual unfreezing).

With `frozen_batchnorm` every BatchNorm layer keeps its ImageNet running statistics (inference
mode) once its group trains too; only its scale and shift learn: batches of 32 from a few hundred
photos give noisy statistics.

`keep_frozen` groups nearest the input never train: their backward pass is skipped, which on a
CPU is most of the cost at high resolution (Lite0 at 128 px: 55 images/s with every group
training, 105 with the top 5 of 9).

With `layer_lr_decay` < 1 each group below the classifier learns `layer_lr_decay` times slower
than the one above it (discriminative learning rates; BEiT's layer decay).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def layer_ids(model: nn.Module, coarse: bool) -> tuple[dict[str, int], int]:
    """Parameter name -> layer group (0 = nearest the input; the last = the classifier), and the
    number of groups. Models timm cannot group: everything but the classifier is one group."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        ids = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
    else:
        ids = {}
    names = [n for n, _ in model.named_parameters()]
    if not ids or max(ids.values()) == 0:
        head = _classifier_prefix(model)
        return {n: int(head is not None and n.startswith(head + ".")) for n in names}, 2
    top = max(ids.values())
    return {n: ids.get(n, top) for n in names}, top + 1


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("classifier")


def lr_scales(ids: dict[str, int], groups: int, decay: float) -> dict[str, float]:
    """Each parameter's learning-rate multiplier: 1 for the classifier, decay^k k groups below it."""
    return {n: decay ** (groups - 1 - g) for n, g in ids.items()}


class Unfreezer:
    """Decides, at each step, which layer groups train; frozen groups get no gradients and their
    BatchNorm layers keep their ImageNet statistics (inference mode)."""

    def __init__(self, model: nn.Module, strategy: str, head_steps: int, unfreeze_steps: int, keep_frozen: int = 0,
                 frozen_batchnorm: bool = False):
        self.model, self.strategy, self.frozen_batchnorm = model, strategy, frozen_batchnorm
        self.head_steps, self.unfreeze_steps = head_steps, max(unfreeze_steps, 1)
        self.ids, self.groups = layer_ids(model, coarse=True)
        self.most = max(1, self.groups - keep_frozen)  # the lowest keep_frozen groups never train
        self.trainable = -1  # groups (from the top) that train now; -1: not applied yet
        self._params = dict(model.named_parameters())
        self._norms = self._norm_groups(model)

    def _norm_groups(self, model: nn.Module) -> list[tuple[nn.Module, int]]:
        out = []
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                owned = [self.ids[f"{name}.{p}"] for p, _ in module.named_parameters(recurse=False)]
                if owned:
                    out.append((module, owned[0]))
        return out

    def groups_training(self, step: int) -> int:
        """How many groups (counted from the classifier down) train at `step`."""
        if step < self.head_steps or self.strategy == "frozen":
            return 1
        if self.strategy == "finetune":
            return self.most
        return min(self.most, 2 + (step - self.head_steps) // self.unfreeze_steps)

    def settled_step(self) -> int:
        """The first step from which the trainable groups no longer change: steps before it are
        cheaper (fewer backward passes), so they say little about the rest of the run's speed."""
        # groups_training never decreases: the first step at its final value, by bisection.
        lo, hi = 0, self.head_steps + self.most * self.unfreeze_steps
        final = self.groups_training(hi)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.groups_training(mid) == final else (mid + 1, hi)
        return lo

    def update(self, step: int) -> bool:
        """Set requires_grad for `step`; True when it changed."""
        n = self.groups_training(step)
        if n == self.trainable:
            return False
        self.trainable = n
        lowest = self.groups - n
        for name, p in self._params.items():
            p.requires_grad_(self.ids[name] >= lowest)
        return True

    def frozen_norms_to_eval(self) -> None:
        """Call after model.train(): frozen groups' BatchNorm layers keep their running statistics
        (with `frozen_batchnorm` every group's: their scales and shifts still train)."""
        lowest = self.groups - self.trainable
        for module, group in self._norms:
            if group < lowest or self.frozen_batchnorm:
                module.eval()

    def describe(self) -> str:
        return "the classifier" if self.trainable == 1 else (
            "every layer" if self.trainable == self.groups else f"the top {self.trainable} of {self.groups} layer groups")


def make_unfreezer(cfg: Any, model: nn.Module, steps_per_epoch: int) -> Unfreezer | None:
    if cfg.strategy not in ("frozen", "finetune", "gradual"):
        return None
    return Unfreezer(model, cfg.strategy, head_steps=int(round(cfg.head_epochs * steps_per_epoch)),
                     unfreeze_steps=int(math.ceil(cfg.unfreeze_epochs * steps_per_epoch)), keep_frozen=cfg.keep_frozen,
                     frozen_batchnorm=cfg.frozen_batchnorm)
