"""The tutorial's helpers: what would distract from the notebooks' lessons (see each module's docstring)."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])  # the repository: recipe/ (offline stand-ins) lives there
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
