"""Crash safety: a run killed with SIGKILL at random points (in the dense phase, right after the attention
switch, after the Monarch densify, near the end) and resumed with --resume each time ends exactly as an
uninterrupted run: the same per-step losses and the same summary.json (timing and memory fields aside).
After every kill each checkpoint on disk loads; temporary files a kill leaves mid-write are removed by the
next save, so none is left at the end. A process killed while saving a checkpoint leaves the old or the new
file, never a torn one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sat.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import ROOT, small_listops
from tests.fixtures import TinyRun

STEPS, SWITCH, DENSIFY = 24, 8, 15
RUN = TinyRun(seed=3, steps=STEPS, dense_steps=SWITCH).replace(sets={
    "model.mlp": '"monarch"', "model.nblocks": 2, "sparsity.s2d_fraction": 0.625, "model.num_layers": 2,
    "training.warmup_steps": 2, "sparsity.density": 0.2})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_listops(tmp_path_factory.mktemp("listops"), 40, 8, 8, seed=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> tuple[list[str], dict]:
    """The uninterrupted run's per-step losses and summary."""
    root = tmp_path_factory.mktemp("reference")
    r = subprocess.run(command(root, data), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    full, ref = losses(root), summary(root)
    assert len(full) == STEPS and ref["transition_step"] == SWITCH and ref["densify_step"] == DENSIFY
    return full, ref


def command(root: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "main_train.py"), *RUN.argv(*extra, root=root, data=data)]


def losses(root: Path) -> list[str]:
    return RUN.paths(root=root).losses.read_text().splitlines()


def summary(root: Path) -> dict:
    s = json.loads(RUN.paths(root=root).summary.read_text())
    return {k: v for k, v in s.items() if "per_sec" not in k and "memory" not in k}


def _last_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    complete = [line for line in lines if line.count("\t") == 2]
    return int(complete[-1].split("\t")[0]) if complete else 0


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def run_until_killed(root: Path, data: Path, target: int, delay: float) -> tuple[int, int | None]:
    """Start (or resume) the run, SIGKILL it `delay` seconds after it logged step `target`; returns (the last
    step in the loss log after the kill, the exit code if it finished first, else None)."""
    # a run killed before its first checkpoint is started again under its name with --overwrite
    paths = RUN.paths(root=root)
    resume = ["--resume"] if paths.last.exists() else ["--overwrite"]
    loss_file = paths.losses
    old = _inode(loss_file)
    proc = subprocess.Popen(command(root, data, *resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # the loss log is rewritten (a new inode) when the new process starts its loop; wait for that first
    while proc.poll() is None and _inode(loss_file) in (old, None) and time.monotonic() < deadline:
        time.sleep(0.002)
    while proc.poll() is None and _last_step(loss_file) < target and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    code = proc.poll()
    if code is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        assert code == 0, proc.stderr.read().decode()[-3000:]
    proc.stderr.close()
    return _last_step(loss_file), code


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(seed, data, reference, tmp_path):
    full, ref = reference
    paths = RUN.paths(root=tmp_path)
    rng = random.Random(seed)
    targets = [
        rng.randint(2, SWITCH - 1),
        rng.randint(SWITCH + 1, SWITCH + 3),
        rng.randint(DENSIFY + 1, 21),
        rng.randint(22, STEPS),
    ]
    killed_at = []
    for target in targets:
        step, code = run_until_killed(tmp_path, data, target, delay=rng.uniform(0.0, 0.04))
        if code == 0:  # it finished before the kill landed (the last target can be the final step)
            break
        killed_at.append(step)
        for model in paths.ckpt_dir.glob("*.model"):  # whatever the kill interrupted, checkpoints load
            state = load_checkpoint(model)
            assert state["step"] % 2 == 0 and state["step"] <= step
    print(f"seed {seed}: killed after steps {killed_at}")
    # every phase was interrupted at least once
    assert any(s < SWITCH for s in killed_at), killed_at
    assert any(SWITCH < s <= DENSIFY for s in killed_at), killed_at
    assert any(s > DENSIFY for s in killed_at), killed_at
    if not paths.summary.exists():
        r = subprocess.run(command(tmp_path, data, "--resume"), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path) == full, f"killed at steps {killed_at}"
    assert summary(tmp_path) == ref
    assert not list((tmp_path / "checkpoints").rglob("*.tmp")), "temporary files left in checkpoints/"
    assert not list(paths.log_dir.glob(".*.tmp"))


_SAVER = """
import sys, torch
from sat.checkpoint import save_checkpoint
path = sys.argv[1]
state = {"weights": torch.randn(3_000_000), "i": 0}
state["weights"][0] = 0  # the first save holds i = 0 too (a kill before the second save loads this one)
save_checkpoint(path, state)
print("ready", flush=True)
while True:
    state["i"] += 1
    state["weights"][0] = state["i"]
    save_checkpoint(path, state)
"""


@pytest.mark.slow
def test_kill_while_saving_leaves_old_or_new_checkpoint(tmp_path):
    """SIGKILL at random moments of back-to-back 12 MB checkpoint writes: the file always loads whole, and the
    temporary file a kill may leave is removed by the next save."""
    import torch

    path = tmp_path / "c.model"
    rng = random.Random(7)
    left_behind = 0
    last = -1
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        state = torch.load(path, weights_only=True)  # never torn
        assert state["format"] == 1 and state["weights"].shape == (3_000_000,)
        assert int(state["weights"][0]) == state["i"] >= 0
        last = state["i"]
        left_behind += len(list(tmp_path.glob(".c.model.*.tmp")))
    save_checkpoint(path, {"weights": torch.zeros(1), "i": last + 1})
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert torch.load(path, weights_only=True)["i"] == last + 1
    print(f"{left_behind} temporary file(s) left by kills were cleaned")
