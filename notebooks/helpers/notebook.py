"""Small conveniences for running the notebooks anywhere: settings, Colab, offline mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
TINY_MODEL_DIR = REPO_ROOT / "outputs" / "tiny-nemotron"


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
    if default is None and raw.lower() in ("", "none", "null"):
        return None
    if isinstance(default, (list, dict)):
        return json.loads(raw)
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
