"""The ViT tasks on Fashion-MNIST (dataset.source "fashion-mnist", --preset fashion): the release's IDX files read
into memory with the LRA path's split, grayscale images through the ViT transforms and Mixup/CutMix, a model of
one input channel, an end-to-end run evaluated by main_inference.py, one-line refusals, and the real release when
it is installed. The IDX files are written from the format's definition (tests/test_fashion_mnist.py)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sat.checkpoint import load_checkpoint
from sat.config import ConfigError, load_config
from sat.data.batch import Batch
from sat.data.format import DataError
from sat.data.idx_images import MEAN, STD
from sat.data.image_transforms import IMAGENET_MEAN, eval_transform, to_normalized_tensor, train_transform
from sat.data.loading import default_data_dir, load_task_data, make_mixer, resolve_for_data
from sat.data.prepare import fashion_mnist as fm
from sat.models.vit import ViT
from tests.conftest import ROOT
from tests.fixtures import TinyRun, make_image_folder, nothing_written, refused
from tests.test_fashion_mnist import make_release

TASK = "imagenet-vit-ti"
N_TRAIN, N_TEST = 40, 12  # dev = the last 4 of the 40 training images


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (1, H, W) as the Fashion-MNIST transforms normalise it."""
    return ((torch.from_numpy(pixels.astype(np.float32)) / 255 - MEAN[0]) / STD[0]).unsqueeze(0)


def fashion(data_dir: Path, overrides: dict | None = None, need_train: bool = True):
    return load_task_data(load_config(TASK, "fashion", overrides), data_dir, need_train)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fashion")
    return folder, make_release(folder, N_TRAIN, N_TEST, seed=1)


# ---------------------------------------------------------------------------------------------------- the data

