"""Training on the tiny model: label masking, run records, resume, learning, and train.py's whole pipeline."""

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from transformers.trainer_utils import get_last_checkpoint

from helpers import data, evaluation, model, training
from helpers.config import TrainConfig
from recipe import cli, offline
from recipe.offline import build_tiny_model
from recipe.presets import PRESETS


def read_record(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-nemotron")


@pytest.fixture(scope="module")
def sample_data(tiny_model_dir, tmp_path_factory):
    tok = model.load_tokenizer(tiny_model_dir)
    out = tmp_path_factory.mktemp("fmt") / "sample"
    return data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, tokenizer=tok, max_length=512)[0], out


def tiny_cfg(tiny_model_dir, data_dir, tmp_path, **kw):
    base = dict(run_name="t", model_id=str(tiny_model_dir), data_dir=str(data_dir), output_root=str(tmp_path),
                max_length=512, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                learning_rate=1e-3, logging_steps=1, save_steps=100, eval_batch_size=8)
    return TrainConfig(**{**base, **kw})


def sft_trainer(cfg, dataset, callbacks=()):
    """The trainer train.py's pipeline builds: its LoraConfig and SFTConfig on the tiny model, with a StepTimer."""
    import train
    from peft import get_peft_model
    from transformers import set_seed
    from trl import SFTTrainer

    llm, tok = train.load_model(cfg.model_id)
    set_seed(cfg.seed)
    timer = training.StepTimer()
    trainer = SFTTrainer(model=get_peft_model(llm, train.lora_config(cfg)), args=train.sft_config(cfg),
                         train_dataset=training.training_rows(dataset, cfg.train_limit), processing_class=tok,
                         callbacks=[timer, *callbacks])
    return trainer, timer, tok


