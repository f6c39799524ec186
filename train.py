"""Headless fine-tuning: notebooks 01-03 in one script, for long jobs.

    python train.py --preset smoke     # first contact: the whole pipeline offline on a CPU (~25 s)
    python train.py --help             # every flag, preset and setting (answers at once)

Steps: prepare the data -> score the base model -> add LoRA (`LoraConfig`, `get_peft_model`) -> train with
TRL (`SFTConfig`, `SFTTrainer`), resuming from the last checkpoint -> score the adapter -> reload it onto a
fresh base and score again -> merge it and score that too. `load_model`, `lora_config` and `sft_config` below
are notebook 03's cells as functions (a test checks that the configs are the same objects), so what a learner
reads is what runs here.
Around them, recipe/cli.py checks the command line before anything heavy is imported (a mistake is one line and
exit code 2) and recipe/report.py prepares the data and prints the closing report (outputs/runs/<run>/summary.json).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
for _path in (ROOT, ROOT / "notebooks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from helpers.config import TrainConfig  # noqa: E402  (imports nothing heavy: --help answers at once)


def load_model(model_id, revision=None, device_map=None):
    """(model, tokenizer) as notebook 03's loading cell makes them in bf16: bfloat16 on this GPU, float32 on a CPU.
    `device_map` places the model elsewhere (the CPU under FSDP), never "auto": no silent offloading to the CPU."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from helpers.model import load_tokenizer

    gpu, start = torch.cuda.is_available(), time.perf_counter()
    tokenizer = load_tokenizer(model_id, revision)  # (builds the offline tiny model on first use)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_id), revision=revision, dtype=torch.bfloat16 if gpu else torch.float32,
        device_map=device_map or ({"": torch.cuda.current_device()} if gpu else None))
    print(f"Loaded {model_id} ({model.dtype}, {model.device}) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def lora_config(cfg: TrainConfig, precision: str = "bf16"):
    """PEFT's LoraConfig, as notebook 03 builds it (`precision`: "bf16", or "nf4" for the 4-bit base)."""
    from peft import LoraConfig

    from helpers.model import LORA_TARGET_MODULES, ROUTED_EXPERT_PARAMETERS
    from helpers.quant import LORA_TARGETS_4BIT

    return LoraConfig(
        r=cfg.lora_r,                                  # rank of each low-rank pair
        lora_alpha=cfg.lora_alpha,                     # scale: the update is (alpha / r) * B @ A
        lora_dropout=cfg.lora_dropout,
        # attention q/k/v/o, Mamba in_proj, shared expert up/down (4-bit: the same layers as a pattern that skips the
        # containers bitsandbytes puts around the NF4 experts)
        target_modules=LORA_TARGET_MODULES if precision == "bf16" else LORA_TARGETS_4BIT,
        target_parameters=ROUTED_EXPERT_PARAMETERS if cfg.routed_experts else None,  # the fused routed experts
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(cfg: TrainConfig, **overrides):
    """TRL's SFTConfig, as notebook 03 builds it; `overrides` adds what several processes need."""
    import torch
    from trl import SFTConfig

    args = dict(
        output_dir=str(cfg.checkpoint_dir),            # checkpoints and the final adapter
        run_name=cfg.run_name,
        completion_only_loss=True,                     # loss on the answer + explanation, not the prompt
        max_length=cfg.max_length,                     # longer rows are truncated (notebook 01 keeps the answer)
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,  # rows per step = batch x accumulation
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,       # cosine decay ...
        warmup_steps=cfg.warmup_ratio,                 # ... after a short warm-up (a float < 1: share of all steps)
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,                       # > 0 overrides the epoch count
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        seed=cfg.seed,                                 # same seed: same data order and LoRA start
        data_seed=cfg.seed,
        bf16=torch.cuda.is_available(),                # bf16 on a GPU; float32 on a CPU (tiny model)
        gradient_checkpointing=cfg.gradient_checkpointing,  # recompute activations in backward: less memory
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,                     # a checkpoint every N steps ...
        save_total_limit=cfg.save_total_limit,         # ... keeping the newest few
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",   # count real tokens, not padding
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    return SFTConfig(**(args | overrides))


def main(argv=None) -> dict | None:
    """The whole pipeline (see the module docstring). Under `accelerate launch` every process trains; only
    the main one evaluates, reloads, merges and writes the summary (the others return None)."""
    from recipe import cli

    args, cfg = cli.parse(argv)  # validated before anything heavy is imported; mistakes exit with one line
    cli.announce(args, cfg)      # a few lines of what will run
    with cli.user_errors(debug=args.debug), cli.quiet_cpu_fallbacks():
        return pipeline(args, cfg)


def pipeline(args, cfg: TrainConfig) -> dict | None:
    """main() after the command line is checked: `args` are its flags, `cfg` the run's settings."""
    fast = None
    if args.fast:  # the opt-in fast engine (fastpath/README.md): refuses early where it cannot run
        import fastpath

        fast = fastpath.Settings(args.fast_features, args.checkpointing or "all")  # checked at once
        fastpath.check_versions(allow_other_versions=args.any_version)
        fastpath.prepare_process(fast)
        cfg = fastpath.fold_accumulation(cfg)
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    from helpers import evaluation, model, quant, training
    from recipe import cli, distributed, report

    distributed.init()  # several processes: join the group, claim GPU LOCAL_RANK (no-op for one process)
    main_process = distributed.is_main_process()
    precision, why = quant.choose_precision(cfg.load_in_4bit)  # decided first: it settles what LoRA can reach
    lora = lora_config(cfg, precision)
    model.check_lora_targets(lora, precision)  # refuses targets whose adapter would never run, or 4-bit can't carry
    if fast and precision == "nf4":
        raise fastpath.Refused("--fast needs the bf16 base (its expert pieces read bf16 weights), and this run "
                               "would load 4-bit: train without --fast, or on a card with room for bf16")
    with distributed.main_process_first():  # one process writes the shared files, the others reuse them
        if args.fresh and main_process:
            shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)  # train from step 0
        model.require(model.preflight(cfg.model_id, shards=distributed.shards(), load_in_4bit=cfg.load_in_4bit))
        tokenizer = model.load_tokenizer(cfg.model_id, cfg.revision)
        dataset, manifest = report.prepare_data(cfg, tokenizer, reuse=bool(args.like))
    val, evals, sharded = dataset["validation"], {}, distributed.fsdp_enabled()
    preset = None if args.like else args.preset or cli.DEFAULT_PRESET  # for the closing report

    def score(llm, tokenizer, label):  # letter-score the validation split; outputs/eval/<run>-<label>.json
        return evaluation.evaluate(llm, tokenizer, val, f"{cfg.run_name}-{label}", limit=cfg.eval_limit,
                                   batch_size=cfg.eval_batch_size, out_dir=report.eval_dir(cfg))

    print(f"Precision: {precision} ({why})")
    load = quant.load_model_4bit if precision == "nf4" else load_model
    base, tokenizer = load(cfg.model_id, revision=cfg.revision, device_map=distributed.device_map())
    if not args.skip_base_eval and not sharded and main_process:
        evals["base"] = score(base, tokenizer, "base")
    distributed.wait_for_everyone()  # the others wait while the main process scores the base model

    set_seed(cfg.seed)  # the LoRA A matrices start random: the same seed gives the same start
    peft_model = get_peft_model(base, lora)
    peft_model.print_trainable_parameters()
    timer = training.StepTimer()
    trainer = SFTTrainer(
        model=peft_model, args=sft_config(cfg, **distributed.sft_overrides(cfg)),
        train_dataset=training.training_rows(dataset, cfg.train_limit), processing_class=tokenizer,
        data_collator=fastpath.collator(peft_model, tokenizer, fast) if fast else None,
        callbacks=[timer])
    resume = get_last_checkpoint(str(cfg.checkpoint_dir)) if cfg.checkpoint_dir.is_dir() else None
    if main_process:
        training.print_plan(training.batch_plan(trainer), resume)
    patches = fastpath.applied(trainer, fast) if fast else contextlib.nullcontext({})
    with patches as applied, training.cpu_loss_fallback():  # every patch is undone on any exit
        if not training.already_trained(trainer, resume):  # a finished run is loaded, not trained a step more
            trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(cfg.checkpoint_dir))  # the adapter + tokenizer (every process calls it; one writes)
    record = training.run_record(trainer, cfg, timer, stack="fast" if fast else "standard", resumed_from=resume,
                                 fast_pieces=applied, per_process=distributed.per_process_memory())
    distributed.finish()  # no collective work is left: the other processes may exit now
    if not main_process:
        return None
    record_path = training.save_run_record(record, cfg.run_dir)
    if sharded:
        return report.finish(cfg, record_path, manifest, evals, sharded=True, record=record, preset=preset)
    evals["adapter"] = score(peft_model, tokenizer, "adapter")
    del trainer, peft_model, base
    free_memory()

    # The saved adapter, reloaded onto a fresh base of the precision it trained in, must give the same answers ...
    fresh, tokenizer = load(cfg.model_id, revision=cfg.revision)
    reloaded = PeftModel.from_pretrained(fresh, str(cfg.checkpoint_dir))
    evals["reloaded"] = score(reloaded, tokenizer, "reloaded")
    # ... and so must the merged model (LoRA folded into the base weights: no adapter at inference). A 4-bit run
    # merges into the bf16 weights, as QLoRA adapters are deployed: it differs by the 4-bit rounding of the base.
    if precision == "nf4":  # the bf16 base as saved (dtype="auto"), on the GPU if it has room, else in CPU RAM
        del reloaded, fresh
        free_memory()
        room = torch.cuda.is_available() and quant.gpu_gib() > model.WEIGHTS_GIB["bf16"] + 2
        bf16_base = AutoModelForCausalLM.from_pretrained(cfg.model_id, revision=cfg.revision, dtype="auto",
                                                         device_map={"": 0} if room else "cpu")
        reloaded = PeftModel.from_pretrained(bf16_base, str(cfg.checkpoint_dir))
    merged = reloaded.merge_and_unload(safe_merge=True)
    evals["merged"] = score(merged, tokenizer, "merged")
    saved = model.save_merged(merged, tokenizer, Path(cfg.output_root) / "merged" / cfg.run_name) \
        if args.save_merged else None
    return report.finish(cfg, record_path, manifest, evals, record=record, preset=preset, merged=saved)


def free_memory() -> None:
    """Give the memory of deleted models back (the real model is 59 GiB: never hold two)."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
