"""Model helpers: the Nemotron-3-Nano config, a tiny offline stand-in, pre-flight checks,
loading, parameter counts and LoRA adapters.

transformers and peft are imported inside the functions, never at the top, so that
`import unsloth` (which patches them) can run first in the Unsloth notebook.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
TINY_MODEL_DIR = REPO_ROOT / "outputs" / "tiny-nemotron"
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
GIB = 2**30
# Measured: the bf16 weights of the 30B-A3B model take ~59 GiB on the GPU (31.58B x 2 bytes);
# the download is the same bytes, ~63 GB.
DEFAULT_MODEL_GIB = 59.0
ANSWER_TOKENS = [" A", " B", " C", " D"]
# One letter per layer: M = Mamba-2 ("linear_attention"), E = mixture of experts ("moe"),
# * = attention ("full_attention"), - = dense MLP ("mlp"); see NemotronHConfig._pattern_to_list.
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


# Configs ----------------------------------------------------------------------------------------


def nemotron_nano_config(**overrides):
    """The published Nemotron-3-Nano-30B-A3B architecture as a `NemotronHConfig`.

    Needs no download: build it on the meta device to count parameters.
    """
    from transformers import NemotronHConfig

    values = dict(
        vocab_size=131072, hidden_size=2688, hybrid_override_pattern=NANO_PATTERN,
        num_attention_heads=32, num_key_value_heads=2, head_dim=128,
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4, chunk_size=128,
        n_routed_experts=128, num_experts_per_tok=6, n_shared_experts=1,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1, mlp_hidden_act="relu2",
        tie_word_embeddings=False, max_position_embeddings=262144, layer_norm_epsilon=1e-5,
    )
    return NemotronHConfig(**(values | overrides))


def tiny_config(vocab_size: int):
    """A NemotronH of ~400k parameters with every block type of the real model, fast on CPU.

    Layers "MEM*E": Mamba-2, MoE (4 routed experts, 2 active, plus a shared expert), attention.
    """
    return nemotron_nano_config(
        vocab_size=vocab_size, hidden_size=64, hybrid_override_pattern="MEM*E",
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, max_position_embeddings=1024,
    )


# Tiny offline model -----------------------------------------------------------------------------

FALLBACK_TEXTS = [
    "Question: Which nerve supplies the deltoid muscle? Choices: A. Axillary B. Radial C. Ulnar D. Median",
    "Answer: A Explanation: The axillary nerve (C5, C6) supplies the deltoid and teres minor.",
    "Question: Drug of choice for anaphylactic shock is Answer: B Explanation: intramuscular adrenaline.",
    "Koplik spots are pathognomonic of measles. Hypokalaemia causes U waves on the ECG.",
]


def sample_texts(folder: Path = SAMPLE_DIR) -> list[str]:
    """Every question, option and explanation string in `folder/*.jsonl` (MedMCQA rows).

    Falls back to a few built-in medical sentences when the folder has no data.
    """
    texts = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            fields = ("question", "opa", "opb", "opc", "opd", "exp")
            texts += [row[key] for key in fields if isinstance(row.get(key), str)]
    return texts or list(FALLBACK_TEXTS)


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    " A".." D" must each be ONE token: evaluation compares the next-token logits of exactly
    those four ids after "Answer:".
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],  # ids 0-3, like the real tokenizer
    )
    # The prompt words and letters, repeated, so that BPE learns " A".." D" as merges.
    seed_lines = [f"Question: Choices: Answer: {letter}. Explanation:" for letter in "ABCD"] * 25
    bpe.train_from_iterator(list(texts) + seed_lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=1024,
    )
    # A very small vocabulary may have no room for those merges: add them as whole-word tokens.
    missing = [t for t in ANSWER_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in missing])
    return tokenizer


def _is_model_dir(folder: Path) -> bool:
    """True when `folder` holds a saved config, weights and tokenizer."""
    files = [folder / "config.json", folder / "tokenizer.json"]
    return all(f.is_file() for f in files) and any(folder.glob("*.safetensors"))


def build_tiny_model(out_dir=TINY_MODEL_DIR, texts=None, seed: int = 0, overwrite: bool = False) -> Path:
    """Save a randomly initialised tiny NemotronH and its tokenizer as a normal model folder.

    It stands in for the 30B model on CPU and in CI, so every step of the tutorial runs in
    seconds. Returns the folder; an existing one is reused unless `overwrite`.
    """
    from transformers import NemotronHForCausalLM

    out_dir = Path(out_dir)
    if _is_model_dir(out_dir) and not overwrite:
        return out_dir
    tokenizer = train_tiny_tokenizer(sample_texts() if texts is None else texts)
    config = tiny_config(vocab_size=len(tokenizer))
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(config)  # float32, fine on CPU
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"Tiny NemotronH ({sum(p.numel() for p in model.parameters()):,} parameters) saved to {out_dir}")
    return out_dir


# Pre-flight checks ------------------------------------------------------------------------------


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


def _bound_implementation(function) -> str:
    """Where the code behind one of transformers' Mamba kernel wrappers lives.

    `use_kernel_func_from_hub_with_fallback` tries to import mamba_ssm / causal_conv1d ONCE, when
    modeling_nemotron_h is imported, and keeps the result in the wrapper's closure: read it back.
    """
    if isinstance(function, functools.partial) and function.args:  # helpers.fast.project_after_kernel(kernel, ...)
        function = function.args[0]
    try:
        implementation = inspect.getclosurevars(function).nonlocals.get("implementation")
    except TypeError:  # not a plain function any more (patched, or a hub kernel)
        return "unknown"
    module = getattr(implementation, "__module__", None) or "unknown"
    return "torch reference" if module.startswith("transformers") else module


def fast_kernels_status() -> dict:
    """Which Mamba-2 code transformers will really run: fused CUDA kernels or the torch reference.

    Imports transformers (call it after `import unsloth`). Kernels installed after that import
    are ignored until Python restarts.
    """
    from transformers.models.nemotron_h import modeling_nemotron_h as nemotron_h

    ops = {
        "training (fused conv + scan + norm + out_proj)": nemotron_h.mamba2_split_conv1d_scan_combined,
        "causal conv1d": nemotron_h.causal_conv1d_fn,
        "chunked scan": nemotron_h.mamba2_chunk_scan,
    }
    implementations = {op: _bound_implementation(fn) for op, fn in ops.items()}
    status = {"cuda": torch.cuda.is_available(), "mamba_ssm": _version("mamba-ssm"),
              "causal_conv1d": _version("causal-conv1d"), "implementations": implementations}
    installed = status["mamba_ssm"] is not None and status["causal_conv1d"] is not None
    status["fast_path"] = status["cuda"] and installed and "torch reference" not in implementations.values()
    return status


def estimate_weights_gib(model_id: str = DEFAULT_MODEL_ID) -> float | None:
    """GiB of bf16 weights of `model_id`, counted from its config; None if it can't be read."""
    if model_id == DEFAULT_MODEL_ID:
        return DEFAULT_MODEL_GIB
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_id))
        return sum(p.numel() for p in model.parameters()) * 2 / GIB
    except Exception:
        return None


