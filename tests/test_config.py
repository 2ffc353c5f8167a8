import subprocess
import sys

import pytest

from sat.config import ConfigError, load_config, tasks
from tests.conftest import ROOT


@pytest.mark.parametrize("task", ["lra-listops", "lra-text", "lra-retrieval", "lra-image", "lra-pathfinder"])
def test_every_task_config_is_valid(task):
    cfg = load_config(task)
    assert cfg.dataset.max_seq_len % cfg.sparsity.block_size == 0
    assert task in tasks()


@pytest.mark.parametrize("overrides,match", [
    ({"sparsity": {"densty": 0.1}}, "did you mean 'density'"),
    ({"sparsity": {"density": 0.0}}, "density"),
    ({"sparsity": {"density": 1.5}}, "density"),
    ({"sparsity": {"block_size": 48}}, "must divide"),
    ({"sparsity": {"sk": -1.0}}, "non-negative"),
    ({"training": {"train_steps": 0}}, "train_steps"),
    ({"training": {"batch_size": "32"}}, "type int"),
    ({"modle": {}}, "unknown config section"),
    ({"model": {"mlp": "sparse"}}, "model.mlp"),
    ({"model": {"recompute": "always"}}, "model.recompute"),
    ({"sparsity": {"density": 0.0005}}, "keeps no block"),
])
def test_bad_values_raise(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("lra-image", overrides=overrides)


def test_unknown_task_suggests():
    with pytest.raises(ConfigError, match="did you mean 'lra-image'"):
        load_config("lra-imag")


@pytest.mark.parametrize("args,match", [
    (["--task", "lra-nothing"], "unknown task"),
    (["--task", "lra-image", "--density", "0"], "density"),
    (["--task", "lra-image", "--density", "1.2"], "density"),
    (["--task", "lra-image", "--block_size", "100"], "block_size"),
    (["--task", "lra-image", "--sk", "-2"], "non-negative"),
    (["--task", "lra-image", "--train_steps", "0"], "train_steps"),
    (["--task", "lra-image", "--data_dir", "/nonexistent/data"], "does not exist"),
])
def test_cli_bad_input_exit_code_2(args, match, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *args, "--root", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing written
