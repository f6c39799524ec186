#!/bin/bash
# device round 24 (session 5; round 23 lost its B runs and the sync list to a sys.path slip): where a training step waits for the GPU (CUDA sync debug, slice8), then the
# collator's CPU row bounds A/B (new / without / new / without) on the full model, moe:1, all 12 pieces
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; mkdir -p $R
save(){ tar -cf $OUT/res.tar -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
timeout 130 python .whl/syncs.py --variant fast --arch slice8 --steps 3 --warmup 1 --tokens-per-step 8192 --checkpointing moe:1 --out $R/syncs > $R/log_syncs.txt 2>&1
echo "syncs rc=$? $(( $(date +%s) - t0 )) s"; sed -n '/^SYNCS/,$p' $R/log_syncs.txt | head -120; save
A="python benchmarks/bench.py"; N="python .whl/nobounds.py"
run(){ n=$1; t=$2; shift; shift; mkdir -p $R/$n; timeout $t "$@" --variant fast --arch real --steps 20 --warmup 4 --tokens-per-step 8192 --checkpointing moe:1 --out $R/$n > $R/log_$n.txt 2>&1; echo "$n rc=$? $(( $(date +%s) - t0 )) s"; grep "OutOfMemory\|Error" $R/log_$n.txt | tail -2; grep "^| fast" $R/log_$n.txt | cut -c150-300; save; }
run e 200 $A
run f 85 $N
run g 85 $A
run h 85 $N
