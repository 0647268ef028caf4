"""`--time-budget` for a linear probe: how many training images the head learns from.

A probe has no epochs to plan: its cost is the frozen backbone's forward passes over the training
images (and their mirror images, with `probe_flip`), then the head's fit, the test and the report.
So under a budget the training images are taken in a seeded, class-balanced random order, in chunks,
and the features stop where the rest of the run would no longer end in time: the last chunks' measured
rate re-plans the count (`budget.probe_images`), as a trained run's epochs re-plan its steps, and the
head's fit is reckoned from timing its passes over the latest rows (probe.fit_row_seconds). Mirror
images are taken only while the plan holds every training image with them: where it does not, a
mirror image's forward pass goes to another image instead (on flowers12's cached features, twice the
images on plain views beat half as many with their mirror images by 1 to 12 points, 48 to 384 images). The
validation features come first (they choose the head's weight decay whatever the count), and absorb
the engine's compile (counted again for the test, whose model compiles too). Test-time views and
robustness samples are fitted to their share of the budget after the first chunk, as in a trained run
(TimeBudget.fit_extras).

A probe whose backbone was chosen by cross-validation (`probe_candidates`, `--strategy auto`) is
not cut: choosing already kept within its share of the budget, and computed every training row.
The count goes into the run record (run.json, `probe_images`) and the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cnnkit.analysis import class_balanced_order
from cnnkit.budget import final_seconds, probe_images
from cnnkit.probe import COST_SAMPLE, Rows, fit_fixed_seconds, fit_row_seconds, head_parts

if TYPE_CHECKING:
    from cnnkit.training.budget_hook import TimeBudget
    from cnnkit.training.build import Setup

log = logging.getLogger(__name__)

# Training images per chunk: the clock is read between chunks (5-15 s of forward passes on a 2-core CPU).
CHUNK = 1024  # a multiple of the recipes' evaluation batches
LEAST_PER_CLASS = 10  # however short the budget: a head needs rows of every class

def budget_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """The training images' indices in the order a budget takes them: shuffled by the run's seed, then
    each class in turn, so that any prefix holds the classes about equally (a folder's split is sorted
    by class and file name)."""
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    return shuffled[class_balanced_order(np.asarray(labels)[shuffled])]


def budgeted_rows(setup: Setup, budget: TimeBudget, rows_of: Callable[[np.ndarray, str, bool], Rows],
                  val_rows: Rows, val_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The training rows that fit in the budget (each image's, then the mirror images' taken), and their
    labels. `rows_of(images, what, mirrored)` computes (or loads from the cache) the rows of some images,
    with their mirror images' or without. The validation's rows (`val_rows`) took `val_s`:
    their forward passes' time is a first guess of a pass's time (too long by the engine's compile),
    replaced by each chunk's own, and the head's fit is first timed on them, then on the latest
    training rows. Under a CPU engine other than eager torch, what the validation took beyond its
    passes' share is counted again for the test: the whole model compiles (or exports) there as the
    backbone did here."""
    cfg, train = setup.cfg, setup.splits.train
    val_passes = sum(len(r) for r in val_rows if r is not None)
    image_s, overhead_s = val_s / max(val_passes, 1), 0.0
    head, classes = head_parts(setup.model)[1], len(setup.ds.classes)  # the fitted part (power is elementwise)
    fit = _FitCost(fit_fixed_seconds(head, val_rows[0].shape[1]), fit_row_seconds(head, val_rows[0], classes))
    order = budget_order(train.labels, cfg.seed)
    least = min(len(order), LEAST_PER_CLASS * len(np.unique(train.labels)))
    parts: list[Rows] = []
    timed: list[tuple[float, int]] = []  # each chunk's seconds and forward passes
    done, mirrored = 0, bool(cfg.probe_flip)  # images taken; whether the next chunk takes their mirror images
    while done < len(order):
        elapsed = time.perf_counter() - budget.started_at
        final_s = _after_fit_s(budget, image_s, overhead_s) + fit.fixed_s + _rows(parts) * fit.row_s

        def images(views: int) -> int:  # all the budget holds, each (from here on) with `views` passes and rows
            return probe_images(budget.budget_s, elapsed, done, views * image_s, views * fit.row_s,
                                final_s - done * views * fit.row_s)  # the rows taken are in final_s as they are

        if mirrored and images(2) < len(order):
            mirrored = False
            log.info("time budget %s: the training images' mirror images left out, so that more images fit",
                     cfg.time_budget)
        views = 2 if mirrored else 1
        target = max(least, min(len(order), images(views)))
        if target <= done:
            break
        wanted = target - done
        if setup.inference.engine != "torch":  # a compiled engine pads a last, shorter batch: it costs a whole one
            wanted = -(-wanted // cfg.eval_batch_size) * cfg.eval_batch_size
        take = order[done: done + min(CHUNK, wanted)]  # eager torch: what fits, no more (a batch more overran)
        t0 = time.perf_counter()
        parts.append(rows_of(train.images[take], f"train {done + 1:,}-{done + len(take):,}", mirrored))
        timed.append((time.perf_counter() - t0, views * len(take)))
        image_s = sum(t for t, _ in timed[-3:]) / sum(n for _, n in timed[-3:])  # the last chunks' (earlier ones may be cached)
        if _rows(parts) - views * len(take) < COST_SAMPLE:  # timed again until the sample is whole (ms on wide rows)
            fit = _FitCost(fit.fixed_s, fit_row_seconds(head, _latest_rows(parts), classes))
        if setup.inference.engine != "torch":  # eager torch compiles nothing for the test
            overhead_s = max(0.0, val_s - val_passes * image_s)
        if not done:  # fewer test views and robustness samples where they would take more than their share
            budget.fit_extras(image_s)
        done += len(take)
    chunks = np.split(order[:done], np.cumsum([len(p) for p, _ in parts])[:-1])
    rows = np.concatenate([p for p, _ in parts] + [f for _, f in parts if f is not None])
    labels = np.concatenate([train.labels[c] for c in chunks]
                            + [train.labels[c] for c, (_, f) in zip(chunks, parts) if f is not None])
    if cfg.probe_flip and len(rows) == done:
        setup.record.probe_flip = False  # run.json: no mirror image trained the head
    fewest = min(len(order), -(-least // cfg.eval_batch_size) * cfg.eval_batch_size)  # the least, in whole batches
    _record(setup, budget, done, len(order), len(rows), image_s, fit, overhead_s, at_least=done <= fewest)
    return rows, labels


class _FitCost(NamedTuple):
    """The head's fit: seconds whatever the rows, and seconds per row."""
    fixed_s: float
    row_s: float


def _rows(parts: list[Rows]) -> int:
    """The training rows taken: each image's, and the mirror images' where they were taken."""
    return sum(len(p) + (0 if f is None else len(f)) for p, f in parts)


def _after_fit_s(budget: TimeBudget, image_s: float, overhead_s: float) -> float:
    """The test and the report, at `image_s` a forward pass, with the test's compile (`overhead_s`)."""
    return final_seconds(budget.final_images(), image_s, budget.setup.cfg.report) + overhead_s


def _latest_rows(parts: list[Rows]) -> np.ndarray:
    """Up to COST_SAMPLE of the latest chunks' rows (plain and mirrored), to time the head's passes on."""
    rows: list[np.ndarray] = []
    for part in reversed(parts):
        rows += [r for r in part if r is not None]
        if sum(len(r) for r in rows) >= COST_SAMPLE:
            break
    return np.concatenate(rows)[:COST_SAMPLE]


def _record(setup: Setup, budget: TimeBudget, used: int, available: int, rows: int, image_s: float, fit: _FitCost,
            overhead_s: float, at_least: bool) -> None:
    """Into the run record and the log: the images used (`rows`: theirs and the mirror images' taken), and
    when the run should end (`image_s`: one forward pass; `fit`: the head's; `overhead_s`: the test's
    compile). A warning where even the least images (`at_least`) end past the budget; a plan a little past
    it otherwise is the last chunk's rate drifting from the one that chose it, inside estimates reckoned high."""
    cfg = setup.cfg
    setup.record.probe_images = used
    elapsed = time.perf_counter() - budget.started_at
    after_fit_s = _after_fit_s(budget, image_s, overhead_s)
    fit_s = fit.fixed_s + rows * fit.row_s
    budget.planned_time_s = elapsed + fit_s + after_fit_s  # the features are done: the head's fit, the test, the report
    budget.fit_deadline = budget.started_at + budget.budget_s - after_fit_s  # a longer path is cut (probe.fit_head)
    setup.record.planned_time_s = round(budget.planned_time_s, 1)
    setup.record.save(setup.run_dir)
    mirrors = rows - used
    log.info("time budget %s: the head learns from %s of the %s training images (%s%s), features at %.0f "
             "forward passes/s, the head's fit about %.0f s; the run should end after %.0f s", cfg.time_budget,
             f"{used:,}", f"{available:,}", "all of them" if used == available else "a class-balanced random sample",
             "" if not cfg.probe_flip else ", with their mirror images" if mirrors == used else
             ", without their mirror images" if not mirrors else f", {mirrors:,} with their mirror images",
             1 / image_s, fit_s, budget.planned_time_s)
    if at_least and budget.planned_time_s > budget.budget_s:
        log.warning("time budget %s: the run cannot end in time: it will end after about %.0f s here. A larger "
                    "budget or a smaller input size fits.", cfg.time_budget, budget.planned_time_s)
