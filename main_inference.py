"""Evaluate a saved run: test accuracy (top-1 and top-5), mean batch latency and peak memory.

    python main_inference.py --mode eval --task lra-image --random 1001 --name sat
"""

from __future__ import annotations

import argparse
import json
import sys

from sat.checkpoint import CheckpointError
from sat.config import ConfigError, die
from sat.data.format import DataError


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

    from main_train import resolve_device
    from sat.evaluate import evaluate_saved_run
    from sat.runlog import RunPaths

    try:
        out = evaluate_saved_run(RunPaths.make(a.root, a.random, a.task, a.name), a.task, a.split, a.which,
                                 a.data_dir, resolve_device(a.device), a.backend)
    except (ConfigError, DataError, CheckpointError) as e:
        die(str(e))
    print(f"{a.split} accuracy {out['accuracy']:.4f} (top-5 {out['top5']:.4f}) on {out['examples']} examples "
          f"({out['attention']} attention, checkpoint of step {out['checkpoint_step']}); mean batch latency "
          f"{out['mean_batch_latency_ms']:.2f} ms; peak memory {out['peak_memory_mb']:.0f} MB")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
