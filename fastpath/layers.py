"""The layer-level pieces: bf16_relu2, fused_norms, varlen_attention, lora_bf16, lora_addmm, frozen_out_proj.

Each `use_*` function finds the modules it changes, changes them through a `Patches` undo log and returns how
many it changed (0: nothing in this model to change). Each replacement computes the same function as the code it
replaces; its docstring says whether the bits are the same or where it rounds differently.
"""

from __future__ import annotations

import functools

import torch

from .blocks import base_of
from .packing import row_bounds
from .undo import Patches

# --- bf16_relu2 --------------------------------------------------------------------------------------------------


class _ReLUSquaredFn(torch.autograd.Function):
    """relu(x)² in x's dtype; keeps only x for the backward pass (grad * 2 relu(x))."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.relu(x).square_()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.relu(x).mul_(2).mul_(grad)


class ReLUSquared(torch.nn.Module):
    """transformers' ReLU² ('relu2') without autocast's float32 detour.

    Under bf16 autocast `square()` runs in float32: a float32 copy of the activations, float32 outputs,
    float32 backward and copies back. A bf16 product of two bf16 numbers is rounded once, like the float32
    square cast to bf16 for the next matmul, so forward and backward give the same bits (tests check it).
    """

    def forward(self, x):
        return _ReLUSquaredFn.apply(x)


def relu2_mlps(model) -> list:
    """The ReLU² MLPs (the shared experts): NemotronHMLP with transformers' ReLUSquaredActivation."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMLP

    return [m for m in model.modules()
            if isinstance(m, NemotronHMLP) and type(m.act_fn).__name__ == "ReLUSquaredActivation"]


def use_bf16_relu2(model, patches: Patches) -> int:
    """Give every ReLU² MLP a `ReLUSquared` activation; returns how many."""
    mlps = relu2_mlps(model)
    for module in mlps:
        patches.set(module, "act_fn", ReLUSquared())
    return len(mlps)


# --- fused_norms -------------------------------------------------------------------------------------------------


def _fused_rms_norm(norm, hidden_states):
    """NemotronHRMSNorm's maths in one Triton kernel (float32 inside, input dtype out)."""
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(hidden_states, norm.weight, None, eps=norm.variance_epsilon)


def rms_norms(model) -> list:
    """Every NemotronHRMSNorm of the model."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm

    return [m for m in model.modules() if isinstance(m, NemotronHRMSNorm)]


def fused_norms_problem(model) -> str | None:
    """Why fused_norms cannot run here (no mamba_ssm, or the model is not on a CUDA GPU), or None."""
    try:
        import mamba_ssm.ops.triton.layer_norm  # noqa: F401
    except ImportError:
        return "it needs mamba_ssm (LOCK=requirements-cuda.lock ./run ...)"
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"its Triton kernel needs the model on a CUDA GPU (it is on {device.type})"
    return None


def use_fused_norms(model, patches: Patches) -> int:
    """Run every NemotronHRMSNorm through mamba_ssm's fused RMSNorm; returns how many.

    transformers' version launches ~6 elementwise kernels with float32 copies of the activations,
    forward and backward, for each of the 53 norms. Same maths; the kernel rounds in other places.
    """
    norms = rms_norms(model)
    for module in norms:
        patches.set(module, "forward", functools.partial(_fused_rms_norm, module))
    return len(norms)


# --- varlen_attention --------------------------------------------------------------------------------------------

VARLEN = "packed_varlen"  # the name under which transformers' registries know varlen_attention


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
    cu_seqlens, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")  # from PackedCollator
    if cu_seqlens is None or longest is None:
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


def attention_layers(model) -> list:
    """Every NemotronHAttention of the model."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHAttention

    return [m for m in model.modules() if isinstance(m, NemotronHAttention)]


def use_varlen_attention(model, patches: Patches) -> int:
    """Switch the model's attention to `varlen_attention_forward`; returns how many attention layers use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    layers = attention_layers(model)
    if not layers:
        return 0
    patches.register(AttentionInterface, VARLEN, varlen_attention_forward)
    patches.register(AttentionMaskInterface, VARLEN, _varlen_mask)
    base = base_of(model)
    previous, cache = base.config._attn_implementation, "_can_set_attn_implementation_cached_value"
    if cache not in vars(type(base)):  # transformers memoizes a class check there: forget it again afterwards
        patches.on_undo(lambda: vars(type(base)).get(cache) is not None and delattr(type(base), cache))
    base.set_attn_implementation(VARLEN)
    patches.on_undo(lambda: base.set_attn_implementation(previous))
    return len(layers)


# --- lora_bf16 and lora_addmm ------------------------------------------------------------------------------------


def lora_layers(model) -> list:
    """Every PEFT LoRA layer that wraps a torch Linear."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None),
                                                                              torch.nn.Linear)]


def _cast_unless_autocast(original, x, dtype):
    """PEFT's input cast, skipped under autocast, which casts the input back to bf16 for the matmul anyway."""
    if x is not None and torch.is_autocast_enabled(x.device.type):
        return x
    return original(x, dtype)


