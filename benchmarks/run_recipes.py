"""Train recipes for several seeds and record accuracy, time, throughput and memory.

Each run is a separate `cnnkit train` process, timed from the outside (so wall time includes
start-up, data loading and the final test evaluation). Results go to
benchmarks/results/<label>.json and into the marked table of benchmarks/RESULTS.md.

    python benchmarks/run_recipes.py --recipes seed-fmnist fmnist-baseline --seeds 0 1 2
    python benchmarks/run_recipes.py --recipes cifar10-quick --variants lookahead=false label_smoothing=0
    python benchmarks/run_recipes.py --recipes fmnist-quick --seeds 0 1 2 --isa avx2
    python benchmarks/run_recipes.py --recipes photos --seeds 0 1 2 --variants probe_screen=none --interleave

`--isa avx2` runs on a CPU with AVX-512 as on one without: MKL, oneDNN and PyTorch's own kernels
are capped to AVX2 (their documented switches, AVX2_ONLY below), so fp32 is what `--precision auto`
picks and the kernels are the ones an AVX2 laptop runs. A Xeon so capped multiplies 2048x2048 fp32
matrices at 118 GFLOP/s against 110 on the project's Zen 3; its clock and caches still differ, so
compare runs under the same cap, as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
AVX2_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def restart_capped_to_avx2() -> None:
    """For a benchmark that times in its own process (`--isa avx2`): MKL, oneDNN and ATen read
    their cap when torch loads, so the script starts itself again with AVX2_ONLY set (once)."""
    if any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})


def machine(gpu: bool = False) -> str:
    """The CPU (model, cores, widest vector instructions, native bf16), and the GPU's name first
    when the runs train on one. The model name alone may not tell CPU generations apart ("AMD EPYC")."""
    from cnnkit.runtime import cpu_has_native_bf16  # the same test as --precision auto

    cpu, flags, ids = "unknown CPU", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and cpu == "unknown CPU":
                cpu = value
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key in ("cpu family", "model") and key not in ids:
                ids[key] = value
    except OSError:
        pass
    if ids.get("cpu family") == "25":  # AMD's family 25: Zen 3 (models 0-15, 32-95) or Zen 4 (the rest)
        model = int(ids.get("model", "-1"))
        cpu += f" ({'Zen 3' if model in (*range(16), *range(32, 96)) else 'Zen 4'}, family 25 model {model})"
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    if vector and "avx512f" in flags and os.environ.get("ONEDNN_MAX_CPU_ISA"):  # --isa: the kernels are capped
        vector += f" capped to {os.environ['ONEDNN_MAX_CPU_ISA']} (MKL, oneDNN, ATen)"
    host = f"{cpu}, {os.cpu_count()} cores, {vector + ', ' if vector else ''}bf16 {'yes' if cpu_has_native_bf16() else 'no'}"
    if gpu:
        import torch

        return f"{torch.cuda.get_device_name(0)}, host {host}"
    return host


def commit() -> str:
    """HEAD (+dirty if src/ has changes); BENCH_COMMIT names it for a copied tree without .git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True).stdout
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        pass
    return os.environ.get("BENCH_COMMIT", "unknown") + " (copied tree)"


def measured_header(script: str, flags: str, note: str = "", versions: str = "") -> str:
    """The first lines of a RESULTS.md block from a benchmark that times in its own process: when,
    where (machine, commit, versions, threads) and the command that wrote it. `versions` names
    other libraries timed ("onnxruntime 1.32.0, "); `note` is said after the command, in brackets."""
    import torch

    return (f"Measured {date.today()} on {machine()}, commit {commit()}, torch {torch.__version__}, {versions}"
            f"Python {platform.python_version()}, {torch.get_num_threads()} threads.\n"
            f"Command: `python benchmarks/{script} {flags}`{f' ({note})' if note else ''}\n\n")


