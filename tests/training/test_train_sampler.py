"""The resumable, seeded, sharded training order."""

from __future__ import annotations

import pytest
import torch

from glmtune.training import data as data_module
from glmtune.training.data import ResumableDataLoader, ResumableSampler


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    torch.manual_seed(0)  # the global RNG plays no part
    assert a.order(0) == b.order(0)
    assert a.order(0) != a.order(1)
    assert sorted(a.order(0)) == list(range(50))
    assert ResumableSampler(5, shuffle=False).order(7) == [0, 1, 2, 3, 4]


def test_shards_cover_everything_once_padded(monkeypatch):
    orders = []
    for rank in range(3):
        monkeypatch.setattr(data_module, "_data_parallel_rank_and_size", lambda r=rank: (r, 3))
        sampler = ResumableSampler(10, seed=1)
        assert len(sampler) == 4
        orders.append(sampler.order(2))
    merged = [i for order in orders for i in order]
    assert len(merged) == 12 and set(merged) == set(range(10))


def test_loader_state_resumes_inside_an_epoch():
    dataset = [torch.tensor([i]) for i in range(10)]
    loader = ResumableDataLoader(dataset, batch_size=3, shuffle=True, seed=5)
    loader.sampler.set_epoch(1)
    expected = [b.tolist() for b in loader]
    it = iter(loader)
    seen = [next(it).tolist(), next(it).tolist()]
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = ResumableDataLoader(dataset, batch_size=3, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == expected
    assert len(resumed) == 4  # the epoch's length is unchanged: Lightning counts the skipped batches
    assert resumed.state_dict()["batches"] == 4
    # The next epoch starts from the top again.
    resumed.sampler.set_epoch(2)
    assert len(list(resumed)) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_keep_the_order(workers):
    dataset = [torch.tensor([i]) for i in range(12)]
    plain = [b.tolist() for b in ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=2)]
    loader = ResumableDataLoader(dataset, batch_size=4, shuffle=True, seed=2, num_workers=workers)
    assert [b.tolist() for b in loader] == plain
