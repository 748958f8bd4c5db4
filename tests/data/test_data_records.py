import multiprocessing
import pickle

import numpy as np
import pytest

from glmtune.data.records import open_reader, open_writer, read_meta, write_order

BACKENDS = ["record", "lmdb"]


def make_records(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        length = int(rng.integers(1, 40))
        ids = rng.integers(0, 130_000, length)
        labels = np.where(rng.random(length) < 0.5, -100, ids)
        records.append({"input_ids": ids, "labels": labels})
    return records


def write(path, records, backend, **kwargs):
    with open_writer(path, fields=("input_ids", "labels"), backend=backend, **kwargs) as writer:
        for record in records:
            writer.write(record)
    return writer


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_random_access(tmp_path, backend):
    records = make_records(300)
    writer = write(tmp_path / "r", records, backend)
    assert len(writer) == 300
    meta = read_meta(tmp_path / "r")
    assert meta["backend"] == backend and meta["num_records"] == 300
    assert meta["num_tokens"] == sum(len(r["input_ids"]) for r in records)
    reader = open_reader(tmp_path / "r")
    assert len(reader) == 300
    for i in [0, 299, 17, 150, -1]:
        got = reader[i]
        assert got.keys() == {"input_ids", "labels"}
        for k in got:
            assert got[k].dtype == np.int32
            np.testing.assert_array_equal(got[k], records[i][k])
    np.testing.assert_array_equal(reader.lengths, [len(r["input_ids"]) for r in records])
    with pytest.raises(IndexError):
        reader[300]


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_permutes_reading(tmp_path, backend):
    records = make_records(20)
    write(tmp_path / "r", records, backend)
    order = np.random.default_rng(1).permutation(20)
    write_order(tmp_path / "r", order)
    reader = open_reader(tmp_path / "r")
    for i in range(20):
        np.testing.assert_array_equal(reader[i]["input_ids"], records[order[i]]["input_ids"])
    np.testing.assert_array_equal(reader.lengths, [len(records[j]["input_ids"]) for j in order])
    with pytest.raises(ValueError, match="permutation"):
        write_order(tmp_path / "r", np.zeros(20, np.int64))


def _read_in_child(reader, queue):
    queue.put([reader[i]["input_ids"].tolist() for i in range(len(reader))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_pickles_and_works_after_fork(tmp_path, backend):
    records = make_records(10)
    write(tmp_path / "r", records, backend)
    reader = open_reader(tmp_path / "r")
    reader[0]  # opened in the parent before forking
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone[3]["labels"], records[3]["labels"])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, queue))
    child.start()
    got = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert got == [r["input_ids"].tolist() for r in records]


def test_lmdb_map_grows(tmp_path):
    records = make_records(500)
    write(tmp_path / "r", records, "lmdb", map_size=1 << 14, commit_every=50)
    reader = open_reader(tmp_path / "r")
    assert len(reader) == 500
    np.testing.assert_array_equal(reader[499]["input_ids"], records[499]["input_ids"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_incomplete(tmp_path, backend):
    write(tmp_path / "empty", [], backend)
    assert len(open_reader(tmp_path / "empty")) == 0
    writer = open_writer(tmp_path / "partial", fields=("input_ids", "labels"), backend=backend)
    writer.write(make_records(1)[0])
    writer.abort()  # no meta.json: not a complete folder
    with pytest.raises(FileNotFoundError, match="not a complete records folder"):
        open_reader(tmp_path / "partial")


def test_fields_must_have_equal_length(tmp_path):
    writer = open_writer(tmp_path / "r", fields=("input_ids", "labels"))
    with pytest.raises(ValueError, match="equal length"):
        writer.write({"input_ids": [1, 2], "labels": [1]})
    writer.abort()


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_flat_is_the_stored_form(tmp_path, backend):
    """write_flat takes a record as it is stored (fields concatenated): what the build's workers hand over."""
    record = {"input_ids": np.array([5, 6, 7], np.int32), "labels": np.array([-100, 6, 7], np.int32)}
    with open_writer(tmp_path / "r", fields=("input_ids", "labels"), backend=backend) as writer:
        writer.write(record)
        writer.write_flat(np.concatenate([record["input_ids"], record["labels"]]), 3)
        with pytest.raises(ValueError, match="int32 of 2 x 3"):
            writer.write_flat(np.arange(5, dtype=np.int32), 3)
        with pytest.raises(ValueError, match="int32"):
            writer.write_flat(np.arange(6, dtype=np.int64), 3)
    reader = open_reader(tmp_path / "r")
    assert len(reader) == 2 and reader.num_records == 2
    for i in range(2):
        assert reader[i]["input_ids"].tolist() == [5, 6, 7] and reader[i]["labels"].tolist() == [-100, 6, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_many_equals_writing_one_by_one(tmp_path, backend):
    records = make_records(30)
    flat = np.concatenate([np.concatenate([r["input_ids"], r["labels"]]) for r in records]).astype(np.int32)
    sizes = np.array([len(r["input_ids"]) for r in records])
    with open_writer(tmp_path / "many", fields=("input_ids", "labels"), backend=backend) as writer:
        writer.write(records[0])
        writer.write_many(flat[2 * sizes[0] :], sizes[1:])
        with pytest.raises(ValueError, match="need 1-D int32"):
            writer.write_many(flat[:-1], sizes)
    write(tmp_path / "one", records, backend)
    many, one = open_reader(tmp_path / "many"), open_reader(tmp_path / "one")
    assert many.meta["num_records"] == one.meta["num_records"] == 30
    assert many.meta["num_tokens"] == one.meta["num_tokens"]
    assert np.array_equal(many.lengths, one.lengths)
    for i in range(30):
        assert all(np.array_equal(many[i][f], one[i][f]) for f in ("input_ids", "labels"))
