"""One-off A/B: bench.py with PackedCollator's CPU row bounds removed (attention finds them on the GPU again)."""
import runpy
import sys
sys.path.insert(0, "notebooks")
sys.path.insert(0, "benchmarks")
from helpers import fast
original = fast.PackedCollator.__call__
def call(self, examples):
    batch = original(self, examples)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        batch.pop(key)
    return batch
fast.PackedCollator.__call__ = call
sys.argv = ["benchmarks/bench.py", *sys.argv[1:]]
runpy.run_path("benchmarks/bench.py", run_name="__main__")
