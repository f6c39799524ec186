"""Is the fast path the same training as the standard one? Loss, per-row loss, LoRA gradients, loss curve.

    python benchmarks/check_fast.py --arch slice8 --out benchmarks/results     # GPU, real widths, random weights
    python benchmarks/check_fast.py --arch real --out benchmarks/results       # GPU, all 52 layers

On identical rows it compares the standard batch (padded, attention mask) with the fast batch (packed into
one row, position_ids + Mamba seq_idx, helpers.fast.PackedCollator):
  * the loss through the trainer's own `compute_loss` (TRL's fused LM head on GPU),
  * every row's loss, alone vs inside the packed row (and packed WITHOUT seq_idx, to show the Mamba leak),
  * the gradient of every LoRA tensor (LoRA B is set to small random values first, so A gets a gradient too),
  * a short training run through `make_trainer` + `trainer.train()`: loss at every step, both paths;
  * with --compare-features, the loss and gradients of other fast_features sets on the same rows;
  * with --float32-reference, both bf16 paths' gradients against the standard path's in float32.
The same functions run in the CPU tests on a tiny attention + MoE model (no Mamba, so packing is exact there).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

import bench  # noqa: E402  (bench imports this module only inside a function)
from helpers import fast, training  # noqa: E402
from helpers import model as hmodel  # noqa: E402


def lora_parameters(model) -> dict:
    """The trainable (LoRA) tensors by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomize_lora_b(model, seed: int = 0, std: float = 0.02) -> None:
    """LoRA B starts at zero, which makes every A gradient zero; give B small random values to test A too."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.device, p.dtype))


def lora_snapshot(model) -> dict:
    """A copy of every LoRA tensor, for `load_lora` to put back."""
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


def load_lora(model, snapshot: dict) -> None:
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            p.copy_(snapshot[n])


def lora_grads(model) -> dict:
    """Every LoRA gradient, as float32 copies (None where a tensor got none)."""
    return {n: (p.grad.detach().float().clone() if p.grad is not None else None)
            for n, p in lora_parameters(model).items()}


def backward(trainer, model, batch, num_items_in_batch=None, autocast: bool = True) -> float:
    """The trainer's own compute_loss on `batch`, under the autocast the Trainer trains in (accelerate's: bf16 on a
    GPU, none on a CPU in float32; `autocast=False`: none), then backward. Adds to the gradients already there."""
    device = next(model.parameters()).device
    batch = fast.batch_to(batch, device)
    model.train()
    with trainer.accelerator.autocast() if autocast else torch.autocast(device.type, enabled=False):
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.item()


def loss_and_grads(trainer, model, batch, autocast: bool = True) -> tuple[float, dict]:
    """Loss from the trainer's own compute_loss on `batch`, and every LoRA gradient (float32 copies)."""
    model.zero_grad(set_to_none=True)
    return backward(trainer, model, batch, autocast=autocast), lora_grads(model)


def row_by_row_grads(trainer, model, examples) -> dict:
    """The standard path's gradient of the whole batch, summed from one row at a time.

    Same maths, other shapes and kernels: the difference to the batched gradient is the floating-point
    noise of the precision in use, the yardstick for the fast path's difference.
    """
    total = sum(sum(label != -100 for label in ex["labels"][1:]) for ex in examples)
    model.zero_grad(set_to_none=True)
    for ex in examples:  # with num_items_in_batch = the tokens of all rows, the row gradients sum to the batch's
        backward(trainer, model, trainer.data_collator([ex]), num_items_in_batch=total)
    grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def _row_loss(logits, labels) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100).item()


def per_row_losses(model, examples, pad_id: int) -> dict:
    """Each row's loss alone, inside the packed row, and inside the packed row without seq_idx."""
    device = next(model.parameters()).device
    model.train()
    packed = fast.batch_to(fast.PackedCollator(pad_id)(examples), device)
    out = {"alone": [], "packed": [], "packed_without_seq_idx": []}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]], device=device)
            out["alone"].append(_row_loss(model(input_ids=ids, use_cache=False).logits[0],
                                          torch.tensor(ex["labels"], device=device)))
        for key, extra in (("packed", {"seq_idx": packed["seq_idx"]}), ("packed_without_seq_idx", {})):
            logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                           **extra).logits[0]
            start = 0
            for ex in examples:
                n = len(ex["input_ids"])
                out[key].append(_row_loss(logits[start:start + n], torch.tensor(ex["labels"], device=device)))
                start += n
    for key in ("packed", "packed_without_seq_idx"):
        out[f"max_abs_diff_{key}"] = max(abs(a - b) for a, b in zip(out[key], out["alone"]))
    return out