def run_one(recipe: str, seed: int, extra: list[str], out_dir: Path, fresh_cache: bool = False,
            validation_only: bool = False, val_views: str | None = None, env_vars: dict[str, str] | None = None) -> dict:
    name = f"{recipe}-seed{seed}-{int(time.time())}"
    cmd = [sys.executable, "-m", "cnnkit", "--quiet", "train", "--recipe", recipe, "--seed", str(seed),
           "--output", str(out_dir), "--name", name, *extra]
    t0 = time.perf_counter()
    env = {**os.environ, **(env_vars or {})}
    # as a new user: no decoded images or features cached by an earlier run (each run's removed after it: left,
    # 120 runs on 5,000 photos filled 60 GB of /tmp)
    fresh = [tempfile.mkdtemp(prefix=prefix) for prefix in ("cnnkit-bench-", "inductor-bench-")] if fresh_cache else []
    if fresh:
        env["CNNKIT_HOME"], env["TORCHINDUCTOR_CACHE_DIR"] = fresh  # the second for --inference-engine compile
    try:  # choosing settings: the run's closing table (which shows the test accuracy) goes unread
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if validation_only else None)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0  # not the clean-up's
    finally:
        for path in fresh:
            shutil.rmtree(path, ignore_errors=True)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    summary = json.loads((out_dir / name / "summary.json").read_text())
    metrics = [json.loads(ln) for ln in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "recipe": recipe, "seed": seed, **({} if validation_only else {"test_accuracy": summary["test_accuracy"]}),
        "best_val_accuracy": summary["best_val_accuracy"], "epochs": summary["epochs_run"],
        "wall_time_s": round(wall, 1), "train_time_s": summary["train_time_s"],
        "train_images_per_s": round(statistics.mean(m["train_images_per_s"] for m in metrics), 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024), "command": "cnnkit " + " ".join(cmd[4:]),
        **({"val_views_accuracy": val_accuracy_with_views(out_dir / name, val_views)} if val_views else {}),
    }


def val_accuracy_with_views(run_dir: Path, tta: str) -> float:
    """The run's best weights on its validation split with test-time views `tta` (and the run's own
    `tta_below`): for choosing a recipe's test views without reading its test split, since validation
    during training goes without views."""
    from cnnkit.inference import InferenceSettings, predict_logits
    from cnnkit.runs import load_run, run_settings, run_splits

    cfg = run_settings(run_dir)
    _, splits = run_splits(cfg)
    run = load_run(run_dir, "best")
    logits = predict_logits(run.model, run.preprocess, splits.val.images, tta=tta,
                            **InferenceSettings.for_run(cfg, "cpu").kwargs())
    return float((logits.argmax(1).numpy() == splits.val.labels).mean())


