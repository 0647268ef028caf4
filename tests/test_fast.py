"""The fast recipes' pieces: fastnet, Lookahead, the linear schedule, bias learning rates,
shift TTA, the time budget and the learning-rate range test."""

import json
import logging
import re
import signal
import time

import numpy as np
import pytest
import torch

from cnnkit.augment import tta_views
from cnnkit.budget import Costs, describe_plan, fit_extras, fit_steps, parse_duration, recent_epoch_s, run_end_s
from cnnkit.checkpoint import load_checkpoint
from cnnkit.cli import _part_epoch, main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.lookahead import Lookahead
from cnnkit.models import create_model
from cnnkit.report import lr_curve
from cnnkit.runs import RunRecord, run_settings
from cnnkit.training import Hook, TrainingInterrupted, lr_factor, make_optimizer, train
from cnnkit.training.budget_hook import TimeBudget, final_images


def test_fastnet_shapes_and_frozen_parameters():
    for channels, size in ((1, 28), (3, 32), (3, 64)):
        net = create_model("fastnet", 10, channels, size, widths=[8, 16, 32])
        assert net(torch.rand(2, channels, size, size)).shape == (2, 10)
    assert not net.stem.weight.requires_grad  # whitened: fixed
    assert all(not m.weight.requires_grad for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ConfigError, match="at least 16 pixels"):
        create_model("fastnet", 10, 1, 8, widths=[8, 16, 32])


@pytest.mark.parametrize("channels, kernel", [(3, 2), (1, 3)])
def test_whitening_stem_decorrelates_patches(channels, kernel):
    torch.manual_seed(0)
    # Strongly correlated neighbouring pixels, as in photos: a smooth image plus a little noise.
    x = (torch.nn.functional.interpolate(torch.randn(64, channels, 8, 8), size=32, mode="bilinear")
         + 0.05 * torch.randn(64, channels, 32, 32))
    net = create_model("fastnet", 10, channels, 32, widths=[8, 16, 32], stem_kernel=kernel)
    net.init_from_data(x, eps=0.0)
    half = net.stem.weight.shape[0] // 2
    assert half == channels * kernel**2  # every direction of a kxk patch
    out = torch.nn.functional.conv2d(x, net.stem.weight[:half]).permute(0, 2, 3, 1).reshape(-1, half)
    cov = torch.cov(out.T.double())
    assert torch.allclose(cov, torch.eye(half, dtype=torch.float64), atol=5e-3)  # float32 patches, tiny eigenvalues
    assert torch.equal(net.stem.weight[half:], -net.stem.weight[:half])


