"""A synthetic MCQ task in the MedMCQA schema whose answer follows a rule, for train.py's `learn` preset.

Each question carries a code word, and the code word alone decides the answer letter (amber/anchor/apple/arrow ->
A, basil/beacon/birch/bison -> B, ...). The options are random filler words, so the only way to beat 25% is to
learn the rule: a tiny random model that reaches ~100% on it shows that training really teaches something.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
_CODE_WORDS = {  # the answer letter follows from the code word in the question
    "A": ("amber", "anchor", "apple", "arrow"), "B": ("basil", "beacon", "birch", "bison"),
    "C": ("cedar", "cobalt", "comet", "coral"), "D": ("delta", "dune", "dahlia", "dove"),
}
_FILLERS = ("aspirin", "insulin", "liver", "kidney", "femur", "retina", "thyroid", "cortisol",
            "vitamin", "enzyme", "neuron", "plasma", "spleen", "sodium", "heparin", "lactate")


def make_synthetic_medmcqa(n: int, seed: int = 0, prefix: str = "syn") -> list[dict]:
    """`n` rows of the code-word task (0-based `cop`, letters balanced), shuffled with `seed`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letter = LETTERS[i % 4]
        word = rng.choice(_CODE_WORDS[letter])
        options = rng.sample(_FILLERS, 4)
        rows.append({"id": f"{prefix}-{seed}-{i}",
                     "question": f"Case {prefix} {i}: which option does the code word {word} point to?",
                     "opa": options[0], "opb": options[1], "opc": options[2], "opd": options[3],
                     "cop": LETTERS.index(letter), "choice_type": "single",
                     "exp": f"The code word {word} always points to option {letter}.",
                     "subject_name": "Synthetic", "topic_name": f"code words {letter}"})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines, the layout `helpers.data.load_raw` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_synthetic_split_files(folder: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0) -> Path:
    """Write train/validation JSONL files of the synthetic task into `folder`; returns the folder."""
    folder = Path(folder)
    write_jsonl(make_synthetic_medmcqa(n_train, seed, "syn-train"), folder / "train.jsonl")
    write_jsonl(make_synthetic_medmcqa(n_val, seed + 1, "syn-val"), folder / "validation.jsonl")
    return folder
