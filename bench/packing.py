"""Real-token training throughput with and without `data.packing`, on a skewed length distribution (CPU).

    python bench/packing.py                       # 512 samples, max_seq_length 512, 8 rows per batch
    python bench/packing.py --samples 128 --batch-size 4

Most chat fine-tuning sets hold many short samples and a few long ones. Without packing a batch is padded
to its longest sample, so one long sample makes the whole batch long; with packing, samples are packed
first-fit into rows of up to max_seq_length tokens (`glmtune.data.build.Packer`, as the record builder does)
and a row's samples are kept apart in attention by `seq_ids`.

Both runs train the same tiny ChatGLM2 (same initial weights, full fine-tuning, AdamW) over the same samples,
`--batch-size` rows per step, each step through the training module's own model call
(`CausalLMModule.model_step`: the collated batch, seq_ids included), then backward and an optimizer step.
Reported: real (non-padding) tokens per second of an epoch's training steps, the fastest of `--repeats`
epochs (the two runs alternate, so both see the same load of a shared machine), after `--warmup` untimed
steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmtune.config import TrainArgs  # noqa: E402
from glmtune.data.dataset import Collator  # noqa: E402
from glmtune.data.packing import Packer  # noqa: E402
from glmtune.data.samples import IGNORE_INDEX  # noqa: E402
from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration  # noqa: E402
from glmtune.training.module import CausalLMModule  # noqa: E402

VOCAB = 2048
PAD = 0


def skewed_samples(
    count: int, max_seq_length: int, long_fraction: float, seed: int
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) samples: most 8 to max/8 tokens long, `long_fraction` of them max/2 to max; the first
    half of each is prompt (labels -100), as in a chat sample."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        if rng.random() < long_fraction:
            n = int(rng.integers(max_seq_length // 2, max_seq_length + 1))
        else:
            n = int(rng.integers(8, max(9, max_seq_length // 8 + 1)))
        ids = rng.integers(1, VOCAB, n).tolist()
        samples.append((ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]))
    return samples


def unpacked_items(samples: list[tuple[list[int], list[int]]]) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)} for ids, labels in samples]


def packed_items(
    samples: list[tuple[list[int], list[int]]], max_seq_length: int
) -> list[dict[str, torch.Tensor]]:
    packer = Packer(max_seq_length)
    records = [record for ids, labels in samples for record in packer.add(ids, labels)] + packer.flush()
    return [{k: torch.from_numpy(v.astype(np.int64)) for k, v in record.items()} for record in records]


def tiny_model(seed: int) -> ChatGLM2ForConditionalGeneration:
    torch.manual_seed(seed)
    config = ChatGLM2Config(
        num_layers=2,
        hidden_size=256,
        ffn_hidden_size=512,
        num_attention_heads=4,
        kv_channels=64,
        multi_query_attention=True,
        multi_query_group_num=2,
        padded_vocab_size=VOCAB,
        seq_length=4096,
        pad_token_id=PAD,
    )
    return ChatGLM2ForConditionalGeneration(config).float()


class Run:
    """One way of batching the epoch: its model, optimizer and batches, and the epochs timed so far."""

    def __init__(self, name: str, items: list[dict[str, torch.Tensor]], batch_size: int, seed: int) -> None:
        self.name = name
        self.rows = len(items)
        self.module = CausalLMModule(tiny_model(seed), TrainArgs(), total_steps=1)
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.module.model.parameters(), lr=1e-4)
        collate = Collator(PAD)
        self.batches = [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        self.real_tokens = sum(int(batch["attention_mask"].sum()) for batch in self.batches)
        self.batch_tokens = sum(batch["input_ids"].numel() for batch in self.batches)
        self.seconds: list[float] = []

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.module.model_step(batch)  # the training module's model call, seq_ids included
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def warm_up(self, steps: int) -> None:
        for batch in self.batches[:steps]:
            self.step(batch)

    def timed_epoch(self) -> None:
        start = time.perf_counter()
        for batch in self.batches:
            self.step(batch)
        self.seconds.append(time.perf_counter() - start)

    @property
    def throughput(self) -> float:
        """Real tokens per second of the fastest epoch (the least disturbed by other work on the machine)."""
        return self.real_tokens / min(self.seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=512, help="samples in the epoch")
    parser.add_argument("--max-seq-length", type=int, default=512, help="longest sample and packed row")
    parser.add_argument("--long-fraction", type=float, default=0.05, help="share of long samples")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per training step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per run (the fastest counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    samples = skewed_samples(args.samples, args.max_seq_length, args.long_fraction, args.seed)
    lengths = np.array([len(ids) for ids, _ in samples])
    runs = [
        Run("unpacked", unpacked_items(samples), args.batch_size, args.seed),
        Run("packed", packed_items(samples, args.max_seq_length), args.batch_size, args.seed),
    ]
    for run in runs:
        run.warm_up(args.warmup)
    for _ in range(args.repeats):  # alternating, so both see the same machine load
        for run in runs:
            run.timed_epoch()
    print(
        f"{args.samples} samples, {int(lengths.sum())} tokens (p50 {int(np.median(lengths))}, "
        f"max {int(lengths.max())}, {args.long_fraction:.0%} long), max_seq_length {args.max_seq_length}, "
        f"{args.batch_size} rows per step; tiny ChatGLM2 (2 layers, hidden 256), fp32, full fine-tuning, "
        f"{args.threads} CPU thread(s); fastest of {args.repeats} epochs, after {args.warmup} warm-up steps:\n"
    )
    print(
        "| batches | rows | steps | real tokens | tokens incl. padding | padding | seconds | real tokens / s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        padding = 1 - run.real_tokens / run.batch_tokens
        print(
            f"| {run.name} | {run.rows} | {len(run.batches)} | {run.real_tokens} | {run.batch_tokens} | {padding:.1%} "
            f"| {min(run.seconds):.2f} | {run.throughput:.0f} |"
        )
    print(f"\npacked / unpacked real-token throughput: {runs[1].throughput / runs[0].throughput:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
