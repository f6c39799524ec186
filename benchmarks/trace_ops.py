"""Where does one training step's GPU time go, line of Python by line? Every aten op, timed and attributed.

    python benchmarks/trace_ops.py --arch real --variant fast --checkpointing moe          # GPU: the real model
    python benchmarks/trace_ops.py --arch tiny --variant standard --ops copies            # CPU: the tiny model

The profiler says *that* `copy_` takes 15% of the fast path's GPU time and `mul` 10% (benchmarks/NOTES.md),
not *why*. This script runs one step the way the Trainer does (the trainer's own collator and loss, bf16
autocast, the same checkpointing) under a `TorchDispatchMode` that sees every aten op, forward and backward.
Each op on a tensor of at least --min-elements elements is charged to the innermost line of transformers,
PEFT, TRL, mamba_ssm, causal_conv1d, accelerate, helpers or fastpath that asked for it; ops of the backward pass are
charged to the forward line that created them (autograd's anomaly mode keeps that line), and Python run inside
backward (checkpointing's recomputation, a custom autograd function's backward) is labelled `recompute`. Lines are
ranked by GPU time (CUDA events around
each op; on a CPU by bytes moved, read + write). `--ops copies` keeps only dtype conversions and copies.
Triton kernels that mamba_ssm launches itself are not aten ops: their time is not in the table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import models, timing, workload  # noqa: E402

COPY_OPS = {"aten.copy_", "aten._to_copy", "aten.clone", "aten.contiguous", "aten.index_copy", "aten.index_copy_"}
SPIN_CYCLES = 200_000  # ~0.1 ms of GPU clock cycles, more than the tracer's Python needs to launch an op
OUR_CODE = ("transformers/", "peft/", "trl/", "mamba_ssm/", "causal_conv1d/", "accelerate/", "helpers/", "fastpath/")


def _innermost(frames) -> str | None:
    """'package/file.py:line code' of the innermost (path, line, code) frame in the libraries that build the
    model (not torch's own helpers), or None."""
    for path, line, code in reversed(list(frames)):
        path = path.replace("\\", "/")
        if any(part in path for part in OUR_CODE) and "torch/utils" not in path:
            short = path.split("site-packages/")[-1].split("notebooks/")[-1]
            if "/fastpath/" in short:
                short = "fastpath/" + short.split("/fastpath/")[-1]
            return f"{short}:{line} {(code or '').strip()}"
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


_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16", "int64": "i64", "int32": "i32", "bool": "bool"}


def _tensors(tree) -> list:
    """The tensors in an op's arguments or result (nested lists and tuples too)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _dtypes(inputs, outputs) -> str:
    """'bf16,f32->f32': the distinct dtypes going in and coming out."""
    def names(ts):
        return ",".join(dict.fromkeys(_SHORT.get(str(t.dtype)[6:], str(t.dtype)[6:]) for t in ts)) or "-"
    return f"{names(inputs)}->{names(outputs)}"


class OpTracer(TorchDispatchMode):
    """Counts aten ops by (op, dtypes, forward/backward, source line): calls, bytes moved and, on CUDA, GPU time.

    `copies_only` keeps dtype conversions and copies (COPY_OPS); ops whose tensors all have fewer than
    `min_elements` elements are skipped.
    """

    def __init__(self, min_elements: int, copies_only: bool = False):
        super().__init__()
        self.min_elements, self.copies_only = min_elements, copies_only
        self.calls, self.bytes, self.events = collections.Counter(), collections.Counter(), []
        self.timed = torch.cuda.is_available()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        keep = name in COPY_OPS or not self.copies_only
        if keep and self.timed:
            # Keep the GPU busy while this (slow, traced) Python launches the op, so the two events time the
            # op's kernels and not the GPU waiting for them.
            torch.cuda._sleep(SPIN_CYCLES)
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        out = func(*args, **(kwargs or {}))
        if not keep:
            return out
        if self.timed:  # right after the launch: the bookkeeping below must not count as the op's time
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        inputs, outputs = _tensors(args) + _tensors(list((kwargs or {}).values())), _tensors(out)
        if name == "aten.copy_":  # copy_(dest, src) writes into its first argument: the source is the second one
            inputs, outputs = inputs[1:2], inputs[:1]
        if max((t.numel() for t in inputs + outputs), default=0) < self.min_elements:
            return out
        where = _where()  # a Python line: the forward pass, or its recomputation inside backward (checkpointing)
        phase = "forward" if torch._C._current_autograd_node() is None else "recompute"
        if where is None:
            where, phase = _forward_line_of_backward_op() or "(no Python line: inside autograd)", "backward"
        key = (name, _dtypes(inputs, outputs), phase, where)
        self.calls[key] += 1
        self.bytes[key] += sum(t.numel() * t.element_size() for t in inputs + outputs)
        if self.timed:
            self.events.append((key, start, end))
        return out

    def gpu_ms(self) -> collections.Counter:
        """GPU milliseconds per key (empty without CUDA)."""
        if self.timed:
            torch.cuda.synchronize()
        ms = collections.Counter()
        for key, start, end in self.events:
            ms[key] += start.elapsed_time(end)
        return ms


def one_step(peft_model, tokenizer, rows: dict, cfg, tracer: OpTracer, fast=None, warmup: bool = False) -> float:
    """One optimizer step's forward + backward as the Trainer runs it, under `tracer`; returns the loss.

    train.py's trainer (`timing.sft_trainer`), its collator, gradient checkpointing as the Trainer enables it
    when training starts, and with `fast` (a fastpath.Settings) the fast path's pieces and checkpointing policy.
    `warmup`: run the same step once untraced first, so kernel compilation and tuning stay out of the trace.
    On a CPU the packed rows go through the Mamba reference, which mixes rows: harmless for counting ops, so
    the collator is built there with `allow_state_leak`.
    """
    from datasets import Dataset

    import fastpath
    from helpers import training

    saved = timing.saved_forwards(peft_model)
    trainer = timing.sft_trainer(peft_model, tokenizer, Dataset.from_dict(rows), cfg)
    if fast is not None and "packing" in fast.pieces:
        trainer.data_collator = fastpath.collator(peft_model, tokenizer, fast,
                                                  allow_state_leak=not torch.cuda.is_available())
    if trainer.args.gradient_checkpointing:  # the Trainer does this when training starts
        peft_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    device = next(peft_model.parameters()).device
    examples = [{k: rows[k][i] for k in rows} for i in range(len(rows["input_ids"]))]
    batch = fastpath.batch_to(trainer.data_collator(examples), device)
    peft_model.train()
    pieces = contextlib.nullcontext({}) if fast is None else fastpath.model_pieces(peft_model, fast, quiet=True)
    try:
        with pieces, training.cpu_loss_fallback():
            if fast is not None and fast.checkpointing != "all":  # the policy fastpath applies when training starts
                fastpath.set_checkpointing(peft_model, fast.checkpointing)
            if warmup:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    trainer.compute_loss(peft_model, batch).backward()
                peft_model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16), \
                    torch.autograd.set_detect_anomaly(True, check_nan=False):
                with tracer:
                    loss = trainer.compute_loss(peft_model, batch)
                    loss.backward()
    finally:
        timing.restore_forwards(saved)
    return loss.item()


def report(tracer: OpTracer) -> list[dict]:
    """Every (op, dtypes, phase, line), the most GPU time (on a CPU: the most bytes moved) first."""
    ms = tracer.gpu_ms()
    rows = [{"op": op, "dtypes": dtypes, "phase": phase, "where": where, "calls": tracer.calls[key],
             "gib": round(tracer.bytes[key] / 2**30, 4), "ms": round(ms[key], 3) if ms else None}
            for key in tracer.calls for op, dtypes, phase, where in [key]]
    return sorted(rows, key=lambda r: -(r["ms"] or 0) if ms else -r["gib"])


def by_file(rows: list[dict]) -> dict:
    """GPU ms (else GiB) per source file, e.g. {'helpers/fast.py': 12.3, ...}."""
    totals = collections.Counter()
    for r in rows:
        totals[r["where"].split(":")[0]] += r["ms"] if r["ms"] is not None else r["gib"]
    return {f: round(v, 3) for f, v in totals.most_common()}


def main(argv=None) -> dict:
    from helpers.training import library_versions

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="real", choices=models.ARCHS)
    p.add_argument("--variant", default="fast", choices=["standard", "fast"])
    p.add_argument("--tokens", type=int, default=8192, help="tokens in the step (rows = tokens / mean row length)")
    p.add_argument("--checkpointing", default="all",
                   help="fast variant: block types that recompute (all, none, mamba,moe, moe:N, ...)")
    p.add_argument("--fast-features", default=None, help="fast variant: a comma list of fastpath.FEATURES to use")
    p.add_argument("--ops", default="all", choices=["all", "copies"], help="every op, or copies and casts only")
    p.add_argument("--min-elements", type=int, default=4096, help="ignore ops on smaller tensors")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="also write the report as JSON here")
    args = p.parse_args(argv)

    # as on the GPU: bf16 weights (the router's bias in float32), float32 LoRA, bf16 autocast
    fast = None
    if args.variant == "fast":
        import fastpath

        fast = fastpath.Settings(args.fast_features, args.checkpointing)
    peft_model, tokenizer = models.random_lora_model(args.arch, args.seed, dtype=torch.bfloat16)
    dist = workload.length_distribution(tokenizer, max_length=1024)
    rows = workload.random_rows(dist["pairs"], max(1, round(args.tokens / dist["mean_tokens"])),
                                peft_model.config.vocab_size, [args.seed, 3])
    cfg = models.bench_config(seed=args.seed, max_length=1024).replace(
        run_name="trace", output_root=tempfile.mkdtemp(), per_device_train_batch_size=len(rows["input_ids"]),
        gradient_accumulation_steps=1)
    if fast is not None and not torch.cuda.is_available():
        print("CPU: the Mamba layers run the PyTorch reference, which mixes packed rows; harmless for counting ops.")
    tracer = OpTracer(args.min_elements, copies_only=args.ops == "copies")
    loss = one_step(peft_model, tokenizer, rows, cfg, tracer, fast, warmup=torch.cuda.is_available())
    everything = report(tracer)
    lines, timed = everything[:args.top], tracer.timed
    unit = "ms" if timed else "GiB"
    total = sum(r["ms"] if timed else r["gib"] for r in everything)
    print(f"{args.variant} on {args.arch}, {sum(len(r) for r in rows['input_ids']):,} tokens, loss {loss:.4f}: "
          f"{sum(tracer.calls.values()):,} {'copies' if args.ops == 'copies' else 'ops'}, {total:,.2f} {unit} "
          "in one step")
    print(f"{unit:>8} {'GiB':>8} {'calls':>6}  {'op':<20} {'dtypes':<18} {'phase':<8} where")
    for r in lines:
        print(f"{(r['ms'] if timed else r['gib']):>8.3f} {r['gib']:>8.3f} {r['calls']:>6}  {r['op']:<20} "
              f"{r['dtypes']:<18} {r['phase']:<8} {r['where'][:110]}")
    files = by_file(everything)
    print(f"by file ({unit}): " + ", ".join(f"{f} {v:,.1f}" for f, v in list(files.items())[:8]))
    record = {"arch": args.arch, "variant": args.variant, "checkpointing": args.checkpointing, "ops": args.ops,
              "features": sorted(fast.pieces) if fast is not None else None,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "versions": library_versions(), "loss": loss, "unit": unit, "total": round(total, 3),
              "total_gib": round(sum(r["gib"] for r in everything), 3),
              "calls": sum(tracer.calls.values()), "by_file": files, "top": lines}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
