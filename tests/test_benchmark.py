"""benchmarks/ on CPU: the tiny architecture end to end, the record and its warm-up rule, the first-batch loss,
the fast pieces the record reports, the committed tables, and the modules' import graph."""

import ast
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    """One standard run on the tiny model, with spies on train.py's two config builders."""
    import train

    out = tmp_path_factory.mktemp("bench-results")
    calls = {"sft_config": [], "lora_config": []}
    with pytest.MonkeyPatch.context() as mp:
        for name in calls:
            real = getattr(train, name)
            mp.setattr(train, name, lambda cfg, *a, _real=real, _name=name, **kw:
                       calls[_name].append((cfg, kw)) or _real(cfg, *a, **kw))
        records = bench.main(["--arch", "tiny", "--variant", "standard", "--steps", "3", "--warmup", "1",
                              "--tokens-per-step", "256", "--max-length", "64", "--out", str(out),
                              "--run-records", str(out / "runs")])
    return records[0], out, calls


def test_standard_variant_trains_with_train_py_configs(run):
    from benchmarks import timing

    record, _, calls = run
    (lora_cfg, _), = calls["lora_config"]
    assert (lora_cfg.lora_r, lora_cfg.lora_alpha, lora_cfg.routed_experts) == (16, 32, False)
    (sft_cfg, overrides), = calls["sft_config"]
    assert overrides == timing.SFT_OVERRIDES  # bookkeeping only; one process: no distributed overrides
    assert sft_cfg.per_device_train_batch_size == record["budgets"][0]["rows_per_step"]
    assert sft_cfg.gradient_checkpointing and sft_cfg.seed == 42
    assert record["lora"]["target_modules"] and record["lora"]["r"] == 16


def test_record_has_medians_means_and_the_shapes_seen_warmup(run):
    record, out, _ = run
    saved = json.loads(next(out.glob("*_standard_tiny.json")).read_text())
    assert saved["variant"] == "standard" and saved["arch"] == "tiny" and saved["gpu"]["name"] == "cpu"
    assert saved["first_batch"]["trainable_tensors_without_grad"] == 0  # every LoRA adapter really runs
    assert saved["versions"]["torch"] and saved["versions"]["transformers"] and saved["versions"]["trl"]
    b, = saved["budgets"]
    assert b["status"] == "ok" and b["fast_pieces"] == {}  # the standard path applies nothing
    steps = b["step_times"]
    assert len(steps) == 4 and all(s["tokens"] > 0 and s["shape"] for s in steps)
    # every step left out is in the warm-up or the first to meet its batch shape, and each of those is left out
    seen, expected = set(), set()
    for i, step in enumerate(steps):
        key = json.dumps(step["shape"])
        if i < b["warmup"] or key not in seen:
            expected.add(step["step"])
        seen.add(key)
    assert {e["step"] for e in b["warmup_steps_excluded"]} == expected and expected >= {1}
    assert all(e["why"] for e in b["warmup_steps_excluded"])
    counted = [s for s in steps if s["step"] not in expected]
    assert b["counted_steps"] == [s["step"] for s in counted] and b["steps_counted"] == len(counted) >= 1
    seconds = [s["seconds"] for s in counted]
    assert b["seconds_per_step_mean"] == pytest.approx(sum(seconds) / len(seconds), abs=1e-4)
    assert b["seconds_per_step_median"] == pytest.approx(statistics.median(seconds), abs=1e-4)
    assert b["steady_tokens_per_second"] == pytest.approx(sum(s["tokens"] for s in counted) / sum(seconds), rel=1e-3)
    assert all(math.isfinite(x) for x in b["losses"])


