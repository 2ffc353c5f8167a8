"""A run with both transitions (attention sparsify, Monarch densify), interrupted before, between and after
them and resumed, reproduces the uninterrupted run's per-step losses exactly (CPU)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, small_listops

STEPS = 24
ARGS = ["--task", "lra-listops", "--train_steps", str(STEPS), "--max_dense_steps", "8", "--random", "3",
        "--no_progress", "--backend", "torch",
        "--set=model.mlp=\"monarch\"", "--set=model.nblocks=2", "--set=sparsity.s2d_fraction=0.625",
        "--set=model.num_layers=2", "--set=model.dim=16", "--set=model.hidden_dim=32", "--set=model.head_dim=8",
        "--set=training.batch_size=4", "--set=training.eval_frequency=4", "--set=training.warmup_steps=2",
        "--set=dataset.max_seq_len=64", "--set=sparsity.block_size=16", "--set=sparsity.density=0.2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_listops(tmp_path_factory.mktemp("listops"), 40, 8, 8, seed=2)


def train(root, data, name, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *ARGS, "--data_dir", str(data), "--root",
                        str(root), "--name", name, *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(root, name):
    return (root / "logs" / "log-3" / "lra-listops" / f"{name}.losses.tsv").read_text().splitlines()


def summary(root, name):
    s = json.loads((root / "logs" / "log-3" / "lra-listops" / f"{name}.summary.json").read_text())
    return {k: v for k, v in s.items() if "per_sec" not in k and "memory" not in k and k != "name"}


@pytest.mark.slow
def test_resume_before_between_after_transitions(tmp_path, data):
    train(tmp_path, data, "full")
    full = losses(tmp_path, "full")
    assert len(full) == STEPS
    ref = summary(tmp_path, "full")
    assert ref["transition_step"] == 8 and ref["densify_step"] == 15
    for stop in (4, 12, 20):  # before both transitions, between them, after both
        name = f"stop{stop}"
        train(tmp_path, data, name, "--stop_at", str(stop))
        assert len(losses(tmp_path, name)) == stop
        train(tmp_path, data, name, "--resume")
        assert losses(tmp_path, name) == full, f"resumed at {stop}"
        assert summary(tmp_path, name) == ref
