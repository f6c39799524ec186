"""Notebook 01's data steps: loading, validation, formatting, leakage, saving, and the messages for bad input."""

import json

import pytest

from helpers import config, data
from recipe import synthetic

ROW = {"id": "q1", "question": "Drug of choice for absence seizures:", "opa": "Ethosuximide", "opb": "Phenytoin",
       "opc": "Carbamazepine", "opd": "Vigabatrin", "cop": 0, "choice_type": "single",
       "exp": "Ethosuximide blocks T-type Ca²⁺ channels.", "subject_name": "Pharmacology", "topic_name": None}
# Whitespace as PDF extraction leaves it in real MedMCQA: tabs, runs of spaces, line breaks, non-breaking spaces,
# and spaces at either end.
MESSY = [dict(ROW, id="tab", question="Drug of choice\tfor absence\tseizures:", opb="Pheny\ttoin"),
         dict(ROW, id="spaces", question="Drug of  choice for   absence seizures:", opc="Carba  mazepine"),
         dict(ROW, id="newline", question="Drug of choice for\nabsence seizures:\n", opd="Viga\nbatrin\n"),
         dict(ROW, id="nbsp", question="Dose of 10\u00a0mg/kg for absence seizures:", opa="Etho\u00a0suximide"),
         dict(ROW, id="ends", question="  Drug of choice for absence seizures:  ", opa=" Ethosuximide ", cop=1)]


def lm_eval_prompt(row):
    """lm-evaluation-harness's medmcqa prompt, written out as its template concatenates the raw strings."""
    return ("Question: " + row["question"] + "\nChoices:\n" + "A. " + row["opa"] + "\n" + "B. " + row["opb"] + "\n"
            + "C. " + row["opc"] + "\n" + "D. " + row["opd"] + "\n" + "Answer:")


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word (plus one BOS)."""
    eos_token = "</s>"
    name_or_path = "word-tokenizer"

    def __call__(self, texts, **kw):
        return {"input_ids": [[0] + t.split() for t in texts]}


def write(folder, split, rows, ext=".jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}{ext}").write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- prompts

def test_prompt_is_lm_eval_prompt_of_the_raw_strings_for_every_row():
    clean, report = data.clean_split(MESSY, "validation", 0)
    assert report.kept == len(MESSY)
    for raw, row in zip(MESSY, clean):
        assert data.format_example(row)["prompt"] == lm_eval_prompt(raw), raw["id"]
    assert "\t" in data.format_prompt(clean[0]) and "\u00a0" in data.format_prompt(clean[3])
    # the completion restates the option exactly as the prompt shows it
    assert data.format_completion(clean[4], with_explanation=False) == " B. Phenytoin"
    assert data.format_completion(dict(clean[3], cop=0), with_explanation=False) == " A. Etho\u00a0suximide"


def test_saved_prompts_equal_lm_eval_prompts_for_every_row(tmp_path):
    """Through the whole preparation, training rows included: the text the model sees is the file's text."""
    write(tmp_path, "train", [dict(r, id="t" + r["id"], question=r["question"] + " (train)") for r in MESSY])
    write(tmp_path, "validation", MESSY)
    ds, _ = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out", tokenizer=WordTokenizer())
    raw, _ = data.load_raw(tmp_path)
    for split in ("train", "validation"):
        assert ds[split]["prompt"] == [lm_eval_prompt(r) for r in raw[split]]
    raw, _ = data.load_raw(data.SAMPLE_DIR)
    ds, manifest = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=tmp_path / "sample")
    leaked = {leak["train"] for leak in manifest["leaks"]}
    for split in ds:
        assert ds[split]["prompt"] == [lm_eval_prompt(r) for r in raw[split] if r["id"] not in leaked]


