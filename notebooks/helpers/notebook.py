"""Running the notebooks anywhere (all four, 01-04): parameters from environment variables (`setting`), paths that
work from any folder (`resolve_path`), and the set-up cell's `setup()` (on Colab it installs the locked stack the
runtime lacks: recipe/colab.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import REPO_ROOT


def setting(name: str, default):
    """A notebook parameter: the environment variable `name` in the default's type (`MAX_STEPS=20` gives the int
    20, `WITH_EXPLANATION=false` False; JSON or text where the default is None, a list or a dict), else `default`."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    if isinstance(default, bool):
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{name}={raw!r}: expected true/false.")
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected {'an integer' if isinstance(default, int) else 'a number'} "
                             f"(default {default}).") from None
    if default is None or isinstance(default, (list, dict)):
        if raw.lower() in ("", "none", "null"):
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def resolve_path(path: str | Path) -> str:
    """A repo-relative path (like 'data/sample') made absolute, so notebooks work from any folder; Hub ids unchanged.
    Paths under outputs/ (like the offline model, outputs/tiny-nemotron) are the repository's even before they exist."""
    if Path(path).is_absolute() or str(path) == "hub":
        return str(path)
    found = [base / path for base in (Path.cwd(), REPO_ROOT) if (base / path).exists()]
    if not found and Path(path).parts[:1] == ("outputs",):  # what the notebooks make: the repository's, to come
        found = [REPO_ROOT / path]
    return str(found[0].resolve()) if found else str(path)


def setup() -> None:
    """The set-up cell's work: on Colab install the locked stack the runtime lacks (recipe/colab.py: plumbing, not
    the lesson); everywhere check the GPU."""
    from recipe import colab

    colab.setup()
