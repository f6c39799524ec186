"""Stage 2: SFTTrainer on the tiny model — label masking, run records, resume, learning, the whole pipeline."""

import json
import math
import subprocess
import sys
import textwrap

import pytest

from helpers import data, evaluation, model, training


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return model.build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-nemotron")


@pytest.fixture(scope="session")
def sample_data(tiny_model_dir, tmp_path_factory):
    tok = model.load_tokenizer(tiny_model_dir)
    out = tmp_path_factory.mktemp("fmt") / "sample"
    return data.prepare_medmcqa(data.SAMPLE_DIR, out_dir=out, tokenizer=tok, max_length=512)[0], out


def tiny_cfg(tiny_model_dir, data_dir, tmp_path, **kw):
    base = dict(run_name="t", model_id=str(tiny_model_dir), data_dir=str(data_dir), output_root=str(tmp_path),
                max_length=512, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                learning_rate=1e-3, logging_steps=1, save_steps=100, eval_batch_size=8)
    return training.TrainConfig(**{**base, **kw})


def test_prompt_tokens_are_masked_and_the_answer_letter_is_trained(tiny_model_dir, sample_data, tmp_path):
    dataset, data_dir = sample_data
    cfg = tiny_cfg(tiny_model_dir, data_dir, tmp_path)
    llm, tok = model.load_model(cfg.model_id)
    peft_model, _ = model.add_lora(llm, model.lora_config())
    trainer = training.make_trainer(peft_model, tok, training.training_split(dataset), cfg)
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
    llm, tok = model.load_model(cfg.model_id)
    peft_model, _ = model.add_lora(llm, model.lora_config())
    trainer = training.make_trainer(peft_model, tok, training.training_split(dataset), cfg)
    record = training.train(trainer, cfg)
    saved = training.load_run_record(cfg.run_dir)
    assert saved == json.loads(json.dumps(record))
    assert record["steps"] == 3 and record["samples"] == 12 and record["tokens"] > 12 * 50
    assert record["tokens_per_second"] > 0 and record["seconds_per_step"] > 0
    assert [s for s, _ in record["loss_history"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in record["loss_history"])
    assert record["versions"]["transformers"] == "5.17.0" and record["config"]["max_steps"] == 3
    assert record["hardware"]["device"] == "cpu" and record["trainable_parameters"] > 0
    assert (cfg.run_dir / "loss.png").stat().st_size > 1000
    assert (cfg.checkpoint_dir / "adapter_config.json").exists()            # the adapter
    assert (cfg.checkpoint_dir / "tokenizer_config.json").exists()          # + tokenizer
    assert list((cfg.run_dir / "tensorboard").iterdir())                    # TensorBoard logs


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {notebooks!r})
    from helpers import data, model, training
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)   # a hard kill: no cleanup, no final save

    cfg = training.TrainConfig(**{cfg!r})
    dataset, _ = data.load_formatted(cfg.data_dir)
    llm, tok = model.load_model(cfg.model_id)
    peft_model, _ = model.add_lora(llm, model.lora_config())
    trainer = training.make_trainer(peft_model, tok, training.training_split(dataset), cfg,
                                    callbacks=[KillAfterSave()])
    training.train(trainer, cfg)
