"""bench/block_costs.py: glmtune's fused LoRA block keeps less for its backward than PEFT's LoRA does, and its
recomputation costs fewer FLOPs."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_fused_lora_block_saves_less_and_recomputes_less_than_peft_lora(capsys):
    spec = importlib.util.spec_from_file_location("bench_block_costs", REPO / "bench" / "block_costs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--tokens", "32"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    rows, flops = {}, {}
    for line in capsys.readouterr().out.splitlines():
        match = re.fullmatch(r"\| (.+?) \| (\d+) \| (\d+) \| ([\d.]+) \|", line)
        if match:
            rows[match[1]] = (int(match[2]), int(match[3]))
        match = re.fullmatch(r"\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if match:
            flops[match[1]] = tuple(float(x) for x in match.groups()[1:])
    peer, plain, fused = (
        rows["peer: GlmForCausalLM + PEFT LoRA"],
        rows["glmtune model + PEFT LoRA"],
        rows["glmtune (apply_method: fused LoRA)"],
    )
    assert all(kb > 0 for kb, _ in (peer, plain, fused))
    # The fp32 input copies PEFT keeps for lora_A are gone: at least the MLP's 13,696-wide one (55 KB/token).
    assert plain[1] - fused[1] >= 50
    assert fused[0] < plain[0] < peer[0]
    # The same forward; the recomputation stops before dense_4h_to_h's GEMM, a quarter of the block's forward:
    # the step (forward + backward + recomputed forward, ~3 forwards) is ~9% cheaper, not more than 1/3 (the
    # whole recomputation).
    peer_flops, fused_flops = (
        flops["peer: GlmForCausalLM + PEFT LoRA"],
        flops["glmtune (apply_method: fused LoRA)"],
    )
    assert fused_flops[0] == pytest.approx(peer_flops[0], rel=0.01)
    assert peer_flops[3] == 1.0 and 0.85 < fused_flops[3] < 0.95
    assert flops["glmtune model + PEFT LoRA"][3] == pytest.approx(1.0, abs=0.01)  # PEFT's order recomputes it
