"""`--time-budget` in the loop: time the first steps and one batch of evaluation, plan the run's
length (and so its whole schedule) to end within the budget, and plan again from the measured
epochs. The arithmetic is cnnkit.budget's (pure functions, tested on their own); this hook only
measures and applies it. Its decisions (the steps, fewer test views or robustness samples) go into
the run record (run.json), never into the run's configuration.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from cnnkit import distributed
from cnnkit.analysis import ROBUSTNESS_PASSES, robustness_sample_count
from cnnkit.augment import tta_view_count
from cnnkit.budget import (EXTRAS_SHARE, MARGIN, REPLAN_PAST, Costs, calibration_window, describe_plan, epoch_weight,
                           estimate_costs, final_seconds, first_settled_epoch, fit_extras, fit_steps, fit_to_left,
                           recent_epoch_s, replan_after_epoch, run_end_s)
from cnnkit.inference import predict_logits
from cnnkit.training.loop import EpochEnd, Hook, Loop

if TYPE_CHECKING:
    from cnnkit.training.build import Setup

log = logging.getLogger(__name__)


def report_samples(report: bool, asked: int, splits: Any, num_classes: int) -> int:
    """The robustness samples the report will use (see analysis.robustness_sample_count); 0 without one."""
    if not report:
        return 0
    test = len(splits.test)
    return robustness_sample_count(asked, test, len(splits.train) + test, num_classes)


def final_images(test_images: int, tta: str, samples: int, unsure: float = 1.0) -> int:
    """Images the model sees after training: the test split (each test-time view; with `tta_below`
    the views after the first for the `unsure` share of it alone) and the report's robustness
    section (its sample, clean and corrupted)."""
    return math.ceil(test_images * (1 + (tta_view_count(tta) - 1) * unsure)) + ROBUSTNESS_PASSES * samples


class TimeBudget(Hook):
    """Plans within the first epoch from timed steps, re-plans after the first two settled epochs,
    and later whenever the plan would end past REPLAN_PAST of the budget. `settled_step` is where
    the trainable layers stop changing (fine-tuning's head-only steps are several times faster)."""

    def __init__(self, setup: Setup, budget_s: float, started_at: float, settled_step: int):
        cfg = setup.cfg
        self.setup, self.budget_s, self.started_at, self.settled_step = setup, budget_s, started_at, settled_step
        # progressive resizing: an epoch at size s costs about (s / input size) ** 2 of a full-size one
        full = setup.preprocess.input_size
        self.weights = tuple((size / full) ** 2 for size in cfg.progressive_sizes)
        self.tta = cfg.tta
        self.samples = report_samples(cfg.report, cfg.report_robustness_samples, setup.splits, len(setup.ds.classes))
        self.planned_time_s = 0.0
        # The share of images the test gives its extra views (tta_below): all until a validation has measured it.
        # cifar10-quick's flip-shift views took 33 s for 5,000 validation images, 16 s for those below 0.7 alone.
        self.unsure = 1.0
        self.fit_deadline: float | None = None  # a budgeted linear probe's: when its head's fit must end (probe_budget.py)
        self.train_ended: float | None = None
        self.between_epochs_s = 0.0  # validation, checkpoints and logging between two epochs
        self.settled_epoch_times: list[float] = []  # of the epochs that trained as the rest of the run will
        self.calibration_start = 0.0
        self.warned = False

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if self.train_ended is not None:
            self.between_epochs_s = loop.epoch_started - self.train_ended

    def after_step(self, loop: Loop) -> None:
        """During the first epoch: time steps first+2..k (the step after `first` warms up allocators
        and compilers), then plan. `first` is the settled step if the first epoch has room for the
        timing after it, else 0 (the plan is then optimistic until the re-plans after the epochs)."""
        if loop.state.epoch:
            return
        n, batch = len(loop.loader), loop.state.batch
        first, k = calibration_window(n, self.settled_step)
        if batch == first + 1:
            self.calibration_start = time.perf_counter()
        if batch != k:
            return
        start, timed = (self.calibration_start, k - first - 1) if k - first > 1 else (loop.epoch_started, 1)
        step_s = (time.perf_counter() - start) / timed
        eval_image_s = self.time_evaluation(loop)
        self.fit_extras(eval_image_s)
        costs = estimate_costs(step_s / epoch_weight(self.weights, 1), n, eval_image_s,
                               len(self.setup.splits.val), self.final_images(), self.setup.cfg.report, self.weights)
        self.plan(loop, costs, f"{timed} timed steps of {step_s:.2f} s")

    def time_evaluation(self, loop: Loop) -> float:
        """Seconds to evaluate an image, timed on a batch of validation images as validation and the
        test run them: its ratio to a training step's time varies with the network and the CPU, and
        a plan within the first epoch has no validation to correct it."""
        setup = self.setup
        images = setup.splits.val.images[: setup.inference.batch_size]
        t0 = time.perf_counter()
        predict_logits(loop.model, setup.preprocess, images, device=setup.device,
                       **setup.inference.in_torch().kwargs())
        seconds = (time.perf_counter() - t0) / max(len(images), 1)
        loop.train_mode()
        return seconds

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        """Re-plan from the measured times after the first epochs, and later whenever the plan would
        end late: caught while epochs remain, the shorter plan still ends its schedule (and a run
        whose next epoch would overrun may end here)."""
        cfg, state, n = self.setup.cfg, loop.state, len(loop.loader)
        self.train_ended = end.train_ended
        full_size_s = state.epoch_time_s / epoch_weight(self.weights, end.epoch)
        if end.epoch >= first_settled_epoch(n, self.settled_step):
            self.settled_epoch_times.append(full_size_s)
        eval_image_s = end.val_s / max(len(self.setup.splits.val), 1)
        self.unsure = end.record.get("val_unsure", self.unsure)  # the latest weights' (a run grows surer as it trains)
        epoch_s = recent_epoch_s(self.settled_epoch_times or [full_size_s])
        costs = Costs(epoch_s, max(end.val_s, self.between_epochs_s),
                      final_seconds(self.final_images(), eval_image_s, cfg.report), self.weights)
        elapsed = time.perf_counter() - self.started_at
        late = run_end_s(elapsed, state.step, loop.total_steps, n, costs) > REPLAN_PAST * self.budget_s
        if loop.epochs > end.epoch and (replan_after_epoch(end.epoch, n, self.settled_step) or late):
            self.plan(loop, costs, f"epoch {end.epoch}")

    def final_images(self) -> int:
        return final_images(len(self.setup.splits.test), self.tta, self.samples, self.unsure)

    def fit_extras(self, eval_image_s: float) -> None:
        """Fewer test-time views and robustness samples where they would take more than their share
        of the budget (see `budget.fit_extras`); the test evaluation and report use what is chosen."""
        setup = self.setup
        tta, kept = distributed.broadcast(fit_extras(self.budget_s, eval_image_s, len(setup.splits.test), self.tta,
                                                     tta_view_count, self.samples, ROBUSTNESS_PASSES,
                                                     len(setup.ds.classes)), setup.dist)
        if (tta, kept) != (self.tta, self.samples):
            log.info("time budget %s: test-time augmentation %s (recipe: %s), %d robustness samples (recipe: %d), "
                     "so that they take at most %.0f%% of the budget and the rest trains", setup.cfg.time_budget,
                     tta, self.tta, kept, self.samples, 100 * EXTRAS_SHARE)
            self._keep(tta, kept)

    def fit_to_left(self, eval_image_s: float) -> None:
        """A probe chosen by cross-validation: fewer test-time views and robustness samples where the test
        and report would not end within the budget (see `budget.fit_to_left`)."""
        setup = self.setup
        left = MARGIN * self.budget_s - (time.perf_counter() - self.started_at)
        tta, kept = fit_to_left(left, eval_image_s, len(setup.splits.test), self.tta, tta_view_count, self.samples,
                                ROBUSTNESS_PASSES, len(setup.ds.classes), setup.cfg.report)
        changes = ([f"test-time augmentation {tta} (recipe: {self.tta})"] if tta != self.tta else []) + (
            [f"{kept} robustness samples (of {self.samples})"] if kept != self.samples else [])
        if changes:
            log.info("time budget %s: %s, so that the test and report end in the %.0f s left", setup.cfg.time_budget,
                     ", ".join(changes), max(left, 0))
            self._keep(tta, kept)

    def _keep(self, tta: str, kept: int) -> None:
        self.tta, self.samples = tta, kept
        self.setup.record.tta = tta
        if self.setup.cfg.report:
            self.setup.record.report_robustness_samples = kept

    def plan(self, loop: Loop, costs: Costs, basis: str) -> None:
        """Fit the steps (and so the schedule) to the budget from here; every rank follows rank 0's plan."""
        setup, state, n = self.setup, loop.state, len(loop.loader)
        elapsed = time.perf_counter() - self.started_at
        steps = distributed.broadcast(fit_steps(self.budget_s, elapsed, state.step, n, costs), setup.dist)
        loop.set_length(steps)
        self.planned_time_s = run_end_s(elapsed, state.step, steps, n, costs)
        setup.record.planned(steps, loop.epochs, self.planned_time_s)
        if setup.dist.is_main:
            setup.record.save(setup.run_dir)  # a --resume follows the plan
        views = (f", the extra test views for the {100 * self.unsure:.0f}% of images validation was unsure of"
                 if self.unsure < 1 and tta_view_count(self.tta) > 1 else "")
        log.info("time budget %s: %d steps planned (%s) from %s (epoch %.1f s, validation %.1f s, test and "
                 "report %.0f s%s); the run should end after %.0f s", setup.cfg.time_budget, steps,
                 describe_plan(steps, n), basis, costs.epoch_s, costs.val_s, costs.final_s, views,
                 self.planned_time_s)
        if self.planned_time_s > self.budget_s and not self.warned:
            self.warned = True
            log.warning("time budget %s: the run cannot end in time: it will end after about %.0f s here. A larger "
                        "budget, a smaller recipe or --max-train-samples N fits.", setup.cfg.time_budget,
                        self.planned_time_s)
