"""The pictures of notebooks 01 (the data) and 03 (losses and accuracy): each function draws one figure, saves it as
a PNG under `outputs/figures/` (for slides and the README), shows it inline in Jupyter and returns the PNG's path.
Notebook 04's speed plots are in unsloth_path.py and benchmarks/records.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "qt", "tk", "macosx")):
    matplotlib.use("Agg")  # headless (CI, train.py): draw to files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from .config import OUTPUTS  # noqa: E402
from .data import LETTERS  # noqa: E402

FIGURES_DIR = OUTPUTS / "figures"


def save_figure(fig, name: str, out_dir: str | Path | None = None) -> Path:
    """Save `fig` as `<out_dir>/<name>.png`, show it inline, close it and return the path."""
    path = Path(out_dir or FIGURES_DIR) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.show()
    plt.close(fig)
    return path


def plot_subjects(rows, name="subjects", out_dir=None, top=25) -> Path:
    """Horizontal bars: how many questions each subject has (largest first)."""
    counts = Counter(r["subject"] if "subject" in r else r["subject_name"] for r in rows).most_common(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(counts) + 1.2))
    ax.barh([c[0] for c in counts], [c[1] for c in counts], color="#4C72B0")
    ax.set(xlabel="questions", title="Questions per subject")
    return save_figure(fig, name, out_dir)


def plot_answers_and_explanations(splits: dict, name="answers_explanations", out_dir=None) -> Path:
    """Two panels per labelled split: answer-letter shares, and the share of rows with an explanation."""
    splits = {s: rows for s, rows in splits.items() if rows and rows[0].get("answer")}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / max(len(splits), 1)
    for i, (split, rows) in enumerate(splits.items()):
        counts = Counter(r["answer"] for r in rows)
        ax1.bar([j + i * width for j in range(4)], [counts[L] / len(rows) for L in LETTERS], width, label=split)
    ax1.axhline(0.25, color="grey", ls="--", lw=1, label="uniform (25%)")
    ax1.set_xticks([j + width * (len(splits) - 1) / 2 for j in range(4)], LETTERS)
    ax1.set(ylabel="share of rows", title="Correct answer letter")
    ax1.legend()
    with_exp = [sum(bool(r["has_explanation"]) for r in rows) / len(rows) for rows in splits.values()]
    ax2.bar(list(splits), with_exp, color="#55A868")
    ax2.set(ylim=(0, 1), ylabel="share of rows", title="Rows with an explanation")
    for x, v in enumerate(with_exp):
        ax2.text(x, v + 0.02, f"{v:.0%}", ha="center")
    for ax in (ax1, ax2):
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    return save_figure(fig, name, out_dir)


def plot_lengths(lengths: list[int], max_length: int, name="lengths", out_dir=None,
                 choices=(128, 256, 384, 512, 768, 1024, 2048)) -> Path:
    """Two panels: a histogram of prompt+completion token lengths with `max_length` marked, and the share of rows
    each choice of max_length would truncate."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))
    ax1.hist(lengths, bins=min(60, max(10, len(lengths) // 5)), color="#8172B2")
    over = sum(n > max_length for n in lengths)
    ax1.axvline(max_length, color="red", ls="--", label=f"max_length={max_length} ({over} rows longer)")
    ax1.set(xlabel="tokens (prompt + completion)", ylabel="rows", title="Formatted example length")
    ax1.legend()
    shares = [sum(n > m for n in lengths) / max(len(lengths), 1) for m in choices]
    ax2.plot(choices, shares, marker="o")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(choices, [str(m) for m in choices])
    ax2.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax2.set(ylim=(0, max(max(shares) * 1.1, 0.05)), ylabel="rows truncated (% of all rows)",
            xlabel="max_length (tokens)", title="How much would each max_length cut?")
    return save_figure(fig, name, out_dir)


def plot_loss_curves(curves: dict, name="loss", out_dir=None) -> Path:
    """One or more loss curves on one axis: {label: (steps, losses)}."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
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
    ax.set(ylim=(0, 1), ylabel="accuracy", title=f"MedMCQA validation accuracy (n={results[labels[0]]['n']})")
    ax.legend()
    return save_figure(fig, name, out_dir)
