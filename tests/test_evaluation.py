"""Letter scoring against a stub model whose logits are known."""

import json

import pytest
import torch

from helpers import data, evaluation
from recipe import synthetic

LETTER_IDS = {"A": 11, "B": 12, "C": 13, "D": 14}


class CharTokenizer:
    """One token per character; ' A'..' D' (space + letter) are the single tokens 11..14."""
    pad_token_id, eos_token_id, eos_token = 0, 1, "</s>"

    def __call__(self, text, add_special_tokens=True, **kw):
        if text.startswith(" ") and text[1:] in LETTER_IDS:
            return {"input_ids": [LETTER_IDS[text[1:]]]}
        return {"input_ids": [20 + (ord(c) % 50) for c in text]}


class StubModel(torch.nn.Module):
    """Puts a known score on each letter at every position: the letter named by `favourite[length]`.

    The favoured letter depends on the *true length* of the row, so right padding or
    reading the wrong position would change the prediction.
    """

    def __init__(self, favourite_by_length):
        super().__init__()
        self.favourite = favourite_by_length
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, 100)
        for b in range(batch):
            n = int(attention_mask[b].sum())
            letter = self.favourite.get(n, "A")
            logits[b, n - 1, LETTER_IDS[letter]] = 5.0
            logits[b, n - 1, LETTER_IDS["B"]] += 1.0   # a runner-up, so argmax must be exact
            logits[b, n:, LETTER_IDS["D"]] = 50.0      # garbage on padding positions: must be ignored
        return type("Out", (), {"logits": logits})()


def examples(n=6):
    rows = synthetic.make_synthetic_medmcqa(n, seed=5)
    for i, r in enumerate(rows):
        r["question"] += " " + "x" * (30 * i)  # distinct lengths
    return [data.format_example(r) for r in rows]


def test_letter_scoring_reads_the_last_prompt_token_of_each_row():
    exs = examples()
    tok = CharTokenizer()
    favourite = {len(tok(e["prompt"])["input_ids"]): e["answer"] for e in exs[:4]}  # right for the first 4
    stub = StubModel(favourite)
    preds = evaluation.predict_letters(stub, tok, exs, batch_size=4, progress=False)
    assert [p["pred"] for p in preds[:4]] == [e["answer"] for e in exs[:4]]
    assert [p["pred"] for p in preds[4:]] == ["A", "A"]
    one_by_one = evaluation.predict_letters(stub, tok, exs, batch_size=1, progress=False)
    assert [p["pred"] for p in one_by_one] == [p["pred"] for p in preds]


def test_summary_accuracy_ci_subjects_and_bias():
    preds = [{"id": str(i), "subject": "S1" if i < 6 else "S2", "answer": "ABCD"[i % 4], "pred": "A"}
             for i in range(8)]
    s = evaluation.summarize(preds)
    assert s["n"] == 8 and s["correct"] == 2 and s["accuracy"] == 0.25
    assert s["predicted_letters"]["A"] == 1.0
    assert "always answering A scores 25.0%" in data.letter_baselines({"validation": preds})
    assert s["per_subject"]["S1"] == {"n": 6, "accuracy": 2 / 6}
    lo, hi = s["ci95"]
    assert 0.0 < lo < 0.25 < hi < 0.7


def test_wilson_interval_matches_known_value():
    lo, hi = evaluation.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_evaluate_writes_json_and_refuses_the_test_split(tmp_path):
    import datasets
    exs = examples(4)
    tok = CharTokenizer()
    stub = StubModel({len(tok(e["prompt"])["input_ids"]): e["answer"] for e in exs})
    result = evaluation.evaluate(stub, tok, datasets.Dataset.from_list(exs), "stub", out_dir=tmp_path,
                                 progress=False)
    assert result["accuracy"] == 1.0
    saved = json.loads((tmp_path / "stub.json").read_text())
    assert saved["n"] == 4 and len(saved["predictions"]) == 4
    unlabelled = [dict(e, answer="", completion="") for e in exs]
    with pytest.raises(data.UnlabelledSplitError, match="validation"):
        evaluation.evaluate(stub, tok, unlabelled, "test", split="test", out_dir=tmp_path)


def test_multi_token_letters_are_refused():
    class Bad(CharTokenizer):
        def __call__(self, text, **kw):
            return {"input_ids": [1, 2]}
    with pytest.raises(ValueError, match="single tokens"):
        evaluation.letter_token_ids(Bad())


def test_compare_answers_reports_flips_and_how_close_they_were():
    def scoring(*rows):
        return {"predictions": [{"id": i, "pred": "ABCD"[max(range(4), key=s.__getitem__)], "letter_logits": s}
                                for i, s in enumerate(rows)]}

    first = scoring([2.0, 1.0, 0.0, 0.0], [0.50, 0.49, 0.0, 0.0])
    same = evaluation.compare_answers(first, scoring([2.0, 1.0, 0.0, 0.0], [0.50, 0.48, 0.0, 0.0]))
    assert same["same"] and same["flipped"] == 0 and same["largest_score_difference"] == pytest.approx(0.01)
    near_tie = evaluation.compare_answers(first, scoring([2.0, 1.0, 0.0, 0.0], [0.49, 0.50, 0.0, 0.0]))
    assert not near_tie["same"] and near_tie["flipped"] == 1 and near_tie["flipped_margins"] == [pytest.approx(0.01)]
    assert near_tie["text"].startswith("False (1 of 2 flipped") and same["text"].startswith("True")
    with pytest.raises(ValueError, match="same questions"):
        evaluation.compare_answers(first, scoring([2.0, 1.0, 0.0, 0.0]))

