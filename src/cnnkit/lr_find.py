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
from cnnkit.errors import ConfigError
from cnnkit.fileio import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class LrFindResult:
    run_dir: Path
    lrs: list[float]
    losses: list[float]  # smoothed
    suggested_lr: float  # steepest descent of the smoothed loss
    min_loss_lr: float  # the rate at the smoothed loss's minimum


def lr_find(cfg: Config, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100,
            smoothing: float = 0.9) -> LrFindResult:
    """Run the range test with `cfg`'s data, model and optimiser; write RUN/lr_find.{json,png}."""
    from cnnkit.train import Trainer, TrainingError

    if not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find needs 0 < start < end; got {start_lr} and {end_lr}")
    if steps < 10:
        raise ConfigError(f"lr-find needs at least 10 steps; got {steps}")
    # No averaging of weights, no skipped steps: the test is about the raw optimiser's stability.
    cfg = Config.from_dict({**cfg.to_dict(), "lookahead": False, "on_nonfinite": "stop", "time_budget": None,
                            "report": False, "tensorboard": False})
    trainer = Trainer(cfg)
    trainer.net.train()
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    batches = _endless(trainer)
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
        images, labels = next(batches)
        try:
            loss, _, _ = trainer._step(images, labels, 1, factor=lr / cfg.lr)
        except TrainingError:  # non-finite: diverged
            break
        avg = smoothing * avg + (1 - smoothing) * loss.item()
        smoothed = avg / (1 - smoothing ** (i + 1))  # bias-corrected, as fastai
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best and i > steps // 10:
            break
    if len(lrs) < 5:
        raise ConfigError(f"the loss diverged within {len(lrs)} steps from {start_lr:g}; try a lower --start")
    suggested, min_loss_lr = _suggest(np.array(lrs), np.array(losses))
    result = LrFindResult(trainer.run_dir, lrs, losses, suggested, min_loss_lr)
    write_json_atomic(trainer.run_dir / "lr_find.json", {
        "recipe": cfg.recipe, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "recipe_lr": cfg.lr,
        "suggested_lr": suggested, "min_loss_lr_div10": min_loss_lr / 10, "lrs": lrs, "smoothed_losses": losses})
    _plot(result, cfg.lr, trainer.run_dir / "lr_find.png")
    return result


def _endless(trainer):
    epoch = 1
    while True:
        trainer.loader.set_epoch(epoch)
        yield from trainer.loader.batches()
        epoch += 1


def _suggest(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """Steepest descent of loss against log(lr), before the minimum; and the minimum's rate."""
    low = int(np.argmin(losses))
    slope = np.gradient(losses[: low + 1], np.log(lrs[: low + 1])) if low >= 2 else np.zeros(1)
    return float(lrs[int(np.argmin(slope))]), float(lrs[low])


def _plot(result: LrFindResult, recipe_lr: float, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
