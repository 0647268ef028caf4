"""A fixed torch module's forward pass compiled by torch.compile (Inductor) with its weights frozen
into the graph, for inference on the CPU.

On a CPU without bf16 a linear probe's cost is the frozen backbone's fp32 forward passes. Frozen,
Inductor folds each BatchNorm into its convolution and fuses the activations into them; eager
PyTorch runs them as separate passes over memory. cifar10-probe's features (Lite0 at 192 px, 32-px
images resized on the way in, batch 64) ran at 169.5 images/s against eager channels-last's 134.9
(1.26x) on the 2-core Zen 4 capped to AVX2, after 20 s of compiling (benchmarks/RESULTS.md
`compiled-features`), and the whole cifar10-probe run took 8.83 minutes against 10.10
(`zen4-fp32-cifar10-probe-compile`). Without frozen weights torch.compile gained little, and
`options={"freezing": True}` did not freeze as the global setting does (a one-off check), so that
setting is patched around the calls. The compile is paid for each model and input shape (Inductor
caches it on disk for the next run), so it pays on thousands of images, not on a photo folder of
hundreds: a switch, `--inference-engine compile`.

What is cnnkit's own here is only the glue, as in cnnkit.onnx_forward: one compiled module is kept,
keyed by the module (its type and parameters) and a digest of its weights (frozen weights are constants
of the code: a new head or a loaded checkpoint compiles again), and a shorter batch is padded to the first batch's size, so that one
shape compiles (a last, smaller batch, or `tta_below`'s unsure images, would each compile again);
a batch under half that size runs eagerly instead. A module that does not compile (no C++ compiler,
an unsupported operator) runs eagerly, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnnkit.onnx_forward import weights_digest

log = logging.getLogger(__name__)

_KEPT: dict[str, dict[str, Any]] = {}  # "last": the one compiled module, {"key", "fn", "batch", "failed"}


def compiled_forward(module: nn.Module, fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function like `module`'s forward that runs it compiled with frozen weights. `module` must be
    in eval mode, called under torch.no_grad, and must not change while the function is used. Where it
    does not compile, and for batches under half the first one's size, `fallback` runs (default: the
    module eagerly; an int8 module's reference form would be slower than its fp32 original)."""
    eager = fallback or module
    key = (*_identity(module), weights_digest(module))
    kept = _KEPT.get("last")
    if kept is None or kept["key"] != key:
        if kept is not None:  # the last module's code would stay in dynamo's cache, which holds 8 per function
            torch._dynamo.reset()
        # a new entry, not the old one changed: a function made for the last module keeps running that one
        kept = _KEPT["last"] = {"key": key, "fn": torch.compile(module, dynamic=False), "batch": None, "failed": False}

    def run(x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        kept["batch"] = kept["batch"] or n
        if kept["failed"] or n > kept["batch"] or 2 * n < kept["batch"]:
            return eager(x)
        try:
            with _quiet_compiler(), torch._inductor.config.patch(freezing=True):
                return kept["fn"](_padded(x, kept["batch"]))[:n]
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager torch still works
            log.warning("torch.compile: %s did not compile (%s); it runs eagerly", type(module).__name__,
                        str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
            kept["failed"] = True
            return eager(x)

    return run


def _identity(module: nn.Module) -> tuple[str, int]:
    """Which module a compile holds: its type and its parameters themselves (the first one's object).
    A module with equal weights (the same run's model loaded again by `cnnkit evaluate` in one process)
    must not reuse a compile that holds another module, whose mode may have changed since (a module
    back in training mode recompiles with batch statistics); but a wrapper made anew around the same
    model for each call (probe.PooledFeatures: a budgeted probe's chunks) must, or each call would
    compile again. The kept compile holds its module, so the parameter's id cannot be reused."""
    first = next(module.parameters(), None)
    return type(module).__qualname__, id(first) if first is not None else id(module)


def _padded(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`x` with zero images after it up to `batch`, in its own memory format (dynamo would compile
    again for other strides)."""
    if len(x) == batch:
        return x
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = x.new_zeros((batch, *x.shape[1:]))
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    out[: len(x)] = x
    return out


class _quiet_compiler:
    """The C++ extension loader warns on every compile of a CUDA build that finds no CUDA runtime
    (this project's torch on a CPU): a line a user can do nothing about."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("torch.utils.cpp_extension")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
