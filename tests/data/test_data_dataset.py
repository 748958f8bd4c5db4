import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from glmtune.data.dataset import RecordDataset, block_causal_mask, collate_fn
from tests.data.test_data_fakes import IGNORE, CharTemplate, build_with


@pytest.fixture(scope="module", params=["record", "lmdb"])
def built(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp(f"ds-{request.param}")
    data = tmp / "train.jsonl"
    rows = [{"prompt": f"q{i}", "completion": "a" * (1 + i % 7)} for i in range(25)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = dict(
        template=CharTemplate(),
        tokenizer_fingerprint="c",
        max_seq_length=32,
        progress=False,
        verbose=False,
        backend=request.param,
    )
    plain = build_with(data, out_dir=tmp / "plain", **options)
    packed = build_with(data, out_dir=tmp / "packed", packing=True, **options)
    return plain, packed


def test_dataset_items(built):
    plain, _ = built
    ds = RecordDataset(plain.train_dir)
    assert len(ds) == 25
    item = ds[3]
    assert set(item) == {"input_ids", "labels"}
    assert item["input_ids"].dtype == torch.int64 and item["labels"].dtype == torch.int64
    assert item["labels"][0] == IGNORE and item["labels"][-1] == 3
    assert len(RecordDataset(plain.out_dir)) == 25  # a build's out_dir means its train split
    assert ds.lengths.tolist() == [len(ds[i]["input_ids"]) for i in range(len(ds))]


def test_dataset_pickles_without_open_files(built):
    plain, _ = built
    ds = RecordDataset(plain.train_dir)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader is None
    assert torch.equal(clone[5]["input_ids"], ds[5]["input_ids"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads(built, side):
    plain, _ = built
    ds = RecordDataset(plain.train_dir)
    items = [ds[0], ds[6], ds[2]]
    batch = collate_fn(pad_token_id=0, pad_to_multiple_of=8, padding_side=side)(items)
    longest = max(len(i["input_ids"]) for i in items)
    width = -(-longest // 8) * 8
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pad = slice(n, width) if side == "right" else slice(0, width - n)
        assert torch.equal(batch["input_ids"][row, real], item["input_ids"])
        assert torch.equal(batch["labels"][row, real], item["labels"])
        assert (batch["input_ids"][row, pad] == 0).all() and (batch["labels"][row, pad] == IGNORE).all()
        assert batch["attention_mask"][row].sum() == n and (batch["attention_mask"][row, real] == 1).all()


def test_packed_items_and_mask(built):
    _, packed = built
    ds = RecordDataset(packed.train_dir)
    assert ds.packed and len(ds) < 25
    batch = collate_fn(pad_token_id=0)([ds[i] for i in range(len(ds))])
    assert set(batch) == {"input_ids", "labels", "position_ids", "seq_ids", "attention_mask"}
    assert torch.equal(batch["seq_ids"] != 0, batch["attention_mask"].bool())
    mask = block_causal_mask(batch["seq_ids"])
    # every query attends only to keys of its own sample
    seq = batch["seq_ids"]
    crossing = mask[:, 0] & (seq[:, :, None] != seq[:, None, :])
    assert not crossing.any()
    assert sum(int(s.max()) for s in seq) == 25  # every sample is in some pack


def test_distributed_sampler_shards(built):
    plain, _ = built
    ds = RecordDataset(plain.train_dir)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=False)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_fn(0))
        for batch in loader:
            seen += [tuple(row[row != 0].tolist()) for row in batch["input_ids"]]
    everything = {tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))}
    assert set(seen) == everything and len(seen) == 26  # 25 padded to 26 for two ranks


@pytest.mark.slow
def test_dataloader_worker_processes(built):
    plain, _ = built
    ds = RecordDataset(plain.train_dir)
    ds[0]  # opened in the parent first: workers must open their own
    for context in ("fork", "spawn"):
        loader = DataLoader(
            ds, batch_size=5, num_workers=2, collate_fn=collate_fn(0), multiprocessing_context=context
        )
        rows = [tuple(r[r != 0].tolist()) for batch in loader for r in batch["input_ids"]]
        assert rows == [tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))]
