"""Evaluation batch size: time and peak memory of a run's forward passes after training (validation,
the test, the report) at several `eval_batch_size`s, each in a process of its own so that its peak
resident memory is its own.

By default EfficientNet-Lite0 (ImageNet weights) at 160 px from 32-px images, as cifar10-transfer
evaluates CIFAR-10: `--images` random images through `cnnkit.inference.predict_logits` twice; the
first pass includes oneDNN's set-up (and torch.compile's compile with `--engines compile`), the
second is the steady state. glibc's malloc is tuned as `cnnkit` tunes it. Writes the block
`eval-batch` of benchmarks/RESULTS.md (or --label).

    python benchmarks/eval_batch.py --isa avx2 --engines torch compile --label eval-batch-avx2
    python benchmarks/eval_batch.py --precision bf16 --label eval-batch-bf16   # a CPU with native bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from run_recipes import measured_header, restart_capped_to_avx2, write_block


def one_case(model_name: str, size: int, data_size: int, images: int, batch: int, engine: str,
             precision: str) -> dict:
    """Time the passes in this process; its peak RSS is the case's."""
    import numpy as np
    import timm
    import torch

    from cnnkit.allocator import reuse_freed_memory
    from cnnkit.inference import predict_logits
    from cnnkit.models.pretrained import load_pretrained, preprocessing
    from cnnkit.preprocess import Preprocess

    reuse_freed_memory()
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    load_pretrained(model, model_name)
    model.reset_classifier(10)  # a CIFAR-10 run's head
    model.to(memory_format=torch.channels_last)
    w = preprocessing(model_name)
    pre = Preprocess(data_size=data_size, data_channels=3, input_size=size, model_channels=3,
                     mean=tuple(w["mean"]), std=tuple(w["std"]), interpolation=str(w["interpolation"]))
    x = np.random.default_rng(0).integers(0, 256, (images, 3, data_size, data_size), dtype=np.uint8)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        predict_logits(model, pre, x, batch_size=batch, channels_last=True, engine=engine, precision=precision)
        times.append(time.perf_counter() - t0)
    return {"first_s": times[0], "second_s": times[1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=160, help="the model's input size")
    p.add_argument("--data-size", type=int, default=32, help="the images' own size, resized on the way in")
    p.add_argument("--images", type=int, default=2000, help="images per pass (cifar10-transfer validates 2,000)")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 128, 64, 32])
    p.add_argument("--engines", nargs="+", default=["torch"], choices=["torch", "compile"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--isa", choices=["avx2"], help="cap PyTorch's kernels to AVX2")
    p.add_argument("--label", default="eval-batch")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, as JSON
    args = p.parse_args()
    if args.one:
        engine, batch = args.one.split(":")
        print(json.dumps(one_case(args.model, args.size, args.data_size, args.images, int(batch), engine,
                                  args.precision)))
        return
    if args.isa:
        restart_capped_to_avx2()
    rows = ["| model | input | engine | precision | eval batch | first pass | second pass | images/s | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|"]
    for engine in args.engines:
        for batch in args.batches:
            env = dict(os.environ)
            if engine == "compile":  # a first run's compile, not one cached by an earlier case
                env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-bench-")
            out = subprocess.run([sys.executable, *sys.argv, "--one", f"{engine}:{batch}"], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            rows.append(f"| {args.model} | {args.data_size} -> {args.size} px | {engine} | {args.precision} | {batch} | "
                        f"{r['first_s']:.1f} s | {r['second_s']:.1f} s | {args.images / r['second_s']:.0f} | "
                        f"{r['peak_rss_mb']} MB |")
            print(rows[-1], flush=True)
    block = measured_header("eval_batch.py", " ".join(sys.argv[1:]),
                            f"{args.images} images a pass, each case in its own process") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
