"""Linear probe: a frozen pretrained backbone, features extracted once (and cached), and a
linear head fitted on them in seconds. The fitted head goes back into the model, so the run is
an ordinary run: evaluate, predict, export and serve use it like any other.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.augment import tta_views
from cnnkit.data.cache import cache_key, cached_arrays
from cnnkit.errors import ConfigError
from cnnkit.evaluate import autocast
from cnnkit.preprocess import Preprocess
from cnnkit.progress import track

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)  # chosen on the validation split


@torch.no_grad()
def features(model: nn.Module, preprocess: Preprocess, images: np.ndarray, *, device: torch.device,
             batch_size: int = 256, precision: str = "fp32", tta: str = "none", channels_last: bool = False,
             what: str = "") -> np.ndarray:
    """The backbone's pooled features (before the classifier), averaged over TTA views."""
    model.eval()
    out = []
    for start in track(range(0, len(images), batch_size), description=f"features {what}".strip(),
                       total=-(-len(images) // batch_size)):
        x = preprocess.to_float(torch.from_numpy(images[start:start + batch_size]).to(device))
        total = None
        views = tta_views(x, tta)
        for view in views:
            view = preprocess.finish(view)
            if channels_last:  # 1.7x faster on the 2-core CPU (benchmarks/RESULTS.md, transfer-speed)
                view = view.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                f = model.forward_head(model.forward_features(view), pre_logits=True).float()
            total = f if total is None else total + f
        out.append((total / len(views)).cpu().numpy())
    return np.concatenate(out)


def cached_features(model: nn.Module, preprocess: Preprocess, images: np.ndarray, cfg: Any, device: torch.device,
                    weights_source: str, what: str, precision: str) -> np.ndarray:
    """Features are cached: keyed by model, weights, preprocessing, TTA and a checksum of the images."""
    key = cache_key(model=cfg.model, weights=weights_source, preprocess=preprocess.to_dict(), tta=cfg.tta,
                    precision=precision, images=zlib.crc32(memoryview(np.ascontiguousarray(images)).cast("B")),
                    shape=list(images.shape))
    arrays, _ = cached_arrays(f"features-{cfg.model}", key, lambda: (
        {"features": features(model, preprocess, images, device=device, precision=precision, tta=cfg.tta,
                              channels_last=cfg.channels_last, batch_size=cfg.eval_batch_size, what=what)}, {}))
    return arrays["features"]


def fit_linear(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Multinomial logistic regression (L-BFGS, full batch) on standardised features; the weight
    decay with the best validation accuracy wins. Returns W, b for the raw features."""
    x = torch.from_numpy(train_x).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    vx = (torch.from_numpy(val_x).double() - mean) / std
    y, vy = torch.from_numpy(train_y).long(), torch.from_numpy(val_y).long()
    best: dict[str, Any] = {"val_accuracy": -1.0}
    for wd in WEIGHT_DECAYS:
        head = nn.Linear(x.shape[1], num_classes).double()
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(xs), y, label_smoothing=label_smoothing) + wd * head.weight.pow(2).sum() / 2
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = float((head(vx).argmax(1) == vy).double().mean())
        log.info("  linear head, weight decay %g: validation accuracy %.2f%%", wd, 100 * acc)
        if acc > best["val_accuracy"]:
            best = {"val_accuracy": acc, "weight_decay": wd, "head": head}
    head = best.pop("head")
    # Fold the standardisation into the head, so it applies to the backbone's raw features.
    weight = (head.weight / std[None, :]).float()
    bias = (head.bias - (head.weight * (mean / std)[None, :]).sum(1)).float()
    return weight, bias, best


def check(cfg: Any, model: nn.Module) -> None:
    if not cfg.pretrained:
        raise ConfigError("--strategy linear-probe needs --pretrained true (a frozen random backbone learns nothing)")
    if not hasattr(model, "forward_head") or not isinstance(model.get_classifier(), nn.Linear):
        raise ConfigError(f"--strategy linear-probe fits a linear classifier on a timm model; {cfg.model} with "
                          f"{cfg.model_args or 'default arguments'} has none (for a hidden layer, head_hidden, use "
                          "--strategy frozen)")
