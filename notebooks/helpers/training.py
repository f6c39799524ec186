"""Stage 2: supervised fine-tuning with TRL's SFTTrainer on LoRA adapters.

`TrainConfig` holds every knob in one place (notebooks, train.py and the
benchmark share it). `sft_config()` turns it into TRL's `SFTConfig`;
`make_trainer()` builds the trainer; `train()` runs it (resuming from the last
checkpoint when there is one) and writes a run record that notebook 04 reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .model import GIB, TINY_MODEL_DIR, _version, pad_id

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = REPO_ROOT / "outputs"


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults: the real model on full MedMCQA, one epoch."""
    run_name: str = "nemotron-medmcqa-lora"
    model_id: str = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
    revision: str | None = None
    data_source: str = "hub"              # "hub" or a folder of MedMCQA-schema files
    data_dir: str = str(REPO_ROOT / "data" / "medmcqa_formatted")  # where stage 1 saves the formatted splits
    with_explanation: bool = True         # train on the explanation after the answer
    max_length: int = 1024                # tokens; longer rows are truncated (answer kept)
    train_limit: int | None = None        # use only the first N training rows
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    routed_experts: bool = False          # LoRA on the 128 routed experts too (PEFT target_parameters)
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    num_train_epochs: float = 1.0
    max_steps: int = -1                   # > 0 overrides num_train_epochs
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    fast: bool = False                    # stage 5: the fast path, helpers/fast.py (CUDA + Mamba kernels)
    checkpointing: str = "all"            # fast path: blocks that recompute ("all", "none", "mamba,moe", "moe:2", ...)
    fast_features: str | None = None      # fast path pieces (None: all FEATURES, less GPU_ONLY on CPU)
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_limit: int | None = None         # score only the first N validation questions
    eval_batch_size: int = 16
    output_root: str = str(OUTPUTS)
    extra: dict = field(default_factory=dict)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_root) / "checkpoints" / self.run_name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / "runs" / self.run_name

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (unknown names are an error, not ignored)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"Unknown TrainConfig field(s): {sorted(unknown)}. "
                             f"Known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


TINY_MODEL = str(TINY_MODEL_DIR)
# Presets for train.py (`--preset NAME`); anything can still be overridden with `--set key=value`.
PRESETS = {
    # The real model on full MedMCQA, one epoch (an 80 GB GPU with the Mamba kernels).
    "full": {},
    # Offline, CPU, ~2 minutes: the tiny random model on the shipped sample. Checks every step runs.
    "smoke": dict(run_name="smoke", model_id=TINY_MODEL, data_source="data/sample",
                  data_dir=str(REPO_ROOT / "data" / "smoke_formatted"), max_length=512, max_steps=12,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                  logging_steps=2, save_steps=6, eval_batch_size=8),
    # Offline, CPU, ~30 s of training: the tiny model learns the synthetic code-word task (~25% -> 100%).
    # Why 200 steps: the random tiny model's frozen output layer (lm_head, std 0.02, after an RMSNorm) can raise
    # a letter's logit by only ~1.3 nats, so the loss falls just from 7.6 to ~6.5 even at 100% accuracy, and
    # knowing the rule beats "always guess one letter" by only ~0.6 nats. That weak signal first teaches the
    # letter marginal (60 steps: "always C", 25%); the rule itself appears after ~80-120 steps, all at once.
    # A learning rate of 2e-2 stalls on the marginal; 5e-3 with cosine decay learns it for every seed tried.
    "learn": dict(run_name="learn", model_id=TINY_MODEL, data_source="synthetic",
                  data_dir=str(REPO_ROOT / "data" / "synthetic_formatted"), max_length=128,
                  with_explanation=False, max_steps=200, per_device_train_batch_size=16,
                  gradient_accumulation_steps=1, learning_rate=5e-3, warmup_ratio=0.05,
                  logging_steps=10, save_steps=100, eval_batch_size=32),
}


def preset(name: str, **overrides) -> TrainConfig:
    """The TrainConfig of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return TrainConfig(**PRESETS[name]).replace(**overrides)


def config_of_run(record: dict, **overrides) -> TrainConfig:
    """The TrainConfig an earlier run record was trained with (to rerun or compare it), with field overrides.

    Fields this version does not know (a record written by another version) are named and left out.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(record["config"]) - known)
    if unknown:
        print(f"Run {record.get('run_name')}: config fields this version does not know, not used: {unknown}")
    return TrainConfig(**{k: v for k, v in record["config"].items() if k in known}).replace(**overrides)


def cpu_processes_args() -> dict:
    """TrainingArguments that let several CPU-only processes train together (the CI test); {} otherwise.

    Without a GPU the Trainer runs each launched process on its own unless told to use the CPU, with gloo.
    """
    if torch.cuda.is_available() or not distributed.launched():
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


