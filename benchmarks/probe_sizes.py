"""The photo default's probe at other input sizes: each backbone's k-fold cross-validated accuracy on
a folder's training images (plain and mirrored rows, as the photos recipe scores its candidates),
over several fold seeds. The test split is not read. #22 asks whether the input size is worth
choosing by cross-validation, as the backbone is. `--pooled-blocks 0 3` also scores each candidate with
its last blocks' pooled outputs joined to its features (models.block_pooled); `--recipe cifar10-probe
--max-train-samples 15000` does the same on a subset of a recipe's own dataset (mirrored rows as the
recipe's `probe_flip` says). `--head-power 1 0.5` scores each candidate on its rows as they are and
power-normalised (the model argument head_power, models.signed_power). `--tta-below none 0.9 0` scores
the held-out images on both views' mean, on it only where their plain view's top probability is below 0.9
(as `--tta-below 0.9` tests), and on their plain views alone. `--lbfgs-tolerance 1e-7 1e-5 1e-4` scores each
candidate with its heads' L-BFGS fits ending at those gradients (cnnkit.probe.LBFGS_TOLERANCE) and shows the
folds' seconds (all fold seeds together). A candidate may be backbones side
by side, `tf_efficientnet_lite0@224+tf_efficientnet_lite2@260`: their rows joined, as the photo default's
pair is scored.

    python benchmarks/probe_sizes.py --data-dir /tmp/data/flowers12 \\
        tf_efficientnet_lite0@224 tf_efficientnet_lite0@192 tf_efficientnet_lite2@260 tf_efficientnet_lite2@224

Images are decoded once at `--image-size` (the photos recipe's 260) and each candidate resizes them
to its own input, as a run does. Writes the block `probe-sizes` of benchmarks/RESULTS.md (or --label).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from run_recipes import measured_header, restart_capped_to_avx2, write_block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", help="BACKBONE@SIZE, e.g. tf_efficientnet_lite0@192")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--recipe", default="photos", help="whose dataset, decay path and views")
    p.add_argument("--image-size", type=int, help="the size images are decoded at (photos: 260)")
    p.add_argument("--max-train-samples", type=int, help="a stratified subset of the training images")
    p.add_argument("--pooled-blocks", type=int, nargs="+", default=[0],
                   help="score each candidate with this many of its last blocks' pooled outputs joined (0: none)")
    p.add_argument("--head-power", type=float, nargs="+", default=[1.0],
                   help="score each candidate's rows to these powers (signed; 1: as they are)")
    p.add_argument("--tta-below", type=_below, nargs="+", default=[None],
                   help="judge held-out images on both views' mean where their plain view's top probability is "
                        "below this (none: every image; 0: none); with mirrored rows only")
    p.add_argument("--lbfgs-tolerance", type=float, nargs="+", default=[None],
                   help="score each candidate with its heads' L-BFGS ending at these gradients, timing the folds "
                        "(default: cnnkit.probe.LBFGS_TOLERANCE, untimed)")
    p.add_argument("--fold-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--isa", choices=["avx2"], help="cap PyTorch's kernels to AVX2")
    p.add_argument("--label", default="probe-sizes")
    args = p.parse_args()
    if args.isa:
        restart_capped_to_avx2()
    from cnnkit import probe
    from cnnkit.allocator import reuse_freed_memory
    from cnnkit.config import load_recipe
    from cnnkit.models.signed_power import SignedPower
    from cnnkit.runs import run_splits
    from cnnkit.training.choose import Backbones, candidate_features

    reuse_freed_memory()
    default_tolerance = probe.LBFGS_TOLERANCE
    recipe = load_recipe(args.recipe)
    cfg = replace(recipe, data_dir=args.data_dir, precision="fp32", max_train_samples=args.max_train_samples,
                  image_size=args.image_size or recipe.image_size)
    _, splits = run_splits(cfg.to_dict())
    labels = np.concatenate([splits.train.labels, splits.val.labels])
    folds = cfg.cv_folds
    powers, below, tolerances = args.head_power != [1.0], args.tta_below != [None], args.lbfgs_tolerance != [None]
    rows = [f"| backbone | input | pooled blocks |{' head power |' if powers else ''}{' mirrored view below |' if below else ''}"
            f"{' L-BFGS tolerance |' if tolerances else ''}"
            f" {folds}-fold accuracy, fold seeds {', '.join(map(str, args.fold_seeds))} | mean |"
            f" features{' (plain and mirrored)' if cfg.probe_flip else ''} |{' folds |' if tolerances else ''}",
            "|---|---|---|---|---|---|" + ("---|" if powers else "") + ("---|" if below else "")
            + ("---|---|" if tolerances else "")]
    for spec, blocks in ((spec, b) for spec in args.candidates for b in args.pooled_blocks):
        t0 = time.perf_counter()
        model_args = {**cfg.model_args, "pooled_blocks": blocks} if blocks else cfg.model_args
        members = [(m.split("@")[0], int(m.split("@")[1])) for m in spec.split("+")]
        parts = [candidate_features(replace(cfg, model=name, input_size=size, model_args=model_args, probe_blocks=0),
                                    splits, Backbones(torch.device("cpu")), "fp32")[0] for name, size in members]
        plain = np.concatenate([p for p, _ in parts], 1)
        flipped = None if parts[0][1] is None else np.concatenate([f for _, f in parts], 1)
        seconds = time.perf_counter() - t0
        for power, tta_below, tolerance in ((w, b, t) for w in args.head_power for b in args.tta_below
                                            for t in args.lbfgs_tolerance):
            p, f = probe.powered((plain, flipped), SignedPower(power) if power != 1 else None)
            probe.LBFGS_TOLERANCE = tolerance if tolerance is not None else default_tolerance
            t_folds = time.perf_counter()
            best = [max(np.mean(a) for a in probe.fold_accuracies(p, f, labels, folds, seed, cfg.label_smoothing,
                                                                  probe.WEIGHT_DECAYS, tta_below=tta_below).values())
                    for seed in args.fold_seeds]
            folds_s = time.perf_counter() - t_folds
            name = "+".join(n for n, _ in members)
            size = " + ".join(str(s) for _, s in members)
            rows.append(f"| {name} | {size} px | {blocks} |{f' {power:g} |' if powers else ''}"
                        f"{f' {_shown(tta_below)} |' if below else ''}{f' {tolerance:g} |' if tolerances else ''} "
                        f"{', '.join(f'{100 * b:.2f}' for b in best)} | {100 * np.mean(best):.2f}% | {seconds:.0f} s |"
                        f"{f' {folds_s:.1f} s |' if tolerances else ''}")
            print(rows[-1], flush=True)
    block = measured_header("probe_sizes.py", " ".join(sys.argv[1:]),
                            f"{len(labels)} training images; each estimate at its best weight decay") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


def _below(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _shown(tta_below: float | None) -> str:
    return "every image" if tta_below is None else "no image" if tta_below == 0 else f"{tta_below:g}"


if __name__ == "__main__":
    main()
