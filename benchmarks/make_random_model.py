"""Save a randomly initialised model of the real Nemotron-3-Nano architecture, for GPUs that cannot download it.

    python benchmarks/make_random_model.py --layers 8 --out /tmp/nano-slice8
    python benchmarks/make_random_model.py --out /dev/shm/real      # all 52 layers: 59 GiB (RAM disk or big disk)

`--layers N` keeps the first N layers of the real hybrid pattern (full widths); the default 52 is the whole
31.58B model (59 GiB on disk in bf16). The weights are built directly on the GPU in bf16 (seconds), seeded, and
saved with the tiny tokenizer (its ids fit the real 131k vocabulary). `bench.py --model DIR` then loads the
same weights into every stack, Unsloth's included (the full-depth comparison of benchmarks/NOTES.md).
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import models  # noqa: E402


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=52)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tokenizer = models.bench_tokenizer()
    config = models.arch_config("real", tokenizer, layers=args.layers)
    start = time.perf_counter()
    llm = models.build_random_model(config, args.seed, dtype=torch.bfloat16)
    print(f"built {sum(p.numel() for p in llm.parameters()) / 1e9:.2f}B parameters, "
          f"{args.layers} layers, in {time.perf_counter() - start:.1f} s")
    llm.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out} in {time.perf_counter() - start:.1f} s")
    return Path(args.out)


if __name__ == "__main__":
    main()