def sft_config(cfg: TrainConfig, **overrides):
    """TRL's SFTConfig for this run, with each choice explained."""
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    args = dict(
        output_dir=str(cfg.checkpoint_dir),            # checkpoints + final adapter
        run_name=cfg.run_name,
        # --- data: prompt/completion pairs, loss on the completion only (prompt tokens masked)
        completion_only_loss=True,
        max_length=cfg.max_length,                     # truncate longer rows (their answer stays)
        dataset_num_proc=None,
        # --- batch: tokens per optimizer step = batch x accumulation x (mean row length)
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # --- optimisation
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,       # cosine or linear decay ...
        warmup_steps=cfg.warmup_ratio,                 # ... after a short warm-up (a float < 1 is a share of all steps)
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        seed=cfg.seed,                                 # same seed -> same data order and LoRA init
        data_seed=cfg.seed,
        # --- memory
        bf16=on_gpu,                                   # bf16 on GPU; fp32 on CPU (tiny model)
        # recompute activations in backward; under FSDP with `fsdp_activation_checkpointing: true` FSDP does it
        gradient_checkpointing=cfg.gradient_checkpointing and not distributed.fsdp_activation_checkpointing(),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # --- bookkeeping
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,                     # checkpoint every N steps ...
        save_total_limit=cfg.save_total_limit,         # ... keeping only the newest few
        report_to=["tensorboard"],
        include_num_input_tokens_seen="non_padding",   # count real tokens, not padding
        dataloader_num_workers=0,
        disable_tqdm=False,                            # the progress bar
        # --- several processes (accelerate launch, see helpers/distributed.py and configs/)
        ddp_find_unused_parameters=False,              # every LoRA weight gets a gradient each step: skip the search
        ddp_broadcast_buffers=False,                   # the only buffers (router biases) never change
        **cpu_processes_args(),
    )
    args.update(overrides)
    return SFTConfig(**args)


def training_split(dataset_dict, limit: int | None = None):
    """The prompt/completion columns of the labelled train split (optionally the first `limit` rows)."""
    from .data import require_labelled
    if "train" not in dataset_dict:
        raise ValueError("The prepared data has no 'train' split: run notebook 01 / prepare_medmcqa on a "
                         "source with a train split.")
    train = dataset_dict["train"]
    require_labelled("train", [{"cop": 0 if a else -1} for a in train["answer"]])
    if limit:
        train = train.select(range(min(limit, len(train))))
    return train.select_columns(["prompt", "completion"])


class StepTimer:
    """A TrainerCallback that records wall time and tokens of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.steps: list[dict] = []
                self._t = None
                self._tokens = 0

            def on_train_begin(self, args, state, control, **kw):
                self._sync()
                self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kw):
                self._sync()
                now = time.perf_counter()
                self.steps.append({"step": state.global_step, "seconds": now - self._t,
                                   "tokens": state.num_input_tokens_seen - self._tokens})
                self._t, self._tokens = now, state.num_input_tokens_seen

            @staticmethod
            def _sync():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()

        return _StepTimer()


class _TorchLogProb:
    """TRL's chunked log-prob kernel, in plain PyTorch, for CPUs.

    TRL 1.15's SFTTrainer computes the loss with a Triton kernel that runs on CUDA
    only (it never builds the full logits). On a CPU there is no such kernel, so we
    compute the same outputs the simple way; autograd handles the backward pass.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        z = (hidden @ weight.t() + (bias if bias is not None else 0)).float() * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        target_logp = logp.gather(-1, targets[:, None]).squeeze(-1)
        probs = logp.exp()
        return (target_logp,
                -(probs * logp).sum(-1) if "entropy" in outputs else None,
                torch.logsumexp(2 * logp, -1).detach() if "log_sum_sq_probs" in outputs else None,
                z.mean(-1).detach() if "mean_logits" in outputs else None,
                (z.argmax(-1) == targets).detach() if "is_top1" in outputs else None)


def use_cpu_loss_fallback() -> bool:
    """Without CUDA, swap TRL's Triton loss kernel for `_TorchLogProb`; on a GPU change nothing."""
    if torch.cuda.is_available():
        return False
    import trl.trainer.utils as trl_utils
    trl_utils._ChunkedLogProbFunction = _TorchLogProb
    return True


