"""Stage 5: the fast path. Same rows, same LoRA, same loss; less wasted work.

Opt-in (`TrainConfig(fast=True)`, `train.py --fast`); notebook 03 keeps the plain stack so the
tutorial's comparison stays honest. Each piece is measured, one at a time, in `benchmarks/NOTES.md`;
`TrainConfig.fast_features` picks them (names in FEATURES):

1. packing: the rows of a micro-batch are concatenated into one sequence, so no token is padding.
   Each layer must still see where one row ends and the next begins:
   - attention gets `position_ids` that restart at 0 on every row; transformers turns them into a
     block-diagonal mask, so no row attends to another;
   - the Mamba-2 layers get `seq_idx` (row number of every token); the fused mamba_ssm kernels
     reset the convolution and the scan state wherever it changes. The plain PyTorch Mamba code
     ignores `seq_idx` and would carry state from one row into the next, so packing refuses to run
     on it (`require_packing_support`).
2. round_lengths: packed rows are padded to a multiple of 256 tokens, so cuDNN and Triton see a few
   shapes instead of planning and tuning for every new length.
3. lean_experts: the routed experts as two grouped GEMMs (`lean_experts_forward`).
4. fused_norms: every RMSNorm as one Triton kernel (GPU only).
5. varlen_attention: attention computed over each packed row only (`varlen_attention_forward`), not over
   the whole packed sequence with a block-diagonal mask (needs packing).
6. lora_bf16: under autocast, LoRA layers take their bf16 input as it is (`use_lora_bf16`).
Plus, outside the features: the checkpointing policy (`TrainConfig.checkpointing`, applied by
`CheckpointPolicy`) and `fold_accumulation` (one packed micro-batch per optimizer step).
"""

from __future__ import annotations

import torch

# The pieces of the fast path, by name (TrainConfig.fast_features; the benchmark's ablation drops one at a time).
FEATURES = {
    "packing": "padding-free rows with position_ids + Mamba seq_idx (PackedCollator)",
    "lean_experts": "routed experts as two grouped GEMMs without expert-parallel masking or float32 copies",
    "round_lengths": "pad each packed micro-batch to a multiple of 256 tokens, so kernels see few distinct shapes",
    "fused_norms": "every RMSNorm as mamba_ssm's fused Triton kernel (one kernel forward, one backward; GPU only)",
    "varlen_attention": "attention over each packed row only (PyTorch's variable-length FlashAttention; needs packing)",
    "lora_bf16": "under autocast, LoRA layers skip PEFT's float32 copy of their input (autocast would copy it back)",
}
DEFAULT_FEATURES = "packing,lean_experts,round_lengths,fused_norms,varlen_attention,lora_bf16"  # fused_norms: CUDA only
ROUND_TO = 256


def parse_features(features: str | None) -> set[str]:
    """The fast-path pieces named in `features` (None: all of them, less fused_norms without a GPU)."""
    if features is None:
        features = DEFAULT_FEATURES if torch.cuda.is_available() else DEFAULT_FEATURES.replace(",fused_norms", "")
    chosen = {f.strip() for f in features.split(",") if f.strip()}
    unknown = chosen - set(FEATURES)
    if unknown:
        raise ValueError(f"Unknown fast-path feature(s) {sorted(unknown)}; choose from {sorted(FEATURES)}.")
    if "varlen_attention" in chosen and "packing" not in chosen:
        raise ValueError("varlen_attention finds the rows of a packed batch from its position_ids: add 'packing' to "
                         "fast_features, or drop 'varlen_attention'.")
    return chosen

POLICY_BLOCKS = ("mamba", "moe", "attention")  # the block names a checkpointing policy uses


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Row number of every token of a packed batch: a new row starts wherever the position is 0.

    [[0,1,2,0,1,0]] -> [[0,0,0,1,1,2]] (int32, the dtype the mamba_ssm kernels expect).
    """
    return ((position_ids == 0).cumsum(-1) - 1).clamp(min=0).to(torch.int32)


class PackedCollator:
    """TRL's padding-free collator, plus `seq_idx` for the Mamba kernels.

    TRL's `DataCollatorForLanguageModeling(padding_free=True)` concatenates the rows, masks the
    first label of each and returns `position_ids` (no attention mask). We add `seq_idx`, which
    transformers' Nemotron-H passes to the fused Mamba kernels.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True,
                                                     pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["seq_idx"] = seq_idx_from_position_ids(batch["position_ids"])
        return batch


class PackingUnsupported(RuntimeError):
    """Packing would give wrong results with this model and these kernels."""


def has_mamba_layers(model) -> bool:
    """True when the model has Mamba-2 blocks (they need `seq_idx`, so the fused kernels)."""
    return any(_KINDS.get(t) == "mamba" for t in getattr(model.config, "layers_block_type", None) or [])


