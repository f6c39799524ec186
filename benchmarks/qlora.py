"""QLoRA (helpers/quant.py) on the full Nemotron-3-Nano architecture with random weights, beside bf16: memory,
speed, quality and loading, in one run of about five minutes on one H100/H200. Each measurement writes its JSON
record to --out the moment it is done, so a run cut short still leaves the ones before.

    python benchmarks/qlora.py                          # one GPU: everything below -> benchmarks/results/qlora/
    python benchmarks/qlora.py --model /dev/shm/real    # that saved model (make_random_model.py) instead of random
    python benchmarks/qlora.py --arch tiny              # CPU smoke run of every step (the tests run it)

Every run: LoRA r=16 on the tutorial's targets, TRL SFTTrainer as notebook 03 builds it, non-reentrant gradient
checkpointing, bf16 autocast, fixed-length rows (every step has the same shape), the same rows and LoRA start.
  bf16       the bf16 model built on the GPU (or --model), uncapped: the speed the 4-bit runs are compared with.
             Its weights are then saved as a checkpoint (/dev/shm, else --save-dir or the temp dir, if there is
             room; else they wait in CPU memory) for the 4-bit runs to load.
  nf4-40GB   quant.load_model_4bit (routed experts NF4 as they arrive) with the GPU capped at 40 GiB from before
             loading: load seconds and peaks, training peak and speed (goal: <= 38 GiB reserved)
  quality    first-batch loss and LoRA gradients of bf16 and NF4, the experts' weight error, both loss curves
  nf4-24GB   the 24 GB mode (all linears NF4 but out_proj/conv1d/router/LM head, double quantization), capped
             at 24 GiB (goal: <= 22 GiB reserved)
  load-disk  quant.load_model_4bit of the checkpoint in a fresh process capped at 40 GiB: seconds, GPU peak, CPU
             RAM (ru_maxrss, and /proc's private and mapped-file parts)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "notebooks", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks.models import build_random_model  # noqa: E402  (seeded, built where it runs)
from helpers import quant  # noqa: E402
from helpers.model import check_lora_targets  # noqa: E402
from train import free_memory  # noqa: E402

GIB = 2**30
RESULTS = REPO / "benchmarks" / "results" / "qlora"
ARCH_TOKENS = {"real": (8192, 8192, 2048, 256), "slice8": (8192, 8192, 2048, 256), "tiny": (256, 256, 128, 64)}
# seconds each phase may need on an H200 (imports, kernel tuning and all); a phase that would overrun --budget-s
# is skipped and says so in its record
PHASE_SECONDS = {"bf16": 50, "nf4-40GB": 100, "nf4-24GB": 60, "load-disk": 60}  # nf4-40GB: saving first


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="real", choices=sorted(ARCH_TOKENS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the speed figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, nargs=4, metavar=("BF16", "NF4_40GB", "NF4_24GB", "ROW"),
                   help="tokens per step of the three runs and tokens per row (default: by --arch)")
    p.add_argument("--phases", default="bf16,nf4-40GB,nf4-24GB,load-disk")
    p.add_argument("--model", help="a saved nemotron_h folder to measure instead of random weights")
    p.add_argument("--save-dir", help="where load-disk saves the weights when /dev/shm has no room")
    p.add_argument("--budget-s", type=float, default=340, help="skip phases that would end after this many seconds")
    p.add_argument("--in-process", action="store_true", help="load-disk in this process (default on a CPU)")
    p.add_argument("--load-only", metavar="FOLDER", help=argparse.SUPPRESS)  # the fresh process of load-disk
    p.add_argument("--cap-gib", type=float, default=40, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Set-up: the model, rows, LoRA ------------------------------------------------------------------


def offline():
    """The module with the architecture's config and the tiny tokenizer (recipe.offline, or helpers.model)."""
    try:
        from recipe import offline as module
    except ImportError:
        from helpers import model as module
    return module


