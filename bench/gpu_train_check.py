"""GPU check of the training strategies: loss and peak memory of 20 steps each on a ~1B ChatGLM2-shaped model.

    python bench/gpu_train_check.py            # CUDA: 16 layers x hidden 2048, vocab 65024 (~1.1B parameters)
    python bench/gpu_train_check.py --tiny     # CPU: tiny sizes; proves the script (GPU-only cases fail clearly)
    python bench/gpu_train_check.py --cases zero3_lora fsdp_lora

Cases (each in its own subprocess, so one failure does not stop the others):
    bf16_lora     LoRA r=8, weights bf16, precision bf16-mixed, one device
    qlora_nf4     bitsandbytes NF4 weights (double quantization) + LoRA, bf16 compute
    zero2_lora    LoRA under DeepSpeed ZeRO-2 (glmtune/training/deepspeed/zero2.json)
    zero3_lora    LoRA under DeepSpeed ZeRO-3; the final adapter is gathered on rank 0
    fsdp_lora     LoRA under FSDP (blocks wrapped, original parameters), adapter gathered on rank 0
Where a case has "reload", its saved adapter is loaded back for inference (glmtune.inference.artifacts.load_lora).

The model is random (seeded) with a tokenizer trained on data/train.json; samples are short (128 tokens), the
data is the project's own demo set. Peak memory is torch.cuda.max_memory_allocated (CPU: the process's max RSS).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "bf16_lora": {"strategy": "auto", "reload": True},
    "qlora_nf4": {"strategy": "auto", "quantization": "nf4"},
    "zero2_lora": {"strategy": "deepspeed_stage_2"},
    "zero3_lora": {"strategy": "deepspeed_stage_3", "reload": True},
    "fsdp_lora": {"strategy": "fsdp", "reload": True},
}
FULL = dict(
    num_layers=16,
    hidden_size=2048,
    num_attention_heads=16,
    multi_query_group_num=2,
    kv_channels=128,
    ffn_hidden_size=6848,
    padded_vocab_size=65024,
)
TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    multi_query_group_num=2,
    kv_channels=16,
    ffn_hidden_size=128,
    padded_vocab_size=1024,
)
STEPS = 20


def build_model(folder: Path, tiny: bool) -> Path:
    """A random ChatGLM2-shaped checkpoint (bf16 on disk) with a small trained tokenizer."""
    import torch

    from glmtune.demo.tiny import paragraph_texts
    from glmtune.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    from glmtune.models.saving import save_model
    from glmtune.tokenizers.chatglm2 import ChatGLM2Tokenizer
    from glmtune.tokenizers.train_spm import train_chatglm2_tokenizer

    train_chatglm2_tokenizer(list(paragraph_texts(["data/train.json"])), folder, vocab_size=1000)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(str(folder))
    shape = TINY if tiny else FULL
    config = ChatGLM2Config(
        multi_query_attention=True,
        seq_length=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
        **shape,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = ChatGLM2ForConditionalGeneration(config).to(torch.bfloat16)
    model.glmtune_family = "chatglm2"
    save_model(model, folder)
    params = sum(p.numel() for p in model.parameters())
    (folder / "parameters.txt").write_text(str(params))
    return folder


def run_case(name: str, model_dir: Path, out: Path, tiny: bool) -> dict:
    """One case in this process: train, measure, reload the artifact where the case gathers it."""
    import lightning as L
    import torch

    from glmtune.config import DataArgs, LoraArgs, ModelArgs, TaskConfig, TrainArgs
    from glmtune.training.trainer import train
    from models import ChatModel

    case = CASES[name]
    gpu = torch.cuda.is_available()
    cfg = TaskConfig(method="lora")
    cfg.model = ModelArgs(
        path=str(model_dir), dtype="bfloat16", quantization=case.get("quantization", "none")
    )
    cfg.data = DataArgs(
        train_files=["data/train.json"],
        eval_files=[],
        max_seq_length=128,
        num_workers=1,
        output_dir=str(out / "records"),
    )
    cfg.lora = LoraArgs(r=8, alpha=16, dropout=0.0)
    cfg.train = TrainArgs(
        output_dir=str(out / name),
        max_steps=STEPS,
        batch_size=4,
        learning_rate=1e-3,
        scheduler="constant",
        precision="bf16-mixed",
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        strategy=case["strategy"],
        log_every_n_steps=1,
    )

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.losses.append(float(loss))

    losses = Losses()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(cfg, module_cls=ChatModel, callbacks=[losses], enable_progress_bar=False)
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if gpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    row = {
        "case": name,
        "steps": result.global_step,
        "first_loss": losses.losses[0],
        "last_loss": losses.losses[-1],
        "peak_gib": peak / 2**30,
        "seconds": seconds,
        "reload": "",
    }
    if case.get("reload"):
        # The gathered adapter loads for inference as it is (no ZeRO / FSDP conversion step).
        from glmtune.inference.artifacts import load_lora

        model = load_lora(cfg, result.artifact_dir, device="cuda" if gpu else None).model
        row["reload"] = (
            f"ok ({sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n):,} LoRA weights)"
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model, for a CPU check of the script")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--timeout", type=int, default=240, help="seconds per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        row = run_case(args.case, Path(args.model), Path(args.out), args.tiny)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="gpu_train_check-"))
    start = time.perf_counter()
    model_dir = build_model(work / "model", args.tiny)
    params = int((model_dir / "parameters.txt").read_text())
    print(
        f"model: {params / 1e9:.3f}B parameters, built in {time.perf_counter() - start:.0f} s ({work})",
        flush=True,
    )
    rows = []
    for name in args.cases:
        command = [sys.executable, __file__, "--case", name, "--model", str(model_dir), "--out", str(work)]
        if args.tiny:
            command.append("--tiny")
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode == 0 and found:
                rows.append(json.loads(found[-1][len("RESULT ") :]))
            else:
                error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"case": name, "error": error[:160]})
                (work / f"{name}.stderr.log").write_text(done.stderr)
        except subprocess.TimeoutExpired:
            rows.append({"case": name, "error": f"timed out after {args.timeout} s"})
        print(json.dumps(rows[-1]), flush=True)

    print("\n| case | steps | first loss | last loss | peak GiB | s | artifact reload |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['case']} | | | | | | error: {r['error']} |")
        else:
            print(
                f"| {r['case']} | {r['steps']} | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
                f"{r['peak_gib']:.2f} | {r['seconds']:.0f} | {r['reload']} |"
            )
    print(f"\ntotal {time.perf_counter() - start:.0f} s; logs of failed cases in {work}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
