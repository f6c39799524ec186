#!/usr/bin/env bash
# Data-parallel scaling on one machine with 2 GPUs (e.g. 2 x H100 80GB), in one command:
#
#   bash benchmarks/scaling.sh OUT_DIR            # everything below (~8-9 minutes on 2 x H100, see PARTS)
#   bash benchmarks/scaling.sh OUT_DIR ddp        # only 1 vs 2 GPUs (DDP)          (~5 minutes)
#   bash benchmarks/scaling.sh OUT_DIR fsdp       # only the FSDP memory measurement (~3-4 minutes)
#
# 1. one process:        bench.py --variant standard --arch real, TOKENS tokens/step, STEPS timed steps
# 2. two processes, DDP: the same per GPU (configs/ddp.yaml): each GPU holds the whole model, tokens/s counts both
#    (1 and 2 run once per variant in VARIANTS; the fast variant with --checkpointing FAST_CHECKPOINTING)
# 3. two processes, FSDP (configs/fsdp.yaml): the base model sharded over both GPUs; the record's
#    budgets[].per_process[].train_peak_allocated_gib is the memory each GPU needs while training
# 4. bench.py --scaling OUT_DIR: table (speed-up, efficiency; also OUT_DIR/scaling.md) + OUT_DIR/scaling.png
#
# Settings (environment): PYTHON (default .venv/bin/python, else python), ARCH (real), TOKENS (8192 per GPU),
# STEPS (8), WARMUP (2), VARIANTS (standard; e.g. "standard fast"), FAST_CHECKPOINTING (moe),
# FSDP_ARCH (ARCH; slice8 is quicker), FSDP_TOKENS (TOKENS).
# Needs: CUDA, mamba_ssm + causal_conv1d (the standard variant refuses to run without them). No network.
#
# NCCL (the library the two processes exchange gradients through) is configured by your environment, not here;
# each record keeps every NCCL_* variable under distributed.environment. One you may need: NCCL_NVLS_ENABLE=0.
# NCCL uses NVLink SHARP ("NVLS": reductions done inside NVSwitch chips) where the machine seems to offer it; on
# rented or virtualised machines whose switches are not fully exposed to you, setting it up can fail and stop the
# launch. Turning it off should cost this benchmark little: DDP exchanges only the LoRA gradients (11.4M parameters,
# ~45 MB in float32 per step). The committed scaling records ran with NCCL_NVLS_ENABLE=0.
set -euo pipefail

OUT=${1:?usage: bash benchmarks/scaling.sh OUT_DIR [all|ddp|fsdp]}
PARTS=${2:-all}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
ARCH=${ARCH:-real}
TOKENS=${TOKENS:-8192}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-2}
VARIANTS=${VARIANTS:-standard}
FAST_CHECKPOINTING=${FAST_CHECKPOINTING:-moe}
FSDP_ARCH=${FSDP_ARCH:-$ARCH}
FSDP_TOKENS=${FSDP_TOKENS:-$TOKENS}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 2)
COMMON=(--steps "$STEPS" --warmup "$WARMUP" --out "$OUT")
BENCH=(benchmarks/bench.py --variant standard "${COMMON[@]}")

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi topo -m > "$OUT/topology.txt" 2>&1 || true   # how the two GPUs are connected (NVLink or PCIe)

run() {  # run NAME COMMAND...: the command's output goes to the screen and to OUT/log_NAME.txt
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/log_$name.txt"
  echo "=== $name done in $((SECONDS - start)) s"
}

if [[ $PARTS == all || $PARTS == ddp ]]; then
  for variant in $VARIANTS; do
    ARGS=(benchmarks/bench.py --variant "$variant" "${COMMON[@]}" --arch "$ARCH" --tokens-per-step "$TOKENS")
    [[ $variant == fast ]] && ARGS+=(--checkpointing "$FAST_CHECKPOINTING")
    run "1gpu-$variant" env CUDA_VISIBLE_DEVICES=0 "$PYTHON" "${ARGS[@]}"
    run "2gpu-ddp-$variant" "${LAUNCH[@]}" --config_file configs/ddp.yaml "${ARGS[@]}"
  done
fi
if [[ $PARTS == all || $PARTS == fsdp ]]; then
  run 2gpu-fsdp "${LAUNCH[@]}" --config_file configs/fsdp.yaml "${BENCH[@]}" --arch "$FSDP_ARCH" \
    --tokens-per-step "$FSDP_TOKENS"
fi
"$PYTHON" benchmarks/bench.py --scaling "$OUT" | tee "$OUT/scaling.md"
