"""ListOps as LRA defines it: generator, evaluator, the release TSV layout and the preparer (docs/data.md)."""

from __future__ import annotations

import csv
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

from sat.data.format import DataError, load_meta, load_split
from sat.data.listops import (
    HEADER,
    OPERATORS,
    VOCAB,
    check_processed_meta,
    evaluate,
    generate_listops,
    model_tokens,
    preprocess_listops,
    random_tree,
    sample_trees,
    tree_length,
    tree_tokens,
    tree_value,
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
    generate_listops(raw, n_train=50, n_val=10, n_test=10, min_len=20, max_len=100, seed=seed)
    return raw


def read_tsv(path: Path) -> list[list[str]]:
    """Rows of a release TSV as LRA's reader sees them (header first)."""
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


# An independent restatement of how LRA's generator writes a tree: the tree is binarised into nested pairs
# ((((op, a1), a2), ...), "]"), printed as "( left right )" recursively, and the rows go through Python's
# csv writer with a tab delimiter (default CRLF line ends) under a Source/Target header.
def binarise(tree):
    if isinstance(tree, int):
        return tree
    op, args = tree
    t = (op, binarise(args[0]))
    for a in args[1:]:
        t = (t, binarise(a))
    return (t, "]")


def pair_string(t) -> str:
    if isinstance(t, (str, int)):
        return str(t)
    return "( " + pair_string(t[0]) + " " + pair_string(t[1]) + " )"


def write_like_lra(path: Path, trees) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["Source", "Target"])
        w.writerows([pair_string(binarise(t)), ref_value(t)] for t in trees)


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
    stream = model_tokens(" ".join(tokens))
    assert evaluate(stream) == ref_value(tree) and len(stream) == tree_length(tree)
    assert all(t in VOCAB[1:] for t in stream)


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
        tokens = tree_tokens(tree)
        assert n == tree_length(tree) == len([t for t in tokens if t not in "()"])
        walk(tree, 1)
    assert max(depths) <= 4
    assert min(args) >= 2 and max(args) <= 10


def test_text_form_is_lras_binarised_form() -> None:
    rng = random.Random(3)
    for _ in range(200):
        tree, _ = random_tree(rng, max_depth=5)
        assert " ".join(tree_tokens(tree)) == pair_string(binarise(tree))


def test_sample_trees_range_distinct_and_unreachable() -> None:
    trees = sample_trees(200, 60, 250, random.Random(0))
    assert all(60 < tree_length(t) < 250 for t in trees)
    assert len({" ".join(tree_tokens(t)) for t in trees}) == 200
    # the bounds are strict, as LRA's: 3 < length < 5 leaves only length 4 = MIN/MAX/MED/SM of two digits
    assert {tree_length(t) for t in sample_trees(20, 3, 5, random.Random(0))} == {4}
    with pytest.raises(ValueError, match="missed the length range"):
        sample_trees(1, 5000, 6000, random.Random(0), max_depth=2, max_attempts_per_tree=200)
    with pytest.raises(ValueError, match="missed the length range"):  # 4 * 100 distinct trees of length 4
        sample_trees(401, 3, 5, random.Random(0), max_attempts_per_tree=5000)
    for lo, hi in [(10, 5), (10, 11), (-1, 5)]:
        with pytest.raises(ValueError):
            sample_trees(1, lo, hi, random.Random(0))


def test_generated_files_have_the_release_layout(tmp_path: Path) -> None:
    raw_a = small_raw(tmp_path / "a")
    raw_b = small_raw(tmp_path / "b")
    raw_c = small_raw(tmp_path / "c", seed=1)
    sources = []
    for name, n in [("basic_train.tsv", 50), ("basic_val.tsv", 10), ("basic_test.tsv", 10)]:
        path = raw_a / "listops-1000" / name
        data = path.read_bytes()
        assert data.startswith(b"Source\tTarget\r\n") and data.count(b"\r\n") == n + 1
        assert data == (raw_b / "listops-1000" / name).read_bytes()
        rows = read_tsv(path)
        assert tuple(rows[0]) == HEADER and len(rows) == n + 1
        for src, tgt in rows[1:]:
            assert 20 < len(model_tokens(src)) < 100
            assert len(src.split()) > len(model_tokens(src))  # the text keeps its parentheses
            assert int(tgt) == evaluate(src)
            sources.append(src)
    assert len(set(sources)) == 70  # no tree in two splits
    train_a = read_tsv(raw_a / "listops-1000" / "basic_train.tsv")
    assert train_a != read_tsv(raw_c / "listops-1000" / "basic_train.tsv")
    with pytest.raises(FileExistsError):
        generate_listops(raw_a, n_train=5, n_val=5, n_test=5, min_len=20, max_len=100)
    generate_listops(raw_a, n_train=5, n_val=5, n_test=5, min_len=20, max_len=100, force=True)
    assert len(read_tsv(raw_a / "listops-1000" / "basic_train.tsv")) == 6