def _is_small(need_gib) -> bool:
    """True for models that run on CPU, like the tiny offline one."""
    return need_gib is not None and need_gib < 1


def _check_gpu(need_gib) -> Check:
    """Is there a GPU with enough free memory for the weights?"""
    if not torch.cuda.is_available():
        if _is_small(need_gib):
            return Check("GPU", True, "no GPU: fine for the offline tiny model only")
        size = f" with ~{need_gib:.0f} GiB free" if need_gib else ""
        return Check(
            "GPU", False, f"no GPU: this model needs a CUDA GPU{size} for its weights",
            "run on an 80 GB NVIDIA GPU (H100/A100 80GB, H200); on CPU use the tiny model (build_tiny_model())",
        )
    free, total = (x / GIB for x in torch.cuda.mem_get_info())
    gpu = f"{torch.cuda.get_device_name()}: {free:.1f} of {total:.1f} GiB free"
    if need_gib is not None and free < need_gib:
        return Check(
            "GPU", False, f"{gpu}; bf16 weights alone need ~{need_gib:.0f} GiB (a 40 GB card can't hold them)",
            "use an 80 GB card (H100/A100 80GB) or larger, and stop other processes on it (nvidia-smi)",
        )
    return Check("GPU", True, f"{gpu}; weights need ~{need_gib or 0:.0f} GiB")


def _is_downloaded(model_id: str) -> bool:
    """True when the weights are already on disk: a local folder or a complete Hub cache entry."""
    from huggingface_hub import snapshot_download

    try:
        local = Path(model_id).is_dir()
        folder = Path(model_id) if local else Path(snapshot_download(model_id, local_files_only=True))
        shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    except Exception:  # not in the cache, or a single-file model
        return Path(model_id).is_dir()
    return all((folder / shard).is_file() for shard in shards)


