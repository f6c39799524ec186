"""Rehearse the notebooks' set-up cell as on a fresh Colab runtime, then run notebooks 01-03 offline; record it.

What it does, each step timed, in a temporary folder:
1. a copy of this working tree (tracked and untracked files, not the git-ignored ones such as .venv/ and outputs/);
2. a fresh virtual environment of Python 3.12 (Colab's), with pip, and with what a Colab runtime already has in
   place of the lock's pins: another torch than the lock's (`--torch`, default torch==2.10.0), ipykernel and
   papermill, none of them pinned;
3. the set-up cell's code, taken from notebook 02, run as on Colab (google.colab imported, in the folder that holds
   the clone, NOTEBOOK_SETUP=colab): `helpers.notebook.setup()` installs what the runtime lacks from the committed
   lock; then the same cell once more (nothing left to install);
4. whether every pin the notebooks need now has its locked version, and which torch they run;
5. notebooks 01, 02 and 03 through papermill, offline, with the environment variables the set-up names for a CPU
   (MODEL_ID=outputs/tiny-nemotron, DATA_SOURCE=data/sample) and tests/test_notebooks.py's short training run.

The JSON record (pass/fail and duration per step, torch before and after, the versions installed, Python, date,
machine) goes to benchmarks/results/colab/ unless --out says otherwise. uv makes the environment; extra options for
installing the preinstalled torch (another index, say) come from --torch-pip-args or COLAB_TORCH_PIP_ARGS.

    python scripts/check_colab_setup.py --python python3.12 [--torch torch==2.10.0] [--skip-notebooks]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_data_exploration", "02_model_loading", "03_training"]
OFFLINE = {"MODEL_ID": "outputs/tiny-nemotron", "DATA_SOURCE": "data/sample", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
# tests/test_notebooks.py's short run: 4 steps of 4 rows, and notebook 01's shorter examples
# what plan() still finds to install once the set-up has run: only torch's family may differ (the runtime's torch)
LOCK_CHECK = """import json, sys
sys.path.insert(0, "notebooks")
from helpers import notebook as nb
todo, need, family = nb.plan(nb.read_lock("requirements.lock"), nb.installed())
print(json.dumps({"differ": todo, "differ_outside_torch_family": sorted(set(todo) - family)}))
sys.exit(bool(set(todo) - family))
"""
SHORT_RUN = {"MAX_LENGTH": "512", "RUN_NAME": "nb03", "MAX_STEPS": "4", "BATCH_SIZE": "4", "GRAD_ACCUM": "1",
             "LEARNING_RATE": "1e-3", "SAVE_STEPS": "2", "LOGGING_STEPS": "1", "EVAL_BATCH_SIZE": "8"}


def run(cmd, steps, name, timeout=1800, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`, time it, and append {name, ok, seconds, output tail} to `steps`."""
    start = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        done = subprocess.CompletedProcess(cmd, 124, str(e.stdout or ""), f"timed out after {timeout} s")
    steps.append({"step": name, "ok": done.returncode == 0, "seconds": round(time.time() - start, 1),
                  "output_tail": (done.stdout + done.stderr)[-2500:]})
    print(f"[{'ok' if done.returncode == 0 else 'FAILED'}] {name}: {steps[-1]['seconds']} s", flush=True)
    return done


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it: tracked and untracked files, without the ignored ones."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


def packages(python: Path) -> dict:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out.stdout or "[]")}


