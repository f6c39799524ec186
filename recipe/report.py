"""train.py's first and last steps around the lesson: the data it trains on, and the short report at the end.

`prepare_data` is notebook 01 in one call (the synthetic task of `--preset learn` is written first). `finish`
writes `outputs/runs/<run>/summary.json` and prints a few plain lines: what ran, the accuracies, what they mean
on this model, and where every file is.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers.config import DEFAULT_MODEL_ID, TrainConfig
from helpers.notebook import resolve_path

LABELS = {"base": "base", "adapter": "adapter", "reloaded": "reloaded adapter", "merged": "merged model"}


def eval_dir(cfg: TrainConfig) -> Path:
    """Where the scorings of this run go (`<output_root>/eval/<run>-<label>.json`)."""
    return Path(cfg.output_root) / "eval"


def synthetic_dir(cfg: TrainConfig) -> Path:
    """Where `data_source=synthetic` writes the code-word task's raw files: one folder per seed, so data prepared
    from another seed's task is never reused for this one."""
    return Path(cfg.output_root) / "data" / f"synthetic-medmcqa-seed{cfg.seed}"


def prepare_data(cfg: TrainConfig, tokenizer, reuse: bool = False):
    """The formatted splits of this run and their manifest: `(DatasetDict, manifest)`.

    `data_source="synthetic"` writes the code-word task first (recipe.synthetic); any other source goes through
    notebook 01's steps (helpers.data.prepare_medmcqa), which reuse data already prepared with the same options.
    `reuse=True` (a run started `--like` an earlier one) loads the data that run trained on, as it is.
    """
    from helpers import data

    source = cfg.data_source
    if reuse:
        dataset, manifest = data.load_formatted(cfg.data_dir)
    else:
        if source == "synthetic":
            from recipe import synthetic

            source = synthetic.write_synthetic_split_files(synthetic_dir(cfg), seed=cfg.seed)
        dataset, manifest = data.prepare_medmcqa(resolve_path(source), out_dir=cfg.data_dir, tokenizer=tokenizer,
                                                 max_length=cfg.max_length, with_explanation=cfg.with_explanation,
                                                 cop_base=cfg.cop_base)
    missing = [split for split in ("train", "validation") if split not in dataset]
    if missing:  # found before the model is loaded
        raise data.DataError(f"No {' and no '.join(missing)} split in {source}: train.py trains on train and scores "
                             f"on validation. Fix: add {missing[0]}.jsonl to that folder (the original release names "
                             "validation dev.json), or choose another data_source.")
    return dataset, manifest


# ---------------------------------------------------------------- the report

def is_tiny(cfg: TrainConfig) -> bool:
    """True for the tiny random stand-in (or another small local model): accuracy measures plumbing, not medicine."""
    from recipe.cli import runs_on_cpu

    return cfg.model_id != DEFAULT_MODEL_ID and runs_on_cpu(cfg.model_id)


