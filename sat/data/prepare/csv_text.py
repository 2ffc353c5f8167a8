"""Generic byte-level text classification from CSV files (AG News, Yelp, ...) -> processed data.

Each row is ``label,text[,more text...]``: the first column is the label, the remaining columns are joined
with a space (AG News: title and description). A first row whose label is a column name (label, class, target,
sentiment, rating, stars, y) is a header and skipped. Labels: the sorted distinct training label values
(numerically when all are integers, e.g. AG News' 1..4) map to 0..C-1; the mapping is stored in the meta as
"label_map" and a test label unseen in training is an error. Texts become byte + 1 ids (0 = padding)
truncated to ``max_len`` bytes; empty texts are skipped and counted. Dev is every 10th training row
(index % 10 == 9), train the rest. Each file is read twice (labels and count, then fill).

    python -m preprocess.create_csv_text --train train.csv --test test.csv --out OUT [--name NAME]
        [--max_len 4000] [--force]

The files are those of task ``csv-text`` (``{OUT}/csv-text.{split}.npz``), which trains on any such folder:
``python main_train.py --task csv-text --data_dir OUT`` (the class count comes from the meta); ``--name``
(e.g. agnews) is kept in the meta for people.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from sat.data.format import DataError, sha256_of_files
from sat.data.prepare import (
    DEV_EVERY,
    ByteFiller,
    check_max_len,
    check_outputs,
    progress,
    require_file,
    write_byte_task,
)

TASK = "csv-text"  # the task every CSV text data set trains as
HEADER_NAMES = {"label", "labels", "class", "target", "sentiment", "rating", "stars", "y"}
ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # round-trips any bytes


def _rows(path: Path) -> Iterator[tuple[str, bytes]]:
    """(label string, text bytes) of each data row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", **ENCODING) as f:
        try:
            for i, row in enumerate(csv.reader(f)):
                if not row:
                    continue
                if len(row) < 2:
                    raise DataError(f"{path}: row {i + 1} has {len(row)} column(s); expected label,text")
                label = row[0].strip()
                if i == 0 and label.lower() in HEADER_NAMES:
                    continue
                yield label, " ".join(row[1:]).encode(**ENCODING)
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV ({e})") from None


def _label_map(labels: set[str]) -> dict[str, int]:
    try:
        ordered = sorted(labels, key=int)
    except ValueError:
        ordered = sorted(labels)
    return {v: i for i, v in enumerate(ordered)}


def preprocess_csv_text(train_csv: str | Path, test_csv: str | Path, out_dir: str | Path,
                        name: str = "csv", max_len: int = 4000, force: bool = False) -> dict:
    """Write ``{out_dir}/csv-text.{train,dev,test}.npz`` and the meta JSON (with ``name``); returns the meta."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DataError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    task = TASK
    check_max_len(max_len)
    check_outputs(out_dir, task, force)
    train_path = require_file(Path(train_csv), "training CSV (--train)")
    test_path = require_file(Path(test_csv), "test CSV (--test)")
    n_train_rows, labels = 0, set()
    for label, _ in _rows(train_path):
        n_train_rows += 1
        labels.add(label)
    if len(labels) < 2:
        raise DataError(f"{train_path}: {len(labels)} distinct label(s); classification needs at least 2")
    mapping = _label_map(labels)
    n_test = 0
    for label, _ in _rows(test_path):
        if label not in mapping:
            raise DataError(f"{test_path}: label {label!r} never occurs in {train_path}")
        n_test += 1
    n_dev = n_train_rows // DEV_EVERY
    fillers = {"train": ByteFiller(n_train_rows - n_dev, max_len), "dev": ByteFiller(n_dev, max_len),
               "test": ByteFiller(n_test, max_len)}
    for i, (label, text) in enumerate(progress(_rows(train_path), n_train_rows, f"{task} train+dev")):
        fillers["dev" if i % DEV_EVERY == DEV_EVERY - 1 else "train"].add((text,), mapping[label])
    for label, text in progress(_rows(test_path), n_test, f"{task} test"):
        fillers["test"].add((text,), mapping[label])
    meta = {"name": name, "num_classes": len(mapping), "label_map": mapping,
            "sha256": sha256_of_files([train_path, test_path]), "source": [str(train_path), str(test_path)]}
    return write_byte_task(out_dir, task, fillers, max_len, meta)
