"""Bad input through the real CLIs (subprocesses): every case ends with a documented exit code (2 bad usage or
input, 1 a failure during training), one line on stderr starting with "error:" that says what to do, no
traceback, and nothing damaged left behind: a refused run writes no checkpoint and no run folder, and an
existing checkpoint is left byte for byte as it was. Nothing in the data or checkpoint path runs code: pickled
payloads (in an .npz object array, or inside a checkpoint) are refused without being executed."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sat.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import ROOT, small_listops
from tests.fixtures import SEED, TinyRun, nothing_written, refused

TASK = "lra-listops"


class Payload:
    """Unpickling this runs a shell command that creates `marker`: the test that nothing unpickles data."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def payload(marker: Path) -> Payload:
    """A Payload, after proving that plain pickle would run it (so its absence later means something)."""
    pickle.loads(pickle.dumps(Payload(marker)))  # noqa: S301 (deliberately unsafe: checks the payload works)
    assert marker.exists()
    marker.unlink()
    return Payload(marker)


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def train_cli(root: Path, data: Path | None, *extra: str, name: str = "run", task: str = TASK):
    """The tiny run (TinyRun's defaults) in `root`; `extra` comes last and wins."""
    return run("main_train.py", *TinyRun(root=root, task=task, name=name, data=data).argv(*extra), cwd=root)


def infer_cli(root: Path, *extra: str, name: str = "ok", task: str = TASK):
    return run(
        "main_inference.py",
        "--mode",
        "eval",
        "--task",
        task,
        "--random",
        str(SEED),
        "--name",
        name,
        "--root",
        str(root),
        "--backend",
        "torch",
        "--device",
        "cpu",
        *extra,
        cwd=root,
    )


def snapshot(root: Path) -> dict:
    """Every file under root -> sha256 (what must stay unchanged)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def no_temporaries(root: Path) -> None:
    assert not [p for p in root.rglob("*.tmp")], "temporary files left behind"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_listops(tmp_path_factory.mktemp("listops"), 24, 6, 6, seed=4)


@pytest.fixture
def bad_data(data, tmp_path) -> Path:
    """A private copy of the processed data, for a test to damage."""
    return Path(shutil.copytree(data, tmp_path / "data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A root holding one finished tiny run named 'ok' (checkpoints ok.model and ok.last.model)."""
    root = tmp_path_factory.mktemp("trained")
    r = train_cli(root, data, name="ok")
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture
def run_root(trained, tmp_path) -> Path:
    """A private copy of the trained root."""
    return Path(shutil.copytree(trained, tmp_path / "root"))


def ckpt(root: Path, which: str = "last", name: str = "ok", task: str = TASK) -> Path:
    paths = TinyRun(root=root, task=task, name=name).paths()
    return paths.last if which == "last" else paths.best


# ------------------------------------------------------------------------------------------- usage / config

