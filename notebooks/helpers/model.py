"""Notebook 02's helpers (notebooks 03-04 and train.py use them too): pre-flight checks, the tokenizer, parameter
counts, memory, LoRA targets, saving a merged model. The lesson's own calls (`from_pretrained`, `LoraConfig`,
`get_peft_model`) stay in the notebooks' cells; transformers and peft are imported inside functions, so that
`import unsloth` (which patches them) can come first in notebook 04.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_MODEL_ID, TINY_MODEL

GIB = 2**30
# GiB of weights of the default model: bf16 (31.58B x 2 bytes), and with NF4 routed experts (quant.py), counted
# from the shapes; the NF4 share also sizes the 4-bit fallback of other checkpoints in the pre-flight GPU check.
WEIGHTS_GIB = {"bf16": 58.8, "NF4 routed experts": 19.5, "NF4 experts and linears": 16.5}
NF4_SHARE = WEIGHTS_GIB["NF4 routed experts"] / WEIGHTS_GIB["bf16"]


@dataclass
class Check:
    """One pre-flight check: what was checked, whether it passed, and how to fix it if not."""
    name: str
    ok: bool
    message: str
    fix: str = ""

    def __str__(self) -> str:
        line = f"[{'OK' if self.ok else 'FAIL'}] {self.name}: {self.message}"
        return line if self.ok or not self.fix else f"{line} | fix: {self.fix}"


def _version(distribution: str) -> str | None:
    """The installed version of a pip distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def fast_kernels_status() -> dict:
    """Which Mamba-2 code transformers will really run: the fused CUDA kernels or its torch reference. transformers
    tries mamba_ssm / causal_conv1d once, when modeling_nemotron_h is imported, and keeps what it found in each kernel
    wrapper's closure: this reads it back. Kernels installed after that import count after a restart."""
    from transformers.models.nemotron_h import modeling_nemotron_h as nemotron_h

    def bound(fn) -> str:
        fn = fn.args[0] if isinstance(fn, functools.partial) and fn.args else fn  # fastpath wraps it in a partial
        found = inspect.getclosurevars(fn).nonlocals.get("implementation") if inspect.isfunction(fn) else None
        module = getattr(found, "__module__", None) or "unknown"  # unknown: patched, or a hub kernel
        return "torch reference" if module.startswith("transformers") else module

    implementations = {op: bound(fn) for op, fn in [
        ("training (fused conv + scan + norm + out_proj)", nemotron_h.mamba2_split_conv1d_scan_combined),
        ("causal conv1d", nemotron_h.causal_conv1d_fn), ("chunked scan", nemotron_h.mamba2_chunk_scan)]}
    status = {"cuda": torch.cuda.is_available(), "mamba_ssm": _version("mamba-ssm"),
              "causal_conv1d": _version("causal-conv1d"), "implementations": implementations}
    status["fast_path"] = (status["cuda"] and None not in (status["mamba_ssm"], status["causal_conv1d"])
                           and "torch reference" not in implementations.values())
    return status


def _weights_gib(model_id: str) -> float | None:
    """GiB of weights: measured for the default model, the *.safetensors on disk for a local folder (the tiny
    model, a merged one), else None (unknown, not checked)."""
    if model_id == DEFAULT_MODEL_ID:
        return WEIGHTS_GIB["bf16"]
    files = list(Path(model_id).glob("*.safetensors")) if Path(model_id).is_dir() else []
    return sum(f.stat().st_size for f in files) / GIB if files else None


def _check_gpu(need_gib, four_bit_gib=None) -> Check:
    """Is there a GPU with enough free memory for the bf16 weights, or else (when allowed) the 4-bit ones?"""
    if not torch.cuda.is_available():
        tiny = need_gib is not None and need_gib < 1
        return Check("GPU", tiny, "no GPU: fine for the offline tiny model only" if tiny else "no GPU: this model "
                     f"needs a CUDA GPU{f' with ~{need_gib:.0f} GiB free' if need_gib else ''} for its weights",
                     "run on a CUDA GPU (bf16: 80 GB; 4-bit: 40 GB, even 24 GB); on a CPU use the offline tiny model "
                     "(train.py --preset smoke; notebooks: MODEL_ID=outputs/tiny-nemotron)")
    free, total = (x / GIB for x in torch.cuda.mem_get_info())
    gpu = f"{torch.cuda.get_device_name()}: {free:.1f} of {total:.1f} GiB free"
    if need_gib is None or free >= need_gib:
        return Check("GPU", True, gpu + (f"; bf16 weights need ~{need_gib:.0f} GiB" if need_gib else ""))
    if four_bit_gib is not None and free >= four_bit_gib:
        return Check("GPU", True, f"{gpu}: too small for the bf16 weights (~{need_gib:.0f} GiB), enough for the "
                                  f"4-bit ones (~{four_bit_gib:.0f} GiB)")
    allow = "" if four_bit_gib else ", or allow 4-bit (LOAD_IN_4BIT / --set load_in_4bit=auto)"
    return Check("GPU", False, f"{gpu}; the weights alone need ~{four_bit_gib or need_gib:.0f} GiB even in the "
                 "smallest allowed mode", f"use a larger card (or stop other processes on it: nvidia-smi){allow}")


