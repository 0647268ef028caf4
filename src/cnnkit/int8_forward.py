"""A fixed torch module's forward pass in int8, compiled, for inference on a CPU without bf16.

On such a CPU a linear probe's cost is the frozen backbone's fp32 forward passes (cifar10-probe:
Lite0 over 60,000 images at 192 px, most of its run). Static int8 quantization (weights per channel,
activations per tensor, both calibrated) runs the convolutions in oneDNN's int8 kernels, and Inductor
fuses the rest around them. Measured on the 2-core Zen 4 capped to AVX2 (benchmarks/RESULTS.md
`int8-features`): Lite0's features at 192 px ran at 238 images/s against 156 in eager fp32 and 148
compiled; cifar10-probe took 0.82 of its time and read 0.25 points less on validation (92.05 against
92.30%), the same on the test (91.19 against 91.21%; `zen4-fp32-cifar10-probe-int8`), so it is a switch.

Two choices are cnnkit's own, both measured there on Lite0's pooled features (cosine similarity to
the fp32 features, 512 CIFAR-10 images):
- `reduce_range`: activations in 7 bits. A CPU without VNNI (AVX2 only, like the project's Zen 3)
  multiplies uint8 by int8 with an instruction whose pairwise sums saturate at 16 bits; with 8-bit
  activations the features' similarity fell to 0.80, with 7 bits 0.95.
- The first three convolutions of each backbone (the stem and the first block of an EfficientNet) and
  its last one (the 1x1 convolution before the pooling) stay in fp32, as do linear layers (a probe's
  fitted head): 0.99 then, and the stem alone in fp32 0.98. The early layers see raw pixels at full
  resolution, where an activation's per-tensor scale fits their range worst.

Each module is checked on the batch it was calibrated on: where the int8 outputs' mean cosine
similarity to the fp32 ones is below CHECK_SIMILARITY, or where torchao is not installed or the module
does not export, the module runs compiled in fp32 (cnnkit.compiled_forward) with one warning.

What is cnnkit's own is the glue: torchao's PT2E flow (torch.export, X86InductorQuantizer,
prepare/convert) does the quantization, and cnnkit.compiled_forward the compiling. The calibration is
the first batch of a module's first call (a probe's first training images; its validation and test
features go through the same quantized module). The exported graph has that batch's shape: a shorter
batch is padded to it, and one under half its size or longer runs in fp32 (as compiled_forward does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnnkit.compiled_forward import compiled_forward
from cnnkit.onnx_forward import weights_digest

log = logging.getLogger(__name__)

CHECK_SIMILARITY = 0.98  # the int8 outputs' mean cosine similarity to fp32's below which fp32 runs instead
FLOAT_FIRST, FLOAT_LAST = 3, 1  # convolutions of each backbone kept in fp32, at its start and at its end

_KEPT: dict[str, dict[str, Any]] = {}  # "last": the one quantized module, {"key", "module" (None: fp32), "built"}


def int8_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function like `module`'s forward that runs it in int8, compiled, once it has calibrated on its
    first batch. `module` must be in eval mode, called under torch.no_grad, and must not change while
    the function is used."""
    # Keyed by the weights alone (and the module's class): a probe wraps its backbone anew for its training,
    # validation and test features, which must all go through one quantization, calibrated once. The int8
    # module is a converted copy of the module in eval mode, so a later change of mode does not reach it.
    key = weights_digest(module)
    kept = _KEPT.get("last")
    if kept is None or kept["key"] != key:  # a new entry: a function made for the last module keeps its own
        kept = _KEPT["last"] = {"key": key, "module": None, "built": False}
    compiled: list[Callable[[torch.Tensor], torch.Tensor]] = []  # made at the first batch, once a call (not a batch)

    def run(x: torch.Tensor) -> torch.Tensor:
        if not kept["built"]:
            kept["module"] = quantized(module, x)
            kept["built"] = True
        if not compiled:
            compiled.append(compiled_forward(module) if kept["module"] is None
                            else compiled_forward(kept["module"], fallback=module))
        return compiled[0](x)

    return run


def quantized(module: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """`module` quantized to int8, calibrated on `x`, and checked on it; None where it cannot be (a
    warning says why)."""
    try:
        pt2e, x86 = _torchao()
    except Exception as e:  # noqa: BLE001 - an ImportError, or a torchao that does not fit this torch
        return _warned(module, f"torchao is not usable ({type(e).__name__}: {e}); pip install 'cnnkit[int8]'")
    try:
        prepared = pt2e.prepare_pt2e(torch.export.export(module, (x,)).module(), _quantizer(module, x86))
        reference = prepared(x).float()  # the observers see the batch; the outputs are fp32's
        converted = pt2e.convert_pt2e(prepared)
        similarity = _similarity(compiled_forward(converted, fallback=module)(x).float(), reference)
    except Exception as e:  # noqa: BLE001 - export and quantization fail in many types
        return _warned(module, f"it could not be quantized ({type(e).__name__}: {str(e).strip()[:200]})")
    if similarity < CHECK_SIMILARITY:
        return _warned(module, f"its int8 outputs differ from fp32's (mean cosine similarity {similarity:.3f} "
                               f"< {CHECK_SIMILARITY})")
    log.info("int8: %s quantized, calibrated on %d images (outputs' cosine similarity to fp32 %.4f)",
             type(module).__name__, len(x), similarity)
    return converted


def float_convolutions(module: nn.Module) -> list[str]:
    """The names of the convolutions kept in fp32: the first FLOAT_FIRST and last FLOAT_LAST of each
    timm backbone in `module` (of backbones side by side, each), or of `module` itself."""
    timm_like = [name for name, m in module.named_modules() if hasattr(m, "pretrained_cfg")]
    # the innermost: cnnkit's wrappers (models.concat, models.block_pooled) carry their backbone's cfg too
    backbones = [n for n in timm_like if not any(o.startswith(f"{n}.") or (not n and o) for o in timm_like)] or [""]
    names = []
    for backbone in backbones:
        prefix = f"{backbone}." if backbone else ""
        sub = module.get_submodule(backbone) if backbone else module
        convs = [prefix + name for name, m in sub.named_modules() if isinstance(m, nn.Conv2d)]
        names += convs[:FLOAT_FIRST] + convs[-FLOAT_LAST:] if len(convs) > FLOAT_FIRST + FLOAT_LAST else convs
    return names


def _torchao() -> tuple[Any, Any]:
    """torchao's PT2E flow and its x86 quantizer. Importing it makes torch log a deprecation warning
    about torchao's own code, a line a user can do nothing about: that logger is quiet meanwhile."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.quantize_pt2e as pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    finally:
        pytree_log.setLevel(level)
    return pt2e, x86


def _quantizer(module: nn.Module, x86: Any) -> Any:
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(reduce_range=True))
    quantizer.set_module_type_qconfig(nn.Linear, None)
    for name in float_convolutions(module):
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean())


def _warned(module: nn.Module, why: str) -> None:
    log.warning("int8: %s runs compiled in fp32: %s", type(module).__name__, why)
    return None
