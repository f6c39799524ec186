"""Is the fast path the same training as the standard one? Loss, per-row loss, LoRA gradients, loss curve.

    python benchmarks/check_fast.py --arch slice8 --out benchmarks/results/checks   # GPU, real widths, random weights
    python benchmarks/check_fast.py --arch real --out benchmarks/results/checks     # GPU, all 52 layers

On identical rows it compares the standard batch (padded, attention mask) with the fast batch (packed into
one row, position_ids + Mamba seq_idx, fastpath.PackedCollator):
  * the loss through the trainer's own `compute_loss` (TRL's fused LM head on GPU),
  * every row's loss, alone vs inside the packed row (and packed WITHOUT seq_idx, to show the Mamba leak),
  * the gradient of every LoRA tensor (LoRA B is set to small random values first, so A gets a gradient too),
  * a short training run through train.py's trainer + `trainer.train()`: loss at every step, both paths;
  * with --compare-features, the loss and gradients of other feature sets on the same rows;
  * with --float32-reference, both bf16 paths' gradients against the standard path's in float32.
The trainer is the one train.py builds (`benchmarks.timing.sft_trainer`). The loss and gradient checks call the
model directly with the fast path's model pieces on (`fastpath.model_pieces`); the training curve runs
`trainer.train()` inside `fastpath.applied`, as train.py --fast does. A CPU test runs the same functions on a tiny
attention + MoE model (no Mamba, so packing is exact there).
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import models, timing, workload  # noqa: E402
from benchmarks.workload import per_row_losses  # noqa: E402,F401  (the per-row check; tests call it from here)


def settings_for(features: str | None = None, checkpointing: str = "all"):
    """`fastpath.Settings` for a feature list (None: every piece this machine can run)."""
    import fastpath

    return fastpath.Settings(features, checkpointing)


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
    import fastpath

    device = next(model.parameters()).device
    batch = fastpath.batch_to(batch, device)
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
def fast_model(model, settings):
    """Inside: `model` runs the fast path's model-level pieces of `settings` (fastpath.model_pieces: experts,
    norms, ReLU², attention, LoRA, the Mamba kernel binding); after: as before. Yields fastpath's report
    ({piece: modules changed}). The checks call the model directly, so the collator is theirs to choose."""
    import fastpath

    with fastpath.model_pieces(model, settings, quiet=True) as report:
        yield report


def tokenized_examples(trainer, n: int) -> list[dict]:
    """The first `n` rows as the trainer tokenized them (input_ids + labels, completion-only)."""
    rows = [trainer.train_dataset[i] for i in range(min(n, len(trainer.train_dataset)))]
    return [{"input_ids": r["input_ids"], "labels": r.get("labels", r["input_ids"])} for r in rows]


@contextlib.contextmanager
def scratch_trainer(model, tokenizer, dataset, cfg, fast=None):
    """train.py's trainer for `model` (the fast path's collator and pieces with `fast`, a fastpath.Settings) that
    leaves nothing behind: afterwards the pieces are off again, and the `forward` wrappers that TRL (fused LM
    head) and accelerate (autocast) put on the model are gone."""
    from helpers import training

    saved = timing.saved_forwards(model)
    trainer = timing.sft_trainer(model, tokenizer, dataset, cfg, fast)
    try:
        if fast is None:
            with training.cpu_loss_fallback():
                yield trainer
        else:
            import fastpath

            with fastpath.applied(trainer, fast, quiet=True), training.cpu_loss_fallback():
                yield trainer
    finally:
        timing.restore_forwards(saved)


def training_curves(model, tokenizer, dataset, cfg, steps: int, settings=None) -> dict:
    """Train `steps` steps on the standard path, reset LoRA, train the same steps fast; losses per step."""
    settings = settings or settings_for()
    start = lora_snapshot(model)
    curves = {}
    for name, fast in (("standard", None), ("fast", settings)):
        load_lora(model, start)
        run = cfg.replace(run_name=f"check-{name}", max_steps=steps, logging_steps=1, gradient_accumulation_steps=1)
        with scratch_trainer(model, tokenizer, dataset, run, fast) as trainer:  # fast: the pieces on, then off
            trainer.train()
            curves[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    diffs = [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(curves["fast"], curves["standard"])]
    return {**curves, "max_rel_diff": max(diffs), "steps": steps}


def float32_reference(model, tokenizer, dataset, cfg, examples, seed: int) -> tuple[float, dict]:
    """The standard path's loss and LoRA gradients in float32 without autocast: the yardstick both bf16 paths
    are measured against. Converts the model to float32 for good (call it last)."""
    model.float()
    randomize_lora_b(model, seed)
    with scratch_trainer(model, tokenizer, dataset, cfg) as trainer:
        return loss_and_grads(trainer, model, trainer.data_collator(examples), autocast=False)


def check(model, tokenizer, dataset, cfg, rows: int = 8, steps: int = 6, seed: int = 0,
          compare_features: list[str] | None = None, float32: bool = False, settings=None) -> dict:
    """All checks on one LoRA-wrapped model; returns a JSON-able record.

    `settings`: the fast path's `fastpath.Settings` (default: every piece this machine can run).
    `compare_features`: other feature lists whose loss and gradients are also compared with the standard
    path's (one piece at a time, to see which one moves the numbers). `float32`: finally, compare both paths
    with the standard path's float32 gradients (the model stays in float32 afterwards).
    """
    import fastpath
    from helpers.model import pad_id as pad_id_of

    settings = settings or settings_for()
    pad_id = pad_id_of(tokenizer)
    start = lora_snapshot(model)  # the LoRA init (B = 0), for the training runs
    with scratch_trainer(model, tokenizer, dataset, cfg) as trainer:
        examples = tokenized_examples(trainer, rows)
        packed = fastpath.PackedCollator(pad_id)(examples)
        randomize_lora_b(model, seed)
        std_loss, std_grads = loss_and_grads(trainer, model, trainer.data_collator(examples))
        row_grads = row_by_row_grads(trainer, model, examples)  # the noise floor: same rows, other shapes
        with fast_model(model, settings) as applied:
            fast_loss, fast_grads = loss_and_grads(trainer, model, packed)
            rows_check = per_row_losses(model, examples, pad_id)
        by_features = []
        for features in compare_features or []:
            with fast_model(model, settings_for(features, settings.checkpointing)):
                loss, grads = loss_and_grads(trainer, model, packed)
            by_features.append({"features": features, "loss_abs_diff": abs(std_loss - loss),
                                "grads": compare_grads(grads, std_grads)})
    load_lora(model, start)
    curves = training_curves(model, tokenizer, dataset, cfg, steps, settings)
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
        "features": sorted(settings.pieces), "pieces_applied": timing.json_report(applied),
        "by_features": by_features,
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
    p.add_argument("--fast-features", default=None, help="the fast path's pieces, a comma list of fastpath.FEATURES "
                                                          "(default: all of them)")
    p.add_argument("--compare-features", nargs="*", default=[], metavar="FEATURES",
                   help="also compare the loss and gradients of these feature lists (e.g. one piece added each)")
    p.add_argument("--float32-reference", action="store_true",
                   help="also compare both paths' gradients with the standard path's in float32 (slice8 fits)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "checks"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_fast.py compares the fused-kernel fast path with the standard one: it needs a GPU. "
                         "The CPU tests run the same checks on a tiny model without Mamba.")
    from helpers.training import library_versions

    settings = settings_for(args.fast_features)
    model, tokenizer = models.random_lora_model(args.arch, args.seed, routed_experts=args.routed_experts)
    dist = workload.length_distribution(tokenizer, max_length=1024)
    n = args.rows_per_step * (args.steps + 1)
    dataset = Dataset.from_dict(workload.random_rows(dist["pairs"], n, model.config.vocab_size, [args.seed, 1]))
    cfg = models.bench_config(seed=args.seed, max_length=1024, routed_experts=args.routed_experts).replace(
        run_name="check", output_root=tempfile.mkdtemp(), per_device_train_batch_size=args.rows_per_step,
        gradient_accumulation_steps=1, learning_rate=2e-4, warmup_ratio=0.0)
    record = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "arch": args.arch,
              "gpu": torch.cuda.get_device_name(), "versions": library_versions(),
              "routed_experts": args.routed_experts, "kernels": models.kernel_status(),
              **check(model, tokenizer, dataset, cfg, rows=args.rows, steps=args.steps, seed=args.seed,
                      compare_features=args.compare_features, float32=args.float32_reference, settings=settings)}
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
