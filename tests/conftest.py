import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The property tests draw the same examples on every run (derived from each test's name), so that CI never
# passes or fails by the luck of a random draw; a failing example is then reproducible as it is.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def small_listops(root: Path, n_train: int = 40, n_val: int = 8, n_test: int = 8, seed: int = 2) -> Path:
    """Generated ListOps (20 < length < 60, processed to N=64) under `root`; returns the processed folder."""
    from sat.data.listops import generate_listops, preprocess_listops

    generate_listops(root / "raw", n_train=n_train, n_val=n_val, n_test=n_test, min_len=20, max_len=60, seed=seed)
    preprocess_listops(root / "raw", root / "data", max_len=64)
    return root / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_run(tmp_path):
    """The tiny training run of tests/fixtures.py (TinyRun: its command line and RunPaths), rooted in tmp_path."""
    from tests.fixtures import TinyRun

    return TinyRun(root=tmp_path)


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from their environment)."""
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = int(pid)
    return ranks
