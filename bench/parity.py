"""Quality parity: dense-only training against the automatic dense->sparse switch, for any preset.

    python bench/parity.py --preset quick [--seeds 1001 1002 1003] [--modes dense learned coverage]
        [--extra_seeds 1001 1002 1003] [--out bench/results/parity-quick.txt]

Every run is its own main_train.py process, one after another, on the same generated data. Modes:
dense (--no_switch), learned (SAT's rule: top-k of the learned pattern G = P P^T), measured (top-k of the
measured block mass), coverage (the fewest blocks keeping `recall_target` of the measured mass), measured-diag
(measured with `keep_diagonal`: every query block keeps its own key block among the k). `--seeds`
are used for dense and for the default mode (the first of --modes after dense), `--extra_seeds` for the
other modes. Prints per-seed rows; mean and sample sd per mode; for every automatic mode the paired
difference against dense-only on the seeds both ran, with a 95% t confidence interval; the wall-time ratio;
switch steps; layout recall and density used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every automatic mode names its pattern, diagonal rule and selection, so that a row means the same whatever the
# task's defaults are: mode -> (pattern, keep_diagonal, selection, further flags)
_AUTOMATIC = {
    "learned": ("learned", False, "global", []), "measured": ("measured", False, "global", []),
    "coverage": ("coverage", False, "global", []), "measured-diag": ("measured", True, "global", []),
    # other spreads of the same measured top-k (sat.sparsity.pattern.selection_scores)
    "rows-diag": ("measured", True, "rows", []), "stripes-diag": ("measured", True, "stripes", []),
    # negative controls: a random layout at the same density, and the default rule switched after the first
    # monitored step, before anything is learned
    "random-diag": ("random", True, "global", []),
    "forced-first": ("measured", True, "global", ["--max_dense_steps=1"]),
}
MODES = {"dense": ["--no_switch"]} | {
    mode: [f"--set=sparsity.pattern=\"{pattern}\"", f"--set=sparsity.keep_diagonal={str(diagonal).lower()}",
           f"--set=sparsity.selection=\"{selection}\"", *more]
    for mode, (pattern, diagonal, selection, more) in _AUTOMATIC.items()}
# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (scipy is not a run-time dependency)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run(root: Path, task: str, preset: str, seed: int, mode: str, extra: list[str], threads: int = 0) -> dict:
    name = f"{mode}-{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "main_train.py"), "--task", task, "--preset", preset,
                    "--random", str(seed), "--name", name, "--root", str(root), "--no_progress",
                    "--data_dir", str(root / "data"), *MODES[mode], *extra], check=True, stdout=subprocess.DEVNULL,
                   env=env)
    wall = time.perf_counter() - t0
    summary = json.loads((root / "logs" / f"log-{seed}" / task / f"{name}.summary.json").read_text())
    return {**summary, "wall_s": wall, "seed": seed, "mode": mode}


_RECORD = threading.Lock()  # runs.jsonl is appended to by --jobs runs at once


def cached_run(root: Path, task: str, preset: str, seed: int, mode: str, extra: list[str],
               threads: int = 0) -> dict:
    """One run, or its record from an earlier invocation with the same --root (runs.jsonl), so that an
    interrupted comparison continues where it stopped; every finished run is printed as it ends."""
    done = root / "runs.jsonl"
    if done.exists():
        for line in done.read_text().splitlines():
            r = json.loads(line)
            if r["seed"] == seed and r["mode"] == mode:
                return r
    r = {**run(root, task, preset, seed, mode, extra, threads), "threads": threads or None}
    with _RECORD, done.open("a") as f:
        f.write(json.dumps(r) + "\n")
    rec = (r.get("layout_recall") or {}).get("mean")
    print(f"{mode} seed {seed}: test {100 * r['test_accuracy']:.2f}%, {r['wall_s']:.1f} s, switch "
          f"{r['transition_step'] or '-'}, recall {'-' if rec is None else f'{rec:.3f}'}", flush=True)
    return r


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (nan with a single value)."""
    m = statistics.mean(xs)
    n = len(xs)
    if n < 2:
        return m, math.nan
    return m, T95.get(n - 1, 1.96) * statistics.stdev(xs) / math.sqrt(n)


def tested_phase(r: dict) -> str:
    """Which phase trained the checkpoint the test accuracy comes from (the best dev one): an evaluation at the
    switch step already runs sparse, but its weights were trained dense up to there."""
    step, best = r.get("transition_step"), r.get("best_step")
    return "sparse" if step and best is not None and best > step else "dense"


