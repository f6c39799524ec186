"""train.py's command line: --help and every mistake answer at once, in one or two lines, with exit code 2."""

import json
import logging
import os
import subprocess
import re
import sys
import time

import pytest

from helpers.config import TINY_MODEL, TrainConfig
from recipe.presets import PRESETS, field_names
from recipe import cli

HEAVY = ("torch", "transformers", "datasets", "trl", "peft")


def run_train(repo, *args, cuda=False):
    """`python train.py ARGS` in a fresh process (without CUDA unless `cuda`): (result, seconds)."""
    env = dict(os.environ)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU: the same answers on every machine
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(repo / "train.py"), *args], capture_output=True, text=True,
                          cwd=repo, env=env, timeout=120)
    return done, time.perf_counter() - start


def test_help_lists_presets_and_every_setting_at_once(repo):
    done, seconds = run_train(repo, "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines at the terminal's width
    for name, (description, _) in PRESETS.items():
        assert f"{name} {' '.join(description.split())}" in text
    assert "default: full, the real 59 GB model on a CUDA GPU" in text
    assert cli.FAST_HELP in text
    for flag in ("--set", "--like", "--fresh", "--skip-base-eval", "--save-merged", "--fast-features",
                 "--checkpointing", "--any-version", "--debug"):
        assert flag in text
    settings = done.stdout[done.stdout.index("settings (--set"):]
    for name in field_names():  # every key, with its default as one would type it
        assert f"\n  {name}=" in settings
    assert "\n  max_steps=-1" in settings and "\n  routed_experts=false" in settings
    assert "\n  train_limit=none" in settings
    assert seconds < 5, seconds


MISTAKES = {  # argv -> what the one or two lines must say
    "not an integer": (["--set", "max_steps=abc"], ["max_steps takes an integer", "'abc'"]),
    "unknown setting": (["--set", "nonexistent_key=1"], ["unknown setting 'nonexistent_key'", "--help"]),
    "misspelt setting": (["--set", "max_step=3"], ["did you mean max_steps", "--help"]),
    "not a boolean": (["--preset", "smoke", "--set", "with_explanation=maybe"], ["true or false"]),
    "no =": (["--set", "max_steps"], ["KEY=VALUE", "'max_steps'"]),
    "missing data folder": (["--preset", "smoke", "--set", "data_source=missing/folder"],
                            ["missing/folder", "--set data_source="]),
    "missing run": (["--like", "outputs/runs/nope"], ["--like outputs/runs/nope", "no run record"]),
    "unknown preset": (["--preset", "smok"], ["unknown preset 'smok'", "did you mean smoke"]),
    "unknown flag": (["--presets", "smoke"], ["unrecognized arguments: --presets"]),
    "full preset on CPU": ([], ["full preset", "CUDA GPU", "--preset smoke", "--preset learn"]),
    "other big model on CPU": (["--preset", "smoke", "--set", "model_id=someone/some-model"],
                               ["someone/some-model", "CUDA GPU", "--preset smoke"]),
    "--fast on CPU": (["--preset", "smoke", "--fast"], ["--fast needs a CUDA GPU", "drop --fast"]),
    "fast flag without --fast": (["--preset", "smoke", "--checkpointing", "moe:2"], ["--checkpointing", "--fast"]),
    "out of range": (["--preset", "smoke", "--set", "per_device_train_batch_size=0", "lora_dropout=1"],
                     ["per_device_train_batch_size=0 (at least 1)", "lora_dropout=1.0 (0 or more, below 1)"]),
}


ONE_LINE = {"not an integer", "unknown setting", "misspelt setting", "missing run"}  # nothing more to add


@pytest.mark.parametrize("case", MISTAKES)
def test_each_mistake_is_one_or_two_lines_and_exit_code_2(repo, case):
    argv, expected = MISTAKES[case]
    done, seconds = run_train(repo, *argv)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), done.stderr
    assert len(lines) == 1 or case not in ONE_LINE, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for text in expected:
        assert text in done.stderr, (text, done.stderr)
    assert "fast=True" not in done.stderr
    assert seconds < 5, seconds