def test_completion_golden_strings():
    row, _ = data.clean_split([ROW], "train", 0)
    ex = data.format_example(row[0], with_explanation=True, eos_token="</s>")
    assert ex["prompt"] == ("Question: Drug of choice for absence seizures:\nChoices:\nA. Ethosuximide\n"
                            "B. Phenytoin\nC. Carbamazepine\nD. Vigabatrin\nAnswer:")
    assert ex["completion"] == " A. Ethosuximide\nExplanation: Ethosuximide blocks T-type Ca²⁺ channels.</s>"
    assert ex["answer"] == "A" and ex["has_explanation"]
    assert data.format_completion(row[0], with_explanation=False) == " A. Ethosuximide"
    no_exp = dict(row[0], exp=None, cop=3)
    assert data.format_completion(no_exp, with_explanation=True, eos_token="</s>") == " D. Vigabatrin</s>"


def test_cleaning_keeps_content():
    rows = [dict(ROW, id="a", opa="None of the above", opb="None of the above", cop=2, exp="  "),
            dict(ROW, id="b", question="β-blocker dose ≥ 10 µg at 37 °C?\n\n", exp=None)]
    clean, report = data.clean_split(rows, "train", 0)
    assert report.kept == 2 and not report.dropped
    assert clean[0]["opa"] == clean[0]["opb"] == "None of the above"  # duplicate options kept
    assert clean[0]["exp"] is None  # blank explanation means none
    assert clean[1]["question"] == "β-blocker dose ≥ 10 µg at 37 °C?\n\n"


# ---------------------------------------------------------------- bad rows and bad files

def test_every_bad_row_reason_is_counted():
    rows = [ROW,
            {k: v for k, v in ROW.items() if k != "opc"} | {"id": "missing"},
            dict(ROW, id="emptyq", question=" \n "),
            dict(ROW, id="emptyopt", opb="\t\u00a0"),
            dict(ROW, id="nonstr", opd=5),
            dict(ROW, id="badcop", cop=4),
            dict(ROW, id="boolcop", cop=True),
            dict(ROW, id="lettercop", cop="B"),
            dict(ROW, id="textcop", cop="2"),  # digits as text are read as the number
            dict(ROW)]  # duplicate id q1
    clean, report = data.clean_split(rows, "train", 0)
    assert [(r["id"], r["cop"]) for r in clean] == [("q1", 0), ("textcop", 2)]
    assert report.dropped == {"missing_field": 1, "empty_question": 1, "empty_option": 1, "non_string_option": 1,
                              "cop_out_of_range": 1, "cop_not_a_number": 2, "duplicate_id": 1}
    assert "dropped" in str(report)


def test_split_emptied_by_cleaning_says_why_and_how_to_fix():
    with pytest.raises(data.DataError, match=r"The train split has no rows left: all 2 were dropped. "
                                             r"2 empty_question: questions must be non-empty text"):
        data.clean_split([dict(ROW, question=""), dict(ROW, id="b", question=" ")], "train", 0)


def test_same_rows_as_train_and_validation_is_a_clear_error(tmp_path):
    rows = [dict(ROW, id=f"r{i}", question=f"Question {i}?") for i in range(3)]
    write(tmp_path, "train", rows)
    write(tmp_path, "validation", rows)
    with pytest.raises(data.DataError) as err:
        data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out", tokenizer=WordTokenizer())
    message = str(err.value)
    assert "The train split has no rows left: all 3 were dropped" in message
    assert "3 leaked_into_validation" in message and "train and validation" in message


def test_split_emptied_by_max_length_names_the_setting(tmp_path):
    write(tmp_path, "train", [dict(ROW, id="t", question="Long " * 50)])
    with pytest.raises(data.DataError, match=r"1 answer_cut_by_max_length.*MAX_LENGTH.*--set max_length"):
        data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out", tokenizer=WordTokenizer(), max_length=20)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_file_is_named_empty(tmp_path, content):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(data.DataError, match=r"train.jsonl is empty"):
        data.load_raw(tmp_path)
    with pytest.raises(data.DataError, match=r"The validation split is empty"):  # e.g. an empty saved split
        data.clean_split([], "validation", 0)