def setup_cell(repo: Path) -> str:
    """The code of notebook 02's set-up cell (the one that calls notebook.setup())."""
    cells = json.loads((repo / "notebooks" / "02_model_loading.ipynb").read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and "setup()" in "".join(c["source"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="python3.12", help="the Python for the fresh environment (3.12: Colab's)")
    parser.add_argument("--torch", default="torch==2.10.0", help="the torch the runtime has before the set-up")
    parser.add_argument("--torch-pip-args", default=os.environ.get("COLAB_TORCH_PIP_ARGS", ""),
                        help="extra options for installing that torch (e.g. another index)")
    parser.add_argument("--out", type=Path, help="the JSON record (default: benchmarks/results/colab/<date>_...json)")
    parser.add_argument("--skip-notebooks", action="store_true", help="stop after the set-up cell")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="colab-rehearsal-"))
    repo, venv, steps, start = root / "nemotron-medmcqa", root / "venv", [], time.time()
    python = venv / "bin" / "python"
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    t = time.time()
    copy_tree(repo)
    steps.append({"step": "copy the working tree", "ok": True, "seconds": round(time.time() - t, 1)})
    run(["uv", "venv", "--seed", "--python", args.python, str(venv)], steps, "fresh Python environment (uv; pip in it)")
    run(["uv", "pip", "install", "--python", str(python), args.torch, "ipykernel", "papermill",
         *shlex.split(args.torch_pip_args)], steps, f"preinstall the runtime's own: {args.torch}, ipykernel, papermill")
    before = packages(python)

    # As on Colab: the cell runs in the folder above the clone, with google.colab imported and REPO_URL set (the
    # clone is there already, so the cell does not fetch it again).
    cell_env = {**env, "NOTEBOOK_SETUP": "colab", "REPO_URL": str(repo)}
    cell = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n" + setup_cell(repo)
    first = run([str(python), "-c", cell], steps, "set-up cell, first run (installs)", cwd=root, env=cell_env)
    after = packages(python)
    again = run([str(python), "-c", cell], steps, "set-up cell, second run (nothing to install)", cwd=root,
                env=cell_env)
    check = run([str(python), "-c", LOCK_CHECK], steps, "needed pins outside torch's family have their locked versions",
                cwd=repo, env=env)
    imports = run([str(python), "-c", "import torch, transformers, trl, peft, datasets, accelerate, matplotlib;"
                   "print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__)"],
                  steps, "import the stack", cwd=repo, env=env)

    if not args.skip_notebooks:
        nb_env = {**env, **OFFLINE, **SHORT_RUN, "NOTEBOOK_SETUP": "colab", "DATA_DIR": str(root / "formatted"),
                  "OUTPUT_ROOT": str(root / "outputs")}
        for name in NOTEBOOKS:
            run([str(python), "-m", "papermill", f"{name}.ipynb", str(root / f"{name}.out.ipynb"), "-k", "python3",
                 "--no-progress-bar"], steps, f"notebook {name} (papermill, offline)", cwd=repo / "notebooks",
                env=nb_env)

    changed = {n: [before.get(n), v] for n, v in sorted(after.items()) if before.get(n) != v}
    record = {
        "what": "the notebooks' set-up cell on a fresh Colab-like runtime (NOTEBOOK_SETUP=colab), then notebooks "
                "01-03 offline on the tiny model",
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU machine, " + ("no GPU" if shutil.which("nvidia-smi") is None else "GPU"),
        "python": subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True).stdout.strip(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "code": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip() + " (the working tree, copied)",
        "preinstalled_torch_spec": args.torch,
        "torch_pip_args_given": bool(args.torch_pip_args),
        "torch_before": before.get("torch"), "torch_after": after.get("torch"),
        "stack_imported": imports.stdout.strip(),
        "installed_by_setup": changed,
        "setup_output_first_run": first.stdout.strip()[-3000:] + first.stderr.strip()[-2000:],
        "setup_output_second_run": again.stdout.strip()[-2000:] + again.stderr.strip()[-2000:],
        "lock_check": check.stdout.strip(),
        "steps": steps,
        "passed": all(s["ok"] for s in steps),
        "total_seconds": round(time.time() - start, 1),
        "host_python": platform.python_version(),
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # other jobs on the machine
        "note": "durations include pip fetching the locked wheels (from its cache where earlier runs left them) "
                "and other jobs sharing the CPUs",
    }
    out = args.out or REPO / "benchmarks" / "results" / "colab" / (
        f"{record['date']}_cpu_py{record['python']}_torch{(before.get('torch') or 'none').replace('+', '-')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'PASSED' if record['passed'] else 'FAILED'} in {record['total_seconds']} s; record: {out}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
