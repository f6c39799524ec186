"""train.py's command line: flags -> a checked `TrainConfig`, and mistakes -> one line on stderr, exit code 2.

Everything here answers before anything heavy is imported (no torch, transformers or datasets): `--help`, a
misspelt setting, a missing folder, the real model on a machine without a GPU. Each mistake is one or two lines,
`error: <what is wrong>` and `fix: <what to type>`, with no traceback; `--debug` shows the traceback of errors
raised while the pipeline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path

from helpers.config import DEFAULT_MODEL_ID, TINY_MODEL, TrainConfig
from helpers.notebook import resolve_path
from recipe.presets import PRESETS, config_of_run, field_names

PROG = "train.py"
DEFAULT_PRESET = "full"
REPO_ROOT = Path(__file__).resolve().parents[1]
EXIT_USAGE = 2
SMALL_MODEL_GIB = 1.0  # weights below this train on a CPU (the tiny offline model has ~2 MB)
FAST_HELP = ("opt-in fast engine (fastpath/README.md): same LoRA, same loss, ~2.5x faster on a CUDA GPU with the "
             "Mamba kernels")
EXAMPLES = """\
Fine-tune Nemotron-3-Nano-30B-A3B on MedMCQA with LoRA: notebooks 01-03 in one command. It prepares the data,
scores the base model, trains LoRA (resuming from the last checkpoint), scores the adapter, reloads it onto a
fresh base and merges it (scoring both), and writes a run record and a short report under outputs/.

  python train.py --preset smoke          first contact: the whole pipeline, offline, on a CPU (~25 s)
  python train.py --preset learn          the tiny model learns a synthetic rule: accuracy 25% -> ~100%
  python train.py                         the real model on full MedMCQA (preset full: a CUDA GPU)
  python train.py --set max_steps=500 learning_rate=1e-4
  python train.py --fast --like outputs/runs/nemotron-medmcqa-lora   # notebook 03's run on the fast engine
  accelerate launch --config_file configs/ddp.yaml --num_processes 2 train.py   # 2 GPUs (configs/README.md)
"""


class UsageError(ValueError):
    """A mistake in the command: `message` says what is wrong, `fix` what to type instead."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


def fail(message: str, fix: str = "") -> typing.NoReturn:
    """Print `error: message` (and `fix: ...`) on stderr and exit with code 2."""
    print(f"error: {message}" + (f"\n  fix: {fix}" if fix else ""), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------- the flags

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own mistakes (unknown flag, missing value): one line, no usage dump
        fail(message, f"python {PROG} --help lists every flag")


def _field_comments() -> dict[str, str]:
    """The comment after each TrainConfig field in helpers/config.py (read as text)."""
    source = Path(sys.modules[TrainConfig.__module__].__file__).read_text(encoding="utf-8")
    return dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.M))


def _settings_epilog() -> str:
    comments, default = _field_comments(), TrainConfig()
    lines = ["settings (--set KEY=VALUE ...; the defaults below are those of the full preset, which the others",
             "change; true/false for yes-no, none for an empty optional value):"]
    for name in field_names():
        value = getattr(default, name)
        shown = _show(value)
        note = f"  # {comments[name]}" if name in comments else ""
        lines.append(f"  {name}={shown}{note}")
    return "\n".join(lines)


