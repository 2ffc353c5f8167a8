"""ListOps: a seeded generator of LRA-style raw data and an evaluator (SPEC.md section 7).

A tree is either a digit 0-9 or an operator application ``(op, [arg, ...])`` with op in MIN, MAX, MED, SM.
Text form (the binarised, left-branching form of LRA's released TSV files): an application of ``[OP`` to
``a1 .. ak`` is written with k+1 opening parentheses, the operator, each argument followed by ``)``, then
``] )``::

    ( ( ( [MAX 2 ) 9 ) ] )          = MAX(2, 9) = 9

so the tokens are ``[MIN [MAX [MED [SM ] ( )`` and the digits, separated by single spaces. Parentheses carry
no meaning: :func:`evaluate` ignores them and reads the prefix structure ``[OP args ]``.

Generator (SPEC): a node is a digit with probability ``value_p`` = 0.75 and always at depth ``max_depth``
(the root has depth 1), else an operator chosen uniformly with 2..``max_args`` arguments (uniform); a whole
tree is kept when ``min_len <= tokens <= max_len`` (rejection sampling; a draw is abandoned as soon as it
passes ``max_len``, which does not change the distribution of the kept trees). ``max_args`` (SPEC: 10) and
``max_depth`` are parameters so that small length ranges for tests can be hit quickly too.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from tqdm import tqdm

from sat.fileio import atomic_write

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END, OPEN, CLOSE = "]", "(", ")"
DIGITS = tuple(str(d) for d in range(10))
PAD = "<pad>"
# The fixed vocabulary (id = index); 0 is padding. Written into the processed meta as "vocab".
VOCAB: tuple[str, ...] = (PAD, *OPERATORS, END, OPEN, CLOSE, *DIGITS)
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10
SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
HEADER = "Source\tTarget"

Tree = int | tuple[str, list["Tree"]]


class _TooLong(Exception):
    """Internal: the tree being drawn already has more than max_len tokens."""


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
    """Label of a ListOps sequence (a token list or a space-separated string); parentheses are ignored."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    stack: list[list] = []  # one [op, values] frame per open operator
    result: int | None = None
    for tok in tokens:
        if tok in (OPEN, CLOSE):
            continue
        if tok in OPERATORS:
            stack.append([tok, []])
        elif tok == END:
            if not stack:
                raise ValueError("']' without an operator")
            op, values = stack.pop()
            v = apply_op(op, values)
            if stack:
                stack[-1][1].append(v)
            elif result is None:
                result = v
            else:
                raise ValueError("more than one expression")
        elif tok in DIGITS:
            if stack:
                stack[-1][1].append(int(tok))
            elif result is None:
                result = int(tok)
            else:
                raise ValueError("more than one expression")
        else:
            raise ValueError(f"unknown token {tok!r}")
    if stack:
        raise ValueError(f"{len(stack)} operator(s) not closed by ']'")
    if result is None:
        raise ValueError("empty expression")
    return result


def tree_tokens(tree: Tree) -> list[str]:
    """Tokens of a tree in LRA's text form (see the module docstring)."""
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


def tree_value(tree: Tree) -> int:
    """Value of a nested tree (recursive; independent of the token form)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    return apply_op(op, [tree_value(a) for a in args])


def random_tree(rng: random.Random, max_depth: int = 10, max_args: int = 10, value_p: float = 0.75,
                max_len: int | None = None) -> tuple[Tree, int]:
    """Draw one tree and its token count; raises _TooLong once it exceeds ``max_len`` (internal use)."""
    count = 0
    limit = max_len if max_len is not None else float("inf")

    def draw(depth: int) -> Tree:
        nonlocal count
        if depth >= max_depth or rng.random() < value_p:
            count += 1
            if count > limit:
                raise _TooLong
            return rng.randrange(10)
        op = OPERATORS[rng.randrange(len(OPERATORS))]
        k = rng.randint(2, max_args)
        count += 2 * (k + 1) + 2  # k+1 "(", the op, k ")", "]", ")"
        if count > limit:
            raise _TooLong
        return op, [draw(depth + 1) for _ in range(k)]

    tree = draw(1)
    return tree, count


def sample_trees(n: int, min_len: int, max_len: int, rng: random.Random, max_depth: int = 10,
                 max_args: int = 10, value_p: float = 0.75, max_attempts_per_tree: int = 200_000,
                 desc: str | None = None) -> list[Tree]:
    """``n`` trees with ``min_len <= tokens <= max_len`` by rejection; gives up (ValueError) if ``max_attempts
    _per_tree`` draws in a row miss the range, so an unreachable range never loops for ever."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if max_depth < 1 or max_args < 2:
        raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {max_depth}, {max_args}")
    trees: list[Tree] = []
    misses = 0
    with tqdm(total=n, desc=desc, disable=desc is None or n < 1000, unit="tree",
              mininterval=1.0) as bar:
        while len(trees) < n:
            try:
                tree, length = random_tree(rng, max_depth, max_args, value_p, max_len)
            except _TooLong:
                length, tree = max_len + 1, 0
            if min_len <= length <= max_len:
                trees.append(tree)
                misses = 0
                bar.update(1)
            else:
                misses += 1
                if misses >= max_attempts_per_tree:
                    raise ValueError(f"{misses} draws in a row missed the length range "
                                     f"[{min_len}, {max_len}] (max_depth={max_depth}, max_args={max_args}); "
                                     f"widen the range or change max_depth/max_args")
    return trees


def generate_listops(raw_dir: str | Path, n_train: int = 96000, n_val: int = 2000, n_test: int = 2000,
                     min_len: int = 500, max_len: int = 2000, max_depth: int = 10, seed: int = 0,
                     force: bool = False, max_args: int = 10, value_p: float = 0.75) -> Path:
    """Write ``{raw_dir}/listops-1000/basic_{train,val,test}.tsv`` (header ``Source\\tTarget``); returns the
    folder. Deterministic for a seed (each split draws from its own ``random.Random``). Existing files are
    kept unless ``force``."""
    out = Path(raw_dir) / "listops-1000"
    paths = {s: out / f for s, f in SPLIT_FILES.items()}
    if not force and any(p.exists() for p in paths.values()):
        raise FileExistsError(f"{out} already holds ListOps files; pass force=True (--force) to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for i, (split, n) in enumerate(sizes.items()):
        rng = random.Random(f"listops-{seed}-{i}")
        trees = sample_trees(n, min_len, max_len, rng, max_depth, max_args, value_p, desc=f"listops {split}")
        lines = [HEADER] + [" ".join(tree_tokens(t)) + "\t" + str(tree_value(t)) for t in trees]
        atomic_write(paths[split], lambda f, lines=lines: f.writelines((line + "\n").encode("ascii") for line in lines))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate LRA-style ListOps raw TSV files (SPEC.md section 7).")
    p.add_argument("--raw", required=True, help="raw data folder; files go to RAW/listops-1000/")
    p.add_argument("--n_train", type=int, default=96000)
    p.add_argument("--n_val", type=int, default=2000)
    p.add_argument("--n_test", type=int, default=2000)
    p.add_argument("--min_len", type=int, default=500)
    p.add_argument("--max_len", type=int, default=2000)
    p.add_argument("--max_depth", type=int, default=10)
    p.add_argument("--max_args", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    a = p.parse_args(argv)
    try:
        out = generate_listops(a.raw, a.n_train, a.n_val, a.n_test, a.min_len, a.max_len, a.max_depth, a.seed,
                               a.force, a.max_args)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
