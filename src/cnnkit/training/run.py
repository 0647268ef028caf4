"""A whole training run: prepare it (a new run, or the resumption of one), fit it with the standard
hooks (or fit a linear probe), then, after `fit` returns, test the best weights once and write the
summary and the report.

    setup, checkpoint = prepare(cfg)             # or prepare(None, resume=RUN)
    result = run_training(setup, checkpoint)     # fit -> test -> summary.json -> report.html
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cnnkit import allocator, distributed, probe
from cnnkit.budget import parse_duration
from cnnkit.checkpoint import Checkpoint, load_checkpoint
from cnnkit.config import Config
from cnnkit.distributed import DistInfo
from cnnkit.errors import ConfigError, RunError
from cnnkit.evaluate import accuracy_interval, accuracy_without, classification_metrics, small_split_warnings
from cnnkit.fileio import write_bytes_atomic, write_json_atomic
from cnnkit.inference import predict_logits
from cnnkit.models import count_parameters
from cnnkit.runs import RunRecord, save_evaluation
from cnnkit.runtime import describe_device, versions
from cnnkit.training.budget_hook import TimeBudget
from cnnkit.training.build import Setup, build
from cnnkit.training import data_selection
from cnnkit.training.choose import choose_backbone, seconds_per_view
from cnnkit.training.choose_strategy import choose_strategy
from cnnkit.training.hooks import (BestEpoch, Checkpointer, LookaheadHook, LrSchedule, MetricsLog, StopAfterEpoch,
                                   Unfreeze, append_metrics, saved_loop_state)
from cnnkit.training.loop import Hook, Loop, TrainState
from cnnkit.training.probe_budget import budgeted_rows

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed; anything else would make it another run.
RESUMABLE_OVERRIDES = {"epochs", "device", "threads", "early_stopping_patience", "eval_batch_size",
                       "checkpoint_every_epochs", "checkpoint_every_minutes"}


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    test: dict[str, Any]
    summary: dict[str, Any]


def train(cfg: Config | None, resume: Path | None = None, overrides: dict[str, Any] | None = None,
          started_at: float | None = None, hooks: Sequence[Hook] = ()) -> TrainResult:
    """Train a model as `cfg` says (or resume the run in `resume`) and evaluate it on the test split.
    `started_at` (a time.perf_counter() value) is when the time budget's clock started; `hooks`
    join the standard ones, first at every point. From Python, call `cnnkit.allocator.reuse_freed_memory()`
    first, as the `cnnkit` command does: it is the process's choice, not a library's (the photo default's
    report on flowers12 took 112 s without it, 69 s with it, a 2-core Zen 3); the log says so where it was not."""
    started_at = started_at if started_at is not None else time.perf_counter()
    if (hint := allocator.untuned_hint()) is not None:
        log.info("%s", hint)
    setup, checkpoint = prepare(cfg, resume, overrides, started_at)
    return run_training(setup, checkpoint, hooks, started_at)


def prepare(cfg: Config | None, resume: Path | None = None, overrides: dict[str, Any] | None = None,
            started_at: float | None = None) -> tuple[Setup, Checkpoint | None]:
    """The built run, and the checkpoint it resumes from (None for a new run). Choices made by
    measuring (the strategy, a probe's backbone) come first; `started_at` starts a time budget's clock."""
    if resume is None:
        assert cfg is not None
        if cfg.strategy == "auto":
            chosen, record = choose_strategy(cfg, started_at)
            return build(chosen, None, record=record, asked=cfg), None
        if cfg.strategy == "linear-probe" and cfg.probe_candidates:
            chosen, record = choose_backbone(cfg, started_at=started_at)
            return build(chosen, None, record=record, asked=cfg), None
        return build(cfg, None), None
    cfg, checkpoint, record = _prepare_resume(Path(resume), overrides or {})
    return build(cfg, Path(resume), checkpoint, record), checkpoint


def standard_hooks(setup: Setup, started_at: float, resuming: bool) -> list[Hook]:
    """The hooks of an ordinary run, in the order they must see each point (training/hooks.py)."""
    cfg = setup.cfg
    hooks: list[Hook] = []
    if data_selection.selects(cfg):  # first: the last epoch's order is set before anything else sees it
        hooks.append(data_selection.HardestLastEpoch(cfg.last_epoch_fraction, len(setup.splits.train),
                                                     setup.loader.device, setup.dist))
    elif cfg.last_epoch_fraction < 1:
        log.info("last_epoch_fraction %g is off: %s", cfg.last_epoch_fraction, data_selection.why_not(cfg))
    hooks.append(LrSchedule())
    if setup.unfreezer is not None:
        hooks.append(Unfreeze(setup.unfreezer, cfg.strategy))
    if cfg.time_budget and not resuming:  # a resumed run keeps its plan (run.json)
        settled = setup.unfreezer.settled_step() if setup.unfreezer is not None else 0
        hooks.append(TimeBudget(setup, parse_duration(cfg.time_budget), started_at, settled))
    if cfg.lookahead:
        hooks.append(LookaheadHook(setup.model))
    if cfg.stop_after_epoch:
        hooks.append(StopAfterEpoch(cfg.stop_after_epoch))
    return hooks + [BestEpoch(cfg.early_stopping_patience, cfg.final_fit),
                    MetricsLog(setup.run_dir, setup.dist.is_main, cfg.tensorboard), Checkpointer(setup)]


ENGINE_NOTES = {  # what the log says of a run's CPU engine for fixed weights (cnnkit.inference)
    "onnxruntime": "under ONNX Runtime, fp32",
    "compile": "compiled by torch.compile with frozen weights (10-30 s of compiling for each model)",
    "int8": "in int8, calibrated on the first batch, compiled by torch.compile (10-30 s for each model)",
}


def run_training(setup: Setup, checkpoint: Checkpoint | None = None, extra_hooks: Sequence[Hook] = (),
                 started_at: float | None = None) -> TrainResult:
    started_at = started_at if started_at is not None else time.perf_counter()
    cfg = setup.cfg
    hooks = [*extra_hooks, *standard_hooks(setup, started_at, checkpoint is not None)]
    steps = setup.record.planned_steps or data_selection.run_steps(cfg, len(setup.loader))
    loop = Loop(setup, hooks, steps)
    if checkpoint is not None:
        loop.load_state_dict(saved_loop_state(checkpoint.meta, checkpoint.extra))
        where = f"epoch {loop.state.epoch + 1}, batch {loop.state.batch}" if loop.state.batch else f"epoch {loop.state.epoch}"
        log.info("resuming %s at %s of %d", setup.run_dir, where, loop.epochs)
    log.info("model %s: %s parameters; device %s, %s; run folder %s", cfg.model,
             f"{count_parameters(setup.model):,}", describe_device(setup.device), setup.precision, setup.run_dir)
    if setup.inference.engine in ENGINE_NOTES:
        log.info("forward passes with fixed weights (a probe's features, the test, the report) %s",
                 ENGINE_NOTES[setup.inference.engine])
    if cfg.strategy == "linear-probe":  # minutes of feature extraction, nothing to checkpoint midway
        _fit_probe(setup, loop)
    else:
        loop.fit()
    if loop.stop_reason:
        log.info("%s", loop.stop_reason)
    return _test_and_report(setup, loop, started_at)


def _find(loop: Loop, kind: type) -> Any:
    return next((h for h in loop.hooks if isinstance(h, kind)), None)


def _fit_probe(setup: Setup, loop: Loop) -> None:
    """Frozen backbone: cached features, a linear head fitted by L-BFGS. Its weight decay is chosen
    on the validation split, or, where cross-validation chose the backbone, by that; the head then
    learns from every image but the test split's, and the run reports the cross-validated estimate."""
    cfg, state, splits = setup.cfg, loop.state, setup.splits
    probe.check(cfg, setup.model)
    t0 = time.perf_counter()
    selection = setup.record.selection or {}
    chosen = selection.get("chosen")
    budget = _find(loop, TimeBudget)
    if chosen and budget is not None:  # choosing took its share: the test and report are fitted to the rest
        budget.fit_to_left(seconds_per_view(selection))
    feats, train_labels = _probe_features(setup, loop, budgeted=not chosen)
    power, head = probe.head_parts(setup.model)
    feats = {name: probe.powered(rows, power) for name, rows in feats.items()}  # each view's, before averaging
    rows = {"train": _probe_rows(*feats["train"], train_labels),
            "validation": _probe_rows(*feats["validation"], splits.val.labels)}
    held = {name: plain if flipped is None else (plain + flipped) / 2 for name, (plain, flipped) in feats.items()}
    k = len(setup.ds.classes)
    t_fit = time.perf_counter()
    if chosen:  # cross-validated: every non-test image trains the head, at the decay the folds chose,
        x = np.concatenate([rows["train"][0], rows["validation"][0]])  # along the folds' path to it
        y = np.concatenate([rows["train"][1], rows["validation"][1]])
        wd = chosen["weight_decay"]
        path = tuple(d for d in selection.get("weight_decays", [wd]) if d >= wd)
        fit = probe.fit_head(head, x, y, held["validation"], splits.val.labels, cfg.label_smoothing, path,
                             quiet=True, keep=wd, class_weights=probe.head_class_weights(cfg.class_balance, y, k))
    else:
        fit = probe.fit_head(head, *rows["train"], held["validation"], splits.val.labels, cfg.label_smoothing,
                             deadline=budget.fit_deadline if budget else None,
                             class_weights=probe.head_class_weights(cfg.class_balance, rows["train"][1], k))
    fit_s = time.perf_counter() - t_fit
    state.epoch = 1
    state.train_time_s = state.epoch_time_s = time.perf_counter() - t0
    val = _probe_validation(setup, loop, head, feats["validation"][0], chosen)
    best = _find(loop, BestEpoch)
    best.best_val_accuracy, best.best_epoch = val["accuracy"], 1
    append_metrics(setup.run_dir, {
        "epoch": 1, "step": 0, "lr": 0.0, "train_loss": float("nan"), "train_accuracy": float("nan"),
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "epoch_time_s": round(state.epoch_time_s, 3),
        "train_images_per_s": round((setup.record.probe_images or len(train_labels)) / max(state.epoch_time_s, 1e-9), 1),
        "weight_decay": fit["weight_decay"]})
    checkpointer = _find(loop, Checkpointer)
    checkpointer.save(loop, "best")
    checkpointer.save(loop, "last")
    log.info("linear probe: %s accuracy %.2f%% (weight decay %g), %.0f s (the head's fit %.1f s)", "cross-validated"
             if chosen else "validation", 100 * val["accuracy"], fit["weight_decay"], state.epoch_time_s, fit_s)


def _probe_validation(setup: Setup, loop: Loop, head: torch.nn.Module, plain: np.ndarray,
                      chosen: dict[str, Any] | None) -> dict[str, Any]:
    """The probe's validation loss and accuracy. Where cross-validation chose it, the folds' estimate (the
    validation images trained the head). Else its fitted head over the validation images' `plain` rows,
    which the fit computed: the model's forward pass over those images again (loop.validate) took 3.6 s
    of a 1-minute budget on the 400 of a 5,000-photo folder (the Zen 3). Distributed runs validate as
    trained runs do (each rank a share)."""
    if chosen:
        return {"loss": float("nan"), "accuracy": chosen["cv_accuracy"]}
    if setup.dist.enabled:
        return loop.validate()
    weight = next(head.parameters())
    with torch.no_grad():
        logits = head(torch.from_numpy(plain).to(weight.device, weight.dtype)).float().cpu()
    return classification_metrics(logits, setup.splits.val.labels, setup.ds.classes)


def _probe_features(setup: Setup, loop: Loop, budgeted: bool) -> tuple[dict[str, probe.Rows], np.ndarray]:
    """The validation and training images' rows (cnnkit.probe.probe_rows), and the training rows'
    labels: under --time-budget, where `budgeted`, as many training images as fit, their mirror images'
    rows (where taken) joined to theirs (training/probe_budget.py); the validation images are then judged
    on their plain views (their mirror images would cost the forward passes of as many more training images)."""
    cfg, splits = setup.cfg, setup.splits

    def rows_of(images: np.ndarray, what: str, mirrored: bool = cfg.probe_flip) -> probe.Rows:
        view_cfg = cfg if mirrored == cfg.probe_flip else replace(cfg, probe_flip=mirrored, tta="none")  # one view a row
        return probe.probe_rows(setup.model, setup.preprocess, images, view_cfg, setup.device, setup.weights_source,
                                what, setup.precision)

    budget = _find(loop, TimeBudget) if budgeted else None  # None: every training image (a chosen backbone's: cached)
    t0 = time.perf_counter()  # the validation's rows first: they absorb the engine's compile
    feats = {"validation": rows_of(splits.val.images, "validation", cfg.probe_flip and budget is None)}
    if budget is None:
        feats["train"] = rows_of(splits.train.images, "train")
        return feats, splits.train.labels
    rows, labels = budgeted_rows(setup, budget, rows_of, feats["validation"], time.perf_counter() - t0)
    feats["train"] = (rows, None)  # each image's and the mirror images' taken, as rows of their own
    return feats, labels


def _probe_rows(plain: np.ndarray, flipped: np.ndarray | None, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training rows: the images' features, and their mirror images' as rows of their own."""
    if flipped is None:
        return plain, labels
    return np.concatenate([plain, flipped]), np.concatenate([labels, labels])


def _release_ddp(setup: Setup, loop: Loop) -> None:
    """DDP's reducer holds the process group: let go of the wrapper before the group goes."""
    if setup.dist.enabled:
        setup.net = setup.step.net = loop.net = setup.model
        gc.collect()
    distributed.cleanup(setup.dist)


def _test_and_report(setup: Setup, loop: Loop, started_at: float) -> TrainResult:
    cfg, state, splits = setup.cfg, loop.state, setup.splits
    _release_ddp(setup, loop)
    if not setup.dist.is_main:
        return TrainResult(setup.run_dir, state, {}, {})
    setup.dist = DistInfo()  # from here on, rank 0 alone
    setup.model.load_state_dict(load_checkpoint(setup.run_dir / "checkpoints" / "best").model)
    settings = setup.record.settings(cfg.to_dict())  # the views a budget chose, not only the recipe's
    logits = predict_logits(setup.model, setup.preprocess, splits.test.images, device=setup.device,
                            tta=settings["tta"], description="test", **setup.inference.kwargs())
    test = classification_metrics(logits, splits.test.labels, setup.ds.classes)
    save_evaluation(setup.run_dir, test, setup.ds.classes, split="test", checkpoint="best")
    summary = {**_summary(setup, loop, test, started_at), **_without_copies(logits, splits.test.labels, setup.copied_test)}
    for warning in summary["warnings"]:
        if warning not in setup.data_warnings:  # those were said as the data was split (training/build.py)
            log.warning("%s", warning)
    write_json_atomic(setup.run_dir / "summary.json", summary)
    if cfg.report:
        from cnnkit.report import build_report

        t0 = time.perf_counter()
        build_report(setup.run_dir, setup.model, setup.preprocess, setup.ds.classes, splits.test.images,
                     splits.test.labels, splits.train.images, splits.train.labels, settings, setup.device,
                     logits=logits)
        log.info("report: %s (%.1f s)", setup.run_dir / "report.html", time.perf_counter() - t0)
    summary["total_time_s"] = round(time.perf_counter() - started_at, 2)  # with the report
    write_json_atomic(setup.run_dir / "summary.json", summary)
    budget = _find(loop, TimeBudget)
    if budget is not None:
        log.info("time budget %s: %stook %.0f s", cfg.time_budget, f"planned {budget.planned_time_s:.0f} s, "
                 if budget.planned_time_s else "", summary["total_time_s"])  # a probe chosen by the folds has no plan
    return TrainResult(setup.run_dir, state, test, summary)


def _summary(setup: Setup, loop: Loop, test: dict[str, Any], started_at: float) -> dict[str, Any]:
    cfg, state, splits, best = setup.cfg, loop.state, setup.splits, _find(loop, BestEpoch)
    budget = _find(loop, TimeBudget)
    return {
        "status": "stopped early" if loop.stop_reason else "finished",
        "recipe": cfg.recipe, "dataset": setup.ds.name, "data_source": setup.ds.source, "model": cfg.model,
        "parameters": count_parameters(setup.model), "epochs_run": state.epoch, "best_epoch": best.best_epoch,
        "best_val_accuracy": best.best_val_accuracy, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "test_accuracy_ci95": [round(v, 4) for v in accuracy_interval(test["accuracy"], len(splits.test))],
        "warnings": [*setup.data_warnings, *small_split_warnings(0 if setup.record.selection else len(splits.val),
                                                                  len(splits.test), test["accuracy"])],
        "train_samples": len(splits.train), "val_samples": len(splits.val), "test_samples": len(splits.test),
        "train_time_s": round(state.train_time_s, 2), "skipped_steps": state.skipped_steps,
        "wall_time_s": round(time.perf_counter() - started_at, 2),  # this invocation, data loading included
        "steps_run": state.step, "steps_per_epoch": len(setup.loader), "schedule_steps": loop.total_steps,
        **({"time_budget_s": budget.budget_s} if budget else {}),
        **({"planned_time_s": round(budget.planned_time_s, 1)} if budget and budget.planned_time_s else {}),
        **_cv_summary(setup.record.selection),
        **({"probe_images": setup.record.probe_images} if setup.record.probe_images else {}),
        **({"strategy_choice": setup.record.strategy_selection} if setup.record.strategy_selection else {}),
        "device": describe_device(setup.device), "precision": setup.precision,
        "finished_at": datetime.now().isoformat(timespec="seconds"), "versions": versions(), "notes": splits.notes,
    }


def _without_copies(logits: torch.Tensor, labels: np.ndarray, copied: np.ndarray) -> dict[str, Any]:
    """The test accuracy on the test images that are not copies of images the model learnt from (exact or
    near: data.copies), where some are: what new photos would get, more nearly than the whole split's."""
    if not len(copied):
        return {}
    return {"test_accuracy_without_copies": accuracy_without(logits, labels, copied),
            "test_copies_left_out": int(len(copied))}


def _cv_summary(selection: dict[str, Any] | None) -> dict[str, Any]:
    if not selection:
        return {}
    chosen = selection["chosen"]
    return {"cv_accuracy": chosen["cv_accuracy"], "cv_sd": chosen["cv_sd"], "cv_folds": selection["folds"],
            "cv_images": selection["images"], "candidates": selection["candidates"]}


def _prepare_resume(run_dir: Path, overrides: dict[str, Any]) -> tuple[Config, Checkpoint, RunRecord]:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise RunError(f"{run_dir} is not a cnnkit run folder (no config.json)")
    not_allowed = set(overrides) - RESUMABLE_OVERRIDES
    if not_allowed:
        raise ConfigError(f"--resume continues a run as it was configured; only {sorted(RESUMABLE_OVERRIDES)} "
                          f"may change, not {sorted(not_allowed)}")
    asked = Config.from_dict({**json.loads(config_path.read_text()), **overrides}, str(config_path))
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last")
    if checkpoint.optimizer is None:
        raise RunError(f"{run_dir}/checkpoints/last has no optimizer state; it cannot be resumed")
    record = RunRecord.load(run_dir)
    if "epochs" in overrides:  # asked again: the new length replaces a time budget's plan
        record = replace(record, planned_steps=None, epochs=None)
    cfg = Config.from_dict(record.settings(asked.to_dict()), str(run_dir / "run.json"))  # as the run went on
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone writes
        if overrides:  # what the run is asked now; its decisions stay in run.json
            write_json_atomic(config_path, asked.to_dict())
        _truncate_metrics(run_dir, checkpoint.meta["state"]["epoch"])
    return cfg, checkpoint, record


def _truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint (they will be trained again)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode() if lines else b"")