def test_a_line_that_is_not_an_object_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n\n[1, 2, 3]\n")
    with pytest.raises(data.DataError, match=r"train.jsonl, line 3: expected one JSON object.*found \[1, 2, 3\]"):
        data.load_raw(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps([ROW, "text"]))
    with pytest.raises(data.DataError, match=r"train.jsonl, item 2: expected one JSON object"):
        data.load_raw(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(data.DataError, match="train.jsonl, line 2: not valid JSON"):
        data.load_raw(tmp_path)


def test_byte_order_mark_is_read(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n", encoding="utf-8-sig")
    (tmp_path / "dev.json").write_text(json.dumps([dict(ROW, id="v")]), encoding="utf-8-sig")
    raw, _ = data.load_raw(tmp_path)
    assert raw == {"train": [ROW], "validation": [dict(ROW, id="v")]}


def test_cop_given_as_text_or_float(tmp_path):
    raw = {"train": [dict(ROW, id=str(c), cop=str(c)) for c in range(4)]}
    assert data.detect_cop_base(raw, "files") == 0
    assert [r["cop"] for r in data.clean_split(raw["train"], "train", 0)[0]] == [0, 1, 2, 3]
    floats = [dict(ROW, id=str(c), cop=float(c)) for c in (1, 2, 4)]  # pandas writes whole numbers as floats
    assert [r["cop"] for r in data.clean_split(floats, "train", 1)[0]] == [0, 1, 3]
    letters = {"train": [dict(ROW, id=c, cop=c) for c in "ABCD"]}
    with pytest.raises(data.DataError, match=r"The train split's cop values are not option numbers \(e.g. 'A'\)"):
        data.detect_cop_base(letters, "files")


def test_optional_text_fields_missing_as_nan_or_numbers_are_read_as_missing(tmp_path):
    """Python's json module writes a pandas NaN as NaN: in subject, topic, choice type or explanation it means
    missing (Arrow would refuse a float in a text column). The row is kept, with the defaults."""
    odd = dict(ROW, id="nan", subject_name=float("nan"), topic_name=float("nan"), choice_type=float("nan"),
               exp=float("nan"))
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(odd) + "\n")  # NaN, as json writes it
    (tmp_path / "validation.jsonl").write_text(json.dumps(dict(ROW, id="v", subject_name=7, question="Other?")))
    dataset, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out")
    assert manifest["rows"] == {"train": 2, "validation": 1} and not any(manifest["dropped"]["train"].values())
    row = dataset["train"][1]
    assert row["subject"] == "Unknown" and not row["has_explanation"] and "Explanation" not in row["completion"]
    assert dataset["validation"][0]["subject"] == "Unknown"


def test_test_rows_given_as_validation_are_named_as_such(tmp_path):
    write(tmp_path, "train", [dict(ROW, id=f"t{c}", question=f"Q{c}?", cop=c) for c in range(4)])
    write(tmp_path, "validation", [dict(ROW, id="v", cop=-1, exp=None)])
    raw, kind = data.load_raw(tmp_path)
    with pytest.raises(data.UnlabelledSplitError, match=r"The validation split has no answers.*like MedMCQA's test"):
        data.detect_cop_base(raw, kind)
    with pytest.raises(data.UnlabelledSplitError, match="validation split has no answers"):
        data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out", cop_base=0)


def test_test_split_is_unlabelled_and_refused():
    rows = [dict(ROW, id="t1", cop=-1, exp=None), dict(ROW, id="t2", exp=None) | {"cop": None}]
    clean, report = data.clean_split(rows, "test", 0)
    assert not report.labelled and report.kept == 2
    ex = data.format_example(clean[0])
    assert ex["prompt"].endswith("Answer:") and ex["completion"] == ""


# ---------------------------------------------------------------- cop numbering

def test_one_based_original_release_is_detected_and_converted(tmp_path):
    rows = [dict(ROW, id=f"r{i}", question=f"Q{i}?", cop=c) for i, c in enumerate([1, 2, 3, 4])]
    write(tmp_path, "train", rows, ".json")     # original release: JSON lines in train.json / dev.json
    write(tmp_path, "dev", [dict(ROW, id="v", question="V?", cop=4)], ".json")
    raw, kind = data.load_raw(tmp_path)
    assert set(raw) == {"train", "validation"} and kind == "files"
    assert data.detect_cop_base(raw, kind) == 1
    clean, _ = data.clean_split(raw["train"], "train", 1)
    assert [r["cop"] for r in clean] == [0, 1, 2, 3]


def test_cop_base_is_never_guessed_and_can_be_passed(tmp_path):
    raw = {"train": [dict(ROW, cop=1), dict(ROW, cop=3)]}
    with pytest.raises(data.DataError, match=r"Cannot tell.*COP_BASE=0 or COP_BASE=1.*--set cop_base=1"):
        data.detect_cop_base(raw, "files")
    assert data.detect_cop_base(raw, "files", cop_base=1) == 1
    with pytest.raises(data.DataError, match="mix"):
        data.detect_cop_base({"train": [dict(ROW, cop=0), dict(ROW, cop=4)]}, "files")
    with pytest.raises(data.DataError, match="cop_base must be 0 or 1"):
        data.detect_cop_base(raw, "files", cop_base=2)
    assert data.detect_cop_base(raw, "hub") == 0
    # through prepare_medmcqa, the way notebook 01 (COP_BASE) and train.py (--set cop_base=1) pass it
    write(tmp_path, "train", [dict(ROW, id=f"t{c}", question=f"Q{c}?", cop=c) for c in (1, 2, 3)])
    with pytest.raises(data.DataError, match="COP_BASE"):
        data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out")
    ds, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out", cop_base=1)
    assert ds["train"]["answer"] == ["A", "B", "C"] and manifest["options"]["cop_base"] == 1


# ---------------------------------------------------------------- sources

def test_hub_failure_says_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openlifescienceai/medmcqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match=r"Could not load .*ConnectionError.*DATA_SOURCE=data/sample"):
        data.load_raw("hub")


