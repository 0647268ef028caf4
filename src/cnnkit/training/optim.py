"""The optimiser a recipe names, over parameter groups that follow the usual rules: weights decay,
biases and norms do not (and may learn faster), Muon takes the convolution filters, fine-tuning
gives each layer group its own rate, and `frozen_after` parameters stop training on time."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from cnnkit.config import Config
from cnnkit.errors import ConfigError
from cnnkit.finetune import layer_ids, lr_scales
from cnnkit.muon import MuonSGD
from cnnkit.runtime import resolve_precision


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
        scales = lr_scales(*layer_ids(model, coarse=False), cfg.layer_lr_decay)
    muon = cfg.optimizer == "muon"
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.bias_lr_scale, scales, cfg.muon_lr if muon else None,
                          bias_decay=cfg.bias_decay, frozen_after=cfg.frozen_after)
    if muon:
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
