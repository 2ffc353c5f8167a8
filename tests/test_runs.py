"""A run name is one run (any artefact of the name refuses a new run unless --resume or --overwrite), --resume
restores the run's configuration from its checkpoint (a contradicting flag is refused, naming the key and both
values), and checkpoints are written between evaluations (training.checkpoint_every), each one enough to
continue exactly."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import sat.train
from sat.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sat.config import ConfigError, checkpoint_interval, load_config
from sat.runlog import RunLog, RunPaths
from sat.runs import check_run_name, resumed_config
from sat.train import Checkpointer
from tests.conftest import ROOT, small_listops
from tests.fixtures import TASK, write_lra_data

SEED = 4


# ---------------------------------------------------------------------------------------------- run names

def _make(path: Path) -> None:
    if path.suffix == ".tensorboard":
        path.mkdir(parents=True)
        (path / "events.out.tfevents.1").write_text("old")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old")


@pytest.mark.parametrize("which", range(6))
def test_any_artefact_of_the_name_refuses_a_new_run(tmp_path, which):
    paths = RunPaths.make(tmp_path, SEED, TASK, "r")
    artefact = paths.artefacts()[which]
    _make(artefact)
    with pytest.raises(ConfigError) as e:
        check_run_name(paths, resume=False, overwrite=False, root=tmp_path)
    msg = str(e.value)
    assert "run 'r' already exists" in msg and artefact.name in msg and "--resume" in msg and "--overwrite" in msg
    check_run_name(paths, resume=False, overwrite=True, root=tmp_path)  # accepted; train() deletes
    assert artefact.exists()
    check_run_name(RunPaths.make(tmp_path, SEED, TASK, "other"), resume=False, overwrite=False, root=tmp_path)


def test_resume_needs_a_checkpoint_and_excludes_overwrite(tmp_path):
    paths = RunPaths.make(tmp_path, SEED, TASK, "r")
    with pytest.raises(CheckpointError, match="no checkpoint at .*train first"):
        check_run_name(paths, resume=True, overwrite=False, root=tmp_path)
    _make(paths.text_log)  # killed before its first checkpoint
    with pytest.raises(CheckpointError, match=r"no checkpoint .*r\.log but no checkpoint yet: start it again with "
                                              r"--overwrite"):
        check_run_name(paths, resume=True, overwrite=False, root=tmp_path)
    with pytest.raises(ConfigError, match="either --resume .* or --overwrite"):
        check_run_name(paths, resume=True, overwrite=True, root=tmp_path)


def test_remove_deletes_this_run_only(tmp_path):
    paths = RunPaths.make(tmp_path, SEED, TASK, "r")
    others = [RunPaths.make(tmp_path, SEED, TASK, n) for n in ("r.b", "rr", "[r]")]
    for p in [paths, *others]:
        for a in p.artefacts():
            _make(a)
    stale = paths.last.parent / ".r.last.model.abc123.tmp"  # a killed save's temporary file
    stale.write_text("x")
    removed = paths.remove()
    assert sorted(removed) == sorted(paths.artefacts()) and not paths.existing() and not stale.exists()
    assert all(set(p.existing()) == set(p.artefacts()) for p in others)


# ---------------------------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_listops(tmp_path_factory.mktemp("listops"), 24, 6, 6, seed=4)


@pytest.fixture
def tiny_run(tiny_run, data):
    """This module's tiny run (in tmp_path): 'r', seed 4, 8 steps (the switch forced after 2), an evaluation every 3
    steps, the task's warmup, on the CPU."""
    return tiny_run.replace(task=TASK, name="r", seed=SEED, steps=8, data=data, device="cpu",
                            sets={"training.eval_frequency": 3, "training.warmup_steps": None})


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    """main_train.py `args` (which give --root) in the working folder `root`."""
    return subprocess.run([sys.executable, str(ROOT / "main_train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=root)


def one_line_error(r: subprocess.CompletedProcess, *parts: str) -> None:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for part in parts:
        assert part in lines[0], lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_resume_restores_the_configuration_and_refuses_contradictions(tiny_run, tmp_path):
    r = cli(tmp_path, *tiny_run.argv("--stop_at", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(tmp_path)

    # a contradicting flag: refused before anything is written, naming the key and both values
    bare = tiny_run.bare("--resume", device=None)
    one_line_error(cli(tmp_path, *bare, "--train_steps", "9"),
                   "--resume: training.train_steps is 8 in the checkpoint, 9 on the command line")
    one_line_error(cli(tmp_path, *bare, "--set=model.dim=32"),
                   "--resume: model.dim is 16 in the checkpoint, 32 on the command line")
    one_line_error(cli(tmp_path, *bare, "--set=sparsity.densty=0.5"), "did you mean 'density'")
    # a new run of the same name: refused, naming what exists
    one_line_error(cli(tmp_path, *tiny_run.argv()),
                   "run 'r' already exists", "r.log", "r.last.model", "--resume", "--overwrite")
    assert snapshot(tmp_path) == before

    # nothing repeated (flags that agree, or that may change, are accepted): the run ends as configured
    r = cli(tmp_path, *bare, "--set=training.batch_size=4", "--set=training.checkpoint_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 4 (phase sparse)" in r.stdout  # the switch was forced at step 2
    assert "resumed from step 4 (phase sparse)" in tiny_run.paths().text_log.read_text()
    state = load_checkpoint(tiny_run.paths().last)
    assert state["step"] == 8 and state["config"]["model"]["dim"] == 16
    assert state["config"]["training"]["checkpoint_every"] == 2  # the one key a resumed run may change


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_and_nothing_else(tiny_run, tmp_path):
    old = tiny_run.paths()
    for a in old.artefacts():
        _make(a)
    other = tiny_run.paths(name="keep")
    _make(other.text_log)
    before = snapshot(tmp_path)
    # bad input with --overwrite: refused, and nothing deleted
    one_line_error(cli(tmp_path, *tiny_run.argv("--overwrite", data=tmp_path / "missing")), "does not exist")
    one_line_error(cli(tmp_path, *tiny_run.argv("--overwrite", "--resume")), "either --resume")
    assert snapshot(tmp_path) == before

    r = cli(tmp_path, *tiny_run.argv("--overwrite"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--overwrite: removed the earlier run 'r'" in r.stdout
    assert "old" not in old.text_log.read_text()
    assert len(old.losses.read_text().splitlines()) == 8
    events = list(old.tensorboard.iterdir())
    assert len(events) == 1 and events[0].read_bytes() != b"old"  # one event file: curves do not mix
    assert load_checkpoint(old.last)["step"] == 8 and load_checkpoint(old.best)["step"] in (3, 6, 8)
    assert other.text_log.read_text() == "old"


# ---------------------------------------------------------------------------------------------- resumed_config

def _saved(tmp_path: Path, run: bool = True) -> RunPaths:
    """A checkpoint whose run was requested with dim 16 and 10 steps (what resumed_config reads of it)."""
    cfg = load_config(TASK, overrides={"model": {"dim": 16}, "training": {"train_steps": 10}})
    paths = RunPaths.make(tmp_path, SEED, TASK, "r")
    resolved = cfg.to_dict()
    resolved["dataset"]["num_classes"] = 10
    state = {"task": TASK, "config": resolved, "step": 4, "best_dev_accuracy": 0.5, "vocab_size": 20,
             "data_dir": "/somewhere/data", "timing": {}, "model": {}, "optimizer": {}, "scheduler": {},
             "train_loader": {}, "rng": {}}
    if run:
        state["run"] = {"config": cfg.to_dict(), "seed": SEED}
    save_checkpoint(paths.last, state)
    return paths


def test_resumed_config_takes_the_checkpoint_and_checks_flags(tmp_path):
    paths = _saved(tmp_path)
    cfg, data_dir, state = resumed_config(paths, TASK, None, {})
    assert cfg.model.dim == 16 and cfg.training.train_steps == 10 and data_dir == Path("/somewhere/data")
    # values that agree, written differently (an int for a float), are no contradiction
    lr = cfg.training.learning_rate
    same, _, _ = resumed_config(paths, TASK, None, {"model": {"dim": 16}, "training": {"learning_rate": lr}})
    assert same == cfg
    changed, _, _ = resumed_config(paths, TASK, None, {"training": {"checkpoint_every": "1min"}})
    assert changed.training.checkpoint_every == "1min"
    with pytest.raises(ConfigError) as e:
        resumed_config(paths, TASK, None, {"model": {"dim": 32}, "training": {"train_steps": 700, "epochs": 0}})
    assert str(e.value).startswith("--resume: model.dim is 16 in the checkpoint, 32 on the command line; "
                                   "training.train_steps is 10 in the checkpoint, 700 on the command line; leave")
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        resumed_config(paths, TASK, "nope", {})
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        resumed_config(paths, TASK, None, {"modle": {"dim": 16}})
    with pytest.raises(CheckpointError, match="holds task lra-listops, not lra-text"):
        resumed_config(paths, "lra-text", None, {})


def test_resumed_config_of_a_checkpoint_without_the_run_record(tmp_path):
    cfg, _, _ = resumed_config(_saved(tmp_path, run=False), TASK, None, {})
    assert cfg.dataset.num_classes == 10 and cfg.model.dim == 16  # the resolved config, as saved


# ---------------------------------------------------------------------------------------------- checkpoint_every

def test_checkpoint_interval_and_clock():
    assert checkpoint_interval(250) == (250, 0.0) and checkpoint_interval(0) == (0, 0.0)
    assert checkpoint_interval("10min") == (0, 600.0) and checkpoint_interval("0.5 min") == (0, 30.0)
    for bad in (-1, "10", "min", "0min", "-2min", "nanmin", True):
        with pytest.raises(ConfigError, match="checkpoint_every"):
            checkpoint_interval(bad)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        load_config(TASK, overrides={"training": {"checkpoint_every": "often"}})
    now = [100.0]
    clock = Checkpointer("2min", clock=lambda: now[0])
    assert not clock.due(1)
    now[0] += 119
    assert not clock.due(2)
    now[0] += 1
    assert clock.due(3)
    clock.saved(3)
    assert not clock.due(4) and clock.saved_at == 3
    steps = Checkpointer(5)
    assert [s for s in range(1, 16) if steps.due(s)] == [5, 10, 15]
    assert not any(Checkpointer(0).due(s) for s in range(1, 100))


@pytest.fixture
def saves(monkeypatch):
    """(step, improved) of every checkpoint train() writes."""
    seen = []
    original = RunLog.save_checkpoint

    def spy(self, state, improved):
        seen.append((state["step"], improved))
        original(self, state, improved)

    monkeypatch.setattr(RunLog, "save_checkpoint", spy)
    return seen


def _tiny(tmp_path: Path, every) -> tuple:
    data = write_lra_data(tmp_path / "data")
    cfg = load_config(TASK, overrides={
        "dataset": {"max_seq_len": 16}, "model": {"num_layers": 1, "dim": 8, "hidden_dim": 16, "head_dim": 4},
        "training": {"batch_size": 4, "train_steps": 10, "warmup_steps": 1, "eval_frequency": 4,
                     "checkpoint_every": every},
        "sparsity": {"block_size": 4, "density": 0.25, "max_dense_steps": 5}})
    return cfg, data


def test_checkpoints_between_evaluations_resume_exactly(tmp_path, saves):
    cfg, data = _tiny(tmp_path, 3)
    full = RunPaths.make(tmp_path, 1, TASK, "full")
    sat.train.train(cfg, full, data, backend="torch", seed=1, progress=False)
    # every 3 steps, at the evaluations (4, 8 and the last step) and nowhere twice
    assert [s for s, _ in saves] == [3, 4, 6, 8, 9, 10] and all(not i for s, i in saves if s % 4 and s != 10)
    saves.clear()
    cut = RunPaths.make(tmp_path, 1, TASK, "cut")
    assert sat.train.train(cfg, cut, data, backend="torch", seed=1, progress=False, stop_at=7) is None
    assert [s for s, _ in saves] == [3, 4, 6, 7]  # a stop between evaluations is checkpointed too
    state = load_checkpoint(cut.last)
    assert state["step"] == 7 and state["run"] == {"config": cfg.to_dict(), "seed": 1}
    sat.train.train(cfg, cut, data, backend="torch", seed=1, progress=False, resume=True)  # after the switch
    assert cut.losses.read_text() == full.losses.read_text()
    assert len(full.losses.read_text().splitlines()) == 10


def test_checkpoint_every_zero_writes_at_evaluations_only(tmp_path, saves):
    cfg, data = _tiny(tmp_path, 0)
    sat.train.train(cfg, RunPaths.make(tmp_path, 1, TASK, "r"), data, backend="torch", seed=1, progress=False)
    assert [s for s, _ in saves] == [4, 8, 10]