@pytest.mark.parametrize("gz", [True, False])
def test_splits_follow_the_lra_protocol(tmp_path: Path, gz: bool) -> None:
    arrays = make_release(tmp_path, N_TRAIN, N_TEST, seed=2, gz=gz)
    (x, y), (xt, yt) = arrays["train"], arrays["t10k"]
    data = fashion(tmp_path)
    s = data.splits
    assert data.name == "fashion-mnist" and data.found_classes() == 10 and s["dev"].classes == list(fm.CLASSES)
    assert (len(s["train"]), len(s["dev"]), len(s["test"])) == (36, 4, 12)  # dev = the last 10% of the file
    assert np.array_equal(s["train"].targets, y[:36]) and np.array_equal(data.labels("test"), yt)
    for i in range(4):  # crop_pct 1.0 at 28 px: the evaluation image is the file's, normalised
        image, label, substituted = s["dev"][i]
        assert label == y[36 + i] and substituted == 0
        torch.testing.assert_close(image, normalised(x[36 + i]), atol=1e-6, rtol=0)
    image, label, _ = s["test"][11]
    assert label == yt[11]
    torch.testing.assert_close(image, normalised(xt[11]), atol=1e-6, rtol=0)
    for i in range(36):
        image, label, _ = s["train"][i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == y[i]
    assert set(fashion(tmp_path, need_train=False).splits) == {"dev", "test"}


def test_images_come_out_at_the_configured_size(release) -> None:
    folder, arrays = release
    data = fashion(folder, {"dataset": {"img_size": 32}})
    assert data.splits["train"][0][0].shape == (1, 32, 32)
    resized = Image.fromarray(arrays["train"][0][36]).resize((32, 32), Image.BICUBIC)  # crop_pct 1.0: no crop
    torch.testing.assert_close(data.splits["dev"][0][0], normalised(np.asarray(resized)), atol=1e-6, rtol=0)


def test_grayscale_transforms_keep_one_channel() -> None:
    gray = Image.new("L", (28, 28), 200)
    for tf in (train_transform(28, mean=MEAN, std=STD), eval_transform(28, 1.0, mean=MEAN, std=STD)):
        torch.testing.assert_close(tf(gray), torch.full((1, 28, 28), (200 / 255 - MEAN[0]) / STD[0]))
    assert to_normalized_tensor(Image.new("RGB", (4, 4), (1, 2, 3))).shape == (3, 4, 4)  # RGB unchanged
    with pytest.raises(ValueError, match="1 channel"):
        to_normalized_tensor(gray, IMAGENET_MEAN)


def test_training_batches_mixup_and_evaluation_of_the_train_split(release) -> None:
    folder, arrays = release
    cfg = load_config(TASK, "fashion", {"training": {"batch_size": 8, "mixup": 0.8, "cutmix": 1.0}})
    data = load_task_data(cfg, folder)
    a, b = data.train_stream(seed=3), data.train_stream(seed=3)
    first = next(a)
    assert first.x.shape == (8, 1, 28, 28) and torch.equal(first.x, next(b).x)  # seeded augmentation
    mixer = make_mixer(resolve_for_data(cfg, data.found_classes(), len(a)), seed=0)
    mixed = []
    for _ in range(4):  # Mixup or CutMix on every batch
        x, targets = mixer(first.x, first.y)
        assert x.shape == (8, 1, 28, 28) and targets.shape == (8, 10)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        mixed.append(not torch.equal(x, first.x))
    assert any(mixed)
    # --split train evaluates the training images with the evaluation transform, normalised as Fashion-MNIST
    batch = next(iter(data.eval_batches("train")))
    torch.testing.assert_close(batch.x[0], normalised(arrays["train"][0][0]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------- channels

def test_the_model_has_one_input_channel(release, tmp_path: Path) -> None:
    folder, _ = release
    cfg = load_config(TASK, "fashion", {"model": {"num_layers": 1, "dim": 16, "hidden_dim": 64, "head_dim": 8}})
    assert cfg.dataset.channels == 0  # from the data
    data = load_task_data(cfg, folder)
    resolved = resolve_for_data(cfg, data.found_classes(), 5)
    assert (resolved.dataset.channels, resolved.dataset.num_classes, resolved.dataset.max_seq_len) == (1, 10, 224)
    model = ViT(resolved, backend="torch")
    assert model.patch_embed.in_channels == 1 and model.num_tokens == 197
    batch = next(data.train_stream(seed=0))
    assert model(batch).shape == (batch.x.shape[0], 10)
    with pytest.raises(ValueError, match="1-channel"):
        model(Batch(x=batch.x.expand(-1, 3, -1, -1), mask=None, y=batch.y))
    # image folders resolve to 3 (RGB); an explicit count must be the data's
    assert resolve_for_data(load_config(TASK, "tiny"), 4, 5).dataset.channels == 3
    with pytest.raises(DataError, match="1-channel images, but task imagenet-vit-ti expects 3"):
        fashion(folder, {"dataset": {"channels": 3}})
    with pytest.raises(DataError, match="3-channel images, but task imagenet-vit-ti expects 1"):
        load_task_data(load_config(TASK, "tiny", {"dataset": {"channels": 1}}), make_image_folder(tmp_path))
    with pytest.raises(ConfigError, match="dataset.channels applies to image_folder tasks"):
        load_config("lra-image", overrides={"dataset": {"channels": 1}})


def test_the_preset() -> None:
    cfg = load_config(TASK, "fashion")
    d, m, t, s = cfg.dataset, cfg.model, cfg.training, cfg.sparsity
    assert (d.source, d.img_size, d.patch_size, d.crop_pct, d.max_seq_len, s.block_size) == \
        ("fashion-mnist", 28, 2, 1.0, 224, 32)  # 197 tokens -> 7x7 blocks of 32
    assert m.dim < 192 and m.num_layers < 12 and (m.mlp, m.nblocks, s.s2d_fraction) == ("monarch", 4, 0.7)
    assert (s.sk, s.ds) == (1.7, 1.3) and 0 < s.max_dense_steps < t.train_steps and t.epochs == 0
    assert d.num_workers <= 1 and d.num_classes in (0, 10)


# ------------------------------------------------------------------------------------------------ end to end

# the tiny run on the preset's sequences and blocks, with Mixup and CutMix, no --name
FASHION = TinyRun(task=TASK, name=None, device="cpu", flags=("--preset", "fashion", *TinyRun.flags)).replace(sets={
    "model.hidden_dim": 64, "training.mixup": 0.8, "training.cutmix": 1.0, "dataset.max_seq_len": None,
    "sparsity.block_size": None, "sparsity.density": None})


def run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.slow
def test_preset_trains_switches_densifies_and_evaluates(release, tmp_path: Path) -> None:
    folder, _ = release
    fm_run = FASHION.replace(root=tmp_path, data=folder, name="fm")
    args = fm_run.argv()
    r = run("main_train.py", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task imagenet-vit-ti on fashion-mnist:" in r.stdout
    summary = json.loads(fm_run.paths().summary.read_text())
    assert summary["dataset"] == "fashion-mnist" and summary["steps"] == 4 and summary["seq_len"] == 224
    assert (summary["transition_step"], summary["transition_reason"], summary["densify_step"]) == (2, "forced", 2)
    state = load_checkpoint(fm_run.paths().best)
    assert state["config"]["dataset"]["channels"] == 1 and state["config"]["dataset"]["num_classes"] == 10
    for split, examples in (("test", N_TEST), ("train", 36)):  # the same flags evaluate the saved run
        e = run("main_inference.py", *args, "--split", split, cwd=tmp_path)
        assert e.returncode == 0, e.stderr[-3000:]
        out = json.loads(e.stdout.strip().splitlines()[-1])
        assert out["examples"] == examples and out["num_classes"] == 10 and out["attention"] == "block-sparse"


@pytest.mark.parametrize("case, match", [("labels_as_images", "magic 2049, expected 2051"),
                                         ("truncated", "truncated")])
def test_a_wrong_file_is_one_line_and_nothing_written(tmp_path: Path, case: str, match: str) -> None:
    raw = tmp_path / "raw"
    make_release(raw, N_TRAIN, N_TEST)
    images = raw / "train-images-idx3-ubyte.gz"
    if case == "labels_as_images":
        images.write_bytes((raw / "train-labels-idx1-ubyte.gz").read_bytes())
    else:
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    r = run("main_train.py", *FASHION.argv(root=tmp_path, data=raw), cwd=tmp_path)
    refused(r, match)
    nothing_written(tmp_path)


def test_without_the_package_says_how_to_install(tmp_path: Path) -> None:
    env = {"PATH": str(Path(sys.executable).parent)}  # no dpkg on the path: as if not installed
    r = run("main_train.py", *FASHION.argv(root=tmp_path), cwd=tmp_path, env=env)
    refused(r, "apt-get install -y dataset-fashion-mnist")
    assert "--data_dir DIR for main_train.py" in r.stderr
    nothing_written(tmp_path)
    assert not (tmp_path / "data").exists()


INSTALLED = fm.debian_folder()


@pytest.mark.skipif(INSTALLED is None, reason="the dataset-fashion-mnist package is not installed "
                                              "(`apt-get install -y dataset-fashion-mnist` as root; .ci/run does)")
def test_real_release() -> None:
    cfg = load_config(TASK, "fashion")
    folder = default_data_dir(cfg)
    assert folder == INSTALLED
    data = load_task_data(cfg, folder)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 54000, "dev": 6000, "test": 10000}
    assert np.bincount(data.labels("test"), minlength=10).tolist() == [1000] * 10  # t10k: 1,000 per class
    image, label, _ = data.splits["test"][0]
    assert image.shape == (1, 28, 28) and 0 <= label < 10 and image.max() > image.min()
