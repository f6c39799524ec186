"""Save a randomly initialised model of the real Nemotron-3-Nano architecture, for GPUs that cannot download it.

    python benchmarks/make_random_model.py --layers 8 --out /tmp/nano-slice8

`--layers N` keeps the first N layers of the real hybrid pattern (full widths); the
default 52 is the whole 31.58B model (59 GiB on disk in bf16). The weights are built
directly on the GPU in bf16 (seconds), seeded, and saved with the tiny tokenizer of
`helpers.model` (vocabulary ids fit the real 131k vocabulary).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench  # noqa: E402  (its random-model helpers; it puts notebooks/ on the path)
from helpers import model  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=52)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tokenizer = bench.bench_tokenizer()
    config = model.nemotron_nano_config(hybrid_override_pattern=model.NANO_PATTERN[: args.layers],
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
    start = time.perf_counter()
    llm = bench.build_random_model(config, args.seed, dtype=torch.bfloat16)
    print(f"built {sum(p.numel() for p in llm.parameters()) / 1e9:.2f}B parameters, "
          f"{args.layers} layers, in {time.perf_counter() - start:.1f} s")
    llm.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