def test_first_batch_loss_matches_an_independent_computation(run):
    """The bench's first-batch loss (padded batch, the model's own loss) against a plain per-row cross-entropy of
    the same rows on the same seeded tiny model without LoRA (B = 0: the adapters add nothing yet)."""
    from benchmarks import models, workload

    record, _, _ = run
    tokenizer = models.bench_tokenizer()
    llm = models.build_random_model(models.arch_config("tiny", tokenizer), 42)
    dist = workload.length_distribution(tokenizer, max_length=64)
    rows = workload.probe_rows(dist["pairs"], llm.config.vocab_size, 42)
    nll, count = 0.0, 0
    llm.eval()
    with torch.no_grad():
        for ids, mask in zip(rows["input_ids"], rows["completion_mask"]):
            logits = llm(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            targets = torch.tensor(ids[1:])
            trained = torch.tensor(mask[1:], dtype=torch.bool)
            nll -= torch.log_softmax(logits, -1)[trained].gather(-1, targets[trained, None]).sum().item()
            count += int(trained.sum())
    assert record["first_batch"]["loss_tokens"] == count
    assert record["first_batch_loss"] == pytest.approx(nll / count, rel=1e-4)


def test_fast_variant_records_what_fastpath_applied(bench, tmp_path, monkeypatch):
    """`fast_pieces` is fastpath.applied's report, not the pieces asked for: a report that drops one piece must
    show up as such in the record."""
    import fastpath

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)  # prepare_process sets it; undone after
    real, reports = fastpath.applied, []

    import contextlib

    @contextlib.contextmanager
    def applied(trainer, settings, **kw):
        with real(trainer, settings, **kw) as report:
            reports.append(dict(report))
            yield {k: v for k, v in report.items() if k != "bf16_relu2"}

    monkeypatch.setattr(fastpath, "applied", applied)
    record = bench.main(["--arch", "tiny", "--variant", "fast", "--fast-features", "lean_experts,lora_bf16,bf16_relu2",
                         "--steps", "1", "--warmup", "1", "--tokens-per-step", "256", "--max-length", "64",
                         "--out", str(tmp_path)])[0]
    assert reports and set(reports[0]) == {"lean_experts", "lora_bf16", "bf16_relu2"}
    b, = record["budgets"]
    assert b["fast_pieces"] == {k: v for k, v in reports[0].items() if k != "bf16_relu2"}
    assert record["fast"]["features"] == ["bf16_relu2", "lean_experts", "lora_bf16"]  # what was asked for
    assert record["fast"]["pieces_applied"] == b["fast_pieces"]


def test_run_record_for_notebook_04(run):
    _, out, _ = run
    run_record = json.loads((out / "runs" / "standard.json").read_text())  # helpers.training's format
    assert run_record["stack"] == "standard" and run_record["benchmark_tokens_per_step"] == 256
    assert run_record["steps"] == 4 and run_record["steady_tokens_per_second"] > 0
    assert run_record["config"]["lora_r"] == 16 and run_record["config"]["routed_experts"] is False


def test_table_and_chart(bench, run):
    from benchmarks import records

    _, out, _ = run
    loaded = records.load_records(out)
    table = records.markdown_table(loaded)
    assert table.count("\n") == 2 and "| standard | tiny | 256 |" in table
    png = records.plot_records(loaded, out / "benchmark.png")
    assert png.stat().st_size > 1000
    assert bench.main(["--plot", str(out), "--table", str(out)]) == png


def test_out_of_memory_is_recorded_and_find_max_stops(bench, tmp_path, monkeypatch):
    from benchmarks import timing

    monkeypatch.setattr(bench, "FIND_MAX_BUDGETS", (128, 256, 1024, 2048))
    real = timing.sft_trainer

    def sft_trainer(model, tokenizer, dataset, cfg, *a, **kw):
        if cfg.per_device_train_batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tokenizer, dataset, cfg, *a, **kw)

    monkeypatch.setattr(timing, "sft_trainer", sft_trainer)
    record = bench.main(["--arch", "tiny", "--find-max", "--max-length", "64", "--out", str(tmp_path)])[0]
    assert [b["status"] for b in record["budgets"]] == ["ok", "ok", "oom"]  # stops at the first OOM
    assert record["max_tokens_per_step_fit"] == 256
    assert (tmp_path / f"{record['date'][:10]}_cpu_standard_tiny_findmax.json").is_file()
    assert "OOM" in bench.markdown_table([record])


