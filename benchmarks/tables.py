"""Rewrite the measured tables of README.md and benchmarks/NOTES.md from the committed records.

    python benchmarks/tables.py            # rewrite every table region from the records
    python benchmarks/tables.py --check    # exit 1, showing the difference, where a region differs from them

A region is the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME is a key of TABLES. Each
table is computed from the JSON records under benchmarks/results/ (benchmarks/results/README.md lists them):
a figure typed by hand, or a record that is missing, makes `--check` (and the CPU test that runs it) fail.
Captions and the prose around the regions stay hand-written. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository on sys.path, so `benchmarks` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import REPO  # noqa: E402
from benchmarks.records import (  # noqa: E402
    EPOCH_TOKENS, RESULTS, budget_of, figures, fmt, full_depth_comparison, load_record, millions)

FILES = (REPO / "README.md", REPO / "benchmarks" / "NOTES.md", REPO / "benchmarks" / "results" / "README.md")
REGION = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def _link(path: str, folder: str = "results") -> str:
    """A record's file name as a markdown link, relative to benchmarks/ (NOTES.md's folder)."""
    return f"[`{Path(path).name}`]({folder}/{path})"


def _budget(file: str, tokens: int | None = None) -> tuple[dict, dict]:
    record = load_record(RESULTS / file)
    return record, budget_of(record, tokens)


def _joined(values, spec) -> str:
    return " / ".join(fmt(v, spec) for v in values)


# ----------------------------------------------------------------------------------------------
# The fast path, one change at a time (README: a summary; NOTES: every row, with its records)
# ----------------------------------------------------------------------------------------------

# Machines: separate machines of the same type (NVIDIA H100 80GB HBM3, driver 580.159.04, the same stack).
# Compare rows only within one machine: the same code moved by up to 5-10% from one machine to another.
# (label, [[files of one configuration], [files of the one it is compared with]], machine, in README, bold)
A = "ablation/"
ABLATION = [
    ("standard path (padded batches, every block recomputed)", [["baseline/h100-standard.json"]], "A", True, False),
    ("+ padding-free packing with Mamba `seq_idx`", [[A + "01-packing.json"]], "B", True, False),
    ("+ lean routed experts", [[A + "02-lean-experts.json"]], "B", True, False),
    ("+ packed lengths rounded to 256", [[A + "03-round-lengths.json"]], "B", True, False),
    ("+ routing weight before `down_proj`, fused RMSNorm", [[A + "04-fused-norms.json"]], "B", True, False),
    ("+ checkpointing only the MoE blocks (`moe`)", [[A + "05-checkpoint-moe.json"]], "B", True, False),
    ("+ varlen attention", [[A + "07-varlen-attention.json"]], "C", True, False),
    ("+ bf16 LoRA inputs (six pieces)", [[A + "08-lora-bf16.json"]], "C", True, False),
    ("the six pieces again", [[A + "08-lora-bf16-again.json"]], "D", True, False),
    ("+ bf16 ReLU² (shared experts), compact routed experts", [[A + "10-relu2-compact-experts.json"]], "D", True,
     False),
    ("+ LoRA sum by one `addmm_` (nine pieces)", [[A + "11-lora-addmm.json"]], "D", True, False),
    ("+ only 8 of 23 MoE blocks recomputed (`moe:8`)", [[A + "12-moe8.json"]], "E", False, False),
    ("+ expandable allocator segments, one-kernel slot sum, 2-D `addmm_`, `moe:8`",
     [[A + "13-expandable-moe8.json"]], "F", True, False),
    ("the same, `moe:4` (out of memory before expandable segments)", [[A + "13-expandable-moe4.json"]], "F", True,
     False),
    ("the same, `moe:4`, 20 timed steps", [[A + "13-expandable-moe4-20-steps.json"]], "G", False, False),
    ("+ ReLU² x routing weight compiled (`fused_expert_act`, ten pieces), `moe:4`",
     [[A + "14-fused-act-moe4.json"]], "G", True, False),
    ("the same, `moe:2` / `moe:1`", [[A + "14-fused-act-moe2.json"], [A + "14-fused-act-moe1.json"]], "G", True,
     False),
    ("the same, `moe:1`, 30 timed steps", [[A + "14-fused-act-moe1-30-steps.json"]], "G", False, False),
    ("+ slot sum compiled (`fused_slot_sum`, eleven pieces), `moe:1` / `moe:2`",
     [[A + "15-slot-sum-moe1.json"], [A + "15-slot-sum-moe2.json"]], "H", True, False),
    ("+ Mamba's `out_proj` outside the fused kernel (`frozen_out_proj`, twelve pieces), `moe:1`, two runs",
     [[A + "17-out-proj-a.json", A + "17-out-proj-b.json"]], "I", True, False),
    ("the eleven pieces without it, runs interleaved with those two",
     [[A + "17-without-out-proj-a.json", A + "17-without-out-proj-b.json"]], "I", False, False),
    ("twelve pieces + row bounds from the collator (no GPU wait in attention)",
     [[A + "18-row-bounds-a.json", A + "18-row-bounds-b.json"]], "J", False, False),
    ("the same machine, later: with / without the collator's bounds, interleaved",
     [[A + "18-row-bounds-c.json", A + "18-row-bounds-d.json"],
      [A + "18-without-row-bounds-a.json", A + "18-without-row-bounds-b.json"]], "J", False, False),
    ("twelve pieces, garbage collector as is / frozen by a wrapper, interleaved, 30 timed steps",
     [[A + "19-gc-as-is-a.json", A + "19-gc-as-is-b.json"], [A + "19-gc-wrapper-a.json", A + "19-gc-wrapper-b.json"]],
     "K", False, False),
    ("+ `gc_freeze` (all thirteen pieces), `moe:1`, 30 timed steps, three runs",
     [[A + "19-all-thirteen-a.json", A + "19-all-thirteen-b.json", A + "19-all-thirteen-c.json"]], "L", True, True),
    ("the same, `moe:2`", [[A + "19-all-thirteen-moe2.json"]], "L", False, False),
]
ABLATION_BUDGET = 8192


def _steps(budget: dict) -> str:
    f = figures(budget)
    return f"{f['steps_counted']} after {budget['warmup']}"


def ablation_table(summary: bool = False) -> str:
    """The ablation at 8,192 tokens/step on the full architecture: every row of ABLATION (NOTES: with records),
    or the README's summary rows. Several runs of one configuration are joined by ', ', compared
    configurations by ' / '."""
    head = "| configuration | tokens/s | median s/step | mean s/step | peak GiB | timed steps | machine |"
    rule = "|---|---:|---:|---:|---:|---:|:---:|"
    if not summary:
        head, rule = head + " records |", rule + "---|"
    lines = [head, rule]
    for name, groups, machine, in_readme, bold in ABLATION:
        if summary and not in_readme:
            continue
        cells = {"tps": [], "median": [], "mean": [], "peak": [], "steps": []}
        for group in groups:
            got = [(figures(b), b) for _, b in (_budget(file, ABLATION_BUDGET) for file in group)]
            cells["tps"].append(", ".join(fmt(f["tokens_per_second"], ",.0f") for f, _ in got))
            cells["median"].append(", ".join(fmt(f["median_s"], ".3f") for f, _ in got))
            cells["mean"].append(", ".join(fmt(f["mean_s"], ".3f") for f, _ in got))
            cells["peak"] += [fmt(f["peak_allocated_gib"], ".1f") for f, _ in got]
            cells["steps"] += [_steps(b) for _, b in got]
        row = {k: " / ".join(v) for k, v in cells.items() if k not in ("peak", "steps")}
        if bold:
            row = {k: f"**{v}**" for k, v in row.items()}
        peak = " / ".join(dict.fromkeys(cells["peak"]))
        steps = " / ".join(dict.fromkeys(cells["steps"]))
        line = (f"| {name} | {row['tps']} | {row['median']} | {row['mean']} | {peak} | {steps} | {machine} |")
        if not summary:
            line += " " + ", ".join(_link(file) for group in groups for file in group) + " |"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The full architecture, three stacks
# ----------------------------------------------------------------------------------------------


STACK_NAMES = {"standard": "standard", "fast": "fast", "unsloth": "Unsloth"}


def _config(row: dict) -> str:
    return row["config"] + (" (Unsloth adds it)" if row["stack"] == "unsloth" else "")


def full_depth_table(folder: str = "benchmarks/results") -> str:
    """The full-depth comparison (records.full_depth_comparison), with hours per MedMCQA epoch (derived)."""
    rows = full_depth_comparison()
    unsloth = next(r["tokens_per_second"] for r in rows if r["stack"] == "unsloth")
    lines = ["| stack | LoRA | trainable | tokens/s | median s/step | mean s/step | vs standard | vs Unsloth "
             "| peak GiB (alloc / resv) | first-batch loss | hours per epoch (derived) | record |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        versus = f"{row['tokens_per_second'] / unsloth:.2f}x" if row["trainable_on_routed_experts"] else "-"
        lines.append(
            f"| {STACK_NAMES[row['stack']]} (checkpointing {row['checkpointing']}) | {_config(row)} | "
            f"{millions(row['trainable'])} | "
            f"{fmt(row['tokens_per_second'], ',.0f')} | {fmt(row['median_s'], '.3f')} | {fmt(row['mean_s'], '.3f')} | "
            f"{row['speedup']:.2f}x | {versus} | "
            f"{fmt(row['peak_allocated_gib'], '.1f')} / {fmt(row['peak_reserved_gib'], '.1f')} | "
            f"{fmt(row['first_batch_loss'], '.4f')} | {fmt(row['epoch_hours'], '.2f')} | "
            f"[`{row['record']}`]({folder}/fulldepth/{row['record']}) |")
    return "\n".join(lines)


def headline_table() -> str:
    """README's first table and notebook 04's headline: hours per MedMCQA epoch of each stack on the full model."""
    lines = ["| LoRA | stack | tokens/s (measured) | vs standard | hours per epoch (derived) |",
             "|---|---|---:|---:|---:|"]
    for row in full_depth_comparison():
        lines.append(f"| {_config(row)} | {STACK_NAMES[row['stack']]} | {fmt(row['tokens_per_second'], ',.0f')} | "
                     f"{row['speedup']:.2f}x | {fmt(row['epoch_hours'], '.2f')} |")
    lines.append("| frozen routed experts | Unsloth | not measured (Unsloth adds routed-expert LoRA by itself) | - | - |")
    return "\n".join(lines)


def full_depth_warmup_table() -> str:
    """The full-depth figures as recorded (first 5 steps left out) and under the shapes-seen rule."""
    lines = ["| run | left out as recorded | left out by the shapes-seen rule | tokens/s, recorded / rule | "
             "median s/step, recorded / rule | vs standard, recorded / rule |", "|---|---|---|---:|---:|---:|"]
    for row in full_depth_comparison():
        rule = row["shapes_rule"]
        lines.append(
            f"| {STACK_NAMES[row['stack']]}, {_config(row)} | steps 1-{row['warmup_steps']} | steps "
            f"{', '.join(map(str, rule['excluded']))} ({rule['shapes']} shapes) | "
            f"{row['tokens_per_second']:,.0f} / {rule['tokens_per_second']:,.0f} | "
            f"{row['median_s']:.3f} / {rule['median_s']:.3f} | {row['speedup']:.2f}x / {rule['speedup']:.2f}x |")
    return "\n".join(lines)


WARMUP_RULE_RUNS = [("standard", "warmup-rule/standard-slice8.json"), ("fast", "warmup-rule/fast-slice8.json")]


def warmup_rule_table() -> str:
    """What the shapes-seen rule left out of two short runs, and what a fixed warm-up would have counted."""
    from helpers.training import steady

    lines = ["| run | steps (s) and batch shapes | left out, and why | tokens/s: rule / first W left out only | "
             "median s/step: rule / first W only |", "|---|---|---|---:|---:|"]
    for name, file in WARMUP_RULE_RUNS:
        _, budget = _budget(file)
        steps = budget["step_times"]
        shown = ", ".join(f"{s['step']}: {s['seconds']:.2f} {'x'.join(map(str, s['shape'][0]))}" for s in steps)
        why = "; ".join(f"{e['step']}: {e['why'].replace('warm-up (--warmup)', 'warm-up')}"
                        for e in budget["warmup_steps_excluded"])
        fixed = steady(steps, skip=budget["warmup"])
        lines.append(f"| {name}, `{Path(file).name}` (W = {budget['warmup']}) | {shown} | {why} | "
                     f"{budget['steady_tokens_per_second']:,.0f} / {fixed['tokens_per_second']:,.0f} | "
                     f"{budget['seconds_per_step_median']:.3f} / {fixed['median_seconds_per_step']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# README: the first benchmark, several GPUs, notebooks 03-04 on a GPU
# ----------------------------------------------------------------------------------------------

BASELINE = [  # (record, budgets, variant, model)
    ("baseline/h100-standard.json", (4096, 8192), "standard (with Mamba kernels)", "full 52 layers, 31.58B"),
    ("baseline/h100-standard-nokernels.json", (1024,), "standard, no Mamba kernels", "full 52 layers, 31.58B"),
    ("baseline/h200-slice8-standard-experts.json", (4096, 8192), "standard + routed-expert LoRA",
     "first 8 layers, 4.78B"),
    ("baseline/h200-slice8-unsloth.json", (4096, 8192), "Unsloth (adds routed-expert LoRA itself)",
     "first 8 layers, 4.78B"),
]


def baseline_table() -> str:
    lines = ["| variant | model | tokens/step | tokens/s | median s/step | mean s/step | peak GiB (alloc/resv) | MFU "
             "| first-batch loss | trainable | GPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for file, budgets, variant, model in BASELINE:
        record = load_record(RESULTS / file)
        for tokens in budgets:
            budget = budget_of(record, tokens)
            f = figures(budget)
            ok = f["status"] == "ok"
            mem = f"{fmt(budget.get('peak_allocated_gib'), '.1f')} / {fmt(budget.get('peak_reserved_gib'), '.1f')}"
            lines.append(
                f"| {variant} | {model} | {tokens:,} | "
                f"{fmt(f['tokens_per_second'], ',.0f') if ok else 'out of memory'} | "
                f"{fmt(f.get('median_s'), '.3f')} | {fmt(f.get('mean_s'), '.3f')} | {mem} | "
                f"{fmt(f.get('mfu'), '.1%')} | {fmt(record['first_batch_loss'], '.4f')} | "
                f"{millions(record['trainable_parameters'])} | {record['gpu']['name'].replace('NVIDIA ', '')} |")
    return "\n".join(lines)


SCALING = [  # (path, one-GPU record, N-GPU record)
    ("standard, DDP", "scaling/standard-1gpu.json", "scaling/standard-2gpu-ddp.json"),
    ("fast (six pieces, checkpointing MoE blocks only), DDP", "scaling/fast-1gpu.json", "scaling/fast-2gpu-ddp.json"),
    ("standard, FSDP (base sharded over both GPUs)", "scaling/short/standard-1gpu.json",
     "scaling/short/standard-2gpu-fsdp.json"),
]


def _peak_per_gpu(budget: dict):
    peaks = [p.get("train_peak_allocated_gib") or p.get("peak_allocated_gib")
             for p in budget.get("per_process") or [budget]]
    return max(p for p in peaks if p is not None)


def scaling_table() -> str:
    lines = ["| path | 1 GPU tokens/s | 2 GPUs tokens/s | speed-up | median s/step, 1 / 2 GPUs | peak GiB per GPU "
             "| timed steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, one_file, two_file in SCALING:
        (_, one), (_, two) = _budget(one_file), _budget(two_file)
        f1, f2 = figures(one), figures(two)
        speedup = f2["tokens_per_second"] / f1["tokens_per_second"]
        lines.append(f"| {name} | {f1['tokens_per_second']:,.0f} | {f2['tokens_per_second']:,.0f} | "
                     f"**{speedup:.2f}x** | {f1['median_s']:.3f} / {f2['median_s']:.3f} | "
                     f"{_peak_per_gpu(one):.1f} / {_peak_per_gpu(two):.1f} | {_steps(two)} |")
    return "\n".join(lines)


NOTEBOOK_RUNS = [("standard (notebook 03)", "runs/standard.json"), ("Unsloth (notebook 04)", "runs/unsloth.json"),
                 ("fast (`train.py --fast --like`)", "runs/fast.json")]
NOTEBOOK_WARMUP = 2  # the sample alternates two batch shapes: the first two steps meet them both


def notebook_runs_table() -> str:
    """Notebook 03 and 04's run records (and the fast rerun), after the steps that met a new batch shape: the
    definition of helpers.training.steady (all tokens over all seconds of the steps after the first `skip`)."""
    lines = [f"| stack | tokens/s after {NOTEBOOK_WARMUP} warm-up steps | median s/step | mean s/step | first step "
             "(compiles) | second step | wall | peak GiB | loss step 1 / last |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, file in NOTEBOOK_RUNS:
        run = json.loads((RESULTS / file).read_text())
        steps = run["step_times"]
        kept = steps[NOTEBOOK_WARMUP:]
        seconds = sum(s["seconds"] for s in kept)
        median = statistics.median(s["seconds"] for s in kept)
        bold = "**" if run["stack"] == "fast" else ""
        losses = run["loss_history"]
        lines.append(
            f"| {name} | {bold}{sum(s['tokens'] for s in kept) / seconds:,.0f}{bold} | {bold}{median:.3f}{bold} | "
            f"{seconds / len(kept):.3f} | {steps[0]['seconds']:.1f} s | {steps[1]['seconds']:.1f} s | "
            f"{run['wall_seconds']:.0f} s | {run['hardware']['peak_allocated_gib']:.1f} | "
            f"{losses[0][1]:.3f} / {losses[-1][1]:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# NOTES: the correctness checks (benchmarks/check_fast.py records)
# ----------------------------------------------------------------------------------------------


def _pct(grads: dict) -> str:
    return f"{grads['median_rel_error']:.1%} / {grads['max_rel_error']:.1%}"


def checks_table() -> str:
    """check_fast on the 8-layer slice under the Trainer's autocast: ten pieces, and two other feature lists of
    the same run (six pieces; ten less fused_expert_act)."""
    check = json.loads((RESULTS / "checks/slice8-ten-pieces.json").read_text())
    six, nine = check["by_features"]
    loss, rows = check["loss"], check["per_row"]
    return "\n".join([
        "| check | ten pieces (all but `fused_slot_sum`) | the six pieces | nine (ten less `fused_expert_act`) |",
        "|---|---|---|---|",
        f"| loss, same {check['rows']} rows: standard vs fast | {loss['standard']:.5f} vs {loss['fast']:.5f} "
        f"(diff {loss['abs_diff']:.4f}) | diff {six['loss_abs_diff']:.4f} | diff {nine['loss_abs_diff']:.4f} |",
        f"| worst per-row loss difference, with `seq_idx` | {rows['max_abs_diff_packed']:.4f} | | |",
        f"| the same without `seq_idx` (rows leak into each other) | {rows['max_abs_diff_packed_without_seq_idx']:.4f}"
        " | | |",
        f"| LoRA gradients, relative error (median / worst of {check['grads']['tensors']} tensors) | "
        f"{_pct(check['grads'])} | {_pct(six['grads'])} | {_pct(nine['grads'])} |",
        f"| noise floor: standard batch vs the same rows one at a time, standard path | "
        f"{_pct(check['grads_noise_floor'])} | | |",
        f"| {check['training']['steps']}-step training loss curve, worst relative difference | "
        f"{check['training']['max_rel_diff']:.2%} | | |"])


def float32_table() -> str:
    """Both bf16 paths against the standard path's float32 gradients, and the fast path less some pieces."""
    check = json.loads((RESULTS / "checks/slice8-float32-reference.json").read_text())
    ref, every = check["float32_reference"], set(check["features"])
    names = {"fused_expert_act,fused_slot_sum": "the two compiled steps"}
    without, only = [], []
    for entry in check["by_features"]:
        used = set(entry["features"].split(","))
        missing = ",".join(sorted(every - used))
        if len(used) > len(every) / 2:
            without.append((f"without {names.get(missing, f'`{missing}`')}", entry["grads"]["median_rel_error"]))
        else:
            only.append((" and ".join(f"`{f}`" for f in entry["features"].split(",")), entry["grads"]))
    lines = [f"| LoRA gradients, relative error (median / worst of {check['grads']['tensors']}) | |", "|---|---|",
             f"| standard bf16 vs float32 | {_pct(ref['standard_bf16'])} |",
             f"| fast bf16 ({len(every)} pieces) vs float32 | {_pct(ref['fast_bf16'])} |",
             f"| fast vs standard, {len(every)} pieces | {_pct(check['grads'])} |",
             f"| ... {' / '.join(name for name, _ in without)} (median) | "
             f"{' / '.join(f'{value:.1%}' for _, value in without)} |"]
    lines += [f"| ... {name} only | {_pct(grads)} |" for name, grads in only]
    lines.append(f"| standard batch vs the same rows one at a time | {_pct(check['grads_noise_floor'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# benchmarks/results/README.md: which records stand behind which claim
# ----------------------------------------------------------------------------------------------

B = "python benchmarks/bench.py"
def _qlora(phase: str, folder: str = "qlora") -> dict:
    """The newest benchmarks/qlora.py record of one phase (bf16, nf4-40GB, nf4-24GB, quality, load-disk)."""
    files = sorted(RESULTS.glob(f"{folder}/*_{phase}.json"))
    if not files:
        raise FileNotFoundError(f"no qlora record for phase {phase!r} under {RESULTS / 'qlora'}")
    return load_record(files[-1]) | {"file": files[-1].name}


def cards_table() -> str:
    """README's card table: bf16 from the full-depth records (MedMCQA-shaped rows), the 4-bit modes from
    benchmarks/qlora.py with the GPU capped (fixed 256-token rows, beside bf16 on the same rows). Hours per epoch
    of a 4-bit mode: its speed relative to bf16 on the same rows, applied to the full-depth standard figure."""
    frozen = {r["stack"]: r for r in full_depth_comparison() if not r["trainable_on_routed_experts"]}
    bf16 = _qlora("bf16")
    base = bf16["train"]["tokens_per_second"]
    lines = ["| card | mode | tokens/step | peak GiB (alloc / resv) | tokens/s | hours per epoch (derived) | record |",
             "|---|---|---:|---:|---:|---:|---|"]
    for stack, mode in (("standard", "bf16, standard stack"), ("fast", "bf16, `train.py --fast`")):
        row = frozen[stack]
        lines.append(f"| 80 GB (A100 80GB, H100, H200) | {mode} | 8,192 | {fmt(row['peak_allocated_gib'], '.1f')} / "
                     f"{fmt(row['peak_reserved_gib'], '.1f')} | {fmt(row['tokens_per_second'], ',.0f')} (MedMCQA-"
                     f"shaped rows) | {fmt(row['epoch_hours'], '.2f')} | [`{row['record']}`](benchmarks/results/"
                     f"fulldepth/{row['record']}) |")
    for phase, card, mode in (("nf4-40GB", "40 GB (A100 40GB)", "NF4 routed experts, standard stack"),
                              ("nf4-24GB", "24 GB (L4, RTX 4090)", "NF4 experts and the other linears")):
        r = _qlora(phase)
        t, cap, held = r["train"], r["gpu_cap"]["cap_gib"], r["gpu_cap"]["allocated_at_start_gib"]
        memory = t["training_memory"]
        same_rows = t["tokens_per_step"] == bf16["train"]["tokens_per_step"]
        as_full_depth = t["tokens_per_second"] / base * frozen["standard"]["tokens_per_second"]
        hours = (f"{EPOCH_TOKENS / as_full_depth / 3600:.2f}" if same_rows
                 else f"{EPOCH_TOKENS / t['tokens_per_second'] / 3600:.1f} or more")
        versus = f", {t['tokens_per_second'] / base:.2f}x bf16's {base:,.0f}" if same_rows else ""
        held = f" ({held:.1f} of it held from the bf16 run before)" if held > 0.5 else ""
        lines.append(f"| {card} | {mode}; GPU capped at {cap} GiB | {t['tokens_per_step']:,} | "
                     f"{memory['peak_allocated_gib']:.1f} / {memory['peak_reserved_gib']:.1f}{held} | "
                     f"{t['tokens_per_second']:,.0f} (fixed {t['row_tokens']}-token rows{versus}) | {hours} | "
                     f"[`{r['file']}`](benchmarks/results/qlora/{r['file']}) |")
    return "\n".join(lines)


def qlora_quality_table() -> str:
    """NF4 against bf16 on the same random weights, rows and LoRA start (benchmarks/qlora.py)."""
    q, load = _qlora("quality"), _qlora("load-disk")
    g = q["lora_gradients_nf4_vs_bf16"]
    curves = q["loss_curves"]
    return "\n".join([
        "| measure | bf16 | NF4 routed experts | record |", "|---|---:|---:|---|",
        f"| first-batch loss | {q['first_batch_loss']['bf16']:.4f} | {q['first_batch_loss']['nf4']:.4f} | "
        f"[`{q['file']}`](results/qlora/{q['file']}) |",
        f"| loss after {len(curves['bf16'])} steps | {curves['bf16'][-1]:.4f} | {curves['nf4'][-1]:.4f} | (same) |",
        f"| routed-expert weight error (relative, one layer) | - | {q['expert_weight_error']['up_proj']:.4f} "
        "| (same) |",
        f"| first-batch LoRA gradient, cosine to bf16 | 1 | {g['cosine']:.3f} ({g['tensors_with_nonzero_gradient']} "
        f"B tensors) | (same) |",
        f"| loading a saved checkpoint in 4-bit, capped at {load['gpu_cap']['cap_gib']:.0f} GiB | - | "
        f"{load['seconds']:.1f} s, GPU peak {load['gpu_memory']['peak_reserved_gib']:.1f} GiB reserved, "
        f"{load['cpu_ram']['peak_rssanon_gib']:.2f} GiB private CPU RAM | "
        f"[`{load['file']}`](results/qlora/{load['file']}) |"])


def qlora_runs_table() -> str:
    """The two runs of benchmarks/qlora.py side by side: the earlier one still held the first MoE layer's bf16
    experts (2.4 GiB) through the capped phases."""
    lines = ["| run | phase | held at start (GiB) | peak alloc / resv GiB | tokens/s | record |",
             "|---|---|---:|---:|---:|---|"]
    for folder, run in (("qlora/held-experts", "earlier (experts still referenced)"), ("qlora", "README's")):
        for phase in ("bf16", "nf4-40GB", "nf4-24GB"):
            r = _qlora(phase, folder)
            t, start = r["train"], r["gpu_cap"]["allocated_at_start_gib"]
            memory = t["training_memory"]
            lines.append(f"| {run} | {phase} | {start if phase != 'bf16' else '- (the model)'} | "
                         f"{memory['peak_allocated_gib']:.2f} / {memory['peak_reserved_gib']:.2f}"
                         f" | {t['tokens_per_second']:,.0f} | [`{r['file']}`](results/{folder}/{r['file']}) |")
    return "\n".join(lines)


def notebooks_gpu_table() -> str:
    """Notebook 03 run on a GPU in bf16 and in 4-bit, then in 4-bit once its merge cell made the library calls itself,
    and in bf16 once its reload cell did too (run records under results/notebooks-gpu/)."""
    lines = ["| run | base | LoRA | trainable | tokens/s after 2 warm-up steps | first step | peak GiB (alloc / resv) "
             "| loss step 1 / last | record |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for name, base in (("bf16", "bf16"), ("nf4", "NF4 routed experts (`LOAD_IN_4BIT=true`)"),
                       ("merge-cell/nf4", "NF4 routed experts, a fresh machine"),
                       ("reload-cell/bf16", "bf16, a fresh machine")):
        r = load_record(RESULTS / "notebooks-gpu" / f"{name}.json")
        hw, losses = r["hardware"], r["loss_history"]
        lora = "routed experts too" if r["config"]["routed_experts"] else "no routed experts"
        lines.append(f"| {r['run_name']} | {base} | {lora} | {millions(r['trainable_parameters'])} | "
                     f"{r['steady_tokens_per_second']:,.0f} | {r['first_step_seconds']:.1f} s | "
                     f"{hw['peak_allocated_gib']:.1f} / {hw['peak_reserved_gib']:.1f} | {losses[0][1]:.3f} / "
                     f"{losses[-1][1]:.3f} | [`{name}.json`](benchmarks/results/notebooks-gpu/{name}.json) |")
    return "\n".join(lines)


INDEX = [  # (claim, where it is quoted, glob patterns under results/, what produced them)
    ("LoRA on the full architecture, standard vs fast vs Unsloth, and hours per MedMCQA epoch",
     "README: Measured results (first table); NOTES: Full depth; notebook 04 (`records.full_depth_comparison`)",
     ["fulldepth/*.json", "fulldepth/nvidia-smi.txt"],
     "`python benchmarks/make_random_model.py --out /dev/shm/real` (the random 52-layer model, seed 0), then "
     f"`{B} --variant standard fast --arch real --model /dev/shm/real --tokens-per-step 8192 --steps 15 --warmup 5 "
     "--checkpointing moe:1`, the same with `--variant unsloth standard --routed-experts`, and with `--variant fast "
     "--routed-experts --checkpointing all`; `batch-shapes.json`: the batch shapes of those steps, replayed on a CPU"),
    ("The warm-up rule at work: steps that met a new batch shape, left out", "NOTES: Setup (Warm-up)",
     ["warmup-rule/*.json"],
     f"`{B} --variant standard fast --arch slice8 --tokens-per-step 8192 --steps 4 --warmup 2` (the split "
     "benchmark's first GPU run)"),
    ("The first benchmark: the standard path at full depth, without Mamba kernels, Unsloth on the 8-layer slice",
     "README: Measured results (Benchmark table, `benchmark.png`)", ["baseline/*"],
     f"`{B} --variant standard --arch real --tokens-per-step 4096 8192`; `--variant standard-nokernels "
     "--tokens-per-step 1024 2048 --steps 8 --warmup 2`; `--variant standard unsloth --routed-experts --arch slice8 "
     "--tokens-per-step 4096 8192`; `bench.py --plot`"),
    ("The fast path, one change at a time, at 8,192 tokens/step",
     "README: The fast path; NOTES: Ablation, changes 1-19",
     ["ablation/*.json"],
     f"`{B} --variant fast --arch real --tokens-per-step 8192` with each row's `--fast-features` and "
     "`--checkpointing` (every record holds its `command`); the 19-* runs timed the garbage collector through "
     "`tools/gcstats.py`, the 18-without-* runs dropped the collator's bounds through `tools/nobounds.py` (both in "
     "`archive.tar.gz`)"),
    ("The fast path trains the same thing: losses, per-row losses, LoRA gradients, float32 reference",
     "NOTES: Correctness", ["checks/*.json"],
     "`python benchmarks/check_fast.py --arch slice8`, with `--compare-features ...` (the by-piece records) and "
     "`--float32-reference` (`slice8-float32-reference.json`); the *-no-autocast records predate the Trainer's "
     "autocast in the check"),
    ("Data-parallel scaling on 2 GPUs (DDP, FSDP)", "README: More than one GPU; configs/README.md",
     ["scaling/*.json", "scaling/short/*.json", "scaling/scaling.png", "scaling/topology.txt"],
     "`VARIANTS=\"standard fast\" STEPS=30 WARMUP=6 bash benchmarks/scaling.sh DIR ddp` (the fast run with 24 steps); "
     "`short/`: `bash benchmarks/scaling.sh DIR` with 6 steps after 2"),
    ("train.py under accelerate on 2 GPUs", "README: More than one GPU", ["scaling/train-2gpu/*/*.json"],
     "`accelerate launch --config_file configs/ddp.yaml --num_processes 2 train.py --preset smoke` (and `--fast`)"),
    ("4-bit (NF4) training under a 40 GiB and a 24 GiB cap, beside bf16; its quality and loading",
     "README: Which card, which mode; NOTES: 4-bit", ["qlora/*.json"],
     "`python benchmarks/qlora.py --budget-s 500` (random full-depth weights, seed 0; every phase's record holds "
     "its command)"),
    ("4-bit, an earlier run of the same command while 2.4 GiB of bf16 expert weights were still referenced",
     "NOTES: 4-bit", ["qlora/held-experts/*.json"],
     "`python benchmarks/qlora.py --budget-s 500`, before `del experts` in its `main()`"),
    ("Notebooks 01-03 as they stand, top to bottom on a GPU: notebook 03 in bf16 and in 4-bit",
     "README: Measured results (after the notebook runs)", ["notebooks-gpu/*"],
     "`make_random_model.py --layers 8 --out /dev/shm/slice8`; `run_notebook.py` on notebooks 01 and 02 (MODEL_ID "
     "that folder, DATA_SOURCE=data/sample), then on notebook 03 with BATCH_SIZE=32 GRAD_ACCUM=1 LEARNING_RATE=1e-4 "
     "MAX_STEPS=25 MERGE=true and ROUTED_EXPERTS=true (bf16) or LOAD_IN_4BIT=true (nf4); the first bf16 try stopped "
     "at a 170 s limit of the command while reloading (its first step compiled kernels for 75 s), and ran again on "
     "the same machine"),
    ("Notebook 03 in 4-bit with its merge written out in the cell (the bf16 base, PeftModel, merge_and_unload), and "
     "train.py in 4-bit: reloaded and merged adapters give the trained adapter's answers",
     "README: Measured results (after the notebook runs)", ["notebooks-gpu/merge-cell/*"],
     "on a fresh machine, `make_random_model.py --layers 8 --out /dev/shm/slice8`; `run_notebook.py` on notebook 01 "
     "(MODEL_ID that folder, DATA_SOURCE=data/sample), then on notebook 03 with BATCH_SIZE=32 GRAD_ACCUM=1 "
     "LEARNING_RATE=1e-4 MAX_STEPS=25 MERGE=true LOAD_IN_4BIT=true RUN_NAME=nf4; then `train.py --set "
     "model_id=/dev/shm/slice8 data_source=data/sample data_dir=/tmp/train-data load_in_4bit=true max_steps=5 "
     "per_device_train_batch_size=8 gradient_accumulation_steps=1 eval_limit=16 run_name=train-nf4 --skip-base-eval`"),
    ("Notebook 04 top to bottom on a GPU after notebooks 01 and 03: Unsloth trains the same adapter on the same "
     "tokens; counted steps that compiled kernels", "README: Measured results (after the notebook runs)",
     ["notebooks-gpu/notebook-04/*"],
     "on a fresh machine, `make_random_model.py --layers 8 --out /dev/shm/slice8`; `run_notebook.py` on notebook 01 "
     "(MODEL_ID that folder, DATA_SOURCE=data/sample), on notebook 03 with BATCH_SIZE=32 GRAD_ACCUM=1 "
     "LEARNING_RATE=1e-4 MAX_STEPS=25 ROUTED_EXPERTS=true, then on notebook 04 with its defaults"),
    ("Notebook 03 in bf16 with its reload cell written out (`from_pretrained` as in its loading cell) and the "
     "model-type check in its pre-flight: it runs top to bottom, reloads with the same answers and merges",
     "README: Measured results (after the notebook runs)", ["notebooks-gpu/reload-cell/*"],
     "on a fresh machine, `make_random_model.py --layers 8 --out /dev/shm/slice8`; `run_notebook.py` on notebook 01 "
     "(MODEL_ID that folder, DATA_SOURCE=data/sample), then on notebook 03 with BATCH_SIZE=32 GRAD_ACCUM=1 "
     "LEARNING_RATE=1e-4 MAX_STEPS=25 ROUTED_EXPERTS=true MERGE=true RUN_NAME=bf16"),
    ("Notebook 02 top to bottom in 4-bit and in bf16: its pre-flight's four checks pass, and its parameter table "
     "counts the same weights in both (NF4 stores two per byte)", "README: Measured results (after the notebook runs)",
     ["notebooks-gpu/notebook-02/*"], "`make_random_model.py --layers 8 --out /dev/shm/slice8`; `run_notebook.py` on "
     "notebook 02 (MODEL_ID that folder, DATA_SOURCE=data/sample) with LOAD_IN_4BIT=true, then without"),
    ("Notebook 02 in 4-bit and in bf16 and notebook 03 in 4-bit, each with its one LoRA-target check "
     "(`model.check_lora_targets(lora_config, precision)`); the pre-flight on the GPU, and its GPU check with 5 GiB "
     "left free (bf16 refused, 4-bit allowed, or refused when 4-bit is not); `train.py --fast` on the sample",
     "README: Measured results (after the notebook runs)", ["notebooks-gpu/lora-check/*"],
     "`make_random_model.py --layers 8 --out /dev/shm/slice8`; `preflight.log`: `model.fast_kernels_status()`, "
     "`model.preflight` in both modes, then `model._check_gpu` with all but 5 GiB of the card taken; `run_notebook.py` "
     "on notebook 02 (MODEL_ID that folder, DATA_SOURCE=data/sample) with LOAD_IN_4BIT=true and without, on notebook "
     "01, then on notebook 03 with BATCH_SIZE=32 GRAD_ACCUM=1 LEARNING_RATE=1e-4 MAX_STEPS=25 MERGE=true "
     "LOAD_IN_4BIT=true RUN_NAME=nf4; then `train.py --set model_id=/dev/shm/slice8 data_source=data/sample "
     "data_dir=/tmp/train-data max_steps=8 per_device_train_batch_size=16 gradient_accumulation_steps=1 "
     "eval_limit=16 logging_steps=1 run_name=train-fast --skip-base-eval --fast` (a first try, on a cold machine, "
     "stopped at a 250 s limit of the command)"),
    ("A finished run run again (max_steps in mid-epoch): `train.py --fast` and `train.py` in 4-bit each load the "
     "last checkpoint's adapter and train no step more; the record is kept", "README: Measured results (after the "
     "notebook runs)", ["notebooks-gpu/rerun/*"],
     "`make_random_model.py --layers 8 --out /dev/shm/slice8`; twice each, `train.py --set model_id=/dev/shm/slice8 "
     "data_source=data/sample data_dir=/tmp/train-data max_steps=4 save_steps=2 per_device_train_batch_size=16 "
     "gradient_accumulation_steps=1 eval_limit=16 logging_steps=1 run_name=fast-rerun --skip-base-eval --fast`, "
     "then the same with `load_in_4bit=true run_name=nf4-rerun` and without --fast (`summary.log`: the closing "
     "lines of all four)"),
    ("Notebook 03 top to bottom in 4-bit on the full 52-layer architecture with the GPU held to an A100 40GB's "
     "memory: loading, scoring, training, generation and reloading fit", "README: Which card, which mode",
     ["notebooks-gpu/colab-40gb/*"], "`make_random_model.py --out /dev/shm/real` (the random 52-layer model, seed 0); "
     "`run_notebook.py` on notebook 01 (MODEL_ID that folder, DATA_SOURCE=data/sample), then on notebook 03 with "
     "LOAD_IN_4BIT=true MAX_STEPS=10 LOGGING_STEPS=1 and its default batch (8 rows x 4), in a process whose GPU "
     "memory `torch.cuda.set_per_process_memory_fraction` held to 38.9 GiB (an A100 40GB's 39.4 less the CUDA "
     "context)"),
    ("train.py under `configs/fsdp.yaml` in one process: under FSDP the weights load into CPU RAM (none on the GPU) "
     "and the Trainer shards them onto the GPU; `--fast` is refused there", "configs/README.md (FSDP)",
     ["scaling/fsdp-1gpu/*"], "the 8-layer random slice; `accelerate launch --config_file configs/fsdp.yaml "
     "--num_processes 1 train.py --set model_id=/dev/shm/slice8 data_source=data/sample max_steps=5 "
     "per_device_train_batch_size=8 gradient_accumulation_steps=1 eval_limit=16 --skip-base-eval`, then the same "
     "with `--fast`; `load-where.log`: `train.load_model` with `recipe.distributed.device_map()`, without and with "
     "ACCELERATE_USE_FSDP=true"),
    ("bench.py's unsloth variant, written as notebook 04's cells (FastLanguageModel.from_pretrained and "
     "get_peft_model), runs end to end", "benchmarks/README.md (variants)", ["unsloth-variant/*"],
     f"`{B} --variant unsloth --arch slice8 --model /dev/shm/slice8 --tokens-per-step 4096 --steps 4 --warmup 2` "
     "on a machine that had just run it once (its first try stopped at a 230 s limit while compiling)"),
    ("Notebooks 03 and 04 on a GPU, with the fast path as a third run", "README: Measured results; notebook 04 "
     "without a GPU (`benchmarks.records.reference_runs`)", ["runs/*"],
     "the 8-layer random model (`make_random_model.py --layers 8`) and the shipped sample; "
     "`python benchmarks/run_notebook.py notebooks/03_training.ipynb` with BATCH_SIZE=32 GRAD_ACCUM=1 "
     "LEARNING_RATE=1e-4 MAX_STEPS=25 ROUTED_EXPERTS=true; `train.py --like <that run> --fast`; then notebook 04 "
     "the same way"),
]


def _versions(records: list[dict]) -> str:
    """torch, transformers, peft, trl and the Mamba kernels of these records (unsloth where it ran): each
    distinct version once."""
    pairs = {}
    for record in records:
        v = record.get("versions") or {}
        keys = ["torch", "transformers", "peft", "trl", "mamba_ssm", "causal_conv1d"]
        if record.get("variant") == "unsloth" or record.get("stack") == "unsloth":
            keys.append("unsloth")
        pairs |= {f"{k} {v[k]}": None for k in keys if v.get(k)}
    return ", ".join(pairs)


def _card(record: dict) -> str:
    gpu = record.get("gpu") if record.get("gpu") is not None else (record.get("hardware") or {}).get("gpu_name")
    if isinstance(gpu, dict):
        return f"{gpu['name'].replace('NVIDIA ', '')} (driver {gpu.get('driver_version')})"
    return (gpu or "?").replace("NVIDIA ", "")


def _date(record: dict) -> str:
    return (record.get("date") or record.get("finished") or "?")[:10]


def index_table() -> str:
    lines = ["| claim | quoted in | records | produced by | card | versions | date |", "|---|---|---|---|---|---|---|"]
    for claim, where, patterns, produced in INDEX:
        files = sorted({p for pattern in patterns for p in RESULTS.glob(pattern) if p.is_file()})
        if not files:
            raise FileNotFoundError(f"no records for {claim!r}: {patterns}")
        records = [json.loads(p.read_text()) for p in files if p.suffix == ".json"]
        records = [r for r in records if isinstance(r, dict) and ("versions" in r or "gpu" in r)]
        cards = " / ".join(dict.fromkeys(_card(r) for r in records))
        versions = _versions(records)
        dates = sorted({_date(r) for r in records})
        shown = [f"[`{p.relative_to(RESULTS)}`]({p.relative_to(RESULTS)})" for p in files]
        listed = ", ".join(shown) if len(shown) <= 8 else f"{', '.join(shown[:3])}, ... {len(shown)} files"
        lines.append(f"| {claim} | {where} | {listed} | {produced} | {cards} | {versions} | "
                     f"{dates[0] if len(dates) == 1 else f'{dates[0]} to {dates[-1]}'} |")
    return "\n".join(lines)


TABLES = {
    "headline": headline_table,
    "full-depth": lambda: full_depth_table("benchmarks/results"),
    "full-depth-notes": lambda: full_depth_table("results"),
    "full-depth-warmup": full_depth_warmup_table,
    "warmup-rule": warmup_rule_table,
    "fast-ablation-summary": lambda: ablation_table(summary=True),
    "fast-ablation": ablation_table,
    "baseline": baseline_table,
    "scaling": scaling_table,
    "notebook-runs": notebook_runs_table,
    "checks": checks_table,
    "float32": float32_table,
    "index": index_table,
    "cards": cards_table,
    "qlora-quality": qlora_quality_table,
    "qlora-runs": qlora_runs_table,
    "notebooks-gpu": notebooks_gpu_table,
}


def render(text: str) -> str:
    """`text` with every table region rewritten from the records (an unknown table name is an error)."""
    def table(match):
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r} (known: {', '.join(TABLES)})")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"
    return REGION.sub(table, text)


def regions(text: str) -> list[str]:
    return [m.group("name") for m in REGION.finditer(text)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table differs")
    p.add_argument("files", nargs="*", type=Path, default=list(FILES))
    args = p.parse_args(argv)
    stale = []
    for path in args.files:
        path = path.resolve()
        old = path.read_text()
        new = render(old)
        if new == old:
            print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {len(regions(old))} tables, "
                  "as the records give them")
            continue
        if args.check:
            stale.append(path)
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path),
                                                       f"{path} from the records"))
        else:
            path.write_text(new)
            print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: rewrote {len(regions(old))} "
                  "tables from the records")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
