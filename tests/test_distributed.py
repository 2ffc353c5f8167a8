"""LRA under torchrun (2 CPU ranks, gloo): rank-sharded batches, both transitions at the same step on every
rank, rank 0 alone writes the outputs, and the checkpoint evaluates with main_inference. Shutting down
destroys the process group and joins its threads before the interpreter exits, also after a failure."""

import json
import os
import re
import subprocess
import sys
import weakref

import pytest

from tests.conftest import ROOT, small_listops
from tests.fixtures import TinyRun

# two layers, a global batch of 8 (4 on each of 2 ranks), the task's warmup
TWO_RANKS = TinyRun(device="cpu").replace(sets={"model.num_layers": 2, "training.batch_size": 8,
                                                "training.warmup_steps": None, "sparsity.density": 0.2})
DDP = TWO_RANKS.replace(name="ddp", seed=3, steps=24, dense_steps=8, sets={
    "model.mlp": '"monarch"', "model.nblocks": 2, "sparsity.s2d_fraction": 0.625, "training.eval_frequency": 4})


@pytest.mark.slow
def test_lra_two_ranks_take_transitions_together(tmp_path):
    small_listops(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "main_train.py"), *DDP.argv(data=tmp_path / "data")],  # the root: cwd
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    found = {}
    for rank, kind, step in re.findall(r"rank (\d)/2: (sparsify|densify) at step (\d+)", r.stderr):
        found.setdefault(kind, {})[int(rank)] = int(step)
    assert found == {"sparsify": {0: 8, 1: 8}, "densify": {0: 15, 1: 15}}
    s = json.loads(DDP.paths(root=tmp_path).summary.read_text())
    assert (s["transition_step"], s["densify_step"], s["world_size"], s["global_batch_size"]) == (8, 15, 2, 8)
    assert 0.0 <= s["test_accuracy"] <= s["test_top5"] <= 1.0
    e = subprocess.run([sys.executable, str(ROOT / "main_inference.py"), "--mode", "eval", "--task",
                        "lra-listops", "--random", "3", "--name", "ddp", "--which", "last", "--device",
                        "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    out = json.loads(e.stdout.strip().splitlines()[-1])
    assert out["checkpoint_step"] == 24 and out["attention"] == "block-sparse"


SAME = TWO_RANKS.replace(name="same", sets={"model.dropout": 0.0, "model.attn_dropout": 0.0})


def _losses(root) -> list[float]:
    lines = SAME.paths(root=root).losses.read_text().splitlines()
    return [float(line.split("\t")[1]) for line in lines]


@pytest.mark.slow
def test_two_ranks_run_the_one_rank_experiment(tmp_path):
    """batch_size is the global batch of an LRA task: on 2 ranks each takes 4 of the 8 examples the 1-rank run
    takes, the same 8 (one shuffle, each rank its slice), so the logged loss (the whole batch's) is the 1-rank
    run's, step after step (no dropout: its streams are per rank)."""
    data = small_listops(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for world in (1, 2):
        root = tmp_path / f"world{world}"
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                    if world == 2 else [sys.executable])
        r = subprocess.run([*launcher, str(ROOT / "main_train.py"), *SAME.argv(root=root, data=data)],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-5000:]
        per = 8 // world
        assert f"batch: 8 examples a step, {per} on each of {world} rank(s)" in r.stdout
        s = json.loads(SAME.paths(root=root).summary.read_text())
        assert (s["world_size"], s["global_batch_size"], s["rank_batch_size"]) == (world, 8, per)
        runs[world] = _losses(root)
    one, two = runs[1], runs[2]
    assert len(one) == len(two) == 4
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # the first step: same weights, same 8 examples
    assert two == pytest.approx(one, rel=1e-4)  # then the same averaged gradients (up to summation order)


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    """3 ranks for a batch of 8: one line naming the world sizes that work, exit 2, nothing written. WORLD_SIZE is
    what torchrun sets; the check comes before the process group is joined, so no launcher is needed."""
    data = small_listops(tmp_path)
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0"}
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *SAME.argv(root=tmp_path / "run", data=data)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr == (
        "error: training.batch_size 8 is the global batch of task lra-listops and does not split over 3 ranks; run "
        "on 1, 2, 4, 8 rank(s), or pass --batch_size a multiple of 3\n")
    assert not (tmp_path / "run").exists()


# Under torchrun: threads alive before joining the group, DDP built (as training does; it imports
# torch._dynamo), one backward and one collective, then sat.distributed.shutdown(); prints the threads
# started since that are still alive.
SHUTDOWN_SCRIPT = """
import os
import torch
from torch.nn.parallel import DistributedDataParallel
from sat import distributed

def tasks():
    return {t: open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}

before = tasks()
info, _ = distributed.init_from_env("cpu")
net = DistributedDataParallel(torch.nn.Linear(4, 2))
net(torch.ones(3, 4)).sum().backward()
distributed.finite_and_stop(True, 0, torch.device("cpu"))
del net
distributed.shutdown()
left = sorted(name for t, name in tasks().items() if t not in before)
print(f"rank {info.rank}: threads left {left}", flush=True)
"""


@pytest.mark.slow
def test_shutdown_joins_the_process_group_threads(tmp_path):
    """The group's threads end in shutdown(), not at interpreter exit: a backend worker still releasing the
    last collective while Python finalizes aborts the process ("terminate called without an active
    exception"), as it did at random for the rank that leaves first."""
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    # the ranks' lines can come through torchrun run together
    assert sorted(re.findall(r"rank (\d): threads left (\[[^]]*\])", r.stdout)) == [("0", "[]"), ("1", "[]")], r.stdout


def test_a_failed_runs_frames_are_released_before_shutdown():
    """What the failed training frames held (the DDP wrapper, and through it the process group) is freed
    by main_train before it shuts the group down, though the exit exception still chains the failure."""
    from main_train import release_frames
    from sat.config import die

    class Wrapper:
        pass

    refs = []

    def train():
        net = Wrapper()
        refs.append(weakref.ref(net))
        raise RuntimeError("a rank stopped")

    with pytest.raises(SystemExit) as info:
        try:
            train()
        except RuntimeError as e:
            die(str(e), code=1)
    assert refs[0]() is not None  # the SystemExit chains the failure, whose traceback keeps train's frame
    release_frames(info.value)
    assert refs[0]() is None
