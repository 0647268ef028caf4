"""The training loop: fit -> epoch -> step, and the points where hooks join in.

    fit():  on_run_start
            for each epoch:  on_epoch_start
                for each batch:  before_step -> step -> after_step   (a signal: on_signal, stop)
                validation -> on_epoch_end
            on_run_end       (however the run ends)

Everything else a run does is a hook (training/hooks.py, budget_hook.py): the schedule, unfreezing,
Lookahead, the best epoch and early stopping, metrics and progress, checkpoints and signals, the
time budget. Each owns its state (`state_dict` / `load_state_dict`): a checkpoint is the loop's
state plus each hook's (`Loop.state_dict`). A run stops in one way: `request_stop` after the epoch
(early stopping), `interrupt` after the step with a checkpoint (a signal), or at its length
(`set_length`, which a time budget changes). Lightning's callbacks that own their state and fastai's
one event per phase are the models; the loop stays small enough to read in one sitting (nanoGPT).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnkit import distributed
from cnnkit.errors import TrainingError, TrainingInterrupted
from cnnkit.training.validation import validate

if TYPE_CHECKING:
    from cnnkit.training.build import Setup

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch
    step: int = 0  # optimiser steps taken (or skipped) in all
    batch: int = 0  # batches done in the epoch in progress (epoch + 1)
    train_time_s: float = 0.0
    # the epoch in progress, so that a mid-epoch resume reports the same epoch metrics
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_time_s: float = 0.0
    lr_scale: float = 1.0  # halved each time a non-finite step is skipped (on_nonfinite = skip)
    skipped_steps: int = 0


@dataclass
class EpochEnd:
    """What on_epoch_end hooks see: the epoch's metrics row (metrics.jsonl) and validation."""

    epoch: int
    record: dict[str, Any]
    val_s: float  # seconds the validation took
    train_ended: float  # time.perf_counter() when the epoch's last step ended
    improved: bool = False  # set by the best-epoch hook: validation at least as good as the best so far


@dataclass
class Batch:
    """The batch the last step trained on, for hooks that look at single examples (after_step)."""

    ids: torch.Tensor  # the images' indices in the training split
    labels: torch.Tensor
    logits: torch.Tensor  # the training forward's, detached (augmented images, training mode)


