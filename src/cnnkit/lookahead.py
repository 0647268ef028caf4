"""Lookahead of weights as airbench uses it (Zhang et al. 2019, with airbench's schedule).

Every `every` steps the slow copy moves toward the trained (fast) weights, slow += (1 - decay) *
(fast - slow), and the fast weights restart from it. `decay` grows as 0.95**5 * progress**3: no
averaging early on, when weights move fast, and heavy averaging at the end, where it smooths the
noise of the last steps. At the last step the model takes the slow weights. BatchNorm running
statistics are averaged too.
"""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int = 5):
        self.every = every
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay(self, step: int, total_steps: int) -> float:
        return 0.95**self.every * (step / max(total_steps, 1)) ** 3

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Call after optimiser step number `step` (1-based)."""
        if step >= total_steps:
            self._sync(model, 1.0)  # the end: the model becomes the slow weights
        elif step % self.every == 0:
            self._sync(model, self.decay(step, total_steps))

    def finish(self, model: nn.Module) -> None:
        """The run ends before its planned last step: take the slow weights now."""
        self._sync(model, 1.0)

    @torch.no_grad()
    def _sync(self, model: nn.Module, decay: float) -> None:
        current = model.state_dict()
        for name, slow in self.slow.items():
            slow.lerp_(current[name], 1 - decay)
            current[name].copy_(slow)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"lookahead.{k}": v for k, v in self.slow.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in self.slow:
            self.slow[k].copy_(tensors[f"lookahead.{k}"])
