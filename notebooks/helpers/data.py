"""Load, check, clean and format MedMCQA: the steps of notebook 01 (train.py prepares its data with them too).
Rows stay plain dicts in the Hub's schema (`cop` = index of the correct option, 0-based) until `prepare_medmcqa`
saves a `datasets.DatasetDict`. Every prompt, for training as for scoring, is lm-evaluation-harness's `medmcqa`
prompt built from the unchanged strings ("Question: ...\\nChoices:\\nA. ...\\nD. ...\\nAnswer:"), so the scores
compare with published ones (collapsing the real data's tabs and odd spaces would change ~4% of its validation
prompts). The completion " A. <option>" (+ "\\nExplanation: ...") + EOS starts with the letter scoring reads.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import FORMATTED_DIR, SAMPLE_DIR  # noqa: F401  (SAMPLE_DIR: data.SAMPLE_DIR for notebooks and tests)

HUB_ID = "openlifescienceai/medmcqa"
FIELDS = ("id", "question", "opa", "opb", "opc", "opd", "cop", "choice_type", "exp", "subject_name", "topic_name")
OPTION_KEYS = ("opa", "opb", "opc", "opd")
LETTERS = ("A", "B", "C", "D")
# Split file names; "dev" is the original release's name for validation.
SPLIT_FILES = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
SET_COP_BASE = ("Say which: COP_BASE=0 or COP_BASE=1 in notebook 01's parameters cell (or the environment), "
                "`--set cop_base=1` for train.py, or prepare_medmcqa(..., cop_base=1).")


class DataError(ValueError):
    """Data that cannot be used as given; the message names the problem and the fix."""


class UnlabelledSplitError(DataError):
    """A split whose answers are hidden (cop = -1, MedMCQA's test split) used for training or scoring."""


def _json(path: Path, text: str, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {line + e.lineno - 1}: not valid JSON ({e.msg}). Fix it or remove it: "
                        "each line must be one JSON object.") from None


def _read_file(path: Path) -> list[dict]:
    """One split file: JSON lines (.jsonl, or the original release's .json), a JSON array, or Parquet."""
    if path.suffix == ".parquet":
        import datasets
        unit, numbered = "row", list(enumerate(datasets.Dataset.from_parquet(str(path)).to_list(), 1))
    else:
        text = path.read_text(encoding="utf-8-sig")  # "-sig": skip the byte-order mark some editors write
        if text.lstrip().startswith("["):  # one JSON array
            unit, numbered = "item", list(enumerate(_json(path, text, 1), 1))
        else:  # JSON lines
            unit, numbered = "line", [(n, _json(path, t, n)) for n, t in enumerate(text.splitlines(), 1) if t.strip()]
    if not numbered:
        raise DataError(f"{path} is empty. Put the split's rows in it (one JSON object per line) or delete it.")
    for n, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}, {unit} {n}: expected one JSON object with the MedMCQA fields "
                            f"({', '.join(FIELDS)}), found {json.dumps(row)[:60]}.")
    return [row for _, row in numbered]


def load_raw(source: str | Path = "hub", revision: str | None = None) -> tuple[dict, str]:
    """Raw rows per split, and the source's kind: "hub", "files" (a folder of .jsonl/.json/.parquet files, one
    per split, validation possibly the original release's dev.json) or "arrow" (a `save_to_disk` folder)."""
    folder = Path(source)
    if str(source) == "hub":
        import datasets
        try:
            ds, kind = datasets.load_dataset(HUB_ID, revision=revision), "hub"
        except Exception as e:  # offline, a firewall, an unknown revision...: one message, with its cause
            raise DataError(f"Could not load {HUB_ID} from the Hugging Face Hub ({type(e).__name__}: "
                            f"{str(e)[:200]}). Without the Hub, use the shipped sample: DATA_SOURCE=data/sample "
                            "(notebook parameter or environment variable; `--set data_source=data/sample` for "
                            "train.py), or a folder of MedMCQA files.") from None
    elif (folder / "dataset_dict.json").exists():
        import datasets
        ds, kind = datasets.load_from_disk(str(folder)), "arrow"
    elif not folder.is_dir():
        raise DataError(f"MedMCQA source {folder} is not a folder. Use 'hub', or a folder holding "
                        "train/validation/test files (.jsonl, .json or .parquet).")
    else:
        found = {s: [folder / f"{n}{x}" for n in names for x in (".jsonl", ".json", ".parquet")]
                 for s, names in SPLIT_FILES.items()}
        raw = {s: _read_file(p) for s, paths in found.items() if (p := next((p for p in paths if p.exists()), None))}
        if not raw:
            raise DataError(f"No MedMCQA split files in {folder}: expected train.jsonl, validation.jsonl "
                            "(or dev.json) and test.jsonl, or a dataset saved with save_to_disk.")
        return raw, "files"
    return {s: ds[s].to_list() for s in SPLIT_FILES if s in ds}, kind


