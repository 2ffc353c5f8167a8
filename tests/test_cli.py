"""sat/cli.py: the exit codes both command lines share."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys

import pytest

from sat.checkpoint import CheckpointError
from sat.cli import exit_codes
from sat.config import ConfigError
from sat.data.format import DataError
from sat.train import TrainingError
from tests.conftest import ROOT, small_listops
from tests.fixtures import TinyRun


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("error", [ConfigError("bad value"), DataError("bad data"), CheckpointError("bad file")])
def test_bad_input_is_one_line_and_exit_code_2(capsys, error, training):
    with pytest.raises(SystemExit) as e, exit_codes(training):
        raise error
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"


def test_failed_runs_exit_with_1_when_training(capsys):
    with pytest.raises(SystemExit) as e, exit_codes(training=True):
        raise TrainingError("non-finite loss")
    assert e.value.code == 1 and capsys.readouterr().err == "error: non-finite loss\n"
    with pytest.raises(SystemExit) as e, exit_codes(training=True):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/run.model")
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: No space left on device (/x/run.model); free disk space")


def test_other_errors_keep_their_traceback(monkeypatch):
    with pytest.raises(OSError), exit_codes():  # evaluation: no --resume advice for a disk error
        raise OSError(errno.EACCES, "Permission denied")
    with pytest.raises(TrainingError), exit_codes():
        raise TrainingError("not from evaluation")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError), exit_codes(training=True):  # not a lost torchrun peer
        raise RuntimeError("connection reset by peer")
    with exit_codes(training=True):
        pass


def test_a_lost_peer_under_torchrun_exits_with_1(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e, exit_codes(training=True):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")
    assert e.value.code == 1 and capsys.readouterr().err.startswith("error: rank 1: another rank stopped")


# ---------------------------------------------------------------------------------------------- the command line

def _main(script: str):
    if script == "main_train.py":
        from main_train import main
    else:
        from main_inference import main
    return main


SCRIPTS = ["main_train.py", "main_inference.py"]
USAGE_ERRORS = {
    "missing --task": ([], "the following arguments are required: --task"),
    "unknown flag": (["--task", "lra-listops", "--foo", "1"], "unrecognized arguments: --foo 1"),
    "bad choice": (["--task", "lra-listops", "--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    "bad type": (["--task", "lra-listops", "--train_steps", "many"],
                 "argument --train_steps: invalid int value: 'many'"),
    "flag without its value": (["--task", "lra-listops", "--random"], "argument --random: expected one argument"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_code_2(capsys, script, case):
    argv, message = USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as e:
        _main(script)(argv)
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    assert out.err.startswith(f"error: {message}") and out.err.endswith(f" (see {script} --help)\n"), out.err
    assert out.err.count("\n") == 1  # no usage block


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_error_through_the_real_command_line(tmp_path, script):
    r = subprocess.run([sys.executable, str(ROOT / script), "--task", "lra-listops", "--preset", "quick", "--foo"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: unrecognized arguments: --foo (see {script} --help)\n"
    assert not list(tmp_path.iterdir())  # nothing written


def _flags(script: str, capsys) -> set[str]:
    with pytest.raises(SystemExit) as e:
        _main(script)(["--help"])
    assert e.value.code == 0
    return set(re.findall(r"(?<![\w-])--\w+", capsys.readouterr().out))


def test_main_inference_accepts_every_training_flag(capsys):
    train, infer = _flags("main_train.py", capsys), _flags("main_inference.py", capsys)
    assert {"--preset", "--set", "--train_steps", "--sk", "--resume", "--data_dir"} <= train
    assert train <= infer and infer - train == {"--split", "--which"}


def test_the_flags_checked_against_a_checkpoint():
    """Only what changes an evaluation is compared (model, data as read, precision); a preset's values count as
    set; training-only values (steps, thresholds, density, learning rate) are not compared."""
    from main_train import build_parser
    from sat.cli import command_line_config
    from sat.config import load_config
    from sat.evaluate import changes_evaluation
    from sat.runs import config_conflicts

    a = build_parser().parse_args(["--task", "lra-listops", "--preset", "quick", "--train_steps", "9", "--sk", "3",
                                   "--density", "0.5", "--set=model.dim=32", "--amp", "off", "--block_size", "16"])
    given = command_line_config(a)
    saved = load_config("lra-listops").to_dict()  # the full task, not the quick preset: every compared key differs
    saved["model"]["dim"], saved["training"]["amp"], saved["sparsity"]["block_size"] = 64, "bf16", 64
    conflicts = config_conflicts(saved, given, changes_evaluation, "on the command line")
    assert [c.split(" is ")[0] for c in conflicts] == ["dataset.max_seq_len", "model.num_layers", "model.dim",
                                                       "training.amp", "sparsity.block_size"]
    assert "dataset.max_seq_len is 2048 in the checkpoint, 256 on the command line" in conflicts
    assert not any(command_line_config(build_parser().parse_args(["--task", "csv-text"])).values())
    bad = build_parser().parse_args(["--task", "lra-listops", "--set=model.dim=-1"])
    with pytest.raises(ConfigError, match="model sizes"):  # validated as a training run would be
        command_line_config(bad)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained through main_train.main; returns (root, data, argv of its training command, summary)."""
    from main_train import main

    root = tmp_path_factory.mktemp("cli")
    data = small_listops(root)
    run = TinyRun(root=root, seed=6, name="cl", data=data, device="cpu")
    argv = run.argv()
    assert main(argv) == 0
    summary = json.loads(run.paths().summary.read_text())
    return root, data, argv, summary


def _evaluate(capsys, argv):
    from main_inference import main

    code = main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]), out[0]


def test_main_inference_takes_the_training_command_line(trained, capsys):
    root, data, argv, summary = trained
    code, out, line = _evaluate(capsys, argv)
    assert code == 0 and out["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert out["attention"] == "block-sparse" and "top-5" in line  # ListOps: 10 classes
    # flags that only steer training are ignored, even when they differ from the run's
    code, again, _ = _evaluate(capsys, [*argv, "--train_steps", "99", "--sk", "3", "--density", "0.5", "--resume",
                                        "--learning_rate", "1", "--stop_at", "1", "--set=training.warmup_steps=7"])
    assert code == 0 and again["accuracy"] == out["accuracy"]


def test_main_inference_reads_data_elsewhere(trained, capsys, tmp_path):
    root, data, argv, summary = trained
    moved = shutil.copytree(data, tmp_path / "copy")
    code, out, _ = _evaluate(capsys, [*argv, "--data_dir", str(moved), "--split", "dev"])
    assert code == 0 and out["accuracy"] == pytest.approx(summary["dev_accuracy"])
    with pytest.raises(SystemExit) as e:
        _evaluate(capsys, [*argv, "--data_dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "does not exist" in err


@pytest.mark.parametrize("flag,key", [(["--set=model.dim=32"], "model.dim"), (["--amp", "bf16"], "training.amp"),
                                      (["--set=sparsity.block_size=32"], "sparsity.block_size")])
def test_main_inference_refuses_a_flag_that_contradicts_the_checkpoint(trained, capsys, flag, key):
    root, data, argv, summary = trained
    with pytest.raises(SystemExit) as e:
        _evaluate(capsys, [*argv, *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {key} is ")
    assert "on the command line: evaluation uses the configuration the run was trained with" in err
