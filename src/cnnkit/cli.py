"""The command line: parses arguments, calls one library function per command, prints for people."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from cnnkit import STARTED, allocator, config, progress
from cnnkit.errors import CnnkitError, ConfigError

log = logging.getLogger("cnnkit")
DEFAULT_RECIPE = "fmnist-quick"
QUICK_RECIPES = {"fashion-mnist": DEFAULT_RECIPE, "cifar10": "cifar10-quick"}  # with no --recipe
PHOTO_RECIPE, FOLDER_FINETUNE = "photos", "folder-transfer"
PHOTO_PROBE_MAX = 5000  # images: beyond, fine-tuning has the data to beat a probe, and a probe of 3 backbones is slow
RECIPE_HELP = (f"recipe name or path to a .toml file (default {DEFAULT_RECIPE}; cifar10-quick for CIFAR-10; for a "
               f"folder of class folders, {PHOTO_RECIPE} or, for more than {PHOTO_PROBE_MAX} images, {FOLDER_FINETUNE})."
               " A --data-dir without --dataset is read for what it holds")


def _add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    from cnnkit.config import Config

    group = parser.add_argument_group("recipe fields (override the recipe; see `cnnkit recipes`)")
    # argparse %-formats help strings: a literal % (as in "30% of training") must be doubled.
    helps = {name: text.replace("%", "%%") for name, text in config.field_help().items()}
    for f in dataclasses.fields(Config):
        if f.name in ("recipe", "description", *exclude):
            continue
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f"cfg_{f.name}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=helps.get(f.name, ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnkit",
        description="Train CNN image classifiers on Fashion-MNIST, CIFAR-10 or your own image folders, "
        "then evaluate them and classify images with them.",
        epilog="Example: cnnkit train --recipe seed-fmnist, then cnnkit evaluate runs/<name>",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a model from a recipe", description=(
        "Train a model from a recipe; any recipe field can be overridden, e.g. --epochs 3 --lr 0.01. "
        "Writes a run folder (config, metrics per epoch, best and last checkpoints, test evaluation)."))
    p.add_argument("--recipe", help=RECIPE_HELP)
    p.add_argument("--resume", metavar="RUN", type=Path, help="continue an interrupted run from its last checkpoint")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes on this machine (runs torchrun for you; "
                        "one per GPU, or CPU processes with Gloo). A linear probe runs in one process; "
                        "--strategy auto, finetune and gradual cannot train data-parallel")
    _add_config_flags(p)

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss against learning rate, suggest one",
                       description="Train a few hundred steps while the learning rate grows exponentially from "
                       "--start to --end; write RUN/lr_find.png and lr_find.json and suggest a peak --lr for the "
                       "recipe (where the loss falls fastest). Recipe fields can be overridden as for train.")
    p.add_argument("--recipe", help=RECIPE_HELP)
    p.add_argument("--start", type=float, default=1e-5, help="first learning rate (default 1e-5)")
    p.add_argument("--end", type=float, default=10.0, help="last learning rate (default 10)")
    p.add_argument("--steps", type=int, default=100, help="steps of the test (default 100; it stops early when the loss diverges)")
    _add_config_flags(p)

    _add_evaluate_command(sub)

    p = sub.add_parser("predict", help="classify image files with a trained run")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders searched for images")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default 3)")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="onnx: use RUN/export/model.onnx (or RUN itself if it is a .onnx file) with onnxruntime only")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p = sub.add_parser("export", help="export a run's model to ONNX (preprocessing inside) and check parity")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--out", type=Path, help="output file (default RUN/export/model.onnx)")
    p.add_argument("--parity-samples", type=int, default=1000, help="real test images to compare on (default 1000)")

    p = sub.add_parser("serve", help="serve a run over HTTP: a JSON API and a web page")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=("auto", "onnx", "torch"), default="auto",
                   help="auto: onnxruntime when RUN/export/model.onnx exists, else PyTorch")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")
    p.add_argument("--workers", type=int, default=2, help="inference threads (requests beyond wait)")

    _add_inside_commands(sub)
    _add_tune_command(sub)

    p = sub.add_parser("report", help="write RUN/report.html: curves, confusions, mistakes, Grad-CAM, robustness")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    p = sub.add_parser("compare", help="compare runs: a table and overlaid learning curves")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", type=Path, default=Path("compare.html"), help="HTML page to write (default compare.html)")

    p = sub.add_parser("augment", help="see what data augmentation does", description=(
        "`cnnkit augment preview` draws originals next to augmented versions; `cnnkit augment ops` lists the ops."))
    aug = p.add_subparsers(dest="augment_command", metavar="ACTION", required=True)
    q = aug.add_parser("preview", help="draw a grid of original and augmented images")
    q.add_argument("--recipe", help="take augmentation and dataset from this recipe (default: the one `cnnkit train` "
                   f"would use with the same --dataset and --data-dir; {DEFAULT_RECIPE} with neither)")
    q.add_argument("--ops", help="augmentation to try instead: a preset name or a JSON list of ops")
    q.add_argument("--dataset", help="dataset to draw images from (default: the recipe's)")
    q.add_argument("--data-dir", help="where the dataset is (see `cnnkit datasets`)")
    q.add_argument("--out", type=Path, default=Path("augment-preview.png"), help="PNG file to write")
    q.add_argument("--rows", type=int, default=8, help="how many images (one per class)")
    q.add_argument("--columns", type=int, default=6, help="augmented versions per image")
    q.add_argument("--seed", type=int, default=0)
    aug.add_parser("ops", help="list augmentation ops, their parameters, and the presets")

    p = sub.add_parser("datasets", help="which datasets are available here; with DIR, what cnnkit sees in your folder",
                       description="Without DIR: the datasets cnnkit knows and where they were found. With DIR (a folder, "
                       ".zip or .tar.gz of class folders): its classes and images by split, and every group of copies of "
                       "one picture (exact, or saved again, rescaled, brighter or darker), before you train on it.")
    p.add_argument("dir", nargs="?", type=Path, metavar="DIR", help="a folder of your own images to look into")
    p.add_argument("--image-size", type=int, default=64, help="DIR's images are decoded to this size to compare them "
                   "(default 64; near copies are judged at 32 px)")
    p.add_argument("--json", action="store_true", help="with DIR: everything as JSON, every group of copies")
    sub.add_parser("recipes", help="list the recipes, one line each")
    return parser


def _add_evaluate_command(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, per-class metrics and confusion matrix of a run")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--data-dir", help="any folder (or .zip/.tar.gz) of class folders named as the run's classes (new photos): evaluated "
                   "whole (a folder holding test/ alone: that folder); or a dataset with train/ and test/ inside: its test "
                   "split, classes matched by name. "
                   "Saved to RUN/evaluations/ (RUN/evaluation.json only for the run's own data)")
    p.add_argument("--skip-unknown-classes", action="store_true",
                   help="with a folder: leave out images of classes the run does not know, instead of stopping")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tta", choices=config.CHOICES["tta"],
                   help="test-time augmentation (default: the run's own). Another mode shows what TTA buys; "
                        "its result is printed, not saved, so the run folder keeps the run's own evaluation")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_tune_command(sub: Any) -> None:
    p = sub.add_parser("tune", help="hyperparameter search (Optuna) under a time budget: DIR/NAME/best.toml", description=(
        "Search the recipe's [tune] space with Optuna (TPE, median pruning). Each trial is an ordinary run folder "
        "under DIR/NAME/trials; the study is DIR/NAME/study.db (or --storage), so the same command started again "
        "continues it, and several machines can share a PostgreSQL study. Writes DIR/NAME/best.toml (a recipe for "
        "cnnkit train) and DIR/NAME/report.html. Recipe fields given here apply to every trial."))
    p.add_argument("--recipe", help=f"the recipe to tune: {RECIPE_HELP}")
    p.add_argument("--time-budget", help="the whole search, e.g. 30m: a trial that would not fit is not started")
    p.add_argument("--trials", type=int, help="trials in all (on one study, every process's together)")
    p.add_argument("--trial-budget", help="each trial's --time-budget, e.g. 2m: trials compete on equal time")
    p.add_argument("--space", type=Path, help="a TOML file whose [tune] table replaces the recipe's")
    p.add_argument("--storage", help="an Optuna storage URL, e.g. postgresql://user@host/db (default: DIR/NAME/study.db)")
    p.add_argument("--output", type=Path, default=Path("tune"), help="parent folder (default tune)")
    p.add_argument("--name", help="the study's folder and name (default: the recipe's name)")
    p.add_argument("--final", action="store_true",
                   help="then train the best settings once on train + validation and test them once (DIR/NAME/final)")
    p.add_argument("--trial-reports", action="store_true",
                   help="write each trial's report.html (off: a trial's time goes to training; the final fit has one)")
    p.add_argument("--grace-period", type=int, default=60, help=argparse.SUPPRESS)  # tests: stale-trial detection
    _add_config_flags(p, exclude=("time_budget", "output", "name"))


def _add_inside_commands(sub: Any) -> None:
    """`summary` and `explain`: the course's concepts shown on the user's own network."""
    p = sub.add_parser("summary", help="every layer: shapes, parameters, multiply-adds, receptive field", description=(
        "A table of every layer of a run's network (or a recipe's or a model's, untrained): kernel, stride, "
        "padding, input and output shape, parameters, multiply-adds and receptive field; the output size "
        "computed with floor((in + 2*padding - kernel) / stride) + 1 and checked against PyTorch's."))
    p.add_argument("run", type=Path, nargs="?", metavar="RUN", help="run folder (or give --recipe or --model)")
    p.add_argument("--recipe", help="an untrained network of this recipe, at its dataset's image size")
    p.add_argument("--model", help="an untrained model by name (seed-cnn, fastnet or a timm name)")
    p.add_argument("--input-size", type=int, help="input height and width for --model (default 28, or 224 for timm)")
    p.add_argument("--channels", type=int, default=None, help="input channels for --model (default 1 for cnnkit's, 3 for timm)")
    p.add_argument("--classes", type=int, default=10, help="classes for --recipe and --model (default 10)")
    p.add_argument("--depth", type=int, help="show modules this many levels down instead of every leaf layer")
    p.add_argument("--batch-size", type=int, help="batch for the training-memory estimate (default: the recipe's, or 64)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    p = sub.add_parser("explain", help="follow one image through a run's network: RUN/explain/IMAGE.html",
                       description="Write a self-contained page that follows IMAGE through the run's network: the "
                       "preprocessed input, feature maps per stage, pooling, a receptive field, the dense layers, "
                       "softmax with its numbers, the loss for --label, and Grad-CAM for the top classes.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder")
    p.add_argument("image", type=Path, metavar="IMAGE", help="an image file (PNG, JPEG, BMP, WebP, GIF)")
    p.add_argument("--label", help="the image's true class: the page shows the cross-entropy loss for it")
    p.add_argument("--out", type=Path, help="HTML file to write (default RUN/explain/<image name>.html)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))


def main(argv: list[str] | None = None) -> int:
    # The clock of --time-budget: from the command line, the process's start (importing torch counts);
    # called from Python (a notebook, a test), this call's, not when cnnkit was first imported.
    started_at = STARTED if argv is None else time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv, args.started_at = argv, started_at
    _setup_logging(args.quiet)
    allocator.reuse_freed_memory()  # before the first large tensor: CPU training steps 26-38% faster here
    try:
        return COMMANDS[args.command](args)
    except CnnkitError as e:
        if args.debug:
            raise
        progress.console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        progress.console.print("interrupted")
        return 130


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    progress.set_enabled(progress.enabled and not quiet)
    if progress.console.is_terminal:
        handler: logging.Handler = RichHandler(console=progress.console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs to a file or pipe: plain lines, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("cnnkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def out_console():
    """stdout for tables; when piped, wide enough that tables are not cut to 80 columns."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from cnnkit.config import parse_override

    return {k[4:]: parse_override(k[4:], v) for k, v in vars(args).items() if k.startswith("cfg_")}


