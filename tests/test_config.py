import subprocess
import sys

import pytest

from sat.config import ConfigError, from_dict, load_config, tasks
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
    ({"sparsity": {"pattern": "covrage"}}, "sparsity.pattern"),
    ({"sparsity": {"recall_target": 0.0}}, "recall_target"),
    ({"sparsity": {"recall_target": 1.5}}, "recall_target"),
    ({"sparsity": {"recall_target": "high"}}, "type float"),
    ({"sparsity": {"min_density": 0.0}}, "min_density"),
    ({"sparsity": {"min_density": 0.6, "max_density": 0.5}}, "min_density <= max_density"),
    ({"sparsity": {"max_density": 1.5}}, "max_density"),
    ({"sparsity": {"recall_batches": 0}}, "recall_batches"),
    ({"sparsity": {"recall_batches": 2.5}}, "type int"),
    ({"sparsity": {"recal_target": 0.9}}, "did you mean 'recall_target'"),
    ({"sparsity": {"pattern": "coverage", "min_density": 0.0001, "max_density": 0.0005}}, "max_density"),
])
def test_bad_values_raise(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("lra-image", overrides=overrides)


def test_coverage_keys_defaults_and_values():
    cfg = load_config("lra-image")
    s = cfg.sparsity
    assert (s.pattern, s.keep_diagonal, s.recall_target, s.min_density, s.max_density, s.recall_batches) == (
        "measured", True, 0.9, 0.02, 0.5, 4)  # LRA's default: the measured top-k with the diagonal kept
    vit = load_config("imagenet-vit-ti").sparsity
    assert (vit.pattern, vit.keep_diagonal) == ("learned", False)  # SAT's rule where nothing was measured
    s = load_config("lra-image", overrides={"sparsity": {"pattern": "coverage", "recall_target": 1,
                                                          "min_density": 0.1, "max_density": 0.1}}).sparsity
    assert (s.pattern, s.recall_target, s.min_density, s.max_density) == ("coverage", 1.0, 0.1, 0.1)
    # a max_density that keeps no block matters only to the coverage rule (32 x 32 blocks: 0.0005 -> 0)
    assert load_config("lra-image", overrides={"sparsity": {"min_density": 0.0001,
                                                            "max_density": 0.0005}}).sparsity.pattern == "measured"


def test_configs_saved_before_the_coverage_keys_still_load():
    saved = load_config("lra-image").to_dict()
    for key in ("recall_target", "min_density", "max_density", "recall_batches"):
        del saved["sparsity"][key]
    assert from_dict(saved).sparsity == load_config("lra-image").sparsity


def test_unknown_task_suggests():
    with pytest.raises(ConfigError, match="did you mean 'lra-image'"):
        load_config("lra-imag")


@pytest.mark.parametrize("args,match", [
    (["--task", "lra-nothing"], "unknown task"),
    (["--task", "lra-image", "--density", "0"], "density"),
    (["--task", "lra-image", "--density", "1.2"], "density"),
    (["--task", "lra-image", "--block_size", "100"], "block_size"),
    (["--task", "lra-image", "--sk", "-2"], "non-negative"),
    (["--task", "lra-image", "--set=sparsity.recall_target=1.5"], "recall_target"),
    (["--task", "lra-image", "--set=sparsity.pattern=coverage", "--set=sparsity.max_density=0.0005"],
     "max_density"),
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
