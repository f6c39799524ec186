"""Memory and the host: the checkpointing policy, expandable allocator segments, and gc_freeze.

- The checkpointing policy chooses which blocks recompute their activations in the backward pass. The Trainer
  turns checkpointing on for every block when training starts; `CheckpointPolicy`, a callback, then turns it
  off where the policy says so. Recomputing less is faster and needs more memory.
- Expandable segments keep PyTorch's CUDA allocator from fragmenting when the run is within a few GiB of the card.
- gc_freeze: `FrozenGC`, a callback, hides the objects that exist when training starts from Python's garbage
  collector, so its full collections stop walking ~600k long-lived objects inside a CPU-bound loop.
"""

from __future__ import annotations

import gc
import os

import torch

from .blocks import block_kind, blocks
from .packing import PackingUnsupported, kernels_problem
from .settings import POLICY_FLAG, Refused, Settings, parse_policy
from .undo import Patches


def policy_wants(model, policy: str) -> list[bool]:
    """For each block, in order: does the policy recompute it? ('moe:2': only the first two MoE blocks.)"""
    chosen, seen, wanted = parse_policy(policy), {}, []
    for block in blocks(model):
        kind = block_kind(block.block_type)
        limit = chosen.get(kind)
        wanted.append(kind in chosen and (limit is None or seen.get(kind, 0) < limit))
        seen[kind] = seen.get(kind, 0) + int(wanted[-1])
    return wanted


def set_checkpointing(model, policy: str, patches: Patches | None = None) -> dict[str, int]:
    """Turn activation checkpointing on or off per block, by block type; returns {kind: blocks that recompute}.

    Call after gradient checkpointing was enabled (the Trainer does it when training starts):
    transformers' `GradientCheckpointingLayer` recomputes only where `layer.gradient_checkpointing`.
    With `patches`, every flag changed is written down there to be put back.
    """
    counts: dict[str, int] = {}
    for block, wanted in zip(blocks(model), policy_wants(model, policy)):
        # `_gradient_checkpointing_func` exists once checkpointing was enabled on the model
        value = wanted and hasattr(block, "_gradient_checkpointing_func")
        if patches is None:
            block.gradient_checkpointing = value
        elif block.gradient_checkpointing != value:
            patches.set(block, "gradient_checkpointing", value)
        kind = block_kind(block.block_type)
        counts[kind] = counts.get(kind, 0) + int(value)
    return counts


class CheckpointPolicy:
    """A TrainerCallback that applies `set_checkpointing(model, policy, patches)` once the Trainer has enabled
    checkpointing (when training starts). `applied` then holds {kind: blocks that recompute}."""

    def __new__(cls, model, policy: str, patches: Patches):
        from transformers import TrainerCallback

        parse_policy(policy)  # fail now, not at step 0

        class _CheckpointPolicy(TrainerCallback):
            def __init__(self):
                self.policy, self.applied = policy, None

            def on_train_begin(self, args, state, control, **kw):
                if not any(hasattr(block, "_gradient_checkpointing_func") for block in blocks(model)):
                    raise Refused(f"{POLICY_FLAG} {policy} chooses which blocks recompute, but gradient "
                                  "checkpointing is off: turn it on, or leave out " + POLICY_FLAG + ".")
                self.applied = set_checkpointing(model, policy, patches)

        return _CheckpointPolicy()


class FrozenGC:
    """A TrainerCallback that runs `gc.collect(); gc.freeze()` when training starts (fastpath.applied unfreezes).

    By then the process holds ~600k long-lived objects (imported code, modules, parameters). Every full
    collection walks all of them: ~300 ms on an H100 host, about once in 30 steps, inside a training loop
    whose Python thread is the bottleneck. `gc.freeze()` moves them out of the collector's sight (they stay
    alive anyway); training's own garbage is collected as before.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class _FrozenGC(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                gc.collect()
                gc.freeze()

        return _FrozenGC()


def prefer_expandable_segments() -> bool:
    """Ask PyTorch's CUDA allocator for expandable segments, unless the user chose otherwise; True if it applies.

    The fast path runs within a few GiB of an 80 GB card (59 GiB of frozen weights). With fixed-size
    segments the allocator's free blocks fragment, and a step that fits can still run out of memory.
    Only takes effect before CUDA starts, so train.py and the benchmark call it first thing.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return not torch.cuda.is_initialized() and "expandable_segments:True" in os.environ["PYTORCH_CUDA_ALLOC_CONF"]


def prepare_process(settings: Settings) -> None:
    """What the fast path does first, before any model is loaded (train.py --fast, the benchmark's fast variant):
    refuse where packing could not keep rows apart (PackingUnsupported, naming the fix: the real model is 59 GiB
    to load for nothing), then ask for expandable allocator segments while CUDA has not started."""
    if "packing" in settings.pieces and (problem := kernels_problem()):
        raise PackingUnsupported(problem)
    prefer_expandable_segments()
