"""A run with both transitions (attention sparsify, Monarch densify), interrupted before, between and after
them and resumed, reproduces the uninterrupted run's per-step losses exactly (CPU)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, small_listops
from tests.fixtures import TinyRun

STEPS = 24
RUN = TinyRun(seed=3, steps=STEPS, dense_steps=8).replace(sets={
    "model.mlp": '"monarch"', "model.nblocks": 2, "sparsity.s2d_fraction": 0.625, "model.num_layers": 2,
    "training.eval_frequency": 4, "training.warmup_steps": 2, "sparsity.density": 0.2})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_listops(tmp_path_factory.mktemp("listops"), 40, 8, 8, seed=2)


def train(root, data, name, *extra):
    argv = RUN.argv(*extra, root=root, data=data, name=name)
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *argv], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(root, name):
    return RUN.paths(root=root, name=name).losses.read_text().splitlines()


def summary(root, name):
    s = json.loads(RUN.paths(root=root, name=name).summary.read_text())
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
