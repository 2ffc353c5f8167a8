"""sat/data/loading.py: one interface to both task families (LRA .npz splits and image folders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sat.config import ConfigError, load_config
from sat.data.batch import Batch
from sat.data.format import DataError
from sat.data.loading import describe_batch, load_task_data, rank_batch
from tests.fixtures import CLASSES, TASK, make_image_folder, write_lra_data


def lra_cfg():
    return load_config(TASK, overrides={"dataset": {"max_seq_len": 16}, "training": {"batch_size": 4},
                                        "sparsity": {"block_size": 4, "density": 0.25}})


@pytest.fixture(scope="module")
def lra_dir(tmp_path_factory):
    return write_lra_data(tmp_path_factory.mktemp("lra"))


def test_lra_splits_batches_and_rank_shards(lra_dir):
    data = load_task_data(lra_cfg(), lra_dir)
    assert data.vocab_size == 20 and data.found_classes() == 10 and not data.image_folders
    np.testing.assert_array_equal(data.labels("test"), data.splits["test"].y)
    batch = next(data.train_stream(seed=3))
    assert isinstance(batch, Batch) and batch.x.shape == (4, 16) and batch.mask.shape == (4, 16)
    # batch_size is the global batch: two ranks take the two halves of the one-rank run's batch, step after step
    one, two = data.train_stream(seed=3), [data.train_stream(seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(6):  # past an epoch (16 examples = 4 batches): the reshuffle agrees too
        whole = next(one)
        shards = [next(s) for s in two]
        assert [len(s) for s in shards] == [2, 2]
        ids = sorted(int(i) for s in shards for i in s.x[:, 0])
        assert ids == sorted(whole.x[:, 0].tolist()) and len(set(ids)) == 4
    # evaluation: one ordered pass; with two ranks every example once
    assert torch.cat([b.x[:, 0] for b in data.eval_batches("dev")]).tolist() == list(range(6))
    shared = [int(i) for r in range(2) for b in data.eval_batches("dev", r, 2) for i in b.x[:, 0]]
    assert sorted(shared) == list(range(6))


def test_lra_batch_is_global_and_must_split_over_the_ranks():
    cfg = load_config(TASK, overrides={"training": {"batch_size": 12}})
    assert [rank_batch(cfg, w) for w in (1, 2, 3, 4, 6, 12)] == [12, 6, 4, 3, 2, 1]
    with pytest.raises(ConfigError) as e:
        rank_batch(cfg, 5)
    assert str(e.value) == ("training.batch_size 12 is the global batch of task lra-listops and does not split over "
                            "5 ranks; run on 1, 2, 3, 4, 6, 12 rank(s), or pass --batch_size a multiple of 5")
    big = load_config(TASK, overrides={"training": {"batch_size": 1024}})
    with pytest.raises(ConfigError, match=r"run on 1, 2, 4, 8, 16, 32, 64 rank\(s\)"):  # a sensible maximum listed
        rank_batch(big, 3)
    assert describe_batch(cfg, 3) == ("batch: 12 examples a step, 4 on each of 3 rank(s) (training.batch_size 12 is "
                                      "the global batch for this task)")


def test_image_batch_stays_per_gpu():
    cfg = load_config("imagenet-vit-ti", "tiny")
    assert rank_batch(cfg, 3) == 8 and describe_batch(cfg, 3).startswith("batch: 24 examples a step, 8 on each")


def test_a_split_smaller_than_the_global_batch_is_refused_on_several_ranks(lra_dir):
    cfg = load_config(TASK, overrides={"dataset": {"max_seq_len": 16}, "training": {"batch_size": 32},
                                       "sparsity": {"block_size": 4, "density": 0.25}})
    data = load_task_data(cfg, lra_dir)
    assert len(next(data.train_stream(seed=0))) == 16  # one rank: the whole split each step, as before
    with pytest.raises(ConfigError, match="16 examples, fewer than the global batch 32"):
        data.train_stream(seed=0, rank=0, world=2)


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
