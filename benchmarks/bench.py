"""LoRA fine-tuning speed of the real Nemotron-3-Nano architecture, random weights, one GPU or several.

Builds the model straight on the GPU in bf16 (seconds, no download), attaches LoRA exactly as
notebook 03 does (or as Unsloth does), feeds it MedMCQA-shaped rows of random token ids, and
times a few optimizer steps per budget of tokens per step. One JSON record per run goes to
benchmarks/results/; `--plot` and `--table` summarise all records in a folder.

    python benchmarks/bench.py --variant standard --arch real --tokens-per-step 4096 8192
    python benchmarks/bench.py --variant standard-nokernels --arch real --tokens-per-step 1024 2048
    python benchmarks/bench.py --variant standard unsloth --arch slice8 --tokens-per-step 4096 8192
    python benchmarks/bench.py --variant standard --arch real --find-max
    python benchmarks/bench.py --plot benchmarks/results      # -> benchmarks/results/benchmark.png
    python benchmarks/bench.py --table benchmarks/results     # markdown table for the README
    python benchmarks/bench.py --arch tiny --steps 2 --warmup 1 --tokens-per-step 256   # CPU smoke run

Several GPUs (one process each, through accelerate; --tokens-per-step is per GPU; one variant per launch):
    accelerate launch --config_file configs/ddp.yaml --num_processes 2 benchmarks/bench.py --arch real
    accelerate launch --config_file configs/fsdp.yaml --num_processes 2 benchmarks/bench.py --arch real
    python benchmarks/bench.py --scaling benchmarks/results/scaling   # 1 vs N processes: speed-up, efficiency
    bash benchmarks/scaling.sh OUT_DIR                                 # all of the above on a 2-GPU machine

Variants (each runs in its own Python process; several --variant values run one after another):
  standard            helpers.model.add_lora + helpers.training.make_trainer (TRL SFTTrainer), Mamba kernels
  standard-nokernels  the same, with mamba_ssm / causal_conv1d hidden from transformers (reference PyTorch Mamba)
  unsloth             `import unsloth` first, then notebook 04's helpers.unsloth_path.load_model + add_lora
                      (FastLanguageModel.from_pretrained + get_peft_model), same SFTConfig
  fast                the standard model and LoRA with TrainConfig(fast=True): padding-free packing with Mamba
                      seq_idx (helpers/fast.py), one micro-batch per step, and --checkpointing POLICY
                      (which block types recompute activations: all, none, or e.g. mamba,moe; moe:N: only the first N
                      MoE blocks)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing here needs the Hub; never hang on a dead network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (torch may come before unsloth; transformers/trl/peft may not)

from helpers import data as hdata  # noqa: E402  (no transformers import at module level)
from helpers import distributed as hdist  # noqa: E402
from helpers import model as hmodel  # noqa: E402
from helpers import plots as hplots  # noqa: E402
from helpers import fast as hfast  # noqa: E402
from helpers import training as htraining  # noqa: E402

VARIANTS = ("standard", "standard-nokernels", "unsloth", "fast")
ARCHS = ("real", "slice8", "tiny")
RESULTS = REPO / "benchmarks" / "results"
FIND_MAX_BUDGETS = (2048, 4096, 8192, 16384, 32768)
LORA_R, LORA_ALPHA = htraining.TrainConfig.lora_r, htraining.TrainConfig.lora_alpha  # the tutorial's LoRA
PROBE_ROWS = 4  # the fixed "first batch" whose loss every variant must reproduce
GIB = 2**30
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins, so the specific names come before "H100".
PEAK_BF16 = (
    ("H100 PCIe", 756e12, "H100 PCIe datasheet, dense bf16"),
    ("H100 NVL", 835e12, "H100 NVL datasheet, dense bf16"),
    ("H100", 989.4e12, "H100 SXM5 80GB HBM3 datasheet, dense bf16"),
    ("H200", 989.4e12, "H200 datasheet, dense bf16"),
    ("A100", 312e12, "A100 datasheet, dense bf16"),
)
NOTES = [
    "Random weights: the router of a randomly initialised MoE spreads tokens over the 128 experts more "
    "uniformly than a trained one, so per-expert batch sizes (and grouped-GEMM efficiency) differ from the "
    "trained model; Mamba/attention/dense costs do not depend on the weights.",
    "Row lengths follow the distribution named in data.source; token ids are random. The real MedMCQA "
    "length distribution (real tokenizer, full train split) cannot be measured on the offline machine that wrote "
    "this script unless data/medmcqa_formatted was prepared there.",
    "MFU = tokens/s x FLOPs/token / card peak (dense bf16). FLOPs/token = 6N: forward 2N + backward to activations "
    "2N (LoRA: frozen weights get no weight gradients) + 2N recomputation (gradient checkpointing). N = matmul "
    "parameters active per token: active_per_token minus the embedding table (a lookup), with the LM head counted "
    "only on the completion share of tokens (TRL's fused head projects only labelled positions). Ignores the "
    "attention/SSM sequence terms and LoRA's own FLOPs. mfu_6n_active uses 6 x active_per_token as is.",
    "Peak memory includes the bf16 weights (~58.8 GiB for the real architecture).",
]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", nargs="+", default=["standard"], choices=VARIANTS)
    p.add_argument("--arch", default="real", choices=ARCHS,
                   help="real: 52 layers, 31.58B; slice8: the first 8 layers (every block type), same widths; "
                        "tiny: helpers.model.tiny_config (CPU tests)")
    p.add_argument("--model", help="a saved NemotronH checkpoint folder to benchmark instead of random weights")
    p.add_argument("--tokens-per-step", nargs="+", type=int, default=[4096],
                   help="budgets: non-padding tokens per optimizer step (rows per step = budget / mean row length)")
    p.add_argument("--steps", type=int, default=12, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=3, help="first steps excluded from the steady-state figures")
    p.add_argument("--find-max", action="store_true",
                   help=f"try {', '.join(map(str, FIND_MAX_BUDGETS))} tokens/step, 3 steps each, until OOM")
    p.add_argument("--routed-experts", action="store_true",
                   help="standard variants: LoRA on the 128 routed experts too (PEFT target_parameters)")
    p.add_argument("--lengths-from", help="a prepare_medmcqa output folder (default: data/medmcqa_formatted if "
                                          "present, else the shipped sample prepared on the fly)")
    p.add_argument("--max-length", type=int, default=htraining.TrainConfig.max_length)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON records")
    p.add_argument("--tmp-dir", default=tempfile.gettempdir(),
                   help="where the unsloth variant saves the random model it loads (slice8: ~9.5 GB)")
    p.add_argument("--run-records", metavar="DIR",
                   help="also write DIR/<standard|unsloth>.json in helpers.training's run-record format (the last "
                        "budget that fitted), e.g. benchmarks/results/runs for notebook 04's offline comparison")
    p.add_argument("--checkpointing", default="all",
                   help="fast variant: block types that recompute activations (all, none, or e.g. mamba,moe; "
                        "moe:N: only the first N MoE blocks)")
    p.add_argument("--fast-features", default=None,
                   help="fast variant: comma list of helpers.fast.FEATURES to use "
                        "(default: all of helpers.fast.FEATURES); "
                        "the ablation drops or adds one at a time")
    p.add_argument("--profile", action="store_true",
                   help="profile 2 steps after warm-up of each budget with torch.profiler; the top CUDA kernels go "
                        "to <out>/profile_<variant>-<checkpointing>_<arch>_<budget>.txt")
    p.add_argument("--peak-tflops", type=float, help="card peak dense bf16 TFLOP/s (default: from the GPU name)")
    p.add_argument("--plot", metavar="DIR", help="draw DIR/benchmark.png from the JSON records in DIR and exit")
    p.add_argument("--table", metavar="DIR", help="print a markdown table of the JSON records in DIR and exit")
    p.add_argument("--scaling", metavar="DIR", help="compare the records in DIR by process count (table + "
                                                    "DIR/scaling.png) and exit")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if any(t < 1 for t in args.tokens_per_step):
        p.error("--tokens-per-step values must be positive")
    return args


def main(argv=None):
    """Run the benchmark (or --plot / --table / --scaling). Returns the records written (or the PNG path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.scaling:
        records = load_records(args.scaling)
        print(scaling_table(records))
        out = plot_scaling(records, Path(args.scaling) / "scaling.png")
        print("Chart:", out)
        return out
    if args.plot or args.table:
        out = None
        if args.table:
            print(markdown_table(load_records(args.table)))
        if args.plot:
            out = plot_records(load_records(args.plot), Path(args.plot) / "benchmark.png")
            print("Chart:", out)
        return out
    variants = list(dict.fromkeys(args.variant))
    if len(variants) == 1:
        record = run_variant(args, variants[0], argv)
        hdist.finish()  # under accelerate launch: leave the process group before exiting
        return [record]
    if hdist.launched():
        raise SystemExit("Under accelerate launch give one --variant: each variant needs fresh processes (the "
                         "kernel choice and `import unsloth` are process-wide). Launch once per variant.")
    return run_variants_in_subprocesses(argv, variants)


def _argv_with_variant(argv: list[str], variant: str) -> list[str]:
    """`argv` with its --variant values replaced by one variant."""
    out, skipping = [], False
    for token in argv:
        if token == "--variant" or token.startswith("--variant="):
            skipping = token == "--variant"
            continue
        if skipping and not token.startswith("-"):
            continue
        skipping = False
        out.append(token)
    return out + ["--variant", variant]


def run_variants_in_subprocesses(argv, variants):
    """One fresh Python per variant: kernel choice and `import unsloth` are process-wide and irreversible."""
    records, failed = [], []
    handle, listing = tempfile.mkstemp(prefix="bench-records-", suffix=".txt")
    os.close(handle)
    env = dict(os.environ, BENCH_RECORD_LIST=listing)
    for variant in variants:
        print(f"\n{'=' * 30} variant {variant} (own process) {'=' * 30}", flush=True)
        rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), *_argv_with_variant(argv, variant)],
                             env=env)
        if rc:
            failed.append(f"{variant} (exit {rc})")
    for line in Path(listing).read_text().splitlines():
        if line.strip():
            records.append(json.loads(Path(line.strip()).read_text()))
    os.unlink(listing)
    if records:
        print("\n" + markdown_table(records))
    if failed:
        raise SystemExit(f"Failed variants: {', '.join(failed)}")
    return records


