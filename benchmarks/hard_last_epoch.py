"""Prototype for issue #24 (not a cnnkit feature yet): the last epoch trains on the hardest fraction of
the training images, ranked by their losses in the epoch before it, against a random fraction of the
same size and the full epoch. It measures whether data selection buys the main job's time back
before the loop gets a field for it.

A hook outside cnnkit: it shortens the schedule to (E-1) epochs plus the fraction's batches (the loop
already ends an epoch at `total_steps`, as for a time budget's partial epoch), records per-image
losses from the training forward of epoch E-1 by wrapping the run's step, and orders epoch E's
images hardest-first (shuffled among themselves). It ignores resume and torchrun, so it is for
measuring only. Validation accuracy only (`--val-fraction 0.1`); the test split is not read.

    python benchmarks/hard_last_epoch.py full 0      # the recipe's [fp32] settings as they are
    python benchmarks/hard_last_epoch.py hard 0      # last epoch on the hardest 70%
    python benchmarks/hard_last_epoch.py random 0    # last epoch on a random 70%

(with MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU)
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from cnnkit import allocator
from cnnkit.config import apply_overrides, load_recipe, with_fp32_settings
from cnnkit.training import train
from cnnkit.training.loop import Hook, Loop


class LastEpochSubset(Hook):
    def __init__(self, fraction: float, hard: bool):
        self.fraction, self.hard = fraction, hard

    def on_run_start(self, loop: Loop) -> None:
        n, images, batch = len(loop.loader), len(loop.loader.labels), loop.loader.batch_size
        self.last, self.kept = loop.epochs, math.ceil(self.fraction * images / batch) * batch
        loop.set_length((self.last - 1) * n + math.ceil(self.fraction * images / batch))
        self.losses = torch.zeros(images)
        step, hook = loop.setup.step, self

        class Recording:  # the run's step, recording each image's loss in the epoch before the last
            def __getattr__(self, name):
                return getattr(step, name)

            def __call__(self, images, labels, rng, *, ids=None, epoch=1):
                loss, logits = step(images, labels, rng, ids=ids, epoch=epoch)
                if epoch == hook.last - 1:
                    per_image = F.cross_entropy(logits.detach().float(), labels, reduction="none")
                    hook.losses[ids.cpu()] = per_image.cpu()
                return loss, logits

        loop.setup.step = Recording()

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if epoch != self.last:
            return
        g = torch.Generator().manual_seed(1000 + epoch)
        ranked = torch.argsort(self.losses, descending=True) if self.hard else torch.randperm(len(self.losses),
                                                                                            generator=g)
        first, rest = ranked[: self.kept], ranked[self.kept:]
        order = torch.cat([first[torch.randperm(len(first), generator=g)], rest])
        loop.loader.order = lambda e, _order=order: _order


def main() -> None:
    allocator.reuse_freed_memory()
    variant, seed = sys.argv[1], int(sys.argv[2])
    name = f"hard-last-{variant}-s{seed}"
    asked = {"val_fraction": 0.1, "report": False, "seed": seed, "output": "benchmarks/runs", "name": name}
    cfg = with_fp32_settings(apply_overrides(load_recipe("fmnist-quick"), asked), asked)
    hooks = [] if variant == "full" else [LastEpochSubset(0.7, hard=variant == "hard")]
    t0 = time.perf_counter()
    result = train(cfg, hooks=hooks)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    print(variant, seed, f"{time.perf_counter() - t0:.0f} s", "validation by epoch",
          [round(100 * r["val_accuracy"], 2) for r in rows], "epoch s", [r["epoch_time_s"] for r in rows],
          "steps", result.summary["steps_run"], flush=True)


if __name__ == "__main__":
    main()
