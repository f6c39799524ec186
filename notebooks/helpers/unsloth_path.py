"""Stage 3: the same LoRA run on Unsloth's stack, and a fair comparison with the standard one.

Import order matters: `import unsloth` must run before transformers, trl and peft
are imported, so that Unsloth can patch them. Nothing in `helpers` imports those
at module level, and `try_import_unsloth()` is meant to be the notebook's first import.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# Run records measured on a real GPU (standard, unsloth, fast; the format of outputs/runs/<run>/metrics.json),
# used where no GPU is available (CI): see benchmarks/README.md for how they were made.
REFERENCE_RUNS = REPO_ROOT / "benchmarks" / "results" / "runs"


def try_import_unsloth():
    """Import Unsloth if this machine can run it; return (module or None, reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU: Unsloth's kernels need one, so the Unsloth training cells are skipped"
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if late:
        print(f"Warning: {late} were imported before unsloth; restart the kernel and run this cell first "
              "so that Unsloth can patch them.")
    try:
        import unsloth
    except Exception as e:  # ImportError, or Unsloth's own refusal on unsupported hardware
        return None, f"unsloth could not be imported ({type(e).__name__}: {e}); install it with the 'unsloth' extra"
    return unsloth, f"unsloth {getattr(unsloth, '__version__', '?')} imported before transformers/trl/peft"


def load_model(model_id: str, max_length: int, revision: str | None = None):
    """Load the model through `FastLanguageModel` in bf16 (16-bit LoRA; QLoRA is not recommended here)."""
    from unsloth import FastLanguageModel

    return FastLanguageModel.from_pretrained(
        model_name=str(model_id), revision=revision, max_seq_length=max_length, dtype=torch.bfloat16,
        load_in_4bit=False, full_finetuning=False)


def add_lora(llm, cfg, target_modules=None):
    """Unsloth's LoRA with notebook 03's targets, rank and seed, and its own gradient checkpointing.

    Unsloth also adds LoRA to the routed experts whenever the targets include
    up_proj/down_proj; the trainable counts printed here show whether it did, and
    the baseline should then be run with `routed_experts=True` to train the same adapters.
    """
    from unsloth import FastLanguageModel

    from .model import LORA_TARGET_MODULES, trainable_stats
    peft_model = FastLanguageModel.get_peft_model(
        llm, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(target_modules or LORA_TARGET_MODULES), bias="none",
        use_gradient_checkpointing="unsloth", random_state=cfg.seed)
    return peft_model, trainable_stats(peft_model, "Unsloth LoRA")


def check_same_batch(trainer, cfg) -> dict:
    """Tokens per step must match the baseline: compare what the trainer will really use with the config."""
    args = trainer.args
    got = {"per_device_train_batch_size": args.per_device_train_batch_size,
           "gradient_accumulation_steps": args.gradient_accumulation_steps, "max_length": args.max_length,
           "seed": args.seed, "max_steps": args.max_steps}
    want = {"per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "max_length": cfg.max_length,
            "seed": cfg.seed, "max_steps": cfg.max_steps}
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    if diff:
        raise ValueError(f"The trainer does not use the baseline's settings (wanted, got): {diff}. "
                         "Fix the SFTConfig so both runs train the same tokens per step.")
    print("Same settings as the baseline:", got)
    return got


def fairness_table(baseline: dict, *others: dict) -> str:
    """Side by side: what must match between run records, and whether it does for every one of them."""
    keys = [("trainable_parameters", lambda r: r["trainable_parameters"]),
            ("rows per step", lambda r: r["effective_batch"]["rows_per_step"]),
            ("max_length", lambda r: r["config"]["max_length"]), ("seed", lambda r: r["config"]["seed"]),
            ("steps", lambda r: r["steps"]), ("tokens trained", lambda r: r["tokens"]),
            ("lora r / alpha", lambda r: (r["config"]["lora_r"], r["config"]["lora_alpha"])),
            ("routed-expert LoRA", lambda r: r["config"]["routed_experts"])]
    records = [baseline, *others]
    lines = [f"{'':<20}" + "".join(f"{r['stack']:>22}" for r in records) + "  same?"]
    for name, get in keys:
        values = [get(r) for r in records]
        same = all(v == values[0] for v in values)
        lines.append(f"{name:<20}" + "".join(f"{str(v):>22}" for v in values) + f"  {'yes' if same else 'NO'}")
    return "\n".join(lines)


def print_speedups(baseline: dict, others: list[dict]) -> None:
    """Each stack's speed against the baseline's, after two warm-up steps (as plots.plot_stack_comparison draws
    it) and after one (the run records' own steady figure), and every stack's first, compiling step."""
    from .training import tokens_per_second_after

    records = [baseline, *others]
    print("first step (compile/warm-up):", ", ".join(f"{r['stack']} {r['first_step_seconds']} s" for r in records))
    base, base_steady = tokens_per_second_after(baseline, skip=2), baseline["steady_tokens_per_second"]
    for other in others:
        print(f"{other['stack']} vs {baseline['stack']}: {tokens_per_second_after(other, skip=2) / base:.2f}x "
              f"after two warm-up steps ({other['steady_tokens_per_second'] / base_steady:.2f}x after one)")


def reference_records(folder: str | Path = REFERENCE_RUNS) -> tuple[dict, dict, dict | None]:
    """The committed GPU run records (standard, unsloth, and fast where measured) for machines that cannot train."""
    from .training import load_run_record
    folder = Path(folder)
    fast = load_run_record(folder / "fast.json") if (folder / "fast.json").exists() else None
    return load_run_record(folder / "standard.json"), load_run_record(folder / "unsloth.json"), fast


def optional_run_record(path: str | Path) -> dict | None:
    """The run record at `path` if that run exists (e.g. the fast-path rerun of notebook 03's run), else None."""
    from .training import load_run_record
    try:
        return load_run_record(path)
    except FileNotFoundError:
        print(f"No run record at {path}: to add the fast path to the comparison, run "
              f"`python train.py --fast --like <notebook 03's run folder>` on this GPU.")
        return None