def kernels_problem() -> str | None:
    """Why packing cannot run on this machine (no CUDA, or transformers bound the Mamba reference), or None."""
    from .model import fast_kernels_status

    status = fast_kernels_status()
    if status["fast_path"]:
        return None
    return ("The fast path packs rows into one sequence, and only the fused mamba_ssm kernels reset the Mamba "
            f"state between rows (CUDA {status['cuda']}; mamba_ssm {status['mamba_ssm']}, causal_conv1d "
            f"{status['causal_conv1d']}, bound: {status['implementations']}). The PyTorch reference would leak each "
            "row's state into the next. Fix: train on a CUDA GPU with the kernels installed "
            "(uv sync --extra kernels), or train without fast=True.")


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


def parse_policy(policy: str) -> set[str]:
    """The block types a checkpointing policy recomputes: 'all', 'none' or e.g. 'mamba,moe'."""
    policy = policy.strip().lower()
    if policy == "all":
        return set(POLICY_BLOCKS)
    if policy in ("none", ""):
        return set()
    chosen = {p.strip() for p in policy.split(",")}
    unknown = chosen - set(POLICY_BLOCKS)
    if unknown:
        raise ValueError(f"Unknown block type(s) {sorted(unknown)} in checkpointing policy {policy!r}; use 'all', "
                         f"'none' or a comma list of {sorted(POLICY_BLOCKS)}.")
    return chosen


# transformers' names for Nemotron-H blocks -> the names used in policies
_KINDS = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
          "moe": "moe", "mlp": "moe"}


def _block_kind(block_type: str) -> str:
    """The policy name of a block ('linear_attention' is transformers' name for a Mamba-2 block)."""
    return _KINDS[block_type]


def set_checkpointing(model, policy: str) -> dict:
    """Turn activation checkpointing on or off per block, by block type. Returns {kind: blocks on}.

    Call after gradient checkpointing was enabled (the Trainer does it when training starts):
    transformers' `GradientCheckpointingLayer` recomputes only where `layer.gradient_checkpointing`.
    """
    chosen = parse_policy(policy)
    counts: dict[str, int] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in base.model.layers:
        kind = _block_kind(block.block_type)
        # `_gradient_checkpointing_func` exists once checkpointing was enabled on the model.
        block.gradient_checkpointing = kind in chosen and hasattr(block, "_gradient_checkpointing_func")
        counts[kind] = counts.get(kind, 0) + int(block.gradient_checkpointing)
    return counts


class CheckpointPolicy:
    """A TrainerCallback that applies `set_checkpointing(policy)` once the Trainer has enabled checkpointing."""

    def __new__(cls, policy: str):
        from transformers import TrainerCallback

        parse_policy(policy)  # fail now, not at step 0

        class _CheckpointPolicy(TrainerCallback):
            def __init__(self):
                self.policy, self.applied = policy, None

            def on_train_begin(self, args, state, control, model=None, **kw):
                self.applied = set_checkpointing(model, self.policy)

        return _CheckpointPolicy()


def fold_accumulation(cfg):
    """The same effective batch as one micro-batch: per-device rows x accumulation, accumulation 1."""
    return cfg.replace(per_device_train_batch_size=cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps,
                       gradient_accumulation_steps=1)


def lean_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Routed experts as two grouped GEMMs, without expert-parallel bookkeeping.

    transformers' `grouped_mm` experts support expert parallelism: they mask "sentinel" rows three
    times and combine each token's k expert outputs in float32 (tokens x k x hidden, three times the
    bytes of the bf16 outputs). With every expert on one GPU there are no sentinels. The routing
    weight multiplies the down projection's input (1,856 wide) instead of its output (2,688 wide);
    the projection is linear, so the result is the same, and the k outputs of a token just add up.
    """
    from transformers.integrations.moe import _grouped_linear

    num_tokens, k = top_k_index.shape
    expert_ids, order = torch.sort(top_k_index.reshape(-1))        # group the (token, slot) pairs by expert
    x = hidden_states[order // k]
    ids = expert_ids.float() if hidden_states.device.type == "cpu" else expert_ids.int()
    counts = torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = self.act_fn(_grouped_linear(x, self.up_proj, offsets, is_transposed=self.is_transposed))
    h = h * top_k_weights.reshape(-1)[order].to(h.dtype).unsqueeze(-1)  # routing weight, before down_proj
    y = _grouped_linear(h, self.down_proj, offsets, is_transposed=self.is_transposed)
    y = torch.empty_like(y).index_copy(0, order, y)                  # back to (token, slot) order
    return y.view(num_tokens, k, -1).sum(dim=1)                      # add up each token's k experts


def use_lean_experts(model) -> str:
    """Switch the model's routed experts to `lean_experts_forward`; returns the previous implementation."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("lean_grouped_mm", lean_experts_forward)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._experts_implementation
    base.config._experts_implementation = "lean_grouped_mm"
    return previous


def _fused_rms_norm(norm, hidden_states):
    """NemotronHRMSNorm's maths in one Triton kernel (float32 inside, input dtype out)."""
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    return rms_norm_fn(hidden_states, norm.weight, None, eps=norm.variance_epsilon)