def test_fast_under_fsdp_is_refused_in_one_message(repo, monkeypatch, capsys):
    """accelerate's FSDP launch sets ACCELERATE_USE_FSDP: --fast there stops with the fix; without --fast it runs."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit) as exit:
        cli.parse(["--preset", "smoke", "--fast"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--fast is not verified under FSDP" in err and "configs/ddp.yaml" in err and "Traceback" not in err
    assert cli.parse(["--preset", "smoke"])[1].run_name  # the standard path is allowed under FSDP


def test_mistakes_are_found_before_anything_heavy_is_imported(repo):
    """One process, every mistake above and --help: none of them imports torch, transformers or datasets."""
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); import train\n"
            f"for argv in {[argv for argv, _ in MISTAKES.values()] + [['--help']]!r}:\n"
            "    try:\n        train.main(argv)\n    except SystemExit as exit:\n"
            "        assert exit.code in (0, 2), (argv, exit.code)\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_settings_out_of_range_are_refused_in_one_message():
    """Each value that would fail deep inside training (a division by a batch of 0, PEFT's rank check, the
    optimizer's learning rate check) is named at once; the defaults and every preset pass."""
    bad = {"per_device_train_batch_size": 0, "gradient_accumulation_steps": 0, "lora_r": 0, "eval_limit": 0,
           "learning_rate": -1.0, "lora_alpha": 0, "max_length": 0, "warmup_ratio": 1.0, "weight_decay": -0.1}
    with pytest.raises(ValueError) as error:
        TrainConfig(**bad)
    assert all(f"{name}={value}" in str(error.value) for name, value in bad.items()), error.value
    assert "notebook 03" in str(error.value) and "--set" in str(error.value)
    with pytest.raises(ValueError, match="Not a number: eval_limit='abc'"):  # a notebook parameter given as text
        TrainConfig(eval_limit="abc")
    with pytest.raises(ValueError, match="num_train_epochs=0"):
        TrainConfig().replace(num_train_epochs=0)
    assert TrainConfig().replace(num_train_epochs=0, max_steps=5).max_steps == 5  # steps alone are enough
    for name in PRESETS:
        cli.parse(["--preset", name], checks=False)


def test_lora_that_4bit_cannot_carry_is_refused_before_loading_or_data(monkeypatch, capsys):
    """load_in_4bit=true with routed-expert LoRA: refused in one line before the data is prepared or the model
    loaded (on the real model those take minutes)."""
    import train
    from helpers import quant
    from recipe import report

    def reached(*args, **kwargs):
        raise AssertionError("should have been refused first")

    monkeypatch.setattr(report, "prepare_data", reached)
    monkeypatch.setattr(quant, "load_model_4bit", reached)
    with pytest.raises(SystemExit) as exit:
        train.main(["--preset", "smoke", "--set", "load_in_4bit=true", "routed_experts=true"])
    assert exit.value.code == 2 and "cannot reach NF4 experts" in capsys.readouterr().err


def test_a_source_without_validation_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """train.py scores on validation: a folder holding train.jsonl alone stops in one line once the data is
    prepared, before the model is loaded."""
    import train
    from helpers import data

    folder = tmp_path / "train-only"
    folder.mkdir()
    (folder / "train.jsonl").write_text((data.SAMPLE_DIR / "train.jsonl").read_text())
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit) as exit:
        train.main(["--preset", "smoke", "--set", f"data_source={folder}", f"data_dir={tmp_path / 'fmt'}",
                    f"output_root={tmp_path}"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "No validation split in" in err and "dev.json" in err and "Traceback" not in err


def test_a_bad_data_line_is_reported_in_one_line(tmp_path, capsys):
    """A JSONL line holding `[1,2,3]`: helpers.data's message, printed by train.py without a traceback;
    --debug shows the traceback instead."""
    import train
    from helpers import data

    folder = tmp_path / "mydata"
    folder.mkdir()
    good = (data.SAMPLE_DIR / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join([good[0], "[1,2,3]", *good[1:]]) + "\n")
    (folder / "validation.jsonl").write_text("\n".join(good[:4]) + "\n")
    argv = ["--preset", "smoke", "--set", f"data_source={folder}", f"output_root={tmp_path}",
            f"data_dir={tmp_path / 'fmt'}"]
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    # progress bars (the tiny model is built first on a fresh clone) may come before the message
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "train.jsonl" in err and "line 2" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="line 2"):
        train.main(argv + ["--debug"])


def test_user_errors_keeps_the_traceback_of_bugs_and_library_errors(capsys):
    with pytest.raises(SystemExit) as exit, cli.user_errors():
        raise ValueError("cop_base must be 0 or 1, not 7.")  # raised by this repository: a user's mistake
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: cop_base must be 0 or 1, not 7.\n"
    with pytest.raises(ZeroDivisionError), cli.user_errors():
        1 / 0  # a bug: its traceback stays
    with pytest.raises(json.JSONDecodeError), cli.user_errors():
        json.loads("{")  # a ValueError raised inside a library: not ours to explain, so the traceback stays
    with pytest.raises(ValueError), cli.user_errors(debug=True):
        raise ValueError("shown with its traceback under --debug")
    with pytest.raises(SystemExit) as exit, cli.user_errors():
        raise KeyboardInterrupt
    assert exit.value.code == 130 and "resumes from the last checkpoint" in capsys.readouterr().err


def test_refusals_and_failed_preflight_checks_are_one_line(capsys):
    import fastpath
    from helpers import model

    with pytest.raises(SystemExit) as exit, cli.user_errors():
        fastpath.Settings("no_such_piece")
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_piece" in err and "--fast-features" in err
    failed = [model.Check("disk", False, "1 GiB free at /, ~59 GiB needed (download)", "free disk space")]
    with pytest.raises(SystemExit) as exit, cli.user_errors():
        model.require(failed)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 pre-flight check") and "free disk space" in err and "Traceback" not in err


def test_settings_are_typed_like_their_fields():
    changes = cli.parse_settings(["max_steps=5", "learning_rate=1e-4", "num_train_epochs=2", "routed_experts=1",
                                  "with_explanation=False", "train_limit=none", "eval_limit=8", "cop_base=1",
                                  "revision=null", "run_name=a=b", "extra={\"k\": 1}"])
    assert changes == {"max_steps": 5, "learning_rate": 1e-4, "num_train_epochs": 2.0, "routed_experts": True,
                       "with_explanation": False, "train_limit": None, "eval_limit": 8, "cop_base": 1,
                       "revision": None, "run_name": "a=b", "extra": {"k": 1}}
    assert type(changes["num_train_epochs"]) is float
    for wrong in ("max_steps=1.5", "learning_rate=fast", "routed_experts=yes please", "eval_limit=all",
                  "cop_base=2", "load_in_4bit=maybe", "extra=[1]", "=3"):
        with pytest.raises(cli.UsageError):
            cli.parse_settings([wrong])


def test_presets_like_and_fast_build_the_config(tmp_path):
    args, cfg = cli.parse(["--preset", "learn", "--set", "max_steps=7", "seed=3"])
    assert cfg == TrainConfig(**PRESETS["learn"][1]).replace(max_steps=7, seed=3)
    assert not args.fast and not args.fresh and args.like is None
    earlier = TrainConfig(**PRESETS["smoke"][1]).replace(learning_rate=3e-3, data_dir=str(tmp_path / "d"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"config": earlier.__dict__ | {"gone_field": 1}}))
    _, again = cli.parse(["--like", str(tmp_path / "run"), "--set", "max_steps=2"], checks=False)
    assert again == earlier.replace(run_name="smoke-again", max_steps=2)
    args, fast = cli.parse(["--fast", "--like", str(tmp_path / "run" / "metrics.json"), "--fast-features",
                            "packing", "--checkpointing", "moe:2", "--any-version"], checks=False)
    assert fast.run_name == "smoke-fast" and args.fast_features == "packing" and args.checkpointing == "moe:2"
    assert args.any_version
    with pytest.raises(cli.UsageError, match="prepared data is gone"):  # --like reuses that run's data
        cli.check(args, fast)