def test_refusals(bench, monkeypatch):
    with pytest.raises(SystemExit, match="does not fit"):
        bench.main(["--variant", "unsloth", "--arch", "real"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--variant", "unsloth", "--arch", "tiny"])


def test_warmup_rule_leaves_out_each_first_shape():
    from benchmarks import records, timing

    steps = [{"step": i + 1, "seconds": s, "tokens": 100} for i, s in enumerate([9.0, 1.0, 5.0, 1.0, 4.0, 2.0])]
    shapes = {1: [[8, 50]], 2: [[8, 50]], 3: [[8, 60]], 4: [[8, 50]], 5: [[8, 70]], 6: [[8, 60]]}
    excluded = records.warmup_exclusions(steps, 1, [shapes])
    assert [e["step"] for e in excluded] == [1, 3, 5] and "[[8, 60]]" in excluded[1]["why"]
    # two processes: a step is left out when either meets a new shape
    other = {1: [[8, 50]], 2: [[8, 55]], 3: [[8, 60]], 4: [[8, 50]], 5: [[8, 70]], 6: [[8, 60]]}
    assert [e["step"] for e in records.warmup_exclusions(steps, 1, [shapes, other])] == [1, 2, 3, 5]
    figures = timing.timed_figures(steps, excluded)
    assert figures["counted_steps"] == [2, 4, 6]
    assert figures["steady_tokens_per_second"] == pytest.approx(300 / 4.0)
    assert figures["seconds_per_step_median"] == 1.0 and figures["seconds_per_step_mean"] == pytest.approx(4 / 3, 1e-3)


def test_helpers(bench):
    from benchmarks import records, timing

    assert timing.peak_flops("NVIDIA H100 80GB HBM3")["flops"] == 989.4e12
    assert timing.peak_flops("NVIDIA H100 PCIe")["flops"] == 756e12
    assert timing.peak_flops("Some GPU")["flops"] is None
    assert timing.is_oom(torch.cuda.OutOfMemoryError("x")) and not timing.is_oom(ValueError("out of memory"))
    argv = ["--variant", "standard", "unsloth", "--arch", "slice8", "--tokens-per-step", "4096"]
    assert bench._argv_with_variant(argv, "unsloth") == ["--arch", "slice8", "--tokens-per-step", "4096",
                                                          "--variant", "unsloth"]
    every = ["a", "b", "c", "d"]
    fast = {"variant": "fast", "fast": {"features": ["a", "b", "c"], "all_features": every, "checkpointing": "moe:1"}}
    assert records.variant_slug(fast) == "fast-without-d-ckpt-moe1"
    assert records.variant_slug({"variant": "standard", "routed_experts": True}) == "standard-experts"


def test_committed_tables_are_what_the_records_give():
    """README.md, benchmarks/NOTES.md and benchmarks/results/README.md: every table region equals what
    benchmarks/tables.py computes from the committed records (a hand edit or a missing record fails)."""
    from benchmarks import tables

    for path in tables.FILES:
        text = path.read_text()
        names = tables.regions(text)
        assert names, f"{path}: no table regions"
        assert tables.render(text) == text, f"{path}: run `python benchmarks/tables.py` (or fix the record)"
    seen = {name for path in tables.FILES for name in tables.regions(path.read_text())}
    assert seen == set(tables.TABLES)  # every table is shown somewhere


def test_a_changed_record_changes_the_table(monkeypatch, tmp_path):
    """The check can fail: the ablation table follows its record."""
    from benchmarks import records, tables

    original = records.load_record

    def edited(path):
        record = original(path)
        if Path(path).name == "01-packing.json":
            record["budgets"][0]["steady_tokens_per_second"] = 1234.0
        return record

    monkeypatch.setattr(tables, "load_record", edited)
    assert "| 1,234 |" in tables.ablation_table() and "| 4,021 |" not in tables.ablation_table()


def test_full_depth_comparison_for_notebook_04():
    from benchmarks import records

    rows = records.full_depth_comparison()
    assert [(r["stack"], r["trainable_on_routed_experts"] > 0) for r in rows] == [
        ("standard", False), ("fast", False), ("standard", True), ("unsloth", True), ("fast", True)]
    for r in rows:
        assert r["epoch_hours"] == pytest.approx(records.EPOCH_TOKENS / r["tokens_per_second"] / 3600)
        assert r["config"] == (records.ROUTED if r["trainable_on_routed_experts"] else records.FROZEN)
        assert r["median_s"] > 0 and r["mean_s"] > 0 and r["first_batch_loss"] > 12
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"])
    assert rows[1]["speedup"] > 2 and rows[3]["speedup"] > 1 and rows[4]["speedup"] > rows[3]["speedup"]
    # the shapes-seen rule leaves out more steps than the records' fixed warm-up, never fewer
    assert all(set(range(1, r["warmup_steps"] + 1)) < set(r["shapes_rule"]["excluded"]) for r in rows)


def _imports(path: Path) -> set[str]:
    """Modules of the benchmarks package that `path` imports (at any level), as bare names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "benchmarks":
                found |= {a.name for a in node.names if a.name != "REPO"}
            elif node.module.startswith("benchmarks."):
                found.add(node.module.split(".")[1])
            elif node.module in {p.stem for p in BENCH.glob("*.py")}:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in {p.stem for p in BENCH.glob("*.py")}}
    return found


def test_benchmark_modules_have_no_import_cycle_and_scripts_do_not_import_bench():
    graph = {p.stem: _imports(p) for p in BENCH.glob("*.py") if p.stem != "__init__"}
    for script in ("check_fast", "trace_ops", "make_random_model", "tables", "records", "models", "timing",
                   "workload"):
        assert "bench" not in graph[script], f"{script} imports bench.py"
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [node])}")
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for module in graph:
        visit(module, [])
    # records and tables stay light: nothing heavy at module level
    for light in ("records", "tables"):
        top = {n.names[0].name.split(".")[0] for n in ast.parse((BENCH / f"{light}.py").read_text()).body
               if isinstance(n, ast.Import)}
        top |= {n.module.split(".")[0] for n in ast.parse((BENCH / f"{light}.py").read_text()).body
                if isinstance(n, ast.ImportFrom) and n.module}
        assert not top & {"torch", "transformers", "trl", "peft", "helpers"}, (light, top)


def test_check_fast_finds_the_fast_path_exact_on_an_attention_and_moe_model(bench, tmp_path):
    """benchmarks/check_fast.py's check on CPU, float32, a tiny model without Mamba (packing is exact there):
    losses, gradients and a short loss curve agree; the record names the pieces fastpath really applied."""
    from datasets import Dataset
    from transformers import NemotronHConfig

    from benchmarks import check_fast, models, workload
    from recipe.offline import tiny_config

    tokenizer = models.bench_tokenizer()
    values = tiny_config(len(tokenizer)).to_dict()
    values.pop("layers_block_type", None)
    values["hybrid_override_pattern"] = "*E*E"  # attention + MoE only
    llm = models.build_random_model(NemotronHConfig(**values), 0)
    model, _ = models.add_lora(llm, models.bench_config(seed=0))
    dist = workload.length_distribution(tokenizer, max_length=128)
    rows = Dataset.from_dict(workload.random_rows(dist["pairs"], 12, llm.config.vocab_size, [0, 1]))
    cfg = models.bench_config(seed=0, max_length=128).replace(
        run_name="check", output_root=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=2e-3, warmup_ratio=0.0)
    record = check_fast.check(model, tokenizer, rows, cfg, rows=4, steps=2, compare_features=["packing,lean_experts"])
    assert record["loss"]["abs_diff"] < 1e-5 and record["per_row"]["max_abs_diff_packed"] < 1e-5
    assert record["grads"]["without_grad"] == [] and record["grads"]["max_rel_error"] < 1e-4
    assert record["training"]["max_rel_diff"] < 1e-4 and len(record["training"]["fast"]) == 2
    assert record["by_features"][0]["grads"]["max_rel_error"] < 1e-4
    applied = record["pieces_applied"]
    assert {"lean_experts", "lora_bf16"} <= set(applied) and "frozen_out_proj" not in applied  # no Mamba block


def test_trace_ops_sees_lora_bf16_remove_peft_input_copies(bench):
    """benchmarks/trace_ops.py --ops copies on CPU: PEFT's float32 copy of every LoRA input is charged to its
    line on the standard path, forward and backward, and is gone with the fast path's lora_bf16."""
    from benchmarks import trace_ops

    common = ["--arch", "tiny", "--tokens", "256", "--top", "500", "--ops", "copies"]
    standard = trace_ops.main(common + ["--variant", "standard"])
    assert {r["op"] for r in standard["top"]} <= trace_ops.COPY_OPS
    peft_casts = [r for r in standard["top"] if "peft/tuners/tuners_utils.py" in r["where"]]
    assert peft_casts and {r["dtypes"] for r in peft_casts} >= {"bf16->f32"}
    assert any(r["phase"] == "backward" and "modeling_nemotron_h.py" in r["where"] for r in standard["top"])
    lean = trace_ops.main(common + ["--variant", "fast", "--fast-features", "packing,lean_experts,lora_bf16"])
    assert not any("peft/tuners/tuners_utils.py" in r["where"] for r in lean["top"])