# ----------------------------------------------------------------------------------------------
# One variant, in this process
# ----------------------------------------------------------------------------------------------


def refuse_early(args, variant) -> None:
    """Refusals that must happen before a model is built (and, for the fast variant, the allocator setting)."""
    if variant == "unsloth":
        if args.arch == "real" and not args.model:
            raise SystemExit(
                "--variant unsloth --arch real needs --model PATH: Unsloth loads models from a folder, and the random "
                "full model (59 GB in bf16) does not fit the 64 GB disk next to everything else. Use --arch slice8 "
                "(the first 8 layers, ~9.5 GB) or pass a downloaded checkpoint with --model.")
        if not torch.cuda.is_available():
            raise SystemExit("--variant unsloth needs a CUDA GPU: Unsloth does not run on CPU. Run the standard "
                             "variant on CPU (--arch tiny), or run this on a GPU machine.")
    if torch.cuda.is_available() and torch.cuda.device_count() > 1 and not hdist.launched():
        raise SystemExit(f"{torch.cuda.device_count()} GPUs are visible to this one process; the Trainer would wrap "
                         "the model in nn.DataParallel, which SFTTrainer refuses. For one GPU run with "
                         "CUDA_VISIBLE_DEVICES=0; for several, use accelerate launch (configs/ddp.yaml).")
    if variant == "fast" and not torch.cuda.is_available():
        raise SystemExit("--variant fast packs rows into one sequence, which only the fused Mamba kernels (CUDA) keep "
                         "apart; run it on a GPU with mamba_ssm and causal_conv1d installed.")
    if variant == "fast":  # as train.py --fast does; expandable segments recorded under distributed.environment
        hfast.prepare_process(args.fast_features)
    if args.arch != "tiny" and not args.model and not torch.cuda.is_available():
        raise SystemExit(f"--arch {args.arch} needs a CUDA GPU (its float32 weights would not fit in CPU memory); "
                         "use --arch tiny on CPU.")
    if variant == "standard-nokernels" and "transformers.models.nemotron_h.modeling_nemotron_h" in sys.modules:
        raise SystemExit("--variant standard-nokernels must start in a fresh Python process: transformers binds the "
                         "Mamba kernels once, when modeling_nemotron_h is first imported.")
    if hdist.fsdp_enabled() and (variant != "standard" or args.model or args.find_max or len(args.tokens_per_step) > 1):
        raise SystemExit("Under FSDP (configs/fsdp.yaml) the benchmark measures one budget of the random standard "
                         "variant: one --tokens-per-step value, no --find-max or --model (FSDP shards the model in "
                         "place, so it cannot be reset between budgets; the other variants are untested under FSDP).")


def choose_mamba_kernels(variant: str) -> dict:
    """Make transformers bind the fused Mamba kernels (standard, unsloth) or the reference path (nokernels).

    transformers 5.17's modeling_nemotron_h never reads `config.use_mamba_kernels`: each Mamba op is wrapped by
    `use_kernel_func_from_hub_with_fallback`, which tries `import mamba_ssm` / `import causal_conv1d` once, when
    the module is imported, and falls back to the PyTorch reference if that fails. So the only switch is to make
    that import fail: a `None` entry in sys.modules does exactly that, for this process only.
    """
    if variant != "standard-nokernels":
        return {"blocked_imports": []}
    blocked = ["mamba_ssm", "causal_conv1d"]
    for name in blocked:
        sys.modules[name] = None  # `import mamba_ssm` now raises ModuleNotFoundError
    return {"blocked_imports": blocked}


