"""The GPU benchmarks of LoRA fine-tuning, as modules (`bench.py` is the command line; see README.md).

    models    the model set-up: architectures, seeded random weights, the tokenizer, LoRA per variant
    workload  MedMCQA-shaped rows of random ids, and the first-batch loss every variant must reproduce
    timing    one budget of training steps, timed: the warm-up rule, memory, MFU, profiling
    records   reading records back: figures, markdown tables, charts, the full-depth comparison
    tables    rewrites the tables in README.md and NOTES.md from the committed records

Importing the package puts the repository and `notebooks/` on `sys.path`, so `helpers`, `recipe`, `train`
and `fastpath` import as they do in train.py. `records` and `tables` import nothing heavy.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "notebooks", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
