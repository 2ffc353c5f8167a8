"""Quality parity: quick-preset ListOps, dense-only training against the automatic dense->sparse switch.

    python bench/parity.py [--seeds 1001 1002 1003]

Runs main_train.py (one process per run, sequentially) with and without --no_switch for each seed, then
prints the mean and spread of test accuracy and wall time, and the switch steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(root: Path, seed: int, name: str, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "main_train.py"), "--task", "lra-listops", "--preset", "quick",
                    "--random", str(seed), "--name", name, "--root", str(root), "--no_progress",
                    "--data_dir", str(root / "data"), *extra], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((root / "logs" / f"log-{seed}" / "lra-listops" / f"{name}.summary.json").read_text())
    return {**summary, "wall_s": wall}


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1001, 1002, 1003])
    p.add_argument("--root", help="work folder (default: a temporary one)")
    a = p.parse_args()
    root = Path(a.root or tempfile.mkdtemp(prefix="sat-parity-"))
    sys.path.insert(0, str(ROOT))
    from sat.config import load_config
    from sat.data.loading import prepare_data

    prepare_data(load_config("lra-listops", "quick"), root / "data")  # the same data for every run
    results: dict[str, list[dict]] = {"dense-only": [], "auto-switch": []}
    for seed in a.seeds:
        results["dense-only"].append(run(root, seed, "dense", ["--no_switch"]))
        results["auto-switch"].append(run(root, seed, "sat", []))
    print(f"quick-preset ListOps, seeds {a.seeds}")
    print(f"{'mode':<14}{'test acc mean':>14}{'± sd':>8}{'wall s mean':>13}{'± sd':>8}  switch steps (reason)")
    for mode, rs in results.items():
        acc = [100 * r["test_accuracy"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        switches = ", ".join(f"{r['transition_step']} ({r['transition_reason']})" for r in rs)
        print(f"{mode:<14}{statistics.mean(acc):>14.2f}{sd(acc):>8.2f}{statistics.mean(wall):>13.1f}"
              f"{sd(wall):>8.1f}  {switches}")
    d = statistics.mean(r["wall_s"] for r in results["dense-only"])
    s = statistics.mean(r["wall_s"] for r in results["auto-switch"])
    gap = statistics.mean(100 * r["test_accuracy"] for r in results["auto-switch"]) - statistics.mean(
        100 * r["test_accuracy"] for r in results["dense-only"])
    print(f"accuracy difference (auto - dense): {gap:+.2f} points; wall-time ratio dense/auto: {d / s:.2f}x")


if __name__ == "__main__":
    main()
