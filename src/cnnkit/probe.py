"""Linear probe: a frozen pretrained backbone, features extracted once (and cached), and a
linear (or hidden-layer) head fitted on them in seconds. The fitted head goes back into the model, so the run is
an ordinary run: evaluate, predict, export and serve use it like any other.
"""

from __future__ import annotations

import copy
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.cache import cache_key, cache_path, cached_arrays
from cnnkit.data.dataset import balanced_class_weights
from cnnkit.errors import ConfigError
from cnnkit.inference import inference_engine, predict_logits
from cnnkit.models.block_pooled import ARG as POOLED_BLOCKS
from cnnkit.models.concat import SOURCES_SEPARATOR, ConcatBackbones, member_names
from cnnkit.models.signed_power import ARG as HEAD_POWER
from cnnkit.models.signed_power import SignedPower
from cnnkit.preprocess import Preprocess

log = logging.getLogger(__name__)

Rows = tuple[np.ndarray, np.ndarray | None]  # a probe's rows: the images' features, their mirror images' (probe_flip)

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)  # chosen on the validation split
# The heads are fitted in float32 on standardised features (the statistics and the fold-in in float64). On
# flowers12's folds (Lite0, Lite2 and both side by side, mirrored rows, 5 folds x 4 decays, fold seeds 0-1,
# capped to AVX2) L-BFGS took 0.4-0.6 of float64's time in as many evaluations, and 47 of the 48 fold
# estimates were the same (one differed by one image of 720), the chosen decays all the same.
FIT_DTYPE = torch.float32


# A head's fit in passes over its rows, for a time budget's plan (training/probe_budget.py): the path's first
# PLANNED_FITS decays (a linear head's stops at the first whose accuracy falls, mostly the second; a budget's
# deadline cuts a longer one). Along two fits a linear head's L-BFGS took 110-430 closure evaluations (a forward
# and backward pass over every row; 357-679 along all four), each 1.1-1.3 times a lone pass's time (Lite0's
# features of Fashion-MNIST at 64 px and CIFAR-10 at 192 px, 1,024-16,380 rows); a hidden-layer head's Adam
# takes ADAM_EPOCHS over the rows a decay.
PLANNED_FITS = 2
LBFGS_FIT_PASSES = 200
LBFGS_MAX_ITER = 200  # iterations of one fit (fewer where it converges first)
# A fit ends where no gradient of its loss is larger than this (torch's default is 1e-7). On four photo sets'
# training images (flowers12, catdog-r, five, autotruck; Lite0-2 and Lite0+Lite2, mirrored rows, fold seeds 0-2,
# 16 estimates) the folds took 0.52 of the time, their estimates +0.01 points apart on average (-0.13 to +0.27,
# within an image of a fold); at 1e-4, 0.26 of the time and -0.03 (`probe-lbfgs-tolerance-*` in
# benchmarks/RESULTS.md). cifar10-probe's head on 13,000 rows: 0.74 of the time, the same decay and accuracy
# (a scratch check on the Zen 3).
LBFGS_TOLERANCE = 1e-5
ADAM_EPOCHS = 30
COST_SAMPLE = 8192  # rows a fit's cost is timed on: a pass's time per row grows about 1.4x from 1,024 rows to 16,384


class PooledFeatures(nn.Module):
    """A timm model's pooled features (before its classifier), as a module of its own: what the
    probe's rows are, and what ONNX Runtime exports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def features(model: nn.Module, preprocess: Preprocess, images: np.ndarray, *, device: torch.device,
             batch_size: int = 256, precision: str = "fp32", tta: str = "none", channels_last: bool = False,
             what: str = "", engine: str = "torch") -> np.ndarray:
    """The backbone's pooled features (before the classifier), averaged over TTA views."""
    return predict_logits(model, preprocess, images, batch_size=batch_size, device=device, precision=precision,
                          channels_last=channels_last, tta=tta, outputs=PooledFeatures(model), engine=engine,
                          description=f"features {what}".strip()).numpy()


