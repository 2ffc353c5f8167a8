"""Pathfinder -> processed lra-pathfinder data: grayscale PNG pixels as ids 0-255 (no padding).

A command line over sat.data.prepare.pathfinder, whose docstring says what is read and written:

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
