"""Notebook 03's bookkeeping around TRL's `SFTTrainer` (train.py and notebook 04 use it too): a callback that times
every step, the switch to a CPU stand-in for TRL's CUDA-only loss kernel, and the run record
(`outputs/runs/<run>/metrics.json`) with the one definition of "steady" speed that notebook 04 and the benchmark read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from .config import TrainConfig
from .model import GIB, _version

WARMUP_STEPS = 2  # steps left out of "steady" speed: each new batch shape compiles kernels once
_sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None  # wait for the GPU before timing


class StepTimer:
    """A TrainerCallback that records the wall time and tokens of every optimizer step (`.steps`, `.wall`)."""

    def __new__(cls):
        from transformers import TrainerCallback  # imported here: notebook 04 must import Unsloth first

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.steps, self.wall = [], 0.0

            def on_train_begin(self, args, state, control, **kw):
                _sync()
                self._start = self._t = time.perf_counter()
                self._tokens = state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kw):
                _sync()
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                self.steps.append({"step": state.global_step, "seconds": round(now - self._t, 4),
                                   "tokens": int(tokens - self._tokens)})
                self._t, self._tokens, self.wall = now, tokens, now - self._start

        return _StepTimer()


@contextlib.contextmanager
def cpu_loss_fallback():
    """Without CUDA (the offline tiny model), swap TRL's loss kernel (Triton: CUDA only) inside the block for its
    plain-PyTorch stand-in in recipe/offline.py, and put it back on any exit; on a GPU it changes nothing. Checked
    with trl 1.15.0 (`trl.trainer.utils._ChunkedLogProbFunction`)."""
    import trl.trainer.utils as trl_utils

    if torch.cuda.is_available() or not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        yield False
        return
    from recipe.offline import TorchLogProb

    with mock.patch.object(trl_utils, "_ChunkedLogProbFunction", TorchLogProb):
        yield True


def steady(steps: list[dict], skip: int = WARMUP_STEPS) -> dict:
    """The one definition of steady speed: tokens/s and median/mean s/step after the first `skip` steps (each new
    batch shape compiles kernels once, so a short run's first steps say little about a long run)."""
    kept = steps[skip:] if len(steps) > skip else steps
    seconds = sum(s["seconds"] for s in kept)
    return {"tokens_per_second": round(sum(s["tokens"] for s in kept) / seconds, 1) if seconds else None,
            "median_seconds_per_step": round(statistics.median(s["seconds"] for s in kept), 4) if kept else None,
            "mean_seconds_per_step": round(seconds / len(kept), 4) if kept else None,
            "steps_counted": len(kept), "warmup_steps_excluded": len(steps) - len(kept)}


def batch_plan(trainer) -> dict:
    """Rows per optimizer step over all processes (N processes x per-device rows x accumulation), the steps per
    epoch (the data is split N ways), the learning rate (used as set, not scaled with N) and the planned steps."""
    args = trainer.args
    processes = max(args.world_size, 1)
    per_epoch = max(math.ceil(math.ceil(len(trainer.train_dataset) / args.per_device_train_batch_size)
                              / processes / args.gradient_accumulation_steps), 1)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return {"processes": processes, "per_device": args.per_device_train_batch_size,
            "gradient_accumulation": args.gradient_accumulation_steps,
            "rows_per_step": processes * args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "steps_per_epoch": per_epoch, "learning_rate": args.learning_rate, "planned_steps": steps}


def already_trained(trainer, checkpoint) -> bool:
    """Whether `checkpoint` (None: a first run) already holds all the planned steps; if so, its adapter weights and
    trainer state are loaded into `trainer`, to be saved and recorded as they were, and nothing trains. Needed
    because transformers (5.17) resumed from a checkpoint at max_steps in mid-epoch trains one step more."""
    if checkpoint is None:
        return False
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    state, planned = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json")), batch_plan(trainer)
    if state.global_step < planned["planned_steps"]:
        return False  # an interrupted run: trainer.train resumes it
    loaded = set_peft_model_state_dict(trainer.model, load_file(str(Path(checkpoint) / "adapter_model.safetensors")))
    if loaded.unexpected_keys or any("lora_" in key for key in loaded.missing_keys):
        raise ValueError(f"{checkpoint} holds another adapter than this run's LoRA settings make (other targets or "
                         "rank). Fix: give this run another name, or delete that run's checkpoints (train.py: --fresh).")
    trainer.state = state
    print(f"{checkpoint} holds all {planned['planned_steps']} planned steps: the run is finished; its adapter is "
          "loaded and nothing trains.")
    return True


def rows_trained(plan: dict, rows: int, steps: int) -> int:
    """Rows the Trainer really fed after `steps` optimizer steps (the last batch of an epoch may be short)."""
    epochs, rest = divmod(steps, plan["steps_per_epoch"])
    return epochs * rows + min(rest * plan["rows_per_step"], rows)


def library_versions() -> dict:
    """Versions of everything that decides speed or numerics, for the run record."""
    return {"python": platform.python_version(), "torch_cuda": torch.version.cuda} | {name: _version(name) for name in (
        "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo",
        "mamba_ssm", "causal_conv1d")}


def hardware() -> dict:
    """GPU name, count, memory and this process's peak usage (or 'cpu')."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu_name": None, "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "gpu_name": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_total_gib": round(props.total_memory / GIB, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def run_record(trainer, cfg: TrainConfig, timer, stack: str = "standard", resumed_from=None, **extra) -> dict:
    """The metrics.json content: speed, memory, tokens, rows, versions, config and the loss history."""
    state, steps, plan = trainer.state, timer.steps, batch_plan(trainer)
    losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    speed = steady(steps)
    return {"run_name": cfg.run_name, "stack": stack, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "resumed_from": resumed_from, "wall_seconds": round(timer.wall, 2), "steps": state.global_step,
            "steps_this_run": len(steps), "samples": rows_trained(plan, len(trainer.train_dataset), state.global_step),
            "tokens": int(state.num_input_tokens_seen), "steady_tokens_per_second": speed["tokens_per_second"],
            "seconds_per_step": speed["median_seconds_per_step"], "steady": speed,
            "first_step_seconds": steps[0]["seconds"] if steps else None,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "final_loss": losses[-1][1] if losses else None, "loss_history": losses, "step_times": steps,
            "hardware": hardware(), "versions": library_versions(), "config": dataclasses.asdict(cfg),
            "effective_batch": {k: plan[k] for k in ("per_device", "gradient_accumulation", "processes",
                                                     "rows_per_step")}, **extra}


def save_run_record(record: dict, run_dir: Path) -> Path:
    """Write metrics.json into the run's folder; a run that trained no step keeps the record it has (re-running
    a finished run must not replace its figures with empty ones)."""
    path = Path(run_dir) / "metrics.json"
    if not record["steps_this_run"] and path.exists():
        print(f"{record['run_name']}: already finished at step {record['steps']}; keeping its record {path}. "
              "To train it again, delete outputs/checkpoints/<run> (train.py: --fresh) or pick another run name.")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def print_run_summary(record: dict) -> None:
    """The few numbers a learner wants after training, in one line (none when this run trained no step)."""
    if record.get("steps_this_run") == 0:  # (records older than this field always trained)
        return
    hw = record["hardware"]
    memory = (f", peak GPU memory {hw['peak_allocated_gib']} GiB allocated / {hw['peak_reserved_gib']} GiB reserved"
              if hw.get("gpu_name") else " on CPU")
    speed = steady(record["step_times"])  # computed again: records written before it was stored lack it
    print(f"{record['run_name']} [{record['stack']}]: {record['steps']} steps, {record['samples']:,} rows, "
          f"{record['tokens']:,} tokens in {record['wall_seconds']:.0f} s{memory}; "
          f"{speed['tokens_per_second'] or 0:,.0f} tokens/s after {speed['warmup_steps_excluded']} warm-up steps "
          f"(median {speed['median_seconds_per_step']} s/step); final loss {record['final_loss']}")


def training_rows(dataset_dict, limit: int | None = None):
    """The prompt/completion columns of the train split (optionally its first `limit` rows)."""
    if "train" not in dataset_dict or not len(dataset_dict["train"]):
        raise ValueError("the prepared data has no training rows: prepare a source with a train split "
                         "(notebook 01, or train.py --set data_source=FOLDER)")
    train = dataset_dict["train"].select_columns(["prompt", "completion"])
    return train.select(range(min(limit, len(train)))) if limit else train


def print_plan(plan: dict, resume: str | None = None) -> None:
    """One line before training: processes x per-device rows x accumulation = rows per step, and the steps."""
    n = plan["processes"]
    print(f"{n} process{'es' if n > 1 else ''} x {plan['per_device']} rows x {plan['gradient_accumulation']} "
          f"accumulation = {plan['rows_per_step']} rows per optimizer step; learning rate {plan['learning_rate']:g}; "
          f"{plan['planned_steps']} steps" + (f"; resuming from {resume}" if resume else ""), flush=True)
