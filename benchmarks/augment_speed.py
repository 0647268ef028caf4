"""How much of a training step data augmentation takes, on real batches.

For each case: the median time of the augmentation of one batch, and of one full training step
(uint8 -> float, augmentation, preprocessing, forward, backward, optimiser step) with and without
augmentation. Writes benchmarks/results/augment-speed.json and the marked block in RESULTS.md.

    python benchmarks/augment_speed.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_recipes import commit, machine, write_block  # noqa: E402

from cnnkit.augment import build_augment  # noqa: E402
from cnnkit.data import load_dataset  # noqa: E402
from cnnkit.models import create_model  # noqa: E402
from cnnkit.training import make_preprocess  # noqa: E402

CIFAR = HERE.parent.parent / "shared" / "datasets" / "cifar10-png.tar.gz"
CASES = [  # dataset, model, batch size, presets
    ("fashion-mnist", "seed-cnn", 64, ["seed", "light", "strong"]),
    ("cifar10", "seed-cnn", 64, ["light", "strong"]),
    ("cifar10", "resnet18", 256, ["light", "strong"]),
]


def median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for dataset, model_name, batch, presets in CASES:
        ds = load_dataset(dataset, CIFAR if dataset == "cifar10" else None)
        train = ds.splits["train"]
        pre = make_preprocess(type("C", (), {"input_size": None})(), train.images[:5000])
        images = torch.from_numpy(train.images[:batch].copy())
        labels = torch.from_numpy(train.labels[:batch].copy())
        model = create_model(model_name, 10, pre.model_channels, pre.input_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(0)

        def step(aug):
            x = pre.to_float(images)
            if aug:
                x = aug(x, g)
            loss = torch.nn.functional.cross_entropy(model(pre.finish(x)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        plain = median_ms(lambda: step(None), 10 if model_name == "resnet18" else 30)
        for preset in presets:
            aug = build_augment(preset)
            aug_ms = median_ms(lambda: aug(pre.to_float(images), g))
            rows.append({"dataset": dataset, "model": model_name, "batch": batch, "preset": preset,
                         "augment_ms": round(aug_ms, 2), "step_ms_without": round(plain, 2),
                         "share_of_step": round(aug_ms / (plain + aug_ms), 3),
                         "images_per_s_without": round(batch / plain * 1000),
                         "images_per_s_with": round(batch / (plain + aug_ms) * 1000)})
            print(rows[-1], flush=True)
    table = ["| dataset | model | batch | preset | augmentation per batch | training step without | share of step | img/s without → with |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['dataset']} | {r['model']} | {r['batch']} | {r['preset']} | {r['augment_ms']:.2f} ms "
                     f"| {r['step_ms_without']:.1f} ms | {100 * r['share_of_step']:.1f}% "
                     f"| {r['images_per_s_without']} → {r['images_per_s_with']} |")
    header = (f"Measured on {machine()}, commit {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              "fp32, medians of 30 batches (10 for resnet18).\nCommand: `python benchmarks/augment_speed.py`\n\n")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "augment-speed.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    write_block("augment-speed", header + "\n".join(table))


if __name__ == "__main__":
    main()
