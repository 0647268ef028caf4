"""Where and how a run computes: the device, the numeric precision, threads and determinism.

Training, evaluation, prediction, the report and the server all ask this module, so that a model
is evaluated as it was trained (bf16 and fp32 logits differ enough to flip borderline images).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterable

import numpy as np
import torch

import cnnkit
from cnnkit.config import Config, fp32_settings, with_fp32_settings
from cnnkit.errors import ConfigError

log = logging.getLogger(__name__)


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) under which it has no bf16 instructions: a CPU
# with AVX-512 capped to AVX2 computes as one without (`benchmarks/run_recipes.py --isa avx2`)
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """bf16 instructions (AVX512-BF16 or AMX) that oneDNN may use: there bf16 autocast runs
    convolutions 1.3-2x faster; without them oneDNN emulates bf16, 15 times slower than fp32
    (step-speed-bf16-avx2)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in _ISAS_WITHOUT_BF16:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: stay with what is known to be fast
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that have it (else fp16) and on CPUs with native bf16; else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def training_precision(asked: str, device: torch.device) -> str:
    """The precision a training run uses, with a word where the choice costs time on this CPU."""
    precision = resolve_precision(asked, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if device.type == "cpu" and not cpu_has_native_bf16():
        if precision == "bf16":
            log.warning("this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated: many times "
                        "slower than fp32 (benchmarks/RESULTS.md, step-speed-bf16-avx2); --precision auto "
                        "chooses fp32 here")
        elif asked == "auto":
            log.info("fp32: this CPU has no native bf16 (AVX512-BF16 or AMX); runs take about 3 times as long as "
                     "on one with it (docs/cpus.md): --time-budget fits a run to your time")
    return precision


def trains_in_fp32_on_cpu(cfg: Config) -> bool:
    """Where a recipe's [fp32] settings apply: `--precision auto` on a CPU without native bf16, or
    `--precision fp32` on any CPU."""
    device = resolve_device(cfg.device)
    return device.type == "cpu" and resolve_precision(cfg.precision, device) == "fp32"


def settings_for_this_cpu(cfg: Config, asked: Iterable[str] = ()) -> Config:
    """A new run's configuration: the recipe's [fp32] settings in place of its own where it trains
    in fp32 on a CPU (except the fields in `asked`, set on the command line), said in the log."""
    if not cfg.fp32 or not trains_in_fp32_on_cpu(cfg):
        return cfg
    chosen = fp32_settings(cfg, asked)
    if chosen:
        log.info("fp32 on this CPU: %s's fp32 settings, fewer FLOPs for about the same accuracy (docs/cpus.md): %s",
                 cfg.recipe or "the recipe", ", ".join(f"{key} {value}" for key, value in chosen.items()))
    return with_fp32_settings(cfg, asked)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_threads_and_determinism(threads: int | None, deterministic: bool, device: torch.device) -> None:
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS needs this set before its first use to be deterministic (ignored on the CPU).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        # cuDNN times its algorithms per input shape once; a training run repeats a few shapes
        torch.backends.cudnn.benchmark = True


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    import safetensors

    return {"cnnkit": cnnkit.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}
