"""Evaluate a saved run: test accuracy (top-1 and top-5), mean batch latency and peak memory.

    python main_inference.py --mode eval --task lra-image --random 1001 --name sat
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sat.checkpoint import CheckpointError, load_checkpoint
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

    import torch

    from main_train import resolve_device
    from sat.config import from_dict
    from sat.train import RunPaths, _model_from_state, amp_dtype, eval_loader, evaluate, load_data, peak_memory_mb

    try:
        dev = torch.device(resolve_device(a.device))
        paths = RunPaths.make(a.root, a.random, a.task, a.name)
        state = load_checkpoint(paths.best if a.which == "best" else paths.last, map_location=dev)
        if state["task"] != a.task:
            raise CheckpointError(f"checkpoint holds task {state['task']}, not {a.task}; check --task")
        cfg = from_dict(state["config"])
        data_dir = Path(a.data_dir) if a.data_dir else Path(state["data_dir"])
        splits, _ = load_data(cfg, data_dir, need_train=a.split == "train")
        model = _model_from_state(state, dev, a.backend)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res = evaluate(model, eval_loader(splits[a.split], cfg), dev, amp_dtype(cfg, dev))
    except (ConfigError, DataError, CheckpointError) as e:
        die(str(e))
    sparse = any(layer.is_sparse for layer in model.attention_layers())
    out = {"task": a.task, "name": a.name, "checkpoint_step": state["step"], "split": a.split,
           "accuracy": res["accuracy"], "top5": res["top5"], "examples": res["examples"],
           "mean_batch_latency_ms": res["latency_ms"],
           "peak_memory_mb": peak_memory_mb(dev), "attention": "block-sparse" if sparse else "dense"}
    print(f"{a.split} accuracy {res['accuracy']:.4f} (top-5 {res['top5']:.4f}) on {res['examples']} examples "
          f"({out['attention']} attention, checkpoint of step {state['step']}); mean batch latency "
          f"{res['latency_ms']:.2f} ms; peak memory {out['peak_memory_mb']:.0f} MB")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