class MambaPathCounter:
    """Count, at run time, which Mamba-2 code the training forward really calls.

    modeling_nemotron_h looks its three ops up as module globals on every call, so wrapping the globals sees
    every call: the fused training op returns None when it is the reference stub (then the mixer runs the
    chunked reference scan), and a tensor when mamba_ssm's fused kernel ran.
    """

    OPS = ("mamba2_split_conv1d_scan_combined", "causal_conv1d_fn", "mamba2_chunk_scan")

    def __init__(self):
        from transformers.models.nemotron_h import modeling_nemotron_h as module
        self.module = module
        self.counts = {"fused_kernel_ran": 0, "fused_returned_none": 0, "causal_conv1d_fn": 0, "mamba2_chunk_scan": 0}
        self.originals = {name: getattr(module, name) for name in self.OPS}

        def fused(*a, **k):
            out = self.originals["mamba2_split_conv1d_scan_combined"](*a, **k)
            self.counts["fused_kernel_ran" if out is not None else "fused_returned_none"] += 1
            return out

        def counting(name):
            def wrapped(*a, **k):
                self.counts[name] += 1
                return self.originals[name](*a, **k)
            return wrapped

        module.mamba2_split_conv1d_scan_combined = fused
        module.causal_conv1d_fn = counting("causal_conv1d_fn")
        module.mamba2_chunk_scan = counting("mamba2_chunk_scan")

    def restore(self):
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)

    def path(self) -> str:
        c = self.counts
        if c["fused_kernel_ran"] and not (c["fused_returned_none"] or c["mamba2_chunk_scan"]):
            return "fused kernel (mamba_ssm mamba_split_conv1d_scan_combined)"
        if c["fused_returned_none"] and not c["fused_kernel_ran"]:
            return "reference (chunked scan, no fused kernel)"
        if not any(c.values()):
            return "not observed (the Mamba forward did not go through transformers' module globals)"
        return "mixed"


def _path_matches(variant: str, path: str, cuda: bool):
    """Did the Mamba path that ran match what the variant promises? (None: nothing to promise on CPU/Unsloth.)"""
    if variant == "standard-nokernels":
        return path.startswith("reference")
    if variant == "standard" and cuda:
        return path.startswith("fused kernel")
    return None


def gpu_info() -> dict:
    """GPU name, memory, driver (nvidia-smi when available) and the dense bf16 peak used for MFU."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "name": "cpu", "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    info = {"device": "cuda", "name": props.name, "total_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "cuda_runtime": torch.version.cuda}
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=15, check=True).stdout.strip()
        info["driver_version"] = line.split(",")[-1].strip()
    except Exception:
        try:
            version = torch._C._cuda_getDriverVersion()  # CUDA driver API version, e.g. 13000
            info["driver_version"] = f"CUDA driver API {version // 1000}.{version % 1000 // 10} (no nvidia-smi)"
        except Exception:
            info["driver_version"] = None
    return info


def peak_flops(name: str, override_tflops=None) -> dict:
    if override_tflops:
        return {"flops": override_tflops * 1e12, "source": "--peak-tflops"}
    for key, flops, source in PEAK_BF16:
        if key.lower() in (name or "").lower():
            return {"flops": flops, "source": source}
    return {"flops": None, "source": f"unknown card {name!r}: no MFU (pass --peak-tflops)"}


def arch_config(arch: str, tokenizer):
    """The NemotronHConfig of an architecture name, with the tokenizer's pad/bos/eos ids."""
    if arch == "tiny":
        config = hmodel.tiny_config(vocab_size=len(tokenizer))
    else:
        config = hmodel.nemotron_nano_config(**({"hybrid_override_pattern": hmodel.NANO_PATTERN[:8]}
                                                 if arch == "slice8" else {}))
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def random_model_for_this_process(config, seed: int):
    """The seeded random model where this process needs it: on its own GPU (one process, or DDP: each GPU holds
    a whole copy), or, under FSDP, on the CPU, from where accelerate moves each GPU's shard over.

    Under FSDP every process builds the same model (same seed) on its GPU (seconds) and moves it to the CPU, as
    `from_pretrained` leaves it under configs/fsdp.yaml. Sharding a model that is already on the GPU would hold
    the whole model and the shards at once (accelerate keeps the full state dict during `fully_shard`).
    """
    if not hdist.fsdp_enabled():
        return build_random_model(config, seed)
    model = build_random_model(config, seed).to("cpu")
    hmodel.free_memory()
    return model


def build_random_model(config, seed: int, dtype=None):
    """NemotronHForCausalLM with seeded random weights, built directly on the device: `dtype` if given, else bf16
    on a GPU and float32 on a CPU.

    Same config + same seed -> the same weights in every process. The router's score-correction bias is kept
    in float32, as from_pretrained does (`_keep_in_fp32_modules_strict`).
    """
    from transformers import NemotronHForCausalLM
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    config.dtype = dtype
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(hdist.device()):  # under accelerate launch: this process's own GPU
            model = NemotronHForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for module in model.modules():
        if isinstance(module, NemotronHTopkRouter):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model


def random_lora_model(arch: str, seed: int, routed_experts: bool = False, dtype=None):
    """(LoRA-wrapped random model of `arch`, the bench tokenizer): the setup of check_fast and trace_ops."""
    tokenizer = bench_tokenizer()
    model = build_random_model(arch_config(arch, tokenizer), seed, dtype)
    torch.manual_seed(seed)  # LoRA A init
    model, _ = hmodel.add_lora(model, hmodel.lora_config(r=LORA_R, alpha=LORA_ALPHA, routed_experts=routed_experts))
    return model, tokenizer


def bench_tokenizer(model_path=None):
    """The model's tokenizer, or the tiny BPE tokenizer (random-weight runs only need its pad id)."""
    if model_path:
        return hmodel.load_tokenizer(model_path)
    return hmodel.train_tiny_tokenizer(hmodel.sample_texts())


def save_random_model_for_unsloth(args, tokenizer) -> Path:
    """Unsloth loads from a folder: save the seeded random model once (reused while config and seed match)."""
    config = arch_config(args.arch, tokenizer)
    key = {"arch": args.arch, "seed": args.seed, "config": config.to_diff_dict(),
           "transformers": htraining.library_versions()["transformers"]}
    folder = Path(args.tmp_dir) / f"nemotron-bench-{args.arch}-seed{args.seed}"
    meta = folder / "bench_meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == json.loads(json.dumps(key, default=str)):
        print(f"Reusing the saved random model in {folder}")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    model = build_random_model(config, args.seed)
    need = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    free = shutil.disk_usage(Path(args.tmp_dir)).free / GIB
    if free < need * 1.1:
        raise SystemExit(f"Not enough disk in {args.tmp_dir} for the random model Unsloth must load: {free:.1f} GiB "
                         f"free, {need:.1f} GiB needed. Pass --tmp-dir on a bigger disk.")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta.write_text(json.dumps(key, default=str))
    del model
    hmodel.free_memory()
    print(f"Saved the random {args.arch} model ({need:.1f} GiB) to {folder} in {time.perf_counter() - start:.0f} s")
    return folder


def lm_head_loss_path() -> str:
    """Which implementation computes TRL's fused LM-head loss here (helpers.training swaps it on CPU)."""
    if torch.cuda.is_available():
        return "TRL fused chunked log-prob kernel (Triton), unless the Unsloth-patched trainer replaces it"
    return "helpers.training CPU fallback for TRL's fused LM head (plain PyTorch; TRL's Triton kernel needs a GPU)"


# ----------------------------------------------------------------------------------------------
# Data: MedMCQA-shaped rows of random ids
# ----------------------------------------------------------------------------------------------


