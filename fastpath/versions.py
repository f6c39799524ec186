"""The library versions the fast path was verified with, and the private names its pieces call.

Most pieces replace code inside transformers, PEFT, TRL and mamba_ssm, and several call names those libraries
do not promise to keep (a leading underscore, or a module-level binding). A new release can rename them, or
change the code they stand in for, so `check_versions` refuses other versions unless told to go on
(train.py --any-version), and always refuses when a name a piece calls is gone.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

from packaging.version import InvalidVersion, Version

from .settings import Refused, Settings

# package -> versions the pieces were measured and checked with (benchmarks/NOTES.md, tests/test_fast.py).
# Compared by major.minor.patch: local tags (+cu130) and post releases (.post1) do not count.
VERIFIED = {
    "torch": ("2.11.0",),
    "transformers": ("5.17.0",),
    "peft": ("0.21.0", "0.21.2"),
    "trl": ("1.15.0",),
    "mamba_ssm": ("2.3.2.post1",),
    "causal_conv1d": ("1.7.0",),
}
DISTRIBUTIONS = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}  # pip's names, where they differ
OVERRIDE_FLAG = "--any-version"

_NH = "transformers.models.nemotron_h.modeling_nemotron_h"
# name the pieces call -> the pieces (or "checkpointing", the policy) that call it
NEEDED = {
    "transformers.integrations.moe._grouped_linear": ("lean_experts", "compact_experts"),
    "transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS": ("lean_experts", "compact_experts"),
    "transformers.integrations.moe.ExpertsInterface": ("lean_experts", "compact_experts"),
    f"{_NH}.NemotronHExperts": ("lean_experts", "compact_experts"),
    f"{_NH}.NemotronHMLP": ("bf16_relu2",),
    "transformers.activations.ReLUSquaredActivation": ("bf16_relu2",),
    f"{_NH}.NemotronHRMSNorm": ("fused_norms",),
    f"{_NH}.NemotronHAttention": ("varlen_attention",),
    "transformers.AttentionInterface": ("varlen_attention",),
    "transformers.masking_utils.AttentionMaskInterface": ("varlen_attention",),
    "transformers.masking_utils.sdpa_mask": ("varlen_attention",),
    "transformers.integrations.sdpa_attention.sdpa_attention_forward": ("varlen_attention",),
    "torch.nn.attention.varlen.varlen_attn": ("varlen_attention",),
    "transformers.modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids": ("packing",
                                                                                        "varlen_attention"),
    "trl.trainer.sft_trainer.DataCollatorForLanguageModeling": ("packing",),
    # the Mamba kernel bindings: frozen_out_proj rebinds the first; packing reads all three to find the kernels
    f"{_NH}.mamba2_split_conv1d_scan_combined": ("packing", "frozen_out_proj"),
    f"{_NH}.causal_conv1d_fn": ("packing",),
    f"{_NH}.mamba2_chunk_scan": ("packing",),
    f"{_NH}.NemotronHMamba2Mixer": ("frozen_out_proj",),
    "peft.tuners.tuners_utils.BaseTunerLayer._cast_input_dtype": ("lora_bf16", "lora_addmm"),
    "transformers.modeling_layers.GradientCheckpointingLayer": ("checkpointing",),
    "mamba_ssm.ops.triton.layer_norm.rms_norm_fn": ("fused_norms",),  # checked where mamba_ssm is installed
}


def installed(package: str) -> str | None:
    """The installed version of `package` (a key of VERIFIED), or None."""
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple:
    """major.minor.patch of a version string, as numbers ('2.11.0+cu130' -> (2, 11, 0)); unparsable: itself."""
    try:
        return (Version(version).release + (0, 0))[:3]
    except InvalidVersion:
        return (version,)


def resolve(name: str):
    """The object a dotted name stands for (a module's attribute, or a class's), importing what it needs."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(name)


def missing_names(settings: Settings | None = None) -> dict[str, tuple]:
    """The NEEDED names that do not resolve here -> the pieces that call them (only the pieces `settings` uses,
    if given). Names inside a package that is not installed are left to that piece's own check."""
    wanted = None if settings is None else set(settings.pieces) | ({"checkpointing"} if settings.checkpointing
                                                                   != "all" else set())
    missing = {}
    for name, pieces in NEEDED.items():
        if wanted is not None and not wanted & set(pieces):
            continue
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing[name] = pieces
    return missing


def verified_text() -> str:
    return ", ".join(f"{package} {' or '.join(versions)}" for package, versions in VERIFIED.items())


def check_versions(allow_other_versions: bool = False, settings: Settings | None = None) -> dict[str, str | None]:
    """Refuse library versions the pieces were not verified with (unless `allow_other_versions`, train.py
    --any-version), and refuse always when a name the pieces call is gone. Returns {package: installed version
    or None}. With `settings`, only the names of the pieces it uses are checked."""
    found = {package: installed(package) for package in VERIFIED}
    other = {package: version for package, version in found.items() if version is not None
             and _release(version) not in {_release(v) for v in VERIFIED[package]}}
    if other:
        have = ", ".join(f"{package} {version}" for package, version in other.items())
        if not allow_other_versions:
            raise Refused(f"The fast path was verified with {verified_text()}; this environment has {have}. "
                          "Fix: install the locked versions (requirements-cuda.lock), or pass "
                          f"{OVERRIDE_FLAG} to run the pieces anyway (then check them with benchmarks/check_fast.py).")
        print(f"Fast path: running on versions it was not verified with ({have}; {OVERRIDE_FLAG}).")
    missing = missing_names(settings)
    if missing:
        names = "; ".join(f"{name} (used by {', '.join(pieces)})" for name, pieces in missing.items())
        raise Refused(f"These libraries lack names the fast path calls: {names}. Fix: install the locked versions "
                      f"({verified_text()}), or leave those pieces out of --fast-features.")
    return found
