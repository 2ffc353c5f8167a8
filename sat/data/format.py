"""The processed-data format every preprocess script writes and every loader reads.

    {data_dir}/{task}.{split}.npz   split in {train, dev, test}
        x        int32, (n, L) for one input, (n, 2, L) for two (lra-retrieval); 0 is padding for token tasks
        lengths  int32, (n,) or (n, 2): real tokens per input (key mask = position < length)
        y        int64, (n,): class ids 0..num_classes-1
    {data_dir}/{task}.meta.json     task, vocab_size, max_len, num_classes, counts per split, the sha256 of
                                    what was read (and the vocabulary where there is one)

Files are read with allow_pickle=False: a file that needs pickle (object arrays) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "dev", "test")


class DataError(Exception):
    """Missing or malformed data; the message says what to do. CLIs turn it into exit code 2."""


@dataclass
class Split:
    x: np.ndarray        # (n, L) or (n, 2, L) int32
    lengths: np.ndarray  # (n,) or (n, 2) int32
    y: np.ndarray        # (n,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
    return Path(data_dir) / f"{task}.{split}.npz"


def meta_path(data_dir: str | Path, task: str) -> Path:
    return Path(data_dir) / f"{task}.meta.json"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_split(data_dir: str | Path, task: str, split: str, data: Split) -> Path:
    """Write one split atomically (a crash never leaves a half-written .npz)."""
    path = split_path(data_dir, task, split)
    arrays = {"x": data.x.astype(np.int32, copy=False), "lengths": data.lengths.astype(np.int32, copy=False),
              "y": data.y.astype(np.int64, copy=False)}
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def save_meta(data_dir: str | Path, task: str, meta: dict) -> Path:
    path = meta_path(data_dir, task)
    _atomic_write(path, lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()))
    return path


def load_meta(data_dir: str | Path, task: str) -> dict:
    path = meta_path(data_dir, task)
    if not path.is_file():
        raise DataError(f"no {path}: run the preprocess script for {task} (see README) or pass --data_dir")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run the preprocess script with --force") from e


def load_split(data_dir: str | Path, task: str, split: str, num_classes: int | None = None) -> Split:
    """Read and validate one split; every problem is a DataError saying what to do."""
    path = split_path(data_dir, task, split)
    if not path.is_file():
        raise DataError(f"no {path}: run the preprocess script for {task} (see README) or pass --data_dir")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x", "lengths", "y"} - set(z.files)
            if missing:
                raise DataError(f"{path} lacks arrays {sorted(missing)}; re-run the preprocess script with --force")
            x, lengths, y = z["x"], z["lengths"], z["y"]
    except DataError:
        raise
    except ValueError as e:  # object arrays need pickle: refused
        raise DataError(f"{path} holds object arrays (pickle), which are refused; re-create it with the "
                        f"preprocess script") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path} is truncated or corrupt ({e}); re-create it with the preprocess script") from e
    if not (np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{path}: x and y must be integer arrays; re-create it with the preprocess script")
    n = y.shape[0]
    if n == 0:
        raise DataError(f"{path} is an empty split; re-create it from a non-empty raw data set")
    if x.shape[0] != n or lengths.shape[0] != n or x.ndim not in (2, 3) or lengths.shape != x.shape[:-1]:
        raise DataError(f"{path}: inconsistent shapes x{x.shape} lengths{lengths.shape} y{y.shape}")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes - 1}], found [{y.min()}, {y.max()}]; "
                        f"check the task's num_classes or re-create the data")
    return Split(x=x.astype(np.int64), lengths=lengths.astype(np.int64), y=y.astype(np.int64))


def sha256_of_files(paths) -> str:
    """One checksum over the raw files read (sorted by name, streamed)."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