def length_distribution(tokenizer, lengths_from=None, max_length: int = 1024, seed: int = 42) -> dict:
    """(prompt tokens, total tokens) pairs of real formatted rows, and where they came from.

    From `lengths_from` (a prepare_medmcqa output folder), else data/medmcqa_formatted if prepared, else the
    shipped sample prepared on the fly with `tokenizer`; lengths are capped at `max_length`.
    """
    folder = Path(lengths_from) if lengths_from else hdata.FORMATTED_DIR
    if lengths_from or (folder / "manifest.json").exists():
        dsd, manifest = hdata.load_formatted(folder)
        tok_name = (manifest.get("options") or {}).get("tokenizer")
        source = f"prepared dataset {folder} (source {manifest.get('options', {}).get('source')})"
        temp = None
    else:
        temp = Path(tempfile.mkdtemp(prefix="bench-lengths-"))
        dsd, manifest = hdata.prepare_medmcqa(hdata.SAMPLE_DIR, out_dir=temp / "formatted", tokenizer=tokenizer,
                                              max_length=max_length, seed=seed)
        tok_name = getattr(tokenizer, "name_or_path", None) or "tiny BPE tokenizer (helpers.model.train_tiny_tokenizer)"
        source = f"shipped sample {hdata.SAMPLE_DIR.relative_to(REPO)} prepared with prepare_medmcqa (NOT the real " \
                 "MedMCQA distribution)"
    split = next((s for s in ("train", "validation") if s in dsd and "total_tokens" in dsd[s].column_names), None)
    if split is None:
        raise SystemExit(f"{folder}: no split with total_tokens/prompt_tokens columns; prepare it with "
                         "helpers.data.prepare_medmcqa(..., tokenizer=...).")
    pairs = []
    for prompt, total in zip(dsd[split]["prompt_tokens"], dsd[split]["total_tokens"]):
        prompt = min(prompt, max_length - 1)
        pairs.append((prompt, max(min(total, max_length), prompt + 1)))
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
    totals = [t for _, t in pairs]
    return {"pairs": pairs, "source": source, "split": split, "tokenizer": tok_name, "rows": len(pairs),
            "mean_tokens": statistics.fmean(totals), "median_tokens": statistics.median(totals),
            "max_tokens": max(totals), "mean_prompt_tokens": statistics.fmean(p for p, _ in pairs),
            "completion_share": sum(t - p for p, t in pairs) / sum(totals), "max_length": max_length}


