"""The benchmarks' model set-up: architectures, seeded random weights, the tokenizer, LoRA per variant.

Every variant of one architecture and seed gets the same weights, so their first-batch losses must agree.
The standard and fast variants add LoRA exactly as train.py does (`train.lora_config`, `get_peft_model` after
`set_seed`); the Unsloth variant as notebook 04 does (`helpers.unsloth_path`). transformers, peft and unsloth
are imported inside the functions: the Unsloth variant must `import unsloth` before any of them.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks import REPO  # noqa: F401  (puts helpers, recipe and train on sys.path)
from train import free_memory  # noqa: E402  (train imports nothing heavy at the top)

ARCHS = ("real", "slice8", "tiny")
VARIANTS = ("standard", "standard-nokernels", "unsloth", "fast")
GIB = 2**30


def bench_tokenizer(model_path=None):
    """The model's tokenizer, or the tiny BPE tokenizer (random-weight runs only need its ids)."""
    if model_path:
        from helpers.model import load_tokenizer

        return load_tokenizer(model_path)
    from recipe.offline import sample_texts, train_tiny_tokenizer

    return train_tiny_tokenizer(sample_texts())


def arch_config(arch: str, tokenizer, layers: int | None = None):
    """The NemotronHConfig of an architecture name, with the tokenizer's pad/bos/eos ids.

    real: the published 52 layers (31.58B), or its first `layers`; slice8: its first 8 layers `MEMEM*EM` at
    full width (every block type, 4.78B); tiny: recipe.offline's ~400k-parameter model for CPU tests.
    """
    from recipe.offline import NANO_PATTERN, nemotron_nano_config, tiny_config

    if arch == "tiny":
        config = tiny_config(vocab_size=len(tokenizer))
    elif arch in ("real", "slice8"):
        layers = 8 if arch == "slice8" else layers
        config = nemotron_nano_config(**({"hybrid_override_pattern": NANO_PATTERN[:layers]} if layers else {}))
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def build_random_model(config, seed: int, dtype=None, device=None):
    """NemotronHForCausalLM with seeded random weights, built directly on `device` (this process's device
    by default): `dtype` if given, else bf16 on a GPU and float32 on a CPU.

    Same config + same seed -> the same weights in every process. The router's score-correction bias is kept
    in float32, as from_pretrained does (`_keep_in_fp32_modules_strict`).
    """
    from transformers import NemotronHForCausalLM
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    from recipe import distributed

    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    config.dtype = dtype
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or distributed.device()):  # under accelerate launch: this process's own GPU
            model = NemotronHForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for module in model.modules():
        if isinstance(module, NemotronHTopkRouter):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model


def random_model_for_this_process(config, seed: int):
    """The seeded random model where this process needs it: on its own GPU (one process, or DDP: each GPU holds
    a whole copy), or, under FSDP, on the CPU, from where accelerate moves each GPU's shard over.

    Under FSDP every process builds the same model (same seed) on its GPU (seconds) and moves it to the CPU, as
    `from_pretrained` leaves it under configs/fsdp.yaml. Sharding a model that is already on the GPU would hold
    the whole model and the shards at once (accelerate keeps the full state dict during `fully_shard`).
    """
    from recipe import distributed

    if not distributed.fsdp_enabled():
        return build_random_model(config, seed)
    model = build_random_model(config, seed).to("cpu")
    free_memory()
    return model


def save_random_model(arch: str, seed: int, root, tokenizer) -> Path:
    """Save the seeded random model of `arch` under `root` once (reused while config, seed and transformers
    match): Unsloth loads models from a folder only."""
    from helpers.training import library_versions

    config = arch_config(arch, tokenizer)
    key = {"arch": arch, "seed": seed, "config": config.to_diff_dict(),
           "transformers": library_versions()["transformers"]}
    folder = Path(root) / f"nemotron-bench-{arch}-seed{seed}"
    meta = folder / "bench_meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == json.loads(json.dumps(key, default=str)):
        print(f"Reusing the saved random model in {folder}")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    model = build_random_model(config, seed)
    need = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    free = shutil.disk_usage(Path(root)).free / GIB
    if free < need * 1.1:
        raise SystemExit(f"Not enough disk in {root} for the random model Unsloth must load: {free:.1f} GiB "
                         f"free, {need:.1f} GiB needed. Pass --tmp-dir on a bigger disk.")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta.write_text(json.dumps(key, default=str))
    del model
    free_memory()
    print(f"Saved the random {arch} model ({need:.1f} GiB) to {folder} in {time.perf_counter() - start:.0f} s")
    return folder


