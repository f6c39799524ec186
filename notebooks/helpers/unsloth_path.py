"""Notebook 04's helpers: import Unsloth first, check that its run is comparable, read its run records and plot
them (the committed GPU records it falls back on, and the full-depth chart, come from benchmarks/records.py).
`import unsloth` must run before transformers, trl and peft are imported, so that Unsloth can patch
them: nothing in `helpers` imports those at module level, and `try_import_unsloth()` is the notebook's first import.
The lesson's calls (`FastLanguageModel.from_pretrained`, `get_peft_model`) stay in the notebook's cells.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .plots import plt, save_figure
from .training import steady
from recipe.presets import config_of_run  # noqa: F401  (notebook 04 reruns notebook 03's config with it)


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
        return None, f"unsloth could not be imported ({type(e).__name__}: {e}); run the set-up cell on a GPU machine"
    return unsloth, f"unsloth {getattr(unsloth, '__version__', '?')} imported before transformers/trl/peft"


def can_train(precision: str) -> bool:
    """Unsloth trains this model in bf16 only: its 4-bit loader leaves the fused routed experts (29.4B
    parameters) in bf16, so a card too small for bf16 is too small for Unsloth too."""
    if precision != "bf16":
        print("This card is too small for the bf16 model, and Unsloth's 4-bit loading keeps this model's fused "
              "experts in bf16 (~59 GiB in all): Unsloth cannot train it here. Showing the reference records.")
    return precision == "bf16"


def check_same_batch(trainer, cfg) -> dict:
    """Tokens per step must match the baseline: compare what the trainer will really use with the config."""
    args = trainer.args
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed", "max_steps")
    got, want = {k: getattr(args, k) for k in keys}, {k: getattr(cfg, k) for k in keys}
    diff = {k: (want[k], got[k]) for k in keys if want[k] != got[k]}
    if diff:
        raise ValueError(f"the trainer does not use the baseline's settings (wanted, got): {diff}; fix the SFTConfig "
                         "so both runs train the same tokens per step")
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
    """Each stack's steady speed against the baseline's, and every stack's first (compiling) step. Counted steps
    over 5x their run's median (kernels compiling for a batch shape met for the first time, as on a fresh machine)
    are named, with the ratio of median steps, which leaves them out."""
    records = [baseline, *others]
    print("first step (compile/warm-up):", ", ".join(f"{r['stack']} {r['first_step_seconds']} s" for r in records))
    base = steady(baseline["step_times"])
    for other in others:
        mine = steady(other["step_times"])
        print(f"{other['stack']} vs {baseline['stack']}: {mine['tokens_per_second'] / base['tokens_per_second']:.2f}x "
              f"tokens/s after {mine['warmup_steps_excluded']} warm-up steps (median s/step "
              f"{mine['median_seconds_per_step']} vs {base['median_seconds_per_step']})")
        slow = {r["stack"]: [s for s in r["step_times"][speed["warmup_steps_excluded"]:]
                             if s["seconds"] > 5 * speed["median_seconds_per_step"]]
                for r, speed in ((baseline, base), (other, mine))}
        if any(slow.values()):
            steps = "; ".join(f"{stack} " + ", ".join(f"step {s['step']} {s['seconds']:.1f} s" for s in found)
                              for stack, found in slow.items() if found)
            print(f"  counted steps that compiled kernels ({steps}) weigh on that ratio; by median step, which "
                  f"leaves them out: {base['median_seconds_per_step'] / mine['median_seconds_per_step']:.2f}x")


def load_run_record(path: str | Path) -> dict:
    """Read a run record (metrics.json, or the folder holding it)."""
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no run record at {path}: run notebook 03 (or train.py) first")
    return json.loads(path.read_text())


def optional_run_record(path: str | Path) -> dict | None:
    """The run record at `path` if that run exists (e.g. the fast-path rerun of notebook 03's run), else None."""
    try:
        return load_run_record(path)
    except FileNotFoundError:
        print(f"No run record at {path}: to add the fast path to the comparison, run "
              "`train.py --fast --like <notebook 03's run folder>` on this GPU.")
        return None


def _label(record: dict) -> str:
    """'stack (GPU)' for legends."""
    return f"{record['stack']} ({record['hardware'].get('gpu_name') or 'CPU'})"


def plot_stack_comparison(records: list[dict], name="04_speedup", out_dir=None, note: str = "") -> Path:
    """Side by side for several run records: steady tokens/s, median s/step, wall time (compilation included),
    peak memory, and the loss curves (dashed and marked, so curves that coincide stay visible)."""
    panels = [(lambda r: steady(r["step_times"])["tokens_per_second"], "tokens/s after warm-up", "{:,.0f}"),
              (lambda r: steady(r["step_times"])["median_seconds_per_step"], "median seconds/step", "{:.3f}"),
              (lambda r: r.get("wall_seconds"), "wall time (s), compilation included", "{:,.0f}"),
              (lambda r: r["hardware"].get("peak_allocated_gib"), "peak GPU memory (GiB)", "{:.1f}")]
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.8]})
    labels = [r["stack"] for r in records]
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"][: len(records)]
    for i, (ax, (get, title, fmt)) in enumerate(zip(axes, panels)):
        values = [get(r) or 0 for r in records]
        ax.bar(labels, values, color=colors)
        for x, v in enumerate(values):
            ax.text(x, v, fmt.format(v), ha="center", va="bottom", fontsize=9)
        if i == 0 and values[0]:
            ax.set_xticks(range(len(labels)), [f"{lab}\n{v / values[0]:.2f}x" for lab, v in zip(labels, values)])
        ax.set_title(title, fontsize=9)
    for record, color, style in zip(records, colors, ("-", "--", ":", "-.")):
        steps, losses = zip(*record["loss_history"]) if record["loss_history"] else ((), ())
        axes[4].plot(steps, losses, color=color, ls=style, marker="o", markersize=3, label=_label(record))
    axes[4].set_title("training loss (the stacks compute the same model)", fontsize=9)
    axes[4].set_xlabel("step")
    axes[4].set_ylabel("loss")
    axes[4].legend(fontsize=8)
    v = records[0]["versions"]
    unsloth = next((r["versions"].get("unsloth") for r in records if r["stack"] == "unsloth"), None)
    fig.suptitle(f"{' vs '.join(_label(r) for r in records)} - torch {v['torch']}, transformers "
                 f"{v['transformers']}, trl {v['trl']}, peft {v['peft']}, unsloth {unsloth} {note}", fontsize=9)
    return save_figure(fig, name, out_dir)
