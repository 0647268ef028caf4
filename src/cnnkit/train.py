"""The training loop. It gets tensors, a model and a configuration; it knows no file formats.

One epoch: shuffle (seeded per epoch) -> uint8 batch on the device -> float -> augment ->
preprocess -> forward -> loss -> backward -> step. After each epoch: validation accuracy,
metrics.jsonl, the `last` checkpoint, the `best` one when validation improves, early stopping.
The test split is evaluated once, at the end, with the best weights.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cnnkit
from cnnkit import progress
from cnnkit.augment import build_augment
from cnnkit.checkpoint import load_checkpoint, save_checkpoint
from cnnkit.config import Config
from cnnkit.data import canonical_name, imbalance_ratio, load_dataset, make_splits
from cnnkit.data.loader import BatchLoader
from cnnkit.errors import CnnkitError, ConfigError, RunError
from cnnkit.evaluate import autocast, classification_metrics, predict_logits
from cnnkit.fileio import write_bytes_atomic, write_json_atomic
from cnnkit.models import check_model_name, count_parameters, create_model
from cnnkit.preprocess import Preprocess, channel_stats
from cnnkit.runs import save_evaluation

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed; anything else would make it another run.
RESUMABLE_OVERRIDES = {"epochs", "device", "threads", "early_stopping_patience", "eval_batch_size"}


class TrainingError(CnnkitError):
    """Training cannot go on (for example the loss became NaN)."""


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch
    step: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one, for early stopping
    train_time_s: float = 0.0


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    test: dict[str, Any]
    summary: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weights (matrices, kernels) decay; biases and normalisation parameters (1-d) don't."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    # Adam's own weight_decay is L2 in the gradient, AdamW's is decoupled: both per group.
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


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
    if schedule == "cosine":
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return (1 + math.cos(math.pi * min(t, 1.0))) / 2
    return 1.0


def make_preprocess(cfg: Config, train_images: np.ndarray) -> Preprocess:
    _, channels, height, width = train_images.shape
    mean, std = channel_stats(train_images)
    return Preprocess(
        data_size=height, data_channels=channels, input_size=cfg.input_size or height,
        model_channels=channels, mean=mean, std=std,
    )


def versions() -> dict[str, str]:
    import safetensors

    return {"cnnkit": cnnkit.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train(cfg: Config, resume: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train a model as `cfg` says (or resume the run in `resume`) and evaluate it on the test split."""
    wall_start = time.perf_counter()
    if resume is not None:
        cfg, run_dir, ckpt = _prepare_resume(resume, overrides or {})
    else:
        ckpt = None
    check_model_name(cfg.model)
    canonical_name(cfg.dataset)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")

    ds = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, channels=cfg.channels,
                      skip_bad_images=cfg.skip_bad_images)
    splits = make_splits(ds, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed,
                         max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples)
    _log_data(ds, splits)
    num_classes = len(ds.classes)

    preprocess = Preprocess.from_dict(ckpt[1]["preprocess"]) if ckpt else make_preprocess(cfg, splits.train.images)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes, preprocess.model_channels, preprocess.input_size, **cfg.model_args)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    counts = splits.train.class_counts(num_classes)
    class_weights = None
    if cfg.class_balance == "weights":
        class_weights = torch.tensor(len(splits.train) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    sample_weights = (1.0 / np.maximum(counts, 1))[splits.train.labels] if cfg.class_balance == "sampler" else None
    loader = BatchLoader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                         device=device, sample_weights=sample_weights)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    augment = build_augment(cfg.augment)
    total_steps = cfg.epochs * len(loader)
    warmup_steps = int(round(cfg.warmup_epochs * len(loader)))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    state = TrainState()
    if ckpt is not None:
        model.load_state_dict(ckpt[0])
        optimizer.load_state_dict(ckpt[2])
        state = TrainState(**{k: ckpt[1]["state"][k] for k in asdict(state)})
        log.info("resuming %s after epoch %d of %d", run_dir, state.epoch, cfg.epochs)
    else:
        run_dir = _new_run_dir(cfg)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)

    meta = {
        "format": "cnnkit-checkpoint/1", "model": cfg.model, "model_args": cfg.model_args,
        "num_classes": num_classes, "classes": ds.classes, "dataset": ds.name,
        "preprocess": preprocess.to_dict(), "recipe": cfg.recipe, "seed": cfg.seed,
        "config": cfg.to_dict(), "versions": versions(),
    }
    log.info("model %s: %s parameters; device %s; run folder %s",
             cfg.model, f"{count_parameters(model):,}", describe_device(device), run_dir)

    def checkpoint(name: str, with_optimizer: bool) -> None:
        save_checkpoint(run_dir / "checkpoints" / name, model, {**meta, "state": asdict(state)},
                        optimizer if with_optimizer else None)

    stopped_early = False
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            train_loss, train_acc = _train_epoch(
                model, loader, preprocess, augment, optimizer, loss_fn, scaler, cfg, state, device,
                epoch, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.schedule), num_classes)
            epoch_time = time.perf_counter() - t0
            state.train_time_s += epoch_time
            val = classification_metrics(
                predict_logits(model, preprocess, splits.val.images, batch_size=cfg.eval_batch_size, device=device,
                               precision=cfg.precision, channels_last=cfg.channels_last, tta=cfg.tta),
                splits.val.labels, ds.classes)
            state.epoch = epoch
            improved = val["accuracy"] > state.best_val_accuracy
            if improved:
                state.best_val_accuracy, state.best_epoch, state.bad_epochs = val["accuracy"], epoch, 0
            else:
                state.bad_epochs += 1
            record = {
                "epoch": epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "epoch_time_s": round(epoch_time, 3), "train_images_per_s": round(len(loader) * cfg.batch_size / epoch_time, 1),
            }
            _append_metrics(run_dir, record)
            if improved:
                checkpoint("best", with_optimizer=False)
            checkpoint("last", with_optimizer=True)
            log.info("epoch %d/%d  loss %.4f  acc %.2f%%  val_loss %.4f  val_acc %.2f%%%s  %.0f img/s  %.1fs",
                     epoch, cfg.epochs, train_loss, 100 * train_acc, val["loss"], 100 * val["accuracy"],
                     " *" if improved else "", record["train_images_per_s"], epoch_time)
            if cfg.early_stopping_patience and state.bad_epochs >= cfg.early_stopping_patience:
                log.info("early stopping: no better validation accuracy for %d epochs", state.bad_epochs)
                stopped_early = True
                break
    except KeyboardInterrupt:
        raise TrainingError(
            f"interrupted during epoch {state.epoch + 1}; the last checkpoint holds epoch {state.epoch}. "
            f"Resume with: cnnkit train --resume {run_dir}") from None

    best_state, _, _ = load_checkpoint(run_dir / "checkpoints" / "best")
    model.load_state_dict(best_state)
    test_logits = predict_logits(model, preprocess, splits.test.images, batch_size=cfg.eval_batch_size,
                                 device=device, precision=cfg.precision, channels_last=cfg.channels_last, tta=cfg.tta)
    test = classification_metrics(test_logits, splits.test.labels, ds.classes)
    save_evaluation(run_dir, test, ds.classes, split="test", checkpoint="best")
    summary = {
        "status": "stopped early" if stopped_early else "finished",
        "recipe": cfg.recipe, "dataset": ds.name, "data_source": ds.source, "model": cfg.model,
        "parameters": count_parameters(model), "epochs_run": state.epoch, "best_epoch": state.best_epoch,
        "best_val_accuracy": state.best_val_accuracy, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "train_samples": len(splits.train), "val_samples": len(splits.val), "test_samples": len(splits.test),
        "train_time_s": round(state.train_time_s, 2),
        "wall_time_s": round(time.perf_counter() - wall_start, 2),  # this invocation, data loading included
        "device": describe_device(device), "finished_at": datetime.now().isoformat(timespec="seconds"),
        "versions": versions(), "notes": splits.notes,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    return TrainResult(run_dir, state, test, summary)


def _train_epoch(model, loader, preprocess, augment, optimizer, loss_fn, scaler, cfg, state, device, epoch, schedule,
                 num_classes):
    model.train()
    # Augmentation randomness depends only on (seed, epoch): resumed runs repeat it exactly.
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    t0 = time.perf_counter()
    with progress.make_progress() as bar:
        task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(loader), info="")
        for i, (images, labels) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * schedule(state.step)
            x = preprocess.to_float(images)
            targets = labels
            if augment:
                x = augment(x, g)
                if augment.mixes_labels:  # soft targets: cross-entropy takes class probabilities too
                    x, targets = augment.mix(x, labels, num_classes, g)
            x = preprocess.finish(x)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.precision):
                logits = model(x)
            loss = loss_fn(logits.float(), targets)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {state.step + 1} (epoch {epoch}); the last good "
                    "checkpoint is kept. Try a lower --lr, --grad-clip 1.0, or --precision fp32.")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            state.step += 1
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if i % 20 == 0 or i == len(loader) - 1:  # .item() syncs a GPU: not every step
                rate = seen / (time.perf_counter() - t0)
                bar.update(task, completed=i + 1, info=f"loss {loss_sum.item() / seen:.4f}  acc {100 * correct.item() / seen:.2f}%  {rate:.0f} img/s")
    return loss_sum.item() / seen, correct.item() / seen