def test_missing_source_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="train.jsonl"):
        data.load_raw(tmp_path)
    with pytest.raises(data.DataError, match="not a folder"):
        data.load_raw(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="run notebook 01"):
        data.load_formatted(tmp_path)


def test_validation_only_source_is_prepared(tmp_path):
    write(tmp_path, "validation", [dict(ROW, id=f"v{c}", question=f"Q{c}?", cop=c) for c in range(4)])
    ds, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out", tokenizer=WordTokenizer())
    assert list(ds) == ["validation"] and manifest["rows"] == {"validation": 4} and manifest["leaks"] == []
    assert ds["validation"]["total_tokens"][0] > ds["validation"]["prompt_tokens"][0]


def test_parquet_and_arrow_sources_give_the_same_rows(tmp_path):
    import datasets
    rows = [dict(ROW, id=f"r{i}", question=f"Q{i}\twith  spaces?", cop=i % 4, topic_name="t") for i in range(6)]
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "arrow"))
    pq, kind_pq = data.load_raw(tmp_path / "pq")
    ar, kind_ar = data.load_raw(tmp_path / "arrow")
    assert (kind_pq, kind_ar) == ("files", "arrow")
    assert pq["train"] == ar["train"] == rows


# ---------------------------------------------------------------- leakage, preparing, saving

def test_near_duplicate_questions_are_removed_from_train_and_reported(tmp_path):
    train = [dict(ROW, id="t1", question="What is the  DRUG of choice?", cop=1), dict(ROW, id="t2", question="Other?")]
    val = [dict(ROW, id="v1", question="what is the drug of choice")]
    write(tmp_path, "train", train)
    write(tmp_path, "validation", val)
    ds, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out")
    assert ds["train"]["id"] == ["t2"]
    assert manifest["dropped"]["train"]["leaked_into_validation"] == 1
    assert manifest["leaks"] == [{"train": "t1", "validation": "v1"}]
    kept, leaks = data.remove_leakage(train, val)
    assert kept == [train[1]] and leaks == [(train[0], val[0])]


