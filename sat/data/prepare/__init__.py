"""What every raw-data preparer shares: overwrite checks, required files, byte encoding, progress bars,
writing a processed task, and the small command-line plumbing of the ``preprocess/`` scripts.

Each preparer is an importable function that raises :class:`DataError` on missing or malformed input; the
``preprocess/create_X.py`` scripts are thin command lines over them, and :func:`run_cli` turns a DataError
into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from sat.data.format import SPLITS, DataError, Split, meta_path, save_meta, save_split, split_path

T = TypeVar("T")

BYTE_VOCAB_SIZE = 257  # byte-level ids: byte + 1, 0 = padding
DEV_EVERY = 10  # the byte-level text scripts put every 10th training example (index % 10 == 9) into dev


def base_parser(description: str, default_max_len: int | None = None,
                raw: bool = True) -> argparse.ArgumentParser:
    """Parser with the shared arguments: --raw (unless ``raw`` is False), --out, --force, and --max_len when
    ``default_max_len`` is given."""
    p = argparse.ArgumentParser(description=description)
    if raw:
        p.add_argument("--raw", required=True, help="folder holding the raw data set")
    p.add_argument("--out", required=True, help="folder for the processed {task}.{split}.npz and meta JSON")
    p.add_argument("--force", action="store_true", help="overwrite existing processed files")
    if default_max_len is not None:
        p.add_argument("--max_len", type=int, default=default_max_len,
                       help=f"sequence length to pad/truncate to (default {default_max_len})")
    return p


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's main; a DataError becomes ``error: ...`` on stderr and exit code 2."""
    try:
        main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_outputs(out_dir: str | Path, task: str, force: bool) -> None:
    """Refuse (DataError) to overwrite an existing processed task unless ``force``."""
    existing = [p for p in [meta_path(out_dir, task), *(split_path(out_dir, task, s) for s in SPLITS)]
                if p.exists()]
    if existing and not force:
        raise DataError(f"{existing[0]} already exists; pass --force to overwrite the processed {task} data")


def check_max_len(max_len: int) -> None:
    if max_len < 1:
        raise DataError(f"--max_len must be positive, got {max_len}")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"missing {what}: no folder {path}; check --raw (docs/data.md gives the expected layout)")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing {what}: no file {path}; check --raw (docs/data.md gives the expected layout)")
    return path


def encode_bytes(data: bytes, max_len: int) -> np.ndarray:
    """Byte-level ids (byte + 1) of the first ``max_len`` bytes, int32."""
    return np.frombuffer(data[:max_len], dtype=np.uint8).astype(np.int32) + 1


def progress(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """A tqdm progress bar on stderr (quiet for tiny inputs so that tests stay readable)."""
    return iter(tqdm(items, total=total, desc=desc, unit="ex", disable=total is not None and total < 1000,
                     mininterval=1.0))


def progress_bar(total: int, desc: str) -> tqdm:
    """A tqdm bar to ``update()`` by hand (for inputs read in chunks)."""
    return tqdm(total=total, desc=desc, unit="ex", disable=total < 1000, mininterval=1.0)


def write_task(out_dir: str | Path, task: str, splits: dict[str, Split], meta: dict) -> dict:
    """Save the three splits, then the meta JSON (written last: its presence marks a complete output).

    ``meta`` gets ``task`` and ``counts`` filled in; the caller gives vocab_size, max_len, num_classes and
    sha256.
    """
    for s in SPLITS:
        if len(splits[s]) == 0:
            raise DataError(f"the {s} split of {task} is empty; too few raw examples (or all were skipped)")
    meta = {**meta, "task": task, "counts": {s: len(splits[s]) for s in SPLITS}}
    for s in SPLITS:
        save_split(out_dir, task, s, splits[s])
    save_meta(out_dir, task, meta)
    return meta


def report(meta: dict, out_dir: str | Path) -> None:
    """One summary line on stdout."""
    counts = ", ".join(f"{s} {n}" for s, n in meta["counts"].items())
    extra = "".join(f"; {k} {v}" for k, v in meta.items() if k.startswith("skipped") and v)
    print(f"{meta['task']}: {counts} (max_len {meta['max_len']}, {meta['num_classes']} classes{extra}) "
          f"-> {Path(out_dir)}")


class ByteFiller:
    """Fills preallocated byte-level arrays example by example; empty texts are skipped and counted.

    ``inputs`` = 1 gives x (n, max_len) and lengths (n,); 2 gives x (n, 2, max_len) and lengths (n, 2).
    """

    def __init__(self, n: int, max_len: int, inputs: int = 1) -> None:
        shape = (n, max_len) if inputs == 1 else (n, inputs, max_len)
        self.x = np.zeros(shape, dtype=np.int32)
        self.lengths = np.zeros(shape[:-1], dtype=np.int32)
        self.y = np.zeros(n, dtype=np.int64)
        self.max_len, self.inputs, self.n, self.skipped_empty = max_len, inputs, 0, 0

    def add(self, texts: tuple[bytes, ...], label: int) -> None:
        if len(texts) != self.inputs:
            raise ValueError(f"expected {self.inputs} texts, got {len(texts)}")
        if not all(texts):
            self.skipped_empty += 1
            return
        for j, t in enumerate(texts):
            ids = encode_bytes(t, self.max_len)
            if self.inputs == 1:
                self.x[self.n, :len(ids)] = ids
                self.lengths[self.n] = len(ids)
            else:
                self.x[self.n, j, :len(ids)] = ids
                self.lengths[self.n, j] = len(ids)
        self.y[self.n] = label
        self.n += 1

    def split(self) -> Split:
        return Split(x=self.x[:self.n], lengths=self.lengths[:self.n], y=self.y[:self.n])


def write_byte_task(out_dir: str | Path, task: str, fillers: dict[str, ByteFiller], max_len: int,
                    meta: dict) -> dict:
    """write_task for the byte-level tasks: adds the byte vocabulary, max_len, the encoding and the count of
    skipped empty texts to the task's own meta keys (num_classes, labels, sha256, source...)."""
    meta = {**meta, "vocab_size": BYTE_VOCAB_SIZE, "max_len": max_len, "encoding": "byte + 1, 0 = padding",
            "skipped_empty": sum(f.skipped_empty for f in fillers.values())}
    return write_task(out_dir, task, {s: f.split() for s, f in fillers.items()}, meta)


def release_folder(raw_dir: Path, sub: str | Path, marker: str) -> Path:
    """`raw_dir/sub`, the release's folder inside the raw folder; or `raw_dir` itself when the user pointed at
    that folder directly (it holds `marker`, an entry the release folder has)."""
    inside = raw_dir / sub
    return inside if inside.is_dir() or not (raw_dir / marker).exists() else raw_dir