def _existing_parent(path) -> Path:
    """`path` or its nearest existing parent, so free space can be read before it is created."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def _check_disk(model_id, need_gib, disk_path, need_disk_gib, merge) -> Check:
    """Is there room for the download (unless already on disk) and, when merging, a merged copy?"""
    folder = _existing_parent(disk_path)
    free = shutil.disk_usage(folder).free / GIB
    cached = _is_downloaded(model_id)
    if need_disk_gib is None and need_gib is None:
        return Check("disk", True, f"{free:.0f} GiB free at {folder} (model size unknown, not checked)")
    if need_disk_gib is None:
        need_disk_gib = (0.0 if cached else need_gib) + (need_gib if merge else 0.0)
    what = ("weights already on disk" if cached else "download") + (" + merged copy" if merge else "")
    message = f"{free:.0f} GiB free at {folder}, ~{need_disk_gib:.0f} GiB needed ({what})"
    if free < need_disk_gib:
        return Check("disk", False, message, "free disk space, or point HF_HOME / the output folder elsewhere")
    return Check("disk", True, message)


def _check_kernels(need_gib) -> Check:
    """Are the fused Mamba-2 CUDA kernels (mamba_ssm, causal_conv1d) in use?"""
    status = fast_kernels_status()
    if status["fast_path"]:
        versions = f"mamba_ssm {status['mamba_ssm']}, causal_conv1d {status['causal_conv1d']}"
        return Check("Mamba kernels", True, f"fused kernels in use ({versions})")
    if _is_small(need_gib):
        return Check("Mamba kernels", True, "reference PyTorch Mamba path: fine for the tiny model")
    missing = [f"no {name}" for name in ("mamba_ssm", "causal_conv1d", "cuda") if not status[name]]
    return Check(
        "Mamba kernels", False,
        f"NO FAST MAMBA KERNELS ({', '.join(missing) or 'installed but failed to import'}). transformers falls back, "
        "with one easily missed log line, to a reference Mamba implementation measured ~10x slower "
        "(~640 vs ~7,000 tokens/s on an H100 80GB for the full model) and out of memory above ~1k "
        "tokens per step",
        "on a CUDA machine: `uv sync --extra kernels` or "
        "`uv pip install --no-build-isolation mamba-ssm causal-conv1d`, then restart Python",
    )


def preflight(
    model_id=DEFAULT_MODEL_ID, need_gib=None, disk_path=".", need_disk_gib=None, merge=False, shards=1
) -> list[Check]:
    """Check GPU memory, disk space and Mamba kernels before spending an hour on a download.

    `shards`: FSDP over that many GPUs, so each GPU needs only its share of the weights.
    Prints one line per check and returns them; never raises. Pass the list to `require`.
    """
    model_id = str(model_id)
    _build_tiny_if_missing(model_id)  # the offline tiny model is made on first use, as load_model does
    need_gib = estimate_weights_gib(model_id) if need_gib is None else need_gib
    checks = []
    for name, check, args in [
        ("GPU", _check_gpu, (need_gib / shards if need_gib is not None else None,)),
        ("disk", _check_disk, (model_id, need_gib, disk_path, need_disk_gib, merge)),
        ("Mamba kernels", _check_kernels, (need_gib,)),
    ]:
        try:
            checks.append(check(*args))
        except Exception as error:  # a broken check is reported, not raised
            checks.append(Check(name, False, f"the check itself failed: {error!r}", "fix that error, rerun"))
        loud = name == "Mamba kernels" and not checks[-1].ok
        print(f"{'!' * 100}\n{checks[-1]}\n{'!' * 100}" if loud else checks[-1])
    return checks


def require(checks: list[Check], ignore: tuple[str, ...] = ()) -> None:
    """Raise a RuntimeError listing every failed check (except those named in `ignore`)."""
    failed = [c for c in checks if not c.ok and c.name not in ignore]
    if failed:
        details = "\n".join(f"- {c.name}: {c.message}\n  fix: {c.fix}" for c in failed)
        raise RuntimeError(f"{len(failed)} pre-flight check(s) failed:\n{details}")


# Loading, counting, memory ----------------------------------------------------------------------


def _build_tiny_if_missing(model_id: str) -> None:
    """Build the tiny offline model the first time its folder (TINY_MODEL_DIR) is asked for."""
    if Path(model_id).resolve() == TINY_MODEL_DIR.resolve() and not _is_model_dir(TINY_MODEL_DIR):
        build_tiny_model(TINY_MODEL_DIR)


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


def free_memory() -> None:
    """Give freed memory back (call after `del`: the real model is 59 GiB, never hold two)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_device_map():
    """Where `load_model` puts the weights on a GPU machine: all on this process's GPU.

    One process: the current GPU. Under `accelerate launch` (one process per GPU): `cuda:LOCAL_RANK`, so
    each process holds its own full copy ("auto" would split one copy over every GPU). Under FSDP: None,
    i.e. load on the CPU; accelerate then moves each GPU's shard over, so no GPU holds the whole model.
    """
    from . import distributed

    if distributed.fsdp_enabled():
        return None
    return {"": distributed.local_rank() if distributed.launched() else torch.cuda.current_device()}