def report(task: str, preset: str, results: dict[str, list[dict]]) -> str:
    lines = [f"{task} --preset {preset}: test accuracy (%), wall time (s), switch, layout recall, density used"]
    lines.append(f"{'mode':<14}{'seeds':>6}{'acc mean':>10}{'± sd':>7}{'wall mean':>11}{'± sd':>7}"
                 f"{'recall':>8}{'density':>9}  switch steps (reason)")
    for mode, rs in results.items():
        acc = [100 * r["test_accuracy"] for r in rs]
        wall = [r["wall_s"] for r in rs]
        recall = [r["layout_recall"]["mean"] for r in rs if r.get("layout_recall") and r["layout_recall"]["mean"]]
        dens = [r["density_used"] for r in rs if r.get("density_used")]
        switches = ", ".join(f"{r['transition_step']} ({r['transition_reason']})" if r["transition_step"] else "-"
                             for r in rs)
        lines.append(f"{mode:<14}{len(rs):>6}{statistics.mean(acc):>10.2f}{sd(acc):>7.2f}"
                     f"{statistics.mean(wall):>11.1f}{sd(wall):>7.1f}"
                     f"{statistics.mean(recall) if recall else math.nan:>8.3f}"
                     f"{statistics.mean(dens) if dens else math.nan:>9.3f}  {switches}")
        if mode != "dense":
            sparse = sum(tested_phase(r) == "sparse" for r in rs)
            lines.append(f"{'':<14}{sparse} of {len(rs)} tested checkpoints trained past the switch (the test "
                         f"accuracy of the others is a dense-phase model's)")
    dense = {r["seed"]: r for r in results.get("dense", [])}
    for mode, rs in results.items():
        paired = [(r, dense[r["seed"]]) for r in rs if mode != "dense" and r["seed"] in dense]
        if not paired:
            continue
        diff = [100 * (a["test_accuracy"] - d["test_accuracy"]) for a, d in paired]
        m, h = ci95(diff)
        ratio = sum(d["wall_s"] for _, d in paired) / sum(a["wall_s"] for a, _ in paired)
        lines.append(f"{mode} - dense (paired, {len(paired)} seeds): {m:+.2f} points, 95% CI [{m - h:+.2f}, "
                     f"{m + h:+.2f}]; per seed {', '.join(f'{x:+.1f}' for x in diff)}; wall-time ratio dense/{mode} "
                     f"{ratio:.2f}x")
    lines.append("per run: seed mode test% wall_s switch best-dev-step(tested phase) recall density "
                 "steps/s(dense, sparse)")
    for mode, rs in results.items():
        for r in rs:
            rec = (r.get("layout_recall") or {}).get("mean")
            lines.append(f"  {r['seed']} {mode:<13} {100 * r['test_accuracy']:.2f} {r['wall_s']:.1f} "
                         f"{r['transition_step'] or '-'} {r.get('best_step', '-')}({tested_phase(r)}) "
                         f"{'-' if rec is None else f'{rec:.3f}'} "
                         f"{_num(r['density_used'], 3)} ({_num(r['dense_steps_per_sec'], 2)}, "
                         f"{_num(r['sparse_steps_per_sec'], 2)})")
    return "\n".join(lines)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="lra-listops")
    p.add_argument("--preset", default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[1001, 1002, 1003])
    p.add_argument("--extra_seeds", type=int, nargs="*", default=None,
                   help="seeds for the modes after the default one (default: --seeds)")
    p.add_argument("--modes", nargs="+", default=["dense", "learned"], choices=list(MODES))
    p.add_argument("--set", action="append", default=[], help="extra --set for every run")
    p.add_argument("--root", help="work folder (default: a temporary one); runs already recorded in its "
                   "runs.jsonl are not run again")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with an equal share of the cores as "
                   "its threads (OMP_NUM_THREADS); wall times then compare only with runs made the same way")
    a = p.parse_args()
    root = Path(a.root or tempfile.mkdtemp(prefix="sat-parity-"))
    sys.path.insert(0, str(ROOT))
    from sat.config import load_config
    from sat.data.loading import prepare_data

    prepare_data(load_config(a.task, a.preset), root / "data")  # the same data for every run
    extra = [f"--set={s}" for s in a.set]
    autos = [m for m in a.modes if m != "dense"]
    planned = [(seed, mode) for seed in a.seeds for mode in a.modes if mode == "dense" or mode == autos[0]]
    planned += [(seed, mode) for seed in (a.seeds if a.extra_seeds is None else a.extra_seeds) for mode in autos[1:]]
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # each run is its own process; threads only wait
        done = list(pool.map(lambda job: cached_run(root, a.task, a.preset, *job, extra, threads), planned))
    results: dict[str, list[dict]] = {m: [] for m in a.modes}
    for (_, mode), r in zip(planned, done, strict=True):
        results[mode].append(r)
    text = report(a.task, a.preset, results)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
