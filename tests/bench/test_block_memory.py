"""bench/block_memory.py: glmtune's fused LoRA block keeps less for its backward than PEFT's LoRA does."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_fused_lora_block_saves_less_than_peft_lora(capsys):
    spec = importlib.util.spec_from_file_location("bench_block_memory", REPO / "bench" / "block_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--tokens", "32"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.fullmatch(r"\| (.+?) \| (\d+) \| (\d+) \| ([\d.]+) \|", line)
        if match:
            rows[match[1]] = (int(match[2]), int(match[3]))
    peer, plain, fused = (
        rows["peer: GlmForCausalLM + PEFT LoRA"],
        rows["glmtune model + PEFT LoRA"],
        rows["glmtune (apply_method: fused LoRA)"],
    )
    assert all(kb > 0 for kb, _ in (peer, plain, fused))
    # The fp32 input copies PEFT keeps for lora_A are gone: at least the MLP's 13,696-wide one (55 KB/token).
    assert plain[1] - fused[1] >= 50
    assert fused[0] < plain[0] < peer[0]
