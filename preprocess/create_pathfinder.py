"""Pathfinder -> processed lra-pathfinder data: grayscale PNG pixels as ids 0-255 (no padding).

Reads ``RAW/pathfinder32/{difficulty}/metadata/*.npy``: despite the suffix these are text files, one image per
line, whitespace-separated ``imgs/{dir} {file} ... label`` with the label (0/1) in the 4th field; the image is
``RAW/pathfinder32/{difficulty}/imgs/{dir}/{file}``, a 32x32 grayscale PNG, flattened row by row to 1024 ids.

Order and split: metadata files in natural name order (0.npy, 1.npy, ..., 10.npy), lines in file order; that
list is shuffled with ``numpy.random.default_rng(0).permutation`` and cut 80/10/10 into train/dev/test (dev
and test get floor(n/10) each). An image listed but missing is skipped and counted (meta "skipped_missing");
a metadata line with fewer than 4 fields or a label other than 0/1 is an error, as is an unreadable image or
one of the wrong size.

    python -m preprocess.create_pathfinder --raw RAW --out OUT [--difficulty curv_baseline] [--force]
"""

from __future__ import annotations

from sat.data.prepare import base_parser, report, run_cli
from sat.data.prepare.pathfinder import DIFFICULTIES, preprocess_pathfinder

__all__ = ["preprocess_pathfinder", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("Pathfinder -> processed lra-pathfinder .npz (1024 pixels per image).")
    p.add_argument("--difficulty", default="curv_baseline", choices=DIFFICULTIES)
    p.add_argument("--resolution", type=int, default=32, help="image side; reads RAW/pathfinder{resolution}")
    a = p.parse_args(argv)
    report(preprocess_pathfinder(a.raw, a.out, a.difficulty, a.force, a.resolution), a.out)


if __name__ == "__main__":
    run_cli(main)