def make_trainer(model, tokenizer, train_dataset, cfg: TrainConfig, callbacks=(), **sft_overrides):
    """An SFTTrainer for a LoRA-wrapped `model`, with a StepTimer attached (as `trainer.step_timer`).

    With `cfg.fast`, `trainer.restore_model_features()` switches the model's fast-path pieces off again
    (`train` calls it once training is done); otherwise it is None.
    """
    from trl import SFTTrainer

    use_cpu_loss_fallback()

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(cfg.run_dir / "tensorboard")
    timer = StepTimer()
    collator, callbacks, restore_model = None, [timer, *callbacks], None
    if cfg.fast:  # stage 5: pack each micro-batch into one row (see helpers/fast.py)
        from . import fast
        features = fast.parse_features(cfg.fast_features)
        if "packing" in features:
            fast.require_packing_support(model, allow_state_leak=cfg.extra.get("allow_state_leak", False))
            collator = fast.PackedCollator(pad_id(tokenizer), fast.ROUND_TO if "round_lengths" in features else None)
        # the model-level pieces (experts, norms, attention, LoRA); `train` switches them back afterwards
        restore_model = fast.use_model_features(model, features)
        callbacks.append(fast.CheckpointPolicy(cfg.checkpointing))
        if "gc_freeze" in features:
            callbacks.append(fast.FrozenGC())
    trainer = SFTTrainer(model=model, args=sft_config(cfg, **sft_overrides), train_dataset=train_dataset,
                         processing_class=tokenizer, data_collator=collator, callbacks=callbacks)
    trainer.step_timer = timer
    trainer.restore_model_features = restore_model
    return trainer


def last_checkpoint(cfg: TrainConfig) -> str | None:
    """Path of the newest `checkpoint-N` folder of this run, or None."""
    from transformers.trainer_utils import get_last_checkpoint
    return get_last_checkpoint(str(cfg.checkpoint_dir)) if cfg.checkpoint_dir.is_dir() else None


def train(trainer, cfg: TrainConfig, resume: bool = True, stack: str = "standard",
          warmup_steps_excluded: int = 1) -> dict:
    """Train (resuming from the last checkpoint if any), save the adapter, write the run record."""
    stack = "fast" if cfg.fast and stack == "standard" else stack
    checkpoint = last_checkpoint(cfg) if resume else None
    main = distributed.is_main_process()  # several processes (accelerate launch): only one prints and writes
    if checkpoint and main:
        print(f"Resuming from {checkpoint}")
    if main:
        print_batch_plan(batch_plan(trainer))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    if getattr(trainer, "restore_model_features", None):  # fast path: evaluate and save with the standard model
        trainer.restore_model_features()
    trainer.save_model(str(cfg.checkpoint_dir))  # the adapter + tokenizer (every process calls it; one writes)
    record = run_record(trainer, cfg, wall, stack, checkpoint, warmup_steps_excluded)
    if main:
        save_run_record(record, cfg.run_dir)
    return record


def batch_plan(trainer) -> dict:
    """Rows per optimizer step over all processes, the learning rate, and how many steps the run will take.

    Each of N processes (one per GPU) takes `per_device` rows per micro-batch and accumulates A micro-batches;
    DDP then averages the gradients of all processes once: effective batch = N x per_device x A rows per step.
    The data is split N ways, so an epoch has about N times fewer steps. The learning rate is used as set,
    not scaled with N (configs/README.md says why, and how to keep the one-GPU batch instead).
    """
    args = trainer.args
    processes = max(args.world_size, 1)
    steps = args.max_steps
    if steps <= 0:  # the Trainer's own count: micro-batches per process -> optimizer steps per epoch -> epochs
        micro = math.ceil(math.ceil(len(trainer.train_dataset) / args.per_device_train_batch_size) / processes)
        steps = math.ceil(args.num_train_epochs * max(math.ceil(micro / args.gradient_accumulation_steps), 1))
    return {"processes": processes, "per_device": args.per_device_train_batch_size,
            "gradient_accumulation": args.gradient_accumulation_steps,
            "rows_per_step": processes * args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "learning_rate": args.learning_rate, "planned_steps": steps}


def print_batch_plan(plan: dict) -> None:
    """One line at the start of training: N processes x per-device B x accumulation A = effective batch E."""
    n, accumulation = plan["processes"], plan["gradient_accumulation"]
    hint = ""
    if n > 1 and accumulation % n == 0:
        hint = (f"; for the one-process batch of {plan['rows_per_step'] // n} rows: "
                f"--set gradient_accumulation_steps={accumulation // n}")
    print(f"{n} process{'es' if n > 1 else ''} x per-device {plan['per_device']} x accumulation {accumulation} = "
          f"effective batch {plan['rows_per_step']} rows/step; learning rate {plan['learning_rate']:g} (as set, not "
          f"scaled with the process count); {plan['planned_steps']} optimizer steps{hint}", flush=True)


def library_versions() -> dict:
    """Versions of everything that decides speed or numerics, for the run record."""
    out = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "unsloth", "unsloth_zoo",
                 "mamba_ssm", "causal_conv1d"):
        out[name] = _version(name)
    return out


