"""Validation during training: the whole validation split, shared out over the ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cnnkit import distributed
from cnnkit.evaluate import classification_metrics
from cnnkit.inference import predict_logits

if TYPE_CHECKING:
    from cnnkit.training.build import Setup


def validate(setup: Setup, model: nn.Module) -> dict[str, Any]:
    """Metrics over the validation split, without test-time augmentation (it would multiply the
    cost of every epoch); in distributed runs each rank takes a share and all ranks get the same
    numbers (so they agree on the best epoch and on early stopping)."""
    info, split = setup.dist, setup.splits.val
    idx = np.arange(len(split))[info.rank::info.world]
    logits = predict_logits(model, setup.preprocess, split.images[idx], device=setup.device,
                            **setup.inference.in_torch().kwargs())
    order = np.concatenate([np.arange(len(split))[r::info.world] for r in range(info.world)])
    return classification_metrics(torch.cat(distributed.gather_cat(logits, info)), split.labels[order],
                                  setup.ds.classes)
