"""Shared fixtures: offline mode, the repo's `helpers` on sys.path, and a tiny model built once."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
sys.path.insert(0, str(REPO))  # train.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py as a module, run with one intra-op thread: the tiny model's ops are microseconds long,
    and on a busy 2-core CI machine spinning OpenMP threads made each step ~80x slower (4 s instead of 0.05 s)."""
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)
