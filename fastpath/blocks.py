"""Finding one's way in a Nemotron-H model: the transformers model inside PEFT's wrapper, and its block types."""

from __future__ import annotations

# transformers' names for Nemotron-H blocks -> the names checkpointing policies use ('linear_attention' is
# transformers' name for a Mamba-2 block; dense MLP blocks count as 'moe')
BLOCK_KINDS = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
               "moe": "moe", "mlp": "moe"}


def base_of(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def block_kind(block_type: str) -> str:
    """The policy name ('mamba', 'moe', 'attention') of a transformers block type."""
    return BLOCK_KINDS[block_type]


def blocks(model) -> list:
    """The model's blocks (decoder layers), in order."""
    return list(base_of(model).model.layers)


def has_mamba_layers(model) -> bool:
    """True when the model has Mamba-2 blocks (packing then needs the fused kernels, which read `seq_idx`)."""
    types = getattr(model.config, "layers_block_type", None) or []
    return any(BLOCK_KINDS.get(t) == "mamba" for t in types)
