"""The run report on a run trained for one epoch on real Fashion-MNIST images."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from cnnkit import analysis
from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.runs import load_run
from cnnkit.training import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = apply_overrides(load_recipe("seed-fmnist"), {
        "max_train_samples": 3000, "max_eval_samples": 1000, "epochs": 1, "output": str(out), "name": "r"})
    return train(cfg).run_dir


def lookup(data, key):
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def test_report_is_self_contained_and_matches_evaluation_json(run):
    page = (run / "report.html").read_text()
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the report must load nothing from a network"
    assert "<img src=\"data:image/png;base64," in page
    assert "<h2>Learning curves</h2><img" in page and "<td>epochs</td>" in page  # a trained run's (a probe shows its choice)
    tagged = re.findall(r'<span data-metric="([^"]+)">([^<]+)</span>', page)
    assert len(tagged) > 40
    for key, shown in tagged:
        value = lookup(evaluation, key)
        if shown.endswith("%"):
            assert float(shown[:-1]) == pytest.approx(100 * value, abs=0.006), key
        else:
            assert float(shown) == pytest.approx(value, abs=0.0006), key
    cm = np.asarray(evaluation["confusion_matrix"])
    assert cm.sum(1).tolist() == [r["support"] for r in evaluation["per_class"]]
    for name in ("learning_curves", "confusion_matrix", "worst_mistakes", "grad_cam", "filters", "augmentation",
                 "robustness", "reliability"):
        assert (run / "plots" / f"{name}.png").is_file(), name
    assert {c["name"] for c in evaluation["robustness"]["corruptions"]} >= {"rotation", "shift", "jpeg", "blur"}
    assert 0 <= evaluation["calibration"]["ece"] <= 1


def test_grad_cam_has_the_input_size_and_is_not_constant(run, fmnist_images):
    loaded = load_run(run)
    x = fmnist_images[0][:8, None].copy()
    cams = analysis.grad_cam(loaded.model, loaded.preprocess, x)
    assert cams.shape == (8, 28, 28)
    assert all(c.max() - c.min() > 0.1 for c in cams)
    assert not any(p.grad is not None for p in loaded.model.parameters())  # gradients cleaned up


def test_report_command_rebuilds_it(run, capsys):
    (run / "report.html").unlink()
    assert main(["--quiet", "report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 50_000


def test_compare_shows_both_runs(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    assert main(["--quiet", "compare", str(run), str(other), "--out", str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    assert "r " in out or "│ r" in out
    assert "other" in out
    assert "data:image/png;base64," in (tmp_path / "c.html").read_text()


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()


def test_report_renders_in_chromium_without_errors(run, browser, tmp_path):
    browser.get((run / "report.html").as_uri())
    assert "cnnkit report" in browser.title
    images = browser.find_elements("tag name", "img")
    assert len(images) >= 8
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    shot = tmp_path / "report.png"
    browser.save_screenshot(str(shot))
    w, h = Image.open(shot).size
    assert w >= 1000 and h >= 600
    assert np.asarray(Image.open(shot).convert("L")).std() > 5  # drawn, not blank


def test_tensorboard_logs_epoch_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = apply_overrides(load_recipe("fmnist-baseline"), {
        "max_train_samples": 1000, "max_eval_samples": 200, "epochs": 2, "report": False, "tensorboard": True,
        "output": str(tmp_path), "name": "tb"})
    train(cfg)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/accuracy", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/accuracy")] == [1, 2]


def test_the_robustness_sample_is_in_proportion_to_the_data_and_takes_the_classes_in_turn():
    # flowers12: 720 training and 240 test images in 12 classes, each sample evaluated 22 times
    assert analysis.ROBUSTNESS_PASSES == 22 and analysis.robustness_sample_count(100, 240, 960, 12) == 24  # 2 a class
    assert analysis.robustness_sample_count(500, 400, 2400, 2) == 1200 // 22  # about half a pass over the images
    assert analysis.robustness_sample_count(500, 154, 404, 2) == 24  # a small two-class set: 24 at least
    assert analysis.robustness_sample_count(100, 240, 960, 40) == 80  # and at least 2 a class
    assert analysis.robustness_sample_count(1000, 10_000, 67_600, 10) == 1000  # Fashion-MNIST: the recipe's own
    assert analysis.robustness_sample_count(100, 6, 30, 2) == 6  # never more than the test split
    labels = np.array([2, 0, 0, 0, 1, 1, 2, 2, 0])
    order = analysis.class_balanced_order(labels)
    assert sorted(order.tolist()) == list(range(9)) and labels[order[:3]].tolist() == [0, 1, 2]
    assert labels[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 2, 0] and order[:3].tolist() == [1, 4, 0]


def test_shifts_and_blurs_scale_with_the_images_side(monkeypatch):
    """A 256-px picture (a 32-px one, each pixel made an 8x8 block) is shifted and blurred by the same share
    of its side as the 32-px picture: shrunk back, the two corrupted pictures agree; the values reported are
    the pixels used; severities not in pixels are as they were."""
    import torch
    import torch.nn.functional as F

    from cnnkit.preprocess import Preprocess

    seen: list[torch.Tensor] = []
    monkeypatch.setattr(analysis, "predict_logits", lambda model, pre, u8, **kw: seen.append(u8.float()) or torch.zeros(len(u8), 2))
    small = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    runs = {}
    for side, images in ((32, small), (256, small.repeat(8, axis=2).repeat(8, axis=3))):
        pre = Preprocess(data_size=side, data_channels=3, input_size=side, model_channels=3, mean=[0.5] * 3, std=[0.5] * 3)
        seen.clear()
        rob = analysis.robustness(torch.nn.Identity(), pre, images, np.array([0, 1]), ["a", "b"])
        names = [(c["name"], c["severity"]) for c in rob["corruptions"]]
        runs[side] = {"values": dict(zip(names, (c["value"] for c in rob["corruptions"]))),
                      "images": dict(zip(names, seen[1:]))}
    assert runs[256]["values"][("shift", 3)] == 24 and runs[256]["values"][("blur", 3)] == 12
    assert runs[32]["values"][("shift", 3)] == 3 and runs[32]["values"][("blur", 3)] == 1.5  # as before
    assert runs[256]["values"][("rotation", 3)] == 20 and runs[256]["values"][("jpeg", 3)] == 15
    for corruption in (("shift", 3), ("blur", 3), ("blur", 1)):
        shrunk = F.avg_pool2d(runs[256]["images"][corruption], 8)
        gap = (shrunk - runs[32]["images"][corruption]).abs().mean()
        assert gap < 12, (corruption, gap)  # measured 0-7.6
    unscaled = F.avg_pool2d(analysis._blur(torch.from_numpy(small.repeat(8, axis=2).repeat(8, axis=3)).float() / 255, 1.5) * 255, 8)
    assert (unscaled - runs[32]["images"][("blur", 3)]).abs().mean() > 25  # a 1.5-px blur of 256 px: hardly any (45.6)


def test_the_report_of_a_test_split_sorted_by_class_tests_robustness_on_every_class(run, tmp_path, monkeypatch):
    from cnnkit.report import build_report
    from cnnkit.runs import run_settings, run_splits

    cfg = {**run_settings(run), "report_robustness_samples": 50}
    loaded = load_run(run)
    _, splits = run_splits(cfg)
    order = np.argsort(splits.test.labels, kind="stable")  # as a folder's test split is: class after class
    seen = {}
    real = analysis.robustness

    def spy(model, preprocess, images, labels, *args, **kwargs):
        seen["labels"] = labels
        return real(model, preprocess, images, labels, *args, **kwargs)

    monkeypatch.setattr(analysis, "robustness", spy)
    from cnnkit import report

    grids, draw = {}, report.plot_image_grid
    monkeypatch.setattr(report, "plot_image_grid", lambda images, captions, path, **kw: grids.update({path.name: captions})
                        or draw(images, captions, path, **kw))
    folder = tmp_path / "r"
    shutil.copytree(run, folder)
    metrics = build_report(folder, loaded.model, loaded.preprocess, loaded.classes, splits.test.images[order],
                           splits.test.labels[order], splits.train.images, splits.train.labels, cfg)
    assert np.bincount(seen["labels"], minlength=10).tolist() == [5] * 10
    page = (folder / "report.html").read_text()
    assert metrics["robustness"]["samples"] == 50 and "50 test images (the classes in turn; one image is 2.0 points)" in page
    assert f"the {len(order):,} test images read {100 * metrics['accuracy']:.2f}%)" in page  # a sample: the whole beside it
    right = [c for c in grids["grad_cam.png"] if c.startswith("✓")]
    assert len(right) == 6 and len(set(right)) == 6  # six classes' images, not the first class's six
    assert all("\n(true: " in c for c in grids["grad_cam.png"] if c.startswith("✗"))


def test_the_report_says_which_backbone_grad_cam_and_the_filters_show():
    from cnnkit.report import members_note

    assert members_note("fastnet") == ""
    note = members_note("tf_efficientnet_lite0+tf_efficientnet_lite2")
    assert "the last convolution is tf_efficientnet_lite2's" in note and "filters below are tf_efficientnet_lite0's" in note


def test_times_shown_are_the_whole_run_where_it_has_ended():
    """compare and a report made again show the whole `cnnkit train` (report included); a report
    written by the run itself says its time stops at the test. A probe chosen by cross-validation
    shows its folds' estimate, marked, where others show the best validation accuracy."""
    from cnnkit.compare import table_rows
    from cnnkit.report import _time_card

    summary = {"epochs_run": 1, "best_val_accuracy": 0.98, "test_accuracy": 0.97, "wall_time_s": 110.0}
    base = {"name": "r", "config": {"recipe": "photos", "model": "m", "augment": "none"}}
    assert table_rows([{**base, "summary": summary}])[0]["wall time"] == "1.8 min"  # a run before total_time_s
    row = table_rows([{**base, "summary": {**summary, "total_time_s": 152.0, "cv_accuracy": 0.9889}}])[0]
    assert row["wall time"] == "2.5 min" and row["best val"] == "98.89% (cv)"
    assert _time_card(summary)[1:] == ("1.8 min", "to the test, before this report; ")
    assert _time_card({**summary, "total_time_s": 152.0})[1] == "2.5 min"
