"""4-bit (QLoRA) loading for notebooks 02-03 and train.py, where the bf16 model does not fit the GPU:
`choose_precision` picks bf16 or NF4; `load_model_4bit` quantizes the routed experts (29.4B of the 31.6B parameters)
to NF4 as `from_pretrained` sets them, so the bf16 model is never whole on the GPU (on a 24 GB card the other
linears too); `LORA_TARGETS_4BIT` keeps LoRA where 4-bit can carry it (model.check_lora_targets checks). No
`prepare_model_for_kbit_training`: TRL already enables input gradients for checkpointing, and that step would copy
the 2.2B unquantized parameters to float32 (+4 GiB).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from unittest import mock

import torch

from .model import DEFAULT_MODEL_ID, GIB, LORA_TARGET_MODULES, WEIGHTS_GIB, _version, load_tokenizer

EXPERT_PARAMETERS = ("up_proj", "down_proj")  # NemotronHExperts' fused (experts, out, in) tensors
# bf16 training needs the loaded model (58.9 GiB allocated), the peak above it (8.6 GiB at 8,192 tokens/step on an
# H100) and ~1.5 GiB of CUDA context: 69 GiB (an "80 GB" card has 79.2). NF4 experts peaked at 26.9 GiB (4,096
# tokens/step), so below 30 GiB (24 GB cards) the other linears go to NF4 too, with double quantization.
BF16_MIN_GIB, ALL_LINEARS_BELOW_GIB = 58.9 + 8.6 + 1.5, 30.0
# Never quantized: the fused Mamba kernel reads out_proj's weight itself; conv1d, the router and the LM head are
# small and sensitive (conv1d and the router are not nn.Linear anyway).
KEEP_BF16 = ["out_proj", "conv1d", "gate", "lm_head"]
# helpers.model.LORA_TARGET_MODULES as a regex that skips `experts.parametrizations.up_proj` (the NF4 container,
# which PEFT would match by its name and refuse); on a bf16 model it selects exactly the same modules.
LORA_TARGETS_4BIT = r"^(?!.*\.parametrizations\.).*\.(" + "|".join(LORA_TARGET_MODULES) + r")$"
VERIFIED_TRANSFORMERS = "5.17.0"  # the loading internals patched below, checked with this version


def require_bitsandbytes() -> str:
    """The installed bitsandbytes version; one clear error if it is missing or older than 0.50."""
    version = _version("bitsandbytes")
    if version is None or tuple(int(x) for x in version.split(".")[:2]) < (0, 50):
        raise RuntimeError(f"4-bit loading needs bitsandbytes >= 0.50 (found: {version or 'not installed'}; 0.50 fixed"
                           " a leak of dequantized weights under gradient checkpointing). Fix: run through `./run ...`"
                           " (it installs requirements.lock's bitsandbytes 0.50.2), restart Python, or load in bf16.")
    return version


def gpu_gib() -> float | None:
    """This GPU's memory in GiB (None without CUDA)."""
    gpu = torch.cuda.is_available()
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB if gpu else None


def choose_precision(load_in_4bit="auto", gpu_total_gib=None) -> tuple[str, str]:
    """("bf16" or "nf4", why). `load_in_4bit`: "auto" (bf16 where the card holds the bf16 model and its training,
    else NF4; full precision on a CPU), True/False or "true"/"false". `gpu_total_gib`: default this GPU's."""
    choice = str(load_in_4bit).strip().lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"load_in_4bit={load_in_4bit!r}: use \"auto\", \"true\" or \"false\" "
                         "(LOAD_IN_4BIT in the notebooks, --set load_in_4bit=... in train.py).")
    total = gpu_gib() if gpu_total_gib is None else gpu_total_gib
    card, fits = ("no GPU", True) if total is None else (f"a {total:.0f} GiB GPU", total >= BF16_MIN_GIB)
    mode = "NF4 routed experts" if total is None or total >= ALL_LINEARS_BELOW_GIB else "NF4 experts and linears"
    nf4 = f"{mode} (~{WEIGHTS_GIB[mode]} GiB of weights)"
    bf16 = f"bf16 needs ~{BF16_MIN_GIB:.0f} GiB ({WEIGHTS_GIB['bf16']} of weights + training)"
    if choice != "auto":
        forced = "nf4" if choice == "true" else "bf16"
        why = nf4 if forced == "nf4" else "" if fits else f"{bf16}: expect out of memory"
        return forced, f"load_in_4bit={choice} on {card}" + (f": {why}" if why else "")
    if fits:
        return "bf16", "no GPU: full precision (float32) on the CPU" if total is None else f"{card} has room: {bf16}"
    return "nf4", f"{card}: {bf16}, so {nf4}"


