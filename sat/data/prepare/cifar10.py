"""CIFAR-10 -> processed lra-image data: grayscale pixels as 1024 ids (0-255, no padding).

Reads the binary release ``RAW/cifar-10-batches-bin/data_batch_{1..k}.bin`` and ``test_batch.bin`` (each
record: 1 label byte, then 3072 bytes of R, G, B planes of 32x32). Grayscale the way LRA did, in float64:
``gray = trunc(255.5 * (0.2989 R + 0.5870 G + 0.1140 B) / 255)``. Dev is the last 10% (floor) of the
training batches concatenated in order, train the rest (45000 / 5000 for the full release); test is
test_batch. Lengths are all 1024: 0 is a real (black) pixel here, not padding.

The python-pickle release (``cifar-10-batches-py``) is read only with ``--allow-pickle``: unpickling can run
arbitrary code, so use it only for files you trust.

    python -m preprocess.create_cifar10 --raw RAW --out OUT [--force] [--allow-pickle]
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sat.data.format import DataError, Split, sha256_of_files
from sat.data.prepare import (
    check_outputs,
    progress_bar,
    require_file,
    write_task,
)

TASK = "lra-image"
SIDE = 32
PIXELS = SIDE * SIDE
RECORD = 1 + 3 * PIXELS
NUM_CLASSES = 10
CHUNK = 1000  # records decoded at a time
WEIGHTS = (0.2989, 0.5870, 0.1140)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(n, 3072) uint8 R,G,B planes -> (n, 1024) int32 gray values 0-255 (LRA's formula, float64)."""
    planes = rgb.reshape(-1, 3, PIXELS).astype(np.float64)
    lum = WEIGHTS[0] * planes[:, 0] + WEIGHTS[1] * planes[:, 1] + WEIGHTS[2] * planes[:, 2]
    return np.trunc(255.5 * lum / 255.0).astype(np.int32)


def _check_labels(labels: np.ndarray, where: Path) -> None:
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{where}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}: not CIFAR-10")


def _binary_chunks(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels, rgb) chunks of one binary batch file."""
    with open(path, "rb") as f:
        while True:
            buf = f.read(CHUNK * RECORD)
            if not buf:
                return
            rec = np.frombuffer(buf, dtype=np.uint8).reshape(-1, RECORD)
            _check_labels(rec[:, 0], path)
            yield rec[:, 0], rec[:, 1:]


def _pickle_chunks(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(labels, rgb) of one python-pickle batch file. Reached only with --allow-pickle."""
    import pickle  # allow-pickle: the user asked for the pickle release explicitly; never used otherwise

    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # allow-pickle
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * PIXELS or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape} do not match CIFAR-10's layout")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative label")
    _check_labels(labels, path)
    yield labels, data


def _count_binary(path: Path) -> int:
    size = path.stat().st_size
    if size == 0 or size % RECORD:
        raise DataError(f"{path}: {size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records "
                        f"(truncated or not the binary release)")
    return size // RECORD


def _count_pickle(path: Path) -> int:
    return sum(len(labels) for labels, _ in _pickle_chunks(path))


def _train_files(folder: Path, pattern: str) -> list[Path]:
    """data_batch_1..k in numeric order; a gap in the numbering is an error."""
    found = {}
    for p in folder.iterdir():
        m = re.fullmatch(pattern, p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise DataError(f"no training batches (data_batch_*) in {folder}")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise DataError(f"training batches in {folder} are numbered {sorted(found)}: one is missing")
    return [found[i] for i in sorted(found)]


def _locate(raw: Path, allow_pickle: bool):
    """(train files, test file, chunk reader, counter, kind) for the release found under ``raw``."""
    for folder in (raw / "cifar-10-batches-bin", raw):
        if (folder / "test_batch.bin").is_file() or (folder / "data_batch_1.bin").is_file():
            test = require_file(folder / "test_batch.bin", "CIFAR-10 test batch")
            train = _train_files(folder, r"data_batch_(\d+)\.bin")
            return train, test, _binary_chunks, _count_binary, "binary"
    for folder in (raw / "cifar-10-batches-py", raw):
        if (folder / "test_batch").is_file() or (folder / "data_batch_1").is_file():
            if not allow_pickle:
                raise DataError(f"{folder} is the python-pickle release, refused by default (unpickling "
                                f"can run code): use cifar-10-batches-bin (binary), or pass --allow-pickle")
            test = require_file(folder / "test_batch", "CIFAR-10 test batch")
            return _train_files(folder, r"data_batch_(\d+)"), test, _pickle_chunks, _count_pickle, "pickle"
    raise DataError(f"missing CIFAR-10: no cifar-10-batches-bin/ (binary release) under {raw}; check --raw")


def _read(files: list[Path], chunks, n: int, desc: str) -> Split:
    x = np.zeros((n, PIXELS), dtype=np.int32)
    y = np.zeros(n, dtype=np.int64)
    i = 0
    with progress_bar(n, desc) as bar:
        for path in files:
            for labels, rgb in chunks(path):
                x[i:i + len(labels)] = to_gray(rgb)
                y[i:i + len(labels)] = labels
                i += len(labels)
                bar.update(len(labels))
    if i != n:
        raise DataError(f"{desc}: read {i} images, expected {n} (a file changed while reading?)")
    return Split(x=x, lengths=np.full(n, PIXELS, dtype=np.int32), y=y)


def preprocess_cifar10(raw_dir: str | Path, out_dir: str | Path, force: bool = False,
                       allow_pickle: bool = False) -> dict:
    """Write ``{out_dir}/lra-image.{train,dev,test}.npz`` and the meta JSON; returns the meta."""
    check_outputs(out_dir, TASK, force)
    train_files, test_file, chunks, count, kind = _locate(Path(raw_dir), allow_pickle)
    n_train_all = sum(count(p) for p in train_files)
    n_test = count(test_file)
    full = _read(train_files, chunks, n_train_all, f"{TASK} train+dev")
    n_dev = n_train_all // 10
    n_train = n_train_all - n_dev
    splits = {
        "train": Split(full.x[:n_train], full.lengths[:n_train], full.y[:n_train]),
        "dev": Split(full.x[n_train:], full.lengths[n_train:], full.y[n_train:]),
        "test": _read([test_file], chunks, n_test, f"{TASK} test"),
    }
    meta = {"vocab_size": 256, "max_len": PIXELS, "num_classes": NUM_CLASSES, "image_size": [SIDE, SIDE],
            "dataset": "cifar-10",
            "grayscale": "trunc(255.5 * (0.2989 R + 0.5870 G + 0.1140 B) / 255), float64",
            "release": kind, "sha256": sha256_of_files([*train_files, test_file])}
    return write_task(out_dir, TASK, splits, meta)
