"""The routed experts without transformers' expert-parallel bookkeeping: lean_experts, compact_experts and its
two compiled steps (fused_expert_act, fused_slot_sum).

transformers dispatches every `NemotronHExperts` call through `config._experts_implementation`, a name in its
experts registry (`ALL_EXPERTS_FUNCTIONS`). `use_experts` registers one of ours and switches the name.
"""

from __future__ import annotations

import torch

from .blocks import base_of
from .undo import Patches


def _route(top_k_index: torch.Tensor, num_experts: int):
    """Sort the (token, slot) pairs by expert, as grouped GEMMs want them.

    Returns `order` (sorted row -> its flat (token, slot) position), `token_of` (sorted row -> its token),
    `slot_rows` (tokens x k: where each (token, slot) went) and `offsets` (end row of each expert's group, int32).
    """
    num_tokens, k = top_k_index.shape
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    slot_rows = torch.empty_like(order)
    slot_rows[order] = torch.arange(order.numel(), device=order.device)
    ids = expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int()  # histc: no ints on CPU
    offsets = torch.cumsum(torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1), dim=0, dtype=torch.int32)
    return order, order // k, slot_rows.view(num_tokens, k), offsets


def _add_up_slots(rows: torch.Tensor, slot_rows: torch.Tensor) -> torch.Tensor:
    """out[t] = sum of rows[slot_rows[t, j]] over the k slots j (each token's expert rows, added up)."""
    return rows[slot_rows].sum(dim=1)


def lean_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Routed experts as two grouped GEMMs, without expert-parallel bookkeeping.

    transformers' `grouped_mm` experts support expert parallelism: they mask "sentinel" rows three
    times and combine each token's k expert outputs in float32 (tokens x k x hidden, three times the
    bytes of the bf16 outputs). With every expert on one GPU there are no sentinels. The routing
    weight multiplies the down projection's input (1,856 wide) instead of its output (2,688 wide);
    the projection is linear, so the result is the same, and the k outputs of a token just add up
    (with autocast off: autocast would sum in float32 and leave the residual stream in float32).
    """
    from transformers.integrations.moe import _grouped_linear

    order, token_of, slot_rows, offsets = _route(top_k_index, self.num_experts)
    h = self.act_fn(_grouped_linear(hidden_states[token_of], self.up_proj, offsets, is_transposed=self.is_transposed))
    h = h * top_k_weights.reshape(-1)[order].to(h.dtype).unsqueeze(-1)  # routing weight, before down_proj
    y = _grouped_linear(h, self.down_proj, offsets, is_transposed=self.is_transposed)
    with torch.autocast(y.device.type, enabled=False):
        return _add_up_slots(y, slot_rows)


def _relu2_weighted(h, w):
    """a = relu(h)² * w, the experts' activation times the routing weight (h: rows x 1,856, w: rows x 1)."""
    return torch.relu(h).square_().mul_(w)  # one new tensor, then in place


def _relu2_weighted_backward(grad_a, h, w):
    """(d loss / d h, d loss / d w) of `_relu2_weighted`: grad_a * 2 relu(h) w, and the row sums of
    grad_a * relu(h)²."""
    r = torch.relu(h)
    grad_ar = grad_a * r
    grad_w = (grad_ar * r).sum(-1)
    return grad_ar.mul_(2 * w), grad_w


_COMPILED: dict = {}  # function -> its torch.compile'd version (compiled once per process; a cache, not a patch)


