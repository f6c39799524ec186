"""Timing one budget of training steps: the trainer train.py builds, the warm-up rule, memory, MFU, profiling.

`run_budget` trains `warmup + steps` optimizer steps with TRL's `SFTTrainer`, configured by
`train.sft_config` exactly as train.py configures it, and times every step (`helpers.training.StepTimer`).

Warm-up: besides the first `warmup` steps, every step that meets a batch shape for the first time is left out
of the figures. Each new shape costs a one-off compilation (Triton autotuning, cuDNN plans, torch.compile), up
to seconds: with padded batches of random rows the width changes from step to step, and two such steps once made
2-GPU data parallelism look like 1.56x instead of 2.01x (benchmarks/NOTES.md). The record lists every step left
out and why (`warmup_steps_excluded`), and gives the median step beside the mean.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch

from benchmarks import REPO  # noqa: F401  (puts helpers, recipe and train on sys.path)
from benchmarks.records import WARMUP_RULE, warmup_exclusions
from benchmarks.workload import random_rows

GIB = 2**30
# What the benchmark changes in train.py's SFTConfig: bookkeeping only (no checkpoints, no tensorboard,
# no progress bar, a loss every step); the optimisation and the data are train.py's.
SFT_OVERRIDES = {"save_strategy": "no", "report_to": [], "disable_tqdm": True}
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
# First match wins, so the specific names come before "H100".
PEAK_BF16 = (
    ("H100 PCIe", 756e12, "H100 PCIe datasheet, dense bf16"),
    ("H100 NVL", 835e12, "H100 NVL datasheet, dense bf16"),
    ("H100", 989.4e12, "H100 SXM5 80GB HBM3 datasheet, dense bf16"),
    ("H200", 989.4e12, "H200 datasheet, dense bf16"),
    ("A100", 312e12, "A100 datasheet, dense bf16"),
)

def gpu_info() -> dict:
    """GPU name, memory, driver (nvidia-smi when available)."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "name": "cpu", "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    info = {"device": "cuda", "name": props.name, "total_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "cuda_runtime": torch.version.cuda}
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=15, check=True).stdout.strip()
        info["driver_version"] = line.split(",")[-1].strip()
    except Exception:
        try:
            version = torch._C._cuda_getDriverVersion()  # CUDA driver API version, e.g. 13000
            info["driver_version"] = f"CUDA driver API {version // 1000}.{version % 1000 // 10} (no nvidia-smi)"
        except Exception:
            info["driver_version"] = None
    return info


def peak_flops(name: str, override_tflops=None) -> dict:
    """The card's dense bf16 peak for MFU (None for an unknown card)."""
    if override_tflops:
        return {"flops": override_tflops * 1e12, "source": "--peak-tflops"}
    for key, flops, source in PEAK_BF16:
        if key.lower() in (name or "").lower():
            return {"flops": flops, "source": source}
    return {"flops": None, "source": f"unknown card {name!r}: no MFU (pass --peak-tflops)"}


def flops_per_token(counts: dict, completion_share: float) -> dict:
    """6N per trained token. A LoRA step = forward 2N + backward to the activations 2N (frozen weights get no
    weight gradients) + the checkpointing recomputation 2N. N = matmul parameters active per token: not the
    embedding table (a lookup); the LM head only on completion positions, the only ones TRL's fused head
    projects."""
    matmul = counts["active_per_token"] - counts["embeddings"]
    skipped_head = counts["lm_head"] * (1 - completion_share)
    return {"per_token": round(6 * (matmul - skipped_head)), "per_token_6n_active": 6 * counts["active_per_token"],
            "matmul_params_per_token": matmul}


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


_MISSING = object()


def saved_forwards(model) -> list:
    """The instance-level `forward` / `_original_forward` of the model and its base model, to put back later
    (TRL's fused LM head and accelerate's autocast wrap `forward` on the instance)."""
    import fastpath

    base = fastpath.base_of(model)
    return [(obj, name, obj.__dict__.get(name, _MISSING)) for obj in {id(model): model, id(base): base}.values()
            for name in ("forward", "_original_forward")]


def restore_forwards(saved) -> None:
    for obj, name, value in saved:
        if value is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value


class ShapeLog:
    """The batch shape(s) each optimizer step trained on: `by_step[step] = [input_ids shape of each micro-batch]`.

    It wraps the trainer's `training_step` (called once per micro-batch, before the step is counted), so the
    shapes belong to the step that really used them, whatever the data loader prefetches.
    """

    def __init__(self, trainer):
        self.by_step: dict[int, list] = {}
        original = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
            shape = list(ids.shape) if ids is not None else None
            self.by_step.setdefault(trainer.state.global_step + 1, []).append(shape)
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = training_step