def test_release_file_processes_with_the_defaults(tmp_path: Path) -> None:
    """A file written the way LRA's generator writes it, with LRA's lengths (500 < length < 2000), loads with
    the default --max_len 2000; lengths count operators, ']' and digits; labels are the evaluator's."""
    rng = random.Random(7)
    trees = {split: sample_trees(n, 500, 2000, rng) for split, n in [("train", 6), ("val", 3), ("test", 3)]}
    longest = ("[SM", [("[MAX", [d % 10 for d in range(200)])] * 9 + [("[MIN", [3] * 177)])
    assert tree_length(longest) == 1999  # the longest tree LRA keeps
    trees["train"].append(longest)
    folder = tmp_path / "lra_release" / "listops-1000"
    folder.mkdir(parents=True)
    for split, ts in trees.items():
        write_like_lra(folder / f"basic_{split}.tsv", ts)
    texts = [row[0] for row in read_tsv(folder / "basic_train.tsv")[1:]]
    assert max(len(t.split()) for t in texts) > 2000  # the raw lines are far longer than what the model reads
    meta = preprocess_listops(tmp_path / "lra_release", tmp_path / "out")
    assert meta["max_len"] == 2000 and meta["vocab_size"] == 16 and meta["counts"] == {"train": 7, "dev": 3,
                                                                                      "test": 3}
    for split, raw in [("train", "train"), ("dev", "val"), ("test", "test")]:
        data = load_split(tmp_path / "out", "lra-listops", split, num_classes=10)
        assert data.x.shape[1] == 2000
        for row, tree in enumerate(trees[raw]):
            n = int(data.lengths[row])
            assert n == tree_length(tree)
            tokens = [VOCAB[i] for i in data.x[row, :n]]
            assert "(" not in tokens and ")" not in tokens and tokens.count("]") == tokens.count("[MAX") + \
                tokens.count("[MIN") + tokens.count("[MED") + tokens.count("[SM")
            assert data.y[row] == evaluate(tokens) == tree_value(tree) == ref_value(tree)
            assert (data.x[row, n:] == 0).all()


def test_too_long_after_removing_parentheses_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "listops-1000"
    folder.mkdir(parents=True)
    long_tree = ("[MAX", list(range(10)) * 3)  # 32 model tokens, 63 raw tokens
    for split in ["train", "val", "test"]:
        write_like_lra(folder / f"basic_{split}.tsv", [long_tree])
    assert preprocess_listops(tmp_path / "raw", tmp_path / "ok", max_len=32)["counts"]["train"] == 1
    with pytest.raises(DataError, match="32 tokens \\(parentheses not counted\\) exceed --max_len 31"):
        preprocess_listops(tmp_path / "raw", tmp_path / "bad", max_len=31)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_preprocess_arrays_and_vocab(tmp_path: Path) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "out"
    meta = preprocess_listops(raw, out, max_len=128)
    assert meta == load_meta(out, "lra-listops")
    assert meta["vocab"] == ["<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", *"0123456789"]
    assert meta["vocab_size"] == 16 and meta["num_classes"] == 10 and meta["max_len"] == 128
    assert meta["counts"] == {"train": 50, "dev": 10, "test": 10}
    assert len(meta["sha256"]) == 64 and meta["tokens"].startswith("lra")
    check_processed_meta(meta, out)
    names = {"train": "basic_train.tsv", "dev": "basic_val.tsv", "test": "basic_test.tsv"}
    for split, raw_name in names.items():
        data = load_split(out, "lra-listops", split, num_classes=10)
        assert data.x.shape == (meta["counts"][split], 128)
        with np.load(out / f"lra-listops.{split}.npz") as z:
            assert z["x"].dtype == np.int32 and z["lengths"].dtype == np.int32 and z["y"].dtype == np.int64
        for row, (src, tgt) in zip(range(len(data)), read_tsv(raw / "listops-1000" / raw_name)[1:], strict=True):
            n = int(data.lengths[row])
            assert [meta["vocab"][i] for i in data.x[row, :n]] == model_tokens(src)
            assert (data.x[row, n:] == 0).all() and (data.x[row, :n] > 0).all()
            assert data.y[row] == int(tgt) == evaluate([meta["vocab"][i] for i in data.x[row, :n]])


def test_old_processed_data_is_refused() -> None:
    old = {"vocab": ["<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", "(", ")", *"0123456789"], "vocab_size": 18}
    with pytest.raises(DataError, match="older version.*re-run: python -m preprocess.create_listops"):
        check_processed_meta(old, "data/x")


