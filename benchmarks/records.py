"""Reading benchmark records back: their figures, markdown tables, charts, and the full-depth comparison.

A record is the JSON that `bench.py` writes for one variant (one process or several), with one entry per
budget of tokens per step. Records written before the warm-up rule of `timing.py` counted a fixed number of
warm-up steps; `figures()` reads both kinds the same way. Nothing here imports torch or transformers, so
notebook 04 and `tables.py` can use it anywhere:

    from benchmarks.records import full_depth_comparison
    rows = full_depth_comparison()     # one dict per stack: tokens/s, speed-up, hours per MedMCQA epoch
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FULL_DEPTH = RESULTS / "fulldepth"
# Notebook 03's run on a GPU (standard), notebook 04's (unsloth) and train.py --fast's (fast), as run records
# (outputs/runs/<run>/metrics.json): what notebook 04 compares where no GPU can train (CI).
REFERENCE_RUNS = RESULTS / "runs"
# Tokens in one MedMCQA epoch with explanations: the project's documented estimate (README, "Measured results"),
# not a count of the real dataset with the real tokenizer (the offline machines that measured cannot load it).
EPOCH_TOKENS = 30_000_000
EPOCH_TOKENS_SOURCE = ("~30M tokens: the README's estimate for one MedMCQA epoch with explanations (not counted "
                       "with the real tokenizer); hours = that / measured tokens/s, a derived figure")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in text.replace("NVIDIA ", ""))
    return "-".join(filter(None, keep.split("-")))


def variant_slug(record: dict) -> str:
    """`standard`, `standard-experts`, `fast-ckpt-moe1`, `fast-without-gc_freeze-ckpt-all`, ...: short enough for
    a file name, and different for the feature sets an ablation compares."""
    name = record["variant"] + ("-experts" if record.get("routed_experts") else "")
    fast = record.get("fast")
    if fast:
        features, every = set(fast.get("features", [])), set(fast.get("all_features") or fast.get("features", []))
        missing = sorted(every - features)
        if missing and len(missing) <= 2:
            name += "-without-" + "+".join(missing)
        elif missing:
            name += "-" + ("+".join(sorted(features)) if len(features) <= 2 else f"{len(features)}pieces")
        name += "-ckpt-" + fast["checkpointing"].replace(",", "+").replace(":", "")
    return name


def record_name(record: dict, find_max: bool = False) -> str:
    """<date>_<gpu>_<variant>_<arch>[_<N>x<mode>][_findmax]"""
    name = f"{record['date'][:10]}_{_slug(record['gpu']['name'])}_{variant_slug(record)}_{record['arch']}"
    if processes(record) > 1:  # 1-GPU and N-GPU runs of the same variant must not overwrite each other
        name += f"_{processes(record)}x{record['distributed']['mode']}"
    return name + ("_findmax" if find_max else "")


def write_record(record: dict, out, find_max: bool = False) -> Path:
    """Write `record` as out/<record_name>.json (…_2.json, _3… for further runs of the same day)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = record_name(record, find_max)
    path, n = out / f"{name}.json", 2
    while path.exists():  # several runs of one configuration on one day: keep them all
        path, n = out / f"{name}_{n}.json", n + 1
    path.write_text(json.dumps(record, indent=1, default=str))
    record["path"] = str(path)
    return path


def load_record(path) -> dict:
    record = json.loads(Path(path).read_text())
    record["path"] = str(path)
    return record