""")


def run_child(repo, cfg, kill_at=-1):
    code = CHILD.format(notebooks=str(repo / "notebooks"), kill_at=kill_at, cfg=cfg.__dict__)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_the_same_end_and_loss(repo, tiny_model_dir, sample_data, tmp_path):
    _, data_dir = sample_data
    common = dict(max_steps=8, save_steps=2, save_total_limit=2, learning_rate=2e-3)
    interrupted = tiny_cfg(tiny_model_dir, data_dir, tmp_path / "a", **common)
    killed = run_child(repo, interrupted, kill_at=4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (interrupted.run_dir / "metrics.json").exists()
    assert training.last_checkpoint(interrupted).endswith("checkpoint-4")
    resumed = run_child(repo, interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout

    straight = tiny_cfg(tiny_model_dir, data_dir, tmp_path / "b", **common)
    assert run_child(repo, straight).returncode == 0
    a, b = training.load_run_record(interrupted.run_dir), training.load_run_record(straight.run_dir)
    assert a["steps"] == b["steps"] == 8 and a["resumed_from"].endswith("checkpoint-4")
    assert a["tokens"] == b["tokens"]
    tokens_b = {s["step"]: s["tokens"] for s in b["step_times"]}
    assert [s["step"] for s in a["step_times"]] == [5, 6, 7, 8]        # the resumed run did steps 5-8 only ...
    assert all(s["tokens"] == tokens_b[s["step"]] for s in a["step_times"])  # ... on the same batches
    loss_a, loss_b = dict(a["loss_history"]), dict(b["loss_history"])
    assert sorted(loss_a) == list(range(1, 9))                        # history continues across the kill
    for step in range(1, 9):  # equal up to CPU float32 run-to-run noise (~1e-4 relative)
        assert loss_a[step] == pytest.approx(loss_b[step], rel=2e-3), step


def test_smoke_preset_runs_the_whole_pipeline(tmp_path):
    """The README's first command: prepare, score, train, score, reload, merge, on the tiny model."""
    import train
    summary = train.main(["--preset", "smoke", "--set", f"output_root={tmp_path}", f"data_dir={tmp_path / 'fmt'}"])
    assert summary["data_rows"]["train"] == 48 and summary["data_rows"]["validation"] == 16
    assert summary["reloaded_matches"] and summary["merged_matches"]
    assert summary["reloaded_accuracy"] == summary["adapter_accuracy"]
    record = training.load_run_record(tmp_path / "runs" / "smoke")
    assert record["steps"] == training.PRESETS["smoke"]["max_steps"] and record["tokens"] > 0
    assert (tmp_path / "runs" / "smoke" / "summary.json").exists()
    # --like: the same run again from its record (config and prepared data), here shortened to 2 steps
    again = train.main(["--like", str(tmp_path / "runs" / "smoke"), "--skip-base-eval", "--set", "max_steps=2"])
    assert again["run"] == "smoke-again" and again["data_rows"] == summary["data_rows"]
    rerun = training.load_run_record(tmp_path / "runs" / "smoke-again")
    assert rerun["steps"] == 2
    assert {k: v for k, v in rerun["config"].items() if k not in ("run_name", "max_steps")} == \
        {k: v for k, v in record["config"].items() if k not in ("run_name", "max_steps")}


def test_tokens_per_second_after_skips_the_compiling_steps():
    record = {"step_times": [{"seconds": 50.0, "tokens": 100}, {"seconds": 8.0, "tokens": 100},
                             {"seconds": 0.5, "tokens": 100}, {"seconds": 1.5, "tokens": 300}]}
    assert training.tokens_per_second_after(record, 2) == 200.0
    assert training.tokens_per_second_after(record, 1) == 50.0
    assert training.tokens_per_second_after(record, 4) is None


def test_committed_reference_runs_are_comparable():
    """Notebook 04's offline comparison: the three committed GPU runs trained the same adapters on the same tokens."""
    from helpers import unsloth_path
    standard, unsloth, fast = unsloth_path.reference_records()
    assert [r["stack"] for r in (standard, unsloth, fast)] == ["standard", "unsloth", "fast"]
    table = unsloth_path.fairness_table(standard, unsloth, fast)
    assert " NO" not in table and table.count("yes") == 8
    changed = dict(fast, config=dict(fast["config"], seed=0))
    assert "NO" in unsloth_path.fairness_table(standard, unsloth, changed).splitlines()[4]


def test_learning_is_visible_on_the_synthetic_task(tmp_path):
    """`--preset learn`, through train.main: the tiny model learns the code-word rule (chance is 25%)."""
    import train
    summary = train.main(["--preset", "learn", "--set", f"output_root={tmp_path}", f"data_dir={tmp_path / 'syn'}"])
    assert summary["base_accuracy"] < 0.45, summary       # the random model guesses
    assert summary["adapter_accuracy"] > 0.6, summary     # the trained adapter knows the rule
    assert summary["reloaded_matches"] and summary["merged_matches"]
    assert summary["reloaded_accuracy"] == summary["merged_accuracy"] == summary["adapter_accuracy"]
    record = training.load_run_record(tmp_path / "runs" / "learn")
    assert record["steps"] == training.PRESETS["learn"]["max_steps"]
