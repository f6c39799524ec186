"""One-off: bench.py with Python's garbage collector timed (every collection during Trainer.train), optionally
frozen first (GCFREEZE=1: gc.collect(); gc.freeze() when training starts)."""
import gc
import os
import runpy
import sys
import time
sys.path.insert(0, "notebooks")
sys.path.insert(0, "benchmarks")
import transformers
stats, state = {0: [], 1: [], 2: []}, {"t": 0.0, "on": False}
def timer(phase, info):
    if phase == "start":
        state["t"] = time.perf_counter()
    elif state["on"]:
        stats[info["generation"]].append(time.perf_counter() - state["t"])
gc.callbacks.append(timer)
original = transformers.Trainer.train
def train(self, *a, **k):
    if os.environ.get("GCFREEZE") == "1":
        gc.collect()
        gc.freeze()
    print("GC tracked objects at train start:", len(gc.get_objects()), "frozen:", gc.get_freeze_count(), flush=True)
    state["on"] = True
    t0 = time.perf_counter()
    try:
        return original(self, *a, **k)
    finally:
        state["on"] = False
        wall = time.perf_counter() - t0
        for g, ts in stats.items():
            print(f"GC gen{g}: {len(ts)} collections, {1e3*sum(ts):.1f} ms total, max {1e3*max(ts, default=0):.1f} ms "
                  f"(train wall {wall:.1f} s)", flush=True)
        for ts in stats.values():
            ts.clear()
transformers.Trainer.train = train
sys.argv = ["benchmarks/bench.py", *sys.argv[1:]]
runpy.run_path("benchmarks/bench.py", run_name="__main__")
