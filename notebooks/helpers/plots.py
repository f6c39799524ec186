"""The notebooks' pictures: data (01), losses and accuracy (03), speed (04).

Each function draws one figure, saves it as a PNG under `outputs/figures/` (so slides and the README can use it)
and shows it inline in Jupyter. It returns the PNG's path.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "qt", "tk", "macosx")):
    matplotlib.use("Agg")  # headless (CI, train.py): draw to files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from .data import LETTERS  # noqa: E402

FIGURES_DIR = Path(__file__).resolve().parents[2] / "outputs" / "figures"


def save_figure(fig, name: str, out_dir: str | Path | None = None) -> Path:
    """Save `fig` as `<out_dir>/<name>.png`, show it inline, close it and return the path."""
    out = Path(out_dir or FIGURES_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.show()
    plt.close(fig)
    return path


def plot_subjects(rows, name="subjects", out_dir=None, top=25) -> Path:
    """Horizontal bars: how many questions each subject has (largest first)."""
    counts = Counter(r["subject"] if "subject" in r else r["subject_name"] for r in rows).most_common(top)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(counts) + 1.2))
    ax.barh([c[0] for c in counts][::-1], [c[1] for c in counts][::-1], color="#4C72B0")
    ax.set_xlabel("questions")
    ax.set_title("Questions per subject")
    return save_figure(fig, name, out_dir)


def plot_answers_and_explanations(splits: dict, name="answers_explanations", out_dir=None) -> Path:
    """Two panels per labelled split: answer-letter shares, and the share of rows with an explanation."""
    splits = {s: rows for s, rows in splits.items() if rows and rows[0].get("answer")}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / max(len(splits), 1)
    for i, (split, rows) in enumerate(splits.items()):
        counts = Counter(r["answer"] for r in rows)
        shares = [counts[L] / len(rows) for L in LETTERS]
        ax1.bar([j + i * width for j in range(4)], shares, width, label=split)
    ax1.axhline(0.25, color="grey", ls="--", lw=1, label="uniform (25%)")
    ax1.set_xticks([j + width * (len(splits) - 1) / 2 for j in range(4)], LETTERS)
    ax1.set_ylabel("share of rows")
    ax1.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax1.set_title("Correct answer letter")
    ax1.legend()
    with_exp = [sum(bool(r["has_explanation"]) for r in rows) / len(rows) for rows in splits.values()]
    ax2.bar(list(splits), with_exp, color="#55A868")
    ax2.set_ylim(0, 1)
    ax2.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax2.set_ylabel("share of rows")
    ax2.set_title("Rows with an explanation")
    for x, v in enumerate(with_exp):
        ax2.text(x, v + 0.02, f"{v:.0%}", ha="center")
    return save_figure(fig, name, out_dir)


def plot_token_lengths(lengths: list[int], max_length: int | None = None, name="token_lengths",
                       out_dir=None) -> Path:
    """Histogram of prompt+completion token lengths, with the `max_length` cut-off marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(60, max(10, len(lengths) // 5)), color="#8172B2")
    if max_length:
        over = sum(n > max_length for n in lengths)
        ax.axvline(max_length, color="red", ls="--", label=f"max_length={max_length} ({over} rows longer)")
        ax.legend()
    ax.set_xlabel("tokens (prompt + completion)")
    ax.set_ylabel("rows")
    ax.set_title("Formatted example length")
    return save_figure(fig, name, out_dir)


def plot_truncation(lengths: list[int], max_lengths=(128, 256, 384, 512, 768, 1024, 2048),
                    name="truncation", out_dir=None) -> Path:
    """Share of rows a given `max_length` would truncate, for several choices of it."""
    shares = [sum(n > m for n in lengths) / max(len(lengths), 1) for m in max_lengths]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(max_lengths, shares, marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(max_lengths, [str(m) for m in max_lengths])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, max(max(shares) * 1.1, 0.05))
    ax.set_ylabel("rows truncated (% of all rows)")
    ax.set_xlabel("max_length (tokens)")
    ax.set_title("How much would each max_length cut?")
    return save_figure(fig, name, out_dir)


def plot_loss_curves(curves: dict, name="loss", out_dir=None, title="Training loss") -> Path:
    """One or more loss curves on one axis: {label: (steps, losses)}."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, name, out_dir)


def plot_accuracy(results: dict, name="accuracy", out_dir=None, chance=0.25) -> Path:
    """Bars of accuracy with 95% confidence intervals: {label: eval result dict}."""
    labels = list(results)
    acc = [results[k]["accuracy"] for k in labels]
    err = [[a - results[k]["ci95"][0] for k, a in zip(labels, acc)],
           [results[k]["ci95"][1] - a for k, a in zip(labels, acc)]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, acc, yerr=err, capsize=6, color=["#C44E52", "#4C72B0", "#55A868"][: len(labels)])
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.0%})")
    for x, a in enumerate(acc):
        ax.text(x, a + 0.02, f"{a:.1%}", ha="center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"MedMCQA validation accuracy (n={results[labels[0]]['n']})")
    ax.legend()
    return save_figure(fig, name, out_dir)


def _label(record: dict) -> str:
    """'stack (GPU)' for legends."""
    return f"{record['stack']} ({record['hardware'].get('gpu_name') or 'CPU'})"


def plot_stack_comparison(records: list[dict], name="04_speedup", out_dir=None, note: str = "") -> Path:
    """Side by side for several run records: steady tokens/s, median s/step, wall time (compilation included),
    peak memory, and the loss curves (dashed and marked, so curves that coincide stay visible)."""
    from .training import steady

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


def plot_epoch_hours(rows: list[dict], name="04_full_depth", out_dir=None) -> Path:
    """Hours per MedMCQA epoch on the full model, per stack and LoRA configuration (rows of
    `unsloth_path.full_depth_comparison`: config, stack, tokens_per_second, epoch_hours)."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 3.6), squeeze=False)
    colors = {"standard": "#4C72B0", "unsloth": "#DD8452", "fast": "#55A868"}
    for ax, config in zip(axes[0], configs):
        mine = [r for r in rows if r["config"] == config]
        ax.bar([r["stack"] for r in mine], [r["epoch_hours"] for r in mine],
               color=[colors.get(r["stack"], "grey") for r in mine])
        for x, r in enumerate(mine):
            ax.text(x, r["epoch_hours"], f"{r['epoch_hours']:.2f} h\n{r['tokens_per_second']:,.0f} tok/s",
                    ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, max(r["epoch_hours"] for r in mine) * 1.35)
        ax.set_ylabel("hours per MedMCQA epoch")
        ax.set_title(config, fontsize=10)
    fig.suptitle("Full 52-layer model, 8,192 tokens/step, one H200 (measured tokens/s; hours derived)", fontsize=10)
    return save_figure(fig, name, out_dir)
