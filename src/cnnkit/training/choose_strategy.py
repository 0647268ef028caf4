"""`--strategy auto`: a linear probe, or a frozen, gradually unfrozen or fine-tuned backbone, chosen
by measuring on the user's own training images rather than by a rule of thumb. Which one wins
depends on the data: on flowers12 a probe matched fine-tuning's accuracy in a seventh of the time;
on a larger or stranger set training the backbone can pay.

1. The probe first (training/choose.py): its backbone and weight decay by k-fold cross-validation
   on the training and validation images (`cv_folds`), and its accuracy fold by fold.
2. Each trained strategy of `auto_strategies` (frozen, gradual, finetune, in that order: the
   cheapest first) is trained on the same folds' training images and tested on their held-out
   images, `auto_folds` of the `cv_folds` folds (each fold is a whole training run), with the run's
   own training settings (epochs, lr, augment, ...) on the probe's best single backbone. Each fold is
   tested after every epoch; a strategy's accuracy is at the epoch where the folds' mean was best,
   and if it wins, its final run stops after that epoch (`stop_after_epoch`, the schedule unchanged):
   early stopping on the folds' signal.
3. Every candidate is judged on the same held-out images (the probe on the first `auto_folds`
   folds, as the trained ones), and the cheapest within one standard error of the best mean wins
   (`auto_margin`; the one-standard-error rule). The test split is never looked at.

A small set's validation split cannot tell strategies apart (24 images read 100% from the third
epoch on in one two-class set); folds use every image once. Written here because it is cnnkit's
own: its strategies, its probe's folds, its time budget.

Under `--time-budget` choosing may take 60% of the budget, as the probe's candidates may: a fold
that can no longer end in it (projected from its own steps so far) is stopped, and its strategy
left out, as is one whose final run (its folds' time for all the images) would not fit what the
budget then leaves. The log says which and why; run.json records every strategy's folds.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit import distributed, progress
from cnnkit.budget import parse_duration
from cnnkit.config import AUTO_STRATEGIES, Config
from cnnkit.data import Dataset, Splits
from cnnkit.data.dataset import Split
from cnnkit.errors import ConfigError
from cnnkit.inference import predict_logits
from cnnkit.models.concat import SEPARATOR
from cnnkit.data.copies import copy_groups
from cnnkit.probe import fold_ids, used_folds
from cnnkit.runs import RunRecord, run_splits
from cnnkit.training.build import build
from cnnkit.training.choose import CANDIDATES_SHARE, choose_backbone
from cnnkit.training.hooks import LookaheadHook, LrSchedule, Unfreeze
from cnnkit.training.loop import EpochEnd, Hook, Loop

log = logging.getLogger(__name__)

PROBE, *TRAINED_ORDER = AUTO_STRATEGIES  # the cheapest first: within the margin it wins


def choose_strategy(cfg: Config, started: float | None = None) -> tuple[Config, RunRecord]:
    """The configuration the run trains (the chosen strategy, and the probe's choices if it won)
    and the run's record. `started` (time.perf_counter()) is when the time budget's clock began."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(distributed.refusal("auto"))
    started = started if started is not None else time.perf_counter()
    deadline = started + parse_duration(cfg.time_budget) * CANDIDATES_SHARE if cfg.time_budget else None
    folds = cfg.auto_folds or cfg.cv_folds
    rows: list[dict[str, Any]] = []
    probe_cfg, record = _probe(cfg) if PROBE in cfg.auto_strategies else (None, RunRecord())
    if probe_cfg is not None:
        chosen = record.selection["chosen"]  # type: ignore[index]
        rows.append(_row(PROBE, chosen["model"], chosen["fold_accuracies"][:folds], record.selection["seconds"]))
    backbone = best_single_backbone(record, cfg)
    trained, held_out = [s for s in TRAINED_ORDER if s in cfg.auto_strategies], 0
    if trained:
        ds, fold_data = _folds(cfg, folds)
        held_out = sum(len(f.test) for f in fold_data)  # the probe's folds' too: the same images
        for strategy in trained:
            rows.append(_measure(_trained(cfg, strategy, backbone), ds, fold_data, deadline, cfg.time_budget))
    best = _winner(rows, cfg, started, held_out)
    selection = {"folds": folds, "of": cfg.cv_folds, "held_out_images": held_out, "margin": cfg.auto_margin,
                 "chosen": best["strategy"], "candidates": rows,
                 **({"probe": record.selection} if record.selection else {})}  # its backbones, whoever won
    log.info("strategy on %s: %s", best["model"], describe_choice(selection))
    if best["strategy"] == PROBE:
        assert probe_cfg is not None
        return probe_cfg, replace(record, strategy=PROBE, strategy_selection=selection)
    stop = best["epoch"] if best["epoch"] < best["epochs"] else None  # the folds were best before the last epoch
    record = RunRecord(model=backbone, strategy=best["strategy"], strategy_selection=selection, stop_after_epoch=stop)
    return Config.from_dict(record.settings(cfg.to_dict()), "--strategy auto's choice"), record


def _probe(cfg: Config) -> tuple[Config, RunRecord]:
    """The probe's choice by cross-validation (its candidates, or the run's model alone)."""
    t0 = time.perf_counter()
    probe_cfg = replace(cfg, strategy=PROBE, probe_candidates=cfg.probe_candidates or [cfg.model])
    chosen, record = choose_backbone(probe_cfg, whole=True)
    record.selection["seconds"] = round(time.perf_counter() - t0, 1)  # type: ignore[index]
    return chosen, record


def best_single_backbone(record: RunRecord, cfg: Config) -> str:
    """What the trained strategies train: the probe's best backbone that is one backbone (side by
    side they are a probe's alone), else the run's model. Screened, the best of the finalists: their
    scores are on both views, a screened-out backbone's on plain views alone, and the two differ."""
    rows = [r for r in (record.selection or {}).get("candidates", []) if SEPARATOR not in r["model"]]
    rows = [r for r in rows if "screen_accuracy" in r] or rows
    return max(rows, key=lambda r: r["cv_accuracy"])["model"] if rows else cfg.model


def _trained(cfg: Config, strategy: str, backbone: str) -> Config:
    """A trained strategy's folds' configuration: the final run's (`RunRecord.settings`: the run's
    own with `auto_trained` in place), each fold training all its epochs (data selection, early
    stopping, where to stop and the budget's planning are the final run's)."""
    final = RunRecord(model=backbone, strategy=strategy).settings(cfg.to_dict())
    return Config.from_dict({**final, "last_epoch_fraction": 1.0, "early_stopping_patience": None, "stop_after_epoch": None,
                             "time_budget": None, "report": False}, f"--strategy auto's {strategy}")


def _folds(cfg: Config, folds: int) -> tuple[Dataset, list[Splits]]:
    """The first `folds` folds of the training and validation images, numbered as the probe's
    cross-validation numbers them (the same seed, the same held-out images)."""
    ds, splits = run_splits(cfg.to_dict())
    pool = Split.joined([splits.train, splits.val])
    ids = fold_ids(pool.labels, cfg.cv_folds, cfg.seed, copy_groups(pool.images))
    out = []
    for k in used_folds(ids, cfg.cv_folds)[:folds]:
        held = pool.subset(np.flatnonzero(ids == k))
        out.append(Splits(pool.subset(np.flatnonzero(ids != k)), held, held, []))
    return ds, out


def _measure(cfg: Config, ds: Dataset, folds: list[Splits], deadline: float | None,
             budget: str | None) -> dict[str, Any]:
    """A trained strategy's row: its accuracy on each fold's held-out images at the epoch where their
    mean was best (`best_epoch`), or why it was left out."""
    t0, curves = time.perf_counter(), []
    for k, fold in enumerate(folds):
        curve = fold_accuracy(cfg, ds, fold, f"{cfg.strategy}, fold {k + 1}/{len(folds)}", deadline)
        if curve is None:
            log.info("  %s: left out, fold %d could not end within the %.0f%% of the time budget %s that choosing "
                     "may take", cfg.strategy, k + 1, 100 * CANDIDATES_SHARE, budget)
            return {**_row(cfg.strategy, cfg.model, [c[-1] for c in curves], time.perf_counter() - t0),
                    "left_out": "its folds would not end within the time budget"}
        curves.append(curve)
        took, left = time.perf_counter() - t0, len(folds) - k - 1
        log.info("  %s, fold %d: %.2f%% of %d held-out images, %.0f s%s", cfg.strategy, k + 1, 100 * curve[-1],
                 len(fold.test), took / (k + 1), f" (about {took / (k + 1) * left:.0f} s for its other {left} fold{'s' * (left > 1)})" if left else "")
    epoch = best_epoch(curves, cfg.lookahead)
    if epoch < cfg.epochs:
        log.info("  %s: its folds' held-out accuracy was best after epoch %d of %d (%.2f%% against %.2f%% after the "
                 "last); its final run stops there", cfg.strategy, epoch, cfg.epochs,
                 100 * np.mean([c[epoch - 1] for c in curves]), 100 * np.mean([c[-1] for c in curves]))
    return _row(cfg.strategy, cfg.model, [c[epoch - 1] for c in curves], time.perf_counter() - t0, epoch=epoch,
                epochs=cfg.epochs, epoch_accuracies=[round(float(np.mean(a)), 4) for a in zip(*curves)])


def best_epoch(curves: list[list[float]], lookahead: bool = False) -> int:
    """The epoch (from 1) whose held-out accuracy, averaged over the folds, was best; of equals the
    earliest (cheaper, and no better on these images). With Lookahead only the last counts: the model
    takes its slow weights at the end of the run's last epoch, so an earlier one is not what it measured."""
    means = np.mean(np.array(curves, dtype=float), axis=0)
    return len(means) if lookahead else int(np.argmax(means)) + 1


def fold_accuracy(cfg: Config, ds: Dataset, fold: Splits, what: str,
                  deadline: float | None = None) -> list[float] | None:
    """Train `cfg` on the fold's training images, as a run would (no checkpoints, metrics or
    validation: a fold is a measurement), testing it on its held-out images with the run's test-time
    views after every epoch: the accuracies by epoch. None when it was stopped for the deadline."""
    with tempfile.TemporaryDirectory(prefix="cnnkit-fold-") as tmp, _quiet():
        setup = build(cfg, Path(tmp), data=(ds, fold))
        stop = Deadline(deadline)
        held_out = HeldOutByEpoch(fold.test, cfg.tta)
        hooks: list[Hook] = [LrSchedule()]
        if setup.unfreezer is not None:
            hooks.append(Unfreeze(setup.unfreezer, cfg.strategy))
        if cfg.lookahead:
            hooks.append(LookaheadHook(setup.model))
        loop = Loop(setup, [*hooks, stop, held_out, StepProgress(what)], cfg.epochs * len(setup.loader), validate=False)
        loop.fit()
    return None if stop.missed else held_out.accuracies


def _row(strategy: str, model: str, accuracies: list[float], seconds: float, **extra: Any) -> dict[str, Any]:
    return {"strategy": strategy, "model": model, "fold_accuracies": [round(a, 4) for a in accuracies],
            "accuracy": round(float(np.mean(accuracies)), 4) if accuracies else None,
            "sd": round(float(np.std(accuracies)), 4) if accuracies else None, "seconds": round(seconds, 1), **extra}


def _winner(rows: list[dict[str, Any]], cfg: Config, started: float, held_out: int) -> dict[str, Any]:
    """The cheapest strategy (the first) within `auto_margin` standard errors of the best mean over
    the folds: the one-standard-error rule of cross-validation (Breiman et al.'s CART; Hastie et al.,
    The Elements of Statistical Learning, 7.10), the standard error that of the best one's accuracy
    on the `held_out` images (binomial). Two folds of 250 photos hold out 100: 84% is then 84 ± 3.7,
    and fine-tuning's 2 points over the probe are two photos. Under a time budget a trained
    strategy whose final run would not fit what is left of it is not chosen (the row says so)."""
    if cfg.time_budget:
        left = parse_duration(cfg.time_budget) - (time.perf_counter() - started)
        for r in rows:
            # a fold trains (k-1)/k of the images; the final run all of them
            final = r["seconds"] / max(len(r["fold_accuracies"]), 1) * cfg.cv_folds / (cfg.cv_folds - 1)
            if r["strategy"] != PROBE and "left_out" not in r and final > left:
                r["left_out"] = f"its final run (about {final:.0f} s) would not fit the {left:.0f} s the budget leaves"
                log.info("  %s: left out, %s", r["strategy"], r["left_out"])
    eligible = [r for r in rows if "left_out" not in r and r["accuracy"] is not None]
    if not eligible:
        raise ConfigError(f"--strategy auto: no strategy of {cfg.auto_strategies} could be measured within the time "
                          f"budget {cfg.time_budget}; give it more time, or add linear-probe to auto_strategies")
    best = max(eligible, key=lambda r: r["accuracy"])  # max keeps the first of equals
    p = best["accuracy"]
    margin = cfg.auto_margin * math.sqrt(p * (1 - p) / max(held_out, 1))
    chosen = next(r for r in eligible if r["accuracy"] >= p - margin - 1e-9)
    if chosen is not best:
        log.info("  %s: %.2f%%, within %g standard error (%.1f points on %d held-out images) of %s's %.2f%%, and "
                 "cheaper", chosen["strategy"], 100 * chosen["accuracy"], cfg.auto_margin, 100 * margin, held_out,
                 best["strategy"], 100 * p)
    return chosen


def describe_choice(selection: dict[str, Any]) -> str:
    """The choice in a line (log, result table, report): the winner, and every strategy's mean."""
    rows = ", ".join(_describe_row(r) for r in selection["candidates"])
    margin = selection.get("margin", 0)
    rule = f"the cheapest within {margin:g} standard error of the best mean" if margin else "the best mean"
    return f"{selection['chosen']}, {rule} on {selection['folds']} of {selection['of']} folds ({rows})"


def _describe_row(row: dict[str, Any]) -> str:
    if "left_out" in row:
        return f"{row['strategy']} left out"
    stopped = row.get("epoch", 0) < row.get("epochs", 0)  # a trained strategy best before its last epoch
    return f"{row['strategy']} {100 * row['accuracy']:.2f}%" + (f" after epoch {row['epoch']} of {row['epochs']}" if stopped else "")


class HeldOutByEpoch(Hook):
    """A fold's held-out accuracy after each epoch, with the run's test-time views: where it was best
    is when the final run stops (`best_epoch`), early stopping on the folds' signal rather than on a
    validation split too small to tell epochs apart."""

    def __init__(self, held_out: Split, tta: str):
        self.held_out, self.tta, self.accuracies = held_out, tta, []

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        setup = loop.setup
        # PyTorch's own forward: the weights change every epoch (a compiled or exported model would be made again)
        logits = predict_logits(setup.model, setup.preprocess, self.held_out.images, device=setup.device,
                                tta=self.tta, **setup.inference.in_torch().kwargs())
        self.accuracies.append(float((logits.argmax(1).numpy() == self.held_out.labels).mean()))


class Deadline(Hook):
    """Stops a fold's run at the step after which it can no longer end by `deadline`, projected
    from its own steps so far (a head-only phase first projects low; later steps correct it)."""

    def __init__(self, deadline: float | None, after_steps: int = 3):
        self.deadline, self.after_steps, self.missed = deadline, after_steps, False
        self.t0 = 0.0

    def on_run_start(self, loop: Loop) -> None:
        self.t0 = time.perf_counter()

    def after_step(self, loop: Loop) -> None:
        done = loop.state.step
        if self.deadline is None or done < self.after_steps:
            return
        now = time.perf_counter()
        if now + (now - self.t0) / done * (loop.total_steps - done) > self.deadline:
            self.missed = True
            loop.request_stop("the time budget", now=True)


class StepProgress(Hook):
    """A progress bar over a fold's steps (a fold has no epoch log lines)."""

    def __init__(self, description: str):
        self.description = description

    def on_run_start(self, loop: Loop) -> None:
        self.bar = progress.make_progress()
        self.bar.start()
        self.task = self.bar.add_task(self.description, total=loop.total_steps, info="")

    def after_step(self, loop: Loop) -> None:
        self.bar.advance(self.task)

    def on_run_end(self, loop: Loop) -> None:
        self.bar.stop()


@contextmanager
def _quiet() -> Iterator[None]:
    """A fold's build says what the run's own build said already (data, weights, head): not again."""
    logger = logging.getLogger("cnnkit")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
