#!/bin/bash
# device round 21 (planned for session 5): which GPU-only piece makes the LoRA gradient gap, and is either bf16
# path closer to float32? One process on slice8; give it the whole 10-minute call (timeout 560).
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; mkdir -p $R
save(){ tar -cf $OUT/res.tar -C $R . ; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
ALL=packing,lean_experts,round_lengths,fused_norms,varlen_attention,lora_bf16,bf16_relu2,compact_experts,lora_addmm,fused_expert_act,fused_slot_sum
drop(){ echo "$ALL" | tr ',' '\n' | grep -vx "$1" | paste -sd, ; }
timeout 560 python benchmarks/check_fast.py --arch slice8 --steps 4 --out $R --float32-reference \
  --compare-features "$(drop fused_norms)" "$(drop varlen_attention)" "$(drop fused_expert_act | tr ',' '\n' | grep -vx fused_slot_sum | paste -sd,)" packing,round_lengths \
  > $R/log_check.txt 2>&1
echo "check rc=$? $(( $(date +%s) - t0 )) s"; sed -n '/^{$/,$p' $R/log_check.txt | tr -d '\n ' | cut -c1-2500; echo; save
