"""Where do the copies come from? One training step, every copy-like op attributed to its line of Python.

    python benchmarks/trace_copies.py --arch real --variant fast --checkpointing moe    # GPU: the real model
    python benchmarks/trace_copies.py --arch tiny --variant standard                    # CPU: the tiny model

The profiler says *that* `copy_` takes 15% of the fast path's GPU time (benchmarks/NOTES.md), not *why*.
This script runs one step the way the Trainer does (the trainer's own collator and loss, bf16 autocast,
the same checkpointing) under a `TorchDispatchMode` that sees every aten op, forward and backward. Each
dtype conversion, copy or clone of at least --min-elements elements is charged to the innermost line of
transformers, PEFT, TRL, mamba_ssm or helpers that asked for it; ops of the backward pass are charged to
the forward line that created them (autograd's anomaly mode keeps that line). Bytes moved (read + write)
rank the lines: on a GPU a copy costs about its bytes over the memory bandwidth.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
sys.path.insert(0, str(REPO / "benchmarks"))

from helpers import fast, training  # noqa: E402

COPY_OPS = {"aten.copy_", "aten._to_copy", "aten.clone", "aten.contiguous", "aten.index_copy", "aten.index_copy_"}
OUR_CODE = ("transformers/", "peft/", "trl/", "mamba_ssm/", "causal_conv1d/", "accelerate/", "helpers/")


def _innermost(frames) -> str | None:
    """'package/file.py:line code' of the innermost (path, line, code) frame in the libraries that build the
    model (not torch's own helpers), or None."""
    for path, line, code in reversed(list(frames)):
        path = path.replace("\\", "/")
        if any(part in path for part in OUR_CODE) and "torch/utils" not in path:
            return f"{path.split('site-packages/')[-1].split('notebooks/')[-1]}:{line} {(code or '').strip()}"
    return None


def _where() -> str | None:
    """The line of the running Python code that asked for the op (None inside autograd's backward)."""
    return _innermost((f.filename, f.lineno, f.line) for f in traceback.extract_stack())


def _forward_line_of_backward_op() -> str | None:
    """In the backward pass: the forward line that made the current autograd node (anomaly mode keeps it)."""
    node = torch._C._current_autograd_node()
    stack = node.metadata.get("traceback_") if node is not None else None
    frames = []
    for entry in stack or []:  # traceback.format_stack() entries: '  File "path", line N, in f\n    code'
        head, _, code = entry.strip().partition("\n")
        if head.count('"') >= 2:
            frames.append((head.split('"')[1], head.split("line ")[-1].split(",")[0], code))
    return _innermost(frames)


class CopyTracer(TorchDispatchMode):
    """Counts copy-like aten ops and their bytes by (op, dtypes, forward/backward, source line)."""

    def __init__(self, min_elements: int):
        super().__init__()
        self.min_elements, self.calls, self.bytes = min_elements, collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        # copy_(dest, src) writes into its first argument: the source is the second one
        source = args[1] if name == "aten.copy_" and len(args) > 1 else (args[0] if args else None)
        if name in COPY_OPS and isinstance(source, torch.Tensor) and source.numel() >= self.min_elements:
            result = out if isinstance(out, torch.Tensor) else source
            where = _where()
            phase = "forward"
            if where is None:
                where, phase = _forward_line_of_backward_op() or "(no Python line: inside autograd)", "backward"
            moved = source.numel() * source.element_size() + result.numel() * result.element_size()
            key = (name, f"{source.dtype}->{result.dtype}".replace("torch.", ""), phase, where)
            self.calls[key] += 1
            self.bytes[key] += moved
        return out


def one_step(peft_model, tokenizer, rows: dict, cfg, tracer: CopyTracer) -> float:
    """One optimizer step's forward + backward as the Trainer runs it, under `tracer`; returns the loss."""
    from datasets import Dataset

    trainer = training.make_trainer(peft_model, tokenizer, Dataset.from_dict(rows), cfg, save_strategy="no",
                                    report_to=[], disable_tqdm=True)
    if trainer.args.gradient_checkpointing:  # the Trainer does this when training starts
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        if cfg.fast:
            fast.set_checkpointing(peft_model, cfg.checkpointing)
    device = next(peft_model.parameters()).device
    examples = [{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))]
    batch = {k: v.to(device) for k, v in trainer.data_collator(examples).items()}
    peft_model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.autograd.set_detect_anomaly(True, check_nan=False):
        with tracer:
            loss = trainer.compute_loss(peft_model, batch)
            loss.backward()
    return loss.item()


