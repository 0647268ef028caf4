import numpy as np
import torch

from cnnkit.data.dataset import Split
from cnnkit.data.loader import BatchLoader


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


def test_batches_with_ids_name_the_samples_they_hold():
    loader = BatchLoader(make_split(), 10, shuffle=True, seed=3)
    loader.set_epoch(2)
    for x, _, ids in loader.batches_with_ids(start=4):
        assert x[:, 0, 0, 0].long().tolist() == ids.tolist()  # image i holds the value i


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


def test_distributed_shards_cover_each_sample_once_in_the_global_order():
    split = make_split(103)
    single = BatchLoader(split, 12, shuffle=True, seed=4)
    for world in (2, 3, 4):
        loaders = [BatchLoader(split, 12, shuffle=True, seed=4, rank=r, world=world) for r in range(world)]
        for epoch in (0, 1):
            single.set_epoch(epoch)
            for loader in loaders:
                loader.set_epoch(epoch)
            per_rank = [[x[:, 0, 0, 0].tolist() for x, _ in loader] for loader in loaders]
            assert all(len(batches) == len(single) for batches in per_rank)
            # step by step, the ranks' shares put together are the single-process batch
            merged = [sum((per_rank[r][i] for r in range(world)), []) for i in range(len(single))]
            assert merged == [x[:, 0, 0, 0].tolist() for x, _ in single]
            assert sorted(v for batch in merged for v in batch) == list(range(103))


def test_global_batch_must_divide_among_processes():
    import pytest

    with pytest.raises(ValueError, match="divisible"):
        BatchLoader(make_split(), 10, shuffle=True, world=3)
