"""The run's settings in one dataclass, `TrainConfig` (notebook 03, notebook 04 and train.py); it imports nothing
heavy, so `train.py --help` and every usage error answer at once (train.py's presets are in recipe/presets.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = REPO_ROOT / "outputs"  # everything the notebooks and train.py make (git ignores it)
SAMPLE_DIR = REPO_ROOT / "data" / "sample"  # the shipped MedMCQA-schema sample, written for this project
FORMATTED_DIR = OUTPUTS / "data" / "medmcqa_formatted"  # where notebook 01 saves the formatted splits
DEFAULT_MODEL_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
TINY_MODEL = str(OUTPUTS / "tiny-nemotron")  # the offline stand-in, built on first use


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults: the real model on full MedMCQA, one epoch."""
    run_name: str = "nemotron-medmcqa-lora"
    model_id: str = DEFAULT_MODEL_ID
    revision: str | None = None
    load_in_4bit: str = "auto"            # "auto" (bf16 if the card has room, else NF4), "true" or "false"
    data_source: str = "hub"              # "hub" or a folder of MedMCQA-schema files
    data_dir: str = str(FORMATTED_DIR)    # where the formatted splits are saved
    cop_base: int | None = None           # 0 if answers are numbered 0-3, 1 if 1-4; None: detect
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
    seed: int = 42
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    eval_limit: int | None = None         # score only the first N validation questions
    eval_batch_size: int = 16
    output_root: str = str(OUTPUTS)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """A value of the wrong kind or out of range is refused here, in one message, not deep inside training."""
        v, fix = vars(self), "Fix it in notebook 03's parameters cell, or with train.py --set NAME=VALUE."
        numbers = [f.name for f in dataclasses.fields(self) if f.type.split(" |")[0] in ("int", "float")]
        if wrong := [f"{k}={v[k]!r}" for k in numbers if isinstance(v[k], (str, bool))]:
            raise ValueError(f"Not a number: {'; '.join(wrong)}. {fix}")
        whole = ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "eval_batch_size",
                 "logging_steps", "save_steps", "save_total_limit", "train_limit", "eval_limit")  # None: no limit
        bad = [f"{k}={v[k]} (at least 1)" for k in whole if v[k] is not None and v[k] < 1]
        bad += [f"{k}={v[k]} (above 0)" for k in ("learning_rate", "lora_alpha", "max_length") if v[k] <= 0]
        bad += [f"{k}={v[k]} (0 or more, below 1)" for k in ("warmup_ratio", "lora_dropout") if not 0 <= v[k] < 1]
        bad += [f"weight_decay={self.weight_decay} (0 or more)"] if self.weight_decay < 0 else []
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            bad.append(f"num_train_epochs={self.num_train_epochs} (above 0, unless max_steps is)")
        if bad:
            raise ValueError(f"Out of range: {'; '.join(bad)}. {fix}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_root) / "checkpoints" / self.run_name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / "runs" / self.run_name

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (unknown names are an error, not ignored)."""
        known = [f.name for f in dataclasses.fields(self)]
        if set(changes) - set(known):
            raise ValueError(f"unknown setting(s) {sorted(set(changes) - set(known))}; known: {', '.join(known)}")
        return dataclasses.replace(self, **changes)
