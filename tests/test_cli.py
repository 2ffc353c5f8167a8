"""sat/cli.py: the exit codes both command lines share."""

from __future__ import annotations

import errno

import pytest

from sat.checkpoint import CheckpointError
from sat.cli import exit_codes
from sat.config import ConfigError
from sat.data.format import DataError
from sat.train import TrainingError


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