def table(rows: list[dict]) -> str:
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    key = "test_accuracy" if all("test_accuracy" in r for r in rows) else "best_val_accuracy"
    views = all("val_views_accuracy" in r for r in rows)
    out = [f"| recipe | seeds | {key.replace('_', ' ')} (mean ± sd) |{' with test views |' if views else ''}"
           " wall time (mean ± sd) | train img/s | peak RSS |", "|---|---|---|" + ("---|" if views else "") + "---|---|---|"]
    for recipe, rs in by_recipe.items():
        accs = [100 * r[key] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        walls = [r["wall_time_s"] / 60 for r in rs]
        wall_sd = f" ± {statistics.stdev(walls):.2f}" if len(walls) > 1 else ""
        with_views = f" {statistics.mean(100 * r['val_views_accuracy'] for r in rs):.2f}% |" if views else ""
        out.append(f"| {recipe} | {len(rs)} | {statistics.mean(accs):.2f}% ± {sd:.2f} "
                   f"({', '.join(f'{a:.2f}' for a in accs)}) |{with_views} {statistics.mean(walls):.2f}{wall_sd} min "
                   f"| {statistics.mean(r['train_images_per_s'] for r in rs):.0f} | {max(r['peak_rss_mb'] for r in rs)} MB |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--vary", nargs="+", metavar=("FIELD", "VALUE"),
                   help="one run per value of a recipe field, e.g. --vary augment none seed light")
    p.add_argument("--variants", nargs="+", metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="an ablation: the recipe as it is, then one run per variant, e.g. lookahead=false "
                        "'model_args={\"whiten\": false}'; env:NAME=VALUE sets an environment variable instead, "
                        "e.g. env:CNNKIT_FOLD_BATCHNORM=0")
    p.add_argument("--no-base", action="store_true",
                   help="with --variants: skip the run of the recipe as it is (measured elsewhere)")
    p.add_argument("--interleave", action="store_true",
                   help="run seed by seed (each seed's variants back to back), not variant by variant: "
                        "a machine whose speed drifts then slows every variant alike")
    p.add_argument("--label", default="recipes", help="name of the results file and of the block in RESULTS.md")
    p.add_argument("--runs-dir", type=Path, default=HERE / "runs")
    p.add_argument("--fresh-cache", action="store_true",
                   help="each run with an empty CNNKIT_HOME, as a new user's first run (no cached decodes or features)")
    p.add_argument("--validation-only", action="store_true",
                   help="for choosing settings: record and show the best validation accuracy, not the test's "
                        "(the runs still evaluate the test split; its accuracy and the run's closing table go unread)")
    p.add_argument("--val-views", metavar="TTA", choices=["flip", "shift", "flip-shift"],
                   help="with --validation-only: also the best weights' validation accuracy with these test views "
                        "(and the run's --tta-below), for choosing test views without the test split")
    p.add_argument("--isa", choices=["avx2"], help="cap the kernels to AVX2, as on a CPU without AVX-512 (see above)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `cnnkit train` flags for every run")
    args = p.parse_args()
    if args.val_views and not args.validation_only:
        p.error("--val-views is for choosing: use it with --validation-only")
    extra = [a for a in args.extra if a != "--"]
    if args.isa:  # before machine() and the runs, which inherit it
        os.environ.update(AVX2_ONLY)
    gpu = "--device" in extra and extra[extra.index("--device") + 1:][:1] == ["cuda"]
    variants: list[tuple[str, list[str], dict[str, str]]] = [("", [], {})]
    if args.variants:
        variants = [] if args.no_base else variants
        variants += [(f" ({v})", *_variant_flags(v)) for v in args.variants]
    elif args.vary:
        field, *values = args.vary
        variants = [(f" ({field}={v})", [f"--{field.replace('_', '-')}", v], {}) for v in values]
    where = {"machine": machine(gpu), "commit": commit()}  # read once, before the runs
    header = (f"Measured {date.today()} on {where['machine']}, commit {where['commit']}, "
              f"torch {__import__('torch').__version__}, Python {platform.python_version()}.\n"
              f"Command: `python benchmarks/run_recipes.py --recipes {' '.join(args.recipes)} "
              f"--seeds {' '.join(map(str, args.seeds))}{' --vary ' + ' '.join(args.vary) if args.vary else ''}"
              f"{' --variants ' + ' '.join(repr(v) for v in args.variants) if args.variants else ''}"
              f"{' --no-base' if args.no_base else ''}{' --interleave' if args.interleave else ''}"
              f"{' --fresh-cache' if args.fresh_cache else ''}"
              f"{' --validation-only' if args.validation_only else ''}"
              f"{' --val-views ' + args.val_views if args.val_views else ''}"
              f"{' --isa ' + args.isa if args.isa else ''}"
              f"{' -- ' + ' '.join(extra) if extra else ''}`\n\n")
    rows = []
    order = [(recipe, v, seed) for recipe in args.recipes for v in variants for seed in args.seeds]
    if args.interleave:  # seed by seed: each seed's variants back to back
        order.sort(key=lambda r: args.seeds.index(r[2]))
    for recipe, (suffix, flags, env_vars), seed in order:
        row = run_one(recipe, seed, extra + flags, args.runs_dir, args.fresh_cache, args.validation_only,
                      args.val_views, env_vars)
        row["recipe"] += suffix
        rows.append(row)
        record(args.label, header, rows, where)  # after every run: an interrupted benchmark keeps what it measured
    print(header + table(rows))


def record(label: str, header: str, rows: list[dict], where: dict[str, str]) -> None:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{label}.json").write_text(json.dumps({**where, "rows": rows}, indent=2) + "\n")
    write_block(label, header + table(rows))


def _variant_flags(variant: str) -> tuple[list[str], dict[str, str]]:
    """'lookahead=false,tta=none' -> ['--lookahead', 'false', '--tta', 'none'] (JSON values may hold commas);
    'env:CNNKIT_FOLD_BATCHNORM=0' -> an environment variable for the run."""
    flags, env_vars = [], {}
    for part in re.split(r",(?=\s*(?:env:)?\w+=)", variant):
        field, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"variant {variant!r}: write FIELD=VALUE")
        if field.strip().startswith("env:"):
            env_vars[field.strip()[4:]] = value
        else:
            flags += [f"--{field.strip().replace('_', '-')}", value]
    return flags, env_vars


def write_block(label: str, block: str) -> None:
    """Replace the block marked with `label` in RESULTS.md (or add it at the end)."""
    md = HERE / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    start, end = f"<!-- {label}:start -->", f"<!-- {label}:end -->"
    if start in text:
        text = text[: text.index(start) + len(start)] + "\n" + block + "\n" + text[text.index(end):]
    else:
        text += f"\n## {label}\n\n{start}\n{block}\n{end}\n"
    md.write_text(text)


if __name__ == "__main__":
    main()
