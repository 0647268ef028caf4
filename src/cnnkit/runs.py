"""A run folder, as every command after `train` reads it.

    RUN/config.json          the resolved configuration
    RUN/metrics.jsonl        one line of metrics per epoch
    RUN/checkpoints/best.*   weights with the best validation accuracy (+ JSON metadata)
    RUN/checkpoints/last.*   weights and optimiser state after the last epoch, for --resume
    RUN/evaluation.json      test metrics; RUN/plots/confusion_matrix.png
    RUN/summary.json         what happened, in numbers
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnkit.checkpoint import load_checkpoint
from cnnkit.errors import RunError
from cnnkit.evaluate import plot_confusion_matrix
from cnnkit.fileio import write_json_atomic
from cnnkit.models import create_model
from cnnkit.preprocess import Preprocess


@dataclass
class LoadedRun:
    run_dir: Path
    model: torch.nn.Module
    meta: dict[str, Any]
    preprocess: Preprocess

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def checkpoint_stem(run_dir: Path, which: str = "best") -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    stem = run_dir / "checkpoints" / which
    if not stem.with_suffix(".safetensors").exists():
        raise RunError(f"{run_dir} has no {which} checkpoint; is it a cnnkit run folder, and did training finish an epoch?")
    return stem


def load_run(run_dir: Path, which: str = "best", device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild the model of a run from its checkpoint metadata and load its weights (eval mode)."""
    ckpt = load_checkpoint(checkpoint_stem(run_dir, which))
    state, meta = ckpt.model, ckpt.meta
    preprocess = Preprocess.from_dict(meta["preprocess"])
    model = create_model(meta["model"], meta["num_classes"], preprocess.model_channels, preprocess.input_size,
                         **meta.get("model_args", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(f"{run_dir}: the checkpoint does not fit model {meta['model']}: {e}") from None
    model.to(device).eval()
    return LoadedRun(Path(run_dir), model, meta, preprocess)


def save_evaluation(run_dir: Path, metrics: dict[str, Any], classes: list[str], *, split: str, checkpoint: str) -> None:
    """Write evaluation.json and plots/confusion_matrix.png (for the `last` checkpoint: *-last.*).

    Keys this evaluation does not compute (the report's robustness, calibration, ...) are kept
    from an existing file of the same checkpoint, so the report and the file stay in agreement.
    """
    suffix = "" if checkpoint == "best" else f"-{checkpoint}"
    path = run_dir / f"evaluation{suffix}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    write_json_atomic(path, {**previous, "split": split, "checkpoint": checkpoint, "classes": classes, **metrics})
    plot_confusion_matrix(metrics["confusion_matrix"], classes, run_dir / "plots" / f"confusion_matrix{suffix}.png",
                          title=f"{split} accuracy {100 * metrics['accuracy']:.2f}%")


def run_splits(cfg: dict[str, Any], data_dir: str | None = None):
    """The run's dataset and its train/validation/test splits, rebuilt from its configuration
    (the same seed and fractions give the same splits). `data_dir` overrides where the data is."""
    from cnnkit.data import load_dataset, make_splits

    ds = load_dataset(cfg["dataset"], data_dir or cfg["data_dir"], image_size=cfg["image_size"],
                      channels=cfg["channels"], skip_bad_images=cfg["skip_bad_images"])
    return ds, make_splits(ds, val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"], seed=cfg["seed"],
                           max_train_samples=cfg["max_train_samples"], max_eval_samples=cfg["max_eval_samples"])


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a cnnkit run folder (no config.json)")
    return json.loads(path.read_text())
