"""The batch loader: the whole split lives in memory as one uint8 tensor; batches are index slices.

No worker processes and no per-image Python: each batch is a single fancy-indexing call,
which on a 2-core CPU is far faster than a DataLoader over PIL images.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cnnkit.data.dataset import Split


class BatchLoader:
    """Yields (images uint8 (B,C,H,W), labels int64 (B,)) on `device`.

    The order of epoch e depends only on (seed, e), so a resumed run sees the same batches.
    `sample_weights` switches to sampling with replacement (a class-balanced sampler).

    With `world` > 1 (distributed training), `batch_size` is the global batch: every rank walks
    the same global order and takes its own share of each global batch, so an epoch covers each
    sample once across ranks and the order does not depend on the number of ranks.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        sample_weights: np.ndarray | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if batch_size % world:
            raise ValueError(f"the batch size {batch_size} must be divisible by the number of processes {world}")
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        # Pinned host memory would help for CUDA; the whole split goes to the device once instead.
        self.images = torch.from_numpy(np.ascontiguousarray(split.images)).to(self.device)
        self.labels = torch.from_numpy(split.labels).to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last and len(split) > batch_size
        self.sample_weights = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float64)
        self.epoch = 0
        self.first: dict[int, torch.Tensor] = {}  # epoch -> samples it takes first (data selection)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights, n, replacement=True, generator=g)
        order = torch.randperm(n, generator=g)
        first = self.first.get(epoch)
        if first is None:
            return order
        rest = torch.ones(n, dtype=torch.bool)
        rest[first] = False
        return torch.cat([first[torch.randperm(len(first), generator=g)], order[rest[order]]])

    def put_first(self, epoch: int, samples: torch.Tensor) -> None:
        """Epoch `epoch` takes these samples (indices in the split) first, in a seeded shuffled order,
        then the others in the epoch's usual order; a run that ends the epoch early trains on them
        alone. Not with `sample_weights` (which draws with replacement)."""
        if self.sample_weights is not None:
            raise ValueError("put_first orders an epoch without replacement; this loader samples with weights")
        self.first[epoch] = samples.cpu().long()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch number `start` on (a resumed run skips those it has done)."""
        for images, labels, _ in self.batches_with_ids(start):
            yield images, labels

    def batches_with_ids(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """As `batches`, with each batch's sample indices in the split (for per-sample augmentation)."""
        order = self.order(self.epoch).to(self.device)
        for i in range(start, len(self)):
            idx = self.shard(order[i * self.batch_size : (i + 1) * self.batch_size])
            yield self.images[idx], self.labels[idx], idx

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch (the last, shorter batch is split as evenly as it goes)."""
        if self.world == 1:
            return global_batch
        return global_batch.tensor_split(self.world)[self.rank]