def _existing_parent(path) -> Path:
    """`path` or its nearest existing parent, so free space can be read before it is created."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def _check_disk(model_id, need_gib) -> Check:
    """Is there room for the download in the Hugging Face cache (unless the weights are on disk already)?"""
    from huggingface_hub import constants, try_to_load_from_cache

    folder = _existing_parent(constants.HF_HUB_CACHE)
    free = shutil.disk_usage(folder).free / GIB
    if not Path(model_id).is_dir() and (Path(model_id).is_absolute() or model_id.startswith(".")):
        return Check("disk", True, f"{free:.0f} GiB free at {folder} (no model at {model_id}: not checked)")
    if Path(model_id).is_dir() or isinstance(try_to_load_from_cache(model_id, "config.json"), str):
        return Check("disk", True, f"weights already on disk ({free:.0f} GiB free at {folder})")
    if need_gib is None:
        return Check("disk", True, f"{free:.0f} GiB free at {folder} (model size unknown, not checked)")
    return Check("disk", free >= need_gib, f"{free:.0f} GiB free at {folder}, ~{need_gib:.0f} GiB needed for the "
                 "download", "free disk space, or point HF_HOME to a disk with room")


def _check_model(model_id) -> Check:
    """Is it a NemotronH checkpoint, which transformers runs with its built-in code (no remote code)?"""
    from transformers import AutoConfig

    try:
        kind = "nemotron_h" if model_id == DEFAULT_MODEL_ID else AutoConfig.from_pretrained(model_id).model_type
    except (OSError, ValueError) as error:  # no such folder or Hub model (a typo?), or no network
        return Check("model", False, f"{model_id}: no model found there ({str(error).splitlines()[0][:160]})",
                     f"MODEL_ID / model_id is a folder holding config.json or a Hub id such as {DEFAULT_MODEL_ID}; "
                     f"offline, the tiny model {TINY_MODEL}")
    if kind == "nemotron_h":
        return Check("model", True, f"{model_id}: nemotron_h, transformers' built-in code")
    return Check("model", False, f"{model_id} is a '{kind}' model, but these notebooks are for 'nemotron_h' "
                 "(Nemotron-H / Nemotron-3)", f"use {DEFAULT_MODEL_ID} or the offline tiny model {TINY_MODEL}")


def _check_kernels(need_gib) -> Check:
    """Are the fused Mamba-2 CUDA kernels (mamba_ssm, causal_conv1d) in use?"""
    status = fast_kernels_status()
    if status["fast_path"]:
        versions = f"mamba_ssm {status['mamba_ssm']}, causal_conv1d {status['causal_conv1d']}"
        return Check("Mamba kernels", True, f"fused kernels in use ({versions})")
    if need_gib is not None and need_gib < 1:
        return Check("Mamba kernels", True, "reference PyTorch Mamba path: fine for the tiny model")
    missing = ", ".join(f"no {n}" for n in ("mamba_ssm", "causal_conv1d", "cuda") if not status[n])
    return Check("Mamba kernels", False, f"NO FAST MAMBA KERNELS ({missing or 'installed but failed to import'}). "
                 "transformers falls back, with one easily missed log line, to a reference Mamba implementation "
                 "measured ~10x slower (~640 vs ~7,000 tokens/s on an H100 80GB for the full model) and out of "
                 "memory above ~1k tokens per step",
                 "on a CUDA machine install the locked kernels (README, 'Set up'), then restart Python")


def preflight(model_id=DEFAULT_MODEL_ID, shards=1, load_in_4bit="auto") -> list[Check]:
    """Check the model's type, GPU memory, disk space and Mamba kernels before spending an hour on a download: prints
    one line per check and returns them, never raises (pass the list to `require`). `shards`: FSDP over that many
    GPUs, each holding its share. `load_in_4bit` ("auto", "true", "false"): may a card too small for bf16 use NF4?"""
    model_id = str(model_id)
    _build_tiny_if_missing(model_id)  # the offline tiny model is made on first use
    need_gib = _weights_gib(model_id)
    share = need_gib / shards if need_gib is not None else None
    checks = []
    for name, check, args in [
        ("model", _check_model, (model_id,)),
        ("GPU", _check_gpu, (share, share * NF4_SHARE if share and str(load_in_4bit).lower() != "false" else None)),
        ("disk", _check_disk, (model_id, need_gib)),
        ("Mamba kernels", _check_kernels, (need_gib,)),
    ]:
        try:
            checks.append(check(*args))
        except Exception as error:  # a broken check is reported, not raised
            checks.append(Check(name, False, f"the check itself failed: {error!r}", "fix that error, rerun"))
        loud = name == "Mamba kernels" and not checks[-1].ok
        print(f"{'!' * 100}\n{checks[-1]}\n{'!' * 100}" if loud else checks[-1])
    return checks


class PreflightFailed(RuntimeError):
    """A pre-flight check failed: the message names each failed check and its fix."""


def require(checks: list[Check]) -> None:
    """Raise PreflightFailed listing every failed check."""
    failed = [c for c in checks if not c.ok]
    if failed:
        details = "\n".join(f"- {c.name}: {c.message}\n  fix: {c.fix}" for c in failed)
        raise PreflightFailed(f"{len(failed)} pre-flight check(s) failed:\n{details}")


def _build_tiny_if_missing(model_id: str) -> None:
    """Build the tiny offline model the first time its folder (TINY_MODEL) is asked for."""
    if Path(model_id).resolve() == Path(TINY_MODEL).resolve():
        from recipe.offline import build_tiny_model  # the headless recipe's offline stand-in

        build_tiny_model(TINY_MODEL)


def load_tokenizer(model_id=DEFAULT_MODEL_ID, revision=None):
    """The model's tokenizer alone (a few MB, no weights); pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    _build_tiny_if_missing(str(model_id))
    tokenizer = AutoTokenizer.from_pretrained(str(model_id), revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        print(f"The tokenizer has no pad token: using eos {tokenizer.eos_token!r} for padding.")
    return tokenizer


def pad_id(tokenizer) -> int:
    """The token id batches are padded with: the pad token, else eos (`load_tokenizer` sets pad = eos anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


BLOCK_KINDS = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "dense_mlp"}
MOE_PARTS = {".experts.": "routed_experts", ".shared_experts.": "shared_experts", ".gate.": "router"}


def _block_of(name: str, layer_types: list[str]) -> str:
    """The block type a parameter belongs to, from its name and the config's layer types."""
    if "lora_" in name:
        return "lora"
    if "embeddings" in name or name.startswith("lm_head") or ".lm_head." in name:
        return "embeddings" if "embeddings" in name else "lm_head"
    found = re.search(r"layers\.(\d+)\.(norm|mixer)\.", name)
    if found is None or found.group(2) == "norm":
        return "norms" if found or "norm_f" in name else "other"
    kind = layer_types[int(found.group(1))]
    if kind == "moe":
        return next((key for part, key in MOE_PARTS.items() if part in name), "other")
    return BLOCK_KINDS[kind]


def count_parameters(model) -> dict:
    """Parameters per block type, their total, and how many are active for one token (only k of the E routed
    experts run: active = total - routed * (1 - k/E)). Works on meta-device, PEFT and 4-bit models (2 NF4 per byte)."""
    config = model.config
    counts = dict.fromkeys("embeddings mamba attention router routed_experts shared_experts dense_mlp norms lm_head "
                           "lora other".split(), 0)
    for name, param in model.named_parameters():
        packed = param.dtype == torch.uint8  # NF4 (quant.py, bitsandbytes' Linear4bit): two weights per byte
        counts[_block_of(name, config.layers_block_type)] += param.numel() * (2 if packed else 1)
    counts["total"] = sum(counts.values())
    idle_share = 1 - config.num_experts_per_tok / config.n_routed_experts
    counts["active_per_token"] = round(counts["total"] - counts["routed_experts"] * idle_share)
    return counts


def readable(count: float) -> str:
    """A parameter count in the unit that suits it: 31.58B, 57.6M, 412.3K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}" if unit == "B" else f"{count / scale:.1f}{unit}"
    return str(int(count))


def parameter_table(counts: dict) -> str:
    """`count_parameters` as a small table: each block's parameters in readable units and its share."""
    lines = [f"{'block':<17}{'params':>10}{'share':>9}"]
    for key, value in counts.items():
        if value or key == "total":
            lines.append(f"{key:<17}{readable(value):>10}{value / counts['total']:>9.1%}")
    return "\n".join(lines)


def gpu_memory_report() -> dict:
    """Allocated / reserved / peak GPU memory in GiB (or a note on CPU); prints one line."""
    report = {"device": "cpu", "note": "no GPU: nothing to report"}
    if torch.cuda.is_available():
        cuda = torch.cuda
        report = {"device": cuda.get_device_name()} | {key: round(value / GIB, 2) for key, value in [
            ("total_gib", cuda.get_device_properties(cuda.current_device()).total_memory),
            ("allocated_gib", cuda.memory_allocated()), ("reserved_gib", cuda.memory_reserved()),
            ("peak_gib", cuda.max_memory_allocated())]}
    print(", ".join(f"{key}: {value}" for key, value in report.items()))
    return report


# Attention q/k/v/o, the Mamba input projection and the shared expert's up/down (all nn.Linear).
# "up_proj"/"down_proj" match only the shared expert: the routed experts are not modules but two
# fused 3-D nn.Parameters per MoE layer, (experts, out, in), that target_modules cannot reach...
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"]
# ...so they are adapted through PEFT's `target_parameters` (one low-rank pair per expert).
ROUTED_EXPERT_PARAMETERS = ["mixer.experts.up_proj", "mixer.experts.down_proj"]
BYPASSED_TARGETS = {"out_proj": "the fused Mamba training kernel (mamba_ssm) reads mixer.out_proj.weight directly",
                    "conv1d": "the Mamba mixer hands mixer.conv1d.weight straight to the convolution kernel"}


def check_lora_targets(config, precision: str = "bf16") -> None:
    """Refuse LoRA targets whose adapter would silently never run, dropout the routed experts can't use, and on the
    4-bit model (`precision="nf4"`, quant.py) what PEFT cannot put there (it would fail, or skip the experts)."""
    targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules or []
    for name, reason in BYPASSED_TARGETS.items():
        if any(name in target for target in targets):
            raise ValueError(f"LoRA on '{name}' would never run: {reason}, bypassing any adapter on the module. "
                             f"Fix: remove '{name}' from target_modules (defaults: {LORA_TARGET_MODULES}).")
    if config.target_parameters and config.lora_dropout:
        raise ValueError("LoRA dropout must be 0.0 with routed-expert LoRA: PEFT adds B@A to the fused expert "
                         "weights, where dropout on the input cannot be applied. Fix: lora_dropout=0.0.")
    if precision == "nf4" and config.target_parameters:
        raise ValueError("LoRA on the routed experts (target_parameters) cannot reach NF4 experts: PEFT would train "
                         "without them. Fix: ROUTED_EXPERTS / routed_experts=False in 4-bit, or train in bf16.")
    if precision == "nf4" and {"up_proj", "down_proj"} & set(targets):
        raise ValueError("target_modules up_proj/down_proj also match the NF4 experts' container "
                         "(experts.parametrizations.up_proj), which PEFT refuses. Fix: "
                         "target_modules=quant.LORA_TARGETS_4BIT (the same layers, as a regex).")


def save_merged(merged, tokenizer, out_dir) -> Path:
    """Save a merged model and its tokenizer as one ordinary checkpoint folder, after checking that the disk holds
    its weights + 20%."""
    size = sum(p.numel() * p.element_size() for p in merged.parameters()) / GIB
    free = shutil.disk_usage(_existing_parent(out_dir)).free / GIB
    if free < 1.2 * size:
        raise RuntimeError(f"Not enough disk to save the merged model in {out_dir}: {free:.1f} GiB free, "
                           f"~{1.2 * size:.1f} GiB needed. Fix: free disk space, choose another folder, or ship the "
                           "LoRA adapter alone (tens of MB) and merge where it is used.")
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print("Merged model saved to", out_dir)
    return Path(out_dir)
