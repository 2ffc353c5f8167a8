"""Evaluate a saved run: test accuracy (top-1 and top-5), mean batch latency and peak memory.

    python main_inference.py --mode eval --task lra-image --random 1001 --name sat
"""

from __future__ import annotations

import argparse
import sys

from sat.cli import evaluate_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="eval", choices=["eval"])
    p.add_argument("--task", required=True)
    p.add_argument("--random", type=int, default=1001)
    p.add_argument("--name", default="sat")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--which", default="best", choices=["best", "last"], help="best dev checkpoint or the last one")
    p.add_argument("--data_dir", help="processed data (default: the one the run trained on)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    p.add_argument("--device", default="auto")
    p.add_argument("--root", default=".")
    a = p.parse_args(argv)
    return evaluate_run(a.task, a.random, a.name, a.root, a.device, a.backend, split=a.split, which=a.which,
                        data_dir=a.data_dir)


if __name__ == "__main__":
    sys.exit(main())
