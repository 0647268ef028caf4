"""Invariants of every augmentation op on real images (Fashion-MNIST and colour versions of them)."""

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.augment import IMAGE_OPS, MIX_OPS, PRESETS, build_augment, tta_views
from cnnkit.cli import main


@pytest.fixture
def grey(fmnist_images):
    return torch.from_numpy(fmnist_images[0][:32, None].copy()).float() / 255


@pytest.fixture
def rgb(grey):
    # Real shapes with real colour: tint each image by a different colour.
    tint = torch.rand(len(grey), 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.3
    return grey.expand(-1, 3, -1, -1) * tint


@pytest.mark.parametrize("name", sorted(IMAGE_OPS))
@pytest.mark.parametrize("colour", ["grey", "rgb"])
def test_every_op_keeps_shape_range_and_is_deterministic(name, colour, request):
    x = request.getfixturevalue(colour)
    aug = build_augment([{"op": name, **({"rotation_range": 30, "zoom_range": 0.2} if name == "affine" else {})}])
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6
    changed = (a - x).abs().flatten(1).amax(1) > 1e-6
    photometric_on_grey = colour == "grey" and name in ("saturation", "hue")
    if not photometric_on_grey:
        assert changed.any(), f"{name} changed nothing"
        per_sample = (a - x).flatten(1).abs().mean(1)
        assert per_sample.std() > 0, f"{name} treated every sample alike"


@pytest.mark.parametrize("spec", [
    {"op": "affine"},
    {"op": "translate", "pixels": 0},
    {"op": "random_resized_crop", "scale": [1.0, 1.0], "ratio": [1.0, 1.0]},
    {"op": "brightness", "factor": 0.0},
    {"op": "contrast", "factor": 0.0},
    {"op": "saturation", "factor": 0.0},
    {"op": "hue", "shift": 0.0},
    {"op": "color_jitter", "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0},
    {"op": "gamma", "range": [1.0, 1.0]},
    {"op": "noise", "std": 0.0},
    {"op": "blur", "sigma": [0.01, 0.01]},
    {"op": "cutout", "size": 0},
    {"op": "randaugment", "m": 0, "ops": ["identity", "rotate", "shear_x", "shear_y", "translate_x", "brightness", "color"]},
    {"op": "hflip", "p": 0.0},
])
def test_zero_magnitude_is_identity(spec, rgb):
    out = build_augment([spec])(rgb, torch.Generator().manual_seed(0))
    assert torch.allclose(out, rgb, atol=1e-5), spec


def test_keras_affine_rotation_90_matches_rot90(grey, monkeypatch):
    from cnnkit import augment

    monkeypatch.setattr(augment, "_uniform", lambda n, lo, hi, g: torch.full((n,), float(hi), dtype=torch.float64))
    out = augment.affine(grey[:4], torch.Generator(), rotation_range=90)
    assert any(torch.allclose(out, torch.rot90(grey[:4], k, dims=(2, 3)), atol=1e-4) for k in (1, -1))


def test_flipping_twice_is_identity(rgb):
    once = build_augment([{"op": "hflip", "p": 1.0}])(rgb, torch.Generator())
    assert not torch.equal(once, rgb)
    assert torch.equal(build_augment([{"op": "hflip", "p": 1.0}])(once, torch.Generator()), rgb)
    assert torch.equal(build_augment([{"op": "vflip", "p": 1.0}, {"op": "vflip", "p": 1.0}])(rgb, torch.Generator()), rgb)


def test_alternating_flip_mirrors_each_image_every_other_epoch(rgb):
    aug = build_augment([{"op": "alternating_hflip"}])
    ids = torch.arange(len(rgb)) + 1000

    def flipped(epoch, seed=0, order=slice(None)):
        out = aug(rgb[order], torch.Generator().manual_seed(epoch), ids=ids[order], epoch=epoch, seed=seed)
        assert all(torch.equal(o, x) or torch.equal(o, x.flip(-1)) for o, x in zip(out, rgb[order]))
        return torch.tensor([not torch.equal(o, x) for o, x in zip(out, rgb[order])])

    first = flipped(1)
    assert 0.2 < first.float().mean() < 0.8
    assert torch.equal(flipped(2), ~first) and torch.equal(flipped(3), first)
    reverse = torch.arange(len(rgb) - 1, -1, -1)
    assert torch.equal(flipped(1, order=reverse), first[reverse])  # a property of the sample, not its place
    assert not torch.equal(flipped(1, seed=1), first)
    # Without sample ids (previews, lr-find) it is a random flip.
    assert 0 < sum(not torch.equal(o, x) for o, x in zip(aug(rgb, torch.Generator().manual_seed(0)), rgb)) < len(rgb)
    from cnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown parameter"):  # the training loop gives the epoch
        build_augment([{"op": "alternating_hflip", "epoch": 3}])


def test_probability_selects_samples(rgb):
    out = build_augment([{"op": "noise", "std": 0.2, "p": 0.5}])(rgb, torch.Generator().manual_seed(3))
    changed = ((out - rgb).abs().flatten(1).amax(1) > 0).float().mean()
    assert 0.2 < changed < 0.8


@pytest.mark.parametrize("name", sorted(MIX_OPS))
def test_mixing_gives_soft_targets_that_sum_to_one(name, rgb):
    labels = torch.arange(len(rgb)) % 10
    aug = build_augment([{"op": name}])
    x, y = aug.mix(rgb, labels, 10, torch.Generator().manual_seed(0))
    assert x.shape == rgb.shape and y.shape == (len(rgb), 10)
    assert torch.allclose(y.sum(1), torch.ones(len(rgb)))
    assert (y.max(1).values < 1).any()  # some labels really were mixed
    assert build_augment([{"op": "hflip"}]).mixes_labels is False


def test_presets_build_and_labels_untouched(rgb):
    for name in PRESETS:
        out = build_augment(name)(rgb, torch.Generator().manual_seed(0))
        assert out.shape == rgb.shape


def test_tta_views():
    x = torch.rand(2, 3, 8, 8)
    assert len(tta_views(x, "none")) == 1
    views = tta_views(x, "flip-shift")
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[1], x.flip(-1))


def test_preview_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["--quiet", "augment", "preview", "--recipe", "seed-fmnist", "--rows", "3", "--columns", "4",
                 "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert w == int((1.25 * 5 + 1.2) * 100) and h == int((1.25 * 3 + 0.7) * 100)
    assert np.asarray(Image.open(out).convert("L")).std() > 10  # not blank


def test_bad_augment_specs_are_clear_errors():
    from cnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown augmentation preset"):
        build_augment("sparkle")
    with pytest.raises(ConfigError, match="unknown augmentation op"):
        build_augment([{"op": "twirl"}])
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_augment([{"op": "affine", "rotation": 20}])
    with pytest.raises(ConfigError, match="probability"):
        build_augment([{"op": "hflip", "p": 2}])
