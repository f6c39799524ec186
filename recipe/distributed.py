"""Several GPUs (or machines) through accelerate: which process am I, wait for the others, gather results.

`accelerate launch --num_processes N train.py ...` starts N copies of the same script, one per GPU; each
learns its place from the environment the launcher sets (RANK, LOCAL_RANK, WORLD_SIZE). The Trainer then
does the real work: it wraps the model in DDP (every GPU holds the whole frozen base, only the LoRA
gradients are all-reduced) or, with `configs/fsdp.yaml`, shards it with FSDP2. This module only adds what
the code around the Trainer needs: who is the main process (the one that writes files), a barrier, and
gathering small Python objects. Started plainly (`python train.py`), every function answers for one process
and does nothing else, so the one-GPU path is unchanged.

Like the other helpers, nothing here imports transformers, trl or peft at module level.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

# How long a process waits at a barrier or collective before giving up. The main process may prepare the
# data (first run: download and tokenize MedMCQA) or score the base model while the others wait; the same
# 30 minutes as transformers' default `ddp_timeout`, which no longer applies: `init()` opens the process group
# before the Trainer would, so this is the one setting that counts.
TIMEOUT = timedelta(minutes=30)


def world_size() -> int:
    """How many processes the launcher started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True when this is one of several processes (accelerate launch / torchrun with N > 1)."""
    return world_size() > 1


def rank() -> int:
    """This process's number among all processes, on all machines (0 = the main process)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's number on its own machine: the index of its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True for the one process that writes run records, summaries and figures, and evaluates."""
    return rank() == 0


def fsdp_enabled() -> bool:
    """True when the accelerate config shards the model with FSDP (`configs/fsdp.yaml`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_activation_checkpointing() -> bool:
    """True when FSDP itself recomputes activations (`fsdp_activation_checkpointing: true` in the config)."""
    return fsdp_enabled() and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"


def init():
    """Join the process group and claim this process's GPU; nothing at all when run as one process.

    Call it first, before loading anything: the model must go to `cuda:LOCAL_RANK`, not to GPU 0 in every
    process. Uses accelerate's `PartialState` (the object the Trainer uses too). Returns it, or None.
    """
    if not launched():
        return None
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()  # CPU processes (the CI test) talk through gloo, GPUs through NCCL
    if cpu:  # plain "cpu", not accelerate's "cpu:RANK", which torch.load cannot map a resumed optimizer to
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    return PartialState(cpu=cpu, backend="gloo" if cpu else None, timeout=TIMEOUT)


def device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` on GPU machines, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def wait_for_everyone() -> None:
    """A barrier: return once every process got here (a no-op for one process)."""
    if launched():
        init().wait_for_everyone()


@contextmanager
def main_process_first():
    """Run the block on the main process first, then on the other processes of each machine.

    For work that writes shared files (the tiny model, the prepared data): the main process writes them;
    the local main process of every other machine then writes its own copy if its disk is not shared; the
    rest find the files ready (those helpers reuse what is already on disk).
    """
    if not launched():
        yield
        return
    state = init()
    with state.main_process_first(), state.local_main_process_first():
        yield


def finish() -> None:
    """Leave the process group once this process has no collective work left (a local step: nobody waits).

    Without it a CPU (gloo) process may abort at exit while the others still run. Afterwards a barrier or
    gather raises an error: call it last. A no-op for one process.
    """
    if launched() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_object(obj) -> list:
    """`[obj of process 0, obj of process 1, ...]` on every process (`[obj]` for one process)."""
    if not launched():
        return [obj]
    from accelerate.utils import gather_object as gather

    init()
    return gather([obj])


def shards() -> int:
    """Over how many GPUs FSDP splits the weights (1 without FSDP): each GPU needs only its share."""
    return world_size() if fsdp_enabled() else 1


def device_map():
    """Where the weights go: this process's GPU (`cuda:LOCAL_RANK`); "cpu" under FSDP (the Trainer moves each GPU's
    shard over, so no GPU holds the whole model); None (the loader's default, the CPU) without CUDA."""
    if not torch.cuda.is_available():
        return None
    return "cpu" if fsdp_enabled() else {"": local_rank()}


def sft_overrides(cfg) -> dict:
    """SFTConfig settings under accelerate launch: FSDP may checkpoint itself (even with `--num_processes 1`),
    several processes skip DDP's searches, CPUs use gloo. Nothing for a plain one-process run."""
    out = {"gradient_checkpointing": False} if fsdp_activation_checkpointing() else {}  # FSDP recomputes itself
    if not launched():
        return out
    out |= {"ddp_find_unused_parameters": False,  # every LoRA weight gets a gradient each step: skip the search
            "ddp_broadcast_buffers": False}       # the only buffers (router biases) never change
    if not torch.cuda.is_available():
        out |= {"use_cpu": True, "ddp_backend": "gloo"}
    return out


def per_process_memory() -> list | None:
    """Each process's rank, device and peak GPU memory (GiB); None for one process. A collective: every
    process must call it."""
    if not launched():
        return None
    mine = {"rank": rank(), "device": str(device())}
    if torch.cuda.is_available():
        mine |= {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return gather_object(mine)