def _cop(value) -> int | None:
    """`cop` as a number: an int, digits as text ("2") or a whole float (2.0, from pandas); None for anything else."""
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _labelled(split: str, rows: list[dict]) -> bool:
    """Whether the split has answers; refuses, by name, hidden answers outside `test` and answers not numbers."""
    if not rows:
        raise DataError(f"The {split} split is empty: fill it or remove it from the source.")
    answers = [r["cop"] for r in rows if r.get("cop") is not None and _cop(r["cop"]) != -1]
    if not answers and split != "test":
        raise UnlabelledSplitError(
            f"The {split} split has no answers: every row's cop is -1 or missing, like MedMCQA's test split. "
            f"Give a labelled {split} file (the original release calls validation dev.json), or name this one test.")
    if answers and all(_cop(a) is None for a in answers):
        raise DataError(f"The {split} split's cop values are not option numbers (e.g. {answers[0]!r}). cop is the "
                        "number of the correct option: 0-3 (Hub) or 1-4 (original release); digits such as \"2\" "
                        "are read as numbers.")
    return bool(answers)


def detect_cop_base(raw: dict, kind: str, cop_base: int | None = None) -> int:
    """Whether `cop` counts from 0 (Hub) or 1 (original release): `cop_base` if given, 0 for the Hub, else the
    labels decide (a 0 proves 0-based, a 4 proves 1-based); with neither, we refuse to guess."""
    values = {_cop(r.get("cop")) for split, rows in raw.items() if _labelled(split, rows) for r in rows}
    if cop_base is not None:
        if cop_base not in (0, 1):
            raise DataError(f"cop_base must be 0 or 1 (or None to detect it), not {cop_base!r}.")
        return cop_base
    if kind == "hub":
        return 0
    if 0 in values and 4 in values:
        raise DataError("Labels contain both 0 and 4: the files mix 0-based and 1-based `cop`. Convert them to one "
                        "convention (or, to drop the rows that do not fit, say which. " + SET_COP_BASE + ")")
    if 0 in values or 4 in values:
        return 0 if 0 in values else 1
    raise DataError("Cannot tell whether `cop` counts from 0 (Hub) or from 1 (original release): no row has cop 0 "
                    "or 4. " + SET_COP_BASE)


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

    def require_rows(self) -> None:
        """A split that had rows but lost them all is an error that says why, not an empty dataset."""
        if self.rows_in and not self.kept:
            why = "; ".join(f"{n} {reason}: {FIXES[reason]}" for reason, n in self.dropped.most_common() if n)
            raise DataError(f"The {self.split} split has no rows left: all {self.rows_in} were dropped. {why}.")


FIXES = {  # why rows were dropped -> what to do when that empties a split
    "missing_field": "every row needs id, question, opa, opb, opc and opd", "duplicate_id": "ids must be unique",
    "empty_question": "questions must be non-empty text", "non_string_option": "options must be text",
    "empty_option": "options must be non-empty text", "cop_not_a_number": "cop must be an option number",
    "cop_out_of_range": "cop must be 0-3 (0-based) or 1-4 (1-based). " + SET_COP_BASE,
    "leaked_into_validation": "validation asks the same questions (one file given as both train and validation?): "
                              "train on questions that validation does not hold",
    "answer_cut_by_max_length": "the prompts are longer than max_length: raise MAX_LENGTH (notebook 01) or "
                                "`--set max_length=N` (train.py)",
}