def cached_features(model: nn.Module, preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device,
                    weights_source: str, what: str, precision: str) -> np.ndarray:
    """Features are cached: keyed by model, weights, preprocessing, TTA, the engine and a checksum
    of the images. The engine is the run's (`inference_engine`; ONNX Runtime runs in fp32)."""
    engine, precision = _engine_precision(cfg, device, precision)
    arrays, _ = cached_arrays(f"features-{cfg.model}", _features_key(preprocess, images, cfg, device, weights_source,
                                                                     precision), lambda: (
        {"features": features(model, preprocess, images, device=device, precision=precision, tta=cfg.tta,
                              channels_last=cfg.channels_last, batch_size=cfg.eval_batch_size, what=what,
                              engine=engine)}, {}), what=f"{what} features".strip())
    return arrays["features"]


def _features_key(preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device, weights_source: str,
                  precision: str) -> str:
    engine, precision = _engine_precision(cfg, device, precision)
    blocks = cfg.model_args.get(POOLED_BLOCKS)  # wider rows (models.block_pooled); other arguments leave them as they are
    return cache_key(model=cfg.model, weights=weights_source, preprocess=preprocess.to_dict(), tta=cfg.tta,
                     precision=precision, engine=engine, **({POOLED_BLOCKS: blocks} if blocks else {}),
                     images=zlib.crc32(memoryview(np.ascontiguousarray(images)).cast("B")), shape=list(images.shape))


def _engine_precision(cfg: Any, device: torch.device, precision: str) -> tuple[str, str]:
    """The run's engine for fixed weights and the precision it computes in (ONNX Runtime: fp32)."""
    engine = inference_engine(cfg.to_dict(), device)
    return engine, "fp32" if engine == "onnxruntime" else precision


def store_rows(preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device, weights_source: str,
               precision: str, plain: np.ndarray, flipped: np.ndarray | None) -> None:
    """Keep rows computed another way (a single backbone's) where `probe_rows` with these arguments
    would look for them: the plain features cut from wider rows (probe_blocks), so that a run
    which chose them does not pass its images through the backbone again."""
    for (imgs, view_cfg, _), rows in zip(_row_views(images, cfg), (plain, flipped)):
        cached_arrays(f"features-{cfg.model}", _features_key(preprocess, imgs, view_cfg, device, weights_source,
                                                             precision), lambda rows=rows: ({"features": rows}, {}),
                      what="features")


def fit_head(head: nn.Module, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             label_smoothing: float = 0.0, weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
             quiet: bool = False, keep: float | None = None, deadline: float | None = None,
             class_weights: np.ndarray | None = None) -> dict[str, Any]:
    """Fit `head` in place on backbone features: a linear head by multinomial logistic regression
    (L-BFGS, full batch, along `weight_decays` from the largest down: see `_lbfgs_path`), a
    hidden-layer head (Linear, ReLU, Linear) by Adam for each; both on standardised features. The
    best validation accuracy wins, or with `keep` that decay's head (cross-validation chose it, and
    the validation images are among the training rows). Without `keep` a linear head's path stops at
    the first decay whose accuracy falls below the best so far: on cifar10-probe's 48,000 rows each
    L-BFGS fit costs about 30 s on a 2-core CPU, and the largest decay wins there (a later, smaller
    one would have to win back what the first step down lost). With a `deadline` (time.perf_counter's,
    a time budget's) it also stops, after the PLANNED_FITS fits a budget's plan reckons with, before a
    decay whose fit, as long as the last one's, would end after it: a path that goes on rising is cut.
    `class_weights` (--class-balance) weigh each class's rows in the loss; validation still counts images."""
    xs, vx, mean, std = _standardised(train_x, val_x)
    y, vy = torch.from_numpy(train_y).long(), torch.from_numpy(val_y).long()
    linear = isinstance(head, nn.Linear)
    best: dict[str, Any] = {"val_accuracy": -1.0}
    loss = _Loss(label_smoothing, class_weights)
    path = (_lbfgs_path(_fit_copy(head), xs, y, weight_decays, loss) if linear
            else _adam_fits(head, xs, y, weight_decays, loss))
    started = time.perf_counter()
    for n, (wd, candidate) in enumerate(path, 1):
        fitted_at = time.perf_counter()
        fit_s, started = fitted_at - started, fitted_at
        acc = _accuracy(candidate, vx, vy)
        if not quiet:
            log.info("  %s head, weight decay %g: validation accuracy %.2f%%", "linear" if linear else "hidden-layer",
                     wd, 100 * acc)
        if (acc > best["val_accuracy"] and keep is None) or wd == keep:
            best = {"val_accuracy": acc, "weight_decay": wd, "head": copy.deepcopy(candidate)}
        elif keep is None and linear and acc < best["val_accuracy"]:
            break  # along the path, smaller decays only fit the training rows more closely
        if keep is None and deadline is not None and PLANNED_FITS <= n < len(weight_decays) and fitted_at + fit_s > deadline:
            log.info("  the time budget ends the weight decays here (another fit would take about %.0f s)", fit_s)
            break
    fitted = best.pop("head").double()
    # Fold the standardisation into the first layer, so the head applies to the raw features.
    first = fitted if linear else fitted[0]
    with torch.no_grad():
        first.bias -= (first.weight * (mean / std)[None, :]).sum(1)
        first.weight /= std[None, :]
    head.load_state_dict(fitted.float().state_dict())
    return best


