"""Interrupts and preemption with real signals: SIGINT (Ctrl-C) or SIGTERM (a cluster's notice before it
preempts a job) finish the step in progress, write a checkpoint of it, print one line and exit 130 / 143; the
run continues from that checkpoint with --resume, without repeating a flag, and the resumed losses are those of
an uninterrupted run. A second signal stops at once. Under torchrun a signal to rank 0 alone stops every rank
after the same step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sat.checkpoint import load_checkpoint
from tests.conftest import ROOT, small_listops, worker_pids
from tests.fixtures import TinyRun

# long enough that no run ends before the signal lands; only the interrupt writes a checkpoint
RUN = TinyRun(seed=3, steps=2000, dense_steps=500, device="cpu").replace(sets={
    "training.eval_frequency": 1000, "training.checkpoint_every": 0, "training.warmup_steps": 2})
LINE = re.compile(r"^interrupted at step (\d+); checkpoint saved; continue with --resume$")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_listops(tmp_path_factory.mktemp("listops"), 40, 8, 8, seed=2)


def losses(root: Path, name: str) -> list[str]:
    return RUN.paths(root=root, name=name).losses.read_text().splitlines()


def last_step(path: Path) -> int:
    try:
        lines = [x for x in path.read_text().splitlines() if x.count("\t") == 2]
    except FileNotFoundError:
        return 0
    return int(lines[-1].split("\t")[0]) if lines else 0


def wait_for_step(proc: subprocess.Popen, path: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and last_step(path) < step and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    assert last_step(path) >= step, "the run did not reach the step in time"


def main_train(*argv: str) -> list[str]:
    return [sys.executable, str(ROOT / "main_train.py"), *argv]


def interrupt(root: Path, data: Path, name: str, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, send `sig` once it has trained a few steps; returns (its result, the step it stopped at)."""
    paths = RUN.paths(root=root, name=name)
    proc = subprocess.Popen(main_train(*RUN.argv(root=root, data=data, name=name)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, paths.losses, 3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    said = [line for line in out.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and LINE.match(said[0]) and out.splitlines()[-1] == said[0], out[-3000:]
    step = int(LINE.match(said[0]).group(1))
    assert step >= 3 and last_step(paths.losses) == step  # the step was finished
    assert load_checkpoint(paths.last)["step"] == step  # and checkpointed
    return r, step


@pytest.mark.slow
def test_sigint_saves_the_step_and_resume_continues_exactly(data, tmp_path):
    r, step = interrupt(tmp_path, data, "run", signal.SIGINT)
    assert r.returncode == 130
    assert f"interrupted at step {step}" in RUN.paths(root=tmp_path).text_log.read_text()

    # --resume alone: task, data folder, preset and every --set come from the checkpoint
    end = step + 3
    r = subprocess.run(main_train(*RUN.bare("--resume", "--stop_at", str(end), root=tmp_path, device=None)),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {step} (phase dense)" in r.stdout
    # the same steps without the interruption
    ref = subprocess.run(main_train(*RUN.argv("--stop_at", str(end), root=tmp_path, data=data, name="ref")),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert losses(tmp_path, "run") == losses(tmp_path, "ref") and len(losses(tmp_path, "ref")) == end


@pytest.mark.slow
def test_sigterm_saves_the_step_and_exits_143(data, tmp_path):
    r, _ = interrupt(tmp_path, data, "run", signal.SIGTERM)
    assert r.returncode == 143


_LONG_STEP = """
import sys, time
from sat.interrupt import STOP
STOP.install()
with STOP.deferred():
    print("ready", flush=True)
    for _ in range(3000):  # a step that takes long and never reaches its boundary
        time.sleep(0.01)
    print("the step ended", flush=True)
    print("flag", STOP.signum, flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once(sig):
    proc = subprocess.Popen([sys.executable, "-c", _LONG_STEP], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    time.sleep(0.5)
    assert proc.poll() is None, "the first signal must only ask the loop to stop"
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert proc.returncode == 128 + sig and "the step ended" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{signal.Signals(sig).name} again: stopped at once"), err


_SETUP = """
import time
from sat.interrupt import STOP, Interrupted
STOP.install()
try:
    print("ready", flush=True)
    time.sleep(30)  # set-up: no step to finish
except Interrupted as e:
    print("raised", e.code, flush=True)
"""


def test_a_signal_outside_the_loop_raises_at_once():
    proc = subprocess.Popen([sys.executable, "-c", _SETUP], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == "raised 143" and proc.returncode == 0


_FAILING = """
import os, signal, sys, time
from sat.cli import exit_codes
from sat.interrupt import STOP
STOP.install()
try:
    with exit_codes(training=True):
        raise RuntimeError("a failure on its way out")
except RuntimeError:
    pass
print("failed", flush=True)
sys.stdin.readline()  # the parent signals while this process is, as it were, tearing down
print("not reached", flush=True)
"""


def test_a_signal_while_a_failure_is_reported_ends_the_process_quietly():
    """torchrun sends SIGTERM to the surviving ranks when one dies; when it lands while a failed rank reports its
    error and tears down, the process ends with the signal's code and no traceback."""
    proc = subprocess.Popen([sys.executable, "-c", _FAILING], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "failed"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143 and out == "" and err == "", (proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------- torchrun

try:
    import torch.distributed as dist

    HAS_GLOO = dist.is_available() and dist.is_gloo_available()
except ImportError:  # pragma: no cover
    HAS_GLOO = False


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with gloo is not available")
def test_torchrun_ranks_stop_at_the_same_step(data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "main_train.py")]
    run = RUN.replace(root=tmp_path, name="ddp")
    proc = subprocess.Popen([*torchrun, *run.argv(data=data)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run.paths().losses, 3)
    workers = worker_pids(proc.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[0], signal.SIGINT)  # rank 0 alone: rank 1 learns it through the per-step check
    out, err = proc.communicate(timeout=180)
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-5000:]
    stopped = dict(re.findall(r"rank (\d)/2: interrupted at step (\d+)", err))
    assert set(stopped) == {"0", "1"} and stopped["0"] == stopped["1"], err[-5000:]
    step = int(stopped["0"])
    assert re.search(rf"^interrupted at step {step}; checkpoint saved; continue with --resume$", out, re.M)
    assert load_checkpoint(run.paths().last)["step"] == step == last_step(run.paths().losses)

    r = subprocess.run([*torchrun, *run.bare("--resume", "--stop_at", str(step + 2))], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    assert f"resumed from step {step} (phase dense)" in r.stdout
    assert last_step(run.paths().losses) == step + 2
