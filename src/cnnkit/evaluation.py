"""Evaluating a trained run: on its own test split (`cnnkit evaluate RUN`), or on any labelled
folder of images whose class folders carry the run's class names (`--data-dir FOLDER`), which is
how a user checks a model on new photos; a dataset of its own (train/ and test/ inside) by its
test split. Anything but the run's own data goes beside the run's own evaluation
(RUN/evaluations/NAME.json), never over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.data import load_dataset
from cnnkit.data.copies import copies_among
from cnnkit.data.dataset import Split
from cnnkit.errors import DataError
from cnnkit.evaluate import accuracy_without, classification_metrics, plot_confusion_matrix
from cnnkit.fileio import write_json_atomic
from cnnkit.inference import InferenceSettings, predict_logits
from cnnkit.runs import load_run, run_settings, run_splits, save_evaluation


TRAINED_ON = "the images this run trained on"  # in the note on a run's own training folder


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    split: str  # "test", or the folder evaluated
    tta: str
    saved_to: Path | None  # None: printed only (another TTA than the run's own)
    notes: list[str]


def evaluate_run(run_dir: Path, *, checkpoint: str = "best", tta: str | None = None, data_dir: str | None = None,
                 skip_unknown_classes: bool = False, device: torch.device | str = "cpu") -> Evaluation:
    """The run's test split (where its dataset is now: `data_dir`), or a labelled folder: a folder
    of class folders (no train/ or test/ inside; or test/ alone: `whole_folder`) is evaluated whole, against the run's classes; a
    dataset elsewhere (train/ and test/ inside) by its test split, its classes matched by name. Only
    the run's own data (no `data_dir`, or the one it trained on) is saved as evaluation.json."""
    cfg = run_settings(run_dir)  # with the run's own decisions (a budget's test views)
    run = load_run(run_dir, checkpoint, device)
    run_tta = cfg.get("tta", "none")
    folder = Path(data_dir) if data_dir else None
    whole = whole_folder(folder) if folder is not None else None
    tree = whole is not None  # else the run's dataset, or one laid out like it
    if whole is not None:
        split, notes = _folder_split(whole, run.classes, run.preprocess.data_size, run.preprocess.data_channels,
                                     cfg["skip_bad_images"], skip_unknown_classes)
        notes += _training_images_note(whole, cfg.get("data_dir"))
    else:
        ds, splits = run_splits(cfg, data_dir)
        split, notes = in_run_classes(splits.test, ds.classes, run.classes, data_dir or cfg["data_dir"],
                                      skip_unknown_classes)
    own = folder is None or (not tree and _same_path(folder, cfg.get("data_dir")))
    out = None if own else Path(run_dir) / "evaluations" / f"{_name(folder)}.json"
    name = "test" if out is None else str(whole) if tree else f"{folder} (its test split)"
    used = tta or run_tta
    logits = predict_logits(run.model, run.preprocess, split.images, device=device, tta=used, description="evaluating",
                            **InferenceSettings.for_run(cfg, device).kwargs())
    metrics = classification_metrics(logits, split.labels, run.classes)
    if out is not None and not any(TRAINED_ON in n for n in notes):  # new photos: any the run learnt from?
        metrics, notes = _without_copies_of_training(cfg, split, logits, metrics, notes)
    if used != run_tta:
        return Evaluation(metrics, name, used, None, notes)
    if out is None:
        save_evaluation(Path(run_dir), metrics, run.classes, split="test", checkpoint=checkpoint)
        return Evaluation(metrics, name, used, Path(run_dir) / "evaluation.json", notes)
    write_json_atomic(out, {"split": str(folder), "checkpoint": checkpoint, "classes": run.classes, "notes": notes,
                            **metrics})
    plot_confusion_matrix(metrics["confusion_matrix"], run.classes, out.with_suffix(".png"),
                          title=f"{folder}: accuracy {100 * metrics['accuracy']:.2f}%")
    return Evaluation(metrics, name, used, out, notes)


