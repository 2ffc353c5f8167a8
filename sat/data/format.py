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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sat.fileio import atomic_write

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


def save_split(data_dir: str | Path, task: str, split: str, data: Split) -> Path:
    """Write one split atomically (a crash never leaves a half-written .npz)."""
    path = split_path(data_dir, task, split)
    arrays = {"x": data.x.astype(np.int32, copy=False), "lengths": data.lengths.astype(np.int32, copy=False),
              "y": data.y.astype(np.int64, copy=False)}
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def save_meta(data_dir: str | Path, task: str, meta: dict) -> Path:
    path = meta_path(data_dir, task)
    atomic_write(path, lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()))
    return path


def load_meta(data_dir: str | Path, task: str) -> dict:
    path = meta_path(data_dir, task)
    if not path.is_file():
        raise DataError(f"no {path}: run the preprocess script for {task} (docs/data.md) or pass --data_dir")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run the preprocess script with --force") from e


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, lengths, y of one .npz, read without pickle; any unreadable content is a DataError."""
    corrupt = f"{path} is truncated or corrupt"
    redo = "re-create it with the preprocess script"
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # zip, header and array parsers raise many types on damaged bytes
        if "allow_pickle" in str(e):
            raise DataError(f"{path} holds pickled data, which is refused (it could run code); {redo}") from e
        raise DataError(f"{corrupt} ({type(e).__name__}: {str(e)[:120]}); {redo}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is not an .npz archive; {redo}")
    with z:
        missing = {"x", "lengths", "y"} - set(z.files)
        if missing:
            raise DataError(f"{path} lacks arrays {sorted(missing)}; {redo}")
        try:
            return z["x"], z["lengths"], z["y"]
        except Exception as e:
            if "allow_pickle" in str(e):  # object arrays need pickle: refused, never unpickled
                raise DataError(f"{path} holds object arrays (pickle), which are refused; {redo}") from e
            raise DataError(f"{corrupt} ({type(e).__name__}: {str(e)[:120]}); {redo}") from e


def load_split(data_dir: str | Path, task: str, split: str, num_classes: int | None = None) -> Split:
    """Read and validate one split; every problem is a DataError saying what to do."""
    path = split_path(data_dir, task, split)
    if not path.is_file():
        raise DataError(f"no {path}: run the preprocess script for {task} (docs/data.md) or pass --data_dir")
    x, lengths, y = _read_arrays(path)
    redo = "re-create it with the preprocess script"
    if not all(np.issubdtype(a.dtype, np.integer) for a in (x, lengths, y)):
        raise DataError(f"{path}: x, lengths and y must be integer arrays; {redo}")
    if x.ndim not in (2, 3) or y.ndim != 1 or lengths.shape != x.shape[:-1] or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: inconsistent shapes x{x.shape} lengths{lengths.shape} y{y.shape}; {redo}")
    if y.shape[0] == 0:
        raise DataError(f"{path} is an empty split; re-create it from a non-empty raw data set")
    if x.shape[-1] == 0 or lengths.min() < 1 or lengths.max() > x.shape[-1]:
        raise DataError(f"{path}: lengths must lie in [1, {x.shape[-1]}], found [{lengths.min()}, "
                        f"{lengths.max()}]; {redo}")
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
