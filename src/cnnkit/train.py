"""The training loop. It gets tensors, a model and a configuration; it knows no file formats.

One step: uint8 batch on the device (order seeded per epoch) -> float -> augment -> preprocess
-> forward -> loss -> backward -> step. After each epoch: validation accuracy, metrics.jsonl,
the `last` checkpoint, the `best` one when validation improves, early stopping. The test split
is evaluated once, at the end, with the best weights.

Interruptions lose nothing: SIGINT/SIGTERM save a checkpoint mid-epoch before exiting, and
`checkpoint_every_minutes` bounds what a SIGKILL or power cut can lose. A checkpoint holds the
model, optimiser, the position in the epoch, the partial epoch metrics and every RNG state, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import difflib
import gc
import json
import logging
import math
import os
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cnnkit
from cnnkit import distributed, progress
from cnnkit.analysis import ROBUSTNESS_PASSES
from cnnkit.augment import build_augment, tta_views
from cnnkit.budget import (EXTRAS_SHARE, REPLAN_PAST, Costs, calibration_window, describe_plan, estimate_costs,
                           final_seconds, first_settled_epoch, fit_extras, fit_steps, parse_duration, recent_epoch_s,
                           replan_after_epoch, run_end_s)
from cnnkit.checkpoint import load_checkpoint, save_checkpoint
from cnnkit.config import Config
from cnnkit.data import canonical_name, imbalance_ratio, load_dataset, make_splits
from cnnkit.data.loader import BatchLoader
from cnnkit.errors import CnnkitError, ConfigError, RunError
from cnnkit.evaluate import (autocast, classification_metrics, cpu_has_native_bf16, predict_logits,
                             resolve_precision, run_inference_settings)
from cnnkit.fileio import write_bytes_atomic, write_json_atomic
from cnnkit.finetune import make_unfreezer
from cnnkit.lookahead import Lookahead
from cnnkit.models import check_model_name, count_parameters, create_model
from cnnkit.preprocess import Preprocess, channel_stats
from cnnkit.runs import save_evaluation

log = logging.getLogger(__name__)

# Fields that may change when a run is resumed; anything else would make it another run.
RESUMABLE_OVERRIDES = {"epochs", "device", "threads", "early_stopping_patience", "eval_batch_size",
                       "checkpoint_every_epochs", "checkpoint_every_minutes"}


class TrainingError(CnnkitError):
    """Training cannot go on (for example the loss became NaN)."""


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM: a checkpoint was saved; exit with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch
    step: int = 0  # optimiser steps taken (or skipped) in all
    batch: int = 0  # batches done in the epoch in progress (epoch + 1)
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one, for early stopping
    train_time_s: float = 0.0
    # the epoch in progress, so that a mid-epoch resume reports the same epoch metrics
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_time_s: float = 0.0
    lr_scale: float = 1.0  # halved each time a non-finite step is skipped (on_nonfinite = skip)
    skipped_steps: int = 0
    planned_time_s: float = 0.0  # --time-budget: when the plan expects the run (report included) to end
    planned_steps: int = 0  # --time-budget: the steps planned, the last epoch maybe in part (0: all of cfg.epochs)


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


def param_groups(model: nn.Module, weight_decay: float, lr: float, bias_lr_scale: float = 1.0,
                 lr_scales: dict[str, float] | None = None, muon_lr: float | None = None, *,
                 bias_decay: bool = False, frozen_after: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Weights (matrices, kernels) decay; biases and normalisation parameters (1-d) may learn
    faster (airbench: 64x; their gradients are small and they do not grow the weights) and decay
    only with `bias_decay`, by weight_decay / bias_lr_scale: as much per step as the weights.
    `lr_scales` (parameter name -> multiplier) gives layers their own rates (discriminative
    fine-tuning). With `muon_lr`, convolution filters form groups of their own, marked
    `orthogonal`, at that rate and without weight decay (MuonSGD). Parameters named in
    `frozen_after` (name -> epochs) form groups of their own carrying that number, for the
    training loop's schedule. Groups: filters for Muon, weights, then the rest; the
    fastest-learning first within each."""
    frozen_after = frozen_after or {}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    unknown = sorted(set(frozen_after) - set(trainable))
    if unknown:
        hints = [f"{n} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(n, trainable, 1)) else n for n in unknown]
        raise ConfigError(f"frozen_after names no trainable parameter of {type(model).__name__}: {', '.join(hints)}")
    groups: dict[tuple[int, float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = 0 if muon_lr is not None and p.ndim == 4 else 1 if p.ndim > 1 else 2
            scale = (lr_scales or {}).get(name, 1.0) * (bias_lr_scale if kind == 2 else 1.0)
            groups.setdefault((kind, scale, frozen_after.get(name, 0.0)), []).append(p)
    out = []
    for (kind, scale, epochs), params in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        rate = (muon_lr if kind == 0 else lr) * scale
        decay = weight_decay if kind == 1 else weight_decay / bias_lr_scale if kind == 2 and bias_decay else 0.0
        out.append({"params": params, "weight_decay": decay, "lr": rate, "initial_lr": rate,
                    **({"orthogonal": True} if kind == 0 else {}), **({"frozen_after": epochs} if epochs else {})})
    return out


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    scales = None
    if cfg.layer_lr_decay != 1.0:
        from cnnkit.finetune import layer_ids, lr_scales

        scales = lr_scales(*layer_ids(model, coarse=False), cfg.layer_lr_decay)
    muon = cfg.optimizer == "muon"
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.bias_lr_scale, scales, cfg.muon_lr if muon else None,
                          bias_decay=cfg.bias_decay, frozen_after=cfg.frozen_after)
    if muon:
        from cnnkit.muon import MuonSGD

        for g in groups:
            if g.get("orthogonal"):
                g["momentum"] = cfg.muon_momentum
        device = next(model.parameters()).device
        return MuonSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                       ns_bf16=resolve_precision(cfg.precision, device) != "fp32")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    # Adam's own weight_decay is L2 in the gradient, AdamW's is decoupled: both per group.
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _tta_view_count(mode: str) -> int:
    return len(tta_views(torch.zeros(1, 1, 2, 2), mode))


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """The schedule's warm-up: at most half of it, so that a run shortened (by a budget, or
    --epochs) still decays."""
    return min(int(round(warmup_epochs * steps_per_epoch)), total_steps // 2)


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
    t = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        return (1 + math.cos(math.pi * t)) / 2
    if schedule == "linear":
        return 1.0 - t
    return 1.0


def make_preprocess(cfg: Config, train_images: np.ndarray) -> Preprocess:
    """From-scratch models: normalise with the training images' statistics. Pretrained ones: with
    the statistics, resampling and (by default) input size their weights were trained with."""
    _, channels, height, width = train_images.shape
    if cfg.pretrained:
        from cnnkit.models.pretrained import preprocessing

        w = preprocessing(cfg.model)
        mean, std = tuple(w["mean"]), tuple(w["std"])
        model_channels = 3
        if channels == 1 and cfg.grey_input == "sum":  # one grey channel in, the RGB statistics averaged
            model_channels, mean, std = 1, (sum(mean) / 3,), (sum(std) / 3,)
        return Preprocess(data_size=height, data_channels=channels, input_size=cfg.input_size or int(w["input_size"]),
                          model_channels=model_channels, mean=mean, std=std, interpolation=str(w["interpolation"]))
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


def train(cfg: Config | None, resume: Path | None = None, overrides: dict[str, Any] | None = None,
          started_at: float | None = None) -> TrainResult:
    """Train a model as `cfg` says (or resume the run in `resume`) and evaluate it on the test split.
    `started_at` (a time.perf_counter() value) is when the time budget's clock started."""
    return Trainer(cfg, resume, overrides, started_at).run()


class Trainer:
    """Everything one run needs, built once; `run()` trains, checkpoints and evaluates."""

    def __init__(self, cfg: Config | None, resume: Path | None = None, overrides: dict[str, Any] | None = None,
                 started_at: float | None = None):
        self.wall_start = started_at if started_at is not None else time.perf_counter()
        ckpt = None
        if resume is not None:
            cfg, self.run_dir, ckpt = _prepare_resume(resume, overrides or {})
        assert cfg is not None
        self.cfg = cfg
        check_model_name(cfg.model)
        canonical_name(cfg.dataset)
        self.dist, self.device = distributed.setup(resolve_device(cfg.device))
        device = self.device
        if not self.dist.is_main:  # one voice: rank 0 logs and writes
            logging.getLogger("cnnkit").setLevel(logging.WARNING)
            progress.set_enabled(False)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            # cuBLAS needs this set before its first use to be deterministic (ignored on the CPU).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        elif device.type == "cuda":
            # cuDNN times its algorithms per input shape once; a training run repeats a few shapes
            torch.backends.cudnn.benchmark = True
        self.precision = resolve_precision(cfg.precision, device)
        if self.precision == "fp16" and device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
        if device.type == "cpu" and not cpu_has_native_bf16():
            if self.precision == "bf16":
                log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated: many times "
                            "slower than fp32 (benchmarks/RESULTS.md, step-speed-bf16-avx2); --precision auto "
                            "chooses fp32 here")
            elif cfg.precision == "auto":
                log.info("fp32: this CPU has no native bf16 (AVX512-BF16 or AMX); the recipes' times were "
                         "measured on one with it, and runs take about 3 times as long without (benchmarks/"
                         "RESULTS.md, avx2-fmnist-quick): --time-budget fits a run to your time")
        # evaluation's precision, memory format and batch: the same rule as `cnnkit evaluate` and `report`
        self.inference = run_inference_settings(cfg.to_dict(), device)

        imagenet = None
        if cfg.pretrained and ckpt is None:
            imagenet, self.weights_source = _imagenet_model(cfg)
            log.info("pretrained weights for %s from %s", cfg.model, self.weights_source)
        else:
            self.weights_source = "none"
        self.ds = ds = load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, channels=cfg.channels,
                                    skip_bad_images=cfg.skip_bad_images)
        self.splits = splits = make_splits(ds, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                           seed=cfg.seed, max_train_samples=cfg.max_train_samples,
                                           max_eval_samples=cfg.max_eval_samples)
        _log_data(ds, splits)
        if self.dist.enabled:
            log.info("distributed: %d processes (%s), global batch %d = %d per process", self.dist.world,
                     "NCCL" if device.type == "cuda" else "Gloo", cfg.batch_size, cfg.batch_size // self.dist.world)
        self.num_classes = k = len(ds.classes)

        self.preprocess = (Preprocess.from_dict(ckpt.meta["preprocess"]) if ckpt
                           else make_preprocess(cfg, splits.train.images))
        torch.manual_seed(cfg.seed)
        if imagenet is not None:
            self.model = _adapt_pretrained(imagenet, cfg, k, self.preprocess).to(device)
        else:
            self.model = create_model(cfg.model, k, self.preprocess.model_channels, self.preprocess.input_size,
                                      **cfg.model_args).to(device)
            if ckpt is None and hasattr(self.model, "init_from_data"):  # e.g. fastnet's whitening stem
                self.model.init_from_data(self._init_sample(splits.train.images))
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.sync_batchnorm:
            if device.type != "cuda":
                raise ConfigError("--sync-batchnorm needs CUDA devices (PyTorch's SyncBatchNorm has no CPU version); "
                                  "drop it for CPU processes")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = make_optimizer(cfg, self.model)  # before any freezing: frozen layers join it later
        counts = splits.train.class_counts(k)
        class_weights = None
        if cfg.class_balance == "weights":
            class_weights = torch.tensor(len(splits.train) / (k * np.maximum(counts, 1)), dtype=torch.float32, device=device)
        sample_weights = (1.0 / np.maximum(counts, 1))[splits.train.labels] if cfg.class_balance == "sampler" else None
        try:
            self.loader = BatchLoader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                                      device=device, sample_weights=sample_weights,
                                      rank=self.dist.rank, world=self.dist.world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
        self.augment = build_augment(cfg.augment)
        self._set_total_steps(cfg.epochs * len(self.loader))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.aug_rng = torch.Generator()
        self.lookahead = Lookahead(self.model) if cfg.lookahead else None
        self.unfreezer = make_unfreezer(cfg, self.model, len(self.loader))
        if self.unfreezer is not None and self.dist.enabled and cfg.strategy != "frozen":
            raise ConfigError(f"--strategy {cfg.strategy} changes which layers train during the run, which "
                              "DistributedDataParallel does not allow; run it in one process, or use --strategy full")
        self.budget_s = parse_duration(cfg.time_budget) if cfg.time_budget and ckpt is None else None
        # The budget plans from steps that train as many layers as the rest of the run will:
        # finetune's head-only steps are several times faster than the steps after them.
        self._settled_step = self.unfreezer.settled_step() if self.unfreezer is not None else 0
        self._train_ended: float | None = None
        self._between_epochs_s = 0.0
        self._settled_epoch_times: list[float] = []  # of the epochs that trained as the rest of the run will
        self._warned_over_budget = False

        self.state = TrainState()
        self.resume_rng: dict[str, torch.Tensor] = {}
        if ckpt is not None:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.state = TrainState(**{f: ckpt.meta["state"][f] for f in asdict(self.state) if f in ckpt.meta["state"]})
            if self.state.planned_steps:
                self._set_total_steps(self.state.planned_steps)
            self.resume_rng = ckpt.extra
            if self.lookahead is not None:
                self.lookahead.load_state_tensors(ckpt.extra)
            if "rng.torch" in ckpt.extra:  # dropout and the like draw from the global generator
                torch.set_rng_state(ckpt.extra["rng.torch"])
            if "rng.cuda" in ckpt.extra and device.type == "cuda":
                torch.cuda.set_rng_state(ckpt.extra["rng.cuda"], device)
            where = f"epoch {self.state.epoch + 1}, batch {self.state.batch}" if self.state.batch else f"epoch {self.state.epoch}"
            log.info("resuming %s at %s of %d", self.run_dir, where, cfg.epochs)
        else:
            run_dir = None
            if self.dist.is_main:
                run_dir = _new_run_dir(cfg)
                write_json_atomic(run_dir / "config.json", cfg.to_dict())
            self.run_dir = distributed.broadcast(run_dir, self.dist)  # the same folder on every rank
        if self.unfreezer is not None:
            self.unfreezer.update(self.state.step)
            log.info("%s: training %s", cfg.strategy, self.unfreezer.describe())
        # DDP averages gradients over ranks; it wraps the model after its weights are loaded.
        self.net = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.meta = {
            "format": "cnnkit-checkpoint/1", "model": cfg.model, "model_args": cfg.model_args,
            "num_classes": k, "classes": ds.classes, "dataset": ds.name,
            "preprocess": self.preprocess.to_dict(), "recipe": cfg.recipe, "seed": cfg.seed,
            "config": cfg.to_dict(), "versions": versions(),
        }
        self.stop_signal: int | None = None
        self.last_save = time.perf_counter()
        self.tensorboard = _tensorboard_writer(self.run_dir) if cfg.tensorboard and self.dist.is_main else None

    # -- checkpoints

    def save(self, name: str) -> None:
        """`last` carries what resuming needs (optimiser, RNG states); `best` only the weights.
        In distributed runs only rank 0 writes (the weights are the same on every rank)."""
        if not self.dist.is_main:
            self.last_save = time.perf_counter()
            return
        extra = None
        if name == "last":
            extra = {"rng.augment": self.aug_rng.get_state(), "rng.torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                extra["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            if self.lookahead is not None:
                extra.update(self.lookahead.state_tensors())
        save_checkpoint(self.run_dir / "checkpoints" / name, self.model, {**self.meta, "state": asdict(self.state)},
                        self.optimizer if name == "last" else None, extra)
        if name == "last":
            self.last_save = time.perf_counter()

    def _handle_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("%s received: saving a checkpoint after this step (press Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    # -- the run

    def run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        log.info("model %s: %s parameters; device %s, %s; run folder %s", cfg.model,
                 f"{count_parameters(self.model):,}", describe_device(self.device), self.precision, self.run_dir)
        if cfg.strategy == "linear-probe":  # minutes of feature extraction, nothing to checkpoint midway
            self._linear_probe()
            return self._finish(False)
        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        stopped_early = False
        try:
            epoch = state.epoch
            while epoch < cfg.epochs:  # a time budget may change cfg.epochs during the first epoch
                epoch += 1
                train_loss, train_acc = self._train_epoch(epoch)
                if self._end_epoch(epoch, train_loss, train_acc):
                    stopped_early = True
                    break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self._finish(stopped_early)

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        cfg, state, device = self.cfg, self.state, self.device
        self._train_mode()
        self.loader.set_epoch(epoch)
        if state.batch == 0:
            # Augmentation randomness of an epoch depends only on (seed, epoch).
            self.aug_rng.manual_seed(cfg.seed * 1000 + epoch + 7919 * self.dist.rank)
            state.epoch_loss_sum, state.epoch_correct, state.epoch_seen, state.epoch_time_s = 0.0, 0, 0, 0.0
        else:  # resuming mid-epoch: the augmentation generator continues exactly where it was
            self.aug_rng.set_state(self.resume_rng["rng.augment"])
        loss_sum = torch.tensor(state.epoch_loss_sum, device=device)
        correct = torch.tensor(state.epoch_correct, device=device)
        seen = state.epoch_seen
        t0 = self._epoch_started = time.perf_counter() - state.epoch_time_s
        if self._train_ended is not None:  # validation, checkpoints and logging of the previous epoch
            self._between_epochs_s = t0 - self._train_ended
        n = len(self.loader)
        with progress.make_progress() as bar:
            task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=n, completed=state.batch, info="")
            for images, labels, ids in self.loader.batches_with_ids(start=state.batch):
                loss, logits, targets = self._step(images, labels, epoch, ids=ids)
                state.batch += 1
                if self.budget_s is not None and state.epoch == 0 and self._calibrate():
                    bar.update(task, description=f"epoch {epoch}/{cfg.epochs}")
                if loss is not None:
                    loss_sum += loss.detach() * len(labels)
                    correct += (logits.argmax(1) == labels).sum()
                    seen += len(labels)
                stop = distributed.any_rank(self.stop_signal is not None, self.dist, device) if self.dist.enabled \
                    else self.stop_signal is not None
                last = state.batch == n or state.step >= self.total_steps  # a budget may plan part of an epoch
                if state.batch % 20 == 0 or last or stop or self._checkpoint_due():
                    # .item() waits for a GPU: not every step
                    state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = loss_sum.item(), int(correct.item()), seen
                    state.epoch_time_s = time.perf_counter() - t0
                    bar.update(task, completed=state.batch, info=f"loss {state.epoch_loss_sum / max(seen, 1):.4f}  "
                               f"acc {100 * state.epoch_correct / max(seen, 1):.2f}%  {seen / state.epoch_time_s:.0f} img/s")
                    if stop:
                        self._stop_for_signal(epoch)
                    if self._checkpoint_due() and not last:
                        self.save("last")
                if last:
                    break
        state.epoch_time_s = time.perf_counter() - t0
        loss_total, correct_total, seen_total = distributed.sum_all([loss_sum.item(), correct.item(), seen], self.dist, device)
        return loss_total / max(seen_total, 1), correct_total / max(seen_total, 1)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, factor: float | None = None,
              ids: torch.Tensor | None = None):
        """One optimiser step; `factor` (of each group's initial learning rate) overrides the schedule."""
        cfg, state, optimizer = self.cfg, self.state, self.optimizer
        scheduled = factor is None
        if scheduled:
            factor = lr_factor(state.step, self.total_steps, self.warmup_steps, cfg.schedule) * state.lr_scale
        for group in optimizer.param_groups:
            epochs = group.get("frozen_after") if scheduled else None
            group["lr"] = group["initial_lr"] * (
                factor if epochs is None else state.lr_scale * max(0.0, 1 - state.step / (epochs * len(self.loader))))
        if self.unfreezer is not None and self.unfreezer.update(state.step):
            self._train_mode()
            log.info("step %d: training %s", state.step, self.unfreezer.describe())
        x = self.preprocess.to_float(images)
        targets = labels
        if self.augment:
            x = self.augment(x, self.aug_rng, ids=ids, epoch=epoch, seed=cfg.seed)
            if self.augment.mixes_labels:  # soft targets: cross-entropy takes class probabilities too
                x, targets = self.augment.mix(x, labels, self.num_classes, self.aug_rng)
        x = self.preprocess.finish(x)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            logits = self.net(x)
        loss = self.loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        # The gradient norm is needed anyway to clip; computing it also catches non-finite gradients.
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        state.step += 1
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.scaler is None and not bool(finite):
            return self._non_finite(loss, grad_norm, epoch), None, None
        if self.scaler is not None:  # fp16: the scaler skips steps with inf/NaN gradients itself
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, state.step, self.total_steps)
        return loss, logits, targets

    def _train_mode(self) -> None:
        self.net.train()
        if self.unfreezer is not None:
            self.unfreezer.frozen_norms_to_eval()

    def _init_sample(self, images: np.ndarray, n: int = 5000) -> torch.Tensor:
        """Up to n preprocessed training images (seeded), for data-dependent initialisation."""
        idx = np.sort(np.random.default_rng(self.cfg.seed).permutation(len(images))[:n])
        x = torch.from_numpy(np.ascontiguousarray(images[idx])).to(self.device)
        return self.preprocess.finish(self.preprocess.to_float(x))

    # -- time budget

    def _calibrate(self) -> bool:
        """During the first epoch of a budgeted run: time steps first+2..k (the step after `first`
        warms up allocators and compilers), then plan. `first` is the step where the trainable
        layers stop changing, if the first epoch has room for the timing after it, else 0 (the
        plan is then optimistic until the re-plans after the epochs). True when the plan was made."""
        n, batch = len(self.loader), self.state.batch
        first, k = calibration_window(n, self._settled_step)
        if batch == first + 1:
            self._calibration_start = time.perf_counter()
        if batch != k:
            return False
        start, timed = (self._calibration_start, k - first - 1) if k - first > 1 else (self._epoch_started, 1)
        step_s = (time.perf_counter() - start) / timed
        eval_image_s = self._time_evaluation()
        self._fit_extras(eval_image_s)
        costs = estimate_costs(step_s, n, eval_image_s, len(self.splits.val), self._final_images(), self.cfg.report)
        self._plan(costs, f"{timed} timed steps of {step_s:.2f} s")
        return True

    def _time_evaluation(self) -> float:
        """Seconds to evaluate an image, timed on a batch of validation images as validation and
        the test run them: its ratio to a training step's time varies with the network and the CPU,
        and a plan within the first epoch has no validation to correct it."""
        images = self.splits.val.images[: self.inference["batch_size"]]
        t0 = time.perf_counter()
        predict_logits(self.model, self.preprocess, images, device=self.device, **self.inference)
        seconds = (time.perf_counter() - t0) / max(len(images), 1)
        self._train_mode()
        return seconds

    def _final_images(self) -> int:
        """Images the model sees after training: the test split (each test-time view) and the
        report's robustness section (its sample, clean and corrupted)."""
        return len(self.splits.test) * _tta_view_count(self.cfg.tta) + ROBUSTNESS_PASSES * self._robustness_samples()

    def _robustness_samples(self) -> int:
        return min(self.cfg.report_robustness_samples, len(self.splits.test)) if self.cfg.report else 0

    def _fit_extras(self, eval_image_s: float) -> None:
        """Fewer test-time views and robustness samples where they would take more than their share
        of the budget (see `budget.fit_extras`); the test evaluation and report use what is chosen."""
        cfg, samples = self.cfg, self._robustness_samples()
        tta, kept = distributed.broadcast(fit_extras(self.budget_s, eval_image_s, len(self.splits.test), cfg.tta,
                                                     _tta_view_count, samples, ROBUSTNESS_PASSES), self.dist)
        if (tta, kept) != (cfg.tta, samples):
            log.info("time budget %s: test-time augmentation %s (recipe: %s), %d robustness samples (recipe: %d), "
                     "so that they take at most %.0f%% of the budget and the rest trains", cfg.time_budget, tta,
                     cfg.tta, kept, samples, 100 * EXTRAS_SHARE)
            cfg.tta = tta
            if cfg.report:
                cfg.report_robustness_samples = kept

    def _plan(self, costs: Costs, basis: str) -> None:
        """Fit the steps (and so the schedule) to the budget from here; every rank follows rank 0's plan."""
        cfg, state = self.cfg, self.state
        elapsed = time.perf_counter() - self.wall_start
        n = len(self.loader)
        steps = distributed.broadcast(fit_steps(self.budget_s, elapsed, state.step, n, costs), self.dist)
        self._set_plan(steps)
        state.planned_time_s = run_end_s(elapsed, state.step, steps, n, costs)
        log.info("time budget %s: %d steps planned (%s) from %s (epoch %.1f s, validation %.1f s, test and "
                 "report %.0f s); the run should end after %.0f s", cfg.time_budget, steps, describe_plan(steps, n),
                 basis, costs.epoch_s, costs.val_s, costs.final_s, state.planned_time_s)
        if state.planned_time_s > self.budget_s and not self._warned_over_budget:
            self._warned_over_budget = True
            log.warning("time budget %s: the run cannot end in time: it will end after about %.0f s here. A larger "
                        "budget, a smaller recipe or --max-train-samples N fits.", cfg.time_budget, state.planned_time_s)

    def _set_plan(self, steps: int) -> None:
        """A new length for the run, in steps: its epochs (the last maybe in part) and schedule follow,
        and so does a later --resume."""
        cfg = self.cfg
        cfg.epochs = -(-steps // len(self.loader))
        self.state.planned_steps = steps
        self._set_total_steps(steps)
        self.meta["config"] = cfg.to_dict()
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "config.json", cfg.to_dict())

    def _set_total_steps(self, steps: int) -> None:
        self.total_steps = steps
        self.warmup_steps = warmup_steps(self.cfg.warmup_epochs, len(self.loader), steps)

    def _budget_after_epoch(self, epoch: int, val_s: float) -> None:
        """Re-plan from the measured times: after the first epochs (see `budget.replan_after_epoch`),
        and after any epoch whose times say the plan would end late. A run whose next (part of an)
        epoch would overrun is such a run, and its shorter plan may end it here."""
        cfg, state, n = self.cfg, self.state, len(self.loader)
        if epoch >= first_settled_epoch(n, self._settled_step):
            self._settled_epoch_times.append(state.epoch_time_s)
        eval_image_s = val_s / max(len(self.splits.val), 1)
        epoch_s = recent_epoch_s(self._settled_epoch_times or [state.epoch_time_s])
        costs = Costs(epoch_s, max(val_s, self._between_epochs_s),
                      final_seconds(self._final_images(), eval_image_s, cfg.report))
        elapsed = time.perf_counter() - self.wall_start
        # Re-plan after the first epochs, and later whenever the plan would end late: caught while
        # epochs remain, the shorter plan still ends its schedule.
        if cfg.epochs > epoch and (replan_after_epoch(epoch, n, self._settled_step) or run_end_s(
                elapsed, state.step, self.total_steps, n, costs) > REPLAN_PAST * self.budget_s):
            self._plan(costs, f"epoch {epoch}")
        if epoch == cfg.epochs and self.lookahead is not None:  # the plan ends here, maybe sooner than its steps
            self.lookahead.finish(self.model)

    def _linear_probe(self) -> None:
        """Frozen backbone: cached features, a linear head fitted by L-BFGS, chosen on validation."""
        from cnnkit import probe

        cfg, state = self.cfg, self.state
        probe.check(cfg, self.model)
        t0 = time.perf_counter()
        feats = {name: probe.cached_features(self.model, self.preprocess, split.images, cfg, self.device,
                                             self.weights_source, name, self.precision)
                 for name, split in (("train", self.splits.train), ("validation", self.splits.val))}
        fit = probe.fit_head(self.model.get_classifier(), feats["train"], self.splits.train.labels,
                             feats["validation"], self.splits.val.labels, cfg.label_smoothing)
        state.epoch, state.best_epoch = 1, 1
        state.train_time_s = state.epoch_time_s = time.perf_counter() - t0
        val = self.evaluate(self.splits.val)
        state.best_val_accuracy = val["accuracy"]
        _append_metrics(self.run_dir, {
            "epoch": 1, "step": 0, "lr": 0.0, "train_loss": float("nan"), "train_accuracy": float("nan"),
            "val_loss": val["loss"], "val_accuracy": val["accuracy"], "epoch_time_s": round(state.epoch_time_s, 3),
            "train_images_per_s": round(len(self.splits.train) / max(state.epoch_time_s, 1e-9), 1),
            "weight_decay": fit["weight_decay"]})
        self.save("best")
        self.save("last")
        log.info("linear probe: validation accuracy %.2f%% (weight decay %g), %.0f s",
                 100 * val["accuracy"], fit["weight_decay"], state.epoch_time_s)

    def _non_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, epoch: int) -> None:
        cfg, state = self.cfg, self.state
        what = f"the loss became {loss.item()}" if not torch.isfinite(loss) else f"the gradient norm became {grad_norm.item()}"
        if cfg.on_nonfinite == "skip" and state.skipped_steps < 10:
            state.lr_scale /= 2
            state.skipped_steps += 1
            log.warning("%s at step %d (epoch %d): step skipped, learning rate halved (now x%g)",
                        what, state.step, epoch, state.lr_scale)
            return None
        raise TrainingError(
            f"{what} at step {state.step} (epoch {epoch}, batch {state.batch + 1}); the run stopped and its last "
            f"good checkpoint is kept in {self.run_dir / 'checkpoints'}. Try a lower --lr, --grad-clip 1.0, "
            "--precision fp32, or --on-nonfinite skip.")

    def _checkpoint_due(self) -> bool:
        minutes = self.cfg.checkpoint_every_minutes
        return minutes is not None and time.perf_counter() - self.last_save >= 60 * minutes

    def _stop_for_signal(self, epoch: int) -> None:
        self.save("last")
        distributed.barrier(self.dist)  # no rank leaves (and makes torchrun stop the rest) before rank 0 has saved
        signum = self.stop_signal or signal.SIGINT
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name}: stopped in epoch {epoch} after batch {self.state.batch}; checkpoint saved. "
            f"Resume with: cnnkit train --resume {self.run_dir}", signum)

    def _end_epoch(self, epoch: int, train_loss: float, train_acc: float) -> bool:
        """Validate, record, checkpoint; True when early stopping ends the run."""
        cfg, state = self.cfg, self.state
        epoch_time, batches = state.epoch_time_s, state.batch  # fewer than the loader's when a budget planned part of it
        state.train_time_s += epoch_time
        self._train_ended = time.perf_counter()
        val = self.evaluate(self.splits.val)
        if self.budget_s is not None:
            self._budget_after_epoch(epoch, time.perf_counter() - self._train_ended)
        state.epoch, state.batch = epoch, 0
        gained = val["accuracy"] > state.best_val_accuracy  # (not `progress`: that is the module)
        state.bad_epochs = 0 if gained else state.bad_epochs + 1
        # A tie is no progress for early stopping, but its later weights become the best: as good on
        # validation and trained longer (under a decaying schedule, at a lower rate). A GPU
        # fmnist-fast run tied at epochs 10 and 11 and was tested with epoch 10's weights.
        improved = val["accuracy"] >= state.best_val_accuracy
        if improved:
            state.best_val_accuracy, state.best_epoch = val["accuracy"], epoch
        record = {
            "epoch": epoch, "step": state.step, "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "epoch_time_s": round(epoch_time, 3),
            "train_images_per_s": round(batches * cfg.batch_size / max(epoch_time, 1e-9), 1),
        }
        if self.dist.is_main:
            _append_metrics(self.run_dir, record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "val_")) else key,
                                                value, epoch)
            self.tensorboard.flush()
        if improved:
            self.save("best")
        stop = bool(cfg.early_stopping_patience and state.bad_epochs >= cfg.early_stopping_patience)
        if epoch % cfg.checkpoint_every_epochs == 0 or epoch == cfg.epochs or stop or self._checkpoint_due():
            self.save("last")
        log.info("epoch %d/%d  loss %.4f  acc %.2f%%  val_loss %.4f  val_acc %.2f%%%s  %.0f img/s  %.1fs",
                 epoch, cfg.epochs, train_loss, 100 * train_acc, val["loss"], 100 * val["accuracy"],
                 " *" if improved else "", record["train_images_per_s"], epoch_time)
        if stop:
            log.info("early stopping: no better validation accuracy for %d epochs", state.bad_epochs)
        return stop

    def evaluate(self, split) -> dict[str, Any]:
        """Metrics over the whole split, without test-time augmentation (it would multiply the cost
        of every epoch's validation); in distributed runs each rank takes a share and all ranks
        get the same numbers (so they agree on the best epoch and on early stopping)."""
        info = self.dist
        idx = np.arange(len(split))[info.rank::info.world]
        logits = predict_logits(self.model, self.preprocess, split.images[idx], device=self.device, **self.inference)
        parts = distributed.gather_cat(logits, info)
        order = np.concatenate([np.arange(len(split))[r::info.world] for r in range(info.world)])
        return classification_metrics(torch.cat(parts), split.labels[order], self.ds.classes)

    def _finish(self, stopped_early: bool) -> TrainResult:
        cfg, state, splits = self.cfg, self.state, self.splits
        if self.dist.enabled:  # DDP's reducer holds the process group: let go of it before it goes
            self.net = self.model
            gc.collect()
        distributed.cleanup(self.dist)
        if not self.dist.is_main:
            return TrainResult(self.run_dir, state, {}, {})
        self.model.load_state_dict(load_checkpoint(self.run_dir / "checkpoints" / "best").model)
        self.dist = distributed.DistInfo()  # from here on, rank 0 alone
        test_logits = predict_logits(self.model, self.preprocess, splits.test.images, device=self.device,
                                     tta=cfg.tta, **self.inference)
        test = classification_metrics(test_logits, splits.test.labels, self.ds.classes)
        save_evaluation(self.run_dir, test, self.ds.classes, split="test", checkpoint="best")
        summary = {
            "status": "stopped early" if stopped_early else "finished",
            "recipe": cfg.recipe, "dataset": self.ds.name, "data_source": self.ds.source, "model": cfg.model,
            "parameters": count_parameters(self.model), "epochs_run": state.epoch, "best_epoch": state.best_epoch,
            "best_val_accuracy": state.best_val_accuracy, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
            "train_samples": len(splits.train), "val_samples": len(splits.val), "test_samples": len(splits.test),
            "train_time_s": round(state.train_time_s, 2), "skipped_steps": state.skipped_steps,
            "wall_time_s": round(time.perf_counter() - self.wall_start, 2),  # this invocation, data loading included
            "steps_run": state.step, "steps_per_epoch": len(self.loader), "schedule_steps": self.total_steps,
            **({"time_budget_s": self.budget_s, "planned_time_s": round(state.planned_time_s, 1)} if self.budget_s else {}),
            "device": describe_device(self.device), "precision": self.precision, "finished_at": datetime.now().isoformat(timespec="seconds"),
            "versions": versions(), "notes": splits.notes,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        if cfg.report:
            from cnnkit.report import build_report

            t0 = time.perf_counter()
            build_report(self.run_dir, self.model, self.preprocess, self.ds.classes, splits.test.images,
                         splits.test.labels, splits.train.images, splits.train.labels, cfg.to_dict(), self.device,
                         logits=test_logits)
            log.info("report: %s (%.1f s)", self.run_dir / "report.html", time.perf_counter() - t0)
        summary["total_time_s"] = round(time.perf_counter() - self.wall_start, 2)  # with the report
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.budget_s is not None:
            log.info("time budget %s: planned %.0f s, took %.0f s", cfg.time_budget, state.planned_time_s,
                     summary["total_time_s"])
        if self.tensorboard is not None:
            self.tensorboard.close()
        return TrainResult(self.run_dir, state, test, summary)


def _imagenet_model(cfg: Config) -> tuple[nn.Module, str]:
    """The timm model with its ImageNet weights and 1000-class head, and where the weights came
    from. Done before the data is loaded: missing weights should not cost minutes of decoding."""
    from cnnkit.models import OWN_MODELS
    from cnnkit.models.pretrained import load_pretrained

    if cfg.model in OWN_MODELS:
        raise ConfigError(f"--pretrained needs a timm model; {cfg.model} is cnnkit's own and has no pretrained weights")
    args = {k: v for k, v in cfg.model_args.items() if k != "head_hidden"}
    model = create_model(cfg.model, 1000, 3, 224, **args)
    return model, load_pretrained(model, cfg.model, cfg.weights)


def _adapt_pretrained(model: nn.Module, cfg: Config, num_classes: int, preprocess: Preprocess) -> nn.Module:
    """A new head for the dataset's classes; one input channel if grey images go in summed."""
    from cnnkit.models import replace_head, sum_input_channels

    hidden = cfg.model_args.get("head_hidden")
    replace_head(model, num_classes, hidden)
    if preprocess.model_channels == 1:
        sum_input_channels(model)
    log.info("new %d-class head%s%s", num_classes, f" with a hidden layer of {hidden}" if hidden else "",
             "; first convolution summed to one input channel" if preprocess.model_channels == 1 else "")
    return model


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard true needs the tensorboard package: pip install 'cnnkit[tensorboard]'") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


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
    run_dir.mkdir(parents=True, exist_ok=True)  # checkpoints/ comes with the first checkpoint (lr-find writes none)
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
    if ckpt.optimizer is None:
        raise RunError(f"{run_dir}/checkpoints/last has no optimizer state; it cannot be resumed")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone writes
        if overrides:
            write_json_atomic(config_path, cfg.to_dict())
        _truncate_metrics(run_dir, ckpt.meta["state"]["epoch"])
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