def test_prepare_writes_manifest_and_is_idempotent(tmp_path, capsys):
    out = tmp_path / "fmt"
    ds, manifest = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, tokenizer=WordTokenizer(), max_length=512)
    assert manifest["rows"] == {s: ds[s].num_rows for s in ds}
    assert manifest["options"]["tokenizer"] == "word-tokenizer"
    assert manifest["labelled"] == {"train": True, "validation": True, "test": False}
    assert set(manifest["truncation"]) == {"train", "validation"}
    assert all(c.endswith("</s>") for c in ds["train"]["completion"])
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    again, manifest2 = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, tokenizer=WordTokenizer(), max_length=512)
    assert "Already prepared" in capsys.readouterr().out
    assert manifest2 == manifest and (out / "manifest.json").read_text() == before
    assert again["train"].to_list() == ds["train"].to_list()
    loaded, m3 = data.load_formatted(out)
    assert m3 == manifest and loaded["validation"].to_list() == ds["validation"].to_list()
    # different options rebuild
    _, manifest4 = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, with_explanation=False)
    assert manifest4["options"]["with_explanation"] is False
    assert data.FORMATTED_DIR.relative_to(config.REPO_ROOT).parts[0] == "outputs"  # generated data lives there


def test_rows_whose_answer_would_be_cut_are_dropped_and_counted(tmp_path):
    long_q = " ".join(["word"] * 40)
    write(tmp_path, "train", [dict(ROW, id="long", question=long_q), dict(ROW, id="short", question="Short?")])
    write(tmp_path, "validation", [dict(ROW, id="v", question="Val?")])
    ds, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "o", tokenizer=WordTokenizer(), max_length=30)
    assert ds["train"]["id"] == ["short"]
    assert manifest["dropped"]["train"]["answer_cut_by_max_length"] == 1
    assert manifest["truncation"]["train"]["answer_cut"] == 1


def test_letter_baselines():
    val = [{"answer": a} for a in "AABCDDD"]
    text = data.letter_baselines({"train": [{"answer": a} for a in "CCAB"], "validation": val})
    assert "always answering A scores 28.6%" in text
    assert "always answering C (the commonest letter in train) 14.3%" in text
    assert "commonest" not in data.letter_baselines({"validation": [{"answer": "A"}]})
    assert "No validation split" in data.letter_baselines({"train": val})


def test_shipped_sample_is_clean_varied_and_holds_a_near_duplicate_pair():
    raw, kind = data.load_raw(data.SAMPLE_DIR)
    assert data.detect_cop_base(raw, kind) == 0
    for split, rows in raw.items():
        clean, report = data.clean_split(rows, split, 0)
        assert not report.dropped, f"the shipped {split} sample has bad rows: {report}"
    assert len({r["subject_name"] for r in raw["train"]}) >= 10
    assert len(raw["train"]) >= 40 and len(raw["validation"]) >= 12
    # notebook 01 shows one training question that validation asks too, with another answer letter
    _, leaks = data.remove_leakage(raw["train"], raw["validation"])
    assert len(leaks) == 1
    (train_row, val_row), = leaks
    assert train_row["question"] != val_row["question"] and train_row["cop"] != val_row["cop"]


def test_synthetic_task_follows_its_rule_and_is_seeded(tmp_path):
    rows = synthetic.make_synthetic_medmcqa(40, seed=1)
    assert rows == synthetic.make_synthetic_medmcqa(40, seed=1) and rows != synthetic.make_synthetic_medmcqa(40, seed=2)
    for r in rows:
        word = r["question"].split("code word ")[1].split()[0]
        assert word in synthetic._CODE_WORDS[data.LETTERS[r["cop"]]]
    assert sorted(r["cop"] for r in rows) == sorted([0, 1, 2, 3] * 10)
    raw, kind = data.load_raw(synthetic.write_synthetic_split_files(tmp_path, n_train=8, n_val=4))
    assert {s: len(r) for s, r in raw.items()} == {"train": 8, "validation": 4}
    assert data.detect_cop_base(raw, kind) == 0
