#!/bin/bash
# device round 26 (session 5): the shipped fast path (all 13 pieces: + frozen_out_proj, gc_freeze; collator row
# bounds), moe:1, 30 timed steps, three runs on one lease, GC collections timed during training
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; rm -rf $R; mkdir -p $R
save(){ tar -cf $OUT/res.tar -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
run(){ n=$1; t=$2; shift; shift; mkdir -p $R/$n; timeout $t python .whl/gcstats.py --variant fast --arch real --steps 30 --warmup 4 --tokens-per-step 8192 "$@" --out $R/$n > $R/log_$n.txt 2>&1; echo "$n rc=$? $(( $(date +%s) - t0 )) s"; grep "OutOfMemory\|Error\|^GC" $R/log_$n.txt | tail -6; grep "^| fast" $R/log_$n.txt | cut -c1-60,150-300; save; }
run m 230 --checkpointing moe:1
run n 100 --checkpointing moe:1
run o 100 --checkpointing moe:1
run p 100 --checkpointing moe:2