def load_model(model_id=DEFAULT_MODEL_ID, revision=None, dtype=None, device_map=None, attn_implementation=None):
    """Load a NemotronH model and its tokenizer with transformers' built-in code (no remote code).

    Defaults: bfloat16 on this process's GPU (`cuda:LOCAL_RANK` under accelerate launch; on the CPU under FSDP,
    which shards it later), float32 on CPU. Returns (model, tokenizer).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_id = str(model_id)
    _build_tiny_if_missing(model_id)
    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=False)
    if config.model_type != "nemotron_h":
        raise ValueError(
            f"{model_id} is a '{config.model_type}' model, but these helpers are for 'nemotron_h' "
            f"(Nemotron-H / Nemotron-3). Fix: use {DEFAULT_MODEL_ID} or the tiny model from build_tiny_model()."
        )
    on_gpu = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    if device_map is None and on_gpu:
        device_map = default_device_map()  # this process's GPU (FSDP: the CPU); never "auto" offloading
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_id, config=config, revision=revision, dtype=dtype, device_map=device_map,
        attn_implementation=attn_implementation, trust_remote_code=False,
    )
    tokenizer = load_tokenizer(model_id, revision)
    print(f"Loaded {model_id} ({model.dtype}, {model.device}) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


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
    """Parameters per block type, their total, and how many are active for one token.

    Only k of the E routed experts run per token: active = total - routed * (1 - k/E).
    Works on meta-device models (no memory needed) and on PEFT-wrapped models.
    """
    config = model.config
    keys = ["embeddings", "mamba", "attention", "router", "routed_experts", "shared_experts",
            "dense_mlp", "norms", "lm_head", "lora", "other"]
    counts = dict.fromkeys(keys, 0)
    for name, param in model.named_parameters():
        counts[_block_of(name, config.layers_block_type)] += param.numel()
    counts["total"] = sum(counts.values())
    idle_share = 1 - config.num_experts_per_tok / config.n_routed_experts
    counts["active_per_token"] = round(counts["total"] - counts["routed_experts"] * idle_share)
    return counts


def parameter_table(counts: dict) -> str:
    """`count_parameters` as a small table: billions (or millions, for small models) and shares."""
    scale, unit = (1e9, "B") if counts["total"] >= 1e8 else (1e6, "M")
    lines = [f"{'block':<17}{'params':>10}{'share':>9}"]
    for key, value in counts.items():
        if value or key == "total":
            lines.append(f"{key:<17}{value / scale:>9.3f}{unit}{value / counts['total']:>9.1%}")
    return "\n".join(lines)


def gpu_memory_report(show: bool = True) -> dict:
    """Allocated / reserved / peak GPU memory in GiB (or a note on CPU); prints one line."""
    report = {"device": "cpu", "note": "no GPU: nothing to report"}
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        report = {"device": torch.cuda.get_device_name(device)} | {
            key: round(value / GIB, 2) for key, value in [
                ("total_gib", torch.cuda.get_device_properties(device).total_memory),
                ("allocated_gib", torch.cuda.memory_allocated(device)),
                ("reserved_gib", torch.cuda.memory_reserved(device)),
                ("peak_gib", torch.cuda.max_memory_allocated(device)),
            ]
        }
    if show:
        print(", ".join(f"{key}: {value}" for key, value in report.items()))
    return report


# LoRA -------------------------------------------------------------------------------------------

# Attention q/k/v/o, the Mamba input projection and the shared expert's up/down (all nn.Linear).
# "up_proj"/"down_proj" match only the shared expert: the routed experts are not modules but two
# fused 3-D nn.Parameters per MoE layer, (experts, out, in), that target_modules cannot reach...
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"]
# ...so they are adapted through PEFT's `target_parameters` (one low-rank pair per expert).
ROUTED_EXPERT_PARAMETERS = ["mixer.experts.up_proj", "mixer.experts.down_proj"]
BYPASSED_TARGETS = {
    "out_proj": "the fused Mamba training kernel (mamba_ssm) reads mixer.out_proj.weight directly",
    "conv1d": "the Mamba mixer hands mixer.conv1d.weight straight to the convolution kernel",
}


def lora_config(r=16, alpha=32, dropout=0.0, routed_experts=False, target_modules=None, **extra):
    """A PEFT LoraConfig for NemotronH; `routed_experts=True` also adapts every routed expert.

    Refuses targets whose adapter would silently never run. `extra` goes to LoraConfig.
    With routed experts, PEFT builds W + B@A for each whole expert stack on every forward and autograd
    keeps it for backward (~1.2 GiB per tensor in bf16; measured +4.1 GiB for two real-size MoE layers
    at 4k tokens, ~55 GiB for all 23): use gradient checkpointing, which brings it back to ~0.1 GiB.
    """
    from peft import LoraConfig

    targets = list(LORA_TARGET_MODULES) if target_modules is None else target_modules
    for name, reason in BYPASSED_TARGETS.items():
        if any(name in target for target in ([targets] if isinstance(targets, str) else targets)):
            raise ValueError(
                f"LoRA on '{name}' would never run: {reason}, bypassing any adapter on the module. "
                f"Fix: remove '{name}' from target_modules (defaults: {LORA_TARGET_MODULES})."
            )
    if routed_experts and dropout:
        raise ValueError(
            "LoRA dropout must be 0.0 with routed_experts=True: PEFT adds B@A to the fused expert weights, "
            "where dropout on the input cannot be applied. Fix: dropout=0.0."
        )
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM",
        target_parameters=list(ROUTED_EXPERT_PARAMETERS) if routed_experts else None, **extra,
    )


def add_lora(model, config):
    """Wrap `model` with LoRA adapters; print how many parameters will train.

    Returns (peft_model, {"trainable": ..., "total": ..., "share": ...}).
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    return peft_model, trainable_stats(peft_model)