def _show(value) -> str:
    """A value as it would be typed after --set KEY=."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value)
    value = str(value)
    root = str(REPO_ROOT) + os.sep
    return value[len(root):] if value.startswith(root) else value  # repository paths, relative


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<6} {description}" for name, (description, _) in PRESETS.items())
    p = _Parser(prog=PROG, description=EXAMPLES, epilog=_settings_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    start = p.add_argument_group("what to train", f"presets:\n{presets}")
    start.add_argument("--preset", metavar="NAME",
                       help=f"start from preset NAME (default: {DEFAULT_PRESET}, the real 59 GB model on a CUDA GPU)")
    start.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="change settings of the preset, e.g. --set max_steps=100 routed_experts=true "
                            "(every KEY and its default are listed at the end)")
    start.add_argument("--like", metavar="RUN",
                       help="start from the config and prepared data of an earlier run (its run folder or "
                            "metrics.json, e.g. outputs/runs/nemotron-medmcqa-lora) instead of a preset; the new run "
                            "is named RUN-fast with --fast, else RUN-again")
    steps = p.add_argument_group("steps")
    steps.add_argument("--fresh", action="store_true", help="delete this run's checkpoints and train from step 0")
    steps.add_argument("--skip-base-eval", action="store_true", help="do not score the model before training")
    steps.add_argument("--save-merged", action="store_true",
                       help="also save the merged model (LoRA folded into the weights; as large as the model)")
    fast = p.add_argument_group("fast engine")
    fast.add_argument("--fast", action="store_true", help=FAST_HELP)
    fast.add_argument("--fast-features", metavar="LIST",
                      help="with --fast: the comma-separated pieces to use (default: all of them)")
    fast.add_argument("--checkpointing", metavar="POLICY",
                      help="with --fast: which blocks recompute activations: all (default), none, mamba,moe, "
                           "moe:N, ...")
    fast.add_argument("--any-version", action="store_true",
                      help="with --fast: skip the fast engine's check of the library versions it was tested with")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    return p


# ---------------------------------------------------------------- --set KEY=VALUE

def _parse_value(name: str, kind, text: str):
    """`text` as a value of TrainConfig field `name`, whose annotation is `kind`."""
    default = _show(getattr(TrainConfig(), name))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        kind = options[0]
    expect = {int: "an integer", float: "a number", bool: "true or false", dict: "a JSON object"}.get(kind)
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (KeyError, ValueError):
        raise UsageError(f"--set {name}={text}: {name} takes {expect}, not {text!r} (default: {default})") from None
    return text


CHOICES = {"load_in_4bit": ("auto", "true", "false"), "cop_base": (0, 1, None)}


def parse_settings(items: list[str]) -> dict:
    """`["max_steps=100", "seed=1"]` -> `{"max_steps": 100, "seed": 1}`, each value checked against its field."""
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}", "--set max_steps=100 (no spaces around =)")
        if name not in hints:
            close = difflib.get_close_matches(name, field_names(), n=3, cutoff=0.6)
            guess = f"did you mean {' or '.join(close)}? " if close else ""
            raise UsageError(f"unknown setting {name!r}; {guess}python {PROG} --help lists every setting")
        value = _parse_value(name, hints[name], text)
        if name in CHOICES and value not in CHOICES[name]:
            allowed = ", ".join(_show(c) for c in CHOICES[name])
            raise UsageError(f"--set {name}={text}: choose one of {allowed}", f"--set {name}={_show(CHOICES[name][0])}")
        changes[name] = value
    return changes


# ---------------------------------------------------------------- flags -> TrainConfig

def read_run_record(run: str) -> dict:
    """The metrics.json of an earlier run (its folder or the file itself), read without importing torch."""
    path = Path(resolve_path(run))
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        runs = Path(TrainConfig().output_root) / "runs"
        finished = sorted(p.parent.name for p in runs.glob("*/metrics.json"))
        more = f" and {len(finished) - 5} more" if len(finished) > 5 else ""
        hint = f"runs in outputs/runs: {', '.join(finished[:5])}{more}" if finished else "e.g. outputs/runs/smoke"
        raise UsageError(f"--like {run}: no run record there; give a run folder that holds metrics.json ({hint})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UsageError(f"--like {run}: {path} is not a run record ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UsageError(f"--like {run}: {path} has no 'config' (is it a run record written by train.py?)")
    return record


def config_from(args) -> TrainConfig:
    """The TrainConfig the flags ask for: a preset (or an earlier run's config) with --set changes."""
    changes = parse_settings(args.set)
    if args.like:
        if args.preset:
            raise UsageError("--like and --preset both choose where to start", "keep one of them")
        record = read_run_record(args.like)
        suffix = "-fast" if args.fast else "-again"
        return config_of_run(record, **{"run_name": record["config"].get("run_name", "run") + suffix, **changes})
    name = args.preset or DEFAULT_PRESET
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.5)
        raise UsageError(f"unknown preset {name!r}" + (f"; did you mean {close[0]}?" if close else ""),
                         f"--preset {' | '.join(PRESETS)}")
    return TrainConfig(**PRESETS[name][1]).replace(**changes)


# ---------------------------------------------------------------- checks before anything heavy

