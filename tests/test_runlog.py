"""RunLog owns a run's outputs and closes them on every way out: the end of the run, --stop_at and an error."""

from __future__ import annotations

import logging

import pytest

import sat.train
from sat.config import load_config
from sat.runlog import RunLog, RunPaths
from tests.fixtures import TASK, write_lra_data


def _closed(run: RunLog) -> bool:
    return run.losses.closed and run.writer.all_writers is None and run.bar.disable and not logging.getLogger(
        "sat").handlers


def test_runlog_writes_and_closes_everything_after_an_error(tmp_path):
    paths = RunPaths.make(tmp_path, 1, TASK, "r")
    with pytest.raises(RuntimeError, match="boom"), RunLog(paths, True, True, 0, 5, TASK) as run:
        run.say("hello")
        run.step(1, 2.5, "dense")
        run.scalars(1, {"train/loss": 2.5})
        raise RuntimeError("boom")
    assert _closed(run)
    assert paths.losses.read_text() == "1\t2.50000000\tdense\n"
    assert "hello" in paths.text_log.read_text() and paths.tensorboard.is_dir()


def test_runlog_of_another_rank_writes_nothing(tmp_path, capsys):
    paths = RunPaths.make(tmp_path, 1, TASK, "r")
    with RunLog(paths, False, True, 0, 5, TASK) as run:
        run.say("hello")
        run.step(1, 2.5, "dense")
        run.scalars(1, {"train/loss": 2.5})
        run.save_checkpoint({}, improved=True)
    assert run.losses.closed and not tmp_path.joinpath("logs").exists() and "hello" not in capsys.readouterr().out


@pytest.fixture
def spy(monkeypatch):
    """The RunLog of each train() call."""
    opened = []

    class Spy(RunLog):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(sat.train, "RunLog", Spy)
    return opened


def _train(tmp_path, **kwargs):
    data = write_lra_data(tmp_path / "data")
    cfg = load_config(TASK, overrides={
        "dataset": {"max_seq_len": 16}, "model": {"num_layers": 1, "dim": 8, "hidden_dim": 16, "head_dim": 4},
        "training": {"batch_size": 4, "train_steps": 4, "warmup_steps": 1, "eval_frequency": 2},
        "sparsity": {"block_size": 4, "density": 0.25, "max_dense_steps": 2}})
    paths = RunPaths.make(tmp_path, 1, TASK, "r")
    return paths, sat.train.train(cfg, paths, data, backend="torch", progress=True, **kwargs)


@pytest.mark.parametrize("stop_at", [0, 3])
def test_train_closes_its_outputs_at_the_end_and_at_stop_at(tmp_path, spy, stop_at):
    paths, summary = _train(tmp_path, stop_at=stop_at)
    assert (summary is None) == bool(stop_at)
    assert len(spy) == 1 and _closed(spy[0])
    assert len(paths.losses.read_text().splitlines()) == (stop_at or 4)


def test_train_closes_its_outputs_after_an_error(tmp_path, spy, monkeypatch):
    calls = []

    def failing_set_lr(optimizer, lr):
        calls.append(lr)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return lr

    monkeypatch.setattr(sat.train, "set_lr", failing_set_lr)
    with pytest.raises(RuntimeError, match="boom"):
        _train(tmp_path)
    assert len(spy) == 1 and _closed(spy[0])
    assert len(spy[0].paths.losses.read_text().splitlines()) == 2
