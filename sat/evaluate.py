"""Evaluation: top-1 and top-5 accuracy, loss and batch latency over one pass of a split, and the evaluation of
a saved run (what main_inference.py reports)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sat import distributed
from sat.checkpoint import CheckpointError, load_checkpoint
from sat.config import ConfigError, from_dict
from sat.data.loading import load_task_data
from sat.device import amp_dtype, peak_memory_mb
from sat.models.build import build_model
from sat.run_state import load_weights
from sat.runlog import RunPaths
from sat.runs import config_conflicts


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
             max_batches: int = 0, across_ranks: bool = False) -> dict:
    """Top-1 accuracy, top-5 accuracy, mean loss and mean batch latency (ms) over a loader of Batches (one
    pass). `across_ranks`: every rank passed its shard; counts and losses are summed over ranks."""
    was_training = model.training
    model.eval()
    correct = correct5 = total = 0
    loss_sum = 0.0
    times = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = batch.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        loss_sum += float(F.cross_entropy(logits.float(), batch.y, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.y).sum())
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        correct5 += int((top5 == batch.y.unsqueeze(-1)).any(-1).sum())
        total += len(batch)
    model.train(was_training)
    if across_ranks:
        sums = torch.tensor([correct, correct5, total, loss_sum], dtype=torch.float64, device=device)
        sums = distributed.all_reduce_sum_(sums).tolist()
        correct, correct5, total, loss_sum = int(sums[0]), int(sums[1]), int(sums[2]), sums[3]
    n = max(total, 1)
    return {"accuracy": correct / n, "top5": correct5 / n, "loss": loss_sum / n,
            "latency_ms": 1000 * sum(times) / max(len(times), 1), "examples": total}


def model_from_checkpoint(state: dict, device: torch.device, backend: str = "auto") -> nn.Module:
    """Rebuild the model of a loaded checkpoint (densified if the run had densified) with its weights, on
    `device`; a checkpoint that does not fit its own config's model raises CheckpointError."""
    cfg = from_dict(state["config"])
    model = build_model(cfg, state["vocab_size"], backend)
    try:
        load_weights(model, state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not match the model of task {cfg.task} "
                              f"({str(e).splitlines()[0]}); use the checkpoint of this task and config") from e
    return model.to(device)


def majority_rate(labels) -> float:
    """The share of the most frequent class among `labels`: the accuracy of always guessing it."""
    counts = torch.bincount(torch.as_tensor(labels))
    return float(counts.max()) / float(counts.sum())


def changes_evaluation(section: str, key: str) -> bool:
    """Config keys that change what an evaluation computes: the model built, the data as it is read, the
    precision. The rest (steps, learning rate, thresholds, density: the saved layouts are used) only steers
    training."""
    if section == "model":
        return True
    if section == "dataset":
        return key not in ("generate", "num_workers")
    return (section, key) in {("sparsity", "block_size"), ("sparsity", "per_head"), ("training", "amp")}


def evaluate_saved_run(paths: RunPaths, task: str, split: str = "test", which: str = "best",
                       data_dir: str | Path | None = None, device: str = "cpu", backend: str = "auto",
                       given: dict | None = None) -> dict:
    """Evaluate the `which` ("best" dev or "last") checkpoint of a run on one split of its data (the data it
    trained on unless `data_dir`): accuracy, top-5, examples, mean batch latency, peak memory and whether the
    attention was block-sparse. The configuration is the checkpoint's; what `given` ({section: {key: value}},
    what the command line sets) says of the keys that change an evaluation must agree with it. Bad input
    raises ConfigError, DataError or CheckpointError."""
    dev = torch.device(device)
    path = paths.best if which == "best" else paths.last
    state = load_checkpoint(path, map_location=dev)
    if state["task"] != task:
        raise CheckpointError(f"checkpoint holds task {state['task']}, not {task}; check --task")
    conflicts = config_conflicts(state["config"], given or {}, changes_evaluation, "on the command line")
    if conflicts:
        raise ConfigError(f"{'; '.join(conflicts)}: evaluation uses the configuration the run was trained with "
                          f"({path}), so drop such flags or check --name/--random")
    cfg = from_dict(state["config"])
    data = load_task_data(cfg, Path(data_dir) if data_dir else Path(state["data_dir"]), need_train=split == "train")
    model = model_from_checkpoint(state, dev, backend)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    res = evaluate(model, data.eval_batches(split), dev, amp_dtype(cfg, dev))
    sparse = any(layer.is_sparse for layer in model.attention_layers())
    return {"task": task, "name": paths.name, "checkpoint_step": state["step"], "split": split,
            "accuracy": res["accuracy"], "top5": res["top5"], "examples": res["examples"],
            "num_classes": cfg.dataset.num_classes, "mean_batch_latency_ms": res["latency_ms"],
            "peak_memory_mb": peak_memory_mb(dev), "attention": "block-sparse" if sparse else "dense"}