def trainable_stats(peft_model, label: str = "LoRA") -> dict:
    """Print and return how many parameters will train: {"trainable", "total", "share"}."""
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    stats = {"trainable": trainable, "total": total, "share": trainable / total}
    print(f"{label}: {trainable:,} trainable of {total:,} parameters ({stats['share']:.3%})")
    return stats


def lora_module_names(peft_model) -> list[str]:
    """The modules (and, for routed experts, the parameters) that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    names = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            parameter = getattr(module, "parameter_name", None)  # set on PEFT's ParamWrapper
            names.append(f"{name}.{parameter}" if parameter else name)
    return names


# Adapters: merge, load, disk --------------------------------------------------------------------


def merge_adapter(peft_model):
    """Fold the LoRA weights into the base weights and return the plain transformers model."""
    merged = peft_model.merge_and_unload(safe_merge=True)
    print("LoRA merged into the base weights (the result no longer needs peft).")
    return merged


def load_adapter(base_model, adapter_dir, is_trainable: bool = False):
    """Attach a saved LoRA adapter (a folder with adapter_config.json) to `base_model`."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter_config.json in {adapter_dir}. Fix: pass the folder given to "
            "peft_model.save_pretrained() (or the trainer's output_dir)."
        )
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)


def merge_disk_check(out_dir, model) -> dict:
    """Raise if the disk of `out_dir` cannot hold the merged model (its weights + 20 %)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    need, free = 1.2 * size / GIB, shutil.disk_usage(_existing_parent(out_dir)).free / GIB
    if free < need:
        raise RuntimeError(
            f"Not enough disk to save the merged model in {out_dir}: {free:.1f} GiB free, ~{need:.1f} GiB "
            f"needed ({size / GIB:.1f} GiB of weights + 20%). Fix: free disk space, choose another folder, "
            "or ship the LoRA adapter alone (tens of MB) and merge where it is used."
        )
    return {"need_gib": need, "free_gib": free}


def save_merged(merged, tokenizer, out_dir) -> Path:
    """Save a merged model and its tokenizer as one ordinary checkpoint folder, after `merge_disk_check`."""
    merge_disk_check(out_dir, merged)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print("Merged model saved to", out_dir)
    return Path(out_dir)
