"""Every LRA task trains from its raw-format fixture: preprocess -> main_train (20 steps, small model, with
the switch forced midway so that both phases run) -> main_inference --mode eval."""

import json
import subprocess
import sys

import pytest

from sat.data.listops import generate_listops, preprocess_listops
from sat.data.prepare.cifar10 import preprocess_cifar10
from sat.data.prepare.pathfinder import preprocess_pathfinder
from sat.data.prepare.retrieval import preprocess_retrieval
from sat.data.prepare.text import preprocess_text
from tests.conftest import ROOT
from tests.fixtures import TinyRun, make_aan, make_cifar, make_imdb, make_pathfinder

# no --root (the working folder); each task's sequence length comes with its fixture
E2E = TinyRun(name="fx", seed=7, steps=20, dense_steps=10).replace(sets={
    "training.eval_frequency": 10, "training.warmup_steps": 2, "model.dropout": 0.0, "sparsity.density": 0.1})


def _listops(raw, out):
    generate_listops(raw, n_train=24, n_val=6, n_test=6, min_len=20, max_len=60, seed=1)
    preprocess_listops(raw, out, max_len=64)
    return 64


def _text(raw, out):
    make_imdb(raw)
    preprocess_text(raw, out, max_len=128)
    return 128


def _retrieval(raw, out):
    make_aan(raw)
    preprocess_retrieval(raw, out, max_len=64)
    return 64


def _image(raw, out):
    make_cifar(raw)
    preprocess_cifar10(raw, out)
    return 1024


def _pathfinder(raw, out):
    make_pathfinder(raw)
    preprocess_pathfinder(raw, out)
    return 1024


FIXTURES = {"lra-listops": _listops, "lra-text": _text, "lra-retrieval": _retrieval, "lra-image": _image,
            "lra-pathfinder": _pathfinder}


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(FIXTURES))
def test_task_trains_and_evaluates(task, tmp_path):
    data = tmp_path / "data"
    n = FIXTURES[task](tmp_path / "raw", data)
    fx = E2E.replace(task=task, data=data, sets={"dataset.max_seq_len": n})
    r = run("main_train.py", *fx.argv(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(fx.paths(root=tmp_path).summary.read_text())
    assert summary["steps"] == 20 and summary["transition_step"] == 10 and summary["transition_reason"] == "forced"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert fx.paths(root=tmp_path).best.is_file()
    e = run("main_inference.py", "--mode", "eval", "--task", task, "--random", "7", "--name", "fx", cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-3000:]
    out = json.loads(e.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == pytest.approx(summary["test_accuracy"])