@contextlib.contextmanager
def _experts_to_nf4_on_arrival(double_quant: bool):
    """Quantize each routed-expert stack the moment transformers sets it on its module (a torch parameter-
    registration hook): one bf16 stack (1.2 GiB at full size) waits on the GPU at a time. Inside the block, two of
    transformers' loading internals are patched (restored on exit): one tensor at a time (a loading thread pool
    would run ahead with bf16 copies), and no allocator warm-up (it would reserve the bf16 size of every weight)."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn.parametrize import replace_parameter_4bit_prequantized
    from torch.nn.modules.module import register_module_parameter_registration_hook
    from transformers import __version__, modeling_utils

    if __version__ != VERIFIED_TRANSFORMERS or not hasattr(modeling_utils, "caching_allocator_warmup"):
        print(f"Note: 4-bit loading was checked with transformers {VERIFIED_TRANSFORMERS}, this is {__version__}: "
              "if loading runs out of memory, use the locked stack (`./run ...`).")
    arrived = []

    def quantize(module, name, param):
        if type(module).__name__ != "NemotronHExperts" or name not in EXPERT_PARAMETERS or param.is_meta:
            return None
        # bitsandbytes' CPU dequantize is exact only for rows of whole blocks (the tiny down_proj's are 32 long)
        blocksize = 32 if not param.is_cuda and param.shape[-1] % 64 else None
        data, state = bnb_functional.quantize_4bit(param.data, blocksize=blocksize, quant_type="nf4",
                                                   compress_statistics=double_quant)
        packed = torch.nn.Parameter(data, requires_grad=False)
        packed._is_hf_initialized = True  # loaded: transformers must not initialise it again
        arrived.append((module, name, state))
        return packed

    handle = register_module_parameter_registration_hook(quantize)
    try:
        with mock.patch.dict(os.environ, {"HF_DEACTIVATE_ASYNC_LOAD": "1"}), \
                mock.patch.object(modeling_utils, "caching_allocator_warmup", lambda *a, **k: None, create=True):
            yield arrived
    finally:
        handle.remove()
    for module, name, state in arrived:  # the dequantizing parametrization, registered as bitsandbytes does
        replace_parameter_4bit_prequantized(module, name, state.as_dict(), state.absmax.device)


def load_model_4bit(model_id=DEFAULT_MODEL_ID, revision=None, all_linears="auto", **from_pretrained):
    """(model, tokenizer) as notebook 03's bf16 loading cell makes them, the routed experts in NF4 (bf16 on this GPU,
    float32 on a CPU). `all_linears` (the 24 GB mode; "auto": below ALL_LINEARS_BELOW_GIB): attention, Mamba in_proj
    and shared experts in NF4 too. Prints the time, the tensors quantized, GPU memory and peak CPU RAM (which counts
    checkpoint pages read through mmap). `model_id=None` builds from `config=` and `state_dict=` (the benchmark),
    without a tokenizer."""
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, NemotronHForCausalLM

    tokenizer = None if model_id is None else load_tokenizer(model_id, revision)  # (builds the tiny model once)
    gpu, start = torch.cuda.is_available(), time.perf_counter()
    all_linears = gpu and gpu_gib() < ALL_LINEARS_BELOW_GIB if all_linears == "auto" else all_linears
    dtype = torch.bfloat16 if gpu else torch.float32
    from_pretrained["device_map"] = from_pretrained.get("device_map") or ({"": torch.cuda.current_device()}
                                                                          if gpu else "cpu")
    linears = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=KEEP_BF16) if all_linears else None
    with _experts_to_nf4_on_arrival(double_quant=bool(all_linears)) as arrived:
        model = (NemotronHForCausalLM if model_id is None else AutoModelForCausalLM).from_pretrained(
            model_id and str(model_id), revision=revision, dtype=dtype, quantization_config=linears,
            trust_remote_code=False, **from_pretrained)
    if not arrived:
        raise ValueError(f"{model_id} has no NemotronH routed experts: load_model_4bit is for 'nemotron_h' "
                         f"checkpoints ({DEFAULT_MODEL_ID}, or the offline tiny model).")
    for module in () if gpu else model.modules():      # bitsandbytes' CPU inference repacking needs
        if hasattr(module, "support_avx512bf16_for_cpu"):  # out_features % 32 == 0 (the tiny in_proj has 328)
            module.support_avx512bf16_for_cpu = False
    print(f"Loaded {model_id} in {time.perf_counter() - start:.1f} s: {len(arrived)} routed-expert tensors in NF4"
          f"{', other linears too' if all_linears else ''}"
          f"{f', GPU {torch.cuda.memory_allocated() / GIB:.1f} GiB allocated' if gpu else ''}, peak CPU RAM of "
          f"this process {_peak_ram_gib()} GiB")
    return model, tokenizer


def _peak_ram_gib() -> float | str:
    """This process's peak resident memory so far in GiB (ru_maxrss: KiB on Linux, bytes on macOS; n/a on Windows)."""
    try:
        import resource
    except ImportError:
        return "n/a"
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20), 1)
