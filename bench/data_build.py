"""Benchmark: glmtune's record build against `datasets.map`, and the memory of a large LMDB build.

    python bench/data_build.py                       # 200k records, 2 processes, LMDB build of 1M records
    python bench/data_build.py --records 20000 --lmdb-records 100000   # a quick run

1. Generates `--records` `paragraph` records (JSON lines; synthetic Chinese questions and answers of realistic
   length, about a fifth of them multi-turn) in a temporary folder.
2. Builds records from them with `glmtune.data.build_records` (real ChatGLM2 tokenizer and template, per-turn
   samples, `--procs` worker processes, `record` backend), and in the same run does the same tokenization and
   labelling with HuggingFace `datasets`: `Dataset.from_json(file).map(fn, batched=True, num_proc=procs)`,
   twice: with `fn` the published ChatGLM2 recipe (THUDM's ptuning/main.py: `tokenizer.build_prompt`,
   `tokenizer.encode`), the way a `datasets` user tokenizes; and with `fn` calling glmtune's own template, which
   makes the same SentencePiece calls as glmtune, to separate the pipeline's share of the difference from the
   tokenizer calls'. All times include reading the JSON file and writing the results (records / Arrow cache
   files). The three outputs are compared. Wall time and CPU time (the builder and its worker processes) are
   reported, best of `--repeat` alternating runs: on a shared machine the wall time moves with the other load,
   the CPU time much less.
3. Builds `--lmdb-records` records with the `lmdb` backend in a subprocess and reads its peak RSS: the
   builder's VmHWM (its ru_maxrss would not do: Linux carries the parent's high-water mark across exec, so it
   would report this benchmark's own peak) and the largest ru_maxrss of its worker processes (forked from the
   builder, so it counts the pages they share with it).

Needs `pip install datasets` (extra "bench" of setup.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glmtune.data.build import build_records  # noqa: E402
from glmtune.data.fitting import fit_length  # noqa: E402
from glmtune.data.prepare import make_template  # noqa: E402
from glmtune.data.readers import Dialogue, iter_dialogues  # noqa: E402
from glmtune.data.records import open_reader  # noqa: E402
from glmtune.data.samples import build_samples  # noqa: E402
from glmtune.data.settings import BuildSettings, LengthSettings  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "chatglm-reference" / "chatglm2-6b-tiny"
MAX_SEQ_LENGTH = 1024

# Material for the synthetic dialogues: common words and punctuation, mixed with some digits and Latin.
WORDS = (
    "我们 你们 他们 这个 那个 什么 怎么 为什么 可以 应该 需要 已经 还是 或者 因为 所以 但是 如果 "
    "虽然 然后 问题 回答 方法 时间 地方 学生 老师 医生 病人 公司 工作 学习 生活 健康 饮食 运动 "
    "睡眠 天气 城市 北京 上海 中国 历史 文化 经济 科技 手机 电脑 网络 数据 模型 训练 语言 翻译 "
    "写作 文章 故事 建议 注意 检查 治疗 药物 症状 发烧 咳嗽 头痛 每天 一次 两次 小时 分钟 重要 "
    "简单 复杂 具体 详细 主要 一般 比较 非常 特别 可能 提高 减少 增加 保持 避免 选择 使用 了解 "
    "解决 完成 开始 结束 计划 目标 结果 原因 影响 作用 情况 过程 "
).split()
PUNCT = ["，", "，", "，", "。", "、", "；", "：", "？", "！"]
LATIN = ["AI", "GPU", "Python", "2023", "3.5", "ChatGLM", "API", "100", "CPU", "5G"]


def sentence(rng: random.Random, min_words: int, max_words: int) -> str:
    parts = []
    for _ in range(rng.randint(min_words, max_words)):
        parts.append(rng.choice(LATIN) if rng.random() < 0.04 else rng.choice(WORDS))
        if rng.random() < 0.18:
            parts.append(rng.choice(PUNCT))
    return "".join(parts) + "。"


def generate(path: Path, n: int, seed: int = 0, pool: int = 20_000) -> int:
    """`n` paragraph records; ~20% have 2-4 turns. Questions ~15-60 characters, answers ~60-250 (a fifth of
    them up to ~600). Texts are drawn from a pool of `pool` generated questions and answers, which keeps
    generating a million records quick. Returns the number of turns."""
    rng = random.Random(seed)
    questions = [sentence(rng, 4, 25) for _ in range(pool)]
    answers = [sentence(rng, 20, 250 if rng.random() < 0.2 else 90) for _ in range(pool)]
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    turns_total = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = rng.choice((2, 2, 3, 4)) if rng.random() < 0.2 else 1
            turns_total += turns
            paragraph = [{"q": rng.choice(questions), "a": rng.choice(answers)} for _ in range(turns)]
            f.write(dumps({"id": i, "paragraph": paragraph}) + "\n")
    return turns_total


# --- datasets.map: two peers -------------------------------------------------------------------------------
#
# "recipe": what a user writes with `datasets` for ChatGLM2, as THUDM's ChatGLM2-6B ptuning/main.py does
#   (`preprocess_function_train`): `tokenizer.build_prompt(query, history)`, `tokenizer.encode(prompt)`,
#   `tokenizer.encode(answer, add_special_tokens=False)`, labels -100 on the prompt, eos after the answer. The
#   tokenizer is the one AutoTokenizer would give (glmtune's faithful ChatGLM2Tokenizer, a transformers
#   PreTrainedTokenizer, since the published remote code no longer runs).
# "template": the same map calling glmtune's own template (`build_samples`, which calls SentencePiece directly).
#   Both builders then make the same tokenizer calls, so this row shows what the pipeline alone is worth.
# Both apply glmtune's `fit_length`, so that all three outputs must be equal, and are compared.

_WORKER: dict[str, object] = {}


def recipe_fn(batch: dict, tokenizer_path: str, settings: LengthSettings) -> dict:
    """Batched map, the published ChatGLM2 recipe: paragraph records -> per-turn samples."""
    if "tokenizer" not in _WORKER:  # once per process
        from glmtune.models.loading import load_tokenizer

        _WORKER["tokenizer"] = load_tokenizer(tokenizer_path, family="chatglm2")
    tokenizer = _WORKER["tokenizer"]
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for paragraph in batch["paragraph"]:
        history = []
        for turn in paragraph:
            query, answer = turn["q"], turn["a"]
            prompt = tokenizer.build_prompt(query, history)
            a_ids = tokenizer.encode(text=prompt, add_special_tokens=True)
            b_ids = tokenizer.encode(text=answer, add_special_tokens=False)
            ids = a_ids + b_ids + [tokenizer.eos_token_id]
            labels = [-100] * len(a_ids) + b_ids + [tokenizer.eos_token_id]
            for fitted_ids, fitted_labels in fit_length(ids, labels, settings)[0]:
                out["input_ids"].append(fitted_ids)
                out["labels"].append(fitted_labels)
            history.append((query, answer))
    return out


def template_fn(batch: dict, factory, settings: LengthSettings) -> dict:
    """Batched map through glmtune's template: paragraph records -> per-turn samples (like build_records)."""
    if "template" not in _WORKER:  # once per process, as build_records' workers do
        _WORKER["template"] = factory()
    template = _WORKER["template"]
    out: dict[str, list] = {"input_ids": [], "labels": []}
    for paragraph in batch["paragraph"]:
        dialogue = Dialogue(turns=[(t["q"], t["a"]) for t in paragraph])
        for ids, labels in build_samples(dialogue, template, "per_turn"):
            for fitted_ids, fitted_labels in fit_length(ids, labels, settings)[0]:
                out["input_ids"].append(fitted_ids)
                out["labels"].append(fitted_labels)
    return out


