"""The learning-rate range test (Smith 2015; fastai's lr_find): train for a few hundred steps
while the learning rate grows exponentially, and watch the loss.

The loss first stays flat (too low to learn), then falls (learning), then shoots up (diverging).
The suggestion is the rate where the smoothed loss falls fastest; the rate at its minimum,
divided by ten, is given too (the older rule of thumb). The model is trained from the recipe's
initialisation, so the test says which peak rate the recipe's first steps tolerate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.config import Config
from cnnkit.errors import ConfigError, TrainingError
from cnnkit.fileio import write_json_atomic
from cnnkit.plotting import pyplot, save_figure
from cnnkit.training.build import build
from cnnkit.training.hooks import Unfreeze
from cnnkit.training.loop import Hook, Loop
from cnnkit.training.schedule import set_rates

log = logging.getLogger(__name__)


@dataclass
class LrFindResult:
    run_dir: Path
    lrs: list[float]
    losses: list[float]  # smoothed
    suggested_lr: float  # steepest descent of the smoothed loss
    min_loss_lr: float  # the rate at the smoothed loss's minimum


class RangeTest(Hook):
    """Before each step the rate of the range test (overriding the schedule); after it the smoothed
    loss, and a stop once the loss has clearly diverged."""

    def __init__(self, start_lr: float, end_lr: float, steps: int, recipe_lr: float, smoothing: float):
        self.start_lr, self.end_lr, self.steps, self.recipe_lr, self.smoothing = start_lr, end_lr, steps, recipe_lr, smoothing
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.avg, self.best = 0.0, math.inf

    def rate(self, i: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / (self.steps - 1))

    def before_step(self, loop: Loop) -> None:
        set_rates(loop.optimizer.param_groups, loop.state.step, 0, 0, "constant", len(loop.loader),
                  factor=self.rate(loop.state.step) / self.recipe_lr)

    def after_step(self, loop: Loop) -> None:
        i = loop.state.step - 1
        self.avg = self.smoothing * self.avg + (1 - self.smoothing) * loop.last_loss.item()
        smoothed = self.avg / (1 - self.smoothing ** (i + 1))  # bias-corrected, as fastai
        self.lrs.append(self.rate(i))
        self.losses.append(smoothed)
        self.best = min(self.best, smoothed)
        if smoothed > 4 * self.best and i > self.steps // 10:
            loop.request_stop("the loss diverged", now=True)


def lr_find(cfg: Config, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100,
            smoothing: float = 0.9) -> LrFindResult:
    """Run the range test with `cfg`'s data, model and optimiser; write RUN/lr_find.{json,png}."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find needs 0 < start < end; got {start_lr} and {end_lr}")
    if steps < 10:
        raise ConfigError(f"lr-find needs at least 10 steps; got {steps}")
    # No averaging of weights, no skipped steps: the test is about the raw optimiser's stability.
    cfg = Config.from_dict({**cfg.to_dict(), "lookahead": False, "on_nonfinite": "stop", "time_budget": None,
                            "report": False, "tensorboard": False})
    setup = build(cfg, None)
    test = RangeTest(start_lr, end_lr, steps, cfg.lr, smoothing)
    hooks: list[Hook] = [Unfreeze(setup.unfreezer, cfg.strategy)] if setup.unfreezer is not None else []
    try:  # no validation, metrics or checkpoints: the range test's own hook (and fine-tuning's unfreezing)
        Loop(setup, [*hooks, test], steps, validate=False).fit()
    except TrainingError:  # non-finite: diverged
        pass
    lrs, losses = test.lrs, test.losses
    if len(lrs) < 5:
        raise ConfigError(f"the loss diverged within {len(lrs)} steps from {start_lr:g}; try a lower --start")
    suggested, min_loss_lr = _suggest(np.array(lrs), np.array(losses))
    result = LrFindResult(setup.run_dir, lrs, losses, suggested, min_loss_lr)
    write_json_atomic(setup.run_dir / "lr_find.json", {
        "recipe": cfg.recipe, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "recipe_lr": cfg.lr,
        "suggested_lr": suggested, "min_loss_lr_div10": min_loss_lr / 10, "lrs": lrs, "smoothed_losses": losses})
    _plot(result, cfg.lr, setup.run_dir / "lr_find.png")
    return result


def _suggest(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """Steepest descent of loss against log(lr), before the minimum; and the minimum's rate."""
    low = int(np.argmin(losses))
    slope = np.gradient(losses[: low + 1], np.log(lrs[: low + 1])) if low >= 2 else np.zeros(1)
    return float(lrs[int(np.argmin(slope))]), float(lrs[low])


def _plot(result: LrFindResult, recipe_lr: float, path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=100)
    ax.plot(result.lrs, result.losses, color="#1f77b4")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.axvline(result.suggested_lr, color="#d62728", ls="--", label=f"suggested {result.suggested_lr:.3g}")
    ax.axvline(recipe_lr, color="#7f7f7f", ls=":", label=f"recipe {recipe_lr:.3g}")
    top = min(max(result.losses), 2 * result.losses[0])
    ax.set_ylim(min(result.losses) * 0.95, top * 1.05)
    ax.legend()
    ax.set_title("learning-rate range test")
    fig.tight_layout()
    save_figure(fig, path)