def shown(path) -> str:
    """A path as short as it can be: relative to the working folder when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _duration(seconds: float) -> str:
    seconds = round(seconds or 0)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _percent(result: dict) -> str:
    return f"{result['accuracy']:.1%}"


def meaning(cfg: TrainConfig, evals: dict) -> str:
    """What the accuracies say about this model and data, in a sentence or two."""
    n = next((e["n"] for e in evals.values()), 0)
    if is_tiny(cfg) and cfg.data_source == "synthetic":
        return ("The tiny model is RANDOM; the synthetic task's answer follows a code word in the question, so "
                "going from chance (25%) to near 100% shows that training taught it the rule. Its loss stays "
                "high (the random output layer can barely move): read the accuracy, not the loss.")
    if is_tiny(cfg):
        return (f"The tiny model is RANDOM and trained for a few steps: this run proves the plumbing (data, "
                f"scoring, training, saving, reloading, merging); its accuracy on {n} questions is noise around "
                "chance (25%). --preset learn shows learning; the real model needs a CUDA GPU (preset full).")
    if "adapter" in evals:
        lo, hi = evals["adapter"]["ci95"]
        return (f"Chance is 25%. The adapter's 95% interval on {n} questions is {lo:.1%}-{hi:.1%}; "
                "differences inside it are noise. The prompts are lm-evaluation-harness's `medmcqa`, so the "
                "numbers compare with published MedMCQA results.")
    return ""


def how_to_score(cfg: TrainConfig) -> list[str]:
    """Python lines that score this run's saved adapter (after FSDP, which skips scoring)."""
    return ["from peft import PeftModel", "import train  # (puts notebooks/ on the path)",
            "from helpers import data, evaluation", f"base, tokenizer = train.load_model({cfg.model_id!r})",
            f"adapter = PeftModel.from_pretrained(base, {str(cfg.checkpoint_dir)!r})",
            f"evaluation.evaluate(adapter, tokenizer, data.load_formatted({cfg.data_dir!r})[0]['validation'], "
            f"{cfg.run_name + '-adapter'!r}, out_dir={str(eval_dir(cfg))!r})"]


def _files(cfg: TrainConfig, record_path: Path, evals: dict, merged: Path | None = None) -> dict:
    files = {"adapter": cfg.checkpoint_dir, **({"merged model": Path(merged)} if merged else {}),
             "run record": Path(record_path),
             "loss plot": Path(record_path).parent / "loss.png",
             **{f"scores ({label})": eval_dir(cfg) / f"{cfg.run_name}-{label}.json" for label in evals},
             "summary": cfg.run_dir / "summary.json"}
    return {name: path for name, path in files.items() if path.exists() or name == "summary"}


def finish(cfg: TrainConfig, record_path, manifest: dict, evals: dict, sharded: bool = False,
           record: dict | None = None, preset: str | None = None, merged: Path | None = None) -> dict:
    """Write `<run_dir>/summary.json` and print a short report; returns the summary.

    `record_path` is the run record (metrics.json) the report quotes; `record` is the record this process has
    just built: when it trained no step (the run was already finished), its kept record speaks instead, and
    the report says so. `sharded=True` (FSDP): no scores, and how to score the adapter. `preset`: the preset the
    run started from (None: an earlier run's config, --like). `merged`: where --save-merged wrote the merged model.
    """
    from helpers import evaluation

    kept = json.loads(Path(record_path).read_text())
    already_finished = record is not None and not record.get("steps_this_run")
    agreement = {label: evaluation.compare_answers(evals["adapter"], evals[label])
                 for label in ("reloaded", "merged") if label in evals and "adapter" in evals}
    summary = {
        "run": cfg.run_name, "preset": preset, "model": cfg.model_id, "stack": kept.get("stack"),
        "already_finished": already_finished, "steps": kept["steps"], "rows_trained": kept.get("samples"),
        "tokens": kept["tokens"], "wall_seconds": kept["wall_seconds"],
        "tokens_per_second": kept.get("steady_tokens_per_second"), "final_loss": kept.get("final_loss"),
        "processes": kept.get("effective_batch", {}).get("processes", 1), "data_rows": manifest["rows"],
        "accuracy": {label: {k: e[k] for k in ("accuracy", "n", "correct", "ci95")} for label, e in evals.items()},
        **{f"{label}_accuracy": e["accuracy"] for label, e in evals.items()},
        **{f"{label}_matches": a["same"] for label, a in agreement.items()},
        "agreement_with_the_trained_adapter": agreement,
        "record": str(Path(record_path).resolve()),
    }
    if sharded:
        summary["evaluation"] = "skipped under FSDP: no GPU holds the whole model"
        summary["how_to_score"] = how_to_score(cfg)
    loss_plot = Path(record_path).parent / "loss.png"
    if kept.get("loss_history") and (not already_finished or not loss_plot.exists()):
        from helpers.plots import plot_loss_curves

        steps, losses = zip(*kept["loss_history"])
        plot_loss_curves({cfg.run_name: (steps, losses)}, name="loss", out_dir=loss_plot.parent)
    files = _files(cfg, record_path, evals, merged)
    summary["files"] = {name: str(Path(path).resolve()) for name, path in files.items()}
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(report_lines(cfg, summary, kept, evals, agreement, files)), flush=True)
    return summary


