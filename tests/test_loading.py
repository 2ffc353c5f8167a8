"""sat/data/loading.py: one interface to both task families (LRA .npz splits and image folders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sat.config import load_config
from sat.data.batch import Batch
from sat.data.format import DataError, Split, save_meta, save_split
from sat.data.listops import TOKENS
from sat.data.loading import load_task_data
from sat.data.lra import LRALoader
from tests.test_vit import CLASSES, make_image_folder

TASK = "lra-listops"


def lra_cfg():
    return load_config(TASK, overrides={"dataset": {"max_seq_len": 16}, "training": {"batch_size": 4},
                                        "sparsity": {"block_size": 4, "density": 0.25}})


def write_lra_data(root, sizes=(16, 6, 5), seq_len=16):
    """Processed ListOps-shaped splits whose first token is the example's number (so batches say which
    examples they hold), vocabulary 20, 10 classes."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "dev", "test"), sizes, strict=True):
        x = rng.integers(1, 20, (n, seq_len))
        x[:, 0] = np.arange(n)
        lengths = rng.integers(seq_len // 2, seq_len + 1, n)
        save_split(root, TASK, split, Split(x, lengths, rng.integers(0, 10, n)))
    save_meta(root, TASK, {"vocab_size": 20, "tokens": TOKENS})
    return root


@pytest.fixture(scope="module")
def lra_dir(tmp_path_factory):
    return write_lra_data(tmp_path_factory.mktemp("lra"))


def test_lra_splits_batches_and_rank_shards(lra_dir):
    data = load_task_data(lra_cfg(), lra_dir)
    assert data.vocab_size == 20 and data.found_classes() == 10 and not data.image_folders
    np.testing.assert_array_equal(data.labels("test"), data.splits["test"].y)
    batch = next(data.train_stream(seed=3))
    assert isinstance(batch, Batch) and batch.x.shape == (4, 16) and batch.mask.shape == (4, 16)
    # two ranks take the two halves of the same global batch of 2 x 4
    whole = next(LRALoader(data.splits["train"], 8, 16, shuffle=True, seed=3, repeat=True, drop_last=True))
    shards = [next(data.train_stream(seed=3, rank=r, world=2)) for r in range(2)]
    ids = sorted(int(i) for s in shards for i in s.x[:, 0])
    assert ids == sorted(whole.x[:, 0].tolist()) and len(set(ids)) == 8
    # evaluation: one ordered pass; with two ranks every example once
    assert torch.cat([b.x[:, 0] for b in data.eval_batches("dev")]).tolist() == list(range(6))
    shared = [int(i) for r in range(2) for b in data.eval_batches("dev", r, 2) for i in b.x[:, 0]]
    assert sorted(shared) == list(range(6))


def test_missing_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(lra_cfg(), tmp_path / "nowhere")


def test_image_folders_through_the_same_interface(tmp_path):
    root = make_image_folder(tmp_path, per_class=2, val_per_class=1)
    cfg = load_config("imagenet-vit-ti", "tiny", {"dataset": {"num_workers": 0}})
    data = load_task_data(cfg, root)
    assert data.image_folders and data.vocab_size == 0 and data.found_classes() == CLASSES
    batch = next(data.train_stream(seed=0))
    assert isinstance(batch, Batch) and batch.x.shape == (8, 3, 32, 32) and batch.mask is None
    evaluated = list(data.eval_batches("dev"))
    assert sum(len(b) for b in evaluated) == CLASSES and evaluated[0].x.shape[1:] == (3, 32, 32)
    assert list(data.labels("test")) == list(range(CLASSES))  # no test/ folder: val again
    no_train = load_task_data(cfg, root, need_train=False)
    assert set(no_train.splits) == {"dev", "test"}
