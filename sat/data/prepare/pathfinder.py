"""Pathfinder -> processed lra-pathfinder data: grayscale PNG pixels as ids 0-255 (no padding).

Reads ``RAW/pathfinder32/{difficulty}/metadata/*.npy``: despite the suffix these are text files, one image per
line, whitespace-separated ``imgs/{dir} {file} ... label`` with the label (0/1) in the 4th field; the image is
``RAW/pathfinder32/{difficulty}/imgs/{dir}/{file}``, a 32x32 grayscale PNG, flattened row by row to 1024 ids.

Order and split: metadata files in natural name order (0.npy, 1.npy, ..., 10.npy), lines in file order; that
list is shuffled with ``numpy.random.default_rng(0).permutation`` and cut 80/10/10 into train/dev/test (dev
and test get floor(n/10) each). An image listed but missing is skipped and counted (meta "skipped_missing");
a metadata line with fewer than 4 fields or a label other than 0/1 is an error, as is an unreadable image or
one of the wrong size.

    python -m preprocess.create_pathfinder --raw RAW --out OUT [--difficulty curv_baseline] [--force]
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sat.data.format import DataError, Split, sha256_of_files
from sat.data.prepare import (
    check_outputs,
    progress,
    release_folder,
    require_dir,
    write_task,
)

TASK = "lra-pathfinder"
DIFFICULTIES = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")
SPLIT_SEED = 0


def _natural_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def read_metadata(folder: Path) -> list[tuple[str, str, int]]:
    """(image dir, file name, label) of every line of every metadata file, in natural file order."""
    files = sorted((p for p in require_dir(folder, "Pathfinder metadata").iterdir() if p.suffix == ".npy"),
                   key=_natural_key)
    if not files:
        raise DataError(f"no metadata *.npy files in {folder}")
    entries = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError(f"{path} is not a text metadata file (lines 'imgs/DIR FILE ... LABEL')") from None
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 4:
                raise DataError(f"{path}:{lineno}: expected at least 4 whitespace-separated fields "
                                f"(imgs/DIR FILE ... LABEL), found {len(fields)}")
            if fields[3] not in ("0", "1"):
                raise DataError(f"{path}:{lineno}: label (4th field) {fields[3]!r} is not 0 or 1")
            entries.append((fields[0], fields[1], int(fields[3])))
    return entries


def _read_image(path: Path, side: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.size != (side, side):
                raise DataError(f"{path} is {im.size[0]}x{im.size[1]}, expected {side}x{side}")
            pixels = np.asarray(im if im.mode == "L" else im.convert("L"), dtype=np.int32)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path} is not a readable image ({e})") from None
    return pixels.reshape(-1)


def _fill(base: Path, entries: list[tuple[str, str, int]], side: int, desc: str) -> tuple[Split, list[Path]]:
    n = len(entries)
    x = np.zeros((n, side * side), dtype=np.int32)
    y = np.zeros(n, dtype=np.int64)
    read: list[Path] = []
    for d, f, label in progress(entries, n, desc):
        path = base / d / f
        if not path.is_file():
            continue
        x[len(read)], y[len(read)] = _read_image(path, side), label
        read.append(path)
    k = len(read)
    return Split(x=x[:k], lengths=np.full(k, side * side, dtype=np.int32), y=y[:k]), read


def preprocess_pathfinder(raw_dir: str | Path, out_dir: str | Path, difficulty: str = "curv_baseline",
                          force: bool = False, resolution: int = 32) -> dict:
    """Write ``{out_dir}/lra-pathfinder.{train,dev,test}.npz`` and the meta JSON; returns the meta."""
    check_outputs(out_dir, TASK, force)
    base = require_dir(release_folder(Path(raw_dir), f"pathfinder{resolution}", difficulty) / difficulty,
                       f"Pathfinder {difficulty}")
    meta_dir = base / "metadata"
    entries = read_metadata(meta_dir)
    n = len(entries)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_dev = n_test = n // 10
    n_train = n - n_dev - n_test
    parts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    splits, read = {}, []
    for s, idx in parts.items():
        splits[s], paths = _fill(base, [entries[i] for i in idx], resolution, f"{TASK} {s}")
        read += paths
    missing = n - len(read)
    meta = {"vocab_size": 256, "max_len": resolution * resolution, "num_classes": 2, "difficulty": difficulty,
            "image_size": [resolution, resolution], "skipped_missing": missing, "split_seed": SPLIT_SEED,
            "sha256": sha256_of_files([*meta_dir.glob("*.npy"), *read]), "source": str(base)}
    return write_task(out_dir, TASK, splits, meta)
