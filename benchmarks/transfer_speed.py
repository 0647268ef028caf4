"""Throughput of a pretrained backbone on this machine: fine-tuning steps and feature extraction.

EfficientNet-Lite0 (ImageNet architecture, random weights: speed does not depend on them) with a
10-class head, at several input sizes, precisions and memory formats, training the head only,
the top stages, or everything (cnnkit's finetune/gradual phases); and forward-only feature
extraction, as the linear probe does it. Writes the block `transfer-speed` of RESULTS.md.

    python benchmarks/transfer_speed.py
    python benchmarks/transfer_speed.py --set transfer-speed-top --batches 64 128
    python benchmarks/transfer_speed.py --set transfer-speed-cached --isa avx2 --steps 12

The `transfer-speed-cached` set times `cache_frozen` (training/frozen_cache.py) against its base:
`train` the top groups through the whole network, `bottom` the frozen groups' forward (what
keeping their outputs costs, once per image and orientation), `train-kept` the top groups from
kept outputs. `--isa avx2` caps MKL, oneDNN and ATen to AVX2, as on a CPU without AVX-512.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from cnnkit.allocator import reuse_freed_memory
from cnnkit.finetune import Unfreezer
from cnnkit.models import create_model
from cnnkit.training.frozen_cache import FrozenSplit, eval_mode
from run_recipes import measured_header, restart_capped_to_avx2, write_block
from step_speed import train_step

MODEL = "tf_efficientnet_lite0"
# (what, input size, precision, channels_last, groups training: 0 = forward only, 9 = all of Lite0's, input channels)
CASES = {
    "transfer-speed": [
        ("train", 128, "fp32", False, 9, 3), ("train", 128, "fp32", True, 9, 3), ("train", 128, "bf16", False, 9, 3),
        ("train", 128, "bf16", True, 9, 3), ("train", 128, "fp32", True, 5, 3), ("train", 128, "fp32", True, 3, 3),
        ("train", 128, "fp32", True, 1, 3), ("train", 96, "fp32", True, 9, 3), ("train", 160, "fp32", True, 9, 3),
        ("features", 128, "fp32", True, 0, 3), ("features", 128, "bf16", True, 0, 3), ("features", 160, "fp32", True, 0, 3),
        ("features", 224, "fp32", True, 0, 3), ("features", 32, "fp32", True, 0, 3),
    ],
    # grey images: repeated to RGB (3 input channels) or through a summed first convolution (1)
    "transfer-speed-grey": [("train", 64, "bf16", True, 9, 3), ("train", 64, "bf16", True, 9, 1),
                            ("train", 96, "bf16", True, 9, 3), ("train", 96, "bf16", True, 9, 1),
                            ("features", 160, "bf16", True, 0, 3), ("features", 192, "bf16", True, 0, 3)],
    # fine-tuning with the lowest groups frozen (--keep-frozen 4 or 5), at and above 128 px
    "transfer-speed-top": [("train", 128, "fp32", True, 5, 3), ("train", 128, "bf16", True, 5, 3),
                           ("train", 128, "fp32", True, 4, 3), ("train", 144, "fp32", True, 5, 3),
                           ("train", 160, "fp32", True, 5, 3), ("train", 160, "fp32", True, 4, 3)],
    # cache_frozen at cifar10-transfer's 160 px, keep_frozen 5 (the top 4 of 9 groups train)
    "transfer-speed-cached": [("train", 160, "fp32", True, 4, 3), ("bottom", 160, "fp32", True, 4, 3),
                              ("train-kept", 160, "fp32", True, 4, 3)],
}


def measure(what: str, size: int, precision: str, channels_last: bool, groups: int, channels: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(MODEL, 10, channels, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    if what in ("bottom", "train-kept"):
        step = kept_step(model, x, y, groups, what)
    elif groups == 0:
        model.eval()

        def step() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model.forward_head(model.forward_features(x), pre_logits=True)
    else:
        unfreezer = Unfreezer(model, "gradual", head_steps=1, unfreeze_steps=1)
        unfreezer.update(groups - 1)  # step k of gradual: k + 1 groups train
        model.train()
        unfreezer.frozen_norms_to_eval()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

        def step() -> None:
            train_step(model, opt, x, y, precision)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def kept_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, groups: int, what: str) -> Callable[[], None]:
    """cache_frozen's two parts, cut where its step cuts: the frozen bottom's forward, or a training
    step of the top `groups` from the bottom's output (kept in bf16, as the cache keeps it)."""
    unfreezer = Unfreezer(model, "finetune", head_steps=0, unfreeze_steps=1, keep_frozen=9 - groups)
    unfreezer.update(0)
    split = FrozenSplit(model, 9 - groups, unfreezer)
    with torch.no_grad(), eval_mode(split.bottom):
        kept = split.bottom(x).to(torch.bfloat16)
    if what == "bottom":
        def bottom() -> None:
            with torch.no_grad(), eval_mode(split.bottom):
                split.bottom(x)
        return bottom
    model.train()
    unfreezer.frozen_norms_to_eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def train_kept() -> None:
        h = kept.float().contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(split.top(h), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return train_kept


def main() -> None:
    reuse_freed_memory()  # as `cnnkit train` runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--set", choices=list(CASES), default="transfer-speed", help="which cases (and RESULTS.md block)")
    p.add_argument("--isa", choices=["avx2"], help="cap the kernels to AVX2, as on a CPU without AVX-512")
    args = p.parse_args()
    if args.isa:
        restart_capped_to_avx2()
    rows = ["| work | input | precision | channels_last | layer groups training | batch | img/s |", "|---|---|---|---|---|---|---|"]
    for what, size, precision, cl, groups, channels in CASES[args.set]:
        for batch in args.batches:
            rate = measure(what, size, precision, cl, groups, channels, batch, args.steps)
            trains = "-" if groups == 0 else ("head only" if groups == 1 else ("all 9" if groups == 9 else f"top {groups} of 9"))
            rows.append(f"| {what} | {channels}x{size}x{size} | {precision} | {cl} | {trains} | {batch} | {rate:.0f} |")
            print(rows[-1], flush=True)
    block = measured_header("transfer_speed.py", f"--set {args.set} --batches {' '.join(map(str, args.batches))} --steps {args.steps}"
                            + (f" --isa {args.isa}" if args.isa else ""),
                            f"{MODEL}, {args.steps} timed steps after one; train = forward, backward and SGD step"
                            ) + "\n".join(rows)
    write_block(args.set, block)
    print(block)


if __name__ == "__main__":
    main()
