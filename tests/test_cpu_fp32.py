"""CPUs without native bf16: the recipes' [fp32] settings, oneDNN's instruction-set cap, and
progressive resizing (the first epochs at fewer pixels)."""

import pytest

import cnnkit.runtime as rt
from cnnkit.config import Config, apply_overrides, load_recipe, recipe_names
from cnnkit.errors import ConfigError
from cnnkit.training import Hook, train


def test_fp32_settings_apply_only_where_the_run_trains_in_fp32_on_a_cpu(monkeypatch):
    cfg = Config.from_dict({"recipe": "r", "precision": "auto", "device": "cpu", "epochs": 5,
                            "fp32": {"epochs": 3, "progressive_sizes": [20, 24]}})
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)
    assert rt.settings_for_this_cpu(cfg) is cfg  # bf16 here: the recipe as it is
    assert rt.settings_for_this_cpu(apply_overrides(cfg, {"precision": "fp32"})).epochs == 3  # fp32 asked for
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: False)
    used = rt.settings_for_this_cpu(cfg)
    assert (used.epochs, used.progressive_sizes, used.fp32) == (3, [20, 24], {})  # emptied: a resume keeps them
    kept = rt.settings_for_this_cpu(apply_overrides(cfg, {"epochs": 7}), asked={"epochs": 7})
    assert (kept.epochs, kept.progressive_sizes) == (7, [20, 24])  # the command line wins
    assert rt.settings_for_this_cpu(apply_overrides(cfg, {"precision": "bf16"})) .epochs == 5


@pytest.mark.parametrize("table, message", [
    ({"epoch": 3}, "did you mean epochs"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"precision": "bf16"}, "cannot set fp32, precision or recipe"),
    ({"progressive_sizes": [20, 0]}, "progressive_sizes lists input sizes"),
])
def test_bad_fp32_tables_are_refused_when_the_recipe_loads(table, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"fp32": table})


def test_every_recipes_fp32_table_is_valid():
    from cnnkit.augment import build_augment
    from cnnkit.models import create_model

    for name in recipe_names():
        cfg = load_recipe(name)
        assert set(cfg.fp32) <= set(Config.__dataclass_fields__)
        if not cfg.fp32:
            continue
        used = rt.settings_for_this_cpu(apply_overrides(cfg, {"precision": "fp32"}))  # checked as a recipe is
        assert all(getattr(used, key) == value for key, value in cfg.fp32.items()), name
        build_augment(used.augment)  # its augmentation ops and their parameters exist
        if not used.pretrained:  # its model builds with its arguments
            create_model(used.model, 10, 3, 32, **used.model_args)


def test_onednn_capped_below_bf16_counts_as_a_cpu_without_it(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not rt.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    assert not rt.cpu_has_native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert rt.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.slow
def test_progressive_resizing_trains_the_first_epochs_smaller_and_evaluates_at_full_size(tmp_path):
    seen: list[tuple[bool, int]] = []  # (training, input size) of every forward, in order

    class Sizes(Hook):
        def on_run_start(self, loop):
            loop.model.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].shape[-1])))

    cfg = apply_overrides(load_recipe("fmnist-quick"), {
        "max_train_samples": 1000, "max_eval_samples": 500, "epochs": 3, "batch_size": 250, "report": False,
        "model_args": {"widths": [8, 16, 32]}, "progressive_sizes": [16, 20], "output": str(tmp_path), "name": "p"})
    result = train(cfg, hooks=[Sizes()])
    trained = [size for training, size in seen if training]
    assert trained == [16] * (len(trained) // 3) + [20] * (len(trained) // 3) + [28] * (len(trained) // 3)
    assert {size for training, size in seen if not training} == {28}  # validation and test at the input size
    assert result.summary["epochs_run"] == 3 and result.summary["test_accuracy"] > 0.3


def test_tta_below_adds_the_views_only_for_the_unsure_images():
    import torch

    from cnnkit.inference import predict_logits
    from cnnkit.models import create_model
    from cnnkit.preprocess import Preprocess

    torch.manual_seed(0)
    net = create_model("fastnet", 10, 1, 28, widths=[8, 16, 32], head_scale=3.0)
    pre = Preprocess(data_size=28, data_channels=1, input_size=28, model_channels=1, mean=(0.3,), std=(0.3,))
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    plain = predict_logits(net, pre, images, batch_size=20)
    full = predict_logits(net, pre, images, batch_size=20, tta="shift")
    sure = plain.softmax(1).amax(1)
    threshold = sure.median().item()
    mixed = predict_logits(net, pre, images, batch_size=20, tta="shift", tta_below=threshold)
    unsure = sure < threshold
    assert 0 < unsure.sum() < len(images)
    assert torch.allclose(mixed[unsure], full[unsure], atol=1e-5) and torch.equal(mixed[~unsure], plain[~unsure])
    assert torch.equal(predict_logits(net, pre, images, tta="shift", tta_below=1e-9), plain)  # none unsure


@pytest.mark.slow
def test_cnnkit_train_on_an_fp32_cpu_uses_the_default_recipes_fp32_settings(tmp_path, monkeypatch, capsys):
    import json

    from cnnkit.cli import main

    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: False)
    assert main(["train", "--max-train-samples", "1000", "--max-eval-samples", "500", "--epochs", "1",
                 "--report", "false", "--output", str(tmp_path), "--name", "r"]) == 0
    said = capsys.readouterr().err
    used = json.loads((tmp_path / "r" / "config.json").read_text())
    fp32 = load_recipe("fmnist-quick").fp32
    assert used["epochs"] == 1  # asked for on the command line
    assert all(used[key] == value for key, value in fp32.items() if key != "epochs") and used["fp32"] == {}
    assert "fmnist-quick's fp32 settings" in said and "progressive_sizes [20]" in said and "optimizer muon" in said
    assert "epochs 3" not in said  # the command line's epochs are not said to be replaced


def test_the_time_budget_counts_progressive_epochs_at_their_pixels():
    from cnnkit.budget import Costs, fit_steps, run_end_s

    full = Costs(epoch_s=10, val_s=1, final_s=20)  # 100 steps an epoch
    half = Costs(epoch_s=10, val_s=1, final_s=20, epoch_weights=(0.5, 0.5))  # epochs 1-2 at half the pixels
    assert run_end_s(0, 0, 300, 100, full) == 30 + 3 + 20
    assert run_end_s(0, 0, 300, 100, half) == 5 + 5 + 10 + 3 + 20
    assert run_end_s(0, 150, 300, 100, half) == 2.5 + 10 + 2 + 20  # half of epoch 2 left, then epoch 3
    # within 0.95 x 70 = 66.5 s: 41.5 s of steps, 5 validations, 20 s after; the two cheap epochs leave 9 s more
    assert fit_steps(70, 0, 0, 100, full) == 415
    assert fit_steps(70, 0, 0, 100, half) == 505
    assert run_end_s(0, 0, fit_steps(70, 0, 0, 100, half), 100, half) <= 0.95 * 70
