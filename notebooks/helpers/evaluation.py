"""Notebook 03's scoring (train.py and notebook 04 use it too): MedMCQA accuracy by letter scoring, as
lm-evaluation-harness's `medmcqa` task does it. Feed the prompt (byte-identical to lm-eval's, ending in "Answer:"),
read the next-token logits and pick whichever of " A", " B", " C", " D" scores highest: one forward pass per batch,
no sampling, no parsing.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from .config import OUTPUTS
from .data import LETTERS, UnlabelledSplitError
from .model import pad_id

EVAL_DIR = OUTPUTS / "eval"


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of " A", " B", " C", " D"; each must be exactly one token for letter scoring."""
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
    for letter, toks in zip(LETTERS, ids):
        if len(toks) != 1:
            raise ValueError(f"' {letter}' is {len(toks)} tokens in this tokenizer, so letter scoring cannot read "
                             "one logit for it. Use a tokenizer where ' A'..' D' are single tokens.")
    return [toks[0] for toks in ids]


@torch.no_grad()
def predict_letters(model, tokenizer, examples: list[dict], batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Score each example's four answer letters; returns one dict per example with the prediction. Batches are
    right-padded: a causal model's logits at a row's last real token do not depend on padding after it."""
    from tqdm.auto import tqdm

    letter_ids, pad = torch.tensor(letter_token_ids(tokenizer)), pad_id(tokenizer)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(examples), batch_size), desc="scoring", unit="batch", disable=not progress):
        batch = examples[start:start + batch_size]
        ids = [tokenizer(e["prompt"])["input_ids"] for e in batch]  # as TRL tokenizes the prompt
        input_ids = torch.full((len(ids), max(map(len, ids))), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        last = torch.tensor([len(r) - 1 for r in ids], device=logits.device)
        scores = logits[torch.arange(len(ids), device=logits.device), last][:, letter_ids.to(logits.device)]
        out += [{"id": e["id"], "subject": e.get("subject", ""), "answer": e.get("answer", ""),
                 "pred": LETTERS[int(s.argmax())], "letter_logits": [round(float(x), 4) for x in s]}
                for e, s in zip(batch, scores.float().cpu())]
    model.train(was_training)
    return out


def compare_answers(first: dict, second: dict) -> dict:
    """Two scorings of the same questions (e.g. the adapter in memory, then reloaded from disk): the same letters?
    Other code paths or bf16 rounding move the letter scores a little (`largest_score_difference`), which can flip a
    question whose two best letters were closer than that (`flipped_margins`): a flip with a tiny margin is rounding,
    not a change. `text` says all this in one line."""
    a, b = first["predictions"], second["predictions"]
    if [p["id"] for p in a] != [p["id"] for p in b]:
        raise ValueError("compare_answers needs two scorings of the same questions in the same order "
                         "(evaluate both with the same dataset, split and limit).")

    def margin(p):  # score of the best letter minus the second best
        top = sorted(p["letter_logits"], reverse=True)
        return top[0] - top[1]

    diffs = [max(abs(x - y) for x, y in zip(p["letter_logits"], q["letter_logits"])) for p, q in zip(a, b)]
    flipped = [round(min(margin(p), margin(q)), 4) for p, q in zip(a, b) if p["pred"] != q["pred"]]
    largest = round(max(diffs, default=0.0), 4)
    text = f"letter scores differ by at most {largest}"
    text = (f"False ({len(flipped)} of {len(a)} flipped; {text}; the flipped questions' two best letters were "
            f"{flipped} apart)") if flipped else f"True ({text})"
    return {"same": not flipped, "questions": len(a), "flipped": len(flipped), "largest_score_difference": largest,
            "flipped_margins": flipped, "text": text}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: honest error bars even for small n."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(predictions: list[dict]) -> dict:
    """Accuracy with a 95% CI, per-subject accuracy, and the predicted-letter distribution (bias)."""
    n, correct = len(predictions), sum(p["pred"] == p["answer"] for p in predictions)
    by_subject, predicted = defaultdict(list), Counter(p["pred"] for p in predictions)
    for p in predictions:
        by_subject[p["subject"]].append(p["pred"] == p["answer"])
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": wilson_interval(correct, n),
            "per_subject": {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())},
            "predicted_letters": {L: predicted[L] / n for L in LETTERS} if n else {}}


def per_subject_table(before: dict, after: dict) -> str:
    """Per-subject accuracy before -> after training, with the number of questions ('3/7' below 10 questions, where
    a percentage would overstate it, else '43% of 70')."""
    def share(v: dict) -> str:
        return f"{round(v['accuracy'] * v['n'])}/{v['n']}" if v["n"] < 10 else f"{v['accuracy']:.0%} of {v['n']}"

    lines = [f"{'subject':<28}{'base':>12}{'adapter':>12}"]
    for subject, v in after["per_subject"].items():
        old = before["per_subject"].get(subject, {"accuracy": 0.0, "n": 0})
        lines.append(f"{subject[:27]:<28}{share(old):>12}{share(v):>12}")
    return "\n".join(lines)


def evaluate(model, tokenizer, dataset, name: str, split: str = "validation", limit: int | None = None,
             batch_size: int = 8, out_dir: str | Path = EVAL_DIR, progress: bool = True) -> dict:
    """Letter-score `dataset` (a formatted split), print a summary and write `<out_dir>/<name>.json`."""
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if any(not r.get("answer") for r in rows):
        raise UnlabelledSplitError(f"The MedMCQA {split} split has no answers (cop = -1), so it cannot be scored. "
                                   "Use the 'validation' split to measure accuracy.")
    start, rows = time.perf_counter(), rows[:limit] if limit else rows
    predictions = predict_letters(model, tokenizer, rows, batch_size, progress)
    result = {"name": name, "split": split, "limit": limit, **summarize(predictions),
              "seconds": round(time.perf_counter() - start, 2), "predictions": predictions}
    lo, hi = result["ci95"]
    print(f"{name}: accuracy {result['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}) on {result['n']} {split} "
          f"questions; predicted letters " + " ".join(f"{k}:{v:.0%}" for k, v in result["predicted_letters"].items()))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result
