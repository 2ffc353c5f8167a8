"""Fashion-MNIST -> processed lra-image data: LRA's image protocol on Zalando's 28x28 grayscale release.

Reads the release's four IDX files (gzip as distributed, or already gunzipped), from ``--raw DIR`` or, by
default, from where Debian's ``dataset-fashion-mnist`` package put them (asked of ``dpkg -L``):

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   60000 images, labels 0-9
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    10000 images (the test split)

Each 28x28 image is zero-padded by 2 pixels on every side to 32x32, so that N = 1024 as for CIFAR-10 and a
block of 32 tokens is one image row, then flattened row by row to 1024 ids 0-255 (0 is a black pixel, not
padding: every length is 1024). Dev is the last 10% of the training file in its own order (54000 train /
6000 dev), as LRA takes the last 10% of CIFAR-10's training batches; test is t10k.

    python -m preprocess.create_fashion_mnist --out data/lra-image-fashion-mnist [--raw DIR] [--force]
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from sat.data.format import DataError, Split, sha256_of_files
from sat.data.prepare import check_outputs, write_task
from sat.data.prepare.idx import read_idx_pair

TASK = "lra-image"
SOURCE = "fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SIDE = 28            # the release's image side
PAD = 2              # zero pixels added on every side: 28 + 2 * 2 = 32
PADDED = SIDE + 2 * PAD
NUM_CLASSES = 10
DEV_FRACTION = 10    # dev = the last 1/10 of the training file
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
INSTALL_HINT = (f"install it with `apt-get install -y {DEBIAN_PACKAGE}` (as root, after apt-get update), or point "
                f"at a folder holding Zalando's four IDX files (--raw DIR for preprocess.create_fashion_mnist, "
                f"--data_dir DIR for main_train.py)")


def debian_folder() -> Path | None:
    """The folder where Debian's package installed the release, as `dpkg -L` lists it; None when dpkg is
    missing or the package is not installed."""
    if shutil.which("dpkg") is None:
        return None
    try:
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        p = Path(line.strip())
        if p.name == f"{FILES['train'][0]}.gz" and p.is_file():
            return p.parent
    return None


def release_files(raw_dir: str | Path | None = None) -> dict[str, tuple[Path, Path]]:
    """{split: (images file, labels file)} of the release in `raw_dir` (the Debian package's folder when
    None). A file may be gzipped (``.gz``, as distributed) or not."""
    folder = Path(raw_dir) if raw_dir is not None else debian_folder()
    if folder is None:
        raise DataError(f"Fashion-MNIST not found: the {DEBIAN_PACKAGE} package is not installed; {INSTALL_HINT}")
    if not folder.is_dir():
        raise DataError(f"no folder {folder}: point at a folder holding Zalando's four Fashion-MNIST IDX files")

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
        raise DataError(f"missing {stem}.gz in {folder}: point at a folder holding Zalando's four IDX files")

    return {split: (find(images), find(labels)) for split, (images, labels) in FILES.items()}


def to_lra_ids(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 -> (n, 1024) int32: zero-padded to 32x32, flattened row by row."""
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))
    return padded.reshape(len(images), PADDED * PADDED).astype(np.int32)


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(x=to_lra_ids(x), lengths=np.full(len(y), PADDED * PADDED, dtype=np.int32), y=y)


def read_splits(files: dict[str, tuple[Path, Path]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{train, dev, test}: (images (n, 28, 28) uint8, labels (n,) int64) of the release's files, every file
    checked; dev = the last 1/DEV_FRACTION of the training file, test = t10k. The one statement of the split
    protocol, shared by the LRA path (below) and the ViT path (sat/data/idx_images.py)."""
    x, y = read_idx_pair(*files["train"], side=SIDE, num_classes=NUM_CLASSES)
    test = read_idx_pair(*files["test"], side=SIDE, num_classes=NUM_CLASSES)
    n_dev = len(y) // DEV_FRACTION
    if n_dev == 0:
        raise DataError(f"{files['train'][0]} holds {len(y)} images, too few for a dev split of 1/{DEV_FRACTION}")
    n_train = len(y) - n_dev
    return {"train": (x[:n_train], y[:n_train]), "dev": (x[n_train:], y[n_train:]), "test": test}


def preprocess_fashion_mnist(out_dir: str | Path, raw_dir: str | Path | None = None, force: bool = False) -> dict:
    """Write ``{out_dir}/lra-image.{train,dev,test}.npz`` and the meta JSON; returns the meta. Every file is read
    and checked before anything is written."""
    check_outputs(out_dir, TASK, force)
    files = release_files(raw_dir)
    splits = {split: _split(x, y) for split, (x, y) in read_splits(files).items()}
    read = [p for pair in files.values() for p in pair]
    meta = {"vocab_size": 256, "max_len": PADDED * PADDED, "num_classes": NUM_CLASSES,
            "image_size": [PADDED, PADDED], "dataset": SOURCE, "classes": list(CLASSES),
            "raw_dir": str(read[0].parent.resolve()),
            "protocol": f"28x28 zero-padded by {PAD} to {PADDED}x{PADDED}, flattened row by row; dev = the last "
                        f"1/{DEV_FRACTION} of the training file, test = t10k",
            "sha256": sha256_of_files(read)}
    return write_task(out_dir, TASK, splits, meta)
