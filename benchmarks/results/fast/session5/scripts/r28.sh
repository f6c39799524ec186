#!/bin/bash
# device round 28 (session 5): notebook 04 (Unsloth, with round 27's standard and fast runs as the other bars),
# on the same warm machine as round 27 (outputs/dev kept)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; mkdir -p $R/runs $R/figures
D=$PWD/outputs/dev; M=$D/slice8; F=$D/fmt; O=$D/o
save(){ for n in standard standard-fast unsloth; do [ -f $O/runs/$n/metrics.json ] && cp $O/runs/$n/metrics.json $R/runs/$n.json; done
        cp $O/figures/*.png $R/figures/ 2>/dev/null; cp outputs/figures/04*.png $R/figures/ 2>/dev/null; tar -cf $OUT/res.tar -C $R . ; }
[ -f $O/runs/standard/metrics.json ] && [ -f $O/runs/standard-fast/metrics.json ] || { echo "round 27's runs are gone (new machine)"; exit 3; }
t0=$(date +%s)
export MODEL_ID=$M DATA_DIR=$F OUTPUT_ROOT=$O BATCH_SIZE=32 GRAD_ACCUM=1 LEARNING_RATE=1e-4 MAX_STEPS=25 ROUTED_EXPERTS=true LOGGING_STEPS=1 EVAL_LIMIT=16 SAVE_STEPS=1000
BASELINE_RUN=$O/runs/standard RUN_NAME=unsloth FAST_RUN=$O/runs/standard-fast timeout 500 python benchmarks/run_notebook.py notebooks/04_unsloth_optimization.ipynb > $R/log_nb04.txt 2>&1; echo "nb04 rc=$? $(( $(date +%s) - t0 )) s"; tail -30 $R/log_nb04.txt | cut -c1-300; save
