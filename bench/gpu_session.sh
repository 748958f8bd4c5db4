#!/usr/bin/env bash
# The GPU checks of one lent-device session, in one command (see bench/README.md, "A GPU session").
#
#   bash bench/gpu_session.sh [lora|train|all]     # default: all
#
# Installs the wheels carried in .whl/ (the device has its own torch; transformers, peft, deepspeed and
# bitsandbytes come from .whl/ when there) into /tmp/site, then runs
#   lora:  bench/gpu_lora.py         (issue 7: speed and memory vs transformers + PEFT; ~6-8 min on an H200)
#   train: bench/gpu_train_check.py  (issue 5: bf16 LoRA, QLoRA nf4, ZeRO-2/3, FSDP; ~3 min)
# each under its own time limit, so the first cannot eat the second's minutes. A session's 15 device minutes
# (machine start included) hold `lora` or `train` comfortably, both only with luck: run `lora` first. Logs
# and JSON go to $OUT (the device tool's folder that comes back) or bench/results/; gpu_lora.py writes its JSON
# after every row, so a run cut short keeps what it measured.
set -u
part=${1:-all}
out=${OUT:-bench/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_session.log"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu_session.log"

if [ "$part" = lora ] || [ "$part" = all ]; then
    timeout 480 python3 bench/gpu_lora.py --out "$out" --profile 128x1,1024x8 2>&1 | tee "$out/gpu_lora.log" | grep -v Warning
fi
if [ "$part" = train ] || [ "$part" = all ]; then
    rm -rf /tmp/gpu_train_check-*
    timeout 330 python3 bench/gpu_train_check.py --timeout 60 2>&1 | tee "$out/gpu_train_check.log"
    # The end of each failed case's stderr, in one file (the device tool brings back at most 8 files).
    tail -n 40 /tmp/gpu_train_check-*/*.stderr.log > "$out/gpu_train_check-errors.log" 2>/dev/null
fi
ls -la "$out"