class Hook:
    """A part of a run that joins the loop at fixed points; every point is a no-op here. `name`
    keys the hook's state in checkpoints (hooks without state need none)."""

    name = ""

    def on_run_start(self, loop: Loop) -> None: ...
    def on_epoch_start(self, loop: Loop, epoch: int) -> None: ...
    def before_step(self, loop: Loop) -> None: ...
    def after_step(self, loop: Loop) -> None: ...
    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None: ...
    def on_signal(self, loop: Loop, signum: int) -> None: ...
    def on_run_end(self, loop: Loop) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Loop:
    def __init__(self, setup: Setup, hooks: list[Hook], total_steps: int, validate: bool = True):
        self.setup, self.hooks, self.validates = setup, hooks, validate
        self.model, self.net, self.optimizer, self.loader = setup.model, setup.net, setup.optimizer, setup.loader
        self.state = TrainState()
        self.aug_rng = torch.Generator()  # augmentation randomness, reseeded from (seed, epoch) each epoch
        self.stop_reason: str | None = None
        self.stop_now = False
        self.signal: int | None = None
        self.last_loss: torch.Tensor | None = None  # None when the last step was skipped (non-finite)
        self.last_batch: Batch | None = None
        self.epoch_started = 0.0
        self.set_length(total_steps)

    # -- length and stopping

    def set_length(self, steps: int) -> None:
        """Train to step `steps`: its epochs (the last maybe in part) follow."""
        self.total_steps = steps
        self.epochs = math.ceil(steps / len(self.loader))

    def epoch_batches(self, epoch: int) -> int:
        """Batches epoch `epoch` trains: the loader's, or fewer in a last epoch the length cuts short."""
        n = len(self.loader)
        return max(0, min(n, self.total_steps - (epoch - 1) * n))

    def request_stop(self, reason: str, now: bool = False) -> None:
        """End the run after this epoch (its validation, metrics and checkpoints still come), or
        with `now` after this step, without them (the learning-rate range test's divergence)."""
        self.stop_reason, self.stop_now = reason, now

    def interrupt(self, signum: int) -> None:
        """End the run after this step, with a checkpoint (what a SIGINT or SIGTERM asks)."""
        self.signal = signum

    # -- the loop

    def fit(self) -> TrainState:
        self._fire("on_run_start")
        try:
            epoch = self.state.epoch
            while epoch < self.epochs and self.stop_reason is None:
                epoch += 1
                self.run_epoch(epoch)
        finally:
            self._fire("on_run_end")
        return self.state

    def run_epoch(self, epoch: int) -> None:
        state, device, n = self.state, self.setup.device, len(self.loader)
        self.train_mode()
        self.loader.set_epoch(epoch)
        if state.batch == 0:  # augmentation randomness of an epoch depends only on (seed, epoch)
            self.aug_rng.manual_seed(self.setup.cfg.seed * 1000 + epoch + 7919 * self.setup.dist.rank)
            state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_time_s = 0.0, 0, 0, 0.0
        self._loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
        self._correct = torch.tensor(state.epoch_correct, device=device)
        self.epoch_started = time.perf_counter() - state.epoch_time_s
        self._fire("on_epoch_start", epoch)
        for images, labels, ids in self.loader.batches_with_ids(start=state.batch):
            self._fire("before_step")
            self.train_step(images, labels, ids, epoch)
            state.batch += 1
            last = state.batch == n or state.step >= self.total_steps  # a budget may plan part of an epoch
            if state.batch % 20 == 0 or last:  # .item() waits for a GPU: not every step
                self.sync_epoch_totals()
            self._fire("after_step")
            if distributed.any_rank(self.signal is not None, self.setup.dist, device):
                self._stop_for_signal(epoch)
            if self.stop_now:
                return
            if last:
                break
        self.sync_epoch_totals()
        self._end_epoch(epoch)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, epoch: int) -> None:
        """Forward and loss (the shared step), backward, clipping, and the update unless non-finite."""
        setup, state, optimizer = self.setup, self.state, self.optimizer
        loss, logits = setup.step(images, labels, self.aug_rng, ids=ids, epoch=epoch)
        self.last_batch = Batch(ids, labels, logits.detach())
        optimizer.zero_grad(set_to_none=True)
        if setup.scaler is not None:
            setup.scaler.scale(loss).backward()
            setup.scaler.unscale_(optimizer)
        else:
            loss.backward()
        # The gradient norm is needed anyway to clip; computing it also catches non-finite gradients.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), setup.cfg.grad_clip or float("inf"))
        state.step += 1
        self.last_loss = None
        if setup.scaler is None and not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            return self._non_finite(loss, grad_norm, epoch)
        if setup.scaler is not None:  # fp16: the scaler skips steps with inf/NaN gradients itself
            setup.scaler.step(optimizer)
            setup.scaler.update()
        else:
            optimizer.step()
        self.last_loss = loss.detach()
        self._loss_sum += self.last_loss * len(labels)
        self._correct += (logits.argmax(1) == labels).sum()
        state.epoch_seen += len(labels)

    def sync_epoch_totals(self) -> None:
        """Bring the epoch's running loss and accuracy (device tensors) into the state."""
        s = self.state
        s.epoch_loss_sum, s.epoch_correct = self._loss_sum.item(), int(self._correct.item())
        s.epoch_time_s = time.perf_counter() - self.epoch_started

    def _end_epoch(self, epoch: int) -> None:
        state, n_batches = self.state, self.state.batch  # fewer than the loader's when a budget planned part
        state.train_time_s += state.epoch_time_s
        train_ended = time.perf_counter()
        loss, correct, seen = distributed.sum_all([state.epoch_loss_sum, state.epoch_correct, state.epoch_seen],
                                                  self.setup.dist, self.setup.device)
        val = self.validate() if self.validates else {"loss": float("nan"), "accuracy": float("nan")}
        state.epoch, state.batch = epoch, 0
        record = {"epoch": epoch, "step": state.step, "lr": self.optimizer.param_groups[0]["lr"],
                  "train_loss": loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                  **({"val_unsure": round(val["unsure"], 4)} if "unsure" in val else {}),
                  "epoch_time_s": round(state.epoch_time_s, 3),
                  "train_images_per_s": round(n_batches * self.setup.cfg.batch_size / max(state.epoch_time_s, 1e-9), 1)}
        self._fire("on_epoch_end", EpochEnd(epoch, record, time.perf_counter() - train_ended, train_ended))

    def validate(self) -> dict[str, Any]:
        return validate(self.setup, self.model)

    def train_mode(self) -> None:
        self.net.train()
        if self.setup.unfreezer is not None:
            self.setup.unfreezer.frozen_norms_to_eval()

    def _non_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, epoch: int) -> None:
        state = self.state
        what = (f"the loss became {loss.item()}" if not torch.isfinite(loss)
                else f"the gradient norm became {grad_norm.item()}")
        if self.setup.cfg.on_nonfinite == "skip" and state.skipped_steps < 10:
            state.lr_scale /= 2
            state.skipped_steps += 1
            log.warning("%s at step %d (epoch %d): step skipped, learning rate halved (now x%g)",
                        what, state.step, epoch, state.lr_scale)
            return
        raise TrainingError(
            f"{what} at step {state.step} (epoch {epoch}, batch {state.batch + 1}); the run stopped and its last "
            f"good checkpoint is kept in {self.setup.run_dir / 'checkpoints'}. Try a lower --lr, --grad-clip 1.0, "
            "--precision fp32, or --on-nonfinite skip.")

    def _stop_for_signal(self, epoch: int) -> None:
        signum = self.signal or signal.SIGINT
        self._fire("on_signal", signum)
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name}: stopped in epoch {epoch} after batch {self.state.batch}; checkpoint "
            f"saved. Resume with: cnnkit train --resume {self.setup.run_dir}", signum)

    def _fire(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    # -- resumable state: the loop's and each hook's

    def state_dict(self) -> dict[str, Any]:
        if self.state.batch:  # mid-epoch: the running totals as they are now
            self.sync_epoch_totals()
        rng = {"rng.augment": self.aug_rng.get_state(), "rng.torch": torch.get_rng_state()}
        if self.setup.device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.setup.device)
        return {"state": asdict(self.state), "rng": rng,
                "hooks": {h.name: h.state_dict() for h in self.hooks if h.name}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state = TrainState(**{k: v for k, v in saved["state"].items() if k in TrainState.__dataclass_fields__})
        rng = saved["rng"]
        self.aug_rng.set_state(rng["rng.augment"])  # a mid-epoch resume continues the generator exactly
        torch.set_rng_state(rng["rng.torch"])  # dropout and the like draw from the global generator
        if "rng.cuda" in rng and self.setup.device.type == "cuda":
            torch.cuda.set_rng_state(rng["rng.cuda"], self.setup.device)
        for hook in self.hooks:
            if hook.name in saved["hooks"]:
                hook.load_state_dict(saved["hooks"][hook.name])
