"""Training-step throughput of fastnet shapes on this machine: precision, memory format, torch.compile.

One SGD-Nesterov step (forward, backward, update) on random data, batch 512, after one warm-up
step (for torch.compile: the first step is timed separately, it is the compile time). Writes
the block `step-speed` of benchmarks/RESULTS.md. malloc `tuned` is what `cnnkit` runs with
(cnnkit.allocator); `--malloc default tuned` measures glibc's defaults first, then the tuning
(it cannot be undone in a process).

    python benchmarks/step_speed.py
    python benchmarks/step_speed.py --nets cifar10-fast --precision bf16 --eager --optimizers sgd muon \
        --batches 1024 2000 --label step-speed-muon
    python benchmarks/step_speed.py --nets cifar10-fast --eager --optimizers muon --batches 1024 2000 \
        --malloc default tuned --label step-speed-malloc
    python benchmarks/step_speed.py --nets fmnist-quick --precision fp32 --isa avx2 --label step-speed-fp32-avx2

`--isa avx2` caps MKL, oneDNN and PyTorch's kernels to AVX2 as `run_recipes.py --isa avx2` does; they
read the cap when torch loads, so the script starts itself again with it set.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cnnkit.allocator import reuse_freed_memory
from cnnkit.models.fastnet import FastNet
from cnnkit.muon import MuonSGD
from run_recipes import measured_header, restart_capped_to_avx2, write_block

CASES = [  # (label, channels, size, widths, precision, channels_last, compile)
    ("cifar10-fast net", 3, 32, (64, 256, 256), "bf16", True, False),
    ("cifar10-fast net", 3, 32, (64, 256, 256), "bf16", False, False),
    ("cifar10-fast net", 3, 32, (64, 256, 256), "fp32", True, False),
    ("cifar10-fast net", 3, 32, (64, 256, 256), "bf16", True, True),
    ("cifar10-quick net", 3, 32, (64, 128, 256), "bf16", True, False),
    ("fmnist-fast net", 1, 28, (64, 128, 256), "bf16", True, False),
    ("fmnist-quick net", 1, 28, (32, 64, 128), "bf16", True, False),
    ("fmnist-quick net", 1, 28, (32, 64, 128), "fp32", True, False),
    ("fmnist-quick net", 1, 28, (32, 64, 128), "bf16", True, True),
    # fp32: what precision "auto" runs on CPUs without native bf16 (most laptops: AVX2 only)
    ("cifar10-fast net", 3, 32, (64, 256, 256), "fp32", False, False),
    ("cifar10-fast net", 3, 32, (64, 256, 256), "fp32", True, True),
    ("cifar10-quick net", 3, 32, (64, 128, 256), "fp32", True, False),
    ("cifar10 narrower net", 3, 32, (48, 96, 192), "fp32", True, False),  # #24: CIFAR-10 in 10 minutes in fp32
    ("cifar10 narrower net", 3, 32, (32, 64, 128), "fp32", True, False),
    ("fmnist-fast net", 1, 28, (64, 128, 256), "fp32", True, False),
    ("fmnist-quick net", 1, 28, (32, 64, 128), "fp32", False, False),
    ("fmnist-quick net", 1, 28, (32, 64, 128), "fp32", True, True),
]


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str) -> None:
    """Forward (bf16 autocast or fp32), cross-entropy, backward, optimiser step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = net(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def make_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    """SGD-Nesterov on every trainable parameter, or MuonSGD (Muon on the convolution filters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "muon":
        filters = [p for p in params if p.ndim == 4]
        rest = [p for p in params if p.ndim != 4]
        return MuonSGD([{"params": filters, "orthogonal": True, "lr": 0.1, "momentum": 0.6}, {"params": rest}],
                       lr=0.01, momentum=0.9, nesterov=True)
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)


def measure(channels: int, size: int, widths: tuple[int, ...], precision: str, channels_last: bool, compile: bool,
            batch: int, steps: int, optimizer: str = "sgd") -> tuple[float, float]:
    """(images per second, seconds of the first step)."""
    torch.manual_seed(0)
    model = FastNet(10, channels, size, widths=widths)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = make_optimizer(model, optimizer)
    net = torch.compile(model) if compile else model
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        train_step(net, opt, x, y, precision)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--optimizers", nargs="+", choices=["sgd", "muon"], default=["sgd"])
    p.add_argument("--nets", help="only the cases whose label contains this, e.g. cifar10-fast")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="only the cases in this precision")
    p.add_argument("--eager", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--malloc", nargs="+", choices=["default", "tuned"], default=["tuned"],
                   help="glibc malloc as it is, and/or as cnnkit tunes it (default: tuned)")
    p.add_argument("--label", default="step-speed", help="the block of RESULTS.md to write")
    p.add_argument("--isa", choices=["avx2"], help="cap the kernels to AVX2, as on a CPU without AVX-512")
    args = p.parse_args()
    if args.isa:
        restart_capped_to_avx2()
    rows = ["| net | input | precision | channels_last | compile | optimizer | malloc | batch | train img/s | first step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for malloc in sorted(set(args.malloc)):  # "default" first: the tuning cannot be undone
        if malloc == "tuned" and not reuse_freed_memory():
            raise SystemExit("malloc tuning is not available here (it needs Linux with glibc)")
        for label, c, size, widths, precision, cl, comp in CASES:
            if (args.nets and args.nets not in label) or (args.precision and precision != args.precision) or (args.eager and comp):
                continue
            for optimizer in args.optimizers:
                for batch in args.batches:
                    rate, first = measure(c, size, widths, precision, cl, comp, batch, args.steps, optimizer)
                    rows.append(f"| {label} {'-'.join(map(str, widths))} | {c}x{size}x{size} | {precision} | {cl} | {comp} "
                                f"| {optimizer} | {malloc} | {batch} | {rate:.0f} | {first:.1f} s |")
                    print(rows[-1], flush=True)
    flags = (f"--batches {' '.join(map(str, args.batches))} --steps {args.steps} --optimizers {' '.join(args.optimizers)}"
             + (f" --nets {args.nets}" if args.nets else "") + (f" --precision {args.precision}" if args.precision else "")
             + (" --eager" if args.eager else "") + (f" --isa {args.isa}" if args.isa else "") + f" --malloc {' '.join(args.malloc)} --label {args.label}")
    block = measured_header("step_speed.py", flags, f"{args.steps} timed steps after one") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
