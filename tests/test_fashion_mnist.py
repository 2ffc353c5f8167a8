"""Fashion-MNIST through LRA's image protocol: the IDX reader and the preprocessor, on files laid out byte for
byte as Zalando's release (big-endian headers, gzip), and once on the real release when it is installed."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sat.data.format import DataError, load_meta, load_split
from sat.data.prepare import fashion_mnist as fm
from sat.data.prepare.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, write_idx
from tests.fixtures import TinyRun, refused

ROOT = Path(__file__).resolve().parent.parent


def _idx_bytes(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written from the format's definition (not by the project's writer)."""
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in shape) + payload


def make_release(folder: Path, n_train: int = 20, n_test: int = 7, seed: int = 0, gz: bool = True) -> dict:
    """The release's four files with random images and labels; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        files = {f"{split}-images-idx3-ubyte": _idx_bytes(IMAGES_MAGIC, (n, 28, 28), x.tobytes()),
                 f"{split}-labels-idx1-ubyte": _idx_bytes(LABELS_MAGIC, (n,), y.tobytes())}
        for name, body in files.items():
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(body))
            else:
                (folder / name).write_bytes(body)
        out[split] = (x, y)
    return out


def test_header_magic_values_are_the_releases() -> None:
    assert IMAGES_MAGIC == 0x00000803 and LABELS_MAGIC == 0x00000801


def test_protocol_pads_to_32_and_flattens_row_by_row(tmp_path: Path) -> None:
    arrays = make_release(tmp_path / "raw")
    meta = fm.preprocess_fashion_mnist(tmp_path / "out", tmp_path / "raw")
    x, y = arrays["train"]
    train, dev = load_split(tmp_path / "out", "lra-image", "train"), load_split(tmp_path / "out", "lra-image", "dev")
    test = load_split(tmp_path / "out", "lra-image", "test")
    assert (len(train), len(dev), len(test)) == (18, 2, 7)  # dev = the last 10% of the training file
    assert meta["counts"] == {"train": 18, "dev": 2, "test": 7} and meta["dataset"] == "fashion-mnist"
    assert meta["max_len"] == 1024 and meta["vocab_size"] == 256 and meta["num_classes"] == 10
    img = train.x[3].reshape(32, 32)
    assert (img[:2] == 0).all() and (img[-2:] == 0).all() and (img[:, :2] == 0).all() and (img[:, -2:] == 0).all()
    assert np.array_equal(img[2:30, 2:30], x[3])
    # pixel (r, c) of the 28x28 image is token (r + 2) * 32 + (c + 2): one 32-token block is one image row
    assert train.x[3][(5 + 2) * 32 + (9 + 2)] == x[3][5, 9]
    assert np.array_equal(dev.x[1].reshape(32, 32)[2:30, 2:30], x[19]) and dev.y[1] == y[19]
    assert np.array_equal(train.y, y[:18]) and np.array_equal(test.y, arrays["t10k"][1])
    assert (train.lengths == 1024).all() and (test.lengths == 1024).all()
    assert 0 <= train.x.min() and train.x.max() <= 255


def test_uncompressed_files_read_alike(tmp_path: Path) -> None:
    make_release(tmp_path / "gz", seed=3)
    make_release(tmp_path / "plain", seed=3, gz=False)
    fm.preprocess_fashion_mnist(tmp_path / "a", tmp_path / "gz")
    fm.preprocess_fashion_mnist(tmp_path / "b", tmp_path / "plain")
    for split in ("train", "dev", "test"):
        assert np.array_equal(load_split(tmp_path / "a", "lra-image", split).x,
                              load_split(tmp_path / "b", "lra-image", split).x)


def test_writer_round_trips(tmp_path: Path) -> None:
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "i.gz", a)
    assert np.array_equal(read_idx(tmp_path / "i.gz", IMAGES_MAGIC), a)


def _corrupt(folder: Path, name: str, body: bytes, gz: bool = True) -> None:
    (folder / name).write_bytes(gzip.compress(body) if gz else body)


@pytest.mark.parametrize("case, match", [
    ("labels_as_images", "magic 2049, expected 2051"),
    ("truncated_images", "truncated"),
    ("truncated_gzip", "gzip"),
    ("count_mismatch", "not a pair"),
    ("wrong_side", "expected 28x28"),
    ("bad_label", "label 12"),
    ("missing", "missing t10k-labels-idx1-ubyte.gz"),
])
def test_malformed_release_is_one_error_and_nothing_written(tmp_path: Path, case: str, match: str) -> None:
    raw = tmp_path / "raw"
    make_release(raw)
    train_images = raw / "train-images-idx3-ubyte.gz"
    if case == "labels_as_images":
        train_images.write_bytes((raw / "train-labels-idx1-ubyte.gz").read_bytes())
    elif case == "truncated_images":
        _corrupt(raw, train_images.name, gzip.decompress(train_images.read_bytes())[:-100])
    elif case == "truncated_gzip":
        train_images.write_bytes(train_images.read_bytes()[:500])
    elif case == "count_mismatch":
        _corrupt(raw, "t10k-labels-idx1-ubyte.gz", _idx_bytes(LABELS_MAGIC, (6,), bytes(6)))
    elif case == "wrong_side":
        _corrupt(raw, "t10k-images-idx3-ubyte.gz", _idx_bytes(IMAGES_MAGIC, (7, 32, 32), bytes(7 * 1024)))
    elif case == "bad_label":
        _corrupt(raw, "t10k-labels-idx1-ubyte.gz", _idx_bytes(LABELS_MAGIC, (7,), bytes([12] * 7)))
    elif case == "missing":
        (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=match):
        fm.preprocess_fashion_mnist(tmp_path / "out", raw)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    r = subprocess.run([sys.executable, "-m", "preprocess.create_fashion_mnist", "--raw", str(raw), "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    refused(r, match)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_package_and_no_raw_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fm, "debian_folder", lambda: None)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fm.preprocess_fashion_mnist(tmp_path / "out")


def test_debian_folder_is_asked_of_dpkg(tmp_path: Path, monkeypatch) -> None:
    make_release(tmp_path / "share")
    listing = "\n".join(["/.", "/usr/share/doc/x", *(str(p) for p in sorted((tmp_path / "share").iterdir()))])

    def fake_run(cmd, **kw):
        assert cmd == ["dpkg", "-L", "dataset-fashion-mnist"]
        return subprocess.CompletedProcess(cmd, 0, stdout=listing, stderr="")

    monkeypatch.setattr(fm.shutil, "which", lambda name: "/usr/bin/dpkg")
    monkeypatch.setattr(fm.subprocess, "run", fake_run)
    assert fm.debian_folder() == tmp_path / "share"


INSTALLED = fm.debian_folder()


@pytest.mark.skipif(INSTALLED is None, reason="the dataset-fashion-mnist package is not installed "
                                              "(`apt-get install -y dataset-fashion-mnist` as root; .ci/run does)")
def test_real_release(tmp_path: Path) -> None:
    meta = fm.preprocess_fashion_mnist(tmp_path)
    assert meta["counts"] == {"train": 54000, "dev": 6000, "test": 10000}
    assert Path(meta["raw_dir"]) == INSTALLED.resolve()
    test = load_split(tmp_path, "lra-image", "test")
    assert np.bincount(test.y, minlength=10).tolist() == [1000] * 10  # t10k: 1,000 images per class
    img = test.x[0].reshape(32, 32)
    assert (img[:2] == 0).all() and img[2:30, 2:30].max() > 0
    assert load_meta(tmp_path, "lra-image")["sha256"] == meta["sha256"]


# ------------------------------------------------------------------------------------ --preset image


def test_preset_prepares_the_release_on_first_use(tmp_path: Path, monkeypatch) -> None:
    from sat.config import load_config
    from sat.data.loading import default_data_dir, load_task_data, prepare_data

    make_release(tmp_path / "share", n_train=30, n_test=10)
    monkeypatch.setattr(fm, "debian_folder", lambda: tmp_path / "share")
    cfg = load_config("lra-image", "image")
    folder = default_data_dir(cfg, tmp_path)
    assert folder == tmp_path / "data" / "lra-image-fashion-mnist"
    prepare_data(cfg, folder)
    data = load_task_data(cfg, folder)
    assert data.name == "fashion-mnist" and len(data.splits["dev"]) == 3
    stamp = (folder / "lra-image.meta.json").stat().st_mtime_ns
    prepare_data(cfg, folder)  # already there: not made again
    assert (folder / "lra-image.meta.json").stat().st_mtime_ns == stamp


# the tiny run on the preset's sequences and blocks, no --name, the default attention backend and device
IMAGE = TinyRun(task="lra-image", name=None, seed=3, flags=("--preset", "image", "--no_progress")).replace(sets={
    "dataset.max_seq_len": None, "sparsity.block_size": None, "sparsity.density": None})


def _small_image_run(tmp_path: Path, env: dict | None = None, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main_train.py"), *IMAGE.argv(root=tmp_path, **overrides)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def test_preset_without_the_package_is_one_line_and_nothing_written(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no dpkg on the path: as if not installed
    r = _small_image_run(tmp_path, env=env)
    refused(r, "apt-get install -y dataset-fashion-mnist")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()
    assert not any((tmp_path / "data" / "lra-image-fashion-mnist").glob("*.npz"))


def test_preset_refuses_other_data(tmp_path: Path) -> None:
    from sat.data.format import Split, save_meta, save_split

    other = tmp_path / "cifar"
    for split in ("train", "dev", "test"):
        save_split(other, "lra-image", split, Split(np.zeros((4, 1024), np.int32), np.full(4, 1024, np.int32),
                                                    np.arange(4) % 10))
    save_meta(other, "lra-image", {"vocab_size": 256, "num_classes": 10, "dataset": "cifar-10"})
    r = _small_image_run(tmp_path, data=other)
    refused(r, "holds cifar-10 data, but the config asks for fashion-mnist")


def test_preset_trains_and_the_summary_names_the_data(tmp_path: Path) -> None:
    import json

    make_release(tmp_path / "raw", n_train=40, n_test=12)
    fm.preprocess_fashion_mnist(tmp_path / "fm", tmp_path / "raw")
    r = _small_image_run(tmp_path, data=tmp_path / "fm", name="fm")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "task lra-image on fashion-mnist:" in r.stdout
    summary = json.loads(IMAGE.paths(root=tmp_path, name="fm").summary.read_text())
    assert summary["dataset"] == "fashion-mnist" and summary["transition_step"] == 2
    assert summary["selection"] == "global" and summary["keep_diagonal"] is True
