import numpy as np
import pytest
import torch

from cnnkit.augment import PRESETS, affine, build_augment
from cnnkit.data.dataset import Split
from cnnkit.data.loader import BatchLoader
from cnnkit.errors import ConfigError


def make_split(n=103):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 2).repeat(4, 3)
    return Split(images, np.arange(n) % 5)


def collect(loader):
    return torch.cat([x[:, 0, 0, 0] for x, _ in loader]).tolist()


def test_loader_is_seeded_per_epoch_and_covers_every_sample():
    a = BatchLoader(make_split(), 10, shuffle=True, seed=7)
    b = BatchLoader(make_split(), 10, shuffle=True, seed=7)
    assert collect(a) == collect(b)
    assert sorted(collect(a)) == list(range(103))
    first = collect(a)
    a.set_epoch(1)
    assert collect(a) != first and sorted(collect(a)) == list(range(103))
    assert collect(BatchLoader(make_split(), 10, shuffle=True, seed=8)) != first


def test_loader_drop_last_and_labels_follow_images():
    loader = BatchLoader(make_split(), 10, shuffle=True, seed=0, drop_last=True)
    assert len(loader) == 10
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape == (10, 1, 4, 4)
        assert (x[:, 0, 0, 0].long() % 5 == y).all()


def test_balanced_sampler_evens_out_classes():
    labels = np.array([0] * 90 + [1] * 10)
    split = Split(np.zeros((100, 1, 2, 2), np.uint8), labels)
    weights = (1.0 / np.bincount(labels))[labels]
    loader = BatchLoader(split, 100, shuffle=True, seed=0, sample_weights=weights)
    drawn = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        drawn += [y for _, y in loader]
    share_of_minority = torch.cat(drawn).float().mean().item()
    assert 0.4 < share_of_minority < 0.6  # 0.1 without the sampler


@pytest.fixture
def batch(fmnist_images):
    x, _ = fmnist_images
    return torch.from_numpy(x[:16, None]).float() / 255


def test_zero_magnitude_affine_is_identity(batch):
    out = affine(batch, torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch, atol=1e-5)


def test_flip_twice_is_identity_and_per_sample(batch):
    aug = build_augment([{"op": "hflip", "p": 0.5}])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    once = aug(batch, g1)
    flipped = [not torch.equal(once[i], batch[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16  # each sample draws its own coin
    assert torch.equal(aug(once, g2), batch)  # same draws again undo the flips


def test_rotation_90_matches_rot90(batch, monkeypatch):
    from cnnkit import augment

    # Pin every random draw to the top of its range: rotation exactly 90 degrees, no shift or zoom.
    monkeypatch.setattr(augment, "_uniform", lambda n, lo, hi, g: torch.full((n,), float(hi), dtype=torch.float64))
    square = batch[:4]
    out = affine(square, torch.Generator(), rotation_range=90)
    assert any(torch.allclose(out, torch.rot90(square, k, dims=(2, 3)), atol=1e-4) for k in (1, -1))


def test_seed_preset_is_deterministic_in_range_and_varied(batch):
    aug = build_augment("seed")
    a = aug(batch, torch.Generator().manual_seed(1))
    b = aug(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.shape == batch.shape and a.dtype == batch.dtype
    assert a.min() >= 0 and a.max() <= 1
    diffs = (a - batch).abs().flatten(1).mean(1)
    assert (diffs > 0).all() and diffs.std() > 0


def test_bad_augment_specs_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown augmentation preset"):
        build_augment("sparkle")
    with pytest.raises(ConfigError, match="unknown augmentation op"):
        build_augment([{"op": "twirl"}])
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_augment([{"op": "affine", "rotation": 20}])
    assert set(PRESETS) >= {"none", "seed"}
