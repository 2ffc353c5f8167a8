"""ListOps generator, evaluator and preprocessing (SPEC.md section 7)."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess.create_listops import preprocess_listops
from sat.data.format import DataError, load_meta, load_split
from sat.data.listops import (
    HEADER,
    OPERATORS,
    VOCAB,
    evaluate,
    generate_listops,
    random_tree,
    sample_trees,
    tree_tokens,
)

ROOT = Path(__file__).resolve().parents[1]


def ref_value(tree) -> int:
    """Independent recursive evaluator on the nested structure (statistics.median, not apply_op)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = [ref_value(a) for a in args]
    return {"[MIN": min, "[MAX": max, "[MED": lambda v: int(statistics.median(v)),
            "[SM": lambda v: sum(v) % 10}[op](vals)


def small_raw(tmp_path: Path, seed: int = 0) -> Path:
    raw = tmp_path / "raw"
    generate_listops(raw, n_train=50, n_val=10, n_test=10, min_len=30, max_len=120, seed=seed)
    return raw


def read_tsv(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_text_form_and_examples() -> None:
    assert tree_tokens(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )".split()
    assert evaluate("( ( ( [MAX 2 ) 9 ) ] )") == 9
    assert evaluate("( ( ( ( [MED 1 ) 2 ) 6 ) ] )") == 2
    assert evaluate("( ( ( ( ( [MED 1 ) 2 ) 6 ) 8 ) ] )") == 4  # median 4.0
    assert evaluate("( ( ( [MED 1 ) 4 ) ] )") == 2  # median 2.5 -> integer part 2
    assert evaluate("( ( ( ( [SM 9 ) 8 ) 7 ) ] )") == 4
    nested = ("[MIN", [("[SM", [5, 7]), 3, ("[MAX", [0, 1])])
    assert evaluate(tree_tokens(nested)) == 1
    assert evaluate("7") == 7
    for bad in ["", "( [MAX 1 2", "] 1", "1 2", "[FOO 1 ]", "[MAX ]"]:
        with pytest.raises(ValueError):
            evaluate(bad)


tree_strategy = st.recursive(
    st.integers(0, 9),
    lambda kids: st.tuples(st.sampled_from(OPERATORS), st.lists(kids, min_size=2, max_size=10)),
    max_leaves=60,
)


@given(tree_strategy)
@settings(max_examples=300, deadline=None)
def test_evaluate_matches_recursive_reference(tree) -> None:
    tokens = tree_tokens(tree)
    assert evaluate(tokens) == ref_value(tree)
    assert all(t in VOCAB[1:] for t in tokens)


def test_generator_distribution_rules() -> None:
    rng = random.Random(1)
    depths, args = [], []

    def walk(t, d):
        depths.append(d)
        if not isinstance(t, int):
            args.append(len(t[1]))
            for a in t[1]:
                walk(a, d + 1)

    for _ in range(300):
        tree, n = random_tree(rng, max_depth=4)
        assert n == len(tree_tokens(tree))
        walk(tree, 1)
    assert max(depths) <= 4
    assert min(args) >= 2 and max(args) <= 10


def test_sample_trees_range_and_unreachable() -> None:
    trees = sample_trees(200, 60, 250, random.Random(0))
    assert all(60 <= len(tree_tokens(t)) <= 250 for t in trees)
    with pytest.raises(ValueError, match="missed the length range"):
        sample_trees(1, 5000, 6000, random.Random(0), max_depth=2, max_attempts_per_tree=200)
    with pytest.raises(ValueError):
        sample_trees(1, 10, 5, random.Random(0))


def test_generate_files_deterministic(tmp_path: Path) -> None:
    raw_a = small_raw(tmp_path / "a")
    raw_b = small_raw(tmp_path / "b")
    raw_c = small_raw(tmp_path / "c", seed=1)
    for name, n in [("basic_train.tsv", 50), ("basic_val.tsv", 10), ("basic_test.tsv", 10)]:
        lines = read_tsv(raw_a / "listops-1000" / name)
        assert lines[0] == HEADER
        assert len(lines) == n + 1
        assert lines == read_tsv(raw_b / "listops-1000" / name)
        for line in lines[1:]:
            src, tgt = line.split("\t")
            assert 30 <= len(src.split()) <= 120
            assert int(tgt) == evaluate(src)
    train_a = read_tsv(raw_a / "listops-1000" / "basic_train.tsv")
    assert train_a != read_tsv(raw_c / "listops-1000" / "basic_train.tsv")
    assert train_a[1:11] != read_tsv(raw_a / "listops-1000" / "basic_test.tsv")[1:]
    with pytest.raises(FileExistsError):
        generate_listops(raw_a, n_train=5, n_val=5, n_test=5, min_len=30, max_len=120)
    generate_listops(raw_a, n_train=5, n_val=5, n_test=5, min_len=30, max_len=120, force=True)
    assert len(read_tsv(raw_a / "listops-1000" / "basic_train.tsv")) == 6


def test_preprocess_arrays_and_vocab(tmp_path: Path) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "out"
    meta = preprocess_listops(raw, out, max_len=128)
    assert meta == load_meta(out, "lra-listops")
    assert meta["vocab"] == ["<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", "(", ")", *"0123456789"]
    assert meta["vocab_size"] == 18 and meta["num_classes"] == 10 and meta["max_len"] == 128
    assert meta["counts"] == {"train": 50, "dev": 10, "test": 10}
    assert len(meta["sha256"]) == 64
    names = {"train": "basic_train.tsv", "dev": "basic_val.tsv", "test": "basic_test.tsv"}
    for split, raw_name in names.items():
        data = load_split(out, "lra-listops", split, num_classes=10)
        assert data.x.shape == (meta["counts"][split], 128)
        with np.load(out / f"lra-listops.{split}.npz") as z:
            assert z["x"].dtype == np.int32 and z["lengths"].dtype == np.int32 and z["y"].dtype == np.int64
        for row, line in zip(range(len(data)), read_tsv(raw / "listops-1000" / raw_name)[1:], strict=True):
            src, tgt = line.split("\t")
            n = int(data.lengths[row])
            assert [meta["vocab"][i] for i in data.x[row, :n]] == src.split()
            assert (data.x[row, n:] == 0).all() and (data.x[row, :n] > 0).all()
            assert data.y[row] == int(tgt) == evaluate([meta["vocab"][i] for i in data.x[row, :n]])


def test_preprocess_refuses_long_and_overwrite(tmp_path: Path) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="exceed --max_len 50"):
        preprocess_listops(raw, out, max_len=50)
    preprocess_listops(raw, out, max_len=120)
    with pytest.raises(DataError, match="--force"):
        preprocess_listops(raw, out, max_len=120)
    assert preprocess_listops(raw, out, max_len=256, force=True)["max_len"] == 256