def random_rows(pairs, n_rows: int, vocab_size: int, seed) -> dict:
    """`n_rows` pre-tokenized rows (input_ids, completion_mask): lengths drawn from `pairs`, ids at random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pairs), size=n_rows)
    ids, masks = [], []
    for i in picks:
        prompt, total = pairs[int(i)]
        ids.append(rng.integers(4, vocab_size, size=total).tolist())  # 0-3: special tokens of both tokenizers
        masks.append([0] * prompt + [1] * (total - prompt))
    return {"input_ids": ids, "completion_mask": masks}


def probe_loss(model, rows: dict, pad_id: int, device) -> dict:
    """Loss on the fixed first batch (prompt masked like training), and which trainable tensors get a gradient.

    Train mode (the mixer's fused training path needs it; dropout is 0), no KV cache. With LoRA B = 0 this is
    the base model's loss, so every variant of the same arch and seed must agree (to ~1e-2 in bf16).
    """
    n = len(rows["input_ids"])
    width = max(len(r) for r in rows["input_ids"])
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows["input_ids"], rows["completion_mask"])):
        row = torch.tensor(ids)
        input_ids[i, :len(ids)] = row
        attention[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), row, torch.tensor(-100))
    input_ids, labels, attention = input_ids.to(device), labels.to(device), attention.to(device)
    model.train()
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels, use_cache=False).loss.float().item()
    out = {"rows": n, "tokens": int(attention.sum()), "loss_tokens": int((labels[:, 1:] != -100).sum()), "loss": loss}
    # Gradient check on one row: a trainable tensor without a gradient is an adapter the forward bypasses.
    try:
        model.zero_grad(set_to_none=True)
        k = int(attention[0].sum())
        model(input_ids=input_ids[:1, :k], attention_mask=attention[:1, :k], labels=labels[:1, :k],
              use_cache=False).loss.backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        out["trainable_tensors_without_grad"] = len(missing)
        out["examples_without_grad"] = missing[:8]
    except Exception as error:  # never let the diagnostic kill the benchmark
        out["grad_check_error"] = repr(error)[:300]
    finally:
        model.zero_grad(set_to_none=True)
    return out


def packed_probe_loss(model, rows: dict, pad_id: int) -> dict:
    """The probe rows packed into one sequence (helpers.fast.PackedCollator): per-row losses vs each row alone.

    Also without `seq_idx`, to show what the Mamba layers do when nobody tells them where rows end
    (check_fast.per_row_losses does the work).
    """
    from check_fast import per_row_losses

    examples = [{"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
                for ids, mask in zip(rows["input_ids"], rows["completion_mask"])]
    rows_check = per_row_losses(model, examples, pad_id)
    weights = [sum(label != -100 for label in ex["labels"][1:]) for ex in examples]
    return {"row_losses": [round(x, 5) for x in rows_check["packed"]],
            "max_row_loss_diff": rows_check["max_abs_diff_packed"],
            "row_losses_without_seq_idx": [round(x, 5) for x in rows_check["packed_without_seq_idx"]],
            "max_row_loss_diff_without_seq_idx": rows_check["max_abs_diff_packed_without_seq_idx"],
            "row_losses_alone": [round(x, 5) for x in rows_check["alone"]],
            # weighted by each row's trained tokens, like the padded batch's loss it is printed beside
            "loss": sum(w * x for w, x in zip(weights, rows_check["packed"])) / sum(weights)}


# ----------------------------------------------------------------------------------------------
# Model + LoRA per variant
# ----------------------------------------------------------------------------------------------


def load_variant_model(args, variant, tokenizer):
    """(peft model, tokenizer, facts) for a variant: random weights (or --model), LoRA attached."""
    facts = {}
    if variant == "unsloth":
        from helpers import unsloth_path  # notebook 04's code: FastLanguageModel load + get_peft_model

        folder = args.model or save_random_model_for_unsloth(args, tokenizer)
        start = time.perf_counter()
        model, tokenizer = unsloth_path.load_model(str(folder), max_length=args.max_length)
        facts["load_seconds"] = round(time.perf_counter() - start, 1)
        facts["base_counts"] = hmodel.count_parameters(model)
        cfg = htraining.TrainConfig(lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, seed=args.seed,
                                    max_length=args.max_length)
        torch.manual_seed(args.seed)
        model, _ = unsloth_path.add_lora(model, cfg)
        facts["lora"] = {"api": "helpers.unsloth_path.add_lora (FastLanguageModel.get_peft_model, "
                                "use_gradient_checkpointing='unsloth')",
                         "r": LORA_R, "alpha": LORA_ALPHA, "target_modules": list(hmodel.LORA_TARGET_MODULES),
                         "routed_experts_requested": None}
        return model, tokenizer, facts

    start = time.perf_counter()
    if args.model:
        model, tokenizer = hmodel.load_model(args.model)
    else:
        config = arch_config(args.arch, tokenizer)
        model = random_model_for_this_process(config, args.seed)
    if variant == "standard-nokernels":
        model.config.use_mamba_kernels = False  # recorded for readers; transformers 5.17 ignores it (see above)
    facts["load_seconds"] = round(time.perf_counter() - start, 1)
    facts["base_counts"] = hmodel.count_parameters(model)
    torch.manual_seed(args.seed)  # LoRA A init
    lora_cfg = hmodel.lora_config(r=LORA_R, alpha=LORA_ALPHA, routed_experts=args.routed_experts)
    model, _ = hmodel.add_lora(model, lora_cfg)
    facts["lora"] = {"api": "helpers.model.add_lora(helpers.model.lora_config(...))", "r": LORA_R,
                     "alpha": LORA_ALPHA, "target_modules": sorted(lora_cfg.target_modules),
                     "target_parameters": list(lora_cfg.target_parameters or []),
                     "routed_experts_requested": args.routed_experts}
    return model, tokenizer, facts


def kernel_status() -> dict:
    status = hmodel.fast_kernels_status()
    return {k: status[k] for k in ("mamba_ssm", "causal_conv1d", "implementations", "fast_path")}


def trainable_summary(model) -> dict:
    """Trainable parameters, split into routed-expert LoRA and the rest (Unsloth may add the former itself)."""
    total = routed = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel()
            if ".experts." in name:  # ".shared_experts." does not contain ".experts."
                routed += p.numel()
    return {"trainable_parameters": total, "trainable_on_routed_experts": routed,
            "lora_on_routed_experts": routed > 0}


# ----------------------------------------------------------------------------------------------
# Timing one budget
# ----------------------------------------------------------------------------------------------


def saved_forwards(model) -> list:
    """The instance-level `forward` / `_original_forward` of the model and its base model, to put back later."""
    base = hfast.base_of(model)
    return [(obj, name, obj.__dict__.get(name, _MISSING)) for obj in {id(model): model, id(base): base}.values()
            for name in ("forward", "_original_forward")]


_MISSING = object()


def restore_forwards(saved) -> None:
    for obj, name, value in saved:
        if value is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


def run_budget(model, tokenizer, dist, budget: int, steps: int, warmup: int, args, workdir: Path, flops,
               stack: str = "standard", routed_experts: bool = False) -> dict:  # noqa: C901
    """Train `warmup + steps` optimizer steps of ~`budget` tokens with SFTTrainer; figures, or status 'oom'."""
    from datasets import Dataset

    rows_per_step = max(1, round(budget / dist["mean_tokens"]))  # per process (= per GPU)
    total_steps = warmup + steps
    processes = hdist.world_size()  # the Trainer splits the rows between the processes
    rows = random_rows(dist["pairs"], rows_per_step * total_steps * processes, model.config.vocab_size,
                       [args.seed, budget])
    cfg = htraining.TrainConfig(
        run_name=f"bench-{budget}", output_root=str(workdir), max_length=args.max_length,
        per_device_train_batch_size=rows_per_step, gradient_accumulation_steps=1, max_steps=total_steps,
        logging_steps=1, seed=args.seed, routed_experts=routed_experts, gradient_checkpointing=True,
        fast=stack == "fast", checkpointing=args.checkpointing if stack == "fast" else "all",
        fast_features=args.fast_features if stack == "fast" else None)
    result = {"tokens_per_step_target": budget, "rows_per_step": rows_per_step, "steps": steps, "warmup": warmup,
              "processes": processes}
    saved_attrs = saved_forwards(model)  # TRL (fused LM head) and accelerate (autocast) wrap `forward`
    trainer = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    error = None
    memory = MemoryPhases()
    try:
        start = time.perf_counter()
        callbacks = [memory] + ([StepProfiler(args, stack, budget, warmup)] if args.profile else [])
        trainer = htraining.make_trainer(model, tokenizer, Dataset.from_dict(rows), cfg, callbacks=callbacks,
                                         save_strategy="no", report_to=[], disable_tqdm=True)
        result["trainer_init_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        trainer.train()
        result["train_wall_seconds"] = round(time.perf_counter() - start, 2)
        result["model_wrapper"] = type(trainer.model_wrapped).__name__  # DistributedDataParallel, FSDP..., or none
        timed = trainer.step_timer.steps
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if args.run_records:
            result["_run_record"] = htraining.run_record(trainer, cfg, result["train_wall_seconds"], stack, None,
                                                         warmup)
            result["_run_record"]["benchmark_tokens_per_step"] = budget
    except Exception as e:  # noqa: BLE001 - OOM is a result; other errors are recorded, and fail the run at the end
        if hdist.launched():  # the other processes would wait for this one forever: fail, and the launcher stops all
            raise
        status = "oom" if is_oom(e) else "error"
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        if status == "error":
            traceback.print_exc()
            result["traceback_tail"] = traceback.format_exc()[-3000:]
    if error is not None:
        result.update(status=status, error=error)
    else:
        # profiled steps (and the one after, which pays for writing the table) are not steady-state steps
        profiled = set(range(warmup, warmup + 3)) if args.profile else set()
        steady = [s for i, s in enumerate(timed) if i >= warmup and i not in profiled] or timed
        sec = sum(s["seconds"] for s in steady)
        tokens = sum(s["tokens"] for s in steady)
        tps = tokens / sec if sec > 0 else 0.0
        result.update(
            status="ok",
            steady_tokens_per_second=round(tps, 1),
            seconds_per_step_median=round(statistics.median(s["seconds"] for s in steady), 4),
            tokens_per_step_mean=round(tokens / len(steady), 1),
            warmup_seconds=round(sum(s["seconds"] for s in timed[:warmup]), 2),
            first_step_seconds=round(timed[0]["seconds"], 2) if timed else None,
            mfu=round(tps * flops["per_token"] / (flops["peak"] * processes), 4) if flops["peak"] else None,
            mfu_6n_active=(round(tps * flops["per_token_6n_active"] / (flops["peak"] * processes), 4)
                           if flops["peak"] else None),
            losses=[round(x, 4) for x in losses],
            step_times=[{"step": s["step"], "seconds": round(s["seconds"], 4), "tokens": s["tokens"]} for s in timed],
        )
    if torch.cuda.is_available():
        result.update(memory.figures())
    if hdist.launched():  # memory is per GPU: every process's figures (tokens/s above already count all of them)
        result["per_process"] = hdist.gather_object({"rank": hdist.rank(), **memory.figures()})
    # Leave the model as we found it: fast-path pieces and forward wrappers off, no grads; the trainer freed.
    if trainer is not None and trainer.restore_model_features:
        trainer.restore_model_features()
    restore_forwards(saved_attrs)
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.accelerator.free_memory()
    del trainer
    model.zero_grad(set_to_none=True)
    hmodel.free_memory()
    print(f"  {budget:>6} tokens/step: " + (
        f"{result['steady_tokens_per_second']:,.0f} tokens/s, {result['seconds_per_step_median']} s/step"
        if result["status"] == "ok" else "OUT OF MEMORY" if result["status"] == "oom" else f"ERROR {error}"),
        flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------


def MemoryPhases():
    """A TrainerCallback that splits peak GPU memory into set-up (wrapping, FSDP sharding) and training.

    `figures()`: peak_allocated/reserved_gib over the whole budget (as before), allocated_at_train_begin_gib
    (what stays once the model is ready: the weights, or under FSDP this GPU's shard) and the training peaks.
    """
    from transformers import TrainerCallback

    def gib(n):
        return round(n / GIB, 2)

    class _MemoryPhases(TrainerCallback):
        setup: dict = {}

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                self.setup = {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
                              "reserved": torch.cuda.max_memory_reserved()}
                torch.cuda.reset_peak_memory_stats()

        def figures(self) -> dict:
            if not torch.cuda.is_available():
                return {}
            train_peak, train_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            return {"peak_allocated_gib": gib(max(train_peak, self.setup.get("peak", 0))),
                    "peak_reserved_gib": gib(max(train_reserved, self.setup.get("reserved", 0))),
                    "allocated_at_train_begin_gib": gib(self.setup["allocated"]) if self.setup else None,
                    "train_peak_allocated_gib": gib(train_peak) if self.setup else None,
                    "train_peak_reserved_gib": gib(train_reserved) if self.setup else None}

    return _MemoryPhases()


def StepProfiler(args, label: str, budget: int, warmup: int):
    """A TrainerCallback that profiles 2 optimizer steps after warm-up and writes the top CUDA kernels."""
    from transformers import TrainerCallback

    class _StepProfiler(TrainerCallback):
        prof = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None and state.global_step == warmup + 2:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45,
                                                       max_name_column_width=90)
                out = Path(args.out) / f"profile_{label}-{args.checkpointing}_{args.arch}_{budget}.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(table)
                print(f"  profile of 2 steps -> {out}", flush=True)
                self.prof = None

    return _StepProfiler()


def launch_command() -> str:
    """How this run was started, for the record: plain python, or accelerate launch with N processes."""
    if not hdist.launched():
        return "python"
    return f"accelerate launch --num_processes {hdist.world_size()} ({'FSDP' if hdist.fsdp_enabled() else 'DDP'})"


def distributed_facts() -> dict:
    """Processes, how the model is spread over them, and the launcher settings that matter for speed."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("FSDP_", "NCCL_")) or k in ("ACCELERATE_MIXED_PRECISION", "PYTORCH_CUDA_ALLOC_CONF")}
    mode = ("fsdp" if hdist.fsdp_enabled() else "ddp") if hdist.launched() else "single"
    return {"processes": hdist.world_size(), "mode": mode, "tokens_per_step_is": "per process (per GPU)",
            "tokens_per_second_is": "all processes together", "memory_is": "per GPU (budgets[].per_process)",
            "environment": env}


def run_variant(args, variant: str, argv) -> dict:
    refuse_early(args, variant)
    started = time.perf_counter()
    kernel_choice = choose_mamba_kernels(variant)
    if variant == "unsloth":
        import unsloth  # noqa: F401  (must precede transformers / trl / peft)
    import transformers  # noqa: F401

    hdist.init()  # under accelerate launch: join the process group, claim GPU LOCAL_RANK (one process: nothing)
    sharded = hdist.fsdp_enabled()  # FSDP: the model waits on the CPU until the Trainer shards it
    cuda = torch.cuda.is_available()
    device = hdist.device()
    gpu = gpu_info()
    tokenizer = bench_tokenizer(args.model)
    kernels_static = kernel_status()  # read the import-time binding before MambaPathCounter wraps the ops
    lm_head_path = lm_head_loss_path()
    if cuda and variant == "standard" and not kernels_static["fast_path"]:
        raise SystemExit(
            "--variant standard measures the fused Mamba kernels, but transformers bound the reference path "
            f"({kernels_static['implementations']}; mamba_ssm {kernels_static['mamba_ssm']}, causal_conv1d "
            f"{kernels_static['causal_conv1d']}). Install mamba-ssm and causal-conv1d (uv sync --extra kernels), or "
            "run --variant standard-nokernels to measure the reference path on purpose.")
    counter = MambaPathCounter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        imports_seconds = round(time.perf_counter() - started, 1)
        length_tokenizer = tokenizer  # the same for every variant (Unsloth returns its own copy), so the same rows
        model, tokenizer, facts = load_variant_model(args, variant, tokenizer)
        counts = facts["base_counts"]
        trainable = trainable_summary(model)
        print(f"Model: {counts['total']:,} parameters, {counts['active_per_token']:,} active per token; "
              f"{trainable['trainable_parameters']:,} trainable", flush=True)
        dist = length_distribution(length_tokenizer, args.lengths_from, args.max_length, args.seed)
        print(f"Row lengths: {dist['rows']} rows from {dist['source']}; mean {dist['mean_tokens']:.0f} tokens",
              flush=True)

        probe = random_rows(dist["pairs"], PROBE_ROWS, model.config.vocab_size, [args.seed, 7919])
        pad_id = hmodel.pad_id(tokenizer)
        if sharded:
            first = {"loss": None, "skipped": "FSDP: the model is on the CPU (and sharded later), not probed"}
        else:
            first = probe_loss(model, probe, pad_id, device)
            print(f"First-batch loss: {first['loss']:.4f} ({first['tokens']} tokens)", flush=True)
        packed_first = packed_probe_loss(model, probe, pad_id) if variant == "fast" and not sharded else None
        if packed_first:
            print(f"First-batch loss, packed into one row: {packed_first['loss']:.4f} (per-row max |diff| vs padded "
                  f"{packed_first['max_row_loss_diff']:.2e}; without seq_idx "
                  f"{packed_first['max_row_loss_diff_without_seq_idx']:.2e})",
                  flush=True)

        # LoRA step = forward 2N + backward to activations 2N (frozen weights: no weight gradients) + recompute 2N
        # (gradient checkpointing). N = matmul parameters active per token: not the embedding table (a lookup);
        # the LM head counts only on completion positions, the only ones TRL's fused head projects.
        matmul_params = counts["active_per_token"] - counts["embeddings"]
        lm_head_skipped = counts["lm_head"] * (1 - dist["completion_share"])
        peak = peak_flops(gpu["name"], args.peak_tflops)
        flops = {"per_token": round(6 * (matmul_params - lm_head_skipped)), "peak": peak["flops"],
                 "per_token_6n_active": 6 * counts["active_per_token"]}

        budgets = FIND_MAX_BUDGETS if args.find_max else args.tokens_per_step
        steps, warmup = (2, 1) if args.find_max else (args.steps, args.warmup)
        results, largest = [], None
        snapshot = {} if sharded else {n: p.detach().to("cpu", copy=True)  # FSDP: one budget, nothing to reset
                                       for n, p in model.named_parameters() if p.requires_grad}
        for budget in budgets:
            results.append(run_budget(model, tokenizer, dist, budget, steps, warmup, args, workdir, flops,
                                      stack=variant if variant in ("unsloth", "fast") else "standard",
                                      routed_experts=trainable["lora_on_routed_experts"]))
            with torch.no_grad():  # the next budget starts from the same LoRA weights (B = 0)
                for n, p in model.named_parameters():
                    if n in snapshot:
                        p.copy_(snapshot[n].to(p.device))
            if results[-1]["status"] == "ok":
                largest = budget
            elif args.find_max:
                break
        run_records = [b.pop("_run_record") for b in results if "_run_record" in b]
        config = model.config
        record = {
            "schema": 1,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "variant": variant,
            "routed_experts": args.routed_experts if variant != "unsloth" else trainable["lora_on_routed_experts"],
            "fast": {"features": sorted(hfast.parse_features(args.fast_features)), "checkpointing": args.checkpointing,
                     "packed_first_batch": packed_first}
            if variant == "fast" else None,
            "arch": "model" if args.model else args.arch,
            "model_path": args.model,
            "weights": "checkpoint" if args.model else f"random (torch.manual_seed({args.seed}))",
            "command": launch_command() + " benchmarks/bench.py " + " ".join(argv),
            "processes": hdist.world_size(),
            "distributed": distributed_facts(),
            "gpu": gpu,
            "peak_flops": peak,
            "versions": htraining.library_versions(),
            "model": {
                "layers": config.num_hidden_layers, "pattern": config.hybrid_override_pattern,
                "params_total": counts["total"], "params_active_per_token": counts["active_per_token"],
                "param_counts": counts, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "attn_implementation": getattr(config, "_attn_implementation", None),
                "experts_implementation": getattr(config, "_experts_implementation", None),
                "gradient_checkpointing": True, "lm_head_loss": lm_head_path,
                "matmul_params_per_token": matmul_params, "flops_per_token": flops["per_token"],
                "flops_per_token_formula": "6 x (active_per_token - embeddings - lm_head x (1 - completion_share))",
                "flops_per_token_6n_active": flops["per_token_6n_active"],
            },
            "mamba": {
                "variant_switch": kernel_choice, "use_mamba_kernels_config": getattr(config, "use_mamba_kernels", None),
                "bound_at_import": kernels_static, "runtime_calls": dict(counter.counts),
                "path_that_ran": counter.path(),
                "path_matches_variant": _path_matches(variant, counter.path(), cuda),
            },
            "lora": facts["lora"],
            **trainable,
            "data": {k: v for k, v in dist.items() if k != "pairs"},
            "first_batch": first,
            "first_batch_loss": first["loss"],
            "budgets": results,
            "max_tokens_per_step_fit": largest if args.find_max else None,
            "timings": {"imports_seconds": imports_seconds, "model_load_seconds": facts["load_seconds"],
                        "total_seconds": round(time.perf_counter() - started, 1)},
            "notes": NOTES + ([
                "Unsloth: target_modules up_proj/down_proj also put LoRA on the routed experts (see "
                "trainable_on_routed_experts); compare with a standard run using --routed-experts."]
                if variant == "unsloth" and trainable["lora_on_routed_experts"] else []),
        }
    finally:
        counter.restore()
        shutil.rmtree(workdir, ignore_errors=True)
    if not hdist.is_main_process():  # several processes: the main one writes the record (all figures gathered)
        return record
    if record["mamba"]["path_matches_variant"] is False:
        print(f"WARNING: variant {variant} ran the Mamba path '{record['mamba']['path_that_ran']}'", flush=True)
    path = write_record(record, Path(args.out), args.find_max)
    print(f"\nRecord: {path}\n")
    print(markdown_table([record]))
    if args.run_records and run_records:
        folder = Path(args.run_records)
        folder.mkdir(parents=True, exist_ok=True)
        stack = run_records[-1]["stack"]
        run_records[-1]["benchmark_record"] = str(path)
        (folder / f"{stack}.json").write_text(json.dumps(run_records[-1], indent=2, default=str))
        print(f"Run record ({stack}, {run_records[-1]['benchmark_tokens_per_step']} tokens/step): "
              f"{folder / (stack + '.json')}")
    if os.environ.get("BENCH_RECORD_LIST"):
        with open(os.environ["BENCH_RECORD_LIST"], "a") as listing:
            listing.write(f"{path}\n")
    errors = [b for b in record["budgets"] if b["status"] == "error"]
    if errors:
        raise SystemExit(f"{len(errors)} budget(s) failed with an error (not OOM): {errors[0]['error']}; "
                         f"see 'traceback_tail' in {path}")
    return record


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in text.replace("NVIDIA ", ""))
    return "-".join(filter(None, keep.split("-")))


def write_record(record: dict, out: Path, find_max: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    variant = record["variant"] + ("-experts" if record["routed_experts"] else "")
    if record.get("fast"):
        variant += ("-" + "+".join(record["fast"].get("features", [])) + "-ckpt-"
                    + record["fast"]["checkpointing"].replace(",", "+").replace(":", "x"))
    name = f"{record['date'][:10]}_{_slug(record['gpu']['name'])}_{variant}_{record['arch']}"
    if _processes(record) > 1:  # 1-GPU and N-GPU runs of the same variant must not overwrite each other
        name += f"_{_processes(record)}x{record['distributed']['mode']}"
    path = out / f"{name}{'_findmax' if find_max else ''}.json"
    n = 2
    while path.exists():  # several runs of one configuration on one day: keep them all
        path = out / f"{name}{'_findmax' if find_max else ''}_{n}.json"
        n += 1
    path.write_text(json.dumps(record, indent=1, default=str))
    record["path"] = str(path)
    return path


# ----------------------------------------------------------------------------------------------
# Reading records back: table and chart
# ----------------------------------------------------------------------------------------------


def load_records(folder) -> list[dict]:
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "budgets" in record and "variant" in record:
            record["path"] = str(path)
            records.append(record)
    return sorted(records, key=lambda r: (r["arch"], r["gpu"]["name"], _label(r), r["date"]))


def _label(record, with_processes: bool = True) -> str:
    experts = "+experts" if record.get("routed_experts") else ""
    policy = (f" ({'+'.join(record['fast'].get('features', []))}; checkpointing {record['fast']['checkpointing']})"
              if record.get("fast") else "")
    procs = f" x{_processes(record)} {record['distributed']['mode'].upper()}" if _processes(record) > 1 else ""
    procs = procs if with_processes else ""
    return f"{record['variant']}{experts}{policy}{procs}"


def _processes(record) -> int:
    """How many processes (GPUs) a record ran on; records from before stage 6 ran on one."""
    return record.get("processes", 1)


def _fmt(value, spec="", none="-"):
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _millions(n) -> str:
    return "-" if n is None else (f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,}")


def markdown_table(records) -> str:
    """One row per (run, budget): the figures the README quotes."""
    lines = ["| variant | arch | tokens/step | tokens/s | s/step | peak GiB (alloc/resv) | MFU | first-batch loss "
             "| trainable | GPU | date |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in records:
        for b in r["budgets"]:
            ok = b.get("status") == "ok"
            mem = f"{_fmt(b.get('peak_allocated_gib'), '.1f')} / {_fmt(b.get('peak_reserved_gib'), '.1f')}"
            lines.append(
                f"| {_label(r)} | {r['arch']} | {b['tokens_per_step_target']:,} | "
                f"{_fmt(b.get('steady_tokens_per_second'), ',.0f') if ok else b.get('status', '?').upper()} | "
                f"{_fmt(b.get('seconds_per_step_median'), '.3f') if ok else '-'} | {mem} | "
                f"{_fmt(b.get('mfu'), '.1%') if ok else '-'} | {_fmt(r.get('first_batch_loss'), '.4f')} | "
                f"{_millions(r.get('trainable_parameters'))} | {r['gpu']['name']} | {r['date'][:10]} |")
    return "\n".join(lines)


def scaling_rows(records) -> list[dict]:
    """Each budget of each record next to the one-process run of the same variant, arch, GPU and tokens/step
    per GPU: speed-up = tokens/s / one-process tokens/s; efficiency = speed-up / processes (1.0 = linear)."""
    rows, base = [], {}
    for r in sorted(records, key=lambda r: r["date"]):  # the newest one-process record is the baseline
        for b in r["budgets"]:
            key = (r["arch"], r["gpu"]["name"], r["variant"], bool(r.get("routed_experts")),
                   tuple((r.get("fast") or {}).get("features", [])), (r.get("fast") or {}).get("checkpointing"),
                   b["tokens_per_step_target"])
            if _processes(r) == 1 and b.get("status") == "ok":
                base[key] = b["steady_tokens_per_second"]
            rows.append({"key": key, "record": r, "budget": b})
    for row in rows:
        tps, one = row["budget"].get("steady_tokens_per_second"), base.get(row["key"])
        n = _processes(row["record"])
        row["speedup"] = tps / one if tps and one else None
        row["efficiency"] = row["speedup"] / n if row["speedup"] else None
        per_process = row["budget"].get("per_process") or [row["budget"]]
        peaks = [p.get("train_peak_allocated_gib") or p.get("peak_allocated_gib") for p in per_process]
        row["peak_gib_per_gpu"] = max((x for x in peaks if x is not None), default=None)
    return sorted(rows, key=lambda x: (x["key"][:-1], x["key"][-1], _processes(x["record"]), x["record"]["date"]))


def scaling_table(records) -> str:
    """Markdown: tokens/s at 1 and N processes, speed-up and efficiency against the one-process run."""
    lines = ["| variant | arch | tokens/step per GPU | GPUs | mode | tokens/s (all GPUs) | tokens/s per GPU | "
             "speed-up | efficiency | peak GiB per GPU | GPU | date |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for row in scaling_rows(records):
        r, b, n = row["record"], row["budget"], _processes(row["record"])
        tps = b.get("steady_tokens_per_second") if b.get("status") == "ok" else None
        lines.append(
            f"| {_label(r, with_processes=False)} | {r['arch']} | {b['tokens_per_step_target']:,} | {n} | "
            f"{(r.get('distributed') or {}).get('mode', 'single')} | "
            f"{_fmt(tps, ',.0f') if tps else b.get('status', '?').upper()} | {_fmt(tps and tps / n, ',.0f')} | "
            f"{_fmt(row['speedup'], '.2f')}{'x' if row['speedup'] else ''} | {_fmt(row['efficiency'], '.0%')} | "
            f"{_fmt(row['peak_gib_per_gpu'], '.1f')} "
            f"| {r['gpu']['name']} | {r['date'][:10]} |")
    return "\n".join(lines)


def plot_scaling(records, out_path) -> Path:
    """Bars of tokens/s by process count (hatched: linear scaling from one process), speed-up on each bar."""
    import matplotlib.pyplot as plt  # helpers.plots chose a headless backend where there is no display

    rows = [row for row in scaling_rows(records) if row["budget"].get("status") == "ok"]
    if not rows:
        raise SystemExit("No benchmark records to compare.")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.4))
    for x, row in enumerate(rows):
        n = _processes(row["record"])
        tps = row["budget"]["steady_tokens_per_second"]
        ax.bar(x, tps, width=0.6, color=plt.cm.tab10(min(n, 9) - 1))
        if row["speedup"] and n > 1:
            ax.bar(x, tps / row["speedup"] * n, width=0.6, fill=False, hatch="//", edgecolor="grey", zorder=3)
        note = f"{row['speedup']:.2f}x ({row['efficiency']:.0%})" if row["speedup"] and n > 1 else "baseline"
        mem = f"\n{row['peak_gib_per_gpu']:.0f} GiB/GPU" if row["peak_gib_per_gpu"] else ""
        ax.text(x, tps, note + mem, ha="center", va="bottom", fontsize=8)
    labels = [f"{row['record']['variant']}\n{_processes(row['record'])} GPU "
              f"{(row['record'].get('distributed') or {}).get('mode', 'single')}\n"
              f"{row['record']['arch']}, {row['budget']['tokens_per_step_target']:,}/GPU" for row in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("steady tokens/s, all GPUs (non-padding)")
    ax.set_ylim(0, max(row["budget"]["steady_tokens_per_second"] for row in rows) * 1.35)
    ax.set_title(f"LoRA data-parallel scaling, random weights - {rows[0]['record']['gpu']['name']}\n"
                 "(hatched: linear scaling from one GPU)", fontsize=10)
    return _save_figure(fig, out_path)


def _save_figure(fig, out_path) -> Path:
    """Write a matplotlib figure as PNG at `out_path` (creating its folder) and close it."""
    return hplots.save_figure(fig, Path(out_path).stem, Path(out_path).parent)


def plot_records(records, out_path) -> Path:
    """Bars of steady tokens/s per variant and tokens/step, one panel per (arch, GPU); peak memory on each bar."""
    import matplotlib.pyplot as plt  # helpers.plots chose a headless backend where there is no display

    if not records:
        raise SystemExit("No benchmark records to plot.")
    panels: dict[tuple, list] = {}
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(sorted({_label(r) for r in records}))}
    for r in records:
        panels.setdefault((r["arch"], r["gpu"]["name"]), []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, ((arch, gpu), runs) in zip(axes[0], sorted(panels.items())):
        labels = sorted({_label(r) for r in runs})
        budgets = sorted({b["tokens_per_step_target"] for r in runs for b in r["budgets"]})
        cells = {}
        for r in sorted(runs, key=lambda r: r["date"]):  # newest record wins a cell
            for b in r["budgets"]:
                cells[(_label(r), b["tokens_per_step_target"])] = b
        width = 0.8 / len(labels)
        top = max([b.get("steady_tokens_per_second") or 0 for b in cells.values()] + [1])
        for i, label in enumerate(labels):
            xs, heights = [], []
            for j, budget in enumerate(budgets):
                b = cells.get((label, budget))
                if b is None:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                value = b.get("steady_tokens_per_second") if b.get("status") == "ok" else 0
                xs.append(x)
                heights.append(value or 0)
                mem = b.get("peak_allocated_gib")
                note = (b.get("status", "?").upper() if b.get("status") != "ok"
                        else (f"{mem:.0f} GiB" if mem is not None else ""))
                ax.text(x, (value or 0) + top * 0.01, note, ha="center", va="bottom", fontsize=7, rotation=90)
            ax.bar(xs, heights, width=width * 0.95, label=label, color=colours[label])
        ax.set_xticks(range(len(budgets)), [f"{b:,}" for b in budgets])
        ax.set_xlabel("tokens per optimizer step")
        ax.set_ylabel("steady tokens/s (non-padding)")
        ax.set_ylim(0, top * 1.25)
        ax.set_title(f"{arch} - {gpu}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("LoRA fine-tuning speed, random weights (label: peak GPU memory allocated)", fontsize=10)
    return _save_figure(fig, out_path)


if __name__ == "__main__":
    main()
