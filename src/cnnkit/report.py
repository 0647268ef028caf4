"""The run report: one self-contained HTML file (images inline, no network) and PNG plots.

`build_report` needs the model and the test images in hand (train calls it at the end of a run);
`report_run` loads them from a run folder (the `cnnkit report` command). All numbers go to
evaluation.json, all plots to RUN/plots/, and the page shows both.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit import analysis
from cnnkit.augment import build_augment
from cnnkit.evaluate import accuracy_interval, classification_metrics, plot_confusion_matrix, without_copies
from cnnkit.fileio import write_bytes_atomic, write_json_atomic
from cnnkit.inference import InferenceSettings, predict_logits
from cnnkit.models.concat import is_concat, member_names
from cnnkit.plotting import pyplot, save_figure
from cnnkit.preprocess import Preprocess
from cnnkit.preview import augment_grid, pick_examples
from cnnkit.runs import RunRecord, load_run, read_summary, run_settings, run_splits
from cnnkit.summary import format_shape, human, summarize
from cnnkit.training.choose_strategy import describe_choice
from cnnkit.training.schedule import lr_factor, warmup_steps

log = logging.getLogger(__name__)

ROBUSTNESS_SAMPLES = 2000  # default; a prefix of the test split keeps this to seconds for small networks
LINEAR_PROBE = "linear-probe"  # a strategy whose head is fitted once: no epochs, no learning curves


def _show(ax, img: np.ndarray) -> None:
    """img: (C, H, W) uint8 or float."""
    arr = img.transpose(1, 2, 0)
    ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray" if arr.shape[-1] == 1 else None,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


# -- plots


def plot_learning_curves(metrics: list[dict[str, Any]], lr_steps: tuple[np.ndarray, np.ndarray] | None, path: Path) -> None:
    plt = pyplot()
    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [m[f"train_{key}"] for m in metrics], "o-", label="train")
        ax.plot(epochs, [m[f"val_{key}"] for m in metrics], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    if lr_steps is not None:
        axes[2].plot(lr_steps[0], lr_steps[1])
        axes[2].set_xlabel("epoch")
    axes[2].set_title("learning rate")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_candidates(selection: dict[str, Any], path: Path) -> None:
    """A linear probe's choice (run.json's selection): each candidate's cross-validated accuracy, the mean
    over the folds with their standard deviation, the chosen one darker."""
    plt = pyplot()
    rows, chosen = selection["candidates"], selection["chosen"]["model"]
    means, sds = np.array([100 * r["cv_accuracy"] for r in rows]), np.array([100 * r["cv_sd"] for r in rows])
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.45 * len(rows)))
    y = np.arange(len(rows))
    ax.barh(y, means, xerr=sds, capsize=3, color=["#1f4e9b" if r["model"] == chosen else "#a9c1e8" for r in rows])
    ax.set_yticks(y, [f"{r['model'].replace('+', ' + ')} ({r['views']} views): {m:.2f}% ± {sd:.2f}"
                      for r, m, sd in zip(rows, means, sds)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(max(0.0, float((means - sds).min()) - 2), 100)
    ax.set_xlabel(f"cross-validated accuracy (%): {selection['folds']} folds of {selection['images']} training images")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_training_views(cfg: dict[str, Any], images: np.ndarray, labels: np.ndarray, classes: list[str],
                        path: Path) -> None:
    """The run's augmentation on a few training images; for a linear probe, which does not use `augment`,
    the views its head learns from: each image and, with probe_flip, its mirror."""
    if cfg.get("strategy") == LINEAR_PROBE:
        flip = bool(cfg.get("probe_flip"))
        augment_grid(images, labels, classes, build_augment([{"op": "hflip", "p": 1.0}] if flip else []), path,
                     columns=1 if flip else 0,
                     title="a linear probe's training rows: each image" + (" and its mirror" if flip else ""))
        return
    augment = cfg.get("augment")
    augment_grid(images, labels, classes, build_augment(augment), path, columns=5,
                 title=f"augmentation: {augment if isinstance(augment, str) else 'custom ops'}")


def plot_image_grid(images: np.ndarray, captions: list[str], path: Path, columns: int = 8,
                    overlays: np.ndarray | None = None) -> None:
    plt = pyplot()
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.axis("on")
        _show(ax, images[i])
        if overlays is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_title(captions[i], fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(cal: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    bins = [b for b in cal["bins"] if b["count"]]
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins],
           width=[b["high"] - b["low"] for b in bins], edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {100 * cal['ece']:.2f}%)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_robustness(rob: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(c["name"] for c in rob["corruptions"]))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.25
    for level in (1, 2, 3):
        accs = [next(c["accuracy"] for c in rob["corruptions"] if c["name"] == n and c["severity"] == level) for n in names]
        ax.bar(np.arange(len(names)) + (level - 2) * width, [100 * a for a in accs], width, label=f"severity {level}")
    ax.axhline(100 * rob["clean"], color="black", linestyle="--", label=f"clean {100 * rob['clean']:.1f}%")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=4, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_filters(filters: np.ndarray, path: Path) -> None:
    plt = pyplot()
    n = len(filters)
    columns = min(16, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(0.6 * columns, 0.6 * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        f = filters[i]
        axes.flat[i].imshow(f[..., 0] if f.shape[-1] == 1 else f, cmap="gray" if f.shape[-1] == 1 else None,
                            interpolation="nearest")
    fig.suptitle(f"first-layer filters ({n})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# -- the numbers and the page


def lr_curve(cfg: dict[str, Any], steps_per_epoch: int, total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The planned learning rate against epochs: `total` steps (a time budget may plan the last
    epoch in part), else the config's epochs."""
    total = total or cfg["epochs"] * steps_per_epoch
    warmup = warmup_steps(cfg["warmup_epochs"], steps_per_epoch, total)
    steps = np.arange(0, total, max(1, total // 400))
    return steps / steps_per_epoch, np.array([cfg["lr"] * lr_factor(int(s), total, warmup, cfg["schedule"]) for s in steps])


def _one_image(samples: int) -> str:
    """What one image is worth in the robustness section's figures, where few images make it coarse."""
    return f"; one image is {100 / samples:.1f} points" if 0 < samples < 100 else ""


def _clean_beside_test(samples: int, test_samples: int, test_accuracy: float, tta: str) -> str:
    """The whole test's accuracy beside the robustness section's clean one, where they may differ: its
    images are a sample (a photo run on flowers12: 24 of 240, which read 91.67% clean against the test's
    98.33%), each seen once, without the test's extra views (`tta`)."""
    if samples >= test_samples and tta == "none":
        return ""
    views = f"each image seen once, without the test's {tta} views; " if tta != "none" else ""
    return f" ({views}the {test_samples:,} test images read {100 * test_accuracy:.2f}%)"


def _time_card(summary: dict[str, Any]) -> tuple[str, str, str]:
    """The run's wall time: in all where the run has ended (a report made again), else up to its
    test (the report being written is not in it)."""
    device = html.escape(str(summary.get("device", "")))
    if "total_time_s" in summary:
        return "wall time", f"{summary['total_time_s'] / 60:.1f} min", f"in all, with the report; {device}"
    return "wall time", f"{summary.get('wall_time_s', 0) / 60:.1f} min", f"to the test, before this report; {device}"


def build_report(run_dir: Path, model: torch.nn.Module, preprocess: Preprocess, classes: list[str],
                 test_images: np.ndarray, test_labels: np.ndarray, train_images: np.ndarray, train_labels: np.ndarray,
                 cfg: dict[str, Any], device: torch.device | str = "cpu", logits: torch.Tensor | None = None,
                 ) -> dict[str, Any]:
    """Evaluate on the test images (unless their `logits` are given, by a run that has saved its
    evaluation and drawn its confusion matrix: runs.save_evaluation), write evaluation.json,
    plots/*.png and report.html; return the numbers."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    inference = InferenceSettings.for_run(cfg, device).kwargs()
    drawn = logits is not None and (plots / "confusion_matrix.png").is_file()  # 1.5 s for 12 classes
    if logits is None:
        logits = predict_logits(model, preprocess, test_images, device=device, tta=cfg.get("tta", "none"),
                                description="report: test", **inference)
    metrics = classification_metrics(logits, test_labels, classes)
    metrics["calibration"] = analysis.calibration(logits, test_labels)
    metrics["confused_pairs"] = analysis.confused_pairs(metrics["confusion_matrix"], classes)
    metrics["worst_mistakes"] = analysis.worst_mistakes(logits, test_labels)
    n_rob = analysis.robustness_sample_count(cfg.get("report_robustness_samples", ROBUSTNESS_SAMPLES), len(test_labels),
                                             len(train_labels) + len(test_labels), len(classes))
    picked = analysis.class_balanced_order(test_labels)[:n_rob]
    metrics["robustness"] = analysis.robustness(model, preprocess, test_images[picked], test_labels[picked], classes,
                                                device, **inference)
    write_json_atomic(run_dir / "evaluation.json", {"split": "test", "checkpoint": "best", "classes": classes, **metrics})

    pred = logits.argmax(1).numpy()
    metrics_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = read_summary(run_dir)
    # Runs before steps_per_epoch was in the summary: the first epoch's steps
    steps_per_epoch = summary.get("steps_per_epoch") or (max(1, metrics_rows[0]["step"]) if metrics_rows else 1)
    selection = RunRecord.load(run_dir).selection if cfg.get("strategy") == LINEAR_PROBE else None
    if selection and selection.get("candidates"):  # a probe's choice, in place of the curves it does not have
        plot_candidates(selection, plots / "candidates.png")
    elif cfg.get("strategy") != LINEAR_PROBE:
        plot_learning_curves(metrics_rows, lr_curve(cfg, steps_per_epoch, summary.get("schedule_steps"))
                             if metrics_rows else None, plots / "learning_curves.png")
    if not drawn:
        plot_confusion_matrix(metrics["confusion_matrix"], classes, plots / "confusion_matrix.png",
                              title=f"test accuracy {100 * metrics['accuracy']:.2f}%")
    worst = metrics["worst_mistakes"]
    plot_image_grid(test_images[[w["index"] for w in worst]],
                    [f"{classes[w['true']]} → {classes[w['predicted']]}\n{100 * w['probability']:.0f}%" for w in worst],
                    plots / "worst_mistakes.png")
    pair_files = []
    for n, pair in enumerate(metrics["confused_pairs"]):
        idx = np.flatnonzero((test_labels == pair["true_index"]) & (pred == pair["predicted_index"]))[:8]
        pair_files.append(f"confused_pair_{n + 1}.png")
        plot_image_grid(test_images[idx], [f"{pair['true']} → {pair['predicted']}"] * len(idx), plots / pair_files[-1])
    plot_reliability(metrics["calibration"], plots / "reliability.png")
    plot_robustness(metrics["robustness"], plots / "robustness.png")
    has_conv = analysis.last_conv(model) is not None
    if has_conv:
        right = np.flatnonzero(pred == test_labels)
        right = right[analysis.class_balanced_order(test_labels[right])[:6]]  # six classes, not the first one's six
        wrong = np.flatnonzero(pred != test_labels)[:6]
        idx = np.concatenate([right, wrong])
        cams = analysis.grad_cam(model, preprocess, test_images[idx], device=device)
        plot_image_grid(test_images[idx], [f"✓ {classes[pred[i]]}" if pred[i] == test_labels[i] else
                                           f"✗ {classes[pred[i]]}\n(true: {classes[test_labels[i]]})" for i in idx],
                        plots / "grad_cam.png", columns=6, overlays=cams)
        plot_filters(analysis.first_layer_filters(model), plots / "filters.png")
    pick = pick_examples(train_labels, len(classes), min(4, len(classes)), 0)
    plot_training_views(cfg, train_images[pick], train_labels[pick], classes, plots / "augmentation.png")
    layers = summarize(model, (preprocess.model_channels, preprocess.input_size, preprocess.input_size),
                       batch_size=cfg.get("batch_size", 64))
    write_page(run_dir, metrics, classes, pair_files, has_conv, cfg, layer_table(layers))
    return metrics


def report_run(run_dir: Path, device: str = "cpu") -> Path:
    """`cnnkit report RUN`: rebuild everything from the run folder."""
    cfg = run_settings(run_dir)
    run = load_run(run_dir, "best", device)
    _, splits = run_splits(cfg)
    build_report(run_dir, run.model, run.preprocess, run.classes, splits.test.images, splits.test.labels,
                 splits.train.images, splits.train.labels, cfg, device)
    return Path(run_dir) / "report.html"


def _facts(summary: dict[str, Any], cfg: dict[str, Any], selection: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The summary's table: how the run trained (a linear probe's head, fitted once, has no epochs or optimiser)."""
    probe = cfg.get("strategy") == LINEAR_PROBE
    if probe:
        decay = f" at weight decay {selection['chosen']['weight_decay']:g}" if selection else ""
        hidden = (cfg.get("model_args") or {}).get("head_hidden")  # probe.fit_head: Adam for a hidden layer
        how = [("head", f"a hidden layer of {hidden} units, fitted once by Adam{decay}" if hidden else
                f"linear, fitted once by L-BFGS{decay}")]
    else:
        how = [("epochs", f"{summary.get('epochs_run', '?')} of {cfg['epochs']} ({summary.get('status', '')})"),
               ("optimizer", f"{cfg['optimizer']}, lr {cfg['lr']}, batch {cfg['batch_size']}, schedule {cfg['schedule']}")]
    if "probe_images" in summary:
        samples = f"{summary['probe_images']:,} of {summary['train_samples']:,} (as many as the time budget held)"
    elif probe and "cv_images" in summary:
        samples = f"{summary['cv_images']:,} (training and validation: the head learns from all once they have chosen)"
    else:
        samples = summary.get("train_samples", "?")
    facts = [("dataset", summary.get("dataset", cfg["dataset"])), ("model", cfg["model"]),
             ("parameters", f"{summary.get('parameters', 0):,}"), ("recipe", cfg.get("recipe") or "-"), *how,
             ("strategy", describe_choice(summary["strategy_choice"]) + " (--strategy auto)"
              if "strategy_choice" in summary else cfg["strategy"]),
             ("augmentation", cfg["augment"] if isinstance(cfg["augment"], str) else json.dumps(cfg["augment"])),
             ("precision", cfg["precision"]), ("training samples", samples), ("seed", cfg["seed"])]
    if summary.get("test_accuracy_without_copies") is not None:  # data.copies: what new images would get
        facts.insert(0, ("test accuracy without copies", without_copies(summary)))
    return facts


def curves_section(cfg: dict[str, Any], plots: Path, selection: dict[str, Any] | None) -> str:
    """Learning curves; for a linear probe, which has none, its choice of backbone (plot_candidates of
    run.json's `selection`, where it chose among candidates)."""
    if cfg.get("strategy") != LINEAR_PROBE:
        return f"<section><h2>Learning curves</h2>{_img(plots / 'learning_curves.png', 'learning curves')}</section>"
    if not (selection and selection.get("candidates")):
        return ("<section><h2>Learning curves</h2><p>None: a linear probe's head is fitted once, on the backbone's "
                "features.</p></section>")
    return ("<section><h2>Choosing the backbone</h2>" + _img(plots / "candidates.png", "candidates") +
            "<p class='note'>A linear probe has no learning curves: its head is fitted once. Each candidate "
            "backbone (and the two best side by side) was scored by cross-validation on the training images, the test "
            "images unseen: the mean accuracy of the folds, with their standard deviation; the darker bar was chosen. "
            "A candidate scored on plain views alone was more than a standard deviation behind on them, or its mirror "
            "images did not fit the time budget, so they were not computed.</p></section>")


def members_note(model: str) -> str:
    """Which backbone Grad-CAM and the filters show, for backbones side by side (models.concat)."""
    if not is_concat(model):
        return ""
    names = member_names(model)
    return (f" With {len(names)} backbones side by side, the last convolution is {html.escape(names[-1])}'s (the evidence "
            f"the other{'s' if len(names) > 2 else ''} found is not drawn), and the filters below are "
            f"{html.escape(names[0])}'s.")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _num(key: str, text: str) -> str:
    """A number tagged with its place in evaluation.json, so tests can check the page against it."""
    return f'<span data-metric="{html.escape(key)}">{html.escape(text)}</span>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f7fa;color:#1a202c}
header{background:#2b6cb0;color:white;padding:18px 32px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;opacity:.9}main{padding:16px 32px;max-width:1400px}
section{background:white;border-radius:8px;padding:16px 20px;margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{margin-top:0;font-size:18px;color:#2c5282}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#ebf4ff;border-radius:6px;padding:10px 14px;min-width:140px}.card b{display:block;font-size:22px}
.card small{color:#4a5568}table{border-collapse:collapse;font-size:14px}td,th{padding:4px 10px;border-bottom:1px solid #e2e8f0;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%;height:auto}.note{color:#4a5568;font-size:13px}
.warning{background:#fffbea;border-left:4px solid #d69e2e;padding:8px 12px;margin:12px 0}
"""


def layer_table(s: dict[str, Any]) -> str:
    """The network's layers (`cnnkit summary`) as a folded table for the report."""
    e = html.escape

    def row(r: dict[str, Any]) -> str:
        rf = f"{r['receptive_field']['size']:g} px" if r["receptive_field"] else ""
        return (f"<tr><td>{e(r['name'])}</td><td>{e(r['type'])}</td><td>{format_shape(r['output_shape'])}</td>"
                f"<td>{r['params']:,}</td><td>{human(r['macs'])}</td><td>{rf}</td>"
                f"<td style='text-align:left'>{e(r['formula'] or '')}</td></tr>")

    return (f"<details><summary>{len(s['layers'])} layers, {s['total_params']:,} parameters, "
            f"{human(s['total_macs'], 'MAC')} per image (the same table: <code>cnnkit summary RUN</code>)</summary>"
            "<table><tr><th>layer</th><th>type</th><th>output</th><th>params</th><th>MACs</th>"
            f"<th>receptive field</th><th>output size by the formula</th></tr>{''.join(map(row, s['layers']))}"
            "</table></details>")


def write_page(run_dir: Path, metrics: dict[str, Any], classes: list[str], pair_files: list[str], has_conv: bool,
               cfg: dict[str, Any], layers_html: str = "") -> None:
    """report.html; `cfg` is the run's configuration with its decisions (run_settings)."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    summary = read_summary(run_dir)
    e = html.escape
    lo, hi = accuracy_interval(metrics["accuracy"], metrics["samples"])
    validation = (("cross-validated accuracy", f"{100 * summary['cv_accuracy']:.2f}%",
                   f"± {100 * summary['cv_sd']:.2f}, {summary['cv_folds']} folds of {summary['cv_images']} images")
                  if "cv_accuracy" in summary else
                  ("best validation accuracy", f"{100 * summary.get('best_val_accuracy', float('nan')):.2f}%",
                   f"epoch {summary.get('best_epoch', '?')}"))
    cards = [
        ("test accuracy", _num("accuracy", f"{100 * metrics['accuracy']:.2f}%"),
         f"{metrics['samples']} test images; 95%: {100 * lo:.1f}-{100 * hi:.1f}%"),
        validation,
        ("macro F1", _num("macro_f1", f"{metrics['macro_f1']:.3f}"), "mean over classes"),
        ("calibration error", _num("calibration.ece", f"{100 * metrics['calibration']['ece']:.2f}%"), "ECE, 15 bins"),
        _time_card(summary),
    ]
    selection = RunRecord.load(run_dir).selection
    facts = _facts(summary, cfg, selection)

    def pct(key: str, value: float) -> str:
        return _num(key, f"{100 * value:.2f}%")

    def dec(key: str, value: float) -> str:
        return _num(key, f"{value:.3f}")

    per_class = "".join(
        f"<tr><td>{e(r['class'])}</td><td>{dec(f'per_class.{i}.precision', r['precision'])}</td>"
        f"<td>{dec(f'per_class.{i}.recall', r['recall'])}</td><td>{dec(f'per_class.{i}.f1', r['f1'])}</td>"
        f"<td>{_num(f'per_class.{i}.support', str(r['support']))}</td></tr>"
        for i, r in enumerate(metrics["per_class"]))
    pairs = "".join(
        f"<h3>{e(p['true'])} taken for {e(p['predicted'])}: {_num(f'confused_pairs.{i}.count', str(p['count']))} time{'s' if p['count'] != 1 else ''}</h3>"
        + _img(plots / f, f"{p['true']} predicted as {p['predicted']}")
        for i, (p, f) in enumerate(zip(metrics["confused_pairs"], pair_files)))
    rob = metrics["robustness"]
    clean_note = _clean_beside_test(rob["samples"], metrics["samples"], metrics["accuracy"], cfg.get("tta", "none"))
    rob_rows = "".join(
        f"<tr><td>{e(c['name'])}</td><td>{c['severity']} ({e(str(c['value']))} {e(c['unit'])})</td>"
        f"<td>{pct(f'robustness.corruptions.{i}.accuracy', c['accuracy'])}</td></tr>"
        for i, c in enumerate(rob["corruptions"]))
    looks = (_img(plots / "grad_cam.png", "Grad-CAM") + "<p class='note'>Grad-CAM of the last convolution for the "
             "predicted class: red is where the evidence for it lies. First six are right, last six wrong."
             f"{members_note(cfg['model'])}</p>"
             + _img(plots / "filters.png", "first-layer filters")) if has_conv else "<p>No convolution in this model.</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cnnkit report: {e(run_dir.name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><header><h1>{e(run_dir.name)}</h1><p>{e(str(summary.get('dataset', cfg['dataset'])))} · {e(cfg['model'])} ·
finished {e(str(summary.get('finished_at', '')))}</p></header><main>
{''.join(f'<p class="warning">{e(w)}</p>' for w in summary.get('warnings', []))}
<section><h2>Summary</h2><div class="cards">{''.join(f'<div class="card"><small>{t}</small><b>{v}</b><small>{s}</small></div>' for t, v, s in cards)}</div>
<table style="margin-top:12px">{''.join(f'<tr><td>{e(k)}</td><td style="text-align:left">{e(str(v))}</td></tr>' for k, v in facts)}</table></section>
{curves_section(cfg, plots, selection)}
<section><h2>Confusion matrix</h2>{_img(plots / 'confusion_matrix.png', 'confusion matrix')}
<h3>Per class</h3><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class}</table></section>
<section><h2>Most confused pairs</h2>{pairs or '<p>No mistakes.</p>'}</section>
<section><h2>Worst mistakes</h2><p class="note">Test images with the largest loss: true → predicted, and the
probability the model gave its prediction.</p>{_img(plots / 'worst_mistakes.png', 'worst mistakes')}</section>
<section><h2>What the network looks at</h2>{looks}</section>
<section><h2>Augmentation</h2>{_img(plots / 'augmentation.png', 'augmentation')}</section>
<section><h2>Robustness</h2><p class="note">Accuracy on {rob['samples']} test images (the classes in turn{_one_image(rob['samples'])}), clean:
{pct('robustness.clean', rob['clean'])}{clean_note}, and under each corruption (shifts and blurs in pixels scaled to the images'
side: the same share of the picture as at 32 px).</p>
{_img(plots / 'robustness.png', 'robustness')}<table><tr><th>corruption</th><th>severity</th><th>accuracy</th></tr>{rob_rows}</table></section>
<section><h2>Layers</h2>{layers_html or '<p>Not computed.</p>'}</section>
<section><h2>Calibration</h2><p class="note">How far the model's confidence is from its accuracy.</p>
{_img(plots / 'reliability.png', 'reliability diagram')}</section>
<p class="note">All numbers: evaluation.json · all plots: plots/ · made by cnnkit</p>
</main></body></html>
"""
    write_bytes_atomic(run_dir / "report.html", page.encode())
