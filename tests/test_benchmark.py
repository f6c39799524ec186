"""benchmarks/bench.py on CPU: the tiny architecture end to end, the record, the table and chart, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    records = bench.main(["--arch", "tiny", "--variant", "standard", "--steps", "2", "--warmup", "1",
                          "--tokens-per-step", "256", "512", "--out", str(out), "--run-records", str(out / "runs")])
    return records[0], out


def test_record_has_the_figures_with_sane_values(run):
    record, out = run
    saved = json.loads(next(out.glob("*_standard_tiny.json")).read_text())
    assert saved["variant"] == "standard" and saved["arch"] == "tiny"
    assert math.isfinite(saved["first_batch_loss"]) and saved["first_batch_loss"] > 0
    assert saved["first_batch"]["loss_tokens"] > 0
    assert saved["first_batch"]["trainable_tensors_without_grad"] == 0  # every LoRA adapter really runs
    assert saved["trainable_parameters"] > 0 and not saved["lora_on_routed_experts"]
    assert saved["model"]["layers"] == 5 and saved["model"]["params_active_per_token"] < saved["model"]["params_total"]
    assert saved["model"]["flops_per_token"] > 0
    assert saved["versions"]["torch"] and saved["versions"]["transformers"] and saved["versions"]["trl"]
    assert saved["gpu"]["name"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))
    assert saved["data"]["rows"] > 0 and saved["data"]["source"]
    assert "reference" in saved["mamba"]["path_that_ran"] or torch.cuda.is_available()
    assert [b["tokens_per_step_target"] for b in saved["budgets"]] == [256, 512]
    for b in saved["budgets"]:
        assert b["status"] == "ok"
        assert b["steady_tokens_per_second"] > 0 and b["seconds_per_step_median"] > 0
        assert len(b["step_times"]) == 3 and all(s["tokens"] > 0 for s in b["step_times"])
        assert b["rows_per_step"] >= 1 and b["tokens_per_step_mean"] > 0
        assert all(math.isfinite(x) for x in b["losses"])
    # the same weights and probe batch in both budgets: the loss is computed once, before any training
    assert record["first_batch_loss"] == saved["first_batch_loss"]


def test_run_record_for_notebook_04(run):
    _, out = run
    run_record = json.loads((out / "runs" / "standard.json").read_text())  # helpers.training's format
    assert run_record["stack"] == "standard" and run_record["benchmark_tokens_per_step"] == 512
    assert run_record["steps"] == 3 and run_record["steady_tokens_per_second"] > 0
    assert run_record["config"]["lora_r"] == 16 and run_record["config"]["routed_experts"] is False


def test_table_and_chart(bench, run):
    _, out = run
    records = bench.load_records(out)
    table = bench.markdown_table(records)
    assert table.count("\n") == 1 + 2 and "| standard | tiny | 256 |" in table
    png = bench.plot_records(records, out / "benchmark.png")
    assert png.stat().st_size > 1000
    assert bench.main(["--plot", str(out), "--table", str(out)]) == png


def test_out_of_memory_is_recorded_and_find_max_stops(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "FIND_MAX_BUDGETS", (128, 256, 1024, 2048))
    real_make_trainer = bench.htraining.make_trainer

    def make_trainer(model, tokenizer, dataset, cfg, **kw):
        if cfg.per_device_train_batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_make_trainer(model, tokenizer, dataset, cfg, **kw)

    monkeypatch.setattr(bench.htraining, "make_trainer", make_trainer)
    record = bench.main(["--arch", "tiny", "--find-max", "--out", str(tmp_path)])[0]
    assert [b["status"] for b in record["budgets"]] == ["ok", "ok", "oom"]  # stops at the first OOM
    assert record["max_tokens_per_step_fit"] == 256
    assert (tmp_path / f"{record['date'][:10]}_cpu_standard_tiny_findmax.json").is_file()
    assert "OOM" in bench.markdown_table([record])


def test_unsloth_refuses_clearly_without_cuda(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--variant", "unsloth", "--arch", "tiny"])


def test_unsloth_refuses_the_full_random_model(bench):
    with pytest.raises(SystemExit, match="does not fit"):
        bench.main(["--variant", "unsloth", "--arch", "real"])


def test_helpers(bench):
    assert bench.peak_flops("NVIDIA H100 80GB HBM3")["flops"] == 989.4e12
    assert bench.peak_flops("NVIDIA H100 PCIe")["flops"] == 756e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB")["flops"] == 312e12
    assert bench.peak_flops("Some GPU")["flops"] is None
    assert bench.is_oom(torch.cuda.OutOfMemoryError("x")) and not bench.is_oom(ValueError("out of memory"))
    argv = ["--variant", "standard", "unsloth", "--arch", "slice8", "--tokens-per-step", "4096"]
    assert bench._argv_with_variant(argv, "unsloth") == ["--arch", "slice8", "--tokens-per-step", "4096",
                                                          "--variant", "unsloth"]
    assert bench._slug("NVIDIA H100 80GB HBM3") == "H100-80GB-HBM3"
