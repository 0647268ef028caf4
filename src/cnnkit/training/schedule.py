"""The learning-rate schedule: a multiplier of each group's peak rate at every step."""

from __future__ import annotations

import math


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """The schedule's warm-up: at most half of it, so that a run shortened (by a budget, or
    --epochs) still decays."""
    return min(int(round(warmup_epochs * steps_per_epoch)), total_steps // 2)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if schedule == "onecycle":
        warmup_steps = warmup_steps or int(0.3 * total_steps)
        if step < warmup_steps:  # cosine rise from 1/25 of the peak, as PyTorch's OneCycleLR
            t = step / max(warmup_steps, 1)
            return 0.04 + 0.96 * (1 - math.cos(math.pi * t)) / 2
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return (1 + math.cos(math.pi * min(t, 1.0))) / 2
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return (1 + math.cos(math.pi * t)) / 2
    if schedule == "linear":
        return 1.0 - t
    return 1.0


def set_rates(param_groups: list[dict], step: int, total_steps: int, warmup: int, schedule: str,
              steps_per_epoch: int, lr_scale: float = 1.0, factor: float | None = None) -> None:
    """Each group's rate for optimiser step `step` (0-based): its initial rate times the schedule's
    factor (or `factor`, which overrides it) and `lr_scale`. A `frozen_after` group (epochs) falls
    linearly to 0 over those epochs from the start instead, then no longer trains."""
    scheduled = factor is None
    if scheduled:
        factor = lr_factor(step, total_steps, warmup, schedule) * lr_scale
    for group in param_groups:
        epochs = group.get("frozen_after") if scheduled else None
        group["lr"] = group["initial_lr"] * (
            factor if epochs is None else lr_scale * max(0.0, 1 - step / (epochs * steps_per_epoch)))