def use_lora_bf16(model, patches: Patches) -> int:
    """LoRA layers keep their bf16 input under autocast; returns how many layers.

    PEFT keeps LoRA weights in float32 and copies every LoRA layer's input to float32 first; under the
    Trainer's bf16 autocast the matmul then copies it back to bf16. The result is bit for bit the same
    without both copies (two reads and writes of a tokens x width tensor, forward and backward, ~90 layers).
    Outside autocast (evaluation, CPU float32) PEFT's cast runs as before.
    """
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "_cast_input_dtype")]
    for module in layers:
        original = type(module)._cast_input_dtype.__get__(module)  # PEFT's method, bound to this layer
        patches.set(module, "_cast_input_dtype", functools.partial(_cast_unless_autocast, original))
    return len(layers)


def _lora_addmm_forward(peft_forward, layer, x, *args, **kwargs):
    """A LoRA layer's output as base(x) += scaling * (x A^T) B^T, the sum done by the GEMM itself.

    PEFT computes `result + lora_B(lora_A(x)) * scaling`: the low-rank product, its scaled copy and the sum
    are three passes over a tokens x width tensor (10,304 wide for Mamba's in_proj), forward and again
    backward. `addmm_` accumulates into the frozen layer's fresh output, which no backward pass needs.
    Anything but one plain adapter on an nn.Linear (dropout, DoRA, merged, mixed batches) runs PEFT's code, and
    so does a bf16 layer with float32 LoRA outside autocast, where PEFT's sum comes out in float32.
    """
    names = [a for a in layer.active_adapters if a in layer.lora_A]
    if (args or kwargs or layer.disable_adapters or layer.merged or len(names) != 1 or names[0] in layer.lora_variant
            or not isinstance(layer.base_layer, torch.nn.Linear) or layer.lora_B[names[0]].bias is not None
            or not isinstance(layer.lora_dropout[names[0]], torch.nn.Identity)
            or not (torch.is_autocast_enabled(x.device.type) or layer.base_layer.weight.dtype == x.dtype
                    == layer.lora_B[names[0]].weight.dtype)):
        return peft_forward(x, *args, **kwargs)
    name = names[0]
    flat = x.reshape(-1, x.shape[-1])                 # 2-D, so the sum below writes into a tensor, not a view
    result = layer.base_layer(flat)
    low = layer.lora_A[name](layer._cast_input_dtype(flat, layer.lora_A[name].weight.dtype))
    # in-place ops skip autocast: match the dtypes by hand (LoRA B is float32, tiny)
    result.addmm_(low.to(result.dtype), layer.lora_B[name].weight.t().to(result.dtype), alpha=layer.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


def use_lora_addmm(model, patches: Patches) -> int:
    """Give every LoRA Linear layer `_lora_addmm_forward`; returns how many layers."""
    layers = lora_layers(model)
    for module in layers:
        peft_forward = type(module).forward.__get__(module)
        patches.set(module, "forward", functools.partial(_lora_addmm_forward, peft_forward, module))
    return len(layers)


# --- frozen_out_proj ---------------------------------------------------------------------------------------------

KERNEL_MODULE, KERNEL_NAME = "transformers.models.nemotron_h.modeling_nemotron_h", "mamba2_split_conv1d_scan_combined"


def project_after_kernel(kernel, *args, outproj_weight=None, outproj_bias=None, **kwargs):
    """mamba_ssm's fused Mamba training kernel, with a frozen output projection applied after it.

    Given the projection, the kernel's backward always computes the projection's weight gradient (a
    tokens x 4096 x 2688 product per Mamba layer) and recomputes the input it needs, even for a frozen weight.
    The same `F.linear` outside the kernel is the same product forward (same bits); autograd then skips the
    unused gradient. A projection that trains (or a call that wants the final states) gets the kernel as it was.
    When the kernel is transformers' stub (no mamba_ssm: it returns None), None is passed on.
    """
    frozen = (outproj_weight is not None and not outproj_weight.requires_grad
              and (outproj_bias is None or not outproj_bias.requires_grad))
    if not frozen or kwargs.get("return_final_states"):
        return kernel(*args, outproj_weight=outproj_weight, outproj_bias=outproj_bias, **kwargs)
    out = kernel(*args, **kwargs)
    return None if out is None else torch.nn.functional.linear(out, outproj_weight, outproj_bias)


def frozen_projection_mixers(model) -> list:
    """The Mamba-2 mixers whose output projection is frozen (all of them, with the tutorial's LoRA targets)."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    return [m for m in model.modules() if isinstance(m, NemotronHMamba2Mixer)
            and not any(p.requires_grad for p in m.out_proj.parameters())]


def use_frozen_out_proj(model, patches: Patches) -> int:
    """Route nemotron_h's fused Mamba calls through `project_after_kernel`; returns the bindings changed (1).

    modeling_nemotron_h looks the kernel up as a module global on every call, so the binding holds for every
    nemotron_h model in the process until it is undone; for a projection that trains it changes nothing. The
    wrapper is a functools.partial whose first argument is the kernel (helpers.model.fast_kernels_status reads
    through it).
    """
    if not frozen_projection_mixers(model):
        return 0
    from transformers.models.nemotron_h import modeling_nemotron_h

    kernel = getattr(modeling_nemotron_h, KERNEL_NAME)
    patches.set_global(KERNEL_MODULE, KERNEL_NAME, functools.partial(project_after_kernel, kernel))
    return 1