def _log_data(ds, splits) -> None:
    log.info("dataset %s from %s", ds.name, ds.source)
    k = len(ds.classes)
    for name, split in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        counts = split.class_counts(k)
        if counts.min() == counts.max():
            per_class = f"{counts[0]} per class"
        elif k <= 12:
            per_class = ", ".join(f"{c} {n}" for c, n in zip(ds.classes, counts))
        else:
            per_class = f"{counts.min()} to {counts.max()} per class"
        log.info("  %s: %d images (%s)", name, len(split), per_class)
    for note in splits.notes:
        log.info("  %s", note)
    ratio = imbalance_ratio(splits.train, k)
    if ratio > 3:
        log.warning("classes are imbalanced: the largest has %.1fx the images of the smallest. "
                    "Consider --class-balance weights or --class-balance sampler.", ratio)


def _new_run_dir(cfg: Config) -> Path:
    name = cfg.name or f"{cfg.recipe or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; choose another --name, or continue it with --resume {run_dir}")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def _prepare_resume(run_dir: Path, overrides: dict[str, Any]):
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise RunError(f"{run_dir} is not a cnnkit run folder (no config.json)")
    not_allowed = set(overrides) - RESUMABLE_OVERRIDES
    if not_allowed:
        raise ConfigError(f"--resume continues a run as it was configured; only {sorted(RESUMABLE_OVERRIDES)} "
                          f"may change, not {sorted(not_allowed)}")
    cfg = Config.from_dict({**json.loads(config_path.read_text()), **overrides}, str(config_path))
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last")
    if ckpt[2] is None:
        raise RunError(f"{run_dir}/checkpoints/last has no optimizer state; it cannot be resumed")
    if overrides:
        write_json_atomic(config_path, cfg.to_dict())
    _truncate_metrics(run_dir, ckpt[1]["state"]["epoch"])
    return cfg, run_dir, ckpt


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint (they will be trained again)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
        write_bytes_atomic(path, ("\n".join(lines) + "\n").encode() if lines else b"")
