"""The notebooks' set-up cell on Colab: install the locked stack the runtime lacks (called by helpers.notebook.setup).

Environment plumbing, not part of the lesson: it reads the committed locks, installs what differs (hash-checked,
no index named), keeps the runtime's torch when every locked package accepts it, and stops on a GPU too small for
every mode. Outside Colab it installs nothing and only reports what differs from the lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIN_GPU_GIB = 22  # the smallest mode (routed experts in 4-bit) holds 19.6 GiB of weights
RUNTIME_OWN = {"jupyterlab", "ipykernel", "ipywidgets", "papermill"}  # Colab's own Jupyter stays as it is
COMPANIONS = {"torchvision", "torchaudio", "triton", "xformers"}  # built for one torch: kept with the runtime's
KERNELS = {"mamba-ssm", "causal-conv1d"}  # source builds against the installed torch
DIRECT = "nemotron-medmcqa (pyproject.toml)"  # how the locks' `# via` comments name this project
OFFLINE = "MODEL_ID=outputs/tiny-nemotron and DATA_SOURCE=data/sample"


def in_colab() -> bool:
    """True on Google Colab, or when NOTEBOOK_SETUP=colab asks to act as there."""
    forced = os.environ.get("NOTEBOOK_SETUP") == "colab"
    return forced or "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def read_lock(path) -> dict:
    """`{name: {"version", "via", "text"}}` for the pins of a `uv pip compile` lock whose markers hold on this
    machine (a name can have one pin per Python version); `text` is the pin's entry, with its hashes."""
    from packaging.markers import Marker

    pins, pin = {}, {}
    for line in Path(path).read_text().splitlines():
        if line[:1].isalnum():
            spec, _, marker = line.rstrip(" \\").partition(";")
            name, version = (s.strip() for s in spec.split("=="))
            pin = {"version": version, "via": set(), "text": line + "\n"}
            if not marker.strip() or Marker(marker).evaluate():
                pins[name] = pin
        elif line.lstrip().startswith("--hash"):
            pin["text"] += line + "\n"
        elif line.lstrip().startswith("#") and line.strip(" #") != "via" and pin:
            pin["via"].add(line.strip(" #").removeprefix("via "))
    return pins


def plan(lock: dict, have: dict) -> tuple[list, set, set]:
    """(to install, needed, torch's family). Needed: the pins of the project's direct dependencies but Jupyter's, and
    of what they depend on (the `# via` comments). To install: those not at their version. The family: torch, the
    pins held only for it (CUDA libraries, sympy...) and the runtime's COMPANIONS."""
    from packaging.version import Version

    need = {n for n, pin in lock.items() if DIRECT in pin["via"]} - RUNTIME_OWN
    while grown := {n for n in lock.keys() - need if lock[n]["via"] & need}:
        need |= grown
    family = {"torch"} | (COMPANIONS & need & have.keys())
    while grown := {n for n in need - family if lock[n]["via"] and lock[n]["via"] <= family}:
        family |= grown
    todo = sorted(n for n in need if Version(Version(have.get(n, "0")).public) != Version(lock[n]["version"]))
    return todo, need, family


def torch_requirements(names) -> dict:
    """`{package: SpecifierSet}`: the torch requirement that each installed package of `names` declares."""
    from packaging.requirements import Requirement

    reqs = {n: [Requirement(r) for r in metadata.requires(n) or []] for n in set(names) & installed().keys()}
    return {n: r.specifier for n, rs in reqs.items() for r in rs
            if r.name == "torch" and (r.marker is None or r.marker.evaluate({"extra": ""}))}


def installed() -> dict:
    """`{name: version}` of the installed distributions (the first found of each), named as the locks name them."""
    dists = reversed(list(metadata.distributions()))
    return {d.metadata["Name"].lower().replace("_", "-").replace(".", "-"): d.version for d in dists}


def gpu_info():
    """`(name, GiB)` of the first CUDA GPU, from nvidia-smi (torch is not imported yet), or None."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout.splitlines()[0].rsplit(",", 1)
        return smi[0].strip(), int(smi[1]) / 1024
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def pip_install(lock: dict, names, *options) -> str:
    """pip-installs `names` from a copy of their lock entries (exact versions, hashes checked): '' or pip's error."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.writelines(lock[n]["text"] for n in names)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", *options,
                          "-r", f.name], capture_output=True, text=True)
    return "" if run.returncode == 0 else (run.stdout + run.stderr)[-3000:]


