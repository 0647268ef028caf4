"""Everything a run needs, built from its Config in one place: runtime, data and splits,
preprocessing, model (pretrained or from scratch), optimiser, batch loader, loss and the shared
training step. The loop gets the result and knows no dataset, file format or model family.

timm's factories are the model (`create_model`, `create_loader`, ...): one function a piece,
called in order by `build`, so that a change to, say, how the loss is weighted has one room.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit import distributed, progress
from cnnkit.augment import build_augment
from cnnkit.checkpoint import Checkpoint
from cnnkit.config import Config
from cnnkit.data import Dataset, Splits, canonical_name, imbalance_ratio
from cnnkit.data.copies import CopiesFound, check_copies
from cnnkit.data.dataset import balanced_class_weights
from cnnkit.data.loader import BatchLoader
from cnnkit.distributed import DistInfo
from cnnkit.errors import ConfigError
from cnnkit.finetune import Unfreezer, make_unfreezer
from cnnkit.inference import InferenceSettings
from cnnkit.models import OWN_MODELS, check_model_name, create_model, replace_head, sum_input_channels
from cnnkit.models.signed_power import ARG as HEAD_POWER
from cnnkit.models.pretrained import load_pretrained
from cnnkit.preprocess import Preprocess, make_preprocess
from cnnkit.runs import RunRecord, run_splits
from cnnkit.runtime import configure_threads_and_determinism, resolve_device, training_precision, versions
from cnnkit.training.frozen_cache import cached_step
from cnnkit.training.optim import make_optimizer
from cnnkit.training.step import TrainStep

log = logging.getLogger(__name__)
FEW_IMAGES = 5  # a class with fewer to learn from (training and validation) is warned of: fewer than a probe's 5 folds


@dataclass
class Setup:
    """A built run: what the loop, its hooks and the final evaluation work with."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    precision: str
    inference: InferenceSettings  # how validation and the test evaluate (the report and `evaluate` too)
    ds: Dataset
    splits: Splits
    preprocess: Preprocess
    model: nn.Module  # the plain model: checkpoints, evaluation and hooks use it
    net: nn.Module  # what trains: the model, wrapped by DDP and torch.compile where asked
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    step: TrainStep
    scaler: torch.amp.GradScaler | None
    unfreezer: Unfreezer | None
    weights_source: str
    run_dir: Path
    meta: dict[str, Any]  # what every checkpoint says of the run (model, classes, preprocessing, config)
    record: RunRecord
    data_warnings: list[str] = field(default_factory=list)  # copies of a picture across splits or classes
    copied_test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # test images that are copies