def test_prompt_tokens_are_masked_and_the_answer_letter_is_trained(tiny_model_dir, sample_data, tmp_path):
    dataset, data_dir = sample_data
    trainer, _, tok = sft_trainer(tiny_cfg(tiny_model_dir, data_dir, tmp_path), dataset)
    letter_ids = evaluation.letter_token_ids(tok)
    for i in range(3):
        raw = dataset["train"][i]
        batch = trainer.data_collator([trainer.train_dataset[i]])
        labels, ids = batch["labels"][0].tolist(), batch["input_ids"][0].tolist()
        n_prompt = len(tok(raw["prompt"])["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt                    # the prompt carries no loss
        assert labels[n_prompt:] == ids[n_prompt:]                       # the completion does, all of it
        assert labels[n_prompt] == letter_ids["ABCD".index(raw["answer"])]  # and starts with the letter
        assert ids[-1] == tok.eos_token_id                               # ending in EOS


def test_run_record_has_speed_memory_versions_and_loss(tiny_model_dir, sample_data, tmp_path):
    dataset, data_dir = sample_data
    cfg = tiny_cfg(tiny_model_dir, data_dir, tmp_path, max_steps=3)
    trainer, timer, _ = sft_trainer(cfg, dataset)
    with training.cpu_loss_fallback():
        trainer.train()
    trainer.save_model(str(cfg.checkpoint_dir))
    record = training.run_record(trainer, cfg, timer)
    training.save_run_record(record, cfg.run_dir)
    saved = read_record(cfg.run_dir)
    assert saved == json.loads(json.dumps(record))
    assert record["steps"] == record["steps_this_run"] == 3 and record["samples"] == 12
    assert record["tokens"] > 12 * 50 and record["tokens"] == sum(s["tokens"] for s in record["step_times"])
    assert record["steady_tokens_per_second"] > 0 and record["seconds_per_step"] > 0
    assert [s for s, _ in record["loss_history"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in record["loss_history"])
    assert record["versions"]["transformers"] == "5.17.0" and record["config"]["max_steps"] == 3
    assert record["hardware"]["device"] == "cpu" and record["trainable_parameters"] > 0
    assert (cfg.checkpoint_dir / "adapter_config.json").exists()            # the adapter
    assert (cfg.checkpoint_dir / "tokenizer_config.json").exists()          # + tokenizer
    assert list(cfg.checkpoint_dir.glob("runs/*/events.out.tfevents.*"))   # TensorBoard logs


def test_sharded_report_says_how_to_score_and_that_works(tiny_model_dir, sample_data, tmp_path, capsys):
    """After FSDP train.py scores nothing (no GPU holds the whole model): its report prints Python lines that
    score the saved adapter, and they do."""
    from recipe import report

    dataset, data_dir = sample_data
    cfg = tiny_cfg(tiny_model_dir, data_dir, tmp_path, max_steps=2, run_name="sharded")
    trainer, timer, _ = sft_trainer(cfg, dataset)
    with training.cpu_loss_fallback():
        trainer.train()
    trainer.save_model(str(cfg.checkpoint_dir))
    record = training.run_record(trainer, cfg, timer)
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    capsys.readouterr()
    summary = report.finish(cfg, training.save_run_record(record, cfg.run_dir), manifest, {}, sharded=True,
                            record=record)
    out = capsys.readouterr().out
    assert "Scoring skipped under FSDP" in out and summary["accuracy"] == {} and summary["steps"] == 2
    assert all(f"  {line}" in out for line in summary["how_to_score"])
    exec("\n".join(summary["how_to_score"]), {})
    scored = json.loads((tmp_path / "eval" / "sharded-adapter.json").read_text())
    assert scored["n"] == len(dataset["validation"])


def test_cpu_loss_fallback_puts_trls_kernel_back_on_any_exit():
    import trl.trainer.utils as trl_utils

    original = trl_utils._ChunkedLogProbFunction
    with pytest.raises(KeyboardInterrupt), training.cpu_loss_fallback() as active:  # a learner stopping the cell
        assert active and trl_utils._ChunkedLogProbFunction is offline.TorchLogProb
        raise KeyboardInterrupt
    assert trl_utils._ChunkedLogProbFunction is original


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {repo!r}, {notebooks!r}]
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from helpers import data, training
    from helpers.config import TrainConfig
    from test_training import sft_trainer

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)   # a hard kill: no cleanup, no final save

    cfg = TrainConfig(**{cfg!r})
    trainer, timer, _ = sft_trainer(cfg, data.load_formatted(cfg.data_dir)[0], callbacks=[KillAfterSave()])
    resume = get_last_checkpoint(str(cfg.checkpoint_dir)) if cfg.checkpoint_dir.is_dir() else None  # as train.py
    print("resuming from", resume)
    with training.cpu_loss_fallback():
        trainer.train(resume_from_checkpoint=resume)
    training.save_run_record(training.run_record(trainer, cfg, timer, resumed_from=resume), cfg.run_dir)
""")


def run_child(repo, cfg, kill_at=-1):
    code = CHILD.format(tests=str(repo / "tests"), repo=str(repo), notebooks=str(repo / "notebooks"),
                        kill_at=kill_at, cfg=cfg.__dict__)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_the_same_end_and_loss(repo, tiny_model_dir, sample_data, tmp_path):
    _, data_dir = sample_data
    common = dict(max_steps=8, save_steps=2, save_total_limit=2, learning_rate=2e-3)
    interrupted = tiny_cfg(tiny_model_dir, data_dir, tmp_path / "a", **common)
    killed = run_child(repo, interrupted, kill_at=4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (interrupted.run_dir / "metrics.json").exists()
    assert get_last_checkpoint(str(interrupted.checkpoint_dir)).endswith("checkpoint-4")
    resumed = run_child(repo, interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from " + str(interrupted.checkpoint_dir / "checkpoint-4") in resumed.stdout

    straight = tiny_cfg(tiny_model_dir, data_dir, tmp_path / "b", **common)
    assert run_child(repo, straight).returncode == 0
    a, b = read_record(interrupted.run_dir), read_record(straight.run_dir)
    assert a["steps"] == b["steps"] == 8 and a["resumed_from"].endswith("checkpoint-4")
    assert a["tokens"] == b["tokens"]
    tokens_b = {s["step"]: s["tokens"] for s in b["step_times"]}
    assert [s["step"] for s in a["step_times"]] == [5, 6, 7, 8]        # the resumed run did steps 5-8 only ...
    assert all(s["tokens"] == tokens_b[s["step"]] for s in a["step_times"])  # ... on the same batches
    loss_a, loss_b = dict(a["loss_history"]), dict(b["loss_history"])
    assert sorted(loss_a) == list(range(1, 9))                        # history continues across the kill
    for step in range(1, 9):  # equal up to CPU float32 run-to-run noise (~1e-4 relative)
        assert loss_a[step] == pytest.approx(loss_b[step], rel=2e-3), step


def test_a_finished_run_is_loaded_not_trained_a_step_more(tiny_model_dir, sample_data, tmp_path, capsys):
    """max_steps=4 ends in mid-epoch (12 steps per epoch): resumed from checkpoint-4, transformers would train a
    fifth step and the record would be replaced. already_trained loads the checkpoint's adapter and state instead;
    a checkpoint short of the plan still resumes. Routed-expert LoRA too (PEFT target_parameters)."""
    import torch
    from peft import get_peft_model_state_dict

    dataset, data_dir = sample_data
    cfg = tiny_cfg(tiny_model_dir, data_dir, tmp_path, save_steps=2, routed_experts=True)
    trainer, timer, _ = sft_trainer(cfg, dataset)
    assert not training.already_trained(trainer, None)
    with training.cpu_loss_fallback():
        trainer.train()
    trained = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    assert any(".experts." in k for k in trained)
    training.save_run_record(training.run_record(trainer, cfg, timer), cfg.run_dir)
    kept = (cfg.run_dir / "metrics.json").read_text()

    again, timer, _ = sft_trainer(cfg, dataset)  # the notebook's cells run again: a fresh LoRA
    last = get_last_checkpoint(str(cfg.checkpoint_dir))
    assert last.endswith("checkpoint-4") and training.already_trained(again, last)
    assert "holds all 4 planned steps" in capsys.readouterr().out
    loaded = get_peft_model_state_dict(again.model)
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    record = training.run_record(again, cfg, timer, resumed_from=last)
    assert record["steps"] == 4 and record["steps_this_run"] == 0 and record["loss_history"]
    training.save_run_record(record, cfg.run_dir)
    assert (cfg.run_dir / "metrics.json").read_text() == kept and not (cfg.checkpoint_dir / "checkpoint-5").exists()
    longer, _, _ = sft_trainer(cfg.replace(max_steps=6), dataset)  # more steps asked: checkpoint-4 resumes
    assert not training.already_trained(longer, last)
    other, _, _ = sft_trainer(cfg.replace(routed_experts=False), dataset)  # the same name, other LoRA targets
    with pytest.raises(ValueError, match="another adapter than this run's LoRA settings"):
        training.already_trained(other, last)


def report_of(out: str) -> list[str]:
    """The lines of train.py's closing report (between its two rules of '=')."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("=" * 40))
    first = max(i for i, line in enumerate(lines[:start]) if line.startswith("=" * 40))
    return lines[first + 1:start]


def test_smoke_preset_runs_the_whole_pipeline(tmp_path, capsys):
    """The README's first command: prepare, score, train, score, reload, merge, on the tiny model; then the same
    command again (a finished run: its record is kept) and a rerun --like it."""
    import train

    argv = ["--preset", "smoke", "--set", f"output_root={tmp_path}", f"data_dir={tmp_path / 'fmt'}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train.main(argv)
    out = capsys.readouterr().out
    assert not [w for w in caught if "pin_memory" in str(w.message)]  # no CPU-only warnings
    assert out.startswith("Run smoke (preset smoke")
    assert ("CPU: reference Mamba path" in out) == (not cli.cuda_present())
    assert summary["data_rows"]["train"] == 48 and summary["data_rows"]["validation"] == 16
    assert summary["reloaded_matches"] and summary["merged_matches"]
    assert summary["reloaded_accuracy"] == summary["adapter_accuracy"]
    assert summary["accuracy"]["adapter"]["n"] == 16 and summary["tokens_per_second"] > 0
    record = read_record(tmp_path / "runs" / "smoke")
    assert record["steps"] == summary["steps"] == PRESETS["smoke"][1]["max_steps"] and record["tokens"] > 0
    assert json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    names = summary["files"]
    assert {"adapter", "run record", "loss plot", "summary"} <= set(names)
    assert [name for name in names if name.startswith("scores")] == [f"scores ({k})" for k in
                                                                      ("base", "adapter", "reloaded", "merged")]
    for path in names.values():
        assert Path(path).exists(), path
    assert Path(names["loss plot"]).stat().st_size > 1000
    report = report_of(out)
    assert len(report) <= 16 and not any(line.lstrip().startswith(("{", '"')) for line in report)
    text = "\n".join(report)
    base, adapter = (f"{summary['accuracy'][k]['accuracy']:.1%}" for k in ("base", "adapter"))
    assert f"Accuracy on 16 validation questions: base {base} -> adapter {adapter}" in text
    assert "RANDOM" in text and "plumbing" in text and "noise" in text
    assert summary["preset"] == "smoke" and "preset smoke" in text
    for name in ("adapter", "run record", "loss plot", "summary"):
        assert str(Path(names[name]).name) in text

    # The same command again: the run is finished, nothing trains, and its record and figures are kept.
    kept = (tmp_path / "runs" / "smoke" / "metrics.json").read_text()
    again = train.main(argv + ["--skip-base-eval"])
    out = capsys.readouterr().out
    assert again["already_finished"] and not summary["already_finished"]
    assert (tmp_path / "runs" / "smoke" / "metrics.json").read_text() == kept
    for key in ("steps", "tokens", "tokens_per_second", "wall_seconds", "rows_trained"):
        assert again[key] == summary[key], key
    assert again["adapter_accuracy"] == summary["adapter_accuracy"]  # the finished adapter, scored again
    text = "\n".join(report_of(out))
    assert "smoke was already finished at step 12" in text and "record is kept" in text and "--fresh" in text
    assert " 0 tokens/s" not in text and f"({summary['tokens_per_second']:,.0f} tokens/s)" in text

    # --like: the same run again from its record, shortened to 2 steps; --save-merged writes the merged model, and
    # the report's file list says where
    like = train.main(["--like", str(tmp_path / "runs" / "smoke"), "--skip-base-eval", "--set", "max_steps=2",
                       "--save-merged"])
    assert like["run"] == "smoke-again" and like["data_rows"] == summary["data_rows"] and like["preset"] is None
    merged = Path(like["files"]["merged model"])
    assert merged == (tmp_path / "merged" / "smoke-again").resolve() and (merged / "config.json").is_file()
    assert "merged model" in "\n".join(report_of(capsys.readouterr().out)) and "merged model" not in summary["files"]
    rerun = read_record(tmp_path / "runs" / "smoke-again")
    assert rerun["steps"] == 2
    assert {k: v for k, v in rerun["config"].items() if k not in ("run_name", "max_steps")} == \
        {k: v for k, v in record["config"].items() if k not in ("run_name", "max_steps")}


def test_steady_speed_skips_the_compiling_steps():
    steps = [{"seconds": 50.0, "tokens": 100}, {"seconds": 8.0, "tokens": 100},
             {"seconds": 0.5, "tokens": 100}, {"seconds": 1.5, "tokens": 300}]
    assert training.steady(steps, 2)["tokens_per_second"] == 200.0
    assert training.steady(steps, 1)["tokens_per_second"] == 50.0
    assert training.steady(steps, 2)["steps_counted"] == 2 and training.steady(steps, 2)["warmup_steps_excluded"] == 2
    assert training.steady(steps[:1], 2)["warmup_steps_excluded"] == 0  # too short to skip anything


def test_committed_reference_runs_are_comparable():
    """Notebook 04's offline comparison: the three committed GPU runs trained the same adapters on the same tokens."""
    from benchmarks import records
    from helpers import unsloth_path
    standard, unsloth, fast = records.reference_runs()
    assert [r["stack"] for r in (standard, unsloth, fast)] == ["standard", "unsloth", "fast"]
    table = unsloth_path.fairness_table(standard, unsloth, fast)
    assert " NO" not in table and table.count("yes") == 8
    changed = dict(fast, config=dict(fast["config"], seed=0))
    assert "NO" in unsloth_path.fairness_table(standard, unsloth, changed).splitlines()[4]


def test_speedups_name_counted_steps_that_compiled(capsys):
    """Notebook 04 on a fresh machine: a baseline step that compiled kernels inside the counted steps inflates the
    tokens/s ratio; the line names that step and gives the ratio of median steps as well."""
    from helpers import unsloth_path

    def record(stack, seconds):
        steps = [{"step": i + 1, "seconds": s, "tokens": 1000} for i, s in enumerate(seconds)]
        return {"stack": stack, "first_step_seconds": seconds[0], "step_times": steps}

    baseline = record("standard", [60.0, 9.0, 0.2, 0.2, 3.0, 0.2, 0.2])
    unsloth_path.print_speedups(baseline, [record("unsloth", [130.0, 17.0, 0.18, 0.18, 0.18, 0.18, 0.18])])
    out = capsys.readouterr().out
    assert "unsloth vs standard: 4.22x tokens/s" in out  # 5,000 tokens in 3.8 s against 0.9 s
    assert "standard step 5 3.0 s" in out and "by median step, which leaves them out: 1.11x" in out
    steady_run = record("standard", [60.0, 9.0, 0.2, 0.2, 0.2, 0.2, 0.2])
    unsloth_path.print_speedups(steady_run, [record("fast", [50.0, 5.0, 0.1, 0.1, 0.1, 0.1, 0.1])])
    out = capsys.readouterr().out
    assert "fast vs standard: 2.00x" in out and "compiled" not in out


def test_synthetic_data_of_another_seed_is_prepared_again(tmp_path):
    """The prepared data is reused only for the same options: a new seed's synthetic task is written and prepared
    afresh, not read back from the folder the last seed filled."""
    from recipe.report import prepare_data

    cfg = TrainConfig(data_source="synthetic", output_root=str(tmp_path), data_dir=str(tmp_path / "fmt"), seed=1)
    first, _ = prepare_data(cfg, tokenizer=None)
    second, _ = prepare_data(cfg.replace(seed=2), tokenizer=None)
    assert first["train"]["prompt"] != second["train"]["prompt"]
    assert prepare_data(cfg, tokenizer=None)[0]["train"]["prompt"] == first["train"]["prompt"]


def test_learning_is_visible_on_the_synthetic_task(tmp_path, capsys):
    """`--preset learn`, through train.main: the tiny model learns the code-word rule (chance is 25%)."""
    import train
    summary = train.main(["--preset", "learn", "--set", f"output_root={tmp_path}", f"data_dir={tmp_path / 'syn'}"])
    assert summary["base_accuracy"] < 0.45, summary       # the random model guesses
    assert summary["adapter_accuracy"] > 0.6, summary     # the trained adapter knows the rule
    assert summary["reloaded_matches"] and summary["merged_matches"]
    assert summary["reloaded_accuracy"] == summary["merged_accuracy"] == summary["adapter_accuracy"]
    record = read_record(tmp_path / "runs" / "learn")
    assert record["steps"] == PRESETS["learn"][1]["max_steps"]
    seed = TrainConfig(**PRESETS["learn"][1]).seed
    assert (tmp_path / "data" / f"synthetic-medmcqa-seed{seed}" / "train.jsonl").is_file()  # under output_root
    text = "\n".join(report_of(capsys.readouterr().out))
    assert "taught it the rule" in text and "plumbing" not in text
