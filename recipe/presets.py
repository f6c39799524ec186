"""train.py's named starting points (`--preset NAME`) and the config of an earlier run (`--like RUN`).

Imports nothing heavy, so `train.py --help` lists the presets at once. Anything can still be changed with
`--set key=value`.
"""

from __future__ import annotations

import dataclasses

from helpers.config import OUTPUTS, TINY_MODEL, TrainConfig

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


def field_names() -> list[str]:
    """TrainConfig's settings, in order (what `--set` accepts)."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def config_of_run(record: dict, **overrides) -> TrainConfig:
    """The TrainConfig an earlier run record was trained with (to rerun or compare it), with field overrides.

    Fields this version does not know (a record written by another version) are named and left out.
    """
    known = set(field_names())
    unknown = sorted(set(record["config"]) - known)
    if unknown:
        print(f"Run {record.get('run_name')}: settings this version does not know, not used: {unknown}")
    return TrainConfig(**{k: v for k, v in record["config"].items() if k in known}).replace(**overrides)