def arch_config(arch: str, tokenizer):
    """The NemotronHConfig of `arch` (real: 52 layers; slice8: the first 8; tiny: the test model's) with the
    tokenizer's special ids."""
    source = offline()
    if arch == "tiny":
        config = source.tiny_config(vocab_size=len(tokenizer))
    else:
        layers = 8 if arch == "slice8" else None
        config = source.nemotron_nano_config(hybrid_override_pattern=source.NANO_PATTERN[:layers])
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def rows(n: int, row_tokens: int, vocab: int, seed: int) -> dict:
    """`n` pre-tokenized rows of `row_tokens` random ids, the first half prompt (no loss), the rest completion."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, row_tokens), generator=generator)  # 0-3: special tokens
    mask = [[0] * (row_tokens // 2) + [1] * (row_tokens - row_tokens // 2)] * n
    return {"input_ids": ids.tolist(), "completion_mask": mask}


def lora_config():
    from peft import LoraConfig

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=quant.LORA_TARGETS_4BIT, bias="none",
                        task_type="CAUSAL_LM")
    check_lora_targets(config, "nf4")
    return config


def add_lora(model, init: dict | None, seed: int):
    """The model with LoRA; `init` (name -> tensor) overwrites the start so every run begins from the same LoRA."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, lora_config())
    if init is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(init[name])
    return model


def lora_state(model) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


# Measuring ----------------------------------------------------------------------------------------


