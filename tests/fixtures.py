"""Raw-format fixture writers, the tiny training run (TinyRun) and subprocess helpers shared by several test
modules."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sat.data.format import Split, save_meta, save_split
from sat.data.listops import TOKENS
from sat.runlog import RunPaths

# ------------------------------------------------------------------------------------ a tiny training run

# the --set items of a tiny run: a one-layer model of width 16 on sequences of 64, 4 blocks of 16 (a quarter kept)
TINY = {"model.num_layers": 1, "model.dim": 16, "model.hidden_dim": 32, "model.head_dim": 8,
        "training.batch_size": 4, "training.eval_frequency": 2, "training.warmup_steps": 1,
        "dataset.max_seq_len": 64, "sparsity.block_size": 16, "sparsity.density": 0.25}


@dataclass(frozen=True)
class TinyRun:
    """A tiny training run: its command line (main_train.py's, which main_inference.py takes too) and its files.

    - `argv(*extra, **overrides)`: --task, --random `seed`, --name, --root, --data_dir `data`, --train_steps
      `steps`, --max_dense_steps `dense_steps`, --device, the `flags` as they are, one --set=KEY=VALUE per item
      of `sets` (VALUE as typed on a command line: 2, 0.25, true, '"monarch"'), then `extra`, last, so that a flag
      or --set repeated there wins. A field that is None leaves its flag out, for the command line's default
      (root: the working folder; seed 1001; name 'sat'; device: CUDA when there is one).
    - `bare(*extra, **overrides)`: the command line that only names the run (no data, steps or --set): what
      --resume takes, the rest coming from the checkpoint.
    - `paths(**overrides)`: the run's sat.runlog.RunPaths (text_log, tensorboard, losses, summary, best, last).
      What the command line leaves to its defaults is given here, e.g. paths(root=the run's working folder).
    - `replace(**overrides)`: the run with other fields, for a module's own runs.
    `overrides` are fields, for that call only; `sets=` among them is merged into the run's items (None drops one).

    The defaults are the tiny run most modules share: ListOps, seed 5, name 'run', 4 steps with the switch forced
    after 2, TINY, the torch attention backend, no progress bar. A module whose runs differ derives its own
    TinyRun and roots it per test; the `tiny_run` fixture (conftest.py) is TinyRun(root=tmp_path).
    """

    root: Path | None = None
    task: str | None = "lra-listops"
    name: str | None = "run"
    seed: int | None = 5
    steps: int | None = 4
    dense_steps: int | None = 2
    data: Path | None = None
    device: str | None = None
    flags: tuple[str, ...] = ("--no_progress", "--backend", "torch")
    sets: Mapping[str, object] = field(default_factory=lambda: dict(TINY))

    def replace(self, **overrides) -> TinyRun:
        if "sets" in overrides:
            merged = {**self.sets, **overrides["sets"]}
            overrides["sets"] = {k: v for k, v in merged.items() if v is not None}
        return dataclasses.replace(self, **overrides)

    def argv(self, *extra: str, **overrides) -> list[str]:
        r = self.replace(**overrides)
        named = [("--task", r.task), ("--random", r.seed), ("--name", r.name), ("--root", r.root),
                 ("--data_dir", r.data), ("--train_steps", r.steps), ("--max_dense_steps", r.dense_steps),
                 ("--device", r.device)]
        return [*(a for flag, value in named if value is not None for a in (flag, str(value))), *r.flags,
                *(f"--set={key}={value}" for key, value in r.sets.items()), *extra]

    def bare(self, *extra: str, **overrides) -> list[str]:
        return dataclasses.replace(self, data=None, steps=None, dense_steps=None, sets={}).argv(*extra, **overrides)

    def paths(self, **overrides) -> RunPaths:
        r = self.replace(**overrides)
        if None in (r.root, r.seed, r.task, r.name):
            raise ValueError(f"TinyRun.paths needs a root, seed, task and name; give the missing as overrides: {r}")
        return RunPaths.make(r.root, r.seed, r.task, r.name)


# ------------------------------------------------------------------------------------ CLI runs (bad input)

# TinyRun's defaults as flags, without --task, --name and --root, for a module that gives its own
SEED = TinyRun.seed
SMALL = TinyRun(task=None, name=None).argv()


def refused(r: subprocess.CompletedProcess, match: str, code: int = 2) -> None:
    """Exit `code`, exactly one stderr line 'error: ...' containing `match`, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, f"exit {r.returncode}, stderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert match.lower() in lines[0].lower(), lines[0]


def nothing_written(root: Path) -> None:
    assert not (root / "checkpoints").exists(), list((root / "checkpoints").rglob("*"))
    assert not (root / "logs").exists(), list((root / "logs").rglob("*"))


# ------------------------------------------------------------------------------------ LRA splits

TASK = "lra-listops"


def write_lra_data(root, sizes=(16, 6, 5), seq_len=16):
    """Processed ListOps-shaped splits whose first token is the example's number (so batches say which
    examples they hold), vocabulary 20, 10 classes."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "dev", "test"), sizes, strict=True):
        x = rng.integers(1, 20, (n, seq_len))
        x[:, 0] = np.arange(n)
        lengths = rng.integers(seq_len // 2, seq_len + 1, n)
        save_split(root, TASK, split, Split(x, lengths, rng.integers(0, 10, n)))
    save_meta(root, TASK, {"vocab_size": 20, "tokens": TOKENS})
    return root


# ------------------------------------------------------------------------------------ image folders

CLASSES = 4


def make_image_folder(root, per_class: int = 12, val_per_class: int = 4):
    """CLASSES colour-tinted classes of noisy PNG/JPEG images of a few sizes, train/ and val/."""
    rng = np.random.default_rng(0)
    tints = rng.uniform(60, 200, (CLASSES, 3))
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = (40, 48) if i % 3 else (36, 36)
                arr = np.clip(rng.normal(tints[c], 70, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / (f"{i}.png" if i % 2 else f"{i}.JPEG"))
    return root


# ------------------------------------------------------------------------------------ raw LRA downloads

def make_imdb(root: Path, n_train: int = 10, n_test: int = 3) -> dict[str, list[tuple[bytes, int]]]:
    """Reviews named so that sorted order = creation order; returns the expected (text, label) per split."""
    out: dict[str, list[tuple[bytes, int]]] = {}
    for split, n in [("train", n_train), ("test", n_test)]:
        out[split] = []
        for label, cls in enumerate(["neg", "pos"]):
            d = root / "aclImdb" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                text = f"{split} {cls} {i} caf\u00e9 <br />".encode() + b"x" * (i * 7)
                (d / f"{i:03d}_{i % 10 + 1}.txt").write_bytes(text)
                out[split].append((text, label))
    return out


def make_aan(root: Path) -> dict[str, list[tuple[int, bytes, bytes]]]:
    d = root / "tsv_data"
    d.mkdir(parents=True)
    out = {}
    for split, n in [("train", 6), ("eval", 2), ("test", 3)]:
        rows = [(i % 2, f"doc {split} {i} \u00fc".encode() * (i + 1), f"other {i}".encode())
                for i in range(n)]
        lines = [f"{'1.0' if y else '0.0'}\tid{i}a\tid{i}b\t".encode() + a + b"\t" + b for i, (y, a, b) in
                 enumerate(rows)]
        header = [b"label\tid1\tid2\ttext1\ttext2"] if split == "eval" else []
        (d / f"new_aan_pairs.{split}.tsv").write_bytes(b"\n".join(header + lines) + b"\n")
        out[split] = rows
    return out


# (R, G, B) -> trunc(255.5 * (0.2989 R + 0.5870 G + 0.1140 B) / 255), worked out by hand
KNOWN_GRAY = [((0, 0, 0), 0), ((255, 255, 255), 255), ((100, 0, 0), 29), ((0, 100, 0), 58), ((0, 0, 100), 11),
              ((255, 0, 0), 76), ((10, 20, 30), 18), ((1, 1, 1), 1), ((128, 64, 32), 79)]


def cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    rgb = rng.integers(0, 256, (n, 3, 1024)).astype(np.uint8)
    for k, ((r, g, b), _) in enumerate(KNOWN_GRAY):  # the first pixels of image 0 are the known triples
        rgb[0, :, k] = (r, g, b)
    return labels, rgb.reshape(n, 3072)


def write_bin(path: Path, labels: np.ndarray, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.concatenate([labels[:, None], rgb], axis=1).astype(np.uint8).tobytes())


def make_cifar(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = root / "cifar-10-batches-bin"
    batches = [cifar_records(6, s) for s in range(2)]
    for i, (labels, rgb) in enumerate(batches, 1):
        write_bin(d / f"data_batch_{i}.bin", labels, rgb)
    test = cifar_records(4, 9)
    write_bin(d / "test_batch.bin", *test)
    train = tuple(np.concatenate(a) for a in zip(*batches, strict=True))
    return {"train": (train[0][:11], train[1][:11]), "dev": (train[0][11:], train[1][11:]), "test": test}


def make_pathfinder(root: Path, n: int = 20, missing: tuple[int, ...] = ()) -> dict[int, int]:
    """Image i has pixel 0 = i (a unique key) and label i % 2; returns {key: label} of existing images."""
    base = root / "pathfinder32" / "curv_baseline"
    (base / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines: dict[int, list[str]] = {0: [], 1: []}
    existing = {}
    for i in range(n):
        sub = f"imgs/{i % 3}"
        (base / sub).mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 256, (32, 32)).astype(np.uint8)
        px[0, 0] = i
        if i not in missing:
            Image.fromarray(px, mode="L").save(base / sub / f"sample_{i}.png")
            existing[i] = i % 2
        lines[i % 2].append(f"{sub} sample_{i}.png {i} {i % 2} 7 extra")
    for k, ls in lines.items():
        (base / "metadata" / f"{k}.npy").write_text("\n".join(ls) + "\n")
    return existing
