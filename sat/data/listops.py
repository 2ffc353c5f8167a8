"""ListOps as the Long Range Arena defines it: the raw release format, a seeded generator that restates
LRA's, the evaluator, and the preparer that turns the release's TSV files into processed data.

Raw form (LRA's ``listops-1000/basic_{train,val,test}.tsv``, written by Python's csv writer: tab-delimited,
header ``Source\\tTarget``, CRLF line ends). The Source is the binarised, left-branching text of a tree: an
operator ``[OP`` applied to ``a1 .. ak`` is written with k+1 opening parentheses, the operator, each argument
followed by ``)``, then ``] )``::

    ( ( ( [MAX 2 ) 9 ) ] )          = MAX(2, 9) = 9

What the model reads is LRA's token stream, not this text: LRA's input pipeline deletes ``(`` and ``)`` from
the string and keeps ``]`` (renamed to a word so that its tokenizer keeps it). So a processed sequence holds
operators, ``]`` and digits only -- ``[MAX 2 9 ]`` above -- with ids from :data:`VOCAB` (0 = padding).

Generator: a node is a digit with probability ``1 - op_p`` = 0.75 and always at depth ``max_depth`` (the root
has depth 1), else an operator drawn uniformly from MIN, MAX, MED, SM with 2..``max_args`` arguments. A
tree's length is LRA's: operators, ``]`` and digits, never parentheses; a tree is kept when
``min_len < length < max_len`` (strict, as LRA's flags), and the trees of the three splits are all distinct
(LRA draws them into one set). See docs/data.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sat.data.format import DataError, Split, sha256_of_files
from sat.data.prepare import (
    check_max_len,
    check_outputs,
    release_folder,
    require_file,
    write_task,
)
from sat.fileio import atomic_write

TASK = "lra-listops"
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END, OPEN, CLOSE = "]", "(", ")"
DIGITS = tuple(str(d) for d in range(10))
PAD = "<pad>"
# The model's vocabulary (id = index): LRA's tokens without parentheses; 0 is padding.
VOCAB: tuple[str, ...] = (PAD, *OPERATORS, END, *DIGITS)
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10
SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
RAW_TO_SPLIT = {"train": "train", "val": "dev", "test": "test"}
HEADER = ("Source", "Target")
# meta["tokens"] of processed data: the token convention above. Data processed before it (parentheses kept
# as tokens) has no such key and is refused by check_processed_meta.
TOKENS = "lra: '(' and ')' removed, ']' kept"

Tree = int | tuple[str, list["Tree"]]


class _TooLong(Exception):
    """Internal: the tree being drawn has already reached max_len tokens."""


def apply_op(op: str, values: list[int]) -> int:
    """``op`` applied to digit values: MIN, MAX, MED (integer part of the median), SM (sum mod 10)."""
    if not values:
        raise ValueError(f"{op} applied to no arguments")
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        s = sorted(values)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2  # values >= 0: floor == integer part
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown operator {op!r}")


def evaluate(tokens: list[str] | str) -> int:
    """Label of a ListOps sequence (a token list or a space-separated string), in either form: parentheses
    are ignored, the prefix structure ``[OP args ]`` is read."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    stack: list[list] = []  # one [op, values] frame per open operator
    result: int | None = None
    for tok in tokens:
        if tok in (OPEN, CLOSE):
            continue
        if tok in OPERATORS:
            stack.append([tok, []])
            continue
        if tok == END:
            if not stack:
                raise ValueError("']' without an operator")
            op, values = stack.pop()
            value = apply_op(op, values)
        elif tok in DIGITS:
            value = int(tok)
        else:
            raise ValueError(f"unknown token {tok!r}")
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError("more than one expression")
    if stack:
        raise ValueError(f"{len(stack)} operator(s) not closed by ']'")
    if result is None:
        raise ValueError("empty expression")
    return result


def tree_tokens(tree: Tree) -> list[str]:
    """Tokens of a tree in the release's text form, parentheses included (see the module docstring)."""
    out: list[str] = []

    def emit(t: Tree) -> None:
        if isinstance(t, int):
            out.append(str(t))
            return
        op, args = t
        out.extend([OPEN] * (len(args) + 1))
        out.append(op)
        for a in args:
            emit(a)
            out.append(CLOSE)
        out.extend([END, CLOSE])

    emit(tree)
    return out


def model_tokens(source: str) -> list[str]:
    """What the model reads of a release Source string: LRA's pipeline deletes every ``(`` and ``)`` from the
    string, then splits on whitespace."""
    return source.replace(OPEN, " ").replace(CLOSE, " ").split()


def tree_length(tree: Tree) -> int:
    """LRA's length of a tree: operators, ``]`` and digits (parentheses not counted)."""
    if isinstance(tree, int):
        return 1
    return 2 + sum(tree_length(a) for a in tree[1])


