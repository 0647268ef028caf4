"""Test-time views for the unsure images alone: a trained run's test evaluation, as the run makes it (its
precision, engine, batch size and `--tta`), with the extra views for every image and for only those
whose plain view's top probability is below each `--tta-below`. Times each after a first, untimed pass
(oneDNN's set-up), alternating the settings for `--repeats` rounds; counts the unsure images and
the accuracy. Writes the block `tta-below` of benchmarks/RESULTS.md (or --label).

    python benchmarks/tta_below.py runs/photos-seed0 --tta-below 0.9 0.7
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from run_recipes import measured_header, write_block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder whose recipe takes test-time views (--tta)")
    p.add_argument("--tta-below", type=float, nargs="+", default=[0.9])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="tta-below")
    args = p.parse_args()
    from cnnkit.allocator import reuse_freed_memory
    from cnnkit.inference import InferenceSettings, predict_logits
    from cnnkit.runs import load_run, run_settings, run_splits

    reuse_freed_memory()  # as `cnnkit` does
    cfg = run_settings(args.run)
    if cfg.get("tta", "none") == "none":
        sys.exit(f"{args.run} takes no test-time views (tta none): nothing to compare")
    run = load_run(args.run, "best", "cpu")
    _, splits = run_splits(cfg)
    images, labels = splits.test.images, splits.test.labels
    settings = InferenceSettings.for_run(cfg, "cpu").kwargs()

    def logits(below: float | None):
        return predict_logits(run.model, run.preprocess, images, tta=cfg["tta"], **{**settings, "tta_below": below})

    plain = predict_logits(run.model, run.preprocess, images, **{**settings, "tta_below": None})  # and the set-up
    sure = plain.softmax(1).amax(1)
    cases: list[float | None] = [None, *args.tta_below]
    seconds: dict[float | None, list[float]] = {b: [] for b in cases}
    accuracy = {}
    for _ in range(args.repeats):
        for below in cases:
            t0 = time.perf_counter()
            out = logits(below)
            seconds[below].append(time.perf_counter() - t0)
            accuracy[below] = float((out.argmax(1).numpy() == labels).mean())
    rows = ["| extra views for | images given them | test accuracy | seconds (each round) | mean |", "|---|---|---|---|---|"]
    for below in cases:
        given = len(labels) if below is None else int((sure < below).sum())
        rows.append(f"| {'every image' if below is None else f'below {below:g}'} | {given} of {len(labels)} | "
                    f"{100 * accuracy[below]:.2f}% | {', '.join(f'{s:.1f}' for s in seconds[below])} | "
                    f"{np.mean(seconds[below]):.1f} s |")
    block = measured_header("tta_below.py", " ".join(sys.argv[1:]),
                            f"{cfg.get('model')}, tta {cfg['tta']}, {len(labels)} test images") + "\n".join(rows)
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