def _without_copies_of_training(cfg: dict[str, Any], split: Split, logits: torch.Tensor, metrics: dict[str, Any],
                                notes: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Where images evaluated as new are copies (exact or near: data.copies) of the run's training or
    validation images, a note saying how many, and the accuracy without them (`accuracy_without_copies`)."""
    _, splits = run_splits(cfg)
    copied = copies_among(split.images, np.concatenate([splits.train.images, splits.val.images]))
    if not len(copied):
        return metrics, notes
    accuracy = accuracy_without(logits, split.labels, copied)
    without = f"; without them {100 * accuracy:.2f}% on {len(split) - len(copied)}" if accuracy is not None else ""
    return ({**metrics, "accuracy_without_copies": accuracy, "copies_of_training_images": int(len(copied))},
            [*notes, f"{len(copied)} of the {len(split)} images are copies (exact, or saved again, rescaled, brighter or "
                     f"darker) of images this run learnt from{without}"])


def _same_path(a: Path, b: str | None) -> bool:
    return b is not None and a.resolve() == Path(b).resolve()


def _training_images_note(folder: Path, data_dir: str | None) -> list[str]:
    """A note where a folder evaluated whole holds the images the run trained on: the run's own folder
    of class folders (its test split was carved out of it), or its dataset's train/ folder."""
    from cnnkit.data.folder import SPLIT_ALIASES

    if data_dir is None or not Path(data_dir).is_dir():
        return []
    trained = [Path(data_dir), *(p for p in Path(data_dir).iterdir() if SPLIT_ALIASES.get(p.name.lower()) == "train")]
    if not any(_same_path(folder, str(p)) for p in trained):
        return []
    return [f"{folder} holds {TRAINED_ON}, so this accuracy overstates what new photos would get; "
            "`cnnkit evaluate RUN` (no --data-dir) evaluates its held-out test split"]


def whole_folder(folder: Path) -> Path | None:
    """The folder of class folders to evaluate whole: `folder` itself where its class folders sit at its
    top (or under one wrapping folder), its test/ (or val/) folder where it holds that and no train/;
    None where it is a dataset with train/ inside (its test split is evaluated, carved out as the run's
    was), or not a directory or an archive."""
    from cnnkit.data.folder import is_archive, list_layout

    if not (folder.is_dir() or is_archive(folder)):
        return None
    found = list_layout(folder, need_train=False).split_folders
    if not found:
        return folder
    if "train" in found:
        return None
    if is_archive(folder):
        raise DataError(f"{folder} holds {', '.join(f + '/' for f in sorted(found.values()))} and no train/: unpack it "
                        "and evaluate that folder (a folder of class folders)")
    return folder / found["test" if "test" in found else min(found)]


def _folder_split(folder: Path, classes: list[str], size: int, channels: int, skip_bad: bool,
                  skip_unknown: bool) -> tuple[Split, list[str]]:
    """The folder's images, decoded to the run's data size and channels, with labels in the run's
    class order."""
    ds = load_dataset("folder", str(folder), image_size=size, channels=channels, skip_bad_images=skip_bad)
    return in_run_classes(ds.splits["train"], ds.classes, classes, folder, skip_unknown)  # no train/ test/: all in "train"


def in_run_classes(split: Split, split_classes: list[str], classes: list[str], where: Path | str | None,
                   skip_unknown: bool) -> tuple[Split, list[str]]:
    """`split` (labelled in `split_classes`' order) with labels in the run's `classes` order, matched
    by name: a class the run does not know is refused (`skip_unknown`: its images left out), one it
    lacks is noted. A dataset with the run's own classes comes back as it is."""
    if list(split_classes) == list(classes):
        return split, []
    unknown = [c for c in split_classes if c not in classes]
    missing = [c for c in classes if c not in split_classes]
    notes = [f"no images of {', '.join(missing)} in {where}"] if missing else []
    if unknown and not skip_unknown:
        raise DataError(f"{where} has class folders the run does not know: {', '.join(unknown)}"
                        + (f" (and none of the run's {', '.join(missing)})" if missing else "")
                        + f". The run's classes: {', '.join(classes)}. Rename the folders, or pass "
                        "--skip-unknown-classes to leave their images out.")
    index = {c: classes.index(c) for c in split_classes if c in classes}
    keep = np.array([split_classes[y] in index for y in split.labels], dtype=bool)
    if unknown:
        notes.append(f"left out {int((~keep).sum())} images of classes the run does not know: {', '.join(unknown)}")
    if not keep.any():
        raise DataError(f"{where}: no images of the run's classes ({', '.join(classes)})")
    labels = np.array([index[split_classes[y]] for y in split.labels[keep]], dtype=np.int64)
    return Split(split.images[keep], labels), notes


def _name(folder: Path) -> str:
    """flowers12/test -> flowers12-test: the folder and its parent, readable and rarely ambiguous."""
    parts = folder.resolve().parts[-2:]
    return "-".join(p for p in parts if p not in ("/", ""))