def setup() -> None:
    """The set-up cell: stop on a GPU too small for any mode, then install (Colab) or only check (elsewhere)."""
    gpu = gpu_info()
    if gpu and gpu[1] < MIN_GPU_GIB:
        raise SystemExit(f"This GPU ({gpu[0]}, {gpu[1]:.1f} GiB) is too small for every mode of this tutorial: the "
                         f"4-bit base alone needs 19.6 GiB of weights. Use a GPU with {MIN_GPU_GIB}+ GiB (Colab: "
                         f"Runtime > Change runtime type: L4 or A100), or a CPU runtime with {OFFLINE}.")
    device = f"GPU: {gpu[0]}, {gpu[1]:.1f} GiB." if gpu else (
        f"No CUDA GPU: the notebooks run on the offline tiny model; set {OFFLINE} (environment or parameters cell).")
    lock, have = read_lock(REPO_ROOT / ("requirements-cuda.lock" if gpu else "requirements.lock")), installed()
    if not in_colab():
        if todo := plan(lock, have)[0]:
            print(f"{len(todo)} packages differ from the lock (" + ", ".join(f"{n} {have.get(n, 'missing')}, locked "
                  f"{lock[n]['version']}" for n in todo[:4]) + ", ..." * (len(todo) > 4) + "): see README, Set up.")
        return None if gpu else print(device)
    stale = {d.lower() for m, ds in metadata.packages_distributions().items() if m in sys.modules and m[0] != "_"
             for d in ds}  # what this Python imported already (but .pth shims such as _distutils_hack)
    start, (todo, need, family) = time.time(), plan(lock, have)
    if (done := [n for n in todo if n not in family | KERNELS]) and (error := pip_install(lock, done)):
        raise SystemExit(f"pip could not install the locked packages:\n{error}")
    refuse = sorted(n for n, spec in torch_requirements(need - family).items()
                    if "torch" not in have or not spec.contains(have["torch"], prereleases=True))
    if (refuse or "torch" not in have) and (swap := [n for n in todo if n in family]):
        if error := pip_install(lock, swap):
            raise SystemExit(f"pip could not install the locked torch:\n{error}")
        done += swap
    without = ("without them transformers runs its reference Mamba code: ~10x slower, and the full model runs out of "
               "memory above ~1k tokens per step (the offline tiny model is fine)")
    if kernels := [n for n in todo if n in KERNELS]:
        skip = os.environ.get("INSTALL_KERNELS", "true").lower() in ("0", "false", "no")
        print("The Mamba-2 kernels (mamba-ssm, causal-conv1d): " + ("skipped (INSTALL_KERNELS=false)" if skip else
              "installing a prebuilt wheel where their release has one for this torch/CUDA/Python, else building from "
              "source: expect 20+ minutes on Colab's CPUs (INSTALL_KERNELS=false skips them)") + f"; {without}.")
        if not skip and (error := pip_install(lock, kernels, "--no-build-isolation")):
            print(f"The Mamba kernels did not install ({error[-500:]}); {without}.")
        done += [] if skip or error else kernels
    own = sorted(n for n in done if DIRECT in lock[n]["via"])  # the project's direct dependencies
    names = ", ".join(f"{n} {lock[n]['version']}" for n in own) + f" and {len(done) - len(own)} of their dependencies"
    torch = "the runtime's own, which the locked packages accept" if not set(done) & family else "the lock's: " + (
        f"{', '.join(refuse)} did not accept {have['torch']}" if refuse else "the runtime had none")
    print(f"Set-up of {REPO_ROOT}: " + (f"installed {len(done)} locked packages in {time.time() - start:.0f} s "
          f"({names})" if done else "every locked package was already installed")
          + f"; torch {installed().get('torch')} ({torch}). {device}")
    if restart := sorted(set(done) & (stale | {"torch"})):  # a new torch: restart even if not imported yet
        print(f"Restart the runtime (Colab's Runtime menu) and run this cell again, so that Python loads the "
              f"new {', '.join(restart)}.")