def launch_torchrun(args: argparse.Namespace) -> int:
    """`cnnkit train --nproc N`: the same command under torchrun, N processes on this machine."""
    import os
    import subprocess

    rest, skip = [], False
    for token in args.argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            rest.append(token)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "cnnkit", *rest]
    return subprocess.call(cmd, env=env)


def _part_epoch(s: dict) -> str:
    """', 164 steps: the last epoch in part' where a time budget planned part of the last epoch."""
    steps, per_epoch = s.get("steps_run"), s.get("steps_per_epoch")
    if steps and per_epoch and steps % per_epoch and s["status"] == "finished":
        return f", {steps} steps: the last epoch in part"
    return ""


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from cnnkit import distributed
    from cnnkit.config import apply_overrides, load_recipe
    from cnnkit.evaluate import without_copies
    from cnnkit.runtime import settings_for_this_cpu
    from cnnkit.training import train
    from cnnkit.training.choose_strategy import describe_choice

    overrides = _config_overrides(args)
    recipe = None if args.resume else args.recipe or default_recipe(overrides)
    cfg = None if recipe is None else apply_overrides(load_recipe(recipe), overrides)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if recipe is not None and not args.recipe:  # the workers train what was chosen here, and say it once
            guessed = "dataset" in overrides and not hasattr(args, "cfg_dataset")  # from --data-dir's contents
            args.argv = [*args.argv, "--recipe", recipe, *(["--dataset", overrides["dataset"]] if guessed else [])]
        refused = distributed.refusal(cfg.strategy) if cfg is not None else None
        if refused:  # here, once, not in every worker under torchrun's traceback
            raise ConfigError(f"--nproc {args.nproc}: {refused}")
        if cfg is None or cfg.strategy != "linear-probe":
            return launch_torchrun(args)
        # Nothing to train in parallel: N processes would each pass every image through the backbone, each
        # with 1/N of the threads (measured: features at half the rate with --nproc 2 on a 2-core CPU).
        log.warning("--nproc %d ignored: a linear probe fits its head in one process; its features use every "
                    "core there", args.nproc)
    if cfg is None:
        result = train(None, resume=args.resume, overrides=overrides)  # type: ignore[arg-type]
    else:
        result = train(settings_for_this_cpu(cfg, overrides), started_at=args.started_at)
    s = result.summary
    if not s:  # a distributed worker other than rank 0: rank 0 reports
        return 0
    from rich.table import Table

    table = Table(title=f"run {result.run_dir}", show_header=False)
    for key, value in [
        ("recipe / model", f"{s['recipe']} / {s['model']} ({s['parameters']:,} parameters)"),
        ("epochs", f"{s['epochs_run']} ({s['status']}{_part_epoch(s)}), best epoch {s['best_epoch']}"),
        *([("cross-validated accuracy", f"{100 * s['cv_accuracy']:.2f}% ± {100 * s['cv_sd']:.2f} ({s['cv_folds']} folds "
                                         f"of {s['cv_images']} images), the best of "
                                         f"{', '.join(c['model'] for c in s['candidates'])}")]
          if "cv_accuracy" in s else [("best validation accuracy", f"{100 * s['best_val_accuracy']:.2f}%")]),
        *([("strategy (auto)", describe_choice(s["strategy_choice"]))] if "strategy_choice" in s else []),
        ("test accuracy", f"{100 * s['test_accuracy']:.2f}%  ({s['test_samples']} images; 95% interval "
                          f"{100 * s['test_accuracy_ci95'][0]:.1f}-{100 * s['test_accuracy_ci95'][1]:.1f}%)"),
        *([("without copies", without_copies(s))] if s.get("test_accuracy_without_copies") is not None else []),
        ("time", f"{s.get('total_time_s', s['wall_time_s']):.0f} s in all, {s['train_time_s']:.0f} s training, "
                 f"on {s['device']}"),
        *([("time budget", f"{s['time_budget_s']:.0f} s"
                           + (f"; planned {s['planned_time_s']:.0f} s" if "planned_time_s" in s else "")
                           + (f"; the head learnt from {s['probe_images']:,} of the {s['train_samples']:,} training "
                              "images" if "probe_images" in s else ""))] if "time_budget_s" in s else []),
    ]:
        table.add_row(key, value)

    out_console().print(table)
    print(f"Run folder: {result.run_dir}")
    return 0


