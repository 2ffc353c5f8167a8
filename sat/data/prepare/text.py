"""IMDB reviews (aclImdb) -> processed lra-text data, byte-level.

Reads ``RAW/aclImdb/{train,test}/{neg,pos}/*.txt`` (labels neg=0, pos=1). Ids are byte + 1 (0 = padding),
truncated to ``max_len`` bytes (default 4000). Order: neg files then pos files, each sorted by name. The dev
split is every 10th training review in that order (index % 10 == 9: exactly 10% of each class when the
class sizes are multiples of 10), train is the rest, test is ``aclImdb/test``. Empty reviews are skipped and
counted (meta "skipped_empty").

    python -m preprocess.create_text --raw RAW --out OUT [--max_len 4000] [--force]
"""

from __future__ import annotations

from pathlib import Path

from sat.data.format import DataError, sha256_of_files
from sat.data.prepare import (
    DEV_EVERY,
    ByteFiller,
    check_max_len,
    check_outputs,
    progress,
    release_folder,
    require_dir,
    write_byte_task,
)

TASK = "lra-text"
CLASSES = ("neg", "pos")


def _files(split_dir: Path) -> list[tuple[Path, int]]:
    """(path, label) of every review of one IMDB split, neg then pos, sorted by name."""
    out = []
    for label, cls in enumerate(CLASSES):
        files = sorted(require_dir(split_dir / cls, f"IMDB {split_dir.name}/{cls}").glob("*.txt"))
        if not files:
            raise DataError(f"no *.txt reviews in {split_dir / cls}")
        out += [(p, label) for p in files]
    return out


def _fill(files: list[tuple[Path, int]], max_len: int, desc: str) -> ByteFiller:
    filler = ByteFiller(len(files), max_len)
    for path, label in progress(files, len(files), desc):
        with open(path, "rb") as f:
            filler.add((f.read(max_len),), label)
    return filler


def preprocess_text(raw_dir: str | Path, out_dir: str | Path, max_len: int = 4000,
                    force: bool = False) -> dict:
    """Write ``{out_dir}/lra-text.{train,dev,test}.npz`` and the meta JSON; returns the meta."""
    check_max_len(max_len)
    check_outputs(out_dir, TASK, force)
    root = require_dir(release_folder(Path(raw_dir), "aclImdb", "train"), "IMDB folder aclImdb")
    train_files = _files(require_dir(root / "train", "IMDB train split"))
    test_files = _files(require_dir(root / "test", "IMDB test split"))
    groups = {
        "train": [e for i, e in enumerate(train_files) if i % DEV_EVERY != DEV_EVERY - 1],
        "dev": train_files[DEV_EVERY - 1::DEV_EVERY],
        "test": test_files,
    }
    fillers = {s: _fill(files, max_len, f"{TASK} {s}") for s, files in groups.items()}
    meta = {"num_classes": len(CLASSES), "labels": list(CLASSES),
            "sha256": sha256_of_files(p for p, _ in train_files + test_files), "source": str(root)}
    return write_byte_task(out_dir, TASK, fillers, max_len, meta)
