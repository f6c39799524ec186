"""Small conveniences for running the notebooks anywhere: settings, Colab, offline mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def setting(name: str, default):
    """A notebook parameter: the environment variable `name` if set, else `default`.

    The value is converted to the default's type, so `MAX_STEPS=20` in the
    environment becomes the int 20 and `WITH_EXPLANATION=false` the bool False.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{name}={raw!r}: expected true/false.")
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if default is None or isinstance(default, (list, dict)):  # None: a number, null, a list... or text
        if raw.lower() in ("", "none", "null"):
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def in_colab() -> bool:
    """True when running on Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def resolve_path(path: str | Path) -> str:
    """Make a repo-relative path (like 'data/sample') absolute, so notebooks work from any folder.

    Hub ids such as 'nvidia/...' are returned unchanged.
    """
    p = Path(path)
    if p.is_absolute() or str(path) == "hub":
        return str(path)
    for base in (Path.cwd(), REPO_ROOT):
        if (base / p).exists():
            return str((base / p).resolve())
    return str(path)


# The packages a Colab runtime needs, at the versions of requirements-cuda.lock.
COLAB_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "unsloth-zoo",
                  "bitsandbytes", "xformers", "mamba-ssm", "causal-conv1d")


def locked_versions(lock: str | Path = REPO_ROOT / "requirements-cuda.lock", names=COLAB_PACKAGES) -> dict:
    """`{name: version}` for `names`, read from the hash-pinned lock file."""
    versions = {}
    for line in Path(lock).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(";")[0].split("==")
            versions[name.strip()] = version.strip(" \\")
    return {n: versions[n] for n in names if n in versions}


def colab_install(force: bool = False) -> list[str]:
    """On Colab (or with force=True), pip-install the locked versions; elsewhere only say what would run."""
    import importlib.metadata
    import subprocess

    pins = locked_versions()
    missing = []
    for name, version in pins.items():
        try:
            if importlib.metadata.version(name) != version:
                missing.append(f"{name}=={version}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name}=={version}")
    if not missing:
        print("All pinned packages are installed.")
        return []
    if not (in_colab() or force):
        print("Not on Colab: install with the README's set-up instead. Missing or different:", " ".join(missing))
        return missing
    if any(m.startswith(("mamba-ssm", "causal-conv1d")) for m in missing):
        print("Note: mamba-ssm and causal-conv1d compile from source where no prebuilt wheel matches this "
              "runtime's torch/CUDA: this can take 20+ minutes. Without them training is ~10x slower.")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", *missing], check=True)
    if any(m.startswith("torch==") for m in missing):
        print("torch changed: restart the runtime (Runtime > Restart session), then run the notebook again.")
    return missing