def default_recipe(overrides: dict[str, Any]) -> str:
    """The recipe when none is named: each dataset's quick recipe, or, for a folder of the user's own
    photos, a transfer recipe that suits how many there are (said in the log, with why). A --data-dir
    without --dataset sets `overrides["dataset"]` to what it holds (data.guess_dataset)."""
    from cnnkit.data import canonical_name, guess_dataset

    guess = None
    if "dataset" not in overrides and overrides.get("data_dir"):
        guess = guess_dataset(overrides["data_dir"])
        overrides["dataset"] = guess.name
        log.info("--data-dir %s holds %s: --dataset %s", overrides["data_dir"], guess.why, guess.name)
    dataset = canonical_name(overrides.get("dataset", "fashion-mnist"))
    if dataset != "folder":
        return QUICK_RECIPES[dataset]
    from cnnkit.data import count_images

    n = guess.images if guess else count_images(overrides.get("data_dir"))
    name = PHOTO_RECIPE if n <= PHOTO_PROBE_MAX else FOLDER_FINETUNE
    why = ("a linear probe on pretrained features, the backbone chosen by cross-validation on your images: "
           "strong and quick on small sets" if name == PHOTO_RECIPE else
           "fine-tuning a pretrained EfficientNet-Lite0, which has the images to beat a probe")
    asked = f", with --strategy {overrides['strategy']} as asked" if overrides.get("strategy") else ""
    log.info("no --recipe for a folder of %d images: using %s (%s)%s; name another with --recipe", n, name, why, asked)
    return name