def timed_figures(step_times: list[dict], excluded: list[dict]) -> dict:
    """Tokens/s and s/step over the steps not excluded, through `helpers.training.steady` (the one definition of
    steady speed): the mean (all tokens / all seconds), the median step, and tokens/s of the median step."""
    from helpers.training import steady

    left_out = {e["step"] for e in excluded}
    kept = [s for s in step_times if s["step"] not in left_out]
    note = None
    if not kept:  # every step met a new shape: report them all rather than nothing, and say so
        kept, note = step_times, "no step repeated a batch shape: every step counted, warm-up included"
    speed = steady(kept, skip=0)
    return {"steady_tokens_per_second": speed["tokens_per_second"],
            "tokens_per_second_median_step": round(statistics.median(s["tokens"] / s["seconds"] for s in kept), 1),
            "seconds_per_step_median": speed["median_seconds_per_step"],
            "seconds_per_step_mean": speed["mean_seconds_per_step"],
            "tokens_per_step_mean": round(sum(s["tokens"] for s in kept) / len(kept), 1),
            "steps_counted": len(kept), "counted_steps": [s["step"] for s in kept],
            "warmup_steps_excluded": excluded, "warmup_rule": WARMUP_RULE,
            **({"warmup_note": note} if note else {})}


def MemoryPhases():
    """A TrainerCallback that splits peak GPU memory into set-up (wrapping, FSDP sharding) and training.

    `figures()`: peak_allocated/reserved_gib over the whole budget, allocated_at_train_begin_gib (what stays
    once the model is ready: the weights, or under FSDP this GPU's shard) and the training peaks.
    """
    from transformers import TrainerCallback

    def gib(n):
        return round(n / GIB, 2)

    class _MemoryPhases(TrainerCallback):
        setup: dict = {}

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                self.setup = {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
                              "reserved": torch.cuda.max_memory_reserved()}
                torch.cuda.reset_peak_memory_stats()

        def figures(self) -> dict:
            if not torch.cuda.is_available():
                return {}
            train_peak, train_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            return {"peak_allocated_gib": gib(max(train_peak, self.setup.get("peak", 0))),
                    "peak_reserved_gib": gib(max(train_reserved, self.setup.get("reserved", 0))),
                    "allocated_at_train_begin_gib": gib(self.setup["allocated"]) if self.setup else None,
                    "train_peak_allocated_gib": gib(train_peak) if self.setup else None,
                    "train_peak_reserved_gib": gib(train_reserved) if self.setup else None}

    return _MemoryPhases()


def StepProfiler(out: Path, warmup: int):
    """A TrainerCallback that profiles the 2 optimizer steps after `warmup` and writes the top CUDA kernels to
    `out` (those steps, and the one after, which pays for writing the table, are left out of the figures)."""
    from transformers import TrainerCallback

    class _StepProfiler(TrainerCallback):
        prof = None
        steps = set(range(warmup + 1, warmup + 4))  # 1-based steps the profiler slows down

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == warmup and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, a, state, control, **kw):
            if self.prof is not None and state.global_step == warmup + 2:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45,
                                                       max_name_column_width=90)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(table)
                print(f"  profile of 2 steps -> {out}", flush=True)
                self.prof = None

    return _StepProfiler()


def json_report(applied) -> dict:
    """fastpath.applied's report ({piece: modules changed}) as JSON: a count where it names modules."""
    return {piece: (len(changed) if isinstance(changed, (list, tuple, set, frozenset, dict)) else changed)
            for piece, changed in dict(applied or {}).items()}


def sft_trainer(model, tokenizer, train_dataset, cfg, fast=None, callbacks=()):
    """The trainer train.py builds: `SFTTrainer(args=train.sft_config(cfg, ...))`, with fastpath's collator for the
    fast path (`fast`: a `fastpath.Settings`, or None). The SFTConfig differs from train.py's only in
    bookkeeping (SFT_OVERRIDES) and, under accelerate launch, in `recipe.distributed.sft_overrides`, as train.py's.
    The fast path's model pieces are switched on separately, by `fastpath.applied(trainer, fast)`."""
    from trl import SFTTrainer

    import train
    from recipe import distributed

    collator = None
    if fast is not None:
        import fastpath

        collator = fastpath.collator(model, tokenizer, fast)
    args = train.sft_config(cfg, **SFT_OVERRIDES, **distributed.sft_overrides(cfg))
    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                      data_collator=collator, callbacks=list(callbacks))


