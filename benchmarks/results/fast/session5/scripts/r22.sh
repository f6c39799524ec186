#!/bin/bash
# device round 22 (session 5): frozen_out_proj (12th piece) against the 11 pieces, A/B/A/B on one lease, moe:1;
# then check_fast on slice8 with all 12 pieces and the 11 as a compared set
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; mkdir -p $R
save(){ tar -cf $OUT/res.tar -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
ELEVEN=packing,lean_experts,round_lengths,fused_norms,varlen_attention,lora_bf16,bf16_relu2,compact_experts,lora_addmm,fused_expert_act,fused_slot_sum
B="python benchmarks/bench.py --variant fast --arch real --steps 20 --warmup 4 --tokens-per-step 8192 --out $R"
run(){ n=$1; t=$2; shift; shift; mkdir -p $R/$n; timeout $t $B "$@" > $R/log_$n.txt 2>&1; echo "$n rc=$? $(( $(date +%s) - t0 )) s"; mv $R/*.json $R/$n/ 2>/dev/null; grep "OutOfMemory\|Error" $R/log_$n.txt | tail -2; grep "^| fast" $R/log_$n.txt | cut -c1-300; save; }
run a 260 --checkpointing moe:1
run b 110 --checkpointing moe:1 --fast-features $ELEVEN
run c 110 --checkpointing moe:1
run d 110 --checkpointing moe:1 --fast-features $ELEVEN
left=$(( 585 - ($(date +%s) - t0) )); echo "check gets $left s"
timeout $left python benchmarks/check_fast.py --arch slice8 --steps 4 --out $R --compare-features $ELEVEN > $R/log_check.txt 2>&1
echo "check rc=$? $(( $(date +%s) - t0 )) s"; sed -n '/^{$/,$p' $R/log_check.txt | tr -d '\n ' | cut -c1-1500; echo; save
