"""Inside the network: `cnnkit summary` (shapes, the course's formula, parameters, MACs, receptive
fields) and `cnnkit explain` (a page that follows one image through a trained run)."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.models import create_model
from cnnkit.summary import output_size, summarize
from cnnkit.training import train


@pytest.mark.parametrize("name,channels,sizes", [
    ("seed-cnn", 1, [28, 32, 45]), ("fastnet", 3, [28, 32, 40]), ("resnet18", 3, [32, 64, 97]),
    ("tf_efficientnet_lite0", 3, [96, 131, 224]),
])
def test_the_formula_gives_pytorchs_shape_at_every_layer(name, channels, sizes):
    for size in sizes:
        model = create_model(name, 10, channels, size)
        s = summarize(model, (channels, size, size))
        spatial = [r for r in s["layers"] if r["formula"] is not None]
        assert spatial and s["formula_mismatches"] == []
        assert all(r["formula_ok"] for r in spatial)
        assert s["total_params"] == sum(p.numel() for p in model.parameters())
        assert sum(r["params"] for r in s["layers"]) == s["total_params"]  # every parameter in one row
        assert all(len(r["output_shape"]) in (1, 3) for r in s["layers"])


def test_formula_text_fills_in_the_numbers():
    assert output_size(28, 3, 1, 0) == (26, "floor((28 + 2·0 − 3) / 1) + 1 = 26")
    assert output_size(13, 2, 2, 0)[0] == 6 and output_size(13, 2, 2, 0, ceil_mode=True)[0] == 7
    assert output_size(224, 3, 2, "same")[0] == 112


def test_macs_and_receptive_field_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 5))
    rows = {r["name"]: r for r in summarize(net, (3, 10, 10))["layers"]}
    assert rows["0"]["macs"] == 10 * 10 * 8 * 3 * 3 * 3  # output positions x channels x kernel volume
    assert rows["3"]["macs"] == 1 * 1 * 4 * 8 * 5 * 5
    assert rows["0"]["receptive_field"] == {"size": 3, "jump": 1, "start": 0.5}  # padding 1 keeps it centred
    assert rows["2"]["receptive_field"] == {"size": 4, "jump": 2, "start": 1.0}
    assert rows["3"]["receptive_field"] == {"size": 4 + 4 * 2, "jump": 2, "start": 5.0}  # 12 px: 10 and the padding
    assert rows["3"]["activation_bytes"] == 4 * 4 and rows["3"]["params"] == 4 * 8 * 25 + 4


def test_residual_blocks_take_the_wider_field_of_their_two_paths():
    s = summarize(create_model("resnet18", 10, 3, 64), (3, 64, 64))
    size = {r["name"]: r["receptive_field"]["size"] for r in s["layers"]}
    assert size["layer2.0.downsample.1"] < size["layer2.0.bn2"]  # the 1x1 shortcut sees less than the main path
    assert size["layer2.0.act2"] == size["layer2.0.bn2"]  # their sum sees what the wider one sees
    main_path = [v for k, v in size.items() if "downsample" not in k]
    assert main_path == sorted(main_path)  # and the field never shrinks along the network


def test_summary_command_for_a_recipe_and_a_model(capsys):
    assert main(["summary", "--recipe", "fmnist-quick", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["input_shape"] == [1, 28, 28] and s["total_macs"] > 0 and s["formula_mismatches"] == []
    row = s["layers"][0]
    assert {"name", "type", "kernel", "stride", "padding", "input_shape", "output_shape", "params", "macs",
            "receptive_field"} <= set(row)
    assert main(["summary", "--model", "seed-cnn"]) == 0
    out = capsys.readouterr().out
    assert "floor((28 + 2·0 − 3) / 1) + 1 = 26" in out and "93,322 parameters" in out
    assert main(["--quiet", "summary"]) == 2  # neither a run, a recipe nor a model
    assert "one of" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inside")
    cfg = apply_overrides(load_recipe("fmnist-baseline"), {
        "max_train_samples": 3000, "max_eval_samples": 500, "epochs": 1, "report": False,
        "output": str(out), "name": "r"})
    return train(cfg).run_dir


@pytest.mark.slow
def test_explain_page_follows_the_image_and_agrees_with_predict(run, fmnist_images, tmp_path, capsys):
    x, y = fmnist_images
    trouser = x[np.flatnonzero(y == 1)[0]]
    Image.fromarray(trouser).save(tmp_path / "trouser.png")
    assert main(["--quiet", "predict", str(run), str(tmp_path / "trouser.png"), "--json", "--top-k", "1"]) == 0
    predicted = json.loads(capsys.readouterr().out)["results"][0]["top"][0]
    assert main(["explain", str(run), str(tmp_path / "trouser.png"), "--label", "Trouser"]) == 0
    assert f"Page: {run / 'explain' / 'trouser.html'}" in capsys.readouterr().out
    page = (run / "explain" / "trouser.html").read_text()
    for heading in ("The input", "First-layer filters", "Feature maps after", "Pooling", "Receptive field",
                    "Flattened, then dense layers", "Softmax", "Cross-entropy loss", "Grad-CAM"):
        assert f"<h2>{heading}" in page, heading
    probs = {c: float(p) for c, p in re.findall(r"<tr><td>([^<]+)</td><td>[-0-9.]+</td><td>[0-9.]+</td><td data-probability='([0-9.]+)'", page)}
    assert len(probs) == 10 and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert max(probs, key=probs.get) == predicted["class"]
    assert max(probs.values()) == pytest.approx(predicted["probability"], abs=1e-4)
    assert f"predicted {predicted['class']} " in page
    loss = float(re.search(r"= (\d+\.\d+): 0 when", page).group(1))
    assert loss == pytest.approx(-math.log(probs["Trouser"]), abs=1e-3)
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)  # self-contained: nothing fetched
    assert main(["--quiet", "explain", str(run), str(tmp_path / "trouser.png"), "--label", "Hat"]) == 2
    assert "not a class of this run" in capsys.readouterr().err


@pytest.mark.slow
def test_explain_page_renders_in_chromium(run, fmnist_images, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from cnnkit.explain import explain_run

    x, _ = fmnist_images
    Image.fromarray(x[0]).save(tmp_path / "boot.png")
    path, _ = explain_run(run, tmp_path / "boot.png")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(path.as_uri())
        assert len(browser.find_elements("tag name", "section")) >= 8
        images = browser.find_elements("tag name", "img")
        assert images and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        browser.quit()


def test_explain_works_for_fastnet_and_a_pretrained_backbone():
    from cnnkit.explain import explain_image
    from cnnkit.preprocess import Preprocess

    for name, channels, size in (("fastnet", 1, 28), ("tf_efficientnet_lite0", 3, 96)):
        torch.manual_seed(0)
        model = create_model(name, 4, channels, size)
        pre = Preprocess(size, channels, size, channels, (0.5,) * channels, (0.25,) * channels)
        image = np.random.default_rng(0).integers(0, 256, (channels, size, size), dtype=np.uint8)
        ex = explain_image(model, pre, ["a", "b", "c", "d"], image, 2)
        assert 2 <= len(ex["stages"]) <= 8 and all(s["maps"] for s in ex["stages"])
        assert sum(ex["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert ex["label"]["loss"] == pytest.approx(-math.log(ex["probabilities"][2]), rel=1e-4)
        assert ex["receptive_field"]["size"] > 1 and len(ex["grad_cam"]) == 3



def test_layers_of_backbones_side_by_side_are_named_by_their_backbone():
    from cnnkit.models.concat import layer_label

    pair = "tf_efficientnet_lite0+tf_efficientnet_lite2"
    assert layer_label("members.1.blocks.2.0.bn1", pair) == "tf_efficientnet_lite2: blocks.2.0.bn1"
    assert layer_label("members.0.bn2", pair) == "tf_efficientnet_lite0: bn2"
    assert layer_label("members.1.bn2", "fastnet") == "members.1.bn2" and layer_label("head", pair) == "head"