def bench_config(seed: int = 42, max_length: int = 1024, routed_experts: bool = False, **fields):
    """The TrainConfig of a benchmark run: the tutorial's LoRA (r 16, alpha 32, no dropout) and seed."""
    from helpers.config import TrainConfig

    return TrainConfig(seed=seed, max_length=max_length, routed_experts=routed_experts, **fields)


def add_lora(model, cfg):
    """LoRA exactly as train.py adds it: `set_seed(cfg.seed)` (the A matrices start random), then
    `get_peft_model(model, train.lora_config(cfg))`. Returns (peft model, the LoraConfig)."""
    from peft import get_peft_model
    from transformers import set_seed

    import train

    lora = train.lora_config(cfg)
    set_seed(cfg.seed)
    return get_peft_model(model, lora), lora


def random_lora_model(arch: str, seed: int, routed_experts: bool = False, dtype=None):
    """(LoRA-wrapped random model of `arch`, the bench tokenizer): the set-up of check_fast and trace_ops."""
    tokenizer = bench_tokenizer()
    model = build_random_model(arch_config(arch, tokenizer), seed, dtype)
    model, _ = add_lora(model, bench_config(seed=seed, routed_experts=routed_experts))
    return model, tokenizer


def load_variant_model(variant: str, cfg, tokenizer, arch: str, model_path=None, tmp_dir=None):
    """(peft model, tokenizer, facts) for a variant: random weights of `arch` (or `model_path`), LoRA attached.

    standard, standard-nokernels and fast: train.py's LoRA (`add_lora`). unsloth: notebook 04's cells,
    `FastLanguageModel.from_pretrained` (bf16) + `FastLanguageModel.get_peft_model` (Unsloth's gradient
    checkpointing); it loads from a folder, so a random model is saved to `tmp_dir` first.
    """
    from helpers.model import LORA_TARGET_MODULES, count_parameters
    from train import load_model

    from recipe import distributed

    facts = {}
    start = time.perf_counter()
    if variant == "unsloth":
        from unsloth import FastLanguageModel

        folder = model_path or save_random_model(arch, cfg.seed, tmp_dir, tokenizer)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(folder), max_seq_length=cfg.max_length, dtype=torch.bfloat16, load_in_4bit=False,
            full_finetuning=False)
        facts["load_seconds"] = round(time.perf_counter() - start, 1)
        facts["base_counts"] = count_parameters(model)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=LORA_TARGET_MODULES, bias="none", use_gradient_checkpointing="unsloth",
            random_state=cfg.seed)
        facts["lora"] = {"api": "FastLanguageModel.get_peft_model(use_gradient_checkpointing='unsloth'), as "
                                "notebook 04", "r": cfg.lora_r, "alpha": cfg.lora_alpha,
                         "target_modules": list(LORA_TARGET_MODULES), "routed_experts_requested": None}
        return model, tokenizer, facts
    if model_path:
        model, tokenizer = load_model(model_path, device_map=distributed.device_map())
    else:
        model = random_model_for_this_process(arch_config(arch, tokenizer), cfg.seed)
    if variant == "standard-nokernels":
        model.config.use_mamba_kernels = False  # recorded for readers; transformers 5.17 ignores it (see below)
    facts["load_seconds"] = round(time.perf_counter() - start, 1)
    facts["base_counts"] = count_parameters(model)
    model, lora = add_lora(model, cfg)
    facts["lora"] = {"api": "get_peft_model(model, train.lora_config(cfg)) after set_seed(cfg.seed), as train.py",
                     "r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                     "target_modules": sorted(lora.target_modules),
                     "target_parameters": list(lora.target_parameters or []),
                     "routed_experts_requested": cfg.routed_experts}
    return model, tokenizer, facts


