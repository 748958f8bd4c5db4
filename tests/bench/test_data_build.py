"""bench/data_build.py at tiny sizes: its three builders agree, it reports them all, and a peer that builds
different samples stops the run."""

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[2]
MODULE = (
    "bench_data_build"  # registered in sys.modules: datasets' worker processes pickle map functions by name
)
NAMES = [
    "glmtune build_records",
    "datasets.map, ChatGLM2 recipe (tokenizer.encode)",
    "datasets.map, glmtune's template calls",
]
RECORDS, LMDB_RECORDS = 300, 400

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(MODULE, REPO / "bench" / "data_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def tokenizer(reference_dir) -> str:
    return str(reference_dir / "chatglm2-6b-tiny")


@pytest.fixture(scope="module")
def expected(bench, tokenizer, tmp_path_factory) -> dict[str, int]:
    """The samples the benchmark's two data sets make (the comparison's, seed 0; the LMDB build's, seed 1),
    counted through the template alone, without any builder."""
    folder = tmp_path_factory.mktemp("expected")
    template = bench.make_template(tokenizer, "chatglm2", "chatglm2")
    settings = bench.LengthSettings(
        max_seq_length=bench.MAX_SEQ_LENGTH, protected_head=template.protected_head
    )
    counts = {}
    for key, records, seed in (("compared", RECORDS, 0), ("lmdb", LMDB_RECORDS, 1)):
        data = folder / f"{key}.jsonl"
        bench.generate(data, records, seed=seed)
        counts[key] = sum(
            len(bench.fit_length(ids, labels, settings)[0])
            for dialogue in bench.iter_dialogues(data, "paragraph")
            for ids, labels in bench.build_samples(dialogue, template, "per_turn")
        )
        assert counts[key] >= records
    return counts


@pytest.fixture(scope="module")
def run(bench, tokenizer, tmp_path_factory):
    """One benchmark run in this process: (its printed lines, its work folder)."""
    workdir = tmp_path_factory.mktemp("data_build")
    argv = ["--records", str(RECORDS), "--lmdb-records", str(LMDB_RECORDS), "--procs", "2"]
    argv += ["--tokenizer", tokenizer, "--workdir", str(workdir)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = bench.main(argv)  # raises SystemExit if the builders' samples differ
    assert status == 0
    return out.getvalue().splitlines(), workdir


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells}


def test_all_three_builders_make_the_same_samples(run, expected):
    lines, _ = run
    for name in NAMES:
        assert any(line.startswith(f"{name}: {expected['compared']} samples in ") for line in lines), lines
    compared = [line for line in lines if line.startswith("outputs compared:")]
    assert compared == [f"outputs compared: {'; '.join(NAMES[1:])}: the same samples as glmtune"]


def test_the_table_has_a_row_per_builder(run, expected):
    lines, _ = run
    rows = table_rows(lines)
    for name in NAMES:
        samples, seconds, rate, cpu, per_cpu = rows[name]
        assert int(samples) == expected["compared"]
        assert float(seconds) >= 0 and float(cpu) >= 0
        assert float(rate.replace(",", "")) > 0 and float(per_cpu.replace(",", "")) > 0


def test_ratios_against_both_peers(run):
    lines, _ = run
    for name in NAMES[1:]:
        pattern = rf"glmtune / {re.escape(name)}: ([\d.]+)x samples/s, ([\d.]+)x samples per CPU second"
        found = [m for m in map(re.fullmatch, [pattern] * len(lines), lines) if m]
        assert len(found) == 1, lines
        assert float(found[0][1]) > 0 and float(found[0][2]) > 0
    cpu = [line for line in lines if line.startswith("CPU per sample: template + fit_length alone ")]
    assert len(cpu) == 1


def test_lmdb_build_writes_every_sample_and_reports_its_peak_memory(run, expected):
    lines, _ = run
    title = rf"LMDB build of {LMDB_RECORDS} records \(\d+ MiB of JSON lines\):"
    assert any(re.fullmatch(title, line) for line in lines), lines
    header = lines.index("| records written | seconds | peak RSS builder | peak RSS largest worker |")
    row = re.fullmatch(r"\| (\d+) \| ([\d.]+) \| (\d+) MiB \| (\d+) MiB \|", lines[header + 2])
    assert row, lines[header + 2]
    assert int(row[1]) == expected["lmdb"]
    assert float(row[2]) >= 0
    assert int(row[3]) > 0 and int(row[4]) > 0


def test_the_work_folder_is_removed(run):
    _, workdir = run
    assert list(workdir.iterdir()) == []


# A peer whose samples differ from glmtune's must stop the run. The replacement runs in datasets' worker
# processes, so it is a module-level function (pickled by name) calling the unpatched recipe.


def recipe_without_eos(batch, **kwargs):
    out = sys.modules[MODULE].unpatched_recipe_fn(batch, **kwargs)
    return {key: [sample[:-1] for sample in samples] for key, samples in out.items()}


def recipe_losing_a_sample(batch, **kwargs):
    out = sys.modules[MODULE].unpatched_recipe_fn(batch, **kwargs)
    return {key: samples[:-1] for key, samples in out.items()}


@pytest.mark.parametrize(
    "peer, message",
    [
        (recipe_without_eos, rf"sample \d+ differs between {re.escape(NAMES[1])} and glmtune"),
        (recipe_losing_a_sample, rf"sample counts differ: {re.escape(NAMES[1])} \d+, glmtune \d+"),
    ],
    ids=["eos-dropped", "sample-lost"],
)
def test_a_peer_with_other_samples_stops_the_run(
    bench, tokenizer, tmp_path, monkeypatch, capsys, peer, message
):
    monkeypatch.setattr(bench, "unpatched_recipe_fn", bench.recipe_fn, raising=False)
    monkeypatch.setattr(bench, "recipe_fn", peer)
    argv = ["--records", "40", "--lmdb-records", "0", "--procs", "2", "--tokenizer", tokenizer]
    with pytest.raises(SystemExit, match=message):
        bench.main([*argv, "--workdir", str(tmp_path)])
    assert "outputs compared:" not in capsys.readouterr().out
