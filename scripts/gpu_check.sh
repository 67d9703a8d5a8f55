#!/usr/bin/env bash
# Issue 13 item 10: the SD3.5-Medium-sized device check, within 8 minutes on one GPU.
#
# NOT RUN YET: no device was lent to the task that wrote this script (the device tool's `status` said
# can_start_another=false), so nothing below has been executed on a GPU. A session whose task has a device runs it
# once through the device tool, fixes what breaks, reruns once, gives the machine back, and copies the table it
# prints into docs/sd3.md ("Device check") with the date and the GPU.
#
# The device machine has torch + CUDA, accelerate, peft and transformers but not diffusers, hydra-core or
# omegaconf: build their wheels here first and carry them (the device tool's `carry`, e.g. carry=[".whl"]):
#   pip download --no-deps -d .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# Usage on the device:  bash scripts/gpu_check.sh  (writes its log and table under ${OUT:-/tmp/gpu_check})
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "== $*" | tee -a "$OUT/table.md"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import diffusers, hydra, omegaconf" 2>/dev/null || pip install -q --no-deps .whl/*.whl
python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)" \
  | tee -a "$OUT/gpu.txt"
date -u +%Y-%m-%d | tee -a "$OUT/gpu.txt"

COMMON=(world.variant=random_full world.device=cuda world.dtype=bfloat16 world.gradient_checkpointing=true
        train.mixed_precision=bf16)

# 1. s/iteration and peak memory per preset at 512 px, group 24, 2 prompts (about 4 min on one H100-class GPU).
log "bench.perf sd3, random_full, bf16, 512 px, G=24, P=2"
timeout 300 python -m bench.perf sd3 --iterations 1 --warmup 1 "${COMMON[@]}" 2>"$OUT/perf.err" | tee -a "$OUT/table.md"

# 2. The largest train.micro_batch that fits (flow_grpo; halving from the whole minibatch).
log "largest train.micro_batch that fits (flow_grpo, G=24, P=2)"
for mb in 216 108 54 27 12 6 3 1; do
  if timeout 90 python -m bench.perf sd3 --presets flow_grpo --iterations 1 --warmup 0 --steps 10 \
       "${COMMON[@]}" world.gradient_checkpointing=false "train.micro_batch=$mb" >"$OUT/mb_$mb.txt" 2>&1; then
    echo "micro_batch=$mb fits without gradient checkpointing" | tee -a "$OUT/table.md"; break
  fi
  echo "micro_batch=$mb: $(grep -m1 -o 'OutOfMemoryError.*' "$OUT/mb_$mb.txt" | cut -c1-80)" | tee -a "$OUT/table.md"
done

# 3. The ratio at step 0 (must be 1 within 1e-6 with fp32 log-probs) and the bf16 train-vs-sampling log-prob gap.
# Two minibatches at lr 1e-12: the second compares a training forward with the rollout's stored log-probs under
# weights that did not move, so its ratio's distance from 1 is the train-vs-sampling log-prob mismatch.
log "step-0 ratio (flow_grpo, 2 minibatches, lr 1e-12): fp32 vs bf16 autocast"
timeout 150 python - "${COMMON[@]}" <<'PY' 2>"$OUT/ratio.err" | tee -a "$OUT/table.md"
import sys
from bench.runner.config import compose_config
from bench.runner.resolve import resolve_cell
from bench.training.train import build_state, train_iteration

for precision, dtype in (("no", "float32"), ("bf16", "bfloat16")):
    over = [o for o in sys.argv[1:] if not o.startswith(("train.mixed_precision", "world.dtype"))]
    cfg = resolve_cell(compose_config(["world=sd3", "method=flow_grpo", *over, f"world.dtype={dtype}",
                                       f"train.mixed_precision={precision}", "train.prompts_per_iter=1",
                                       "train.group_size=4", "train.minibatches=2", "train.lr=1e-12",
                                       "sampler.steps=10"]))
    row = train_iteration(build_state(cfg), 1)
    print(f"{precision:>4} ({dtype}): ratio_min={row.get('ratio_min'):.9f} ratio_max={row.get('ratio_max'):.9f} "
          f"approx_kl_old={row.get('approx_kl_old', float('nan')):.3e}")
PY
echo "done; table in $OUT/table.md"