def build(cfg: Config, run_dir: Path | None, checkpoint: Checkpoint | None = None,
          record: RunRecord | None = None, asked: Config | None = None,
          data: tuple[Dataset, Splits] | None = None) -> Setup:
    """Build the run of `cfg`; with a `checkpoint` (resuming `run_dir`) its weights and optimiser
    state are loaded before DDP wraps the model. A new run gets a new folder (rank 0 makes it) with
    the configuration it was `asked` (where `cfg` applies decisions made before, a chosen backbone).
    `data`: the dataset and splits to train on, in place of the configuration's (a fold's)."""
    check_model_name(cfg.model)
    canonical_name(cfg.dataset)
    dist, device = distributed.setup(resolve_device(cfg.device))
    refused = distributed.refusal(cfg.strategy) if dist.enabled else None
    if refused:  # before the data and the model: what DDP cannot train (a torchrun launched by hand)
        raise ConfigError(refused)
    if not dist.is_main:  # one voice: rank 0 logs and writes
        logging.getLogger("cnnkit").setLevel(logging.WARNING)
        progress.set_enabled(False)
    configure_threads_and_determinism(cfg.threads, cfg.deterministic, device)
    precision = training_precision(cfg.precision, device)
    imagenet, weights_source = imagenet_model(cfg) if cfg.pretrained and checkpoint is None else (None, "none")
    ds, splits = data or run_splits(cfg.to_dict())
    cross_validated = bool(record and record.selection)  # its validation images train too (training/choose.py)
    _log_data(ds, splits, cfg.strategy, cross_validated)
    copies = (check_copies(splits, ds.classes, validation=not cross_validated, near=ds.name == "folder")
              if data is None and dist.is_main else CopiesFound([], np.zeros(0, dtype=np.int64)))  # not a fold's
    for warning in copies.warnings:
        log.warning("%s", warning)
    if dist.enabled:
        log.info("distributed: %d processes (%s), global batch %d = %d per process", dist.world,
                 "NCCL" if device.type == "cuda" else "Gloo", cfg.batch_size, cfg.batch_size // dist.world)
    preprocess = (Preprocess.from_dict(checkpoint.meta["preprocess"]) if checkpoint
                  else make_preprocess(cfg, splits.train.images))
    model = _make_model(cfg, imagenet, len(ds.classes), preprocess, splits.train.images, device, init=not checkpoint)
    if dist.enabled and cfg.sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("--sync-batchnorm needs CUDA devices (PyTorch's SyncBatchNorm has no CPU version); "
                              "drop it for CPU processes")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(cfg, model)  # before any freezing: frozen layers join it later
    loader = _make_loader(cfg, splits, len(ds.classes), device, dist)
    unfreezer = make_unfreezer(cfg, model, len(loader))
    if checkpoint is not None:
        model.load_state_dict(checkpoint.model)
        optimizer.load_state_dict(checkpoint.optimizer)
    if unfreezer is not None:  # before DDP, which trains what requires a gradient when it wraps
        unfreezer.update(checkpoint.meta["state"]["step"] if checkpoint else 0)
        log.info("%s: training %s", cfg.strategy, unfreezer.describe())
    net = _wrap(model, cfg, dist, device)
    step = TrainStep(net, preprocess, build_augment(cfg.augment), _loss(cfg, splits, len(ds.classes), device),
                     len(ds.classes), device, precision, cfg.channels_last, cfg.seed,
                     progressive_sizes=cfg.progressive_sizes)
    step = cached_step(cfg, step, model, unfreezer, len(splits.train))
    record = record or RunRecord()
    if run_dir is None:
        run_dir = distributed.broadcast(_new_run_dir(asked or cfg) if dist.is_main else None, dist)
        if dist.is_main and record != RunRecord():
            record.save(run_dir)
    meta = {"format": "cnnkit-checkpoint/1", "model": cfg.model, "model_args": cfg.model_args,
            "num_classes": len(ds.classes), "classes": ds.classes, "dataset": ds.name,
            "preprocess": preprocess.to_dict(), "recipe": cfg.recipe, "seed": cfg.seed,
            "config": cfg.to_dict(), "versions": versions()}
    return Setup(cfg, dist, device, precision, InferenceSettings.for_run(cfg.to_dict(), device), ds, splits,
                 preprocess, model, net, optimizer, loader, step,
                 torch.amp.GradScaler("cuda") if precision == "fp16" else None, unfreezer, weights_source,
                 run_dir, meta, record, copies.warnings, copies.copied_test)


def _make_model(cfg: Config, imagenet: nn.Module | None, k: int, preprocess: Preprocess, train_images: np.ndarray,
                device: torch.device, init: bool) -> nn.Module:
    torch.manual_seed(cfg.seed)
    if imagenet is not None:
        model = _adapt_pretrained(imagenet, cfg, k, preprocess).to(device)
    else:
        model = create_model(cfg.model, k, preprocess.model_channels, preprocess.input_size, **cfg.model_args).to(device)
        if init and hasattr(model, "init_from_data"):  # e.g. fastnet's whitening stem
            model.init_from_data(_init_sample(train_images, preprocess, cfg.seed, device))
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _init_sample(images: np.ndarray, preprocess: Preprocess, seed: int, device: torch.device,
                 n: int = 5000) -> torch.Tensor:
    """Up to n preprocessed training images (seeded), for data-dependent initialisation."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    x = torch.from_numpy(np.ascontiguousarray(images[idx])).to(device)
    return preprocess.finish(preprocess.to_float(x))


def imagenet_model(cfg: Config) -> tuple[nn.Module, str]:
    """The timm model with its ImageNet weights and 1000-class head, and where the weights came
    from. Done before the data is loaded: missing weights should not cost minutes of decoding."""
    if cfg.model in OWN_MODELS:
        raise ConfigError(f"--pretrained needs a timm model; {cfg.model} is cnnkit's own and has no pretrained weights")
    args = {k: v for k, v in cfg.model_args.items() if k not in ("head_hidden", HEAD_POWER)}  # the new head's
    model = create_model(cfg.model, 1000, 3, 224, **args)
    source = load_pretrained(model, cfg.model, cfg.weights)
    log.info("pretrained weights for %s from %s", cfg.model, source)
    return model, source


def _adapt_pretrained(model: nn.Module, cfg: Config, num_classes: int, preprocess: Preprocess) -> nn.Module:
    """A new head for the dataset's classes; one input channel if grey images go in summed."""
    hidden, power = cfg.model_args.get("head_hidden"), cfg.model_args.get(HEAD_POWER)
    replace_head(model, num_classes, hidden, power)
    if preprocess.model_channels == 1:
        sum_input_channels(model)
    log.info("new %d-class head%s%s%s", num_classes, f" with a hidden layer of {hidden}" if hidden else "",
             f", its features to the power {power:g} (signed)" if power else "",
             "; first convolution summed to one input channel" if preprocess.model_channels == 1 else "")
    return model


def _make_loader(cfg: Config, splits: Splits, k: int, device: torch.device, dist: DistInfo) -> BatchLoader:
    counts = splits.train.class_counts(k)
    weights = (1.0 / np.maximum(counts, 1))[splits.train.labels] if cfg.class_balance == "sampler" else None
    try:
        return BatchLoader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True, device=device,
                           sample_weights=weights, rank=dist.rank, world=dist.world)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _loss(cfg: Config, splits: Splits, k: int, device: torch.device) -> nn.Module:
    weights = None
    if cfg.class_balance == "weights":
        weights = torch.tensor(balanced_class_weights(splits.train.labels, k), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


def _wrap(model: nn.Module, cfg: Config, dist: DistInfo, device: torch.device) -> nn.Module:
    """DDP averages gradients over ranks; torch.compile where asked. Checkpoints keep the plain model."""
    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if cfg.compile else net


def _log_data(ds: Dataset, splits: Splits, strategy: str, cross_validated: bool = False) -> None:
    """The splits' sizes; `cross_validated` (the backbone chosen by the folds), the training and validation
    images as one, since the head learns from both (a log of 648 and 72 of flowers12's 720 read as if 72
    were held back)."""
    log.info("dataset %s from %s", ds.name, ds.source)
    k = len(ds.classes)
    shown = {"train": splits.train.class_counts(k), "validation": splits.val.class_counts(k)}
    if cross_validated:
        shown = {"train and validation (cross-validated: the head learns from both)": sum(shown.values())}
    shown["test"] = splits.test.class_counts(k)
    for name, counts in shown.items():
        if counts.min() == counts.max():
            per_class = f"{counts[0]} per class"
        elif k <= 12:
            per_class = ", ".join(f"{c} {n}" for c, n in zip(ds.classes, counts))
        else:
            per_class = f"{counts.min()} to {counts.max()} per class"
        log.info("  %s: %d images (%s)", name, counts.sum(), per_class)
    for note in splits.notes:
        log.info("  %s", note)
    ratio = imbalance_ratio(splits.train, k)
    if ratio > 3:
        log.warning("classes are imbalanced: the largest has %.1fx the images of the smallest. Consider "
                    "--class-balance %s.", ratio, "weights (the probe's head then weighs each class alike)"
                    if strategy == "linear-probe" else "weights or --class-balance sampler")
    learnt = splits.train.class_counts(k) + splits.val.class_counts(k)
    few = [f"{c} {n}" for c, n in zip(ds.classes, learnt) if n < FEW_IMAGES]
    if few:
        log.warning("few images to learn a class from: %s (training and validation together). A class needs at "
                    "least %d; a few dozen photos a class are a good start", ", ".join(few), FEW_IMAGES)


def _new_run_dir(cfg: Config) -> Path:
    """A new run folder with the run's config.json; never over an existing run."""
    from datetime import datetime

    from cnnkit.fileio import write_json_atomic

    name = cfg.name or f"{cfg.recipe or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.output) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; choose another --name, or continue it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)  # checkpoints/ comes with the first checkpoint (lr-find writes none)
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    return run_dir
