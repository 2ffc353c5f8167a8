"""Evaluate a saved run: test accuracy (top-1 and top-5), mean batch latency and peak memory.

    python main_inference.py --mode eval --task lra-image --random 1001 --name sat
    python main_inference.py --task lra-listops --preset quick        # the training command line works too

Every main_train.py flag is accepted: the configuration comes from the run's checkpoint, flags that only steer
training are ignored, and a flag that contradicts the checkpoint where it matters for evaluation (model, data
shape, precision) is refused. --data_dir may point at another copy of the data.
"""

from __future__ import annotations

import sys

from sat.cli import evaluate_run, run_parser


def main(argv: list[str] | None = None) -> int:
    p = run_parser("main_inference.py", __doc__.split("\n")[0], modes=["eval"])
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--which", default="best", choices=["best", "last"], help="best dev checkpoint or the last one")
    return evaluate_run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