def run_datasets(data: Path, cache: Path, fn, procs: int):
    """`Dataset.from_json(data).map(fn, batched=True, num_proc=procs)`, cached under `cache`."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    ds = datasets.Dataset.from_json(str(data), cache_dir=str(cache))
    return ds.map(
        fn,
        batched=True,
        batch_size=256,
        num_proc=procs,
        remove_columns=ds.column_names,
        cache_file_name=str(cache / "mapped.arrow"),
    )


def template_cpu_per_sample(data: Path, template, settings: LengthSettings, limit: int = 20_000) -> float:
    """CPU microseconds per sample of the template calls and length fitting alone (first `limit` records;
    the better of two passes)."""
    dialogues = [d for d, _ in zip(iter_dialogues(data, "paragraph"), range(limit))]
    best = float("inf")
    for _ in range(2):
        started, samples = time.process_time(), 0
        for dialogue in dialogues:
            for ids, labels in build_samples(dialogue, template, "per_turn"):
                samples += len(fit_length(ids, labels, settings)[0])
        best = min(best, (time.process_time() - started) / samples * 1e6)
    return best


# --- LMDB build in a subprocess: its peak RSS -------------------------------------------------------------

LMDB_CHILD = """
import json, resource, sys, functools
sys.path.insert(0, {repo!r})
from glmtune.data.build import build_records
from glmtune.data.prepare import make_template
from glmtune.data.settings import BuildSettings
factory = functools.partial(make_template, {tokenizer!r}, "chatglm2", "chatglm2")
settings = BuildSettings({data!r}, out_dir={out!r}, max_seq_length={max_len}, backend="lmdb",
                         num_workers={procs})
