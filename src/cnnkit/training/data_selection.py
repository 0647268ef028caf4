"""Data selection (`last_epoch_fraction`): the last epoch trains on the hardest part of the
training set, ranked by each image's loss in the epoch before it, and so costs that part of an epoch.

By the last epoch the network already gets most images right with a low loss; their gradients are
small and the schedule's rate is low. Training the last epoch on the images it still finds hard kept
the full epoch's validation accuracy in the main job's fp32 settings (8 seeds: 93.47% against 93.46%;
`zen4-fp32-last-epoch-fraction-validation` in benchmarks/RESULTS.md) at 0.7 of that epoch's time,
where a random 70% lost 0.3 points (`hard-last-epoch-prototype`); see docs/cpus.md. The losses come
from the training forward of the epoch before (no extra pass).

The run's length is planned with it: (E - 1) epochs and the fraction of the last one's batches, so
the learning-rate schedule ends where the run does. The last epoch's order puts the hardest images
first (`BatchLoader.put_first`) and the loop ends the epoch at the run's length, as for a time
budget's partial epoch. The losses are the hook's state: a run resumed in its last epoch trains on
the same images. (Under torchrun a run resumed in the middle of the epoch before the last ranks
only the images rank 0 had seen before the stop among that epoch's first part.)
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from cnnkit import distributed
from cnnkit.config import Config
from cnnkit.training.loop import EpochEnd, Hook, Loop

log = logging.getLogger(__name__)


def why_not(cfg: Config) -> str | None:
    """Why a run's `last_epoch_fraction` below 1 does not apply (None: it does)."""
    if cfg.epochs < 2:
        return "a run of one epoch has no epoch before the last to rank the images by"
    if cfg.time_budget:
        return "--time-budget plans the run's length itself"
    if cfg.class_balance == "sampler":
        return "--class-balance sampler draws batches with replacement"
    if cfg.strategy == "linear-probe":
        return "a linear probe has no epochs"
    return None


def selects(cfg: Config) -> bool:
    return cfg.last_epoch_fraction < 1 and why_not(cfg) is None


def run_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The run's length in steps: its epochs, the last one's batches cut to the fraction if it applies."""
    if not selects(cfg):
        return cfg.epochs * steps_per_epoch
    return (cfg.epochs - 1) * steps_per_epoch + math.ceil(cfg.last_epoch_fraction * steps_per_epoch)


class HardestLastEpoch(Hook):
    """Records each training image's loss in the epoch before the last (from the training step's
    logits; with hard labels, whatever the loss's smoothing or mixing) and puts the hardest first in
    the last epoch."""

    name = "data_selection"

    def __init__(self, fraction: float, images: int, device: torch.device, dist: distributed.DistInfo):
        self.fraction, self.dist = fraction, dist
        self.losses = torch.full((images,), -1.0, device=device)  # -1: not seen (drop_last's remainder)

    def ranking_epoch(self, loop: Loop) -> int:
        return loop.epochs - 1

    def after_step(self, loop: Loop) -> None:
        batch = loop.last_batch
        if loop.state.epoch + 1 != self.ranking_epoch(loop) or batch is None or loop.last_loss is None:
            return
        self.losses[batch.ids] = F.cross_entropy(batch.logits.float(), batch.labels, reduction="none")

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if end.epoch == self.ranking_epoch(loop):  # each rank saw its share of every batch
            self.losses = distributed.max_all(self.losses, self.dist)

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if epoch != loop.epochs or epoch < 2:
            return
        kept = min(len(self.losses), loop.epoch_batches(epoch) * loop.loader.batch_size)
        hardest = torch.argsort(self.losses, descending=True, stable=True)[:kept]
        loop.loader.put_first(epoch, hardest)
        log.info("epoch %d/%d trains on the %d of %d training images with the highest loss in epoch %d "
                 "(last_epoch_fraction %g)", epoch, loop.epochs, kept, len(self.losses), epoch - 1, self.fraction)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.copy_(state["losses"])