def report_lines(cfg, summary, kept, evals, agreement, files) -> list[str]:
    """The printed report: a few plain lines, no JSON."""
    from helpers import evaluation

    speed, losses = summary["tokens_per_second"], [loss for _, loss in kept.get("loss_history") or []]
    trained = (f"{summary['steps']} steps, {summary['rows_trained'] or 0:,} rows, {summary['tokens']:,} tokens in "
               f"{_duration(summary['wall_seconds'])}" + (f" ({speed:,.0f} tokens/s)" if speed else "")
               + (f", loss {losses[0]:.3g} -> {losses[-1]:.3g}" if losses else ""))
    engine = " on the fast engine" if summary["stack"] == "fast" else ""
    lines = ["", "=" * 100]
    if summary["already_finished"]:
        lines += [f"{cfg.run_name} was already finished at step {summary['steps']}: nothing was trained now, and its "
                  f"record is kept. That run{engine} ({kept.get('finished', 'earlier')}): {trained}.",
                  "  To train it again: the same command with --fresh (or --set run_name=NEW_NAME)."]
    else:
        resumed = f", resumed from {Path(kept['resumed_from']).name}" if kept.get("resumed_from") else ""
        lines.append(f"{cfg.run_name} done{engine}{resumed}: {trained}.")
    preset = f"preset {summary['preset']}" if summary["preset"] else "the config of an earlier run (--like)"
    rows = ", ".join(f"{n:,} {split}" for split, n in summary["data_rows"].items())
    source = (f"the synthetic code-word task ({shown(synthetic_dir(cfg))})" if cfg.data_source == "synthetic"
              else shown_id(cfg.data_source))
    lines.append(f"  {preset}; model {shown_id(cfg.model_id)}; data {source} ({rows} rows)")
    if evals:
        n = next(iter(evals.values()))["n"]
        chain = " -> ".join(f"{label} {_percent(evals[label])}" for label in ("base", "adapter") if label in evals)
        lines.append(f"Accuracy on {n} validation questions: {chain}")
        for label, comparison in agreement.items():
            lines.append(f"  {LABELS[label]} {_percent(evals[label])}, same answers as the trained adapter: "
                         f"{comparison['text']}")
        lines.append(meaning(cfg, evals))
    if summary.get("evaluation"):
        lines.append(f"Scoring {summary['evaluation']}. To score the adapter on one GPU that holds the model "
                     "(from notebooks/, as notebook 03 does):")
        lines += [f"  {line}" for line in summary["how_to_score"]]
    lines.append("Files:")
    scores = [name for name in files if name.startswith("scores (")]
    shown_files = {name: shown(path) for name, path in files.items() if name not in scores}
    if scores:  # one line: <eval dir>/<run>-{base,adapter,...}.json
        labels = ",".join(name[len("scores ("):-1] for name in scores)
        shown_files["scores"] = shown(eval_dir(cfg)) + f"/{cfg.run_name}-{{{labels}}}.json"
        shown_files["summary"] = shown_files.pop("summary")
    width = max(map(len, shown_files))
    lines += [f"  {name:<{width}}  {path}" for name, path in shown_files.items()]
    lines.append("=" * 100)
    return lines


def shown_id(model_id: str) -> str:
    """A model id or data source as typed: a Hub id unchanged, a local folder as short as it can be."""
    return shown(resolve_path(model_id)) if Path(resolve_path(model_id)).exists() else model_id
