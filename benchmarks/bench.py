"""LoRA fine-tuning speed of the real Nemotron-3-Nano architecture, random weights, one GPU or several.

Builds the model straight on the GPU in bf16 (seconds, no download), adds LoRA exactly as train.py does (or as
Unsloth does), feeds it MedMCQA-shaped rows of random token ids, and times a few optimizer steps per budget of
tokens per step with train.py's trainer. One JSON record per run goes to --out; `--plot` and `--table`
summarise all records in a folder; `benchmarks/tables.py` rewrites the README's and NOTES' tables.

    python benchmarks/bench.py --variant standard --arch real --tokens-per-step 4096 8192
    python benchmarks/bench.py --variant standard-nokernels --arch real --tokens-per-step 1024 2048
    python benchmarks/bench.py --variant standard unsloth --arch slice8 --tokens-per-step 4096 8192
    python benchmarks/bench.py --variant standard --arch real --find-max
    python benchmarks/bench.py --plot DIR      # -> DIR/benchmark.png
    python benchmarks/bench.py --table DIR     # markdown table of the records in DIR
    python benchmarks/bench.py --arch tiny --steps 2 --warmup 1 --tokens-per-step 256   # CPU smoke run

Several GPUs (one process each, through accelerate; --tokens-per-step is per GPU; one variant per launch):
    accelerate launch --config_file configs/ddp.yaml --num_processes 2 benchmarks/bench.py --arch real
    accelerate launch --config_file configs/fsdp.yaml --num_processes 2 benchmarks/bench.py --arch real
    python benchmarks/bench.py --scaling DIR                           # 1 vs N processes: speed-up, efficiency
    bash benchmarks/scaling.sh OUT_DIR                                 # all of the above on a 2-GPU machine

Variants (each runs in its own Python process; several --variant values run one after another):
  standard            train.py's LoRA (train.lora_config) and trainer (train.sft_config + SFTTrainer), Mamba kernels
  standard-nokernels  the same, with mamba_ssm / causal_conv1d hidden from transformers (reference PyTorch Mamba)
  unsloth             `import unsloth` first, then notebook 04's FastLanguageModel.from_pretrained and
                      FastLanguageModel.get_peft_model (Unsloth's gradient checkpointing), the same SFTConfig
  fast                the standard model, LoRA and SFTConfig, with the fast path (fastpath: packing with Mamba
                      seq_idx and the other pieces of --fast-features) and --checkpointing POLICY (all, none,
                      mamba,moe, moe:N: only the first N MoE blocks recompute)

Figures leave out the first --warmup steps and every step that meets a batch shape for the first time (each new
shape compiles kernels once); the record lists those steps and why (budgets[].warmup_steps_excluded).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing here needs the Hub; never hang on a dead network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (torch may come before unsloth; transformers/trl/peft may not)

from benchmarks import models, timing, workload  # noqa: E402  (none imports transformers at module level)
from benchmarks.records import (  # noqa: E402,F401  (re-exported: the tests and scaling.sh call them here)
    load_records, markdown_table, plot_records, plot_scaling, scaling_table, write_record)

ARCHS, VARIANTS = models.ARCHS, models.VARIANTS
RESULTS = REPO / "benchmarks" / "results"
FIND_MAX_BUDGETS = (2048, 4096, 8192, 16384, 32768)
NOTES = [
    "Random weights: the router of a randomly initialised MoE spreads tokens over the 128 experts more "
    "uniformly than a trained one, so per-expert batch sizes (and grouped-GEMM efficiency) differ from the "
    "trained model; Mamba/attention/dense costs do not depend on the weights.",
    "Row lengths follow the distribution named in data.source; token ids are random. The real MedMCQA "
    "length distribution (real tokenizer, full train split) is only used if a prepared folder is given.",
    "MFU = tokens/s x FLOPs/token / card peak (dense bf16). FLOPs/token = 6N: forward 2N + backward to activations "
    "2N (LoRA: frozen weights get no weight gradients) + 2N recomputation (gradient checkpointing). N = matmul "
    "parameters active per token: active_per_token minus the embedding table (a lookup), with the LM head counted "
    "only on the completion share of tokens (TRL's fused head projects only labelled positions). Ignores the "
    "attention/SSM sequence terms and LoRA's own FLOPs. mfu_6n_active uses 6 x active_per_token as is.",
    "Peak memory includes the bf16 weights (~58.8 GiB for the real architecture).",
    "Figures leave out the first `warmup` steps and every step that met a batch shape for the first time "
    "(budgets[].warmup_steps_excluded says which and why); tokens/s is all counted tokens over all counted "
    "seconds (the mean), beside the median and mean seconds per step.",
]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", nargs="+", default=["standard"], choices=VARIANTS)
    p.add_argument("--arch", default="real", choices=ARCHS,
                   help="real: 52 layers, 31.58B; slice8: the first 8 layers (every block type), same widths; "
                        "tiny: recipe.offline's tiny model (CPU tests)")
    p.add_argument("--model", help="a saved NemotronH checkpoint folder to benchmark instead of random weights "
                                   "(benchmarks/make_random_model.py writes the random one)")
    p.add_argument("--tokens-per-step", nargs="+", type=int, default=[4096],
                   help="budgets: non-padding tokens per optimizer step (rows per step = budget / mean row length)")
    p.add_argument("--steps", type=int, default=12, help="steps after the warm-up")
    p.add_argument("--warmup", type=int, default=3,
                   help="first steps left out of the figures (so is every later step that meets a new batch shape)")
    p.add_argument("--find-max", action="store_true",
                   help=f"try {', '.join(map(str, FIND_MAX_BUDGETS))} tokens/step, 3 steps each, until OOM")
    p.add_argument("--routed-experts", action="store_true",
                   help="standard and fast variants: LoRA on the 128 routed experts too (PEFT target_parameters)")
    p.add_argument("--lengths-from", help="a prepare_medmcqa output folder (default: outputs/data/medmcqa_formatted "
                                          "if present, else the shipped sample prepared on the fly)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON records")
    p.add_argument("--tmp-dir", default=tempfile.gettempdir(),
                   help="where the unsloth variant saves the random model it loads (slice8: ~9.5 GB)")
    p.add_argument("--run-records", metavar="DIR",
                   help="also write DIR/<standard|unsloth|fast>.json in helpers.training's run-record format (the "
                        "last budget that fitted), as notebook 04 reads them")
    p.add_argument("--checkpointing", default="all",
                   help="fast variant: block types that recompute activations (all, none, or e.g. mamba,moe; "
                        "moe:N: only the first N MoE blocks)")
    p.add_argument("--fast-features", default=None,
                   help="fast variant: comma list of fastpath.FEATURES to use (default: all of them); the ablation "
                        "drops or adds one at a time")
    p.add_argument("--any-version", action="store_true",
                   help="fast variant: run on library versions the fast path was not checked with")
    p.add_argument("--profile", action="store_true",
                   help="profile 2 steps after warm-up of each budget with torch.profiler; the top CUDA kernels go "
                        "to <out>/profile_<variant>_<arch>_<budget>.txt")
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
    from recipe import distributed

    variants = list(dict.fromkeys(args.variant))
    if len(variants) == 1:
        record = run_variant(args, variants[0], argv)
        distributed.finish()  # under accelerate launch: leave the process group before exiting
        return [record]
    if distributed.launched():
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


def fast_settings(args, variant):
    """The fast variant's `fastpath.Settings` (None for the others), checked before anything heavy loads; then
    the process settings the fast path wants before CUDA starts (expandable allocator segments)."""
    if variant != "fast":
        return None
    import fastpath

    try:
        settings = fastpath.Settings(args.fast_features, args.checkpointing)
        fastpath.check_versions(allow_other_versions=args.any_version, settings=settings)
        fastpath.prepare_process(settings)
    except fastpath.Refused as refusal:
        raise SystemExit(f"--variant fast: {refusal}") from None
    return settings


def refuse_early(args, variant) -> None:
    """Refusals that must happen before a model is built."""
    from recipe import distributed

    if variant == "unsloth":
        if args.arch == "real" and not args.model:
            raise SystemExit(
                "--variant unsloth --arch real needs --model PATH: Unsloth loads models from a folder, and the random "
                "full model (59 GB in bf16) does not fit the 64 GB disk next to everything else. Save it once with "
                "benchmarks/make_random_model.py (e.g. to /dev/shm on a machine with the memory), or use --arch "
                "slice8 (the first 8 layers, ~9.5 GB).")
        if not torch.cuda.is_available():
            raise SystemExit("--variant unsloth needs a CUDA GPU: Unsloth does not run on CPU. Run the standard "
                             "variant on CPU (--arch tiny), or run this on a GPU machine.")
    if torch.cuda.is_available() and torch.cuda.device_count() > 1 and not distributed.launched():
        raise SystemExit(f"{torch.cuda.device_count()} GPUs are visible to this one process; the Trainer would wrap "
                         "the model in nn.DataParallel, which SFTTrainer refuses. For one GPU run with "
                         "CUDA_VISIBLE_DEVICES=0; for several, use accelerate launch (configs/ddp.yaml).")
    if args.arch != "tiny" and not args.model and not torch.cuda.is_available():
        raise SystemExit(f"--arch {args.arch} needs a CUDA GPU (its float32 weights would not fit in CPU memory); "
                         "use --arch tiny on CPU.")
    if variant == "standard-nokernels" and "transformers.models.nemotron_h.modeling_nemotron_h" in sys.modules:
        raise SystemExit("--variant standard-nokernels must start in a fresh Python process: transformers binds the "
                         "Mamba kernels once, when modeling_nemotron_h is first imported.")
    if distributed.fsdp_enabled() and (variant != "standard" or args.model or args.find_max
                                       or len(args.tokens_per_step) > 1):
        raise SystemExit("Under FSDP (configs/fsdp.yaml) the benchmark measures one budget of the random standard "
                         "variant: one --tokens-per-step value, no --find-max or --model (FSDP shards the model in "
                         "place, so it cannot be reset between budgets; the other variants are untested under FSDP).")


def launch_command() -> str:
    """How this run was started, for the record: plain python, or accelerate launch with N processes."""
    from recipe import distributed

    if not distributed.launched():
        return "python"
    return (f"accelerate launch --num_processes {distributed.world_size()} "
            f"({'FSDP' if distributed.fsdp_enabled() else 'DDP'})")


def distributed_facts() -> dict:
    """Processes, how the model is spread over them, and the launcher settings that matter for speed."""
    from recipe import distributed

    env = {k: v for k, v in os.environ.items()
           if k.startswith(("FSDP_", "NCCL_")) or k in ("ACCELERATE_MIXED_PRECISION", "PYTORCH_CUDA_ALLOC_CONF")}
    mode = ("fsdp" if distributed.fsdp_enabled() else "ddp") if distributed.launched() else "single"
    return {"processes": distributed.world_size(), "mode": mode, "tokens_per_step_is": "per process (per GPU)",
            "tokens_per_second_is": "all processes together", "memory_is": "per GPU (budgets[].per_process)",
            "environment": env}


def run_variant(args, variant: str, argv) -> dict:  # noqa: C901
    fast = fast_settings(args, variant)
    refuse_early(args, variant)
    started = time.perf_counter()
    kernel_choice = models.choose_mamba_kernels(variant)
    if variant == "unsloth":
        import unsloth  # noqa: F401  (must precede transformers / trl / peft)
    import transformers  # noqa: F401

    from helpers.model import pad_id
    from helpers.training import library_versions
    from recipe import distributed

    distributed.init()  # under accelerate launch: join the process group, claim GPU LOCAL_RANK (one process: nothing)
    sharded = distributed.fsdp_enabled()  # FSDP: the model waits on the CPU until the Trainer shards it
    cuda = torch.cuda.is_available()
    gpu = timing.gpu_info()
    tokenizer = models.bench_tokenizer(args.model)
    kernels_static = models.kernel_status()  # read the import-time binding before MambaPathCounter wraps the ops
    if cuda and variant in ("standard", "fast") and not kernels_static["fast_path"]:
        raise SystemExit(
            f"--variant {variant} measures the fused Mamba kernels, but transformers bound the reference path "
            f"({kernels_static['implementations']}; mamba_ssm {kernels_static['mamba_ssm']}, causal_conv1d "
            f"{kernels_static['causal_conv1d']}). Install mamba-ssm and causal-conv1d (LOCK=requirements-cuda.lock ./run ...), or "
            "run --variant standard-nokernels to measure the reference path on purpose.")
    counter = models.MambaPathCounter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    cfg = models.bench_config(seed=args.seed, max_length=args.max_length,
                              routed_experts=args.routed_experts and variant != "unsloth")
    try:
        imports_seconds = round(time.perf_counter() - started, 1)
        length_tokenizer = tokenizer  # the same for every variant (Unsloth returns its own copy), so the same rows
        model, tokenizer, facts = models.load_variant_model(variant, cfg, tokenizer, args.arch, args.model,
                                                            args.tmp_dir)
        counts = facts["base_counts"]
        trainable = models.trainable_summary(model)
        print(f"Model: {counts['total']:,} parameters, {counts['active_per_token']:,} active per token; "
              f"{trainable['trainable_parameters']:,} trainable", flush=True)
        dist = workload.length_distribution(length_tokenizer, args.lengths_from, args.max_length)
        print(f"Row lengths: {dist['rows']} rows from {dist['source']}; mean {dist['mean_tokens']:.0f} tokens",
              flush=True)

        probe = workload.probe_rows(dist["pairs"], model.config.vocab_size, args.seed)
        pad = pad_id(tokenizer)
        if sharded:
            first = {"loss": None, "skipped": "FSDP: the model is on the CPU (and sharded later), not probed"}
        else:
            first = workload.first_batch_loss(model, probe, pad, distributed.device())
            print(f"First-batch loss: {first['loss']:.4f} ({first['tokens']} tokens)", flush=True)
        packed_first = None
        if fast is not None and not sharded and "packing" in fast.pieces:
            packed_first = workload.packed_first_batch(model, probe, pad)
            print(f"First-batch loss, packed into one row: {packed_first['loss']:.4f} (per-row max |diff| vs alone "
                  f"{packed_first['max_row_loss_diff']:.2e}; without seq_idx "
                  f"{packed_first['max_row_loss_diff_without_seq_idx']:.2e})", flush=True)

        flops = timing.flops_per_token(counts, dist["completion_share"])
        peak = timing.peak_flops(gpu["name"], args.peak_tflops)
        flops["peak"] = peak["flops"]

        budgets = FIND_MAX_BUDGETS if args.find_max else args.tokens_per_step
        steps, warmup = (2, 1) if args.find_max else (args.steps, args.warmup)
        results, largest = [], None
        snapshot = {} if sharded else {n: p.detach().to("cpu", copy=True)  # FSDP: one budget, nothing to reset
                                       for n, p in model.named_parameters() if p.requires_grad}
        stack = "standard" if variant.startswith("standard") else variant
        for budget in budgets:
            profile_to = (Path(args.out) / f"profile_{variant}-{args.checkpointing}_{args.arch}_{budget}.txt"
                          if args.profile else None)
            results.append(timing.run_budget(model, tokenizer, dist, budget, cfg=cfg, steps=steps, warmup=warmup,
                                             workdir=workdir, flops=flops, stack=stack, fast=fast,
                                             profile_to=profile_to, keep_run_record=bool(args.run_records)))
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
        applied = next((b["fast_pieces"] for b in reversed(results) if b.get("fast_pieces")), {})
        record = {
            "schema": 2,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "variant": variant,
            "routed_experts": args.routed_experts if variant != "unsloth" else trainable["lora_on_routed_experts"],
            "fast": None if fast is None else {
                "features": sorted(fast.pieces), "all_features": sorted(_all_features()),
                "checkpointing": args.checkpointing, "pieces_applied": applied, "packed_first_batch": packed_first},
            "arch": "model" if args.model else args.arch,
            "model_path": args.model,
            "weights": "checkpoint" if args.model else f"random (torch.manual_seed({args.seed}))",
            "command": launch_command() + " benchmarks/bench.py " + " ".join(argv),
            "processes": distributed.world_size(),
            "distributed": distributed_facts(),
            "gpu": gpu,
            "peak_flops": peak,
            "versions": library_versions(),
            "trainer": {"sft_config": "train.sft_config(cfg, **overrides)", "lora_config": "train.lora_config(cfg)",
                        "config": {k: getattr(cfg, k) for k in ("lora_r", "lora_alpha", "lora_dropout",
                                                                 "routed_experts", "learning_rate", "seed",
                                                                 "max_length")}},
            "model": {
                "layers": config.num_hidden_layers, "pattern": config.hybrid_override_pattern,
                "params_total": counts["total"], "params_active_per_token": counts["active_per_token"],
                "param_counts": counts, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "attn_implementation": getattr(config, "_attn_implementation", None),
                "experts_implementation": getattr(config, "_experts_implementation", None),
                "gradient_checkpointing": True, "lm_head_loss": models.lm_head_loss_path(),
                "matmul_params_per_token": flops["matmul_params_per_token"], "flops_per_token": flops["per_token"],
                "flops_per_token_formula": "6 x (active_per_token - embeddings - lm_head x (1 - completion_share))",
                "flops_per_token_6n_active": flops["per_token_6n_active"],
            },
            "mamba": {
                "variant_switch": kernel_choice, "use_mamba_kernels_config": getattr(config, "use_mamba_kernels", None),
                "bound_at_import": kernels_static, "runtime_calls": dict(counter.counts),
                "path_that_ran": counter.path(),
                "path_matches_variant": models.path_matches(variant, counter.path(), cuda),
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
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if not distributed.is_main_process():  # several processes: the main one writes the record (all figures gathered)
        return record
    if record["mamba"]["path_matches_variant"] is False:
        print(f"WARNING: variant {variant} ran the Mamba path '{record['mamba']['path_that_ran']}'", flush=True)
    path = write_record(record, Path(args.out), args.find_max)
    print(f"\nRecord: {path}\n")
    print(markdown_table([record]))
    if args.run_records and run_records:
        folder = Path(args.run_records)
        folder.mkdir(parents=True, exist_ok=True)
        stack_name = run_records[-1]["stack"]
        run_records[-1]["benchmark_record"] = str(path)
        (folder / f"{stack_name}.json").write_text(json.dumps(run_records[-1], indent=2, default=str))
        print(f"Run record ({stack_name}, {run_records[-1]['benchmark_tokens_per_step']} tokens/step): "
              f"{folder / (stack_name + '.json')}")
    if os.environ.get("BENCH_RECORD_LIST"):
        with open(os.environ["BENCH_RECORD_LIST"], "a") as listing:
            listing.write(f"{path}\n")
    errors = [b for b in record["budgets"] if b["status"] == "error"]
    if errors:
        raise SystemExit(f"{len(errors)} budget(s) failed with an error (not OOM): {errors[0]['error']}; "
                         f"see 'traceback_tail' in {path}")
    return record


def _all_features():
    import fastpath

    return fastpath.FEATURES


if __name__ == "__main__":
    main()