def test_preprocess_malformed(tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "listops-1000"
    folder.mkdir(parents=True)
    good = f"{HEADER}\n( ( ( [MAX 2 ) 9 ) ] )\t9\n"
    for name in ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]:
        (folder / name).write_text(good)
    assert preprocess_listops(tmp_path / "raw", tmp_path / "ok", max_len=16)["counts"]["train"] == 1
    for bad, msg in [("( [FOO 1 ] )\t1\n", "unknown token"), ("1 2\t10\n", "outside"),
                     ("1\tx\n", "not an integer"), ("1\t1\t1\n", "2 tab-separated")]:
        (folder / "basic_test.tsv").write_text(HEADER + "\n" + bad)
        with pytest.raises(DataError, match=msg):
            preprocess_listops(tmp_path / "raw", tmp_path / "bad", max_len=16, force=True)


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    r = run_module("sat.data.listops", "--raw", str(raw), "--n_train", "20", "--n_val", "5", "--n_test", "5",
                   "--min_len", "30", "--max_len", "120")
    assert r.returncode == 0, r.stderr
    r = run_module("preprocess.create_listops", "--raw", str(raw), "--out", str(out), "--max_len", "128")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "lra-listops.meta.json").read_text())["counts"]["train"] == 20
    r = run_module("preprocess.create_listops", "--raw", str(raw), "--out", str(out), "--max_len", "128")
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_module("preprocess.create_listops", "--raw", str(tmp_path / "nope"), "--out", str(out), "--force")
    assert r.returncode == 2 and r.stderr.startswith("error: missing")
