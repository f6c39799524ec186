"""What the fast path may do: the names of its pieces, the checkpointing policies, and `Settings`.

Nothing here imports transformers, PEFT or TRL, so train.py can check its flags before anything heavy loads.
"""

from __future__ import annotations

import torch

# The pieces of the fast path, by name (train.py --fast-features; the benchmark's ablation drops one at a time).
FEATURES = {
    "packing": "padding-free rows with position_ids + Mamba seq_idx + attention row bounds (PackedCollator)",
    "round_lengths": "pad each packed micro-batch to a multiple of 256 tokens, so kernels see few distinct shapes",
    "lean_experts": "routed experts as two grouped GEMMs without expert-parallel masking or float32 copies",
    "fused_norms": "every RMSNorm as mamba_ssm's fused Triton kernel (one kernel forward, one backward; GPU only)",
    "varlen_attention": "attention over each packed row only (PyTorch's variable-length FlashAttention)",
    "lora_bf16": "under autocast, LoRA layers skip PEFT's float32 copy of their input (autocast would copy it back)",
    "bf16_relu2": "the shared experts' ReLU² in bf16 (autocast computes square() in float32 and keeps float32 copies)",
    "compact_experts": "frozen routed experts as one bf16 autograd function that saves only the up projection's "
                       "output",
    "lora_addmm": "LoRA's scaled low-rank product added into the frozen layer's output by one in-place GEMM",
    "fused_expert_act": "compact experts' relu(h)² x routing weight, forward and backward, as one torch.compile "
                        "kernel each",
    "fused_slot_sum": "compact experts gather and add up each token's k rows in one torch.compile kernel",
    "frozen_out_proj": "Mamba's frozen output projection outside the fused kernel, whose backward would compute "
                       "the projection's unused weight gradient",
    "gc_freeze": "Python's garbage collector skips the objects that exist when training starts (gc.freeze)",
}
GPU_ONLY = ("fused_norms", "fused_expert_act", "fused_slot_sum")  # not in the default set without CUDA
REQUIRES = {  # piece -> (the piece it needs, why)
    "round_lengths": ("packing", "pads the packed sequence"),
    "varlen_attention": ("packing", "finds the rows of a packed batch from its position_ids"),
    "compact_experts": ("lean_experts", "hands experts that train (routed-expert LoRA) to lean_experts"),
    "fused_expert_act": ("compact_experts", "fuses a step of compact_experts"),
    "fused_slot_sum": ("compact_experts", "fuses a step of compact_experts"),
}
ROUND_TO = 256  # round_lengths: packed sequences are padded to a multiple of this many tokens
POLICY_BLOCKS = ("mamba", "moe", "attention")  # the block names a checkpointing policy uses
FEATURES_FLAG, POLICY_FLAG = "--fast-features", "--checkpointing"  # train.py's names for the two settings


class Refused(Exception):
    """The fast path will not run as asked; the message names the problem and the fix, in train.py's flags."""


def parse_features(features: str | None) -> frozenset[str]:
    """The fast-path pieces named in `features`, a comma list (None: all of them, less GPU_ONLY without CUDA)."""
    if features is None:
        return frozenset(f for f in FEATURES if torch.cuda.is_available() or f not in GPU_ONLY)
    chosen = {f.strip() for f in features.split(",") if f.strip()}
    if not chosen:
        raise Refused(f"{FEATURES_FLAG} names no piece: name at least one of {', '.join(FEATURES)}, "
                      "or train without --fast.")
    unknown = sorted(chosen - set(FEATURES))
    if unknown:
        raise Refused(f"unknown fast-path piece(s) {', '.join(unknown)} in {FEATURES_FLAG}; "
                      f"choose from {', '.join(FEATURES)}.")
    for name, (needed, why) in REQUIRES.items():
        if name in chosen and needed not in chosen:
            raise Refused(f"{name} {why}: add {needed} to {FEATURES_FLAG}, or drop {name}.")
    return frozenset(chosen)


def parse_policy(policy: str) -> dict[str, int | None]:
    """The block types a checkpointing policy recomputes, and how many of each (None: all of them).

    'all', 'none', or a comma list such as 'mamba,moe' or 'moe:8' (only the first 8 MoE blocks recompute; the
    others keep their activations, which is faster where memory allows).
    """
    text = policy.strip().lower()
    if text == "all":
        return dict.fromkeys(POLICY_BLOCKS)
    if text == "none":
        return {}
    chosen = {}
    for part in text.split(","):
        kind, _, count = part.strip().partition(":")
        if kind not in POLICY_BLOCKS or (count and not count.isdigit()):
            raise Refused(f"{POLICY_FLAG} {policy!r} is not a policy: use 'all', 'none' or a comma list of "
                          f"{', '.join(POLICY_BLOCKS)}, each with an optional count of blocks (e.g. 'moe:2').")
        chosen[kind] = int(count) if count else None
    return chosen


class Settings:
    """Which fast-path pieces to use and which blocks recompute their activations, checked at once.

    `Settings()` is the default: every piece (less GPU_ONLY without CUDA), every block recomputed ('all').
    `features` is a comma list of FEATURES (train.py --fast-features); `checkpointing` a policy (--checkpointing).
    Pieces named explicitly must change the model: `fastpath.applied` refuses one that would change nothing.
    Pieces of the default set that do not fit the model (no routed expert frozen, say) are left out, and said so.
    """

    def __init__(self, features: str | None = None, checkpointing: str = "all"):
        self.features = features
        self.pieces: frozenset[str] = parse_features(features)
        self.explicit = features is not None  # named by the user: a piece that fits nothing is an error
        self.checkpointing = checkpointing.strip().lower()
        self.policy = parse_policy(checkpointing)

    def ordered(self) -> list[str]:
        """The pieces in FEATURES' order (the order they are applied and reported in)."""
        return [f for f in FEATURES if f in self.pieces]

    def __repr__(self) -> str:
        return f"Settings(features={self.features!r}, checkpointing={self.checkpointing!r})"
