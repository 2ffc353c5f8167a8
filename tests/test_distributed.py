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

SETS = ['model.mlp="monarch"', "model.nblocks=2", "sparsity.s2d_fraction=0.625", "model.num_layers=2",
        "model.dim=16", "model.hidden_dim=32", "model.head_dim=8", "training.batch_size=4",
        "training.eval_frequency=4", "dataset.max_seq_len=64", "sparsity.block_size=16",
        "sparsity.density=0.2"]


@pytest.mark.slow
def test_lra_two_ranks_take_transitions_together(tmp_path):
    small_listops(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "main_train.py"), "--task", "lra-listops", "--train_steps", "24",
                        "--max_dense_steps", "8", "--random", "3", "--no_progress", "--backend", "torch",
                        "--device", "cpu", "--data_dir", str(tmp_path / "data"), "--name", "ddp",
                        *[f"--set={s}" for s in SETS]], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    found = {}
    for rank, kind, step in re.findall(r"rank (\d)/2: (sparsify|densify) at step (\d+)", r.stderr):
        found.setdefault(kind, {})[int(rank)] = int(step)
    assert found == {"sparsify": {0: 8, 1: 8}, "densify": {0: 15, 1: 15}}
    s = json.loads((tmp_path / "logs" / "log-3" / "lra-listops" / "ddp.summary.json").read_text())
    assert (s["transition_step"], s["densify_step"], s["world_size"], s["global_batch_size"]) == (8, 15, 2, 8)
    assert 0.0 <= s["test_accuracy"] <= s["test_top5"] <= 1.0
    e = subprocess.run([sys.executable, str(ROOT / "main_inference.py"), "--mode", "eval", "--task",
                        "lra-listops", "--random", "3", "--name", "ddp", "--which", "last", "--device",
                        "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    out = json.loads(e.stdout.strip().splitlines()[-1])
    assert out["checkpoint_step"] == 24 and out["attention"] == "block-sparse"


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
distributed.all_ranks_true(True, torch.device("cpu"))
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