def tree_value(tree: Tree) -> int:
    """Value of a nested tree (recursive; independent of the token form)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    return apply_op(op, [tree_value(a) for a in args])


def random_tree(rng: random.Random, max_depth: int = 10, max_args: int = 10, value_p: float = 0.75,
                max_len: int | None = None) -> tuple[Tree, int]:
    """Draw one tree and its LRA length; raises _TooLong as soon as the length reaches ``max_len`` (such a
    tree is never kept, and stopping early leaves the distribution of kept trees unchanged)."""
    count = 0
    limit = max_len if max_len is not None else float("inf")

    def draw(depth: int) -> Tree:
        nonlocal count
        if depth >= max_depth or rng.random() < value_p:
            count += 1
            if count >= limit:
                raise _TooLong
            return rng.randrange(10)
        op = OPERATORS[rng.randrange(len(OPERATORS))]
        k = rng.randint(2, max_args)
        count += 2  # the operator and its "]"
        if count >= limit:
            raise _TooLong
        return op, [draw(depth + 1) for _ in range(k)]

    tree = draw(1)
    return tree, count


def sample_trees(n: int, min_len: int, max_len: int, rng: random.Random, max_depth: int = 10,
                 max_args: int = 10, value_p: float = 0.75, max_attempts_per_tree: int = 200_000,
                 desc: str | None = None, seen: set[str] | None = None) -> list[Tree]:
    """``n`` distinct trees with ``min_len < length < max_len`` (LRA's length) by rejection. Trees whose text
    is in ``seen`` are rejected too, and kept ones are added to it, so that splits drawn in turn never
    share a tree. Gives up (ValueError) if ``max_attempts_per_tree`` draws in a row miss, so an unreachable
    range never loops for ever."""
    if not 0 <= min_len or min_len + 2 > max_len:
        raise ValueError(f"need 0 <= min_len and min_len + 2 <= max_len (lengths strictly between them), "
                         f"got {min_len}, {max_len}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {max_depth}, {max_args}")
    seen = set() if seen is None else seen
    trees: list[Tree] = []
    misses = 0
    with tqdm(total=n, desc=desc, disable=desc is None or n < 1000, unit="tree", mininterval=1.0) as bar:
        while len(trees) < n:
            try:
                tree, length = random_tree(rng, max_depth, max_args, value_p, max_len)
            except _TooLong:
                tree, length = 0, max_len
            text = " ".join(tree_tokens(tree)) if min_len < length < max_len else None
            if text is not None and text not in seen:
                seen.add(text)
                trees.append(tree)
                misses = 0
                bar.update(1)
            else:
                misses += 1
                if misses >= max_attempts_per_tree:
                    raise ValueError(f"{misses} draws in a row missed the length range {min_len} < length < "
                                     f"{max_len} (or repeated a tree; max_depth={max_depth}, max_args="
                                     f"{max_args}); widen the range or change max_depth/max_args")
    return trees


def write_release_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    """One split in the release's exact layout: Python's csv writer, tab delimiter, header, CRLF ends."""
    def write(f) -> None:
        text = io.TextIOWrapper(f, encoding="ascii", newline="")
        writer = csv.writer(text, delimiter="\t")
        writer.writerow(HEADER)
        writer.writerows(rows)
        text.flush()
        text.detach()  # leave the binary file open for atomic_write's fsync

    atomic_write(path, write)


def generate_listops(raw_dir: str | Path, n_train: int = 96000, n_val: int = 2000, n_test: int = 2000,
                     min_len: int = 500, max_len: int = 2000, max_depth: int = 10, seed: int = 0,
                     force: bool = False, max_args: int = 10, value_p: float = 0.75) -> Path:
    """Write ``{raw_dir}/listops-1000/basic_{train,val,test}.tsv`` in the release's layout; returns the
    folder. Deterministic for a seed (each split draws from its own ``random.Random``, in the order train,
    val, test, rejecting trees an earlier split holds). Existing files are kept unless ``force``."""
    out = Path(raw_dir) / "listops-1000"
    paths = {s: out / f for s, f in SPLIT_FILES.items()}
    if not force and any(p.exists() for p in paths.values()):
        raise FileExistsError(f"{out} already holds ListOps files; pass force=True (--force) to overwrite")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    seen: set[str] = set()
    drawn = {}
    for i, (split, n) in enumerate(sizes.items()):
        rng = random.Random(f"listops-{seed}-{i}")
        drawn[split] = sample_trees(n, min_len, max_len, rng, max_depth, max_args, value_p,
                                    desc=f"listops {split}", seen=seen)
    out.mkdir(parents=True, exist_ok=True)
    for split, trees in drawn.items():
        write_release_tsv(paths[split], [(" ".join(tree_tokens(t)), tree_value(t)) for t in trees])
    return out


# ------------------------------------------------------------------------------------------ preparing


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 22), b""))


def read_release_split(path: Path, max_len: int, desc: str = "") -> Split:
    """One release TSV -> ids (n, max_len) in LRA's token stream, lengths, labels. The header line is
    skipped when present; a sequence longer than ``max_len`` (parentheses not counted) is an error, never
    truncated."""
    ids_of: list[np.ndarray] = []
    labels: list[int] = []
    try:
        with open(path, encoding="ascii", errors="strict", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            for fields in tqdm(reader, total=_count_lines(path), desc=desc, unit="ex", mininterval=1.0,
                               disable=not desc):
                where = f"{path}:{reader.line_num}"
                if reader.line_num == 1 and tuple(fields) == HEADER or not any(x.strip() for x in fields):
                    continue
                if len(fields) != 2:
                    raise DataError(f"{where}: expected 2 tab-separated fields (Source, Target), found "
                                    f"{len(fields)}")
                toks = model_tokens(fields[0])
                if not toks:
                    raise DataError(f"{where}: empty Source")
                if len(toks) > max_len:
                    raise DataError(f"{where}: {len(toks)} tokens (parentheses not counted) exceed --max_len "
                                    f"{max_len}; raise --max_len (ListOps sequences are never truncated)")
                ids = [TOKEN_TO_ID.get(t, -1) for t in toks]
                if -1 in ids:
                    bad = toks[ids.index(-1)]
                    raise DataError(f"{where}: unknown token {bad!r} (ListOps tokens: ( ) "
                                    f"{' '.join(VOCAB[1:])})")
                try:
                    label = int(fields[1])
                except ValueError:
                    raise DataError(f"{where}: Target {fields[1]!r} is not an integer") from None
                if not 0 <= label < NUM_CLASSES:
                    raise DataError(f"{where}: Target {label} outside 0..{NUM_CLASSES - 1}")
                ids_of.append(np.asarray(ids, dtype=np.int8))
                labels.append(label)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not ASCII text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed TSV ({e})") from None
    if not labels:
        raise DataError(f"{path} holds no examples")
    x = np.zeros((len(labels), max_len), dtype=np.int32)
    lengths = np.array([len(a) for a in ids_of], dtype=np.int32)
    for i, a in enumerate(ids_of):
        x[i, :len(a)] = a
    return Split(x=x, lengths=lengths, y=np.asarray(labels, dtype=np.int64))


def preprocess_listops(raw_dir: str | Path, out_dir: str | Path, max_len: int = 2000,
                       force: bool = False, extra_meta: dict | None = None) -> dict:
    """Release TSVs (``RAW/listops-1000/basic_{train,val,test}.tsv``, or RAW itself holding them; val becomes
    dev) -> ``{out_dir}/lra-listops.{train,dev,test}.npz`` and the meta JSON (with ``extra_meta`` added);
    returns the meta."""
    check_max_len(max_len)
    check_outputs(out_dir, TASK, force)
    folder = release_folder(Path(raw_dir), "listops-1000", SPLIT_FILES["train"])
    paths = {raw: require_file(folder / name, f"ListOps {raw} split") for raw, name in SPLIT_FILES.items()}
    splits = {RAW_TO_SPLIT[raw]: read_release_split(p, max_len, f"{TASK} {raw}") for raw, p in paths.items()}
    meta = {"vocab_size": len(VOCAB), "max_len": max_len, "num_classes": NUM_CLASSES, "vocab": list(VOCAB),
            "tokens": TOKENS, "sha256": sha256_of_files(paths.values()), "source": str(folder), **(extra_meta or {})}
    return write_task(out_dir, TASK, splits, meta)


def is_current(meta: dict) -> bool:
    """Whether processed ListOps data follows today's token convention."""
    return meta.get("tokens") == TOKENS


def check_processed_meta(meta: dict, data_dir: str | Path) -> None:
    """Refuse ListOps data processed by older code (parentheses as tokens) with what to run instead."""
    if not is_current(meta):
        raise DataError(f"{data_dir} holds ListOps data processed by an older version (parentheses in the "
                        f"token stream); re-run: python -m preprocess.create_listops --raw RAW --out {data_dir} "
                        f"--force")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate ListOps raw TSV files in the LRA release's layout "
                                            "(lengths counted as LRA does: parentheses excluded).")
    p.add_argument("--raw", required=True, help="raw data folder; files go to RAW/listops-1000/")
    p.add_argument("--n_train", type=int, default=96000)
    p.add_argument("--n_val", type=int, default=2000)
    p.add_argument("--n_test", type=int, default=2000)
    p.add_argument("--min_len", type=int, default=500, help="keep trees longer than this (default 500)")
    p.add_argument("--max_len", type=int, default=2000, help="keep trees shorter than this (default 2000)")
    p.add_argument("--max_depth", type=int, default=10)
    p.add_argument("--max_args", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_listops(a.raw, a.n_train, a.n_val, a.n_test, a.min_len, a.max_len, a.max_depth, a.seed,
                               a.force, a.max_args)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