def test_preprocess_refuses_overwrite(tmp_path: Path) -> None:
    raw = small_raw(tmp_path)
    out = tmp_path / "out"
    preprocess_listops(raw, out, max_len=120)
    with pytest.raises(DataError, match="--force"):
        preprocess_listops(raw, out, max_len=120)
    assert preprocess_listops(raw, out, max_len=256, force=True)["max_len"] == 256


def test_preprocess_malformed(tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "listops-1000"
    folder.mkdir(parents=True)
    good = "Source\tTarget\r\n( ( ( [MAX 2 ) 9 ) ] )\t9\r\n"
    for name in ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]:
        (folder / name).write_bytes(good.encode())
    assert preprocess_listops(tmp_path / "raw", tmp_path / "ok", max_len=4)["counts"]["train"] == 1
    for bad, msg in [("( [FOO 1 ] )\t1\n", "unknown token"), ("1 2\t10\n", "outside"),
                     ("1\tx\n", "not an integer"), ("1\t1\t1\n", "2 tab-separated"), ("( )\t1\n", "empty Source")]:
        (folder / "basic_test.tsv").write_text("Source\tTarget\n" + bad)
        with pytest.raises(DataError, match=msg):
            preprocess_listops(tmp_path / "raw", tmp_path / "bad", max_len=16, force=True)
    (folder / "basic_test.tsv").write_bytes(b"Source\tTarget\n\xff 1\t1\n")
    with pytest.raises(DataError, match="not ASCII"):
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
    r = run_module("sat.data.listops", "--raw", str(raw), "--min_len", "30", "--max_len", "31", "--force")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_generated_data_follows_its_settings(tmp_path: Path) -> None:
    from sat.config import load_config
    from sat.data.loading import default_data_dir, prepare_data

    gen = {"n_train": 8, "n_val": 4, "n_test": 4, "min_len": 10, "max_len": 40}
    cfg = load_config("lra-listops", "quick", overrides={"dataset": {"generate": gen}})
    out = default_data_dir(cfg, tmp_path)
    assert out == tmp_path / "data" / "lra-listops-generated-256"
    prepare_data(cfg, out)
    first = (out / "lra-listops.train.npz").stat().st_mtime_ns
    prepare_data(cfg, out)  # same settings: kept
    assert (out / "lra-listops.train.npz").stat().st_mtime_ns == first
    assert load_meta(out, "lra-listops")["generate"] == gen
    cfg2 = load_config("lra-listops", "quick", overrides={"dataset": {"generate": {**gen, "n_train": 9}}})
    prepare_data(cfg2, out)  # other settings: generated again
    assert load_meta(out, "lra-listops")["counts"]["train"] == 9
    meta = json.loads((out / "lra-listops.meta.json").read_text())
    del meta["tokens"]  # as written by the old code: regenerated, not refused
    (out / "lra-listops.meta.json").write_text(json.dumps(meta))
    prepare_data(cfg2, out)
    assert load_meta(out, "lra-listops")["tokens"].startswith("lra")


@pytest.mark.slow
def test_the_quick_preset_generates_where_the_readme_says_and_says_so(tmp_path: Path, tiny_run) -> None:
    """One convention for every task's data: data/{name} under --root, {name} = the task for preprocessed data
    and {task}-generated-{N} for a preset's generated set; the run prints the folder it generates into and the
    one it reads, and main_inference evaluates on that same data without being told where it is."""
    from tests.conftest import ROOT

    gen = '{"n_train": 24, "n_val": 6, "n_test": 6, "min_len": 10, "max_len": 40}'
    # the preset's sequences and blocks, the default seed
    argv = tiny_run.argv(name="q", seed=None, steps=2, dense_steps=1, device="cpu",
                         flags=("--preset", "quick", *tiny_run.flags),
                         sets={"dataset.generate": gen, "dataset.max_seq_len": None, "sparsity.block_size": None,
                               "sparsity.density": None})
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "data" / "lra-listops-generated-256"
    assert f"generating ListOps into {folder / 'raw'} " in r.stdout
    assert f"data: {folder}; logs: {tmp_path / 'logs'}" in r.stdout
    assert (folder / "lra-listops.meta.json").is_file()
    assert (folder / "raw" / "listops-1000" / "basic_train.tsv").is_file()
    readme = (ROOT / "README.md").read_text()
    assert "`data/{task}-generated-{N}`" in readme and "data: " in readme  # the README states the same rule
    e = subprocess.run([sys.executable, str(ROOT / "main_inference.py"), *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    assert json.loads(e.stdout.strip().splitlines()[-1])["examples"] == 6
