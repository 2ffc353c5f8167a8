"""AAN document pairs -> processed lra-retrieval data, byte-level, two inputs per example.

Reads ``RAW/tsv_data/new_aan_pairs.{train,eval,test}.tsv`` (eval becomes dev): tab-separated
``label id1 id2 text1 text2`` with no header (a first line whose label is not a number is taken for a header
and skipped). Labels are 0/1 (written as ``0``/``1`` or ``0.0``/``1.0``). Each text becomes byte + 1 ids
(0 = padding) truncated to ``max_len`` bytes; x is (n, 2, max_len), lengths (n, 2). Pairs with an empty text
are skipped and counted (meta "skipped_empty"). The file is read twice (count, then fill): bounded memory
apart from the output arrays.

    python -m preprocess.create_retrieval --raw RAW --out OUT [--max_len 4000] [--force]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sat.data.format import DataError, sha256_of_files
from sat.data.prepare import (
    ByteFiller,
    check_max_len,
    check_outputs,
    progress,
    release_folder,
    require_file,
    write_byte_task,
)

TASK = "lra-retrieval"
RAW_SPLITS = {"train": "train", "eval": "dev", "test": "test"}


def _parse_label(field: bytes) -> int | None:
    try:
        v = float(field)
    except ValueError:
        return None
    return int(v) if v in (0.0, 1.0) else -1


def _rows(path: Path) -> Iterator[tuple[int, bytes, bytes]]:
    """(label, text1, text2) of each line; raises DataError on a malformed line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            fields = line.split(b"\t", 4)
            label = _parse_label(fields[0])
            if label is None and lineno == 1:
                continue  # a header line
            if len(fields) != 5:
                raise DataError(f"{path}:{lineno}: expected 5 tab-separated fields "
                                f"(label id1 id2 text1 text2), found {len(fields)}")
            if label is None or label < 0:
                raise DataError(f"{path}:{lineno}: label {fields[0][:20]!r} is not 0 or 1")
            yield label, fields[3], fields[4]


def _read_split(path: Path, max_len: int, desc: str) -> ByteFiller:
    n = sum(1 for _ in _rows(path))
    if n == 0:
        raise DataError(f"{path} holds no examples")
    filler = ByteFiller(n, max_len, inputs=2)
    for label, t1, t2 in progress(_rows(path), n, desc):
        filler.add((t1, t2), label)
    return filler


def preprocess_retrieval(raw_dir: str | Path, out_dir: str | Path, max_len: int = 4000,
                         force: bool = False) -> dict:
    """Write ``{out_dir}/lra-retrieval.{train,dev,test}.npz`` and the meta JSON; returns the meta."""
    check_max_len(max_len)
    check_outputs(out_dir, TASK, force)
    folder = release_folder(Path(raw_dir), "tsv_data", "new_aan_pairs.train.tsv")
    paths = {raw: require_file(folder / f"new_aan_pairs.{raw}.tsv", f"AAN {raw} split") for raw in RAW_SPLITS}
    fillers = {RAW_SPLITS[raw]: _read_split(p, max_len, f"{TASK} {raw}") for raw, p in paths.items()}
    meta = {"num_classes": 2, "inputs": 2, "sha256": sha256_of_files(paths.values()), "source": str(folder)}
    return write_byte_task(out_dir, TASK, fillers, max_len, meta)
