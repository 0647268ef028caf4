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
    numbers (so they agree on the best epoch and on early stopping). With `tta_below`, also the
    share of the images whose plain view is less sure than it (`unsure`): those the test gives its
    extra views, which a time budget plans for."""
    info, split = setup.dist, setup.splits.val
    idx = np.arange(len(split))[info.rank::info.world]
    logits = predict_logits(model, setup.preprocess, split.images[idx], device=setup.device,
                            **setup.inference.in_torch().kwargs())
    order = np.concatenate([np.arange(len(split))[r::info.world] for r in range(info.world)])
    logits = torch.cat(distributed.gather_cat(logits, info))
    metrics = classification_metrics(logits, split.labels[order], setup.ds.classes)
    below = setup.inference.tta_below
    if below is not None and len(logits):
        metrics["unsure"] = float((logits.softmax(1).amax(1) < below).double().mean())
    return metrics
