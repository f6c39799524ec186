"""The run's settings in one dataclass (notebook 03, notebook 04 and train.py), importable without torch.

`TrainConfig` holds every knob of a LoRA run; `PRESETS` are train.py's named starting points. This module
imports nothing heavy, so `train.py --help` and every usage error answer at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = REPO_ROOT / "outputs"
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
    data_dir: str = str(OUTPUTS / "data" / "medmcqa_formatted")  # where the formatted splits are saved
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

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_root) / "checkpoints" / self.run_name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / "runs" / self.run_name

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (unknown names are an error, not ignored)."""
        unknown = set(changes) - set(field_names())
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {', '.join(field_names())}")
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


# train.py --preset NAME; anything can still be overridden with --set key=value.
PRESETS = {
    "full": ("the real model on full MedMCQA, one epoch (a CUDA GPU: bf16 on 80 GB, 4-bit below)", {}),
    "smoke": ("offline plumbing check on CPU (~25 s): the tiny RANDOM model on the shipped sample; "
              "its accuracy is noise", dict(
                  run_name="smoke", model_id=TINY_MODEL, data_source="data/sample",
                  data_dir=str(OUTPUTS / "data" / "smoke_formatted"), max_length=512, max_steps=12,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                  logging_steps=2, save_steps=6, eval_batch_size=8)),
    # Why 200 steps: the random tiny model's frozen output layer can raise a letter's logit by only ~1.3 nats,
    # so the loss falls just from 7.6 to ~6.5 even at 100% accuracy; the weak signal first teaches the letter
    # marginal (~60 steps), the rule itself appears after ~80-120 steps, all at once. 5e-3 with cosine decay
    # learns it for every seed tried; 2e-2 stalls on the marginal.
    "learn": ("offline, CPU (~1 min): the tiny model learns a synthetic rule (a code word decides the letter), "
              "accuracy ~25% -> ~100%", dict(
                  run_name="learn", model_id=TINY_MODEL, data_source="synthetic",
                  data_dir=str(OUTPUTS / "data" / "synthetic_formatted"), max_length=128,
                  with_explanation=False, max_steps=200, per_device_train_batch_size=16,
                  gradient_accumulation_steps=1, learning_rate=5e-3, warmup_ratio=0.05,
                  logging_steps=10, save_steps=100, eval_batch_size=32)),
}


def preset(name: str, **overrides) -> TrainConfig:
    """The TrainConfig of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(**PRESETS[name][1]).replace(**overrides)


def config_of_run(record: dict, **overrides) -> TrainConfig:
    """The TrainConfig an earlier run record was trained with (to rerun or compare it), with field overrides.

    Fields this version does not know (a record written by another version) are named and left out.
    """
    known = set(field_names())
    unknown = sorted(set(record["config"]) - known)
    if unknown:
        print(f"Run {record.get('run_name')}: settings this version does not know, not used: {unknown}")
    return TrainConfig(**{k: v for k, v in record["config"].items() if k in known}).replace(**overrides)
