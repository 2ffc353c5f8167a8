"""Fashion-MNIST -> processed lra-image data (LRA's image protocol: 32x32 after padding, 1024 pixel ids).

A command line over sat.data.prepare.fashion_mnist, whose docstring says what is read and written. Without
--raw it reads the release Debian's dataset-fashion-mnist package installed:

    python -m preprocess.create_fashion_mnist --out data/lra-image-fashion-mnist [--raw DIR] [--force]
"""

from __future__ import annotations

from sat.data.prepare import base_parser, report, run_cli
from sat.data.prepare.fashion_mnist import preprocess_fashion_mnist

__all__ = ["preprocess_fashion_mnist", "main"]


def main(argv: list[str] | None = None) -> None:
    p = base_parser("Fashion-MNIST (Zalando's IDX release) -> processed lra-image .npz (1024 pixels per image).",
                    raw=False)
    p.add_argument("--raw", help="folder holding the four IDX files (default: where the Debian package "
                                 "dataset-fashion-mnist installed them)")
    a = p.parse_args(argv)
    report(preprocess_fashion_mnist(a.out, a.raw, a.force), a.out)


if __name__ == "__main__":
    run_cli(main)
