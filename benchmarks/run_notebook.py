"""Run a notebook's code cells in order as a plain script (for machines without Jupyter/papermill).

    python benchmarks/run_notebook.py notebooks/03_training.ipynb

Parameters come from environment variables, which every notebook's `parameters`
cell reads through `helpers.notebook.setting`. Runs with `notebooks/` as the working
directory, like Jupyter. Each cell's last expression is not displayed (no IPython).
"""

import json
import os
import sys
import time
from pathlib import Path

path = Path(sys.argv[1]).resolve()
os.chdir(path.parent)
sys.path.insert(0, str(path.parent))
namespace = {"__name__": "__main__"}
for i, cell in enumerate(json.loads(path.read_text())["cells"]):
    if cell["cell_type"] != "code":
        continue
    source = "".join(cell["source"])
    print(f"--- [{path.stem} cell {i}] {source.splitlines()[0][:80] if source else ''}", flush=True)
    start = time.perf_counter()
    exec(compile(source, f"{path.name}:cell{i}", "exec"), namespace)
    print(f"--- ({time.perf_counter() - start:.1f} s)", flush=True)