def load_records(folder, recursive: bool = False) -> list[dict]:
    """Every benchmark record in `folder` (not run records or checks), ordered by arch, GPU, label, date."""
    records = []
    for path in sorted(Path(folder).glob("**/*.json" if recursive else "*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "budgets" in record and "variant" in record:
            record["path"] = str(path)
            records.append(record)
    return sorted(records, key=lambda r: (r["arch"], r["gpu"]["name"], label(r), r["date"]))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

WARMUP_RULE = ("left out of the figures: the first `warmup` steps, and every step whose batch shape (input_ids, "
               "on any process) had not been seen before in this budget; each new shape compiles kernels once")


def warmup_exclusions(step_times: list[dict], warmup: int, shapes_by_process: list[dict]) -> list[dict]:
    """The steps left out of the figures, each with why: the first `warmup` steps, and every step that met a
    batch shape no earlier step of this budget had met (on any process: the slowest process sets the pace)."""
    seen, out = [set() for _ in shapes_by_process], []
    for i, step in enumerate(step_times):
        why = ["warm-up (--warmup)"] if i < warmup else []
        new = []
        for process, (shapes, known) in enumerate(zip(shapes_by_process, seen)):
            key = repr(shapes.get(step["step"]))
            if key not in known:
                known.add(key)
                new.append(shapes.get(step["step"]) if len(shapes_by_process) == 1 else
                           {"process": process, "shape": shapes.get(step["step"])})
        if new and any(shapes for shapes in shapes_by_process):
            why.append(f"first step with batch shape {new[0] if len(new) == 1 else new}")
        if why:
            out.append({"step": step["step"], "seconds": step["seconds"], "why": "; ".join(why)})
    return out




def processes(record) -> int:
    """How many processes (GPUs) a record ran on; records without the field ran on one."""
    return record.get("processes", 1)


def label(record, with_processes: bool = True) -> str:
    experts = "+experts" if record.get("routed_experts") else ""
    fast = record.get("fast")
    policy = ""
    if fast:
        features = fast.get("features", [])
        pieces = f"{len(features)} pieces" if len(features) > 3 else "+".join(features)
        policy = f" ({pieces}; checkpointing {fast['checkpointing']})"
    procs = f" x{processes(record)} {record['distributed']['mode'].upper()}" if processes(record) > 1 else ""
    return f"{record['variant']}{experts}{policy}{procs if with_processes else ''}"


def _counted_steps(budget: dict) -> list[dict]:
    """The step entries behind a budget's figures: the record's own list, or (records with a fixed warm-up)
    every step after the warm-up."""
    steps = budget.get("step_times") or []
    if "counted_steps" in budget:
        keep = set(budget["counted_steps"])
        return [s for s in steps if s["step"] in keep]
    return steps[budget.get("warmup", 0):]


def figures(budget: dict) -> dict:
    """One budget's figures, the same for every record: tokens/s (all tokens / all seconds of the counted
    steps), the median and the mean step, tokens/s of the median step, peak memory while training, and how
    the warm-up was chosen. None where the budget did not run (OOM, error)."""
    if budget.get("status") != "ok":
        return {"status": budget.get("status", "?")}
    tps, per_step = budget["steady_tokens_per_second"], budget.get("tokens_per_step_mean")
    mean = budget.get("seconds_per_step_mean") or (per_step / tps if per_step and tps else None)
    counted = _counted_steps(budget)
    median_tps = budget.get("tokens_per_second_median_step") or (
        statistics.median(s["tokens"] / s["seconds"] for s in counted) if counted else None)
    if "warmup_steps_excluded" in budget:
        left_out = budget["warmup_steps_excluded"]
        warmup = (f"{len(left_out)} steps left out (first {budget['warmup']}, and each step meeting a new batch "
                  "shape)")
        n = budget["steps_counted"]
    else:
        warmup, n = f"first {budget.get('warmup', 0)} steps left out", budget.get("steps")
    return {"status": "ok", "tokens_per_second": tps, "median_s": budget["seconds_per_step_median"],
            "mean_s": mean, "tokens_per_second_median_step": median_tps, "steps_counted": n, "warmup": warmup,
            "peak_allocated_gib": budget.get("train_peak_allocated_gib") or budget.get("peak_allocated_gib"),
            "peak_reserved_gib": budget.get("train_peak_reserved_gib") or budget.get("peak_reserved_gib"),
            "mfu": budget.get("mfu")}


def budget_of(record: dict, tokens_per_step: int | None = None) -> dict:
    """The budget entry of `record` with that target (the first one if None)."""
    for budget in record["budgets"]:
        if tokens_per_step is None or budget["tokens_per_step_target"] == tokens_per_step:
            return budget
    raise KeyError(f"{record.get('path')}: no budget of {tokens_per_step} tokens/step")


def fmt(value, spec="", none="-"):
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def millions(n) -> str:
    return "-" if n is None else (f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,}")


def markdown_table(records) -> str:
    """One row per (record, budget): the figures the README quotes, medians beside means."""
    lines = ["| variant | arch | tokens/step | tokens/s | median s/step | mean s/step | peak GiB (alloc/resv) | MFU "
             "| first-batch loss | trainable | GPU | date |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in records:
        for b in r["budgets"]:
            f = figures(b)
            ok = f["status"] == "ok"
            mem = (f"{fmt(b.get('train_peak_allocated_gib') or b.get('peak_allocated_gib'), '.1f')} / "
                   f"{fmt(b.get('train_peak_reserved_gib') or b.get('peak_reserved_gib'), '.1f')}")
            lines.append(
                f"| {label(r)} | {r['arch']} | {b['tokens_per_step_target']:,} | "
                f"{fmt(f.get('tokens_per_second'), ',.0f') if ok else f['status'].upper()} | "
                f"{fmt(f.get('median_s'), '.3f') if ok else '-'} | {fmt(f.get('mean_s'), '.3f') if ok else '-'} | "
                f"{mem} | {fmt(f.get('mfu'), '.1%') if ok else '-'} | {fmt(r.get('first_batch_loss'), '.4f')} | "
                f"{millions(r.get('trainable_parameters'))} | {r['gpu']['name']} | {r['date'][:10]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------


def scaling_rows(records) -> list[dict]:
    """Each budget of each record next to the one-process run of the same variant, arch, GPU and tokens/step
    per GPU: speed-up = tokens/s / one-process tokens/s; efficiency = speed-up / processes (1.0 = linear)."""
    rows, base = [], {}
    for r in sorted(records, key=lambda r: r["date"]):  # the newest one-process record is the baseline
        for b in r["budgets"]:
            key = (r["arch"], r["gpu"]["name"], r["variant"], bool(r.get("routed_experts")),
                   tuple((r.get("fast") or {}).get("features", [])), (r.get("fast") or {}).get("checkpointing"),
                   b["tokens_per_step_target"])
            if processes(r) == 1 and b.get("status") == "ok":
                base[key] = b["steady_tokens_per_second"]
            rows.append({"key": key, "record": r, "budget": b})
    for row in rows:
        tps, one = row["budget"].get("steady_tokens_per_second"), base.get(row["key"])
        n = processes(row["record"])
        row["speedup"] = tps / one if tps and one else None
        row["efficiency"] = row["speedup"] / n if row["speedup"] else None
        per_process = row["budget"].get("per_process") or [row["budget"]]
        peaks = [p.get("train_peak_allocated_gib") or p.get("peak_allocated_gib") for p in per_process]
        row["peak_gib_per_gpu"] = max((x for x in peaks if x is not None), default=None)
    return sorted(rows, key=lambda x: (x["key"][:-1], x["key"][-1], processes(x["record"]), x["record"]["date"]))


def scaling_table(records) -> str:
    """Markdown: tokens/s at 1 and N processes, speed-up and efficiency against the one-process run."""
    lines = ["| variant | arch | tokens/step per GPU | GPUs | mode | tokens/s (all GPUs) | tokens/s per GPU | "
             "median s/step | speed-up | efficiency | peak GiB per GPU | GPU | date |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in scaling_rows(records):
        r, b, n = row["record"], row["budget"], processes(row["record"])
        tps = b.get("steady_tokens_per_second") if b.get("status") == "ok" else None
        lines.append(
            f"| {label(r, with_processes=False)} | {r['arch']} | {b['tokens_per_step_target']:,} | {n} | "
            f"{(r.get('distributed') or {}).get('mode', 'single')} | "
            f"{fmt(tps, ',.0f') if tps else b.get('status', '?').upper()} | {fmt(tps and tps / n, ',.0f')} | "
            f"{fmt(b.get('seconds_per_step_median'), '.3f')} | "
            f"{fmt(row['speedup'], '.2f')}{'x' if row['speedup'] else ''} | {fmt(row['efficiency'], '.0%')} | "
            f"{fmt(row['peak_gib_per_gpu'], '.1f')} | {r['gpu']['name']} | {r['date'][:10]} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Charts
# ----------------------------------------------------------------------------------------------


def _save_figure(fig, out_path) -> Path:
    """Write a matplotlib figure as PNG at `out_path` (creating its folder) and close it."""
    from helpers.plots import save_figure

    return save_figure(fig, Path(out_path).stem, Path(out_path).parent)


def plot_scaling(records, out_path) -> Path:
    """Bars of tokens/s by process count (hatched: linear scaling from one process), speed-up on each bar."""
    import matplotlib.pyplot as plt

    import helpers.plots  # noqa: F401  (picks a headless backend; the package put helpers on sys.path)

    rows = [row for row in scaling_rows(records) if row["budget"].get("status") == "ok"]
    if not rows:
        raise SystemExit("No benchmark records to compare.")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.4))
    for x, row in enumerate(rows):
        n = processes(row["record"])
        tps = row["budget"]["steady_tokens_per_second"]
        ax.bar(x, tps, width=0.6, color=plt.cm.tab10(min(n, 9) - 1))
        if row["speedup"] and n > 1:
            ax.bar(x, tps / row["speedup"] * n, width=0.6, fill=False, hatch="//", edgecolor="grey", zorder=3)
        note = f"{row['speedup']:.2f}x ({row['efficiency']:.0%})" if row["speedup"] and n > 1 else "baseline"
        mem = f"\n{row['peak_gib_per_gpu']:.0f} GiB/GPU" if row["peak_gib_per_gpu"] else ""
        ax.text(x, tps, note + mem, ha="center", va="bottom", fontsize=8)
    labels = [f"{row['record']['variant']}\n{processes(row['record'])} GPU "
              f"{(row['record'].get('distributed') or {}).get('mode', 'single')}\n"
              f"{row['record']['arch']}, {row['budget']['tokens_per_step_target']:,}/GPU" for row in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("steady tokens/s, all GPUs (non-padding)")
    ax.set_ylim(0, max(row["budget"]["steady_tokens_per_second"] for row in rows) * 1.35)
    ax.set_title(f"LoRA data-parallel scaling, random weights - {rows[0]['record']['gpu']['name']}\n"
                 "(hatched: linear scaling from one GPU)", fontsize=10)
    return _save_figure(fig, out_path)


def plot_records(records, out_path) -> Path:
    """Bars of steady tokens/s per variant and tokens/step, one panel per (arch, GPU); peak memory on each bar."""
    import matplotlib.pyplot as plt

    import helpers.plots  # noqa: F401

    if not records:
        raise SystemExit("No benchmark records to plot.")
    panels: dict[tuple, list] = {}
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted({label(r) for r in records}))}
    for r in records:
        panels.setdefault((r["arch"], r["gpu"]["name"]), []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, ((arch, gpu), runs) in zip(axes[0], sorted(panels.items())):
        names = sorted({label(r) for r in runs})
        budgets = sorted({b["tokens_per_step_target"] for r in runs for b in r["budgets"]})
        cells = {}
        for r in sorted(runs, key=lambda r: r["date"]):  # newest record wins a cell
            for b in r["budgets"]:
                cells[(label(r), b["tokens_per_step_target"])] = b
        width = 0.8 / len(names)
        top = max([b.get("steady_tokens_per_second") or 0 for b in cells.values()] + [1])
        for i, name in enumerate(names):
            xs, heights = [], []
            for j, budget in enumerate(budgets):
                b = cells.get((name, budget))
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
            ax.bar(xs, heights, width=width * 0.95, label=name, color=colours[name])
        ax.set_xticks(range(len(budgets)), [f"{b:,}" for b in budgets])
        ax.set_xlabel("tokens per optimizer step")
        ax.set_ylabel("steady tokens/s (non-padding)")
        ax.set_ylim(0, top * 1.25)
        ax.set_title(f"{arch} - {gpu}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("LoRA fine-tuning speed, random weights (label: peak GPU memory allocated)", fontsize=10)
    return _save_figure(fig, out_path)


# ----------------------------------------------------------------------------------------------
# The full architecture, three stacks
# ----------------------------------------------------------------------------------------------

# (file in FULL_DEPTH, stack, LoRA configuration, the standard record it is compared with)
FROZEN, ROUTED = "frozen routed experts", "routed-expert LoRA"
FULL_DEPTH_RUNS = (
    ("standard.json", "standard", FROZEN, "standard.json"),
    ("fast.json", "fast", FROZEN, "standard.json"),
    ("standard-experts.json", "standard", ROUTED, "standard-experts.json"),
    ("unsloth-experts.json", "unsloth", ROUTED, "standard-experts.json"),
    ("fast-experts.json", "fast", ROUTED, "standard-experts.json"),
)


def full_depth_shapes(folder=FULL_DEPTH) -> dict:
    """{"padded": {step: shape}, "packed": {step: length}}: the batch shapes of the full-depth runs, replayed
    (batch-shapes.json says how); their records predate the shapes-seen warm-up rule and do not hold them."""
    steps = json.loads((Path(folder) / "batch-shapes.json").read_text())["steps"]
    return {"padded": {s["step"]: s["padded_shape"] for s in steps},
            "packed": {s["step"]: s["packed_length"] for s in steps}}


def with_shapes_rule(record: dict, shapes: dict) -> dict:
    """A full-depth record's figures under the shapes-seen warm-up rule (as bench.py now applies it): its first
    `warmup` steps and every step meeting a new batch shape left out, through helpers.training.steady."""
    from helpers.training import steady

    budget = budget_of(record)
    kind = "packed" if (record.get("fast") or {}).get("features") and "packing" in record["fast"]["features"] \
        else "padded"
    excluded = warmup_exclusions(budget["step_times"], budget["warmup"], [shapes[kind]])
    left_out = {e["step"] for e in excluded}
    kept = [s for s in budget["step_times"] if s["step"] not in left_out]
    speed = steady(kept, skip=0)
    return {"tokens_per_second": speed["tokens_per_second"], "median_s": speed["median_seconds_per_step"],
            "mean_s": speed["mean_seconds_per_step"], "excluded": sorted(left_out), "shapes": kind}


def full_depth_comparison(folder=FULL_DEPTH, epoch_tokens: int = EPOCH_TOKENS) -> list[dict]:
    """The full 52-layer architecture trained by the three stacks, one dict per run, from the committed records.

    Keys: stack ('standard', 'unsloth', 'fast', as run records name them), config (FROZEN or ROUTED: which LoRA),
    trainable, trainable_on_routed_experts, tokens_per_second, median_s, mean_s, speedup (against the standard
    stack with the same config), peak_allocated_gib / peak_reserved_gib (while training), first_batch_loss,
    checkpointing, epoch_hours (`epoch_tokens` / tokens_per_second / 3600: derived from EPOCH_TOKENS, see
    EPOCH_TOKENS_SOURCE), gpu, date, record (file name), and `shapes_rule`: the same figures with the steps
    that met a new batch shape left out too (`with_shapes_rule`). The figures are the records' own (the first 5
    of 20 steps left out).
    """
    folder = Path(folder)
    shapes = full_depth_shapes(folder)
    rows = []
    for name, stack, config, baseline in FULL_DEPTH_RUNS:
        record = load_record(folder / name)
        f = figures(budget_of(record))
        base_record = load_record(folder / baseline)
        base = figures(budget_of(base_record))
        tps = f.get("tokens_per_second")
        rule, base_rule = with_shapes_rule(record, shapes), with_shapes_rule(base_record, shapes)
        rule["speedup"] = rule["tokens_per_second"] / base_rule["tokens_per_second"]
        rows.append({
            "stack": stack, "config": config, "trainable": record["trainable_parameters"],
            "trainable_on_routed_experts": record["trainable_on_routed_experts"],
            "tokens_per_second": tps, "median_s": f.get("median_s"), "mean_s": f.get("mean_s"),
            "speedup": tps / base["tokens_per_second"] if tps and base.get("tokens_per_second") else None,
            "peak_allocated_gib": f.get("peak_allocated_gib"), "peak_reserved_gib": f.get("peak_reserved_gib"),
            "first_batch_loss": record.get("first_batch_loss"),
            "checkpointing": (record.get("fast") or {}).get("checkpointing") or
                             ("Unsloth's" if record["variant"] == "unsloth" else "all"),
            "epoch_hours": epoch_tokens / tps / 3600 if tps else None,
            "warmup_steps": budget_of(record)["warmup"], "shapes_rule": rule,
            "gpu": record["gpu"]["name"], "date": record["date"][:10], "record": name})
    return rows


def reference_runs(folder=REFERENCE_RUNS) -> tuple[dict, dict, dict | None]:
    """The committed run records of notebooks 03 and 04 on a GPU: (standard, unsloth, fast or None)."""
    folder = Path(folder)
    fast = load_record(folder / "fast.json") if (folder / "fast.json").exists() else None
    return load_record(folder / "standard.json"), load_record(folder / "unsloth.json"), fast


def plot_epoch_hours(rows: list[dict], name="04_full_depth", out_dir=None) -> Path:
    """Hours per MedMCQA epoch on the full model, per stack and LoRA configuration (rows of
    `full_depth_comparison()`), drawn and shown as notebook 04's figures are (helpers.plots.save_figure)."""
    import matplotlib.pyplot as plt

    from helpers.plots import save_figure

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
