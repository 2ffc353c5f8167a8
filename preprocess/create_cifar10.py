"""CIFAR-10 -> processed lra-image data: grayscale pixels as 1024 ids (0-255, no padding).

Reads the binary release ``RAW/cifar-10-batches-bin/data_batch_{1..k}.bin`` and ``test_batch.bin`` (each
record: 1 label byte, then 3072 bytes of R, G, B planes of 32x32). Grayscale the way LRA did, in float64:
``gray = trunc(255.5 * (0.2989 R + 0.5870 G + 0.1140 B) / 255)``. Dev is the last 10% (floor) of the
training batches concatenated in order, train the rest (45000 / 5000 for the full release); test is
test_batch. Lengths are all 1024: 0 is a real (black) pixel here, not padding.

The python-pickle release (``cifar-10-batches-py``) is read only with ``--allow-pickle``: unpickling can run
arbitrary code, so use it only for files you trust.

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