CONFIG_CASES = {
    "unknown-task": (["--task", "lra-nothing"], "unknown task"),
    "misspelled-key": (["--set=sparsity.densty=0.1"], "did you mean 'density'"),
    "unknown-section": (["--set=modle.dim=8"], "unknown config section"),
    "malformed-set": (["--set", "model.dim"], "--set expects"),
    "wrong-type": (['--set=training.batch_size="four"'], "type int"),
    "density-zero": (["--set=sparsity.density=0"], "density"),
    "density-above-one": (["--set=sparsity.density=1.5"], "density"),
    "block-size-not-dividing": (["--set=sparsity.block_size=24"], "must divide"),
    "negative-sk": (["--sk", "-1"], "non-negative"),
    "negative-ds": (["--ds", "-0.5"], "non-negative"),
    "zero-steps": (["--train_steps", "0"], "train_steps"),
    "infinite-learning-rate": (["--set=training.learning_rate=Infinity"], "finite"),
    "missing-data-dir": (["--data_dir", "no/such/folder"], "does not exist"),
    "resume-nothing": (["--resume"], "no checkpoint"),
    "bad-generator-settings": (["--preset", "quick", '--set=dataset.generate={"n_train": 0}'], "generate"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_usage(case, data, tmp_path):
    extra, match = CONFIG_CASES[case]
    data_dir = None if "--data_dir" in extra or "--preset" in extra else data
    r = train_cli(tmp_path, data_dir, *extra)  # the case's arguments come last and win
    refused(r, match)
    nothing_written(tmp_path)
    assert not (tmp_path / "data").exists()  # no generated data for a refused config


def test_root_that_is_a_file(data, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    r = train_cli(tmp_path, data, "--root", str(tmp_path / "afile"))
    refused(r, "not a folder")
    assert (tmp_path / "afile").read_text() == "not a folder"


# ---------------------------------------------------------------------------------------------- data


def _arrays(data: Path, split: str) -> dict:
    with np.load(data / f"{TASK}.{split}.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _rewrite(data: Path, split: str, **arrays) -> None:
    a = _arrays(data, split)
    a.update(arrays)
    np.savez(data / f"{TASK}.{split}.npz", **a)


def test_truncated_npz(bad_data, tmp_path):
    path = bad_data / f"{TASK}.train.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(train_cli(tmp_path, bad_data), "truncated or corrupt")
    nothing_written(tmp_path)


def test_npz_with_object_array_is_refused_unrun(bad_data, tmp_path):
    marker = tmp_path / "payload-ran"
    a = _arrays(bad_data, "train")
    a["y"] = np.array([payload(marker)] * len(a["y"]), dtype=object)
    np.savez(bad_data / f"{TASK}.train.npz", **a)  # object arrays are pickled
    refused(train_cli(tmp_path, bad_data), "pickle")
    assert not marker.exists(), "unpickling ran code"
    nothing_written(tmp_path)


def test_labels_out_of_range(bad_data, tmp_path):
    y = _arrays(bad_data, "dev")["y"].copy()
    y[0] = 10  # ListOps has classes 0..9
    _rewrite(bad_data, "dev", y=y)
    refused(train_cli(tmp_path, bad_data), "labels must lie in [0, 9]")
    nothing_written(tmp_path)


def test_empty_split(bad_data, tmp_path):
    a = _arrays(bad_data, "test")
    _rewrite(bad_data, "test", x=a["x"][:0], lengths=a["lengths"][:0], y=a["y"][:0])
    refused(train_cli(tmp_path, bad_data), "empty split")
    nothing_written(tmp_path)


def test_sequences_longer_than_max_seq_len(data, tmp_path):
    assert _arrays(data, "train")["lengths"].max() > 32
    r = train_cli(tmp_path, data, "--set=dataset.max_seq_len=32")
    refused(r, "exceed max_seq_len 32")
    nothing_written(tmp_path)


def test_class_token_needs_a_free_position(bad_data, tmp_path):
    """model.pooling 'cls' takes position 0, so a sequence that fills all max_seq_len positions is refused at
    start-up (one line), not mid-run."""
    a = _arrays(bad_data, "train")
    assert a["x"].shape[1] == 64
    x, lengths = a["x"].copy(), a["lengths"].copy()
    x[0, :] = 6  # the digit 0 in every position
    lengths[0] = 64
    _rewrite(bad_data, "train", x=x, lengths=lengths)
    refused(train_cli(tmp_path, bad_data, "--set=model.pooling=cls"),
            "exceed max_seq_len 64 less the 1 the class token takes")
    nothing_written(tmp_path)


def test_token_ids_outside_vocabulary(bad_data, tmp_path):
    x = _arrays(bad_data, "train")["x"].copy()
    x[0, 0] = 999
    _rewrite(bad_data, "train", x=x)
    refused(train_cli(tmp_path, bad_data), "token ids outside")
    nothing_written(tmp_path)


def test_float_arrays(bad_data, tmp_path):
    _rewrite(bad_data, "train", x=_arrays(bad_data, "train")["x"].astype(np.float32))
    refused(train_cli(tmp_path, bad_data), "integer arrays")
    nothing_written(tmp_path)


def test_lengths_inconsistent_with_tokens(bad_data, tmp_path):
    lengths = _arrays(bad_data, "train")["lengths"].copy()
    lengths[3] = 0  # an example with no token: nothing to attend to
    _rewrite(bad_data, "train", lengths=lengths)
    refused(train_cli(tmp_path, bad_data), "lengths must lie in")
    nothing_written(tmp_path)


def test_missing_meta(bad_data, tmp_path):
    (bad_data / f"{TASK}.meta.json").unlink()
    refused(train_cli(tmp_path, bad_data), "meta.json")
    nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_inference_without_checkpoint(run_root):
    before = snapshot(run_root)
    refused(infer_cli(run_root, name="never-trained"), "no checkpoint")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_existing_run_is_not_overwritten(run_root, data):
    before = snapshot(run_root)
    refused(train_cli(run_root, data, name="ok"), "already exists")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_inference_with_checkpoint_of_another_task(run_root):
    other = ckpt(run_root, "best", task="lra-text")
    other.parent.mkdir(parents=True)
    shutil.copy(ckpt(run_root, "best"), other)
    before = snapshot(run_root)
    refused(infer_cli(run_root, task="lra-text"), "holds task lra-listops")
    assert snapshot(run_root) == before


def _tamper(path: Path, change) -> None:
    state = load_checkpoint(path)
    state.pop("format")
    change(state)
    save_checkpoint(path, state)


@pytest.mark.slow
def test_inference_with_checkpoint_of_another_shape(run_root):
    _tamper(ckpt(run_root, "best"), lambda s: s["config"]["model"].update(dim=32))
    before = snapshot(run_root)
    refused(infer_cli(run_root), "does not match the model")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_resume_with_another_shape(run_root, data):
    before = snapshot(run_root)
    refused(train_cli(run_root, data, "--resume", "--set=model.dim=32", name="ok"),
            "--resume: model.dim is 16 in the checkpoint, 32 on the command line")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_resume_with_checkpoint_of_another_task(run_root, data):
    def other_task(s):
        s["task"] = s["config"]["task"] = "lra-text"

    _tamper(ckpt(run_root), other_task)
    before = snapshot(run_root)
    refused(train_cli(run_root, data, "--resume", name="ok"), "holds task lra-text, not lra-listops")
    assert snapshot(run_root) == before


def _corrupt(path: Path) -> None:
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    b[mid : mid + 64] = os.urandom(64)
    path.write_bytes(bytes(b))


@pytest.mark.slow
def test_inference_with_corrupted_checkpoint(run_root):
    _corrupt(ckpt(run_root, "best"))
    before = snapshot(run_root)
    refused(infer_cli(run_root), "corrupt")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_resume_with_corrupted_checkpoint(run_root, data):
    _corrupt(ckpt(run_root))
    before = snapshot(run_root)
    refused(train_cli(run_root, data, "--resume", name="ok"), "corrupt")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_resume_with_truncated_checkpoint(run_root, data):
    path = ckpt(run_root)
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(run_root)
    refused(train_cli(run_root, data, "--resume", name="ok"), "corrupt")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_resume_with_damaged_but_loadable_checkpoint(run_root, data):
    _tamper(ckpt(run_root), lambda s: s.pop("scheduler"))
    before = snapshot(run_root)
    refused(train_cli(run_root, data, "--resume", name="ok"), "damaged")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_resume_with_damaged_optimizer_state(run_root, data):
    _tamper(ckpt(run_root), lambda s: s["optimizer"]["param_groups"].pop())
    before = snapshot(run_root)
    refused(train_cli(run_root, data, "--resume", name="ok"), "damaged")
    assert snapshot(run_root) == before


@pytest.mark.slow
def test_checkpoint_with_pickled_object_is_refused_unrun(run_root, data, tmp_path):
    marker = tmp_path / "payload-ran"
    for which in ("best", "last"):
        state = load_checkpoint(ckpt(run_root, which))
        state["extra"] = payload(marker)
        torch.save(state, ckpt(run_root, which))  # plain pickle inside, as a hostile file would be
    before = snapshot(run_root)
    refused(infer_cli(run_root), "corrupt or not a SAT checkpoint")
    refused(train_cli(run_root, data, "--resume", name="ok"), "corrupt or not a SAT checkpoint")
    assert not marker.exists(), "loading a checkpoint ran code"
    assert snapshot(run_root) == before


# ---------------------------------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_nan_from_the_first_step_writes_no_checkpoint(data, tmp_path):
    """lr 1e30: the first update already breaks the weights; that state is never checkpointed."""
    r = train_cli(
        tmp_path,
        data,
        "--set=training.learning_rate=1e30",
        "--set=training.warmup_steps=0",
        "--set=training.eval_frequency=1",
    )
    refused(r, "no checkpoint was written", code=1)
    assert "diverged" in r.stderr or "non-finite" in r.stderr
    assert not list(tmp_path.rglob("*.model")), "a checkpoint of the diverged model was written"
    no_temporaries(tmp_path)


@pytest.mark.slow
def test_nan_after_the_switch_keeps_the_last_good_checkpoint(data, tmp_path):
    """A huge LR factor after the attention switch (step 2) makes the loss non-finite: exit 1, the checkpoint
    of step 2 (before the switch took effect) is kept, loads, and evaluates; a --resume repeats the failure
    cleanly without touching it."""
    r = train_cli(tmp_path, data, "--set=sparsity.lr_scale_after_transition=1e30", "--train_steps", "8")
    refused(r, "last good checkpoint", code=1)
    assert "non-finite" in r.stderr or "diverged" in r.stderr
    state = load_checkpoint(ckpt(tmp_path, name="run"))
    assert state["step"] == 2 and state["scheduler"]["transition_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    no_temporaries(tmp_path)
    before = snapshot(tmp_path / "checkpoints")
    refused(
        train_cli(
            tmp_path, data, "--set=sparsity.lr_scale_after_transition=1e30", "--train_steps", "8", "--resume"
        ),
        "last good checkpoint",
        code=1,
    )
    assert snapshot(tmp_path / "checkpoints") == before
    e = infer_cli(tmp_path, "--which", "last", name="run")
    assert e.returncode == 0, e.stderr[-3000:]
