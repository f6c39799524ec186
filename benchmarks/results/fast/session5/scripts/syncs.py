"""One-off: run bench.py with CUDA sync debug warnings on; count each synchronizing call by its Python stack."""
import collections
import runpy
import sys
import traceback
import warnings
import torch
sys.path.insert(0, "benchmarks")
counts = collections.Counter()
def show(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" not in str(message).lower():
        return
    frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
    def short(f):
        path = f.filename.split("site-packages/")[-1].replace("/tmp/site/", "").split("/main/")[-1]
        return f"{path}:{f.lineno} {f.line[:70] if f.line else ''}"
    counts["\n      <- ".join(short(f) for f in frames[-5:][::-1])] += 1
warnings.showwarning = show
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode(1)
sys.argv = ["benchmarks/bench.py", *sys.argv[1:]]
try:
    runpy.run_path("benchmarks/bench.py", run_name="__main__")
finally:
    torch.cuda.set_sync_debug_mode(0)
    print("SYNCS", sum(counts.values()))
    for k, n in counts.most_common(40):
        print(f"{n:5d}  {k}")
