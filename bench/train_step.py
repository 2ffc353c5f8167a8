"""Training-step speed and memory at the lra-image model shapes, dense phase against sparse phase.

    python bench/train_step.py [--batch 32] [--density 0.05] [--steps 10] [--task lra-image] [--preset quick]
        [--amp off bf16] [--patterns measured learned] [--set sparsity.density=0.1 ...] [--out FILE]

Another task's shapes: --task lra-listops --preset quick (the README's no-download job); the density defaults
to the task's.

Each measurement runs in its own process (so peak memory is that phase's alone) and reports the median step
time and two peaks above the process's idle baseline (model, optimizer and data already built): resident
memory (what the machine gives the process, including what glibc's heap keeps after frees), and live tensor
memory (the profiler's allocation and free records in time order from the idle state over two steps, in a
process of its own with the torch backend on PyTorch's threads, whose allocations the profiler sees; the CPU
analogue of torch.cuda.max_memory_allocated).
The sparse phase's layout is the top-k of the configured pattern's map at the configured density (with
`keep_diagonal` as configured; a measured map comes from two monitored passes of the benchmark batch).
Dense phase: the SAT default monitors every step (the fused attention with statistics, and the pattern loss
with SAT's learned pattern). The
unmonitored dense step (the same fused attention without statistics: on a CPU with attention dropout SDPA takes
its math path) and the scaled_dot_product_attention step are measured too; the monitor's share is measured
from unmonitored and monitored steps alternating in the monitored phase's process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_peak_mb(step, steps: int = 2) -> float:
    """Peak of tensor allocations minus frees from the idle state over the first `steps` steps (what they keep,
    such as the kernels' workspaces and the optimizer state, included), from the profiler's raw allocation
    records in time order (each op's net memory would miss temporaries freed inside it)."""
    from torch._C._profiler import _EventType
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        for _ in range(steps):
            step()
    events = []  # (time, bytes): positive for an allocation, negative for a free
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        todo.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def child(phase: str, task: str, preset: str | None, batch: int, density: float | None, steps: int,
          backend: str, live_only: bool, sets: list[str]) -> dict:
    import torch

    from sat.cli import set_overrides
    from sat.config import load_config, merge
    from sat.data.batch import Batch
    from sat.device import amp_dtype
    from sat.kernels.runtime import RUNTIME
    from sat.models.build import build_model
    from sat.optim import make_optimizer
    from sat.sparsity.monitor import TransitionMonitor
    from sat.train import step_backward, step_forward

    torch.manual_seed(0)
    recompute = "sparse" if phase == "sparse-recompute" else "off"
    flags = {"training": {"batch_size": batch}, "model": {"recompute": recompute}}
    cfg = load_config(task, preset, overrides=merge(set_overrides(sets), flags))
    density = cfg.sparsity.density if density is None else density
    model = build_model(cfg, vocab_size=256, backend=backend)  # lra-image's byte vocabulary; enough for any
    optimizer = make_optimizer(model, cfg)
    n = cfg.dataset.max_seq_len
    mask = None
    if cfg.model.pooling == "cls":  # the class token takes one position: the last one must be padding
        mask = torch.ones(batch, n, dtype=torch.bool)
        mask[:, -1] = False
    data = Batch(torch.randint(0, 256, (batch, n)), mask, torch.randint(0, 10, (batch,)))
    if phase.startswith("sparse"):
        if cfg.sparsity.pattern != "learned":  # a measured map to choose from: two monitored passes of this batch
            with torch.no_grad():
                for _ in range(2):
                    model(data, collect=True)
        for layer in model.attention_layers():  # the top-k rule of the configured pattern (coverage: of its map)
            layer.sparsify(density, keep_diagonal=cfg.sparsity.keep_diagonal)
    monitored = phase == "dense-monitored"
    # The profiler does not see allocations on Python worker threads: live memory is measured on PyTorch's threads.
    choices = {"cpu_dropout_path": "sdpa" if phase == "dense-sdpa" else "fused",
               "threading": "team" if live_only else "auto"}
    monitor = TransitionMonitor(cfg.sparsity.sk, cfg.sparsity.ds, cfg.model.num_layers)

    dtype = amp_dtype(cfg, torch.device("cpu"))  # what training runs: the trainer's own forward and backward
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)

    def step(collect: bool = monitored):
        _, loss = step_forward(model, model, data, data.y, collect, cfg, dtype, False)
        step_backward(loss.total, model, optimizer, scaler, cfg.training.clip_value)
        if loss.maps:
            monitor.update(loss.maps)  # what the scheduler runs on a monitored step: skewness, distance, drift

    with RUNTIME.override(**choices):
        result = measure(step, monitored, live_only, steps)
    if live_only:
        return result
    m = cfg.model
    shapes = (f"{task}{' --preset ' + preset if preset else ''} shapes: {m.num_layers} layers, dim {m.dim}, "
              f"N={n}, batch {batch}, block {cfg.sparsity.block_size}, density {density}, pattern "
              f"{cfg.sparsity.pattern}{' with the diagonal kept' if cfg.sparsity.keep_diagonal else ''}")
    return {"phase": phase, "shapes": shapes, **result, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def measure(step, monitored: bool, live_only: bool, steps: int) -> dict:
    """Live peak (`live_only`, in a process of its own: the profiler's records would count in the resident memory)
    or the median step time, the resident peak above idle and the monitor's share of a monitored step."""
    if live_only:
        return {"live_peak_mb": live_peak_mb(step)}  # from idle over two steps: workspaces etc. included

    def timed(collect: bool) -> float:
        t0 = time.perf_counter()
        step(collect)
        return time.perf_counter() - t0

    baseline = rss_peak_mb()  # idle: model, optimizer and data built, no step taken yet
    step()  # warm-up: allocator, lookup tables, workspaces, optimizer state
    times = [timed(monitored) for _ in range(steps)]
    rss = rss_peak_mb() - baseline
    share = None
    if monitored:  # the monitor's share from alternating steps, so that other load slows both kinds alike
        pairs = [(timed(False), timed(True)) for _ in range(steps)]
        plain, with_monitor = (statistics.median(x) for x in zip(*pairs, strict=True))
        share = (with_monitor - plain) / with_monitor
    return {"step_s": statistics.median(times), "peak_mb_above_idle": rss, "monitor_share": share}


PHASES = {"dense-monitored": "dense, monitored (SAT default)", "dense": "dense, not monitored",
          "dense-sdpa": "dense, SDPA (math path + dropout)", "sparse": "sparse",
          "sparse-recompute": "sparse, model.recompute=sparse"}


def run_phases(a, amp: str, pattern: str | None) -> dict[str, dict]:
    """Every phase in its own processes (timed, then live memory) for one precision and layout rule."""
    rows = {}
    for phase in PHASES:
        extra = ["--density", str(a.density)] if a.density is not None else []
        extra += ["--preset", a.preset] if a.preset else []
        extra += [f"--set={x}" for x in a.set] + [f"--set=training.amp=\"{amp}\""]
        if pattern:  # the rule with its diagonal setting: measured keeps the diagonal (LRA), learned does not
            diagonal = str(pattern != "learned").lower()
            extra += [f"--set=sparsity.pattern=\"{pattern}\"", f"--set=sparsity.keep_diagonal={diagonal}"]
        rows[phase] = {}
        for live in ([], ["--live"]):
            r = subprocess.run([sys.executable, __file__, "--child", phase, "--task", a.task, "--batch", str(a.batch),
                                "--steps", str(a.steps), "--backend", a.backend, *extra, *live],
                               capture_output=True, text=True, check=True)
            rows[phase].update(json.loads(r.stdout.strip().splitlines()[-1]))
    return rows


def section(rows: dict[str, dict], amp: str, steps: int, backend: str) -> list[str]:
    dm, d = rows["dense-monitored"], rows["dense"]
    lines = [f"{d['shapes']}, amp {amp}, backend {backend}, torch {d['torch']}, {d['threads']} threads, median of "
             f"{steps} steps", f"{'phase':<34}{'step (ms)':>11}{'steps/s':>9}{'peak RSS MB':>13}{'peak live MB':>14}"]
    for phase, name in PHASES.items():
        r = rows[phase]
        lines.append(f"{name:<34}{1000 * r['step_s']:>11.1f}{1 / r['step_s']:>9.2f}{r['peak_mb_above_idle']:>13.1f}"
                     f"{r['live_peak_mb']:>14.1f}")
    for label, r in (("sparse", rows["sparse"]), ("with recompute: sparse", rows["sparse-recompute"])):
        # below 1 MB the resident peak is within what the idle process already held: no ratio to give
        rss = (f"{dm['peak_mb_above_idle'] / r['peak_mb_above_idle']:.2f}x" if r["peak_mb_above_idle"] >= 1.0
               else "n/a (sparse within the idle peak)")
        lines.append(f"{label} / dense-monitored steps/s: {dm['step_s'] / r['step_s']:.2f}x; peak memory "
                     f"dense-monitored / sparse: {rss} resident, {dm['live_peak_mb'] / r['live_peak_mb']:.2f}x live")
    lines.append(f"monitor share of a monitored dense step (monitored and unmonitored steps alternating in one "
                 f"process, medians of {steps} each): {100 * dm['monitor_share']:.1f}%")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--density", type=float, help="default: the task's")
    p.add_argument("--task", default="lra-image")
    p.add_argument("--preset")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backend", default="torch")
    p.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16"],
                   help="precisions to measure, each a section (training.amp; bf16 = CPU autocast)")
    p.add_argument("--patterns", nargs="+", default=[None], metavar="PATTERN",
                   help="layout rules to measure, each a section: measured (the diagonal kept, the LRA default) "
                        "or learned (SAT's, no diagonal rule); default: the task's own")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config value for every phase, e.g. --set sparsity.density=0.1 (repeatable)")
    p.add_argument("--out", help="also write the tables to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.task, a.preset, a.batch, a.density, a.steps, a.backend, a.live, a.set)))
        return
    lines = []
    for amp in a.amp:
        for pattern in a.patterns:
            block = section(run_phases(a, amp, pattern), amp, a.steps, a.backend)
            print("\n".join(block) + "\n", flush=True)
            lines += block + [""]
    if a.out:
        Path(a.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
