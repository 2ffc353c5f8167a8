"""Preprocess scripts on tiny raw fixtures written in each raw format (docs/data.md)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sat.data.format import DataError, load_meta, load_split
from sat.data.prepare import encode_bytes
from sat.data.prepare.cifar10 import preprocess_cifar10, to_gray
from sat.data.prepare.csv_text import preprocess_csv_text
from sat.data.prepare.pathfinder import preprocess_pathfinder
from sat.data.prepare.retrieval import preprocess_retrieval
from sat.data.prepare.text import preprocess_text
from tests.fixtures import KNOWN_GRAY, cifar_records, make_aan, make_cifar, make_imdb, make_pathfinder, write_bin

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def decode(ids: np.ndarray, length: int) -> bytes:
    assert (ids[length:] == 0).all() and (ids[:length] > 0).all()
    return bytes((ids[:length] - 1).astype(np.uint8).tolist())


@given(st.binary(max_size=64), st.integers(1, 80))
@settings(max_examples=200, deadline=None)
def test_byte_encoding_round_trip(data: bytes, max_len: int) -> None:
    ids = encode_bytes(data, max_len)
    assert ids.dtype == np.int32 and ids.min(initial=1) >= 1 and ids.max(initial=256) <= 256
    assert bytes((ids - 1).astype(np.uint8).tolist()) == data[:max_len]


# ---------------------------------------------------------------- IMDB


def test_text(tmp_path: Path) -> None:
    expected = make_imdb(tmp_path / "raw")
    (tmp_path / "raw" / "aclImdb" / "train" / "pos" / "notes.md").write_text("ignored")
    meta = preprocess_text(tmp_path / "raw", tmp_path / "out", max_len=40)
    assert meta == load_meta(tmp_path / "out", "lra-text")
    assert meta["counts"] == {"train": 18, "dev": 2, "test": 6}
    assert meta["vocab_size"] == 257 and meta["num_classes"] == 2 and meta["max_len"] == 40
    train_all = expected["train"]
    want = {"train": [e for i, e in enumerate(train_all) if i % 10 != 9], "dev": train_all[9::10],
            "test": expected["test"]}
    for split, rows in want.items():
        data = load_split(tmp_path / "out", "lra-text", split, num_classes=2)
        assert data.x.shape == (len(rows), 40)
        for r, (text, label) in enumerate(rows):
            assert decode(data.x[r], int(data.lengths[r])) == text[:40]
            assert data.lengths[r] == min(len(text), 40)
            assert data.y[r] == label
    assert list(load_split(tmp_path / "out", "lra-text", "dev").y) == [0, 1]


def test_text_skips_empty_and_errors(tmp_path: Path) -> None:
    make_imdb(tmp_path / "raw")
    (tmp_path / "raw" / "aclImdb" / "test" / "neg" / "999_1.txt").write_bytes(b"")
    meta = preprocess_text(tmp_path / "raw" / "aclImdb", tmp_path / "out", max_len=16)
    assert meta["skipped_empty"] == 1 and meta["counts"]["test"] == 6
    for p in (tmp_path / "raw" / "aclImdb" / "test" / "pos").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no \\*.txt reviews"):
        preprocess_text(tmp_path / "raw", tmp_path / "out2")
    with pytest.raises(DataError, match="missing"):
        preprocess_text(tmp_path / "nowhere", tmp_path / "out3")


# ---------------------------------------------------------------- retrieval


def test_retrieval(tmp_path: Path) -> None:
    expected = make_aan(tmp_path / "raw")
    meta = preprocess_retrieval(tmp_path / "raw", tmp_path / "out", max_len=24)
    assert meta["counts"] == {"train": 6, "dev": 2, "test": 3}
    assert meta["vocab_size"] == 257 and meta["num_classes"] == 2
    for split, raw in [("train", "train"), ("dev", "eval"), ("test", "test")]:
        data = load_split(tmp_path / "out", "lra-retrieval", split, num_classes=2)
        assert data.x.shape == (len(expected[raw]), 2, 24) and data.lengths.shape == (len(expected[raw]), 2)
        for r, (y, a, b) in enumerate(expected[raw]):
            assert decode(data.x[r, 0], int(data.lengths[r, 0])) == a[:24]
            assert decode(data.x[r, 1], int(data.lengths[r, 1])) == b[:24]
            assert data.y[r] == y


@pytest.mark.parametrize("line,msg", [(b"1\ta\tb\tonly four", "5 tab-separated"),
                                      (b"2\ta\tb\tx\ty", "not 0 or 1"), (b"yes\ta\tb\tx\ty", "not 0 or 1")])
def test_retrieval_malformed(tmp_path: Path, line: bytes, msg: str) -> None:
    make_aan(tmp_path / "raw")
    path = tmp_path / "raw" / "tsv_data" / "new_aan_pairs.test.tsv"
    path.write_bytes(b"0\ta\tb\tx\ty\n" + line + b"\n")
    with pytest.raises(DataError, match=msg):
        preprocess_retrieval(tmp_path / "raw", tmp_path / "out")


# ---------------------------------------------------------------- CIFAR-10

def test_gray_formula_known_pixels() -> None:
    rgb = np.zeros((1, 3, 1024), dtype=np.uint8)
    for k, ((r, g, b), _) in enumerate(KNOWN_GRAY):
        rgb[0, :, k] = (r, g, b)
    gray = to_gray(rgb.reshape(1, 3072))
    assert gray.shape == (1, 1024) and gray.dtype == np.int32
    assert gray[0, :len(KNOWN_GRAY)].tolist() == [g for _, g in KNOWN_GRAY]


def test_cifar10_binary(tmp_path: Path) -> None:
    expected = make_cifar(tmp_path / "raw")
    meta = preprocess_cifar10(tmp_path / "raw", tmp_path / "out")
    assert meta["counts"] == {"train": 11, "dev": 1, "test": 4}
    assert meta["vocab_size"] == 256 and meta["max_len"] == 1024 and meta["num_classes"] == 10
    for split, (labels, rgb) in expected.items():
        data = load_split(tmp_path / "out", "lra-image", split, num_classes=10)
        assert (data.lengths == 1024).all()
        assert data.y.tolist() == labels.tolist()
        planes = rgb.reshape(-1, 3, 1024).astype(np.float64)
        want = np.trunc(255.5 * (0.2989 * planes[:, 0] + 0.5870 * planes[:, 1] + 0.1140 * planes[:, 2]) / 255)
        assert (data.x == want).all()
    train = load_split(tmp_path / "out", "lra-image", "train")
    assert train.x[0, :len(KNOWN_GRAY)].tolist() == [g for _, g in KNOWN_GRAY]


def test_cifar10_malformed(tmp_path: Path) -> None:
    make_cifar(tmp_path / "raw")
    d = tmp_path / "raw" / "cifar-10-batches-bin"
    with open(d / "data_batch_2.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="whole number"):
        preprocess_cifar10(tmp_path / "raw", tmp_path / "out")
    write_bin(d / "data_batch_2.bin", np.array([10], dtype=np.uint8), np.zeros((1, 3072), dtype=np.uint8))
    with pytest.raises(DataError, match="outside 0..9"):
        preprocess_cifar10(tmp_path / "raw", tmp_path / "out")
    (d / "data_batch_2.bin").rename(d / "data_batch_3.bin")
    with pytest.raises(DataError, match="one is missing"):
        preprocess_cifar10(tmp_path / "raw", tmp_path / "out")


def test_cifar10_pickle_needs_flag(tmp_path: Path) -> None:
    d = tmp_path / "raw" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    labels, rgb = cifar_records(10, 0)
    for name, sl in [("data_batch_1", slice(0, 10)), ("test_batch", slice(0, 3))]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rgb[sl], b"labels": labels[sl].tolist()}, f)
    with pytest.raises(DataError, match="--allow-pickle"):
        preprocess_cifar10(tmp_path / "raw", tmp_path / "out")
    meta = preprocess_cifar10(tmp_path / "raw", tmp_path / "out", allow_pickle=True)
    assert meta["counts"] == {"train": 9, "dev": 1, "test": 3} and meta["release"] == "pickle"
    train = load_split(tmp_path / "out", "lra-image", "train")
    assert (train.x == to_gray(rgb[:9])).all() and train.y.tolist() == labels[:9].tolist()
    r = run_module("preprocess.create_cifar10", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "--allow-pickle" in r.stderr
    r = run_module("preprocess.create_cifar10", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o2"),
                   "--allow-pickle")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- Pathfinder


def test_pathfinder(tmp_path: Path) -> None:
    existing = make_pathfinder(tmp_path / "raw", missing=(3,))
    meta = preprocess_pathfinder(tmp_path / "raw", tmp_path / "out")
    assert meta["skipped_missing"] == 1 and meta["difficulty"] == "curv_baseline"
    assert sum(meta["counts"].values()) == 19 and meta["counts"]["dev"] + meta["counts"]["test"] in (3, 4)
    seen = []
    for split in ["train", "dev", "test"]:
        data = load_split(tmp_path / "out", "lra-pathfinder", split, num_classes=2)
        assert data.x.shape[1] == 1024 and (data.lengths == 1024).all()
        assert data.x.min() >= 0 and data.x.max() <= 255
        for row, y in zip(data.x, data.y, strict=True):
            assert existing[int(row[0])] == y
            seen.append(int(row[0]))
    assert sorted(seen) == sorted(existing)
    again = preprocess_pathfinder(tmp_path / "raw", tmp_path / "out2")
    for split in ["train", "dev", "test"]:
        a = load_split(tmp_path / "out", "lra-pathfinder", split)
        b = load_split(tmp_path / "out2", "lra-pathfinder", split)
        assert (a.x == b.x).all() and (a.y == b.y).all()
    assert again["sha256"] == meta["sha256"]


def test_pathfinder_full_split_sizes(tmp_path: Path) -> None:
    make_pathfinder(tmp_path / "raw", n=30)
    assert preprocess_pathfinder(tmp_path / "raw", tmp_path / "out")["counts"] == {"train": 24, "dev": 3,
                                                                                 "test": 3}


def test_pathfinder_malformed(tmp_path: Path) -> None:
    make_pathfinder(tmp_path / "raw")
    meta_file = tmp_path / "raw" / "pathfinder32" / "curv_baseline" / "metadata" / "1.npy"
    meta_file.write_text("imgs/0 sample_0.png 0\n")
    with pytest.raises(DataError, match="at least 4"):
        preprocess_pathfinder(tmp_path / "raw", tmp_path / "out")
    meta_file.write_text("imgs/0 sample_0.png 0 5\n")
    with pytest.raises(DataError, match="not 0 or 1"):
        preprocess_pathfinder(tmp_path / "raw", tmp_path / "out")
    meta_file.write_text("imgs/0 sample_0.png 0 1\n")
    Image.new("L", (16, 16)).save(tmp_path / "raw" / "pathfinder32" / "curv_baseline" / "imgs/0/sample_0.png")
    with pytest.raises(DataError, match="expected 32x32"):
        preprocess_pathfinder(tmp_path / "raw", tmp_path / "out")
    with pytest.raises(DataError, match="missing"):
        preprocess_pathfinder(tmp_path / "raw", tmp_path / "out", difficulty="curv_contour_length_14")


# ---------------------------------------------------------------- CSV text


def test_csv_text(tmp_path: Path) -> None:
    train = tmp_path / "train.csv"
    test = tmp_path / "test.csv"
    rows = [(str(1 + i % 3), f"title {i}", f"desc, \"quoted\" {i}\u00e9") for i in range(20)]
    train.write_text("class,title,description\n" + "".join(f'{a},"{b}","{c.replace(chr(34), 2 * chr(34))}"\n'
                                                            for a, b, c in rows), encoding="utf-8")
    test.write_text('3,"t","x"\n1,"u",""\n10,"v","y"\n', encoding="utf-8")
    with pytest.raises(DataError, match="never occurs"):
        preprocess_csv_text(train, test, tmp_path / "out", name="ag", max_len=20)
    test.write_text('3,"t","x"\n1,"u",""\n', encoding="utf-8")
    meta = preprocess_csv_text(train, test, tmp_path / "out", name="ag", max_len=20)
    assert meta["label_map"] == {"1": 0, "2": 1, "3": 2} and meta["num_classes"] == 3
    assert meta["counts"] == {"train": 18, "dev": 2, "test": 2}
    dev = load_split(tmp_path / "out", "csv-text", "dev", num_classes=3)
    for r, i in enumerate([9, 19]):
        text = f"title {i} desc, \"quoted\" {i}\u00e9".encode()
        assert decode(dev.x[r], int(dev.lengths[r])) == text[:20]
        assert dev.y[r] == i % 3
    test_split = load_split(tmp_path / "out", "csv-text", "test")
    assert decode(test_split.x[1], int(test_split.lengths[1])) == b"u "
    assert test_split.y.tolist() == [2, 0]


def test_csv_text_string_labels_and_errors(tmp_path: Path) -> None:
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("pos,good\nneg,bad\npos,fine\n")
    test.write_text("neg,meh\n")
    with pytest.raises(DataError, match="dev split"):  # 3 rows: no dev example
        preprocess_csv_text(train, test, tmp_path / "out")
    train.write_text("".join(f"{'pos' if i % 2 else 'neg'},text {i}\n" for i in range(10)))
    assert preprocess_csv_text(train, test, tmp_path / "out")["label_map"] == {"neg": 0, "pos": 1}
    train.write_text("just-one-column\n")
    with pytest.raises(DataError, match="expected label,text"):
        preprocess_csv_text(train, test, tmp_path / "out", force=True)
    with pytest.raises(DataError, match="--name"):
        preprocess_csv_text(train, test, tmp_path / "out", name="../evil")


# ---------------------------------------------------------------- CLI: exit codes, overwrite, --force


def test_cli_missing_overwrite_force(tmp_path: Path) -> None:
    make_imdb(tmp_path / "raw", n_train=10, n_test=2)
    out = tmp_path / "out"
    base = ["--raw", str(tmp_path / "raw"), "--out", str(out)]
    r = run_module("preprocess.create_text", *base, "--max_len", "32")
    assert r.returncode == 0, r.stderr
    assert "lra-text: train 18, dev 2, test 4" in r.stdout
    before = (out / "lra-text.train.npz").read_bytes()
    r = run_module("preprocess.create_text", *base, "--max_len", "16")
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "lra-text.train.npz").read_bytes() == before
    r = run_module("preprocess.create_text", *base, "--max_len", "16", "--force")
    assert r.returncode == 0, r.stderr
    assert load_meta(out, "lra-text")["max_len"] == 16
    missing = ["--raw", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    modules = ["create_text", "create_retrieval", "create_cifar10", "create_pathfinder", "create_listops"]
    for module in modules:
        r = run_module(f"preprocess.{module}", *missing)
        assert r.returncode == 2, (module, r.stderr)
        assert r.stderr.startswith("error: missing") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_module("preprocess.create_csv_text", "--train", str(tmp_path / "no.csv"), "--test",
                   str(tmp_path / "no.csv"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("error: missing")


def test_csv_text_trains_as_a_task(tmp_path: Path, tiny_run) -> None:
    """create_csv_text's output trains with --task csv-text --data_dir, the class count read from its meta."""
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("".join(f"{1 + i % 4},sample text number {i}\n" for i in range(48)), encoding="utf-8")
    test.write_text("".join(f"{1 + i % 4},held out {i}\n" for i in range(8)), encoding="utf-8")
    r = run_module("preprocess.create_csv_text", "--train", str(train), "--test", str(test), "--out",
                   str(tmp_path / "agnews"), "--name", "agnews", "--max_len", "32")
    assert r.returncode == 0, r.stderr
    # the task's model widths, the default seed, attention backend and device
    ag = tiny_run.replace(task="csv-text", data=tmp_path / "agnews", name="ag", seed=None, flags=("--no_progress",),
                          sets={"dataset.max_seq_len": 32, "sparsity.block_size": 8, "model.dim": None,
                                "model.hidden_dim": None, "model.head_dim": None})
    argv = ag.argv()
    paths = ag.paths(seed=1001)  # --random's default names the folders
    r = subprocess.run([sys.executable, str(ROOT / "main_train.py"), *argv], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(paths.summary.read_text())
    assert summary["task"] == "csv-text" and summary["transition_step"] == 2
    log = paths.text_log.read_text()
    assert "dev accuracy" in log and "top-5" not in log  # 4 classes: no top-5 in the text
    assert "None" not in log
    # the same command line evaluates the run (4 classes: no top-5 there either)
    e = subprocess.run([sys.executable, str(ROOT / "main_inference.py"), *argv], capture_output=True, text=True,
                       timeout=600)
    assert e.returncode == 0, e.stderr[-2000:]
    line, result = e.stdout.strip().splitlines()
    assert "top-5" not in line and json.loads(result)["accuracy"] == pytest.approx(summary["test_accuracy"])
    readme = (ROOT / "README.md").read_text()  # the README gives the commands this test runs
    assert "python -m preprocess.create_csv_text --train train.csv --test test.csv --out data/agnews" in readme
    assert "python main_train.py --task csv-text --data_dir data/agnews" in readme