def _fit_copy(head: nn.Module) -> nn.Module:
    """The head as it is fitted: a copy on the CPU, where the features are (the model may be on a GPU;
    `fit_head` loads the fitted weights back into it), in FIT_DTYPE."""
    return copy.deepcopy(head).to("cpu", FIT_DTYPE)


def _standardised(train_x: np.ndarray, val_x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    """Both sets of features scaled by the training rows' mean and standard deviation (computed in
    float64, the scaled features in FIT_DTYPE), and those statistics (float64, for the fold-in)."""
    x = torch.from_numpy(train_x).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    return ((x - mean) / std).to(FIT_DTYPE), ((torch.from_numpy(val_x).double() - mean) / std).to(FIT_DTYPE), mean, std


@torch.no_grad()
def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((head(x).argmax(1) == y).double().mean())


class _Loss:
    """A head's loss on its rows: cross-entropy with label smoothing and, under --class-balance, each
    class's rows weighted (`class_weights`, as a trained model's loss weighs them: training/build.py)."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: np.ndarray | None = None):
        self.label_smoothing = label_smoothing
        self.weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=FIT_DTYPE)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.weight, label_smoothing=self.label_smoothing)


def _lbfgs_path(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, weight_decays: tuple[float, ...],
                loss: _Loss) -> Iterator[tuple[float, nn.Linear]]:
    """(decay, head) for each weight decay from the largest down, the first fit from zero and each
    later one from the last one's solution: a regularisation path, as glmnet fits one. The same
    path in cross-validation and in the final fit, so a fold's estimate is of the head the run
    keeps. On flowers12's Lite0 and Lite2 features (5 folds x 4 decays, fold seeds 0-2) the path
    took 0.6-0.7 of the time of fits from zero, with estimates within one image of 720 (200
    iterations end a weakly regularised fit before it has quite converged: its start shows)."""
    for n, wd in enumerate(sorted(weight_decays, reverse=True)):
        _fit_lbfgs(head, x, y, wd, loss, warm=n > 0)
        yield wd, head


def _adam_fits(head: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decays: tuple[float, ...],
               loss: _Loss) -> Iterator[tuple[float, nn.Module]]:
    for wd in weight_decays:
        candidate = _fit_copy(head)
        _fit_adam(candidate, x, y, wd, loss)
        yield wd, candidate


def _penalty(head: nn.Module, wd: float) -> torch.Tensor:
    return wd * sum(p.pow(2).sum() for p in head.parameters() if p.ndim > 1) / 2


def _fit_lbfgs(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, wd: float, loss_fn: _Loss,
               warm: bool = False, max_iter: int = LBFGS_MAX_ITER) -> int:
    """From zero, or with `warm` from the head's present weights (a nearby weight decay's solution).
    Returns how many times the loss was evaluated."""
    if not warm:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=LBFGS_TOLERANCE)
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        loss = loss_fn(head(x), y) + _penalty(head, wd)
        loss.backward()
        return loss

    opt.step(closure)
    return evaluations


def _fit_adam(head: nn.Module, x: torch.Tensor, y: torch.Tensor, wd: float, loss_fn: _Loss,
              epochs: int = ADAM_EPOCHS, batch: int = 1024) -> None:
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(batch):
            loss = loss_fn(head(x[idx]), y[idx]) + _penalty(head, wd)
            opt.zero_grad()
            loss.backward()
            opt.step()


def fit_row_seconds(head: nn.Module, rows: np.ndarray, classes: int) -> float:
    """Seconds per row that `fit_head` will take on rows like `rows`, timed here in milliseconds: the
    head's forward and backward pass over (up to COST_SAMPLE of) them, times the passes its fit makes.
    Measured, not a constant: the fit grows with the rows, the features' width and the classes, not
    with the backbone's forward pass, so no ratio to that carries from one backbone and input size to
    another."""
    sample = torch.from_numpy(np.ascontiguousarray(rows[:COST_SAMPLE])).to(FIT_DTYPE)
    y = torch.arange(len(sample)) % classes
    model = _fit_copy(head)

    def one_pass() -> None:
        model.zero_grad()
        F.cross_entropy(model(sample), y).backward()

    one_pass()  # the first allocates
    t0 = time.perf_counter()
    for _ in range(3):
        one_pass()
    row_s = (time.perf_counter() - t0) / 3 / len(sample)
    return row_s * PLANNED_FITS * (LBFGS_FIT_PASSES if isinstance(head, nn.Linear) else ADAM_EPOCHS)


def fit_fixed_seconds(head: nn.Module, features: int) -> float:
    """What `fit_head` will take whatever the rows: for a linear head L-BFGS's own work per evaluation
    (its line search and two-loop recursion, milliseconds in Python), timed on a short fit of 16 rows
    of `features` random features; none for a hidden-layer head (Adam's steps scale with the rows)."""
    if not isinstance(head, nn.Linear):
        return 0.0
    rows = torch.randn(16, features, generator=torch.Generator().manual_seed(0), dtype=FIT_DTYPE)
    model, labels = _fit_copy(head), torch.arange(16) % head.out_features
    _fit_lbfgs(model, rows, labels, 1e-2, _Loss(), max_iter=2)  # the first call in a process sets up for about a second
    t0 = time.perf_counter()
    evaluations = _fit_lbfgs(model, rows, labels, 1e-2, _Loss(), max_iter=20)
    return PLANNED_FITS * LBFGS_FIT_PASSES * (time.perf_counter() - t0) / max(evaluations, 1)


def head_class_weights(balance: str, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """The loss weights of a head's fit under --class-balance `balance`: none, or each class weighing
    alike (`weights`, and `sampler` too: a full-batch fit sees every row at once, so balanced batches and
    weighted rows are one and the same for it)."""
    if balance == "none":
        return None
    return balanced_class_weights(labels, num_classes)


def head_parts(model: nn.Module) -> tuple[SignedPower | None, nn.Module]:
    """The model's head as a probe fits it: the power normalisation its rows go through first (the
    model argument head_power, models.signed_power), if any, and the part whose weights are fitted."""
    head = model.get_classifier()
    if isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], SignedPower):
        return head[0], head[1]
    return None, head


