"""Quality parity: dense-only training against the automatic dense->sparse switch, for any preset.

    python bench/parity.py --preset quick [--seeds 1001 1002 1003] [--modes dense learned coverage]
        [--extra_seeds 1001 1002 1003] [--out bench/results/parity-quick.txt]
    python bench/parity.py --task imagenet-vit-ti --preset fashion --modes all-dense full s2d switch \
        --pairs full:s2d full:switch

Every run is its own main_train.py process on the same prepared data. Modes: dense (--no_switch), learned
(SAT's rule: top-k of the learned pattern G = P P^T), measured (top-k of the measured block mass), coverage (the
fewest blocks keeping `recall_target` of the measured mass), measured-diag (measured with `keep_diagonal`: every
query block keeps its own key block among the k), rows-diag/stripes-diag (other spreads of it), and two controls:
random-diag (a random layout) and forced-first (the switch after the first step). For the ViT's two transitions:
all-dense (dense MLPs, no switch), s2d (Monarch MLPs densified, no switch), switch (dense MLPs, the task's own
switch rule), full (both). The first of --modes is the baseline; `--seeds` are used for it and the second mode,
`--extra_seeds` for the others. Prints mean and sample sd per mode (top-5 and parameter counts for the ViT tasks);
every mode's paired difference against the baseline on the seeds both ran, with a 95% t confidence interval, and
the wall-time ratio; the --pairs comparisons; switch steps; layout recall and density used.
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
# The ViT's two transitions, each alone and together, with the task's own switch rule (for the ViT tasks SAT's
# learned pattern): MLPs dense or Monarch densified at sparsity.s2d_fraction (S2D), attention switched or not.
_DENSE_MLP, _MONARCH = '--set=model.mlp="dense"', '--set=model.mlp="monarch"'
MODES |= {"all-dense": ["--no_switch", _DENSE_MLP], "s2d": ["--no_switch", _MONARCH], "switch": [_DENSE_MLP],
          "full": [_MONARCH]}
# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (scipy is not a run-time dependency)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run(root: Path, task: str, preset: str, seed: int, mode: str, extra: list[str], threads: int = 0,
        data_dir: Path | None = None) -> dict:
    name = f"{mode}-{seed}"
    data = ["--data_dir", str(data_dir)] if data_dir else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "main_train.py"), "--task", task, "--preset", preset,
                    "--random", str(seed), "--name", name, "--root", str(root), "--no_progress",
                    *data, *MODES[mode], *extra], check=True, stdout=subprocess.DEVNULL,
                   env=env)
    wall = time.perf_counter() - t0
    summary = json.loads((root / "logs" / f"log-{seed}" / task / f"{name}.summary.json").read_text())
    return {**summary, "wall_s": wall, "seed": seed, "mode": mode}


_RECORD = threading.Lock()  # runs.jsonl is appended to by --jobs runs at once


def cached_run(root: Path, task: str, preset: str, seed: int, mode: str, extra: list[str],
               threads: int = 0, data_dir: Path | None = None) -> dict:
    """One run, or its record from an earlier invocation with the same --root (runs.jsonl), so that an
    interrupted comparison continues where it stopped; every finished run is printed as it ends."""
    done = root / "runs.jsonl"
    if done.exists():
        for line in done.read_text().splitlines():
            r = json.loads(line)
            if r["seed"] == seed and r["mode"] == mode:
                return r
    r = {**run(root, task, preset, seed, mode, extra, threads, data_dir), "threads": threads or None}
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


def _paired(mode: str, rs: list[dict], base: str, base_runs: dict[int, dict]) -> list[str]:
    """Paired differences of `mode` against `base` on the seeds both ran: top-1 (and top-5 where the task has
    more than 5 classes) with 95% t intervals, and the wall-time ratio."""
    paired = [(r, base_runs[r["seed"]]) for r in rs if r["seed"] in base_runs]
    if not paired:
        return []
    out = []
    for key, label in (("test_accuracy", "top-1"), ("test_top5", "top-5")):
        if key == "test_top5" and not all(a.get(key) is not None for a, _ in paired):
            continue
        diff = [100 * (a[key] - d[key]) for a, d in paired]
        m, h = ci95(diff)
        out.append(f"{mode} - {base} (paired, {len(paired)} seeds) {label}: {m:+.2f} points, 95% CI "
                   f"[{m - h:+.2f}, {m + h:+.2f}]; per seed {', '.join(f'{x:+.1f}' for x in diff)}")
    ratio = sum(d["wall_s"] for _, d in paired) / sum(a["wall_s"] for a, _ in paired)
    out[0] += f"; wall-time ratio {base}/{mode} {ratio:.2f}x"
    return out


def report(task: str, preset: str, results: dict[str, list[dict]], pairs: list[tuple[str, str]] = ()) -> str:
    """The table: per mode, then every mode against the first one (the baseline), then the extra `pairs`
    (mode, against), then per run."""
    base = next(iter(results))
    top5 = all(r.get("test_top5") is not None for rs in results.values() for r in rs) and any(
        r.get("params_at_start") for rs in results.values() for r in rs)  # the ViT tasks: ImageNet's metrics
    lines = [f"{task} --preset {preset}: test accuracy (%), wall time (s), switch, layout recall, density used"]
    lines.append(f"{'mode':<14}{'seeds':>6}{'acc mean':>10}{'± sd':>7}" + (f"{'top-5':>8}{'± sd':>7}" if top5 else "")
                 + f"{'wall mean':>11}{'± sd':>7}{'recall':>8}{'density':>9}  switch steps (reason)")
    for mode, rs in results.items():
        acc = [100 * r["test_accuracy"] for r in rs]
        acc5 = [100 * r["test_top5"] for r in rs] if top5 else []
        wall = [r["wall_s"] for r in rs]
        recall = [r["layout_recall"]["mean"] for r in rs if r.get("layout_recall") and r["layout_recall"]["mean"]]
        dens = [r["density_used"] for r in rs if r.get("density_used")]
        switches = ", ".join(f"{r['transition_step']} ({r['transition_reason']})" if r["transition_step"] else "-"
                             for r in rs)
        lines.append(f"{mode:<14}{len(rs):>6}{statistics.mean(acc):>10.2f}{sd(acc):>7.2f}"
                     + (f"{statistics.mean(acc5):>8.2f}{sd(acc5):>7.2f}" if top5 else "")
                     + f"{statistics.mean(wall):>11.1f}{sd(wall):>7.1f}"
                     f"{statistics.mean(recall) if recall else math.nan:>8.3f}"
                     f"{statistics.mean(dens) if dens else math.nan:>9.3f}  {switches}")
        if any(r["transition_step"] for r in rs):
            sparse = sum(tested_phase(r) == "sparse" for r in rs)
            lines.append(f"{'':<14}{sparse} of {len(rs)} tested checkpoints trained past the switch (the test "
                         f"accuracy of the others is a dense-phase model's)")
        params = sorted({(r.get("params_at_start"), r.get("params_at_end"), r.get("densify_step")) for r in rs
                         if r.get("params_at_start")}, key=str)
        for start, end, step in params:
            lines.append(f"{'':<14}parameters {start:,} at the start, {end:,} at the end"
                         + (f" (S2D at step {step})" if step else ""))
    runs = {mode: {r["seed"]: r for r in rs} for mode, rs in results.items()}
    for mode, rs in list(results.items())[1:]:
        lines += _paired(mode, rs, base, runs[base])
    for mode, against in pairs:
        if mode in results and against in results:
            lines += _paired(mode, results[mode], against, runs[against])
    lines.append("per run: seed mode test% " + ("top-5% " if top5 else "") + "wall_s switch densify "
                 "best-dev-step(tested phase) recall density steps/s(dense, sparse)")
    for mode, rs in results.items():
        for r in rs:
            rec = (r.get("layout_recall") or {}).get("mean")
            lines.append(f"  {r['seed']} {mode:<13} {100 * r['test_accuracy']:.2f} "
                         + (f"{100 * r['test_top5']:.2f} " if top5 else "")
                         + f"{r['wall_s']:.1f} {r['transition_step'] or '-'} {r.get('densify_step') or '-'} "
                         f"{r.get('best_step', '-')}({tested_phase(r)}) {'-' if rec is None else f'{rec:.3f}'} "
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
    p.add_argument("--modes", nargs="+", default=["dense", "learned"], choices=list(MODES),
                   help="the first is the baseline every other mode is compared with")
    p.add_argument("--pairs", nargs="*", default=[], metavar="MODE:AGAINST",
                   help="further paired comparisons, e.g. full:s2d (the switch's effect with Monarch MLPs)")
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

    cfg = load_config(a.task, a.preset)
    # the same data for every run: prepared once under --root, or the folder the ViT tasks read as it is
    data_dir = None if cfg.dataset.kind == "image_folder" else root / "data"
    if data_dir:
        prepare_data(cfg, data_dir)
    extra = [f"--set={s}" for s in a.set]
    pairs = [tuple(x.split(":", 1)) for x in a.pairs]
    if len(set(a.modes)) != len(a.modes) or any(len(x) != 2 or not set(x) <= set(a.modes) for x in pairs):
        p.error("--modes must differ from each other, and every --pairs item be MODE:AGAINST of two --modes")
    autos = a.modes[1:]
    planned = [(seed, mode) for seed in a.seeds for mode in a.modes[:2]]
    planned += [(seed, mode) for seed in (a.seeds if a.extra_seeds is None else a.extra_seeds) for mode in autos[1:]]
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else 0
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # each run is its own process; threads only wait
        done = list(pool.map(lambda job: cached_run(root, a.task, a.preset, *job, extra, threads, data_dir), planned))
    results: dict[str, list[dict]] = {m: [] for m in a.modes}
    for (_, mode), r in zip(planned, done, strict=True):
        results[mode].append(r)
    text = report(a.task, a.preset, results, pairs)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
