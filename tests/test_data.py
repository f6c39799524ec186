"""Stage 1: loading, validation, formatting, leakage and saving of MedMCQA-schema data."""

import json

import pytest

from helpers import data

ROW = {"id": "q1", "question": "Drug of choice\tfor absence\n seizures:", "opa": "Ethosuximide", "opb": "Phenytoin",
       "opc": "Carbamazepine", "opd": "Vigabatrin", "cop": 0, "choice_type": "single",
       "exp": "Ethosuximide blocks T-type Ca²⁺ channels.", "subject_name": "Pharmacology", "topic_name": None}


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word (plus one BOS)."""
    eos_token = "</s>"
    name_or_path = "word-tokenizer"

    def __call__(self, texts, **kw):
        return {"input_ids": [[0] + t.split() for t in texts]}


def write(folder, split, rows, ext=".jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}{ext}").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_prompt_and_completion_golden_strings():
    row, _ = data.clean_split([ROW], "train", 0)
    ex = data.format_example(row[0], with_explanation=True, eos_token="</s>")
    assert ex["prompt"] == ("Question: Drug of choice for absence seizures:\nChoices:\nA. Ethosuximide\n"
                            "B. Phenytoin\nC. Carbamazepine\nD. Vigabatrin\nAnswer:")
    assert ex["completion"] == " A. Ethosuximide\nExplanation: Ethosuximide blocks T-type Ca²⁺ channels.</s>"
    assert ex["answer"] == "A" and ex["has_explanation"]
    assert data.format_completion(row[0], with_explanation=False) == " A. Ethosuximide"
    no_exp = dict(row[0], exp=None, cop=3)
    assert data.format_completion(no_exp, with_explanation=True, eos_token="</s>") == " D. Vigabatrin</s>"


def test_whitespace_normalised_but_content_kept():
    rows = [dict(ROW, id="a", opa="None of the above", opb="None of the above", cop=2, exp="  "),
            dict(ROW, id="b", question="β-blocker dose ≥ 10 µg at 37 °C?\n\n", exp=None)]
    clean, report = data.clean_split(rows, "train", 0)
    assert report.kept == 2 and not report.dropped
    assert clean[0]["opa"] == clean[0]["opb"] == "None of the above"  # duplicate options kept
    assert clean[0]["exp"] is None  # blank explanation means none
    assert clean[1]["question"] == "β-blocker dose ≥ 10 µg at 37 °C?"


def test_every_bad_row_reason_is_counted():
    rows = [ROW,
            {k: v for k, v in ROW.items() if k != "opc"} | {"id": "missing"},
            dict(ROW, id="emptyq", question=" \n "),
            dict(ROW, id="emptyopt", opb="\t"),
            dict(ROW, id="nonstr", opd=5),
            dict(ROW, id="badcop", cop=4),
            dict(ROW, id="boolcop", cop=True),
            dict(ROW)]  # duplicate id q1
    clean, report = data.clean_split(rows, "train", 0)
    assert [r["id"] for r in clean] == ["q1"]
    assert report.dropped == {"missing_field": 1, "empty_question": 1, "empty_option": 1,
                              "non_string_option": 1, "cop_out_of_range": 2, "duplicate_id": 1}
    assert "dropped" in str(report)


def test_file_with_no_valid_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="no valid rows"):
        data.clean_split([dict(ROW, question="")], "train", 0)


def test_one_based_original_release_is_detected_and_converted(tmp_path):
    rows = [dict(ROW, id=f"r{i}", question=f"Q{i}?", cop=c) for i, c in enumerate([1, 2, 3, 4])]
    write(tmp_path, "train", rows, ".json")     # original release: JSON lines in train.json / dev.json
    write(tmp_path, "dev", [dict(ROW, id="v", question="V?", cop=4)], ".json")
    raw, kind = data.load_raw(tmp_path)
    assert set(raw) == {"train", "validation"} and kind == "files"
    assert data.detect_cop_base(raw, kind) == 1
    clean, _ = data.clean_split(raw["train"], "train", 1)
    assert [r["cop"] for r in clean] == [0, 1, 2, 3]


def test_cop_base_is_never_guessed(tmp_path):
    raw = {"train": [dict(ROW, cop=1), dict(ROW, cop=3)]}
    with pytest.raises(ValueError, match="Pass cop_base"):
        data.detect_cop_base(raw, "files")
    assert data.detect_cop_base(raw, "files", cop_base=1) == 1
    with pytest.raises(ValueError, match="mix"):
        data.detect_cop_base({"train": [dict(ROW, cop=0), dict(ROW, cop=4)]}, "files")
    assert data.detect_cop_base(raw, "hub") == 0


def test_test_split_is_unlabelled_and_refused():
    rows = [dict(ROW, id="t1", cop=-1, exp=None)]
    clean, report = data.clean_split(rows, "test", 0)
    assert not report.labelled
    ex = data.format_example(clean[0])
    assert ex["prompt"].endswith("Answer:") and ex["completion"] == ""
    with pytest.raises(data.UnlabelledSplitError, match="validation"):
        data.require_labelled("test")
    # a validation split with hidden answers is refused too
    with pytest.raises(data.UnlabelledSplitError):
        data.require_labelled("validation", [{"cop": -1}])


def test_leakage_is_removed_and_reported(tmp_path):
    train = [dict(ROW, id="t1", question="What is the  DRUG of choice?"), dict(ROW, id="t2", question="Other?")]
    val = [dict(ROW, id="v1", question="what is the drug of choice")]
    write(tmp_path, "train", train)
    write(tmp_path, "validation", val)
    ds, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "out")
    assert ds["train"]["id"] == ["t2"]
    assert manifest["dropped"]["train"]["leaked_into_validation"] == 1
    assert manifest["leaked_ids"] == ["t1"]


def test_prepare_writes_manifest_and_is_idempotent(tmp_path, capsys):
    out = tmp_path / "fmt"
    ds, manifest = data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, tokenizer=WordTokenizer(), max_length=512)
    assert manifest["rows"] == {s: ds[s].num_rows for s in ds}
    assert manifest["options"]["tokenizer"] == "word-tokenizer" and manifest["options"]["seed"] == 42
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


def test_rows_whose_answer_would_be_cut_are_dropped_and_counted(tmp_path):
    long_q = " ".join(["word"] * 40)
    write(tmp_path, "train", [dict(ROW, id="long", question=long_q), dict(ROW, id="short", question="Short?")])
    write(tmp_path, "validation", [dict(ROW, id="v", question="Val?")])
    ds, manifest = data.prepare_medmcqa(tmp_path, out_dir=tmp_path / "o", tokenizer=WordTokenizer(), max_length=30)
    assert ds["train"]["id"] == ["short"]
    assert manifest["dropped"]["train"]["answer_cut_by_max_length"] == 1
    assert manifest["truncation"]["train"]["answer_cut"] == 1


def test_parquet_and_arrow_sources_give_the_same_rows(tmp_path):
    import datasets
    rows = data.make_synthetic_medmcqa(12, seed=3)
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "arrow"))
    pq, kind_pq = data.load_raw(tmp_path / "pq")
    ar, kind_ar = data.load_raw(tmp_path / "arrow")
    assert (kind_pq, kind_ar) == ("files", "arrow")
    assert pq["train"] == ar["train"] == rows


def test_missing_source_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        data.load_raw(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        data.load_raw(tmp_path)


def test_shipped_sample_is_clean_and_varied():
    raw, kind = data.load_raw(data.SAMPLE_DIR)
    assert data.detect_cop_base(raw, kind) == 0
    for split, rows in raw.items():
        clean, report = data.clean_split(rows, split, 0)
        assert not report.dropped, f"the shipped {split} sample has bad rows: {report}"
    assert len({r["subject_name"] for r in raw["train"]}) >= 10
    assert len(raw["train"]) >= 40 and len(raw["validation"]) >= 12 and not data._is_unlabelled("train", raw["train"])


def test_synthetic_task_follows_its_rule_and_is_seeded():
    rows = data.make_synthetic_medmcqa(40, seed=1)
    assert rows == data.make_synthetic_medmcqa(40, seed=1) and rows != data.make_synthetic_medmcqa(40, seed=2)
    for r in rows:
        word = r["question"].split("code word ")[1].split()[0]
        assert word in data._CODE_WORDS[data.LETTERS[r["cop"]]]
    assert sorted(r["cop"] for r in rows) == sorted([0, 1, 2, 3] * 10)
