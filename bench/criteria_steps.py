"""When would SAT's criteria switch a run? Read from the monitor's trace, for any thresholds.

    python bench/criteria_steps.py RUN.tensorboard [RUN.tensorboard ...] [--sk 1.7] [--ds 1.3] [--backstops 400 600]

A run logs, every monitored step of its dense phase, each layer's skewness and drift (TensorBoard scalars
monitor/skewness/layerL and monitor/drift/layerL). A dense-only run (--no_switch) logs them for all its steps,
and an automatic run of the same seed trains exactly as it does until its switch, so the dense-only trace says
at which step the criteria (every layer skewness >= sk and drift < ds, docs/switch.md) first hold, whatever
backstop the automatic run had. Per run it prints: the first step every layer's skewness reaches sk; from then
on, the share of steps whose drift is below ds in each layer and in all layers at once; the first steps where
the criteria hold; and for each backstop B, whether they hold before B.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def read_trace(tb_dir: Path) -> tuple[dict[int, list[float]], dict[int, list[float | None]]]:
    """{step: per-layer skewness}, {step: per-layer drift or None} of one run's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    layers = sorted(int(t.rsplit("layer", 1)[1]) for t in tags if t.startswith("monitor/skewness/layer"))
    if not layers:
        raise SystemExit(f"error: {tb_dir} has no monitor scalars; pass a run's .tensorboard folder")
    skew = {L: {e.step: e.value for e in ea.Scalars(f"monitor/skewness/layer{L}")} for L in layers}
    drift = {L: ({e.step: e.value for e in ea.Scalars(f"monitor/drift/layer{L}")}
                 if f"monitor/drift/layer{L}" in tags else {}) for L in layers}
    steps = sorted(set.intersection(*(set(s) for s in skew.values())))
    return ({t: [skew[L][t] for L in layers] for t in steps},
            {t: [drift[L].get(t) for L in layers] for t in steps})


def analyse(skew: dict, drift: dict, sk: float, ds: float, backstops: list[int]) -> dict:
    """The criteria's timing in one trace (see the module docstring)."""
    steps = sorted(skew)
    skewed = [t for t in steps if all(s >= sk for s in skew[t])]
    first_skewed = skewed[0] if skewed else None
    after = [t for t in steps if first_skewed is not None and t >= first_skewed]
    below = [[d is not None and d < ds for d in drift[t]] for t in after]
    layers = len(skew[steps[0]]) if steps else 0
    hits = [t for t in skewed if all(d is not None and d < ds for d in drift[t])]
    return {"steps": len(steps), "last": steps[-1] if steps else None, "first_skewed": first_skewed,
            "drift_share": [sum(b[i] for b in below) / len(below) if below else None for i in range(layers)],
            "joint_share": sum(all(b) for b in below) / len(below) if below else None,
            "hits": hits, "before": {b: any(t < b for t in hits) for b in backstops}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="runs' .tensorboard folders")
    p.add_argument("--sk", type=float, default=1.7)
    p.add_argument("--ds", type=float, default=1.3)
    p.add_argument("--backstops", type=int, nargs="*", default=[])
    a = p.parse_args()
    print(f"criteria: every layer skewness >= {a.sk} and drift < {a.ds}")
    for tb in a.runs:
        r = analyse(*read_trace(tb), a.sk, a.ds, a.backstops)
        shares = ", ".join("-" if s is None else f"{100 * s:.1f}%" for s in r["drift_share"])
        joint = "-" if r["joint_share"] is None else f"{100 * r['joint_share']:.2f}%"
        before = "".join(f"; before {b}: {'yes' if ok else 'no'}" for b, ok in r["before"].items())
        print(f"{tb.name}: {r['steps']} monitored steps (to {r['last']}); skewness >= sk in every layer from step "
              f"{r['first_skewed']}; then drift < ds in {shares} of steps per layer, {joint} in all at once; "
              f"criteria hold at {r['hits'][:6] or 'no step'}{' ...' if len(r['hits']) > 6 else ''}{before}")


if __name__ == "__main__":
    main()