def hardware() -> dict:
    """GPU name, count, driver-visible memory and peak usage (or 'cpu')."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "gpu_name": None, "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "gpu_name": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_total_gib": round(props.total_memory / GIB, 1), **_peak_memory()}


def _peak_memory() -> dict:
    """This process's peak GPU memory since the last reset, GiB."""
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def tokens_per_second_after(record: dict, skip: int) -> float | None:
    """Tokens/s of a run record over its steps after the first `skip` (from its per-step times).

    Every new batch shape costs a one-off compilation (Triton autotuning, cuDNN plans): in a short run the
    second step can take longer than the next twenty. Comparing stacks after the same number of warm-up
    steps shows what a long run would see; the record's own `steady_tokens_per_second` skips its
    `warmup_steps_excluded` (one, unless set).
    """
    steps = record.get("step_times", [])[skip:]
    seconds = sum(s["seconds"] for s in steps)
    return round(sum(s["tokens"] for s in steps) / seconds, 1) if seconds else None


def run_record(trainer, cfg: TrainConfig, wall: float, stack: str, resumed_from, warmup_steps_excluded: int) -> dict:
    """The metrics.json content: speed, memory, tokens, versions, config and the loss history."""
    state, steps = trainer.state, trainer.step_timer.steps
    steady = steps[warmup_steps_excluded:] or steps
    steady_sec = sum(s["seconds"] for s in steady)
    plan = batch_plan(trainer)
    losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    record = {
        "run_name": cfg.run_name, "stack": stack, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "resumed_from": resumed_from, "wall_seconds": round(wall, 2),
        "steps": state.global_step, "samples": state.global_step * plan["rows_per_step"],
        "tokens": int(state.num_input_tokens_seen),
        "tokens_per_second": round(sum(s["tokens"] for s in steps) / max(sum(s["seconds"] for s in steps), 1e-9), 1),
        "steady_tokens_per_second": round(sum(s["tokens"] for s in steady) / max(steady_sec, 1e-9), 1),
        "seconds_per_step": round(statistics.median(s["seconds"] for s in steady), 4) if steady else None,
        "first_step_seconds": round(steps[0]["seconds"], 2) if steps else None,
        "warmup_steps_excluded": warmup_steps_excluded,
        "trainable_parameters": trainable,
        "final_loss": losses[-1][1] if losses else None,
        "loss_history": losses, "step_times": steps,
        "hardware": hardware(), "versions": library_versions(), "config": dataclasses.asdict(cfg),
        "effective_batch": {k: plan[k] for k in ("per_device", "gradient_accumulation", "processes", "rows_per_step")},
    }
    if distributed.launched():  # a collective: under several processes every process must call run_record
        record["hardware"]["per_process"] = distributed.gather_object(process_memory())
    return record


def process_memory() -> dict:
    """This process's rank, device and peak GPU memory (GiB), for the per-GPU line of the run record."""
    out = {"rank": distributed.rank(), "device": str(distributed.device())}
    if torch.cuda.is_available():
        out |= _peak_memory()
    return out


def save_run_record(record: dict, run_dir: Path) -> Path:
    """Write metrics.json and the loss-curve PNG into the run's folder."""
    from .plots import plot_loss_curves
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.json"
    path.write_text(json.dumps(record, indent=2))
    if record["loss_history"]:
        steps, losses = zip(*record["loss_history"])
        plot_loss_curves({record["run_name"]: (steps, losses)}, name="loss", out_dir=run_dir)
    return path


def load_run_record(path: str | Path) -> dict:
    """Read a run record (metrics.json, or the folder holding it)."""
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"No run record at {path}: run notebook 03 (or train.py) first.")
    return json.loads(path.read_text())


def print_run_summary(record: dict) -> None:
    """The few numbers a learner wants after training."""
    hw = record["hardware"]
    mem = f", peak GPU memory {hw['peak_allocated_gib']} GiB allocated / {hw['peak_reserved_gib']} GiB reserved" \
        if hw.get("gpu_name") else " (CPU)"
    batch = record.get("effective_batch", {})
    if batch.get("processes", 1) > 1:  # tokens and samples are totals over all processes; memory is per GPU
        peaks = [p.get("peak_allocated_gib") for p in hw.get("per_process", [])]
        mem = (f" on {batch['processes']} processes (effective batch {batch.get('rows_per_step')} rows/step"
               + (f", peak GPU memory per process {peaks} GiB allocated)" if any(peaks) else ", CPU)"))
    print(f"{record['run_name']} [{record['stack']}]: {record['steps']} steps, {record['samples']} samples, "
          f"{record['tokens']:,} tokens in {record['wall_seconds']:.0f} s -> {record['steady_tokens_per_second']:,.0f} "
          f"tokens/s steady (first step {record['first_step_seconds']} s){mem}; final loss {record['final_loss']}")