report = build_records(settings, template_factory=factory, tokenizer_fingerprint="bench", progress=False,
                       verbose=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(json.dumps({{
    "self_kib": int(status["VmHWM"].split()[0]),
    "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "records": report.train_records, "seconds": report.seconds,
}}))
"""


def lmdb_peak(data: Path, out: Path, tokenizer: str, procs: int) -> dict:
    script = LMDB_CHILD.format(
        repo=str(REPO), tokenizer=tokenizer, data=str(data), out=str(out), max_len=MAX_SEQ_LENGTH, procs=procs
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes of both builders)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """(result, wall seconds, CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="ChatGLM2 model/tokenizer folder")
    parser.add_argument("--records", type=int, default=200_000, help="paragraph records for the comparison")
    parser.add_argument("--procs", type=int, default=2, help="processes for both builders")
    parser.add_argument(
        "--lmdb-records", type=int, default=1_000_000, help="records of the LMDB build (0: skip)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each builder this many times, alternating; report the best",
    )
    parser.add_argument("--skip-datasets", action="store_true", help="only time glmtune")
    parser.add_argument(
        "--workdir", default=None, help="folder for the generated files (default: a temp dir)"
    )
    args = parser.parse_args(argv)

    factory = functools.partial(make_template, args.tokenizer, "chatglm2", "chatglm2")
    settings = LengthSettings(max_seq_length=MAX_SEQ_LENGTH, protected_head=factory().protected_head)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="glmtune-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        started = time.perf_counter()
        turns = generate(data, args.records)
        print(
            f"generated {args.records} records ({turns} turns, {data.stat().st_size / 2**20:.0f} MiB) "
            f"in {time.perf_counter() - started:.1f}s"
        )

        def glmtune_build(run: int):
            wanted = BuildSettings(
                data, out_dir=tmp / f"records-{run}", max_seq_length=MAX_SEQ_LENGTH, num_workers=args.procs
            )
            return build_records(
                wanted, template_factory=factory, tokenizer_fingerprint="bench", progress=False, verbose=False
            )

        peers = {
            "recipe": functools.partial(recipe_fn, tokenizer_path=args.tokenizer, settings=settings),
            "template": functools.partial(template_fn, factory=factory, settings=settings),
        }
        names = {
            "glmtune": "glmtune build_records",
            "recipe": "datasets.map, ChatGLM2 recipe (tokenizer.encode)",
            "template": "datasets.map, glmtune's template calls",
        }
        builders = ["glmtune"] + ([] if args.skip_datasets else list(peers))
        timings: dict[str, list[tuple[float, float]]] = {key: [] for key in builders}
        outputs = {}
        for run in range(args.repeat):  # alternating, so that a change in the machine's load hits all
            for key in builders:
                if key == "glmtune":
                    report, wall, cpu = timed(functools.partial(glmtune_build, run))
                    count = report.samples_written
                else:
                    (tmp / f"hf-{key}-{run}").mkdir()
                    build = functools.partial(
                        run_datasets, data, tmp / f"hf-{key}-{run}", peers[key], args.procs
                    )
                    outputs[key], wall, cpu = timed(build)
                    count = len(outputs[key])
                timings[key].append((wall, cpu))
                print(f"{names[key]}: {count} samples in {wall:.1f}s ({cpu:.1f} CPU s)")
        samples = report.samples_written
        reader = open_reader(report.train_dir)
        for key, out in outputs.items():  # the same samples, in the same order
            if len(out) != len(reader):
                raise SystemExit(f"sample counts differ: {names[key]} {len(out)}, glmtune {len(reader)}")
            step = max(1, len(out) // 2000)
            for i in range(0, len(out), step):
                theirs, ours = out[i], reader[i]
                if (
                    theirs["input_ids"] != ours["input_ids"].tolist()
                    or theirs["labels"] != ours["labels"].tolist()
                ):
                    raise SystemExit(f"sample {i} differs between {names[key]} and glmtune")
        if outputs:
            print(f"outputs compared: {'; '.join(names[k] for k in outputs)}: the same samples as glmtune")

        print()
        print(
            f"| builder ({args.procs} processes, best of {args.repeat}) | samples | seconds | samples/s "
            "| CPU s | samples per CPU s |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        best = {}
        for key, runs in timings.items():
            wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
            best[key] = (samples / wall, samples / cpu)
            rates = f"{samples / wall:,.0f} | {cpu:.1f} | {samples / cpu:,.0f}"
            print(f"| {names[key]} | {samples} | {wall:.1f} | {rates} |")
        print()
        for key in peers:
            if key in best:
                print(
                    f"glmtune / {names[key]}: {best['glmtune'][0] / best[key][0]:.2f}x samples/s, "
                    f"{best['glmtune'][1] / best[key][1]:.2f}x samples per CPU second"
                )
        if "template" in best:
            # What glmtune and the "template" peer share: the template calls. The pipeline around them is all
            # either can save.
            template_us = template_cpu_per_sample(data, factory(), settings)
            ours, theirs = (1e6 / best[key][1] for key in ("glmtune", "template"))
            print(
                f"CPU per sample: template + fit_length alone {template_us:.0f} us, glmtune {ours:.0f} us, "
                f"datasets.map with the same template {theirs:.0f} us: with no pipeline at all, at most "
                f"{theirs / template_us:.2f}x that peer"
            )
        print("(goal: >= 2x datasets.map)")

        if args.lmdb_records:
            big = tmp / "big.jsonl"
            generate(big, args.lmdb_records, seed=1)
            size = big.stat().st_size / 2**20
            print(f"\nLMDB build of {args.lmdb_records} records ({size:.0f} MiB of JSON lines):")
            peak = lmdb_peak(big, tmp / "lmdb", args.tokenizer, args.procs)
            print("| records written | seconds | peak RSS builder | peak RSS largest worker |")
            print("| ---: | ---: | ---: | ---: |")
            print(
                f"| {peak['records']} | {peak['seconds']:.1f} | {peak['self_kib'] / 2**10:.0f} MiB | "
                f"{peak['worker_kib'] / 2**10:.0f} MiB |"
            )
            print("(goal: <= 1024 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