def cuda_present() -> bool:
    """Could this machine run CUDA? Answered from the driver's files, without importing torch.

    False is certain (no NVIDIA or ROCm driver, or CUDA_VISIBLE_DEVICES hides every GPU); True only means a
    driver is there: the pre-flight checks then ask torch itself.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return (Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))
            or Path("/dev/kfd").exists() or shutil.which("nvidia-smi") is not None)


def runs_on_cpu(model_id: str) -> bool:
    """True for models small enough to train on a CPU: the tiny offline model, or a local folder with < 1 GiB
    of weights. A Hub id counts as large (its size is not known without a download)."""
    folder = Path(resolve_path(model_id))
    if folder.resolve() == Path(TINY_MODEL).resolve():
        return True  # built on first use
    if not folder.is_dir():
        return False
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)]
    return bool(weights) and sum(p.stat().st_size for p in weights) < SMALL_MODEL_GIB * 2**30


def check(args, cfg: TrainConfig) -> None:
    """Refuse, before anything heavy, what cannot work: raises UsageError."""
    if (args.fast_features or args.checkpointing or args.any_version) and not args.fast:
        used = [f for f, v in (("--fast-features", args.fast_features), ("--checkpointing", args.checkpointing),
                               ("--any-version", args.any_version)) if v]
        raise UsageError(f"{' and '.join(used)} {'is' if len(used) == 1 else 'are'} for the fast engine only",
                         "add --fast, or drop " + " ".join(used))
    if args.like:
        if not (Path(cfg.data_dir) / "manifest.json").is_file():
            raise UsageError(f"--like {args.like}: its prepared data is gone ({_show(cfg.data_dir)})",
                             "rerun that run's command to prepare it again, or start from a preset")
    elif cfg.data_source not in ("hub", "synthetic") and not Path(resolve_path(cfg.data_source)).is_dir():
        raise UsageError(f"data source {cfg.data_source!r} is not a folder",
                         "--set data_source=FOLDER (train/validation .jsonl, .json or .parquet files), "
                         "data_source=hub (MedMCQA from the Hugging Face Hub) or data_source=synthetic")
    if args.fast and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # distributed.fsdp_enabled()
        raise UsageError("--fast is not verified under FSDP (configs/fsdp.yaml): the fast engine sets each block's "
                         "activation checkpointing itself, where FSDP checkpoints too",
                         "drop --fast under FSDP, or use configs/ddp.yaml on GPUs that hold the whole model")
    cuda = cuda_present()
    if not cuda and not runs_on_cpu(cfg.model_id):
        what = (f"the {args.preset or DEFAULT_PRESET} preset trains the real model ({cfg.model_id}, 59 GB), which"
                if cfg.model_id == DEFAULT_MODEL_ID else f"model {cfg.model_id} is not a small local model: it")
        raise UsageError(f"{what} needs a CUDA GPU; this machine has none",
                         f"python {PROG} --preset smoke (the whole pipeline on a tiny offline model, ~25 s) "
                         "or --preset learn (the tiny model learns a synthetic rule)")
    if args.fast and not cuda:
        raise UsageError("--fast needs a CUDA GPU with the Mamba kernels (mamba_ssm, causal_conv1d); this machine "
                         "has no CUDA GPU", "drop --fast: the standard path runs anywhere")


def parse(argv=None, checks: bool = True):
    """`(args, cfg)` from the command line; a mistake prints one or two lines and exits with code 2.

    `checks=False` skips the checks of folders and of the machine (to build a config for another machine).
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from(args)
        if checks:
            check(args, cfg)
    except UsageError as error:
        fail(str(error), error.fix)
    except ValueError as error:  # TrainConfig's own checks
        fail(str(error), f"python {PROG} --help lists every setting")
    return args, cfg


# ---------------------------------------------------------------- what will run

