#!/bin/bash
# device round 27 (session 5): notebook 03 (standard) and train.py --fast --like that run, on the 8-layer full-width
# slice with the shipped sample (as round 9 of session 3), now with the thirteen pieces; round 28 runs notebook 04
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
R=/tmp/r; rm -rf $R; mkdir -p $R/runs $R/figures
D=$PWD/outputs/dev; M=$D/slice8; F=$D/fmt; O=$D/o; rm -rf $D; mkdir -p $D
save(){ for n in standard standard-fast unsloth; do [ -f $O/runs/$n/metrics.json ] && cp $O/runs/$n/metrics.json $R/runs/$n.json; done
        cp $O/figures/*.png $R/figures/ 2>/dev/null; cp outputs/figures/04*.png $R/figures/ 2>/dev/null; tar -cf $OUT/res.tar -C $R . ; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
t0=$(date +%s)
python benchmarks/make_random_model.py --layers 8 --out $M > $R/log_make.txt 2>&1 || { tail $R/log_make.txt; exit 1; }
python - <<PY > $R/log_data.txt 2>&1 || { tail $R/log_data.txt; exit 1; }
import sys; sys.path.insert(0, "notebooks")
from helpers import data, model
data.prepare_medmcqa(data.SAMPLE_DIR, out_dir="$F", tokenizer=model.load_tokenizer("$M"), max_length=512)
PY
echo "model+data $(( $(date +%s) - t0 )) s"
export MODEL_ID=$M DATA_DIR=$F OUTPUT_ROOT=$O BATCH_SIZE=32 GRAD_ACCUM=1 LEARNING_RATE=1e-4 MAX_STEPS=25 ROUTED_EXPERTS=true LOGGING_STEPS=1 EVAL_LIMIT=16 SAVE_STEPS=1000
RUN_NAME=standard timeout 240 python benchmarks/run_notebook.py notebooks/03_training.ipynb > $R/log_nb03.txt 2>&1; echo "nb03 rc=$? $(( $(date +%s) - t0 )) s"; grep -i "tokens/s\|error\|Traceback" $R/log_nb03.txt | tail -5; save
timeout 200 python train.py --like $O/runs/standard --fast --skip-base-eval > $R/log_fast.txt 2>&1; echo "fast rc=$? $(( $(date +%s) - t0 )) s"; tail -14 $R/log_fast.txt | cut -c1-250; save