def compare_grads(a: dict, b: dict) -> dict:
    """Relative error ||a - b|| / ||b|| per LoRA tensor: the worst, the median, and tensors without a gradient."""
    errors, missing = {}, []
    for name in b:
        if a[name] is None or b[name] is None:
            missing.append(name)
            continue
        denom = b[name].norm().item()
        errors[name] = (a[name] - b[name]).norm().item() / denom if denom > 0 else (a[name].norm().item())
    values = sorted(errors.values())
    worst = max(errors, key=errors.get) if errors else None
    return {"tensors": len(b), "without_grad": missing, "max_rel_error": values[-1] if values else None,
            "median_rel_error": values[len(values) // 2] if values else None, "worst_tensor": worst}


@contextlib.contextmanager
def fast_model(model, cfg):
    """Inside: the model runs the fast path's model-level pieces that cfg's features ask for; after: as before."""
    restore = fast.use_model_features(model, fast.parse_features(cfg.fast_features))
    try:
        yield
    finally:
        restore()


def tokenized_examples(trainer, n: int) -> list[dict]:
    """The first `n` rows as the trainer tokenized them (input_ids + labels, completion-only)."""
    rows = [trainer.train_dataset[i] for i in range(min(n, len(trainer.train_dataset)))]
    return [{"input_ids": r["input_ids"], "labels": r.get("labels", r["input_ids"])} for r in rows]


@contextlib.contextmanager
def scratch_trainer(model, tokenizer, dataset, cfg):
    """A trainer for `model` that leaves nothing behind: afterwards the fast-path pieces it switched on are off,
    and the `forward` wrappers that TRL (fused LM head) and accelerate (autocast) put on the model are gone."""
    saved = bench.saved_forwards(model)
    trainer = training.make_trainer(model, tokenizer, dataset, cfg, save_strategy="no", report_to=[],
                                    disable_tqdm=True)
    try:
        yield trainer
    finally:
        if trainer.restore_model_features:
            trainer.restore_model_features()
        bench.restore_forwards(saved)


def training_curves(model, tokenizer, dataset, cfg, steps: int) -> dict:
    """Train `steps` steps on the standard path, reset LoRA, train the same steps fast; losses per step."""
    start = lora_snapshot(model)
    curves = {}
    for name, is_fast in (("standard", False), ("fast", True)):
        load_lora(model, start)
        run = cfg.replace(run_name=f"check-{name}", fast=is_fast, max_steps=steps, logging_steps=1,
                          gradient_accumulation_steps=1)
        with scratch_trainer(model, tokenizer, dataset, run) as trainer:  # fast=True: the pieces on, then off
            trainer.train()
            curves[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    diffs = [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(curves["fast"], curves["standard"])]
    return {**curves, "max_rel_diff": max(diffs), "steps": steps}


def float32_reference(model, tokenizer, dataset, cfg, examples, seed: int) -> tuple[float, dict]:
    """The standard path's loss and LoRA gradients in float32 without autocast: the yardstick both bf16 paths
    are measured against. Converts the model to float32 for good (call it last)."""
    model.float()
    randomize_lora_b(model, seed)
    with scratch_trainer(model, tokenizer, dataset, cfg.replace(fast=False)) as trainer:
        return loss_and_grads(trainer, model, trainer.data_collator(examples), autocast=False)


def check(model, tokenizer, dataset, cfg, rows: int = 8, steps: int = 6, seed: int = 0,
          compare_features: list[str] | None = None, float32: bool = False) -> dict:
    """All checks on one LoRA-wrapped model; returns a JSON-able record.

    `compare_features`: other fast_features sets whose loss and gradients are also compared with the
    standard path's (one piece at a time, to see which one moves the numbers). `float32`: finally, compare
    both paths with the standard path's float32 gradients (the model stays in float32 afterwards).
    """
    pad_id = hmodel.pad_id(tokenizer)
    start = lora_snapshot(model)  # the LoRA init (B = 0), for the training runs
    with scratch_trainer(model, tokenizer, dataset, cfg.replace(fast=False)) as trainer:
        examples = tokenized_examples(trainer, rows)
        packed = fast.PackedCollator(pad_id)(examples)
        randomize_lora_b(model, seed)
        std_loss, std_grads = loss_and_grads(trainer, model, trainer.data_collator(examples))
        row_grads = row_by_row_grads(trainer, model, examples)  # the noise floor: same rows, other shapes
        with fast_model(model, cfg):
            fast_loss, fast_grads = loss_and_grads(trainer, model, packed)
            rows_check = per_row_losses(model, examples, pad_id)
        by_features = []
        for features in compare_features or []:
            with fast_model(model, cfg.replace(fast_features=features)):
                loss, grads = loss_and_grads(trainer, model, packed)
            by_features.append({"features": features, "loss_abs_diff": abs(std_loss - loss),
                                "grads": compare_grads(grads, std_grads)})
    load_lora(model, start)
    curves = training_curves(model, tokenizer, dataset, cfg, steps)
    reference = {}
    if float32:
        load_lora(model, start)
        ref_loss, ref_grads = float32_reference(model, tokenizer, dataset, cfg, examples, seed)
        reference = {"loss": ref_loss, "standard_bf16": compare_grads(std_grads, ref_grads),
                     "fast_bf16": compare_grads(fast_grads, ref_grads)}
    return {
        "rows": len(examples), "tokens": sum(len(e["input_ids"]) for e in examples),
        "loss": {"standard": std_loss, "fast": fast_loss, "abs_diff": abs(std_loss - fast_loss)},
        "per_row": rows_check,
        "grads": compare_grads(fast_grads, std_grads),
        "grads_noise_floor": compare_grads(row_grads, std_grads),
        "features": sorted(fast.parse_features(cfg.fast_features)), "by_features": by_features,
        "training": curves, "float32_reference": reference,
    }


def main(argv=None) -> dict:
    from datasets import Dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="slice8", choices=["slice8", "real"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows-per-step", type=int, default=32)
    p.add_argument("--routed-experts", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fast-features", default=None, help="the fast path's pieces (default: all of them)")
    p.add_argument("--compare-features", nargs="*", default=[], metavar="FEATURES",
                   help="also compare the loss and gradients of these fast_features sets (e.g. one piece added each)")
    p.add_argument("--float32-reference", action="store_true",
                   help="also compare both paths' gradients with the standard path's in float32 (slice8 fits)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_fast.py compares the fused-kernel fast path with the standard one: it needs a GPU. "
                         "The CPU tests (tests/test_fast.py) run the same checks on a tiny model without Mamba.")
    model, tokenizer = bench.random_lora_model(args.arch, args.seed, routed_experts=args.routed_experts)
    dist = bench.length_distribution(tokenizer, max_length=1024, seed=args.seed)
    n = args.rows_per_step * (args.steps + 1)
    dataset = Dataset.from_dict(bench.random_rows(dist["pairs"], n, model.config.vocab_size, [args.seed, 1]))
    cfg = training.TrainConfig(run_name="check", output_root=tempfile.mkdtemp(), max_length=1024,
                               per_device_train_batch_size=args.rows_per_step, gradient_accumulation_steps=1,
                               learning_rate=2e-4, warmup_ratio=0.0, seed=args.seed, fast_features=args.fast_features)
    record = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "arch": args.arch,
              "gpu": torch.cuda.get_device_name(), "versions": training.library_versions(),
              "routed_experts": args.routed_experts, "kernels": bench.kernel_status(),
              **check(model, tokenizer, dataset, cfg, rows=args.rows, steps=args.steps, seed=args.seed,
                      compare_features=args.compare_features, float32=args.float32_reference)}
    out = Path(args.out) / f"fast_check_{args.arch}{'_experts' if args.routed_experts else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    summary = {
        "loss": record["loss"],
        "per_row_max_diff": record["per_row"]["max_abs_diff_packed"],
        "per_row_max_diff_without_seq_idx": record["per_row"]["max_abs_diff_packed_without_seq_idx"],
        "grads": {k: v for k, v in record["grads"].items() if k != "without_grad"} | {
            "without_grad": len(record["grads"]["without_grad"])},
        "grads_noise_floor_max_rel_error": record["grads_noise_floor"]["max_rel_error"],
        "grads_noise_floor_median_rel_error": record["grads_noise_floor"]["median_rel_error"],
        "training_max_rel_diff": record["training"]["max_rel_diff"],
        "float32_reference": {k: ([v["median_rel_error"], v["max_rel_error"]] if isinstance(v, dict) else v)
                              for k, v in record["float32_reference"].items()},
        "by_features": [{"features": r["features"], "loss_abs_diff": r["loss_abs_diff"],
                         "grads_median_max": [r["grads"]["median_rel_error"], r["grads"]["max_rel_error"]]}
                        for r in record["by_features"]]}
    print(json.dumps(summary, indent=1))
    print("Record:", out)
    return record


if __name__ == "__main__":
    main()
