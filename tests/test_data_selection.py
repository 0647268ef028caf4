"""Data selection (`last_epoch_fraction`): the last epoch trains on the images with the highest loss
in the epoch before it, the run's length and schedule end with it, and a resumed run picks the same."""

import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.checkpoint import load_checkpoint
from cnnkit.config import Config, apply_overrides, load_recipe
from cnnkit.data.dataset import Split
from cnnkit.data.loader import BatchLoader
from cnnkit.errors import ConfigError, TrainingInterrupted
from cnnkit.training import Hook, train
from cnnkit.training.data_selection import run_steps, why_not
from cnnkit.training.schedule import lr_factor, warmup_steps


def loader(n: int = 100, batch: int = 10, **kw) -> BatchLoader:
    split = Split(np.zeros((n, 1, 2, 2), np.uint8), np.arange(n) % 5)
    return BatchLoader(split, batch, shuffle=True, seed=3, drop_last=True, **kw)


def test_put_first_starts_the_epoch_with_the_samples_then_the_rest_in_the_usual_order():
    lo = loader()
    usual = lo.order(2)
    first = torch.tensor([5, 17, 42, 99, 0, 63])
    lo.put_first(2, first)
    order = lo.order(2)
    assert sorted(order.tolist()) == list(range(100))  # every sample once
    assert set(order[:6].tolist()) == set(first.tolist())
    assert order[6:].tolist() == [i for i in usual.tolist() if i not in set(first.tolist())]
    assert torch.equal(lo.order(2), order) and torch.equal(lo.order(1), loader().order(1))  # seeded; other epochs as before
    weighted = loader(sample_weights=np.ones(100))
    with pytest.raises(ValueError, match="with weights"):
        weighted.put_first(2, first)


def test_the_runs_length_cuts_only_the_last_epoch_and_only_where_selection_applies():
    cfg = Config.from_dict({"epochs": 3, "last_epoch_fraction": 0.7})
    assert run_steps(cfg, 10) == 27 and run_steps(cfg, 225) == 2 * 225 + 158
    assert run_steps(apply_overrides(cfg, {"last_epoch_fraction": 1.0}), 10) == 30
    for change, reason in [({"epochs": 1}, "one epoch"), ({"time_budget": "2m"}, "time-budget"),
                           ({"class_balance": "sampler"}, "replacement")]:
        changed = apply_overrides(cfg, change)
        assert reason in why_not(changed) and run_steps(changed, 10) == 10 * changed.epochs
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="last_epoch_fraction"):
            Config.from_dict({"last_epoch_fraction": bad})


def small(tmp_path, name: str, **kw) -> Config:
    return apply_overrides(load_recipe("fmnist-quick"), {
        "max_train_samples": 1200, "max_eval_samples": 300, "epochs": 3, "batch_size": 100, "report": False,
        "precision": "fp32", "fp32": {}, "model_args": {"widths": [8, 16, 32]}, "last_epoch_fraction": 0.5,
        "deterministic": True, "output": str(tmp_path), "name": name, **kw})


class Watch(Hook):
    """Each image's loss in epoch 2 (computed here, apart from the selection's own record), and the
    images each epoch trained on."""

    def __init__(self):
        self.losses: dict[int, float] = {}
        self.trained: dict[int, list[int]] = {}

    def after_step(self, loop):
        b, epoch = loop.last_batch, loop.state.epoch + 1
        self.trained.setdefault(epoch, []).extend(b.ids.tolist())
        if epoch == 2:
            per_image = F.cross_entropy(b.logits.float(), b.labels, reduction="none")
            self.losses.update(zip(b.ids.tolist(), per_image.tolist()))


@pytest.mark.slow
def test_the_last_epoch_trains_on_the_images_with_the_highest_loss_in_the_epoch_before(tmp_path):
    watch = Watch()
    result = train(small(tmp_path, "sel"), hooks=[watch])
    n = result.summary["steps_per_epoch"]  # 1152 training images (1200 less 4% validation): 11 batches
    kept = math.ceil(0.5 * n)
    assert result.summary["steps_run"] == result.summary["schedule_steps"] == 2 * n + kept
    assert [len(watch.trained[e]) for e in (1, 2, 3)] == [100 * n, 100 * n, 100 * kept]
    hardest = sorted(watch.losses, key=watch.losses.get, reverse=True)[: 100 * kept]
    assert sorted(watch.trained[3]) == sorted(hardest)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [n, 2 * n, 2 * n + kept]
    total, cfg = 2 * n + kept, small(tmp_path, "unused")
    last = lr_factor(total - 1, total, warmup_steps(cfg.warmup_epochs, n, total), cfg.schedule)
    assert rows[-1]["lr"] == pytest.approx(cfg.lr * last)  # the schedule ends where the shortened run does
    assert result.summary["test_accuracy"] > 0.5


class StopAt(Hook):
    def __init__(self, step: int):
        self.step = step

    def after_step(self, loop):
        if loop.state.step == self.step:
            loop.interrupt(signal.SIGTERM)


@pytest.mark.slow
def test_a_run_stopped_in_its_last_epoch_resumes_on_the_same_images(tmp_path):
    whole = train(small(tmp_path, "whole"))
    n = whole.summary["steps_per_epoch"]
    with pytest.raises(TrainingInterrupted):
        train(small(tmp_path, "stopped"), hooks=[StopAt(2 * n + 2)])
    resumed = train(None, resume=tmp_path / "stopped")
    assert resumed.summary["steps_run"] == whole.summary["steps_run"]
    a = load_checkpoint(whole.run_dir / "checkpoints" / "last").model
    b = load_checkpoint(resumed.run_dir / "checkpoints" / "last").model
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained on other images"


@pytest.mark.slow
def test_two_processes_rank_every_image_not_only_their_own_share(tmp_path):
    args = ["--recipe", "fmnist-baseline", "--max-train-samples", "2000", "--max-eval-samples", "300", "--epochs", "2",
            "--batch-size", "64", "--report", "false", "--last-epoch-fraction", "0.5", "--output", str(tmp_path)]
    two = subprocess.run([sys.executable, "-m", "cnnkit", "train", *args, "--nproc", "2", "--name", "two"],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "with the highest loss in epoch 1" in two.stderr
    checkpoint = load_checkpoint(tmp_path / "two" / "checkpoints" / "last")
    losses = checkpoint.extra["data_selection.losses"]
    seen = (losses >= 0).float().mean().item()  # -1: no loss recorded (not seen, or another rank's)
    assert seen > 0.95, f"rank 0 ranked {seen:.0%} of the images: the ranks' losses were not merged"
