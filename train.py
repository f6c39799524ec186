"""Headless fine-tuning: notebooks 01-03 in one script, for long jobs.

    uv run python train.py --preset smoke        # offline: tiny model + shipped sample, CPU, ~2 minutes
    uv run python train.py --preset learn        # offline: the tiny model learns a synthetic task
    uv run python train.py                       # the real model on full MedMCQA (one 80 GB GPU)
    uv run python train.py --fast                # the same, packed without padding (stage 5 fast path)
    uv run python train.py --set max_steps=500 learning_rate=1e-4
    uv run python train.py --fast --like outputs/runs/nemotron-medmcqa-lora   # notebook 03's run, fast path
    accelerate launch --config_file configs/ddp.yaml --num_processes 2 train.py   # 2 GPUs (configs/README.md)

Steps: prepare data -> score the base model -> train LoRA (resuming from the last
checkpoint) -> score the adapter -> reload it onto a fresh base and score again ->
merge it and score that too, comparing each copy's answers with the trained adapter's. Every step
is a `helpers` function that the notebooks call too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "notebooks"))

from transformers import set_seed  # noqa: E402

from helpers import data, distributed, evaluation, fast, model, training  # noqa: E402
from helpers.notebook import resolve_path  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(training.PRESETS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override TrainConfig fields, e.g. --set max_steps=100 routed_experts=true")
    p.add_argument("--fresh", action="store_true", help="delete this run's checkpoints and start over")
    p.add_argument("--skip-base-eval", action="store_true", help="do not score the model before training")
    p.add_argument("--save-merged", action="store_true", help="also write the merged model (needs disk space)")
    p.add_argument("--like", metavar="RUN",
                   help="start from the config of an earlier run (its run folder or metrics.json, e.g. notebook 03's "
                        "outputs/runs/nemotron-medmcqa-lora) and its prepared data, instead of --preset; the run is "
                        "named <run>-fast with --fast (so notebook 04 can compare the two), else <run>-again")
    p.add_argument("--fast", action="store_true",
                   help="stage 5 fast path: pack each step's rows into one micro-batch without padding (needs a "
                        "CUDA GPU and the Mamba kernels; see helpers/fast.py and benchmarks/NOTES.md)")
    return p.parse_args(argv)


def config_from_args(args) -> training.TrainConfig:
    """Preset + `--set key=value` overrides (values parsed as JSON when they can be: 1e-4, true, null)."""
    changes = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    if getattr(args, "like", None):
        record = training.load_run_record(resolve_path(args.like))
        suffix = "-fast" if getattr(args, "fast", False) else "-again"
        cfg = training.config_of_run(record, **{"run_name": record["config"]["run_name"] + suffix, **changes})
    else:
        cfg = training.preset(args.preset, **changes)
    if getattr(args, "fast", False):  # same rows per optimizer step, packed into one micro-batch
        cfg = fast.fold_accumulation(cfg.replace(fast=True))
    return cfg


def prepare_data(cfg, tokenizer, reuse: bool = False):
    """Stage 1 for this run: the formatted splits (synthetic data is written first when asked for).

    `reuse=True` (a run started --like an earlier one) loads the data that run trained on, as it is.
    """
    if reuse:
        return data.load_formatted(cfg.data_dir)
    source = cfg.data_source
    if source == "synthetic":
        source = data.write_synthetic_split_files(Path(cfg.output_root) / "synthetic-medmcqa", seed=cfg.seed)
    return data.prepare_medmcqa(resolve_path(source), out_dir=cfg.data_dir, tokenizer=tokenizer,
                                max_length=cfg.max_length, with_explanation=cfg.with_explanation, seed=cfg.seed)


def preflight(cfg):
    """Check the GPU, disk and kernels; under FSDP each GPU needs only its share of the weights."""
    checks = model.preflight(cfg.model_id, shards=distributed.world_size() if distributed.fsdp_enabled() else 1)
    if cfg.model_id != training.TINY_MODEL:
        model.require(checks)


def write_summary(cfg, record, manifest, **results) -> dict:
    """The run's summary.json (printed too): where its record is, its data, speed, and `results`."""
    summary = {"run": cfg.run_name, "record": str(cfg.run_dir / "metrics.json"), "data_rows": manifest["rows"],
               **results, "tokens_per_second": record["steady_tokens_per_second"],
               "wall_seconds": record["wall_seconds"], "processes": record["effective_batch"]["processes"]}
    (cfg.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("Summary:", json.dumps(summary, indent=1))
    return summary


def finish_sharded(cfg, record, manifest) -> dict:
    """After FSDP training: the summary, without scores. No GPU holds the whole model, so scoring, reloading
    and merging the saved adapter are left to a machine whose GPU does (notebook 03 from its scoring cells)."""
    return write_summary(cfg, record, manifest, adapter=str(cfg.checkpoint_dir),
                         evaluation="skipped under FSDP (the model is sharded over the GPUs): score the saved adapter "
                                    "on a GPU that holds the whole model (model.load_adapter + evaluation.evaluate)")


def main(argv=None) -> dict | None:
    """The whole pipeline. Under `accelerate launch` every process trains; only the main one evaluates,
    reloads, merges and writes the summary (the others return None once training is done)."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    if cfg.fast:
        fast.prepare_process(cfg.fast_features)  # refuse without the Mamba kernels; allocator settings
    distributed.init()  # several processes: join the group, claim GPU LOCAL_RANK (no-op for one process)
    main_process = distributed.is_main_process()
    if main_process:
        print("Config:", json.dumps(dataclasses.asdict(cfg), indent=1))
    with distributed.main_process_first():  # one process writes the shared files, the others then reuse them
        if args.fresh and main_process:
            shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
        preflight(cfg)  # builds the offline tiny model the first time it is asked for
        tokenizer = model.load_tokenizer(cfg.model_id, cfg.revision)
        dataset, manifest = prepare_data(cfg, tokenizer, reuse=bool(args.like))
    val = dataset["validation"]
    evals = {}

    base, tokenizer = model.load_model(cfg.model_id, revision=cfg.revision)
    sharded = distributed.fsdp_enabled()  # FSDP: the weights sit on the CPU until the Trainer shards them
    if not args.skip_base_eval and not sharded and main_process:
        evals["base"] = evaluation.evaluate(base, tokenizer, val, f"{cfg.run_name}-base",
                                            limit=cfg.eval_limit, batch_size=cfg.eval_batch_size)
    distributed.wait_for_everyone()  # the others wait while the main process scores the base model
    set_seed(cfg.seed)  # the LoRA A matrices start random: the same seed gives the same start
    peft_model = model.add_lora(base, model.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                        routed_experts=cfg.routed_experts))[0]
    trainer = training.make_trainer(peft_model, tokenizer, training.training_split(dataset, cfg.train_limit), cfg)
    record = training.train(trainer, cfg)
    distributed.finish()  # no collective work is left: the other processes may exit now
    if not main_process:
        return None
    training.print_run_summary(record)
    if sharded:
        return finish_sharded(cfg, record, manifest)
    evals["adapter"] = evaluation.evaluate(peft_model, tokenizer, val, f"{cfg.run_name}-adapter",
                                           limit=cfg.eval_limit, batch_size=cfg.eval_batch_size)
    del trainer, peft_model, base
    model.free_memory()

    # The saved adapter, reloaded onto a fresh base, must give the same answers.
    fresh, tokenizer = model.load_model(cfg.model_id, revision=cfg.revision)
    reloaded = model.load_adapter(fresh, cfg.checkpoint_dir)
    evals["reloaded"] = evaluation.evaluate(reloaded, tokenizer, val, f"{cfg.run_name}-reloaded",
                                            limit=cfg.eval_limit, batch_size=cfg.eval_batch_size)
    agreement = {"reloaded": evaluation.compare_answers(evals["adapter"], evals["reloaded"])}
    print("Reloaded adapter gives the same answers:", evaluation.describe_comparison(agreement["reloaded"]))

    # Merging folds LoRA into the base weights: same model, no adapter overhead at inference.
    merged = model.merge_adapter(reloaded)
    evals["merged"] = evaluation.evaluate(merged, tokenizer, val, f"{cfg.run_name}-merged",
                                          limit=cfg.eval_limit, batch_size=cfg.eval_batch_size)
    agreement["merged"] = evaluation.compare_answers(evals["adapter"], evals["merged"])
    print("Merged model gives the same answers:", evaluation.describe_comparison(agreement["merged"]))
    if args.save_merged:
        model.save_merged(merged, tokenizer, Path(cfg.output_root) / "merged" / cfg.run_name)
    return write_summary(cfg, record, manifest, reloaded_matches=agreement["reloaded"]["same"],
                         merged_matches=agreement["merged"]["same"],
                         agreement_with_the_trained_adapter=agreement,  # sizes of the score differences, flips
                         **{f"{k}_accuracy": v["accuracy"] for k, v in evals.items()})


if __name__ == "__main__":
    main()
