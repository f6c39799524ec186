#!/bin/bash
# device round 25 (session 5): is the step-time noise the host (vmstat: steal, run queue) or Python's GC
# (timed collections during training; A = as is, B = gc.freeze() at train start), full model, moe:1, 12 pieces
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; rm -rf $R; mkdir -p $R
save(){ tar -cf $OUT/res.tar -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; nproc
(vmstat -n 2 > $R/vmstat.txt 2>&1 &)
(nvidia-smi --query-gpu=timestamp,utilization.gpu,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -l 2 > $R/gpu.txt 2>&1 &)
t0=$(date +%s)
run(){ n=$1; t=$2; shift; shift; mkdir -p $R/$n; env "$@" timeout $t python .whl/gcstats.py --variant fast --arch real --steps 30 --warmup 4 --tokens-per-step 8192 --checkpointing moe:1 --out $R/$n > $R/log_$n.txt 2>&1; echo "$n rc=$? $(( $(date +%s) - t0 )) s"; grep "OutOfMemory\|Error\|^GC" $R/log_$n.txt | tail -6; grep "^| fast" $R/log_$n.txt | cut -c150-300; save; }
run i 220 GCFREEZE=0
run j 95 GCFREEZE=1
run k 95 GCFREEZE=0
run l 95 GCFREEZE=1
pkill vmstat; pkill -f "nvidia-smi --query"; save
