"""packing and round_lengths: each micro-batch's rows become one sequence without padding.

Each layer must still see where one row ends and the next begins:
- attention gets `position_ids` that restart at 0 on every row (and, with varlen_attention, the rows' offsets);
- the Mamba-2 layers get `seq_idx` (the row number of every token); the fused mamba_ssm kernels reset the
  convolution and the scan state wherever it changes. The PyTorch reference Mamba code ignores `seq_idx` and
  would carry state from one row into the next, so packing refuses to run on it (`require_packing_support`).
"""

from __future__ import annotations

import torch

from .blocks import has_mamba_layers
from .settings import FEATURES_FLAG, ROUND_TO, Refused, Settings


class PackingUnsupported(Refused):
    """Packing would mix rows with this model and these kernels."""


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Row number of every token of a packed batch: a new row starts wherever the position is 0.

    [[0,1,2,0,1,0]] -> [[0,0,0,1,1,2]] (int32, the dtype the mamba_ssm kernels expect).
    """
    return ((position_ids == 0).cumsum(-1) - 1).clamp(min=0).to(torch.int32)


_LAST_BOUNDS: list = [None, None]  # (position_ids, bounds) of the last packed batch: its attention layers share it


def _bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, longest row) of a packed batch, found by transformers' own helper."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_seqlens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    return cu_seqlens, int(longest)


def row_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where each row of a packed batch starts, as FlashAttention wants it: (cu_seqlens, longest row).

    [[0,1,2,0,1,0]] -> ([0,3,5,6], 3). `PackedCollator` passes them with the batch; without them (a packed
    batch from elsewhere), reading the longest row from a GPU tensor waits for the GPU, so the answer is kept
    for the other attention layers of the same forward pass (`forget_row_bounds` drops it).
    """
    if _LAST_BOUNDS[0] is not position_ids:
        _LAST_BOUNDS[:] = [position_ids, _bounds(position_ids)]
    return _LAST_BOUNDS[1]


def forget_row_bounds() -> None:
    """Drop `row_bounds`' memory of the last batch (it holds that batch's tensors)."""
    _LAST_BOUNDS[:] = [None, None]


class PackedCollator:
    """TRL's padding-free collator, plus `seq_idx` for the Mamba kernels and the rows' bounds for attention.

    TRL's `DataCollatorForLanguageModeling(padding_free=True)` concatenates the rows, masks the
    first label of each and returns `position_ids` (no attention mask). We add `seq_idx`, which
    transformers' Nemotron-H passes to the fused Mamba kernels, and FlashAttention's row offsets and longest
    row (`cu_seq_lens_q/k`, `max_length_q/k`, transformers' names), read here on the CPU: found from the
    GPU copy of `position_ids`, they would make the forward pass wait for the GPU.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.pad_to_multiple_of = pad_to_multiple_of
        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True,
                                                     pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["seq_idx"] = seq_idx_from_position_ids(batch["position_ids"])
        cu_seqlens, longest = _bounds(batch["position_ids"])
        batch.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest, max_length_k=longest)
        return batch


def batch_to(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (the Trainer does this; PackedCollator's ints stay ints)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def kernels_problem() -> str | None:
    """Why packing cannot run on this machine (no CUDA, or transformers bound the Mamba reference), or None."""
    from helpers.model import fast_kernels_status

    status = fast_kernels_status()
    if status["fast_path"]:
        return None
    return ("The fast path packs rows into one sequence, and only the fused mamba_ssm kernels reset the Mamba "
            f"state between rows (CUDA {status['cuda']}; mamba_ssm {status['mamba_ssm']}, causal_conv1d "
            f"{status['causal_conv1d']}, bound: {status['implementations']}); the PyTorch reference would leak each "
            "row's state into the next. Fix: train on a CUDA GPU with the kernels installed "
            f"(LOCK=requirements-cuda.lock ./run ...), or without --fast, or with a {FEATURES_FLAG} list without packing.")


def require_packing_support(model, allow_state_leak: bool = False) -> None:
    """Refuse packing where the Mamba layers would mix rows (reference PyTorch path, or CPU).

    `allow_state_leak=True` is for demonstrations and tests of that very leak, never for training.
    """
    if not has_mamba_layers(model) or allow_state_leak:
        return
    device = next(model.parameters()).device
    problem = kernels_problem() or (None if device.type == "cuda" else
                                    f"The model is on {device.type}: packing needs it on a CUDA GPU.")
    if problem:
        raise PackingUnsupported(problem)


def collator(model, tokenizer, settings: Settings, allow_state_leak: bool = False) -> PackedCollator | None:
    """The data collator for `SFTTrainer(data_collator=...)`: a PackedCollator when packing is on, else None
    (TRL's own padding collator). Refuses (PackingUnsupported) where packing would mix rows; lengths rounded
    to ROUND_TO tokens with round_lengths."""
    from helpers.model import pad_id

    if "packing" not in settings.pieces:
        return None
    require_packing_support(model, allow_state_leak=allow_state_leak)
    return PackedCollator(pad_id(tokenizer), ROUND_TO if "round_lengths" in settings.pieces else None)


def fold_accumulation(cfg):
    """The same rows per optimizer step as one packed micro-batch: per-device rows x accumulation, accumulation 1.

    Works on any config with `per_device_train_batch_size`, `gradient_accumulation_steps` and `replace(**changes)`
    (helpers.config.TrainConfig).
    """
    return cfg.replace(per_device_train_batch_size=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
                       gradient_accumulation_steps=1)
