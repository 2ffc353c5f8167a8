"""ListOps raw TSVs -> processed lra-listops data.

Reads ``RAW/listops-1000/basic_{train,val,test}.tsv`` (header ``Source\\tTarget``; val becomes dev), maps the
space-separated tokens through the fixed vocabulary of :mod:`sat.data.listops` (0 = padding; written into the
meta as "vocab") and pads to ``max_len``. A sequence longer than ``max_len`` is an error, not truncated.

    python -m preprocess.create_listops --raw RAW --out OUT [--max_len 2000] [--force]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.common import (
    base_parser,
    check_max_len,
    check_outputs,
    progress,
    release_folder,
    report,
    require_file,
    run_cli,
    write_task,
)
from sat.data.format import DataError, Split, sha256_of_files
from sat.data.listops import HEADER, NUM_CLASSES, SPLIT_FILES, TOKEN_TO_ID, VOCAB

TASK = "lra-listops"
RAW_TO_SPLIT = {"train": "train", "val": "dev", "test": "test"}


def _rows(path: Path):
    """(line number, source, target) of each data line; the header line is skipped when present."""
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or (lineno == 1 and line == HEADER):
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{path}:{lineno}: expected 2 tab-separated fields (Source, Target), "
                                f"found {len(fields)}")
            yield lineno, fields[0], fields[1]


def _read_split(path: Path, max_len: int, desc: str) -> Split:
    try:
        n = sum(1 for _ in _rows(path))
        if n == 0:
            raise DataError(f"{path} holds no examples")
        x = np.zeros((n, max_len), dtype=np.int32)
        lengths = np.zeros(n, dtype=np.int32)
        y = np.zeros(n, dtype=np.int64)
        for i, (lineno, src, tgt) in enumerate(progress(_rows(path), n, desc)):
            toks = src.split()
            if not toks:
                raise DataError(f"{path}:{lineno}: empty Source")
            if len(toks) > max_len:
                raise DataError(f"{path}:{lineno}: {len(toks)} tokens exceed --max_len {max_len}; "
                                f"raise --max_len (ListOps sequences are never truncated)")
            try:
                x[i, :len(toks)] = [TOKEN_TO_ID[t] for t in toks]
            except KeyError as e:
                raise DataError(f"{path}:{lineno}: unknown token {e.args[0]!r} (ListOps tokens: "
                                f"{' '.join(VOCAB[1:])})") from None
            try:
                label = int(tgt)
            except ValueError:
                raise DataError(f"{path}:{lineno}: Target {tgt!r} is not an integer") from None
            if not 0 <= label < NUM_CLASSES:
                raise DataError(f"{path}:{lineno}: Target {label} outside 0..{NUM_CLASSES - 1}")
            lengths[i], y[i] = len(toks), label
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    return Split(x=x, lengths=lengths, y=y)


def preprocess_listops(raw_dir: str | Path, out_dir: str | Path, max_len: int = 2000,
                       force: bool = False) -> dict:
    """Write ``{out_dir}/lra-listops.{train,dev,test}.npz`` and the meta JSON; returns the meta."""
    check_max_len(max_len)
    check_outputs(out_dir, TASK, force)
    folder = release_folder(Path(raw_dir), "listops-1000", SPLIT_FILES["train"])
    paths = {raw: require_file(folder / name, f"ListOps {raw} split") for raw, name in SPLIT_FILES.items()}
    splits = {RAW_TO_SPLIT[raw]: _read_split(p, max_len, f"{TASK} {raw}") for raw, p in paths.items()}
    meta = {"vocab_size": len(VOCAB), "max_len": max_len, "num_classes": NUM_CLASSES, "vocab": list(VOCAB),
            "sha256": sha256_of_files(paths.values()), "source": str(folder)}
    return write_task(out_dir, TASK, splits, meta)


def main(argv: list[str] | None = None) -> None:
    p = base_parser("ListOps TSVs -> processed lra-listops .npz (fixed vocabulary, no truncation).", 2000)
    a = p.parse_args(argv)
    report(preprocess_listops(a.raw, a.out, a.max_len, a.force), a.out)


if __name__ == "__main__":
    run_cli(main)