def plan(args, cfg: TrainConfig) -> list[str]:
    """A few lines saying what this command will do (every setting goes into the run record)."""
    if args.like:
        start = f"like {args.like}"
    else:
        name = args.preset or DEFAULT_PRESET
        start = f"preset {name}: {PRESETS[name][0]}"
    source = {"hub": "MedMCQA from the Hub", "synthetic": "the synthetic code-word task"}.get(cfg.data_source,
                                                                                            cfg.data_source)
    length = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epoch(s)"
    lora = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" + (" + routed experts" if cfg.routed_experts else "")
    rows = (f"{cfg.per_device_train_batch_size} rows x {cfg.gradient_accumulation_steps} accumulation"
            + (" (folded into one packed micro-batch by --fast)" if args.fast else ""))
    steps = ["score base" if not args.skip_base_eval else None, "train", "score adapter", "reload + merge",
             "save merged" if args.save_merged else None]
    return [f"Run {cfg.run_name} ({start})",
            f"  model {_show(cfg.model_id)}; data {_show(source)} (prepared in {_show(cfg.data_dir)})",
            f"  {length}, {rows}, learning rate {cfg.learning_rate:g}, {lora}, max_length {cfg.max_length}",
            f"  steps: {' -> '.join(s for s in steps if s)}"
            + ("; --fresh: old checkpoints deleted" if args.fresh else "") + (" [fast engine]" if args.fast else ""),
            f"  every setting: {_show(cfg.run_dir / 'metrics.json')} when done (python {PROG} --help lists them)"
            ] + ([f"  {CPU_NOTE}"] if not cuda_present() else [])


# ---------------------------------------------------------------- errors while running

def _raised_in_repository(error: BaseException) -> bool:
    """True when the innermost frame of `error` is this repository's code (not a library's)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(REPO_ROOT) and not path.is_relative_to(REPO_ROOT / ".venv")


def user_message(error: BaseException) -> str | None:
    """The message to show for an error a user can fix (None: a bug, which keeps its traceback).

    User-facing: the fast engine's refusals, failed pre-flight checks, and the ValueErrors / FileNotFoundErrors
    this repository raises on purpose (their messages name the problem and the fix).
    """
    fastpath = sys.modules.get("fastpath")
    refused = getattr(fastpath, "Refused", None)
    if isinstance(refused, type) and isinstance(error, refused):
        return str(error)
    if isinstance(error, UsageError):
        return str(error) + (f"\n  fix: {error.fix}" if error.fix else "")
    preflight_failed = getattr(sys.modules.get("helpers.model"), "PreflightFailed", None)
    if isinstance(preflight_failed, type) and isinstance(error, preflight_failed):
        return str(error)
    if isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError)) and _raised_in_repository(error):
        return str(error)
    return None


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Inside the block, an error the user can fix ends the program with its message on stderr and exit code 2,
    no traceback; `debug=True` (--debug) lets it raise with its traceback. Other errors always keep theirs.
    Ctrl-C ends it with one line and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted: the same command resumes from the last checkpoint (--fresh starts over)",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as error:
        message = user_message(error)
        if debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None


# ---------------------------------------------------------------- CPU notes

# Warnings that speak of GPU kernels and say nothing on a CPU: (logger, the start of the message).
CPU_NOISE = (
    ("transformers.integrations.hub_kernels", "falling back to its reference PyTorch implementation"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)
CPU_NOTE = "CPU: reference Mamba path (fine for the tiny model)"


class _OnlyOnGpu(logging.Filter):
    """Drops the records of one logger that contain `text`, unless CUDA is in use (on a GPU they matter: the
    reference Mamba path is ~10x slower, and the pre-flight check says so too)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record) -> bool:
        if self.text not in record.getMessage():
            return True
        torch = sys.modules.get("torch")
        return torch is not None and torch.cuda.is_available()


@contextlib.contextmanager
def quiet_cpu_fallbacks():
    """Inside the block, on a CPU, drop the GPU-kernel warnings of CPU_NOISE (`plan` prints CPU_NOTE instead)."""
    filters = [(logging.getLogger(name), _OnlyOnGpu(text)) for name, text in CPU_NOISE]
    for logger, only_on_gpu in filters:
        logger.addFilter(only_on_gpu)
    try:
        yield
    finally:
        for logger, only_on_gpu in filters:
            logger.removeFilter(only_on_gpu)


def main_process() -> bool:
    """True unless this is a non-main process under `accelerate launch` (read from RANK: nothing imported)."""
    return os.environ.get("RANK", "0") == "0"


def announce(args, cfg: TrainConfig) -> None:
    if main_process():
        print("\n".join(plan(args, cfg)), flush=True)