class CpuRam:
    """Peak CPU memory of this process while the block runs: ru_maxrss, and /proc's private (RssAnon) and
    mapped-file/shared (RssFile + RssShmem: checkpoint pages read through mmap) parts, sampled every 50 ms."""

    def __enter__(self):
        self.peak, self._stop = {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while True:
            with contextlib.suppress(OSError):
                for line in Path("/proc/self/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                        self.peak[key] = max(self.peak.get(key, 0), int(value.split()[0]) * 1024)
            if self._stop.wait(0.05):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.figures = {f"peak_{k.lower()}_gib": round(v / GIB, 2) for k, v in self.peak.items()}
        self.figures["ru_maxrss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def gpu_peaks(reset: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {}
    figures = {"allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return figures


def cap_gpu(gib: float | None) -> dict:
    """Let this process's caching allocator use at most `gib` GiB of the GPU (None: all of it)."""
    if not torch.cuda.is_available():
        return {"cap_gib": gib, "note": "no GPU: not capped"}
    free_memory()
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction(min(1.0, (gib or total) / total))
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() / GIB
    if held > 1:
        print(f"WARNING: {held:.1f} GiB still allocated before a capped phase: its figures include them", flush=True)
    return {"cap_gib": gib, "gpu_total_gib": round(total, 1), "allocated_at_start_gib": round(held, 2)}


@contextlib.contextmanager
def cpu_loss():
    """TRL's loss kernel needs CUDA: helpers.training's CPU stand-in on a CPU."""
    from helpers import training

    with training.cpu_loss_fallback():
        yield


def probe(model, batch: dict) -> dict:
    """Loss of the fixed first batch and the LoRA gradients (train mode, checkpointing and autocast as in training)."""
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.zero_grad(set_to_none=True)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
    loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: p.grad.detach().float().flatten().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grads": grads, "lora_tensors": len(names),
            "lora_tensors_without_grad": len(names) - len(grads)}


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append(time.perf_counter() - self._t)

    return StepTimer()


def train(model, tokenizer, data: dict, rows_per_step: int, args, workdir: Path) -> dict:
    """`args.steps` optimizer steps of notebook 03's SFTTrainer set-up on `data`; speed, memory, losses."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    row_tokens = len(data["input_ids"][0])
    config = SFTConfig(
        output_dir=str(workdir), max_steps=args.steps, per_device_train_batch_size=rows_per_step,
        gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="constant", optim="adamw_torch",
        seed=args.seed, data_seed=args.seed, bf16=cuda, use_cpu=not cuda, completion_only_loss=True,
        max_length=row_tokens, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_pin_memory=cuda)
    timer = step_timer()
    result = {"rows_per_step": rows_per_step, "row_tokens": row_tokens, "tokens_per_step": rows_per_step * row_tokens,
              "steps": args.steps, "warmup": args.warmup}
    trainer = None
    try:
        with cpu_loss():
            trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict(data),
                                 processing_class=tokenizer, callbacks=[timer])
            gpu_peaks(reset=True)
            trainer.train()
        kept = timer.steps[args.warmup:] or timer.steps
        result.update(
            status="ok", seconds_per_step_median=round(statistics.median(kept), 4),
            seconds_per_step_mean=round(statistics.fmean(kept), 4),
            tokens_per_second=round(result["tokens_per_step"] / statistics.fmean(kept), 1),
            tokens_per_second_median_step=round(result["tokens_per_step"] / statistics.median(kept), 1),
            step_seconds=[round(s, 4) for s in timer.steps],
            losses=[round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h])
    except torch.cuda.OutOfMemoryError as error:
        result.update(status="oom", error=str(error).splitlines()[0][:300], step_seconds=timer.steps)
    finally:
        if trainer is not None:
            trainer.accelerator.free_memory()
        del trainer
    result["training_memory"] = gpu_peaks()
    model.zero_grad(set_to_none=True)
    free_memory()
    return result


def versions() -> dict:
    import importlib.metadata as metadata

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "mamba-ssm", "causal-conv1d"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def header(args, config) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    try:
        from helpers.model import fast_kernels_status

        fast_path = fast_kernels_status()["fast_path"]
    except Exception as error:  # noqa: BLE001 - a record without this fact beats no record
        fast_path = f"unknown ({error!r:.100})"
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "arch": args.arch,
            "layers": config.num_hidden_layers, "seed": args.seed, "versions": versions(), "mamba_fast_path": fast_path,
            "command": "python benchmarks/qlora.py " + " ".join(sys.argv[1:]),
            "weights": f"random (seed {args.seed}); every run starts from the same LoRA weights (B = 0)"}


def write(out: Path, name: str, record: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    gpu = record.get("gpu", "cpu").replace("NVIDIA ", "").replace(" ", "-")
    path = out / f"{record['date'][:10]}_{gpu}_{record['arch']}_{name}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"  -> {path}", flush=True)
    return record


# The phases -----------------------------------------------------------------------------------------


def cosine(a: dict, b: dict) -> dict:
    common = sorted(set(a) & set(b))
    x, y = torch.cat([a[n] for n in common]), torch.cat([b[n] for n in common])
    per_tensor = [torch.nn.functional.cosine_similarity(a[n], b[n], dim=0).item() for n in common
                  if a[n].norm() > 0 and b[n].norm() > 0]
    return {"cosine": round(torch.nn.functional.cosine_similarity(x, y, dim=0).item(), 5),
            "relative_difference": round(((x - y).norm() / y.norm()).item(), 5),
            "median_tensor_cosine": round(statistics.median(per_tensor), 5) if per_tensor else None,
            "tensors_compared": len(common), "tensors_with_nonzero_gradient": len(per_tensor),
            "note": "LoRA B starts at 0, so only the B matrices get a gradient on the first batch"}


def quantized_run(name, setup: dict, cap: float, all_linears: bool, rows_per_step: int, args) -> tuple:
    """Load the weights in 4-bit under a GPU cap through quant.load_model_4bit (the tutorial's call): from the
    checkpoint, or, where none could be saved, from the state dict in CPU memory.
    Then the same LoRA start, the probe, the training run. Returns (record, probe); the record is written anyway."""
    record = setup["base"] | {"phase": name, "gpu_cap": cap_gpu(cap), "all_linears": all_linears, "status": "ok"}
    measured, model = None, None
    try:
        start = time.perf_counter()
        with CpuRam() as ram:
            if setup["folder"] is not None:
                model, _ = quant.load_model_4bit(setup["folder"], all_linears=all_linears)
            else:
                model, _ = quant.load_model_4bit(None, all_linears=all_linears, state_dict=setup["source"],
                                                 config=copy.deepcopy(setup["config"]))
        record["load"] = {"seconds": round(time.perf_counter() - start, 2), "from": setup["folder"] or "CPU memory",
                          **gpu_peaks(reset=True), "cpu_ram": ram.figures}
        record["expert_weight_error"] = weight_error(model, setup["reference_experts"])
        model = add_lora(model, setup["init"], args.seed)
        measured = probe(model, setup["probe"])
        record["first_batch_loss"] = measured["loss"]
        record["lora_tensors_without_grad"] = measured["lora_tensors_without_grad"]
        record["train"] = train(model, setup["tokenizer"], setup["data"][rows_per_step], rows_per_step, args,
                                setup["workdir"])
    except torch.cuda.OutOfMemoryError as error:
        record.update(status="oom", error=str(error).splitlines()[0][:300], memory=gpu_peaks())
    del model
    cap_gpu(None)
    return record, measured


def first_experts(model) -> tuple:
    return next((n, m) for n, m in model.named_modules() if type(m).__name__.endswith("NemotronHExperts"))


@torch.no_grad()
def weight_error(model, reference: dict) -> dict:
    """Relative error (norm of the difference / norm) of the first MoE layer's dequantized expert stacks against
    the bf16 weights they were made from, a few experts at a time."""
    name, experts = first_experts(model)
    out = {"layer": name}
    for weight in quant.EXPERT_PARAMETERS:
        dequantized, original = getattr(experts, weight), reference[f"{name}.{weight}"]
        difference = norm = 0.0
        for i in range(0, original.shape[0], 16):
            a = original[i:i + 16].to(dequantized.device, torch.float32)
            difference += (dequantized[i:i + 16].float() - a).norm().item() ** 2
            norm += a.norm().item() ** 2
        out[weight] = round(math.sqrt(difference / norm), 5)
        del dequantized
    return out


def save_checkpoint(state_dict: dict, config, tokenizer, folder: Path, shard_gib: float = 2.0) -> float:
    """Write `state_dict` (tensors on any device) as a sharded safetensors checkpoint, a shard at a time through
    CPU memory, and drop each tensor once written. Returns seconds."""
    from safetensors.torch import save_file

    start, shard, weight_map, size, index = time.perf_counter(), {}, {}, 0, 0
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    for i, name in enumerate(names):
        shard[name] = state_dict.pop(name).detach().to("cpu").contiguous()
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_gib * GIB or i == len(names) - 1:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size, index = {}, 0, index + 1
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return time.perf_counter() - start


def where_to_save(args, need_gib: float) -> Path | None:
    """A new folder on the first of --save-dir, /dev/shm (memory: no disk reads) and the temp dir with room."""
    for parent in [args.save_dir, "/dev/shm", tempfile.gettempdir()]:
        if parent and Path(parent).is_dir() and shutil.disk_usage(parent).free / GIB > need_gib * 1.05 + 1:
            return Path(tempfile.mkdtemp(prefix="qlora-bench-", dir=parent))
    return None


def load_only(args) -> dict:
    """load-disk's fresh process: quant.load_model_4bit under the GPU cap; seconds, GPU and CPU peaks."""
    record = {"phase": "load-disk", "folder": args.load_only,
              "gpu_cap": cap_gpu(args.cap_gib if torch.cuda.is_available() else None)}
    start = time.perf_counter()
    with CpuRam() as ram:
        model, _ = quant.load_model_4bit(args.load_only, all_linears=False)
    record |= {"status": "ok", "seconds": round(time.perf_counter() - start, 2), "gpu_memory": gpu_peaks(),
               "cpu_ram": ram.figures,
               "weights_gib_on_device": round(sum(p.numel() * p.element_size() for p in model.parameters()) / GIB, 2)}
    print(json.dumps(record), flush=True)
    return record


def load_bf16(folder: str):
    """A saved model in bf16 on this GPU (float32 on a CPU), as notebook 02 loads it; and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map={"": 0} if cuda else None)
    return model, AutoTokenizer.from_pretrained(folder)


def main(argv=None) -> list[dict]:  # noqa: C901
    args = parse_args(argv)
    if args.load_only:
        return [load_only(args)]
    started, phases, cuda = time.perf_counter(), args.phases.split(","), torch.cuda.is_available()
    out, workdir = Path(args.out), Path(tempfile.mkdtemp(prefix="qlora-bench-run-"))
    quant.require_bitsandbytes()
    tokens_bf16, tokens_40, tokens_24, row_tokens = args.tokens or ARCH_TOKENS[args.arch]
    if args.model:  # its weights, architecture and tokenizer
        model, tokenizer = load_bf16(args.model)
        config = model.config
    else:
        tokenizer = offline().train_tiny_tokenizer(offline().sample_texts())
        config = arch_config(args.arch, tokenizer)
        model = build_random_model(config, args.seed)
    base = header(args, config)
    base["parameters"] = count = sum(p.numel() for p in model.parameters())
    if cuda and base["mamba_fast_path"] is not True:
        print("!" * 80 + "\nNO FUSED MAMBA KERNELS: speed and memory will not be the tutorial's\n" + "!" * 80)
    data = {n: rows(n * args.steps, row_tokens, config.vocab_size, args.seed) for n in
            {tokens_bf16 // row_tokens, tokens_40 // row_tokens, tokens_24 // row_tokens}}
    probe_data = rows(4, row_tokens, config.vocab_size, args.seed + 1)
    probe_batch = {"input_ids": torch.tensor(probe_data["input_ids"]),
                   "labels": torch.tensor([[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in
                                           zip(probe_data["input_ids"], probe_data["completion_mask"])])}
    records, skipped = [], []

    def time_left(phase: str) -> bool:
        if phase not in phases:
            return False
        if cuda and time.perf_counter() - started + PHASE_SECONDS[phase] > args.budget_s:
            skipped.append(phase)
            write(out, phase, base | {"phase": phase, "status": "skipped: it would end after --budget-s"})
            return False
        return True

    # bf16: the LoRA start, the reference probe and the speed the 4-bit runs are compared with
    name, experts = first_experts(model)
    setup = {"base": base, "config": config, "tokenizer": tokenizer, "data": data, "probe": probe_batch,
             "workdir": workdir, "folder": args.model, "source": None,
             "reference_experts": {f"{name}.{w}": getattr(experts, w).detach().cpu()
                                   for w in quant.EXPERT_PARAMETERS}}
    del experts  # the module's two bf16 stacks (2.4 GiB at full size) must not outlive the bf16 model
    model = add_lora(model, None, args.seed)
    setup["init"] = lora_state(model)
    reference = probe(model, probe_batch)
    if time_left("bf16"):
        record = base | {"phase": "bf16", "status": "ok", "gpu_cap": cap_gpu(None),
                         "weights_gib": round(torch.cuda.memory_allocated() / GIB, 2) if cuda else None,
                         "first_batch_loss": reference["loss"],
                         "lora_tensors_without_grad": reference["lora_tensors_without_grad"]}
        record["train"] = train(model, tokenizer, data[tokens_bf16 // row_tokens], tokens_bf16 // row_tokens, args,
                                workdir)
        records.append(write(out, "bf16", record))
    weights = model.unload().state_dict()  # LoRA off again: the plain weights, as a checkpoint holds them
    del model
    saved = None
    if not args.model:  # save them, so the 4-bit runs load a checkpoint as the tutorial does
        saved = where_to_save(args, count * 2 / GIB)
        if saved is not None:
            base["save_seconds"] = round(save_checkpoint(weights, config, tokenizer, saved), 1)
            setup["folder"] = str(saved)
        else:
            print("No room to save the weights: the 4-bit runs load them from CPU memory", flush=True)
            setup["source"] = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
    del weights
    free_memory()

    if time_left("nf4-40GB"):
        record, measured = quantized_run("nf4-40GB", setup, 40, False, tokens_40 // row_tokens, args)
        records.append(write(out, "nf4-40GB", record))
        if measured is not None:
            bf16 = next((r for r in records if r["phase"] == "bf16"), {})
            quality = base | {
                "phase": "quality", "note": "the same weights (NF4: the bf16 experts quantized), rows, LoRA start",
                "first_batch_loss": {"bf16": reference["loss"], "nf4": measured["loss"],
                                     "difference": round(measured["loss"] - reference["loss"], 5)},
                "lora_gradients_nf4_vs_bf16": cosine(measured["grads"], reference["grads"]),
                "expert_weight_error": record.get("expert_weight_error"),
                "loss_curves": {"bf16": bf16.get("train", {}).get("losses"),
                                "nf4": record.get("train", {}).get("losses")}}
            records.append(write(out, "quality", quality))
    if time_left("nf4-24GB"):
        record, measured = quantized_run("nf4-24GB", setup, 24, True, tokens_24 // row_tokens, args)
        if measured is not None:
            record["first_batch_loss_bf16"] = reference["loss"]
            record["lora_gradients_vs_bf16"] = cosine(measured["grads"], reference["grads"])
        records.append(write(out, "nf4-24GB", record))

    if time_left("load-disk"):
        record = base | {"phase": "load-disk"}
        if setup["folder"] is None:
            record["status"] = "skipped: no room to save the checkpoint (pass --save-dir or --model)"
        elif cuda and not args.in_process:  # a fresh process: its ru_maxrss is the load's alone
            command = [sys.executable, __file__, "--load-only", setup["folder"], "--cap-gib", "40"]
            limit = max(60, args.budget_s - (time.perf_counter() - started) + 60)
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
            print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            record |= json.loads(lines[-1]) if lines else {"status": f"error (exit {done.returncode})",
                                                            "stderr_tail": done.stderr[-2000:]}
        else:
            record |= load_only(argparse.Namespace(load_only=setup["folder"], cap_gib=None))
        records.append(write(out, "load-disk", record))
    if saved is not None:
        shutil.rmtree(saved, ignore_errors=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print_table(records, skipped)
    return records


def print_table(records: list[dict], skipped: list[str]) -> None:
    print("\n| phase | tokens/step | tokens/s (median step) | mean / median s/step | peak alloc / resv GiB "
          "| load peak GiB | first-batch loss |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        t, load = r.get("train", {}), r.get("load", {})
        memory = t.get("training_memory", {})
        loss = r.get("first_batch_loss")
        if isinstance(loss, dict):
            print(f"| quality | | | | | | bf16 {loss['bf16']:.4f} / nf4 {loss['nf4']:.4f}; gradient cosine "
                  f"{r['lora_gradients_nf4_vs_bf16']['cosine']} |")
            continue
        if r["phase"] == "load-disk":
            ram = r.get("cpu_ram", {})
            print(f"| load-disk ({r.get('status')}) | | | {r.get('seconds', '-')} s to load | "
                  f"{r.get('gpu_memory', {}).get('peak_allocated_gib', '-')} peak during load | CPU RAM: ru_maxrss "
                  f"{ram.get('ru_maxrss_gib', '-')}, private {ram.get('peak_rssanon_gib', '-')} GiB | |")
            continue
        status = r.get("status", "ok") if r.get("status", "ok") != "ok" else t.get("status", "ok")
        if status != "ok":
            print(f"| {r['phase']} | {status} {(r.get('error') or t.get('error') or '')[:80]} | | | | | |")
            continue
        print(f"| {r['phase']} | {t.get('tokens_per_step')} | {t.get('tokens_per_second')} "
              f"({t.get('tokens_per_second_median_step')}) | {t.get('seconds_per_step_mean')} / "
              f"{t.get('seconds_per_step_median')} | {memory.get('peak_allocated_gib', '-')} / "
              f"{memory.get('peak_reserved_gib', '-')} | {load.get('peak_allocated_gib', '-')} | "
              f"{loss if loss is None else round(loss, 4)} |")
    if skipped:
        print(f"skipped (--budget-s): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
