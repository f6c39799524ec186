"""Stage 1: load, validate, clean and format MedMCQA.

MedMCQA rows look like this (Hub schema, `cop` is 0-based):

    {"id": "...", "question": "...", "opa": "...", "opb": "...", "opc": "...",
     "opd": "...", "cop": 2, "choice_type": "single", "exp": "..." or None,
     "subject_name": "Pharmacology", "topic_name": "..." or None}

Every function here works on plain lists of dicts, so a learner can print any
intermediate step. Only the last step turns them into a `datasets.DatasetDict`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "openlifescienceai/medmcqa"
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
FORMATTED_DIR = REPO_ROOT / "data" / "medmcqa_formatted"
SPLITS = ("train", "validation", "test")
FIELDS = ("id", "question", "opa", "opb", "opc", "opd", "cop",
          "choice_type", "exp", "subject_name", "topic_name")
OPTION_KEYS = ("opa", "opb", "opc", "opd")
LETTERS = ("A", "B", "C", "D")
# File names of the original release (train.json / dev.json / test.json).
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}


class UnlabelledSplitError(ValueError):
    """Raised when someone tries to train on or score the unlabelled test split."""


# ---------------------------------------------------------------- loading

def _read_file(path: Path) -> list[dict]:
    """Read one split file: JSON lines (.jsonl/.json), a JSON array (.json) or Parquet."""
    if path.suffix == ".parquet":
        import datasets
        return datasets.Dataset.from_parquet(str(path)).to_list()
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}). "
                                 "Fix the line or remove it; each line must be one JSON object.") from None
    return rows


def _find_split_file(folder: Path, split: str) -> Path | None:
    """Find `<split>.jsonl|json|parquet` (or the original release's `dev.json`) in a folder."""
    for name in SPLIT_ALIASES[split]:
        for ext in (".jsonl", ".json", ".parquet"):
            if (folder / f"{name}{ext}").exists():
                return folder / f"{name}{ext}"
    return None


def load_raw(source: str | Path = "hub", splits=SPLITS, revision: str | None = None) -> tuple[dict, str]:
    """Load raw MedMCQA rows per split from the Hub ("hub") or a local folder.

    A local folder holds one file per split (JSONL, the original release's JSON
    lines, or Parquet) or a dataset saved with `save_to_disk`. Returns
    ({split: [row, ...]}, kind) where kind is "hub", "files" or "arrow".
    """
    if str(source) == "hub":
        import datasets
        ds = datasets.load_dataset(HUB_ID, revision=revision)
        return {s: ds[s].to_list() for s in splits if s in ds}, "hub"
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"MedMCQA source {folder} is not a folder. Pass 'hub', or a folder holding "
                                "train/validation/test files (.jsonl, .json or .parquet).")
    if (folder / "dataset_dict.json").exists():
        import datasets
        ds = datasets.load_from_disk(str(folder))
        return {s: ds[s].to_list() for s in splits if s in ds}, "arrow"
    raw = {s: _read_file(p) for s in splits if (p := _find_split_file(folder, s))}
    if not raw:
        raise FileNotFoundError(f"No MedMCQA split files in {folder}: expected train.jsonl, validation.jsonl "
                                "(or dev.json) and test.jsonl, or a dataset saved with save_to_disk.")
    return raw, "files"


def detect_cop_base(raw: dict, kind: str, cop_base: int | None = None) -> int:
    """Decide whether `cop` counts from 0 (Hub) or 1 (original release), explicitly.

    The Hub copy is 0-based. For local files we look at the labels: a 0 proves
    0-based, a 4 proves 1-based. If neither appears (only 1..3), the data cannot
    tell, and we refuse to guess: pass `cop_base` yourself.
    """
    if cop_base is not None:
        if cop_base not in (0, 1):
            raise ValueError(f"cop_base must be 0 or 1, not {cop_base!r}.")
        return cop_base
    if kind == "hub":
        return 0
    values = {r.get("cop") for rows in raw.values() for r in rows if isinstance(r.get("cop"), int)}
    if 0 in values and 4 in values:
        raise ValueError("Labels contain both 0 and 4: the files mix 0-based and 1-based `cop`. "
                         "Convert them to one convention, or pass cop_base=0 or 1.")
    if 0 in values:
        return 0
    if 4 in values:
        return 1
    raise ValueError("Cannot tell whether `cop` is 0-based (Hub) or 1-based (original release): "
                     "no row has cop 0 or 4. Pass cop_base=0 or cop_base=1.")


