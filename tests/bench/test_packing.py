"""bench/packing.py: the same samples, packed, fill fewer and fuller rows, and every real token is trained."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_packing_bench_trains_the_same_tokens_with_less_padding(capsys):
    spec = importlib.util.spec_from_file_location("bench_packing", REPO / "bench" / "packing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        argv = ["--samples", "24", "--max-seq-length", "64", "--long-fraction", "0.2", "--batch-size", "4"]
        assert module.main([*argv, "--repeats", "1", "--warmup", "1"]) == 0
        samples = module.skewed_samples(24, 64, 0.2, seed=0)
        assert all("seq_ids" in item for item in module.packed_items(samples, 64))
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    total = int(re.search(r"24 samples, (\d+) tokens", out)[1])
    assert total == sum(len(ids) for ids, _ in samples)
    rows = {}
    for line in out.splitlines():
        match = re.fullmatch(
            r"\| (\w+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+)% \| ([\d.]+) \| (\d+) \|", line
        )
        if match:
            rows[match[1]] = [float(x) for x in match.groups()[1:]]
    unpacked, packed = rows["unpacked"], rows["packed"]
    assert unpacked[0] == 24 and unpacked[1] == 6  # one row per sample, 4 rows per step
    assert packed[0] < unpacked[0] and packed[1] < unpacked[1]
    assert unpacked[2] == packed[2] == total  # every real token trained, in both runs
    assert packed[4] < unpacked[4]  # padding share
    assert packed[6] > 0 and unpacked[6] > 0
    assert re.search(r"packed / unpacked real-token throughput: [\d.]+x", out)