def choose_mamba_kernels(variant: str) -> dict:
    """Make transformers bind the fused Mamba kernels (every variant) or the reference path (nokernels).

    transformers 5.17's modeling_nemotron_h never reads `config.use_mamba_kernels`: each Mamba op is wrapped by
    `use_kernel_func_from_hub_with_fallback`, which tries `import mamba_ssm` / `import causal_conv1d` once, when
    the module is imported, and falls back to the PyTorch reference if that fails. So the only switch is to make
    that import fail: a `None` entry in sys.modules does exactly that, for this process only.
    """
    if variant != "standard-nokernels":
        return {"blocked_imports": []}
    blocked = ["mamba_ssm", "causal_conv1d"]
    for name in blocked:
        sys.modules[name] = None  # `import mamba_ssm` now raises ModuleNotFoundError
    return {"blocked_imports": blocked}


class MambaPathCounter:
    """Count, at run time, which Mamba-2 code the training forward really calls.

    modeling_nemotron_h looks its three ops up as module globals on every call, so wrapping the globals sees
    every call: the fused training op returns None when it is the reference stub (then the mixer runs the
    chunked reference scan), and a tensor when mamba_ssm's fused kernel ran.
    """

    OPS = ("mamba2_split_conv1d_scan_combined", "causal_conv1d_fn", "mamba2_chunk_scan")

    def __init__(self):
        from transformers.models.nemotron_h import modeling_nemotron_h as module

        self.module = module
        self.counts = {"fused_kernel_ran": 0, "fused_returned_none": 0, "causal_conv1d_fn": 0, "mamba2_chunk_scan": 0}
        self.originals = {name: getattr(module, name) for name in self.OPS}

        def fused(*a, **k):
            out = self.originals["mamba2_split_conv1d_scan_combined"](*a, **k)
            self.counts["fused_kernel_ran" if out is not None else "fused_returned_none"] += 1
            return out

        def counting(name):
            def wrapped(*a, **k):
                self.counts[name] += 1
                return self.originals[name](*a, **k)
            return wrapped

        module.mamba2_split_conv1d_scan_combined = fused
        module.causal_conv1d_fn = counting("causal_conv1d_fn")
        module.mamba2_chunk_scan = counting("mamba2_chunk_scan")

    def restore(self):
        for name, fn in self.originals.items():
            setattr(self.module, name, fn)

    def path(self) -> str:
        c = self.counts
        if c["fused_kernel_ran"] and not (c["fused_returned_none"] or c["mamba2_chunk_scan"]):
            return "fused kernel (mamba_ssm mamba_split_conv1d_scan_combined)"
        if c["fused_returned_none"] and not c["fused_kernel_ran"]:
            return "reference (chunked scan, no fused kernel)"
        if not any(c.values()):
            return "not observed (the Mamba forward did not go through transformers' module globals)"
        return "mixed"


def path_matches(variant: str, path: str, cuda: bool):
    """Did the Mamba path that ran match what the variant promises? (None: nothing to promise on CPU/Unsloth.)"""
    if variant == "standard-nokernels":
        return path.startswith("reference")
    if variant in ("standard", "fast") and cuda:
        return path.startswith("fused kernel")
    return None


def kernel_status() -> dict:
    """Which Mamba code transformers bound at import (read before MambaPathCounter wraps the ops)."""
    from helpers.model import fast_kernels_status

    status = fast_kernels_status()
    return {k: status[k] for k in ("mamba_ssm", "causal_conv1d", "implementations", "fast_path")}


def trainable_summary(model) -> dict:
    """Trainable parameters, split into routed-expert LoRA and the rest (Unsloth may add the former itself)."""
    total = routed = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel()
            if ".experts." in name:  # ".shared_experts." does not contain ".experts."
                routed += p.numel()
    return {"trainable_parameters": total, "trainable_on_routed_experts": routed,
            "lora_on_routed_experts": routed > 0}


def lm_head_loss_path() -> str:
    """Which implementation computes TRL's fused LM-head loss here (helpers.training swaps it on CPU)."""
    if torch.cuda.is_available():
        return "TRL fused chunked log-prob kernel (Triton), unless the Unsloth-patched trainer replaces it"
    return ("helpers.training.cpu_loss_fallback: TRL's fused LM head in plain PyTorch (its Triton kernel needs "
            "a GPU)")