def _problem(row: dict, labelled: bool, cop_base: int, seen: set) -> str | None:
    """The reason a row is unusable (a key of FIXES), or None if it is fine."""
    if any(row.get(f) is None for f in ("id", "question", *OPTION_KEYS)):
        return "missing_field"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return "empty_question"
    if any(not isinstance(row[k], str) for k in OPTION_KEYS):
        return "non_string_option"
    if any(not row[k].strip() for k in OPTION_KEYS):
        return "empty_option"
    if labelled and _cop(row.get("cop")) is None:
        return "cop_not_a_number"
    if labelled and not 0 <= _cop(row["cop"]) - cop_base <= 3:
        return "cop_out_of_range"
    return "duplicate_id" if str(row["id"]) in seen else None


def clean_split(rows: list[dict], split: str, cop_base: int) -> tuple[list[dict], SplitReport]:
    """Drop unusable rows (counted by reason) and make `cop` 0-based; the text stays exactly as given."""
    report = SplitReport(split, rows_in=len(rows), labelled=_labelled(split, rows))
    seen, kept = set(), []
    for row in rows:
        if reason := _problem(row, report.labelled, cop_base, seen):
            report.dropped[reason] += 1
            continue
        seen.add(str(row["id"]))
        text = {k: row.get(k) if isinstance(row.get(k), str) and row[k].strip() else None  # blank, NaN, null: none
                for k in ("choice_type", "exp", "subject_name", "topic_name")}
        kept.append({"id": str(row["id"]), "question": row["question"], **{k: row[k] for k in OPTION_KEYS},
                     "cop": _cop(row["cop"]) - cop_base if report.labelled else -1, **text,
                     "choice_type": text["choice_type"] or "single", "subject_name": text["subject_name"] or "Unknown"})
    report.kept = len(kept)
    report.require_rows()
    return kept, report


