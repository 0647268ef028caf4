"""Training-step throughput of fastnet shapes on this machine: precision, memory format, torch.compile.

One SGD-Nesterov step (forward, backward, update) on random data, batch 512, after one warm-up
step (for torch.compile: the first step is timed separately, it is the compile time). Writes
the block `step-speed` of benchmarks/RESULTS.md.

    python benchmarks/step_speed.py
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
from torch import nn

from cnnkit.models.fastnet import FastNet
from run_recipes import commit, machine, write_block

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
]


def train_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str) -> None:
    """Forward (bf16 autocast or fp32), cross-entropy, backward, optimiser step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = net(x)
    loss = nn.functional.cross_entropy(out.float(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def measure(channels: int, size: int, widths: tuple[int, ...], precision: str, channels_last: bool, compile: bool,
            batch: int, steps: int) -> tuple[float, float]:
    """(images per second, seconds of the first step)."""
    torch.manual_seed(0)
    model = FastNet(10, channels, size, widths=widths)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
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
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    rows = ["| net | input | precision | channels_last | compile | train img/s | first step |", "|---|---|---|---|---|---|---|"]
    for label, c, size, widths, precision, cl, comp in CASES:
        rate, first = measure(c, size, widths, precision, cl, comp, args.batch, args.steps)
        rows.append(f"| {label} {'-'.join(map(str, widths))} | {c}x{size}x{size} | {precision} | {cl} | {comp} "
                    f"| {rate:.0f} | {first:.1f} s |")
        print(rows[-1], flush=True)
    block = (f"Measured {date.today()} on {machine()}, commit {commit()}, torch {torch.__version__}, "
             f"Python {platform.python_version()}, {torch.get_num_threads()} threads.\n"
             f"Command: `python benchmarks/step_speed.py` (batch {args.batch}, {args.steps} timed steps after one)\n\n"
             + "\n".join(rows))
    write_block("step-speed", block)
    print(block)


if __name__ == "__main__":
    main()
