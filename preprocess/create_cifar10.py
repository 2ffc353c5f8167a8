"""CIFAR-10 -> processed lra-image data: grayscale pixels as 1024 ids (0-255, no padding).

A command line over sat.data.prepare.cifar10, whose docstring says what is read and written:

    python -m preprocess.create_cifar10 --raw RAW --out OUT [--force] [--allow-pickle]
"""

from __future__ import annotations

from sat.data.prepare import base_parser, report, run_cli
from sat.data.prepare.cifar10 import preprocess_cifar10

__all__ = ["preprocess_cifar10", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("CIFAR-10 -> processed lra-image .npz (grayscale, 1024 pixels per image).")
    p.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                   help="also read the python-pickle release (cifar-10-batches-py); only for trusted files")
    a = p.parse_args(argv)
    report(preprocess_cifar10(a.raw, a.out, a.force, a.allow_pickle), a.out)


if __name__ == "__main__":
    run_cli(main)