def remove_leakage(train: list[dict], validation: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """Drop training rows whose question validation also asks (ignoring case, punctuation and spacing).
    Returns (kept train rows, [(dropped train row, its validation twin), ...])."""
    def key(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()

    by_key = {key(r["question"]): r for r in validation}
    leaks = [(row, by_key[key(row["question"])]) for row in train if key(row["question"]) in by_key]
    return [row for row in train if key(row["question"]) not in by_key], leaks


def format_prompt(row: dict) -> str:
    """lm-evaluation-harness's `medmcqa` prompt, built from the raw strings (module docstring: why)."""
    choices = "".join(f"{letter}. {row[key]}\n" for letter, key in zip(LETTERS, OPTION_KEYS))
    return "Question: " + row["question"] + "\nChoices:\n" + choices + "Answer:"


def format_completion(row: dict, with_explanation: bool = True, eos_token: str = "") -> str:
    """` {letter}. {option}` (+ `\\nExplanation: ...`) + EOS. The letter is the first token."""
    text = f" {LETTERS[row['cop']]}. {row[OPTION_KEYS[row['cop']]]}"
    if with_explanation and row.get("exp"):
        text += f"\nExplanation: {row['exp']}"
    return text + (eos_token or "")


def format_example(row: dict, with_explanation: bool = True, eos_token: str = "") -> dict:
    """One prompt/completion record plus the metadata evaluation and plots need."""
    labelled = row["cop"] >= 0
    return {"id": row["id"], "prompt": format_prompt(row),
            "completion": format_completion(row, with_explanation, eos_token) if labelled else "",
            "answer": LETTERS[row["cop"]] if labelled else "", "subject": row["subject_name"],
            "has_explanation": bool(row.get("exp"))}


def letter_baselines(splits: dict) -> str:
    """What answering without reading scores on validation: always "A", and always train's commonest letter."""
    val, train = ([e["answer"] for e in splits.get(s) or []] for s in ("validation", "train"))
    if not val:
        return "No validation split: no baseline to compute."
    counts, share = Counter(train or val), Counter(val)
    top = max(LETTERS, key=lambda letter: counts[letter])  # a tie goes to the earlier letter
    text = f"On {len(val)} validation questions, always answering A scores {share['A'] / len(val):.1%}"
    if top != "A":
        text += (f", always answering {top} (the commonest letter in {'train' if train else 'validation'}) "
                 f"{share[top] / len(val):.1%}")
    return text + "; chance is 25%. A trained model must beat this."


def prepare_medmcqa(source="hub", out_dir: str | Path = FORMATTED_DIR, tokenizer=None,
                    max_length: int = 1024, with_explanation: bool = True, cop_base: int | None = None,
                    revision: str | None = None, overwrite: bool = False):
    """Load -> validate -> de-leak -> format -> length check -> save, with a manifest; returns (DatasetDict,
    manifest). `cop_base` (0 or 1) says how `cop` counts when the labels cannot tell (None: detect it). Data
    already prepared in `out_dir` with the same options is loaded, not rebuilt."""
    import datasets
    out_dir = Path(out_dir)
    options = {"source": str(source), "revision": revision, "with_explanation": with_explanation,
               "max_length": max_length, "cop_base": cop_base, "tokenizer": getattr(tokenizer, "name_or_path", None)}
    if (out_dir / "manifest.json").exists() and not overwrite:
        manifest = json.loads((out_dir / "manifest.json").read_text())
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
    leaks = []
    if "train" in clean and "validation" in clean:
        clean["train"], leaks = remove_leakage(clean["train"], clean["validation"])
        reports["train"].dropped["leaked_into_validation"] += len(leaks)
        reports["train"].kept = len(clean["train"])
        print(f"Leakage: {len(leaks)} training questions also in validation -> dropped from train")
        reports["train"].require_rows()

    eos = getattr(tokenizer, "eos_token", "") or ""
    formatted, truncation = {}, {}
    for split, rows in clean.items():
        examples = [format_example(r, with_explanation, eos) for r in rows]
        if tokenizer is not None and examples:  # lengths as TRL tokenizes: the prompt, and prompt + completion
            prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
            full = tokenizer([e["prompt"] + e["completion"] for e in examples])["input_ids"]
            for e, p, f in zip(examples, prompts, full):
                e["prompt_tokens"], e["total_tokens"] = len(p), len(f)
        if tokenizer is not None and examples and reports[split].labelled:  # rows that would lose the answer go
            cut = sum(e["total_tokens"] > max_length for e in examples)
            kept = [e for e in examples if e["prompt_tokens"] + 1 <= max_length]
            truncation[split] = {"max_length": max_length, "rows": len(examples), "truncated": cut,
                                 "answer_cut": len(examples) - len(kept), "truncated_share": cut / len(examples)}
            reports[split].dropped["answer_cut_by_max_length"] += len(examples) - len(kept)
            reports[split].kept, examples = len(kept), kept
            reports[split].require_rows()
        formatted[split] = examples

    manifest = {"options": options, "hub_id": HUB_ID, "source_kind": kind, "cop_base_detected": base,
                "rows": {s: len(e) for s, e in formatted.items()},
                "rows_in": {s: r.rows_in for s, r in reports.items()},
                "dropped": {s: dict(r.dropped) for s, r in reports.items()},
                "labelled": {s: r.labelled for s, r in reports.items()}, "truncation": truncation,
                "leaks": [{"train": t["id"], "validation": v["id"]} for t, v in leaks]}
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # written aside, then renamed: never half a dataset
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.DatasetDict({s: datasets.Dataset.from_list(e) for s, e in formatted.items() if e}).save_to_disk(
        str(tmp / "dataset"))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    print(f"Saved {manifest['rows']} to {out_dir}")
    return load_formatted(out_dir)


def load_formatted(out_dir: str | Path = FORMATTED_DIR):
    """Load what `prepare_medmcqa` saved: (DatasetDict, manifest)."""
    import datasets
    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").exists():
        raise DataError(f"No prepared data in {out_dir}: run notebook 01 (with DATA_DIR={out_dir}) or "
                        "helpers.data.prepare_medmcqa() first.")
    return datasets.load_from_disk(str(out_dir / "dataset")), json.loads((out_dir / "manifest.json").read_text())
