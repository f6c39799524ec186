"""Notebook 03's scoring: MedMCQA accuracy by letter scoring, plus a small generation demo (train.py and
notebook 04 use it too).

The protocol is lm-evaluation-harness's `medmcqa` task: feed the prompt (byte-identical to lm-eval's, ending in
"Answer:"), read the next-token logits, and pick whichever of " A", " B", " C", " D" scores highest. One forward
pass per batch, no sampling, no parsing.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from .data import LETTERS, require_labelled
from .model import pad_id

EVAL_DIR = Path(__file__).resolve().parents[2] / "outputs" / "eval"


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of " A", " B", " C", " D"; each must be exactly one token for letter scoring."""
    ids = []
    for letter in LETTERS:
        toks = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"' {letter}' is {len(toks)} tokens in this tokenizer, so letter scoring cannot read "
                             "one logit for it. Use a tokenizer where ' A'..' D' are single tokens.")
        ids.append(toks[0])
    return ids


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def predict_letters(model, tokenizer, examples: list[dict], batch_size: int = 8, progress: bool = True) -> list[dict]:
    """Score each example's four answer letters; returns one dict per example with the prediction.

    Batches are right-padded: a causal model's logits at a row's last real token do
    not depend on padding after it, so batched and one-by-one scoring agree.
    """
    from tqdm.auto import tqdm

    letter_ids = torch.tensor(letter_token_ids(tokenizer))
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=len(examples), desc="scoring", unit="q", disable=not progress)
    for batch in _batches(examples, batch_size):
        ids = [tokenizer(e["prompt"])["input_ids"] for e in batch]  # as TRL tokenizes the prompt
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        last = torch.tensor([len(r) - 1 for r in ids], device=logits.device)
        scores = logits[torch.arange(len(ids), device=logits.device), last][:, letter_ids.to(logits.device)]
        for e, s in zip(batch, scores.float().cpu()):
            out.append({"id": e["id"], "subject": e.get("subject", ""), "answer": e.get("answer", ""),
                        "pred": LETTERS[int(s.argmax())], "letter_logits": [round(float(x), 4) for x in s]})
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return out


def compare_answers(first: dict, second: dict) -> dict:
    """Two scorings of the same questions (e.g. the adapter in memory, then reloaded from disk): do they agree?

    `same`: every question gets the same letter. `largest_score_difference`: how far apart the two runs' letter
    scores are at most. The same weights scored through other code paths or in bf16 differ by rounding only, and
    rounding can flip a question whose two best letters are closer than that (`flipped_margins` lists how close
    they were): a flip with a tiny margin is rounding, a large score difference is a real change.
    """
    a, b = first["predictions"], second["predictions"]
    if [p["id"] for p in a] != [p["id"] for p in b]:
        raise ValueError("compare_answers needs two scorings of the same questions in the same order "
                         "(evaluate both with the same dataset, split and limit).")
    diffs = [max(abs(x - y) for x, y in zip(p["letter_logits"], q["letter_logits"])) for p, q in zip(a, b)]
    flipped = [(p, q) for p, q in zip(a, b) if p["pred"] != q["pred"]]

    def margin(p):  # score of the best letter minus the second best
        top = sorted(p["letter_logits"], reverse=True)
        return top[0] - top[1]

    return {"same": not flipped, "questions": len(a), "flipped": len(flipped),
            "largest_score_difference": round(max(diffs, default=0.0), 4),
            "flipped_margins": [round(min(margin(p), margin(q)), 4) for p, q in flipped]}


def describe_comparison(comparison: dict) -> str:
    """One line for `compare_answers`: 'True' or 'False (1 of 16 flipped; ...)'."""
    if comparison["same"]:
        return f"True (letter scores differ by at most {comparison['largest_score_difference']})"
    return (f"False ({comparison['flipped']} of {comparison['questions']} flipped; letter scores differ by at most "
            f"{comparison['largest_score_difference']}; the flipped questions' two best letters were "
            f"{comparison['flipped_margins']} apart)")


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
    n = len(predictions)
    correct = sum(p["pred"] == p["answer"] for p in predictions)
    by_subject = defaultdict(list)
    for p in predictions:
        by_subject[p["subject"]].append(p["pred"] == p["answer"])
    pred_counts, answer_counts = Counter(p["pred"] for p in predictions), Counter(p["answer"] for p in predictions)
    return {
        "n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "ci95": wilson_interval(correct, n),
        "per_subject": {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())},
        "predicted_letters": {L: pred_counts[L] / n for L in LETTERS} if n else {},
        "answer_letters": {L: answer_counts[L] / n for L in LETTERS} if n else {},
        "always_A_baseline": answer_counts["A"] / n if n else 0.0,
        "majority_letter": answer_counts.most_common(1)[0][0] if n else None,
        "majority_baseline": answer_counts.most_common(1)[0][1] / n if n else 0.0,
    }


def baselines(result: dict) -> str:
    """What a model that knows nothing scores on these questions: always A, always the commonest letter, chance."""
    return (f"baselines on these {result['n']} questions: always 'A' {result['always_A_baseline']:.1%}, always the "
            f"commonest letter '{result['majority_letter']}' {result['majority_baseline']:.1%}, chance 25%")


def _share(correct: float, n: int) -> str:
    """'3/7' below 10 questions (a percentage would overstate it), else '43% of 70'."""
    hits = round(correct * n)
    return f"{hits}/{n}" if n < 10 else f"{correct:.0%} of {n}"


def per_subject_table(before: dict, after: dict) -> str:
    """Per-subject accuracy before -> after training, with the number of questions beside each."""
    lines = [f"{'subject':<28}{'base':>12}{'adapter':>12}"]
    for subject, v in after["per_subject"].items():
        old = before["per_subject"].get(subject, {"accuracy": 0.0, "n": 0})
        lines.append(f"{subject[:27]:<28}{_share(old['accuracy'], old['n']):>12}{_share(v['accuracy'], v['n']):>12}")
    return "\n".join(lines)


def evaluate(model, tokenizer, dataset, name: str, split: str = "validation", limit: int | None = None,
             batch_size: int = 8, out_dir: str | Path = EVAL_DIR, progress: bool = True) -> dict:
    """Letter-score `dataset` (a formatted split), print a summary and write `<out_dir>/<name>.json`."""
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    require_labelled(split, [{"cop": -1 if not r.get("answer") else 0} for r in rows])
    rows = rows[:limit] if limit else rows
    start = time.perf_counter()
    predictions = predict_letters(model, tokenizer, rows, batch_size, progress)
    result = {"name": name, "split": split, "limit": limit, **summarize(predictions),
              "seconds": round(time.perf_counter() - start, 2), "predictions": predictions}
    lo, hi = result["ci95"]
    print(f"{name}: accuracy {result['accuracy']:.1%} (95% CI {lo:.1%}-{hi:.1%}) on {result['n']} {split} "
          f"questions; predicted letters " + " ".join(f"{k}:{v:.0%}" for k, v in result["predicted_letters"].items()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int = 96) -> str:
    """Greedy-decode the model's answer (letter, option and explanation) to one prompt."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad_id(tokenizer))
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
