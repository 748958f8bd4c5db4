"""A training DataLoader whose order is a pure function of (seed, epoch) and that resumes mid-epoch.

Exact resume needs the resumed run to see the batches the interrupted one would have seen next. The
order of epoch e is a permutation drawn from a generator seeded with seed + e (not from the global RNG,
which model code also draws from), each data-parallel rank takes every world-th index of it, and the
loader counts the batches it handed out. Lightning stores that count in the checkpoint (the loader has
`state_dict` / `load_state_dict`) and gives it back on resume; the next iteration then skips that many
batches of the same permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _data_parallel_rank_and_size() -> tuple[int, int]:
    # Read when iterating, not when built: DDP / DeepSpeed processes exist only once `fit` has started.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Seeded, sharded order of `num_samples` indices that can start `skip` indices into the epoch.

    Like DistributedSampler (drop_last=False), the permutation is padded with its own first indices to a
    multiple of the world size, so every rank gets the same number of samples.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        _, world = _data_parallel_rank_and_size()
        return math.ceil(self.num_samples / world)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`."""
        rank, world = _data_parallel_rank_and_size()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            indices = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            indices = list(range(self.num_samples))
        padded = math.ceil(self.num_samples / world) * world
        indices += (indices * math.ceil(padded / max(len(indices), 1)))[: padded - len(indices)]
        return indices[rank::world]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self.order(self.epoch)[skip:]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` that remembers how many batches of the epoch it delivered."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, **kwargs: Any) -> None:
        sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.delivered = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: the skip is read at the first batch, after Lightning has restored the state and set the
        # epoch on the sampler (in that order, both after it called iter()).
        skip, self._resume_at = self._resume_at, 0
        self.sampler.skip = skip * self.batch_size
        self.delivered = skip
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state["batches"])