def use_fused_norms(model) -> int:
    """Run every NemotronHRMSNorm through mamba_ssm's fused RMSNorm; returns how many were switched.

    transformers' version launches ~6 elementwise kernels with float32 copies of the activations,
    forward and backward, for each of the 53 norms. Needs CUDA and mamba_ssm (the Mamba kernels' package).
    """
    import functools

    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm

    device = next(model.parameters()).device
    try:
        import mamba_ssm.ops.triton.layer_norm  # noqa: F401
    except ImportError as error:
        raise RuntimeError("fused_norms needs mamba_ssm (uv sync --extra kernels); drop it from fast_features "
                           "otherwise.") from error
    if device.type != "cuda":
        raise RuntimeError(f"fused_norms runs Triton kernels, which need a CUDA GPU (model on {device.type}); drop "
                           "it from fast_features on this machine.")
    switched = 0
    for module in model.modules():
        if isinstance(module, NemotronHRMSNorm):
            module.forward = functools.partial(_fused_rms_norm, module)
            switched += 1
    return switched


_LAST_BOUNDS: list = [None, None]  # (position_ids, bounds) of the last packed batch: its 6 attention layers share it


def row_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Where each row of a packed batch starts, as FlashAttention wants it: (cu_seqlens, longest row).

    [[0,1,2,0,1,0]] -> ([0,3,5,6], 3). Reading the longest row waits for the GPU once per batch, so the
    answer is kept for the other attention layers of the same forward pass.
    """
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    if _LAST_BOUNDS[0] is position_ids:
        return _LAST_BOUNDS[1]
    (cu_seqlens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)  # transformers' own
    bounds = (cu_seqlens, int(longest))
    _LAST_BOUNDS[:] = [position_ids, bounds]
    return bounds


def _attend_row_by_row(q, k, v, cu_seqlens, scale):
    """The reference for `varlen_attn` where it does not run (CPU): causal SDPA on each row, one at a time."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        rows = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (heads, length, head_dim)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            *rows, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             position_ids=None, **kwargs):
    """Causal attention inside each row of a packed batch, and nothing across rows.

    transformers' SDPA path turns packed `position_ids` into a dense block-diagonal mask over the whole
    packed sequence (8k x 8k at 8k tokens) and computes every score, although a MedMCQA row (~120 tokens)
    sees only itself: over 98% of that work is masked away. PyTorch's `varlen_attn` (FlashAttention with
    cumulative row offsets) computes only the rows' own scores. Anything that is not one packed training
    sequence (a padded batch with a mask, decoding with a cache) goes to transformers' SDPA unchanged.
    """
    packed = (attention_mask is None and position_ids is not None and query.shape[0] == 1
              and query.shape[2] == key.shape[2] and dropout == 0.0)
    if not packed:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    cu_seqlens, longest = row_bounds(position_ids)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim), no copy
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scaling, window_size=(-1, 0))
    else:
        out = _attend_row_by_row(q, k, v, cu_seqlens, scaling)
    return out.unsqueeze(0), None  # (1, tokens, heads, head_dim), as transformers expects


def _varlen_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """No mask for a packed training batch (the rows come from position_ids); SDPA's mask for anything else."""
    if attention_mask is None and batch_size == 1:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(batch_size, q_length, kv_length, attention_mask=attention_mask, **kwargs)


def use_varlen_attention(model) -> str:
    """Switch the attention layers to `varlen_attention_forward`; returns the previous implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("packed_varlen", varlen_attention_forward)
    AttentionMaskInterface.register("packed_varlen", _varlen_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    base.set_attn_implementation("packed_varlen")
    return previous


def _cast_unless_autocast(original, x, dtype):
    """PEFT's input cast, skipped under autocast, which casts the input back to bf16 for the matmul anyway."""
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return original(x, dtype)


def use_lora_bf16(model) -> int:
    """LoRA layers keep their bf16 input under autocast; returns how many layers were switched.

    PEFT keeps LoRA weights in float32 and copies every LoRA layer's input to float32 first; under the
    Trainer's bf16 autocast the matmul then copies it back to bf16. The result is bit for bit the same
    without both copies (two reads and writes of a tokens x width tensor, forward and backward, ~90 layers).
    Outside autocast (evaluation, CPU float32) PEFT's cast runs as before.
    """
    import functools

    switched = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
            original = type(module)._cast_input_dtype.__get__(module)  # PEFT's method, bound to this layer
            module._cast_input_dtype = functools.partial(_cast_unless_autocast, original)
            switched += 1
    return switched


def use_model_features(model, features: set[str]):
    """Switch the model-level pieces named in `features`; returns a function that switches them back.

    (packing and round_lengths live in the collator, not in the model.)
    """
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    previous = {"experts": config._experts_implementation, "attention": config._attn_implementation}
    if "lean_experts" in features:
        use_lean_experts(model)
    if "fused_norms" in features:
        use_fused_norms(model)
    if "varlen_attention" in features:
        use_varlen_attention(model)
    if "lora_bf16" in features:
        use_lora_bf16(model)

    def restore():
        config._experts_implementation = previous["experts"]
        if config._attn_implementation != previous["attention"]:
            base.set_attn_implementation(previous["attention"])
        for module in model.modules():
            for name in ("forward", "_cast_input_dtype"):  # instance attributes set above shadow the class's
                if name in vars(module) and (name != "forward" or isinstance(module, NemotronHRMSNorm)):
                    delattr(module, name)
    return restore