def run_budget(model, tokenizer, dist: dict, budget: int, *, cfg, steps: int, warmup: int, workdir: Path,
               flops: dict, stack: str = "standard", fast=None, profile_to: Path | None = None,
               keep_run_record: bool = False) -> dict:  # noqa: C901
    """Train `warmup + steps` optimizer steps of ~`budget` tokens; the figures, or status 'oom' / 'error'.

    `cfg`: the run's TrainConfig (seed, max_length, LoRA); `fast`: a `fastpath.Settings` (the fast variant) or
    None. The trainer is train.py's: `SFTTrainer(args=train.sft_config(cfg, ...))`, with fastpath's collator and
    pieces for the fast variant. The model is left as it was found (pieces off, forwards unwrapped, no grads).
    """
    from datasets import Dataset

    from helpers import training
    from recipe import distributed
    from train import free_memory

    rows_per_step = max(1, round(budget / dist["mean_tokens"]))  # per process (= per GPU)
    total_steps = warmup + steps
    processes = distributed.world_size()  # the Trainer splits the rows between the processes
    rows = random_rows(dist["pairs"], rows_per_step * total_steps * processes, model.config.vocab_size,
                       [cfg.seed, budget])
    run = cfg.replace(run_name=f"bench-{budget}", output_root=str(workdir), per_device_train_batch_size=rows_per_step,
                      gradient_accumulation_steps=1, max_steps=total_steps, logging_steps=1,
                      gradient_checkpointing=True)
    overrides = {**SFT_OVERRIDES, **distributed.sft_overrides(run)}
    result = {"tokens_per_step_target": budget, "rows_per_step": rows_per_step, "steps": steps, "warmup": warmup,
              "processes": processes, "sft_overrides": {k: v for k, v in overrides.items()}}
    saved = saved_forwards(model)
    free_memory()  # the first-batch probe's cached blocks must not count as this budget's reserved memory
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer, error, status, shapes = None, None, "ok", None
    timer, memory = training.StepTimer(), MemoryPhases()
    try:
        start = time.perf_counter()
        callbacks = [timer, memory] + ([StepProfiler(profile_to, warmup)] if profile_to else [])
        trainer = sft_trainer(model, tokenizer, Dataset.from_dict(rows), run, fast, callbacks)
        shapes = ShapeLog(trainer)
        result["trainer_init_seconds"] = round(time.perf_counter() - start, 2)
        patches = contextlib.nullcontext({})  # the standard stack: nothing patched
        if fast is not None:
            import fastpath

            patches = fastpath.applied(trainer, fast)
        start = time.perf_counter()
        with patches as applied, training.cpu_loss_fallback():  # every piece and patch is undone on any exit
            trainer.train()
        result["train_wall_seconds"] = round(time.perf_counter() - start, 2)
        result["fast_pieces"] = json_report(applied)
        result["model_wrapper"] = type(trainer.model_wrapped).__name__  # DistributedDataParallel, FSDP..., or none
        if keep_run_record:
            result["_run_record"] = training.run_record(trainer, run, timer, stack=stack,
                                                        fast_pieces=result["fast_pieces"],
                                                        benchmark_tokens_per_step=budget)
    except Exception as e:  # noqa: BLE001 - OOM is a result; other errors are recorded, and fail the run at the end
        if distributed.launched():  # the other processes would wait for this one forever: fail, and all stop
            raise
        status = "oom" if is_oom(e) else "error"
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        if status == "error":
            traceback.print_exc()
            result["traceback_tail"] = traceback.format_exc()[-3000:]
    if error is not None:
        result.update(status=status, error=error)
    else:
        step_times = [dict(s, shape=(shapes.by_step.get(s["step"]) if shapes else None)) for s in timer.steps]
        by_process = distributed.gather_object(shapes.by_step) if shapes else [{}]
        result["batch_shapes_observed"] = any(by_process)
        skip = warmup + (3 if profile_to else 0)  # profiled steps (and the one after) are not steady steps
        excluded = warmup_exclusions(step_times, skip, by_process)
        result.update(
            status="ok", **timed_figures(step_times, excluded),
            warmup_seconds=round(sum(e["seconds"] for e in excluded), 2),
            first_step_seconds=step_times[0]["seconds"] if step_times else None,
            losses=[round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h],
            step_times=step_times)
        tps, peak = result["steady_tokens_per_second"], flops.get("peak")
        result["mfu"] = round(tps * flops["per_token"] / (peak * processes), 4) if peak and tps else None
        result["mfu_6n_active"] = (round(tps * flops["per_token_6n_active"] / (peak * processes), 4)
                                   if peak and tps else None)
    result.update(memory.figures())
    if distributed.launched():  # memory is per GPU: every process's figures (tokens/s above count all of them)
        result["per_process"] = distributed.gather_object({"rank": distributed.rank(), **memory.figures()})
    restore_forwards(saved)
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.accelerator.free_memory()
    del trainer
    model.zero_grad(set_to_none=True)
    free_memory()
    print(f"  {budget:>6} tokens/step: " + (
        f"{result['steady_tokens_per_second']:,.0f} tokens/s, median {result['seconds_per_step_median']} s/step, "
        f"mean {result['seconds_per_step_mean']} s/step over {result['steps_counted']} steps "
        f"({len(result['warmup_steps_excluded'])} left out: warm-up and new batch shapes)"
        if result["status"] == "ok" else "OUT OF MEMORY" if result["status"] == "oom" else f"ERROR {error}"),
        flush=True)
    return result

