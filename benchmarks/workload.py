"""What the benchmarks feed the model: MedMCQA-shaped rows of random token ids, and the fixed first batch.

Row lengths come from a prepared MedMCQA folder (real formatted rows) or, offline, from the shipped sample
tokenized with the tiny tokenizer; the ids are random. `first_batch_loss` is the loss every variant of one
architecture and seed must reproduce before training (LoRA B = 0, so it is the base model's loss).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import REPO

PROBE_ROWS = 4  # the fixed "first batch" whose loss every variant must reproduce
PROBE_SEED = 7919  # its rows: random_rows(..., [seed, PROBE_SEED])


def length_distribution(tokenizer, lengths_from=None, max_length: int = 1024) -> dict:
    """(prompt tokens, total tokens) pairs of real formatted rows, and where they came from.

    From `lengths_from` (a prepare_medmcqa output folder), else helpers.data.FORMATTED_DIR if prepared, else the
    shipped sample prepared on the fly with `tokenizer`; lengths are capped at `max_length`.
    """
    from helpers import data

    folder = Path(lengths_from) if lengths_from else data.FORMATTED_DIR
    temp = None
    if lengths_from or (folder / "manifest.json").exists():
        dsd, manifest = data.load_formatted(folder)
        options = manifest.get("options") or {}
        tok_name, source = options.get("tokenizer"), f"prepared dataset {folder} (source {options.get('source')})"
    else:
        temp = Path(tempfile.mkdtemp(prefix="bench-lengths-"))
        dsd, manifest = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=temp / "formatted", tokenizer=tokenizer,
                                             max_length=max_length)
        tok_name = getattr(tokenizer, "name_or_path", None) or "tiny BPE tokenizer (recipe.offline)"
        source = (f"shipped sample {Path(data.SAMPLE_DIR).relative_to(REPO)} prepared with prepare_medmcqa (NOT the "
                  "real MedMCQA distribution)")
    split = next((s for s in ("train", "validation") if s in dsd and "total_tokens" in dsd[s].column_names), None)
    if split is None:
        raise SystemExit(f"{folder}: no split with total_tokens/prompt_tokens columns; prepare it with "
                         "helpers.data.prepare_medmcqa(..., tokenizer=...).")
    pairs = []
    for prompt, total in zip(dsd[split]["prompt_tokens"], dsd[split]["total_tokens"]):
        prompt = min(prompt, max_length - 1)
        pairs.append((prompt, max(min(total, max_length), prompt + 1)))
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
    totals = [t for _, t in pairs]
    return {"pairs": pairs, "source": source, "split": split, "tokenizer": tok_name, "rows": len(pairs),
            "mean_tokens": statistics.fmean(totals), "median_tokens": statistics.median(totals),
            "max_tokens": max(totals), "min_tokens": min(totals),
            "mean_prompt_tokens": statistics.fmean(p for p, _ in pairs),
            "completion_share": sum(t - p for p, t in pairs) / sum(totals), "max_length": max_length}


def random_rows(pairs, n_rows: int, vocab_size: int, seed) -> dict:
    """`n_rows` pre-tokenized rows (input_ids, completion_mask): lengths drawn from `pairs`, ids at random.

    The lengths depend only on `pairs`, `n_rows` and `seed`, not on the vocabulary: the tiny CPU run draws the
    same lengths (so the same batch shapes) as a GPU run of the real architecture.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pairs), size=n_rows)
    ids, masks = [], []
    for i in picks:
        prompt, total = pairs[int(i)]
        ids.append(rng.integers(4, vocab_size, size=total).tolist())  # 0-3: special tokens of both tokenizers
        masks.append([0] * prompt + [1] * (total - prompt))
    return {"input_ids": ids, "completion_mask": masks}


def probe_rows(pairs, vocab_size: int, seed: int) -> dict:
    """The fixed first batch: PROBE_ROWS rows drawn with seed [seed, PROBE_SEED]."""
    return random_rows(pairs, PROBE_ROWS, vocab_size, [seed, PROBE_SEED])


def padded_batch(rows: dict, pad_id: int) -> dict:
    """The rows right-padded into one batch: input_ids, attention_mask, and labels (-100 on prompt and pad)."""
    n, width = len(rows["input_ids"]), max(len(r) for r in rows["input_ids"])
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows["input_ids"], rows["completion_mask"])):
        row = torch.tensor(ids)
        input_ids[i, :len(ids)] = row
        attention[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), row, torch.tensor(-100))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def first_batch_loss(model, rows: dict, pad_id: int, device) -> dict:
    """Loss on the fixed first batch (prompt masked like training), and which trainable tensors get a gradient.

    Train mode (the mixer's fused training path needs it; dropout is 0), no KV cache, through the model's own
    loss (mean over every completion token of the batch). With LoRA B = 0 this is the base model's loss, so
    every variant of the same arch and seed must agree (to ~1e-2 in bf16).
    """
    batch = {k: v.to(device) for k, v in padded_batch(rows, pad_id).items()}
    model.train()
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss.float().item()
    attention, labels = batch["attention_mask"], batch["labels"]
    out = {"rows": len(rows["input_ids"]), "tokens": int(attention.sum()),
           "loss_tokens": int((labels[:, 1:] != -100).sum()), "loss": loss}
    # Gradient check on one row: a trainable tensor without a gradient is an adapter the forward bypasses.
    try:
        model.zero_grad(set_to_none=True)
        k = int(attention[0].sum())
        model(input_ids=batch["input_ids"][:1, :k], attention_mask=attention[:1, :k], labels=labels[:1, :k],
              use_cache=False).loss.backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        out["trainable_tensors_without_grad"] = len(missing)
        out["examples_without_grad"] = missing[:8]
    except Exception as error:  # never let the diagnostic kill the benchmark
        out["grad_check_error"] = repr(error)[:300]
    finally:
        model.zero_grad(set_to_none=True)
    return out


def _row_loss(logits, labels) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100).item()


def per_row_losses(model, examples, pad_id: int) -> dict:
    """Each row's loss alone, inside the packed row, and inside the packed row without seq_idx.

    `examples`: [{"input_ids": [...], "labels": [...]}]; the packed row is fastpath.PackedCollator's.
    """
    import fastpath

    device = next(model.parameters()).device
    model.train()
    packed = fastpath.batch_to(fastpath.PackedCollator(pad_id)(examples), device)
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


def packed_first_batch(model, rows: dict, pad_id: int) -> dict:
    """The first batch packed into one sequence: every row's loss against the same row alone, with and without
    the Mamba `seq_idx` (without it, the Mamba layers carry each row's state into the next)."""
    examples = [{"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
                for ids, mask in zip(rows["input_ids"], rows["completion_mask"])]
    check = per_row_losses(model, examples, pad_id)
    weights = [sum(label != -100 for label in ex["labels"][1:]) for ex in examples]
    return {"row_losses": [round(x, 5) for x in check["packed"]],
            "max_row_loss_diff": check["max_abs_diff_packed"],
            "row_losses_without_seq_idx": [round(x, 5) for x in check["packed_without_seq_idx"]],
            "max_row_loss_diff_without_seq_idx": check["max_abs_diff_packed_without_seq_idx"],
            "row_losses_alone": [round(x, 5) for x in check["alone"]],
            # weighted by each row's trained tokens, like the padded batch's loss it is printed beside
            "loss": sum(w * x for w, x in zip(weights, check["packed"])) / sum(weights)}