def compiled(fn):
    """`fn` compiled once by torch.compile (any row count: dynamic shapes), so its elementwise steps and row sum
    run as one generated kernel instead of one kernel and one full-size temporary each."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


class CompactExperts(torch.autograd.Function):
    """Routed experts (ReLU² MLPs) with the backward pass written out: bf16 throughout, little kept.

    Forward, per (token, slot) pair sorted by expert: h = x W_up, a = relu(h)² * weight, y = a W_down,
    and each token adds up its k rows of y. Autograd would keep x (gathered), h, relu(h), relu(h)² and a,
    and under autocast compute the square in float32; this keeps only h (tokens x k x 1,856, bf16) and
    recomputes relu(h) in backward, which is cheap. That is what lets the MoE blocks skip recomputation
    (`--checkpointing moe:N`). `fused` names the steps that run as torch.compile kernels: "act" (the
    activation, forward and backward) and "sum" (adding up each token's k rows). The expert weights must be
    frozen: with routed-expert LoRA `compact_experts_forward` uses `lean_experts_forward` instead.
    """

    @staticmethod
    def forward(ctx, hidden, weights, top_k_index, up, down, transposed: bool, fused: frozenset = frozenset()):
        from transformers.integrations.moe import _grouped_linear

        activation = compiled(_relu2_weighted) if "act" in fused else _relu2_weighted
        add_up = compiled(_add_up_slots) if "sum" in fused else _add_up_slots
        with torch.autocast(hidden.device.type, enabled=False):    # every op in the weights' dtype
            order, token_of, slot_rows, offsets = _route(top_k_index, up.shape[0])
            h = _grouped_linear(hidden.to(up.dtype)[token_of], up, offsets, is_transposed=transposed)
            w = weights.reshape(-1)[order].to(up.dtype).unsqueeze(-1)
            out = add_up(_grouped_linear(activation(h, w), down, offsets, is_transposed=transposed), slot_rows)
        ctx.save_for_backward(h, w, token_of, slot_rows, offsets, up, down)
        ctx.transposed, ctx.dtypes, ctx.fused = transposed, (hidden.dtype, weights.dtype), fused
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from transformers.integrations.moe import _grouped_linear

        h, w, token_of, slot_rows, offsets, up, down = ctx.saved_tensors
        flip = not ctx.transposed                                   # backward multiplies by the transposes
        activation_backward = compiled(_relu2_weighted_backward) if "act" in ctx.fused else _relu2_weighted_backward
        add_up = compiled(_add_up_slots) if "sum" in ctx.fused else _add_up_slots
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_y = grad_out.to(h.dtype)[token_of]                 # every slot gets its token's gradient
            grad_h, grad_w = activation_backward(_grouped_linear(grad_y, down, offsets, is_transposed=flip), h, w)
            grad_hidden = add_up(_grouped_linear(grad_h, up, offsets, is_transposed=flip), slot_rows)
            grad_weights = grad_w[slot_rows]                        # back to (token, slot) order
        return grad_hidden.to(ctx.dtypes[0]), grad_weights.to(ctx.dtypes[1]), None, None, None, None, None


def compact_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """`CompactExperts` for frozen experts; `lean_experts_forward` when the expert weights train (routed LoRA).

    Which of its steps run compiled (fused_expert_act, fused_slot_sum) is set on the module by `use_experts`,
    as `_fast_fused`.
    """
    up, down = self.up_proj, self.down_proj
    if torch.is_grad_enabled() and (up.requires_grad or down.requires_grad):
        return lean_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return CompactExperts.apply(hidden_states, top_k_weights, top_k_index, up, down, bool(self.is_transposed),
                                getattr(self, "_fast_fused", frozenset()))


EXPERTS = {"lean_grouped_mm": lean_experts_forward, "compact_grouped_mm": compact_experts_forward}
FUSED_STEPS = {"fused_expert_act": "act", "fused_slot_sum": "sum"}  # piece -> CompactExperts' step it compiles


def routed_experts(model) -> list:
    """Every routed-experts module of the model (transformers' NemotronHExperts)."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    return [module for module in model.modules() if isinstance(module, NemotronHExperts)]


def training_experts(model) -> list:
    """The routed-experts modules whose weights train: PEFT's `target_parameters` LoRA wraps them (ParamWrapper,
    one per parameter, nested) and adds its update only during the forward pass, so the weights themselves
    look frozen until then."""
    found = []
    for module in model.modules():
        if getattr(module, "parameter_name", None) and hasattr(module, "base_layer") and any(
                p.requires_grad for name, p in module.named_parameters() if "lora_" in name):
            inner = module.base_layer
            while hasattr(inner, "base_layer"):
                inner = inner.base_layer
            if inner not in found:
                found.append(inner)
    return found


def frozen_experts(model) -> list:
    """The routed-experts modules whose weights stay frozen (the ones compact_experts runs)."""
    training = training_experts(model)
    return [module for module in routed_experts(model) if not any(module is t for t in training)]


def use_experts(model, name: str, patches: Patches, fused: frozenset = frozenset()) -> int:
    """Switch the model's routed experts to EXPERTS[name] (lean or compact); returns how many modules now run it.

    `fused` (compact only): the CompactExperts steps to compile ("act", "sum"), set on each frozen experts module.
    """
    from transformers.integrations.moe import ExpertsInterface

    modules = routed_experts(model)
    if not modules:
        return 0
    patches.register(ExpertsInterface, name, EXPERTS[name])
    patches.set(base_of(model).config, "_experts_implementation", name)
    for module in frozen_experts(model) if fused else []:
        patches.set(module, "_fast_fused", frozenset(fused))
    return len(modules)