# ---------------------------------------------------------------- cleaning

def normalise_whitespace(text: str) -> str:
    """Collapse tabs, newlines (PDF-extraction debris) and repeated spaces into one space."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class SplitReport:
    """What validation did to one split: rows in, rows kept, drops per reason."""
    split: str
    rows_in: int = 0
    kept: int = 0
    labelled: bool = True
    dropped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        tag = "" if self.labelled else " (unlabelled: answers hidden)"
        return f"{self.split:<10} {self.rows_in:>7} rows -> {self.kept:>7} kept{tag}; dropped: {drops}"


def _problem(row: dict, labelled: bool, cop_base: int, seen: set) -> str | None:
    """Return the reason a row is unusable, or None if it is fine."""
    missing = [f for f in ("id", "question", *OPTION_KEYS) if row.get(f) is None]
    if missing:
        return "missing_field"
    if not isinstance(row["question"], str) or not normalise_whitespace(row["question"]):
        return "empty_question"
    if any(not isinstance(row[k], str) for k in OPTION_KEYS):
        return "non_string_option"
    if any(not normalise_whitespace(row[k]) for k in OPTION_KEYS):
        return "empty_option"
    if labelled:
        cop = row.get("cop")
        if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop - cop_base <= 3:
            return "cop_out_of_range"
    if row["id"] in seen:
        return "duplicate_id"
    return None


def _is_unlabelled(split: str, rows: list[dict]) -> bool:
    """The test split hides its answers (cop = -1 or absent)."""
    return split == "test" and all(r.get("cop") in (-1, None) for r in rows)


def clean_split(rows: list[dict], split: str, cop_base: int) -> tuple[list[dict], SplitReport]:
    """Validate rows, drop bad ones with a reason, normalise whitespace, make `cop` 0-based."""
    report = SplitReport(split, rows_in=len(rows), labelled=not _is_unlabelled(split, rows))
    seen, kept = set(), []
    for row in rows:
        reason = _problem(row, report.labelled, cop_base, seen)
        if reason:
            report.dropped[reason] += 1
            continue
        seen.add(row["id"])
        exp = row.get("exp")
        kept.append({
            "id": str(row["id"]),
            "question": normalise_whitespace(row["question"]),
            **{k: normalise_whitespace(row[k]) for k in OPTION_KEYS},
            "cop": row["cop"] - cop_base if report.labelled else -1,
            "choice_type": row.get("choice_type") or "single",
            "exp": normalise_whitespace(exp) if isinstance(exp, str) and exp.strip() else None,
            "subject_name": normalise_whitespace(row.get("subject_name") or "Unknown"),
            "topic_name": normalise_whitespace(row["topic_name"]) if row.get("topic_name") else None,
        })
    report.kept = len(kept)
    if rows and not kept:
        raise ValueError(f"The {split} split has no valid rows ({dict(report.dropped)}). "
                         "Check the file's fields: " + ", ".join(FIELDS))
    return kept, report


def _question_key(text: str) -> str:
    """Normalised form of a question for leakage matching: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def remove_leakage(train: list[dict], validation: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop training rows whose (normalised) question also appears in validation.

    Returns (kept train rows, dropped train rows) so the caller can report them.
    """
    val_keys = {_question_key(r["question"]) for r in validation}
    kept = [r for r in train if _question_key(r["question"]) not in val_keys]
    dropped = [r for r in train if _question_key(r["question"]) in val_keys]
    return kept, dropped


def require_labelled(split: str, rows=None) -> None:
    """Refuse to train on or score the test split: its answers are hidden (cop = -1)."""
    unlabelled = split == "test" if rows is None else any(r.get("cop", -1) == -1 for r in rows)
    if unlabelled:
        raise UnlabelledSplitError(
            f"The MedMCQA {split} split has no answers (cop = -1), so it cannot be trained on or scored. "
            "Use the 'validation' split to measure accuracy.")


# ---------------------------------------------------------------- formatting

def format_prompt(row: dict) -> str:
    """The lm-evaluation-harness `medmcqa` prompt, so our accuracy compares with published numbers."""
    return (f"Question: {row['question']}\nChoices:\nA. {row['opa']}\nB. {row['opb']}\n"
            f"C. {row['opc']}\nD. {row['opd']}\nAnswer:")


def format_completion(row: dict, with_explanation: bool = True, eos_token: str = "") -> str:
    """` {letter}. {option}` (+ `\\nExplanation: ...`) + EOS. The letter is the first token."""
    letter = LETTERS[row["cop"]]
    text = f" {letter}. {row[OPTION_KEYS[row['cop']]]}"
    if with_explanation and row.get("exp"):
        text += f"\nExplanation: {row['exp']}"
    return text + (eos_token or "")


def format_example(row: dict, with_explanation: bool = True, eos_token: str = "") -> dict:
    """One prompt/completion record plus the metadata evaluation and plots need."""
    labelled = row["cop"] >= 0
    return {
        "id": row["id"],
        "prompt": format_prompt(row),
        "completion": format_completion(row, with_explanation, eos_token) if labelled else "",
        "answer": LETTERS[row["cop"]] if labelled else "",
        "subject": row["subject_name"],
        "has_explanation": bool(row.get("exp")),
    }


# ---------------------------------------------------------------- lengths

def token_lengths(examples: list[dict], tokenizer) -> list[tuple[int, int]]:
    """(prompt tokens, prompt+completion tokens) for each example, tokenized exactly as TRL does."""
    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    full = tokenizer([e["prompt"] + e["completion"] for e in examples])["input_ids"]
    return [(len(p), len(f)) for p, f in zip(prompts, full)]


def truncation_report(lengths: list[tuple[int, int]], max_length: int) -> dict:
    """How many examples `max_length` would truncate, and how many would lose the answer letter."""
    cut = sum(full > max_length for _, full in lengths)
    lose_answer = sum(prompt + 1 > max_length for prompt, _ in lengths)
    return {"max_length": max_length, "rows": len(lengths), "truncated": cut,
            "answer_cut": lose_answer, "truncated_share": cut / max(len(lengths), 1)}


# ---------------------------------------------------------------- the whole stage

def prepare_medmcqa(source="hub", out_dir: str | Path = FORMATTED_DIR, tokenizer=None,
                    max_length: int = 1024, with_explanation: bool = True, cop_base: int | None = None,
                    revision: str | None = None, seed: int = 42, overwrite: bool = False):
    """Load -> validate -> de-leak -> format -> length check -> save, with a manifest.

    Idempotent: if `out_dir` already holds data prepared with the same options it is
    loaded, not rebuilt. Returns (DatasetDict, manifest dict).
    """
    import datasets
    out_dir = Path(out_dir)
    options = {"source": str(source), "revision": revision, "with_explanation": with_explanation,
               "max_length": max_length, "cop_base": cop_base, "seed": seed,
               "tokenizer": getattr(tokenizer, "name_or_path", None)}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists() and not overwrite:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("options") == options:
            print(f"Already prepared with these options: loading {out_dir}")
            return datasets.load_from_disk(str(out_dir / "dataset")), manifest

    raw, kind = load_raw(source, revision=revision)
    base = detect_cop_base(raw, kind, cop_base)
    print(f"Loaded {kind} source {source}: " + ", ".join(f"{s} {len(r)}" for s, r in raw.items()))
    print(f"cop is {base}-based" + (" (original release): converted to 0-based" if base else " (Hub convention)"))

    clean, reports = {}, {}
    for split, rows in raw.items():
        clean[split], reports[split] = clean_split(rows, split, base)
        print(reports[split])
    leaked = []
    if "train" in clean and "validation" in clean:
        clean["train"], leaked = remove_leakage(clean["train"], clean["validation"])
        reports["train"].dropped["leaked_into_validation"] += len(leaked)
        reports["train"].kept = len(clean["train"])
        print(f"Leakage: {len(leaked)} training questions also in validation -> dropped from train")

    eos = getattr(tokenizer, "eos_token", "") or ""
    formatted, truncation = {}, {}
    for split, rows in clean.items():
        examples = [format_example(r, with_explanation, eos) for r in rows]
        if tokenizer is not None and reports[split].labelled:
            lengths = token_lengths(examples, tokenizer)
            truncation[split] = truncation_report(lengths, max_length)
            keep = [prompt + 1 <= max_length for prompt, _ in lengths]
            examples = [e for e, k in zip(examples, keep) if k]
            for e, (p, f) in zip(examples, [l for l, k in zip(lengths, keep) if k]):
                e["prompt_tokens"], e["total_tokens"] = p, f
            reports[split].dropped["answer_cut_by_max_length"] += keep.count(False)
            reports[split].kept = len(examples)
        formatted[split] = examples

    manifest = {
        "options": options, "hub_id": HUB_ID, "source_kind": kind, "cop_base_detected": base,
        "rows": {s: len(e) for s, e in formatted.items()},
        "rows_in": {s: r.rows_in for s, r in reports.items()},
        "dropped": {s: dict(r.dropped) for s, r in reports.items()},
        "labelled": {s: r.labelled for s, r in reports.items()},
        "truncation": truncation,
        "leaked_ids": [r["id"] for r in leaked],
    }
    dsd = datasets.DatasetDict({s: datasets.Dataset.from_list(e) for s, e in formatted.items() if e})
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dsd.save_to_disk(str(tmp / "dataset"))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"Saved {manifest['rows']} to {out_dir}")
    return datasets.load_from_disk(str(out_dir / "dataset")), manifest


def load_formatted(out_dir: str | Path = FORMATTED_DIR):
    """Load what `prepare_medmcqa` saved: (DatasetDict, manifest)."""
    import datasets
    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").exists():
        raise FileNotFoundError(f"No prepared data in {out_dir}: run notebook 01 or "
                                "helpers.data.prepare_medmcqa() first.")
    return datasets.load_from_disk(str(out_dir / "dataset")), json.loads((out_dir / "manifest.json").read_text())


# ---------------------------------------------------------------- synthetic task

_CODE_WORDS = {  # the answer letter follows from the code word in the question
    "A": ("amber", "anchor", "apple", "arrow"), "B": ("basil", "beacon", "birch", "bison"),
    "C": ("cedar", "cobalt", "comet", "coral"), "D": ("delta", "dune", "dahlia", "dove"),
}
_FILLERS = ("aspirin", "insulin", "liver", "kidney", "femur", "retina", "thyroid", "cortisol",
            "vitamin", "enzyme", "neuron", "plasma", "spleen", "sodium", "heparin", "lactate")


def make_synthetic_medmcqa(n: int, seed: int = 0, prefix: str = "syn") -> list[dict]:
    """A learnable MCQ task in the MedMCQA schema, for tests that must show learning.

    Each question carries a code word; the code word alone decides the answer
    letter (amber/anchor/apple/arrow -> A, basil/... -> B, ...). Options are random
    filler words, so the only way to beat 25% is to learn the rule.
    """
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
    """Write rows as JSON lines (used to save synthetic or test data in the MedMCQA layout)."""
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