def test_lookahead_syncs_every_k_steps_and_ends_on_the_slow_weights():
    model = torch.nn.Linear(3, 2)
    la = Lookahead(model, every=5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    la.after_step(model, 4, 100)  # not a sync step: nothing happens
    assert torch.equal(model.weight, start + 1)
    la.after_step(model, 50, 100)  # decay 0.95**5 / 8: the slow weights move most of the way
    d = la.decay(50, 100)
    assert torch.allclose(model.weight, start + (1 - d)) and torch.equal(la.slow["weight"], model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    la.after_step(model, 100, 100)  # the end: the model takes the slow weights (as airbench's final update)
    assert torch.allclose(model.weight, start + (1 - d))


def test_linear_schedule_and_bias_learning_rates():
    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "linear") == 0.0
    cfg = apply_overrides(load_recipe("fmnist-quick"), {})
    opt = make_optimizer(cfg, create_model("fastnet", 10, 1, 28, widths=[8, 16, 32]))
    weights, biases = opt.param_groups
    assert weights["lr"] == cfg.lr and biases["lr"] == cfg.lr * cfg.bias_lr_scale == biases["initial_lr"]
    assert biases["weight_decay"] == 0 and weights["weight_decay"] == cfg.weight_decay
    # bias_decay: biases shrink as much per step as the weights (lr x decay), as in airbench
    _, biases = make_optimizer(apply_overrides(cfg, {"bias_decay": True}), create_model("fastnet", 10, 1, 28)).param_groups
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(cfg.lr * cfg.weight_decay)


def test_frozen_after_names_must_be_trainable_parameters():
    model = create_model("fastnet", 10, 1, 28, widths=[8, 16, 32])
    with pytest.raises(ConfigError, match=r"stem\.bais \(did you mean stem\.bias\?\)"):
        make_optimizer(apply_overrides(load_recipe("fmnist-quick"), {"frozen_after": {"stem.bais": 3}}), model)
    with pytest.raises(ConfigError, match="stem.weight"):  # the whitening stem's filters never train
        make_optimizer(apply_overrides(load_recipe("fmnist-quick"), {"frozen_after": {"stem.weight": 3}}), model)
    with pytest.raises(ConfigError, match="positive number of epochs"):
        apply_overrides(load_recipe("fmnist-quick"), {"frozen_after": {"stem.bias": 0}})


def test_shift_tta_has_no_mirror_views():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = tta_views(x, "shift")
    assert len(views) == 3 and torch.equal(views[0], x)
    assert not any(torch.equal(v, x.flip(-1)) for v in views)
    assert torch.equal(views[1][..., 1:3, 1:3], x[..., 2:4, 2:4])  # one pixel diagonally


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h30m", 5400), ("2.5m", 150), ("45", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "-5m", "0s", "5m junk"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration(text)


def test_fit_steps_arithmetic():
    costs = Costs(epoch_s=10, val_s=1, final_s=20)  # 100 steps an epoch: 0.1 s a step
    # 0.95 * 200 - 10 elapsed - 20 final = 160 s left: 14 epochs of 11 s, and 6 s: 50 steps and a validation
    assert fit_steps(200, 10, 0, 100, costs) == 1450
    assert run_end_s(10, 0, 1450, 100, costs) == pytest.approx(190) and run_end_s(10, 0, 1451, 100, costs) > 190
    # within an epoch: its steps done count, and its validation is still to come
    assert fit_steps(200, 10, 30, 100, costs) == 1480
    assert fit_steps(200, 10, 300, 100, costs) == 1750
    # where no whole epoch fits, the part of the first that does: 3 steps and (0.95 * 30 - 5 - 1 - 20) / 0.1
    assert fit_steps(30, 5, 3, 100, costs) == 3 + 25
    assert fit_steps(30, 25, 50, 100, costs) == 51  # over budget already: one more step, then the test
    assert fit_steps(30, 25, 200, 100, costs) == 200  # ... or, between epochs, none
    assert fit_steps(200, 179.9, 0, 100, costs) == 1  # the run is at least one step
    assert describe_plan(1450, 100) == "14 epochs of 100 steps and 50 more"
    assert describe_plan(100, 100) == "1 epoch of 100 steps" and describe_plan(25, 100) == "25 of the first epoch's 100 steps"
    summary = {"steps_run": 145, "steps_per_epoch": 100, "status": "finished"}
    assert _part_epoch(summary) == ", 145 steps: the last epoch in part"  # in the table `cnnkit train` prints
    assert _part_epoch({**summary, "steps_run": 200}) == _part_epoch({**summary, "status": "stopped early"}) == ""
    assert recent_epoch_s([9.0, 30.0, 10.0, 11.0, 12.0]) == 11.0  # the last three only
    assert recent_epoch_s([12.0]) == 12.0
    assert recent_epoch_s([10.0, 10.0, 12.0]) == pytest.approx(32 / 3)  # noise: the mean ...
    assert recent_epoch_s([10.0, 10.0, 20.0]) == 20.0  # ... a machine half as fast: the last epoch
    assert recent_epoch_s([20.0, 10.0, 10.0]) == pytest.approx(40 / 3)  # a faster one is followed slowly


def test_fit_extras_gives_test_views_and_robustness_samples_a_share_of_the_budget():
    views = {"none": 1, "flip": 2, "shift": 3, "flip-shift": 6}.get
    # 400 images/s, a tenth of the budget: 12 000 evaluations in 5 minutes, 36 000 in 15, 120 000 in 50
    assert fit_extras(300, 1 / 400, 10_000, "flip-shift", views, 500, 22, 10) == ("flip", 2000 // 22)  # 2000 left
    assert fit_extras(900, 1 / 400, 10_000, "flip-shift", views, 500, 22, 10) == ("flip", 500)
    assert fit_extras(3000, 1 / 400, 10_000, "flip-shift", views, 500, 22, 10) == ("flip-shift", 500)
    assert fit_extras(60, 1 / 400, 10_000, "shift", views, 2000, 22, 10) == ("none", 2400 // 22)
    assert fit_extras(60, 1 / 400, 10_000, "none", views, 0, 22, 10) == ("none", 0)  # no report
    # a 224-px backbone at 100 images/s, a minute: 600 evaluations, 27 samples; 10 seconds: 4, so one a class
    assert fit_extras(60, 1 / 100, 1000, "flip", views, 100, 22, 10) == ("none", 600 // 22)
    assert fit_extras(10, 1 / 100, 1000, "flip", views, 100, 22, 10) == ("none", 10)


def test_the_report_draws_the_schedule_the_run_had():
    cfg = {"epochs": 2, "warmup_epochs": 1.0, "lr": 2.0, "schedule": "linear"}
    x, lr = lr_curve(cfg, 100, 150)  # a budget planned 1.5 epochs: warm-up is half of them, then decay
    assert 1.45 <= x[-1] < 1.5 and x[np.argmax(lr)] == pytest.approx(0.75, abs=0.02) and lr.max() == 2.0
    assert lr[-1] < 0.05
    x, lr = lr_curve(cfg, 100)  # without a plan: the config's epochs
    assert 1.95 <= x[-1] < 2 and x[np.argmax(lr)] == pytest.approx(1.0, abs=0.02)


def small(tmp_path, name, **kw):
    base = {"max_train_samples": 3000, "max_eval_samples": 1000, "output": str(tmp_path), "name": name,
            "model_args": {"widths": [16, 32, 64]}, "batch_size": 128, "lr": 0.4, "report": False}
    return apply_overrides(load_recipe("fmnist-quick"), {**base, **kw})


class SignalAt(Hook):
    """A SIGTERM arrives during optimiser step `step`, as the signal handler would report it."""

    def __init__(self, step: int, delay_s: float = 0.0):
        self.step, self.delay_s = step, delay_s

    def before_step(self, loop):
        time.sleep(self.delay_s)

    def after_step(self, loop):
        if loop.state.step == self.step:
            loop.interrupt(signal.SIGTERM)


class Slow(Hook):
    """A slower machine: every step (from epoch `from_epoch` + 1 on) takes `seconds` longer."""

    def __init__(self, seconds: float, from_epoch: int = 0):
        self.seconds, self.from_epoch = seconds, from_epoch

    def before_step(self, loop):
        if loop.state.epoch >= self.from_epoch:
            time.sleep(self.seconds)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "muon", "lookahead": False}], ids=["sgd-lookahead", "muon"])
def test_fast_recipe_learns_and_resumes_exactly(tmp_path, monkeypatch, capsys, optimizer):
    full = train(small(tmp_path, "full", epochs=2, **optimizer))
    assert full.test["accuracy"] > 0.6  # 3000 images, two epochs of a tiny fastnet
    # `cnnkit evaluate` reproduces the run's own test figure: same precision (bf16 where the CPU
    # has it), memory format (channels-last) and test-time augmentation
    assert main(["--quiet", "evaluate", str(full.run_dir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == full.test["accuracy"] and again["loss"] == pytest.approx(full.test["loss"], rel=1e-6)
    with pytest.raises(TrainingInterrupted):  # SIGTERM in the middle of epoch 2, at step 30 of 2 x 23
        train(small(tmp_path, "part", epochs=2, **optimizer), hooks=[SignalAt(30)])
    train(None, resume=tmp_path / "part")
    a = load_checkpoint(full.run_dir / "checkpoints" / "last")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert any(k.startswith("lookahead.") for k in b.extra) == (not optimizer)


@pytest.mark.slow
def test_frozen_after_lets_a_parameter_stop_training_on_time(tmp_path, monkeypatch):
    seen = []  # (learning rate of the stem bias's group, the stem bias) after each step

    class Watch(Hook):
        def after_step(self, loop):
            group = next(g for g in loop.optimizer.param_groups if any(p is loop.model.stem.bias for p in g["params"]))
            seen.append((group["lr"], loop.model.stem.bias.detach().clone()))

    cfg = small(tmp_path, "frozen", epochs=2, max_train_samples=1000, optimizer="muon", lookahead=False,
                frozen_after={"stem.bias": 1}, bias_decay=True)
    train(cfg, hooks=[Watch()])
    n = len(seen) // 2  # steps per epoch
    peak = cfg.lr * cfg.bias_lr_scale
    assert seen[0][0] == pytest.approx(peak) and seen[n // 2][0] == pytest.approx(peak * (1 - (n // 2) / n))
    assert not torch.equal(seen[0][1], seen[n - 1][1])  # it trains in the first epoch ...
    assert all(lr == 0 and torch.equal(bias, seen[n - 1][1]) for lr, bias in seen[n:])  # ... and not after


@pytest.mark.slow
def test_time_budget_fits_the_epochs_and_ends_in_time(tmp_path, monkeypatch, caplog, time_slack):
    budget = 25
    # an evaluation that seems slow when the first plan is made: at 1.5 ms an image, a tenth of the budget
    # (2.5 s: 1667 images) holds neither the 2 extra test views of 1000 images nor 200 x 22 robustness ones
    monkeypatch.setattr(TimeBudget, "time_evaluation", lambda self, loop: 0.0015)
    # a machine that slows down after the plan of epoch 2 (a step of 0.05-0.09 s takes 0.08 s longer), by enough
    # that the plan's estimates (its validation and report reckoned long) cannot absorb it (0.03 s a step, not always)
    with caplog.at_level(logging.INFO, logger="cnnkit"):
        result = train(small(tmp_path, "budget", epochs=1, time_budget=f"{budget}s", report=True,
                             report_robustness_samples=200), hooks=[Slow(0.08, from_epoch=2)])
    s = json.loads((result.run_dir / "summary.json").read_text())
    asked = json.loads((result.run_dir / "config.json").read_text())
    assert (asked["epochs"], asked["tta"]) == (1, "shift")  # what the run was asked is kept as it was ...
    config = run_settings(result.run_dir)  # ... and what it decided is recorded beside it
    # 3000 images take a second or two an epoch: the budget fits many more than the 1 asked for
    assert s["epochs_run"] == config["epochs"] > 3
    assert s["time_budget_s"] == budget and 0 < s["planned_time_s"] <= budget
    assert s["total_time_s"] <= budget * time_slack
    plans = [int(m.group(1)) for r in caplog.records
             if (m := re.search(r"(\d+) steps planned \(.*\) from epoch (\d+)", r.getMessage())) and int(m.group(2)) > 2]
    assert plans and plans[-1] == s["steps_run"]  # the slower epochs made a shorter plan, run to its step ...
    assert s["planned_time_s"] > 0.9 * budget  # ... which fills the budget to the step, not to whole epochs
    last = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    # ... whose schedule ran to its end, rather than a cut-off run: the first slow epoch is taken as the machine's new
    # speed (budget.recent_epoch_s). Where plans followed the last three epochs' mean, they came an epoch late, the last
    # at the last epoch's end, and the runs ended with the lr at 8-23% of its peak (3 of 5 runs here, once in CI);
    # now at 1-1.5% (5 runs, steps of 0.05-0.09 s)
    assert last["lr"] < 0.05 * config["lr"]
    # fewer views, then fewer samples: the 1667 evaluations hold 75 x 22
    assert (config["tta"], config["report_robustness_samples"]) == ("none", 75)
    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())
    assert evaluation["robustness"]["samples"] == 75  # and the report used them


@pytest.mark.slow
def test_time_budget_shorter_than_one_epoch_trains_part_of_it_to_a_complete_schedule(tmp_path, monkeypatch,
                                                                                        time_slack):
    budget = 12  # a machine (or data set) on which one epoch takes longer than the budget: 23 steps, over 11 s
    result = train(small(tmp_path, "part-epoch", epochs=3, time_budget=f"{budget}s"), hooks=[Slow(0.5)])
    s = json.loads((result.run_dir / "summary.json").read_text())
    config = run_settings(result.run_dir)
    assert s["epochs_run"] == config["epochs"] == 1 and 3 < s["steps_run"] < 23
    assert s["total_time_s"] <= budget * time_slack
    last = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == s["steps_run"] and last["lr"] < 0.5 * config["lr"]  # the shortened schedule decayed
    assert last["train_images_per_s"] == pytest.approx(s["steps_run"] * 128 / last["epoch_time_s"], rel=0.01)

    with pytest.raises(TrainingInterrupted):  # SIGTERM after the plan (made at step 3), before its end
        train(small(tmp_path, "resumed", epochs=3, time_budget=f"{budget}s"), hooks=[SignalAt(5, delay_s=0.5)])
    planned = RunRecord.load(tmp_path / "resumed").planned_steps
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last").meta["record"]["planned_steps"] == planned
    train(None, resume=tmp_path / "resumed")  # a resumed run keeps the plan: it ends at the planned step
    last = json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 5 < planned < 23 and last["step"] == planned


@pytest.mark.slow
def test_time_budget_too_short_for_the_evaluation_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        result = train(small(tmp_path, "tiny-budget", epochs=3, time_budget="1s"))
    s = json.loads((result.run_dir / "summary.json").read_text())
    assert s["epochs_run"] == 1 and s["planned_time_s"] > 1
    assert [r for r in caplog.records if "cannot end in time" in r.getMessage()]


@pytest.mark.slow
def test_lr_find_writes_a_plot_and_suggests_a_rate(tmp_path, capsys):
    assert main(["lr-find", "--recipe", "fmnist-quick", "--max-train-samples", "2000", "--model-args",
                 '{"widths": [16, 32, 64]}', "--steps", "40", "--output", str(tmp_path), "--name", "lrf"]) == 0
    out = capsys.readouterr().out
    assert "suggested --lr" in out
    data = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert 1e-5 <= data["suggested_lr"] <= 10 and len(data["lrs"]) == len(data["smoothed_losses"]) >= 5
    assert data["lrs"] == sorted(data["lrs"])
    assert (tmp_path / "lrf" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "lrf" / "checkpoints").exists()  # no training, so no empty checkpoints folder


def test_auto_precision_follows_the_cpu(monkeypatch):
    import cnnkit.runtime as ev

    cpu = torch.device("cpu")
    monkeypatch.setattr(ev, "cpu_has_native_bf16", lambda: True)
    assert ev.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(ev, "cpu_has_native_bf16", lambda: False)
    assert ev.resolve_precision("auto", cpu) == "fp32"
    assert ev.resolve_precision("fp32", cpu) == "fp32" and ev.resolve_precision("bf16", cpu) == "bf16"


def test_the_test_views_a_budget_plans_for_are_those_of_the_images_validation_was_unsure_of():
    # 10,000 test images with flip-shift's 6 views and 500 x 22 robustness evaluations
    assert final_images(10_000, "flip-shift", 500) == 60_000 + 11_000  # before a validation: every image's views
    assert final_images(10_000, "flip-shift", 500, unsure=0.2) == 20_000 + 11_000  # 1 view, and 5 for a fifth
    assert final_images(10_000, "none", 500, unsure=0.2) == 10_000 + 11_000


@pytest.mark.slow
def test_a_budgeted_run_plans_the_test_views_for_the_share_validation_was_unsure_of(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cnnkit"):
        result = train(small(tmp_path, "unsure", epochs=2, tta="flip", tta_below=0.6, time_budget="40s"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_unsure"] <= 1 for r in rows)  # each epoch's share, in metrics.jsonl
    plans = [(int(m.group(1)), int(m.group(2))) for r in caplog.records if (m := re.search(
        r"from epoch (\d+) .* the extra test views for the (\d+)% of images validation was unsure of", r.getMessage()))]
    assert plans and all(share == round(100 * rows[epoch - 1]["val_unsure"]) for epoch, share in plans)
    assert rows[0]["val_unsure"] < 1  # some images sure after an epoch: the plan reckons fewer views than every image's