def cmd_lr_find(args: argparse.Namespace) -> int:
    from datetime import datetime

    from cnnkit.config import apply_overrides, load_recipe
    from cnnkit.lr_find import lr_find

    overrides = _config_overrides(args)
    recipe = args.recipe or default_recipe(overrides)
    overrides.setdefault("name", f"lr-find-{Path(recipe).stem}-{datetime.now():%Y%m%d-%H%M%S}")
    cfg = apply_overrides(load_recipe(recipe), overrides)
    if cfg.strategy == "linear-probe":
        raise ConfigError(f"recipe {recipe} fits a linear head by L-BFGS, with no learning rate to find; lr-find is "
                          f"for recipes trained by gradient steps, e.g. --recipe {FOLDER_FINETUNE} for your photos")
    result = lr_find(cfg, args.start, args.end, args.steps)
    out_console().print(f"suggested --lr {result.suggested_lr:.3g} (steepest fall of the loss); "
                        f"the loss was lowest at {result.min_loss_lr:.3g} (/10: {result.min_loss_lr / 10:.3g}); "
                        f"the recipe has {cfg.lr:g}")
    print(f"Plot: {result.run_dir / 'lr_find.png'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnkit.evaluation import evaluate_run
    from cnnkit.runtime import resolve_device

    result = evaluate_run(args.run, checkpoint=args.checkpoint, tta=args.tta, data_dir=args.data_dir,
                          skip_unknown_classes=args.skip_unknown_classes, device=resolve_device(args.device))
    metrics, tta = result.metrics, result.tta
    if args.json:
        print(json.dumps({"split": result.split, "checkpoint": args.checkpoint, "tta": tta, "notes": result.notes,
                          **metrics}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{args.run}: {result.split} accuracy {100 * metrics['accuracy']:.2f}% on {metrics['samples']} images"
                        f" (test-time augmentation: {tta})")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in metrics["per_class"]:
        table.add_row(row["class"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    out_console().print(table)
    for note in result.notes:
        print(note)
    if result.saved_to is None:
        print(f"Not saved: {args.run / 'evaluation.json'} keeps the evaluation with the run's own TTA.")
    else:
        print(f"All numbers: {result.saved_to}; confusion matrix: {result.saved_to.parent / 'plots'}"
              if result.saved_to.name == "evaluation.json" else f"All numbers: {result.saved_to} (and .png)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnkit.data.images import find_images
    from cnnkit.predict import load_engine, predict_files

    paths = find_images(args.inputs)
    device = "cpu"
    if args.engine != "onnx" and args.run.suffix != ".onnx":  # torch is imported only for its engine
        from cnnkit.runtime import resolve_device

        device = str(resolve_device(args.device))
    model = load_engine(args.run, "onnx" if args.engine == "onnx" else "torch", checkpoint=args.checkpoint,
                        device=device)
    results, engine = predict_files(model, paths, top_k=args.top_k), model.name
    if args.json:
        print(json.dumps({"engine": engine, "run": str(args.run), "results": results}, indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"predictions of {args.run} (engine: {engine})")
        table.add_column("image", overflow="fold")
        table.add_column("top classes")
        for r in results:
            text = r["error"] if "error" in r else "   ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
            table.add_row(r["path"], text, style="red" if "error" in r else None)
        out_console().print(table)
    return 1 if any("error" in r for r in results) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnkit.data.splits import stratified_subset
    from cnnkit.export import export_onnx
    from cnnkit.runs import load_run, read_config, run_splits

    cfg = read_config(args.run)
    run = load_run(args.run)
    test = run_splits(cfg)[1].test
    sample = test.images[stratified_subset(test.labels, args.parity_samples, 0)]
    out = args.out or args.run / "export" / "model.onnx"
    parity = export_onnx(run, out, sample)
    print(f"Wrote {out}: on {parity['samples']} test images, max |logit difference| {parity['max_abs_logit_diff']:.1e}, "
          f"same top-1 on {100 * parity['top1_agreement']:.2f}%")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cnnkit.serve import create_app

    app = create_app(args.run, engine=args.engine, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     workers=args.workers)
    print(f"Serving {args.run} ({app.state.engine.name}) on http://{args.host}:{args.port}/  (API docs: /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from cnnkit import augment

    if args.augment_command == "ops":
        for name, fn in {**augment.IMAGE_OPS, **augment.MIX_OPS}.items():
            params = [f"{k}={v!r}" for k, v in augment.op_params(fn).items()]
            p_default = augment.DEFAULT_P.get(name, 1.0)
            doc = (inspect.getdoc(fn) or "").split("\n")[0]
            print(f"{name:20} p={p_default} {' '.join(params)}\n{'':20} {doc}" if doc else f"{name:20} p={p_default} {' '.join(params)}")
        print("\npresets:")
        for name, ops in augment.PRESETS.items():
            print(f"  {name:8} {json.dumps(ops)}")
        return 0
    from cnnkit.config import load_recipe, parse_override
    from cnnkit.data import load_dataset
    from cnnkit.preview import augment_grid, pick_examples

    data = {k: v for k, v in (("dataset", args.dataset), ("data_dir", args.data_dir)) if v}
    cfg = load_recipe(args.recipe or default_recipe(data))  # a --data-dir alone: the recipe its images would train
    spec = parse_override("augment", args.ops) if args.ops else cfg.augment
    aug = augment.build_augment(spec)
    ds = load_dataset(data.get("dataset", cfg.dataset), args.data_dir or (None if args.dataset else cfg.data_dir),
                      image_size=cfg.image_size, channels=cfg.channels)
    train = ds.splits["train"]
    idx = pick_examples(train.labels, len(ds.classes), args.rows, args.seed)
    name = spec if isinstance(spec, str) else "custom ops"
    augment_grid(train.images[idx], train.labels[idx], ds.classes, aug, args.out, columns=args.columns,
                 seed=args.seed, title=f"{ds.name}: augmentation {name}")
    print(f"wrote {args.out}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnkit.summary import format_shape, human, network_to_summarise, summarize

    model, shape, batch, what = network_to_summarise(args.run, args.recipe, args.model, args.input_size,
                                                  args.channels, args.classes)
    s = summarize(model, shape, args.depth, args.batch_size or batch)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0 if not s["formula_mismatches"] else 1
    from rich.table import Table

    table = Table(title=f"{what}: input {format_shape(list(shape))}")
    for col in ("layer", "type", "kernel / stride / padding", "input", "output", "params", "MACs", "activations",
                "receptive field", "output size by the formula"):
        table.add_column(col, justify="right" if col in ("params", "MACs", "activations") else "left", overflow="fold")
    for r in s["layers"]:
        geom = (f"{r['kernel'][0]} / {r['stride'][0]} / {r['padding'] if isinstance(r['padding'], str) else r['padding'][0]}"
                if r["kernel"] else "")
        rf = r["receptive_field"]
        field = f"{rf['size']:g} px, jump {rf['jump']:g}, start {rf['start']:g}" if rf else ""
        check = "" if r["formula"] is None else r["formula"] + ("" if r["formula_ok"] else "  [red]≠ PyTorch[/]")
        table.add_row(r["name"], r["type"], geom, format_shape(r["input_shape"]), format_shape(r["output_shape"]),
                      f"{r['params']:,}", human(r["macs"]), human(r["activation_bytes"], "B"), field, check)
    from rich.console import Console

    out = out_console()
    if not out.is_terminal:  # piped: wide enough for the formula column whole
        out = Console(width=240)
    out.print(table)
    out.print(f"{s['total_params']:,} parameters ({s['trainable_params']:,} trainable), {human(s['total_macs'], 'MAC')} "
              f"per image; training memory for a batch of {s['batch_size']}: about "
              f"{human(s['training_memory_bytes'], 'B')} (weights, gradients, 2 optimiser buffers, activations)")
    if s["formula_mismatches"]:
        out.print(f"[red]the formula disagrees with PyTorch at {', '.join(s['formula_mismatches'])}[/]: a bug in cnnkit")
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnkit.explain import explain_run
    from cnnkit.runtime import resolve_device

    path, ex = explain_run(args.run, args.image, args.label, str(resolve_device(args.device)), args.out)
    top = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in ex["top"])
    print(f"{args.image}: {top}")
    print(f"Page: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cnnkit.budget import parse_duration
    from cnnkit.tune import tune

    overrides = _config_overrides(args)
    recipe = args.recipe or default_recipe(overrides)
    name = args.name or Path(recipe).stem
    result = tune(recipe, overrides, folder=args.output / name, trials=args.trials,
                  budget_s=parse_duration(args.time_budget) if args.time_budget else None,
                  trial_budget=args.trial_budget, storage=args.storage, space=args.space,
                  seed=overrides.get("seed", 0), grace_period_s=args.grace_period, final=args.final,
                  trial_reports=args.trial_reports)
    from rich.table import Table

    table = Table(title=f"study {result.folder}")
    for col in ("trial", "state", "validation", "epochs", "settings"):
        table.add_column(col)
    for r in result.trials:
        table.add_row(str(r["number"]), r["state"], "" if r["value"] is None else f"{100 * r['value']:.2f}%",
                      "-" if r["epochs"] is None else str(r["epochs"]), json.dumps(r["params"]))
    out_console().print(table)
    if result.recipe_path is None:
        print("No trial finished; nothing to recommend yet. Start the same command again to continue.")
        return 1
    print(f"Best validation accuracy {100 * result.best_value:.2f}%: cnnkit train --recipe {result.recipe_path}")
    if result.final:
        print(f"Final fit on train + validation: test accuracy {100 * result.final['test_accuracy']:.2f}% "
              f"({result.final['run']})")
    print(f"Report: {result.folder / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cnnkit.report import report_run
    from cnnkit.runtime import resolve_device

    path = report_run(args.run, str(resolve_device(args.device)))
    print(f"Report: {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from cnnkit.compare import load_runs, table_rows, write_html

    runs = load_runs(args.runs)
    rows = table_rows(runs)
    table = Table(title=f"{len(runs)} runs")
    for key in rows[0]:
        table.add_column(key, justify="right" if key in ("epochs", "best val", "test", "wall time") else "left")
    for row in rows:
        table.add_row(*row.values())
    out_console().print(table)
    write_html(runs, args.out)
    print(f"Learning curves and table: {args.out}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from cnnkit.data import DATASETS, where_available

    if args.dir is not None:
        return _show_folder(args.dir, args.image_size, args.json)
    found = where_available()
    for name, description in DATASETS.items():
        where = found[name] or "not found here; downloaded on first use (or give --data-dir)"
        print(f"{name:14} {description}\n{'':14} -> {where}")
    return 0


SHOWN_GROUPS = 20  # groups of copies printed; --json gives them all


def _show_folder(root: Path, size: int, as_json: bool) -> int:
    """`cnnkit datasets DIR`: the folder's classes by split, and its copies of one picture, for a person."""
    from rich.table import Table

    from cnnkit.data import folder
    from cnnkit.data.copies import find_copy_groups

    ds = folder.load(root, size=size, channels=3)
    groups = find_copy_groups(ds.splits, ds.classes)
    counts = {name: split.class_counts(len(ds.classes)).tolist() for name, split in ds.splits.items()}
    if as_json:
        print(json.dumps({"source": str(root), "classes": ds.classes, "images": counts, "notes": ds.notes,
                          "copies": [{**vars(g), "across": g.across} for g in groups]}, indent=2))
        return 0
    print(f"{root}: {sum(map(sum, counts.values()))} images in {len(ds.classes)} classes (decoded at {size} px)")
    table = Table()
    table.add_column("class")
    for name in counts:
        table.add_column(name, justify="right")
    for c, cls in enumerate(ds.classes):
        table.add_row(escape(cls), *(str(n[c]) for n in counts.values()))
    out_console().print(table)
    for note in ds.notes:
        print(note)
    across = {kind: sum(g.across == kind for g in groups) for kind in ("classes", "splits", "")}
    print(f"{len(groups)} groups of copies of one picture ({sum(len(g.files) for g in groups)} images): "
          f"{across['classes']} under more than one class, {across['splits']} across splits, {across['']} within one "
          "split and class" if groups else "No copies of one picture (exact, or saved again, rescaled, brighter or darker).")
    for g in sorted(groups, key=lambda g: ("classes", "splits", "").index(g.across))[:SHOWN_GROUPS]:
        what = {"classes": "  (classes differ)", "splits": "  (splits differ)", "": ""}[g.across]
        print("  " + " = ".join(f"{f} [{c}]" if g.across == "classes" else f for f, c in zip(g.files, g.classes)) + what)
    if len(groups) > SHOWN_GROUPS:
        print(f"  ... and {len(groups) - SHOWN_GROUPS} more (--json lists them all)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from cnnkit.config import load_recipe, recipe_names

    recipes = {name + (" (default)" if name == DEFAULT_RECIPE else ""): load_recipe(name) for name in recipe_names()}
    width = max(map(len, recipes))
    model_width = max(len(r.model) for r in recipes.values())
    for name, r in recipes.items():
        length = "linear probe" if r.strategy == "linear-probe" else f"{r.epochs:3d} epochs"
        print(f"{name:{width}}  {r.dataset:13}  {r.model:{model_width}}  {length:12}  {r.description}")
        if r.fp32:
            print(f"{'':{width}}  in fp32: {', '.join(f'{k} {json.dumps(v)}' for k, v in r.fp32.items())}")
    from cnnkit.runtime import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        print("\nThe times are for a 2-core CPU with bf16 instructions (AVX512-BF16 or AMX). This CPU has none: the "
              "fast recipes train in fp32 here,\nabout 3 times as long, and a recipe's 'in fp32' settings replace "
              "its own (docs/cpus.md). `cnnkit train --recipe R --time-budget 5m`\nfits a run to the time you have.")
    return 0


COMMANDS = {"tune": cmd_tune, "summary": cmd_summary, "explain": cmd_explain, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "augment": cmd_augment, "report": cmd_report, "compare": cmd_compare, "lr-find": cmd_lr_find, "export": cmd_export, "serve": cmd_serve,
            "datasets": cmd_datasets, "recipes": cmd_recipes}

if __name__ == "__main__":
    sys.exit(main())