def rows_power(model_args: dict[str, Any]) -> SignedPower | None:
    """The power normalisation a model with these arguments applies to its features (head_power)."""
    power = model_args.get(HEAD_POWER)
    return SignedPower(power) if power else None


def powered(rows: Rows, power: SignedPower | None) -> Rows:
    """Rows as the head sees them: through its power normalisation, if it has one."""
    if power is None:
        return rows
    plain, flipped = rows
    return power.rows(plain), None if flipped is None else power.rows(flipped)


def check(cfg: Any, model: nn.Module) -> None:
    if not cfg.pretrained:
        raise ConfigError("--strategy linear-probe needs --pretrained true (a frozen random backbone learns nothing)")
    head = head_parts(model)[1] if hasattr(model, "forward_head") else None
    if not isinstance(head, nn.Linear) and not (isinstance(head, nn.Sequential) and isinstance(head[0], nn.Linear)):
        raise ConfigError(f"--strategy linear-probe needs a timm model with a linear or hidden-layer classifier; "
                          f"{cfg.model} has {type(head).__name__ if head is not None else 'no classifier cnnkit can find'}")


# -- choosing the backbone by cross-validation (small photo sets, where a validation split is too
#    small to tell candidates apart: 72 images tell 97% from 99% by less than two images)


def fold_ids(labels: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """A fold number for every image, each class spread evenly over the folds (seeded). Images of one
    of `groups` (copies of one photo: data.copies.copy_groups) share the fold of its first: a fold
    holding out one copy while its head learns the other would judge the head by a photo it has seen
    (flowers12's training images hold 36 such pairs)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
    if groups is not None:
        _, first, group = np.unique(groups, return_index=True, return_inverse=True)
        out = out[first[group]]
        if np.bincount(out, minlength=folds).min() < len(labels) / folds / 2:  # large groups left a fold (nearly) empty
            out = balanced_group_folds(labels, group, folds, rng)
    return out


def balanced_group_folds(labels: np.ndarray, group: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold for every image, whole groups (numbered 0..G-1) at a time: the largest first, each to the
    fold holding the fewest images of its class (its first image's), then the fewest in all. For
    folders of many copies of few pictures (bursts, one photo saved at many sizes), where a group
    taking its first image's fold can leave folds empty. With fewer groups than folds, some stay empty."""
    sizes = np.bincount(group)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    first = np.unique(group, return_index=True)[1]  # each group's first image
    per_class = np.zeros((folds, int(labels.max()) + 1), dtype=np.int64)
    fold_of = np.empty(len(sizes), dtype=np.int64)
    for g in order:
        f = int(np.lexsort((per_class.sum(1), per_class[:, labels[first[g]]]))[0])
        fold_of[g] = f
        per_class[f] += np.bincount(labels[group == g], minlength=per_class.shape[1])
    return fold_of[group]


def used_folds(ids: np.ndarray, folds: int) -> list[int]:
    """The folds of `fold_ids` that hold images: all `folds` unless copies of fewer pictures than
    folds fill them (a clear error where fewer than two pictures are left to cross-validate)."""
    used = [k for k in range(folds) if np.any(ids == k)]
    if len(used) < 2:
        raise ConfigError("cross-validation needs at least two different pictures among the training images, and "
                          "every one of these is a copy of one picture (the same photo saved again, rescaled, "
                          "brighter or darker): add photos of other scenes, or look with `cnnkit datasets DIR`")
    return used


def cross_validate(plain: np.ndarray, flipped: np.ndarray | None, labels: np.ndarray, folds: int, seed: int,
                   label_smoothing: float, weight_decays: tuple[float, ...],
                   class_weights: np.ndarray | None = None) -> dict[float, tuple[float, float]]:
    """k-fold accuracy (mean, sd over folds) of a linear head for each weight decay (`fold_accuracies`)."""
    scores = fold_accuracies(plain, flipped, labels, folds, seed, label_smoothing, weight_decays, class_weights)
    return {wd: (float(np.mean(a)), float(np.std(a))) for wd, a in scores.items()}


def fold_accuracies(plain: np.ndarray, flipped: np.ndarray | None, labels: np.ndarray, folds: int, seed: int,
                    label_smoothing: float, weight_decays: tuple[float, ...],
                    class_weights: np.ndarray | None = None, groups: np.ndarray | None = None,
                    tta_below: float | None = None) -> dict[float, list[float]]:
    """Each fold's held-out accuracy of a linear head (fold 0 first, as `fold_ids` numbers them), for
    each weight decay. With `flipped`, mirrored images are extra training rows and a held-out image
    is judged on the mean of its two views' features: for a linear head, the same as averaging the
    two views' logits (--tta flip); with `tta_below`, only where its plain view's top probability is
    below it, as the test then judges it (--tta-below). `class_weights` weigh each class's rows in the
    fits (--class-balance); the held-out images are counted alike, as the test's are. Copies of one
    photo (`groups`) share a fold."""
    ids = fold_ids(labels, folds, seed, groups)
    scores: dict[float, list[float]] = {wd: [] for wd in weight_decays}
    for k in used_folds(ids, folds):
        t, v = ids != k, ids == k
        x, y = (plain[t], labels[t]) if flipped is None else (np.concatenate([plain[t], flipped[t]]),
                                                               np.concatenate([labels[t], labels[t]]))
        held = HeldOut(plain[v], None if flipped is None else flipped[v], labels[v], tta_below)
        for wd, accuracy in _fold_accuracies(x, y, held, _Loss(label_smoothing, class_weights), weight_decays).items():
            scores[wd].append(accuracy)
    return scores


@dataclass(frozen=True)
class HeldOut:
    """A fold's held-out images as the test judges them: their plain views' features, their mirrored
    views' (None: plain views alone), their labels, and `tta_below` (the mirrored view only for the
    images whose plain view's top probability is below it; None: for every image)."""

    plain: np.ndarray
    flipped: np.ndarray | None
    labels: np.ndarray
    tta_below: float | None = None


def _fold_accuracies(x: np.ndarray, y: np.ndarray, held: HeldOut, loss: _Loss,
                     weight_decays: tuple[float, ...]) -> dict[float, float]:
    """One fold's held-out accuracy of a linear head at each weight decay, along `_lbfgs_path`."""
    views = held.plain if held.flipped is None else np.concatenate([held.plain, (held.plain + held.flipped) / 2])
    xs, vx, _, _ = _standardised(x, views)
    yt, vy = torch.from_numpy(y).long(), torch.from_numpy(held.labels).long()
    classes = int(max(y.max(), held.labels.max())) + 1
    head = nn.Linear(x.shape[1], max(classes, 0 if loss.weight is None else len(loss.weight))).to(FIT_DTYPE)
    return {wd: _held_out_accuracy(fitted, vx, vy, held.tta_below)
            for wd, fitted in _lbfgs_path(head, xs, yt, weight_decays, loss)}


@torch.no_grad()
def _held_out_accuracy(head: nn.Module, views: torch.Tensor, y: torch.Tensor, tta_below: float | None) -> float:
    """Accuracy on `views`: the held-out images' plain views, or those followed by their two views'
    means, each image judged on the mean where `tta_below` is None or its plain view is less sure."""
    if len(views) == len(y):
        return _accuracy(head, views, y)
    plain, both = head(views[: len(y)]), head(views[len(y):])
    unsure = torch.ones(len(y), dtype=torch.bool) if tta_below is None else plain.softmax(1).amax(1) < tta_below
    return float((torch.where(unsure[:, None], both, plain).argmax(1) == y).double().mean())


def probe_rows(model: nn.Module, preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device,
               weights_source: str, what: str, precision: str) -> Rows:
    """Features of the images (averaged over cfg.tta's views) or, with cfg.probe_flip, of the images
    and of their mirror images, each a row of its own (all cached). Backbones side by side: each
    member's rows at its own size, side by side (the cache then holds what choosing computed)."""
    if isinstance(model, ConcatBackbones):
        return _concat_rows(model, preprocess, images, cfg, device, weights_source, what, precision)
    rows = [cached_features(model, preprocess, imgs, view_cfg, device, weights_source, what + suffix, precision)
            for imgs, view_cfg, suffix in _row_views(images, cfg)]
    return rows[0], rows[1] if len(rows) > 1 else None


def rows_cached(preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device, weights_source: str,
                precision: str) -> bool:
    """Whether `probe_rows` with these arguments (one backbone) would read every view's rows from the cache."""
    return all(cache_path(f"features-{cfg.model}", _features_key(preprocess, imgs, view_cfg, device, weights_source,
                                                                  precision)).exists()
               for imgs, view_cfg, _ in _row_views(images, cfg))


def views_per_image(cfg: Any) -> int:
    """Forward passes a probe's rows take an image: its own, and with cfg.probe_flip its mirror image's."""
    return 2 if cfg.probe_flip else 1


def _row_views(images: np.ndarray, cfg: Any) -> list[tuple[np.ndarray, Any, str]]:
    """(images, configuration, what) of each view a probe's rows are the features of: the images,
    averaged over cfg.tta's views; or, with cfg.probe_flip, the images and their mirror images, each
    a single view whose features are rows of their own."""
    if not cfg.probe_flip:
        return [(images, cfg, "")]
    single = replace_tta(cfg)
    return [(images, single, ""), (np.ascontiguousarray(images[..., ::-1]), single, " (mirrored)")]


def replace_tta(cfg: Any) -> Any:
    """Rows are single views: the flips are rows of their own, not averaged into one."""
    import dataclasses

    return dataclasses.replace(cfg, tta="none")


def _concat_rows(model: ConcatBackbones, preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device,
                 weights_source: str, what: str, precision: str) -> Rows:
    import dataclasses

    sources = weights_source.split(SOURCES_SEPARATOR)
    parts = [probe_rows(member, dataclasses.replace(preprocess, input_size=size), images,
                        dataclasses.replace(cfg, model=name), device, source, what, precision)
             for member, name, size, source in zip(model.members, member_names(cfg.model), model.member_sizes, sources)]
    plain = np.concatenate([p for p, _ in parts], 1)
    return plain, None if parts[0][1] is None else np.concatenate([f for _, f in parts], 1)
