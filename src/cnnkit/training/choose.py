"""Choose a linear probe's backbone by measuring, before the run is built: for each candidate
(`probe_candidates`), features of the training and validation images (and their mirror images,
with `probe_flip`), then k-fold cross-validation of a linear head for each weight decay; the best
mean wins. Offline backbones differ a lot from one photo set to the next (Lite2 beat Lite0 by five
points on one two-class set and lost by two on flowers12), so no fixed choice is right for all.

With `probe_screen` the candidates are first scored on their plain views alone, and only those
within that many standard deviations of the best go on to their mirror images (half of each
candidate's forward passes) and are compared on both views, as the run trains: a backbone
clearly behind costs half as much.

With `probe_concat` the two best backbones' features side by side (models.concat) are one more
candidate, scored on the rows already computed: chosen only where the folds prefer it to both.

Under `--time-budget` the candidates may take 60% of it: one whose features would not fit (timed on a
few of its images; screened, with room kept for the eventual best's mirror images) is
left out, and the log says so; so are a finalist's mirror images where they would not fit (none fitting,
the run trains and tests on plain views). The pair side by side runs
both backbones over the test images and the report's, so it is a candidate only where that fits in
what the budget leaves after choosing.
The held-out test split is never looked at. The choice, its estimate and every candidate's score
go into the run record (run.json): the run's configuration stays what it was asked to be.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cnnkit import probe
from cnnkit.budget import final_seconds, parse_duration
from cnnkit.config import Config
from cnnkit.data.copies import copy_groups
from cnnkit.inference import inference_engine, predict_logits
from cnnkit.models import create_model
from cnnkit.models.block_pooled import ARG as POOLED_BLOCKS
from cnnkit.models.concat import SEPARATOR
from cnnkit.models.pretrained import input_size
from cnnkit.preprocess import make_preprocess
from cnnkit.runs import RunRecord, run_splits
from cnnkit.runtime import resolve_device, resolve_precision
from cnnkit.training.budget_hook import final_images, report_samples
from cnnkit.training.build import imagenet_model
from cnnkit.summary import summarize

log = logging.getLogger(__name__)

# Under --time-budget, choosing may take this share of it: the chosen head, the test and the report follow.
CANDIDATES_SHARE = 0.6
TIMING_IMAGES = 32  # under a time budget, a candidate's features are timed on this many images before it runs,
WARM_UP_IMAGES = 8  # after these
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)  # 1e-4 won every fold of flowers12 when it was the smallest

Variants = dict[int, probe.Rows]  # a candidate's training rows, by how many blocks' pooled outputs the rows hold (0: the backbone's features alone)


def choose_backbone(cfg: Config, whole: bool = False, started_at: float | None = None) -> tuple[Config, RunRecord]:
    """The configuration the run trains (the chosen model, at its weights' input size) and the record.
    Under a time budget too short for the first candidate's features of every image, nothing is chosen
    (the record holds no selection): the run's probe on that candidate learns from as many images as
    fit (training/probe_budget.py); `whole`: choose all the same (--strategy auto's folds need its rows).
    Choosing ends by CANDIDATES_SHARE of the budget counted from `started_at` (the budget clock's start, a
    time.perf_counter() value; None: from here), so decoding the images and finding their copies count too:
    on 5,000 photos they took 22 s of a 90-s budget, and the run, choosing for 52 s more, ended after 102-111 s."""
    started = started_at if started_at is not None else time.perf_counter()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    backbones = Backbones(device)
    _, splits = run_splits(cfg.to_dict())
    labels = np.concatenate([splits.train.labels, splits.val.labels])
    groups = copy_groups([splits.train.images, splits.val.images])  # copies share a fold
    rows: list[dict[str, Any]] = []
    total_s = parse_duration(cfg.time_budget) if cfg.time_budget else None
    budget_s = total_s * CANDIDATES_SHARE if total_s is not None else None
    screen = cfg.probe_screen is not None and cfg.probe_flip and len(cfg.probe_candidates) > 1
    features: dict[str, Variants] = {}  # each candidate's rows, on the views it was last scored on
    timed = inference_engine(cfg.to_dict(), device) == "torch"  # another engine's first batch compiles or exports
    if budget_s is not None and timed and not whole:
        first = replace(cfg, model=cfg.probe_candidates[0])
        guess = uncached_seconds(_scored(first, flip=not screen), splits, len(labels), backbones, precision)
        left_s = budget_s - (time.perf_counter() - started)
        if guess > left_s:
            log.info("  choosing a backbone: left out, %s's features of the %d training images alone would take about "
                     "%.0f s, past the %.0f s left of the %.0f s of the time budget %s that choosing may take: a linear "
                     "probe on it learns from as many of them as fit", first.model, len(labels), guess, max(left_s, 0),
                     budget_s, cfg.time_budget)
            return first, RunRecord(model=first.model if first.model != cfg.model else None)
    for name in cfg.probe_candidates:
        if rows and budget_s is not None:
            guess = guess_seconds(rows[0], replace(cfg, model=name), splits, len(labels), backbones, precision, timed)
            floor = screen_floor(rows, cfg, len(labels)) if screen else None
            if not fits_in_budget(time.perf_counter() - started, rows, guess, screen, budget_s, floor):
                kept = reserved_seconds(rows, screen, floor, guess)
                log.info("  %s: left out, its features would take about %.0f s: with the %.0f s taken%s, past the "
                         "%.0f s of the time budget %s that choosing may take", name, guess,
                         time.perf_counter() - started, f" and {kept:.0f} s kept for the best's mirror images"
                         if kept else "", budget_s, cfg.time_budget)
                continue
        rows.append(_candidate(replace(cfg, model=name), splits, labels, groups, backbones, precision, flip=not screen,
                               macs=budget_s is not None and not timed, keep=features))
        if len(rows) > 1 and budget_s is not None:
            rows[-1]["guessed_seconds"] = round(guess, 1)  # what the plan took it for (run.json)
    if screen:
        left = None if budget_s is None else lambda: budget_s - (time.perf_counter() - started)
        rows = _finalists(rows, cfg, splits, labels, groups, backbones, precision, features, left)
    scored = [r for r in rows if not screen or "screen_accuracy" in r]  # on the views the run trains on
    plain = cfg.probe_flip and not scored  # the budget held no candidate's mirror images
    if plain:
        scored = rows
        log.info("  mirror images left out: not one candidate's fitted in what the time budget %s leaves choosing; "
                 "the head learns from plain views, and the test takes no mirrored view", cfg.time_budget)
    if cfg.probe_concat and len(scored) > 1:
        top = sorted(scored, key=lambda r: r["cv_accuracy"], reverse=True)[:2]
        samples = report_samples(cfg.report, cfg.report_robustness_samples, splits, len(np.unique(labels)))
        tta = "none" if plain else cfg.tta
        after_s = pair_after_seconds(top, len(labels), final_images(len(splits.test), tta, samples), cfg.report)
        if total_s is None or time.perf_counter() - started + after_s <= total_s:
            rows.append(_concat_candidate(top, features, labels, groups, cfg))
            scored.append(rows[-1])
        else:
            log.info("  the two best side by side: left out, both backbones over the test and report images would "
                     "take about %.0f s, more than the time budget %s leaves", after_s, cfg.time_budget)
    best = max(scored, key=lambda r: r["cv_accuracy"])  # a tie: the first, a single backbone before two
    log.info("linear probe on %s: the best of %d candidates by %d-fold cross-validation on %d images",
             best["model"], len(rows), len(best["fold_accuracies"]), len(labels))
    model_args = ({**cfg.model_args, **{k: best[k] for k in ("member_sizes", POOLED_BLOCKS) if k in best}}
                  if "member_sizes" in best or POOLED_BLOCKS in best else None)
    views = {"probe_flip": False, "tta": "none"} if plain else {}  # as the folds scored them
    record = RunRecord(model=best["model"], model_args=model_args, **views,
                       selection={"folds": len(best["fold_accuracies"]), "images": int(len(labels)),
                                  "weight_decays": list(WEIGHT_DECAYS), "chosen": best, "candidates": rows})
    return replace(cfg, model=best["model"], model_args=model_args or cfg.model_args, **views), record


def _concat_candidate(top: list[dict[str, Any]], features: dict[str, Variants], labels: np.ndarray,
                      groups: np.ndarray, cfg: Config) -> dict[str, Any]:
    """The two best backbones' (`top`) features side by side (models.concat), scored as the others:
    their rows are already computed, so this costs the folds' fits alone. With probe_blocks, both
    with their blocks' outputs or both without (models.concat gives its members one model_args)."""
    names = [n for n in cfg.probe_candidates if n in {r["model"] for r in top}]  # the recipe's order
    t0 = time.perf_counter()
    variants = {}
    for blocks in features[names[0]]:
        plain = np.concatenate([features[n][blocks][0] for n in names], 1)
        flips = [features[n][blocks][1] for n in names]
        variants[blocks] = plain, None if any(f is None for f in flips) else np.concatenate(flips, 1)  # type: ignore[arg-type]
    sizes = [input_size(n, cfg.input_size) for n in names]  # as each one's rows were made
    return _best_variant(SEPARATOR.join(names), variants, labels, groups, cfg, t0, {"member_sizes": sizes})


def fits_in_budget(elapsed_s: float, rows: list[dict[str, Any]], guess_s: float, screen: bool,
                   budget_s: float, floor: float | None = None) -> bool:
    """Whether one more candidate, `guess_s` on its plain views, fits in what choosing may take.
    Screened, the eventual best's mirror images (about as long again as its plain views) must fit too, and
    it is the new one or one already scored within the screen (`floor`): the costlier of their mirror images
    is kept free. `_finalists` computes mirror images best first, each only where it fits, so the others'
    need no room kept: keeping it for every one within the screen left Lite2 out of flowers12's choice under
    `--time-budget 2m` on 2 of 3 seeds (a Zen 3 1.19 times the reference), where the whole default fits."""
    return elapsed_s + guess_s + reserved_seconds(rows, screen, floor, guess_s) <= budget_s


def reserved_seconds(rows: list[dict[str, Any]], screen: bool, floor: float | None, guess_s: float) -> float:
    """Screened, the time kept for the eventual best's mirror images (about its plain views' time): the
    costliest of the new candidate's (`guess_s`) and those of the candidates already scored at or above
    `floor` (`screen_floor` of them; None: all). One below it needs a later best with a wider spread to
    come back, and `_finalists` then computes its mirror images only where they fit."""
    if not screen:
        return 0.0
    return max([guess_s, *(r["seconds"] for r in rows if floor is None or r["cv_accuracy"] >= floor)])


def screen_floor(rows: list[dict[str, Any]], cfg: Config, images: int) -> float:
    """The plain-view estimate below which a candidate's mirror images are not computed: the best's less
    `probe_screen` of its folds' standard deviations, and at least one image of a fold (see `_finalists`)."""
    top = max(rows, key=lambda r: r["cv_accuracy"])
    return top["cv_accuracy"] - max(cfg.probe_screen * top["cv_sd"], cfg.cv_folds / images)


def pair_after_seconds(top: list[dict[str, Any]], images: int, evaluated: int, report: bool) -> float:
    """The test and the report of the pair side by side: each member's seconds per image and view
    while choosing (its `images` training and validation images on its views, its folds' fits
    included, so an upper bound), times the `evaluated` images, and the test's and report's own work."""
    return final_seconds(evaluated, sum(_per_view(r["seconds"], r, images) for r in top), report)


def seconds_per_view(selection: dict[str, Any]) -> float:
    """The chosen model's forward seconds per image and view, from its backbones' features while choosing
    (backbones side by side: the sum of theirs); a record without them, its candidates' whole seconds."""
    rows = {r["model"]: r for r in selection["candidates"]}
    members = [rows[m] for m in selection["chosen"]["model"].split(SEPARATOR)]
    return sum(_per_view(r.get("feature_seconds", r["seconds"]), r, selection["images"]) for r in members)


def _per_view(seconds: float, row: dict[str, Any], images: int) -> float:
    """A candidate's `seconds` per image and view: its `images` on its plain views, or with their mirrors."""
    return seconds / (images * (1 if row["views"] == "plain" else 2))


def _macs(name: str, cfg: Config) -> int:
    """Multiply-adds of one image through the candidate at its input size (cnnkit summary)."""
    size = input_size(name, cfg.input_size)
    return summarize(create_model(name, 1000, 3, size), (3, size, size))["total_macs"]


def guess_seconds(first: dict[str, Any], cfg: Config, splits: Any, images: int, backbones: Backbones, precision: str,
                  timed: bool) -> float:
    """A candidate's (cfg.model's) time on the plain views of `images` training images, before they are
    computed: the first candidate's fits (the same rows, and Lite0-2's features are equally wide) and its
    own features at the rate timed on a few images (`timed`, PyTorch's engine). Scaling the first one's
    time by multiply-adds guessed Lite2 at 26 s on flowers12 where it took 16 (Lite0's fits and its
    images' resizing do not scale so, nor does a depthwise layer run at a dense one's rate), which left
    it out of budgets it fitted in; under another engine, whose first batch compiles or exports, that
    scaling stays."""
    if not timed:
        return first["seconds"] * _macs(cfg.model, cfg) / max(first["macs"], 1)
    return max(first["seconds"] - first["feature_seconds"], 0.0) + images * seconds_per_image(cfg, splits, backbones,
                                                                                               precision)


def uncached_seconds(cfg: Config, splits: Any, images: int, backbones: Backbones, precision: str) -> float:
    """A candidate's features of its `images` training and validation images on the views cfg scores it
    on (`_scored`), timed on a few before any is computed; 0 where the cache holds them (a run again)."""
    _, source = backbones.get(cfg)
    pre = make_preprocess(cfg, splits.train.images)
    if all(probe.rows_cached(pre, split.images, cfg, backbones.device, source, precision)
           for split in (splits.train, splits.val)):
        return 0.0
    return images * probe.views_per_image(cfg) * seconds_per_image(cfg, splits, backbones, precision)


def seconds_per_image(cfg: Config, splits: Any, backbones: Backbones, precision: str) -> float:
    """The candidate's features' seconds per image, timed on TIMING_IMAGES training images after a few to
    warm up (memory, kernels, the BatchNorm fold), in batches no larger than the run's."""
    model, _ = backbones.get(cfg)
    pooled = probe.PooledFeatures(model)  # its BatchNorm folded in the warm-up (cnnkit.fold_batchnorm)
    kwargs = {"device": backbones.device, "precision": precision, "channels_last": cfg.channels_last,
              "batch_size": cfg.eval_batch_size, "outputs": pooled}
    pre = make_preprocess(cfg, splits.train.images)
    warm, timed = splits.train.images[:WARM_UP_IMAGES], splits.train.images[WARM_UP_IMAGES:][:TIMING_IMAGES]
    predict_logits(model, pre, warm, **kwargs)
    t0 = time.perf_counter()
    predict_logits(model, pre, timed, **kwargs)
    return (time.perf_counter() - t0) / max(len(timed), 1)


def _finalists(rows: list[dict[str, Any]], cfg: Config, splits: Any, labels: np.ndarray, groups: np.ndarray,
               backbones: Backbones, precision: str, keep: dict[str, Variants],
               left: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """The rows again: those within `probe_screen` standard deviations (the spread of the best one's
    folds) of the best plain-view estimate now scored with their mirrored views too, and marked
    with their `screen_accuracy`; the others as they were. The margin is the folds' own noise, so a
    small set (wide spread) keeps its candidates and a large one drops those clearly behind; it is at
    least one image of a fold, since folds that all read the same (a best of 100% on every fold: a
    spread of 0) would otherwise keep only exact ties. Under a time budget (`left`: the seconds choosing
    has left) the best go first, and one whose mirror images (about its plain views' time) would not fit is
    not scored on them."""
    top = max(rows, key=lambda r: r["cv_accuracy"])
    floor = screen_floor(rows, cfg, len(labels))
    done: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["cv_accuracy"], reverse=True):
        if r["cv_accuracy"] < floor:
            margin = (f"{cfg.probe_screen:g} of its folds' standard deviation"
                      if cfg.probe_screen * top["cv_sd"] >= cfg.cv_folds / len(labels) else "one image of a fold")
            log.info("  %s: %.2f points below the best on plain views (more than %s); its mirror images are not "
                     "computed", r["model"], 100 * (top["cv_accuracy"] - r["cv_accuracy"]), margin)
            continue
        if left is not None and r["seconds"] > left():
            log.info("  %s: its mirror images would take about %.0f s, more than the %.0f s the time budget %s leaves "
                     "choosing; they are not computed", r["model"], r["seconds"], max(left(), 0), cfg.time_budget)
            continue
        full = _candidate(replace(cfg, model=r["model"]), splits, labels, groups, backbones, precision, flip=True,
                          macs=False, keep=keep)
        guessed = {"guessed_seconds": r["guessed_seconds"]} if "guessed_seconds" in r else {}  # its plain views'
        done[r["model"]] = {**full, **guessed, "screen_accuracy": r["cv_accuracy"],
                            "seconds": round(full["seconds"] + r["seconds"], 1),
                            "feature_seconds": round(full["feature_seconds"] + r["feature_seconds"], 1)}
    return [done.get(r["model"], r) for r in rows]  # in the recipe's order


def _candidate(cfg: Config, splits: Any, labels: np.ndarray, groups: np.ndarray, backbones: Backbones, precision: str,
               flip: bool, macs: bool, keep: dict[str, Variants]) -> dict[str, Any]:
    """One backbone's row of the choice: its cross-validated accuracy at the best weight decay,
    on its plain views alone or (`flip`) with the mirrored ones as the run will train on them.
    Its features go into `keep` (for the backbones side by side)."""
    t0 = time.perf_counter()
    variants = candidate_features(_scored(cfg, flip), splits, backbones, precision)
    keep[cfg.model] = variants
    extra = {"feature_seconds": round(time.perf_counter() - t0, 1), **({"macs": _macs(cfg.model, cfg)} if macs else {})}
    return _best_variant(cfg.model, variants, labels, groups, cfg, t0, extra)


def _scored(cfg: Config, flip: bool) -> Config:
    """The candidate's configuration for its rows: with its mirrored views (`flip`) as the run's, or plain views alone."""
    return cfg if flip else replace(cfg, probe_flip=False, tta="none")


def _best_variant(model: str, variants: Variants, labels: np.ndarray, groups: np.ndarray, cfg: Config, t0: float,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """The candidate's row: its features alone, or with probe_blocks the better of them and them joined
    by its blocks' pooled outputs (a tie: without), the other's estimate kept in the row. Its seconds
    are both's (one forward pass, two sets of fits), so a time budget counts a backbone once."""
    if len(variants) == 1:
        return _score(model, *variants[0], labels, groups, cfg, t0, extra)
    rows = {blocks: _score(model, *rows, labels, groups, cfg, t0, extra, blocks) for blocks, rows in variants.items()}
    best = max(rows, key=lambda b: (rows[b]["cv_accuracy"], -b))
    other = next(row for blocks, row in rows.items() if blocks != best)
    return {**rows[best], "seconds": round(time.perf_counter() - t0, 1),
            "other_blocks": {POOLED_BLOCKS: other.get(POOLED_BLOCKS, 0), "cv_accuracy": other["cv_accuracy"],
                             "cv_sd": other["cv_sd"]}}


def _score(model: str, plain: np.ndarray, flipped: np.ndarray | None, labels: np.ndarray, groups: np.ndarray,
           cfg: Config, t0: float, extra: dict[str, Any], blocks: int = 0) -> dict[str, Any]:
    plain, flipped = probe.powered((plain, flipped), probe.rows_power(cfg.model_args))  # as the run's head sees them
    below = 0.0 if cfg.tta == "none" else cfg.tta_below  # held-out images judged on the test's views: plain alone
    folds = probe.fold_accuracies(plain, flipped, labels, cfg.cv_folds, cfg.seed, cfg.label_smoothing, WEIGHT_DECAYS,
                                  probe.head_class_weights(cfg.class_balance, labels, int(labels.max()) + 1), groups,
                                  below)
    wd, accuracies = max(folds.items(), key=lambda kv: (np.mean(kv[1]), -kv[0]))  # a tie: the smaller decay
    mean, sd = float(np.mean(accuracies)), float(np.std(accuracies))
    row = {"model": model, "cv_accuracy": round(mean, 4), "cv_sd": round(sd, 4), "weight_decay": wd,
           "fold_accuracies": [round(a, 4) for a in accuracies],
           "views": "plain and mirrored" if flipped is not None else "plain", "features": int(plain.shape[1]),
           "seconds": round(time.perf_counter() - t0, 1), **extra, **({POOLED_BLOCKS: blocks} if blocks else {})}
    log.info("  %s%s: %d-fold cross-validated accuracy %.2f%% ± %.2f (weight decay %g, %s views), %.0f s", model,
             f" with its last {blocks} blocks' pooled outputs" if blocks else "", len(accuracies), 100 * mean, 100 * sd,
             wd, row["views"], row["seconds"])
    return row


def candidate_features(cfg: Config, splits: Any, backbones: Backbones, precision: str) -> Variants:
    """Training and validation images' features (and mirrored ones) by the candidate backbone: {0:
    them}, and with probe_blocks N {N: them joined by its last N blocks' pooled outputs} too, from
    the same forward passes. The features alone are the wide rows' last columns (models.block_pooled);
    they are cached as the backbone's own, so a run that chooses them reads them from there."""
    wide = replace(cfg, model_args={**cfg.model_args, POOLED_BLOCKS: cfg.probe_blocks}) if cfg.probe_blocks else cfg
    model, source = backbones.get(wide)  # as the run's own build makes it, model_args included
    device = backbones.device
    pre = make_preprocess(cfg, splits.train.images)
    splits_ = (("train", splits.train), ("validation", splits.val))
    parts = [probe.probe_rows(model, pre, split.images, wide, device, source, what, precision) for what, split in splits_]
    if not cfg.probe_blocks:
        return {0: _joined(parts)}
    width = model.num_features - sum(model.block_widths)  # the backbone's own features, the last columns

    def own(rows: np.ndarray | None) -> np.ndarray | None:
        return None if rows is None else np.ascontiguousarray(rows[:, -width:])

    alone = [(own(p), own(f)) for p, f in parts]
    for (_, split), (p, f) in zip(splits_, alone):
        probe.store_rows(pre, split.images, cfg, device, source, precision, p, f)
    return {0: _joined(alone), cfg.probe_blocks: _joined(parts)}  # type: ignore[arg-type]


class Backbones:
    """The candidates with their ImageNet weights on `device`, in the run's memory format, and where the
    weights came from: each built once in a choice, though its features may be timed, then computed on
    plain views and later on mirror images (a build, its weights loaded, took about 0.4 s on the Zen 3,
    and the copy with its BatchNorm folded in is found again for the same weights: cnnkit.fold_batchnorm)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._built: dict[tuple[str, str, bool], tuple[torch.nn.Module, str]] = {}

    def get(self, cfg: Config) -> tuple[torch.nn.Module, str]:
        """cfg.model with cfg.model_args (wider rows with probe_blocks: another model)."""
        key = (cfg.model, json.dumps(cfg.model_args, sort_keys=True), cfg.channels_last)
        if key not in self._built:
            model, source = imagenet_model(cfg)
            model.to(self.device)
            if cfg.channels_last:
                model.to(memory_format=torch.channels_last)
            self._built[key] = model, source
        return self._built[key]


def _joined(parts: list[probe.Rows]) -> probe.Rows:
    """The training and the validation images' rows, one after the other."""
    plain = np.concatenate([p for p, _ in parts])
    return plain, None if parts[0][1] is None else np.concatenate([f for _, f in parts])