def test_cuda_and_model_size_are_read_without_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not cli.cuda_present()
    assert cli.runs_on_cpu(TINY_MODEL) and not cli.runs_on_cpu("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16")
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "model.safetensors").write_bytes(b"0" * 1000)
    assert cli.runs_on_cpu(str(tmp_path / "small")) and not cli.runs_on_cpu(str(tmp_path / "nothing-here"))


def test_plan_is_a_few_lines_not_a_config_dump():
    args, cfg = cli.parse(["--preset", "smoke"], checks=False)
    lines = cli.plan(args, cfg)
    assert 4 <= len(lines) <= 6 and lines[0].startswith("Run smoke (preset smoke")
    assert "12 steps" in lines[2] and "{" not in "".join(lines)


def test_cpu_kernel_warnings_become_one_note(monkeypatch):
    """transformers' "falling back to its reference PyTorch implementation" is about GPUs: on a CPU it is dropped
    inside quiet_cpu_fallbacks (the plan prints CPU_NOTE once), and kept outside it."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    loggers = [logging.getLogger(name) for name, _ in cli.CPU_NOISE]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with cli.quiet_cpu_fallbacks():
            loggers[0].warning("`causal_conv1d_fn` is falling back to its reference PyTorch implementation because "
                               "`causal-conv1d` is not installed.")
            loggers[1].warning("Failed to load CPU gemm_4bit_forward from kernels-community: no module")
            loggers[0].warning("something else")
        loggers[0].warning("`causal_conv1d_fn` is falling back to its reference PyTorch implementation")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [r.getMessage()[:20] for r in seen] == ["something else", "`causal_conv1d_fn` i"]
    args, cfg = cli.parse(["--preset", "smoke"], checks=False)
    assert cli.plan(args, cfg)[-1].strip() == cli.CPU_NOTE


def test_every_train_option_the_docs_name_exists(repo):
    """Commands in the README, configs, notebooks and scripts name real flags and TrainConfig fields: a renamed or
    removed option fails here, not on a reader's machine."""
    tracked = subprocess.run(["git", "ls-files", "*.md", "*.ipynb", "*.py", "*.sh", "*.yaml"], cwd=repo,
                             capture_output=True, text=True, check=True).stdout.split()
    flags = {option for action in cli.build_parser()._actions for option in action.option_strings}
    fields, stale, commands = set(field_names()), [], 0
    for name in tracked:
        text = (repo / name).read_text(errors="ignore")
        for found in re.finditer(r"--set((?:\s+[a-z_0-9]+=[^\s`'\"]*)+)", text):
            keys = re.findall(r"([a-z_0-9]+)=", found.group(1))
            stale += [(name, key) for key in keys if key not in fields | {"key"}]  # "key=value": the usage line
        for found in re.finditer(r"train\.py((?:[ \t]+[^\s`'\"|]+)+)", text):
            commands += 1
            stale += [(name, flag) for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", found.group(1))
                      if flag not in flags]
    assert commands > 20 and stale == [], stale