def report(tracer: CopyTracer, top: int) -> list[dict]:
    """The lines that move the most bytes, largest first."""
    rows = [{"op": op, "dtypes": dtypes, "phase": phase, "where": where, "calls": tracer.calls[key],
             "gib": round(tracer.bytes[key] / 2**30, 4)}
            for key in tracer.bytes for op, dtypes, phase, where in [key]]
    return sorted(rows, key=lambda r: -r["gib"])[:top]


def main(argv=None) -> dict:
    import bench

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="real", choices=bench.ARCHS)
    p.add_argument("--variant", default="fast", choices=["standard", "fast"])
    p.add_argument("--tokens", type=int, default=8192, help="tokens in the step (rows = tokens / mean row length)")
    p.add_argument("--checkpointing", default="all", help="fast variant: block types that recompute")
    p.add_argument("--fast-features", default=None, help="fast variant: helpers.fast.FEATURES to use")
    p.add_argument("--min-elements", type=int, default=4096, help="ignore smaller tensors")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="also write the report as JSON here")
    args = p.parse_args(argv)

    # as on the GPU: bf16 weights (the router's bias in float32), float32 LoRA, bf16 autocast
    peft_model, tokenizer = bench.random_lora_model(args.arch, args.seed, dtype=torch.bfloat16)
    dist = bench.length_distribution(tokenizer, max_length=1024, seed=args.seed)
    rows = bench.random_rows(dist["pairs"], max(1, round(args.tokens / dist["mean_tokens"])),
                             peft_model.config.vocab_size, [args.seed, 3])
    cfg = training.TrainConfig(run_name="trace", output_root=tempfile.mkdtemp(), max_length=1024,
                               per_device_train_batch_size=len(rows["input_ids"]), gradient_accumulation_steps=1,
                               fast=args.variant == "fast", checkpointing=args.checkpointing,
                               fast_features=args.fast_features, seed=args.seed,
                               extra={"allow_state_leak": not torch.cuda.is_available()})
    if cfg.fast and not torch.cuda.is_available():
        print("CPU: the Mamba layers run the PyTorch reference, which mixes packed rows; harmless for counting copies.")
    tracer = CopyTracer(args.min_elements)
    loss = one_step(peft_model, tokenizer, rows, cfg, tracer)
    lines = report(tracer, args.top)
    total = sum(tracer.bytes.values()) / 2**30
    print(f"{args.variant} on {args.arch}, {sum(len(r) for r in rows['input_ids']):,} tokens, loss {loss:.4f}: "
          f"{sum(tracer.calls.values()):,} copies moving {total:.2f} GiB in one step")
    print(f"{'GiB':>8} {'calls':>6}  {'op':<16} {'dtypes':<22} {'phase':<8} where")
    for r in lines:
        print(f"{r['gib']:>8.3f} {r['calls']:>6}  {r['op']:<16} {r['dtypes']:<22} {r['phase']:<8} {r['where'][:110]}")
    record = {"arch": args.arch, "variant": args.variant, "checkpointing": args.checkpointing,
              "features": sorted(fast.parse_features(args.fast_features)) if cfg.fast else None,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "versions": training.library_versions(), "loss": loss, "total_gib": round(total, 3),
              "calls": sum(tracer.calls.values()), "top": lines}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
