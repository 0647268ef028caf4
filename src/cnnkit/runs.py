"""A run folder, as every command after `train` reads it.

    RUN/config.json          the resolved configuration: what the run was asked to do (never changed)
    RUN/run.json             what the run decided while it ran (a time budget's plan), when it did
    RUN/metrics.jsonl        one line of metrics per epoch
    RUN/checkpoints/best.*   weights with the best validation accuracy (+ JSON metadata)
    RUN/checkpoints/last.*   weights and optimiser state after the last epoch, for --resume
    RUN/evaluation.json      test metrics; RUN/plots/confusion_matrix.png
    RUN/summary.json         what happened, in numbers

The run folder's files are read without torch (the ONNX server reads a run's summary and stays
at a fifth of the memory); loading a model or drawing a plot imports what it needs when called.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.config import PROBE_MODEL_ARGS
from cnnkit.errors import RunError
from cnnkit.fileio import write_json_atomic

if TYPE_CHECKING:
    import torch

    from cnnkit.data import Dataset, Splits
    from cnnkit.preprocess import Preprocess


@dataclass
class RunRecord:
    """What a run decided while it ran, kept apart from what it was asked (config.json): a time
    budget's planned steps (and the epochs they span), and the test-time views and robustness
    samples it chose. None: nothing decided, the configuration holds. Read by --resume, and by
    evaluate, report and predict through `run_settings`."""

    planned_steps: int | None = None
    epochs: int | None = None
    planned_time_s: float | None = None
    tta: str | None = None
    report_robustness_samples: int | None = None
    model: str | None = None  # a linear probe's backbone, chosen by cross-validation (training/choose.py)
    model_args: dict[str, Any] | None = None  # ... with its member sizes, when it is backbones side by side
    selection: dict[str, Any] | None = None  # ... its estimate and every candidate's
    strategy: str | None = None  # the strategy --strategy auto chose (training/choose_strategy.py)
    strategy_selection: dict[str, Any] | None = None  # ... and every strategy's accuracy on the folds
    stop_after_epoch: int | None = None  # ... and the epoch at which its folds were best, where earlier than the last
    probe_images: int | None = None  # the training images a linear probe's head learnt from under --time-budget
    probe_flip: bool | None = None  # False: a time budget left a chosen probe's mirror images out (training/choose.py)

    def planned(self, steps: int, epochs: int, planned_time_s: float) -> None:
        self.planned_steps, self.epochs, self.planned_time_s = steps, epochs, round(planned_time_s, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def settings(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """The configuration with the decisions applied: how the run actually trained and tests."""
        decided = {k: v for k, v in self.to_dict().items() if v is not None and k in cfg}
        if decided.get("strategy", "linear-probe") != "linear-probe":  # auto chose to train: as it trained its folds
            decided = {**cfg.get("auto_trained", {}), **decided, "probe_candidates": [], "probe_concat": False,
                       "probe_blocks": 0}
            args = decided.get("model_args", cfg.get("model_args", {}))
            decided["model_args"] = {k: v for k, v in args.items() if k not in PROBE_MODEL_ARGS}
        return {**cfg, **decided}

    def save(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / "run.json", self.to_dict())

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        path = Path(run_dir) / "run.json"
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


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
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.models import create_model
    from cnnkit.preprocess import Preprocess

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
    from cnnkit.evaluate import plot_confusion_matrix

    suffix = "" if checkpoint == "best" else f"-{checkpoint}"
    path = run_dir / f"evaluation{suffix}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    write_json_atomic(path, {**previous, "split": split, "checkpoint": checkpoint, "classes": classes, **metrics})
    plot_confusion_matrix(metrics["confusion_matrix"], classes, run_dir / "plots" / f"confusion_matrix{suffix}.png",
                          title=f"{split} accuracy {100 * metrics['accuracy']:.2f}%")


def run_splits(cfg: dict[str, Any], data_dir: str | None = None) -> tuple[Dataset, Splits]:
    """The run's dataset and its train/validation/test splits, from its configuration: training
    builds them with it, and the commands after it find the same test images again (the same seed
    and fractions give the same splits). `data_dir` overrides where the data is."""
    from cnnkit.data import load_dataset, make_splits

    ds = load_dataset(cfg["dataset"], data_dir or cfg["data_dir"], image_size=cfg["image_size"],
                      channels=cfg["channels"], skip_bad_images=cfg["skip_bad_images"])
    return ds, make_splits(ds, val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"], seed=cfg["seed"],
                           max_train_samples=cfg["max_train_samples"], max_eval_samples=cfg["max_eval_samples"],
                           final_fit=cfg.get("final_fit", False))


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.json: what the run was asked to do."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a cnnkit run folder (no config.json)")
    return json.loads(path.read_text())


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The configuration as the run used it: config.json with run.json's decisions applied."""
    return RunRecord.load(run_dir).settings(read_config(run_dir))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json (what happened, in numbers); {} for a run that has not finished."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}
